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


def format_table(evals: Sequence[dict[str, Any]], etas: Sequence[float]) -> str:
    """The short table printed at the end of a run: part x eta, Delta H +- SE, first and second order, ESS."""

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
    return "\n".join(lines)


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
