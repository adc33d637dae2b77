"""SNIS aggregation: per-sequence rows kept per rank, gathered once at epoch end.

Rows of every predict batch go into a torchmetrics ``Metric`` with a ``cat`` state; at epoch end
one gather collects all ranks' rows (ranks may have run different numbers of batches), the rows are
sorted by sequence index (so the numbers do not depend on the split) and the engine's estimators
(:func:`probe.engine.summarise_eval`, then :func:`probe.engine.complete_eval` on rank 0) run on the
whole of E. The results go to the run state (``result``).
"""

from __future__ import annotations

import logging
import time
from typing import Any

import lightning.pytorch as pl
import numpy as np
import torch
from torchmetrics import Metric
from torchmetrics.utilities import dim_zero_cat

from probe.engine import complete_eval, sort_rows, summarise_eval
from probe.run_state import run_state_of
from probe.sharding import sharded_view

log = logging.getLogger("probe")

Layout = dict[str, tuple[int, ...]]  # column -> shape before the sequence axis


class SequenceRows(Metric):
    """Concatenates ``[B, C]`` float64 rows across batches and ranks (``cat`` reduction)."""

    full_state_update = False

    def __init__(self, n_columns: int):
        super().__init__(sync_on_compute=True)
        self.n_columns = n_columns
        self.add_state("rows", default=[], dist_reduce_fx="cat")
        self.rows.append(torch.zeros(0, n_columns, dtype=torch.float64))  # every rank has a (maybe empty) block

    def update(self, rows: torch.Tensor) -> None:
        self.rows.append(rows.to(torch.float64))

    def compute(self) -> torch.Tensor:
        return dim_zero_cat(self.rows)


def n_columns(layout: Layout) -> int:
    return sum(int(np.prod(shape)) if shape else 1 for shape in layout.values())


def to_rows(columns: dict[str, np.ndarray], layout: Layout) -> torch.Tensor:  # [B, C]
    """The columns of one batch (sequence axis last) as one ``[B, C]`` float64 block."""
    return torch.cat(
        [torch.as_tensor(columns[k], dtype=torch.float64).reshape(-1, columns[k].shape[-1]).T for k in layout], dim=1
    )


def from_rows(rows: torch.Tensor, layout: Layout) -> dict[str, np.ndarray]:
    """The inverse of :func:`to_rows`."""
    out, c = {}, 0
    for key, shape in layout.items():
        width = int(np.prod(shape)) if shape else 1
        block = rows[:, c : c + width].T.reshape(*shape, rows.shape[0]) if shape else rows[:, c]
        out[key] = block.numpy()
        c += width
    return out


class SNISAggregation(pl.Callback):
    """Collect per-sequence rows of each evaluation batch and compute the estimates at epoch end."""

    def __init__(self) -> None:
        self.metrics: dict[int, SequenceRows] = {}
        self.start = time.perf_counter()

    def on_predict_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.metrics, self.start = {}, time.perf_counter()

    def _metric(self, k: int, layout: Layout, device: torch.device) -> SequenceRows:
        if k not in self.metrics:
            self.metrics[k] = SequenceRows(n_columns(layout)).to(device)
        return self.metrics[k]

    def on_predict_batch_end(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        outputs: dict[str, np.ndarray],
        batch: Any,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        layout = run_state_of(trainer).require("plan").row_layout()
        got = {key: tuple(value.shape[:-1]) for key, value in sorted(outputs.items())}
        if got != layout:
            raise RuntimeError(
                f"predict_step returned columns {got}, expected {layout} (shapes before the sequence axis)"
            )
        self._metric(dataloader_idx, layout, pl_module.device).update(to_rows(outputs, layout).to(pl_module.device))

    def on_predict_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        state = run_state_of(trainer)
        plan, inputs = state.require("plan"), state.require("inputs")
        state.timings["eval_passes_s"] = time.perf_counter() - self.start
        layout = plan.row_layout()
        tables = []  # every gather first (a rank that ran no batch of E k still takes part), then rank 0's work
        for k in range(len(inputs.eval_records)):
            metric = self._metric(k, layout, pl_module.device)
            tables.append(sort_rows(from_rows(metric.compute().cpu(), layout)))
        results = []
        for k, table in enumerate(tables):
            E = inputs.eval_batch(k)
            result = summarise_eval(table, plan, E, state.require("resolution"))
            rank_zero = trainer.global_rank == 0
            sharded = sharded_view(state.policy) is not None  # then every rank takes part in the passes (collectives)
            if rank_zero or sharded:
                swept = len(result.warnings)
                for warning in result.warnings if rank_zero else ():
                    if "non-finite" in warning:  # (ESS warnings: see RunWriter)
                        log.warning("%s/%s", result.name, warning)
                complete_eval(
                    state.policy, state.require("update"), inputs.update_batch, E, result, table, plan, state.timings
                )
                for warning in result.warnings[swept:] if rank_zero else ():  # the attribution's: a held E, a check
                    log.warning("%s: %s", result.name, warning)
            results.append(result)
        state.result = results
