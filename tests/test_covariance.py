"""The covariance term of Cui et al. 2025 (probe.covariance) against a direct implementation of the paper's formula on
a hand-built batch, the overlap and rank statistics it is reported with, and where it appears (summary.json; the live
records and W&B are checked with the live runs)."""

from __future__ import annotations

import math

import pytest
import torch

from probe.covariance import covariance_law, rank_correlation, token_covariance

# a hand-built U: 3 responses of 3, 1 and 2 tokens (right-padded), GRPO advantages per sequence
LOGPROBS = torch.tensor([[-0.1, -2.0, -0.5], [-3.0, 9.9, 9.9], [-0.7, -1.2, 9.9]], dtype=torch.float64)
MASK = torch.tensor([[1, 1, 1], [1, 0, 0], [1, 1, 0]], dtype=torch.bool)
ADVANTAGES = torch.tensor([1.0, -1.5, 0.5], dtype=torch.float64)


def paper_covariance(logprobs, advantages, mask) -> list[float]:
    """The formula as the paper's Clip-Cov/KL-Cov code computes it, token by token in plain Python: over the valid
    tokens of the batch, (A - mean A) * (log p - mean log p), the advantage broadcast over a sequence's tokens."""
    tokens = [
        (float(advantages[i]), float(logprobs[i, t]))
        for i in range(len(mask))
        for t in range(mask.shape[1])
        if mask[i, t]
    ]
    mean_a = sum(a for a, _ in tokens) / len(tokens)
    mean_lp = sum(lp for _, lp in tokens) / len(tokens)
    return [(a - mean_a) * (lp - mean_lp) for a, lp in tokens]


def test_the_per_token_term_is_the_papers_formula_on_a_hand_built_batch():
    cov = token_covariance(LOGPROBS, ADVANTAGES, MASK)
    expected = paper_covariance(LOGPROBS, ADVANTAGES, MASK)
    assert cov[MASK].tolist() == pytest.approx(expected, rel=1e-15, abs=1e-15)
    assert torch.all(cov[~MASK] == 0), "padding (its log-probs are 9.9 here) takes no part"
    law, per_token = covariance_law(LOGPROBS, ADVANTAGES, MASK)
    assert law.batch_mean == pytest.approx(sum(expected) / len(expected), rel=1e-14)
    assert law.n_tokens == 6 and law.k == 1  # max(1, int(2e-4 * 6)), as Clip-Cov and KL-Cov count
    assert law.clip_cov_candidates == sum(1.0 < c < 5.0 for c in expected)
    assert torch.equal(per_token, cov)
    assert law.top_overlap is None, "without token attributions there is nothing to overlap"


def test_the_batch_mean_is_the_batch_covariance_of_log_p_and_the_advantage():
    A = ADVANTAGES[:, None].expand_as(LOGPROBS)[MASK]
    lp = LOGPROBS[MASK]
    population = float(torch.cov(torch.stack([A, lp]), correction=0)[0, 1])
    assert covariance_law(LOGPROBS, ADVANTAGES, MASK)[0].batch_mean == pytest.approx(population, rel=1e-14)


def test_the_overlap_compares_the_top_covariance_tokens_with_the_largest_attributions():
    cov = paper_covariance(LOGPROBS, ADVANTAGES, MASK)
    top_cov = sorted(range(6), key=lambda t: -cov[t])[:2]
    a = torch.zeros(3, 3, dtype=torch.float64)
    flat = torch.tensor([0.1, -0.2, 0.3, 0.05, -0.01, 0.02], dtype=torch.float64)
    flat[top_cov[0]] = -5.0  # the top-covariance token has the largest |a_it|; the second does not
    a[MASK] = flat
    law, _ = covariance_law(LOGPROBS, ADVANTAGES, MASK, a, fraction=2 / 6)
    assert law.k == 2 and law.top_overlap == pytest.approx(0.5) and law.chance_overlap == pytest.approx(2 / 6)
    assert law.rank_correlation == pytest.approx(rank_correlation(torch.tensor(cov), flat))


def test_the_rank_correlation_is_spearmans_with_average_ranks_for_ties():
    x = torch.tensor([1.0, 2.0, 2.0, 4.0, 0.5])
    y = torch.tensor([3.0, 1.0, 1.0, 5.0, 2.0])
    # ranks by hand: x -> [2, 3.5, 3.5, 5, 1], y -> [4, 1.5, 1.5, 5, 3]; Pearson of the ranks
    rx, ry = (
        torch.tensor([2, 3.5, 3.5, 5, 1], dtype=torch.float64),
        torch.tensor([4, 1.5, 1.5, 5, 3], dtype=torch.float64),
    )
    rx, ry = rx - rx.mean(), ry - ry.mean()
    assert rank_correlation(x, y) == pytest.approx(float((rx * ry).sum() / (rx.norm() * ry.norm())), rel=1e-12)
    assert rank_correlation(x, -x) == pytest.approx(-1.0)
    assert math.isnan(rank_correlation(x[:1], y[:1])) and math.isnan(rank_correlation(torch.ones(3), y[:3]))


def test_a_batch_without_response_tokens_is_refused():
    with pytest.raises(ValueError, match="no response tokens"):
        covariance_law(LOGPROBS, ADVANTAGES, torch.zeros_like(MASK))


def test_the_engine_reports_the_law_with_or_without_the_attribution(enumerated_step):
    """Without the attribution, U's log-probs come from one forward instead of the attribution's JVP: same law."""
    from probe.engine import EvalBatch, Plan, probe_eval
    from probe.snis import SNISConfig

    from enumeration import LR

    world, update, U = enumerated_step
    E = EvalBatch("eval_00", world.sample(20, seed=3), temperature=1.0)
    laws = {}
    for attribution in (True, False):
        plan = Plan(
            parts=("full",),
            etas=(LR,),
            lr=LR,
            reference_eta=LR,
            integrand="token_entropy",
            snis=SNISConfig(),
            attribution=attribution,
            covariance_law=True,
            batch_size=None,
        )
        result, _ = probe_eval(world.model, update, U, E, plan)
        laws[attribution] = result.covariance_law
    direct = paper_covariance(*_teacher_forced(world, U, update))
    assert laws[True]["batch_mean"] == pytest.approx(sum(direct) / len(direct), rel=1e-12)
    assert laws[False]["batch_mean"] == pytest.approx(laws[True]["batch_mean"], rel=1e-12)
    assert laws[False]["top_overlap"] is None and laws[True]["top_overlap"] is not None
    assert laws[True]["delta_h_at_lr"] == result.parts["full"].delta_h[0]
    assert laws[True]["law_at_lr"] == pytest.approx(-LR * laws[True]["batch_mean"], rel=1e-15)


def _teacher_forced(world, U, update):
    from probe.logprobs import teacher_force

    with torch.no_grad():
        stats = teacher_force(world.model, U, forcing=update.loss.forcing())
    return stats.logprobs, U.advantages, stats.mask
