"""SNIS estimates of the entropy change (probe.snis, probe.overrides) against exact enumeration.

The truth comes from tests/enumeration.py: a tiny float64 Llama whose whole response space
(121 responses per prompt) is enumerated, giving H(theta + eta d) exactly, and whose samples
are exact categorical draws. The directions are the parts of a real AdamW step (the third
step of an optimizer that has taken two real steps), reconstructed by probe.update.
"""

from __future__ import annotations

import json
import math
from dataclasses import replace

import pytest
import torch

from probe.batch import collate
from probe.logprobs import teacher_force
from probe.overrides import iter_sweep, sweep
from probe.snis import SNISConfig, logprob_gap, snis_difference, snis_estimate, snis_sweep
from probe.statistics import INTEGRANDS, SequenceStats

from enumeration import FORCING, LR, EnumeratedWorld, tiny_model

ETAS = [1e-3, 3e-3, 1e-2, 3e-2]  # lr / 10 .. 3 lr; the real step is eta = lr
N_PER_PROMPT = 2000  # M = 4000


@pytest.fixture(scope="module")
def setup(enumerated_step):
    world, update, _ = enumerated_step  # the step at lr 1e-2 = LR
    E = world.sample(N_PER_PROMPT, seed=1)
    swept = sweep(world.model, E, update.parts(), ETAS, FORCING)
    return world, update, E, swept


@pytest.fixture(scope="module")
def exact(setup):
    """exact[part][j]: exact changes of the entropy, per-token entropy (global ratio) and per-prompt ratio."""
    world, update, _, _ = setup
    return {part: [exact_changes(world, d, eta) for eta in ETAS] for part, d in update.parts().items()}


def exact_changes(world: EnumeratedWorld, direction, eta: float) -> tuple[float, float, float]:
    """Exact Delta H, Delta per-token H (global ratio) and Delta per-token H (per-prompt ratio)."""
    at_eta, at_0 = world.summary(world.shifted(direction, eta)), world.summary()
    return tuple(at_eta[k] - at_0[k] for k in ("entropy", "per_token", "per_token_per_prompt"))


def test_snis_is_within_three_standard_errors_of_the_exact_change_for_every_part(setup, exact):
    world, update, E, swept = setup
    results = snis_sweep(swept, integrands=INTEGRANDS)
    checked = 0
    for part in update.parts():
        for j, eta in enumerate(ETAS):
            change, change_tok, _ = exact[part][j]
            for integrand in INTEGRANDS:
                r = results[part][integrand][j]
                if r.ess_fraction <= 0.1:  # too few effective samples for the delta method: not claimed
                    continue
                checked += 1
                where = (part, eta, integrand)
                assert abs(r.delta_entropy - change) <= 3 * r.delta_entropy_se, (*where, r.delta_entropy, change)
                assert abs(r.delta_entropy_per_token - change_tok) <= 3 * r.delta_entropy_per_token_se, where
    # the sweep reaches the regime where ESS drops (full step at 3 lr) yet most points are checked
    assert checked >= 20
    assert results["full"]["logprob"][-1].ess_fraction < 0.1


def test_token_entropy_integrand_has_a_smaller_standard_error_than_logprob(setup):
    _, _, _, swept = setup
    results = snis_sweep(swept)
    for part in swept.parts:
        for j in range(len(ETAS)):
            assert results[part]["token_entropy"][j].delta_entropy_se < results[part]["logprob"][j].delta_entropy_se


def test_standard_errors_are_honest_over_twenty_seeds(enumerated_step):
    world, update, _ = enumerated_step
    exact, exact_tok, _ = exact_changes(world, update.grad, LR)
    covered = {name: 0 for name in INTEGRANDS}
    covered_tok = {name: 0 for name in INTEGRANDS}
    estimates, ses = [], []
    for seed in range(20):
        E = world.sample(1000, seed=1000 + seed)  # M = 2000: measured coverage over 200 seeds 0.945-0.98
        swept = sweep(world.model, E, {"grad": update.grad}, [LR], FORCING)
        for name in INTEGRANDS:
            r = snis_estimate(swept.base, swept.at("grad", 0), integrand=name, eta=LR)
            covered[name] += abs(r.delta_entropy - exact) <= 1.96 * r.delta_entropy_se
            covered_tok[name] += abs(r.delta_entropy_per_token - exact_tok) <= 1.96 * r.delta_entropy_per_token_se
            if name == "token_entropy":
                estimates.append(r.delta_entropy)
                ses.append(r.delta_entropy_se)
    # a calibrated 95% interval misses more than 3 of 20 with probability 1.6% (7% at a true 0.945)
    assert min(covered.values()) >= 17, covered
    assert min(covered_tok.values()) >= 17, covered_tok
    # the SE also matches the spread across seeds (a 20-sample std is within +-35% at ~2.5 sigma)
    spread = torch.tensor(estimates).std().item()
    assert 0.65 < spread / (sum(ses) / len(ses)) < 1.5


def test_eta_zero_reproduces_the_base_log_probs_bitwise(setup):
    world, update, E, _ = setup
    swept = sweep(world.model, E.select(range(0, len(E), 7)), update.parts(), [0.0], replace(FORCING, batch_size=100))
    for part in update.parts():
        at_zero = swept.at(part, 0)
        assert torch.equal(at_zero.logprobs, swept.base.logprobs)
        assert torch.equal(at_zero.entropies, swept.base.entropies)
        r = snis_estimate(swept.base, at_zero, integrand="token_entropy", eta=0.0)
        # lambda = 0 exactly; only the two summation orders of the mean differ (M * eps * |h| ~ 1e-13)
        assert abs(r.delta_entropy) < 1e-12 and r.ess == pytest.approx(len(at_zero), rel=1e-12)


def test_left_and_right_padding_give_the_same_estimates(setup):
    world, update, _, _ = setup
    records = world.sample_records(200, seed=5)
    right = collate(records, padding_side="right")
    left = collate(records, padding_side="left")
    assert not torch.equal(right.input_ids, left.input_ids)
    a = sweep(world.model, right, update.parts(), [LR], FORCING)
    b = sweep(world.model, left, update.parts(), [LR], FORCING)
    # float64 model: positions are counted from the first real token, only rounding differs
    torch.testing.assert_close(a.logprobs, b.logprobs, rtol=0, atol=1e-12)
    torch.testing.assert_close(a.entropies, b.entropies, rtol=0, atol=1e-12)
    ra = snis_estimate(a.base, a.at("full", 0), integrand="token_entropy")
    rb = snis_estimate(b.base, b.at("full", 0), integrand="token_entropy")
    assert ra.delta_entropy == pytest.approx(rb.delta_entropy, abs=1e-12)


def test_chunking_over_sequences_does_not_change_the_statistics(setup):
    world, update, E, _ = setup
    sub = E.select(range(0, len(E), 10))
    whole = sweep(world.model, sub, {"full": update.full}, ETAS[2:3], FORCING)
    chunked = sweep(world.model, sub, {"full": update.full}, ETAS[2:3], replace(FORCING, batch_size=97))
    torch.testing.assert_close(whole.logprobs, chunked.logprobs, rtol=0, atol=1e-12)
    torch.testing.assert_close(whole.base.entropies, chunked.base.entropies, rtol=0, atol=1e-12)


def test_base_statistics_are_computed_once_per_chunk_and_shared_by_all_parts(setup):
    world, update, E, _ = setup
    sub = E.select(range(250))
    parts = {"full": update.full, "grad": update.grad}
    by_100 = replace(FORCING, batch_size=100)
    items = list(iter_sweep(world.model, sub, parts, ETAS[:2], by_100))
    base_items = [it for it in items if it.part is None]
    assert [it.start for it in base_items] == [0, 100, 200]
    assert len(items) == 3 * (1 + 2 * 2)
    given = SequenceStats.cat([it.stats for it in base_items])
    assert all(it.part is not None for it in iter_sweep(world.model, sub, parts, ETAS[:2], by_100, base=given))


def test_contributions_sum_to_the_estimate(setup):
    _, _, E, swept = setup
    for config in (SNISConfig(), SNISConfig(normalisation="per_prompt"), SNISConfig(truncation=3.0)):
        r = snis_estimate(swept.base, swept.at("grad", 2), integrand="token_entropy", config=config, groups=E.group)
        assert float(r.contributions.sum()) == pytest.approx(r.delta_entropy, abs=1e-12)
        assert float(r.contributions_per_token.sum()) == pytest.approx(r.delta_entropy_per_token, abs=1e-12)
        assert float(r.weights.sum()) == pytest.approx(1.0, abs=1e-12)


def test_per_prompt_normalisation_is_within_three_standard_errors_of_the_exact_change(setup, exact):
    world, update, E, swept = setup
    config = SNISConfig(normalisation="per_prompt")
    for part in update.parts():
        for j, eta in enumerate(ETAS[:3]):
            change, _, change_tok_per_prompt = exact[part][j]
            for name in INTEGRANDS:
                r = snis_estimate(swept.base, swept.at(part, j), integrand=name, eta=eta, config=config, groups=E.group)
                assert r.ess_fraction > 0.1
                # equally many samples per prompt: groups weighted by counts = prompts weighted equally
                assert abs(r.delta_entropy - change) <= 3 * r.delta_entropy_se
                assert abs(r.delta_entropy_per_token - change_tok_per_prompt) <= 3 * r.delta_entropy_per_token_se


def test_per_prompt_normalisation_with_a_single_prompt_equals_global(setup):
    _, _, E, swept = setup
    rows = torch.tensor([g == 0 for g in E.group]).nonzero().squeeze(-1)
    base, shifted = swept.base.select(rows), swept.at("full", 1).select(rows)
    a = snis_estimate(base, shifted, integrand="logprob")
    per_prompt = SNISConfig(normalisation="per_prompt")
    b = snis_estimate(base, shifted, integrand="logprob", config=per_prompt, groups=[0] * len(rows))
    for key in ("delta_entropy", "delta_entropy_se", "delta_entropy_per_token", "delta_entropy_per_token_se", "ess"):
        assert getattr(a, key) == pytest.approx(getattr(b, key), rel=1e-12, abs=1e-15)


def test_truncation_caps_weights_at_c_times_their_mean(setup):
    _, _, _, swept = setup
    base, shifted = swept.base, swept.at("full", 3)  # eta = 3 lr: heavy-tailed weights
    c = 3.0
    r = snis_estimate(base, shifted, integrand="token_entropy", config=SNISConfig(truncation=c))
    # independent recomputation of the truncated estimator from the raw log-weights
    w = torch.exp(shifted.logprobs - base.logprobs)
    cap = c * w.mean()
    capped = torch.minimum(w, cap)
    expected = float((capped * shifted.entropies).sum() / capped.sum() - base.entropies.mean())
    assert r.truncated_fraction == pytest.approx(float((w > cap).double().mean()), abs=0)
    assert 0 < r.truncated_fraction < 0.1
    assert r.delta_entropy == pytest.approx(expected, rel=1e-10)
    untruncated = snis_estimate(base, shifted, integrand="token_entropy")
    huge = snis_estimate(base, shifted, integrand="token_entropy", config=SNISConfig(truncation=1e9))
    assert huge.truncated_fraction == 0 and huge.delta_entropy == untruncated.delta_entropy
    assert r.ess > untruncated.ess


def test_difference_of_two_points_on_the_same_samples_has_a_joint_standard_error(setup):
    world, update, _, swept = setup
    j = 1
    full = snis_estimate(swept.base, swept.at("full", j), integrand="token_entropy", eta=ETAS[j])
    baseline = snis_estimate(swept.base, swept.at("baseline", j), integrand="token_entropy", eta=ETAS[j])
    diff = snis_difference(full, baseline)
    exact = world.entropy_along(update.full, ETAS[j]) - world.entropy_along(update.baseline, ETAS[j])
    assert diff.delta_entropy == pytest.approx(full.delta_entropy - baseline.delta_entropy, abs=1e-14)
    assert abs(diff.delta_entropy - exact) <= 3 * diff.delta_entropy_se
    # the shared samples make the difference far more precise than independent estimates would be
    assert diff.delta_entropy_se < math.hypot(full.delta_entropy_se, baseline.delta_entropy_se)


def test_logprob_gap_measures_the_sampler_disagreement_on_response_tokens():
    model = tiny_model()
    world = EnumeratedWorld(model)
    batch = world.sample(3, seed=2)
    stats = teacher_force(model, batch)
    sampler = stats.logprobs.detach().clone()
    first = stats.mask.nonzero()[0]
    sampler[first[0], first[1]] += 0.25
    sampler[~stats.mask] = 7.0  # off the response: ignored
    gap = logprob_gap(stats.logprobs.detach(), sampler, stats.mask)
    assert gap["max_abs"] == pytest.approx(0.25, abs=1e-12)
    assert gap["mean_abs"] == pytest.approx(0.25 / int(stats.mask.sum()), abs=1e-12)
    with pytest.raises(ValueError, match="equal shapes"):
        logprob_gap(stats.logprobs, sampler[:, :-1], stats.mask)


def test_result_serialises_to_json(setup):
    _, _, _, swept = setup
    r = snis_estimate(swept.base, swept.at("grad", 0), integrand="logprob", eta=ETAS[0])
    data = json.loads(json.dumps(r.to_dict(per_sequence=True)))
    assert data["eta"] == ETAS[0] and len(data["contributions"]) == r.n_samples
    assert "weights" not in r.to_dict()


def test_bad_settings_raise_clear_errors(setup):
    _, _, E, swept = setup
    with pytest.raises(ValueError, match="normalisation"):
        SNISConfig(normalisation="per_group")
    with pytest.raises(ValueError, match="truncation"):
        SNISConfig(truncation=0.5)
    with pytest.raises(ValueError, match="integrand"):
        snis_estimate(swept.base, swept.base, integrand="entropy")
    per_prompt = SNISConfig(normalisation="per_prompt")
    with pytest.raises(ValueError, match="group"):
        snis_estimate(swept.base, swept.base, integrand="logprob", config=per_prompt, groups=None)
    with pytest.raises(ValueError, match="same E"):
        snis_estimate(swept.base, swept.base.select(slice(0, 10)), integrand="logprob")
