"""The LightningModule of ``python -m probe predict``: teacher forcing of E under the update's parts.

``predict_step`` takes one batch of E and returns, per sequence, everything the estimators
need: log-probs and entropy sums at theta, at theta + eta * d for every (part, eta), and their
first/second eta-derivatives (JVP, JVP of JVP). Nothing is reduced here: the aggregation
callback concatenates the per-sequence rows across batches and ranks at epoch end, so a run on
several processes gives the numbers of one process. The update itself is reconstructed by
:class:`callbacks.UpdateReconstruction` before the loop and stored in ``self.update``.
"""
from __future__ import annotations

import logging
import os
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import numpy as np
import torch
from torch import Tensor

from probe.batch import SequenceBatch
from probe.logprobs import teacher_force
from probe.loading import PolicySettings, load_policy
from probe.losses import LossConfig
from probe.optim_loading import OptimizerSettings
from probe.overrides import SequenceStats, iter_sweep
from probe.rundir import RunDirectory, default_run_name, run_path
from probe.settings import PrecisionSettings, ProbeSettings, RunSettings
from probe.taylor import sequence_derivatives
from probe.update import ReconstructionConfig, Update

log = logging.getLogger("probe")


class ProbeModule(pl.LightningModule):
    """Probe the entropy change of one AdamW step of an RL policy on evaluation batches."""

    def __init__(
        self,
        policy: PolicySettings = PolicySettings(path="toy"),
        optimizer: OptimizerSettings | None = None,
        loss: LossConfig = LossConfig(),
        reconstruction: ReconstructionConfig = ReconstructionConfig(max_grad_norm=1.0),
        probe: ProbeSettings = ProbeSettings(),
        precision: PrecisionSettings = PrecisionSettings(),
        run: RunSettings = RunSettings(),
    ):
        """
        Args:
            policy: the policy: a local HF checkpoint directory (``toy``: the built-in toy world),
                its dtype, attention kernel and optional LoRA adapter.
            optimizer: the optimizer state of the run (file and parameter order); default: the
                policy directory's ``optimizer.pt`` (the toy world has one).
            loss: the policy-gradient loss the trainer optimises on U.
            reconstruction: how the trainer computed the step (clipping, microbatches, mixed precision).
            probe: what to measure (parts, etas, integrand, first/second order, attribution).
            precision: float64 head and accumulation, TF32 and matmul precision.
            run: run directory, logging and CPU threads.
        """
        super().__init__()
        self.policy_settings, self.optimizer_settings, self.loss = policy, optimizer, loss
        self.reconstruction, self.settings, self.precision_settings, self.run = reconstruction, probe, precision, run
        if run.num_threads > 0:
            torch.set_num_threads(run.num_threads)
        self.policy_dir = self._resolve_policy_dir(policy.path)
        self._set_precision(precision)
        self.policy, self.tokenizer = self._load_policy()
        self.update: Update | None = None  # set by UpdateReconstruction
        self.etas: list[float] = []
        self.run_dir: RunDirectory | None = None
        self.timings: dict[str, float] = {}
        self.aggregated: dict[str, Any] | None = None  # set by SNISAggregation
        self.report: dict[str, Any] | None = None  # set by RunWriter

    def configure_callbacks(self) -> list[pl.Callback]:
        """The pipeline, in order: reconstruct the update, aggregate, write, report to W&B."""
        from callbacks import RunWriter, SNISAggregation, SweepProgress, UpdateReconstruction, WandbReport

        return [UpdateReconstruction(), SweepProgress(), SNISAggregation(), RunWriter(), WandbReport()]

    def config_dict(self) -> dict[str, Any]:
        """The module's settings as plain data (for summary.json)."""
        return {
            "policy": asdict(self.policy_settings),
            "optimizer": asdict(self.optimizer_source),
            "loss": asdict(self.loss),
            "reconstruction": asdict(self.reconstruction),
            "probe": asdict(self.settings),
            "precision": asdict(self.precision_settings),
            "run": asdict(self.run),
        }

    def tables(self) -> dict[str, tuple[list[str], list[list[Any]]]]:
        """Per-sequence table of U for W&B: text, reward, advantage, attribution."""
        dm = self.trainer.datamodule
        attributions = None
        if self.aggregated and "attributions" in self.aggregated["per_sequence"][0]:
            attributions = self.aggregated["per_sequence"][0]["attributions"]
        columns = ["index", "group", "prompt", "response", "reward", "advantage", "attribution"]
        rows = []
        for r in dm.update_records:
            text = lambda key, ids: r.get(key) or self.tokenizer.decode(r[ids], skip_special_tokens=False)  # noqa: E731
            a = None if attributions is None else float(attributions[r["index"]])
            rows.append([r["index"], str(r.get("group")), text("prompt", "prompt_ids"), text("response", "response_ids"),
                         r.get("reward"), r.get("advantage"), a])
        return {"update_sequences": (columns, rows)}

    # ---- loading -----------------------------------------------------------------------------
    @staticmethod
    def _resolve_policy_dir(path: str) -> Path:
        if path == "toy":
            from probe.toy.world import build_toy_world

            return build_toy_world()
        return Path(path)

    @staticmethod
    def _set_precision(p: PrecisionSettings) -> None:
        torch.backends.cuda.matmul.allow_tf32 = p.tf32
        torch.backends.cudnn.allow_tf32 = p.tf32
        torch.set_float32_matmul_precision(p.matmul_precision)

    def _load_policy(self) -> tuple[torch.nn.Module, Any]:
        s = self.policy_settings
        model, tokenizer = load_policy(
            str(self.policy_dir), dtype=s.dtype, attn_implementation=s.attn_implementation,
            adapter_path=s.adapter_path or None, lora=s.lora, trust_remote_code=s.trust_remote_code, device=s.device,
        )
        return model, tokenizer  # in eval mode; a float64 policy also gets float64 RMSNorm (probe.precision)

    @property
    def optimizer_source(self) -> OptimizerSettings:
        if self.optimizer_settings is not None:
            return self.optimizer_settings
        return OptimizerSettings(path=str(self.policy_dir))

    @property
    def head_dtype(self) -> torch.dtype | None:
        return torch.float64 if self.precision_settings.float64_head else None

    @property
    def with_entropy(self) -> bool:
        return self.settings.integrand == "token_entropy"

    def open_run_dir(self, trainer: pl.Trainer) -> RunDirectory:
        """Open the run directory on rank 0 (create, resume, or refuse a finished one); all ranks agree on the path."""
        if self.run_dir is None:
            name = trainer.strategy.broadcast(default_run_name(self.run.name), src=0)
            if trainer.global_rank == 0:
                self.run_dir = RunDirectory.open(self.run.root, name, overwrite=self.run.overwrite)
            trainer.strategy.barrier("probe-run-dir")
            if self.run_dir is None:
                self.run_dir = RunDirectory(run_path(self.run.root, name))
        return self.run_dir

    # ---- the directions ----------------------------------------------------------------------
    def directions(self) -> dict[str, dict[str, Tensor]]:
        """Part name -> direction per unit lr, on the policy's device (built once per update)."""
        assert self.update is not None, "the update is reconstructed by callbacks.UpdateReconstruction before predict"
        if getattr(self, "_directions_of", None) is self.update:
            return self._directions
        parts = {k: {n: t.to(self.device) for n, t in part.items()} for k, part in self.update.parts().items()}
        out = {}
        for name in self.settings.parts:
            if name == "baseline_plus_grad":
                out[name] = {n: parts["baseline"][n] + parts["grad"][n] for n in parts["full"]}
            else:
                out[name] = parts[name]
        self._directions, self._directions_of = out, self.update
        return out

    # ---- the step --------------------------------------------------------------------------
    def predict_step(self, batch: SequenceBatch, batch_idx: int, dataloader_idx: int = 0) -> dict[str, np.ndarray]:
        """Per-sequence statistics of one batch of E (``[B]`` and ``[K, J, B]`` float64 arrays)."""
        eval_k = dataloader_idx
        indices = batch.index.tolist()
        if self.run_dir is not None:
            cached = self.run_dir.load_partial(eval_k, indices)
            if cached is not None:
                self.tick(self.steps_per_batch())
                return cached
        start = time.perf_counter()
        out = self.batch_statistics(batch, eval_k)
        log.debug("eval_%02d batch %d: %d sequences in %.2fs", eval_k, batch_idx, len(batch), time.perf_counter() - start)
        if self.run_dir is not None:
            self.run_dir.save_partial(eval_k, indices, out)
        return out

    def batch_statistics(self, batch: SequenceBatch, eval_k: int = 0) -> dict[str, np.ndarray]:
        s = self.settings
        kw = dict(temperature=self.eval_temperature(eval_k), head_dtype=self.head_dtype, token_chunk=s.token_chunk)
        batch = batch.to(self.device)
        with torch.no_grad():
            tokens = teacher_force(self.policy, batch, with_entropy=self.with_entropy, **kw)
        base = SequenceStats.from_tokens(tokens)
        directions = self.directions()
        parts, B = list(directions), len(batch)
        sweep_logprobs = np.zeros((len(parts), len(self.etas), B))  # [K, J, B]
        sweep_entropies = np.zeros((len(parts), len(self.etas), B))
        for item in iter_sweep(self.policy, batch, directions, self.etas, with_entropy=self.with_entropy,
                               chunk_size=s.eval_batch_size, base=base, **kw):
            k, rows = parts.index(item.part), slice(item.start, item.start + len(item.stats))
            sweep_logprobs[k, item.eta_index, rows] = item.stats.logprobs.cpu().numpy()
            if self.with_entropy:
                sweep_entropies[k, item.eta_index, rows] = item.stats.entropies.cpu().numpy()
            self.tick(len(item.stats) / B)
        out: dict[str, np.ndarray] = {
            "index": batch.index.cpu().numpy(),
            "logprobs": base.logprobs.cpu().numpy(),
            "lengths": base.lengths.cpu().numpy(),
            "sweep_logprobs": sweep_logprobs,
        }
        if self.with_entropy:
            out["entropies"] = base.entropies.cpu().numpy()
            out["sweep_entropies"] = sweep_entropies
        if batch.old_logprobs is not None:
            gap = (tokens.logprobs - batch.old_logprobs.to(tokens.logprobs)).abs() * tokens.mask
            out["sampler_gap_max"] = gap.max(-1).values.cpu().numpy()
            out["sampler_gap_sum"] = gap.sum(-1).cpu().numpy()
        else:
            out["sampler_gap_max"] = out["sampler_gap_sum"] = np.full(len(batch), np.nan)
        if s.first_order:
            order = 2 if s.second_order else 1
            firsts, seconds = [], []
            for d in directions.values():
                derivs = sequence_derivatives(self.policy, batch, d, order=order, with_entropy=self.with_entropy,
                                              chunk_size=s.eval_batch_size, **kw)
                firsts.append(derivs.first)
                seconds.append(derivs.second)
                self.tick(1)
            out["d_logprobs"] = torch.stack([f.logprobs for f in firsts]).cpu().numpy()  # [K, B]
            if self.with_entropy:
                out["d_entropies"] = torch.stack([f.entropies for f in firsts]).cpu().numpy()
            if order == 2:
                out["d2_logprobs"] = torch.stack([f.logprobs for f in seconds]).cpu().numpy()
                if self.with_entropy:
                    out["d2_entropies"] = torch.stack([f.entropies for f in seconds]).cpu().numpy()
        return out

    def eval_temperature(self, eval_k: int = 0) -> float:
        """tau of evaluation batch ``eval_k`` (the temperature whose entropy is measured)."""
        dm = self.trainer.datamodule if self._trainer is not None else None
        if dm is not None and getattr(dm, "eval_settings", None):
            return float(dm.eval_settings[eval_k].sampling.temperature)
        return 1.0

    def steps_per_batch(self) -> int:
        """Progress units of one batch of E: one per (part, eta) and one per part's derivatives."""
        K = len(self.settings.parts)
        return K * len(self.etas) + (K if self.settings.first_order else 0)

    def tick(self, n: float) -> None:
        bar = getattr(self, "progress", None)
        if bar is not None:
            bar.update(n)

    def row_layout(self) -> list[tuple[str, tuple[int, ...]]]:
        """Keys and per-sequence shapes :meth:`batch_statistics` returns (sorted by key)."""
        K, J = len(self.settings.parts), len(self.etas)
        layout = {"index": (), "logprobs": (), "lengths": (), "sweep_logprobs": (K, J),
                  "sampler_gap_max": (), "sampler_gap_sum": ()}
        if self.with_entropy:
            layout.update(entropies=(), sweep_entropies=(K, J))
        if self.settings.first_order:
            layout["d_logprobs"] = (K,)
            if self.with_entropy:
                layout["d_entropies"] = (K,)
            if self.settings.second_order:
                layout["d2_logprobs"] = (K,)
                if self.with_entropy:
                    layout["d2_entropies"] = (K,)
        return sorted(layout.items())
