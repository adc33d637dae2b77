"""Exact AdamW/Adam step reconstruction (docs/DESIGN.md section 2) against torch.optim's own step.

Truth in every test is independent of probe.update: the change ``optimizer.step()`` makes to a
deep copy of the model after ``sum(per_sequence_loss(...)).backward()``, ``GradScaler.unscale_``
and ``torch.nn.utils.clip_grad_norm_``, exactly as a trainer does it.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import math
from dataclasses import dataclass

import pytest
import torch

from probe.adam import AdamState, ParamAdamState
from probe.batch import SequenceBatch, collate
from probe.logprobs import TeacherForcing, teacher_force
from probe.losses import LossConfig, normalisers, per_sequence_loss
from probe.update import (
    ReconstructionConfig,
    Update,
    adam_step_parts,
    per_sequence_directions,
    per_sequence_inner_products,
    reconstruct_update,
    update_from_gradients,
)

from support import tiny_llama

VOCAB, N_SEQ = 24, 6


# ----------------------------------------------------------------------------- fixtures


@dataclass(frozen=True)
class Case:
    """One training configuration whose next step is reconstructed."""

    optimizer: str = "adamw"  # "adamw" or "adam_l2" (torch.optim.Adam with L2 weight decay)
    amsgrad: bool = False
    two_groups: bool = False  # HF-style decay group + no-decay group with a different lr
    prior_steps: int = 2  # 0: empty optimizer state
    clip: str | None = None  # "active" / "inactive" / None
    agg_mode: str = "seq-mean-token-mean"
    ppo: bool = False  # PPO-clip with stored old_logprobs
    lora: bool = False  # peft LoRA adapters are the only trained parameters
    microbatch: int | None = None
    dtype: torch.dtype = torch.float64
    precision: str | None = None  # "fp16-scaler" (autocast fp16 + GradScaler) or "bf16" (autocast)
    records: bool = False  # pass U as rollout records instead of a SequenceBatch

    @property
    def max_grad_norm(self) -> float | None:
        return {"active": 0.05, "inactive": 1e3, None: None}[self.clip]

    @property
    def autocast_dtype(self) -> torch.dtype | None:
        return {"fp16-scaler": torch.float16, "bf16": torch.bfloat16, None: None}[self.precision]

    @property
    def reconstruction(self) -> ReconstructionConfig:
        """The trainer's clipping, microbatches and autocast as reconstruction settings (dtype by name)."""
        autocast = {"fp16-scaler": "float16", "bf16": "bfloat16", None: None}[self.precision]
        return ReconstructionConfig(
            max_grad_norm=self.max_grad_norm, microbatch_size=self.microbatch, autocast_dtype=autocast
        )


CASES = {
    "adamw-step0": Case(prior_steps=0),
    "adamw-after2": Case(records=True),
    "adam_l2-after2": Case(optimizer="adam_l2"),
    "adamw-amsgrad": Case(amsgrad=True),
    "adam_l2-amsgrad-step0": Case(optimizer="adam_l2", amsgrad=True, prior_steps=0),
    "adamw-two_groups": Case(two_groups=True),
    "adam_l2-amsgrad-two_groups": Case(optimizer="adam_l2", amsgrad=True, two_groups=True),
    "clip-active": Case(clip="active"),
    "clip-inactive": Case(clip="inactive", optimizer="adam_l2"),
    "token-mean": Case(agg_mode="token-mean"),
    "seq-mean-token-sum": Case(agg_mode="seq-mean-token-sum"),
    "seq-mean-token-sum-norm": Case(agg_mode="seq-mean-token-sum-norm", prior_steps=0),
    "ppo-clip": Case(ppo=True, agg_mode="token-mean", clip="active"),
    "lora": Case(lora=True),
    "lora-ppo-amsgrad-step0": Case(lora=True, ppo=True, amsgrad=True, prior_steps=0),
    "microbatched-clip": Case(microbatch=2, clip="active", two_groups=True),
    "float32": Case(dtype=torch.float32),
    "float32-two_groups-clip": Case(dtype=torch.float32, two_groups=True, clip="active"),
    "float32-fp16-gradscaler-clip": Case(dtype=torch.float32, precision="fp16-scaler", clip="active"),
    "float32-bf16-autocast": Case(dtype=torch.float32, precision="bf16", microbatch=4),
}
FLOAT64_CASES = [k for k, c in CASES.items() if c.dtype == torch.float64]


def policy(dtype: torch.dtype, seed: int = 0) -> torch.nn.Module:
    model = tiny_llama(
        seed, dtype=dtype, vocab_size=VOCAB, num_attention_heads=4, num_key_value_heads=2, initializer_range=0.2
    )
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():  # norms away from exactly 1, so weight decay on them is visible
        for p in model.parameters():
            if p.ndim == 1:
                p.add_(0.1 * torch.randn(p.shape, generator=gen, dtype=p.dtype))
    return model


def make_records(seed: int, n: int = N_SEQ) -> list[dict]:
    gen = torch.Generator().manual_seed(seed)
    records = []
    for i in range(n):
        prompt_len = int(torch.randint(1, 4, (1,), generator=gen))
        response_len = int(torch.randint(1, 6, (1,), generator=gen))
        records.append(
            dict(
                prompt_ids=torch.randint(1, VOCAB, (prompt_len,), generator=gen).tolist(),
                response_ids=torch.randint(1, VOCAB, (response_len,), generator=gen).tolist(),
                group=i // 2,
                advantage=float(torch.randn((), generator=gen)),
            )
        )
    return records


def with_old_logprobs(model, records: list[dict], seed: int) -> list[dict]:
    """Stored behaviour log-probs = current log-probs + noise, so some PPO ratios leave the clip range."""
    batch = collate(records)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        lp = teacher_force(model, batch).logprobs  # [B, T-1]
    out = []
    for b, r in enumerate(records):
        row = lp[b][batch.target_mask[b]]
        noise = 0.3 * torch.randn(row.shape, generator=gen, dtype=torch.float64)
        out.append({**r, "old_logprobs": (row.double() + noise).tolist()})
    return out


def loss_config(case: Case) -> LossConfig:
    return LossConfig(agg_mode=case.agg_mode, use_old_logprobs=case.ppo, clip_ratio=0.2)


def build_optimizer(case: Case, model) -> torch.optim.Optimizer:
    trained = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    cls = torch.optim.AdamW if case.optimizer == "adamw" else torch.optim.Adam
    kw = dict(betas=(0.9, 0.95), eps=1e-8, amsgrad=case.amsgrad)
    if case.two_groups:
        groups = [
            {"params": [p for n, p in trained if p.ndim >= 2], "lr": 1e-2, "weight_decay": 0.1},
            {"params": [p for n, p in trained if p.ndim < 2], "lr": 4e-3, "weight_decay": 0.0},
        ]
        return cls(groups, **kw)
    return cls([p for _, p in trained], lr=1e-2, weight_decay=0.05, **kw)


def trainer_backward(model, batch: SequenceBatch, loss: LossConfig, case: Case, scaler) -> None:
    """What a trainer does: per microbatch, loss (normalised over all of U) -> (scaled) backward."""
    norm = normalisers(batch.target_mask, loss)
    for mb in batch.chunks(case.microbatch):
        if case.autocast_dtype:
            ctx = torch.autocast("cpu", dtype=case.autocast_dtype)
        else:
            ctx = torch.autocast("cpu", enabled=False)
        with ctx:
            stats = teacher_force(model, mb, forcing=TeacherForcing(temperature=loss.temperature))
            total = per_sequence_loss(stats.logprobs, stats.mask, mb.advantages, norm, loss, mb.old_logprobs).sum()
        (scaler.scale(total) if scaler is not None else total).backward()


def real_step(model, optimizer, batch, loss, case: Case, scaler) -> dict[str, torch.Tensor]:
    """The change torch's optimizer.step() makes, on deep copies (the originals stay as they are)."""
    model_c, opt_c, scaler_c = copy.deepcopy((model, optimizer, scaler))
    opt_c.zero_grad(set_to_none=True)
    before = {n: p.detach().clone() for n, p in model_c.named_parameters()}
    trainer_backward(model_c, batch, loss, case, scaler_c)
    if scaler_c is not None:
        scaler_c.unscale_(opt_c)
    if case.max_grad_norm is not None:
        params = [p for g in opt_c.param_groups for p in g["params"]]
        torch.nn.utils.clip_grad_norm_(params, case.max_grad_norm)
    (scaler_c.step(opt_c) if scaler_c is not None else opt_c.step())
    return {n: p.detach() - before[n] for n, p in model_c.named_parameters()}


@dataclass
class Run:
    case: Case
    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    batch: SequenceBatch
    loss: LossConfig
    update: Update
    params_before: dict[str, torch.Tensor]
    real_delta: dict[str, torch.Tensor]
    scaler: object


def prepare(case: Case):
    model = policy(case.dtype)
    if case.lora:
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(model, LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"]))
    optimizer = build_optimizer(case, model)
    loss = loss_config(case)
    for k in range(case.prior_steps):  # populate the optimizer state with real steps
        records = make_records(100 + k)
        if case.ppo:
            records = with_old_logprobs(model, records, seed=200 + k)
        optimizer.zero_grad(set_to_none=True)
        trainer_backward(model, collate(records), loss, dataclasses.replace(case, precision=None), None)
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    records = make_records(7)
    if case.ppo:
        records = with_old_logprobs(model, records, seed=8)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**12) if case.precision == "fp16-scaler" else None
    return model, optimizer, records, loss, scaler


@functools.lru_cache(maxsize=None)
def run(name: str) -> Run:
    case = CASES[name]
    model, optimizer, records, loss, scaler = prepare(case)
    batch = collate(records)
    real = real_step(model, optimizer, batch, loss, case, scaler)
    update = reconstruct_update(
        model, optimizer, records if case.records else batch, loss, case.reconstruction, grad_scaler=scaler
    )
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    return Run(case, model, optimizer, batch, loss, update, before, real, scaler)


def ulp(x: torch.Tensor) -> torch.Tensor:
    a = x.abs()
    return torch.nextafter(a, torch.full_like(a, math.inf)) - a


def assert_reproduces_step(step: dict[str, torch.Tensor], r: Run, rel: float, slack: dict | None = None) -> None:
    """|predicted - real| <= 2 ulp(|p|) + rel * max|real step| (+ slack) per parameter tensor.

    The real p_new is rounded to the parameter's precision (0.5 ulp, twice for AdamW's decay
    then addcdiv), so 2 ulp(max(|p|, |p_new|)) covers it; ``rel`` covers the step's own arithmetic
    (float64: 1e-12; float32 torch computes m', v', D in float32: a few 6e-8 relative -> 1e-6).
    ``slack`` is an extra elementwise allowance (summation error of per-sequence parts).
    """
    for name, delta in r.real_delta.items():
        p = r.params_before[name]
        if name not in step:  # no gradient -> torch does not move it
            assert torch.equal(delta, torch.zeros_like(delta)), f"{name} moved but has no reconstructed step"
            continue
        pred = step[name].to(delta.dtype)
        bound = 2 * ulp(torch.maximum(p.abs(), (p + delta).abs())) + rel * delta.abs().max()
        if slack is not None:
            bound = bound + slack[name].to(delta.dtype)
        err = (pred - delta).abs()
        assert (err <= bound).all(), f"{name}: max err {err.max():.3g}, max step {delta.abs().max():.3g}"
    assert set(step) <= set(r.real_delta)


def rel_tol(case: Case) -> float:
    return 1e-12 if case.dtype == torch.float64 else 1e-6


# ----------------------------------------------------------------------------- the full step


@pytest.mark.parametrize("name", list(CASES))
def test_lr_times_full_equals_the_step_torch_optimizer_takes(name):
    r = run(name)
    if r.case.clip == "active":
        assert r.update.clip_coef < 1.0, "the clipping case must actually clip"
    if r.case.clip == "inactive":
        assert r.update.clip_coef == 1.0
    step = {n: r.update.lr * f.double() for n, f in r.update.full.items()}
    assert_reproduces_step(step, r, rel_tol(r.case))


@pytest.mark.parametrize("name", list(CASES))
def test_full_is_baseline_plus_grad_and_counts_are_of_the_whole_batch(name):
    u = run(name).update
    for n in u.full:
        assert torch.equal(u.full[n], u.baseline[n] + u.grad[n])
    assert u.n_sequences == N_SEQ
    assert u.n_tokens == int(run(name).batch.target_mask.sum())
    assert math.isfinite(u.grad_norm) and u.grad_norm > 0


@pytest.mark.parametrize("name", list(CASES))
def test_baseline_plus_sum_of_per_sequence_directions_equals_the_step(name):
    r = run(name)
    total = {n: b.double().clone() for n, b in r.update.baseline.items()}
    abs_sum = {n: torch.zeros_like(b, dtype=torch.float64) for n, b in r.update.baseline.items()}
    rows = []
    for i, v_i in per_sequence_directions(r.model, r.update, r.batch, chunk_size=4):
        rows.append(i)
        for n, v in v_i.items():
            total[n] += v.double()
            abs_sum[n] += v.double().abs()
    assert rows == list(range(N_SEQ))
    step = {n: r.update.lr * t for n, t in total.items()}
    # Beyond the full-step bound: sum_i g_i and g are the same sum rounded differently, so they
    # differ by at most ~2 u * sum_i |g_i| per element, u the unit roundoff of the gradient
    # arithmetic (float64 2^-53, float32 2^-24, bf16 2^-8 and fp16 2^-11 under autocast); 4 u allowed.
    u = {"bf16": 2.0**-8, "fp16-scaler": 2.0**-11}.get(r.case.precision, torch.finfo(r.case.dtype).eps / 2)
    slack = {n: 4 * u * r.update.lr * a for n, a in abs_sum.items()}
    assert_reproduces_step(step, r, rel_tol(r.case), slack)


# ----------------------------------------------------------------------------- per-sequence inner products

JVP_CASES = [
    "adamw-after2",
    "adam_l2-amsgrad-two_groups",
    "ppo-clip",
    "lora",
    "microbatched-clip",
    "seq-mean-token-sum-norm",
]


@pytest.mark.parametrize("name", JVP_CASES)
def test_jvp_inner_products_equal_dot_products_with_materialised_directions(name):
    r = run(name)
    gen = torch.Generator().manual_seed(3)
    w = {n: torch.randn(t.shape, generator=gen, dtype=torch.float64) for n, t in r.update.full.items()}
    fast = per_sequence_inner_products(r.model, r.update, r.batch, w, microbatch_size=4)
    explicit = torch.zeros(N_SEQ, dtype=torch.float64)
    for i, v_i in per_sequence_directions(r.model, r.update, r.batch, chunk_size=3):
        explicit[i] = sum((v * w[n]).sum() for n, v in v_i.items())
    assert fast.dtype == torch.float64 and fast.shape == (N_SEQ,)
    # float64 forward- vs reverse-mode of the same function: rounding only (~1e-15); 1e-10 of the largest.
    assert torch.allclose(fast, explicit, rtol=0, atol=1e-10 * explicit.abs().max())
    # and the inner products sum to <w, grad part>
    grad_part = float(sum((r.update.grad[n] * w[n]).sum() for n in w))
    assert math.isclose(float(fast.sum()), grad_part, rel_tol=1e-10)


def test_inner_products_ignore_names_outside_the_update_and_reject_unknown_names():
    r = run("lora")
    gen = torch.Generator().manual_seed(4)
    w = {n: torch.randn(t.shape, generator=gen, dtype=torch.float64) for n, t in r.update.full.items()}
    frozen = next(n for n, p in r.model.named_parameters() if not p.requires_grad)
    with_frozen = {**w, frozen: torch.ones_like(dict(r.model.named_parameters())[frozen])}
    a = per_sequence_inner_products(r.model, r.update, r.batch, w)
    b = per_sequence_inner_products(r.model, r.update, r.batch, with_frozen)
    assert torch.equal(a, b)
    with pytest.raises(ValueError, match="not parameters of the model"):
        per_sequence_inner_products(r.model, r.update, r.batch, {"no.such.weight": torch.zeros(1)})


# ----------------------------------------------------------------------------- invariants


@pytest.mark.parametrize(
    "name", ["adamw-two_groups", "lora-ppo-amsgrad-step0", "float32-fp16-gradscaler-clip", "float32-bf16-autocast"]
)
def test_model_grads_and_optimizer_state_are_bitwise_untouched(name):
    case = CASES[name]
    model, optimizer, records, loss, scaler = prepare(case)
    for p in model.parameters():  # a pending .grad must survive
        if p.requires_grad:
            p.grad = torch.randn_like(p)
    params = {n: p.detach().clone() for n, p in model.named_parameters()}
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    opt_state = copy.deepcopy(optimizer.state_dict())
    settings = dataclasses.replace(case.reconstruction, microbatch_size=None)  # U in one pass
    update = reconstruct_update(model, optimizer, records, loss, settings, grad_scaler=scaler)
    list(per_sequence_directions(model, update, records, indices=[0, 3]))
    per_sequence_inner_products(model, update, records, update.full)
    for n, p in model.named_parameters():
        assert torch.equal(p.detach(), params[n]), n
        assert (p.grad is None) == (n not in grads) and (p.grad is None or torch.equal(p.grad, grads[n])), n
    after = optimizer.state_dict()
    assert after["param_groups"] == opt_state["param_groups"]
    for k, st in opt_state["state"].items():
        for key, t in st.items():
            assert torch.equal(after["state"][k][key], t), (k, key)


def test_microbatched_reconstruction_equals_one_batch():
    model, optimizer, records, loss, _ = prepare(Case(two_groups=True, ppo=True, agg_mode="seq-mean-token-mean"))
    one = reconstruct_update(model, optimizer, records, loss, ReconstructionConfig(max_grad_norm=0.05))
    for size in (1, 4):
        settings = ReconstructionConfig(max_grad_norm=0.05, microbatch_size=size)  # the CLI's settings object
        many = reconstruct_update(model, optimizer, records, loss, settings)
        assert (many.n_sequences, many.n_tokens) == (one.n_sequences, one.n_tokens)
        assert math.isclose(many.clip_coef, one.clip_coef, rel_tol=1e-13)
        for part in ("full", "baseline", "grad", "scale"):
            for n, t in getattr(one, part).items():
                # float64 accumulation order only: 1e-12 of the part's largest entry
                assert torch.allclose(getattr(many, part)[n], t, rtol=0, atol=1e-12 * t.abs().max()), (part, n)


def test_frozen_parameters_have_no_part_under_lora():
    r = run("lora")
    trainable = {n for n, p in r.model.named_parameters() if p.requires_grad}
    assert set(r.update.full) == trainable and all("lora_" in n for n in trainable)


def test_two_groups_parts_are_per_unit_of_the_largest_group_lr():
    u = run("adamw-two_groups").update
    assert u.lr == 1e-2
    assert {u.group_lr[n] for n in u.full} == {1e-2, 4e-3}
    # the no-decay group's step is lr_g * u_g = lr_ref * (lr_g/lr_ref) u_g: recompute it directly
    r = run("adamw-two_groups")
    name = next(n for n in u.full if u.group_lr[n] == 4e-3)
    real = r.real_delta[name]
    assert torch.allclose(u.lr * u.full[name], real, rtol=0, atol=1e-12 * real.abs().max())


def test_step_parts_of_one_parameter_match_adamw_at_step_zero():
    """At step 0 (m = v = 0) the AdamW step per unit lr is -wd*p - g/(|g| + eps*...) : check the closed form."""
    from probe.adam import AdamHyper

    gen = torch.Generator().manual_seed(0)
    p, g = torch.randn(5, generator=gen, dtype=torch.float64), torch.randn(5, generator=gen, dtype=torch.float64)
    h = AdamHyper(lr=1.0, beta1=0.9, beta2=0.99, eps=1e-8, weight_decay=0.1)
    parts = adam_step_parts(p, g, ParamAdamState(), h)
    # m' = 0.1 g, v' = 0.01 g^2, bc1 = 0.1, bc2 = 0.01 -> D = 1/(|g| + eps), step = -wd p - g/(|g| + eps)
    expected = -0.1 * p - g / (g.abs() + 1e-8)
    assert torch.allclose(parts.baseline + parts.grad, expected, rtol=1e-14, atol=0)
    assert torch.allclose(parts.scale * g, parts.grad, rtol=1e-15, atol=0)


# ----------------------------------------------------------------------------- live path


@pytest.mark.parametrize("clipped", [False, True])
def test_live_update_from_trainer_gradients_equals_reconstruction(clipped):
    case = Case(two_groups=True, clip="active", amsgrad=True)
    model, optimizer, records, loss, _ = prepare(case)
    batch = collate(records)
    offline = reconstruct_update(model, optimizer, batch, loss, ReconstructionConfig(max_grad_norm=case.max_grad_norm))
    trainer_backward(model, batch, loss, case, None)  # the trainer's real backward: .grad filled
    grad_norm = None
    if clipped:
        params = [p for g in optimizer.param_groups for p in g["params"]]
        grad_norm = torch.nn.utils.clip_grad_norm_(params, case.max_grad_norm)
    live = update_from_gradients(
        model.named_parameters(),
        {n: p.grad for n, p in model.named_parameters()},
        AdamState.from_optimizer(optimizer, model),
        case.max_grad_norm,
        clipped=clipped,
        grad_norm=grad_norm,
        loss=loss,
        normalisers=normalisers(batch.target_mask, loss),
    )
    assert math.isclose(live.clip_coef, offline.clip_coef, rel_tol=1e-14) and live.clip_coef < 1
    for part in ("full", "baseline", "grad", "scale"):
        for n, t in getattr(offline, part).items():
            assert torch.allclose(getattr(live, part)[n], t, rtol=0, atol=1e-12 * t.abs().max()), (part, n)
    # the live update supports the per-sequence machinery too
    assert per_sequence_inner_products(model, live, batch, live.full).shape == (N_SEQ,)


def test_live_path_needs_the_pre_clip_norm_for_clipped_gradients():
    r = run("adamw-after2")
    grads = {n: torch.ones_like(p) for n, p in r.model.named_parameters()}
    with pytest.raises(ValueError, match="grad_norm"):
        state = AdamState.from_optimizer(r.optimizer, r.model)
        update_from_gradients(r.model.named_parameters(), grads, state, 1.0, clipped=True)


# ----------------------------------------------------------------------------- PPO ratios of U's old_logprobs


def ppo_ratio_counts(r: Run, batch: SequenceBatch) -> tuple[int, int, int]:
    """Truth, token by token: U's response tokens, those whose ratio exp(log p - old) lies outside [0.8, 1.2],
    and those whose gradient the clip zeroes (A > 0 above the range, A < 0 below it)."""
    with torch.no_grad():
        lp = teacher_force(r.model, batch, forcing=r.loss.forcing()).logprobs
    tokens = outside = zeroed = 0
    for b in range(len(batch)):
        advantage = float(batch.advantages[b])
        for t in batch.target_mask[b].nonzero().flatten().tolist():
            ratio = math.exp(float(lp[b, t]) - float(batch.old_logprobs[b, t]))
            tokens += 1
            outside += not 0.8 <= ratio <= 1.2
            zeroed += (advantage > 0 and ratio > 1.2) or (advantage < 0 and ratio < 0.8)
    return tokens, outside, zeroed


def test_ppo_ratios_outside_the_clip_range_are_counted_in_the_update_summary(tmp_path):
    r = run("ppo-clip")  # old_logprobs = the policy's + 0.3 nats of noise: about half the ratios leave [0.8, 1.2]
    tokens, outside, zeroed = ppo_ratio_counts(r, r.batch)
    assert 0 < zeroed < outside < 0.9 * tokens
    assert r.update.ppo_clip == {"outside_fraction": outside / tokens, "clipped_fraction": zeroed / tokens}
    assert r.update.summary()["ppo_clip"] == r.update.ppo_clip
    assert Update.load(r.update.save(tmp_path / "update.safetensors")).ppo_clip == r.update.ppo_clip
    assert "ppo_clip" not in run("adamw-after2").update.summary()  # no old_logprobs used: nothing to count


def test_old_logprobs_of_another_policy_are_reported_with_the_fraction_and_the_fix(caplog):
    import logging

    r = run("ppo-clip")
    records = make_records(7)  # U of that run, with old_logprobs 3 nats below the policy's: every ratio is e^3
    batch = collate(records)
    with torch.no_grad():
        lp = teacher_force(r.model, batch, forcing=r.loss.forcing()).logprobs
    far = [{**rec, "old_logprobs": (lp[b][batch.target_mask[b]] - 3.0).tolist()} for b, rec in enumerate(records)]
    with caplog.at_level(logging.WARNING, logger="probe"):
        u = reconstruct_update(r.model, r.optimizer, far, r.loss, r.case.reconstruction)
    tokens, outside, zeroed = ppo_ratio_counts(r, collate(far))
    positive = sum(len(rec["response_ids"]) for rec in records if rec["advantage"] > 0)
    assert outside == tokens and zeroed == positive  # the clip zeroes the tokens of positive advantage
    assert u.ppo_clip == {"outside_fraction": 1.0, "clipped_fraction": positive / tokens}
    assert [rec.getMessage() for rec in caplog.records] == [
        "U's old_logprobs look like those of another policy: the PPO ratio exp(log p - old_logprob) of 100.0% of "
        f"U's {tokens} response tokens lies outside the clip range [0.8, 1.2] (loss.clip_ratio, loss.clip_ratio_high); "
        f"the clip zeroes the gradient of {100 * positive / tokens:.1f}% of the tokens and weighs the others by ratios "
        "far from 1, so the reconstructed step is (nearly) zero or dominated by a few tokens. Right after sampling "
        "every ratio is 1. Fix: store the log-probs of the policy that sampled U, at the sampling temperature "
        "(loss.temperature = 1), one per response token (not shifted by one position); or set "
        "loss.use_old_logprobs=false for the on-policy step"
    ]
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="probe"):  # the run's own noisy old_logprobs: no warning
        reconstruct_update(r.model, r.optimizer, r.batch, r.loss, r.case.reconstruction)
    assert caplog.records == []


# ----------------------------------------------------------------------------- file round trip


def test_update_file_holds_full_baseline_grad_by_parameter_name(tmp_path):
    from safetensors.torch import load_file

    u = run("adamw-two_groups").update
    path = u.save(tmp_path / "update.safetensors")
    raw = load_file(str(path))
    names = [n for n, _ in run("adamw-two_groups").model.named_parameters()]
    for part in ("full", "baseline", "grad"):
        assert {k.split(".", 1)[1] for k in raw if k.startswith(part + ".")} == set(names)
        assert all(torch.equal(raw[f"{part}.{n}"], getattr(u, part)[n]) for n in names)
    back = Update.load(path)
    keys = ("lr", "group_lr", "clip_coef", "loss", "normalisers")
    assert [getattr(back, k) for k in keys] == [getattr(u, k) for k in keys]
    assert all(torch.equal(back.scale[n], u.scale[n]) for n in names)


# ----------------------------------------------------------------------------- clear errors


def test_optimizer_state_of_the_wrong_shape_is_refused():
    r = run("adamw-after2")
    state = AdamState.from_optimizer(r.optimizer, r.model)
    name = next(iter(state.state))
    st = state.state[name]
    wrong_shape = dataclasses.replace(st, exp_avg=st.exp_avg.flatten()[:-1])
    bad = dataclasses.replace(state, state={**state.state, name: wrong_shape})
    with pytest.raises(ValueError, match=r"shape .* another model"):
        reconstruct_update(r.model, bad, r.batch, r.loss)


def test_missing_advantages_are_refused_with_the_fix():
    r = run("adamw-after2")
    records = [{k: v for k, v in rec.items() if k != "advantage"} for rec in make_records(7)]
    with pytest.raises(ValueError, match="no advantages.*'advantage'"):
        reconstruct_update(r.model, r.optimizer, records, r.loss)


def test_non_finite_loss_is_refused_with_the_fix():
    r = run("adamw-after2")
    records = make_records(7)
    records[2]["advantage"] = float("nan")
    with pytest.raises(ValueError, match="loss on U is not finite.*advantages"):
        reconstruct_update(r.model, r.optimizer, records, r.loss)


def test_overflowing_scaled_gradients_are_refused_with_the_fix():
    case = CASES["float32-fp16-gradscaler-clip"]
    model, optimizer, records, loss, _ = prepare(case)
    settings = ReconstructionConfig(autocast_dtype="float16", grad_scale=2.0**100)
    with pytest.raises(ValueError, match="not finite under grad scale.*smaller grad_scale"):
        reconstruct_update(model, optimizer, records, loss, settings)


def test_non_finite_live_gradients_are_refused():
    r = run("adamw-after2")
    grads = {n: torch.full_like(p, math.inf) for n, p in r.model.named_parameters()}
    with pytest.raises(ValueError, match="not finite"):
        update_from_gradients(r.model.named_parameters(), grads, AdamState.from_optimizer(r.optimizer, r.model))


def test_reconstruction_under_inference_mode_is_refused_with_the_fix():
    r = run("adamw-after2")
    with torch.inference_mode(), pytest.raises(RuntimeError, match="inference_mode=False"):
        reconstruct_update(r.model, r.optimizer, r.batch, r.loss)
