"""Linearity study on the toy world: how far does Delta H(eta) stay proportional to eta?

    python studies/linearity.py                     # writes studies/results/linearity.{json,md,png}

The built-in toy world's next AdamW step is reconstructed on a freshly sampled update batch U
(16 prompts x 8 responses, GRPO advantages, clipping at 1.0 as in its warm-up). On an
evaluation batch E of a few thousand sequences sampled from the same policy, the true entropy
change Delta H(eta) is measured by SNIS along the full step, its momentum/weight-decay
baseline and its gradient part, over a log grid of 12 step sizes from 1e-2 x lr to 30 x lr,
and compared with the first-order (JVP) and second-order (JVP of JVP) predictions on the same
samples. The fit (log-log slope and R^2 over the linear regime, the eta where first order stops
agreeing: |SNIS - first order| > 3 SE or > 10%) is ``probe.analyze.analyse_part``, the same
function ``python -m probe analyze RUN_DIR`` uses.

The policy runs in float64 (with float64 RMSNorm, ``probe.precision``) so that numerical error
does not blur the smallest etas; the toy model is tiny, so this costs nothing.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
from provenance import commit

from probe.analyze import analyse_part, markdown_table, plot_linearity
from probe.batch import collate
from probe.loading import load_policy
from probe.logprobs import TeacherForcing
from probe.losses import LossConfig
from probe.optim_loading import load_optimizer_state
from probe.overrides import base_statistics, sweep
from probe.sampling import SamplingSettings, sample_responses, sample_update_batch
from probe.snis import snis_estimate
from probe.taylor import first_order, sequence_derivatives, snis_derivatives
from probe.toy import task
from probe.toy.world import build_toy_world
from probe.update import ReconstructionConfig, reconstruct_update

PARTS = ("full", "baseline", "grad")
INTEGRANDS = ("token_entropy", "logprob")
HERE = Path(__file__).resolve().parent


def run(args: argparse.Namespace) -> dict:
    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    world = build_toy_world()
    model, _ = load_policy(world, dtype=args.dtype)
    state = load_optimizer_state(str(world), model)
    ids = dict(eos_token_id=task.EOS_ID, pad_token_id=task.PAD_ID)
    sampling = SamplingSettings(n_per_prompt=8, max_new_tokens=4, temperature=1.0, seed=0)

    update_records = sample_update_batch(
        model, task.make_prompts(args.update_prompts, seed=0), sampling, reward_fn=task.reward_ids, **ids
    )
    U = collate(update_records, pad_token_id=task.PAD_ID)
    loss = LossConfig(agg_mode="seq-mean-token-mean")
    update = reconstruct_update(model, state, U, loss, ReconstructionConfig(max_grad_norm=1.0))
    lr = update.lr
    eval_prompts = task.make_prompts(1000 + args.eval_prompts, seed=0)[1000:]  # held-out draw, as configs/toy.yaml
    E = collate(sample_responses(model, eval_prompts, replace(sampling, seed=1), **ids), pad_token_id=task.PAD_ID)
    etas = (lr * np.geomspace(args.eta_min, args.eta_max, args.n_etas)).tolist()
    t_setup = time.perf_counter() - t0

    forcing = TeacherForcing(with_entropy=True, batch_size=args.chunk_size)
    base = base_statistics(model, E, forcing)
    directions = {p: update.parts()[p] for p in PARTS}
    swept = sweep(model, E, directions, etas, forcing, base=base)
    t_sweep = time.perf_counter() - t0 - t_setup

    out: dict = {}
    for integrand in INTEGRANDS:
        out[integrand] = {}
    for part in PARTS:
        derivs = sequence_derivatives(model, E, directions[part], forcing, order=2)
        for integrand in INTEGRANDS:
            res = [snis_estimate(base, swept.at(part, j), integrand=integrand, eta=eta) for j, eta in enumerate(etas)]
            fo = first_order(derivs, integrand)
            so = snis_derivatives(derivs, base, integrand)
            lin = analyse_part(
                part,
                etas,
                [r.delta_entropy for r in res],
                [r.delta_entropy_se for r in res],
                first_order=fo.slope,
                ess_fraction=[r.ess_fraction for r in res],
                linear_radius=so.linear_radius,
            ).to_dict()
            lin["first_order_se"] = fo.slope_se
            lin["second_order"] = so.second
            lin["predicted_first"] = [fo.slope * e for e in etas]
            lin["predicted_second"] = [fo.slope * e + 0.5 * so.second * e * e for e in etas]
            lin["ess"] = [r.ess for r in res]
            lin["max_log_weight"] = [r.max_log_weight for r in res]
            out[integrand][part] = lin
    t_total = time.perf_counter() - t0
    return {
        "setup": {
            "world": str(world.name),
            "dtype": args.dtype,
            "lr": lr,
            "etas": etas,
            "eta_over_lr": [e / lr for e in etas],
            "n_update": len(U),
            "n_eval": len(E),
            "eval_tokens": int(E.target_mask.sum()),
            "update_mean_reward": float(np.mean([r["reward"] for r in update_records])),
            "clip_coef": update.clip_coef,
            "norms": update.norms,
            "loss": "GRPO seq-mean-token-mean, max_grad_norm 1.0",
        },
        "results": out,
        "timings_s": {"setup": t_setup, "sweep": t_sweep, "total": t_total},
        "environment": {
            "python": sys.version.split()[0],
            "torch": torch.__version__,
            "platform": platform.platform(),
            "threads": args.threads,
            "commit": commit(),
            "date": time.strftime("%Y-%m-%d"),
        },
    }


def per_eta_table(part: dict, lr: float) -> str:
    lines = [
        "| eta / lr | Delta H +- SE | first order | second order | gap / first order | gap / SE | ESS / M | agrees |",
        "|---:|---:|---:|---:|---:|---:|---:|:---:|",
    ]
    for j, eta in enumerate(part["etas"]):
        f = lambda x, s=".3e": "-" if x is None else format(x, s)  # noqa: E731
        lines.append(
            f"| {eta / lr:.3g} | {f(part['delta_h'][j])} +- {f(part['se'][j], '.1e')} | "
            f"{f(part['predicted_first'][j])} | {f(part['predicted_second'][j])} | {f(part['relative_gap'][j], '.3f')} "
            f"| {f(part['gap_in_se'][j], '.2f')} | {f(part['ess_fraction'][j], '.3f')} | "
            f"{'yes' if part['agrees'][j] else 'no'} |"
        )
    return "\n".join(lines)


def write(result: dict, out_dir: Path) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "linearity.json").write_text(json.dumps(result, indent=2, allow_nan=False))
    s, env = result["setup"], result["environment"]
    lr = s["lr"]
    md = [
        "# Linearity of Delta H(eta) on the toy world",
        "",
        f"`python studies/linearity.py` (commit {env['commit']}, {env['date']}, torch {env['torch']}, {env['threads']} "
        f"CPU thread(s), {result['timings_s']['total']:.0f} s). Policy: toy world `{s['world']}` in {s['dtype']}; U: "
        f"{s['n_update']} sequences (mean reward {s['update_mean_reward']:.2f}, {s['loss']}, clip coefficient "
        f"{s['clip_coef']:.3f}); E: {s['n_eval']} sequences ({s['eval_tokens']} response tokens); lr = {lr:g}; "
        f"{len(s['etas'])} etas from {s['eta_over_lr'][0]:g} x lr to {s['eta_over_lr'][-1]:g} x lr.",
        "",
        "Linear regime: the etas (from the smallest up) where |SNIS Delta H - first order| <= 3 SE and <= 10% of the "
        "first-order prediction; the log-log fit is over those points; 'departs at' is the first eta that fails.",
    ]
    for integrand in INTEGRANDS:
        analysis = {"parts": result["results"][integrand]}
        md += ["", f"## Integrand `{integrand}` (nats per sequence)", "", markdown_table(analysis)]
    md += [
        "",
        "## Per eta (integrand `token_entropy`)",
        "",
        "gap = |SNIS Delta H - first order|; 'gap / first order' is relative to |first order|.",
    ]
    for part in PARTS:
        md += ["", f"### {part}", "", per_eta_table(result["results"]["token_entropy"][part], lr)]
    (out_dir / "linearity.md").write_text("\n".join(md) + "\n")
    plot_linearity(
        {
            "eval": f"toy world, E = {s['n_eval']} sequences, token_entropy",
            "units": "nats per sequence",
            "reference_eta": lr,
            "parts": result["results"]["token_entropy"],
        },
        out_dir / "linearity.png",
    )


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument(
        "--eval-prompts", type=int, default=512, help="E: prompts (8 responses each); default 512 -> 4096 sequences"
    )
    ap.add_argument("--update-prompts", type=int, default=16, help="U: prompts (8 responses each)")
    ap.add_argument("--n-etas", type=int, default=12)
    ap.add_argument("--eta-min", type=float, default=1e-2, help="smallest eta as a multiple of lr")
    ap.add_argument("--eta-max", type=float, default=30.0, help="largest eta as a multiple of lr")
    ap.add_argument("--dtype", default="float64", choices=["float64", "float32"])
    ap.add_argument("--chunk-size", type=int, default=1024)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", type=Path, default=HERE / "results")
    args = ap.parse_args(argv)
    result = run(args)
    write(result, args.out)
    print((args.out / "linearity.md").read_text())


if __name__ == "__main__":
    main()
