"""Per-update-sequence attribution (probe.attribution) against the first-order prediction
along each materialised direction v_i, the two routes to the eval x update matrix, the
exact SNIS path and enumeration (tests/enumeration.py). Float64 throughout.
"""

from __future__ import annotations

import json

import pytest
import torch

from probe.attribution import AttributionInputs, attribute, eval_update_matrix, per_sequence_exact
from probe.statistics import INTEGRANDS
from probe.taylor import first_order, sequence_derivatives
from probe.update import per_sequence_directions

from enumeration import FORCING, LR
from support import first_order_prediction


@pytest.fixture(scope="module")
def setup(enumerated_step):
    world, update, U = enumerated_step  # the step at lr 1e-2 = LR
    E = world.sample(150, seed=21)  # M = 300
    directions = dict(per_sequence_directions(world.model, update, U))  # row -> v_i (N = 12)
    return world, update, U, E, directions


def test_attributions_sum_to_the_first_order_change_of_the_gradient_part(setup):
    world, update, U, E, _ = setup
    for name in INTEGRANDS:
        result = attribute(AttributionInputs(world.model, update, U, E, FORCING, name))
        slope = first_order_prediction(world.model, E, update.grad, FORCING, integrands=[name])[name].slope
        assert result.attributions.shape == (len(U),)
        assert result.total == pytest.approx(slope, rel=1e-8)  # measured ~1e-15
        assert result.first_order_grad == pytest.approx(slope, rel=1e-12)
        assert result.relative_gap < 1e-8


def test_each_attribution_equals_the_first_order_change_along_its_own_direction(setup):
    world, update, U, E, directions = setup
    for name in INTEGRANDS:
        a = attribute(AttributionInputs(world.model, update, U, E, FORCING, name), check=False).attributions
        explicit = torch.tensor(
            [
                first_order_prediction(world.model, E, directions[i], FORCING, integrands=[name])[name].slope
                for i in range(len(U))
            ],
            dtype=torch.float64,
        )
        torch.testing.assert_close(a, explicit, rtol=1e-8, atol=1e-10 * float(explicit.abs().max()))
        # the v_i really are the parts of the gradient step
        total = {n: sum(directions[i][n] for i in range(len(U))) for n in update.grad}
        for n, g in update.grad.items():
            torch.testing.assert_close(total[n], g, rtol=1e-10, atol=1e-12)


def test_eval_update_matrix_is_the_same_by_every_route(setup):
    world, update, U, E, _ = setup
    E_few = E.select(range(6))  # M = 6 < N = 12
    for name in INTEGRANDS:
        few = AttributionInputs(world.model, update, U, E_few, FORCING, name)
        reverse = eval_update_matrix(few, method="reverse")
        forward = eval_update_matrix(few, method="forward")
        assert reverse.shape == (6, len(U))
        scale = float(reverse.abs().max())
        torch.testing.assert_close(reverse, forward, rtol=0, atol=1e-10 * scale)
        # columns sum to the attributions on the same E, rows to each eval sequence's first-order term
        a = attribute(few, check=False).attributions
        torch.testing.assert_close(reverse.sum(0), a, rtol=0, atol=1e-10 * scale)
        derivs = sequence_derivatives(world.model, E_few, update.grad, FORCING, order=1)
        torch.testing.assert_close(reverse.sum(1), first_order(derivs, name).contributions, rtol=0, atol=1e-10 * scale)
        auto = eval_update_matrix(few)
        torch.testing.assert_close(auto, reverse, rtol=0, atol=1e-10 * scale)
        per_sample = eval_update_matrix(few, method="per_sample", chunk_size=4)
        torch.testing.assert_close(per_sample, reverse, rtol=0, atol=1e-10 * scale)
        by_routes = eval_update_matrix(few, memory_budget=0)
        torch.testing.assert_close(by_routes, reverse, rtol=0, atol=1e-10 * scale)


def test_exact_per_sequence_changes_approach_eta_times_the_attribution(setup):
    world, update, U, E, _ = setup
    eta = 1e-8
    rows = [0, 7]
    a = attribute(AttributionInputs(world.model, update, U, E, FORCING), check=False).attributions
    for item in per_sequence_exact(AttributionInputs(world.model, update, U, E, FORCING), [eta], rows):
        alone = item.alone["token_entropy"][0].delta_entropy / eta
        mixed = item.mixed["token_entropy"][0].delta_entropy / eta
        # O(eta) curvature terms: relative departures ~1e-7 at eta = 1e-8
        assert alone == pytest.approx(float(a[item.index]), rel=1e-5)
        assert mixed == pytest.approx(float(a[item.index]), rel=1e-5)


def test_exact_per_sequence_changes_match_enumeration_at_the_real_step(setup):
    world, update, U, _, directions = setup
    E = world.sample(1000, seed=22)  # M = 2000
    results = per_sequence_exact(AttributionInputs(world.model, update, U, E, FORCING), [LR], [0, 7])
    for item in results:
        v = directions[item.index]
        b_plus_v = {n: update.baseline[n] + v[n] for n in update.baseline}
        exact_alone = world.entropy_along(v, LR) - world.entropy()
        exact_mixed = world.entropy_along(b_plus_v, LR) - world.entropy_along(update.baseline, LR)
        for name in INTEGRANDS:
            alone, mixed = item.alone[name][0], item.mixed[name][0]
            assert abs(alone.delta_entropy - exact_alone) <= 3 * alone.delta_entropy_se, (item.index, name)
            assert abs(mixed.delta_entropy - exact_mixed) <= 3 * mixed.delta_entropy_se, (item.index, name)
        json.dumps(item.to_dict())


def test_attribution_serialises_and_rejects_unknown_matrix_methods(setup):
    world, update, U, E, _ = setup
    result = attribute(AttributionInputs(world.model, update, U, E.select(range(20)), FORCING, "logprob"))
    data = json.loads(json.dumps(result.to_dict(per_sequence=True)))
    assert len(data["attributions"]) == len(U) and data["n_eval"] == 20
    with pytest.raises(ValueError, match="method"):
        eval_update_matrix(AttributionInputs(world.model, update, U, E, FORCING), method="sideways")
    with pytest.raises(ValueError, match="integrand"):
        AttributionInputs(world.model, update, U, E, FORCING, integrand="entropy")


def test_attribution_accepts_an_eval_batch_made_under_inference_mode(setup):
    # Lightning's predict loop builds batches under torch.inference_mode; autograd cannot save such tensors
    world, update, U, E, _ = setup
    E_few = E.select(range(20))
    with torch.inference_mode():
        E_inference = E_few.select(range(20))
    assert E_inference.input_ids.is_inference()
    a = attribute(AttributionInputs(world.model, update, U, E_inference, FORCING), check=False).attributions
    b = attribute(AttributionInputs(world.model, update, U, E_few, FORCING), check=False).attributions
    assert torch.equal(a, b)


def test_the_attribution_check_reads_the_difference_against_a_scale_that_cannot_cancel():
    from probe.verification import attribution_check

    # a real checkpoint: sum_i a_i = 0.49 nearly cancels against sum_i |a_i| = 166; the two routes differ by
    # 0.0186, 3.8e-2 of the sum but 1.1e-4 of the scale: float32 rounding, not a defect
    check = attribution_check(total=0.49, slope=0.49 + 0.0186, abs_sum=166.0, dtype=torch.float32)
    assert check == {"scaled_difference": pytest.approx(0.0186 / 166.0), "tolerance": 1e-3, "ok": True}
    # one of N equal shares missing on one side is a defect: caught for N = 64 in float64 and float32; half
    # precision's rounding allows 5e-2, so there the check catches one share of fewer than 20
    for dtype, n in ((torch.float64, 64), (torch.float32, 64), (torch.bfloat16, 16), (torch.bfloat16, 64)):
        share = 166.0 / n
        check = attribution_check(total=166.0 - share, slope=166.0, abs_sum=166.0 - share, dtype=dtype)
        assert check["ok"] == (dtype == torch.bfloat16 and n == 64), (dtype, n, check)
    assert attribution_check(0.0, 0.0, 0.0, torch.float64) == {"scaled_difference": 0.0, "tolerance": 1e-8, "ok": True}
