"""Reconstruct the update before the predict loop (gradients on, whatever the Trainer's inference mode)."""
from __future__ import annotations

import logging
import time

import lightning.pytorch as pl
import torch

from probe.optim_loading import load_optimizer_state
from probe.update import reconstruct_update

log = logging.getLogger("probe")


class UpdateReconstruction(pl.Callback):
    """Load the optimizer state, rebuild the next AdamW step on U and store it as ``pl_module.update``.

    Every rank computes the same update from the same U (no collective needed); rank 0
    writes ``update.safetensors`` when asked.
    """

    def on_predict_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        start = time.perf_counter()
        policy = pl_module.policy
        state = load_optimizer_state(pl_module.optimizer_source, policy)
        dm = trainer.datamodule
        cfg = pl_module.reconstruction
        update = None
        if trainer.global_rank == 0 or trainer.world_size == 1:
            with torch.inference_mode(False), torch.enable_grad():
                update = reconstruct_update(
                    policy, state, dm.update_batch.to(pl_module.device), pl_module.loss, **cfg.kwargs()
                )
        if trainer.world_size > 1:  # one collective before the loop: every rank probes rank 0's step
            update = trainer.strategy.broadcast(update, src=0)
        pl_module.update = update
        pl_module.etas = pl_module.settings.eta_grid(update.lr)
        largest = min(torch.finfo(p.dtype).max for p in policy.parameters() if p.is_floating_point())
        if max(pl_module.etas) > largest:
            raise ValueError(
                f"probe.etas reaches {max(pl_module.etas):.3g}, beyond the largest number the policy's parameters can hold "
                f"({largest:.3g}), so theta + eta * d cannot even be formed. Fix: use smaller etas (a very large eta is "
                "reported as non-finite in the summary as long as it fits the dtype)"
            )
        pl_module.timings["reconstruction_s"] = time.perf_counter() - start
        log.info(
            "update: lr %.3g, |full| %.4g, |baseline| %.4g, |grad| %.4g, clip coef %.4g (||g|| = %.4g), %d sequences, %d tokens",
            update.lr, update.norms["full"], update.norms["baseline"], update.norms["grad"], update.clip_coef,
            update.grad_norm, update.n_sequences, update.n_tokens,
        )
        if trainer.global_rank == 0 and pl_module.settings.save_update and pl_module.run_dir is not None:
            update.save(pl_module.run_dir.path / "update.safetensors")
