"""`python -m probe predict` on a 151,936-token vocabulary, as a user runs it: peak memory and wall time.

    python benchmarks/bench_vocab_run.py              # ~5 min on 2 CPU cores; prints one table row, writes JSON
    python benchmarks/bench_vocab_run.py --quick      # E = 8 x 68 tokens (smoke run, ~1 min)

The policy is Qwen2-shaped with Qwen2.5's vocabulary (151,936 tokens, tied embeddings) and a tiny body (hidden
64, 2 layers, 4 heads, 2 key-value heads, MLP 128: 9.8M parameters, almost all of them the embedding), random
weights from seed 0, saved as an HF checkpoint with the toy world's tokenizer and an ``optimizer.pt`` from one real
AdamW step (lr 3e-4). U is 16 x 68 tokens and E 64 x 68 tokens (a quarter prompt, the rest response), random
token ids written as rollout files. The probe runs with the code's defaults (``configs/template.yaml``'s keys:
parts full/baseline/grad, 5 etas, token_entropy, first and second order, attribution, float64 head,
``probe.head_budget_mib`` 256, ``forward_batch_size`` 32, ``data.eval_batch_size`` 128, no eval x update
matrix) on 2 torch threads, in a subprocess whose peak resident set (``VmHWM`` from ``/proc/<pid>/status``, polled,
and the child's ``ru_maxrss``) is reported with the wall time and the run's own timings.

The same run before the head was bounded (issue 14, same machine class) was killed at 23.8 GB RSS; with
``token_chunk 256`` and ``eval_batch_size 8`` it took 32 minutes on one thread at 8.3 GB.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

VOCAB = 151_936


def build_checkpoint(directory: Path, seed: int = 0) -> None:
    """The Qwen2-shaped policy, its tokenizer (the toy world's) and an AdamW state after one real step."""
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from probe.toy.world import build_toy_world

    config = Qwen2Config(
        vocab_size=VOCAB,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        tie_word_embeddings=True,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
    )
    torch.manual_seed(seed)
    model = Qwen2ForCausalLM(config).float()
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-4, weight_decay=0.01)
    ids = torch.randint(3, VOCAB, (4, 32))
    model(input_ids=ids, labels=ids).loss.backward()
    optimizer.step()
    optimizer.zero_grad()
    model.save_pretrained(directory)
    torch.save(optimizer.state_dict(), directory / "optimizer.pt")
    toy = build_toy_world()
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(toy / name, directory / name)


def write_rollouts(path: Path, n: int, length: int, seed: int, advantages: bool) -> None:
    import random

    rng = random.Random(seed)
    prompt = length // 4
    with path.open("w") as f:
        for i in range(n):
            record = {
                "prompt_ids": [rng.randrange(3, VOCAB) for _ in range(prompt)],
                "response_ids": [rng.randrange(3, VOCAB) for _ in range(length - prompt)],
                "group": i // 4,
                "temperature": 1.0,
            }
            if advantages:
                record["advantage"] = rng.gauss(0.0, 1.0)
            f.write(json.dumps(record) + "\n")


def run(n_eval: int, threads: int, workdir: Path) -> dict:
    checkpoint = workdir / "policy"
    checkpoint.mkdir()
    build_checkpoint(checkpoint)
    write_rollouts(workdir / "update.jsonl", 16, 68, seed=1, advantages=True)
    write_rollouts(workdir / "eval.jsonl", n_eval, 68, seed=2, advantages=False)
    args = [
        sys.executable,
        "-m",
        "probe",
        "predict",
        "--config",
        str(HERE.parent / "configs" / "template.yaml"),
        "--model.init_args.policy.path",
        str(checkpoint),
        "--model.init_args.optimizer.path",
        str(checkpoint),
        "--data.init_args.update.path",
        str(workdir / "update.jsonl"),
        "--data.init_args.evals",
        json.dumps([{"path": str(workdir / "eval.jsonl")}]),
        "--model.init_args.run.root",
        str(workdir / "runs"),
        "--model.init_args.run.name",
        "vocab",
        "--model.init_args.run.num_threads",
        str(threads),
        "--trainer.logger",
        "false",
    ]
    env = {**os.environ, "WANDB_MODE": "disabled"}
    start = time.perf_counter()
    child = subprocess.Popen(args, cwd=workdir, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    peak_kb = 0
    output: list[str] = []
    import threading

    reader = threading.Thread(target=lambda: output.extend(child.stdout), daemon=True)
    reader.start()
    while child.poll() is None:
        try:
            for line in Path(f"/proc/{child.pid}/status").read_text().splitlines():
                if line.startswith("VmHWM:"):
                    peak_kb = max(peak_kb, int(line.split()[1]))
        except OSError:
            pass
        time.sleep(0.2)
    reader.join()
    wall = time.perf_counter() - start
    peak_kb = max(peak_kb, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)
    if child.returncode != 0:
        raise SystemExit(f"predict failed (exit {child.returncode}):\n{''.join(output)[-4000:]}")
    summary = json.loads((workdir / "runs" / "vocab" / "summary.json").read_text())
    return {
        "E": f"{n_eval} x 68 tokens",
        "U": "16 x 68 tokens",
        "threads": threads,
        "wall_s": round(wall, 1),
        "peak_rss_gib": round(peak_kb / 2**20, 2),
        "timings": summary["timings"],
        "table": "".join(output).split("eval_00:", 1)[-1][:3000],
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="E = 8 sequences (smoke run)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default=None, help="JSON result path (default: results/<date>-vocab-run.json)")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        result = run(8 if args.quick else 64, args.threads, Path(tmp))
    result["machine"] = {"processor": platform.processor() or platform.machine(), "cores": os.cpu_count()}
    try:
        model_name = next(
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if line.startswith("model name")
        )
        result["machine"]["cpu"] = model_name
    except (OSError, StopIteration):
        pass
    import torch

    result["torch"] = torch.__version__
    out = Path(args.out) if args.out else HERE / "results" / f"{time.strftime('%Y-%m-%d-%H%M')}-vocab-run.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    row = [
        result["E"],
        f"{result['threads']} threads",
        f"{result['wall_s']} s",
        f"peak RSS {result['peak_rss_gib']} GiB",
    ]
    print("| " + " | ".join(row) + " |")
    print(json.dumps(result["timings"], indent=2))
    print(f"written: {out}")


if __name__ == "__main__":
    main()
