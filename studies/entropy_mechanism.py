"""The entropy mechanism over a short GRPO run on the toy world, step by step.

    python studies/entropy_mechanism.py        # ~2 min on one CPU thread; writes studies/results/entropy_mechanism.*

Runs ``python -m probe fit --config studies/entropy_mechanism.yaml`` (the toy GRPO run with the live probe at every
second step, along the full step, its baseline and its gradient part) and reads the live records: per probed step the
exact Delta H at eta = lr (SNIS, first order), how much of it the momentum + weight-decay baseline and the gradient
part carry (first order, which is additive: full = baseline + grad), the covariance term of Cui et al. 2025 on the
step's batch next to it, how the covariance ranks U's tokens against probe's exact per-token attribution, the
realised change on fresh samples coupled by common random numbers, and the token with the largest attribution. Then
across steps: does the law's covariance track the exact change?

``--records FILE`` analyses an existing ``live_probe/records.jsonl`` instead of running the fit.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch
from provenance import commit, cpu_model

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
CONFIG = HERE / "entropy_mechanism.yaml"
PARTS = ("full", "baseline", "grad")


def run_fit(root: Path) -> Path:
    """The study's live GRPO run (in this process, through the CLI); returns its ``records.jsonl``."""
    from probe.cli import main

    sys.argv = sys.argv[:1]  # the study's own options are not the CLI's
    main(
        [
            "fit",
            "--config",
            str(CONFIG),
            "--model.init_args.run.root",
            str(root),
            "--model.init_args.run.overwrite",
            "true",
        ]
    )
    return root / "entropy_mechanism" / "live_probe" / "records.jsonl"


def _at_lr(record: dict) -> int:
    return record["plan"]["etas"].index(record["update"]["lr"])


def step_row(record: dict, decode) -> dict:
    """One probed step: the exact change at eta = lr and its parts, the covariance law, realised, the top token."""
    ev, lr, j = record["eval"], record["update"]["lr"], _at_lr(record)
    parts = ev["parts"]
    first = {p: lr * parts[p]["first_order"] for p in PARTS if p in parts}
    law = ev.get("covariance_law") or {}
    top = (ev.get("attribution") or {}).get("top_tokens") or [{}]
    realised = record.get("realised") or {}
    reward = (ev.get("reward") or {}).get("parts", {}).get("full", {})
    share = abs(first["baseline"]) / (abs(first["baseline"]) + abs(first["grad"]))
    return {
        "step": record["step"],
        "lr": lr,
        "entropy": ev["base_entropy"]["sequence"],
        "delta_h": parts["full"]["delta_h"][j],
        "se": parts["full"]["se"][j],
        "first_full": first["full"],
        "first_baseline": first["baseline"],
        "first_grad": first["grad"],
        "delta_h_baseline": parts["baseline"]["delta_h"][j],
        "delta_h_grad": parts["grad"]["delta_h"][j],
        "baseline_share": share,  # |b| / (|b| + |g|) of the first-order change
        "cov": law.get("batch_mean", math.nan),
        "law": law.get("law_at_lr", math.nan),
        "rank_correlation": law.get("rank_correlation", math.nan),
        "top_overlap": law.get("top_overlap", math.nan),
        "chance_overlap": law.get("chance_overlap", math.nan),
        "k": law.get("k"),
        "delta_r": (reward.get("delta_r") or [math.nan] * (j + 1))[j],  # E's expected reward, the full step at lr
        "delta_r_se": (reward.get("se") or [math.nan] * (j + 1))[j],
        "realised": realised.get("delta_h", math.nan),
        "realised_se": realised.get("se", math.nan),
        "realised_se_independent": realised.get("se_independent", math.nan),
        "z_snis": (realised.get("z") or {}).get("snis", math.nan),
        "top_token": decode(top[0]["token_id"]) if "token_id" in top[0] else "",
        "top_token_value": top[0].get("value", math.nan),
        "top_token_sequence": top[0].get("sequence"),
    }


def spearman(x: list[float], y: list[float]) -> float:
    from probe.covariance import rank_correlation

    x, y = np.asarray(x, dtype=float), np.asarray(y, dtype=float)
    ok = np.isfinite(x) & np.isfinite(y)
    return rank_correlation(torch.as_tensor(x[ok]), torch.as_tensor(y[ok]))


def across_steps(rows: list[dict]) -> dict:
    """Does the law's covariance track the exact change? Rank correlations across probed steps, sign agreement of
    -Cov with the gradient part's first-order change, the baseline's share, and the realised check."""

    def column(key: str) -> list[float]:
        return [r[key] for r in rows]

    law_sign = np.sign(-np.asarray(column("cov")))
    grad_sign = np.sign(np.asarray(column("first_grad")))
    full_sign = np.sign(np.asarray(column("first_full")))
    resolved = [r for r in rows if abs(r["realised"]) > 3 * r["realised_se"]]
    return {
        "steps": len(rows),
        "spearman_cov_vs_grad_first_order": spearman(column("cov"), column("first_grad")),
        "spearman_cov_vs_full_first_order": spearman(column("cov"), column("first_full")),
        "spearman_cov_vs_snis_delta_h": spearman(column("cov"), column("delta_h")),
        "sign_of_minus_cov_matches_grad_part": float(np.mean(law_sign == grad_sign)),
        "sign_of_minus_cov_matches_full_step": float(np.mean(law_sign == full_sign)),
        "median_ratio_grad_first_order_to_law": float(np.median(np.asarray(column("first_grad")) / column("law"))),
        "mean_baseline_share": float(np.mean(column("baseline_share"))),
        "mean_token_rank_correlation": float(np.nanmean(column("rank_correlation"))),
        "mean_top_overlap": float(np.nanmean(column("top_overlap"))),
        "mean_chance_overlap": float(np.nanmean(column("chance_overlap"))),
        "max_abs_z_snis": float(np.nanmax(np.abs(column("z_snis")))),
        "steps_realised_beyond_3_se": len(resolved),
        "median_se_ratio_independent_to_paired": float(
            np.nanmedian(np.asarray(column("realised_se_independent")) / column("realised_se"))
        ),
    }


def markdown(result: dict) -> str:
    rows, summary = result["steps"], result["across_steps"]
    lines = [
        "| step | reward | H | Delta H @lr (SNIS +- SE) | 1st order: full | baseline | grad | baseline share | "
        "Cov(log p, A) | -lr Cov | rank corr (cov_t, a_it) | top-k overlap (chance) | realised (paired) +- SE | z | "
        "top token (a_it) |",
        "|---:|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|---|---|---:|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['step']} | {r.get('reward', math.nan):.3f} | {r['entropy']:.3f} | "
            f"{r['delta_h']:+.2e} +- {r['se']:.1e} | {r['first_full']:+.2e} | "
            f"{r['first_baseline']:+.2e} | {r['first_grad']:+.2e} | {r['baseline_share']:.2f} | {r['cov']:+.3f} | "
            f"{r['law']:+.1e} | {r['rank_correlation']:+.2f} | {r['top_overlap']:.2f} ({r['chance_overlap']:.2f}) | "
            f"{r['realised']:+.2e} +- {r['realised_se']:.1e} | {r['z_snis']:+.1f} | "
            f"'{r['top_token']}' (seq {r['top_token_sequence']}) {r['top_token_value']:+.2f} |"
        )
    lines += ["", "| across the probed steps | value |", "|---|---:|"]
    lines += [f"| {k} | {v:.3g} |" if isinstance(v, float) else f"| {k} | {v} |" for k, v in summary.items()]
    return "\n".join(lines)


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = result["steps"]
    steps = np.array([r["step"] for r in rows])
    fig, axes = plt.subplots(2, 2, figsize=(13.0, 8.4))
    ax = axes[0, 0]
    ax.bar(
        steps - 0.3, [r["first_baseline"] for r in rows], width=0.6, color="C1", alpha=0.6, label="1st order: baseline"
    )
    ax.bar(
        steps - 0.3,
        [r["first_grad"] for r in rows],
        width=0.6,
        bottom=[min(r["first_baseline"], 0) if r["first_grad"] < 0 else max(r["first_baseline"], 0) for r in rows],
        color="C2",
        alpha=0.6,
        label="1st order: gradient part",
    )
    ax.errorbar(
        steps,
        [r["delta_h"] for r in rows],
        yerr=[r["se"] for r in rows],
        fmt="o",
        color="C0",
        capsize=2,
        label="exact (SNIS) +- SE",
    )
    ax.errorbar(
        steps + 0.3,
        [r["realised"] for r in rows],
        yerr=[r["realised_se"] for r in rows],
        fmt="s",
        color="C3",
        capsize=2,
        label="realised, paired +- SE",
    )
    ax.axhline(0, color="grey", lw=0.5)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("Delta H at eta = lr (nats / sequence)")
    ax.set_title("the entropy change of each step, and its parts")
    ax.legend(fontsize=7)

    ax = axes[0, 1]
    points = ax.scatter([r["cov"] for r in rows], [r["first_grad"] for r in rows], c=steps, cmap="viridis")
    fig.colorbar(points, ax=ax, label="step")
    ax.axhline(0, color="grey", lw=0.5)
    ax.axvline(0, color="grey", lw=0.5)
    ax.set_xlabel("Cov(log p, A) on the step's batch")
    ax.set_ylabel("first-order Delta H of the gradient part at lr (nats)")
    rho = result["across_steps"]["spearman_cov_vs_grad_first_order"]
    ax.set_title(f"the covariance law across steps (Spearman {rho:+.2f}; the law: negative)")

    ax = axes[1, 0]
    ax.bar(steps, [r["rank_correlation"] for r in rows], color="C4", alpha=0.7, label="rank corr(cov_t, a_it)")
    ax.plot(steps, [r["top_overlap"] for r in rows], "o-", color="C5", label="top-k overlap")
    ax.plot(steps, [r["chance_overlap"] for r in rows], ":", color="grey", label="chance overlap")
    ax.axhline(0, color="grey", lw=0.5)
    ax.set_xlabel("optimizer step")
    ax.set_title("token level: covariance term vs exact per-token attribution")
    ax.legend(fontsize=7)

    ax = axes[1, 1]
    ax.plot(steps, [r["entropy"] for r in rows], "o-", color="C0", label="H (nats / sequence)")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("entropy H on E (nats / sequence)")
    ax.set_title("entropy and reward over the run")
    twin = ax.twinx()
    twin.plot(steps, [r.get("reward", np.nan) for r in rows], "s--", color="C2", alpha=0.7)
    twin.set_ylabel("mean reward of the step's rollouts", color="C2")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--root", type=Path, default=HERE / "runs", help="where the fit's run directory goes")
    ap.add_argument("--records", type=Path, default=None, help="analyse this records.jsonl instead of running")
    ap.add_argument("--out", type=Path, default=HERE / "results")
    args = ap.parse_args(argv)
    t0 = time.perf_counter()
    records_path = args.records or run_fit(args.root)
    seconds = time.perf_counter() - t0
    records = [json.loads(line) for line in records_path.read_text().splitlines()]
    from transformers import AutoTokenizer

    from probe.toy.world import build_toy_world

    tokenizer = AutoTokenizer.from_pretrained(str(build_toy_world()))
    rows = [step_row(r, lambda i: tokenizer.decode([i])) for r in records if "eval" in r]
    history = records_path.parent.parent / "history.jsonl"  # the fit's mean reward per step
    if history.is_file():
        rewards = {h["step"]: h["mean_reward"] for h in map(json.loads, history.read_text().splitlines())}
        for row in rows:
            row["reward"] = rewards.get(row["step"], math.nan)
    result = {
        "config": str(CONFIG.relative_to(REPO)),
        "steps": rows,
        "across_steps": across_steps(rows),
        "environment": {
            "python": sys.version.split()[0],
            "torch": torch.__version__,
            "platform": platform.platform(),
            "processor": cpu_model(),
            "commit": commit(),
            "date": time.strftime("%Y-%m-%d"),
            "fit_seconds": seconds if args.records is None else None,
        },
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "entropy_mechanism.json").write_text(json.dumps(result, indent=1))
    (args.out / "entropy_mechanism.md").write_text(markdown(result) + "\n")
    plot(result, args.out / "entropy_mechanism.png")
    print(markdown(result))


if __name__ == "__main__":
    main()
