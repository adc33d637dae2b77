"""Determinism: the same config and seed give the same run twice on CPU, bit for bit.

Two runs of ``python -m probe predict`` (in-process, two run directories) sample the same U
and E, reconstruct the same update and report identical numbers: every number of the
summary (except timings), every array, the saved update and the rollout files.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from safetensors.torch import load_file


@pytest.fixture(scope="module")
def two_runs(tmp_path_factory, run_predict) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("determinism")
    for name in ("first", "second"):
        run_predict(root, name, eval_prompts=6, eval_batch_size=8)
    return root / "first", root / "second"


def test_same_config_and_seed_give_identical_summary_numbers(two_runs):
    first, second = (json.loads((run / "summary.json").read_text()) for run in two_runs)
    assert first["status"] == second["status"] == "complete"
    for key in ("plan", "update", "aggregate", "evals"):
        assert first[key] == second[key], key  # exact equality, floats included
    first["config"]["run"].pop("name"), second["config"]["run"].pop("name")
    assert first["config"] == second["config"]


def test_same_config_and_seed_give_identical_arrays_and_update(two_runs):
    first, second = two_runs
    arrays = sorted(p.relative_to(first) for p in first.rglob("*.npy"))
    assert len(arrays) > 10 and arrays == sorted(p.relative_to(second) for p in second.rglob("*.npy"))
    for rel in arrays:
        np.testing.assert_array_equal(np.load(first / rel), np.load(second / rel), err_msg=str(rel))
    a, b = load_file(str(first / "update.safetensors")), load_file(str(second / "update.safetensors"))
    assert a.keys() == b.keys()
    for name in a:
        assert a[name].equal(b[name]), name


def test_same_config_and_seed_sample_the_same_sequences(two_runs):
    first, second = two_runs
    for name in ("update.jsonl", "eval_00.jsonl"):
        assert (first / "rollouts" / name).read_bytes() == (second / "rollouts" / name).read_bytes(), name
