"""The predict pipeline end to end: `python -m probe predict` on a small toy run.

What a user relies on: the run directory of docs/DESIGN.md section 9 with numbers that agree with
each other (contributions sum to Delta H, attributions sum to the grad part's first order,
the saved update is baseline + grad), a finished run is never overwritten, an interrupted
run resumes to the same numbers, and every config in configs/ parses.
"""

from __future__ import annotations

import contextlib
import json
import logging
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from support import REPO

# the parts of the small run the tests compare with: the default three and the additivity check
WITH_ADDITIVITY_CHECK = ("--model.init_args.probe.parts", "[full, baseline, grad, baseline_plus_grad]")


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory, run_predict) -> tuple[Path, dict]:
    root = tmp_path_factory.mktemp("runs")
    return root / "small", run_predict(root, "small", *WITH_ADDITIVITY_CHECK)


def test_run_directory_holds_the_design_layout(finished_run):
    run, summary = finished_run
    assert summary["status"] == "complete" and summary["schema_version"] == 1
    J = len(summary["plan"]["etas"])
    for part in summary["plan"]["parts"]:
        for j in range(J):
            assert (run / "per_sequence" / part / f"eta_{j}.npy").is_file()
    for name in (
        "eval_delta_matrix.npy",
        "attributions.npy",
        "config.yaml",
        "update.safetensors",
        "rollouts/update.jsonl",
        "rollouts/eval_00.jsonl",
        "plots/delta_h.png",
        "plots/ess.png",
        "plots/attributions.png",
    ):
        assert (run / name).is_file(), name
    assert not (run / "partial").exists(), "the resume cache is dropped once the run is complete"
    N, M = summary["plan"]["n_update_sequences"], summary["plan"]["n_eval_sequences"][0]
    assert np.load(run / "attributions.npy").shape == (N,)
    assert np.load(run / "eval_delta_matrix.npy").shape == (M, N)


def test_the_eta_sweep_contains_the_real_step(finished_run):
    _, summary = finished_run
    assert summary["update"]["lr"] in summary["plan"]["etas"]


def test_per_sequence_contributions_sum_to_delta_h(finished_run):
    run, summary = finished_run
    for part, res in summary["aggregate"].items():
        for j, dh in enumerate(res["delta_h"]):
            c = np.load(run / "per_sequence" / part / f"eta_{j}.npy")
            assert c.sum() == pytest.approx(dh, rel=1e-9, abs=1e-12)


def test_baseline_plus_grad_measured_as_one_direction_matches_full(finished_run):
    # the two directions differ only by float32 rounding of baseline + grad (~1e-7 relative)
    _, summary = finished_run
    full, both = summary["aggregate"]["full"], summary["aggregate"]["baseline_plus_grad"]
    np.testing.assert_allclose(both["delta_h"], full["delta_h"], rtol=1e-3, atol=1e-6)


def test_attributions_sum_to_the_first_order_of_the_gradient_part(finished_run):
    run, summary = finished_run
    a = np.load(run / "attributions.npy")
    att = summary["evals"][0]["attribution"]
    assert a.sum() == pytest.approx(att["sum"], rel=1e-12)
    # float32 policy: one JVP over E vs one backward over E + one JVP over U agree to ~1e-6
    assert att["relative_difference"] < 1e-4
    assert att["ok"] and att["scaled_difference"] <= att["tolerance"] == 1e-3  # float32's tolerance
    assert att["grad_first_order"] == pytest.approx(summary["aggregate"]["grad"]["first_order"], rel=1e-4)


def test_the_demo_saves_each_update_tokens_attribution_and_names_the_top_tokens(finished_run):
    run, summary = finished_run
    tokens = {p.stem: np.load(p) for p in (run / "update_tokens").glob("*.npy")}
    assert set(tokens) == {"offsets", "token_ids", "logprobs", "attributions", "covariance", "reward_attributions"}
    offsets, a = tokens["offsets"], np.load(run / "attributions.npy")
    assert offsets[0] == 0 and offsets[-1] == len(tokens["attributions"]) == summary["update"]["n_tokens"]
    summed = np.array([tokens["attributions"][offsets[i] : offsets[i + 1]].sum() for i in range(len(a))])
    np.testing.assert_allclose(summed, a, rtol=1e-12, atol=1e-12 * np.abs(a).max())
    top = summary["evals"][0]["attribution"]["top_tokens"]
    biggest = np.abs(tokens["attributions"]).max()
    assert abs(top[0]["value"]) == biggest
    first = top[0]
    assert tokens["attributions"][offsets[first["sequence"]] + first["position"]] == first["value"]
    assert tokens["token_ids"][offsets[first["sequence"]] + first["position"]] == first["token_id"]


def test_the_demo_reports_the_change_of_the_expected_reward_and_the_covariance_law(finished_run):
    run, summary = finished_run
    ev = summary["evals"][0]
    rewards = [json.loads(line)["reward"] for line in (run / "rollouts" / "eval_00.jsonl").read_text().splitlines()]
    assert ev["reward"]["base"] == pytest.approx(np.mean(rewards), rel=1e-12)  # E scored with the toy reward
    assert ev["reward"]["attribution"]["ok"]
    assert np.load(run / "reward_attributions.npy").sum() == pytest.approx(ev["reward"]["attribution"]["sum"], rel=1e-9)
    for part in summary["plan"]["parts"]:
        assert len(ev["reward"]["parts"][part]["delta_r"]) == len(summary["plan"]["etas"])
    law = ev["covariance_law"]
    cov = np.load(run / "update_tokens" / "covariance.npy")
    assert law["batch_mean"] == pytest.approx(cov.mean(), rel=1e-12) and law["n_tokens"] == len(cov)
    lr = summary["update"]["lr"]
    at_lr = summary["plan"]["etas"].index(lr)
    assert law["delta_h_at_lr"] == ev["parts"]["full"]["delta_h"][at_lr]
    assert law["first_order_at_lr"] == pytest.approx(lr * ev["parts"]["full"]["first_order"], rel=1e-12)
    assert law["law_at_lr"] == pytest.approx(-lr * law["batch_mean"], rel=1e-12)
    assert -1 <= law["rank_correlation"] <= 1 and law["top_overlap"] in (0.0, 1.0)  # k = 1 token of U's ~50


def test_eval_update_matrix_sums_to_the_first_order_gradient_change(finished_run):
    run, summary = finished_run
    S = np.load(run / "eval_delta_matrix.npy")  # [M, N] at the reference eta
    eta = summary["evals"][0]["eval_update_matrix"]["reference_eta"]
    assert S.sum() == pytest.approx(eta * summary["aggregate"]["grad"]["first_order"], rel=1e-4)
    np.testing.assert_allclose(S.sum(0), eta * np.load(run / "attributions.npy"), rtol=1e-3, atol=1e-9)


def test_saved_update_is_baseline_plus_grad(finished_run):
    run, _ = finished_run
    tensors = load_file(str(run / "update.safetensors"))
    names = [k[len("full.") :] for k in tensors if k.startswith("full.")]
    assert names
    for n in names:
        np.testing.assert_allclose(
            tensors[f"full.{n}"].numpy(),
            (tensors[f"baseline.{n}"] + tensors[f"grad.{n}"]).numpy(),
            rtol=1e-5,
            atol=1e-6,
        )


def test_first_order_agrees_with_the_exact_change_at_the_smallest_eta(finished_run):
    _, summary = finished_run
    eta = summary["plan"]["etas"][0]
    for part, res in summary["aggregate"].items():
        assert abs(res["delta_h"][0] - res["first_order"] * eta) <= 3 * res["se"][0] + 1e-9, part


def test_a_finished_run_is_never_overwritten(finished_run, run_predict):
    run, _ = finished_run
    before = (run / "summary.json").read_text()
    with pytest.raises(FileExistsError, match="already holds a finished run"):
        run_predict(run.parent, run.name)
    assert (run / "summary.json").read_text() == before


@contextlib.contextmanager
def crash_at_the_second_batch(monkeypatch):
    """While active, the predict step raises at the second batch of E (after the first was cached)."""
    import probe.module

    real, calls = probe.module.batch_rows, []

    def crash_on_second_batch(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("simulated crash")
        return real(*args, **kwargs)

    monkeypatch.setattr(probe.module, "batch_rows", crash_on_second_batch)
    try:
        yield
    finally:
        monkeypatch.setattr(probe.module, "batch_rows", real)


def test_an_interrupted_run_resumes_to_the_same_numbers(finished_run, tmp_path, monkeypatch, run_predict):
    _, uninterrupted = finished_run
    with pytest.raises(RuntimeError, match="simulated crash"), crash_at_the_second_batch(monkeypatch):
        run_predict(tmp_path, "resumed", *WITH_ADDITIVITY_CHECK)
    partial = list((tmp_path / "resumed" / "partial").rglob("*.npz"))
    assert len(partial) == 1, "the batch finished before the crash was written"
    summary = tmp_path / "resumed" / "summary.json"
    assert not summary.exists() or json.loads(summary.read_text()).get("status") != "complete"

    resumed = run_predict(tmp_path, "resumed", *WITH_ADDITIVITY_CHECK)
    for part, res in uninterrupted["aggregate"].items():
        np.testing.assert_array_equal(resumed["aggregate"][part]["delta_h"], res["delta_h"])
        np.testing.assert_array_equal(resumed["aggregate"][part]["se"], res["se"])


@pytest.mark.parametrize("config", sorted((REPO / "configs").glob("*.yaml")), ids=lambda p: p.name)
def test_every_config_parses(config, monkeypatch, capsys):
    # in-process (the CLI's parse of the command the config opens with, as `python -m probe` runs it): a
    # subprocess per config cost ~5 s of imports each
    from probe.cli import main

    first = config.read_text().splitlines()[0]
    assert first.startswith("# python -m probe "), "every config opens with the command that runs it"
    subcommand = first.split()[4]
    monkeypatch.chdir(REPO)
    with pytest.raises(SystemExit) as printed:
        main([subcommand, "--config", str(config), "--print_config"])
    assert printed.value.code in (0, None), capsys.readouterr().err[-2000:]
    assert "model:" in capsys.readouterr().out


def write_jsonl(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_rollout_files_and_two_eval_batches_share_one_update(finished_run, tmp_path, run_predict):
    """U and E read from rollout files (as any RL framework writes them), a second E in eval_01/,
    and the exact per-sequence path next to the attributions."""
    run, _ = finished_run
    update = [json.loads(line) for line in (run / "rollouts" / "update.jsonl").read_text().splitlines()]
    keep = {"prompt_ids", "response_ids", "group", "advantage", "reward", "old_logprobs"}
    update_file = write_jsonl(tmp_path / "u.jsonl", [{k: r[k] for k in keep if k in r} for r in update])
    second = (
        "{source: {prompts: toy, n_prompts: 4, offset: 2000}, sampling: {n_per_prompt: 4, max_new_tokens: 4, seed: 3}}"
    )
    evals = f"[{{path: {run / 'rollouts' / 'eval_00.jsonl'}}}, {second}]"
    summary = run_predict(
        tmp_path,
        "files",
        "--data.init_args.update.path",
        str(update_file),
        "--data.init_args.evals",
        evals,
        "--model.init_args.probe.per_sequence_exact",
        "[0, 1]",
    )
    assert [ev["name"] for ev in summary["evals"]] == ["eval_00", "eval_01"]
    assert (tmp_path / "files" / "eval_01" / "attributions.npy").is_file()
    assert (tmp_path / "files" / "plots" / "delta_h_eval_01.png").is_file()
    _, first = finished_run
    # same U and E as the first run: the same numbers
    np.testing.assert_allclose(
        summary["aggregate"]["full"]["delta_h"], first["aggregate"]["full"]["delta_h"], rtol=1e-12
    )
    exact = summary["evals"][0]["per_sequence_exact"]
    assert [e["index"] for e in exact] == [0, 1]
    for e in exact:  # at the smallest eta the exact own-direction change agrees with eta * a_i within 3 SE
        assert abs(e["alone"][0] - e["attribution_first_order"][0]) <= 3 * e["alone_se"][0] + 1e-9


def test_wandb_offline_run_is_written(tmp_path, monkeypatch, run_predict):
    monkeypatch.setenv("WANDB_MODE", "offline")
    logger = (
        f"{{class_path: lightning.pytorch.loggers.WandbLogger, init_args: {{save_dir: {tmp_path}, offline: true}}}}"
    )
    run_predict(tmp_path, "wb", "--trainer.logger", logger, "--model.init_args.probe.eval_update_matrix", "false")
    runs = list((tmp_path / "wandb").glob("offline-run-*"))
    assert len(runs) == 1
    assert list(runs[0].rglob("*.wandb")), "the offline run holds its event log for `wandb sync`"


def test_per_token_views_hold_every_response_token_at_theta_and_at_the_reference_eta(
    finished_run, tmp_path, run_predict
):
    run, first = finished_run
    update_file, eval_file = run / "rollouts" / "update.jsonl", run / "rollouts" / "eval_00.jsonl"
    summary = run_predict(
        tmp_path,
        "tokens",
        "--data.init_args.update.path",
        str(update_file),
        "--data.init_args.evals",
        f"[{{path: {eval_file}}}]",
        "--model.init_args.probe.per_token_views",
        "true",
        "--model.init_args.probe.attribution",
        "false",
        "--model.init_args.probe.eval_update_matrix",
        "false",
    )
    views = tmp_path / "tokens" / "per_token"
    offsets = np.load(views / "offsets.npy")
    assert offsets[-1] == summary["evals"][0]["n_tokens"] and len(offsets) == summary["evals"][0]["n_sequences"] + 1
    lp = np.load(views / "logprobs_theta.npy")
    ent = np.load(views / "entropies_theta.npy")
    # the per-token views add up to the per-sequence base statistics the estimate used
    seq_entropy = np.add.reduceat(ent, offsets[:-1])
    assert seq_entropy.mean() == pytest.approx(summary["evals"][0]["base_entropy"]["sequence"], rel=1e-9)
    assert (lp <= 0).all() and np.load(views / "logprobs_ref.npy").shape == lp.shape


def test_an_update_batch_whose_advantages_are_all_zero_is_refused(finished_run, tmp_path, run_predict):
    run, _ = finished_run
    records = [json.loads(line) for line in (run / "rollouts" / "update.jsonl").read_text().splitlines()]
    zero = write_jsonl(tmp_path / "zero.jsonl", [dict(r, advantage=0.0) for r in records])
    with pytest.raises(ValueError, match="every advantage of the update batch .* is zero"):
        run_predict(tmp_path, "zero", "--data.init_args.update.path", str(zero))
    assert not (tmp_path / "zero" / "summary.json").exists()


def test_a_resume_with_other_settings_is_refused_not_merged(tmp_path, monkeypatch, run_predict):
    with pytest.raises(RuntimeError, match="simulated crash"), crash_at_the_second_batch(monkeypatch):
        run_predict(tmp_path, "changed")
    # the same run name with other etas: its cached batch belongs to another plan
    with pytest.raises(ValueError, match=r"another run \(it differs in: model.init_args.probe.etas\)"):
        run_predict(tmp_path, "changed", "--model.init_args.probe.etas", "[0.0001, 0.001]")
    assert not (tmp_path / "changed" / "summary.json").exists()
    assert run_predict(tmp_path, "changed")["status"] == "complete"  # the original settings still resume


def test_a_resume_with_an_input_file_edited_in_place_is_refused_naming_it(
    finished_run, tmp_path, monkeypatch, run_predict
):
    run, _ = finished_run
    update = write_jsonl(tmp_path / "u.jsonl", read_jsonl(run / "rollouts" / "update.jsonl"))
    with pytest.raises(RuntimeError, match="simulated crash"), crash_at_the_second_batch(monkeypatch):
        run_predict(tmp_path, "edited", "--data.init_args.update.path", str(update))
    records = read_jsonl(update)
    write_jsonl(update, [dict(r, advantage=0.5 * r["advantage"]) for r in records])  # same name, other content
    changed = r"another run \(it differs in: data.init_args.update.path \(the file's content\)\)"
    with pytest.raises(ValueError, match=changed):
        run_predict(tmp_path, "edited", "--data.init_args.update.path", str(update))
    # the fix the message names: run.overwrite discards the unfinished results, and the edited file is used
    overwrite = ("--model.init_args.run.overwrite", "true")
    summary = run_predict(tmp_path, "edited", "--data.init_args.update.path", str(update), *overwrite)
    used = read_jsonl(tmp_path / "edited" / "rollouts" / "update.jsonl")
    assert summary["status"] == "complete" and [r["advantage"] for r in used] == [0.5 * r["advantage"] for r in records]


def test_copies_of_unknown_origin_are_not_reused_when_the_fingerprints_were_deleted(
    finished_run, tmp_path, monkeypatch, run_predict
):
    run, _ = finished_run
    records = read_jsonl(run / "rollouts" / "update.jsonl")
    update = write_jsonl(tmp_path / "u.jsonl", records)
    with pytest.raises(RuntimeError, match="simulated crash"), crash_at_the_second_batch(monkeypatch):
        run_predict(tmp_path, "deleted", "--data.init_args.update.path", str(update))
    write_jsonl(update, [dict(r, advantage=0.5 * r["advantage"]) for r in records])
    shutil.rmtree(tmp_path / "deleted" / "partial")  # results and fingerprints gone; rollouts/ left behind
    run_predict(tmp_path, "deleted", "--data.init_args.update.path", str(update))
    used = read_jsonl(tmp_path / "deleted" / "rollouts" / "update.jsonl")
    assert [r["advantage"] for r in used] == [0.5 * r["advantage"] for r in records]


def test_fixing_the_update_file_and_rerunning_the_same_name_uses_the_fixed_file(finished_run, tmp_path, run_predict):
    """The documented recipe after a refused input: nothing was computed, so the rerun starts afresh from the fixed
    file instead of the run folder's stale copy."""
    run, _ = finished_run
    good = read_jsonl(run / "rollouts" / "update.jsonl")
    update = write_jsonl(tmp_path / "u.jsonl", [dict(r, advantage=0.0) for r in good])
    with pytest.raises(ValueError, match="every advantage of the update batch .* is zero"):
        run_predict(tmp_path, "fixed", "--data.init_args.update.path", str(update))
    write_jsonl(update, good)
    summary = run_predict(tmp_path, "fixed", "--data.init_args.update.path", str(update))
    assert summary["status"] == "complete"
    assert [r["advantage"] for r in read_jsonl(tmp_path / "fixed" / "rollouts" / "update.jsonl")] == [
        r["advantage"] for r in good
    ]


def test_a_schedule_that_ended_is_named_and_the_rerun_with_etas_restarts_the_run(
    toy_world_dir, tmp_path, run_predict, caplog
):
    saved = torch.load(toy_world_dir / "optimizer.pt", weights_only=True)
    for group in saved["param_groups"]:
        group["initial_lr"], group["lr"] = group["lr"], 0.0  # what a scheduler leaves at the end of a decay
    ended = tmp_path / "ended.pt"
    torch.save(saved, ended)
    optimizer = ["--model.init_args.optimizer.path", str(ended)]
    fix = r"schedule has reached 0 .* Fix: set probe.etas .* and probe.reference_eta .* \(e.g. probe.etas: \["
    with pytest.raises(ValueError, match=fix):
        run_predict(tmp_path, "ended", *optimizer)
    with pytest.raises(ValueError, match=fix):  # etas alone would leave the attribution's eta at lr = 0
        run_predict(tmp_path, "ended", *optimizer, "--model.init_args.probe.etas", "[0.001, 0.01]")
    with caplog.at_level(logging.WARNING, logger="probe"):
        etas = ("--model.init_args.probe.etas", "[0.001, 0.01]", "--model.init_args.probe.reference_eta", "0.001")
        summary = run_predict(tmp_path, "ended", *optimizer, *etas)
    assert summary["status"] == "complete" and summary["plan"]["etas"] == [0.001, 0.01]
    assert summary["plan"]["reference_eta"] == 0.001
    assert "restarting an unfinished run that computed nothing yet" in caplog.text and "probe.etas" in caplog.text
    assert summary["choices"]["optimizer.lr"]["value"] == [0.0]
    assert summary["choices"]["optimizer.schedule"]["value"]["initial_lr"] == [saved["param_groups"][0]["initial_lr"]]


def test_an_unreadable_cached_batch_is_recomputed(finished_run, tmp_path, monkeypatch, run_predict, caplog):
    _, uninterrupted = finished_run
    with pytest.raises(RuntimeError, match="simulated crash"), crash_at_the_second_batch(monkeypatch):
        run_predict(tmp_path, "truncated", *WITH_ADDITIVITY_CHECK)
    (cached,) = (tmp_path / "truncated" / "partial").rglob("batch_*.npz")
    cached.write_bytes(cached.read_bytes()[:100])  # a power loss mid-write on a file system without ordering
    with caplog.at_level(logging.WARNING, logger="probe"):
        resumed = run_predict(tmp_path, "truncated", *WITH_ADDITIVITY_CHECK)
    assert "is unreadable" in caplog.text and "recomputing that batch" in caplog.text
    for part, res in uninterrupted["aggregate"].items():
        np.testing.assert_array_equal(resumed["aggregate"][part]["delta_h"], res["delta_h"])


def test_a_summary_written_before_the_attribution_verdict_still_reads_and_prints(finished_run):
    from probe.report import format_table
    from probe.results import EvalResult

    _, summary = finished_run
    old = json.loads(json.dumps(summary["evals"][0]))
    for key in ("scaled_difference", "tolerance", "ok"):
        del old["attribution"][key]
    assert EvalResult.from_dict(old).attribution.ok is None
    assert "no verdict recorded" in format_table([old], summary["plan"]["etas"])


def test_an_eta_below_the_dtypes_resolution_is_reported_null_not_as_a_measured_zero(tmp_path, run_predict):
    # float32 toy policy: 1e-12 times a step of elements ~0.1-1 rounds away against weights ~0.1 (ulp ~1e-8)
    summary = run_predict(tmp_path, "tiny_eta", "--model.init_args.probe.etas", "[1e-12, 0.0003]")
    for part, res in summary["aggregate"].items():
        assert res["step_rounding_error"][0] > 0.99 and res["step_rounding_error"][1] < 0.01, part
        assert res["delta_h"][0] is None and res["se"][0] is None  # null in summary.json: nothing was measured
        assert res["first_order"] != 0  # while the first order predicts a change
    warnings = summary["evals"][0]["warnings"]
    assert any(
        "at eta=1e-12: theta + eta * d formed in float32 differs from eta * d by 100% of its size" in w
        for w in warnings
    )
    assert np.isnan(np.load(tmp_path / "tiny_eta" / "per_sequence" / "full" / "eta_0.npy")).all()
    from probe.report import format_table

    first_row = format_table(summary["evals"], summary["plan"]["etas"]).splitlines()[2]
    assert "n/a" in first_row and first_row.endswith("step rounds away in the policy's dtype")


def test_per_prompt_normalisation_with_one_response_per_prompt_is_refused_before_any_pass(tmp_path, run_predict):
    from support import eval_batch_arg

    settings = ("--model.init_args.probe.normalisation", "per_prompt", "--data.init_args.evals", eval_batch_arg(6, 1))
    with pytest.raises(ValueError, match=r"per_prompt needs at least 2 responses per prompt, but eval_00 has 6 of 6"):
        run_predict(tmp_path, "single", *settings)
    assert not list((tmp_path / "single").rglob("batch_*.npz"))
