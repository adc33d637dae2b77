"""The live entropy probe: attach to a Lightning fit and predict, verify and measure each step's entropy change.

A thin adapter over :mod:`probe.engine`. Every ``every_n_steps`` optimizer steps, in
``on_before_optimizer_step`` (gradients there are unscaled, all-reduced by DDP, not yet clipped), it

1. reconstructs the step about to happen from the REAL gradients and the optimizer's state
   (:func:`probe.update.update_from_gradients`; clipping at the Trainer's ``gradient_clip_val``):
   no second backward over U;
2. probes it on its evaluation batch E with the engine (:func:`probe.engine.probe_eval`): SNIS over a
   small sweep of eta around lr (eta = lr is the real step), first order (with its SE) and second
   order by JVP, and the attribution of the gradient part's first-order change to the step's sequences;

and after the step (``on_train_batch_end``) it

3. verifies that the parameters moved by exactly the reconstruction (:func:`probe.verification.verify_step`;
   loudly, ``logging.warning`` and ``warnings.warn``, beyond one rounding unit);
4. measures the realised change on FRESH samples (:func:`probe.engine.realised_change`): H(new) - H(old)
   on independent samples of the new and the old policy, and the z-scores of the predictions against it.

One JSON line per probed step goes to ``<run_dir>/records.jsonl``: ``plan``, ``update`` and ``eval``
hold the same fields as ``summary.json``'s ``plan``, ``update`` and ``evals[k]`` of an offline run; the
metrics go to every logger of the Trainer (W&B included) under the keys an offline run logs
(:func:`probe.results.metrics`), plus ``live/...`` for the verification, the realised change and the
overhead; at the end of fit ``<run_dir>/plots/live_entropy.png``. Only rank 0 writes.

The training module implements :class:`probe.live_contract.LiveProbeTarget` (``policy``, ``tokenizer``,
``probed_step()``); see that module for what it guarantees. One optimizer (``torch.optim.Adam``/``AdamW``),
automatic optimisation, ``accumulate_grad_batches = 1``, ``gradient_clip_algorithm = "norm"``.

Under DDP every rank reconstructs the step from its (identical, all-reduced) gradients and verifies
its own parameters; U is gathered to rank 0 (one ``all_gather_object``), which samples E, predicts,
attributes and measures; the verification numbers of all ranks are gathered to rank 0 after the step.
On a policy sharded with FSDP2 (``ModelParallelStrategy``) every rank reconstructs and verifies the rows of
its own shards from its reduce-scattered gradients, U is gathered to every rank, and every rank samples the
same E (same seed) and takes part in every pass (each forward gathers the policy's layers, a collective);
rank 0 alone writes and logs (docs/DESIGN.md section 11).
"""

from __future__ import annotations

import json
import logging
import math
import time
import warnings
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch

from probe.adam import AdamState
from probe.batch import SequenceBatch, collate
from probe.engine import EvalBatch, Plan, probe_eval, realised_change
from probe.jsonable import dumps, json_safe
from probe.live_contract import LiveProbeTarget, OwnsRunDirectory, ProbedStep
from probe.loading import context_length
from probe.logprobs import TeacherForcing
from probe.losses import normalisers as loss_normalisers
from probe.overrides import base_statistics
from probe.plots import plot_live
from probe.prompts import PromptSource, load_prompts
from probe.results import EvalResult, metrics, update_metrics
from probe.sampling import SamplingSettings, derived_seed, sample_responses, special_token_ids
from probe.sharding import sharded_view
from probe.snis import SNISConfig
from probe.statistics import INTEGRANDS, SequenceStats
from probe.update import Update, unwrap_optimizer, update_from_gradients
from probe.verification import verify_step

log = logging.getLogger("probe")


@dataclass
class LiveEvalSettings:
    """The evaluation batch E of the live probe.

    Args:
        path: a rollout file (JSONL or Parquet, docs/DESIGN.md section 9) holding E; empty: sample E from the policy.
        source: prompts E is sampled from (when ``path`` is empty); held out from training by ``offset``.
        sampling: how E is sampled (``temperature`` is the tau whose entropy is measured; no top-p/top-k).
        refresh: sample E afresh from the current policy at every probed step (same prompts, a new seed per
            step), so that E ~ pi_theta as the estimators assume. False: hold E fixed (sampled at the start
            of fit, or read from ``path`` and taken as sampled from the policy at the start); importance
            weights are then relative to that policy, and the attribution (which assumes E ~ pi_theta)
            is skipped.
        realised_n_per_prompt: responses per prompt of the fresh samples that measure the realised change
            (default: ``sampling.n_per_prompt``).
        forward_batch_size: sequences of E teacher-forced per forward pass (memory; results do not depend on it
            beyond float rounding).
    """

    path: str = ""
    source: PromptSource = field(default_factory=lambda: PromptSource(prompts="toy", n_prompts=32, offset=1000, seed=0))
    sampling: SamplingSettings = field(
        default_factory=lambda: SamplingSettings(n_per_prompt=8, max_new_tokens=4, seed=1)
    )
    refresh: bool = True
    realised_n_per_prompt: int | None = None
    forward_batch_size: int = 256

    def __post_init__(self) -> None:
        if self.sampling.truncated:
            raise ValueError(
                "the live probe's E must be sampled without top_p/top_k (its entropy is the temperature-tau "
                "policy's); remove them"
            )
        if self.path and self.refresh:
            raise ValueError(
                "eval.path gives a fixed E, which cannot be refreshed; set eval.refresh=false (or drop eval.path)"
            )


@dataclass
class _PendingStep:
    """What the probe keeps between the hook before a probed step and the hook after it."""

    step: int
    update: Update
    snapshot: dict[str, torch.Tensor]  # parameters before the step (for the verification)
    record: dict[str, Any]  # the record so far (JSON-ready)
    timings: dict[str, float]
    result: EvalResult | None = None  # rank 0: the prediction
    plan: Plan | None = None
    old_sample: SequenceStats | None = None  # rank 0: a sample of pi_old for the realised change


def _unwrap(optimizer: Any) -> torch.optim.Optimizer:
    inner = unwrap_optimizer(optimizer)
    if not isinstance(inner, (torch.optim.Adam, torch.optim.AdamW)):
        raise TypeError(
            "LiveEntropyProbe reconstructs torch.optim.Adam/AdamW steps, the run uses "
            f"{type(inner or optimizer).__name__}; train with AdamW (or detach the callback)"
        )
    return inner


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
                for modules with a run directory (``GRPOModule``), else ``<trainer.log_dir>/live_probe``.
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
        self._pending: _PendingStep | None = None
        self._prompts: list[list[int]] = []
        self._held: tuple[SequenceBatch, SequenceStats] | None = None  # held E and its stats at the sampling policy
        self._eos: list[int] = []
        self._pad = 0

    # ---- set-up -----------------------------------------------------------------------------
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        if not isinstance(pl_module, LiveProbeTarget):
            raise TypeError(
                f"{type(pl_module).__name__} does not implement probe.live_contract.LiveProbeTarget (policy, "
                "tokenizer, probed_step()): LiveEntropyProbe reads the step's update batch and loss from it. Fix: "
                "implement it (README.md shows a minimal module) or train with probe.grpo.GRPOModule"
            )
        if not pl_module.automatic_optimization:
            raise ValueError(
                "LiveEntropyProbe needs automatic optimisation (the step is read in on_before_optimizer_step)"
            )
        if trainer.accumulate_grad_batches != 1:
            raise ValueError(
                f"accumulate_grad_batches={trainer.accumulate_grad_batches}: the probe needs the whole U of a step "
                "in one training_step; set it to 1 (put the whole batch in each step)"
            )
        if trainer.gradient_clip_val and trainer.gradient_clip_algorithm not in (None, "norm"):
            raise ValueError("gradient_clip_algorithm='value' is not reconstructed; use the default 'norm'")
        self._pad, self._eos = special_token_ids(pl_module.tokenizer, model=pl_module.policy)  # + generation_config
        if not self.eval_settings.path:
            prompts, _ = load_prompts(self.eval_settings.source, pl_module.tokenizer)
            self._prompts = [list(map(int, p)) for p in prompts]
        if trainer.global_rank == 0:
            self.run_dir = self._resolve_run_dir(trainer, pl_module)
            self.run_dir.mkdir(parents=True, exist_ok=True)
            settings = {
                "every_n_steps": self.every_n_steps,
                "start_step": self.start_step,
                "eval": asdict(self.eval_settings),
                "integrand": self.integrand,
                "eta_factors": self.eta_factors,
                "second_order": self.second_order,
                "attribution": self.attribution,
                "verify": self.verify,
                "realised": self.realised,
                "world_size": trainer.world_size,
            }
            (self.run_dir / "settings.json").write_text(json.dumps(settings, indent=2, default=str))

    def _resolve_run_dir(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> Path:
        if self.run_dir_arg:
            return Path(self.run_dir_arg).expanduser()
        if isinstance(pl_module, OwnsRunDirectory):
            return pl_module.run_directory() / "live_probe"
        return Path(trainer.log_dir or trainer.default_root_dir) / "live_probe"

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        sharded = sharded_view(pl_module.policy) is not None  # every rank holds E then: its passes are collectives
        if (trainer.global_rank != 0 and not sharded) or self.eval_settings.refresh:
            return
        policy = pl_module.policy
        with _eval_mode(policy):
            if self.eval_settings.path:
                from datamodules.rollouts import check_eval_sampling, read_rollouts

                vocab = int(policy.get_input_embeddings().weight.shape[0])
                context = context_length(policy)  # with RoPE scaling; None: the config names none
                records = read_rollouts(
                    self.eval_settings.path,
                    vocab_size=vocab,
                    max_length=context,
                    eos_token_ids=self._eos,
                    pad_token_id=self._pad,
                )
                check_eval_sampling(  # E must say how it was sampled: from the full distribution at tau
                    records,
                    temperature=self.eval_settings.sampling.temperature,
                    setting="the LiveEntropyProbe callback's init_args.eval.sampling.temperature",
                    allow_setting=None,  # the callback has no allow_truncated_sampling: the fix is to resample E
                )
                E = collate(list(records), pad_token_id=self._pad)
            else:
                n = self.eval_settings.sampling.n_per_prompt
                E = self._sample(policy, n, derived_seed("live", self.eval_settings.sampling.seed, -1, "eval"))
            self._held = (E, self._statistics(policy, E))
        log.info("live probe: holding an evaluation batch of %d sequences (sampled at the start of fit)", len(E))

    # ---- helpers ----------------------------------------------------------------------------
    def _is_probed(self, step: int) -> bool:
        return step >= self.start_step and (step - self.start_step) % self.every_n_steps == 0

    def _plan(self, lr: float, with_attribution: bool) -> Plan:
        """The engine's plan of one probed step: the full step over eta = factor * lr, first/second order."""
        return Plan(
            parts=("full",),
            etas=tuple(f * lr for f in self.eta_factors),
            lr=lr,
            reference_eta=lr,
            integrand=self.integrand,
            snis=SNISConfig(),
            first_order=True,
            second_order=self.second_order,
            attribution=with_attribution,
            eval_update_matrix=False,
            head_dtype=torch.float64,
            batch_size=self.eval_settings.forward_batch_size,
        )

    def _sample(self, policy: torch.nn.Module, n_per_prompt: int, seed: int) -> SequenceBatch:
        device = next(policy.parameters()).device
        sampling = replace(self.eval_settings.sampling, n_per_prompt=n_per_prompt)
        records = sample_responses(
            policy,
            self._prompts,
            sampling,
            eos_token_id=self._eos,
            pad_token_id=self._pad,
            generator=torch.Generator(device=device).manual_seed(seed),
        )
        return collate(records, pad_token_id=self._pad)

    def _statistics(self, policy: torch.nn.Module, E: SequenceBatch) -> SequenceStats:
        """E's statistics at the current theta, teacher-forced as the step's plan does."""
        forcing = TeacherForcing(
            temperature=self.eval_settings.sampling.temperature, batch_size=self.eval_settings.forward_batch_size
        )
        return base_statistics(policy, E, forcing.for_integrand(self.integrand))

    @staticmethod
    def _gather_objects(trainer: pl.Trainer, obj: Any) -> list[Any]:
        if trainer.world_size > 1 and torch.distributed.is_available() and torch.distributed.is_initialized():
            out: list[Any] = [None] * trainer.world_size
            torch.distributed.all_gather_object(out, obj)
            return out
        return [obj]

    @staticmethod
    def _precision(trainer: pl.Trainer) -> tuple[torch.dtype | None, Any]:
        precision = str(trainer.precision)
        bf16, fp16 = precision.startswith("bf16-mixed"), precision.startswith("16-mixed")
        autocast = torch.bfloat16 if bf16 else torch.float16 if fp16 else None
        return autocast, getattr(trainer.precision_plugin, "scaler", None)

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
        probed: ProbedStep | None = pl_module.probed_step()
        # one collective on every rank before anything can return or raise, so that all ranks decide alike
        mine = (
            None if probed is None else (None if probed.batch is None else probed.batch.to("cpu"), probed.normalisers)
        )
        everyone = self._gather_objects(trainer, mine)
        lap("gather")
        if any(e is None for e in everyone):
            name = type(pl_module).__name__
            log.warning("live probe: %s declares no probed step at step %d on some rank; not probed", name, step)
            return
        if trainer.world_size > 1 and any(normalisers is None for _, normalisers in everyone):
            raise ValueError(
                "under DDP the module's ProbedStep must carry the normalisers of the global U (every rank's "
                "sequences); see probe.grpo.GRPOModule"
            )
        sharded = sharded_view(policy) is not None  # then every rank takes part in every pass (collectives)
        batches = [b for b, _ in everyone if b is not None and len(b) > 0]
        U_all = SequenceBatch.concat(batches, self._pad) if batches and (trainer.global_rank == 0 or sharded) else None
        norm = probed.normalisers
        if norm is None and U_all is not None:
            norm = loss_normalisers(U_all.target_mask, probed.loss)
        autocast, scaler = self._precision(trainer)
        state = AdamState.from_optimizer(_unwrap(optimizer), policy)
        named = dict(policy.named_parameters())
        grads = {n: named[n].grad for n in state.hyper if n in named}
        clip = trainer.gradient_clip_val
        max_norm = float(clip) if clip is not None and clip > 0 else None
        try:
            update = update_from_gradients(
                named,
                grads,
                state,
                max_norm,
                loss=probed.loss,
                normalisers=norm,
                autocast_dtype=autocast,
                grad_scale=None if scaler is None else float(scaler.get_scale()),
                head_dtype=probed.head_dtype,
            )
        except ValueError as e:  # no or non-finite gradients (e.g. a GradScaler step that will be skipped)
            log.warning("live probe: step %d not reconstructed: %s", step, e)
            return
        snapshot = {n: named[n].detach().clone() for n in update.full} if self.verify else {}
        lap("reconstruct")
        record: dict[str, Any] = {"step": step, "world_size": trainer.world_size, "update": update.summary()}
        pending = _PendingStep(step=step, update=update, snapshot=snapshot, record=record, timings=timings)
        if trainer.global_rank == 0 or sharded:
            with _eval_mode(policy), torch.inference_mode(False):
                self._predict(pending, policy, U_all, lap)
        timings["before_step_s"] = time.perf_counter() - start
        self._pending = pending

    def _predict(self, pending: _PendingStep, policy: torch.nn.Module, U: SequenceBatch | None, lap: Any) -> None:
        """Rank 0: sample (or take) E, probe the step on it with the engine, keep a sample of pi_old."""
        settings, step, update = self.eval_settings, pending.step, pending.update
        tau = settings.sampling.temperature
        if settings.refresh:
            E = self._sample(
                policy, settings.sampling.n_per_prompt, derived_seed("live", settings.sampling.seed, step, "eval")
            )
            E_batch = EvalBatch(name="eval_00", batch=E, temperature=tau)
        else:
            E, at_sampling = self._held
            E_batch = EvalBatch(name="eval_00", batch=E, temperature=tau, sampling=at_sampling)
        lap("sample_eval")
        # the attribution assumes E ~ pi_theta (a fresh E) and needs the step's sequences
        plan = self._plan(update.lr, self.attribution and settings.refresh and U is not None)
        result, base = probe_eval(policy, update, U, E_batch, plan, timings=pending.timings)
        pending.result, pending.plan = result, plan
        pending.record.update(plan=plan.describe(), eval=result.to_dict())
        if "attributions" in result.arrays:
            pending.record["attributions"] = {
                "index": U.index.tolist(),
                "group": [_plain(g) for g in U.group],
                "values": result.arrays["attributions"].tolist(),
            }
        lap("probe")
        if self.realised:
            if settings.refresh:
                pending.old_sample = base  # a fresh sample of pi_old already
            else:  # H(old) needs a fresh sample of pi_old
                n = settings.realised_n_per_prompt or settings.sampling.n_per_prompt
                E_old = self._sample(policy, n, derived_seed("live", settings.sampling.seed, step, "realised_old"))
                pending.old_sample = self._statistics(policy, E_old)
                lap("sample_old")

    # ---- after the step: verify and measure ------------------------------------------------
    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        pending, self._pending = self._pending, None
        if pending is None:
            return
        timings, record, update = pending.timings, pending.record, pending.update
        start = time.perf_counter()
        policy = pl_module.policy
        check = verify_step(policy, update, pending.snapshot) if self.verify else None
        timings["verify_s"] = time.perf_counter() - start
        # every rank verified its own parameters; rank 0 collects them (and checks the ranks took one step)
        everyone = self._gather_objects(trainer, {"verification": check, "update_norm": update.norms["full"]})
        if check is not None:
            worst = max(e["verification"]["max_units"] for e in everyone)
            record["verification"] = dict(check, ranks=[e["verification"] for e in everyone], max_units_all_ranks=worst)
            self._warn_if_off(pending.step, worst, check)
        norms = [e["update_norm"] for e in everyone]
        record["update"]["rank_norm_spread"] = (max(norms) - min(norms)) / max(abs(max(norms)), 1e-300)
        realised = None
        if (trainer.global_rank == 0 or sharded_view(policy) is not None) and pending.old_sample is not None:
            clock = time.perf_counter()
            with _eval_mode(policy), torch.inference_mode(False):
                realised = self._realised(policy, pending)
            record["realised"] = json_safe(realised)
            timings["realised_s"] = time.perf_counter() - clock
        timings["after_step_s"] = time.perf_counter() - start
        timings["total_s"] = timings["before_step_s"] + timings["after_step_s"]
        record["timings"] = timings
        record = json_safe(record)
        self.records.append(record)
        if trainer.global_rank == 0:
            self._write(record)
            for logger in trainer.loggers:
                logger.log_metrics(self.metrics(pending, record), step=trainer.global_step)

    def _warn_if_off(self, step: int, worst: float, check: dict) -> None:
        if worst > 1.0:
            message = (
                f"live probe: at step {step} the parameters moved {worst:.3g} rounding units away from the "
                f"reconstructed step (worst: {check['worst_parameter']}, |error| {check['max_abs_error']:.3g}); the "
                "optimizer step is not the AdamW step of the module's loss: check the module's probed_step() (batch, "
                "loss, normalisers), gradient clipping, and that nothing else changes parameters or gradients between "
                "backward and step"
            )
            log.warning(message)
            warnings.warn(message, stacklevel=2)

    def _realised(self, policy: torch.nn.Module, pending: _PendingStep) -> Any:
        """H(new) - H(old) on independent samples of pi_new and pi_old, and the predictions' z-scores."""
        settings = self.eval_settings
        n = settings.realised_n_per_prompt or settings.sampling.n_per_prompt
        E_new = self._sample(policy, n, derived_seed("live", settings.sampling.seed, pending.step, "realised"))
        new = self._statistics(policy, E_new)
        at = self.eta_factors.index(1.0)
        predicted = None if pending.result is None else pending.result.parts["full"]
        return realised_change(pending.old_sample, new, self.integrand, predicted, at=at, eta=pending.update.lr)

    # ---- outputs (rank 0) ---------------------------------------------------------------------
    def _write(self, record: dict) -> None:
        if self.run_dir is None:
            return
        with open(self.run_dir / "records.jsonl", "a") as f:
            f.write(dumps(record) + "\n")

    @staticmethod
    def metrics(pending: _PendingStep, record: dict) -> dict[str, float]:
        """Scalar metrics of a probed step: the offline run's keys (``eval_00/full/delta_h@lr``, ``update/...``) and
        ``live/...`` for what only a live run has (verification, realised change, z-scores, overhead)."""
        out = update_metrics(record["update"])
        if pending.result is not None:
            out.update(metrics(pending.result, list(pending.plan.etas), pending.update.lr))
        live: dict[str, Any] = {"live/overhead_s": record["timings"]["total_s"]}
        if "verification" in record:
            live["live/verification/max_units"] = record["verification"]["max_units_all_ranks"]
        if "realised" in record:
            realised = record["realised"]
            live.update({"live/realised/delta_h": realised["delta_h"], "live/realised/se": realised["se"]})
            live.update({f"live/realised/z_{key}": z for key, z in realised.get("z", {}).items()})
        out.update({k: float(v) for k, v in live.items() if v is not None and math.isfinite(float(v))})
        return out

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.global_rank != 0 or self.run_dir is None or not self.records:
            return
        path = plot_live(self.records, self.run_dir / "plots" / "live_entropy.png")
        from lightning.pytorch.loggers import WandbLogger

        for logger in trainer.loggers:
            if isinstance(logger, WandbLogger):
                logger.log_image(key="live/entropy", images=[str(path)])
        overhead = self.overhead_seconds()
        log.info(
            "live probe: %d probed steps, %.3f s per probed step on average; records in %s",
            len(overhead),
            sum(overhead) / len(overhead),
            self.run_dir,
        )

    def overhead_seconds(self) -> list[float]:
        """The callback's own time per probed step (``timings.total_s`` of each record)."""
        return [r["timings"]["total_s"] for r in self.records]


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
