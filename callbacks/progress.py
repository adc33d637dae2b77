"""A progress bar over directions x etas x batches of E (rank 0), replacing Lightning's per-batch bar."""
from __future__ import annotations

import lightning.pytorch as pl
from tqdm.auto import tqdm


class SweepProgress(pl.Callback):
    """One tick per (part, eta) teacher-forcing pass and per part's derivative pass, over all batches."""

    def on_predict_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        n_batches = sum(trainer.num_predict_batches)
        total = n_batches * pl_module.steps_per_batch()
        pl_module.progress = tqdm(total=total, desc="probe: parts x etas x batches", unit="pass", dynamic_ncols=True,
                                  disable=trainer.global_rank != 0, bar_format="{l_bar}{bar}| {n:.0f}/{total} [{elapsed}<{remaining}]")

    def on_predict_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        bar = getattr(pl_module, "progress", None)
        if bar is not None:
            bar.close()
            pl_module.progress = None
