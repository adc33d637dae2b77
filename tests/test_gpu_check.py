"""The GPU machine's prepared scripts run end to end on CPU, so neither rots before a GPU is at hand:
``benchmarks/gpu_check.py --dry-run`` (every section, tiny sizes) and ``benchmarks/bench_scale.py --quick``."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SECTIONS = (
    "a_reconstruction_bf16",
    "b_reconstruction_fp16_gradscaler",
    "c_reconstruction_lora_bf16",
    "d_pipeline_0.5b_bf16",
    "e_bench_scale",
)
# The reconstructed step against AdamW.step() on float32 parameters (probe.verification.verify_step): every element
# within 2 ulp(max(|p|, |p'|)) + 1e-6 * lr * (|baseline| + |grad|); the largest error at most 1e-4 of the largest
# change of its parameter (ulp(|p| ~ 1) = 1.2e-7 against steps of ~lr = 1e-2); over all parameters, 1e-5 in norm.
MAX_UNITS, MAX_RELATIVE_ERROR, RELATIVE_ERROR = 1.0, 1e-4, 1e-5


def start(script: str, *args: str) -> subprocess.Popen:
    """The script in a subprocess on one torch thread (tiny models; fast on a busy 2-core box)."""
    return subprocess.Popen(
        [sys.executable, str(REPO / "benchmarks" / script), *args, "--threads", "1"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=REPO,
        env={**os.environ, "WANDB_MODE": "disabled"},
    )


@pytest.fixture(scope="module")
def launched(tmp_path_factory: pytest.TempPathFactory):
    """Both scripts started at once (one thread each: together they take the time of the longer one); each test
    waits for its own, at most 120 s from the start."""
    tmp = tmp_path_factory.mktemp("gpu_check")
    runs = {
        "gpu_check": (tmp / "gpu-check.json", ("gpu_check.py", "--dry-run")),
        "bench_scale": (tmp / "scale.json", ("bench_scale.py", "--quick")),
    }
    procs = {name: (start(*args, "--out", str(out)), out) for name, (out, args) in runs.items()}
    yield procs
    for proc, _ in procs.values():
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def finished(launched: dict, name: str) -> dict:
    proc, out = launched[name]
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 0, stdout[-4000:] + stderr[-4000:]
    return json.loads(out.read_text())


def test_gpu_check_dry_run_passes_every_section_within_float32_tolerances(launched):
    result = finished(launched, "gpu_check")
    assert result["dry_run"] is True and result["ok"] is True
    assert list(result["sections"]) == list(SECTIONS)
    for name, section in result["sections"].items():
        assert section["status"] == "ok", (name, section)
        assert math.isfinite(section["seconds"]) and section["seconds"] > 0
    for name in SECTIONS[:3]:
        s = result["sections"][name]
        assert s["max_units"] <= MAX_UNITS, (name, s["max_units"], s["worst_parameter"])
        assert s["max_relative_error"] <= MAX_RELATIVE_ERROR, (name, s["max_relative_error"])
        assert s["relative_error"] <= RELATIVE_ERROR, (name, s["relative_error"])
        assert s["frozen_max_change"] == 0.0 and s["reconstructed_parameters"] > 0
    assert result["sections"]["b_reconstruction_fp16_gradscaler"]["grad_scale"] > 1
    assert result["sections"]["c_reconstruction_lora_bf16"]["lora"] is True
    pipeline = result["sections"]["d_pipeline_0.5b_bf16"]
    assert pipeline["attribution"]["ok"] and set(pipeline["parts"]) == {"full", "grad"}
    scale = result["sections"]["e_bench_scale"]
    assert Path(scale["json"]).is_file() and set(scale["cases"]) == {"full", "lora"}


def test_bench_scale_quick_times_p1_p2_p3_for_both_cases(launched):
    result = finished(launched, "bench_scale")
    assert set(result["cases"]) == {"full", "lora"}
    for case, r in result["cases"].items():
        for key in ("P1", "P2", "P3"):
            p = r[key]
            for field in ("ours_s", "ref_s", "ratio", "ratio_of_minima"):
                assert math.isfinite(p[field]) and p[field] > 0, (case, key, field, p[field])
    for row in ("| P1 sweep", "| P2 all-N attributions", "| P3 reconstruct_update"):
        assert row in result["table_markdown"]
