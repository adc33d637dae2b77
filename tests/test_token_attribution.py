"""Per-token attribution (probe.update.per_token_inner_products, probe.attribution.attribute): the JVP over U kept at
token resolution. Every sequence's token attributions add up to its own attribution, computed by an independent JVP
of the per-sequence loss, to 1e-12 in float64, under the on-policy loss and under PPO-clip with tokens clipped (whose
attribution is exactly 0). Float64, on the enumerated world (tests/enumeration.py).
"""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from probe.attribution import AttributionInputs, attribute, eval_gradient
from probe.losses import normalisers
from probe.update import per_sequence_inner_products, per_token_inner_products, reconstruct_update

from enumeration import FORCING, EnumeratedWorld, adamw_after_two_steps, tiny_model

AGG_MODES = ("seq-mean-token-mean", "token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm")


def assert_sums_to_sequences(tokens, per_sequence: torch.Tensor) -> None:
    """sum_t a_it = a_i for every sequence, to 1e-12 of |a_i| (and of the largest |a_i| for a_i near 0)."""
    summed = tokens.per_sequence()
    scale = float(per_sequence.abs().max())
    assert scale > 0
    torch.testing.assert_close(summed, per_sequence, rtol=1e-12, atol=1e-13 * scale)
    assert torch.all(tokens.values[~tokens.mask] == 0), "no attribution off the response"


@pytest.fixture(scope="module")
def ppo_step():
    """An AdamW step reconstructed from a PPO-clip loss whose old log-probs put a third of U's tokens outside the clip
    range, with an eval gradient G_E to attribute."""
    world = EnumeratedWorld(tiny_model(seed=3))
    optimizer, U, cfg = adamw_after_two_steps(world, n_per_prompt=8)
    from probe.logprobs import teacher_force

    with torch.no_grad():
        logprobs = teacher_force(world.model, U, forcing=FORCING).logprobs
    noise = torch.linspace(-0.45, 0.45, logprobs.numel(), dtype=torch.float64).reshape(logprobs.shape)
    noise = noise[:, torch.randperm(noise.shape[1], generator=torch.Generator().manual_seed(0))]
    U = replace(U, old_logprobs=(logprobs + noise) * U.target_mask)
    cfg = replace(cfg, use_old_logprobs=True, clip_ratio=0.2)
    update = reconstruct_update(world.model, optimizer, U, cfg)
    E = world.sample(40, seed=5)
    G = eval_gradient(AttributionInputs(world.model, update, U, E, FORCING))
    return world, update, U, E, G


def test_token_attributions_add_up_to_each_sequences_attribution(enumerated_step):
    world, update, U = enumerated_step
    E = world.sample(60, seed=11)
    for integrand in ("token_entropy", "logprob"):
        G = eval_gradient(AttributionInputs(world.model, update, U, E, FORCING, integrand))
        tokens = per_token_inner_products(world.model, update, U, G)
        assert_sums_to_sequences(tokens, per_sequence_inner_products(world.model, update, U, G))
        assert tokens.values.shape == U.target_mask.shape and tokens.values.dtype == torch.float64
        assert (tokens.values[tokens.mask] != 0).float().mean() > 0.9, "the tokens of a sequence share its attribution"


@pytest.mark.parametrize("agg_mode", AGG_MODES)
def test_token_attributions_add_up_under_every_aggregation_mode(enumerated_step, agg_mode):
    world, update, U = enumerated_step
    loss = replace(update.loss, agg_mode=agg_mode)
    update = replace(update, loss=loss, normalisers=normalisers(U.target_mask, loss))
    G = eval_gradient(AttributionInputs(world.model, update, U, world.sample(20, seed=12), FORCING))
    tokens = per_token_inner_products(world.model, update, U, G, microbatch_size=5)
    assert_sums_to_sequences(tokens, per_sequence_inner_products(world.model, update, U, G))


def test_under_ppo_clip_clipped_tokens_contribute_nothing_and_the_rest_add_up(ppo_step):
    world, update, U, _, G = ppo_step
    tokens = per_token_inner_products(world.model, update, U, G)
    assert_sums_to_sequences(tokens, per_sequence_inner_products(world.model, update, U, G))
    # the clip holds a token where its clipped term is the larger one: ratio beyond 1 + eps with A > 0, below
    # 1 - eps with A < 0; its loss term is then a constant of theta
    ratio = torch.exp(tokens.logprobs - U.old_logprobs) * tokens.mask
    A = U.advantages[:, None]
    held = tokens.mask & (((ratio > 1.2) & (A > 0)) | ((ratio < 0.8) & (A < 0)))
    free = tokens.mask & ~held & (A != 0)
    assert held.sum() >= 5 and free.sum() >= 5, "the fixture clips some tokens and leaves others"
    assert torch.all(tokens.values[held] == 0)
    assert torch.all(tokens.values[free] != 0)
    assert update.ppo_clip["clipped_fraction"] == pytest.approx(float(held.sum() / tokens.mask.sum()))


def test_the_attribution_keeps_its_tokens_and_flattens_them_response_after_response(ppo_step):
    world, update, U, E, _ = ppo_step
    result = attribute(AttributionInputs(world.model, update, U, E, FORCING), check=False)
    flat = result.tokens.flat()
    offsets = flat["offsets"]
    assert offsets[0] == 0 and offsets[-1] == int(U.target_mask.sum()) == len(flat["values"])
    for i in range(len(U)):
        torch.testing.assert_close(
            flat["values"][offsets[i] : offsets[i + 1]].sum(), result.attributions[i], rtol=1e-12, atol=1e-15
        )
    assert torch.equal(result.attributions, result.tokens.per_sequence())
