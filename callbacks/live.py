"""The live entropy probe: attach to any Lightning fit and predict, verify and measure each step's entropy change.

Every ``every_n_steps`` optimizer steps, in ``on_before_optimizer_step`` (gradients there are
unscaled, all-reduced by DDP, not yet clipped), the callback

1. reconstructs the step about to happen from the REAL gradients and the optimizer's state
   (``probe.update.update_from_gradients`` with ``AdamState.from_optimizer``; clipping at the
   Trainer's ``gradient_clip_val``): no second backward over U;
2. predicts the entropy change Delta H on its evaluation batch E: SNIS over a small sweep of
   eta around lr (eta = lr is the real step), first order (with its SE) and second order by JVP;
3. attributes the first-order change of the gradient part to the step's update sequences
   (``probe.attribution.attribute``: one backward over E, one JVP over U);

and after the step (``on_train_batch_end``) it

4. verifies that the parameters moved by exactly the reconstruction: per element
   ``|lr * full - (p_new - p_old)| / (2 ulp(|p|) + c lr (|baseline| + |grad|))`` (c = 1e-6 for 32-bit
   and lower, 1e-12 for float64; see :func:`verify_step`), the largest value in these units is
   reported, loudly (``logging.warning`` and ``warnings.warn``) when it exceeds 1;
5. measures the realised change on FRESH samples: E' ~ pi_new, H(new) - H(old) as the difference
   of two independent means (E ~ pi_old, or a fresh sample at theta_old when E is held fixed),
   SE = sqrt(se_old^2 + se_new^2), and z-scores of each prediction against it.

Records (one JSON line per probed step, ``<run_dir>/records.jsonl``), metrics to every logger of
the Trainer (W&B included) and, at the end of fit, ``<run_dir>/plots/live_entropy.png``; only rank 0
writes. Each record holds ``timings`` (seconds per phase and ``total_s``): the callback's own
overhead per probed step, for benchmarks.

Protocol. The LightningModule exposes

* ``policy``: the trained model (HF causal LM, optionally PEFT); the optimizer holds its parameters;
* ``probe_batch``: set in every ``training_step``, the update batch U of the step on this rank, a
  ``probe.batch.SequenceBatch`` with ``advantages`` (and ``old_logprobs`` if the loss uses them);
  ``index`` must be the position of each sequence in the step's global U (unique across ranks);
* ``probe_loss``: the ``probe.losses.LossConfig`` of the step;
* optional ``probe_normalisers`` (``Normalisers`` of the global U; default: computed from the gathered U),
  ``probe_head_dtype`` (the loss's log-softmax dtype; default float64) and ``tokenizer`` (EOS / pad ids
  and prompt files; default: the policy config's ids);

and guarantees that after backward ``p.grad = d/dp sum_{i in U} c_i`` (``c_i`` = ``per_sequence_loss``
with those normalisers; U = every rank's ``probe_batch``). ``probe.grpo.GRPOModule`` does. One
optimizer (``torch.optim.Adam``/``AdamW``), automatic optimisation, ``accumulate_grad_batches = 1``,
``gradient_clip_algorithm = "norm"``.

Under DDP every rank reconstructs the step from its (identical, all-reduced) gradients and verifies
its own parameters; U is gathered to rank 0 (one ``all_gather_object``), which samples E, predicts,
attributes and measures; the verification numbers of all ranks are gathered to rank 0 after the step.
"""
from __future__ import annotations

import hashlib
import json
import logging
import math
import time
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from torch import Tensor

from datamodules.probe_data import PromptSource, load_prompts
from probe.adam import AdamState
from probe.attribution import attribute
from probe.batch import SequenceBatch, collate
from probe.losses import normalisers as loss_normalisers
from probe.overrides import INTEGRANDS, SequenceStats, base_statistics, sweep
from probe.sampling import SamplingSettings, sample_responses
from probe.snis import snis_difference, snis_estimate
from probe.taylor import first_order, sequence_derivatives, snis_derivatives
from probe.update import Update, unwrap_optimizer, update_from_gradients

log = logging.getLogger("probe")


@dataclass
class LiveEvalSettings:
    """The evaluation batch E of the live probe.

    Args:
        path: a rollout file (JSONL or Parquet, DESIGN section 6) holding E; empty: sample E from the policy.
        source: prompts E is sampled from (when ``path`` is empty); held out from training by ``offset``.
        sampling: how E is sampled (``temperature`` is the tau whose entropy is measured; no top-p/top-k).
        refresh: sample E afresh from the current policy at every probed step (same prompts, a new seed per
            step), so that E ~ pi_theta as the estimators assume. False: hold E fixed (sampled at the start
            of fit, or read from ``path`` and taken as sampled from the policy at the start); importance
            weights are then relative to that policy, and the attribution (which assumes E ~ pi_theta)
            is skipped.
        realised_n_per_prompt: responses per prompt of the fresh samples that measure the realised change
            (default: ``sampling.n_per_prompt``).
        batch_size: sequences per teacher-forcing pass.
    """

    path: str = ""
    source: PromptSource = field(default_factory=lambda: PromptSource(prompts="toy", n_prompts=32, offset=1000, seed=0))
    sampling: SamplingSettings = field(default_factory=lambda: SamplingSettings(n_per_prompt=8, max_new_tokens=4, seed=1))
    refresh: bool = True
    realised_n_per_prompt: int | None = None
    batch_size: int = 256

    def __post_init__(self) -> None:
        s = self.sampling
        if (s.top_p is not None and s.top_p < 1.0) or s.top_k:
            raise ValueError("the live probe's E must be sampled without top_p/top_k (its entropy is the temperature-tau policy's); remove them")
        if self.path and self.refresh:
            raise ValueError("eval.path gives a fixed E, which cannot be refreshed; set eval.refresh=false (or drop eval.path)")


def stream_seed(seed: int, step: int, stream: str) -> int:
    """Seed of one sampling stream (``eval``, ``realised``, ``realised_old``) at one step."""
    digest = hashlib.sha256(f"live:{seed}:{step}:{stream}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def concat_batches(batches: list[SequenceBatch], pad_token_id: int) -> SequenceBatch:
    """Stack batches of different widths (right-padded to the widest) and sort the rows by ``index``."""
    T = max(b.input_ids.shape[1] for b in batches)

    def widen(x: Tensor | None, width: int, value: Any) -> Tensor | None:
        if x is None:
            return None
        return torch.nn.functional.pad(x, (0, width - x.shape[1]), value=value)

    has_old = all(b.old_logprobs is not None for b in batches)
    merged = SequenceBatch(
        input_ids=torch.cat([widen(b.input_ids, T, pad_token_id) for b in batches]),
        attention_mask=torch.cat([widen(b.attention_mask, T, 0) for b in batches]),
        response_mask=torch.cat([widen(b.response_mask, T, False) for b in batches]),
        advantages=torch.cat([b.advantages for b in batches]) if all(b.advantages is not None for b in batches) else None,
        old_logprobs=torch.cat([widen(b.old_logprobs, T - 1, 0.0) for b in batches]) if has_old else None,
        index=torch.cat([b.index for b in batches]),
        group=[g for b in batches for g in (b.group or [None] * len(b))],
    )
    return merged.select(torch.argsort(merged.index, stable=True))


def _unwrap(optimizer: Any) -> torch.optim.Optimizer:
    inner = unwrap_optimizer(optimizer)
    if not isinstance(inner, (torch.optim.Adam, torch.optim.AdamW)):
        raise TypeError(
            f"LiveEntropyProbe reconstructs torch.optim.Adam/AdamW steps, the run uses {type(inner or optimizer).__name__}; "
            "train with AdamW (or detach the callback)"
        )
    return inner


def _mean_se(x: Tensor) -> tuple[float, float]:
    """Mean and standard error (unbiased variance) of a sample."""
    x = x.double()
    n = x.numel()
    return float(x.mean()), float(x.std(unbiased=True) / math.sqrt(n)) if n > 1 else math.inf


def _ratio_se(h: Tensor, T: Tensor) -> tuple[float, float]:
    """Per-token entropy sum h / sum T and its delta-method SE."""
    h, T = h.double(), T.double()
    r = float(h.sum() / T.sum())
    n = h.numel()
    se = float((h - r * T).std(unbiased=True) / (T.mean() * math.sqrt(n))) if n > 1 else math.inf
    return r, se


def _finite(x: Any) -> Any:
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if isinstance(x, dict):
        return {k: _finite(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_finite(v) for v in x]
    return x


class LiveEntropyProbe(pl.Callback):
    """Predict, verify and measure the entropy change of a running fit's optimizer steps (module docstring)."""

    def __init__(
        self,
        every_n_steps: int = 1,
        eval: LiveEvalSettings = LiveEvalSettings(),  # noqa: A002 (the config key users write)
        integrand: str = "token_entropy",
        eta_factors: list[float] = [0.1, 1.0, 10.0],  # noqa: B006 (jsonargparse default)
        second_order: bool = True,
        attribution: bool = True,
        verify: bool = True,
        realised: bool = True,
        run_dir: str = "",
        start_step: int = 0,
    ):
        """
        Args:
            every_n_steps: probe the optimizer steps ``start_step``, ``start_step + k``, ... (k = every_n_steps).
            eval: the evaluation batch E (sampled from the policy, or a rollout file).
            integrand: ``token_entropy`` (sum of full-vocabulary token entropies) or ``logprob`` (-log p).
            eta_factors: the SNIS sweep, eta = factor * lr (1.0, the real step, is always included).
            second_order: also the second eta-derivative (a JVP of a JVP) and the linear radius.
            attribution: attribute the gradient part's first-order change to each update sequence.
            verify: after the step, compare the parameters' change with the reconstruction.
            realised: after the step, measure the realised entropy change on fresh samples.
            run_dir: where rank 0 writes ``records.jsonl`` and ``plots/``; empty: ``<module run dir>/live_probe``
                for modules with ``run_path()`` (``GRPOModule``), else ``<trainer.log_dir>/live_probe``.
            start_step: first probed step.
        """
        if every_n_steps < 1:
            raise ValueError(f"every_n_steps={every_n_steps} must be >= 1")
        if integrand not in INTEGRANDS:
            raise ValueError(f"unknown integrand {integrand!r}; choose one of {', '.join(INTEGRANDS)}")
        bad = [f for f in eta_factors if not (isinstance(f, (int, float)) and f > 0 and math.isfinite(f))]
        if bad:
            raise ValueError(f"eta_factors must be finite and > 0, got {bad}")
        self.every_n_steps, self.eval_settings, self.integrand = every_n_steps, eval, integrand
        self.eta_factors = sorted(set(float(f) for f in eta_factors) | {1.0})
        self.second_order, self.attribution, self.verify, self.realised = second_order, attribution, verify, realised
        self.run_dir_arg, self.start_step = run_dir, start_step
        self.run_dir: Path | None = None
        self.records: list[dict] = []  # rank 0: full records; other ranks: their verification only
        self._pending: dict | None = None
        self._prompts: list[list[int]] = []
        self._fixed: tuple[SequenceBatch, SequenceStats] | None = None  # held E and its stats at the sampling policy
        self._eos: list[int] | int | None = None
        self._pad = 0

    # ---- set-up -----------------------------------------------------------------------------
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        if not hasattr(pl_module, "policy"):
            raise AttributeError(
                f"{type(pl_module).__name__} has no `policy`: LiveEntropyProbe needs the probe protocol "
                "(policy, probe_batch, probe_loss; see callbacks.live)"
            )
        if not pl_module.automatic_optimization:
            raise ValueError("LiveEntropyProbe needs automatic optimisation (the step is read in on_before_optimizer_step)")
        if trainer.accumulate_grad_batches != 1:
            raise ValueError(
                f"accumulate_grad_batches={trainer.accumulate_grad_batches}: the probe needs the whole U of a step in one "
                "training_step; set it to 1 (put the whole batch in each step)"
            )
        if trainer.gradient_clip_val and trainer.gradient_clip_algorithm not in (None, "norm"):
            raise ValueError("gradient_clip_algorithm='value' is not reconstructed; use the default 'norm'")
        tokenizer = getattr(pl_module, "tokenizer", None)
        config = getattr(pl_module.policy, "config", None)
        self._eos = getattr(tokenizer, "eos_token_id", None) or getattr(config, "eos_token_id", None)
        pad = getattr(tokenizer, "pad_token_id", None)
        pad = getattr(config, "pad_token_id", None) if pad is None else pad
        self._pad = int(pad if pad is not None else (self._eos if isinstance(self._eos, int) else 0))
        if not self.eval_settings.path:
            prompts, _ = load_prompts(self.eval_settings.source, tokenizer)
            self._prompts = [list(map(int, p)) for p in prompts]
        if trainer.global_rank == 0:
            self.run_dir = self._resolve_run_dir(trainer, pl_module)
            self.run_dir.mkdir(parents=True, exist_ok=True)
            settings = {
                "every_n_steps": self.every_n_steps, "start_step": self.start_step, "eval": asdict(self.eval_settings),
                "integrand": self.integrand, "eta_factors": self.eta_factors, "second_order": self.second_order,
                "attribution": self.attribution, "verify": self.verify, "realised": self.realised,
                "world_size": trainer.world_size,
            }  # fmt: skip
            (self.run_dir / "settings.json").write_text(json.dumps(settings, indent=2, default=str))

    def _resolve_run_dir(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> Path:
        if self.run_dir_arg:
            return Path(self.run_dir_arg)
        if hasattr(pl_module, "run_path"):
            return Path(pl_module.run_path(trainer)) / "live_probe"
        return Path(trainer.log_dir or trainer.default_root_dir) / "live_probe"

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.global_rank != 0 or self.eval_settings.refresh:
            return
        policy = pl_module.policy
        with _eval_mode(policy):
            if self.eval_settings.path:
                from datamodules.rollouts import read_rollouts

                vocab = int(policy.get_input_embeddings().weight.shape[0])
                records = list(read_rollouts(self.eval_settings.path, vocab_size=vocab))
                E = collate(records, pad_token_id=self._pad)
            else:
                E = self._sample(policy, self.eval_settings.sampling.n_per_prompt, stream_seed(self.eval_settings.sampling.seed, -1, "eval"))
            self._fixed = (E, self._statistics(policy, E))
        log.info("live probe: holding an evaluation batch of %d sequences (sampled at the start of fit)", len(E))

    # ---- helpers ----------------------------------------------------------------------------
    def _is_probed(self, step: int) -> bool:
        return step >= self.start_step and (step - self.start_step) % self.every_n_steps == 0

    def _sample(self, policy: torch.nn.Module, n_per_prompt: int, seed: int) -> SequenceBatch:
        s = self.eval_settings.sampling
        device = next(policy.parameters()).device
        records = sample_responses(
            policy, self._prompts, n_per_prompt=n_per_prompt, max_new_tokens=s.max_new_tokens, temperature=s.temperature,
            eos_token_id=self._eos, pad_token_id=self._pad, generator=torch.Generator(device=device).manual_seed(seed),
            batch_size=s.batch_size,
        )  # fmt: skip
        return collate(records, pad_token_id=self._pad)

    def _kw(self) -> dict[str, Any]:
        return dict(temperature=self.eval_settings.sampling.temperature, chunk_size=self.eval_settings.batch_size, head_dtype=torch.float64)

    def _statistics(self, policy: torch.nn.Module, E: SequenceBatch) -> SequenceStats:
        return base_statistics(policy, E, with_entropy=self.integrand == "token_entropy", **self._kw())

    def _gather_update_batch(self, trainer: pl.Trainer, U: SequenceBatch | None) -> SequenceBatch | None:
        """Every rank's U, concatenated on rank 0 (sorted by index); None elsewhere."""
        local = None if U is None else U.to("cpu")
        if trainer.world_size > 1 and torch.distributed.is_available() and torch.distributed.is_initialized():
            gathered: list[Any] = [None] * trainer.world_size
            torch.distributed.all_gather_object(gathered, local)
        else:
            gathered = [local]
        if trainer.global_rank != 0:
            return None
        batches = [b for b in gathered if b is not None and len(b) > 0]
        return concat_batches(batches, self._pad) if batches else None

    def _gather_objects(self, trainer: pl.Trainer, obj: Any) -> list[Any]:
        if trainer.world_size > 1 and torch.distributed.is_available() and torch.distributed.is_initialized():
            out: list[Any] = [None] * trainer.world_size
            torch.distributed.all_gather_object(out, obj)
            return out
        return [obj]

    @staticmethod
    def _precision(trainer: pl.Trainer) -> tuple[torch.dtype | None, Any]:
        precision = str(trainer.precision)
        autocast = torch.bfloat16 if precision.startswith("bf16-mixed") else torch.float16 if precision.startswith("16-mixed") else None
        scaler = getattr(trainer.precision_plugin, "scaler", None)
        return autocast, scaler

    # ---- before the step: reconstruct and predict ------------------------------------------
    def on_before_optimizer_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: Any) -> None:
        step = int(trainer.global_step)
        if not self._is_probed(step):
            return
        timings: dict[str, float] = {}
        start = clock = time.perf_counter()

        def lap(name: str) -> None:
            nonlocal clock
            now = time.perf_counter()
            timings[f"{name}_s"] = now - clock
            clock = now

        policy = pl_module.policy
        U: SequenceBatch | None = getattr(pl_module, "probe_batch", None)
        loss = getattr(pl_module, "probe_loss", None)
        if loss is None:
            raise AttributeError(f"{type(pl_module).__name__} sets no `probe_loss` in training_step; see the protocol in callbacks.live")
        U_all = self._gather_update_batch(trainer, U)
        lap("gather")
        norm = getattr(pl_module, "probe_normalisers", None)
        if norm is None and U_all is not None:
            if trainer.world_size > 1:
                raise AttributeError("under DDP the module must set `probe_normalisers` (of the global U); see callbacks.live")
            norm = loss_normalisers(U_all.target_mask, loss)
        head_dtype = getattr(pl_module, "probe_head_dtype", torch.float64)
        autocast, scaler = self._precision(trainer)
        opt = _unwrap(optimizer)
        state = AdamState.from_optimizer(opt, policy)
        named = dict(policy.named_parameters())
        grads = {n: named[n].grad for n in state.hyper if n in named}
        clip = trainer.gradient_clip_val
        max_norm = float(clip) if clip is not None and clip > 0 else None
        try:
            update = update_from_gradients(
                named, grads, state, max_norm, loss=loss, normalisers=norm, autocast_dtype=autocast,
                grad_scale=None if scaler is None else float(scaler.get_scale()), head_dtype=head_dtype,
            )  # fmt: skip
        except ValueError as e:  # no or non-finite gradients (e.g. a GradScaler step that will be skipped)
            log.warning("live probe: step %d not reconstructed: %s", step, e)
            return
        snapshot = {n: named[n].detach().clone() for n in update.full} if self.verify else {}
        lap("reconstruct")
        record: dict[str, Any] = {
            "step": step, "lr": update.lr, "world_size": trainer.world_size,
            "update": {"grad_norm": update.grad_norm, "clip_coef": update.clip_coef, "norms": update.norms,
                       "n_sequences": None if norm is None else norm.n_sequences,
                       "n_tokens": None if norm is None else norm.n_tokens, "loss": asdict(loss)},
        }  # fmt: skip
        old_sample = None
        if trainer.global_rank == 0:
            with _eval_mode(policy), torch.inference_mode(False):
                E, base, sampling_base = self._eval_batch(policy, step)
                lap("sample_eval")
                record["eval"] = self._describe_eval(E, base, sampling_base)
                record["prediction"] = self._predict(policy, update, E, base, sampling_base, timings, lap)
                if self.attribution and self.eval_settings.refresh and U_all is not None:
                    record["attribution"] = self._attribute(policy, update, U_all, E, base)
                    lap("attribution")
                if self.realised and not self.eval_settings.refresh:  # H(old) needs a sample of pi_old
                    n = self.eval_settings.realised_n_per_prompt or self.eval_settings.sampling.n_per_prompt
                    E_old = self._sample(policy, n, stream_seed(self.eval_settings.sampling.seed, step, "realised_old"))
                    old_sample = (E_old, self._statistics(policy, E_old))
                    lap("sample_old")
                elif self.realised:
                    old_sample = (E, base)
        timings["before_step_s"] = time.perf_counter() - start
        self._pending = {"step": step, "update": update, "snapshot": snapshot, "record": record, "timings": timings,
                         "old_sample": old_sample}  # fmt: skip

    def _eval_batch(self, policy: torch.nn.Module, step: int) -> tuple[SequenceBatch, SequenceStats, SequenceStats]:
        """E, its statistics at theta, and the statistics at the policy E was sampled from (equal when refreshed)."""
        if self.eval_settings.refresh:
            s = self.eval_settings.sampling
            E = self._sample(policy, s.n_per_prompt, stream_seed(s.seed, step, "eval"))
            base = self._statistics(policy, E)
            return E, base, base
        E, sampling_base = self._fixed
        return E, self._statistics(policy, E), sampling_base

    def _describe_eval(self, E: SequenceBatch, base: SequenceStats, sampling_base: SequenceStats) -> dict[str, Any]:
        """H(theta) on E: the plain mean when E ~ pi_theta; the SNIS estimate (no SE) when E is held from an older policy."""
        h = base.integrand(self.integrand)
        out = {"n": len(E), "refreshed": self.eval_settings.refresh, "mean_length": float(base.lengths.mean())}
        if self.eval_settings.refresh:
            mean, se = _mean_se(h)
            per_token, per_token_se = _ratio_se(h, base.lengths)
        else:
            r = snis_estimate(sampling_base, base, integrand=self.integrand)
            mean, se, per_token, per_token_se = r.entropy, math.nan, r.entropy_per_token, math.nan
            out["ess_vs_sampling_policy"] = r.ess
        return dict(out, entropy=mean, entropy_se=se, entropy_per_token=per_token, entropy_per_token_se=per_token_se)

    def _predict(self, policy, update: Update, E, base, sampling_base, timings, lap) -> dict[str, Any]:
        """SNIS over the eta sweep, first and second order along the full step (per unit lr)."""
        kw = self._kw()
        with_entropy = self.integrand == "token_entropy"
        on_policy = self.eval_settings.refresh
        etas = [f * update.lr for f in self.eta_factors]
        swept = sweep(policy, E, {"full": update.full}, etas, with_entropy=with_entropy, base=base, **kw)
        results = []
        for j, eta in enumerate(etas):
            at = swept.at("full", j)
            if on_policy:
                results.append(snis_estimate(base, at, integrand=self.integrand, eta=eta))
            else:  # E from an older policy: H(theta + eta d) - H(theta), both by SNIS against the sampling policy
                results.append(snis_difference(
                    snis_estimate(sampling_base, at, integrand=self.integrand, eta=eta),
                    snis_estimate(sampling_base, base, integrand=self.integrand, eta=0.0),
                ))  # fmt: skip
        lap("sweep")
        derivs = sequence_derivatives(policy, E, update.full, order=2 if self.second_order else 1, with_entropy=with_entropy, **kw)
        taylor = snis_derivatives(derivs, sampling_base, self.integrand)
        slope, slope_se = taylor.first, math.nan
        if on_policy:
            fo = first_order(derivs, self.integrand)
            slope, slope_se = fo.slope, fo.slope_se
        lap("derivatives")
        at_lr = results[self.eta_factors.index(1.0)]
        lr = update.lr
        return {
            "etas": etas,
            "delta_h": [r.delta_entropy for r in results],
            "se": [r.delta_entropy_se for r in results],
            "delta_h_per_token": [r.delta_entropy_per_token for r in results],
            "ess": [r.ess for r in results],
            "first_order_slope": slope,
            "first_order_slope_se": slope_se,
            "second_derivative": taylor.second,
            "linear_radius": taylor.linear_radius,
            "at_lr": {
                "snis": at_lr.delta_entropy, "snis_se": at_lr.delta_entropy_se, "first_order": lr * slope,
                "first_order_se": lr * slope_se, "second_order": taylor.predict(lr), "ess": at_lr.ess,
                "snis_per_token": at_lr.delta_entropy_per_token,
            },
        }  # fmt: skip

    def _attribute(self, policy, update: Update, U: SequenceBatch, E: SequenceBatch, base: SequenceStats) -> dict[str, Any]:
        device = next(policy.parameters()).device
        att = attribute(policy, update, U.to(device), E, integrand=self.integrand, base=base, check=True, **self._kw())
        a = att.attributions.double()
        return {"sum": att.total, "grad_first_order": att.first_order_grad, "relative_gap": att.relative_gap,
                "at_lr_sum": update.lr * att.total, "index": U.index.tolist(), "group": [_plain(g) for g in U.group],
                "attributions": a.tolist()}  # fmt: skip

    # ---- after the step: verify and measure ------------------------------------------------
    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int) -> None:
        pending, self._pending = self._pending, None
        if pending is None:
            return
        timings, record, update = pending["timings"], pending["record"], pending["update"]
        start = time.perf_counter()
        policy = pl_module.policy
        check = verify_step(policy, update, pending["snapshot"]) if self.verify else None
        timings["verify_s"] = time.perf_counter() - start
        # every rank verified its own parameters; rank 0 collects them (and checks the ranks took one step)
        everyone = self._gather_objects(trainer, {"verification": check, "update_norm": update.norms["full"]})
        if check is not None:
            record["verification"] = dict(check, ranks=[e["verification"] for e in everyone])
            worst = max(e["verification"]["max_units"] for e in everyone)
            record["verification"]["max_units_all_ranks"] = worst
            self._warn_if_off(record["step"], worst, check)
        norms = [e["update_norm"] for e in everyone]
        record["update"]["rank_norm_spread"] = (max(norms) - min(norms)) / max(abs(max(norms)), 1e-300)
        if trainer.global_rank == 0 and self.realised and pending["old_sample"] is not None:
            clock = time.perf_counter()
            with _eval_mode(policy), torch.inference_mode(False):
                record["realised"] = self._realised(policy, pending["step"], pending["old_sample"], record.get("prediction"))
            timings["realised_s"] = time.perf_counter() - clock
        timings["after_step_s"] = time.perf_counter() - start
        timings["total_s"] = timings["before_step_s"] + timings["after_step_s"]
        record["timings"] = timings
        self.records.append(record)
        if trainer.global_rank == 0:
            self._write(record)
            self._log(trainer, record)

    def _warn_if_off(self, step: int, worst: float, check: dict) -> None:
        if worst > 1.0:
            message = (
                f"live probe: at step {step} the parameters moved {worst:.3g} rounding units away from the reconstructed "
                f"step (worst: {check['worst_parameter']}, |error| {check['max_abs_error']:.3g}); the optimizer step is not "
                "the AdamW step of the module's loss: check the probe protocol (probe_batch, probe_loss, normalisers), "
                "gradient clipping, and that nothing else changes parameters or gradients between backward and step"
            )
            log.warning(message)
            warnings.warn(message, stacklevel=2)

    def _realised(self, policy, step: int, old_sample: tuple[SequenceBatch, SequenceStats], prediction: dict | None) -> dict[str, Any]:
        """H(new) - H(old) on independent samples of pi_new and pi_old, with its SE and the predictions' z-scores."""
        n = self.eval_settings.realised_n_per_prompt or self.eval_settings.sampling.n_per_prompt
        E_new = self._sample(policy, n, stream_seed(self.eval_settings.sampling.seed, step, "realised"))
        new = self._statistics(policy, E_new)
        _, old = old_sample
        h_old, h_new = old.integrand(self.integrand), new.integrand(self.integrand)
        mean_old, se_old = _mean_se(h_old)
        mean_new, se_new = _mean_se(h_new)
        tok_old, tok_se_old = _ratio_se(h_old, old.lengths)
        tok_new, tok_se_new = _ratio_se(h_new, new.lengths)
        delta, se = mean_new - mean_old, math.hypot(se_old, se_new)
        out = {
            "delta_h": delta, "se": se, "old": {"mean": mean_old, "se": se_old, "n": len(h_old)},
            "new": {"mean": mean_new, "se": se_new, "n": len(h_new)},
            "delta_h_per_token": tok_new - tok_old, "delta_h_per_token_se": math.hypot(tok_se_old, tok_se_new),
        }  # fmt: skip
        if prediction is not None:
            at = prediction["at_lr"]
            for key, value, value_se in (("snis", at["snis"], at["snis_se"]), ("first_order", at["first_order"], at["first_order_se"]),
                                         ("second_order", at["second_order"], 0.0)):
                value_se = 0.0 if not math.isfinite(value_se) else value_se
                out[f"z_{key}"] = (value - delta) / math.hypot(se, value_se) if math.isfinite(value) else math.nan
        return out

    # ---- outputs (rank 0) ---------------------------------------------------------------------
    def _write(self, record: dict) -> None:
        if self.run_dir is None:
            return
        with open(self.run_dir / "records.jsonl", "a") as f:
            f.write(json.dumps(_finite(record), default=str) + "\n")

    @staticmethod
    def metrics(record: dict) -> dict[str, float]:
        """Scalar metrics of a record, keyed ``live/...``."""
        out: dict[str, float] = {"live/overhead_s": record["timings"]["total_s"], "live/lr": record["lr"],
                                 "live/grad_norm": record["update"]["grad_norm"], "live/clip_coef": record["update"]["clip_coef"]}
        if "prediction" in record:
            at = record["prediction"]["at_lr"]
            out.update({"live/pred_delta_h": at["snis"], "live/pred_delta_h_se": at["snis_se"], "live/pred_first_order": at["first_order"],
                        "live/pred_second_order": at["second_order"], "live/ess_at_lr": at["ess"],
                        "live/eval_entropy": record["eval"]["entropy"]})
        if "attribution" in record:
            out["live/attribution_sum_at_lr"] = record["attribution"]["at_lr_sum"]
        if "verification" in record:
            out["live/verify_max_units"] = record["verification"]["max_units_all_ranks"]
        if "realised" in record:
            out.update({"live/realised_delta_h": record["realised"]["delta_h"], "live/realised_se": record["realised"]["se"]})
            if "z_snis" in record["realised"]:
                out["live/z_snis"] = record["realised"]["z_snis"]
        return {k: float(v) for k, v in out.items() if v is not None and math.isfinite(float(v))}

    def _log(self, trainer: pl.Trainer, record: dict) -> None:
        metrics = self.metrics(record)
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=trainer.global_step)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.global_rank != 0 or self.run_dir is None or not self.records:
            return
        path = plot_live(self.records, self.run_dir / "plots" / "live_entropy.png")
        from lightning.pytorch.loggers import WandbLogger

        for logger in trainer.loggers:
            if isinstance(logger, WandbLogger):
                logger.log_image(key="live/entropy", images=[str(path)])
        overhead = [r["timings"]["total_s"] for r in self.records]
        log.info("live probe: %d probed steps, %.3f s per probed step on average; records in %s", len(overhead),
                 sum(overhead) / len(overhead), self.run_dir)

    def overhead_seconds(self) -> list[float]:
        """The callback's own time per probed step (``timings.total_s`` of each record)."""
        return [r["timings"]["total_s"] for r in self.records]


# ---------------------------------------------------------------------------------------------
# verification and plot (plain functions)


@torch.no_grad()
def verify_step(policy: torch.nn.Module, update: Update, before: dict[str, Tensor]) -> dict[str, Any]:
    """How far the parameters' real change is from ``lr * full``, in units of their own rounding.

    Per element, in units of ``2 ulp(max(|p_old|, |p_new|)) + c * scale`` with ``c = 1e-12`` for float64
    parameters and ``1e-6`` otherwise (a few roundings of the step's own arithmetic):

    * ``max_units``: ``scale = lr * (|baseline| + |grad|)``, the size of the terms AdamW adds up. Its
      float32 arithmetic rounds the momentum and gradient terms before they cancel (``m' = beta1 m +
      (1 - beta1) g``), so where they nearly cancel the step's own error is relative to the terms,
      not to their sum: measured on the toy world, up to 8 ulps of ``|p_new - p_old|``.
    * ``max_units_step_scale``: ``scale = |p_new - p_old|`` (stricter; may exceed 1 where terms cancel).

    Also the largest absolute error, ``max_relative_error`` (the largest error over the largest change
    of the same parameter) and ``relative_error`` (``||lr * full - (p_new - p_old)|| / ||p_new - p_old||``
    over all parameters). Both relative errors are floored by the parameters' own rounding,
    ``ulp(|p|) / |step|`` (float64, |p| ~ 1, lr = 1e-4: ~2e-12).
    """
    named = dict(policy.named_parameters())
    max_units, max_step_units, max_abs, max_rel, worst = 0.0, 0.0, 0.0, 0.0, None
    error_sq = change_sq = 0.0
    for n, full in update.full.items():
        p_old, p_new = before[n], named[n].detach()
        device = p_new.device
        actual = p_new.double() - p_old.double()
        predicted = full.to(device=device, dtype=torch.float64) * update.lr
        error = (predicted - actual).abs()
        magnitude = torch.maximum(p_old.abs(), p_new.abs())
        ulp = (torch.nextafter(magnitude, torch.full_like(magnitude, math.inf)) - magnitude).double()
        c = 1e-12 if p_new.dtype == torch.float64 else 1e-6
        terms = (update.baseline[n].to(device=device, dtype=torch.float64).abs()
                 + update.grad[n].to(device=device, dtype=torch.float64).abs()) * update.lr  # fmt: skip
        units = float((error / (2 * ulp + c * terms)).max())
        max_step_units = max(max_step_units, float((error / (2 * ulp + c * actual.abs())).max()))
        if worst is None or units > max_units:
            max_units, worst = units, n
        error_sq, change_sq = error_sq + float(error.pow(2).sum()), change_sq + float(actual.pow(2).sum())
        max_abs = max(max_abs, float(error.max()))
        max_rel = max(max_rel, float(error.max() / actual.abs().max().clamp(min=1e-300)))
    return {"max_units": max_units, "max_units_step_scale": max_step_units, "max_abs_error": max_abs,
            "max_relative_error": max_rel, "relative_error": math.sqrt(error_sq / max(change_sq, 1e-300)), "worst_parameter": worst, "ok": max_units <= 1.0,
            "n_parameters": len(update.full)}  # fmt: skip


def plot_live(records: list[dict], path: Path) -> Path:
    """Predicted (SNIS at eta = lr +- SE, first and second order) vs realised (+- SE) entropy change per probed step,
    and the verification error in rounding units."""
    from probe.plots import plt, save_figure

    fig, (ax, ax2) = plt.subplots(2, 1, figsize=(7.0, 6.4), sharex=True, gridspec_kw={"height_ratios": [3, 1]})
    steps = [r["step"] for r in records if "prediction" in r]
    if steps:
        pred = [r["prediction"]["at_lr"] for r in records if "prediction" in r]
        ax.errorbar(steps, [p["snis"] for p in pred], yerr=[p["snis_se"] for p in pred], fmt="o", capsize=3, label="predicted (SNIS at eta = lr)")
        ax.plot(steps, [p["first_order"] for p in pred], "-", alpha=0.7, label="first order")
        ax.plot(steps, [p["second_order"] for p in pred], "--", alpha=0.7, label="second order")
    real = [r for r in records if "realised" in r]
    if real:
        ax.errorbar([r["step"] + 0.15 for r in real], [r["realised"]["delta_h"] for r in real],
                    yerr=[r["realised"]["se"] for r in real], fmt="s", capsize=3, color="C3", label="realised (fresh samples)")
    ax.axhline(0.0, color="grey", lw=0.5)
    ax.set_ylabel("Delta H (nats / sequence)")
    ax.set_title("entropy change per optimizer step: predicted vs realised")
    ax.legend(fontsize=7)
    ver = [r for r in records if "verification" in r]
    if ver:
        ax2.semilogy([r["step"] for r in ver], [max(r["verification"]["max_units_all_ranks"], 1e-6) for r in ver], "o-")
        ax2.axhline(1.0, color="C3", lw=0.8, ls=":")
    ax2.set_ylabel("step error (ulp units)")
    ax2.set_xlabel("optimizer step")
    return save_figure(fig, path)


class _eval_mode:
    """Put the policy in eval mode (no dropout) for the probe's passes, restore its mode after."""

    def __init__(self, module: torch.nn.Module):
        self.module, self.was_training = module, module.training

    def __enter__(self) -> None:
        self.module.eval()

    def __exit__(self, *exc: Any) -> None:
        self.module.train(self.was_training)


def _plain(x: Any) -> Any:
    return x if isinstance(x, (int, float, str, type(None))) else str(x)
