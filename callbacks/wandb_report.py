"""Weights & Biases reporting through Lightning's ``WandbLogger`` (offline by default; ``wandb sync`` uploads later).

Logs the summary metrics, one table per evaluation batch of update sequences (text, reward,
advantage, attribution), the plots, and the run directory as an artifact. With no
``WandbLogger`` attached (or ``WANDB_MODE=disabled``) it does nothing.
"""
from __future__ import annotations

import logging

import lightning.pytorch as pl
from lightning.pytorch.loggers import WandbLogger

log = logging.getLogger("probe")


def flat_metrics(summary: dict) -> dict[str, float]:
    """Scalar metrics of a summary, keyed ``eval_00/full/delta_h@eta=1e-05`` style."""
    out: dict[str, float] = {}
    etas = summary["plan"]["etas"]
    for ev in summary["evals"]:
        name = ev["name"]
        for part, res in ev["parts"].items():
            for j, eta in enumerate(etas):
                for key in ("delta_h", "se", "delta_h_per_token", "ess", "clip_fraction"):
                    if res.get(key) is not None and res[key][j] is not None:
                        out[f"{name}/{part}/{key}@eta={eta:.3g}"] = float(res[key][j])
            for key in ("first_order", "second_order", "linear_radius"):
                if res.get(key) is not None:
                    out[f"{name}/{part}/{key}"] = float(res[key])
        out[f"{name}/base_entropy"] = float(ev["base_entropy"]["sequence"])
        out[f"{name}/base_entropy_per_token"] = float(ev["base_entropy"]["per_token"])
    for key in ("lr", "clip_coef", "grad_norm"):
        out[f"update/{key}"] = float(summary["update"][key])
    for part, norm in summary["update"]["norms"].items():
        out[f"update/norm_{part}"] = float(norm)
    return out


class WandbReport(pl.Callback):
    """Send a finished probe run to every ``WandbLogger`` of the Trainer (rank 0 only)."""

    def __init__(self, log_artifact: bool = True):
        self.log_artifact = log_artifact

    def on_predict_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        report = getattr(pl_module, "report", None)
        loggers = [lg for lg in trainer.loggers if isinstance(lg, WandbLogger)]
        if report is None or not loggers or trainer.global_rank != 0:
            return
        summary, run_dir = report["summary"], report["run_dir"]
        metrics = flat_metrics(summary)
        for lg in loggers:
            lg.log_metrics(metrics)
            for key, (columns, rows) in report.get("tables", {}).items():
                lg.log_table(key=key, columns=columns, data=rows)
            for plot in sorted((run_dir / "plots").glob("*.png")):  # one key each: the plots differ in size
                lg.log_image(key=f"plots/{plot.stem}", images=[str(plot)])
            if self.log_artifact and hasattr(lg.experiment, "log_artifact"):
                import wandb

                artifact = wandb.Artifact(name=f"probe-{run_dir.name}", type="probe-run")
                artifact.add_dir(str(run_dir))
                lg.experiment.log_artifact(artifact)
        log.info("logged %d metrics to W&B (%s)", len(metrics), ", ".join(str(lg.save_dir) for lg in loggers))
