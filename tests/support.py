"""What the tests share: the repository's configs, small-run CLI arguments, and a tiny-Llama factory.

The fixtures in conftest.py hand these to the tests (``tiny_llama``, ``run_predict``, ``run_fit``);
module-level parameter lists import them from here.
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from probe.logprobs import TeacherForcing
from probe.overrides import base_statistics
from probe.precision import exact_float64_norms
from probe.statistics import INTEGRANDS
from probe.taylor import FirstOrder, SecondOrder, first_order, sequence_derivatives, snis_derivatives

REPO = Path(__file__).resolve().parents[1]
TOY_CONFIG = str(REPO / "configs" / "toy.yaml")
GRPO_CONFIG = str(REPO / "configs" / "toy_grpo.yaml")


def flags(settings: dict[str, Any], prefix: str = "--") -> list[str]:
    """CLI arguments from ``{"trainer.max_steps": 3, "model.init_args.save_policy": False, ...}`` (booleans as
    true/false, the rest as text), each key given ``prefix``."""
    out = []
    for key, value in settings.items():
        out += [prefix + key, str(value).lower() if isinstance(value, bool) else str(value)]
    return out


def eval_batch_arg(n_prompts: int = 12, n_per_prompt: int = 4, offset: int = 1000, seed: int = 1) -> str:
    """``--data.init_args.evals`` for one sampled evaluation batch of the toy task."""
    return (
        f"[{{source: {{prompts: toy, n_prompts: {n_prompts}, offset: {offset}}}, "
        f"sampling: {{n_per_prompt: {n_per_prompt}, max_new_tokens: 4, seed: {seed}}}}}]"
    )


def predict_args(
    root: Path | str, name: str, *extra: str, eval_prompts: int = 12, eval_batch_size: int = 16, n_etas: int = 3
) -> list[str]:
    """``python -m probe predict`` arguments of a small toy run: U = 3 prompts x 4, E = ``eval_prompts`` x 4,
    ``n_etas`` etas, no logger and no progress bar, in ``<root>/<name>``; ``extra`` comes last (it wins)."""
    return [
        "predict",
        "--config",
        TOY_CONFIG,
        "--model.init_args.probe.n_etas",
        str(n_etas),
        "--data.init_args.update.source.n_prompts",
        "3",
        "--data.init_args.update.sampling.n_per_prompt",
        "4",
        "--data.init_args.evals",
        eval_batch_arg(eval_prompts),
        "--data.init_args.eval_batch_size",
        str(eval_batch_size),
        "--trainer.logger",
        "false",
        "--trainer.enable_progress_bar",
        "false",
        "--model.init_args.run.root",
        str(root),
        "--model.init_args.run.name",
        name,
        *extra,
    ]


QUIET_FIT = [
    "--trainer.logger",
    "false",
    "--trainer.enable_progress_bar",
    "false",
    "--trainer.enable_model_summary",
    "false",
]


def fit_args(root: Path | str, name: str, *extra: str) -> list[str]:
    """``python -m probe fit`` arguments of the toy GRPO config, quiet, in ``<root>/<name>``; ``extra`` last."""
    return [
        "fit",
        "--config",
        GRPO_CONFIG,
        *QUIET_FIT,
        "--model.init_args.run.root",
        str(root),
        "--model.init_args.run.name",
        name,
        *extra,
    ]


def read_summary(run: Path) -> dict[str, Any]:
    return json.loads((Path(run) / "summary.json").read_text())


def tiny_llama(
    seed: int = 0,
    *,
    dtype: torch.dtype = torch.float32,
    vocab_size: int = 16,
    hidden_size: int = 16,
    intermediate_size: int = 32,
    num_hidden_layers: int = 1,
    num_attention_heads: int = 2,
    num_key_value_heads: int = 1,
    **config: Any,
) -> LlamaForCausalLM:
    """A tiny ``LlamaForCausalLM`` drawn with ``seed`` (the global RNG is left as it was), in eval mode, SDPA
    attention; float64 models get exact float64 RMSNorm (``probe.precision.exact_float64_norms``)."""
    cfg = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_hidden_layers=num_hidden_layers,
        num_attention_heads=num_attention_heads,
        num_key_value_heads=num_key_value_heads,
        attn_implementation=config.pop("attn_implementation", "sdpa"),
        **{"max_position_embeddings": 64, **config},
    )
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = LlamaForCausalLM(cfg)
    model = model.to(dtype).eval()
    return exact_float64_norms(model) if dtype == torch.float64 else model


def first_order_prediction(
    model, batch, direction, forcing: TeacherForcing, integrands=INTEGRANDS, groups=None
) -> dict[str, FirstOrder]:
    """``{integrand: FirstOrder}`` along ``direction`` (one JVP over ``batch``): sequence_derivatives + first_order."""
    derivs = sequence_derivatives(model, batch, direction, replace(forcing, with_entropy=True), order=1)
    return {name: first_order(derivs, name, groups) for name in integrands}


def second_order_prediction(
    model, batch, direction, forcing: TeacherForcing, eta=0.0, order=2, base=None, integrands=INTEGRANDS, groups=None
) -> dict[str, SecondOrder]:
    """``{integrand: SecondOrder}``: F, F', F'' of the SNIS estimate along ``direction`` at ``eta`` (a JVP of a JVP;
    ``order=1``: one JVP, F'' NaN). ``base`` (statistics at theta) is computed when needed (eta != 0)."""
    forcing = replace(forcing, with_entropy=True)
    derivs = sequence_derivatives(model, batch, direction, forcing, order=order, eta=eta)
    if base is None:
        base = derivs.value if eta == 0 else base_statistics(model, batch, forcing)
    return {name: snis_derivatives(derivs, base, name, groups) for name in integrands}


# ---- the live probe's small fit (tests/test_live.py, tests/test_sharded.py)

NO_CHECKPOINTS = {"model.init_args.checkpoint_every_n_steps": -1, "trainer.enable_checkpointing": False}
QUIET = flags({**NO_CHECKPOINTS, "model.init_args.save_policy": False})
PROBE = "--trainer.callbacks.init_args."


def eval_arg(n_prompts: int, n_per_prompt: int, seed: int = 0, **extra) -> str:
    """The live probe's ``eval`` setting: ``n_prompts`` held-out toy prompts x ``n_per_prompt`` samples."""
    sampling = f"{{n_per_prompt: {n_per_prompt}, max_new_tokens: 4, seed: {seed}}}"
    more = "".join(f", {k}: {str(v).lower() if isinstance(v, bool) else v}" for k, v in extra.items())
    return f"{{source: {{prompts: toy, n_prompts: {n_prompts}, offset: 1000}}, sampling: {sampling}{more}}}"


def probe(**settings) -> list[str]:
    """CLI arguments of the LiveEntropyProbe callback of configs/toy_grpo.yaml."""
    return flags(settings, prefix=PROBE)


# A small run probed at every step: 4 prompts x G = 8 per step, two PPO inner epochs per rollout (step 1
# reuses step 0's rollout with ratio != 1 and clipping), E = 8 prompts x 4 samples scored with the toy reward.
STEPS = flags({"trainer.max_steps": 3, "data.init_args.prompts_per_step": 4, "model.init_args.optimizer.lr": 1e-3})
PPO = flags({"model.init_args.rollout.inner_epochs": 2, "model.init_args.loss.clip_ratio": 0.05})
SMALL = [*STEPS, *PPO, *probe(every_n_steps=1, eval=eval_arg(8, 4, seed=1, reward="toy"))]


def records(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "live_probe" / "records.jsonl").read_text().splitlines()]


def history(run: Path) -> list[float]:
    """The mean reward of each rollout of a fit run (``history.jsonl``)."""
    return [json.loads(x)["mean_reward"] for x in (run / "history.jsonl").read_text().splitlines()]


def assert_live_runs_agree(one: Path, two: Path, attribution_atol: float) -> None:
    """A float64 fit on two processes probed the steps of the one-process fit: the same rewards, the same global U
    in the same order, one step reconstructed alike on both ranks and verified on both, and the records' numbers
    within summation-order rounding (~1e-15 relative measured; 1e-9 leaves room for conditioning).
    ``attribution_atol``: the attributions of Adam's first steps are ill-conditioned in the summation order."""
    import pytest

    a_records, b_records = records(one), records(two)
    assert len(a_records) == len(b_records) == 3
    assert history(two) == history(one)

    def close(x: float, y: float) -> bool:
        return x == pytest.approx(y, rel=1e-9, abs=1e-12)

    for a, b in zip(a_records, b_records):
        assert b["world_size"] == 2 and a["world_size"] == 1
        assert b["update"]["n_sequences"] == a["update"]["n_sequences"]
        assert b["attributions"]["index"] == a["attributions"]["index"]  # the same global U, in the same order
        assert b["update"]["rank_norm_spread"] == 0.0  # both ranks reconstructed the identical step
        assert len(b["verification"]["ranks"]) == 2 and b["verification"]["max_units_all_ranks"] <= 1.0
        full_a, full_b = a["eval"]["parts"]["full"], b["eval"]["parts"]["full"]
        assert close(b["update"]["grad_norm"], a["update"]["grad_norm"])
        assert all(close(x, y) for x, y in zip(full_b["delta_h"], full_a["delta_h"]))
        assert close(full_b["first_order"], full_a["first_order"])
        assert close(full_b["second_order"], full_a["second_order"])
        assert close(b["eval"]["attribution"]["sum"], a["eval"]["attribution"]["sum"])
        assert b["attributions"]["values"] == pytest.approx(a["attributions"]["values"], rel=1e-9, abs=attribution_atol)
        assert close(b["realised"]["delta_h"], a["realised"]["delta_h"])


def use_exact_trl_logprobs(trainer: Any) -> None:
    """Replace TRL's per-token log-probs by exact ones in the policy's dtype (on this trainer instance).

    TRL's fused head kernel accumulates log-probs and their gradients in float32 whatever the policy's dtype (its
    float64 gradients differ from exact ones by ~1e-6 relative): with this, a float64 comparison checks what TRL does
    with the log-probs, its loss, to float64 rounding."""

    def exact_logps(model, input_ids, attention_mask, logits_to_keep, compute_entropy=False, **_):
        logits = model(input_ids=input_ids, attention_mask=attention_mask, fused_lm_head=False).logits
        logp = (logits[:, :-1] / trainer.temperature).log_softmax(-1)  # [B, T-1, V]
        token = logp.gather(-1, input_ids[:, 1:, None]).squeeze(-1)[:, -logits_to_keep:]
        entropy = -(logp.exp() * logp).sum(-1)[:, -logits_to_keep:] if compute_entropy else None
        return token, entropy, None

    trainer._get_per_token_logps_and_entropies = exact_logps
