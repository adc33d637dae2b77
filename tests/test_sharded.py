"""A policy sharded with FSDP2 gives the numbers of one process: ``predict`` and the live probe, two CPU processes.

Runs the CLI in subprocesses as users do, with Lightning's ``ModelParallelStrategy`` (``fully_shard`` per decoder
layer, gloo), as ``configs/toy_fsdp.yaml`` and ``configs/toy_grpo_fsdp.yaml`` set it. Every rank holds half of the
rows of every weight, moment and part; probe gathers one layer at a time (docs/DESIGN.md section 11). The
policies run in float64: the sharded forwards gather the same weights and the reconstruction is elementwise, so
the only differences left are summation orders (the gradient norm summed per rank, E split over ranks), ~1e-15
relative; 1e-10 leaves the conditioning of the smallest eta's Delta H (a difference of entropies ~2000x larger)
room. A wrong gather, a shard off by one row or a missed rank gives differences of the order of the numbers.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from support import QUIET, REPO, SMALL, assert_live_runs_agree, fit_args, predict_args

FSDP = (
    "--trainer.strategy",
    "lightning.pytorch.strategies.ModelParallelStrategy",
    "--trainer.strategy.data_parallel_size",
    "2",
    "--trainer.strategy.tensor_parallel_size",
    "1",
    "--trainer.devices",
    "2",
    "--trainer.accelerator",
    "cpu",
)
FLOAT64 = ("--model.init_args.policy.dtype", "float64")
RTOL = 1e-10


def probe_cli(*args: str, expect_ok: bool = True) -> subprocess.CompletedProcess:
    env = {**os.environ, "WANDB_MODE": "disabled"}
    env.pop("PROBE_RUN_NAME", None)
    out = subprocess.run(
        [sys.executable, "-m", "probe", *args], capture_output=True, text=True, cwd=REPO, env=env, timeout=600
    )
    if expect_ok:
        assert out.returncode == 0, out.stderr[-3000:]
    return out


def predict(root: Path, name: str, *extra: str) -> tuple[Path, dict]:
    """A small toy predict run with the eval x update matrix and the per-token views on; its folder and summary."""
    matrix = ("--model.init_args.probe.eval_update_matrix", "true", "--model.init_args.probe.per_token_views", "true")
    probe_cli(*predict_args(root, name, *matrix, *extra, eval_prompts=10, eval_batch_size=8))
    return root / name, json.loads((root / name / "summary.json").read_text())


def assert_same_numbers(one: tuple[Path, dict], two: tuple[Path, dict]) -> None:
    (dir_one, a), (dir_two, b) = one, two
    assert a["plan"]["world_size"] == 1 and b["plan"]["world_size"] == 2
    for part, res in a["aggregate"].items():
        for key in (
            "delta_h",
            "se",
            "delta_h_per_token",
            "se_per_token",
            "ess",
            "first_order",
            "first_order_se",
            "second_order",
        ):
            np.testing.assert_allclose(
                b["aggregate"][part][key], res[key], rtol=RTOL, atol=1e-300, err_msg=f"{part} {key}"
            )
    for key in ("sum", "abs_sum", "grad_first_order"):
        assert b["evals"][0]["attribution"][key] == pytest.approx(a["evals"][0]["attribution"][key], rel=RTOL)
    for name in ("attributions.npy", "eval_delta_matrix.npy"):
        x, y = np.load(dir_one / name), np.load(dir_two / name)
        np.testing.assert_allclose(y, x, rtol=0, atol=RTOL * np.abs(x).max(), err_msg=name)


@pytest.fixture(scope="module")
def predicted(tmp_path_factory, toy_world_dir) -> dict[str, tuple[Path, dict]]:
    root = tmp_path_factory.mktemp("sharded_predict")
    return {"one": predict(root, "one", *FLOAT64), "two": predict(root, "two", *FLOAT64, *FSDP)}


@pytest.mark.slow
def test_a_sharded_predict_gives_the_numbers_of_one_process(predicted):
    """Delta H with its SEs and ESS, first and second order, the attributions and the eval x update matrix (one
    process takes the per-sample route, the sharded run the reverse route: both exact)."""
    assert_same_numbers(predicted["one"], predicted["two"])
    for view in ("logprobs_theta", "entropies_theta", "logprobs_ref", "entropies_ref"):
        x, y = (np.load(predicted[k][0] / "per_token" / f"{view}.npy") for k in ("one", "two"))
        np.testing.assert_allclose(y, x, rtol=RTOL, atol=1e-300, err_msg=view)


@pytest.mark.slow
def test_each_rank_writes_its_rows_of_the_update_and_they_add_up_to_the_whole(predicted):
    from probe.update import Update

    run = predicted["two"][0]
    shards = sorted(p.name for p in run.glob("update.shard-*"))
    assert shards == ["update.shard-0-of-2.safetensors", "update.shard-1-of-2.safetensors"]
    whole, sharded = Update.load(predicted["one"][0] / "update.safetensors"), Update.load(run / "update.safetensors")
    for part in ("full", "baseline", "grad", "scale"):
        for name, t in getattr(whole, part).items():
            np.testing.assert_allclose(getattr(sharded, part)[name].numpy(), t.numpy(), rtol=RTOL, atol=1e-300)
    assert sharded.norms["full"] == pytest.approx(whole.norms["full"], rel=RTOL)


@pytest.fixture(scope="module")
def fitted(tmp_path_factory, run_fit) -> dict[str, Path]:
    """The live probe's small run (tests/test_live.py) on one process and sharded; the sharded one keeps its
    last.ckpt (a distributed checkpoint directory) and its trained policy."""
    root = tmp_path_factory.mktemp("sharded_fit")
    one = run_fit(root, "one", *QUIET, *SMALL, *FLOAT64)
    keep = ("--model.init_args.checkpoint_every_n_steps", "0", "--trainer.enable_checkpointing", "true")
    keep += ("--model.init_args.save_policy", "true")
    probe_cli(*fit_args(root, "two", *QUIET, *SMALL, *FLOAT64, *FSDP, *keep, "--model.init_args.run.num_threads", "1"))
    return {"one": one, "two": root / "two"}


@pytest.mark.slow
def test_a_sharded_fit_probes_the_steps_of_one_process(fitted):
    """Each rank reconstructs and verifies its own rows from FSDP2's reduce-scattered gradients; both ranks sample
    every prompt group (a sharded forward is a collective), so the run trains on the batches of one process."""
    # (measured 7e-11 on the attributions of the first step: the gradient norm is summed per rank here)
    assert_live_runs_agree(fitted["one"], fitted["two"], attribution_atol=1e-9)


@pytest.mark.slow
def test_the_distributed_checkpoint_of_a_sharded_fit_is_probed_alike_on_one_and_two_processes(fitted, tmp_path):
    """``optimizer.path`` names FSDP2's last.ckpt directory: one process reads each moment whole, each sharded rank
    only its rows (torch.distributed.checkpoint); the policy was gathered to rank 0 and saved whole."""
    run = fitted["two"]
    assert (run / "checkpoints" / "last.ckpt" / ".metadata").is_file()
    source = ("--model.init_args.policy.path", str(run / "policy"), *FLOAT64)
    source += ("--model.init_args.optimizer.path", str(run / "checkpoints" / "last.ckpt"))
    # (the trained policy answers most prompts alike: keep its groups of equal rewards, which add nothing to U's step)
    source += ("--data.init_args.update.source.n_prompts", "8", "--data.init_args.update.filter_zero_advantage_prompts")
    source += ("false",)
    one, two = predict(tmp_path, "one", *source), predict(tmp_path, "two", *source, *FSDP)
    assert one[1]["plan"]["policy"] == two[1]["plan"]["policy"]
    assert one[1]["choices"]["optimizer.format"]["value"] == "distributed"
    assert one[1]["choices"]["optimizer.step"]["value"] == [3]  # the three steps of the fit
    assert_same_numbers(one, two)


@pytest.mark.slow
@pytest.mark.parametrize(
    "extra, message",
    [
        (("--trainer.strategy.data_parallel_size", "1", "--trainer.strategy.tensor_parallel_size", "2"), "tensor_par"),
        (("--model.init_args.probe.per_sequence_exact", "[0]"), "per_sequence_exact"),
    ],
    ids=["tensor_parallel", "per_sequence_exact"],
)
def test_what_a_sharded_policy_cannot_do_is_refused_before_any_pass(tmp_path, toy_world_dir, extra, message):
    out = probe_cli(*predict_args(tmp_path, "bad", *FSDP, *extra, eval_prompts=2), expect_ok=False)
    assert out.returncode != 0
    assert message in out.stderr and "Fix:" in out.stderr


@pytest.mark.slow
def test_the_policy_of_a_distributed_checkpoint_is_the_policy_the_fit_exported(fitted):
    """``policy.path`` may name FSDP2's last.ckpt directory (with ``policy.config_path``): its weights, read whole,
    are the ones the fit gathered and saved at the same step."""
    import torch

    from probe.loading import PolicySettings, load_policy

    run = fitted["two"]
    settings = PolicySettings(path=str(run / "checkpoints" / "last.ckpt"), config_path=str(run / "policy"))
    model, _ = settings.load()
    exported, _ = load_policy(run / "policy")
    assert model.probe_checkpoint_step == 3
    for (name, a), b in zip(model.state_dict().items(), exported.state_dict().values()):
        assert torch.equal(a, b), name
