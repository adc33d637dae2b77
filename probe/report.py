"""What a finished run prints, and the environment it records: the result table and ``environment()``.

The table reads the JSON form of the results (``summary.json``'s ``evals``), so a table can be
printed again from any run directory. No Lightning here.
"""

from __future__ import annotations

import math
import platform
import sys
from typing import Any, Sequence

import torch

from probe.results import CHANGED_FLAGGED, ROUNDING_UNMEASURABLE


def format_table(evals: Sequence[dict[str, Any]], etas: Sequence[float], lr: float | None = None) -> str:
    """The short table printed at the end of a run: part x eta, Delta H +- SE, first and second order, ESS; then the
    attribution, the change of E's expected reward (at eta = ``lr``) and the covariance law, where computed."""

    def number(x: float | None, width: int, spec: str) -> str:
        return f"{x:{width}{spec}}" if x is not None and math.isfinite(x) else f"{'n/a':>{width}}"

    lines = []
    for ev in evals:
        base = ev["base_entropy"]
        lines.append(
            f"{ev['name']}: {ev['n_sequences']} sequences, H = {number(base['sequence'], 0, '.4f')} nats/seq "
            f"({number(base['per_token'], 0, '.4f')} per token)"
        )
        lines.append(
            f"  {'part':<20}{'eta':>10}{'Delta H':>13}{'+- SE':>11}{'1st order':>13}{'2nd order':>13}{'ESS':>8}"
        )
        for part, res in ev["parts"].items():
            for j, eta in enumerate(etas):
                first = res.get("predicted_first", [None] * len(etas))[j]
                second = res.get("predicted_second", [None] * len(etas))[j]
                frac = res["ess_fraction"][j]
                rounding = (res.get("step_rounding_error") or [0.0] * len(etas))[j]
                changed = (res.get("changed_fraction") or [1.0] * len(etas))[j]
                if rounding is None or rounding > ROUNDING_UNMEASURABLE:  # (None: NaN in JSON, a zero direction)
                    flag = "  step rounds away in the policy's dtype"
                elif changed is not None and changed < CHANGED_FLAGGED:
                    flag = f"  only {changed:.0%} of weights move"
                elif frac is None or not math.isfinite(frac):
                    flag = "  non-finite"
                else:
                    flag = "  ESS<10%" if frac < 0.1 else ""
                lines.append(
                    f"  {part:<20}{eta:10.3g}{number(res['delta_h'][j], 13, '.4e')}{number(res['se'][j], 11, '.2e')}"
                    f"{number(first, 13, '.4e')}{number(second, 13, '.4e')}{number(res['ess'][j], 8, '.1f')}{flag}"
                )
        if "attribution" in ev:
            a = ev["attribution"]
            head = f"  attribution: sum_i a_i = {a['sum']:.6e} vs first order of grad {a['grad_first_order']:.6e}"
            if a.get("ok") is None:  # a summary written before the check existed
                lines.append(f"{head} (rel. diff {a['relative_difference']:.1e}; no verdict recorded)")
            else:
                lines.append(
                    f"{head}: {'ok' if a['ok'] else 'NOT OK'} (difference {number(a['scaled_difference'], 0, '.1e')} "
                    f"of sum_i |a_i| = {a['abs_sum']:.4e}, tolerance {a['tolerance']:.0e})"
                )
            lines.append(f"  attribution: top +: {a['top_positive']}, top -: {a['top_negative']}")
            if a.get("top_tokens"):
                shown = ", ".join(
                    f"{t.get('text', t['token_id'])!r} (seq {t['sequence']}, pos {t['position']}) {t['value']:.3e}"
                    for t in a["top_tokens"][:5]
                )
                lines.append(f"  attribution: top tokens a_it: {shown}")
        if ev.get("reward"):
            lines += _reward_lines(ev["reward"], etas, lr, number)
        if ev.get("covariance_law"):
            lines += _covariance_lines(ev["covariance_law"], number)
    return "\n".join(lines)


def _reward_lines(reward: dict[str, Any], etas: Sequence[float], lr: float | None, number: Any) -> list[str]:
    """E's expected reward and its change along every part at eta = lr (the real step; the middle eta without lr)."""
    j = min(range(len(etas)), key=lambda k: abs(etas[k] - lr)) if lr is not None else len(etas) // 2
    lines = [
        f"  reward on E: R = {number(reward['base'], 0, '.4f')} +- {number(reward['base_se'], 0, '.2g')}; "
        f"at eta = {etas[j]:.3g}:"
    ]
    for part, res in reward["parts"].items():
        first = (res.get("predicted_first") or [None] * len(etas))[j]
        lines.append(
            f"  {'Delta R ' + part:<20}{number(res['delta_r'][j], 23, '.4e')}{number(res['se'][j], 11, '.2e')}"
            f"{number(first, 13, '.4e')}"
        )
    if reward.get("attribution"):
        r = reward["attribution"]
        lines.append(
            f"  reward attribution: sum_i r_i = {r['sum']:.6e} vs first order of grad {r['grad_first_order']:.6e}: "
            f"{'ok' if r['ok'] else 'NOT OK'}; top +: {r['top_positive']}, top -: {r['top_negative']}"
        )
    return lines


def _covariance_lines(law: dict[str, Any], number: Any) -> list[str]:
    """The covariance law of Cui et al. 2025 on U next to the exact change at eta = lr."""
    lines = [
        f"  covariance law: Cov(log p, A) = {number(law['batch_mean'], 0, '.4e')} over {law['n_tokens']} tokens of U, "
        f"so -lr Cov = {number(law.get('law_at_lr'), 0, '.3e')}; exact at eta = lr: SNIS "
        f"{number(law.get('delta_h_at_lr'), 0, '.3e')}, 1st order {number(law.get('first_order_at_lr'), 0, '.3e')} "
        f"(grad part {number(law.get('grad_first_order_at_lr'), 0, '.3e')})"
    ]
    if law.get("top_overlap") is not None:
        lines.append(
            f"  covariance law: top-{law['k']} covariance tokens vs top-{law['k']} |a_it|: overlap "
            f"{law['top_overlap']:.0%} (chance {law['chance_overlap']:.1%}); rank correlation of cov_t and a_it "
            f"{number(law.get('rank_correlation'), 0, '.3f')}"
        )
    return lines


def environment() -> dict[str, str]:
    """Versions and the machine a run ran on (``summary.json["environment"]``)."""
    import lightning
    import transformers

    return {
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "torch": torch.__version__,
        "lightning": lightning.__version__,
        "transformers": transformers.__version__,
        "cuda": torch.version.cuda or "none",
        "device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else platform.processor() or "cpu",
    }
