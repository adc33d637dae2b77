"""The covariance law of Cui et al. 2025 on the update batch U, side by side with probe's exact numbers
(docs/DESIGN.md section 5).

Cui et al., "The Entropy Mechanism of Reinforcement Learning for Reasoning Language Models" (arXiv 2505.22617),
argue that a policy-gradient step changes the policy's entropy by about minus the step size times the covariance
between a token's log-probability and its advantage. Their Clip-Cov and KL-Cov act on the per-token term, centred
over the response tokens of the batch (verl's ``compute_policy_loss_clip_cov`` / ``_kl_cov``):

    cov_t = (A_t - mean_s A_s) (log p_t - mean_s log p_s),   s, t over U's response tokens

with A_t the advantage of token t's sequence and log p_t its log-probability at theta (the loss temperature). The
batch mean of cov_t is the batch covariance Cov(log p, A); by the law Delta H ~ -eta Cov. KL-Cov penalises the
``max(1, int(fraction * T))`` tokens of largest cov_t; Clip-Cov detaches as many, drawn at random from the tokens
with ``lb < cov_t < ub`` (1 and 5 by default). probe reports the batch mean next to its exact first-order and SNIS
changes, and how the top-covariance tokens overlap the tokens of largest |a_it| (probe's exact per-token attribution
of the gradient part's first-order change), with the rank correlation of cov_t and a_it over all of U's tokens.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

CLIP_COV_BOUNDS = (1.0, 5.0)  # Clip-Cov's default (clip_cov_lb, clip_cov_ub)


def token_covariance(
    logprobs: Tensor,  # [N, T-1] log p of each response token, anything off the response
    advantages: Tensor,  # [N] one advantage per sequence
    mask: Tensor,  # [N, T-1] bool, the response tokens
) -> Tensor:  # [N, T-1] float64 cov_t, 0 off the response
    """cov_t = (A_t - mean A)(log p_t - mean log p), both means over the response tokens of the whole batch."""
    mask = mask.bool()
    A = advantages.double()[:, None].expand_as(logprobs)[mask]  # [T]
    lp = logprobs.double()[mask]  # [T]
    out = torch.zeros(logprobs.shape, dtype=torch.float64, device=logprobs.device)
    out[mask] = (A - A.mean()) * (lp - lp.mean())
    return out


def top_k(values: Tensor, k: int) -> set[int]:  # values [T]
    """The positions of the k largest values (ties broken by position, which ``torch.topk`` does not promise)."""
    return set(torch.argsort(-values.double(), stable=True)[:k].tolist())


def rank_correlation(x: Tensor, y: Tensor) -> float:  # [T], [T]
    """Spearman's rank correlation (average ranks for ties); NaN below two tokens or for a constant input."""
    if len(x) < 2:
        return math.nan

    def ranks(v: Tensor) -> Tensor:  # [T] average rank of each value
        v = v.double()
        _, inverse, counts = torch.unique(v, sorted=True, return_inverse=True, return_counts=True)
        last = counts.cumsum(0).double()  # 1-based rank of each distinct value's last copy
        return (last - (counts.double() - 1) / 2)[inverse]

    rx, ry = ranks(x), ranks(y)
    rx, ry = rx - rx.mean(), ry - ry.mean()
    denominator = float(rx.norm() * ry.norm())
    return float((rx * ry).sum()) / denominator if denominator > 0 else math.nan


@dataclass
class CovarianceLaw:
    """The covariance term on U and how it compares with probe's exact numbers (``EvalResult.covariance_law``)."""

    batch_mean: float  # mean_t cov_t = Cov(log p, A) over U's response tokens; the law: Delta H ~ -eta * batch_mean
    n_tokens: int  # T, U's response tokens
    fraction: float  # of the tokens taken by the overlap
    k: int  # max(1, int(fraction * T)) tokens, as Clip-Cov and KL-Cov count them
    clip_cov_candidates: int  # tokens with lb < cov_t < ub, among which Clip-Cov draws its k
    top_overlap: float | None = None  # |top-k cov_t & top-k |a_it|| / k (None: no token attribution)
    chance_overlap: float | None = None  # k / T, what a random choice of k tokens overlaps on average
    rank_correlation: float | None = None  # Spearman over U's tokens between cov_t and a_it (the law: negative)
    delta_h_at_lr: float | None = None  # the exact SNIS Delta H of the full step at eta = lr
    first_order_at_lr: float | None = None  # lr * the full step's first-order slope
    grad_first_order_at_lr: float | None = None  # lr * sum_i a_i, the gradient part's first-order change
    law_at_lr: float | None = None  # -lr * batch_mean: the law's prediction with the learning rate as its eta


def covariance_law(
    logprobs: Tensor,  # [N, T-1]
    advantages: Tensor,  # [N]
    mask: Tensor,  # [N, T-1] bool
    token_attributions: Tensor | None = None,  # [N, T-1] a_it
    fraction: float = 2e-4,
    bounds: tuple[float, float] = CLIP_COV_BOUNDS,
) -> tuple[CovarianceLaw, Tensor]:
    """The law's numbers on U and the per-token term ``[N, T-1]`` (0 off the response)."""
    cov = token_covariance(logprobs, advantages, mask)
    mask = mask.bool()
    flat = cov[mask]  # [T]
    T = int(flat.numel())
    if T == 0:
        raise ValueError("the update batch has no response tokens, so the covariance term is undefined")
    k = max(1, int(fraction * T))
    law = CovarianceLaw(
        batch_mean=float(flat.mean()),
        n_tokens=T,
        fraction=float(fraction),
        k=k,
        clip_cov_candidates=int(((flat > bounds[0]) & (flat < bounds[1])).sum()),
    )
    if token_attributions is not None:
        a = token_attributions.double().to(cov.device)[mask]  # [T]
        law.top_overlap = len(top_k(flat, k) & top_k(a.abs(), k)) / k
        law.chance_overlap = k / T
        law.rank_correlation = rank_correlation(flat, a)
    return law, cov
