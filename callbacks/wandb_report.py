"""Weights & Biases reporting through Lightning's ``WandbLogger`` (offline by default; ``wandb sync`` uploads later).

Logs the metrics of every evaluation batch (:func:`probe.results.metrics`: the keys the live probe logs too),
one table of the update sequences (text, reward, advantage, attribution), the plots and the run directory
as an artifact. It observes the run once it is over (``teardown``, after every writer), so its place among
the callbacks does not matter. With no ``WandbLogger`` attached (or ``WANDB_MODE=disabled``) it does nothing.
"""

from __future__ import annotations

import logging
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.loggers import WandbLogger

from probe.results import metrics, update_metrics
from probe.run_state import PredictRunState, run_state_of

log = logging.getLogger("probe")


def update_table(state: PredictRunState) -> tuple[list[str], list[list[Any]]]:
    """Columns and rows of the update sequences: text, reward, advantage and attribution (first evaluation batch)."""
    inputs, evals = state.require("inputs"), state.require("result")
    attributions = evals[0].arrays.get("attributions")
    columns = ["index", "group", "prompt", "response", "reward", "advantage", "attribution"]
    rows = []
    for r in inputs.update_records:
        prompt = r.get("prompt") or state.tokenizer.decode(r["prompt_ids"], skip_special_tokens=False)
        response = r.get("response") or state.tokenizer.decode(r["response_ids"], skip_special_tokens=False)
        a = None if attributions is None else float(attributions[r["index"]])
        rows.append([r["index"], str(r.get("group")), prompt, response, r.get("reward"), r.get("advantage"), a])
    return columns, rows


class WandbReport(pl.Callback):
    """Send a finished probe run to every ``WandbLogger`` of the Trainer (rank 0 only)."""

    def __init__(self, log_artifact: bool = True):
        self.log_artifact = log_artifact

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        loggers = [lg for lg in trainer.loggers if isinstance(lg, WandbLogger)]
        if stage != "predict" or not loggers or trainer.global_rank != 0:
            return
        state = run_state_of(trainer)
        if not state.finished:
            return
        plan, run_dir = state.require("plan"), state.require("run_dir").path
        values = update_metrics(state.require("update").summary())
        for ev in state.require("result"):
            values.update(metrics(ev, list(plan.etas), plan.lr))
        columns, rows = update_table(state)
        for lg in loggers:
            lg.log_metrics(values)
            lg.log_table(key="update_sequences", columns=columns, data=rows)
            for plot in sorted((run_dir / "plots").glob("*.png")):  # one key each: the plots differ in size
                lg.log_image(key=f"plots/{plot.stem}", images=[str(plot)])
            if self.log_artifact and hasattr(lg.experiment, "log_artifact"):
                import wandb

                artifact = wandb.Artifact(name=f"probe-{run_dir.name}", type="probe-run")
                artifact.add_dir(str(run_dir))
                lg.experiment.log_artifact(artifact)
        log.info("logged %d metrics to W&B (%s)", len(values), ", ".join(str(lg.save_dir) for lg in loggers))
