"""Interruption: a run killed mid-way and started again on the same run directory resumes.

``python -m probe predict`` runs as a subprocess on a config with 12 batches of E; as soon as
the first per-batch result appears in ``<run>/partial/`` it is killed (SIGTERM: it stops after
the batch in hand and exits with 143; SIGKILL: it dies at once). The same command is then run
again (in-process, same ``run.name``): it must recompute only the batches that were not written
and end with the summary numbers and arrays of an uninterrupted run.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

import probe.module
from probe.cli import main

from support import REPO, predict_args

N_BATCHES = 12  # E: 12 prompts x 4 responses = 48 sequences, 4 per batch


def cli_args(root: Path, name: str) -> list[str]:
    return predict_args(root, name, eval_prompts=N_BATCHES, eval_batch_size=4)


def partial_files(run: Path) -> list[Path]:
    return sorted((run / "partial").rglob("batch_*.npz")) if (run / "partial").exists() else []


def assert_same_numbers(a, b, where: str = "summary") -> None:
    """Equal structure, equal strings, numbers equal to 1e-12 relative (in practice bitwise)."""
    if isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for k in a:
            assert_same_numbers(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, list):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same_numbers(x, y, f"{where}[{i}]")
    elif isinstance(a, float) and isinstance(b, float):
        assert a == pytest.approx(b, rel=1e-12, abs=1e-300), where
    else:
        assert a == b, where


def assert_same_run(resumed: Path, reference: Path) -> None:
    got, want = (json.loads((p / "summary.json").read_text()) for p in (resumed, reference))
    assert got["status"] == "complete"
    for key in ("update", "aggregate", "evals"):
        assert_same_numbers(got[key], want[key], key)
    assert got["plan"] == want["plan"]
    arrays = sorted(p.relative_to(reference) for p in reference.rglob("*.npy"))
    assert arrays and arrays == sorted(p.relative_to(resumed) for p in resumed.rglob("*.npy"))
    for rel in arrays:
        np.testing.assert_array_equal(np.load(resumed / rel), np.load(reference / rel), err_msg=str(rel))
    for name in ("update.jsonl", "eval_00.jsonl"):  # the same sequences were sampled
        assert (resumed / "rollouts" / name).read_bytes() == (reference / "rollouts" / name).read_bytes()


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, toy_world_dir) -> Path:
    root = tmp_path_factory.mktemp("uninterrupted")
    main(cli_args(root, "reference"))
    return root / "reference"


def start_and_kill(root: Path, name: str, sig: signal.Signals) -> tuple[int, str]:
    """Run the CLI as a subprocess, send ``sig`` once the first batch result is on disk; (exit code, output)."""
    run, log = root / name, root / f"{name}.log"
    with open(log, "w") as out:
        command = [sys.executable, "-m", "probe", *cli_args(root, name)]
        env = {**os.environ, "WANDB_MODE": "disabled"}
        process = subprocess.Popen(command, cwd=REPO, stdout=out, stderr=subprocess.STDOUT, env=env)
        try:
            deadline = time.monotonic() + 300
            while not partial_files(run):
                assert process.poll() is None, f"the run ended before its first batch:\n{log.read_text()[-3000:]}"
                assert time.monotonic() < deadline, "no batch result after 300 s"
                time.sleep(0.02)
            process.send_signal(sig)
            code = process.wait(timeout=120)
        finally:
            if process.poll() is None:
                process.kill()
                process.wait()
    return code, log.read_text()


def resume_counting_batches(monkeypatch, root: Path, name: str) -> int:
    """Run the same command again in-process; how many batches of E it had to compute (not read back)."""
    computed = []
    real = probe.module.batch_rows

    def counting(policy, batch, *args, **kwargs):
        computed.append(len(batch))
        return real(policy, batch, *args, **kwargs)

    monkeypatch.setattr(probe.module, "batch_rows", counting)
    main(cli_args(root, name))
    return len(computed)


def assert_interrupted(run: Path) -> int:
    written = len(partial_files(run))
    assert 1 <= written < N_BATCHES, f"{written} of {N_BATCHES} batches written before the kill"
    summary = run / "summary.json"
    assert not summary.exists() or json.loads(summary.read_text()).get("status") != "complete"
    assert (run / "rollouts" / "update.jsonl").is_file() and (run / "rollouts" / "eval_00.jsonl").is_file()
    return written


def test_a_run_stopped_by_sigterm_exits_143_and_resumes_to_the_uninterrupted_numbers(
    uninterrupted, tmp_path, monkeypatch
):
    code, output = start_and_kill(tmp_path, "terminated", signal.SIGTERM)
    assert code == 128 + signal.SIGTERM, output[-3000:]
    assert "stopped by SIGTERM" in output and "rerun the same command (same run.name) to resume" in output
    written = assert_interrupted(tmp_path / "terminated")

    assert resume_counting_batches(monkeypatch, tmp_path, "terminated") == N_BATCHES - written
    assert not (tmp_path / "terminated" / "partial").exists()
    assert_same_run(tmp_path / "terminated", uninterrupted)


def test_a_run_killed_by_sigkill_resumes_to_the_uninterrupted_numbers(uninterrupted, tmp_path, monkeypatch):
    code, output = start_and_kill(tmp_path, "killed", signal.SIGKILL)
    assert code == -signal.SIGKILL, output[-3000:]
    written = assert_interrupted(tmp_path / "killed")

    assert resume_counting_batches(monkeypatch, tmp_path, "killed") == N_BATCHES - written
    assert_same_run(tmp_path / "killed", uninterrupted)


def test_a_run_folder_another_live_process_writes_is_refused_until_it_ends(tmp_path):
    from probe.rundir import LOCK_FILE, RunDirectory, RunDirectoryExists

    RunDirectory.open(str(tmp_path), "busy").unlock()
    holder = (  # a second process that opens the run and holds it, as a running probe does
        "import sys, time; from probe.rundir import RunDirectory; RunDirectory.open(sys.argv[1], 'busy'); "
        "print('locked', flush=True); time.sleep(60)"
    )
    other = subprocess.Popen([sys.executable, "-c", holder, str(tmp_path)], stdout=subprocess.PIPE, text=True, cwd=REPO)
    try:
        assert other.stdout.readline().strip() == "locked"
        busy = rf"busy is being written by another process \(process {other.pid} on .*\); two runs of one name"
        with pytest.raises(RunDirectoryExists, match=busy + r".*Fix: wait for that run to end"):
            RunDirectory.open(str(tmp_path), "busy")
        with pytest.raises(RunDirectoryExists, match=busy):  # nor is it emptied under the other process
            RunDirectory.open(str(tmp_path), "busy", overwrite=True)
        assert (tmp_path / "busy" / ".probe-run").is_file()
    finally:
        other.kill()
        other.wait()
    run = RunDirectory.open(str(tmp_path), "busy")  # the kernel released the dead process's lock
    assert json.loads((run.path / LOCK_FILE).read_text())["pid"] == os.getpid()
    RunDirectory.open(str(tmp_path), "busy")  # the same process opens it again (a resume): its lock is reused
    run.unlock()
