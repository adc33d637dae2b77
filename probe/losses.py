"""The policy-gradient loss on the update batch U, per sequence (docs/DESIGN.md section 2).

``L = sum_i c_i``; the aggregation mode (verl's ``loss_agg_mode``) fixes the normaliser.
Normalisers are computed once over the *whole* U, so microbatches of U sum to one batch.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from probe.logprobs import TeacherForcing

AGG_MODES = ("seq-mean-token-mean", "token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm")
OBJECTIVES = ("ppo_clip", "cispo", "sapo")


@dataclass
class LossConfig:
    """How the trainer turns U into a loss.

    Args:
        agg_mode: loss aggregation, as verl's ``loss_agg_mode``: ``seq-mean-token-mean`` (GRPO),
            ``token-mean`` (DAPO), ``seq-mean-token-sum``, ``seq-mean-token-sum-norm`` (Dr. GRPO).
        clip_ratio: PPO clip epsilon (lower side). Used only when U carries ``old_logprobs``
            and ``use_old_logprobs`` is on; otherwise the on-policy loss ``-A * log p`` is used.
        clip_ratio_high: upper clip epsilon (DAPO clip-higher); defaults to ``clip_ratio``.
        use_old_logprobs: use U's stored ``old_logprobs`` for the PPO ratio (off-policy inner epochs).
        max_response_length: ``L_max`` of ``seq-mean-token-sum-norm``; default: longest response in U.
        temperature: the log-probs of the loss are those of ``logits / temperature`` (as verl does
            with the rollout temperature).
        objective: the per-token objective of the ratio ``r = exp(log p - old log p)``: ``ppo_clip``
            (``-min(r A, clip(r) A)``), ``cispo`` (``-sg(min(r, ratio_max)) A log p``, TRL's ``cispo``) or ``sapo``
            (``-sigmoid(tau (r - 1)) 4 / tau A``, tau by the advantage's sign, TRL's ``sapo``).
        ratio_at_current: without ``use_old_logprobs``, take the ratio against the current log-probs held
            constant (``r = 1`` with the gradient of ``log p``), as TRL does for on-policy steps: the loss value is
            then TRL's; the gradient is the same either way for ``ppo_clip``. ``cispo`` and ``sapo`` always do.
        ratio_max: ``cispo``'s cap on the ratio (TRL's ``epsilon_high`` under ``loss_type: cispo``).
        sapo_temperature_pos: ``sapo``'s tau for tokens of positive advantage.
        sapo_temperature_neg: ``sapo``'s tau for the others.
    """

    agg_mode: str = "seq-mean-token-mean"
    clip_ratio: float = 0.2
    clip_ratio_high: float | None = None
    use_old_logprobs: bool = False
    max_response_length: int | None = None
    temperature: float = 1.0
    objective: str = "ppo_clip"
    ratio_at_current: bool = False
    ratio_max: float | None = None
    sapo_temperature_pos: float = 1.0
    sapo_temperature_neg: float = 1.05

    def __post_init__(self) -> None:
        if self.agg_mode not in AGG_MODES:
            raise ValueError(f"unknown loss agg_mode {self.agg_mode!r}; choose one of {', '.join(AGG_MODES)}")
        if self.objective not in OBJECTIVES:
            raise ValueError(f"unknown loss objective {self.objective!r}; choose one of {', '.join(OBJECTIVES)}")
        if self.objective == "cispo" and not (self.ratio_max is not None and self.ratio_max > 0):
            raise ValueError(
                f"loss.objective cispo caps the ratio at loss.ratio_max, which must be a number > 0 (got "
                f"{self.ratio_max}). Fix: set loss.ratio_max to the trainer's cap (TRL: epsilon_high)"
            )
        if not (self.temperature > 0 and math.isfinite(self.temperature)):
            raise ValueError(
                f"loss.temperature must be a finite number > 0, got {self.temperature}: the loss's log-probs are those "
                "of logits / temperature. Fix: set loss.temperature to the temperature U was sampled at (the "
                "trainer's rollout temperature, 1.0 unless it sampled at another)"
            )

    def forcing(self, head_dtype: torch.dtype | None = torch.float64) -> TeacherForcing:
        """How the loss teacher-forces U: at the loss temperature, log-probs only, in one pass per batch."""
        return TeacherForcing(temperature=self.temperature, head_dtype=head_dtype, batch_size=None)


@dataclass
class ClipCounts:
    """Response tokens of U by where their PPO ratio ``exp(log p - old_logprob)`` lies, counted as the loss is
    computed (:func:`per_sequence_loss` with ``clip_counts``); summed over microbatches."""

    tokens: int = 0  # response tokens
    outside: int = 0  # ratio outside [1 - clip_ratio, 1 + clip_ratio_high]
    clipped: int = 0  # the clipped term is the larger one: the clip zeroes the token's gradient (verl's pg_clipfrac)

    @torch.no_grad()
    def add(self, ratio: Tensor, clipped: Tensor, adv: Tensor, mask: Tensor) -> None:
        self.tokens += int(mask.sum())
        self.outside += int(((ratio != clipped) & mask).sum())  # clamp moved it: strictly outside the range
        self.clipped += int(((-adv * clipped > -adv * ratio) & mask).sum())

    def fractions(self) -> dict[str, float]:
        """``{"outside_fraction", "clipped_fraction"}`` of the response tokens (0 when there are none)."""
        n = max(self.tokens, 1)
        return {"outside_fraction": self.outside / n, "clipped_fraction": self.clipped / n}


@dataclass
class Normalisers:
    """Counts over the whole update batch that fix the loss scale."""

    n_sequences: int  # N
    n_tokens: int | float  # T_total, response tokens in U (a trainer may normalise by another count, TRL's dapo)
    max_length: int  # L_max


def normalisers(target_mask: Tensor, cfg: LossConfig) -> Normalisers:
    """Counts of the whole U from its ``[N, T-1]`` response-target mask."""
    lengths = target_mask.sum(-1)
    n_tokens = int(lengths.sum())
    if n_tokens == 0:
        raise ValueError("the update batch has no response tokens: every response is empty")
    return Normalisers(
        n_sequences=int(target_mask.shape[0]),
        n_tokens=n_tokens,
        max_length=int(cfg.max_response_length or int(lengths.max())),
    )


def per_token_loss(
    logprobs: Tensor,  # [B, T-1] log p of each target, 0 off the response
    mask: Tensor,  # [B, T-1] bool
    advantages: Tensor,  # [B]
    norm: Normalisers,
    cfg: LossConfig,
    old_logprobs: Tensor | None = None,  # [B, T-1]
    clip_counts: ClipCounts | None = None,
) -> Tensor:  # [B, T-1]  c_it, 0 off the response
    """Each response token's term c_it of the loss, with the sequence's normaliser: ``sum_t c_it = c_i`` of
    :func:`per_sequence_loss` (the same arithmetic per token; the sum over t is the only other rounding). A token
    whose PPO ratio the clip holds (the clipped term is the larger) has a constant term: its gradient is 0."""
    mask_f = mask.to(logprobs.dtype)
    per_token = _token_objective(logprobs, mask_f, advantages, cfg, old_logprobs, clip_counts, mask)
    return _normalised(per_token * mask_f, mask_f.sum(-1, keepdim=True), norm, cfg)


def per_sequence_loss(
    logprobs: Tensor,  # [B, T-1] log p of each target, 0 off the response
    mask: Tensor,  # [B, T-1] bool
    advantages: Tensor,  # [B]
    norm: Normalisers,
    cfg: LossConfig,
    old_logprobs: Tensor | None = None,  # [B, T-1]
    clip_counts: ClipCounts | None = None,
) -> Tensor:  # [B]  c_i
    """Each sequence's term c_i of the loss; ``sum_i c_i`` over all of U is the trainer's loss.

    With ``use_old_logprobs`` and ``clip_counts`` given, the response tokens whose PPO ratio lies outside the
    clip range (and those whose gradient the clip zeroes) are added to ``clip_counts``."""
    mask_f = mask.to(logprobs.dtype)
    per_token = _token_objective(logprobs, mask_f, advantages, cfg, old_logprobs, clip_counts, mask)
    return _normalised((per_token * mask_f).sum(-1), mask_f.sum(-1), norm, cfg)


def _normalised(total: Tensor, lengths: Tensor, norm: Normalisers, cfg: LossConfig) -> Tensor:
    """A token sum ``[B]`` (or per-token terms ``[B, T-1]`` with ``lengths`` ``[B, 1]``) divided by the aggregation
    mode's normaliser (docs/DESIGN.md section 2), in the same operations either way."""
    if cfg.agg_mode == "seq-mean-token-mean":
        return total / lengths.clamp(min=1.0) / norm.n_sequences
    if cfg.agg_mode == "token-mean":
        return total / norm.n_tokens
    if cfg.agg_mode == "seq-mean-token-sum":
        return total / norm.n_sequences
    return total / (norm.n_sequences * norm.max_length)  # seq-mean-token-sum-norm


def _token_objective(
    logprobs: Tensor,  # [B, T-1]
    mask_f: Tensor,  # [B, T-1]
    advantages: Tensor,  # [B]
    cfg: LossConfig,
    old_logprobs: Tensor | None,  # [B, T-1]
    clip_counts: ClipCounts | None,
    mask: Tensor,  # [B, T-1] bool
) -> Tensor:  # [B, T-1] the per-token objective before masking and normalisation
    adv = advantages.to(logprobs.dtype)[:, None]  # [B, 1]
    if cfg.use_old_logprobs and old_logprobs is None:
        raise ValueError(
            "loss.use_old_logprobs is on but U has no old_logprobs; add them to the rollouts or turn it off"
        )
    ratio_form = cfg.use_old_logprobs or cfg.ratio_at_current or cfg.objective != "ppo_clip"
    if not ratio_form:
        return -adv * logprobs  # gradient equals the ratio form at ratio = 1
    old = old_logprobs.to(logprobs.dtype) if cfg.use_old_logprobs else logprobs.detach()
    ratio = torch.exp((logprobs - old) * mask_f)  # [B, T-1]
    if cfg.objective == "cispo":
        return -ratio.clamp(max=cfg.ratio_max).detach() * adv * logprobs
    if cfg.objective == "sapo":
        tau = torch.where(adv > 0, cfg.sapo_temperature_pos, cfg.sapo_temperature_neg)  # [B, 1]
        return -torch.sigmoid(tau * (ratio - 1)) * 4 / tau * adv
    high = cfg.clip_ratio if cfg.clip_ratio_high is None else cfg.clip_ratio_high
    clipped = ratio.clamp(1.0 - cfg.clip_ratio, 1.0 + high)
    if clip_counts is not None:
        clip_counts.add(ratio, clipped, adv, mask.bool())
    return torch.maximum(-adv * ratio, -adv * clipped)  # [B, T-1]
