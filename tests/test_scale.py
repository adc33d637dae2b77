"""Real-size policies: a 151,936-token head within its memory budget, sweeps without a shifted copy of the
model, and the precision guards (docs/DESIGN.md section 8).

Memory is measured with ``probe.memory.TensorMemory`` (the bytes of the tensors a block creates and holds at
once), so the bounds hold on any machine; the numbers are compared in float64 against the plain float64 head
over the full ``[tokens, V]`` logits, the formula the chunked head replaces.
"""

from __future__ import annotations

import hashlib
import logging

import pytest
import torch
from transformers import Qwen2Config, Qwen2ForCausalLM

from probe.batch import SequenceBatch, collate
from probe.head import linear_head
from probe.loading import PolicySettings
from probe.logprobs import TeacherForcing, teacher_force
from probe.memory import TensorMemory
from probe.overrides import aligned_direction, base_parameters, iter_sweep, shifted_parameters, step_resolution
from probe.precision import exact_float64_norms
from probe.taylor import sequence_derivatives

QWEN_VOCAB = 151_936  # Qwen2.5's
MIB = 1 << 20


def qwen2(
    vocab_size: int = QWEN_VOCAB,
    dtype: torch.dtype = torch.float32,
    *,
    hidden_size: int = 32,
    intermediate_size: int = 64,
    num_hidden_layers: int = 2,
    tie_word_embeddings: bool = True,
    seed: int = 0,
) -> Qwen2ForCausalLM:
    """A Qwen2-shaped policy (tied embeddings by default) with a real-size vocabulary and a tiny body."""
    config = Qwen2Config(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_hidden_layers=num_hidden_layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        tie_word_embeddings=tie_word_embeddings,
        attn_implementation="sdpa",
    )
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = Qwen2ForCausalLM(config)
    model = model.to(dtype).eval()
    return exact_float64_norms(model) if dtype == torch.float64 else model


def random_batch(vocab: int, n: int, prompt: int = 6, response: int = 26, seed: int = 0) -> SequenceBatch:
    g = torch.Generator().manual_seed(seed)
    records = [
        {
            "prompt_ids": torch.randint(0, vocab, (prompt,), generator=g).tolist(),
            "response_ids": torch.randint(0, vocab, (response - (i % 5),), generator=g).tolist(),  # ragged
        }
        for i in range(n)
    ]
    return collate(records, pad_token_id=0)


def full_logits_head(model: torch.nn.Module, batch: SequenceBatch, temperature: float = 1.0):
    """The reference: the whole ``[B, T, V]`` logits, then log-softmax and entropy in float64 at once."""
    logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, position_ids=batch.position_ids)
    z = logits.logits[:, :-1][batch.target_mask].double() / temperature  # [N, V]
    lse = torch.logsumexp(z, -1)
    logp = z.gather(-1, batch.targets[batch.target_mask][:, None]).squeeze(-1) - lse
    return logp, lse - (torch.softmax(z, -1) * z).sum(-1)


def digest(model: torch.nn.Module) -> str:
    return hashlib.sha256(
        b"".join(p.detach().contiguous().view(torch.uint8).numpy().tobytes() for p in model.parameters())
    ).hexdigest()


@pytest.fixture(scope="module")
def wide() -> Qwen2ForCausalLM:
    return qwen2()


@pytest.fixture(scope="module")
def wide64() -> Qwen2ForCausalLM:
    return qwen2(dtype=torch.float64)


# ---------------------------------------------------------------------------------------------------------------
# the head


def test_a_plain_linear_head_is_recognised_and_others_fall_back_to_full_logits(wide, caplog):
    body, head = linear_head(wide)
    assert head is wide.lm_head and body is wide.model
    other = qwen2(vocab_size=64)
    other.config.model_type = "some_new_model"
    with caplog.at_level(logging.WARNING, logger="probe"):
        assert linear_head(other) is None
    assert "forms the full [tokens, vocabulary] logits" in caplog.text and "some_new_model" in caplog.text
    other.config.model_type = "qwen2"
    other.config.final_logit_softcapping = 30.0  # a head that is not lm_head(hidden) alone
    assert linear_head(other) is None


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_the_budgeted_head_equals_the_full_float64_head(wide64, temperature):
    batch = random_batch(QWEN_VOCAB, 6)
    logp, ent = full_logits_head(wide64, batch, temperature)
    for budget in (0.001, 8.0, 4096.0):  # one row per chunk, a few rows, everything at once
        forcing = TeacherForcing(temperature=temperature, with_entropy=True, head_budget_mib=budget)
        with torch.no_grad():
            ts = teacher_force(wide64, batch, forcing=forcing)
        torch.testing.assert_close(ts.logprobs[ts.mask], logp, rtol=0, atol=1e-12)
        torch.testing.assert_close(ts.entropies[ts.mask], ent, rtol=0, atol=1e-12)


def test_in_float32_the_chunked_head_agrees_with_the_full_head_to_float32_rounding_of_the_logits(wide):
    # the logits of a row depend in their last bits on which rows share its matmul; |z| ~ 1 here
    batch = random_batch(QWEN_VOCAB, 6)
    logp, ent = full_logits_head(wide, batch)
    with torch.no_grad():
        ts = teacher_force(wide, batch, forcing=TeacherForcing(with_entropy=True, head_budget_mib=4.0))
    torch.testing.assert_close(ts.logprobs[ts.mask], logp, rtol=0, atol=1e-5)
    torch.testing.assert_close(ts.entropies[ts.mask], ent, rtol=0, atol=1e-5)


@pytest.mark.parametrize("n_sequences", [4, 16])
def test_teacher_forcing_a_151936_token_vocabulary_stays_within_the_head_budget_whatever_the_tokens(wide, n_sequences):
    # the full logits of 16 x 32 tokens alone would be 311 MB in float32 and 622 MB in float64
    batch = random_batch(QWEN_VOCAB, n_sequences)
    budget = 16.0
    forcing = TeacherForcing(with_entropy=True, head_budget_mib=budget, batch_size=None)
    with torch.no_grad(), TensorMemory() as memory:
        teacher_force(wide, batch, forcing=forcing)
    assert memory.peak <= budget * MIB + 1 * MIB  # + the body's activations: [B, T, 32] floats


def test_under_a_jvp_and_a_jvp_of_a_jvp_the_head_stays_within_its_budget(wide):
    batch = random_batch(QWEN_VOCAB, 4, response=14)  # 42 tokens: several chunks at either order
    # (a JVP of a JVP carries 20 [V] float64 temporaries per row: 24 MB; a budget below one row is exceeded by it)
    forcing = TeacherForcing(with_entropy=True, head_budget_mib=64.0, batch_size=None)
    direction = {"model.layers.1.mlp.down_proj.weight": torch.randn_like(wide.model.layers[1].mlp.down_proj.weight)}
    for order in (1, 2):
        with TensorMemory() as memory:
            sequence_derivatives(wide, batch, direction, forcing, order=order)
        assert memory.peak <= 64 * MIB + 2 * MIB, (order, memory.peak_mib)


def test_a_backward_through_the_head_holds_one_chunk_not_the_tokens_logits(wide):
    batch = random_batch(QWEN_VOCAB, 16)
    name = "model.layers.1.mlp.down_proj.weight"
    leaf = {name: dict(wide.named_parameters())[name].detach().requires_grad_(True)}
    forcing = TeacherForcing(with_entropy=True, head_budget_mib=16.0, batch_size=None)
    with TensorMemory() as memory:
        with torch.enable_grad():
            ts = teacher_force(wide, batch, leaf, forcing)
            objective = ts.sequence_logprobs.sum() + ts.sequence_entropies.sum()
        torch.autograd.grad(objective, list(leaf.values()))
    assert memory.peak <= 16 * MIB + 2 * MIB, memory.peak_mib


def test_checkpointed_head_chunks_give_the_gradients_and_per_sequence_gradients_of_one_chunk():
    model = qwen2(vocab_size=300, dtype=torch.float64)
    batch = random_batch(300, 5)
    names = ["model.embed_tokens.weight", "model.layers.0.self_attn.q_proj.weight"]
    grads = {}
    for budget in (0.0001, 1024.0):  # one token per chunk vs all at once
        leaves = {n: dict(model.named_parameters())[n].detach().clone().requires_grad_(True) for n in names}
        forcing = TeacherForcing(with_entropy=True, head_budget_mib=budget, batch_size=None)
        with torch.enable_grad():
            ts = teacher_force(model, batch, leaves, forcing)
            per_sequence = torch.cat([ts.sequence_logprobs, ts.sequence_entropies])  # [2B]
        eye = torch.eye(per_sequence.shape[0], dtype=per_sequence.dtype)
        grads[budget] = torch.autograd.grad(
            per_sequence, list(leaves.values()), grad_outputs=eye, is_grads_batched=True
        )
    for small, large in zip(grads[0.0001], grads[1024.0]):
        torch.testing.assert_close(small, large, rtol=1e-12, atol=1e-14)


def test_the_first_order_at_a_151936_token_vocabulary_matches_float64_finite_differences(wide64):
    batch = random_batch(QWEN_VOCAB, 3, response=12)
    forcing = TeacherForcing(with_entropy=True, head_budget_mib=8.0)
    g = torch.Generator().manual_seed(1)
    direction = {
        n: torch.randn(p.shape, generator=g, dtype=p.dtype) * 0.1
        for n, p in wide64.named_parameters()
        if n.startswith("model.layers.1.") or n == "model.embed_tokens.weight"
    }
    derivs = sequence_derivatives(wide64, batch, direction, forcing, order=1)
    theta0, d = base_parameters(wide64, direction), aligned_direction(wide64, direction)
    h = 1e-4
    with torch.no_grad():
        plus = teacher_force(wide64, batch, shifted_parameters(theta0, d, h), forcing)
        minus = teacher_force(wide64, batch, shifted_parameters(theta0, d, -h), forcing)
    pairs = {
        "logprobs": (plus.sequence_logprobs, minus.sequence_logprobs),
        "entropies": (plus.sequence_entropies, minus.sequence_entropies),
    }
    for key, (up, down) in pairs.items():
        slope, fd = getattr(derivs.first, key), (up - down) / (2 * h)
        # central differences carry rounding ~ eps |f| / h (|f| ~ 140 nats: 3e-10 measured on the entropies, whose
        # slopes are 1e-4-1e-3 here) and truncation h^2 |f'''| / 6 (6e-7 on log-prob slopes of ~2.6: 2e-7 relative)
        rounding = 10 * torch.finfo(torch.float64).eps * up.abs() / h
        assert ((slope - fd).abs() <= 1e-6 * fd.abs() + rounding).all(), (key, slope, fd, rounding)


# ---------------------------------------------------------------------------------------------------------------
# sweeps without a shifted copy of the model


def reference_sweep(model, batch, directions, etas, forcing):
    """The sweep as functional_call over one shifted copy of the touched parameters (the former path)."""
    out = []
    with torch.no_grad():
        for chunk in batch.chunks(forcing.batch_size):
            for d in directions.values():
                theta0, aligned = base_parameters(model, d), aligned_direction(model, d)
                for eta in etas:
                    out.append(teacher_force(model, chunk, shifted_parameters(theta0, aligned, eta), forcing))
    return out


def lora_policy():
    from peft import LoraConfig, get_peft_model

    model = qwen2(vocab_size=300, tie_word_embeddings=False)
    peft = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"]))
    with torch.no_grad():
        for n, p in peft.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.02)  # a trained adapter: B != 0
    return peft.eval()


@pytest.mark.parametrize(
    "make",
    [
        pytest.param(lambda: qwen2(vocab_size=300), id="qwen2-tied"),
        pytest.param(lambda: qwen2(vocab_size=300, tie_word_embeddings=False), id="qwen2-untied"),
        pytest.param(lora_policy, id="lora"),
    ],
)
def test_a_layerwise_sweep_gives_the_numbers_of_a_shifted_copy_bit_for_bit_and_restores_theta(make):
    model = make()
    batch = random_batch(300, 6)
    g = torch.Generator().manual_seed(2)
    trained = {n: p for n, p in model.named_parameters() if p.requires_grad}
    directions = {
        part: {n: torch.randn(p.shape, generator=g) * 0.02 for n, p in trained.items()} for part in ("full", "grad")
    }
    forcing = TeacherForcing(with_entropy=True, batch_size=4)
    before = digest(model)
    swept = [item.stats for item in iter_sweep(model, batch, directions, [0.3, 3.0], forcing) if item.part is not None]
    assert digest(model) == before
    reference = reference_sweep(model, batch, directions, [0.3, 3.0], forcing)
    assert len(swept) == len(reference)
    for stats, ts in zip(swept, reference):
        assert torch.equal(stats.logprobs, ts.sequence_logprobs) and torch.equal(stats.entropies, ts.sequence_entropies)


def test_theta_is_restored_bitwise_when_a_forward_fails_mid_sweep():
    model = qwen2(vocab_size=300)
    batch = random_batch(300, 2)
    direction = {n: torch.ones_like(p) for n, p in model.named_parameters()}
    before = digest(model)
    boom = model.model.layers[1].mlp.register_forward_hook(lambda *args: (_ for _ in ()).throw(RuntimeError("boom")))
    with pytest.raises(RuntimeError, match="boom"):
        list(iter_sweep(model, batch, {"full": direction}, [0.5], TeacherForcing()))
    boom.remove()
    assert digest(model) == before
    assert all(not m._forward_pre_hooks for m in model.modules())  # the sweep's hooks are gone too


def test_a_sweep_point_holds_about_one_layer_not_a_copy_of_the_model():
    # layers dominate this model (as they do in a 0.5B-7B policy): 4 x 0.79M MLP parameters vs a 0.15M head
    model = qwen2(
        vocab_size=1200, hidden_size=128, intermediate_size=2048, num_hidden_layers=4, tie_word_embeddings=False
    )
    batch = random_batch(1200, 4)
    direction = {n: torch.full_like(p, 1e-3) for n, p in model.named_parameters()}
    forcing = TeacherForcing(with_entropy=True, batch_size=None)
    with torch.no_grad():
        base = next(iter_sweep(model, batch, {}, [], forcing)).stats  # (no part: the base point only)
        aligned = {"full": aligned_direction(model, direction)}
        with TensorMemory() as memory:
            list(iter_sweep(model, batch, aligned, [0.5], forcing, base=base))
    model_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    largest = max(p.numel() * p.element_size() for p in model.parameters())  # one MLP projection
    head = model.lm_head.weight.numel() * model.lm_head.weight.element_size()
    assert memory.peak <= head + 2 * largest + 4 * MIB, (memory.peak_mib, largest / MIB)
    assert memory.peak < 0.3 * model_bytes


# ---------------------------------------------------------------------------------------------------------------
# precision guards


def test_the_step_resolution_counts_the_elements_that_move():
    theta = {"w": torch.tensor([1.0, 1.0, 1.0, 1.0], dtype=torch.bfloat16)}
    d = {"w": torch.tensor([1e-5, 1.0, 0.0, 1.0], dtype=torch.float64)}
    # bfloat16 has an ulp of 2^-7 at 1, float32 of 2^-23: steps below half of it round away; 0 never moves
    res = step_resolution(theta, d, [1e-3, 0.1])
    assert res.changed_fraction == [pytest.approx(0.0), pytest.approx(2 / 3)]
    assert res.rounding_error[0] == pytest.approx(1.0, rel=1e-12)
    float32 = step_resolution({"w": theta["w"].float()}, d, [1e-3, 0.1])
    assert float32.changed_fraction == [pytest.approx(2 / 3), pytest.approx(1.0)]


def test_the_precision_guard_fires_on_a_bfloat16_policy_at_a_small_eta_and_stays_quiet_in_float32(
    run_predict, tmp_path
):
    runs = {
        dtype: run_predict(tmp_path, dtype, "--model.init_args.policy.dtype", dtype)
        for dtype in ("float32", "bfloat16")
    }
    quiet = runs["float32"]["evals"][0]
    assert all(min(res["changed_fraction"]) > 0.99 for res in quiet["parts"].values())
    assert not any("parameters the step moves change" in w for w in quiet["warnings"])
    loud = runs["bfloat16"]["evals"][0]
    etas = runs["bfloat16"]["plan"]["etas"]
    for part, res in loud["parts"].items():
        assert res["changed_fraction"][0] < 0.5, (part, res["changed_fraction"])  # eta = 0.1 x lr
        assert any(
            w.startswith(f"{part} at eta={etas[0]:.3g}:") and "of the parameters the step moves change" in w
            for w in loud["warnings"]
        )


def test_loading_a_float32_checkpoint_in_bfloat16_warns_and_names_autocast(toy_world_dir, caplog):
    from probe import loading

    loading._warned_lower_precision.clear()
    with caplog.at_level(logging.WARNING, logger="probe"):
        PolicySettings(path=str(toy_world_dir), dtype="bfloat16").resolved_dtype()
    assert "loads weights saved in higher precision (weights saved as float32) in bfloat16" in caplog.text
    assert "precision.autocast: bfloat16" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="probe"):
        PolicySettings(path=str(toy_world_dir), dtype="float32").resolved_dtype()
        PolicySettings(path=str(toy_world_dir)).resolved_dtype()
    assert "higher precision" not in caplog.text


def test_autocast_runs_the_forwards_in_bfloat16_while_the_step_is_formed_in_float32(wide):
    batch = random_batch(QWEN_VOCAB, 3)
    with torch.no_grad():
        plain = teacher_force(wide, batch, forcing=TeacherForcing(with_entropy=True))
        half = teacher_force(wide, batch, forcing=TeacherForcing(with_entropy=True, autocast_dtype=torch.bfloat16))
    gap = (plain.logprobs - half.logprobs).abs()[plain.mask]
    assert 0 < gap.max() < 0.5  # bfloat16 forwards: different, by bfloat16 rounding of ~|z| ~ 1 logits
    assert half.logprobs.dtype == torch.float64  # the head itself stays float64
    assert all(p.dtype == torch.float32 for p in wide.parameters())
