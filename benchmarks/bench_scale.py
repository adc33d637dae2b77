"""What probing costs on a policy of real size: Qwen2.5-0.5B's shape, full fine-tuning and LoRA, in one process.

    python benchmarks/bench_scale.py                    # CPU, E = U = 8 x 128 tokens, both cases: about an hour
                                                        # on 2 cores (one forward of 0.5B over 1024 tokens: ~15 s;
                                                        # E = U = 4 x 64, --repeats 1 took 31 min on 2 busy cores)
    python benchmarks/bench_scale.py --quick            # smoke run: tiny config, E = U = 4 x 32, 1 round, no memory
    python benchmarks/bench_scale.py --device cuda --autocast bf16 --E-seqs 256 --E-len 512 --U-seqs 64 \\
        --U-len 512 --microbatch 16                     # GPU sizes (what benchmarks/gpu_check.py runs)

The policy is ``Qwen2ForCausalLM`` built from a ``transformers.Qwen2Config`` with Qwen2.5-0.5B's fields (hidden 896,
24 layers, 14 heads, 2 key-value heads, MLP 4864, vocabulary 151,936, tied embeddings, 32,768 positions, RoPE theta
1e6; 494M parameters, 1.84 GiB in float32), random weights from ``--seed`` (nothing is downloaded), float32
parameters, SDPA attention. Two cases: ``full`` (every parameter trained) and ``lora`` (peft LoRA r = 16, alpha 32,
on q/k/v/o/gate/up/down projections). Each case gets an AdamW state (lr 3e-4, weight decay 0.01) from one real
training step on a random U (as ``bench_probe.py`` does for llama-22m), then the step is reconstructed with
clipping at 1.0. E and U are random tokens, a quarter prompt and three quarters response.

Timed side by side, in interleaved rounds after a warm-up round (``bench_probe.interleaved``: a ratio is the median
of the per-round ratios, the ratio of the minimum times beside it):

* P1  ``probe.overrides.sweep`` over K = 2 directions (full, grad) x J = 2 etas, ``token_entropy`` integrand
      (full-vocabulary entropies, float64 head), base statistics given, vs K*J plain no-grad forwards of E
      (``model(input_ids, attention_mask, position_ids)``, logits only). Target <= 1.25x.
* P2  ``probe.attribution.attribute`` (all N first-order attributions, ``check=False``, base given) vs one
      forward+backward over U and E (``bench_probe.fwd_bwd``: U's policy-gradient loss plus E's log-likelihood).
      Target <= 1.5x.
* P3  ``probe.update.reconstruct_update`` vs one training step (forward + backward + clip + ``AdamW.step()``;
      ``bench_reconstruction.train_step``) on the same U, stepping the benchmark's own model (P3 runs last) with a
      copy of the optimizer where that copy fits in the memory left, else with the optimizer itself (the JSON
      says which). Target <= 1.5x.
* memory: the peak extra memory of one sweep point (one part at one eta over E, base given), of the
  reconstruction and of the attribution. On CPU one subprocess per measurement and the peak resident set
  (``bench_probe._peak_mb``: ``VmHWM`` reset through ``/proc/self/clear_refs``, glibc's mmap threshold fixed so
  freed tensors go back to the OS) minus the resident set just before; on CUDA, in process,
  ``torch.cuda.max_memory_allocated`` after ``reset_peak_memory_stats`` minus ``memory_allocated`` before. Beside
  them: the whole model, its largest parameter and its largest decoder layer, so the reader sees whether a sweep
  point grows like one layer or like the model. Target: sweep point <= the largest trained unit (a decoder layer
  or a parameter outside the layers) + the teacher-forcing head budget (``TeacherForcing().head_budget_mib``).

``--device cuda`` puts the model and the batches on the GPU and synchronises around every timing;
``--autocast bf16`` runs every forward under ``torch.autocast`` bfloat16 (parameters stay float32; the
reconstruction is told so through ``ReconstructionConfig.autocast_dtype``); ``--microbatch B`` runs everything in
passes of B sequences (E's teacher forcing, the reconstruction's and the reference's gradient accumulation, the JVP
over U), which the float64 head over a 151,936-token vocabulary needs at GPU sizes. ``--time-budget S`` skips the
measurements that would start after S seconds (recorded as 'skipped: time budget'). The result goes to
``--out`` (default ``benchmarks/results/<date>-<time>-scale-<device>-<cores>cores.json``) and a markdown table is
printed.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import os
import re
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))  # bench_probe and bench_reconstruction live beside this file
sys.path.insert(1, str(HERE.parent))  # probe itself, when it is not installed (a bare GPU machine)

from bench_probe import _machine, _peak_mb, _trim, compared, fwd_bwd, interleaved, random_batch

from probe.attribution import AttributionInputs, attribute
from probe.batch import SequenceBatch
from probe.logprobs import TeacherForcing, teacher_force
from probe.losses import LossConfig, normalisers, per_sequence_loss
from probe.overrides import base_statistics, sweep
from probe.update import ReconstructionConfig, reconstruct_update

from bench_reconstruction import make_batch, train_step

QWEN2_5_0_5B = dict(
    hidden_size=896,
    num_hidden_layers=24,
    num_attention_heads=14,
    num_key_value_heads=2,
    intermediate_size=4864,
    vocab_size=151936,
    tie_word_embeddings=True,
    max_position_embeddings=32768,
    rope_theta=1e6,
)
TINY = {**QWEN2_5_0_5B, **dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128)}
LORA = dict(
    r=16, lora_alpha=32, target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
)
CASES = ("full", "lora")
LR, WEIGHT_DECAY, MAX_GRAD_NORM = 3e-4, 0.01, 1.0
ETA_FACTORS = (0.1, 1.0)  # J = 2 etas, as multiples of the update's lr
TARGETS = {"P1": 1.25, "P2": 1.5, "P3": 1.5}
MIB = 2**20
_MEM_CHILD = "--memory-child"
MEASUREMENTS = ("sweep_point", "reconstruction", "attribution")


HEAD_BUDGET_MIB: float | None = None  # --head-budget, when given


def head_budget_mib() -> float:
    """The teacher-forcing head's memory budget: ``--head-budget``, else probe's default
    (``TeacherForcing().head_budget_mib``)."""
    return float(TeacherForcing().head_budget_mib if HEAD_BUDGET_MIB is None else HEAD_BUDGET_MIB)


# ---------------------------------------------------------------------------------------------
# the policy and one case's state


def build_policy(
    config: dict, *, lora: bool = False, seed: int = 0, device: str | torch.device = "cpu", attn: str = "sdpa"
):
    """``Qwen2ForCausalLM`` from ``config`` (Qwen2Config fields), random init from ``seed``, float32, ``attn``
    attention; with ``lora`` wrapped by peft (:data:`LORA`). Built on the CPU (the same weights on every device),
    then moved."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(seed)
    model = Qwen2ForCausalLM(Qwen2Config(**config, attn_implementation=attn)).float()
    if lora:
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(model, LoraConfig(**LORA))
    return model.to(device).eval()


def _unit(name: str) -> str:
    """The decoder layer a parameter belongs to (``...layers.7``), else the parameter itself."""
    m = re.match(r"(.*\.layers\.\d+)\.", name)
    return m.group(1) if m else name


def describe_sizes(model: torch.nn.Module) -> dict:
    """Parameter counts and float sizes: the whole model, its largest parameter and decoder layer, and the same
    over the trained parameters (``requires_grad``), whose largest unit bounds what one sweep point must copy."""

    def summary(named: list[tuple[str, torch.Tensor]]) -> dict:
        units: dict[str, float] = {}
        for n, p in named:
            units[_unit(n)] = units.get(_unit(n), 0.0) + p.numel() * p.element_size() / MIB
        layers = {u: s for u, s in units.items() if re.search(r"\.layers\.\d+$", u)}
        big_p = max(named, key=lambda x: x[1].numel())
        big_u = max(units, key=units.get)
        out = {
            "params": sum(p.numel() for _, p in named),
            "mib": sum(p.numel() * p.element_size() for _, p in named) / MIB,
            "largest_parameter": {"name": big_p[0], "mib": big_p[1].numel() * big_p[1].element_size() / MIB},
            "largest_unit": {"name": big_u, "mib": units[big_u]},
        }
        if layers:
            big_l = max(layers, key=layers.get)
            out["largest_decoder_layer"] = {"name": big_l, "mib": layers[big_l]}
        return out

    named = list(model.named_parameters())
    return {"model": summary(named), "trained": summary([(n, p) for n, p in named if p.requires_grad])}


@dataclass
class Case:
    """One benchmark case: the policy, its live AdamW, U, E and how everything is run."""

    name: str
    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    U: SequenceBatch
    E: SequenceBatch
    loss: LossConfig
    forcing: TeacherForcing  # E's teacher forcing (token entropies, float64 head, --microbatch sequences a pass)
    recon: ReconstructionConfig
    microbatch: int | None
    device: torch.device
    autocast: torch.dtype | None

    def amp(self) -> contextlib.AbstractContextManager:
        if self.autocast is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.autocast)


def sizes_of(args: argparse.Namespace) -> dict:
    return {"E": [args.E_seqs, args.E_len], "U": [args.U_seqs, args.U_len]}


def setup_case(name: str, args: argparse.Namespace, warm_step: bool = True) -> Case:
    """Build the case's policy and batches; with ``warm_step`` one real training step fills AdamW's state."""
    if name not in CASES:
        raise ValueError(f"unknown case {name!r}; choose from {CASES}")
    device = torch.device(args.device)
    config = TINY if args.quick else QWEN2_5_0_5B
    model = build_policy(config, lora=name == "lora", seed=args.seed, device=device)
    vocab = config["vocab_size"]
    U = make_batch(vocab, n=args.U_seqs, prompt=args.U_len // 4, total=args.U_len).to(device)
    E = random_batch(vocab, args.E_seqs, args.E_len // 4, args.E_len, seed=args.seed + 1).to(device)
    trained = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trained, lr=LR, weight_decay=WEIGHT_DECAY)
    autocast = {"bf16": torch.bfloat16, None: None}[args.autocast]
    case = Case(
        name=name,
        model=model,
        optimizer=optimizer,
        U=U,
        E=E,
        loss=LossConfig(),
        forcing=TeacherForcing(with_entropy=True, batch_size=args.microbatch or 256, head_budget_mib=head_budget_mib()),
        recon=ReconstructionConfig(
            max_grad_norm=MAX_GRAD_NORM,
            microbatch_size=args.microbatch,
            autocast_dtype=None if autocast is None else "bfloat16",
        ),
        microbatch=args.microbatch,
        device=device,
        autocast=autocast,
    )
    if warm_step:
        training_step(case, optimizer)
    return case


# ---------------------------------------------------------------------------------------------
# the trainer's side: a training step and a forward+backward over U and E


def training_step(c: Case, optimizer: torch.optim.Optimizer) -> None:
    """Forward + backward over U (microbatches accumulated, forward under autocast) + clip + ``optimizer.step()``;
    ``bench_reconstruction.train_step`` itself when there is neither autocast nor microbatching. The gradients are
    released afterwards (a full-model gradient held between rounds would only crowd the memory)."""
    if c.microbatch is None and c.autocast is None:
        train_step(c.model, optimizer, c.U, c.loss)
    else:
        optimizer.zero_grad(set_to_none=True)
        norm = normalisers(c.U.target_mask, c.loss)
        for mb in c.U.chunks(c.microbatch):
            with c.amp():
                stats = teacher_force(c.model, mb, forcing=c.loss.forcing())
                total = per_sequence_loss(stats.logprobs, stats.mask, mb.advantages, norm, c.loss).sum()
            total.backward()
        torch.nn.utils.clip_grad_norm_(c.model.parameters(), MAX_GRAD_NORM)
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def reference_fwd_bwd(c: Case) -> None:
    """One forward+backward over U and E: ``bench_probe.fwd_bwd``, per microbatch when ``--microbatch`` is set."""
    with c.amp():
        if c.microbatch is None:
            fwd_bwd(c.model, c.U, c.E, c.loss)
            return
        params = [p for p in c.model.parameters() if p.requires_grad]
        norm = normalisers(c.U.target_mask, c.loss)
        for u in c.U.chunks(c.microbatch):
            with torch.enable_grad():
                su = teacher_force(c.model, u, forcing=c.loss.forcing())
                lu = per_sequence_loss(su.logprobs, su.mask, u.advantages, norm, c.loss).sum()
                torch.autograd.grad(lu, params, allow_unused=True)
        for e in c.E.chunks(c.microbatch):
            with torch.enable_grad():
                torch.autograd.grad(teacher_force(c.model, e).sequence_logprobs.sum(), params, allow_unused=True)


def plain_forwards(c: Case, n: int) -> None:
    """``n`` plain no-grad forwards of E (logits only), in the passes the sweep makes."""
    with torch.no_grad(), c.amp():
        for _ in range(n):
            for chunk in c.E.chunks(c.forcing.batch_size):
                c.model(
                    input_ids=chunk.input_ids,
                    attention_mask=chunk.attention_mask,
                    position_ids=chunk.position_ids,
                    use_cache=False,
                )


def trainer_optimizer(c: Case) -> tuple[torch.optim.Optimizer, str]:
    """A copy of the case's optimizer (state copied) where the copy and the reconstruction beside it fit in the
    memory left, else the optimizer itself; and which one it is. Under full fine-tuning the reconstruction holds
    about 7 models' worth (gradient, clipped gradient, four parts, temporaries), 3.5 optimizer states, and the
    trainer's gradient half a state more: a copy is made where 5 states fit in 90% of the free memory."""
    state_bytes = sum(
        t.numel() * t.element_size() for s in c.optimizer.state.values() for t in s.values() if torch.is_tensor(t)
    )
    if c.device.type == "cuda":
        free = torch.cuda.mem_get_info(c.device)[0]
    else:
        free = _meminfo_kb("MemAvailable") * 1024
    if 5 * state_bytes > 0.9 * free:
        return c.optimizer, (
            f"the benchmark's own optimizer (a copy of its {state_bytes / 2**30:.2f} GiB state does not fit in "
            f"{free / 2**30:.1f} GiB free)"
        )
    params = [p for g in c.optimizer.param_groups for p in g["params"]]
    twin = torch.optim.AdamW(params, lr=LR, weight_decay=WEIGHT_DECAY)
    twin.load_state_dict(copy.deepcopy(c.optimizer.state_dict()))
    return twin, "a copy of the optimizer"


def _meminfo_kb(key: str) -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    return 0


# ---------------------------------------------------------------------------------------------
# the measurements


def bench_p1(c: Case, update, base, repeats: int) -> dict:
    """sweep over (full, grad) x J etas, base given, vs K*J plain no-grad forwards of E."""
    directions = {"full": update.full, "grad": update.grad}
    etas = [update.lr * f for f in ETA_FACTORS]
    K, J = len(directions), len(etas)

    def ours() -> None:
        with c.amp():
            sweep(c.model, c.E, directions, etas, c.forcing, base=base)

    r = interleaved({"plain_forwards": lambda: plain_forwards(c, K * J), "sweep": ours}, repeats)
    return {"K": K, "J": J, "parts": list(directions), "etas": etas, **compared(r, "sweep", "plain_forwards", repeats)}


def bench_p2(c: Case, update, base, repeats: int) -> dict:
    """attribute (all N, check off, base given) vs one forward+backward over U and E."""
    inputs = AttributionInputs(c.model, update, c.U, c.E, c.forcing, base=base)

    def ours() -> None:
        with c.amp():
            attribute(inputs, check=False, microbatch_size=c.microbatch)

    r = interleaved({"fwd_bwd_U_E": lambda: reference_fwd_bwd(c), "attribute": ours}, repeats)
    return {"N": len(c.U), "M": len(c.E), **compared(r, "attribute", "fwd_bwd_U_E", repeats)}


def bench_p3(c: Case, repeats: int) -> dict:
    """reconstruct_update vs one training step on the same U (the model is stepped: run it last)."""
    opt, which = trainer_optimizer(c)
    r = interleaved(
        {
            "training_step": lambda: training_step(c, opt),
            "reconstruct_update": lambda: reconstruct_update(c.model, c.optimizer, c.U, c.loss, c.recon),
        },
        repeats,
    )
    return {"trainer_optimizer": which, **compared(r, "reconstruct_update", "training_step", repeats)}


def memory_functions(c: Case, update, base, direction=None) -> dict[str, Callable[[], Any]]:
    """What each memory measurement runs (``direction``: the swept one, default ``update.full``)."""

    def sweep_point() -> None:
        d = update.full if direction is None else direction
        with c.amp():
            sweep(c.model, c.E, {"full": d}, [LR], c.forcing, base=base)

    def reconstruction() -> None:
        reconstruct_update(c.model, c.optimizer, c.U, c.loss, c.recon)

    def attribution() -> None:
        with c.amp():
            attribute(
                AttributionInputs(c.model, update, c.U, c.E, c.forcing, base=base),
                check=False,
                microbatch_size=c.microbatch,
            )

    return {"sweep_point": sweep_point, "reconstruction": reconstruction, "attribution": attribution}


def peak_mib(fn: Callable[[], Any], device: torch.device) -> tuple[float, str]:
    """Peak extra memory of fn() in MiB and how it was measured: CUDA counters on a GPU, else the resident set."""
    if device.type != "cuda":
        return _peak_mb(fn)
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    before = torch.cuda.memory_allocated(device)
    fn()
    torch.cuda.synchronize(device)
    method = "torch.cuda.max_memory_allocated after reset_peak_memory_stats, minus memory_allocated before"
    return (torch.cuda.max_memory_allocated(device) - before) / MIB, method


def memory_child(spec: str, args: argparse.Namespace) -> dict:
    """One memory measurement in a fresh process: ``<case>:<measurement>``."""
    name, what = spec.split(":")
    c = setup_case(name, args, warm_step=what != "sweep_point")
    update = direction = None
    if what == "sweep_point":  # any direction over the trained parameters, allocated before measuring
        direction = {n: torch.full_like(p, 1e-3) for n, p in c.model.named_parameters() if p.requires_grad}
    if what == "attribution":
        update = reconstruct_update(c.model, c.optimizer, c.U, c.loss, c.recon)
        update.full = update.baseline = {}  # attribute reads the scale K only: two models' worth less resident
    base = None if what == "reconstruction" else base_statistics(c.model, c.E, c.forcing)
    mib, method = peak_mib(memory_functions(c, update, base, direction)[what], c.device)
    return {"case": name, "measurement": what, "mib": mib, "method": method}


def child_args(args: argparse.Namespace) -> list[str]:
    out = [
        "--device",
        args.device,
        "--threads",
        str(args.threads),
        "--seed",
        str(args.seed),
        *("--E-seqs", str(args.E_seqs), "--E-len", str(args.E_len)),
        *("--U-seqs", str(args.U_seqs), "--U-len", str(args.U_len)),
    ]
    out += ["--quick"] if args.quick else []
    out += ["--autocast", args.autocast] if args.autocast else []
    out += ["--head-budget", str(args.head_budget)] if args.head_budget is not None else []
    out += ["--microbatch", str(args.microbatch)] if args.microbatch else []
    return out


def memory_subprocesses(name: str, args: argparse.Namespace, over_budget: Callable[[], bool]) -> dict:
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "131072", "OMP_NUM_THREADS": str(args.threads)}
    out: dict = {"mode": "subprocess"}
    for what in MEASUREMENTS:
        if over_budget():
            out[what] = {"skipped": "time budget"}
            continue
        t0 = time.perf_counter()
        proc = subprocess.run(
            [sys.executable, str(Path(__file__).resolve()), _MEM_CHILD, f"{name}:{what}", *child_args(args)],
            capture_output=True,
            text=True,
            env=env,
            timeout=3600,
        )
        if proc.returncode != 0:
            out[what] = {"error": (proc.stderr.strip().splitlines() or ["(no output)"])[-1][:300]}
        else:
            r = json.loads(proc.stdout.strip().splitlines()[-1])
            out[what] = {"mib": r["mib"], "seconds": time.perf_counter() - t0}
            out["method"] = r["method"]
        print(f"  [{name}] memory {what}: {out[what]}", flush=True)
    return out


def memory_in_process(c: Case, update, base, over_budget: Callable[[], bool]) -> dict:
    out: dict = {"mode": "in process"}
    for what, fn in memory_functions(c, update, base).items():
        if over_budget():
            out[what] = {"skipped": "time budget"}
            continue
        _trim()
        if c.device.type == "cuda":
            torch.cuda.empty_cache()
        mib, out["method"] = peak_mib(fn, c.device)
        out[what] = {"mib": mib}
        print(f"  [{c.name}] memory {what}: +{mib:.0f} MiB", flush=True)
    return out


def memory_target(sizes: dict) -> dict:
    """sweep point <= the largest trained unit + the head budget."""
    budget = head_budget_mib()
    unit = sizes["trained"]["largest_unit"]
    return {"largest_trained_unit": unit, "head_budget_mib": budget, "sweep_point_mib": unit["mib"] + budget}


# ---------------------------------------------------------------------------------------------
# one case, the table, main


def run_case(name: str, args: argparse.Namespace, over_budget: Callable[[], bool]) -> dict:
    t0 = time.perf_counter()
    c = setup_case(name, args)
    sizes = describe_sizes(c.model)
    r: dict = {"sizes": sizes, "setup_s": time.perf_counter() - t0, "load_start": os.getloadavg()}
    print(
        f"{name}: {sizes['model']['params'] / 1e6:.1f}M parameters, {sizes['trained']['params'] / 1e6:.2f}M "
        f"trained, set up in {r['setup_s']:.1f} s",
        flush=True,
    )
    wanted = set(args.only or ("P1", "P2", "P3", "memory"))
    update = base = None
    if wanted & {"P1", "P2"} or args.memory == "inprocess":
        update = reconstruct_update(c.model, c.optimizer, c.U, c.loss, c.recon)
        update.baseline = {}  # not swept here: its memory (one model's worth under full fine-tuning) is released
        base = base_statistics(c.model, c.E, c.forcing)
    for key, bench in (("P1", bench_p1), ("P2", bench_p2)):
        if key not in wanted or over_budget():
            r[key] = {"skipped": "not selected (--only)" if key not in wanted else "time budget"}
            continue
        r[key] = bench(c, update, base, args.repeats)
        print(
            f"  [{name}] {key}: probe {r[key]['ours_s']:.3f} s, reference {r[key]['ref_s']:.3f} s, ratio "
            f"{r[key]['ratio']:.2f} ({r[key]['ratio_of_minima']:.2f} of minima)",
            flush=True,
        )
    if args.memory == "inprocess":
        r["memory"] = memory_in_process(c, update, base, over_budget)
    del update, base
    _trim()
    if "P3" not in wanted:
        r["P3"] = {"skipped": "not selected (--only)"}
    elif over_budget():
        r["P3"] = {"skipped": "time budget"}
    else:
        r["P3"] = bench_p3(c, args.repeats)
        p = r["P3"]
        print(
            f"  [{name}] P3: reconstruction {p['ours_s']:.3f} s, training step {p['ref_s']:.3f} s, ratio "
            f"{p['ratio']:.2f} ({p['ratio_of_minima']:.2f} of minima); trainer: {p['trainer_optimizer']}",
            flush=True,
        )
    r["load_end"] = os.getloadavg()
    r["wall_s"] = time.perf_counter() - t0
    return r


def _met(value: float, target: float) -> str:
    return "yes" if value <= target else "**no**"


def _size(mib: float) -> str:
    return f"{mib:.0f} MiB" if abs(mib) >= 10 or mib != mib else f"{mib:.2f} MiB"


def _mib(m: dict | None) -> str:
    if not m:
        return "-"
    if "mib" in m:
        return "+" + _size(m["mib"])
    return m.get("skipped") or f"failed: {m.get('error')}"


def table(result: dict) -> str:
    e, u = result["sizes"]["E"], result["sizes"]["U"]
    rows = [
        "| measurement | case | probe (median) | reference (median) | ratio: median of rounds (of minima) | target "
        "| met |",
        "|---|---|---:|---:|---:|---:|:---:|",
    ]
    what = {
        "P1": ("P1 sweep, 2 directions x 2 etas, token_entropy, base given, E {e}", "{n} plain no-grad forwards"),
        "P2": ("P2 all-N attributions, N = {N}, M = {M}, base given, no check", "fwd+bwd over U and E"),
        "P3": ("P3 reconstruct_update, U {u}", "training step (fwd+bwd+clip+AdamW.step)"),
    }
    for name, r in result["cases"].items():
        for key, (label, ref) in what.items():
            p = r.get(key)
            if p is None:
                continue
            fields = dict(e=f"{e[0]} x {e[1]}", u=f"{u[0]} x {u[1]}", N=p.get("N"), M=p.get("M"))
            fields["n"] = p.get("K", 0) * p.get("J", 0)
            if "skipped" in p:
                rows.append(f"| {label.format(**fields)} | {name} | {p['skipped']} | | | <= {TARGETS[key]} | - |")
                continue
            rows.append(
                f"| {label.format(**fields)} | {name} | {p['ours_s']:.3f} s | {ref.format(**fields)} "
                f"{p['ref_s']:.3f} s | {p['ratio']:.2f}x ({p['ratio_of_minima']:.2f}x) | <= {TARGETS[key]} | "
                f"{_met(p['ratio'], TARGETS[key])} |"
            )
    mem = {n: r for n, r in result["cases"].items() if "memory" in r}
    if mem:
        rows += [
            "",
            "| case | params (trained) | weights | largest parameter | largest decoder layer | trained weights | "
            "sweep point | reconstruction | attribution | sweep-point target: largest trained unit + head budget "
            "| met |",
            "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|:---:|",
        ]
        for name, r in mem.items():
            s, m, t = r["sizes"], r["memory"], r["memory_target"]
            model, trained = s["model"], s["trained"]
            big_p, big_l = model["largest_parameter"], model.get("largest_decoder_layer", {"mib": float("nan")})
            unit = t["largest_trained_unit"]
            target = f"{_size(unit['mib'])} ({unit['name']}) + {_size(t['head_budget_mib'])}"
            target += f" = {_size(t['sweep_point_mib'])}"
            sp = m.get("sweep_point", {})
            met = _met(sp["mib"], t["sweep_point_mib"]) if "mib" in sp else "-"
            rows.append(
                f"| {name} | {model['params'] / 1e6:.1f}M ({trained['params'] / 1e6:.2f}M) | {_size(model['mib'])} | "
                f"{_size(big_p['mib'])} ({big_p['name']}) | {_size(big_l['mib'])} | {_size(trained['mib'])} | "
                f"{_mib(sp)} | {_mib(m.get('reconstruction'))} | {_mib(m.get('attribution'))} | {target} | {met} |"
            )
    return "\n".join(rows)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cases", nargs="+", default=list(CASES), choices=CASES)
    ap.add_argument("--E-seqs", dest="E_seqs", type=int, default=None, help="sequences of E (default 8; quick 4)")
    ap.add_argument("--E-len", dest="E_len", type=int, default=None, help="tokens per E sequence (128; quick 32)")
    ap.add_argument("--U-seqs", dest="U_seqs", type=int, default=None, help="sequences of U (default 8; quick 4)")
    ap.add_argument("--U-len", dest="U_len", type=int, default=None, help="tokens per U sequence (128; quick 32)")
    ap.add_argument("--threads", type=int, default=2, help="torch threads")
    ap.add_argument("--repeats", type=int, default=None, help="timed rounds after a warm-up round (2; quick 1)")
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--autocast", default=None, choices=["bf16"], help="forwards under torch.autocast bfloat16")
    ap.add_argument("--microbatch", type=int, default=None, help="sequences per pass (default: all at once)")
    ap.add_argument(
        "--memory",
        default="auto",
        choices=["auto", "subprocess", "inprocess", "off"],
        help="auto: a subprocess per measurement on CPU, in process on CUDA, off with --quick",
    )
    ap.add_argument("--time-budget", type=float, default=None, help="seconds; later measurements are skipped")
    ap.add_argument(
        "--only", nargs="+", default=None, choices=["P1", "P2", "P3", "memory"], help="run these measurements only"
    )
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument(
        "--head-budget", type=float, default=None, help="MiB of the head's chunks (default: probe's, 256 MiB)"
    )
    ap.add_argument("--quick", action="store_true", help="smoke run: tiny Qwen2 config, E = U = 4 x 32, 1 round")
    ap.add_argument("--out", type=Path, default=None, help="JSON path (default benchmarks/results/...-scale-...json)")
    ap.add_argument(_MEM_CHILD, default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    small, large = (4, 32), (8, 128)
    n, length = small if args.quick else large
    for key, default in (("E_seqs", n), ("E_len", length), ("U_seqs", n), ("U_len", length)):
        if getattr(args, key) is None:
            setattr(args, key, default)
    if args.repeats is None:
        args.repeats = 1 if args.quick else 2
    if args.memory == "auto":
        args.memory = "off" if args.quick else ("inprocess" if args.device == "cuda" else "subprocess")
    if args.only is not None and "memory" not in args.only:
        args.memory = "off"
    if args.device == "cuda" and not torch.cuda.is_available():
        ap.error("--device cuda: torch sees no CUDA device")
    if min(args.E_len, args.U_len) < 4:
        ap.error("--E-len and --U-len must be >= 4 (a quarter prompt, the rest response)")
    return args


def main(argv: list[str] | None = None) -> dict | None:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    global HEAD_BUDGET_MIB
    HEAD_BUDGET_MIB = args.head_budget
    if args.memory_child:
        print(json.dumps(memory_child(args.memory_child, args)))
        return None
    started = time.perf_counter()
    deadline = None if args.time_budget is None else started + args.time_budget

    def over_budget() -> bool:
        return deadline is not None and time.perf_counter() > deadline

    machine = _machine()
    device_name = "cpu"
    if args.device == "cuda":
        device_name = "cuda"
        machine["device"] = "cuda:" + torch.cuda.get_device_name(0)
        machine["cuda"] = torch.version.cuda
    else:
        machine["device"] = "cpu"
    result: dict = {
        "date": time.strftime("%Y-%m-%d %H:%M"),
        "machine": machine,
        "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items() if k != "memory_child"},
        "policy_config": TINY if args.quick else QWEN2_5_0_5B,
        "lora": LORA,
        "sizes": sizes_of(args),
        "targets": {**TARGETS, "sweep_point": "largest trained unit + head budget"},
        "head_budget_mib": head_budget_mib(),
        "load_before": os.getloadavg(),
        "cases": {},
    }
    stem = f"{time.strftime('%Y-%m-%d-%H%M')}-scale-{device_name}-{machine['cores']}cores"
    out = args.out or HERE / "results" / (stem + ("-quick" if args.quick else "") + ".json")

    def save() -> None:  # after every case, so a run cut short keeps what it measured
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(result, indent=2, default=str))

    print(
        f"bench_scale: {args.device}, {args.threads} thread(s), autocast {args.autocast}, E {args.E_seqs} x "
        f"{args.E_len}, U {args.U_seqs} x {args.U_len}, microbatch {args.microbatch}, {args.repeats} round(s), "
        f"memory {args.memory}",
        flush=True,
    )
    for name in args.cases:
        if over_budget():
            result["cases"][name] = {"skipped": "time budget"}
            continue
        r = run_case(name, args, over_budget)
        _trim()
        if args.device == "cuda":
            torch.cuda.empty_cache()
        if args.memory == "subprocess":
            r["memory"] = memory_subprocesses(name, args, over_budget)
        if "memory" in r:
            r["memory_target"] = memory_target(r["sizes"])
        result["cases"][name] = r
        save()
    result["load_after"] = os.getloadavg()
    result["wall_s"] = time.perf_counter() - started
    result["table_markdown"] = table({**result, "cases": {n: r for n, r in result["cases"].items() if "sizes" in r}})
    save()
    print()
    print(
        f"{result['date']}, {machine['device']} ({machine['cpu']}, {machine['cores']} cores, {args.threads} torch "
        f"threads), torch {machine['torch']}, commit {machine['commit']}, {result['wall_s'] / 60:.1f} min"
    )
    print(result["table_markdown"])
    print(f"wrote {out}")
    return result


if __name__ == "__main__":
    main()
