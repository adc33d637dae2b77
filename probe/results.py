"""The results of a probe, one schema for offline runs and live steps (docs/DESIGN.md section 7).

An :class:`EvalResult` is everything measured on one evaluation batch E: the base entropy, per part
of the update the SNIS change at every eta with its SE, ESS and clipping, the first- and
second-order predictions, and (where asked) the attribution to U's sequences. ``summary.json``
holds one per evaluation batch under ``evals``, and every line of the live ``records.jsonl`` holds
one under ``eval``: the same field names in both. :func:`metrics` turns one into the scalar metrics
logged to W&B (and any Lightning logger), with the same keys offline and live.

Arrays (per-sequence contributions, attributions, the eval x update matrix, per-token views) are
kept in ``EvalResult.arrays`` keyed by their file path in the run directory (without ``.npy``);
they are not part of the JSON.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from probe.jsonable import json_safe

# Where the step the sweep takes differs from eta * d by more than ROUNDING_UNMEASURABLE (relative L1), the swept
# point is not eta * d and Delta H is reported null; beyond ROUNDING_FLAGGED it is reported with a warning.
ROUNDING_UNMEASURABLE, ROUNDING_FLAGGED = 0.5, 0.01
# Where fewer of the elements a step moves change than this when theta + eta * d is formed in the policy's dtype,
# the swept step is not eta * d but that of the few elements whose step exceeds half an ulp of their weight:
# warned in the summary, the table and the log (docs/DESIGN.md section 8).
CHANGED_FLAGGED = 0.9


@dataclass
class BaseEntropy:
    """H(theta) on E: per sequence (nats) and per token, with SEs (NaN where undefined)."""

    sequence: float
    sequence_se: float
    per_token: float
    per_token_se: float


@dataclass
class PartResult:
    """Delta H along one part of the update, per eta (lists follow the plan's etas)."""

    delta_h: list[float]  # SNIS estimate (nats per sequence)
    se: list[float]  # its delta-method SE
    delta_h_per_token: list[float]
    se_per_token: list[float]
    ess: list[float]  # effective sample size of the importance weights
    ess_fraction: list[float]  # ess / M
    clip_fraction: list[float]  # fraction of weights truncated
    max_log_weight: list[float]
    finite: list[bool]  # False where theta + eta * d overflowed the model (no estimate there)
    non_finite_sequences: list[int]
    first_order: float | None = None  # dDelta H/deta at 0 (nats per unit eta); None: not computed
    first_order_se: float | None = None
    first_order_per_token: float | None = None
    first_order_per_token_se: float | None = None
    predicted_first: list[float] | None = None  # first_order * eta
    second_order: float | None = None  # d2 Delta H / deta2 at 0
    second_order_per_token: float | None = None
    linear_radius: float | None = None  # eta where the quadratic term reaches 10% of the linear one
    linear_radius_per_token: float | None = None
    predicted_second: list[float] | None = None  # first_order * eta + second_order * eta^2 / 2
    # per eta, ||step taken - eta d||_1 / ||eta d||_1 with theta + eta d formed in the policy's dtype: beyond 0.5
    # most of the step rounds away and delta_h / se are null, beyond 0.01 it is flagged (probe.engine.eta_resolution)
    step_rounding_error: list[float] | None = None
    # per eta, the fraction of the elements the step moves whose value changes in the policy's dtype: below 0.9 the
    # swept step is that of the few elements whose step exceeds half an ulp of their weight (warned)
    changed_fraction: list[float] | None = None


@dataclass
class AttributionSummary:
    """First-order attribution a_i of the gradient part's Delta H to U's sequences (``attributions.npy``)."""

    sum: float  # sum_i a_i (nats per unit eta)
    abs_sum: float  # sum_i |a_i|: the scale the check is read against (the sum itself may cancel)
    grad_first_order: float  # the gradient part's first-order slope by a JVP over E
    relative_difference: float  # |sum - grad_first_order| / |grad_first_order| (cancels when the sum does)
    reference_eta: float
    top_positive: list[int]  # rows of U with the largest a_i
    top_negative: list[int]
    # the check (probe.verification.attribution_check; None in summaries written before it existed):
    scaled_difference: float | None = None  # |sum - grad_first_order| / max(abs_sum, |grad_first_order|)
    tolerance: float | None = None  # what scaled_difference is read against (by the policy's dtype)
    ok: bool | None = None  # scaled_difference <= tolerance
    # the response tokens of U with the largest |a_it| (``update_tokens/attributions.npy``): each
    # {"sequence", "position" (in its response), "token_id", "value" (a_it)}
    top_tokens: list[dict[str, Any]] | None = None


@dataclass
class EvalResult:
    """Everything measured on one evaluation batch E (``summary.json["evals"][k]``, a live record's ``eval``)."""

    name: str  # eval_00, eval_01, ...
    n_sequences: int
    n_tokens: int
    temperature: float  # tau: the entropy is that of the temperature-tau policy
    on_policy: bool  # E sampled from theta itself (False: a held E, reweighted from the policy it came from)
    base_entropy: BaseEntropy
    parts: dict[str, PartResult]
    warnings: list[str] = field(default_factory=list)
    ess_vs_sampling_policy: float | None = None  # held E only: ESS of theta against the sampling policy
    additivity: dict[str, Any] | None = None  # full vs baseline + grad measured as one direction
    sampler_gap: dict[str, float] | None = None  # teacher-forced vs the sampler's own log-probs of E
    attribution: AttributionSummary | None = None
    eval_update_matrix: dict[str, Any] | None = None
    per_sequence_exact: list[dict[str, Any]] | None = None
    # E's expected reward (E carries rewards): base, base_se, per part delta_r, se, first and second order, and the
    # attribution r_i of its first-order change to U's sequences (reward_attributions.npy)
    reward: dict[str, Any] | None = None
    covariance_law: dict[str, Any] | None = None  # probe.covariance.CovarianceLaw on U, next to the exact numbers
    arrays: dict[str, np.ndarray] = field(default_factory=dict, repr=False)  # run-directory path -> array

    def to_dict(self) -> dict[str, Any]:
        """The JSON form (strict: NaN as null; fields not computed are left out; no arrays)."""
        out = json_safe(self)
        out.pop("arrays", None)
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> EvalResult:
        """Read back the JSON form (``summary.json["evals"][k]``, a live record's ``eval``); null numbers become NaN."""

        def numbers(x: Any) -> Any:
            return [numbers(v) for v in x] if isinstance(x, list) else math.nan if x is None else x

        fields = {**data}
        fields["base_entropy"] = BaseEntropy(**{k: numbers(v) for k, v in data["base_entropy"].items()})
        fields["parts"] = {
            part: PartResult(
                **{k: v if k in ("finite", "non_finite_sequences") else numbers(v) for k, v in res.items()}
            )
            for part, res in data["parts"].items()
        }
        if data.get("attribution") is not None:
            fields["attribution"] = AttributionSummary(**data["attribution"])
        return cls(**fields)


# ---------------------------------------------------------------------------------------------
# metrics (W&B and any Lightning logger), the same keys offline and live


def eta_label(eta: float, lr: float) -> str:
    """``lr``, ``0.1lr``, ``10lr``: eta as a multiple of the update's lr (so keys survive an lr schedule)."""
    if not (lr > 0 and math.isfinite(lr)):
        return f"{eta:.3g}"
    factor = f"{eta / lr:.3g}"
    return "lr" if factor == "1" else f"{factor}lr"


def metrics(result: EvalResult, etas: list[float], lr: float) -> dict[str, float]:
    """Scalar metrics of one evaluation batch, keyed ``<eval>/<part>/<quantity>@<eta>``, e.g.
    ``eval_00/full/delta_h@lr`` (at the real step) or ``eval_00/grad/first_order`` (the slope)."""
    out: dict[str, float] = {}
    name = result.name
    for part, res in result.parts.items():
        for j, eta in enumerate(etas):
            at = eta_label(eta, lr)
            for key in (
                "delta_h",
                "se",
                "delta_h_per_token",
                "ess",
                "clip_fraction",
                "predicted_first",
                "predicted_second",
            ):
                values = getattr(res, key)
                if values is not None:
                    out[f"{name}/{part}/{key}@{at}"] = values[j]
        for key in ("first_order", "first_order_se", "second_order", "linear_radius"):
            if getattr(res, key) is not None:
                out[f"{name}/{part}/{key}"] = getattr(res, key)
    out[f"{name}/base_entropy"] = result.base_entropy.sequence
    out[f"{name}/base_entropy_per_token"] = result.base_entropy.per_token
    if result.reward is not None:
        for part, res in result.reward["parts"].items():
            for j, eta in enumerate(etas):
                for key in ("delta_r", "se", "predicted_first"):
                    if res.get(key) is not None:
                        out[f"{name}/reward/{part}/{key}@{eta_label(eta, lr)}"] = res[key][j]
            if res.get("first_order") is not None:
                out[f"{name}/reward/{part}/first_order"] = res["first_order"]
        out[f"{name}/reward/base"] = result.reward["base"]
    if result.covariance_law is not None:
        for key in ("batch_mean", "top_overlap", "rank_correlation", "law_at_lr"):
            out[f"{name}/covariance_law/{key}"] = result.covariance_law.get(key)
    if result.attribution is not None:
        out[f"{name}/attribution/sum"] = result.attribution.sum
        out[f"{name}/attribution/relative_difference"] = result.attribution.relative_difference
        out[f"{name}/attribution/scaled_difference"] = result.attribution.scaled_difference
    return {k: float(v) for k, v in out.items() if v is not None and math.isfinite(float(v))}


def update_metrics(update: dict[str, Any]) -> dict[str, float]:
    """``update/lr``, ``update/clip_coef``, ``update/grad_norm``, ``update/norm_<part>`` of an update summary."""
    out = {f"update/{key}": update[key] for key in ("lr", "clip_coef", "grad_norm")}
    out.update({f"update/norm_{part}": norm for part, norm in update["norms"].items()})
    return {k: float(v) for k, v in out.items() if v is not None and math.isfinite(float(v))}
