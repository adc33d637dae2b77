"""One process vs two DDP processes (gloo, CPU): the same summary numbers.

Runs the CLI in subprocesses, as users do (`--trainer.strategy=ddp --trainer.devices=2`);
LightningCLI re-launches `python -m probe` for the second rank. Each rank teacher-forces its
share of E; the per-sequence rows are gathered once at epoch end and sorted by index, so the
estimates must match a single process to float rounding. The policy runs in float64: in float32 a
sequence's logits depend in the last bits on which rows share its matmul (the ranks' forward batches
differ), and at the smallest eta Delta H is a difference of entropies ~2000x larger than it, so float32
differed by 1.4e-5 relative there (measured); float64 checks the distributed bookkeeping to 1e-9.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from support import REPO, predict_args


def probe_cli(root: Path, name: str, *extra: str) -> dict:
    env = {**os.environ, "WANDB_MODE": "disabled"}
    env.pop("PROBE_RUN_NAME", None)
    args = predict_args(
        root, name, "--model.init_args.probe.eval_update_matrix", "false", *extra, eval_prompts=10, eval_batch_size=8
    )
    out = subprocess.run(
        [sys.executable, "-m", "probe", *args], capture_output=True, text=True, cwd=REPO, env=env, timeout=600
    )
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads((root / name / "summary.json").read_text())


@pytest.mark.slow
def test_two_ddp_processes_give_the_numbers_of_one(tmp_path, toy_world_dir):
    float64 = ("--model.init_args.policy.dtype", "float64")
    one = probe_cli(tmp_path, "one", *float64)
    ddp = ("--trainer.strategy", "ddp", "--trainer.devices", "2", "--trainer.accelerator", "cpu")
    two = probe_cli(tmp_path, "two", *float64, *ddp)
    assert two["plan"]["world_size"] == 2 and one["plan"]["world_size"] == 1
    for part, res in one["aggregate"].items():
        for key in ("delta_h", "se", "delta_h_per_token", "ess", "first_order", "second_order"):
            np.testing.assert_allclose(
                two["aggregate"][part][key], res[key], rtol=1e-9, atol=1e-15, err_msg=f"{part} {key}"
            )
    assert two["evals"][0]["attribution"]["sum"] == pytest.approx(one["evals"][0]["attribution"]["sum"], rel=1e-9)
