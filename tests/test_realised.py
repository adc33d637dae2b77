"""The realised change of one step, paired by common random numbers (probe/sampling.py, probe/realised.py,
probe/live.py).

What a user relies on: the coupled sampler (inverse CDF from pre-drawn uniforms) draws exactly from the policy, and
its responses are a function of the uniforms alone; the old and the new policy sampled with the same uniforms give
the same responses wherever a step moved little, so the paired difference measures H(new) - H(old) without bias and
with a many times smaller SE than two independent samples; on a live GRPO fit this resolves the entropy change of
single steps, and the predictions agree with it.
"""

from __future__ import annotations

import copy
import math
from pathlib import Path

import pytest
import torch

from support import QUIET, eval_arg, flags, probe, records

# ---- the coupled sampler on the enumerated world (tests/enumeration.py) ------------------------------------------

N_PER_PROMPT = 4000  # responses per prompt of the enumerated world's samples


def draw(model, n_per_prompt: int, seed: int, coupled: bool = True, batch_size: int | None = None) -> list[dict]:
    """``n_per_prompt`` responses to each prompt of the enumerated world: by inverse CDF from the uniforms of
    ``seed`` (``coupled``), else with torch.multinomial from a generator seeded ``seed``."""
    from probe.sampling import SamplingSettings, common_uniforms, sample_responses

    from enumeration import EOS, MAX_RESPONSE, PROMPTS

    sampling = SamplingSettings(n_per_prompt=n_per_prompt, max_new_tokens=MAX_RESPONSE, batch_size=batch_size)
    uniforms = common_uniforms(seed, len(PROMPTS) * n_per_prompt, MAX_RESPONSE) if coupled else None
    prompts = [list(p) for p in PROMPTS]
    generator = torch.Generator().manual_seed(seed)
    return sample_responses(
        model, prompts, sampling, eos_token_id=EOS, pad_token_id=0, generator=generator, uniforms=uniforms
    )


def chi_square_p_value(records: list[dict], world, logp: torch.Tensor, n_per_prompt: int) -> float:
    """Pearson's chi-square test of the responses' counts against the enumerated probabilities ``logp`` [P, R],
    prompt by prompt (responses expected fewer than 5 times pooled into one cell); the p-value."""
    index = {response: k for k, response in enumerate(world.responses)}
    statistic, dof = 0.0, 0
    for p in range(logp.shape[0]):
        counts = torch.zeros(logp.shape[1], dtype=torch.float64)  # [R]
        for r in records[p * n_per_prompt : (p + 1) * n_per_prompt]:
            counts[index[tuple(r["response_ids"])]] += 1
        expected = logp[p].exp() * n_per_prompt  # [R]
        rare = expected < 5
        observed_cells = torch.cat([counts[~rare], counts[rare].sum()[None]])
        expected_cells = torch.cat([expected[~rare], expected[rare].sum()[None]])
        statistic += float(((observed_cells - expected_cells) ** 2 / expected_cells).sum())
        dof += len(expected_cells) - 1
    half = torch.tensor([dof / 2, statistic / 2], dtype=torch.float64)
    return float(torch.special.gammaincc(half[0], half[1]))  # P(chi2_dof > statistic)


def moved(model: torch.nn.Module, direction: dict[str, torch.Tensor], eta: float) -> torch.nn.Module:
    """A copy of ``model`` at theta + eta * direction."""
    out = copy.deepcopy(model)
    with torch.no_grad():
        for name, p in out.named_parameters():
            if name in direction:
                p.add_(eta * direction[name].to(p.dtype))
    return out


def responses(records: list[dict]) -> list[list[int]]:
    return [r["response_ids"] for r in records]


def test_the_coupled_sampler_draws_exactly_from_the_policy(enumerated_step):
    from enumeration import EnumeratedWorld

    world, _, _ = enumerated_step
    sample = draw(world.model, N_PER_PROMPT, seed=7)
    # 2 x 4000 responses over the 2 x 121 enumerated ones (83 degrees of freedom): measured p = 0.31; the
    # multinomial sampler, seed 7: p = 0.63
    assert chi_square_p_value(sample, world, world.log_probs(), N_PER_PROMPT) > 1e-4
    # and the test tells another distribution apart: the same counts against the policy at tau = 1.1 (p ~ 1e-18)
    hotter = EnumeratedWorld(world.model, temperature=1.1).log_probs()
    assert chi_square_p_value(sample, world, hotter, N_PER_PROMPT) < 1e-8


def test_coupled_responses_are_a_function_of_the_uniforms_alone(enumerated_step):
    world, _, _ = enumerated_step
    whole = draw(world.model, 6, seed=3)
    for batch_size in (1, 5):  # generation batches that cut across the prompts (of different lengths)
        split = draw(world.model, 6, seed=3, batch_size=batch_size)
        assert responses(split) == responses(whole)
        for a, b in zip(split, whole):  # the same tokens' log-probs, up to the padding's float64 rounding
            assert a["old_logprobs"] == pytest.approx(b["old_logprobs"], abs=1e-12)
    assert responses(draw(world.model, 6, seed=3)) == responses(whole)  # deterministic given the seed
    assert responses(draw(world.model, 6, seed=4)) != responses(whole)  # and other uniforms draw other responses


def test_the_uniforms_must_fit_the_rows_and_positions(enumerated_step):
    from probe.sampling import SamplingSettings, common_uniforms, sample_responses

    from enumeration import EOS

    world, _, _ = enumerated_step
    sampling, prompts = SamplingSettings(n_per_prompt=3, max_new_tokens=4), [[1, 2], [2, 0, 1]]
    with pytest.raises(ValueError, match=r"one uniform per row and token position, shape \(6, 4\)"):
        sample_responses(world.model, prompts, sampling, eos_token_id=EOS, uniforms=common_uniforms(0, 5, 4))
    with pytest.raises(ValueError, match=r"uniforms must lie in \[0, 1\)"):
        sample_responses(world.model, prompts, sampling, eos_token_id=EOS, uniforms=torch.ones(6, 4))


def test_the_inverse_cdf_never_draws_a_token_of_probability_zero_and_always_draws_one():
    from probe.sampling import inverse_cdf

    probs = torch.tensor([[0.0, 0.3, 0.0, 0.7, 0.0]] * 4, dtype=torch.float64)  # [4, 5]
    u = torch.tensor([0.0, 0.3 - 1e-12, 0.3, 1 - 2**-53], dtype=torch.float64)  # [4] (the last: largest below 1)
    assert inverse_cdf(probs, u).tolist() == [1, 1, 3, 3]
    # a softmax whose sum rounded below 1: u past the sum still draws the last token of positive probability
    rounded = torch.tensor([[0.5, 0.5 - 1e-9, 0.0]], dtype=torch.float64)
    assert inverse_cdf(rounded, torch.tensor([1 - 2**-53], dtype=torch.float64)).tolist() == [1]


def test_the_same_uniforms_couple_a_policy_with_itself_and_with_a_slightly_moved_one(enumerated_step):
    from probe.batch import collate
    from probe.overrides import base_statistics
    from probe.realised import identical_fraction, realised_change

    from enumeration import FORCING, LR

    world, update, _ = enumerated_step
    old = draw(world.model, N_PER_PROMPT, seed=11)
    assert identical_fraction(responses(old), responses(draw(world.model, N_PER_PROMPT, seed=11))) == 1.0
    # a hundredth of the world's real step (which changes H by +0.66 nats): H changes by +0.0106 nats
    eta = LR / 100
    policy = moved(world.model, update.full, eta)
    new, unpaired = draw(policy, N_PER_PROMPT, seed=11), draw(policy, N_PER_PROMPT, seed=12)
    identical = identical_fraction(responses(old), responses(new))
    # measured: 99.1% of the rows unchanged with the same uniforms, 15% (chance) with others
    assert identical > 0.95 and identical_fraction(responses(old), responses(unpaired)) < 0.3
    exact = world.entropy_along(update.full, eta) - world.entropy()
    at_old = base_statistics(world.model, collate(old, pad_token_id=0), FORCING)
    at_new = base_statistics(policy, collate(new, pad_token_id=0), FORCING)
    # measured here (uniforms' seeds 11 and 20 .. 29): se_independent / se 15.7 .. 35 (token_entropy), 13.8 .. 19.8
    # (logprob); |exact| / se 32 .. 74 and 5.9 .. 8.3; |z| against the exact change <= 2.08
    for integrand, gain, resolved in (("token_entropy", 10, 20), ("logprob", 8, 3)):
        r = realised_change(at_old, at_new, integrand, pairing="common_random_numbers", identical=identical)
        assert abs(r.delta_h - exact) < 4 * r.se, (integrand, r, exact)  # unbiased, and its SE is honest
        assert r.se_gain > gain and abs(exact) > resolved * r.se  # resolved; independent samples would not be
        assert r.delta_h == pytest.approx(r.new["mean"] - r.old["mean"], abs=1e-12)  # the estimate: a difference of
        assert r.se_independent == pytest.approx(math.hypot(r.old["se"], r.new["se"]))  # means; only the SE differs


# ---- the paired statistics ------------------------------------------------------------------------------------


def stats(h: list[float], lengths: list[float]):
    from probe.statistics import SequenceStats

    h_, T = torch.tensor(h, dtype=torch.float64), torch.tensor(lengths, dtype=torch.float64)
    return SequenceStats(logprobs=-h_, entropies=h_, lengths=T)


def test_the_paired_se_is_that_of_the_row_differences_and_one_row_has_none():
    from probe.realised import realised_change

    old, new = stats([1.0, 2.0, 4.0, 3.0], [2, 2, 2, 2]), stats([1.5, 2.0, 5.0, 3.0], [2, 2, 2, 2])
    r = realised_change(old, new, "token_entropy", pairing="common_random_numbers", identical=0.5)
    d = torch.tensor([0.5, 0.0, 1.0, 0.0], dtype=torch.float64)
    assert r.delta_h == pytest.approx(0.375) and r.se == pytest.approx(float(d.std() / 2))
    # equal lengths: the per-token change and its SE are the sequence's divided by the length
    assert r.delta_h_per_token == pytest.approx(0.375 / 2) and r.se_per_token == pytest.approx(r.se / 2)
    assert r.pairing == "common_random_numbers" and r.identical_fraction == 0.5
    assert r.se_gain == pytest.approx(r.se_independent / r.se)
    independent = realised_change(old, new, "token_entropy")
    assert independent.se == pytest.approx(math.hypot(independent.old["se"], independent.new["se"]))
    assert independent.se == pytest.approx(r.se_independent) and independent.se_gain == pytest.approx(1.0)
    assert independent.identical_fraction is None and independent.delta_h == pytest.approx(r.delta_h)
    one = realised_change(stats([1.0], [1]), stats([2.0], [1]), "token_entropy", pairing="common_random_numbers")
    assert one.delta_h == 1.0 and math.isnan(one.se) and math.isnan(one.se_per_token)  # no SE of one row, never 0
    with pytest.raises(ValueError, match="one new row per old row, got 4 old and 1 new"):
        realised_change(old, stats([2.0], [1]), "token_entropy", pairing="common_random_numbers")


def test_the_per_token_se_takes_the_changed_lengths_into_account():
    from probe.realised import paired_ratio_difference_and_se

    # rows whose length changed: the delta method over (h_new, T_new, h_old, T_old) jointly, checked against the
    # spread of the estimate over many paired samples of a model of such rows
    gen = torch.Generator().manual_seed(0)
    R, K = 400, 2000
    T_old = torch.randint(1, 5, (K, R), generator=gen).double()  # [K, R]
    h_old = T_old * (0.5 + 0.3 * torch.rand(K, R, generator=gen, dtype=torch.float64))
    changed = torch.rand(K, R, generator=gen) < 0.1  # 10% of the rows change their response
    T_new = torch.where(changed, torch.randint(1, 5, (K, R), generator=gen).double(), T_old)
    h_new = torch.where(changed, T_new * (0.6 + 0.3 * torch.rand(K, R, generator=gen, dtype=torch.float64)), h_old)
    estimates = [paired_ratio_difference_and_se(h_old[k], T_old[k], h_new[k], T_new[k]) for k in range(K)]
    spread = torch.tensor([e for e, _ in estimates]).std()
    mean_se = sum(se for _, se in estimates) / K
    assert mean_se == pytest.approx(float(spread), rel=0.1)  # the delta method's SE is the estimate's spread


# ---- the live probe's settings ----------------------------------------------------------------------------------


def test_the_live_settings_name_their_choices():
    from probe.live import LiveEvalSettings, LiveProbe, LiveProbeSettings

    with pytest.raises(ValueError, match="realised_pairing 'paired'; choose one of common_random_numbers, independent"):
        LiveEvalSettings(realised_pairing="paired")
    with pytest.raises(ValueError, match=r"unknown part\(s\) \['gradient'\] in parts; choose from full, baseline"):
        LiveProbeSettings(parts=["full", "gradient"])
    with pytest.raises(ValueError, match="leaves out 'full', the real step"):
        LiveProbeSettings(parts=["grad"])
    settings = LiveProbeSettings(parts=["grad", "full", "grad"])
    assert LiveProbe(settings).plan(1e-3, with_attribution=False).parts == ("full", "grad")
    assert LiveProbe(LiveProbeSettings()).plan(1e-3, with_attribution=False).parts == ("full",)


def test_a_held_evaluation_batch_from_a_file_gives_the_realised_check_its_prompts():
    from probe.batch import collate
    from probe.live import distinct_prompts

    rows = [([1, 5, 6], [7, 2]), ([1, 4], [3]), ([1, 5, 6], [9, 9, 2]), ([1, 4], [2])]
    for side in ("left", "right"):
        E = collate([{"prompt_ids": p, "response_ids": r} for p, r in rows], pad_token_id=0, padding_side=side)
        assert distinct_prompts(E) == [[1, 5, 6], [1, 4]]


# ---- a live GRPO fit on the toy world -------------------------------------------------------------------------


def test_the_paired_realised_change_resolves_single_steps_and_agrees_with_the_prediction(tmp_path: Path, run_fit):
    # Three GRPO steps at lr 2e-5 from the toy world (float32), each predicted on E = 32 prompts x 32 and measured
    # on 32 x 128 rows of pi_old and pi_new drawn with the same uniforms. Measured over 12 run seeds (the rollouts)
    # with E's seed = run seed + 1, 36 steps: 97-99% of the rows unchanged by a step; se_independent / se 8.1 .. 27
    # (median 13); |z_snis| <= 2.31; delta_h / se -1.5 .. -10.2, its largest |.| over a run's three steps >= 6.1.
    # At lr 3e-5 (48 steps): ratio >= 6.3, |z| <= 2.47. Two independent samples of these sizes have an SE of
    # ~0.006, more than the changes (0.0006 .. 0.005): they would resolve none
    E = eval_arg(32, 32, seed=1, realised_n_per_prompt=128, realised_pairing="common_random_numbers")
    settings = probe(every_n_steps=1, second_order=False, attribution=False, eta_factors="[1.0]", eval=E)
    steps = flags({"trainer.max_steps": 3, "model.init_args.optimizer.lr": 2e-5})
    run = run_fit(tmp_path, "paired", *QUIET, *steps, *settings)
    recs = records(run)
    assert [r["step"] for r in recs] == [0, 1, 2]
    for r in recs:
        x, full = r["realised"], r["eval"]["parts"]["full"]
        assert x["pairing"] == "common_random_numbers" and x["old"]["n"] == x["new"]["n"] == 32 * 128
        assert 0.9 < x["identical_fraction"] < 1.0
        assert x["se_independent"] == pytest.approx(math.hypot(x["old"]["se"], x["new"]["se"]))
        assert x["se_independent"] / x["se"] >= 5, x
        assert x["old"]["mean"] != r["eval"]["base_entropy"]["sequence"]  # pi_old's own sample, independent of E
        assert x["z"]["snis"] == pytest.approx((full["delta_h"][0] - x["delta_h"]) / math.hypot(x["se"], full["se"][0]))
        assert abs(x["z"]["snis"]) < 3, (r["step"], full["delta_h"], full["se"], x)
    assert max(abs(r["realised"]["delta_h"]) / r["realised"]["se"] for r in recs) > 3, "no step resolved: no test"
