"""The live entropy probe attached to TRL's GRPOTrainer (callbacks/trl_live.py, examples/trl_grpo.py), on the toy
world on CPU.

What a TRL user relies on: the step the probe reconstructs from the real (clipped) gradients is the step TRL's fused
AdamW takes, within the parameters' rounding; the update batch U and the loss the probe reads from TRL's own
micro-batches give exactly TRL's accumulated gradient (float64, to 1e-10) for every loss type, across
gradient-accumulation micro-batches, generation batches that span several steps and repeated iterations; the
prediction at eta = lr agrees with the change measured on fresh samples; and attaching the probe leaves training
bitwise unchanged.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import math
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

pytest.importorskip("trl", reason="TRL is probe's optional dependency (pip install 'probe[trl]')")

from support import REPO, use_exact_trl_logprobs  # noqa: E402

RECORD_KEYS = {"step", "world_size", "update", "plan", "eval", "attributions", "verification", "realised", "timings"}


@pytest.fixture(scope="module")
def example(toy_world_dir) -> Any:
    """examples/trl_grpo.py as a module (the toy world built first, in the test cache)."""
    spec = importlib.util.spec_from_file_location("trl_grpo", REPO / "examples" / "trl_grpo.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["trl_grpo"] = module  # (its dataclasses look their module up)
    spec.loader.exec_module(module)
    return module


def train(example: Any, tmp_path: Any, probe: Any = None, callbacks: tuple = (), exact: bool = False, **run: Any):
    """Train a ToyTRLRun (with the probe attached when ``probe`` gives its settings); the trainer and the probe."""
    from callbacks.trl_live import TRLEntropyProbe

    trainer = example.make_trainer(example.ToyTRLRun(output_dir=str(tmp_path), **run))
    if exact:
        use_exact_trl_logprobs(trainer)
    for callback in callbacks:
        trainer.add_callback(callback)
    attached = None if probe is None else TRLEntropyProbe.attach(trainer, probe)
    trainer.train()
    return trainer, attached


@pytest.fixture(scope="module")
def probed_run(example, tmp_path_factory):
    """Three probed steps of TRL's default loss (dapo), two micro-batches of 16 sequences a step."""
    return train(example, tmp_path_factory.mktemp("trl_live"), example.probe_settings(), steps=3)


def test_every_probed_step_is_trls_fused_adamw_step_within_the_parameters_rounding(probed_run):
    trainer, probe = probed_run
    assert trainer.optimizer.optimizer.defaults["fused"]  # TRL's default optimizer: adamw_torch_fused
    assert [r["step"] for r in probe.records] == [0, 1, 2]
    for r in probe.records:
        v = r["verification"]
        assert v["ok"] and v["max_units"] <= 1.0, v  # measured 0.25-0.30 units
        assert v["n_parameters"] == 21
        assert r["update"]["n_sequences"] == 32 and r["update"]["clip_coef"] < 1  # clipped at max_grad_norm 1


def test_records_have_the_lightning_live_probes_schema_and_reach_the_trainers_log(probed_run):
    trainer, probe = probed_run
    for r in probe.records:
        assert set(r) == RECORD_KEYS
        full = r["eval"]["parts"]["full"]
        assert r["plan"]["etas"].index(r["update"]["lr"]) == 1 and len(full["delta_h"]) == 3
        assert math.isfinite(full["second_order"])
        assert sorted(r["attributions"]["index"]) == list(range(32))
        assert all(isinstance(g, str) and g.endswith("=") for g in r["attributions"]["group"])  # the prompt text
    logged = [h for h in trainer.state.log_history if "probe/live/verification/max_units" in h]
    assert [h["step"] for h in logged] == [1, 2, 3]  # after each step, at the trainer's global step
    directory = Path(trainer.args.output_dir) / "live_probe"
    assert len((directory / "records.jsonl").read_text().splitlines()) == 3
    assert (directory / "plots" / "live_entropy.png").is_file()


def test_the_sequences_explain_the_real_gradient_up_to_trls_float32_head(probed_run):
    # sum_i a_i (probe's per-sequence losses, float64 head) vs the slope along the real gradient (TRL's fused head,
    # float32 accumulation: ~1e-6 relative on the gradient, measured 3e-7 .. 2e-6 here)
    for r in probed_run[1].records:
        assert r["eval"]["attribution"]["relative_difference"] < 1e-4, r["eval"]["attribution"]


VARIANTS = {
    "grpo": dict(loss_type="grpo"),
    "dr_grpo": dict(loss_type="dr_grpo"),
    "dapo": dict(loss_type="dapo"),
    "luspo": dict(loss_type="luspo"),
    "cispo": dict(loss_type="cispo"),
    "sapo": dict(loss_type="sapo"),
    "bnpo_one_micro_batch": dict(loss_type="bnpo", gradient_accumulation_steps=1),
    "dapo_generation_batch_of_two_steps": dict(loss_type="dapo", steps_per_generation=4),
    "grpo_two_iterations": dict(loss_type="grpo", num_iterations=2),
}


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_the_probes_u_and_loss_give_trls_accumulated_gradient_in_float64(example, tmp_path, variant):
    from transformers import TrainerCallback

    from probe.live import eval_mode
    from probe.update import ReconstructionConfig, loss_gradients

    compared: list[dict] = []

    class Compare(TrainerCallback):  # runs before the probe's own on_pre_optimizer_step
        def on_pre_optimizer_step(self, args, state, control, **kwargs):
            policy = trainer.model
            step = probe.probed_step()
            params = {n: p for n, p in policy.named_parameters() if p.requires_grad}
            with eval_mode(policy):
                config = ReconstructionConfig()  # float64 head, no clipping (max_grad_norm 0)
                ours, _ = loss_gradients(policy, step.batch, params, step.loss, step.normalisers, config)
            scale = max(float(p.grad.abs().max()) for p in params.values())
            for name, p in params.items():
                torch.testing.assert_close(ours[name], p.grad, rtol=1e-10, atol=1e-10 * scale)
            compared.append({"old": step.batch.old_logprobs is not None, "n": len(step.batch), "scale": scale})

    from callbacks.trl_live import TRLEntropyProbe

    # 8 prompt groups a micro-batch: a step whose groups all have equal rewards (no gradient, no test) is unlikely
    # (about 0.5 ** 16 a step on the toy world)
    run = dict(steps=2, dtype=torch.float64, max_grad_norm=0.0, prompts_per_micro_batch=8, **VARIANTS[variant])
    trainer = example.make_trainer(example.ToyTRLRun(output_dir=str(tmp_path), **run))
    use_exact_trl_logprobs(trainer)
    trainer.add_callback(Compare())
    settings = example.probe_settings(n_prompts=4, n_per_prompt=2, second_order=False, realised=False)
    probe = TRLEntropyProbe.attach(trainer, settings)
    trainer.train()
    assert len(compared) == 2 and all(c["scale"] > 0 for c in compared)
    assert {c["old"] for c in compared} == {"steps_per_generation" in run or "num_iterations" in run}
    assert [c["n"] for c in compared] == [64 * run.get("gradient_accumulation_steps", 2)] * 2
    for r in probe.records:  # and the real float64 step is reconstructed to float64 rounding
        assert r["verification"]["ok"], r["verification"]


def test_attaching_the_probe_leaves_training_bitwise_unchanged(example, tmp_path):
    alone, _ = train(example, tmp_path / "alone", steps=3)
    probed, probe = train(example, tmp_path / "probed", example.probe_settings(n_prompts=8, n_per_prompt=4), steps=3)
    assert len(probe.records) == 3
    a, b = dict(alone.model.named_parameters()), dict(probed.model.named_parameters())
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    # and TRL's own logs are all there, with the same numbers (the probe's are added under probe/)
    trls = lambda t: [  # noqa: E731
        {k: v for k, v in h.items() if not k.startswith("probe/") and not k.endswith(("_time", "_runtime", "_second"))}
        for h in t.state.log_history
        if not any(k.startswith("probe/") for k in h)
    ]
    assert trls(alone) == trls(probed) and len([h for h in trls(alone) if "loss" in h]) == 3


def test_the_predicted_change_at_eta_lr_agrees_with_the_realised_change(example, tmp_path):
    # six steps at lr 2e-3, each probed on E = 128 prompts x 64 (8192) and measured on 128 x 16 (2048) fresh samples
    # of the old and of the new policy, paired by common random numbers (the default). The realised changes must be
    # jointly far from zero (sum of (delta_h / se)^2 over the six steps > 20, which no change would give with
    # p < 0.003), which makes the agreement a test. Measured over six TRL seeds (as another CPU's sampling would
    # differ): that sum 160 .. 1169, every |z| <= 2.20 (36 steps); with 8192 paired rows 455 .. 4866 and |z| <= 2.31
    # (12 s more); with two independent samples of 8192, 40 .. 1500 and |z| <= 2.45. These steps are large (1% .. 94%
    # of the rows unchanged by a step, se_independent / se 1.0 .. 11.6)
    settings = example.probe_settings(
        n_prompts=128, n_per_prompt=64, second_order=False, attribution=False, eta_factors=[1.0]
    )
    settings = dataclasses.replace(settings, eval=dataclasses.replace(settings.eval, realised_n_per_prompt=16))
    _, probe = train(example, tmp_path, settings, steps=6, learning_rate=2e-3)
    real = [r["realised"] for r in probe.records]
    assert len(real) == 6
    assert sum((x["delta_h"] / x["se"]) ** 2 for x in real) > 20, "the steps did not change the entropy: no test"
    for r, x in zip(probe.records, real):
        full = r["eval"]["parts"]["full"]
        assert x["pairing"] == "common_random_numbers" and x["old"]["n"] == x["new"]["n"] == 2048
        assert x["z"]["snis"] == pytest.approx((full["delta_h"][0] - x["delta_h"]) / math.hypot(x["se"], full["se"][0]))
        assert abs(x["z"]["snis"]) < 3.5, (r["step"], full["delta_h"], full["se"], x)  # six steps: ~0.3% if right


def test_what_the_probe_does_not_reproduce_is_refused_when_it_is_attached(example, tmp_path):
    from callbacks.trl_live import TRLEntropyProbe

    trainer = example.make_trainer(example.ToyTRLRun(output_dir=str(tmp_path), loss_type="bnpo"))
    with pytest.raises(ValueError, match="bnpo over 2 micro-batches"):
        TRLEntropyProbe.attach(trainer)
    with pytest.raises(TypeError, match="attaches to TRL's GRPOTrainer"):
        TRLEntropyProbe.attach(dataclasses.make_dataclass("NotTRL", [])())


@pytest.mark.slow
@pytest.mark.parametrize("loss_type", ["dapo", "grpo"])
def test_two_ddp_processes_give_the_probe_the_whole_steps_u_and_its_normalisers(tmp_path, loss_type, toy_world_dir):
    # each process keeps its own micro-batches; the normalisers count both processes' sequences (grpo) or TRL's
    # num_items_in_batch over both (dapo); summed over the processes, probe's gradient of each U is the all-reduced
    # gradient DDP gives the optimizer (measured 4e-16 of its largest element), and every process verifies its step
    import os
    import subprocess

    env = {**os.environ, "WANDB_MODE": "disabled", "OMP_NUM_THREADS": "1"}
    worker = str(REPO / "tests" / "trl_ddp_worker.py")
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", worker, str(tmp_path), loss_type]
    out = subprocess.run(command, capture_output=True, text=True, cwd=tmp_path, env=env, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert all(r["world_size"] == 2 for r in ranks)
    for step in range(2):
        ours = [r["compared"][step] for r in ranks]
        assert all(c["n"] == 64 and c["N"] == 128 and c["worst"] < 1e-12 for c in ours), ours
        assert sorted(ours[0]["index"] + ours[1]["index"]) == list(range(128))  # unique across the processes
    records = ranks[0]["records"]
    assert [r["step"] for r in records] == [0, 1]
    for r in records:
        assert r["world_size"] == 2 and r["update"]["n_sequences"] == 128
        assert r["verification"]["max_units_all_ranks"] <= 1.0 and len(r["verification"]["ranks"]) == 2
        assert sorted(r["attributions"]["index"]) == list(range(128))
