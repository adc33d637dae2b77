"""The live entropy probe on a Lightning fit: a thin adapter of :class:`probe.live.LiveProbe`.

Every ``every_n_steps`` optimizer steps, in ``on_before_optimizer_step`` (gradients there are unscaled,
all-reduced by DDP, not yet clipped), the probe reconstructs the step about to happen from the real gradients
(clipping at the Trainer's ``gradient_clip_val``) and predicts its entropy change on E; after the step
(``on_train_batch_end``) it verifies the parameters' change and measures the realised change on fresh samples
(:mod:`probe.live`). One JSON line per probed step goes to ``<run_dir>/records.jsonl``; the metrics go to every
logger of the Trainer (W&B included) under the keys an offline run logs plus ``live/...``, at the probed step (where
the module's own metrics of that batch are logged, one less than the Trainer's ``global_step`` after the step); at
the end of fit ``<run_dir>/plots/live_entropy.png``. Only rank 0 writes. A ``WandbLogger`` gets the probe's series
against ``trainer/global_step`` (``define_metric``) and, at the end of fit, the table ``live/probed_steps`` (one row
per probed step) with the line chart ``charts/live/delta_h_per_step`` over it, and the plot as ``live/entropy``.

The training module implements :class:`probe.live_contract.LiveProbeTarget` (``policy``, ``tokenizer``,
``probed_step()``); see that module for what it guarantees. One optimizer (``torch.optim.Adam``/``AdamW``),
automatic optimisation, ``accumulate_grad_batches = 1``, ``gradient_clip_algorithm = "norm"``. DDP and FSDP2
(``ModelParallelStrategy``) as :mod:`probe.live` says.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch

from callbacks.wandb_report import prefixed
from probe.live import GradientHandling, LiveEvalSettings, LiveProbe, LiveProbeSettings, Processes
from probe.live_contract import OwnsRunDirectory, is_live_probe_target
from probe.wandb_tables import live_series, live_steps_table

__all__ = ["LiveEntropyProbe", "LiveEvalSettings"]


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
        parts: list[str] = ["full"],  # noqa: B006 (jsonargparse default)
        covariance_fraction: float = 2e-4,
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
            parts: the parts of the update swept (``full``, ``baseline``, ``grad``); ``full``, the real step, is
                always swept (the realised change is compared with it).
            covariance_fraction: the fraction of the step's response tokens the covariance law's overlap takes (at
                least one; Clip-Cov's and KL-Cov's default 2e-4).
        """
        self.settings = LiveProbeSettings(
            every_n_steps=every_n_steps,
            eval=eval,
            integrand=integrand,
            eta_factors=list(eta_factors),
            second_order=second_order,
            attribution=attribution,
            verify=verify,
            realised=realised,
            start_step=start_step,
            parts=list(parts),
            covariance_fraction=covariance_fraction,
        )
        self.run_dir_arg = run_dir
        self.probe: LiveProbe | None = None

    @property
    def records(self) -> list[dict]:
        """The probed steps' records (rank 0: full records; other ranks: their verification only)."""
        return [] if self.probe is None else self.probe.records

    def overhead_seconds(self) -> list[float]:
        """The callback's own time per probed step (``timings.total_s`` of each record)."""
        return [] if self.probe is None else self.probe.overhead_seconds()

    # ---- set-up -----------------------------------------------------------------------------
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        if not is_live_probe_target(pl_module):
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
        processes = Processes(rank=trainer.global_rank, world_size=trainer.world_size)
        run_dir = self._resolve_run_dir(trainer, pl_module) if trainer.global_rank == 0 else None
        self.probe = LiveProbe(self.settings, processes, run_dir, "the LiveEntropyProbe callback's init_args.eval")
        self.probe.setup(pl_module.policy, pl_module.tokenizer)

    def _resolve_run_dir(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> Path:
        if self.run_dir_arg:
            return Path(self.run_dir_arg).expanduser()
        if isinstance(pl_module, OwnsRunDirectory):
            return pl_module.run_directory() / "live_probe"
        return Path(trainer.log_dir or trainer.default_root_dir) / "live_probe"

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.probe.hold_eval(pl_module.policy)
        if trainer.global_rank == 0:
            for logger in wandb_loggers(trainer):
                define_probe_metrics(logger)

    # ---- before the step: reconstruct and predict; after it: verify and measure --------------
    def on_before_optimizer_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: Any) -> None:
        step = int(trainer.global_step)
        if not self.settings.is_probed(step):
            return
        precision = str(trainer.precision)
        bf16, fp16 = precision.startswith("bf16-mixed"), precision.startswith("16-mixed")
        scaler = getattr(trainer.precision_plugin, "scaler", None)
        clip = trainer.gradient_clip_val
        gradients = GradientHandling(
            max_norm=float(clip) if clip is not None and clip > 0 else None,
            autocast=torch.bfloat16 if bf16 else torch.float16 if fp16 else None,
            grad_scale=None if scaler is None else float(scaler.get_scale()),
        )
        name = type(pl_module).__name__
        self.probe.before_step(step, pl_module.policy, optimizer, pl_module.probed_step(), gradients, name)

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        probed = self.probe.after_step(pl_module.policy)
        if probed is not None:  # at the probed step (the Trainer's global_step already counts the step just taken),
            for logger in trainer.loggers:  # the step the module's own metrics of this batch are logged at
                logger.log_metrics(probed.metrics, step=probed.record["step"])

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.global_rank != 0:
            return
        path = self.probe.finish()
        for logger in wandb_loggers(trainer):
            if path is not None:
                logger.log_image(key="live/entropy", images=[str(path)])
            log_probed_steps(logger, self.records, trainer.global_step)


# ---- W&B (only with a WandbLogger attached; wandb is imported only then) ----------------------------

# The keys of the probe's metrics (probe.live.LiveProbe.metrics: the live E is always eval_00) and the trainer's step
PROBE_METRICS, TRAINER_STEP = ("eval_00/*", "update/*", "live/*"), "trainer/global_step"


def wandb_loggers(trainer: pl.Trainer) -> list[Any]:
    from lightning.pytorch.loggers import WandbLogger

    return [logger for logger in trainer.loggers if isinstance(logger, WandbLogger)]


def define_probe_metrics(logger: Any) -> None:
    """Plot the probe's series against the trainer's step (Lightning's logger does so for every key of a W&B run it
    starts itself, but not for a run it adopts from an earlier ``wandb.init``)."""
    run = logger.experiment
    run.define_metric(TRAINER_STEP)  # log_metrics adds it unprefixed
    for name in PROBE_METRICS:
        run.define_metric(prefixed(logger, name), step_metric=TRAINER_STEP)


def log_probed_steps(logger: Any, records: list[dict], step: int) -> None:
    """At the end of fit: ``live/probed_steps``, one row per probed step (:func:`probe.wandb_tables.live_steps_table`),
    and the line chart ``charts/live/delta_h_per_step`` over it (predicted, first and second order, realised)."""
    import wandb

    table = live_steps_table(records)
    if not table[1]:
        return
    series = live_series(table)
    chart = wandb.plot.line(
        wandb.Table(columns=series[0], data=series[1]),
        x="step",
        y="delta_h",
        stroke="series",
        title="Delta H of each probed step (nats per sequence): predicted vs realised",
    )
    steps = wandb.Table(columns=table[0], data=table[1])
    logger.log_metrics({"live/probed_steps": steps, "charts/live/delta_h_per_step": chart}, step=step)
