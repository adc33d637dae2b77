"""TRL's ``GRPOTrainer`` loss as probe's loss settings (README "Trained with TRL", docs/DESIGN.md section 2).

TRL (1.16) computes, per response token with ratio ``r = exp(log p - old log p)`` (``old log p`` the current
log-probs held constant unless TRL computed old ones: :attr:`TRLLoss.uses_old_logprobs`), a per-token objective
set by ``loss_type`` and aggregates it over a micro-batch:

| ``loss_type`` | per token | aggregation | probe |
|---|---|---|---|
| ``grpo`` | ``-min(r A, clip(r, 1-eps, 1+eps_hi) A)`` | the sequences' mean of token means | ``seq-mean-token-mean`` |
| ``bnpo`` | the same | token mean of the micro-batch | ``token-mean`` (one micro-batch a step only) |
| ``dr_grpo`` | the same | token sum / (sequences x ``max_completion_length``) | ``seq-mean-token-sum-norm`` |
| ``dapo`` | the same | token sum / the generation batch's tokens | ``token-mean`` |
| ``luspo`` | the same | mean over sequences of the token sum | ``seq-mean-token-sum`` |
| ``cispo`` | ``-sg(min(r, eps_high)) A log p`` | as ``dapo`` | ``objective: cispo``, ``token-mean`` |
| ``sapo`` | ``-sigmoid(tau (r - 1)) 4 / tau A`` | as ``grpo`` | ``objective: sapo``, ``seq-mean-token-mean`` |

:class:`TRLLoss` holds the ``GRPOConfig`` fields that decide it and gives the :class:`~probe.losses.LossConfig`
(:meth:`TRLLoss.loss_config`) and the normalisers of a whole optimizer step over its micro-batches and processes
(:meth:`TRLLoss.normalisers`, docs/DESIGN.md section 6); :meth:`TRLLoss.from_trainer_args` reads a live
``GRPOConfig``. What probe does not
reproduce is refused by name: a KL term (``beta != 0``, it needs the reference model), sequence-level importance
sampling (GSPO), ``delta`` (two-sided clipping), ``vespo``, vLLM importance-sampling corrections, the entropy mask
(``top_entropy_quantile < 1``), the off-policy mask and the entropy bonus. No TRL import here.

Tested against TRL's own ``GRPOTrainer._compute_loss`` on one micro-batch (loss value and gradient, float64):
``tests/test_trl_loss.py``; against the gradient a real TRL step accumulates over micro-batches and DDP processes:
``tests/test_trl_live.py``.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import Tensor

from probe.batch import SequenceBatch
from probe.losses import LossConfig, Normalisers

AGGREGATION = {
    "grpo": "seq-mean-token-mean",
    "sapo": "seq-mean-token-mean",
    "bnpo": "token-mean",
    "dr_grpo": "seq-mean-token-sum-norm",
    "dapo": "token-mean",
    "cispo": "token-mean",
    "luspo": "seq-mean-token-sum",
}
OBJECTIVE = {"cispo": "cispo", "sapo": "sapo"}  # the others: ppo_clip


@dataclass
class TRLLoss:
    """The loss of a TRL ``GRPOTrainer`` run: its ``GRPOConfig`` fields of the same names.

    Args:
        loss_type: TRL's ``loss_type`` (its default ``dapo``).
        epsilon: the lower clip epsilon.
        epsilon_high: the upper one (default: ``epsilon``); ``cispo``'s cap on the ratio.
        max_completion_length: ``dr_grpo``'s normaliser.
        temperature: the temperature TRL's log-probs use (its sampling temperature).
        num_iterations: optimizer passes over each generation batch; above 1 the ratio is against U's
            ``old_logprobs`` (:attr:`uses_old_logprobs`).
        beta: the KL coefficient (only 0 is reproduced).
        delta: two-sided clipping of the ratio (only None is reproduced).
        importance_sampling_level: ``token`` (``sequence``, GSPO, is not reproduced).
        sapo_temperature_pos: ``sapo``'s tau for positive advantages.
        sapo_temperature_neg: ``sapo``'s tau for the others.
        gradient_accumulation_steps: micro-batches a process accumulates per optimizer step.
        num_processes: data-parallel processes.
        steps_per_generation: micro-batches one generation batch is split into (default:
            ``gradient_accumulation_steps``); ``dapo`` and ``cispo`` normalise by the generation batch's tokens.
    """

    loss_type: str = "dapo"
    epsilon: float = 0.2
    epsilon_high: float | None = None
    max_completion_length: int = 256
    temperature: float = 1.0
    num_iterations: int = 1
    beta: float = 0.0
    delta: float | None = None
    importance_sampling_level: str = "token"
    sapo_temperature_pos: float = 1.0
    sapo_temperature_neg: float = 1.05
    gradient_accumulation_steps: int = 1
    num_processes: int = 1
    steps_per_generation: int | None = None

    @property
    def micro_batches(self) -> int:
        """Micro-batches per optimizer step over all processes."""
        return self.gradient_accumulation_steps * self.num_processes

    @property
    def generation_steps(self) -> int:
        return self.steps_per_generation or self.gradient_accumulation_steps

    @property
    def uses_old_logprobs(self) -> bool:
        """Whether TRL computes old log-probs for the ratio: when a generation batch is used by more than one
        optimizer step (``num_iterations > 1``, or ``steps_per_generation`` beyond the accumulation window), i.e.
        ``gradient_accumulation_steps % (steps_per_generation * num_iterations) != 0``. Otherwise the ratio is
        against the current log-probs held constant."""
        return self.gradient_accumulation_steps % (self.generation_steps * self.num_iterations) != 0

    def normalisers(
        self, n_sequences: int, n_tokens: int, num_items_in_batch: int, accumulation_steps: int | None = None
    ) -> Normalisers:
        """The normalisers of one optimizer step's U (every process's micro-batches of the step) that make probe's
        per-sequence losses add up to the gradient TRL accumulates (DDP averaging over processes included).

        Args:
            n_sequences: the step's sequences over all processes.
            n_tokens: their response (loss-mask) tokens.
            num_items_in_batch: TRL's ``num_items_in_batch`` of the step's micro-batches: the loss-mask tokens of
                their generation batch over all processes.
            accumulation_steps: the trainer's ``current_gradient_accumulation_steps`` (the last window of an
                epoch may be shorter; default ``gradient_accumulation_steps``).

        ``grpo``, ``sapo``, ``luspo``, ``dr_grpo``: each micro-batch's mean over its sequences, divided by the
        accumulation steps and averaged over processes, is the mean over the step's ``n_sequences``. ``dapo``,
        ``cispo``: each micro-batch's token sum over ``num_items_in_batch / processes * accumulation /
        steps_per_generation``, so the step's tokens over ``num_items_in_batch * accumulation /
        steps_per_generation`` (the step's own ``n_tokens`` when a generation batch is one step).
        """
        self.loss_config()  # refuses what is not reproduced
        accumulation = accumulation_steps or self.gradient_accumulation_steps
        tokens: int | float = n_tokens
        if self.loss_type in ("dapo", "cispo"):
            tokens = num_items_in_batch * accumulation / self.generation_steps
            tokens = int(tokens) if float(tokens).is_integer() else tokens
        if not tokens:
            raise ValueError("the step's update batch has no completion tokens: every completion is masked")
        return Normalisers(n_sequences=n_sequences, n_tokens=tokens, max_length=self.max_completion_length)

    def loss_config(self) -> LossConfig:
        """The :class:`~probe.losses.LossConfig` of this TRL loss (refusing, by name, what it cannot reproduce)."""
        refuse = []
        if self.loss_type not in AGGREGATION:
            refuse.append(f"loss_type {self.loss_type!r} (reproduced: {', '.join(AGGREGATION)})")
        if self.beta != 0:
            refuse.append(f"beta {self.beta} (a KL term against a reference model)")
        if self.delta is not None:
            refuse.append(f"delta {self.delta} (two-sided clipping)")
        if self.importance_sampling_level != "token":
            refuse.append(f"importance_sampling_level {self.importance_sampling_level!r} (GSPO)")
        if self.loss_type == "bnpo" and self.micro_batches != 1:
            refuse.append(
                f"bnpo over {self.micro_batches} micro-batches a step (each normalised by its own token count, "
                "which U's rollout records do not say)"
            )
        if refuse:
            raise ValueError(
                "probe does not reproduce this TRL loss: " + "; ".join(refuse) + ". Fix: train (or probe a run "
                "trained) with loss_type grpo, dr_grpo, dapo, luspo, cispo or sapo, beta 0, token-level importance "
                "sampling, no delta (bnpo: one micro-batch a step)"
            )
        high = self.epsilon if self.epsilon_high is None else self.epsilon_high
        return LossConfig(
            agg_mode=AGGREGATION[self.loss_type],
            clip_ratio=self.epsilon,
            clip_ratio_high=high,
            use_old_logprobs=self.uses_old_logprobs,
            max_response_length=self.max_completion_length if self.loss_type == "dr_grpo" else None,
            temperature=self.temperature,
            objective=OBJECTIVE.get(self.loss_type, "ppo_clip"),
            ratio_at_current=True,
            ratio_max=high if self.loss_type == "cispo" else None,
            sapo_temperature_pos=self.sapo_temperature_pos,
            sapo_temperature_neg=self.sapo_temperature_neg,
        )

    def flags(self, prefix: str = "--model.init_args.loss.") -> list[str]:
        """The loss as ``python -m probe predict`` flags (README "Trained with TRL"), e.g.
        ``TRLLoss(loss_type="dapo", epsilon_high=0.28).flags()``. Settings that are None (no cap, no fixed length)
        are left out: they keep the config's value, None in the shipped configs."""
        text = lambda v: str(v).lower() if isinstance(v, bool) else str(v)  # noqa: E731
        return [f"{prefix}{k}={text(v)}" for k, v in asdict(self.loss_config()).items() if v is not None]

    @classmethod
    def from_trainer_args(cls, args: Any, num_processes: int = 1) -> "TRLLoss":
        """The loss of a ``GRPOConfig`` (refusing the options outside the loss that change the step: vLLM
        importance-sampling corrections, the entropy mask, the off-policy mask, an entropy bonus)."""
        refuse = []
        if getattr(args, "use_vllm", False) and getattr(args, "vllm_importance_sampling_correction", False):
            refuse.append("vllm_importance_sampling_correction (per-token weights of the vLLM sampler)")
        if getattr(args, "top_entropy_quantile", 1.0) < 1.0:
            refuse.append(f"top_entropy_quantile {args.top_entropy_quantile} (the entropy mask)")
        if getattr(args, "off_policy_mask_threshold", None) is not None:
            refuse.append("off_policy_mask_threshold (the off-policy mask)")
        if getattr(args, "entropy_coef", 0.0) or getattr(args, "use_adaptive_entropy", False):
            refuse.append("an entropy bonus (entropy_coef)")
        if refuse:
            raise ValueError(
                "probe does not reproduce this TRL run's step: " + "; ".join(refuse) + ". Fix: turn them off"
            )
        return cls(
            loss_type=args.loss_type,
            epsilon=float(args.epsilon),
            epsilon_high=None if args.epsilon_high is None else float(args.epsilon_high),
            max_completion_length=int(args.max_completion_length),
            temperature=float(args.temperature),
            num_iterations=int(args.num_iterations),
            beta=float(args.beta),
            delta=getattr(args, "delta", None),
            importance_sampling_level=getattr(args, "importance_sampling_level", "token"),
            sapo_temperature_pos=float(getattr(args, "sapo_temperature_pos", 1.0)),
            sapo_temperature_neg=float(getattr(args, "sapo_temperature_neg", 1.05)),
            gradient_accumulation_steps=int(args.gradient_accumulation_steps),
            num_processes=int(num_processes),
            steps_per_generation=int(getattr(args, "steps_per_generation", None) or args.gradient_accumulation_steps),
        )


def trl_sequence_batch(micro_batch: Mapping[str, Any], group: list[Any] | None = None) -> SequenceBatch:
    """One TRL micro-batch (the ``inputs`` of ``GRPOTrainer.compute_loss``) as probe's :class:`SequenceBatch`.

    TRL's left-padded prompts and right-padded completions are kept as they are (probe counts positions from the
    first real token). The response mask is TRL's loss mask, ``completion_mask`` times ``tool_mask`` when there is
    one; the attention mask is ``prompt_mask`` then ``completion_mask``. ``old_per_token_logps`` ([B, C]) goes to
    probe's targets ([B, T-1]: a completion token at position P + j is the target of position P - 1 + j)."""
    prompt_ids, completion_ids = micro_batch["prompt_ids"], micro_batch["completion_ids"]  # [B, P], [B, C]
    P = prompt_ids.shape[1]
    loss_mask = micro_batch["completion_mask"]  # [B, C]
    if micro_batch.get("tool_mask") is not None:
        loss_mask = loss_mask * micro_batch["tool_mask"]
    input_ids = torch.cat([prompt_ids, completion_ids], dim=1)  # [B, T]
    response = torch.zeros_like(input_ids, dtype=torch.bool)  # [B, T]
    response[:, P:] = loss_mask.bool()
    old: Tensor | None = None
    if micro_batch.get("old_per_token_logps") is not None:
        old = torch.zeros(input_ids.shape[0], input_ids.shape[1] - 1, dtype=torch.float64)  # [B, T-1]
        old[:, P - 1 :] = micro_batch["old_per_token_logps"].double() * loss_mask
    return SequenceBatch(
        input_ids=input_ids,
        attention_mask=torch.cat([micro_batch["prompt_mask"], micro_batch["completion_mask"]], dim=1),
        response_mask=response,
        advantages=micro_batch["advantages"].double(),
        old_logprobs=old,
        group=list(group or []),
    )
