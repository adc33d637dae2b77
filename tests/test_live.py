"""The live entropy probe attached to `python -m probe fit` on the toy world.

What a user relies on: the step the callback reconstructs from the real gradients is the step AdamW
takes (float64: to 1e-12 relative; float32: within the parameters' own rounding), a wrong step is
reported loudly, the module's declared per-sequence losses explain its real gradient (attributions
sum to the gradient part's first order), the prediction at eta = lr agrees with the change measured on
fresh samples of the new policy, and a two-process DDP run gives the numbers of one process.
"""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

from probe.cli import main

REPO = Path(__file__).resolve().parents[1]
CONFIG = str(REPO / "configs" / "toy_grpo.yaml")
QUIET = [
    "--trainer.logger", "false", "--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false",
    "--model.init_args.checkpoint_every_n_steps", "-1", "--trainer.enable_checkpointing", "false",
    "--model.init_args.save_policy", "false",
]  # fmt: skip
PROBE = "--trainer.callbacks.init_args."
# A small run probed at every step: 4 prompts x G = 8 per step, two PPO inner epochs per rollout (step 1
# reuses step 0's rollout with ratio != 1 and clipping), E = 8 prompts x 4 samples.
SMALL = [
    "--trainer.max_steps", "3", "--data.init_args.prompts_per_step", "4", "--model.init_args.optimizer.lr", "1e-3",
    "--model.init_args.rollout.inner_epochs", "2", "--model.init_args.loss.clip_ratio", "0.05", f"{PROBE}every_n_steps", "1",
    f"{PROBE}eval", "{source: {prompts: toy, n_prompts: 8, offset: 1000}, sampling: {n_per_prompt: 4, max_new_tokens: 4, seed: 1}}",
]  # fmt: skip


def records(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "live_probe" / "records.jsonl").read_text().splitlines()]


def fit(root: Path, name: str, *extra: str) -> Path:
    main(["fit", "--config", CONFIG, *QUIET, "--model.init_args.run.root", str(root), "--model.init_args.run.name", name, *extra])
    return root / name


@pytest.fixture(scope="module")
def float32_run(tmp_path_factory, toy_world_dir) -> Path:
    return fit(tmp_path_factory.mktemp("live32"), "one", *SMALL)


def test_every_probed_step_is_reconstructed_within_the_parameters_rounding_in_float32(float32_run):
    recs = records(float32_run)
    assert [r["step"] for r in recs] == [0, 1, 2]
    for r in recs:
        v = r["verification"]
        # |lr*full - dp| <= 2 ulp(|p|) + 1e-6 lr (|baseline| + |grad|) everywhere (measured: ~0.6 units)
        assert v["max_units"] <= 1.0 and v["ok"], v
        assert v["n_parameters"] == 21  # every tensor of the toy Llama is trained and checked


def test_the_modules_declared_losses_explain_its_real_gradient_also_in_ppo_inner_epochs(float32_run):
    for r in records(float32_run):
        att = r["attribution"]
        # sum_i <G_E, K g_i> (per-sequence losses, one JVP over U) vs the slope along the gradient part of the
        # real step (one JVP over E): equal up to float32 rounding when the module's probe_batch / probe_loss /
        # probe_normalisers give the gradient the optimizer saw. The rounding is amplified at Adam's first steps,
        # where K ~ 1/|g| is huge on tiny gradients (measured up to 2e-4 at step 0, ~1e-6 later); a declared loss
        # that is not the trained one is off by far more (see the next test)
        assert att["relative_gap"] < 1e-3, (r["step"], att)
        assert len(att["attributions"]) == r["update"]["n_sequences"] == len(set(att["index"]))


def test_a_module_that_declares_another_loss_than_it_trains_is_exposed_by_the_attribution_gap(tmp_path, toy_world_dir):
    from dataclasses import replace

    import lightning.pytorch as pl

    from callbacks.live import LiveEntropyProbe, LiveEvalSettings
    from datamodules.prompts import PromptDataModule
    from probe.grpo import AdamWSettings, FitRunSettings, GRPOModule
    from probe.sampling import SamplingSettings

    class DeclaresAnotherTemperature(GRPOModule):  # trains log-probs at temperature 1, tells the probe 0.5
        def training_step(self, batch, batch_idx):
            loss = super().training_step(batch, batch_idx)
            self.probe_loss = replace(self.probe_loss, temperature=0.5)
            return loss

    module = DeclaresAnotherTemperature(optimizer=AdamWSettings(lr=1e-3), run=FitRunSettings(root=str(tmp_path), name="lies"),
                               checkpoint_every_n_steps=-1, save_policy=False)
    probe = LiveEntropyProbe(eval=LiveEvalSettings(sampling=SamplingSettings(n_per_prompt=2, max_new_tokens=4)),
                             second_order=False, realised=False)
    trainer = pl.Trainer(accelerator="cpu", devices=1, max_steps=2, gradient_clip_val=1.0, logger=False, callbacks=[probe],
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(module, datamodule=PromptDataModule(prompts_per_step=4))
    for r in probe.records:
        assert r["verification"]["ok"]  # the step itself is still reconstructed exactly, from the real gradients
        assert r["attribution"]["relative_gap"] > 1e-2, r["attribution"]  # but the per-sequence losses do not add up to it


def test_attaching_the_probe_leaves_the_training_run_unchanged(float32_run, tmp_path):
    # the callback samples with its own generators, never touches .grad, and restores the policy's mode
    import torch
    from safetensors.torch import load_file

    alone = fit(tmp_path, "alone", *SMALL, "--trainer.callbacks", "[]", "--model.init_args.save_policy", "true")
    with_probe = fit(tmp_path, "probed", *SMALL, "--model.init_args.save_policy", "true")
    history = lambda run: (run / "history.jsonl").read_text().splitlines()  # noqa: E731
    strip = lambda lines: [{k: v for k, v in json.loads(x).items() if k != "sampling_s"} for x in lines]  # noqa: E731
    assert strip(history(alone)) == strip(history(with_probe)) == strip(history(float32_run))
    a, b = load_file(str(alone / "policy" / "model.safetensors")), load_file(str(with_probe / "policy" / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)  # bitwise the same final policy


def test_records_carry_predictions_realised_changes_and_timings(float32_run):
    for r in records(float32_run):
        p = r["prediction"]
        assert p["etas"][1] == pytest.approx(r["lr"]) and len(p["delta_h"]) == 3
        assert p["at_lr"]["snis"] == p["delta_h"][1]
        assert math.isfinite(p["second_derivative"]) and math.isfinite(p["first_order_slope"])
        assert r["realised"]["se"] == pytest.approx(math.hypot(r["realised"]["old"]["se"], r["realised"]["new"]["se"]))
        assert r["realised"]["old"]["mean"] == pytest.approx(r["eval"]["entropy"])  # refreshed E is the old sample
        t = r["timings"]
        assert t["total_s"] == pytest.approx(t["before_step_s"] + t["after_step_s"]) and t["total_s"] > 0
    assert (float32_run / "live_probe" / "plots" / "live_entropy.png").is_file()


def test_float64_steps_are_reconstructed_to_1e12_relative(tmp_path, toy_world_dir):
    run = fit(tmp_path, "f64", *SMALL[:2], "--model.init_args.policy.dtype", "float64", f"{PROBE}every_n_steps", "1",
              "--data.init_args.prompts_per_step", "4", f"{PROBE}realised", "false", f"{PROBE}second_order", "false",
              f"{PROBE}eval", "{source: {prompts: toy, n_prompts: 4, offset: 1000}, sampling: {n_per_prompt: 2, max_new_tokens: 4}}")
    recs = records(run)
    assert len(recs) == 3
    for r in recs:
        v = r["verification"]
        # ||lr*full - dp|| / ||dp|| over the whole model; measured ~1e-13 (the floor is ulp(|p|)/|step|)
        assert v["relative_error"] < 1e-12 and v["max_units"] <= 1.0, v
        assert r["attribution"]["relative_gap"] < 1e-9  # float64 policy: the two routes agree to ~1e-12


def test_a_step_that_differs_from_the_reconstruction_is_reported_loudly(tmp_path, toy_world_dir):
    import lightning.pytorch as pl

    from callbacks.live import LiveEntropyProbe, LiveEvalSettings
    from datamodules.prompts import PromptDataModule
    from probe.grpo import AdamWSettings, FitRunSettings, GRPOModule
    from probe.sampling import SamplingSettings

    class FreezesItsHead(GRPOModule):  # changes a gradient after the callbacks' hook has read them
        def on_before_optimizer_step(self, optimizer):
            self.policy.lm_head.weight.grad.zero_()

    module = FreezesItsHead(optimizer=AdamWSettings(lr=1e-3), run=FitRunSettings(root=str(tmp_path), name="wrong"),
                         checkpoint_every_n_steps=-1, save_policy=False)
    probe = LiveEntropyProbe(eval=LiveEvalSettings(sampling=SamplingSettings(n_per_prompt=2, max_new_tokens=4)),
                             second_order=False, attribution=False, realised=False)
    trainer = pl.Trainer(accelerator="cpu", devices=1, max_steps=1, gradient_clip_val=1.0, logger=False, callbacks=[probe],
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
    with pytest.warns(UserWarning, match="rounding units away from the reconstructed step"):
        trainer.fit(module, datamodule=PromptDataModule(prompts_per_step=4))
    v = probe.records[0]["verification"]
    assert not v["ok"] and v["worst_parameter"] == "lm_head.weight" and v["max_units"] > 1e3


def test_the_predicted_change_at_eta_lr_agrees_with_the_realised_change_on_fresh_samples(tmp_path, toy_world_dir):
    # one GRPO step at lr 3e-4 from the toy world; E = 64 prompts x 32 samples, E' = 64 x 64 fresh samples
    run = fit(tmp_path, "pred", "--trainer.max_steps", "1", "--model.init_args.optimizer.lr", "3e-4",
              f"{PROBE}second_order", "false", f"{PROBE}attribution", "false", f"{PROBE}eta_factors", "[1.0]",
              f"{PROBE}eval", "{source: {prompts: toy, n_prompts: 64, offset: 1000}, sampling: {n_per_prompt: 32, max_new_tokens: 4, seed: 1}, realised_n_per_prompt: 64}")
    (r,) = records(run)
    predicted, real = r["prediction"]["at_lr"], r["realised"]
    # measured: SNIS 0.050 +- 0.008 (ESS 1207 of 2048), realised 0.044 +- 0.008: z = 0.6
    assert abs(real["delta_h"]) > 3 * real["se"], "the step must change the entropy measurably for the check to mean anything"
    assert abs(real["z_snis"]) < 3.0, (predicted, real)
    assert real["z_snis"] == pytest.approx((predicted["snis"] - real["delta_h"]) / math.hypot(real["se"], predicted["snis_se"]))


def test_a_held_evaluation_batch_is_reweighted_to_the_current_policy(tmp_path, toy_world_dir):
    logger = "{class_path: lightning.pytorch.loggers.CSVLogger, init_args: {save_dir: %s, name: csv}}" % tmp_path
    run = fit(tmp_path, "held", "--trainer.max_steps", "2", "--data.init_args.prompts_per_step", "4",
              f"{PROBE}second_order", "false", f"{PROBE}every_n_steps", "1", "--trainer.logger", logger,
              f"{PROBE}eval", "{source: {prompts: toy, n_prompts: 8, offset: 1000}, sampling: {n_per_prompt: 4, max_new_tokens: 4}, refresh: false}")
    recs = records(run)
    assert [r["step"] for r in recs] == [0, 1]
    for r in recs:
        assert "attribution" not in r  # G_E assumes E ~ pi_theta
        assert r["eval"]["refreshed"] is False and r["eval"]["n"] == 32
        assert r["prediction"]["ess"][1] > 0 and math.isfinite(r["prediction"]["at_lr"]["snis"])
        assert r["realised"]["old"]["n"] == 32  # H(old) from a fresh sample of pi_old, not from the held E
    assert recs[1]["eval"]["entropy"] != recs[0]["eval"]["entropy"]  # same E, evaluated at the new theta
    assert recs[0]["eval"]["ess_vs_sampling_policy"] == pytest.approx(32)  # step 0: theta is the sampling policy
    # the Trainer's logger got the same numbers (any Lightning logger; W&B through WandbLogger.log_metrics)
    (metrics,) = list(tmp_path.glob("csv/version_*/metrics.csv"))
    header, *rows = metrics.read_text().splitlines()
    for key in ("live/pred_delta_h", "live/realised_delta_h", "live/verify_max_units", "live/overhead_s"):
        assert key in header.split(","), key


@pytest.mark.slow
def test_two_ddp_processes_probe_the_steps_of_one(float32_run, tmp_path):
    """Both runs see the same global prompt batches (data.prompts_per_step is global, each prompt group is sampled
    with its own seed, loss normalisers are all-reduced), so U, the gradient and hence every recorded number agree
    up to float32 rounding of the summation order (gradients ~1e-7 relative; JVP-based numbers ~1e-5)."""
    env = {**os.environ, "WANDB_MODE": "disabled"}
    env.pop("PROBE_RUN_NAME", None)
    cmd = [sys.executable, "-m", "probe", "fit", "--config", CONFIG, *QUIET, *SMALL, "--model.init_args.run.root",
           str(tmp_path), "--model.init_args.run.name", "two", "--model.init_args.run.num_threads", "1",
           "--trainer.strategy", "ddp", "--trainer.devices", "2", "--trainer.accelerator", "cpu"]  # fmt: skip
    out = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, env=env, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    one, two = records(float32_run), records(tmp_path / "two")
    assert len(one) == len(two) == 3
    hist = lambda run: [json.loads(x) for x in (run / "history.jsonl").read_text().splitlines()]  # noqa: E731
    assert [h["mean_reward"] for h in hist(tmp_path / "two")] == [h["mean_reward"] for h in hist(float32_run)]
    for a, b in zip(one, two):
        assert b["world_size"] == 2 and a["world_size"] == 1
        assert b["update"]["n_sequences"] == a["update"]["n_sequences"]
        assert b["attribution"]["index"] == a["attribution"]["index"]  # the same global U, in the same order
        assert b["update"]["rank_norm_spread"] == 0.0  # both ranks reconstructed the identical step
        assert len(b["verification"]["ranks"]) == 2 and b["verification"]["max_units_all_ranks"] <= 1.0
        close = lambda x, y, rtol: x == pytest.approx(y, rel=rtol, abs=1e-9)  # noqa: E731
        assert close(b["update"]["grad_norm"], a["update"]["grad_norm"], 1e-5)
        assert close(b["prediction"]["at_lr"]["snis"], a["prediction"]["at_lr"]["snis"], 1e-3)
        assert close(b["prediction"]["first_order_slope"], a["prediction"]["first_order_slope"], 1e-3)
        assert close(b["attribution"]["sum"], a["attribution"]["sum"], 1e-3)
        assert b["attribution"]["attributions"] == pytest.approx(a["attribution"]["attributions"], rel=1e-3, abs=1e-6)
        assert close(b["realised"]["delta_h"], a["realised"]["delta_h"], 1e-3)
