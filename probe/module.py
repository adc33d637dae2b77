"""The LightningModule of ``python -m probe predict``: teacher forcing of E under the update's parts.

A thin shell over :mod:`probe.engine`: ``predict_step`` runs :func:`probe.engine.batch_rows` on one
batch of E and returns per-sequence rows; nothing is reduced here, so a run on several processes
gives the numbers of one. The module owns the run's typed state (:class:`probe.run_state.PredictRunState`)
through which the DataModule and the callbacks hand results on (docs/DESIGN.md section 6).
"""

from __future__ import annotations

import logging
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import numpy as np
import torch

from probe.batch import SequenceBatch
from probe.engine import batch_rows
from probe.loading import PolicySettings
from probe.losses import LossConfig
from probe.optim_loading import OptimizerSettings
from probe.precision import dtype_name
from probe.run_state import PredictRunState, PredictSettings, on_rank_zero
from probe.rundir import RunDirectory, default_run_name, run_path
from probe.settings import PrecisionSettings, ProbeSettings, RunSettings
from probe.sharding import shard_on_mesh
from probe.update import ReconstructionConfig

log = logging.getLogger("probe")


def refuse_fsdp1(trainer: pl.Trainer) -> None:
    """Refuse Lightning's FSDP1 ``FSDPStrategy``: it wraps the policy in ``FullyShardedDataParallel``, whose flat
    parameters are not the per-parameter tensors probe maps the optimizer state and the update onto."""
    from lightning.pytorch.strategies import FSDPStrategy

    if isinstance(trainer.strategy, FSDPStrategy):
        raise ValueError(
            "probe does not run under Lightning's FSDPStrategy (FSDP1: flat parameters). Fix: use "
            "lightning.pytorch.strategies.ModelParallelStrategy with data_parallel_size = the number of processes "
            "and tensor_parallel_size: 1 (FSDP2, configs/toy_fsdp.yaml), or ddp for a policy that fits a device"
        )


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
        if run.num_threads > 0:
            torch.set_num_threads(run.num_threads)
        precision.apply()
        dtype, dtype_source = policy.resolved_dtype()
        policy = replace(policy, dtype=dtype_name(dtype))  # `auto` resolved once: loaded, recorded, fingerprinted
        policy_model, tokenizer = policy.load()  # in eval mode; a float64 policy gets float64 RMSNorm
        self.policy = policy_model  # a submodule, so the Trainer moves it to the device
        policy_dir = policy.directory()
        log.info("policy.dtype: %s (%s)", dtype_name(dtype), dtype_source)
        settings = PredictSettings(
            policy=policy,
            optimizer=optimizer or OptimizerSettings(path=str(policy_dir)),  # default: the policy's optimizer.pt
            loss=loss,
            reconstruction=reconstruction,
            probe=probe,
            precision=precision,
            run=run,
        )
        self.run_state = PredictRunState(
            settings=settings,
            policy=policy_model,
            tokenizer=tokenizer,
            policy_dir=policy_dir,
            choices={"policy.dtype": {"value": dtype_name(dtype), "source": dtype_source}},
        )

    def configure_model(self) -> None:
        """Under ``ModelParallelStrategy`` (FSDP2), shard the policy per decoder layer over the data-parallel ranks
        (docs/DESIGN.md section 11); under any other strategy the policy stays whole."""
        refuse_fsdp1(self.trainer)
        if self.device_mesh is not None and self.run_state.settings.probe.per_sequence_exact:
            raise ValueError(
                "probe.per_sequence_exact needs each listed sequence's full-size gradient g_i, which a sharded policy "
                "(ModelParallelStrategy) does not hold on any rank. Fix: leave probe.per_sequence_exact empty (the "
                "attributions and the eval x update matrix are exact on a sharded policy), or run on one process"
            )
        shard_on_mesh(self.policy, self.device_mesh)

    def configure_callbacks(self) -> list[pl.Callback]:
        """The stages of the run: reconstruct the update, aggregate; observers write, report and show progress."""
        from callbacks import RunWriter, SNISAggregation, SweepProgress, UpdateReconstruction, WandbReport

        return [UpdateReconstruction(), SNISAggregation(), SweepProgress(), RunWriter(), WandbReport()]

    def open_run_dir(self, trainer: pl.Trainer) -> RunDirectory:
        """Open the run directory once, on rank 0 (create, resume, or refuse a finished one); all ranks agree on
        the path. Called on every rank at the same point (it holds collectives)."""
        if self.run_state.run_dir is None:
            run = self.run_state.settings.run
            name = trainer.strategy.broadcast(default_run_name(run.name), src=0)

            def open_on_rank_zero() -> RunDirectory:
                run_dir = RunDirectory.open(run.root, name, overwrite=run.overwrite)
                log.info("%s run directory %s", "resuming" if run_dir.resuming else "writing", run_dir.path)
                return run_dir

            run_dir = on_rank_zero(trainer, open_on_rank_zero)
            self.run_state.run_dir = run_dir or RunDirectory(run_path(run.root, name))
        return self.run_state.run_dir

    def run_directory(self) -> Path:
        """The run's folder (opened by the DataModule's setup); the CLI saves ``config.yaml`` there."""
        return self.run_state.require("run_dir").path

    def on_predict_batch_end(self, outputs: Any, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> None:
        """Stop after the batch whose rows were just saved when SIGTERM arrived (Lightning only records the signal
        during predict, so without this a terminated run would go on to the end)."""
        if self.trainer.received_sigterm:
            from lightning.pytorch.utilities.exceptions import SIGTERMException

            where = self.run_state.require("run_dir").path
            log.warning(
                "stopped by SIGTERM after batch %d of eval_%02d; finished batches are kept in %s/partial. "
                "Fix: rerun the same command (same run.name) to resume",
                batch_idx,
                dataloader_idx,
                where,
            )
            raise SIGTERMException(128 + 15)  # the exit status of a process ended by SIGTERM

    def predict_step(self, batch: SequenceBatch, batch_idx: int, dataloader_idx: int = 0) -> dict[str, np.ndarray]:
        """Per-sequence rows of one batch of E (``[B]`` and ``[K, J, B]`` float64 arrays), cached for resuming."""
        state = self.run_state
        plan, inputs, run_dir = state.require("plan"), state.require("inputs"), state.require("run_dir")
        indices = batch.index.tolist()
        cached = run_dir.load_partial(dataloader_idx, indices)
        if cached is not None:
            state.tick(plan.passes_per_batch)
            return cached
        start = time.perf_counter()
        rows = batch_rows(
            self.policy, batch, state.require("directions"), plan, inputs.temperatures[dataloader_idx], state.tick
        )
        log.debug(
            "eval_%02d batch %d: %d sequences in %.2fs",
            dataloader_idx,
            batch_idx,
            len(batch),
            time.perf_counter() - start,
        )
        run_dir.save_partial(dataloader_idx, indices, rows)
        return rows
