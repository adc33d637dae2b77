"""What probing costs, side by side with what the trainer already pays, in one process.

    python benchmarks/bench_probe.py                 # toy + llama-22m, prints a table, writes
                                                     # benchmarks/results/<date>-<time>-<machine>.json
    python benchmarks/bench_probe.py --quick         # smoke run: toy policy only, one round (writes ...-quick.json)

Policies: the built-in toy world (tiny Llama, 2 layers, hidden 64, vocab 16; E = 32 x 32 tokens,
its position limit) and ``llama-22m``, a Llama built from a config with random weights
(hidden 512, 8 layers, 8 heads, MLP 768, vocab 4096, untied: 22.0M parameters; E = 32 x 64
tokens, 16 prompt + 48 response). Its optimizer state comes from one real AdamW step.

* P1  exact path: ``probe.overrides.sweep`` over K = 2 directions x J = 4 etas (base statistics
      given; float64 head) vs K*J plain no-grad forwards of E (``model(...)``, float32 logits only).
      Target <= 1.10x. Run with the ``token_entropy`` integrand (full-vocabulary entropies, the
      default) and the ``logprob`` one, plus K*J teacher-forced passes without overrides (float64
      head + entropies) to separate the head's cost from the overrides'.
* P2  all-N first-order attributions (``probe.attribution.attribute``, base given, no check) vs
      one forward+backward over U and E (U's policy-gradient loss + E's log-likelihood, one
      ``autograd.grad``), at N = 16, 64, 256 (M = |E| = 32; on the toy also M = 1024). Target <= 4x
      and flat in N. Against the exact per-sequence path (N x J passes over E, J = 5), whose cost is
      *estimated*, not run: N * J times one sweep point of E timed in the same rounds, times the
      measured factor by which ``per_sequence_exact`` on 2 sequences costs more than its 2 * J
      passes (building each v_i). Target >= 100x at N = 64.
* P3  ``reconstruct_update`` vs one training step (forward + backward + clip + AdamW.step) on the
      same U: the measurement of ``benchmarks/bench_reconstruction.py`` (imported). Target <= 1.5x.
* live callback overhead per probed step: the toy GRPO fit (``probe.grpo.GRPOModule``) without and with
      ``callbacks.LiveEntropyProbe(every_n_steps=1)`` in a subprocess, median step time (first step dropped).
* peak memory of teacher forcing vs model size: one subprocess per size; the peak resident set
  (``VmHWM``, reset through ``/proc/self/clear_refs`` before each measurement, with glibc's
  mmap threshold fixed so freed tensors go back to the OS) minus the resident set just before.
  ``tracemalloc`` cannot see torch's allocations, hence the OS counters.

Timings are medians over interleaved rounds after a warm-up round (a busy machine slows every
function of a round alike); ratios are medians of the per-round ratios, with the ratio of the
minimum times beside them (the least disturbed run of each, robust on a shared machine). torch runs on 2 threads for
the Llama
policies and 1 for the toy (as its config does: tiny ops on 2 threads of a busy 2-core machine
spin-wait and run up to 25x slower).
"""

from __future__ import annotations

import argparse
import copy
import ctypes
import gc
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))  # bench_reconstruction (P3's measurement) lives beside this file

from probe.attribution import AttributionInputs, attribute, per_sequence_exact  # noqa: E402
from probe.batch import SequenceBatch, collate  # noqa: E402
from probe.logprobs import (
    TeacherForcing,  # noqa: E402
    teacher_force,  # noqa: E402
)
from probe.losses import LossConfig, normalisers, per_sequence_loss  # noqa: E402
from probe.overrides import base_statistics, sweep  # noqa: E402
from probe.update import ReconstructionConfig, reconstruct_update  # noqa: E402

from bench_reconstruction import make_batch, paired, train_step  # noqa: E402

ENTROPY = TeacherForcing(with_entropy=True)  # the probe's default teacher forcing: float64 head, 256 sequences a pass
LOGPROB = TeacherForcing(with_entropy=False)
CLIPPED = ReconstructionConfig(max_grad_norm=1.0)

LLAMA_SIZES = {  # name -> LlamaConfig fields (vocab 4096, untied embeddings)
    "llama-6m": dict(hidden_size=256, intermediate_size=512, num_hidden_layers=4, num_attention_heads=4),
    "llama-22m": dict(hidden_size=512, intermediate_size=768, num_hidden_layers=8, num_attention_heads=8),
    "llama-91m": dict(hidden_size=768, intermediate_size=2048, num_hidden_layers=12, num_attention_heads=12),
}
VOCAB = 4096
LR = 3e-4
TARGETS = {"P1": ("<=", 1.10), "P2_ratio": ("<=", 4.0), "P2_speedup": (">=", 100.0), "P3": ("<=", 1.5)}


# ---------------------------------------------------------------------------------------------
# policies and batches


class Policy:
    """A model, a live AdamW with state, U (32 sequences) and E, for one benchmark policy."""

    def __init__(self, name: str, model: torch.nn.Module, vocab: int, prompt: int, total: int, config: dict):
        self.name, self.model, self.vocab, self.prompt, self.total, self.config = (
            name,
            model,
            vocab,
            prompt,
            total,
            config,
        )
        self.n_params = sum(p.numel() for p in model.parameters())
        self.loss = LossConfig()
        self.U = make_batch(vocab, n=32, prompt=prompt, total=total)
        self.E = random_batch(vocab, 32, prompt, total, seed=1)
        self.optimizer = torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=0.01)
        train_step(
            model, self.optimizer, make_batch(vocab, n=32, prompt=prompt, total=total), self.loss
        )  # non-empty state
        model.eval()

    def batch(self, n: int) -> SequenceBatch:
        return make_batch(self.vocab, n=n, prompt=self.prompt, total=self.total)

    def describe(self) -> dict:
        return {
            "name": self.name,
            "params": self.n_params,
            "config": self.config,
            "E": [len(self.E), self.total],
            "E_response_tokens": int(self.E.target_mask.sum()),
        }


def random_batch(vocab: int, n: int, prompt: int, total: int, seed: int) -> SequenceBatch:
    gen = torch.Generator().manual_seed(seed)
    records = [
        dict(
            prompt_ids=torch.randint(1, vocab, (prompt,), generator=gen).tolist(),
            response_ids=torch.randint(1, vocab, (total - prompt,), generator=gen).tolist(),
            group=i // 4,
        )
        for i in range(n)
    ]
    return collate(records)


def llama(name: str, seed: int = 0) -> torch.nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    fields = LLAMA_SIZES[name]
    cfg = LlamaConfig(
        vocab_size=VOCAB,
        num_key_value_heads=fields["num_attention_heads"],
        max_position_embeddings=128,
        tie_word_embeddings=False,
        attn_implementation="sdpa",
        **fields,
    )
    torch.manual_seed(seed)
    return LlamaForCausalLM(cfg).float().eval()


def make_policy(name: str) -> Policy:
    if name == "toy":
        from probe.loading import load_policy
        from probe.toy.world import ToyWorldConfig, build_toy_world

        model, _ = load_policy(build_toy_world(), dtype="float32")
        c = ToyWorldConfig()
        config = dict(
            hidden_size=c.hidden_size,
            intermediate_size=c.intermediate_size,
            num_hidden_layers=c.num_hidden_layers,
            num_attention_heads=c.num_attention_heads,
            vocab_size=16,
            weights="toy world (trained)",
        )
        return Policy(name, model, vocab=16, prompt=8, total=32, config=config)
    return Policy(
        name,
        llama(name),
        vocab=VOCAB,
        prompt=16,
        total=64,
        config={**LLAMA_SIZES[name], "vocab_size": VOCAB, "weights": "random init, seed 0"},
    )


# ---------------------------------------------------------------------------------------------
# timing


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def timed(fn: Callable[[], Any]) -> float:
    _sync()
    t0 = time.perf_counter()
    fn()
    _sync()
    return time.perf_counter() - t0


def interleaved(fns: dict[str, Callable[[], Any]], repeats: int, warmup: bool = True) -> dict[str, dict]:
    """Run the functions in turn, ``repeats`` rounds (after one warm-up round); per function the
    median time and, against the FIRST function (the reference), the median per-round ratio.
    Interleaving puts every function under the same (shared, noisy) machine load within a round."""
    if warmup:
        for fn in fns.values():
            fn()
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(repeats):
        for k, fn in fns.items():
            times[k].append(timed(fn))
    ref = next(iter(fns))
    return {
        k: {
            "median_s": statistics.median(v),
            "min_s": min(v),
            "all_s": v,
            "ratio": statistics.median([t / r for t, r in zip(v, times[ref])]),
            "ratio_of_minima": min(v) / min(times[ref]),
        }
        for k, v in times.items()
    }


# ---------------------------------------------------------------------------------------------
# the measurements


def bench_p1(pol: Policy, update, base, repeats: int, K: int = 2, J: int = 4) -> dict:
    """sweep over K directions x J etas vs K*J plain no-grad forwards, with and without token entropies.

    ``token_entropy`` (the default integrand) needs full-vocabulary entropies; ``logprob`` only log-probs.
    One teacher-forced pass without overrides (float64 head + entropies) separates the head's cost.
    """
    parts = ["full", "grad", "baseline"][:K]
    directions = {p: update.parts()[p] for p in parts}
    etas = [LR * f for f in (0.1, 0.3, 1.0, 3.0)][:J]
    E, model = pol.E, pol.model

    def plain() -> None:
        with torch.no_grad():
            for _ in range(K * J):
                model(
                    input_ids=E.input_ids, attention_mask=E.attention_mask, position_ids=E.position_ids, use_cache=False
                )

    def head_only() -> None:
        with torch.no_grad():
            for _ in range(K * J):
                teacher_force(model, E, forcing=ENTROPY)

    r = interleaved(
        {
            "plain": plain,
            "sweep_token_entropy": lambda: sweep(model, E, directions, etas, ENTROPY, base=base),
            "sweep_logprob": lambda: sweep(model, E, directions, etas, LOGPROB, base=base),
            "teacher_force_no_override": head_only,
        },
        repeats,
    )
    ratios = {
        "ratio_logprob": r["sweep_logprob"]["ratio"],
        "ratio_no_override": r["teacher_force_no_override"]["ratio"],
    }
    per_point = r["sweep_token_entropy"]["median_s"] / (K * J)
    return {
        "K": K,
        "J": J,
        "parts": parts,
        **compared(r, "sweep_token_entropy", "plain", repeats),
        **ratios,
        "per_point_s": per_point,
    }


def compared(r: dict, ours: str, ref: str, repeats: int) -> dict:
    """The fields every timed comparison reports: its rounds, the medians of ``ours`` and ``ref`` and their ratios."""
    return {
        "repeats": repeats,
        "times": r,
        "ours_s": r[ours]["median_s"],
        "ref_s": r[ref]["median_s"],
        "ratio": r[ours]["ratio"],
        "ratio_of_minima": r[ours]["ratio_of_minima"],
    }


def fwd_bwd(model: torch.nn.Module, U: SequenceBatch, E: SequenceBatch, loss: LossConfig) -> None:
    """One forward+backward over U (policy-gradient loss) and E (log-likelihood), one autograd.grad."""
    params = [p for p in model.parameters() if p.requires_grad]
    with torch.enable_grad():
        su = teacher_force(model, U, forcing=loss.forcing())
        lu = per_sequence_loss(su.logprobs, su.mask, U.advantages, normalisers(U.target_mask, loss), loss).sum()
        le = teacher_force(model, E).sequence_logprobs.sum()
        torch.autograd.grad(lu + le, params, allow_unused=True)


def bench_p2(pol: Policy, E: SequenceBatch, Ns: list[int], repeats: int, repeats_large: int, J_exact: int) -> dict:
    """attribute vs one fwd+bwd over U and E for each N, and vs the exact per-sequence path (estimated).

    Each round also times one sweep point of E (one teacher-forced pass under an override), so the
    exact path's estimate N * J * point is made under the same load as the attribution it is compared
    with. ``per_sequence_exact`` on 2 sequences, timed once between two sweep points, gives the factor
    by which a real per-sequence sweep costs more than its J passes (building each v_i by a backward).
    """
    model, loss = pol.model, pol.loss
    base = base_statistics(model, E, ENTROPY)
    rows, calibration = [], None
    for k, N in enumerate(Ns):
        U = pol.batch(N)
        update = reconstruct_update(model, pol.optimizer, U, loss, CLIPPED)
        point = lambda: sweep(model, E, {"full": update.full}, [LR], ENTROPY, base=base)  # noqa: E731
        inputs = AttributionInputs(model, update, U, E, ENTROPY, base=base)
        if calibration is None:  # the exact per-sequence path on 2 sequences of U, J etas, no mixed form
            etas = [LR * f for f in (0.1, 0.3, 1.0, 3.0, 10.0)][:J_exact]
            point()
            points = [timed(point)]
            t = timed(lambda: per_sequence_exact(inputs, etas, [0, 1], mixed=False, integrands=("token_entropy",)))
            points.append(timed(point))
            factor = (t / 2) / (J_exact * statistics.mean(points))
            calibration = {"sequences": 2, "J": J_exact, "seconds": t, "point_s": points, "factor": factor}
        reps = repeats if N <= 64 else repeats_large
        r = interleaved(
            {
                "fwd_bwd_U_E": lambda: fwd_bwd(model, U, E, loss),
                "attribute": lambda: attribute(inputs, check=False),
                "sweep_point": point,
            },
            reps,
            warmup=k == 0,
        )
        t_attr, t_point = r["attribute"]["median_s"], r["sweep_point"]["median_s"]
        exact_forwards = N * J_exact * t_point
        exact_calibrated = exact_forwards * calibration["factor"]
        point_ratio = statistics.median([a / p for a, p in zip(r["attribute"]["all_s"], r["sweep_point"]["all_s"])])
        row = {"N": N, **compared(r, "attribute", "fwd_bwd_U_E", reps), "exact_forward_count_s": exact_forwards}
        row.update(exact_calibrated_s=exact_calibrated, speedup_forward_count=N * J_exact / point_ratio)
        row["speedup_calibrated"] = row["speedup_forward_count"] * calibration["factor"]
        rows.append(row)
        print(
            f"  [{pol.name}] P2 M={len(E)} N={N}: attribute {t_attr:.3f}s, fwd+bwd U&E {row['ref_s']:.3f}s, "
            f"ratio {row['ratio']:.2f}, speed-up vs exact {row['speedup_calibrated']:.0f}x "
            f"(forward count {row['speedup_forward_count']:.0f}x)",
            flush=True,
        )
    return {"rows": rows, "exact_calibration": calibration, "J": J_exact, "M": len(E)}


def bench_p3(pol: Policy, repeats: int) -> dict:
    """bench_reconstruction's measurement: train step vs reconstruct_update on the same U (paired, interleaved)."""
    trainer_model = copy.deepcopy(pol.model)
    trainer_opt = torch.optim.AdamW(trainer_model.parameters(), lr=LR, weight_decay=0.01)
    t_train, t_rec, ratio = paired(
        lambda: train_step(trainer_model, trainer_opt, pol.U, pol.loss),
        lambda: reconstruct_update(pol.model, pol.optimizer, pol.U, pol.loss, CLIPPED),
        repeats,
    )
    return {"ref_s": t_train, "ours_s": t_rec, "ratio": ratio, "repeats": repeats}


def live_callback_status() -> tuple[bool, str]:
    """Whether callbacks/live.py holds a working live probe (it is being written in parallel)."""
    try:
        import callbacks.live as live
    except Exception as e:  # noqa: BLE001 - any import failure means "not available"
        return False, f"callbacks.live does not import ({type(e).__name__})"
    cls = getattr(live, "LiveEntropyProbe", None)
    hooks = ("on_train_batch_start", "on_train_batch_end", "on_before_optimizer_step", "on_after_backward")
    if cls is None or not any(h in vars(cls) for h in hooks):
        return False, "live callback pending: callbacks/live.py has no training hooks yet"
    try:
        import probe.grpo  # noqa: F401  (the toy GRPO fit the callback is attached to)
    except Exception as e:  # noqa: BLE001
        return False, f"probe.grpo does not import ({type(e).__name__})"
    return True, "implemented"


_LIVE_CHILD = "--live-child"


def live_child(steps: int) -> dict:
    """Toy GRPO fit (16 prompts x 8 responses per step, AdamW, clipping 1.0) for ``steps`` steps, without and
    with ``LiveEntropyProbe(every_n_steps=1)`` (its defaults: E = 32 prompts x 8, refreshed every step;
    eta in {0.1, 1, 10} x lr; first + second order, attribution, verification, realised change).
    Per-step wall time from ``on_train_batch_start`` to the end of ``on_train_batch_end`` (the live
    callback's after-step work included); the first step (E sampled, caches warm) is dropped."""
    import tempfile

    import lightning.pytorch as pl

    from callbacks.live import LiveEntropyProbe
    from datamodules.prompts import PromptDataModule
    from probe.grpo import FitRunSettings, GRPOModule

    class StepTimer(pl.Callback):
        def __init__(self) -> None:
            self.times: list[float] = []

        def on_train_batch_start(self, *args: Any) -> None:
            self.t0 = time.perf_counter()

        def on_train_batch_end(self, *args: Any) -> None:
            self.times.append(time.perf_counter() - self.t0)

    out: dict = {"steps": steps}
    with tempfile.TemporaryDirectory() as tmp:
        for with_live in (False, True):
            pl.seed_everything(0, verbose=False)
            module = GRPOModule(
                run=FitRunSettings(root=tmp, name=f"live_{with_live}", num_threads=1),
                checkpoint_every_n_steps=-1,
                save_policy=False,
            )
            timer = StepTimer()
            live = LiveEntropyProbe(every_n_steps=1) if with_live else None
            trainer = pl.Trainer(
                accelerator="cpu",
                devices=1,
                max_steps=steps,
                gradient_clip_val=1.0,
                logger=False,
                enable_progress_bar=False,
                enable_checkpointing=False,
                enable_model_summary=False,
                callbacks=([live] if live else []) + [timer],
            )
            trainer.fit(module, PromptDataModule(prompts_per_step=16))
            key = "with_live" if with_live else "without"
            out[key] = timer.times
            if live is not None:
                out["live_self_reported_s"] = [
                    r.get("timings", {}).get("total_s") for r in getattr(live, "records", [])
                ]
    return out


def bench_live(steps: int = 6) -> dict:
    ok, why = live_callback_status()
    if not ok:
        return {"measured": False, "why": why}
    proc = subprocess.run(
        [sys.executable, str(Path(__file__).resolve()), _LIVE_CHILD, str(steps)],
        capture_output=True,
        text=True,
        timeout=1800,
        env={**os.environ, "WANDB_MODE": "disabled"},
    )
    if proc.returncode != 0:
        return {
            "measured": False,
            "why": "the live fit failed: " + " ".join(proc.stderr.strip().splitlines()[-1:])[:200],
        }
    r = json.loads(proc.stdout.strip().splitlines()[-1])
    without, with_live = r["without"][1:], r["with_live"][1:]
    base_s, live_s = statistics.median(without), statistics.median(with_live)
    reported = [x for x in r.get("live_self_reported_s", [])[1:] if x is not None]
    return {
        "measured": True,
        "ref_s": base_s,
        "ours_s": live_s,
        "overhead_s": live_s - base_s,
        "ratio": live_s / base_s,
        "self_reported_s": statistics.median(reported) if reported else None,
        "raw": r,
    }


# ---------------------------------------------------------------------------------------------
# memory (one subprocess per model size)

_MEM_CHILD = "--memory-child"


def _status_kb(key: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{key} not in /proc/self/status")


def _trim() -> None:
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:
        pass


def _peak_mb(fn: Callable[[], Any]) -> tuple[float, str]:
    """Peak extra resident memory of fn() in MiB, and how it was measured."""
    _trim()
    try:
        Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current RSS (Linux >= 4.0)
        method = "VmHWM after clear_refs"
    except OSError:
        method = "ru_maxrss delta (peak could not be reset: a lower bound)"
    before = _status_kb("VmRSS")
    fn()
    peak = _status_kb("VmHWM")
    return (peak - before) / 1024, method


def memory_child(name: str) -> dict:
    torch.set_num_threads(1 if name == "toy" else 2)
    if name == "toy":
        pol_model = make_policy("toy").model
        vocab, prompt, total = 16, 8, 32
    else:
        pol_model = llama(name)
        vocab, prompt, total = VOCAB, 16, 64
    E = random_batch(vocab, 32, prompt, total, seed=1)
    n_params = sum(p.numel() for p in pol_model.parameters())
    direction = {n: torch.full_like(p, 1e-3) for n, p in pol_model.named_parameters()}  # allocated before measuring
    base = base_statistics(pol_model, E, ENTROPY)
    out = {
        "name": name,
        "params": n_params,
        "weights_mib": n_params * 4 / 2**20,
        "logits_mib": len(E) * total * vocab * 4 / 2**20,
        "E": [len(E), total],
    }

    def tf() -> None:
        with torch.no_grad():
            teacher_force(pol_model, E, forcing=ENTROPY)

    def sweep_point() -> None:
        sweep(pol_model, E, {"d": direction}, [1e-3], ENTROPY, base=base)

    def fb() -> None:
        params = list(pol_model.parameters())
        with torch.enable_grad():
            grads = torch.autograd.grad(teacher_force(pol_model, E).sequence_logprobs.sum(), params)
        del grads

    for key, fn in (("teacher_force_nograd_mib", tf), ("sweep_point_mib", sweep_point), ("forward_backward_mib", fb)):
        out[key], out["method"] = _peak_mb(fn)
    return out


def bench_memory(sizes: list[str]) -> list[dict]:
    rows = []
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "131072", "OMP_NUM_THREADS": "2"}
    for name in sizes:
        proc = subprocess.run(
            [sys.executable, str(Path(__file__).resolve()), _MEM_CHILD, name],
            capture_output=True,
            text=True,
            env=env,
            timeout=1800,
        )
        if proc.returncode != 0:
            rows.append({"name": name, "error": proc.stderr.strip().splitlines()[-1:]})
            continue
        rows.append(json.loads(proc.stdout.strip().splitlines()[-1]))
        r = rows[-1]
        print(
            f"  memory {name}: {r['params'] / 1e6:.2f}M params, teacher forcing +{r['teacher_force_nograd_mib']:.0f} "
            f"MiB, sweep point +{r['sweep_point_mib']:.0f} MiB, fwd+bwd +{r['forward_backward_mib']:.0f} MiB",
            flush=True,
        )
    return rows


# ---------------------------------------------------------------------------------------------
# report


def _machine() -> dict:
    cpu = "unknown"
    try:
        cpu = next(
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if line.startswith("model name")
        )
    except (OSError, StopIteration):
        pass
    try:
        commit = subprocess.run(
            ["git", "-C", str(HERE), "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=True
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        commit = "unknown"
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "machine": platform.machine(),
        "torch": torch.__version__,
        "python": sys.version.split()[0],
        "commit": commit,
        "device": "cuda:" + torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu",
    }


def _met(kind: str, value: float) -> str:
    op, target = TARGETS[kind]
    ok = value <= target if op == "<=" else value >= target
    return f"{op} {target:g}", "yes" if ok else "**no**"


def table(result: dict) -> str:
    rows = [
        "| measurement | policy | probe (median) | reference (median) | ratio: median of rounds (of minima) | target "
        "| met |",
        "|---|---|---:|---:|---:|---:|:---:|",
    ]
    for name, r in result["policies"].items():
        if "P1" in r:
            p = r["P1"]
            n = p["K"] * p["J"]
            for key, label in (
                ("sweep_token_entropy", "token_entropy (log-probs + full-vocabulary entropies)"),
                ("sweep_logprob", "logprob (log-probs only)"),
                ("teacher_force_no_override", "no override: teacher forcing + entropies alone"),
            ):
                tm = p["times"][key]
                t, ok = _met("P1", tm["ratio"])
                what = (
                    f"P1 sweep, {p['K']} directions x {p['J']} etas, {label}"
                    if key != "teacher_force_no_override"
                    else f"P1 breakdown: {n} x {label}"
                )
                rows.append(
                    f"| {what} | {name} | {tm['median_s']:.3f} s | {n} plain forwards {p['ref_s']:.3f} s | "
                    f"{tm['ratio']:.2f}x ({tm['ratio_of_minima']:.2f}x) | "
                    f"{t if key != 'teacher_force_no_override' else '-'} | "
                    f"{ok if key != 'teacher_force_no_override' else '-'} |"
                )
        for key in ("P2", "P2_large_E"):
            if key not in r:
                continue
            p2 = r[key]
            for row in p2["rows"]:
                t, ok = _met("P2_ratio", row["ratio"])
                rows.append(
                    f"| P2 all-N attributions, N = {row['N']}, M = {p2['M']} | {name} | {row['ours_s']:.3f} s | "
                    f"fwd+bwd over U and E {row['ref_s']:.3f} s | {row['ratio']:.2f}x "
                    f"({row['ratio_of_minima']:.2f}x) | {t} | {ok} |"
                )
            for row in p2["rows"]:
                t, ok = _met("P2_speedup", row["speedup_calibrated"])
                rows.append(
                    f"| P2 speed-up vs exact per-sequence (N x J = {row['N']} x {p2['J']}), M = {p2['M']}, estimated | "
                    f"{name} | {row['ours_s']:.3f} s | {row['exact_calibrated_s']:.1f} s (N x J sweep points x "
                    f"{p2['exact_calibration']['factor']:.2f}; N x J points alone: {row['exact_forward_count_s']:.1f} "
                    f"s) | {row['speedup_calibrated']:.0f}x ({row['speedup_forward_count']:.0f}x) | {t} | {ok} |"
                )
        if "P3" in r:
            p = r["P3"]
            t, ok = _met("P3", p["ratio"])
            rows.append(
                f"| P3 reconstruction | {name} | {p['ours_s']:.3f} s | training step {p['ref_s']:.3f} s | "
                f"{p['ratio']:.2f}x | {t} | {ok} |"
            )
        live = r.get("live")
        if live is not None:
            if live.get("measured"):
                own = (
                    ""
                    if live.get("self_reported_s") is None
                    else f", callback's own timing {live['self_reported_s']:.3f} s"
                )
                rows.append(
                    f"| live callback (every step), step with probe | {name} (GRPO fit) | {live['ours_s']:.3f} s "
                    f"(+{live['overhead_s']:.3f} s{own}) | GRPO step {live['ref_s']:.3f} s | {live['ratio']:.2f}x | "
                    "- | - |"
                )
            else:
                rows.append(f"| live callback, per probed step | {name} | not measured ({live['why']}) | | | | |")
    mem = result.get("memory") or []
    if mem:
        rows += [
            "",
            "| model | params | weights | logits [32, T, V] f32 | teacher forcing, no grad | sweep point | fwd+bwd |",
            "|---|---:|---:|---:|---:|---:|---:|",
        ]
        for m in mem:
            if "error" in m:
                rows.append(f"| {m['name']} | failed: {m['error']} | | | | | |")
                continue
            rows.append(
                f"| {m['name']} (E {m['E'][0]} x {m['E'][1]}) | {m['params'] / 1e6:.2f}M | {m['weights_mib']:.0f} MiB "
                f"| {m['logits_mib']:.1f} MiB | +{m['teacher_force_nograd_mib']:.0f} MiB | +{m['sweep_point_mib']:.0f} "
                f"MiB | +{m['forward_backward_mib']:.0f} MiB |"
            )
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> dict | None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--policies", nargs="+", default=["toy", "llama-22m"], choices=["toy", *LLAMA_SIZES])
    ap.add_argument("--repeats", type=int, default=5, help="timed rounds per measurement (after a warm-up round)")
    ap.add_argument("--repeats-toy", type=int, default=9, help="rounds for the (fast) toy policy")
    ap.add_argument("--repeats-large", type=int, default=3, help="rounds for P2 at N > 64 (Llama)")
    ap.add_argument("--Ns", type=int, nargs="+", default=[16, 64, 256], help="update-batch sizes of P2")
    ap.add_argument(
        "--large-eval", type=int, default=1024, help="toy only: P2 again with E of this many sequences (0: skip)"
    )
    ap.add_argument("--memory-sizes", nargs="*", default=["toy", "llama-6m", "llama-22m", "llama-91m"])
    ap.add_argument("--threads", type=int, default=2, help="torch threads for the Llama policies")
    ap.add_argument(
        "--threads-toy",
        type=int,
        default=1,
        help="torch threads for the toy policy (its config's 1: tiny ops on 2 threads of a busy 2-core box spin-wait)",
    )
    ap.add_argument("--quick", action="store_true", help="smoke run: toy only, 1 repeat, N = 16, toy memory")
    ap.add_argument(
        "--out",
        type=Path,
        default=None,
        help="JSON path (default benchmarks/results/<date>-<time>-<device>-<cores>cores.json)",
    )
    ap.add_argument(_MEM_CHILD, default=None, help=argparse.SUPPRESS)
    ap.add_argument(_LIVE_CHILD, type=int, default=None, help=argparse.SUPPRESS)
    ap.add_argument(
        "--live-steps", type=int, default=6, help="toy GRPO steps per live-callback fit (the first is dropped)"
    )
    args = ap.parse_args(argv)
    if args.memory_child:
        print(json.dumps(memory_child(args.memory_child)))
        return None
    if args.live_child:
        torch.set_num_threads(1)
        print(json.dumps(live_child(args.live_child)))
        return None
    if args.quick:
        args.policies, args.repeats, args.repeats_toy, args.repeats_large, args.Ns = ["toy"], 1, 1, 1, [16]
        args.memory_sizes, args.large_eval, args.live_steps = ["toy"], 256, 3
    load_before = os.getloadavg()
    started = time.time()
    result: dict = {
        "date": time.strftime("%Y-%m-%d %H:%M"),
        "machine": _machine(),
        "load_before": load_before,
        "policies": {},
        "notes": [],
    }
    stem = f"{time.strftime('%Y-%m-%d-%H%M')}-{result['machine']['device']}-{result['machine']['cores']}cores"
    out = args.out or HERE / "results" / (stem + ("-quick" if args.quick else "") + ".json")

    def save() -> None:  # after every section, so a long run that is cut short keeps what it measured
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(result, indent=2))

    for name in args.policies:
        threads = args.threads_toy if name == "toy" else args.threads
        torch.set_num_threads(threads)
        print(f"{name}: building ({threads} torch thread(s))", flush=True)
        pol = make_policy(name)
        reps = args.repeats_toy if name == "toy" else args.repeats
        r: dict = {"policy": pol.describe(), "threads": threads, "load_start": os.getloadavg()}
        result["policies"][name] = r
        update = reconstruct_update(pol.model, pol.optimizer, pol.U, pol.loss, CLIPPED)
        base = base_statistics(pol.model, pol.E, ENTROPY)
        r["P1"] = bench_p1(pol, update, base, reps)
        print(
            f"  [{name}] P1: sweep {r['P1']['ours_s']:.3f}s vs plain {r['P1']['ref_s']:.3f}s, ratio "
            f"{r['P1']['ratio']:.3f} "
            f"(logprob only {r['P1']['ratio_logprob']:.3f}, no override {r['P1']['ratio_no_override']:.3f})",
            flush=True,
        )
        r["P3"] = bench_p3(pol, reps)
        print(
            f"  [{name}] P3: reconstruction {r['P3']['ours_s']:.3f}s vs train step {r['P3']['ref_s']:.3f}s, "
            f"ratio {r['P3']['ratio']:.2f}",
            flush=True,
        )
        save()
        r["P2"] = bench_p2(pol, pol.E, args.Ns, reps, args.repeats_large if name != "toy" else reps, 5)
        save()
        if name == "toy" and args.large_eval:  # cheap on the toy: shows how the speed-up grows with M
            E_large = random_batch(pol.vocab, args.large_eval, pol.prompt, pol.total, seed=2)
            r["P2_large_E"] = bench_p2(pol, E_large, args.Ns, reps, reps, 5)
        if name == "toy":
            r["live"] = bench_live(args.live_steps)
            print(f"  [{name}] live: {r['live']}", flush=True)
        else:
            r["live"] = {"measured": False, "why": "measured on the toy GRPO fit only"}
        r["load_end"] = os.getloadavg()
        result["policies"][name] = r
        save()
    print("memory", flush=True)
    result["memory"] = bench_memory(args.memory_sizes)
    result["load_after"] = os.getloadavg()
    result["wall_s"] = time.time() - started
    text = table(result)
    result["table_markdown"] = text
    save()
    print()
    print(
        f"{result['date']}, {result['machine']['cpu']} ({result['machine']['cores']} cores; torch threads: toy "
        f"{args.threads_toy}, Llama {args.threads}), "
        f"torch {result['machine']['torch']}, commit {result['machine']['commit']}, load average before "
        f"{load_before[0]:.2f} / after {result['load_after'][0]:.2f}, {result['wall_s'] / 60:.1f} min"
    )
    print(text)
    print(f"wrote {out}")
    return result


if __name__ == "__main__":
    main()
