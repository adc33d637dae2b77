"""From per-sequence statistics of a whole evaluation batch to the numbers a run reports.

Pure functions (no Lightning): the aggregation callback calls :func:`summarise_eval` on the
rows of every batch and rank, concatenated and sorted by sequence index, so the result does
not depend on how E was split across batches or processes.
"""
from __future__ import annotations

import math
from dataclasses import fields
from typing import Any, Sequence

import numpy as np
import torch

from probe.overrides import SequenceStats
from probe.snis import SNISConfig, SNISResult, snis_estimate
from probe.taylor import SequenceDerivatives, first_order, snis_derivatives


def _stats(rows: dict[str, np.ndarray], logprobs: str, entropies: str, *index: int) -> SequenceStats:
    pick = lambda a: torch.as_tensor(a[index] if index else a, dtype=torch.float64)  # noqa: E731
    return SequenceStats(
        logprobs=pick(rows[logprobs]),
        entropies=pick(rows[entropies]) if entropies in rows else None,
        lengths=torch.as_tensor(rows["lengths"], dtype=torch.float64),
    )


def estimate_or_non_finite(base: SequenceStats, shifted: SequenceStats, *, integrand: str, eta: float,
                            config: SNISConfig, groups: Sequence[Any] | None) -> SNISResult:
    """:func:`snis_estimate`, or an all-NaN result where theta + eta * d overflowed the model (non-finite
    log-probs or entropies at eta): such a point is reported (``finite: false``, ``warnings``), never a crash."""
    if torch.isfinite(shifted.logprobs).all() and torch.isfinite(shifted.integrand(integrand)).all():
        return snis_estimate(base, shifted, integrand=integrand, eta=eta, config=config, groups=groups)
    M = len(base)
    scalars = {f.name: math.nan for f in fields(SNISResult) if f.name not in SNISResult._TENSORS}
    scalars.update(integrand=integrand, eta=float(eta), normalisation=config.normalisation, n_samples=M)
    return SNISResult(**scalars, **{name: torch.full((M,), math.nan, dtype=torch.float64) for name in SNISResult._TENSORS})


def summarise_eval(
    rows: dict[str, np.ndarray],
    parts: Sequence[str],
    etas: Sequence[float],
    integrand: str,
    snis: SNISConfig,
    groups: Sequence[Any] | None = None,
) -> tuple[dict[str, Any], dict[str, list[SNISResult]]]:
    """Aggregate Delta H per (part, eta) with SEs, ESS and clipping, and the first/second-order predictions.

    ``rows`` holds ``[M]`` arrays ``logprobs``, ``lengths`` (and ``entropies``), ``[K, J, M]``
    ``sweep_logprobs``/``sweep_entropies`` and, when predicted, ``[K, M]`` ``d_logprobs``,
    ``d_entropies``, ``d2_logprobs``, ``d2_entropies``. Returns the JSON-ready summary and
    the SNIS results (with per-sequence contributions) for each part.
    """
    base = _stats(rows, "logprobs", "entropies")
    h0 = base.integrand(integrand)
    M = len(base)
    group_arg = groups if snis.normalisation == "per_prompt" else None
    summary: dict[str, Any] = {
        "n_sequences": M,
        "n_tokens": int(base.lengths.sum()),
        "base_entropy": {"sequence": float(h0.mean()), "per_token": float(h0.sum() / base.lengths.sum())},
        "parts": {},
    }
    results: dict[str, list[SNISResult]] = {}
    for k, part in enumerate(parts):
        res = [
            estimate_or_non_finite(base, _stats(rows, "sweep_logprobs", "sweep_entropies", k, j), integrand=integrand,
                                   eta=float(eta), config=snis, groups=group_arg)
            for j, eta in enumerate(etas)
        ]
        results[part] = res
        entry: dict[str, Any] = {
            "delta_h": [r.delta_entropy for r in res],
            "se": [r.delta_entropy_se for r in res],
            "delta_h_per_token": [r.delta_entropy_per_token for r in res],
            "se_per_token": [r.delta_entropy_per_token_se for r in res],
            "ess": [r.ess for r in res],
            "ess_fraction": [r.ess_fraction for r in res],
            "clip_fraction": [r.truncated_fraction for r in res],
            "max_log_weight": [r.max_log_weight for r in res],
            "finite": [bool(math.isfinite(r.delta_entropy)) for r in res],
        }
        bad = ~np.isfinite(rows["sweep_logprobs"][k])  # [J, M]
        if "sweep_entropies" in rows:
            bad |= ~np.isfinite(rows["sweep_entropies"][k])
        entry["non_finite_sequences"] = [int(n) for n in bad.sum(-1)]
        if "d_logprobs" in rows:
            derivs = SequenceDerivatives(
                eta=0.0, value=base, first=_stats(rows, "d_logprobs", "d_entropies", k),
                second=_stats(rows, "d2_logprobs", "d2_entropies", k) if "d2_logprobs" in rows else None,
            )
            fo = first_order(derivs, integrand, group_arg)
            entry.update(first_order=fo.slope, first_order_se=fo.slope_se, first_order_per_token=fo.slope_per_token,
                         first_order_per_token_se=fo.slope_per_token_se,
                         predicted_first=[fo.slope * e for e in etas])
            if derivs.second is not None:
                so = snis_derivatives(derivs, base, integrand, group_arg)
                entry.update(second_order=so.second, second_order_per_token=so.second_per_token,
                             linear_radius=so.linear_radius, linear_radius_per_token=so.linear_radius_per_token,
                             predicted_second=[fo.slope * e + 0.5 * so.second * e * e for e in etas])
        summary["parts"][part] = entry
    if "full" in results and "baseline_plus_grad" in results:
        diff = [a.delta_entropy - b.delta_entropy for a, b in zip(results["full"], results["baseline_plus_grad"])]
        summary["additivity"] = {"full_minus_baseline_plus_grad": diff,
                                 "max_abs": max((abs(d) for d in diff if math.isfinite(d)), default=float("nan"))}
    summary["warnings"] = [
        f"{part} at eta={eta:.3g}: " + (
            f"{e['non_finite_sequences'][j]} of {M} sequences have non-finite log-probs/entropies at theta + eta * d "
            "(the step overflows the model): no estimate there; use smaller etas"
            if e["non_finite_sequences"][j] else
            f"ESS {e['ess'][j]:.1f} of {M} samples (< 10%): the SNIS estimate is unreliable there; use smaller etas or a larger E")
        for part, e in summary["parts"].items() for j, eta in enumerate(etas)
        if e["non_finite_sequences"][j] or e["ess_fraction"][j] < 0.1
    ]
    if "sampler_gap_max" in rows and np.isfinite(rows["sampler_gap_max"]).all():
        summary["sampler_gap"] = {"max_abs": float(rows["sampler_gap_max"].max()),
                                  "mean_abs": float(rows["sampler_gap_sum"].sum() / base.lengths.sum().item())}
    return summary, results


def format_table(summary: dict[str, Any], etas: Sequence[float]) -> str:
    """The short table printed at the end of a run: part x eta, Delta H +- SE, first order, ESS."""
    lines = []
    for ev in summary["evals"]:
        M = ev["n_sequences"]
        lines.append(f"{ev['name']}: {M} sequences, H = {ev['base_entropy']['sequence']:.4f} nats/seq "
                     f"({ev['base_entropy']['per_token']:.4f} per token)")
        lines.append(f"  {'part':<20}{'eta':>10}{'Delta H':>13}{'+- SE':>11}{'1st order':>13}{'2nd order':>13}{'ESS':>8}")
        for part, res in ev["parts"].items():
            for j, eta in enumerate(etas):
                first = res.get("predicted_first", [None] * len(etas))[j]
                second = res.get("predicted_second", [None] * len(etas))[j]
                fmt = lambda x: f"{x:13.4e}" if x is not None and math.isfinite(x) else f"{'n/a':>13}"  # noqa: E731
                dh, se = res["delta_h"][j], res["se"][j]
                frac = res["ess_fraction"][j]
                flag = "  non-finite" if frac is None or not math.isfinite(frac) else "  ESS<10%" if frac < 0.1 else ""
                se_text = f"{se:11.2e}" if se is not None and math.isfinite(se) else f"{'n/a':>11}"
                ess = res["ess"][j]
                ess_text = f"{ess:8.1f}" if ess is not None and math.isfinite(ess) else f"{'n/a':>8}"
                lines.append(f"  {part:<20}{eta:10.3g}{fmt(dh)}{se_text}{fmt(first)}{fmt(second)}{ess_text}{flag}")
        if "attribution" in ev:
            a = ev["attribution"]
            lines.append(f"  attribution: sum_i a_i = {a['sum']:.6e} vs first order of grad {a['grad_first_order']:.6e}"
                         f" (rel. diff {a['relative_difference']:.1e}); top +: {a['top_positive']}, top -: {a['top_negative']}")
    return "\n".join(lines)
