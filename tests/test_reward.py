"""The change of E's expected reward (probe.engine: ``EvalResult.reward``) and its attribution r_i to the sequences of
U, against the truth: exact enumeration of the tiny world's responses (tests/enumeration.py), each sequence's own
direction v_i, and the gradient part's first order. Float64 throughout.

A reward does not depend on theta, so it is the entropy's SNIS with h_j = r_j fixed: only the importance weights move.
"""

from __future__ import annotations

import json
import math
from dataclasses import replace

import pytest
import torch

from probe.engine import EvalBatch, Plan, probe_eval
from probe.results import metrics
from probe.snis import SNISConfig
from probe.taylor import sequence_derivatives
from probe.update import per_sequence_directions

from enumeration import EOS, FORCING, LR

ETAS = (0.3 * LR, LR, 3 * LR)


def count_of_ones(tokens) -> float:
    """The world's reward: how many 1s the response holds (EOS excluded)."""
    return float(sum(1 for t in tokens if t == 1))


def with_rewards(E):
    """E with each sequence's reward (the 1s among its response tokens)."""
    rewards = [count_of_ones(ids[mask].tolist()) for ids, mask in zip(E.input_ids, E.response_mask)]
    return replace(E, rewards=torch.tensor(rewards, dtype=torch.float64))


def exact_reward(world, params=None) -> float:
    """sum_r p(r | x) R(r), averaged over the prompts (E holds as many samples of each)."""
    R = torch.tensor([count_of_ones([t for t in r if t != EOS]) for r in world.responses], dtype=torch.float64)
    return float((world.log_probs(params).exp() * R).sum(-1).mean())


@pytest.fixture(scope="module")
def probed(enumerated_step):
    world, update, U = enumerated_step
    E = with_rewards(world.sample(800, seed=31))  # M = 1600
    plan = Plan(
        parts=("full", "baseline", "grad"),
        etas=ETAS,
        lr=LR,
        reference_eta=LR,
        integrand="token_entropy",
        snis=SNISConfig(),
        reward=True,
        batch_size=None,
    )
    result, _ = probe_eval(world.model, update, U, EvalBatch("eval_00", E, temperature=1.0), plan)
    return world, update, U, E, plan, result


def test_the_snis_reward_change_is_within_three_standard_errors_of_enumeration(probed):
    world, update, _, _, _, result = probed
    base = exact_reward(world)
    assert result.reward["base"] == pytest.approx(base, abs=3 * result.reward["base_se"])
    for part, res in result.reward["parts"].items():
        for j, eta in enumerate(ETAS):
            exact = exact_reward(world, world.shifted(update.parts()[part], eta)) - base
            assert abs(res["delta_r"][j] - exact) <= 3 * res["se"][j], (part, eta, res["delta_r"][j], exact)
            assert res["se"][j] > 0 and math.isfinite(res["se"][j])


def test_the_first_order_reward_slope_is_within_three_standard_errors_of_the_exact_derivative(probed):
    world, update, _, _, _, result = probed
    h = 1e-4  # central difference of the exact expected reward: O(h^2) = 1e-8 relative
    for part, res in result.reward["parts"].items():
        d = update.parts()[part]
        exact = (exact_reward(world, world.shifted(d, h)) - exact_reward(world, world.shifted(d, -h))) / (2 * h)
        assert abs(res["first_order"] - exact) <= 3 * res["first_order_se"], (part, res["first_order"], exact)
        assert res["predicted_first"] == pytest.approx([res["first_order"] * e for e in ETAS], rel=1e-12)


def test_reward_attributions_add_up_to_the_gradient_parts_first_order_reward_change(probed):
    *_, result = probed
    check = result.reward["attribution"]
    assert check["ok"] and check["scaled_difference"] < 1e-10  # float64; measured ~1e-16
    assert check["sum"] == pytest.approx(result.reward["parts"]["grad"]["first_order"], rel=1e-10)
    assert result.arrays["reward_attributions"].sum() == pytest.approx(check["sum"], rel=1e-12)


def test_each_reward_attribution_is_the_first_order_reward_change_along_its_own_direction(probed):
    world, update, U, E, _, result = probed
    r = E.rewards - E.rewards.mean()
    for i, v_i in per_sequence_directions(world.model, update, U, indices=[0, 5, 11]):
        l_prime = sequence_derivatives(world.model, E, v_i, FORCING, order=1).first.logprobs  # [M]
        explicit = float((l_prime * r).mean())  # (1/M) sum_j l'_j (r_j - rbar)
        assert result.arrays["reward_attributions"][i] == pytest.approx(explicit, rel=1e-9, abs=1e-12)


def test_reward_token_attributions_add_up_to_each_sequences(probed):
    *_, result = probed
    offsets, r_t = result.arrays["update_tokens/offsets"], result.arrays["update_tokens/reward_attributions"]
    summed = [r_t[offsets[i] : offsets[i + 1]].sum() for i in range(len(offsets) - 1)]
    assert summed == pytest.approx(list(result.arrays["reward_attributions"]), rel=1e-12, abs=1e-15)


def test_the_reward_results_serialise_and_are_logged(probed):
    *_, plan, result = probed
    data = json.loads(json.dumps(result.to_dict()))
    assert set(data["reward"]["parts"]) == {"full", "baseline", "grad"}
    assert len(data["reward"]["parts"]["full"]["delta_r"]) == len(ETAS)
    logged = metrics(result, list(plan.etas), plan.lr)
    assert logged["eval_00/reward/full/delta_r@lr"] == result.reward["parts"]["full"]["delta_r"][1]
    assert logged["eval_00/reward/grad/first_order"] == result.reward["parts"]["grad"]["first_order"]


def test_an_eval_batch_without_rewards_has_no_reward_result(probed):
    world, update, U, E, plan, _ = probed
    result, _ = probe_eval(
        world.model, update, U, EvalBatch("eval_00", replace(E.select(range(40)), rewards=None), 1.0), plan
    )
    assert result.reward is None and "reward_attributions" not in result.arrays
