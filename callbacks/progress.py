"""A progress bar over parts x etas x batches of E (rank 0), replacing Lightning's per-batch bar."""

from __future__ import annotations

import lightning.pytorch as pl
from tqdm.auto import tqdm

from probe.run_state import run_state_of


class SweepProgress(pl.Callback):
    """One tick per (part, eta) teacher-forcing pass and per part's derivative pass, over all batches.

    It only observes: the bar is made at the first batch (when the plan is known, whatever this callback's
    place in the list) and closed at the end of the run.
    """

    def __init__(self) -> None:
        self.bar: tqdm | None = None

    def on_predict_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch, batch_idx: int, dataloader_idx: int = 0
    ) -> None:
        if self.bar is not None:
            return
        state = run_state_of(trainer)
        total = sum(trainer.num_predict_batches) * state.require("plan").passes_per_batch
        self.bar = tqdm(
            total=total,
            desc="probe: parts x etas x batches",
            unit="pass",
            dynamic_ncols=True,
            disable=trainer.global_rank != 0,
            bar_format="{l_bar}{bar}| {n:.0f}/{total} [{elapsed}<{remaining}]",
        )
        state.progress = self.bar.update

    def on_predict_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._close(trainer)

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        self._close(trainer)

    def _close(self, trainer: pl.Trainer) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None
            run_state_of(trainer).progress = None
