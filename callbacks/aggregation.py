"""SNIS aggregation: per-sequence rows kept per rank, gathered once at epoch end.

Rows of every predict batch go into a torchmetrics ``Metric`` with a ``cat`` state; at
epoch end one gather collects all ranks' rows (ranks may have run different numbers of
batches), rows are sorted by sequence index (so the numbers do not depend on the split)
and the estimators of :mod:`probe.report` run on the whole of E.
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

from probe.logprobs import teacher_force
from probe.attribution import attribute, eval_update_matrix, per_sequence_exact
from probe.overrides import SequenceStats
from probe.report import summarise_eval
from probe.snis import SNISConfig

log = logging.getLogger("probe")


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


def layout_of(batch_out: dict[str, np.ndarray]) -> list[tuple[str, tuple[int, ...]]]:
    """Column layout of a predict-step output: (key, per-sequence shape), the sequence axis last."""
    return [(k, tuple(v.shape[:-1])) for k, v in sorted(batch_out.items())]


def to_rows(batch_out: dict[str, np.ndarray], layout: list[tuple[str, tuple[int, ...]]]) -> torch.Tensor:  # [B, C]
    cols = [torch.as_tensor(batch_out[k], dtype=torch.float64).reshape(-1, batch_out[k].shape[-1]).T for k, _ in layout]
    return torch.cat(cols, dim=1)


def from_rows(rows: torch.Tensor, layout: list[tuple[str, tuple[int, ...]]]) -> dict[str, np.ndarray]:
    out, c = {}, 0
    for key, shape in layout:
        width = int(np.prod(shape)) if shape else 1
        block = rows[:, c : c + width].T.reshape(*shape, rows.shape[0]) if shape else rows[:, c]
        out[key] = block.numpy()
        c += width
    return out


def _base_of(table: dict[str, np.ndarray]) -> SequenceStats:
    return SequenceStats(
        logprobs=torch.as_tensor(table["logprobs"]),
        entropies=torch.as_tensor(table["entropies"]) if "entropies" in table else None,
        lengths=torch.as_tensor(table["lengths"]),
    )


class SNISAggregation(pl.Callback):
    """Collect per-sequence rows of each evaluation batch and compute the estimates at epoch end."""

    def __init__(self) -> None:
        self.metrics: dict[int, SequenceRows] = {}
        self.layout: list[tuple[str, tuple[int, ...]]] | None = None

    def on_predict_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.layout = pl_module.row_layout()
        n_columns = sum(int(np.prod(s)) if s else 1 for _, s in self.layout)
        n_evals = len(trainer.datamodule.eval_records)
        self.metrics = {k: SequenceRows(n_columns).to(pl_module.device) for k in range(n_evals)}
        self.start = time.perf_counter()

    def on_predict_batch_end(self, trainer, pl_module, outputs: dict[str, np.ndarray], batch: Any, batch_idx: int,
                             dataloader_idx: int = 0) -> None:
        if layout_of(outputs) != self.layout:
            raise RuntimeError(f"predict_step returned columns {layout_of(outputs)}, expected {self.layout}")
        self.metrics[dataloader_idx].update(to_rows(outputs, self.layout).to(pl_module.device))

    @staticmethod
    def _attribute(pl_module, dm, k: int, table: dict[str, np.ndarray], summary: dict, entry: dict) -> None:
        """Attribution a_i (one backward over E, one JVP over U) and the eval x update matrix, on rank 0."""
        s, start = pl_module.settings, time.perf_counter()
        policy, update = pl_module.policy, pl_module.update
        U, E = dm.update_batch.to(pl_module.device), dm.eval_batch(k).to(pl_module.device)
        kw = dict(integrand=s.integrand, temperature=pl_module.eval_temperature(k), base=_base_of(table),
                  chunk_size=s.eval_batch_size, head_dtype=pl_module.head_dtype, token_chunk=s.token_chunk)
        ref_eta = s.reference_eta or update.lr
        with torch.inference_mode(False):
            if s.attribution:
                # The grad part's first-order slope is the check on sum_i a_i; reuse it when the sweep computed it
                # (no second JVP over E), else let attribute() take it.
                slope = summary["parts"].get("grad", {}).get("first_order") if s.normalisation == "global" else None
                att = attribute(policy, update, U, E, check=slope is None, **kw)
                slope = att.first_order_grad if slope is None else slope
                a = att.attributions.numpy()
                entry["attributions"] = a
                order = np.argsort(a)
                summary["attribution"] = {
                    "sum": att.total, "grad_first_order": slope,
                    "relative_difference": abs(att.total - slope) / max(abs(slope), 1e-300), "reference_eta": ref_eta,
                    "top_positive": [int(i) for i in order[::-1][:5]], "top_negative": [int(i) for i in order[:5]],
                }
            if s.eval_update_matrix:
                S = eval_update_matrix(policy, update, U, E, **kw).numpy()  # [M, N] per unit eta
                entry["matrix"] = ref_eta * S
                summary["eval_update_matrix"] = {"reference_eta": ref_eta, "sum": float(ref_eta * S.sum()),
                                                 "shape": list(S.shape)}
            if s.per_sequence_exact:
                exact = per_sequence_exact(
                    policy, update, U, E, pl_module.etas, indices=s.per_sequence_exact, mixed="baseline" in update.parts(),
                    integrands=[s.integrand], config=SNISConfig(truncation=s.truncation or None),
                    **{key: v for key, v in kw.items() if key != "integrand"},
                )
                a = entry.get("attributions")
                summary["per_sequence_exact"] = [
                    {"index": item.index,
                     "attribution_first_order": None if a is None else [float(a[item.index]) * e for e in pl_module.etas],
                     "alone": [r.delta_entropy for r in item.alone[s.integrand]],
                     "alone_se": [r.delta_entropy_se for r in item.alone[s.integrand]],
                     "mixed": None if item.mixed is None else [r.delta_entropy for r in item.mixed[s.integrand]],
                     "mixed_se": None if item.mixed is None else [r.delta_entropy_se for r in item.mixed[s.integrand]]}
                    for item in exact
                ]
        pl_module.timings[f"attribution_eval_{k:02d}_s"] = time.perf_counter() - start

    @staticmethod
    def _per_token_views(pl_module, dm, k: int) -> dict[str, np.ndarray]:
        """Per-token log-probs and entropies of E at theta and at theta + reference_eta * full (rank 0).

        Flat over response tokens, sequence j's tokens at ``offsets[j]:offsets[j+1]``.
        """
        s, update = pl_module.settings, pl_module.update
        ref_eta = s.reference_eta or update.lr
        theta = dict(pl_module.policy.named_parameters())
        shifted = {n: torch.add(theta[n].detach(), d.to(theta[n]), alpha=ref_eta) for n, d in update.full.items()}
        views: dict[str, list[np.ndarray]] = {"logprobs_theta": [], "entropies_theta": [], "logprobs_ref": [],
                                              "entropies_ref": []}
        lengths = []
        kw = dict(temperature=pl_module.eval_temperature(k), with_entropy=True, head_dtype=pl_module.head_dtype,
                  token_chunk=s.token_chunk)
        with torch.no_grad():
            for chunk in dm.eval_batch(k).chunks(s.eval_batch_size):
                chunk = chunk.to(pl_module.device)
                for tag, params in (("theta", None), ("ref", shifted)):
                    ts = teacher_force(pl_module.policy, chunk, params, **kw)
                    views[f"logprobs_{tag}"].append(ts.logprobs[ts.mask].cpu().numpy())
                    views[f"entropies_{tag}"].append(ts.entropies[ts.mask].cpu().numpy())
                lengths.append(chunk.target_mask.sum(-1).cpu().numpy())
        out = {key: np.concatenate(v) for key, v in views.items()}
        out["offsets"] = np.concatenate([[0], np.cumsum(np.concatenate(lengths))]).astype(np.int64)
        out["reference_eta"] = np.asarray(ref_eta)
        return out

    def on_predict_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        pl_module.timings["eval_passes_s"] = time.perf_counter() - self.start
        s = pl_module.settings
        snis = SNISConfig(truncation=s.truncation or None, normalisation=s.normalisation)
        evals, per_sequence = [], []
        dm = trainer.datamodule
        for k, metric in self.metrics.items():
            rows = metric.compute().cpu()
            table = from_rows(rows, self.layout)
            order = np.argsort(table["index"], kind="stable")
            table = {key: v[..., order] for key, v in table.items()}
            index = table["index"].astype(np.int64)
            if len(np.unique(index)) != len(index):  # a sampler that repeats sequences across ranks
                keep = np.unique(index, return_index=True)[1]
                table = {key: v[..., keep] for key, v in table.items()}
                index = table["index"].astype(np.int64)
            groups = [dm.eval_records[k][i].get("group") for i in index]
            summary, results = summarise_eval(table, s.parts, pl_module.etas, s.integrand, snis, groups)
            summary["name"] = f"eval_{k:02d}"
            for warning in summary.get("warnings", []):
                if "non-finite" in warning and trainer.global_rank == 0:  # (ESS warnings: see RunWriter)
                    log.warning("eval_%02d/%s", k, warning)
            summary["temperature"] = pl_module.eval_temperature(k)
            entry = {"table": table, "results": results}
            if trainer.global_rank == 0 and (s.attribution or s.eval_update_matrix or s.per_sequence_exact):
                self._attribute(pl_module, dm, k, table, summary, entry)
            if trainer.global_rank == 0 and s.per_token_views:
                entry["per_token"] = self._per_token_views(pl_module, dm, k)
            evals.append(summary)
            per_sequence.append(entry)
        pl_module.aggregated = {"evals": evals, "per_sequence": per_sequence}
