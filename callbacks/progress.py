"""Progress of a run on the console (rank 0): a tqdm bar on a terminal, a few log lines otherwise.

``SweepProgress`` counts the teacher-forcing passes of a predict run (parts x etas x batches of E), replacing
Lightning's per-batch bar. ``StepProgress`` is the Trainer's progress bar of a fit when stderr is not a terminal
(the CLI attaches it; on a terminal Lightning's own bar stays). Off a terminal (a log file, CI, a pipe) a bar would
write a carriage-return update many times a second, so both write one line each time another 10% is done instead:
``probing: 40% (38/96 passes, 2s elapsed, ~3s left)``.
"""

from __future__ import annotations

import logging
import math
import time
from typing import Any, Callable

import lightning.pytorch as pl
from lightning.pytorch.callbacks.progress.progress_bar import ProgressBar
from tqdm.auto import tqdm

from probe.console import console_is_terminal
from probe.run_state import run_state_of

log = logging.getLogger("probe")


def _duration(seconds: float) -> str:
    seconds = max(0, int(round(seconds)))
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"


class CoarseProgress:
    """Progress as log lines, one each time another ``step`` of ``total`` is done (``step=0.1``: at most 10 lines).

    ``update(n)`` adds ``n`` (as tqdm's); ``extra()``, if given, is appended to each line (e.g. the current reward);
    ``initial``: the amount done before this process started (a resumed fit), left out of the time estimate.
    """

    def __init__(
        self,
        total: float,
        what: str,
        unit: str,
        step: float = 0.1,
        extra: Callable[[], str] | None = None,
        initial: float = 0.0,
    ) -> None:
        self.total, self.what, self.unit, self.step, self.extra = float(total), what, unit, step, extra
        self.n = self.initial = float(initial)  # initial: done before this process started (a resumed fit)
        self.next_mark = self._next_mark(self._done())
        self.started = time.perf_counter()

    def _done(self) -> float:
        return min(self.n / self.total, 1.0) if self.total > 0 else 1.0

    def _next_mark(self, done: float) -> float:
        return (math.floor(done / self.step + 1e-9) + 1) * self.step

    def update(self, n: float = 1.0) -> None:
        self.n += n
        done = self._done()
        if done + 1e-9 < self.next_mark:
            return
        elapsed = time.perf_counter() - self.started
        rate = (self.n - self.initial) / elapsed if elapsed > 0 else 0.0
        left = f", ~{_duration((self.total - self.n) / rate)} left" if done < 1 and rate > 0 else ""
        extra = self.extra() if self.extra is not None else ""
        log.info(
            "%s: %d%% (%d/%d %s, %s elapsed%s)%s",
            self.what,
            int(done * 100 + 1e-9),
            int(self.n + 1e-9),  # ticks may be fractions of a pass
            round(self.total),
            self.unit,
            _duration(elapsed),
            left,
            f"; {extra}" if extra else "",
        )
        self.next_mark = self._next_mark(done)

    def close(self) -> None:
        """Nothing to close (tqdm's interface)."""


class SweepProgress(pl.Callback):
    """One tick per (part, eta) teacher-forcing pass and per part's derivative pass, over all batches.

    It only observes: the bar is made at the first batch (when the plan is known, whatever this callback's
    place in the list) and closed at the end of the run. A tqdm bar on a terminal, :class:`CoarseProgress`
    lines otherwise (``every``: the fraction of the passes between two lines).
    """

    def __init__(self, every: float = 0.1) -> None:
        self.every = every
        self.bar: tqdm | CoarseProgress | None = None

    def on_predict_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch, batch_idx: int, dataloader_idx: int = 0
    ) -> None:
        if self.bar is not None or trainer.global_rank != 0:
            return
        state = run_state_of(trainer)
        total = sum(trainer.num_predict_batches) * state.require("plan").passes_per_batch
        if console_is_terminal():
            self.bar = tqdm(
                total=total,
                desc="probe: parts x etas x batches",
                unit="pass",
                dynamic_ncols=True,
                bar_format="{l_bar}{bar}| {n:.0f}/{total} [{elapsed}<{remaining}]",
            )
        else:
            self.bar = CoarseProgress(total, "probing", "passes", step=self.every)
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


class StepProgress(ProgressBar):
    """The progress bar of a fit off a terminal: one log line per ``every`` of the optimizer steps, with the
    metrics logged with ``prog_bar=True`` (``training: 40% (20/50 steps, 8s elapsed, ~12s left); train/reward 0.602``).
    Validation, test and predict loops print nothing (a predict run has :class:`SweepProgress`)."""

    def __init__(self, every: float = 0.1) -> None:
        super().__init__()
        self.every = every
        self.enabled = True
        self.line: CoarseProgress | None = None
        self.done = 0

    def disable(self) -> None:
        self.enabled = False

    def enable(self) -> None:
        self.enabled = True

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        total = trainer.max_steps if trainer.max_steps > 0 else trainer.estimated_stepping_batches
        self.line, self.done = None, trainer.global_step  # a resumed fit counts from its checkpoint's step
        if self.enabled and trainer.is_global_zero and math.isfinite(total) and total > self.done:

            def metrics() -> str:
                shown = self.get_metrics(trainer, pl_module)
                return ", ".join(f"{k} {_short(v)}" for k, v in shown.items() if k != "v_num")

            self.line = CoarseProgress(total, "training", "steps", step=self.every, extra=metrics, initial=self.done)

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if self.line is not None and trainer.global_step > self.done:
            self.line.update(trainer.global_step - self.done)
            self.done = trainer.global_step

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.line = None


def _short(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)
