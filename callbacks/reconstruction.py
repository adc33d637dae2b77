"""Update reconstruction: the next AdamW step on U, before the predict loop (gradients on, whatever the Trainer's
inference mode)."""

from __future__ import annotations

import logging
import time
from typing import Any

import lightning.pytorch as pl
import torch
import torch.distributed as dist

from probe.engine import check_etas_fit, eta_resolution, make_plan, part_directions
from probe.loading import policy_step
from probe.optim_loading import load_optimizer_state, zero_lr_message
from probe.results import CHANGED_FLAGGED, ROUNDING_UNMEASURABLE
from probe.run_state import on_rank_zero, run_state_of
from probe.sharding import sharded_view
from probe.update import Update, reconstruct_update

log = logging.getLogger("probe")


class UpdateReconstruction(pl.Callback):
    """Load the optimizer state, rebuild the next step on U and put it, with the resolved plan, in the run state.

    Under DDP the update is computed on rank 0 only and broadcast tensor by tensor (one collective per tensor,
    in the update's parameter order, plus one small broadcast of its scalars), so every rank probes exactly
    rank 0's step. Rank 0 writes ``update.safetensors`` when ``probe.save_update``. On a sharded policy (FSDP2)
    every rank reconstructs the rows of its own shards (the forward and backward over U gather one layer at a
    time) and writes them (``update.shard-<r>-of-<N>.safetensors``).
    """

    def on_predict_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        start = time.perf_counter()
        state = run_state_of(trainer)
        policy, inputs, settings = state.policy, state.require("inputs"), state.settings

        def reconstruct() -> Update:
            optimizer_state = load_optimizer_state(settings.optimizer, policy)
            state.choices.update(optimizer_state.choices)
            check_same_step(policy, settings.policy, optimizer_state.choices, state.choices)
            chosen = optimizer_state.choices
            log.info(
                "optimizer state: %s (summary.json 'choices' says where each came from)",
                ", ".join(f"{key.removeprefix('optimizer.')} {c['value']}" for key, c in chosen.items()),
            )
            for key, choice in chosen.items():
                log.debug("%s: %s (%s)", key, choice["value"], choice.get("source", ""))
            lr_zero = all(h.lr == 0 for h in optimizer_state.hyper.values())
            if lr_zero and not (settings.probe.etas and settings.probe.reference_eta):
                raise ValueError(zero_lr_message(optimizer_state))
            with torch.inference_mode(False), torch.enable_grad():
                U = inputs.update_batch.to(pl_module.device)
                return reconstruct_update(policy, optimizer_state, U, settings.loss, settings.reconstruction)

        sharded = sharded_view(policy) is not None
        if sharded:  # every rank its own rows (the passes over U are collectives)
            update = reconstruct()
        else:
            update = on_rank_zero(trainer, reconstruct)  # a bad optimizer file stops every rank, not rank 0 alone
        if trainer.world_size > 1 and not sharded:
            update = broadcast_update(update, trainer, device=pl_module.device)
        plan = make_plan(settings.probe, settings.precision, update.lr)
        check_etas_fit(plan.etas, policy)
        state.update, state.plan = update, plan
        state.directions = {
            name: {n: t.to(pl_module.device) for n, t in direction.items()}
            for name, direction in part_directions(update, plan.parts).items()
        }
        state.resolution = eta_resolution(policy, state.directions, plan.etas)
        if all(not e <= ROUNDING_UNMEASURABLE for errors in state.resolution.rounding_error.values() for e in errors):
            log.warning(
                "every point of the sweep rounds away against the policy's %s weights (theta + eta * d differs from "
                "eta * d by more than half of it at every eta): no Delta H can be measured, only predicted. Fix: "
                "load the policy in float32 (policy.dtype: float32) or probe larger etas",
                state.resolution.dtype,
            )
        else:
            coarse = [
                f"{part} at eta={eta:.3g} ({changed:.0%})"
                for part, fractions in state.resolution.changed_fraction.items()
                for eta, changed, error in zip(plan.etas, fractions, state.resolution.rounding_error[part])
                if changed < CHANGED_FLAGGED and error <= ROUNDING_UNMEASURABLE
            ]
            if coarse:
                log.warning(
                    "the policy's %s weights cannot resolve every step of the sweep: few of the parameters the step "
                    "moves change at %s. Delta H there is that of the rounded step. Fix: load the policy in float32 "
                    "(policy.dtype: float32; precision.autocast runs its forwards in half precision) or probe larger "
                    "etas",
                    state.resolution.dtype,
                    ", ".join(coarse),
                )
        state.timings["reconstruction_s"] = time.perf_counter() - start
        log.info(
            "update: lr %.3g, |full| %.4g, |baseline| %.4g, |grad| %.4g, clip coef %.4g (||g|| = %.4g), %d sequences, "
            "%d tokens",
            update.lr,
            update.norms["full"],
            update.norms["baseline"],
            update.norms["grad"],
            update.clip_coef,
            update.grad_norm,
            update.n_sequences,
            update.n_tokens,
        )
        # tie the per-batch cache to this plan and update before anything is written: a resume of another setup
        # is refused instead of mixing rows (docs/DESIGN.md section 10)
        run_dir = state.require("run_dir")
        on_rank_zero(trainer, lambda: run_dir.claim("plan", state.plan_fingerprint(), key_name=plan_key))
        if settings.probe.save_update and (sharded or trainer.global_rank == 0):
            update.save(run_dir.path / "update.safetensors")


def check_same_step(policy: torch.nn.Module, policy_settings: Any, optimizer_choices: dict, choices: dict) -> None:
    """Warn when the policy's weights and the optimizer state were saved at different training steps (where both
    say: a Lightning checkpoint's ``global_step``, an exported policy's ``probe_fit.json``): the reconstructed
    step would be that of other moments than the weights'. Records ``policy.step`` in the run's choices."""
    step, where = policy_step(policy, policy_settings)
    if step is None:
        return
    choices["policy.step"] = {"value": step, "source": where}
    saved = optimizer_choices.get("optimizer.step", {})
    optimizer_step = saved.get("checkpoint_step")
    if optimizer_step is not None and optimizer_step != step:
        log.warning(
            "the policy's weights were saved at step %d (%s) but the optimizer state at step %d (%s): the moments "
            "are not those of these weights, so the reconstructed step is not the one training took from them. Fix: "
            "pass the optimizer state saved at the same step as the weights (or the weights of the optimizer's "
            "step, e.g. policy.path: that .ckpt with policy.config_path)",
            step,
            where,
            optimizer_step,
            optimizer_choices.get("optimizer.format", {}).get("file", "the optimizer checkpoint"),
        )


def plan_key(key: str) -> str:
    """A key of ``partial/plan.json`` as a message names it."""
    if key.startswith("update."):
        return f"the reconstructed update's {key.removeprefix('update.')} (the policy or optimizer state changed?)"
    return f"the plan's {key.removeprefix('plan.')}"


TENSOR_PARTS = ("full", "baseline", "grad", "scale")


def broadcast_update(update: Update | None, trainer: pl.Trainer, device: torch.device) -> Update:
    """Rank 0's update on every rank: its scalars and parameter names in one object broadcast, then each
    tensor with ``torch.distributed.broadcast`` (no pickling of full-size tensors)."""
    header = None
    if trainer.global_rank == 0:
        header = {
            "shapes": {
                part: {n: (tuple(t.shape), str(t.dtype)) for n, t in getattr(update, part).items()}
                for part in TENSOR_PARTS
            },
            "update": Update(**{**vars(update), **{part: {} for part in TENSOR_PARTS}}),
        }
    header = trainer.strategy.broadcast(header, src=0)
    # gloo broadcasts CPU tensors, NCCL device tensors: use the strategy's device for the transfer
    transfer = device if dist.get_backend() == "nccl" else torch.device("cpu")
    tensors: dict[str, dict[str, torch.Tensor]] = {}
    for part in TENSOR_PARTS:
        tensors[part] = {}
        for name, (shape, dtype) in header["shapes"][part].items():
            if trainer.global_rank == 0:
                t = getattr(update, part)[name].to(transfer).contiguous()
            else:
                t = torch.empty(shape, dtype=getattr(torch, dtype.removeprefix("torch.")), device=transfer)
            dist.broadcast(t, src=0)
            tensors[part][name] = t
    if trainer.global_rank == 0:
        return update
    return Update(**{**vars(header["update"]), **tensors})
