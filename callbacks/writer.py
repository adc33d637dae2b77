"""Run writer: the run directory of DESIGN section 6, written as results are made.

Per-batch results are cached in ``partial/`` by the module as they are made (a rerun on the
same directory skips them); at epoch end rank 0 writes the per-sequence arrays, the plots and
``summary.json`` (status ``complete``), prints the result table and drops the cache.
"""
from __future__ import annotations

import logging
import platform
import sys
import time

import lightning.pytorch as pl
import torch

from probe.plots import plot_attributions, plot_delta_h, plot_ess
from probe.report import format_table
from probe.rundir import save_npy

log = logging.getLogger("probe")


def environment() -> dict[str, str]:
    import lightning
    import transformers

    return {
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "torch": torch.__version__,
        "lightning": lightning.__version__,
        "transformers": transformers.__version__,
        "cuda": torch.version.cuda or "none",
        "device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else platform.processor() or "cpu",
    }


class RunWriter(pl.Callback):
    """Write the run directory (rank 0) once the aggregation is done."""

    def __init__(self) -> None:
        self.start = time.perf_counter()

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self.start = time.perf_counter()
        run_dir = pl_module.open_run_dir(trainer)
        if trainer.global_rank == 0:
            log.info("%s run directory %s", "resuming" if run_dir.resuming else "writing", run_dir.path)

    def on_predict_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs, batch, batch_idx: int,
                             dataloader_idx: int = 0) -> None:
        """Stop after the batch whose results were just saved when SIGTERM arrived (Lightning only records
        the signal during predict, so without this a terminated run would go on to the end)."""
        if trainer.received_sigterm:
            from lightning.pytorch.utilities.exceptions import SIGTERMException

            where = pl_module.run_dir.path if pl_module.run_dir is not None else "the run directory"
            log.warning("stopped by SIGTERM after batch %d of eval_%02d; finished batches are kept in %s/partial. "
                        "Fix: rerun the same command (same run.name) to resume", batch_idx, dataloader_idx, where)
            raise SIGTERMException(128 + 15)  # the exit status of a process ended by SIGTERM

    def on_predict_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        agg = pl_module.aggregated
        run_dir = pl_module.run_dir
        if trainer.global_rank != 0:
            return
        s, etas, update = pl_module.settings, pl_module.etas, pl_module.update
        ref_eta = s.reference_eta or update.lr
        for k, (ev, per_seq) in enumerate(zip(agg["evals"], agg["per_sequence"])):
            out = run_dir.eval_dir(k)
            for part, results in per_seq["results"].items():
                for j, r in enumerate(results):
                    save_npy(out / "per_sequence" / part / f"eta_{j}.npy", r.contributions.numpy())
            if "attributions" in per_seq:
                save_npy(out / "attributions.npy", per_seq["attributions"])
            if "matrix" in per_seq:
                save_npy(out / "eval_delta_matrix.npy", per_seq["matrix"])
            for key, array in per_seq.get("per_token", {}).items():
                save_npy(out / "per_token" / f"{key}.npy", array)
            suffix = "" if k == 0 else f"_{ev['name']}"
            plot_delta_h(ev, etas, run_dir.path / "plots" / f"delta_h{suffix}.png", title=f"{ev['name']}: Delta H vs eta")
            plot_ess(ev, etas, ev["n_sequences"], run_dir.path / "plots" / f"ess{suffix}.png")
            if "attributions" in per_seq:
                plot_attributions(per_seq["attributions"], ref_eta, run_dir.path / "plots" / f"attributions{suffix}.png")
        pl_module.timings["total_s"] = time.perf_counter() - self.start
        summary = {
            "plan": {
                "parts": list(s.parts), "etas": etas, "reference_eta": ref_eta, "integrand": s.integrand,
                "truncation": s.truncation, "normalisation": s.normalisation, "n_update_sequences": update.n_sequences,
                "n_eval_sequences": [ev["n_sequences"] for ev in agg["evals"]], "world_size": trainer.world_size,
                "policy": str(pl_module.policy_dir),
            },
            "config": pl_module.config_dict(),
            "update": {"lr": update.lr, "clip_coef": update.clip_coef, "grad_norm": update.grad_norm,
                       "norms": update.norms, "n_sequences": update.n_sequences, "n_tokens": update.n_tokens,
                       "loss_value": update.loss_value},
            "aggregate": agg["evals"][0]["parts"],
            "evals": agg["evals"],
            "timings": pl_module.timings,
            "environment": environment(),
        }
        for ev in agg["evals"]:
            for part, res in ev["parts"].items():
                low = [f"{e:.3g}" for e, f in zip(etas, res["ess_fraction"]) if f is None or f < 0.1]
                if low:
                    log.warning("%s/%s: ESS below 10%% of the samples at eta = %s; the SNIS estimate there is unreliable "
                                "(use smaller etas or a larger E)", ev["name"], part, ", ".join(low))
        log.info("timings: %s", ", ".join(f"{k} {v:.2f}s" for k, v in pl_module.timings.items()))
        run_dir.finish(summary)
        pl_module.report = {"summary": summary, "run_dir": run_dir.path, "tables": pl_module.tables()}
        table = format_table(summary, etas)
        print(table)
        print(f"run directory: {run_dir.path}")
