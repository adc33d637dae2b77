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

from support import QUIET, REPO, SMALL, assert_live_runs_agree, eval_arg, fit_args, flags, probe, records


@pytest.fixture(scope="module")
def fit(run_fit):
    def run(root: Path, name: str, *extra: str) -> Path:
        return run_fit(root, name, *QUIET, *extra)

    return run


@pytest.fixture(scope="module")
def float32_run(tmp_path_factory, fit) -> Path:
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
        att = r["eval"]["attribution"]
        # sum_i <G_E, K g_i> (per-sequence losses, one JVP over U) vs the slope along the gradient part of the
        # real step (one JVP over E): equal up to float32 rounding when the U, loss and
        # normalisers of its probed_step() give the gradient the optimizer saw. Rounding is amplified at Adam's first
        # steps,
        # where K ~ 1/|g| is huge on tiny gradients (measured up to 2e-4 at step 0, ~1e-6 later); a declared loss
        # that is not the trained one is off by far more (see the next test)
        assert att["relative_difference"] < 1e-3, (r["step"], att)
        per_sequence = r["attributions"]
        assert len(per_sequence["values"]) == r["update"]["n_sequences"] == len(set(per_sequence["index"]))


def fit_module(module_class: type, root: Path, max_steps: int, **probe_settings) -> list[dict]:
    """Fit a GRPOModule subclass on the toy world (lr 1e-3, 4 prompts a step, E = 32 prompts x 2) with the live
    probe attached, through a plain Lightning Trainer; the probe's records."""
    import lightning.pytorch as pl

    from callbacks.live import LiveEntropyProbe, LiveEvalSettings
    from datamodules.prompts import PromptDataModule
    from probe.grpo import AdamWSettings, FitRunSettings
    from probe.sampling import SamplingSettings

    run = FitRunSettings(root=str(root), name=module_class.__name__)
    module = module_class(optimizer=AdamWSettings(lr=1e-3), run=run, checkpoint_every_n_steps=-1, save_policy=False)
    E = LiveEvalSettings(sampling=SamplingSettings(n_per_prompt=2, max_new_tokens=4))
    probe = LiveEntropyProbe(eval=E, second_order=False, realised=False, **probe_settings)
    quiet = dict(logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
    trainer = pl.Trainer(
        accelerator="cpu", devices=1, max_steps=max_steps, gradient_clip_val=1.0, callbacks=[probe], **quiet
    )
    trainer.fit(module, datamodule=PromptDataModule(prompts_per_step=4))
    return probe.records


def test_a_module_that_declares_another_loss_than_it_trains_is_exposed_by_the_attribution_gap(tmp_path, toy_world_dir):
    from dataclasses import replace

    from probe.grpo import GRPOModule

    class DeclaresAnotherTemperature(GRPOModule):  # trains log-probs at temperature 1, tells the probe 0.5
        def probed_step(self):
            step = super().probed_step()
            return replace(step, loss=replace(step.loss, temperature=0.5))

    for r in fit_module(DeclaresAnotherTemperature, tmp_path, max_steps=2):
        assert r["verification"]["ok"]  # the step itself is still reconstructed exactly, from the real gradients
        att = r["eval"]["attribution"]
        assert att["relative_difference"] > 1e-2, att  # but the per-sequence losses do not add up to it


def test_attaching_the_probe_leaves_the_training_run_unchanged(float32_run, tmp_path, fit):
    # the callback samples with its own generators, never touches .grad, and restores the policy's mode
    import torch
    from safetensors.torch import load_file

    alone = fit(tmp_path, "alone", *SMALL, "--trainer.callbacks", "[]", "--model.init_args.save_policy", "true")
    with_probe = fit(tmp_path, "probed", *SMALL, "--model.init_args.save_policy", "true")
    history = lambda run: (run / "history.jsonl").read_text().splitlines()  # noqa: E731
    strip = lambda lines: [{k: v for k, v in json.loads(x).items() if k != "sampling_s"} for x in lines]  # noqa: E731
    assert strip(history(alone)) == strip(history(with_probe)) == strip(history(float32_run))
    a, b = (
        load_file(str(alone / "policy" / "model.safetensors")),
        load_file(str(with_probe / "policy" / "model.safetensors")),
    )
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)  # bitwise the same final policy


def test_records_carry_predictions_realised_changes_and_timings(float32_run):
    for r in records(float32_run):
        full = r["eval"]["parts"]["full"]
        assert r["plan"]["etas"].index(r["update"]["lr"]) == 1 and len(full["delta_h"]) == 3  # 0.1, 1, 10 x lr
        assert math.isfinite(full["second_order"]) and math.isfinite(full["first_order"])
        assert full["predicted_first"][1] == pytest.approx(full["first_order"] * r["update"]["lr"], rel=1e-12)
        x = r["realised"]  # paired by default: pi_old's own sample (not E) and pi_new's with the same uniforms
        assert x["pairing"] == "common_random_numbers" and x["old"]["n"] == x["new"]["n"] == 8 * 4
        assert x["delta_h"] == pytest.approx(x["new"]["mean"] - x["old"]["mean"], abs=1e-12)
        assert x["se_independent"] == pytest.approx(math.hypot(x["old"]["se"], x["new"]["se"]))
        assert 0 <= x["identical_fraction"] <= 1 and x["se"] > 0
        t = r["timings"]
        assert t["total_s"] == pytest.approx(t["before_step_s"] + t["after_step_s"]) and t["total_s"] > 0
    assert (float32_run / "live_probe" / "plots" / "live_entropy.png").is_file()


def test_records_set_the_covariance_law_and_the_reward_beside_the_exact_change(float32_run):
    for r in records(float32_run):
        ev, lr = r["eval"], r["update"]["lr"]
        law = ev["covariance_law"]  # on the step's U, its tokens compared with the exact per-token attribution
        assert law["delta_h_at_lr"] == ev["parts"]["full"]["delta_h"][1]
        assert law["grad_first_order_at_lr"] == pytest.approx(lr * ev["attribution"]["sum"], rel=1e-12)
        assert law["law_at_lr"] == pytest.approx(-lr * law["batch_mean"], rel=1e-12)
        assert law["k"] >= 1 and 0 <= law["top_overlap"] <= 1 and -1 <= law["rank_correlation"] <= 1
        assert ev["attribution"]["top_tokens"] and "value" in ev["attribution"]["top_tokens"][0]
        reward = ev["reward"]  # E scored with the toy reward: its change along the step, attributed to U
        assert len(reward["parts"]["full"]["delta_r"]) == 3 and reward["attribution"]["ok"]
        assert reward["attribution"]["grad_first_order"] is not None
    assert (float32_run / "live_probe" / "plots" / "covariance_law.png").is_file()


def test_offline_and_live_results_use_the_same_field_names(float32_run, tmp_path, run_predict):
    from probe.results import EvalResult, PartResult, metrics

    summary = run_predict(tmp_path, "offline", "--model.init_args.probe.parts", "[full]")
    live = records(float32_run)[0]
    offline_eval, live_eval = summary["evals"][0], live["eval"]
    # the same schema: an EvalResult; the live record leaves out what it did not compute (the matrix)
    assert set(live_eval) <= {f.name for f in EvalResult.__dataclass_fields__.values()}
    assert set(offline_eval) - {"eval_update_matrix", "additivity"} == set(live_eval)
    assert set(offline_eval["covariance_law"]) == set(live_eval["covariance_law"])
    assert set(offline_eval["reward"]) == set(live_eval["reward"])  # both E scored with the toy reward
    assert set(offline_eval["reward"]["parts"]["full"]) == set(live_eval["reward"]["parts"]["full"])
    assert set(offline_eval["parts"]["full"]) == set(live_eval["parts"]["full"]) == set(PartResult.__dataclass_fields__)
    assert set(offline_eval["attribution"]) == set(live_eval["attribution"])
    assert set(offline_eval["base_entropy"]) == set(live_eval["base_entropy"])
    assert set(summary["update"]) <= set(live["update"])
    assert set(summary["plan"]) >= set(live["plan"])
    # and the same metric keys, with the real step labelled "lr" in both
    offline_keys = set(metrics(EvalResult.from_dict(offline_eval), summary["plan"]["etas"], summary["update"]["lr"]))
    live_keys = set(metrics(EvalResult.from_dict(live_eval), live["plan"]["etas"], live["update"]["lr"]))
    for key in (
        "eval_00/full/delta_h@lr",
        "eval_00/full/se@lr",
        "eval_00/full/first_order",
        "eval_00/base_entropy",
        "eval_00/covariance_law/batch_mean",
        "eval_00/reward/full/delta_r@lr",
    ):
        assert key in offline_keys and key in live_keys, key


def test_float64_steps_are_reconstructed_to_1e12_relative(tmp_path, fit):
    settings = probe(every_n_steps=1, realised=False, second_order=False, eval=eval_arg(4, 2))
    steps = flags(
        {"trainer.max_steps": 3, "data.init_args.prompts_per_step": 4, "model.init_args.policy.dtype": "float64"}
    )
    run = fit(tmp_path, "f64", *steps, *settings)
    recs = records(run)
    assert len(recs) == 3
    for r in recs:
        v = r["verification"]
        # ||lr*full - dp|| / ||dp|| over the whole model; measured ~1e-13 (the floor is ulp(|p|)/|step|)
        assert v["relative_error"] < 1e-12 and v["max_units"] <= 1.0, v
        assert r["eval"]["attribution"]["relative_difference"] < 1e-9  # float64 policy: the two routes agree to ~1e-12


def test_a_step_that_differs_from_the_reconstruction_is_reported_loudly(tmp_path, toy_world_dir):
    from probe.grpo import GRPOModule

    class FreezesItsHead(GRPOModule):  # changes a gradient after the callbacks' hook has read them
        def on_before_optimizer_step(self, optimizer):
            self.policy.lm_head.weight.grad.zero_()

    with pytest.warns(UserWarning, match="rounding units away from the reconstructed step"):
        records = fit_module(FreezesItsHead, tmp_path, max_steps=1, attribution=False)
    v = records[0]["verification"]
    assert not v["ok"] and v["worst_parameter"] == "lm_head.weight" and v["max_units"] > 1e3


def test_the_predicted_change_at_eta_lr_agrees_with_the_realised_change_on_independent_fresh_samples(tmp_path, fit):
    # three GRPO steps at lr 5e-4 from the toy world, each probed on E = 128 prompts x 64 samples (8192) and
    # measured on E' = 128 x 64 independent fresh samples of the new policy (E itself is pi_old's sample). How much one
    # step changes the entropy depends on the sampled U (so on the CPU's rounding); over three steps at least one
    # changes it measurably, which makes the agreement a test (measured here: realised -0.036 +- 0.003 at one step,
    # |z| <= 1.1 at all three). The paired realised change (the default) is tests/test_realised.py's
    E = eval_arg(128, 64, seed=1, realised_n_per_prompt=64, realised_pairing="independent")
    settings = probe(every_n_steps=1, second_order=False, attribution=False, eta_factors="[1.0]", eval=E)
    steps = flags({"trainer.max_steps": 3, "model.init_args.optimizer.lr": 5e-4})
    run = fit(tmp_path, "pred", *steps, *settings)
    recs = records(run)
    assert len(recs) == 3
    real = [r["realised"] for r in recs]
    assert max(abs(x["delta_h"]) / x["se"] for x in real) > 4, "no step changed the entropy measurably: no test"
    for r, x in zip(recs, real):
        full = r["eval"]["parts"]["full"]
        assert x["pairing"] == "independent" and "identical_fraction" not in x  # (rows not paired)
        assert x["se"] == pytest.approx(math.hypot(x["old"]["se"], x["new"]["se"])) == x["se_independent"]
        assert x["old"]["mean"] == pytest.approx(r["eval"]["base_entropy"]["sequence"])  # the refreshed E is pi_old's
        assert x["z"]["snis"] == pytest.approx((full["delta_h"][0] - x["delta_h"]) / math.hypot(x["se"], full["se"][0]))
        assert abs(x["z"]["snis"]) < 3.5, (r["step"], full["delta_h"], full["se"], x)  # 3 steps: ~0.05% each if right


def test_a_held_evaluation_batch_is_reweighted_to_the_current_policy(tmp_path, fit):
    logger = "{class_path: lightning.pytorch.loggers.CSVLogger, init_args: {save_dir: %s, name: csv}}" % tmp_path
    settings = probe(every_n_steps=1, second_order=False, eval=eval_arg(8, 4, refresh=False))
    steps = flags({"trainer.max_steps": 2, "data.init_args.prompts_per_step": 4, "trainer.logger": logger})
    run = fit(tmp_path, "held", *steps, *settings)
    recs = records(run)
    assert [r["step"] for r in recs] == [0, 1]
    for r in recs:
        assert "attribution" not in r["eval"] and "attributions" not in r  # G_E assumes E ~ pi_theta
        assert r["eval"]["on_policy"] is False and r["eval"]["n_sequences"] == 32
        full = r["eval"]["parts"]["full"]
        assert full["ess"][1] > 0 and math.isfinite(full["delta_h"][1])
        assert r["realised"]["old"]["n"] == 32  # H(old) from a fresh sample of pi_old, not from the held E
        assert r["realised"]["pairing"] == "common_random_numbers" and r["realised"]["new"]["n"] == 32
    entropy = [r["eval"]["base_entropy"]["sequence"] for r in recs]
    assert entropy[1] != entropy[0]  # same E, evaluated at the new theta
    assert recs[0]["eval"]["ess_vs_sampling_policy"] == pytest.approx(32)  # step 0: theta is the sampling policy
    # the Trainer's logger got the same numbers (any Lightning logger; W&B through WandbLogger.log_metrics)
    (metrics,) = list(tmp_path.glob("csv/version_*/metrics.csv"))
    header, *rows = metrics.read_text().splitlines()
    keys = ("eval_00/full/delta_h@lr", "live/realised/delta_h", "live/realised/se_independent")
    for key in (*keys, "live/verification/max_units", "live/overhead_s"):
        assert key in header.split(","), key


@pytest.mark.slow
def test_two_ddp_processes_probe_the_steps_of_one(tmp_path, fit):
    """Both runs see the same global prompt batches (data.prompts_per_step is global, each prompt group is sampled
    with its own seed, loss normalisers are all-reduced), so U, the gradient and hence every recorded number agree
    up to rounding of the summation order. Compared in float64: in float32 the attributions of Adam's first step are
    ill-conditioned, not wrong. At t = 1, K = coef / (|g| + eps) elementwise, so where the summed gradient of an
    element nearly cancels, K (and the real step's sign there) is set by rounding; a few such elements move every
    a_i, and two summation orders (one process vs DDP's all-reduce) gave a_i 1.5e-2 apart on one CPU."""
    float64 = ("--model.init_args.policy.dtype", "float64")
    fit(tmp_path, "one", *SMALL, *float64)
    env = {**os.environ, "WANDB_MODE": "disabled"}
    env.pop("PROBE_RUN_NAME", None)
    ddp = ("--trainer.strategy", "ddp", "--trainer.devices", "2", "--trainer.accelerator", "cpu")
    command = [
        sys.executable,
        "-m",
        "probe",
        *fit_args(tmp_path, "two", *QUIET, *SMALL, *float64, *ddp, "--model.init_args.run.num_threads", "1"),
    ]
    out = subprocess.run(command, capture_output=True, text=True, cwd=REPO, env=env, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    assert_live_runs_agree(tmp_path / "one", tmp_path / "two", attribution_atol=1e-12)


def readme_module() -> type:
    """The minimal training module of README.md ("A minimal training module"), executed as written."""
    text = (REPO / "README.md").read_text()
    section = text[text.index("### A minimal training module") :]
    code = section[
        section.index("```python") + len("```python") : section.index("```\n", section.index("```python") + 9)
    ]
    namespace: dict = {}
    exec(compile(code, "README.md", "exec"), namespace)
    return namespace["FixedBatchReinforce"]


def test_the_readme_minimal_module_is_probed_exactly(tmp_path, toy_world_dir):
    import lightning.pytorch as pl
    import torch

    from callbacks.live import LiveEntropyProbe, LiveEvalSettings
    from probe.live_contract import is_live_probe_target
    from probe.loading import load_policy
    from probe.sampling import SamplingSettings, sample_update_batch
    from probe.toy import task

    policy, tokenizer = load_policy(toy_world_dir)
    sampling = SamplingSettings(n_per_prompt=4, max_new_tokens=4, seed=0)
    records = sample_update_batch(
        policy, task.make_prompts(4, seed=0), sampling, reward_fn=task.reward_ids, tokenizer=tokenizer
    )
    module = readme_module()(policy, tokenizer, records, lr=1e-3)
    assert is_live_probe_target(module)
    probe = LiveEntropyProbe(every_n_steps=1, eval=LiveEvalSettings(sampling=SamplingSettings(2, 4)), realised=False)
    quiet = dict(logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
    trainer = pl.Trainer(max_steps=3, gradient_clip_val=1.0, callbacks=[probe], default_root_dir=tmp_path, **quiet)
    trainer.fit(module, torch.utils.data.DataLoader(range(3)))
    assert [r["step"] for r in probe.records] == [0, 1, 2]
    for r in probe.records:
        assert r["verification"]["ok"], r["verification"]  # the step the optimizer took is the one reconstructed
        assert r["eval"]["attribution"]["relative_difference"] < 1e-3  # and its declared loss explains it
    assert (tmp_path / "live_probe" / "records.jsonl").is_file()


def test_a_held_evaluation_batch_from_a_file_must_say_how_it_was_sampled(tmp_path, fit):
    # "<bos> 3 + 4 =" -> "7 <eos>" in the toy vocabulary, written without temperature / top_p / top_k
    record = {"prompt_ids": [1, 7, 14, 8, 15], "response_ids": [11, 2], "group": 0}
    held = tmp_path / "held.jsonl"
    held.write_text("".join(json.dumps(dict(record, group=g)) + "\n" for g in range(4)))
    settings = probe(every_n_steps=1, eval=f"{{path: {held}, refresh: false}}")
    with pytest.raises(ValueError, match=r"held.jsonl: no record says how this evaluation batch was sampled"):
        fit(tmp_path, "held_file", *flags({"trainer.max_steps": 1, "data.init_args.prompts_per_step": 2}), *settings)


def test_the_fused_cuda_kernel_alone_is_allowed_its_measured_rounding():
    # CUDA's fused AdamW differs from probe's reconstruction by up to 9.6 units of 1e-6 of the step's terms (H200,
    # benchmarks/README.md); every other kernel keeps the dtype's bound, and the bound applies as given
    import torch

    from probe.adam import AdamState
    from probe.update import update_from_gradients
    from probe.verification import FUSED_CUDA_ROUNDING, step_rounding, verify_step

    model = torch.nn.Linear(64, 64)
    named = dict(model.named_parameters())
    assert step_rounding(torch.optim.AdamW(model.parameters(), fused=True), named) is None  # on the CPU
    assert step_rounding(torch.optim.AdamW(model.parameters(), foreach=True), named) is None
    assert FUSED_CUDA_ROUNDING == 1e-4
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    for _ in range(2):
        for p in model.parameters():
            p.grad = torch.randn_like(p)
        state = AdamState.from_optimizer(opt, model)
        update = update_from_gradients(named, {n: p.grad for n, p in named.items()}, state)
        before = {n: p.detach().clone() for n, p in named.items()}
        opt.step()
    strict, loose = verify_step(model, update, before), verify_step(model, update, before, FUSED_CUDA_ROUNDING)
    assert strict["ok"] and strict["step_rounding"] is None and loose["step_rounding"] == 1e-4
    assert loose["max_units"] < strict["max_units"]
