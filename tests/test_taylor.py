"""First- and second-order predictions (probe.taylor) against the SNIS estimate, finite
differences and the exact derivative of the enumerated entropy (tests/enumeration.py).

Everything is float64 (exact float64 RMSNorm, SDPA math kernel for the JVPs), so the
identities that hold exactly in arithmetic are checked to ~1e-6 relative or tighter.
"""

from __future__ import annotations

import json
import math
from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F

from probe.overrides import sweep
from probe.snis import SNISConfig, snis_estimate
from probe.statistics import INTEGRANDS
from probe.taylor import SecondOrder, first_order, nested_forward_ad, sequence_derivatives, snis_derivatives

from enumeration import FORCING, LR
from support import first_order_prediction, second_order_prediction


@pytest.fixture(scope="module")
def setup(enumerated_step):
    world, update, _ = enumerated_step  # the step at lr 1e-2 = LR
    E_small = world.sample(150, seed=11)  # M = 300: identities that hold on any sample
    return world, update, E_small


@pytest.fixture(scope="module")
def second_orders(setup):
    world, update, E = setup
    return {part: second_order_prediction(world.model, E, d, FORCING) for part, d in update.parts().items()}


def test_first_order_is_the_small_eta_limit_of_the_snis_estimate(setup):
    world, update, E = setup
    eta = 1e-8  # curvature term eta |F''| / 2|F'| <~ 2e-7; float64 rounding of lambda_j / eta ~ 1e-8
    for part, d in update.parts().items():
        swept = sweep(world.model, E, {part: d}, [eta], FORCING)
        slopes = first_order_prediction(world.model, E, d, FORCING)
        for name in INTEGRANDS:
            r = snis_estimate(swept.base, swept.at(part, 0), integrand=name, eta=eta)
            s = slopes[name]
            assert abs(r.delta_entropy / eta - s.slope) <= 1e-6 * abs(s.slope), (part, name)
            tolerance_tok = 1e-6 * abs(s.slope_per_token)
            assert abs(r.delta_entropy_per_token / eta - s.slope_per_token) <= tolerance_tok, (part, name)


def test_first_order_is_within_three_standard_errors_of_the_exact_derivative(setup):
    world, update, _ = setup
    E = world.sample(1000, seed=12)  # M = 2000
    eps = 1e-6  # central difference of the exact entropy: error ~ eps^2 |H'''| / 6, far below the SEs
    for part, d in update.parts().items():
        exact = (world.summary(world.shifted(d, eps)), world.summary(world.shifted(d, -eps)))
        slope = (exact[0]["entropy"] - exact[1]["entropy"]) / (2 * eps)
        slope_tok = (exact[0]["per_token"] - exact[1]["per_token"]) / (2 * eps)
        for name, s in first_order_prediction(world.model, E, d, FORCING).items():
            assert abs(s.slope - slope) <= 3 * s.slope_se, (part, name, s.slope, slope, s.slope_se)
            assert abs(s.slope_per_token - slope_tok) <= 3 * s.slope_per_token_se, (part, name)


def test_sequence_derivatives_match_central_finite_differences_of_teacher_forcing(setup):
    world, update, E = setup
    d = update.grad
    eps = 1e-6  # float64: truncation ~ eps^2 |l'''| / 6 ~ 1e-8, rounding ~ 1e-16 |l| / eps ~ 1e-9
    derivs = sequence_derivatives(world.model, E, d, FORCING, order=2)
    plus = sequence_derivatives(world.model, E, d, FORCING, order=1, eta=eps)
    minus = sequence_derivatives(world.model, E, d, FORCING, order=1, eta=-eps)
    for field in ("logprobs", "entropies"):
        fd_first = (getattr(plus.value, field) - getattr(minus.value, field)) / (2 * eps)
        fd_second = (getattr(plus.first, field) - getattr(minus.first, field)) / (2 * eps)
        torch.testing.assert_close(getattr(derivs.first, field), fd_first, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(getattr(derivs.second, field), fd_second, rtol=1e-6, atol=1e-6)


def test_nested_jvp_first_derivative_equals_the_closed_form(setup, second_orders):
    world, update, E = setup
    for part, d in update.parts().items():
        closed = first_order_prediction(world.model, E, d, FORCING)
        for name in INTEGRANDS:
            nested = second_orders[part][name]
            assert nested.eta == 0 and nested.delta_entropy == 0
            assert nested.first == pytest.approx(closed[name].slope, rel=1e-12)
            assert nested.first_per_token == pytest.approx(closed[name].slope_per_token, rel=1e-12)


def test_second_derivative_matches_a_finite_difference_of_the_first(setup, second_orders):
    world, update, E = setup
    eps = 1e-6  # truncation ~ eps^2 |F''''| / 6 |F''| ~ 1e-8; rounding of F' / eps ~ 1e-9
    for part, d in update.parts().items():
        plus = second_order_prediction(world.model, E, d, FORCING, eta=eps, order=1)
        minus = second_order_prediction(world.model, E, d, FORCING, eta=-eps, order=1)
        for name in INTEGRANDS:
            s = second_orders[part][name]
            fd = (plus[name].first - minus[name].first) / (2 * eps)
            fd_tok = (plus[name].first_per_token - minus[name].first_per_token) / (2 * eps)
            assert fd == pytest.approx(s.second, rel=1e-6), (part, name)
            assert fd_tok == pytest.approx(s.second_per_token, rel=1e-6), (part, name)
            assert math.isnan(plus[name].second)  # order=1 does not pretend to know F''


def test_second_order_prediction_leaves_a_third_order_residual(setup, second_orders):
    world, update, E = setup
    etas = [2e-5, 1e-5]
    for part, d in update.parts().items():
        swept = sweep(world.model, E, {part: d}, etas, FORCING)
        for name in INTEGRANDS:
            s = second_orders[part][name]
            estimates = [
                snis_estimate(swept.base, swept.at(part, k), integrand=name).delta_entropy for k in range(len(etas))
            ]
            linear_gap = [estimate - s.first * eta for estimate, eta in zip(estimates, etas)]
            residual = [estimate - s.predict(eta) for estimate, eta in zip(estimates, etas)]
            # the quadratic term accounts for the departure from linearity to within 3% (measured <= 1%) ...
            assert abs(residual[0]) <= 0.03 * abs(linear_gap[0])
            # ... and what is left shrinks like eta^3 (ratio 8 when eta halves)
            assert 7.5 < residual[0] / residual[1] < 8.5, (part, name, residual)  # measured 7.998 .. 8.003


def test_expansion_at_a_nonzero_eta_reproduces_the_snis_estimate_there(setup):
    world, update, E = setup
    eta = 0.5 * LR
    swept = sweep(world.model, E, {"full": update.full}, [eta], FORCING)
    at_eta = second_order_prediction(world.model, E, update.full, FORCING, eta=eta, order=1, base=swept.base)
    for name in INTEGRANDS:
        r = snis_estimate(swept.base, swept.at("full", 0), integrand=name, eta=eta)
        assert at_eta[name].delta_entropy == pytest.approx(r.delta_entropy, abs=1e-12)
        assert at_eta[name].delta_entropy_per_token == pytest.approx(r.delta_entropy_per_token, abs=1e-12)


def test_linear_radius_is_where_the_quadratic_term_is_a_tenth_of_the_linear_one(second_orders):
    for by_integrand in second_orders.values():
        for s in by_integrand.values():
            r = s.linear_radius
            assert 0.5 * abs(s.second) * r * r == pytest.approx(0.1 * abs(s.first) * r, rel=1e-12)
            r_tok = s.linear_radius_per_token
            linear_tok = 0.1 * abs(s.first_per_token) * r_tok
            assert 0.5 * abs(s.second_per_token) * r_tok**2 == pytest.approx(linear_tok, rel=1e-12)
    flat = SecondOrder("logprob", "global", 0.0, 0.0, 1.0, 0.0, math.inf, 0.0, 1.0, 0.0, math.inf)
    assert json.loads(json.dumps(flat.to_dict()))["linear_radius"] is None  # strict JSON: no Infinity


def test_per_prompt_first_order_is_the_derivative_of_the_per_prompt_estimate(setup):
    world, update, E = setup
    eta = 1e-8
    swept = sweep(world.model, E, {"grad": update.grad}, [eta], FORCING)
    derivs = sequence_derivatives(world.model, E, update.grad, FORCING, order=2)
    config = SNISConfig(normalisation="per_prompt")
    for name in INTEGRANDS:
        s = first_order(derivs, name, groups=E.group)
        r = snis_estimate(swept.base, swept.at("grad", 0), integrand=name, eta=eta, config=config, groups=E.group)
        assert abs(r.delta_entropy / eta - s.slope) <= 1e-6 * abs(s.slope)
        assert abs(r.delta_entropy_per_token / eta - s.slope_per_token) <= 1e-6 * abs(s.slope_per_token)
        nested = snis_derivatives(derivs, derivs.value, name, groups=E.group)
        assert nested.first == pytest.approx(s.slope, rel=1e-12)
        assert float(s.contributions.sum()) == pytest.approx(s.slope, rel=1e-12)


def test_chunking_over_sequences_does_not_change_the_derivatives(setup):
    world, update, E = setup
    whole = sequence_derivatives(world.model, E, update.full, FORCING, order=2)
    chunked = sequence_derivatives(world.model, E, update.full, replace(FORCING, batch_size=77), order=2)
    for a, b in ((whole.first, chunked.first), (whole.second, chunked.second)):
        torch.testing.assert_close(a.logprobs, b.logprobs, rtol=1e-10, atol=1e-10)
        torch.testing.assert_close(a.entropies, b.entropies, rtol=1e-10, atol=1e-10)


def test_nested_forward_ad_swaps_silu_only_inside_and_keeps_its_values():
    original = F.silu
    x = torch.linspace(-6, 6, 101, dtype=torch.float64)
    with nested_forward_ad():
        assert F.silu is not original
        torch.testing.assert_close(F.silu(x), original(x), rtol=1e-15, atol=1e-15)
    assert F.silu is original
    with pytest.raises(RuntimeError, match="boom"), nested_forward_ad():
        raise RuntimeError("boom")
    assert F.silu is original


def test_first_order_refuses_derivatives_taken_away_from_eta_zero(setup):
    world, update, E = setup
    derivs = sequence_derivatives(world.model, E.select(range(10)), update.grad, FORCING, eta=1e-3)
    with pytest.raises(ValueError, match="eta = 0"):
        first_order(derivs, "logprob")
    with pytest.raises(ValueError, match="order"):
        sequence_derivatives(world.model, E, update.grad, FORCING, order=3)
