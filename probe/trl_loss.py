"""TRL's ``GRPOTrainer`` loss as probe's loss settings (README "Trained with TRL", docs/DESIGN.md section 2).

TRL (1.16) computes, per response token with ratio ``r = exp(log p - old log p)`` (``old log p`` the current
log-probs held constant when ``num_iterations == 1``), a per-token objective set by ``loss_type`` and aggregates it
over a micro-batch:

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
(:meth:`TRLLoss.loss_config`); :meth:`TRLLoss.from_trainer_args` reads a live ``GRPOConfig``. What probe does not
reproduce is refused by name: a KL term (``beta != 0``, it needs the reference model), sequence-level importance
sampling (GSPO), ``delta`` (two-sided clipping), ``vespo``, vLLM importance-sampling corrections, the entropy mask
(``top_entropy_quantile < 1``), the off-policy mask and the entropy bonus. No TRL import here.

Tested against TRL's own ``GRPOTrainer._compute_loss`` on one micro-batch (loss value and gradient, float64):
``tests/test_trl_loss.py``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from probe.losses import LossConfig

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
        num_iterations: steps per generation batch; above 1 the ratio is against U's ``old_logprobs``.
        beta: the KL coefficient (only 0 is reproduced).
        delta: two-sided clipping of the ratio (only None is reproduced).
        importance_sampling_level: ``token`` (``sequence``, GSPO, is not reproduced).
        sapo_temperature_pos: ``sapo``'s tau for positive advantages.
        sapo_temperature_neg: ``sapo``'s tau for the others.
        micro_batches: micro-batches per optimizer step over all processes (``gradient_accumulation_steps`` x
            processes): ``bnpo`` normalises by each micro-batch's own tokens, reproduced for 1 only.
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
    micro_batches: int = 1

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
            use_old_logprobs=self.num_iterations > 1,
            max_response_length=self.max_completion_length if self.loss_type == "dr_grpo" else None,
            temperature=self.temperature,
            objective=OBJECTIVE.get(self.loss_type, "ppo_clip"),
            ratio_at_current=True,
            ratio_max=high if self.loss_type == "cispo" else None,
            sapo_temperature_pos=self.sapo_temperature_pos,
            sapo_temperature_neg=self.sapo_temperature_neg,
        )

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
            micro_batches=int(args.gradient_accumulation_steps) * num_processes,
        )
