"""One prepared check of probe on a machine with one NVIDIA GPU: exactness, the pipeline at 0.5B, the scale benchmark.

    python benchmarks/gpu_check.py                      # on the GPU machine: at most 8 minutes, writes
                                                        # benchmarks/results/<date>-gpu-check.json
    python benchmarks/gpu_check.py --dry-run            # every section on CPU with tiny sizes (< 60 s on 2 cores):
                                                        # what CI runs (tests/test_gpu_check.py) so the script
                                                        # does not rot; writes ...-gpu-check-dry-run.json
    python benchmarks/gpu_check.py --out PATH --budget 470

Needs torch, transformers and peft, nothing from the network. jsonargparse / wandb may be missing: nothing here
imports them, and probe's Python API is used throughout (the predict CLI needs a checkpoint directory, a tokenizer,
an optimizer file and rollout files; whether it could be imported is recorded under ``predict_cli``).

Sections (each records ``status``: ``ok``, ``failed`` (a check outside its tolerance), ``error: ...`` (an
exception) or ``skipped: time budget``, with its ``seconds`` and numbers):

a. ``reconstruct_update`` against ``torch.optim.AdamW.step()`` on CUDA under bfloat16 autocast: a small Qwen2 policy
   (float32 parameters, eager attention so every kernel is deterministic) after two real AdamW steps (lr 1e-2,
   betas (0.9, 0.95), weight decay 0.05), gradient clipping at 1.0; the real step is taken on deep copies of the
   model and optimizer, exactly as a trainer does (autocast forward, backward, clip, step), and compared element by
   element with ``lr * full`` by ``probe.verification.verify_step`` (the live probe's check).
   Tolerance: ``max_units <= 1``, units of ``2 ulp(max(|p|, |p'|)) + 1e-6 * lr * (|baseline| + |grad|)`` (float32
   AdamW's own rounding); also recorded, ``max_relative_error`` (largest error over the largest change of the same
   parameter), expected <= 1e-4 (the parameters' own float32 rounding, ulp(|p| ~ 1) against steps of ~lr).
   Parameters without a reconstructed step must not move at all.
b. the same under float16 autocast with ``torch.amp.GradScaler`` (``reconstruct_update(..., grad_scaler=scaler)``
   reads the scaler's current scale; the trainer's copy scales, unscales, clips and ``scaler.step``s).
c. the same with peft LoRA (r 16, alpha 32, all projections; only the adapters train) under bfloat16 autocast.
d. probe's pipeline on the Qwen2.5-0.5B-shaped policy (``bench_scale.build_policy``; full fine-tuning) under
   bfloat16 autocast, E = 128 x 512 tokens, U = 64 x 512, 16 sequences a pass: the reconstruction, base statistics,
   the sweep (full, grad) x 2 etas with SNIS estimates, first order (``probe.taylor``) along grad and full, and the
   attribution with its check; each with its time and ``torch.cuda.max_memory_allocated`` (peak over the step,
   counters reset before it). Status ``failed`` if a number is not finite or the attribution check fails
   (``probe.verification.attribution_check``, bfloat16 tolerance 5e-2).
e. ``bench_scale.main`` at GPU sizes: ``--device cuda --autocast bf16``, E = 256 x 512, U = 64 x 512, 16 sequences
   a pass, 2 rounds, memory by the CUDA counters, within the time left (its own JSON beside this one).

The whole run is held to ``--budget`` seconds from the start of the process, imports included (default 470,
8 minutes less 10 s to write the JSON and exit): a section that would start after the budget is
recorded as ``skipped: time budget``, and one still running when the budget ends is interrupted (SIGALRM) and
recorded so. The JSON is rewritten after every section. Exit status 0 when every section is ``ok``, else 1.

``--dry-run`` runs the same code on CPU with tiny sizes (tiny Qwen2 configs, a few sequences of a few tokens);
float16 autocast with ``torch.amp.GradScaler("cpu")`` where this torch supports it (else bfloat16, recorded).
"""

from __future__ import annotations

import os
import time

STARTED = time.perf_counter()  # the budget counts from here: the imports below (torch, transformers) included
os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # reproducible cuBLAS workspaces; before CUDA starts

import argparse
import contextlib
import copy
import dataclasses
import importlib.util
import json
import math
import platform
import signal
import sys
import traceback
from pathlib import Path
from typing import Any, Callable

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))  # bench_scale (and the benchmarks it reuses) live beside this file
sys.path.insert(1, str(HERE.parent))  # probe itself, when it is not installed

try:  # a library probe needs may be missing on a bare machine: main() then says which, in the JSON
    import bench_scale
    from bench_probe import random_batch

    from probe.attribution import AttributionInputs, attribute
    from probe.logprobs import teacher_force
    from probe.losses import LossConfig, normalisers, per_sequence_loss
    from probe.overrides import base_statistics, sweep
    from probe.snis import snis_estimates
    from probe.taylor import first_order, sequence_derivatives
    from probe.update import ReconstructionConfig, reconstruct_update
    from probe.verification import attribution_check, verify_step
except ImportError as e:
    IMPORT_ERROR: str | None = f"{type(e).__name__}: {e}"
else:
    IMPORT_ERROR = None

DEFAULT_BUDGET_S = 470.0  # 8 minutes, less 10 s for writing the JSON and exiting
SECTION_NAMES = (
    "a_reconstruction_bf16",
    "b_reconstruction_fp16_gradscaler",
    "c_reconstruction_lora_bf16",
    "d_pipeline_0.5b_bf16",
    "e_bench_scale",
)
LR, BETAS, WEIGHT_DECAY, MAX_GRAD_NORM, PRIOR_STEPS = 1e-2, (0.9, 0.95), 0.05, 1.0, 2
MAX_RELATIVE_ERROR = 1e-4  # float32 parameters: ulp(|p| ~ 1) = 1.2e-7 against steps of ~lr = 1e-2, with margin
SMALL = {  # the exactness sections' policy (Qwen2 fields over bench_scale's 0.5B ones)
    "gpu": dict(hidden_size=256, num_hidden_layers=4, num_attention_heads=4, intermediate_size=512, vocab_size=8192),
    "dry": dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64, vocab_size=512),
}
SIZES = {  # (sequences, tokens) of U for a-c; E, U and sequences per pass of d; bench_scale's arguments for e
    "gpu": dict(
        exact_U=(16, 64),
        pipeline_E=(128, 512),
        pipeline_U=(64, 512),
        microbatch=16,
        scale=["--E-seqs", "256", "--E-len", "512", "--U-seqs", "64", "--U-len", "512", "--microbatch", "16"],
    ),
    "dry": dict(
        exact_U=(4, 12),
        pipeline_E=(4, 16),
        pipeline_U=(4, 16),
        microbatch=2,
        scale=["--quick", "--E-seqs", "2", "--E-len", "16", "--U-seqs", "2", "--U-len", "16", "--microbatch", "1"],
    ),
}


class TimeBudget(Exception):
    """Raised by SIGALRM when the run's time budget ends, inside a running section only."""


_IN_SECTION = {"on": False}


def _alarm(signum: int, frame: Any) -> None:
    if _IN_SECTION["on"]:  # between sections the deadline check skips what is left
        raise TimeBudget()


# ---------------------------------------------------------------------------------------------
# what the machine has


def modules() -> dict:
    """Which of the libraries probe may use are importable here, with their versions (nothing is imported)."""
    out = {}
    for name in ("torch", "transformers", "peft", "lightning", "jsonargparse", "wandb", "safetensors", "numpy"):
        if importlib.util.find_spec(name) is None:
            out[name] = None
            continue
        try:
            from importlib.metadata import version

            out[name] = version(name)
        except Exception:  # noqa: BLE001 - present but without metadata
            out[name] = "present"
    return out


def environment(device: torch.device) -> dict:
    env = {
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "cpu_cores": os.cpu_count(),
    }
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        env.update(
            device=torch.cuda.get_device_name(device),
            capability=list(torch.cuda.get_device_capability(device)),
            memory_gib=props.total_memory / 2**30,
            cudnn=torch.backends.cudnn.version(),
            bf16_supported=torch.cuda.is_bf16_supported(),
        )
    else:
        env["device"] = "cpu (dry run)"
    return env


def predict_cli() -> dict:
    lib = modules()
    missing = [m for m in ("lightning", "jsonargparse") if lib.get(m) is None]
    return {
        "importable": not missing,
        "missing": missing,
        "used": False,
        "why": "the pipeline runs through probe's Python API: the predict CLI needs a checkpoint directory, a "
        "tokenizer, an optimizer file and rollout files, which a random-weight policy does not have",
    }


# ---------------------------------------------------------------------------------------------
# a-c: the reconstructed step against AdamW.step()


def update_batch(vocab: int, n: int, total: int, seed: int, device: torch.device):
    """n random sequences (a quarter prompt) with standard-normal advantages."""
    batch = random_batch(vocab, n, max(1, total // 4), total, seed=seed)
    gen = torch.Generator().manual_seed(seed + 1000)
    return dataclasses.replace(batch, advantages=torch.randn(n, generator=gen, dtype=torch.float64)).to(device)


def trainer_step(model, optimizer, U, loss: LossConfig, dtype: torch.dtype | None, scaler) -> None:
    """What a trainer does: autocast forward, (scaled) backward, unscale, clip, (scaler.)step."""
    optimizer.zero_grad(set_to_none=True)
    device_type = next(model.parameters()).device.type
    with torch.autocast(device_type, dtype=dtype) if dtype is not None else contextlib.nullcontext():
        stats = teacher_force(model, U, forcing=loss.forcing())
        total = per_sequence_loss(stats.logprobs, stats.mask, U.advantages, normalisers(U.target_mask, loss), loss)
        total = total.sum()
    (scaler.scale(total) if scaler is not None else total).backward()
    if scaler is not None:
        scaler.unscale_(optimizer)
    torch.nn.utils.clip_grad_norm_([p for g in optimizer.param_groups for p in g["params"]], MAX_GRAD_NORM)
    if scaler is not None:
        scaler.step(optimizer)
        scaler.update()
    else:
        optimizer.step()


def exactness(dry: bool, device: torch.device, dtype: torch.dtype, *, lora: bool = False, scaler: bool = False):
    """Reconstruct the next step and compare it with the step AdamW takes on deep copies; a section's numbers."""
    config = {**bench_scale.QWEN2_5_0_5B, **SMALL["dry" if dry else "gpu"]}
    model = bench_scale.build_policy(config, lora=lora, seed=0, device=device, attn="eager")
    trained = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trained, lr=LR, betas=BETAS, weight_decay=WEIGHT_DECAY)
    loss = LossConfig()
    n, total = SIZES["dry" if dry else "gpu"]["exact_U"]
    vocab = config["vocab_size"]
    for k in range(PRIOR_STEPS):  # a real optimizer history, in float32
        trainer_step(model, optimizer, update_batch(vocab, n, total, 100 + k, device), loss, None, None)
    optimizer.zero_grad(set_to_none=True)
    U = update_batch(vocab, n, total, 7, device)
    grad_scaler = torch.amp.GradScaler(device.type, init_scale=2.0**12) if scaler else None
    settings = ReconstructionConfig(
        max_grad_norm=MAX_GRAD_NORM, autocast_dtype={torch.bfloat16: "bfloat16", torch.float16: "float16"}[dtype]
    )
    t0 = time.perf_counter()
    update = reconstruct_update(model, optimizer, U, loss, settings, grad_scaler=grad_scaler)
    _sync(device)
    t_rec = time.perf_counter() - t0
    real_model, real_opt, real_scaler = copy.deepcopy((model, optimizer, grad_scaler))
    before = {name: p.detach().clone() for name, p in real_model.named_parameters()}
    t0 = time.perf_counter()
    trainer_step(real_model, real_opt, U, loss, dtype, real_scaler)
    _sync(device)
    t_step = time.perf_counter() - t0
    verdict = verify_step(real_model, update, before)
    moved = {name: float((p.detach() - before[name]).abs().max()) for name, p in real_model.named_parameters()}
    frozen_moved = max([v for name, v in moved.items() if name not in update.full], default=0.0)
    stepped = any(v > 0 for name, v in moved.items() if name in update.full)
    out = {
        "policy": {k: config[k] for k in ("hidden_size", "num_hidden_layers", "vocab_size")},
        "lora": lora,
        "autocast": str(dtype).removeprefix("torch."),
        "grad_scale": None if grad_scaler is None else float(grad_scaler.get_scale()),
        "U": [n, total],
        "lr": update.lr,
        "clip_coef": update.clip_coef,
        "grad_norm": update.grad_norm,
        "reconstructed_parameters": len(update.full),
        "reconstruction_s": t_rec,
        "training_step_s": t_step,
        **{k: verdict[k] for k in ("max_units", "max_units_step_scale", "max_relative_error", "relative_error")},
        "worst_parameter": verdict["worst_parameter"],
        "frozen_max_change": frozen_moved,
        "tolerance": {
            "max_units": 1.0,
            "unit": "2 ulp(max(|p|, |p'|)) + 1e-6 * lr * (|baseline| + |grad|)",
            "max_relative_error": MAX_RELATIVE_ERROR,
        },
    }
    problems = []
    if not stepped:
        problems.append("the real step moved no parameter (a GradScaler that skipped the step?)")
    if not verdict["ok"]:
        problems.append(f"max_units {verdict['max_units']:.3g} > 1 (worst: {verdict['worst_parameter']})")
    if not verdict["max_relative_error"] <= MAX_RELATIVE_ERROR:
        problems.append(f"max_relative_error {verdict['max_relative_error']:.3g} > {MAX_RELATIVE_ERROR:g}")
    if frozen_moved != 0.0:
        problems.append(f"a parameter without a reconstructed step moved by {frozen_moved:.3g}")
    out["status"] = "ok" if not problems else "failed: " + "; ".join(problems)
    return out


def section_fp16(dry: bool, device: torch.device) -> dict:
    """b: float16 autocast + GradScaler; on a CPU whose torch lacks float16 autocast, bfloat16 with the scaler."""
    try:
        return exactness(dry, device, torch.float16, scaler=True)
    except RuntimeError as e:
        if device.type == "cuda":
            raise
        out = exactness(dry, device, torch.bfloat16, scaler=True)
        out["fp16_on_cpu"] = f"unsupported here ({e}); the GradScaler path ran under bfloat16 instead"
        return out


# ---------------------------------------------------------------------------------------------
# d: the pipeline on the 0.5B-shaped policy


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measured(device: torch.device, record: dict, key: str, fn: Callable[[], Any]) -> Any:
    """Run fn, record its time and (CUDA) its peak allocated memory under ``record[key]``; return its result."""
    if device.type == "cuda":
        _sync(device)
        torch.cuda.reset_peak_memory_stats(device)
    t0 = time.perf_counter()
    out = fn()
    _sync(device)
    record[key] = {"seconds": time.perf_counter() - t0}
    if device.type == "cuda":
        record[key]["max_memory_allocated_mib"] = torch.cuda.max_memory_allocated(device) / 2**20
    print(f"  d/{key}: {record[key]}", flush=True)
    return out


def section_pipeline(dry: bool, device: torch.device) -> dict:
    sizes = SIZES["dry" if dry else "gpu"]
    (m, lm), (n, ln) = sizes["pipeline_E"], sizes["pipeline_U"]
    argv = ["--device", device.type, "--autocast", "bf16", "--microbatch", str(sizes["microbatch"])]
    argv += ["--E-seqs", str(m), "--E-len", str(lm), "--U-seqs", str(n), "--U-len", str(ln)]
    args = bench_scale.parse_args(argv + (["--quick"] if dry else []))
    out: dict = {
        "policy": "tiny Qwen2 (bench_scale --quick)" if dry else "Qwen2.5-0.5B shape, random init, full fine-tuning",
        "api": "python",
        "autocast": "bfloat16",
        "E": [m, lm],
        "U": [n, ln],
        "sequences_per_pass": sizes["microbatch"],
        "steps": {},
    }
    steps = out["steps"]
    c = measured(device, steps, "setup", lambda: bench_scale.setup_case("full", args))
    out["params"] = sum(p.numel() for p in c.model.parameters())
    update = measured(
        device, steps, "reconstruct_update", lambda: reconstruct_update(c.model, c.optimizer, c.U, c.loss, c.recon)
    )
    with c.amp():
        base = measured(device, steps, "base_statistics", lambda: base_statistics(c.model, c.E, c.forcing))
        etas = [update.lr * f for f in bench_scale.ETA_FACTORS]
        directions = {"full": update.full, "grad": update.grad}
        swept = measured(
            device, steps, "sweep_2x2", lambda: sweep(c.model, c.E, directions, etas, c.forcing, base=base)
        )
        slopes = {}
        for part in ("grad", "full"):
            derivs = measured(
                device,
                steps,
                f"first_order_{part}",
                lambda part=part: sequence_derivatives(c.model, c.E, directions[part], c.forcing, order=1),
            )
            slopes[part] = first_order(derivs, "token_entropy")
        inputs = AttributionInputs(c.model, update, c.U, c.E, c.forcing, base=base)
        attr = measured(
            device, steps, "attribution", lambda: attribute(inputs, check=True, microbatch_size=c.microbatch)
        )
    out["base_entropy_per_sequence"] = float(base.integrand("token_entropy").mean())
    out["parts"] = {}
    for part in directions:
        est = snis_estimates(swept, part, integrand="token_entropy")
        out["parts"][part] = {
            "etas": etas,
            "delta_h": [r.delta_entropy for r in est],
            "se": [r.delta_entropy_se for r in est],
            "ess": [r.ess for r in est],
            "first_order_slope": slopes[part].slope,
            "first_order_slope_se": slopes[part].slope_se,
            "first_order_prediction": [slopes[part].slope * eta for eta in etas],
        }
    abs_sum = float(attr.attributions.abs().sum())
    check = attribution_check(attr.total, slopes["grad"].slope, abs_sum, torch.bfloat16)
    out["attribution"] = {
        "sum": attr.total,
        "abs_sum": abs_sum,
        "first_order_grad_by_attribute": attr.first_order_grad,
        "first_order_grad_by_taylor": slopes["grad"].slope,
        "relative_gap": attr.relative_gap,
        **check,
    }
    numbers = [out["base_entropy_per_sequence"], attr.total, abs_sum]
    numbers += [x for p in out["parts"].values() for x in (*p["delta_h"], p["first_order_slope"])]
    problems = []
    if not all(math.isfinite(x) for x in numbers):
        problems.append("a number is not finite")
    if not check["ok"]:
        problems.append(
            f"attribution check: scaled difference {check['scaled_difference']:.3g} > {check['tolerance']:g}"
        )
    out["status"] = "ok" if not problems else "failed: " + "; ".join(problems)
    return out


# ---------------------------------------------------------------------------------------------
# e: bench_scale at GPU sizes


def section_scale(dry: bool, device: torch.device, time_left: float, out_path: Path) -> dict:
    argv = ["--device", device.type, "--autocast", "bf16", "--repeats", "1" if dry else "2"]
    argv += ["--threads", str(torch.get_num_threads())]  # this run's threads (bench_scale would set its default 2)
    argv += SIZES["dry" if dry else "gpu"]["scale"]
    argv += ["--memory", "inprocess", "--time-budget", f"{max(time_left, 1.0):.0f}", "--out", str(out_path)]
    result = bench_scale.main(argv)
    out: dict = {"argv": argv, "json": str(out_path), "table_markdown": result["table_markdown"], "cases": {}}
    problems = []
    for name in bench_scale.CASES:
        r = result["cases"].get(name, {})
        row = {}
        for key in ("P1", "P2", "P3"):
            p = r.get(key) or {"skipped": "missing"}
            if "skipped" in p:
                problems.append(f"{name} {key} {p['skipped']}")
                row[key] = p
                continue
            row[key] = {k: p[k] for k in ("ours_s", "ref_s", "ratio", "ratio_of_minima")}
            if not all(math.isfinite(row[key][k]) and row[key][k] > 0 for k in ("ours_s", "ref_s")):
                problems.append(f"{name} {key}: times not positive and finite")
        mem = r.get("memory", {})
        row["memory_mib"] = {k: mem.get(k, {}).get("mib") for k in bench_scale.MEASUREMENTS}
        row["memory_target"] = r.get("memory_target")
        out["cases"][name] = row
    out["status"] = "ok" if not problems else "skipped: time budget (" + "; ".join(problems) + ")"
    return out


# ---------------------------------------------------------------------------------------------
# main


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dry-run", action="store_true", help="every section on CPU with tiny sizes (CI)")
    ap.add_argument(
        "--out", type=Path, default=None, help="JSON path (default benchmarks/results/<date>-gpu-check.json)"
    )
    ap.add_argument("--budget", type=float, default=DEFAULT_BUDGET_S, help="seconds for the whole run")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's; dry run 2)")
    args = ap.parse_args(argv)
    started = STARTED
    deadline = started + args.budget
    dry = args.dry_run
    if not dry and not torch.cuda.is_available():
        ap.error("torch sees no CUDA device; use --dry-run to exercise the script on CPU")
    if args.threads or dry:
        torch.set_num_threads(args.threads or min(2, os.cpu_count() or 1))
    device = torch.device("cpu" if dry else "cuda")
    date = time.strftime("%Y-%m-%d")
    out_path = args.out or HERE / "results" / f"{date}-gpu-check{'-dry-run' if dry else ''}.json"
    result: dict = {
        "date": time.strftime("%Y-%m-%d %H:%M"),
        "dry_run": dry,
        "budget_s": args.budget,
        "environment": environment(device),
        "modules": modules(),
        "predict_cli": predict_cli(),
        "sections": {},
    }

    def save() -> None:
        out_path.parent.mkdir(parents=True, exist_ok=True)
        out_path.write_text(json.dumps(result, indent=2, default=str))

    if IMPORT_ERROR is not None:
        result["sections"] = {name: {"status": f"error: import: {IMPORT_ERROR}"} for name in SECTION_NAMES}
        result["ok"] = False
        save()
        print(f"gpu_check: probe or a library it needs does not import ({IMPORT_ERROR}); {out_path}")
        return 1

    scale_json = out_path.with_name(out_path.stem + "-scale.json")
    runs: list[Callable[[], dict]] = [
        lambda: exactness(dry, device, torch.bfloat16),
        lambda: section_fp16(dry, device),
        lambda: exactness(dry, device, torch.bfloat16, lora=True),
        lambda: section_pipeline(dry, device),
        lambda: section_scale(dry, device, deadline - time.perf_counter() - 10.0, scale_json),
    ]
    sections = list(zip(SECTION_NAMES, runs))
    signal.signal(signal.SIGALRM, _alarm)
    signal.setitimer(signal.ITIMER_REAL, max(deadline - time.perf_counter(), 0.001))
    try:
        for name, fn in sections:
            left = deadline - time.perf_counter()
            if left <= 0:
                result["sections"][name] = {"status": "skipped: time budget"}
                save()
                continue
            print(f"{name} ({left:.0f} s left)", flush=True)
            t0 = time.perf_counter()
            try:
                _IN_SECTION["on"] = True
                r = fn()
            except TimeBudget:
                r = {"status": f"skipped: time budget (interrupted after {time.perf_counter() - t0:.0f} s)"}
            except Exception as e:  # noqa: BLE001 - a section's failure is recorded, the others still run
                r = {"status": f"error: {type(e).__name__}: {e}"[:500], "traceback": traceback.format_exc()[-3000:]}
            finally:
                _IN_SECTION["on"] = False
            r["seconds"] = time.perf_counter() - t0
            result["sections"][name] = r
            print(f"{name}: {r['status']} ({r['seconds']:.1f} s)", flush=True)
            if device.type == "cuda":
                torch.cuda.empty_cache()
            save()
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
    result["wall_s"] = time.perf_counter() - started
    result["ok"] = all(r["status"] == "ok" for r in result["sections"].values())
    save()
    print(f"gpu_check: {'all sections ok' if result['ok'] else 'NOT all ok'} in {result['wall_s']:.0f} s; {out_path}")
    return 0 if result["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
