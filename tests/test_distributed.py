"""One process vs two DDP processes (gloo, CPU): the same summary numbers.

Runs the CLI in subprocesses, as users do (`--trainer.strategy=ddp --trainer.devices=2`);
LightningCLI re-launches `python -m probe` for the second rank. Each rank teacher-forces its
share of E; the per-sequence rows are gathered once at epoch end and sorted by index, so the
estimates must match a single process to float rounding (1e-6 relative).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
ARGS = [
    "--model.init_args.probe.n_etas", "3",
    "--model.init_args.probe.eval_update_matrix", "false",
    "--data.init_args.update.source.n_prompts", "3",
    "--data.init_args.update.sampling.n_per_prompt", "4",
    "--data.init_args.evals",
    "[{source: {prompts: toy, n_prompts: 10, offset: 1000}, sampling: {n_per_prompt: 4, max_new_tokens: 4, seed: 1}}]",
    "--data.init_args.eval_batch_size", "8",
    "--trainer.logger", "false",
    "--trainer.enable_progress_bar", "false",
]


def probe_cli(root: Path, name: str, *extra: str) -> dict:
    env = {**os.environ, "WANDB_MODE": "disabled"}
    env.pop("PROBE_RUN_NAME", None)
    cmd = [sys.executable, "-m", "probe", "predict", "--config", str(REPO / "configs" / "toy.yaml"), *ARGS,
           "--model.init_args.run.root", str(root), "--model.init_args.run.name", name, *extra]
    out = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, env=env, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads((root / name / "summary.json").read_text())


@pytest.mark.slow
def test_two_ddp_processes_give_the_numbers_of_one(tmp_path, toy_world_dir):
    one = probe_cli(tmp_path, "one")
    two = probe_cli(tmp_path, "two", "--trainer.strategy", "ddp", "--trainer.devices", "2", "--trainer.accelerator", "cpu")
    assert two["plan"]["world_size"] == 2 and one["plan"]["world_size"] == 1
    for part, res in one["aggregate"].items():
        for key in ("delta_h", "se", "delta_h_per_token", "ess", "first_order", "second_order"):
            np.testing.assert_allclose(two["aggregate"][part][key], res[key], rtol=1e-6, atol=1e-12, err_msg=f"{part} {key}")
    assert two["evals"][0]["attribution"]["sum"] == pytest.approx(one["evals"][0]["attribution"]["sum"], rel=1e-6)
