"""Settings of a probe run, as typed dataclasses (their docstrings are the CLI's --help)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from probe.precision import resolve_dtype
from probe.snis import NORMALISATIONS
from probe.statistics import INTEGRANDS
from probe.update import PARTS as UPDATE_PARTS

PARTS = (*UPDATE_PARTS, "baseline_plus_grad")  # the update's parts and the additivity check


@dataclass
class ProbeSettings:
    """What to measure and predict on the evaluation batch E.

    Args:
        parts: update parts to probe exactly: ``full`` (the whole step), ``baseline`` (momentum and weight decay)
            and ``grad`` (this batch's gradient). ``baseline_plus_grad`` is a numerical check only: it is the
            direction of ``full`` rebuilt as the sum of the two parts, so its curve lies on ``full``'s.
        etas: step sizes (learning rates) of the sweep, theta(eta) = theta + eta * part.
            Empty: a geometric grid of ``n_etas`` values from ``eta_min_factor`` to
            ``eta_max_factor`` times the optimizer's lr (eta = lr is the real step).
        n_etas: number of grid points when ``etas`` is empty.
        eta_min_factor: smallest eta of the default grid, as a multiple of lr.
        eta_max_factor: largest eta of the default grid, as a multiple of lr.
        reference_eta: the eta of the eval x update matrix and per-token views; default lr.
        integrand: ``token_entropy`` (sum of full-vocabulary token entropies, lower variance)
            or ``logprob`` (-log p of the sequence); both are unbiased for the sequence entropy.
        truncation: truncate importance weights at ``truncation * mean(w)``; 0 disables.
        normalisation: ``global`` SNIS, or ``per_prompt`` (normalise within each prompt group,
            then average groups weighted by their sample counts).
        first_order: predict Delta H to first order by JVP (exact derivative of the estimator).
        second_order: add the second-order term (JVP of JVP) and the linear radius.
        attribution: attribute the first-order Delta H of the gradient part to each update sequence.
        eval_update_matrix: also compute the M x N eval x update matrix (min(M, N) extra backward or JVP passes:
            on a large vocabulary it can cost more than the rest of the run; timed as
            ``eval_update_matrix_<eval>_s``).
        per_sequence_exact: indices of update sequences whose own direction v_i is probed
            exactly (slow path, to check attributions); the mixed form
            H(theta + eta b + eta v_i) - H(theta + eta b) is reported beside it.
        per_token_views: save per-token log-probs and entropies of E at theta and at theta + reference_eta * full
            (``per_token/*.npy``, flat over response tokens; sequence j at ``offsets[j]:offsets[j+1]``).
        reward: when E carries rewards (sampled with a ``reward`` function, or a ``reward`` field in its file), also
            the change of E's expected reward Delta R(eta) by the same SNIS (with SE, first and second order) and,
            with ``attribution``, each update sequence's first-order share r_i of it (docs/DESIGN.md section 5).
        covariance_law: the covariance term of Cui et al. 2025 (arXiv 2505.22617) on U, per token
            (log p - mean)(A - mean) centred over U's response tokens, and its batch mean, reported next to the
            exact changes; with ``attribution``, how its top tokens overlap those of largest |a_it|.
        covariance_fraction: the fraction of U's response tokens the covariance law's overlap takes (at least
            one): Clip-Cov's and KL-Cov's default 2e-4 (verl's ``clip_cov_ratio``, ``kl_cov_ratio``).
        forward_batch_size: sequences of E teacher-forced per forward pass (memory; the results do not depend on
            it beyond float rounding). Not ``data.eval_batch_size``, the sequences per predict batch (the unit
            of resuming and of DDP sharding).
        head_budget_mib: MiB the log-softmax head's temporaries over [tokens, vocabulary] may take at once (the
            head runs on chunks of response tokens sized to it, whatever the vocabulary; memory only, the results do
            not depend on it beyond float rounding).
        save_update: write the reconstructed step to ``update.safetensors``.
    """

    parts: list[str] = field(default_factory=lambda: ["full", "baseline", "grad"])
    etas: list[float] = field(default_factory=list)
    n_etas: int = 5
    eta_min_factor: float = 0.1
    eta_max_factor: float = 10.0
    reference_eta: float | None = None
    integrand: str = "token_entropy"
    truncation: float = 0.0
    normalisation: str = "global"
    first_order: bool = True
    second_order: bool = True
    attribution: bool = True
    eval_update_matrix: bool = False
    per_sequence_exact: list[int] = field(default_factory=list)
    per_token_views: bool = False
    reward: bool = True
    covariance_law: bool = True
    covariance_fraction: float = 2e-4
    forward_batch_size: int = 32
    head_budget_mib: float = 256.0
    save_update: bool = True

    def __post_init__(self) -> None:
        unknown = [p for p in self.parts if p not in PARTS]
        if unknown or not self.parts:
            raise ValueError(f"unknown part(s) {unknown or self.parts}; choose from {', '.join(PARTS)}")
        if self.integrand not in INTEGRANDS:
            raise ValueError(f"unknown integrand {self.integrand!r}; choose 'logprob' or 'token_entropy'")
        if self.normalisation not in NORMALISATIONS:
            raise ValueError(f"unknown normalisation {self.normalisation!r}; choose one of {', '.join(NORMALISATIONS)}")
        if not (0 < self.covariance_fraction <= 1):
            raise ValueError(
                f"probe.covariance_fraction must be in (0, 1], got {self.covariance_fraction}: the fraction of U's "
                "response tokens compared. Fix: give a fraction in (0, 1], e.g. Clip-Cov's default 2e-4"
            )
        bad = [e for e in self.etas if not (isinstance(e, (int, float)) and math.isfinite(e) and e > 0)]
        if bad:
            raise ValueError(
                f"probe.etas must be finite and > 0, got {bad}; give positive learning rates or leave empty for the "
                "default grid"
            )
        if (
            self.n_etas < 1
            or not (0 < self.eta_min_factor <= self.eta_max_factor)
            or not math.isfinite(self.eta_max_factor)
        ):
            raise ValueError(
                f"an empty eta grid was asked for or the grid is malformed: n_etas={self.n_etas}, eta_min_factor="
                f"{self.eta_min_factor}, eta_max_factor={self.eta_max_factor}. Fix: set probe.n_etas >= 1 and "
                "0 < eta_min_factor <= eta_max_factor < inf, or give probe.etas explicitly"
            )
        if self.forward_batch_size < 1:
            raise ValueError(
                f"probe.forward_batch_size must be >= 1 (sequences per forward pass), got {self.forward_batch_size}"
            )
        if not (math.isfinite(self.head_budget_mib) and self.head_budget_mib > 0):
            raise ValueError(
                f"probe.head_budget_mib must be a finite number of MiB > 0, got {self.head_budget_mib}; the default "
                "256 fits 73 rows of a 151,936-token vocabulary without autograd"
            )
        if self.reference_eta is not None and not (math.isfinite(self.reference_eta) and self.reference_eta > 0):
            raise ValueError(
                f"probe.reference_eta must be a finite step size > 0, got {self.reference_eta}; leave it null to use "
                "the optimizer's lr (the real step)"
            )
        if self.truncation < 0 or not math.isfinite(self.truncation):
            raise ValueError(f"probe.truncation must be >= 0 (0 disables), got {self.truncation}")

    def eta_grid(self, lr: float) -> list[float]:
        """The sweep: ``etas`` if given, else a geometric grid around the optimizer's lr (always containing lr)."""
        if self.etas:
            return sorted(float(e) for e in self.etas)
        if not (math.isfinite(lr) and lr > 0):
            raise ValueError(f"the optimizer's lr is {lr}; set probe.etas explicitly")
        if self.n_etas == 1:
            return [lr]
        lo, hi = math.log(lr * self.eta_min_factor), math.log(lr * self.eta_max_factor)
        grid = [math.exp(lo + (hi - lo) * k / (self.n_etas - 1)) for k in range(self.n_etas)]
        grid[min(range(len(grid)), key=lambda k: abs(grid[k] - lr))] = lr  # eta = lr is the real step
        return grid


@dataclass
class PrecisionSettings:
    """Numerical precision of the probe (the policy's own dtype is ``policy.dtype``).

    Args:
        float64_head: log-softmax, entropies and log-weights in float64 (the model stays in ``dtype``).
        autocast: ``bfloat16`` or ``float16`` to run the forward passes over E under ``torch.autocast`` (GPU speed
            and memory of half precision) while the parameters, and so theta + eta * d, stay in ``policy.dtype``:
            the way to probe in half precision without rounding the step away. None: no autocast.
        tf32: allow TF32 matmuls on Ampere+ GPUs (faster, less precise).
        matmul_precision: ``torch.set_float32_matmul_precision`` value: highest, high or medium.
    """

    float64_head: bool = True
    autocast: str | None = None
    tf32: bool = False
    matmul_precision: str = "highest"

    def __post_init__(self) -> None:
        if self.autocast is not None and resolve_dtype(self.autocast) not in (torch.bfloat16, torch.float16):
            raise ValueError(
                f"precision.autocast must be bfloat16, float16 or null (no autocast), got {self.autocast!r}; the "
                "parameters' own dtype is policy.dtype"
            )
        if self.matmul_precision not in ("highest", "high", "medium"):
            raise ValueError(
                f"precision.matmul_precision must be highest, high or medium, got {self.matmul_precision!r}"
            )

    def apply(self) -> None:
        """Set torch's TF32 switches and float32 matmul precision for this process."""
        torch.backends.cuda.matmul.allow_tf32 = self.tf32
        torch.backends.cudnn.allow_tf32 = self.tf32
        torch.set_float32_matmul_precision(self.matmul_precision)


@dataclass
class RunSettings:
    """Where results go.

    Args:
        root: folder holding run directories.
        name: run directory name under ``root``; empty: ``<timestamp>``. Giving the name of an
            unfinished run resumes it; a finished run is never overwritten.
        overwrite: replace the run directory of the same name (deletes it first): a finished run, or the results
            of an unfinished one that a resume with other settings or inputs would mix in. Only a folder probe
            made (its ``.probe-run`` marker) is ever deleted.
        log_level: ``standard`` (one line per stage, warnings and the table; Lightning's and W&B's boilerplate
            silenced) or ``detailed`` (also resampling retries, timings, where each automatic choice came from,
            and nothing silenced).
        num_threads: CPU threads for torch (0: torch's default). Tiny models run fastest on 1 thread.
    """

    root: str = "runs"
    name: str = ""
    overwrite: bool = False
    log_level: str = "standard"
    num_threads: int = 0

    def __post_init__(self) -> None:
        if self.log_level not in ("standard", "detailed"):
            raise ValueError(f"run.log_level must be 'standard' or 'detailed', got {self.log_level!r}")
