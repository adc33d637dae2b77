"""GRPO training as a LightningModule: ``python -m probe fit --config configs/toy_grpo.yaml``.

Per optimizer step (automatic optimisation, so Lightning's gradient clipping and the
``on_before_optimizer_step`` hook of callbacks work as usual):

1. take this rank's prompts of the step from the DataModule (``datamodules.PromptDataModule``);
2. sample G responses per prompt from the current policy, each prompt group with its own
   generator seeded by ``(run.seed, rollout, prompt position)`` so that the global batch does
   not depend on how prompts are split across ranks;
3. score them (text reward, ``probe.rewards``), GRPO group advantages; a group whose
   advantages are all zero is resampled (``zero_advantage: resample``, then dropped if still
   dead), dropped, or kept;
4. the loss of docs/DESIGN.md section 2 (``probe.losses.per_sequence_loss``) with normalisers of the
   GLOBAL update batch (counts all-reduced over ranks) and multiplied by the world size, so
   DDP's gradient average is the gradient of ``sum_i c_i`` over every rank's sequences;
   ``rollout.inner_epochs > 1`` reuses one rollout for several steps with the PPO-clip loss
   against ``old_logprobs`` teacher-forced before the first of them (ratio 1 at that step);
5. AdamW over the policy's trainable parameters (``configure_optimizers``).

The policy stays in eval mode (dropout off, as RL trainers run it), so sampling, the loss and the
probe's passes are deterministic; Lightning warns that modules are in eval mode at the start of fit.
A resumed fit (``ckpt_path``) samples a new rollout at its first step even in the middle of inner epochs.

The module implements the live probe's contract (:class:`probe.live_contract.LiveProbeTarget`):
``policy``, ``tokenizer`` and ``probed_step()``, the :class:`~probe.live_contract.ProbedStep` of the
step whose backward just ran (this rank's U, the step's loss settings, the normalisers of the global
U); after backward (and DDP's all-reduce) ``p.grad = d/dp sum_{i in global U} c_i``.

Outputs, in the run directory ``<run.root>/<run.name>`` (rank 0): ``config.yaml``,
``checkpoints/*.ckpt`` (ordinary Lightning checkpoints; ``probe.optim_loading`` reads their AdamW
state), ``history.jsonl`` (one line per rollout: reward, dead groups, loss) and, at the end, ``policy/``
(HF ``save_pretrained``
with the tokenizer): a ``configs/toy.yaml``-style predict run takes ``policy.path: <run>/policy`` and
``optimizer.path: <run>/checkpoints/last.ckpt``.
"""

from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, Sequence

import lightning.pytorch as pl
import torch
from torch import Tensor

from probe.batch import SequenceBatch, collate
from probe.live_contract import ProbedStep
from probe.loading import PolicySettings
from probe.logprobs import teacher_force
from probe.losses import LossConfig, Normalisers, per_sequence_loss
from probe.precision import dtype_name
from probe.rewards import resolve_reward
from probe.rundir import RunDirectory, check_run_name, default_run_name, run_path
from probe.sampling import (
    SamplingSettings,
    derived_seed,
    ids_reward_from_text,
    pad_token_id,
    sample_update_batch,
    special_token_ids,
)
from probe.sharding import local, shard_on_mesh, sharded_view

log = logging.getLogger("probe")

ZERO_ADVANTAGE = ("resample", "drop", "keep")


# --------------------------------------------------------------------------------------
# settings
# --------------------------------------------------------------------------------------


@dataclass
class RolloutSettings:
    """How each step's update batch U is sampled and scored.

    Args:
        n_per_prompt: responses per prompt (the GRPO group size G, >= 2).
        max_new_tokens: longest response.
        temperature: sampling temperature (set ``loss.temperature`` to the same value, as verl does).
        reward: ``toy``, ``gsm8k`` or ``package.module:function``
            (``reward(prompt, response[, answer][, finished]) -> float``, README "Reward functions").
        skip_special_tokens: decode prompt and response for the reward without special tokens (``<eos>``,
            ``<pad>``, ...), as TRL and verl do; false: keep them in the text.
        normalize_std: divide group advantages by the group's reward std (GRPO); off: Dr. GRPO.
        zero_advantage: what to do with a group whose advantages are all zero: ``resample`` it (up to
            ``max_resample_attempts`` times, then drop it), ``drop`` it, or ``keep`` it (it adds
            nothing to the gradient but counts in the loss normalisers).
        max_resample_attempts: resampling attempts of a dead group before it is dropped.
        inner_epochs: optimizer steps per rollout; steps after the first reuse the rollout with the
            PPO-clip loss against ``old_logprobs`` (teacher-forced before the first of them).
        float64_head: log-softmax of the loss in float64 (the model keeps its dtype).
    """

    n_per_prompt: int = 8
    max_new_tokens: int = 4
    temperature: float = 1.0
    reward: str = "toy"
    skip_special_tokens: bool = True
    normalize_std: bool = True
    zero_advantage: str = "resample"
    max_resample_attempts: int = 3
    inner_epochs: int = 1
    float64_head: bool = True

    def __post_init__(self) -> None:
        if self.zero_advantage not in ZERO_ADVANTAGE:
            raise ValueError(
                f"rollout.zero_advantage={self.zero_advantage!r}; choose one of {', '.join(ZERO_ADVANTAGE)}"
            )
        if self.n_per_prompt < 2:
            raise ValueError(f"rollout.n_per_prompt={self.n_per_prompt}: GRPO needs at least 2 responses per prompt")
        if self.inner_epochs < 1:
            raise ValueError(f"rollout.inner_epochs={self.inner_epochs} must be >= 1")
        if not self.temperature > 0:
            raise ValueError(f"rollout.temperature={self.temperature} must be > 0 (sampling needs a distribution)")


@dataclass
class AdamWSettings:
    """``torch.optim.AdamW`` over the policy's trainable parameters (one param group, model order).

    Args:
        lr: learning rate (constant).
        betas: ``(beta1, beta2)``.
        eps: epsilon of the denominator.
        weight_decay: decoupled weight decay.
    """

    lr: float = 1e-3
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    weight_decay: float = 0.01


@dataclass
class FitRunSettings:
    """Where a fit run writes, its seed, and how much it prints.

    Args:
        root: folder holding run directories.
        name: run directory name under ``root``; empty: ``$PROBE_RUN_NAME`` (set by the CLI, shared
            by DDP ranks) or a timestamp. An earlier fit's folder is never continued into.
        overwrite: replace the folder of an earlier fit of the same name (only a folder probe made).
        seed: seed of the rollouts (each prompt group's generator derives from it).
        log_level: ``standard`` (one line per stage, warnings and the table; Lightning's and W&B's boilerplate
            silenced) or ``detailed`` (also resampling retries, timings, where each automatic choice came from,
            and nothing silenced).
        num_threads: CPU threads for torch (0: torch's default). Tiny models run fastest on 1 thread.
    """

    root: str = "runs"
    name: str = ""
    overwrite: bool = False
    seed: int = 0
    log_level: str = "standard"
    num_threads: int = 0

    def __post_init__(self) -> None:
        if self.log_level not in ("standard", "detailed"):
            raise ValueError(f"run.log_level must be 'standard' or 'detailed', got {self.log_level!r}")


# --------------------------------------------------------------------------------------
# rollouts (no Lightning here)
# --------------------------------------------------------------------------------------


def group_seed(seed: int, rollout: int, position: int, attempt: int = 0) -> int:
    """Seed of one prompt group's sampling generator: a hash of (run seed, rollout, prompt position, attempt)."""
    return derived_seed("grpo", seed, rollout, position, attempt)


@dataclass
class Rollout:
    """One rollout of this rank: the records of U and what happened while sampling them."""

    records: list[dict]  # rollout records with reward, advantage, index (position in the step's global U)
    rewards: list[float]  # every sampled response's reward (first attempts only)
    groups: int  # prompt groups asked for
    dropped: int  # groups left out (dead after resampling, or dropped)
    resampled: int  # resampling attempts made
    sampling_s: float = 0.0


def sample_rollout(
    policy: torch.nn.Module,
    tokenizer: Any,
    prompts: Sequence[Sequence[int]],
    positions: Sequence[int],
    answers: Sequence[Any],
    settings: RolloutSettings,
    *,
    seed: int,
    rollout: int,
    reward_fn: Any = None,
) -> Rollout:
    """Sample G responses per prompt, score them, GRPO advantages, handle dead groups.

    Each group is sampled with its own generator (:func:`group_seed`), so the same global prompt
    batch gives the same U however the prompts are split across ranks. ``index`` of a record is
    ``position * G + j``, its place in the step's global U; ``group`` is the prompt's position.
    """
    start = time.perf_counter()
    reward_fn = reward_fn or resolve_reward(settings.reward)
    device = next(policy.parameters()).device
    G = settings.n_per_prompt
    sampling = SamplingSettings(
        n_per_prompt=G, max_new_tokens=settings.max_new_tokens, temperature=settings.temperature
    )

    answer_of = {tuple(p): a for p, a in zip(prompts, answers) if a is not None}
    eos = special_token_ids(tokenizer, model=policy)[1]  # every EOS id sampling stops at: `finished` agrees with it
    score = ids_reward_from_text(
        reward_fn, tokenizer, answer_of, skip_special_tokens=settings.skip_special_tokens, eos_token_id=eos
    )

    records: list[dict] = []
    rewards: list[float] = []
    dropped = resampled = 0
    for prompt, position in zip(prompts, positions):
        kept = None
        for attempt in range(settings.max_resample_attempts + 1):
            generator = torch.Generator(device=device).manual_seed(group_seed(seed, rollout, int(position), attempt))
            group = sample_update_batch(
                policy,
                [list(prompt)],
                sampling,
                reward_fn=score,
                tokenizer=tokenizer,
                generator=generator,
                groups=[int(position)],
                normalize_std=settings.normalize_std,
                filter_zero_advantage_prompts=False,
            )
            if attempt == 0:
                rewards.extend(r["reward"] for r in group)
            dead = all(abs(r["advantage"]) <= 1e-8 for r in group)
            if not dead or settings.zero_advantage == "keep":
                kept = group
                break
            if settings.zero_advantage == "drop" or attempt == settings.max_resample_attempts:
                break
            resampled += 1
        if kept is None:
            dropped += 1
            continue
        for j, r in enumerate(kept):
            r["index"] = int(position) * G + j
        records.extend(kept)
    return Rollout(records, rewards, len(prompts), dropped, resampled, time.perf_counter() - start)


def combine_normalisers(local: Tensor, loss: LossConfig) -> Normalisers:
    """Normalisers of the global U from per-rank counts ``[W, 3]`` (or ``[3]``): N and T summed, L_max maxed."""
    counts = local.reshape(-1, 3).double()
    n_sequences, n_tokens = int(counts[:, 0].sum()), int(counts[:, 1].sum())
    max_length = int(loss.max_response_length or int(counts[:, 2].max()))
    return Normalisers(n_sequences=n_sequences, n_tokens=n_tokens, max_length=max_length)


# --------------------------------------------------------------------------------------
# the LightningModule
# --------------------------------------------------------------------------------------


class GRPOModule(pl.LightningModule):
    """GRPO (or PPO-clip with inner epochs) on a causal LM policy, with the probe protocol exposed."""

    def __init__(
        self,
        policy: PolicySettings = PolicySettings(path="toy"),
        loss: LossConfig = LossConfig(),
        rollout: RolloutSettings = RolloutSettings(),
        optimizer: AdamWSettings = AdamWSettings(),
        run: FitRunSettings = FitRunSettings(),
        checkpoint_every_n_steps: int = 0,
        save_policy: bool = True,
    ):
        """
        Args:
            policy: the policy to train; ``path: toy`` is the built-in toy world (built once, cached).
            loss: the policy-gradient loss (aggregation mode, PPO clip, temperature).
            rollout: sampling, reward, advantages, dead groups, inner epochs.
            optimizer: AdamW hyperparameters (clipping: the Trainer's ``gradient_clip_val``).
            run: run directory ``<root>/<name>`` (empty name: the CLI's timestamp), seed of the rollouts,
                CPU threads, console log level.
            checkpoint_every_n_steps: add a ``ModelCheckpoint`` writing ``<run>/checkpoints/`` every n steps
                and ``last.ckpt`` at the end (0: only ``last.ckpt`` at the end; -1: add none, use the
                Trainer's own checkpoint callbacks).
            save_policy: write the trained policy with its tokenizer to ``<run>/policy/`` at the end of fit.
        """
        super().__init__()
        self.policy_settings, self.loss, self.rollout_settings = policy, loss, rollout
        self.optimizer_settings, self.run = optimizer, run
        self.checkpoint_every_n_steps, self.save_policy = checkpoint_every_n_steps, save_policy
        if run.num_threads > 0:
            torch.set_num_threads(run.num_threads)
        self.policy_dir = policy.directory()
        dtype, dtype_source = policy.resolved_dtype()
        if dtype in (torch.bfloat16, torch.float16):
            log.warning(
                "training the policy's %s weights themselves (policy.dtype %s, %s): AdamW updates smaller than the "
                "weights' rounding are lost. Fix: set policy.dtype: float32 to train float32 weights",
                dtype_name(dtype),
                policy.dtype,
                dtype_source,
            )
        policy = replace(policy, dtype=dtype_name(dtype))  # `auto` resolved once (the checkpoint is read once)
        self.policy, self.tokenizer = policy.load()
        self.reward_fn = resolve_reward(rollout.reward)
        if loss.temperature != rollout.temperature:
            log.warning(
                "loss.temperature=%s differs from rollout.temperature=%s: the loss's log-probs are not those of "
                "the sampling policy (verl uses the rollout temperature for both)",
                loss.temperature,
                rollout.temperature,
            )
        self.pad_token_id = pad_token_id(self.tokenizer)
        self.head_dtype: torch.dtype | None = torch.float64 if rollout.float64_head else None
        self._probed: ProbedStep | None = None  # the live probe's view of the current step
        self._rollout: tuple[int, SequenceBatch, Normalisers, Rollout] | None = None
        self.run_name = check_run_name(default_run_name(run.name))
        if not run.name:
            os.environ["PROBE_RUN_NAME"] = self.run_name
        self._run_dir: Path | None = None
        self._run_folder: RunDirectory | None = None  # rank 0: the opened run folder (holds its lock)
        self.history: list[dict] = []

    # ---- run directory -----------------------------------------------------------------------
    def run_directory(self) -> Path:
        """``<run.root>/<run.name>``, created (with probe's marker) by rank 0 on first use. The name defaults to
        ``$PROBE_RUN_NAME`` or the time of construction, which the module writes to ``$PROBE_RUN_NAME`` so that
        DDP processes launched after it (which inherit the environment) agree. No collective here: the CLI's
        config saving calls it on rank 0 only."""
        if self._run_dir is None:
            rank_zero = self._trainer is None or self.trainer.global_rank == 0
            if rank_zero:
                self._run_folder = RunDirectory.open(
                    self.run.root, self.run_name, overwrite=self.run.overwrite, kind="fit"
                )
                self._run_dir = self._run_folder.path
            else:
                self._run_dir = run_path(self.run.root, self.run_name)
        return self._run_dir

    def check_resume_source(self, ckpt: str | None) -> None:
        """``run.overwrite`` deletes the run folder before Lightning restores ``--ckpt_path``: refuse when that
        checkpoint lies inside the folder (it would be deleted, then missing). The CLI calls this before fit."""
        if not (self.run.overwrite and ckpt):
            return
        folder = run_path(self.run.root, self.run_name).resolve()
        if Path(ckpt).expanduser().resolve().is_relative_to(folder):
            raise ValueError(
                f"--ckpt_path {ckpt} lies inside the run folder {folder} that run.overwrite=true would delete before "
                "the checkpoint is read. Fix: continue the training under a new run.name (keeping --ckpt_path), "
                "or drop run.overwrite"
            )

    def probed_step(self) -> ProbedStep | None:
        """The live probe's view of the step whose backward just ran (:mod:`probe.live_contract`)."""
        return self._probed

    def configure_model(self) -> None:
        """Under ``ModelParallelStrategy`` shard the policy with FSDP2 per decoder layer (configs/toy_grpo_fsdp.yaml);
        under any other strategy it stays whole."""
        from probe.module import refuse_fsdp1

        refuse_fsdp1(self.trainer)
        shard_on_mesh(self.policy, self.device_mesh)

    def configure_callbacks(self) -> list[pl.Callback]:
        """A ``ModelCheckpoint`` writing into the run directory (replacing the Trainer's default one), unless
        ``checkpoint_every_n_steps < 0`` or the Trainer was built with ``enable_checkpointing=False``."""
        from lightning.pytorch.callbacks import ModelCheckpoint

        checkpointing = self._trainer is None or any(isinstance(c, ModelCheckpoint) for c in self.trainer.callbacks)
        if self.checkpoint_every_n_steps < 0 or not checkpointing:
            return []

        return [
            ModelCheckpoint(
                dirpath=str(run_path(self.run.root, self.run_name) / "checkpoints"),
                filename="step={step}",
                auto_insert_metric_name=False,
                every_n_train_steps=self.checkpoint_every_n_steps or None,
                save_last=True,
                save_top_k=-1,
                save_on_train_epoch_end=True,
            )
        ]

    # ---- optimisation ------------------------------------------------------------------------
    def configure_optimizers(self) -> torch.optim.Optimizer:
        s = self.optimizer_settings
        params = [p for p in self.policy.parameters() if p.requires_grad]
        if not params:
            raise ValueError("the policy has no trainable parameter; unfreeze it or give policy.lora")
        return torch.optim.AdamW(params, lr=s.lr, betas=tuple(s.betas), eps=s.eps, weight_decay=s.weight_decay)

    def _world(self) -> int:
        return self.trainer.world_size if self._trainer is not None else 1

    def _new_rollout(self, batch: dict, rollout_index: int) -> tuple[SequenceBatch, Normalisers, Rollout]:
        was_training = self.policy.training
        self.policy.eval()
        mine = (batch["prompt_ids"], [int(i) for i in batch["index"]], batch["answer"])
        sharded = sharded_view(self.policy) is not None and self._world() > 1
        # a sharded policy's every forward is a collective: every rank samples every rank's prompts (each group has
        # its own seed, so the samples are those of any split) and keeps its own, so that all take the same passes
        everyone = [mine]
        if sharded:
            everyone = [None] * self._world()
            torch.distributed.all_gather_object(everyone, mine)
        rollouts = [
            sample_rollout(
                self.policy,
                self.tokenizer,
                *prompts,
                self.rollout_settings,
                seed=self.run.seed,
                rollout=rollout_index,
                reward_fn=self.reward_fn,
            )
            for prompts in everyone
        ]
        ro = rollouts[self.trainer.global_rank if sharded else 0]
        device = next(self.policy.parameters()).device
        if ro.records:
            U = collate(ro.records, pad_token_id=self.pad_token_id, index=[r["index"] for r in ro.records]).to(device)
            counts = [len(U), int(U.target_mask.sum()), int(U.response_lengths.max())]
        else:
            U, counts = None, [0, 0, 0]
        loss = self.step_loss()
        if U is not None and loss.use_old_logprobs:
            with torch.no_grad():  # the policy's own log-probs now: ratio exactly 1 at the rollout's first step
                U.old_logprobs = teacher_force(self.policy, U, forcing=loss.forcing(self.head_dtype)).logprobs
        local = torch.tensor(counts, dtype=torch.float64, device=device)
        gathered = self.all_gather(local) if self._world() > 1 else local
        self.policy.train(was_training)
        return U, combine_normalisers(gathered, loss), ro

    def step_loss(self) -> LossConfig:
        """The loss of this run's steps: PPO-clip against old_logprobs when rollouts are reused."""
        if self.rollout_settings.inner_epochs > 1 and not self.loss.use_old_logprobs:
            return replace(self.loss, use_old_logprobs=True)
        return self.loss

    def training_step(self, batch: dict, batch_idx: int) -> Tensor:
        rollout_index, epoch = divmod(self.global_step, self.rollout_settings.inner_epochs)
        if epoch == 0 or self._rollout is None or self._rollout[0] != rollout_index:
            self._rollout = (rollout_index, *self._new_rollout(batch, rollout_index))
        _, U, norm, ro = self._rollout
        loss_cfg = self.step_loss()
        world = self._world()
        if U is None or norm.n_sequences == 0:
            if norm.n_sequences == 0:
                log.warning(
                    "step %d: every prompt group of the step was dropped (all advantages zero); the loss is 0",
                    self.global_step,
                )
            loss = (
                sum(p.sum() for p in self.policy.parameters() if p.requires_grad) * 0.0
            )  # zero gradients, DDP stays in step
        else:
            stats = teacher_force(self.policy, U, forcing=loss_cfg.forcing(self.head_dtype))
            c = per_sequence_loss(stats.logprobs, stats.mask, U.advantages, norm, loss_cfg, U.old_logprobs)  # [n] c_i
            loss = c.sum() * world  # DDP averages over ranks: the mean of world * local sums is the global sum
        has_sequences = U is not None and norm.n_sequences > 0
        self._probed = ProbedStep(U if has_sequences else None, loss_cfg, norm, self.head_dtype)
        mean_reward = sum(ro.rewards) / max(1, len(ro.rewards))
        sync = world > 1
        self.log("train/reward", mean_reward, prog_bar=True, sync_dist=sync, batch_size=max(1, len(ro.rewards)))
        self.log("train/loss", loss.detach().double() / world, sync_dist=sync, reduce_fx="sum")
        self.log("train/groups_dropped", float(ro.dropped), sync_dist=sync, reduce_fx="sum")
        self.log("train/resample_attempts", float(ro.resampled), sync_dist=sync, reduce_fx="sum")
        self.log("train/sequences", float(norm.n_sequences))
        self.log("train/response_tokens", float(norm.n_tokens))
        if epoch == 0:
            self._record_history(ro, norm, float(loss.detach()) / world)
        return loss

    def backward(self, loss: Tensor, *args: Any, **kwargs: Any) -> None:
        """Lightning's backward, then the check that no optimizer step is taken with a non-finite loss or gradient
        (gradients here are all-reduced under DDP, so every rank decides alike)."""
        super().backward(loss, *args, **kwargs)
        if getattr(self.trainer.precision_plugin, "scaler", None) is not None:
            return  # fp16 with a GradScaler: inf gradients of a scaled loss are normal, the scaler skips that step
        grads = [(n, local(p.grad)) for n, p in self.policy.named_parameters() if p.grad is not None]  # (own rows)
        finite = torch.stack([torch.isfinite(g).all() for _, g in grads]).all() if grads else torch.tensor(True)
        bad = (~finite | ~torch.isfinite(loss.detach())).double().reshape(1)
        if self._world() > 1:
            bad = self.all_gather(bad).max()
        if bool(bad):
            raise FloatingPointError(self._non_finite_message(loss, grads))

    def _non_finite_message(self, loss: Tensor, grads: list[tuple[str, Tensor]]) -> str:
        """What went non-finite at this step, the scale of the step's rewards and advantages, and the fix."""
        bad = [n for n, g in grads if not bool(torch.isfinite(g).all())]
        what = (
            f"the gradient of {len(bad)} of {len(grads)} trained tensors ({', '.join(bad[:3])}"
            + (", ..." if len(bad) > 3 else "")
            + ") holds inf/NaN"
            if bad
            else "the gradient is finite"
        )
        facts = [f"the loss is {float(loss.detach()) / self._world():.4g}", what]  # (DDP: world x the local sum)
        if self._rollout is not None and self._rollout[1] is not None:
            _, U, _, ro = self._rollout
            advantages = U.advantages.double()
            facts.append(f"this step's advantages span [{float(advantages.min()):.4g}, {float(advantages.max()):.4g}]")
            if ro.rewards:
                facts.append(f"its rewards [{min(ro.rewards):.4g}, {max(ro.rewards):.4g}]")
        normalised = "" if self.rollout_settings.normalize_std else " (rollout.normalize_std=false keeps their scale)"
        return (
            f"step {self.global_step}: {'; '.join(facts)}. The optimizer step was not taken, so the weights are still "
            "finite and nothing non-finite is saved (checkpoints already written hold earlier, finite steps). "
            f"Fix: keep rewards and advantages of moderate size{normalised}, e.g. rewards in [-10, 10] or "
            "rollout.normalize_std=true; lower optimizer.lr; resume from an earlier checkpoint of <run>/checkpoints/ "
            "if the run diverged"
        )

    def _record_history(self, ro: Rollout, norm: Normalisers, local_loss: float) -> None:
        """One line of ``history.jsonl`` per rollout (rank 0 writes; rewards gathered from every rank)."""
        rewards = [sum(ro.rewards), float(len(ro.rewards)), float(ro.dropped), float(ro.resampled), local_loss]
        local = torch.tensor(rewards, dtype=torch.float64, device=self.device)
        total = (self.all_gather(local).reshape(-1, 5).sum(0) if self._world() > 1 else local).tolist()
        entry = {
            "step": int(self.global_step),
            "mean_reward": total[0] / max(1.0, total[1]),
            "responses": int(total[1]),
            "groups_dropped": int(total[2]),
            "resample_attempts": int(total[3]),
            "loss": total[4],
            "sequences": norm.n_sequences,
            "response_tokens": norm.n_tokens,
            "sampling_s": ro.sampling_s,
        }
        self.history.append(entry)
        if self.trainer.global_rank == 0:
            path = self.run_directory() / "history.jsonl"
            path.parent.mkdir(parents=True, exist_ok=True)
            with open(path, "a") as f:
                f.write(json.dumps(entry) + "\n")

    # ---- end of fit --------------------------------------------------------------------------
    def on_train_end(self) -> None:
        try:
            self._save_trained_policy()
        finally:
            if self._run_folder is not None:
                self._run_folder.unlock()

    def _save_trained_policy(self) -> None:
        if not self.save_policy:
            return
        state_dict = None
        if sharded_view(self.policy) is not None:  # every rank takes part in gathering it; rank 0 gets it whole
            from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

            options = StateDictOptions(full_state_dict=True, cpu_offload=True)
            state_dict = get_model_state_dict(self.policy, options=options)
        if self.trainer.global_rank != 0:
            return
        weights = state_dict.items() if state_dict is not None else self.policy.named_parameters()
        bad = [n for n, p in weights if p.is_floating_point() and not bool(torch.isfinite(p).all())]
        if bad:  # cannot happen after the gradient check in backward(); kept as the last guard before a save
            raise FloatingPointError(
                f"the trained policy holds non-finite weights ({', '.join(bad[:3])}{', ...' if len(bad) > 3 else ''}) "
                f"at step {self.global_step}; it is not saved. Fix: lower optimizer.lr and check the rewards' scale"
            )
        target = self.run_directory() / "policy"
        self.policy.save_pretrained(str(target), safe_serialization=True, state_dict=state_dict)
        self.tokenizer.save_pretrained(str(target))
        (target / "probe_fit.json").write_text(
            json.dumps(
                {
                    "global_step": int(self.global_step),
                    "source": str(self.policy_dir),
                    "loss": asdict(self.loss),
                    "rollout": asdict(self.rollout_settings),
                    "optimizer": asdict(self.optimizer_settings),
                    "note": "pair with the Lightning checkpoint of the same global_step as optimizer.path (last.ckpt "
                    "when the fit ended on a checkpoint); probe warns when the two steps differ",
                },
                indent=2,
                default=str,
            )
        )
        log.info("saved the trained policy to %s (step %d)", target, self.global_step)
