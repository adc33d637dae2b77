"""How linear is the entropy change in the step size? ``python -m probe analyze RUN_DIR``.

For each part d of the update (full, baseline, grad, ...) a run measures Delta H(eta) on E by
SNIS over a sweep of step sizes eta, with standard errors, and predicts it to first order,
s * eta (``s = dDelta H/deta`` at eta = 0, by JVP). This module answers, per part:

* **where first order stops agreeing**: the smallest eta (ascending) at which
  ``|Delta H(eta) - s eta| > n_se * SE(eta)`` (a significant gap) **or**
  ``> rel_tol * |s eta|`` (a large one). The points below it form the *linear regime*
  (a run without first-order predictions uses ``s = Delta H(eta_min) / eta_min`` instead);
* the **log-log fit** over the linear regime, ``log|Delta H| = slope * log eta + intercept``,
  with R^2 (slope 1 means Delta H is proportional to eta);
* the local log-log slopes between neighbouring etas, which show the bend without reference
  to any prediction, and the ESS of the importance weights along the sweep.

Every function here is pure numpy on plain lists/arrays, shared by the command line
(:func:`main`) and ``studies/linearity.py``. The command reads ``summary.json`` (docs/DESIGN.md sections 7
and 9: ``plan.etas``, ``evals[k].parts[part].delta_h/se/first_order/ess``...)
and writes ``analysis.json`` and ``plots/linearity.png`` beside it (derived files: rewritten
on every call; the run's own results are never touched).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, NoReturn, Sequence

import numpy as np

from probe.jsonable import dumps, json_safe

# ---------------------------------------------------------------------------------------------
# settings and results


@dataclass
class LinearityCriteria:
    """When a measured Delta H(eta) still agrees with the first-order line s * eta.

    Args:
        n_se: a point disagrees when ``|Delta H - s eta| > n_se * SE`` (a statistically significant gap) ...
        rel_tol: ... or when ``|Delta H - s eta| > rel_tol * |s eta|`` (a gap too large to ignore).
        min_points: fewest points of the linear regime the log-log fit is made from (at least 2).
    """

    n_se: float = 3.0
    rel_tol: float = 0.10
    min_points: int = 2

    def __post_init__(self) -> None:
        if not (self.n_se > 0 and math.isfinite(self.n_se)):
            raise ValueError(f"n_se must be a positive number of standard errors, got {self.n_se}")
        if not (self.rel_tol > 0 and math.isfinite(self.rel_tol)):
            raise ValueError(f"rel_tol must be a positive fraction (e.g. 0.1 for 10%), got {self.rel_tol}")
        if self.min_points < 2:
            raise ValueError(f"min_points must be >= 2 (a line needs two points), got {self.min_points}")


@dataclass
class LogLogFit:
    """Least-squares line through ``(log eta, log|Delta H|)``: ``|Delta H| ~ exp(intercept) * eta^slope``."""

    slope: float
    intercept: float
    r2: float  # on log|Delta H|; 1 for two points
    slope_se: float | None  # OLS standard error of the slope (None below 3 points)
    n_points: int
    eta_min: float
    eta_max: float
    sign: int  # sign of Delta H over the fitted points (+1 / -1)

    def predict(self, eta: np.ndarray | float) -> np.ndarray:
        """Signed Delta H on the fitted line."""
        return self.sign * np.exp(self.intercept) * np.asarray(eta, dtype=float) ** self.slope


@dataclass
class PartLinearity:
    """Linearity of one part's Delta H(eta)."""

    part: str
    etas: list[float]  # ascending, > 0
    delta_h: list[float]
    se: list[float]
    reference_slope: float  # s of the line s * eta the points are compared with
    reference: str  # "first_order" (JVP prediction of the run) or "smallest_eta" (Delta H(eta_min) / eta_min)
    gap: list[float]  # |Delta H - s eta|
    relative_gap: list[float]  # gap / |s eta|
    gap_in_se: list[float]  # gap / SE (NaN where SE is unknown)
    agrees: list[bool]  # per eta: within both tolerances
    n_linear: int  # points in the linear regime (the agreeing prefix)
    last_linear_eta: float | None  # largest eta of the linear regime
    departure_eta: float | None  # smallest eta that disagrees (None: all agree)
    departure_reason: str | None  # "se", "relative", "se+relative" or "non-finite"
    fit: LogLogFit | None  # over the linear regime (None: fewer than min_points there)
    local_slopes: list[float]  # d log|Delta H| / d log eta between neighbours (NaN across a sign change)
    ess_fraction: list[float] | None = None
    linear_radius: float | None = None  # second-order prediction of where the quadratic term is 10% (if the run has it)
    criteria: LinearityCriteria = field(default_factory=LinearityCriteria)

    @property
    def decades(self) -> float:
        """How many decades of eta the linear regime spans (0 for a single point)."""
        if self.n_linear < 1:
            return 0.0
        return float(np.log10(self.etas[self.n_linear - 1] / self.etas[0]))

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["decades"] = self.decades
        return json_safe(out)


# ---------------------------------------------------------------------------------------------
# the math


def _floats(values: Sequence[Any] | np.ndarray | None, n: int, name: str) -> np.ndarray:
    """A float array of length n (None and JSON nulls -> NaN)."""
    if values is None:
        return np.full(n, np.nan)
    arr = np.array([np.nan if v is None else float(v) for v in values], dtype=float)
    if arr.shape != (n,):
        raise ValueError(f"{name} has {arr.shape[0] if arr.ndim else 0} values for {n} etas; give one per eta")
    return arr


def loglog_fit(etas: Sequence[float] | np.ndarray, delta_h: Sequence[float] | np.ndarray) -> LogLogFit:
    """Ordinary least squares of ``log|Delta H|`` on ``log eta``.

    Args:
        etas: step sizes, > 0.
        delta_h: Delta H at those etas, all non-zero, finite and of one sign (a line in log-log
            space is only meaningful for one sign).
    """
    x = np.asarray(etas, dtype=float)
    y = np.asarray(delta_h, dtype=float)
    if x.shape != y.shape or x.ndim != 1:
        raise ValueError(f"etas and delta_h must be 1-d of the same length, got {x.shape} and {y.shape}")
    if len(x) < 2:
        raise ValueError(f"a log-log fit needs at least 2 points, got {len(x)}")
    if not (np.isfinite(x).all() and (x > 0).all()):
        raise ValueError("etas must be finite and > 0 for a log-log fit")
    if not (np.isfinite(y).all() and (y != 0).all()):
        raise ValueError("delta_h must be finite and non-zero for a log-log fit; drop the points where it is not")
    signs = np.sign(y)
    if not (signs == signs[0]).all():
        raise ValueError(
            "delta_h changes sign over the fitted points; fit each sign separately (or only the linear regime)"
        )
    lx, ly = np.log(x), np.log(np.abs(y))  # [n], [n]
    X = np.stack([lx, np.ones_like(lx)], axis=1)  # [n, 2]
    (slope, intercept), *_ = np.linalg.lstsq(X, ly, rcond=None)
    resid = ly - (slope * lx + intercept)
    ss_res = float((resid**2).sum())
    ss_tot = float(((ly - ly.mean()) ** 2).sum())
    r2 = 1.0 - ss_res / ss_tot if ss_tot > 0 else (1.0 if ss_res == 0 else math.nan)
    n = len(x)
    slope_se = None
    sxx = float(((lx - lx.mean()) ** 2).sum())
    if n >= 3 and sxx > 0:
        slope_se = math.sqrt(ss_res / (n - 2) / sxx)
    return LogLogFit(
        slope=float(slope),
        intercept=float(intercept),
        r2=float(r2),
        slope_se=slope_se,
        n_points=n,
        eta_min=float(x.min()),
        eta_max=float(x.max()),
        sign=int(signs[0]),
    )


def first_order_agreement(
    etas: np.ndarray,  # [J] ascending
    delta_h: np.ndarray,  # [J]
    se: np.ndarray,  # [J] (NaN: unknown, only the relative test applies)
    slope: float,  # s of the line s * eta
    criteria: LinearityCriteria,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, list[str | None]]:
    """Per eta: gap ``|Delta H - s eta|``, relative gap, gap in SEs, agreement and, where it fails, why.

    A point disagrees when its gap exceeds ``n_se * SE`` or ``rel_tol * |s eta|``, or when
    Delta H is not finite (the weights or the model overflowed).
    """
    line = slope * etas  # [J]
    gap = np.abs(delta_h - line)  # [J]
    with np.errstate(divide="ignore", invalid="ignore"):
        relative = gap / np.abs(line)
        in_se = np.where(se > 0, gap / se, np.nan)
    agrees = np.zeros(len(etas), dtype=bool)
    reasons: list[str | None] = []
    for j in range(len(etas)):
        if not np.isfinite(delta_h[j]):
            reasons.append("non-finite")
            continue
        by_se = bool(np.isfinite(se[j]) and gap[j] > criteria.n_se * se[j])
        by_rel = bool(gap[j] > criteria.rel_tol * abs(line[j]))
        reasons.append("se+relative" if by_se and by_rel else "se" if by_se else "relative" if by_rel else None)
        agrees[j] = not (by_se or by_rel)
    return gap, relative, in_se, agrees, reasons


def local_loglog_slopes(etas: np.ndarray, delta_h: np.ndarray) -> np.ndarray:  # [J] -> [J-1]
    """``d log|Delta H| / d log eta`` between neighbouring etas; NaN across a sign change or a zero."""
    with np.errstate(divide="ignore", invalid="ignore"):
        same_sign = np.sign(delta_h[1:]) * np.sign(delta_h[:-1]) > 0
        slopes = np.diff(np.log(np.abs(delta_h))) / np.diff(np.log(etas))
    return np.where(same_sign, slopes, np.nan)


def analyse_part(
    part: str,
    etas: Sequence[float],
    delta_h: Sequence[float | None],
    se: Sequence[float | None] | None = None,
    *,
    first_order: float | None = None,
    ess_fraction: Sequence[float | None] | None = None,
    linear_radius: float | None = None,
    criteria: LinearityCriteria | None = None,
) -> PartLinearity:
    """Linear regime, departure from first order and log-log fit of one part's Delta H(eta).

    Args:
        part: the part's name (for reports).
        etas: step sizes (any order; eta <= 0 is dropped, the rest sorted ascending).
        delta_h: measured Delta H per eta (None / NaN: not finite).
        se: its standard errors (None: only the relative test applies).
        first_order: the first-order slope s (None: ``Delta H(eta_min) / eta_min``).
        ess_fraction: ESS / M per eta, carried into the result.
        linear_radius: the second-order linear radius of the run, carried into the result.
        criteria: tolerances (default 3 SE or 10%).
    """
    criteria = criteria or LinearityCriteria()
    eta = np.asarray(etas, dtype=float)
    J = len(eta)
    if J == 0:
        raise ValueError(f"part {part!r}: no etas to analyse")
    dh, s_e = _floats(delta_h, J, "delta_h"), _floats(se, J, "se")
    ess = None if ess_fraction is None else _floats(ess_fraction, J, "ess_fraction")
    keep = np.isfinite(eta) & (eta > 0)
    if not keep.any():
        raise ValueError(f"part {part!r}: no eta > 0; a log-log analysis needs positive step sizes")
    order = np.argsort(eta[keep], kind="stable")
    eta, dh, s_e = eta[keep][order], dh[keep][order], s_e[keep][order]
    ess = None if ess is None else ess[keep][order]

    if first_order is not None and math.isfinite(first_order):
        slope, reference = float(first_order), "first_order"
    else:
        if not np.isfinite(dh[0]):
            raise ValueError(
                f"part {part!r}: no first-order slope and Delta H at the smallest eta is not finite; nothing to "
                "compare with"
            )
        slope, reference = float(dh[0] / eta[0]), "smallest_eta"
    gap, relative, in_se, agrees, reasons = first_order_agreement(eta, dh, s_e, slope, criteria)
    n_linear = int(np.argmin(agrees)) if not agrees.all() else len(agrees)  # the agreeing prefix
    fit = loglog_fit(eta[:n_linear], dh[:n_linear]) if n_linear >= criteria.min_points else None
    return PartLinearity(
        part=part,
        etas=eta.tolist(),
        delta_h=dh.tolist(),
        se=s_e.tolist(),
        reference_slope=slope,
        reference=reference,
        gap=gap.tolist(),
        relative_gap=relative.tolist(),
        gap_in_se=in_se.tolist(),
        agrees=agrees.tolist(),
        n_linear=n_linear,
        last_linear_eta=float(eta[n_linear - 1]) if n_linear > 0 else None,
        departure_eta=float(eta[n_linear]) if n_linear < len(eta) else None,
        departure_reason=reasons[n_linear] if n_linear < len(eta) else None,
        fit=fit,
        local_slopes=local_loglog_slopes(eta, dh).tolist(),
        ess_fraction=None if ess is None else ess.tolist(),
        linear_radius=None if linear_radius is None or not math.isfinite(linear_radius) else float(linear_radius),
        criteria=criteria,
    )


# ---------------------------------------------------------------------------------------------
# run directories


def _parts_of(summary: dict[str, Any], eval_index: int) -> tuple[dict[str, Any], str, int | None]:
    """The per-part results of evaluation batch ``eval_index``, its name and size."""
    evals = summary.get("evals")
    if evals:
        if not 0 <= eval_index < len(evals):
            raise ValueError(
                f"the run has {len(evals)} evaluation batch(es); choose --eval between 0 and {len(evals) - 1}"
            )
        ev = evals[eval_index]
        return ev.get("parts", {}), ev.get("name", f"eval_{eval_index:02d}"), ev.get("n_sequences")
    if eval_index != 0:
        raise ValueError("this summary has only the first evaluation batch ('aggregate'); use --eval 0")
    if "aggregate" not in summary:
        raise ValueError("summary.json has neither 'aggregate' nor 'evals': it was not written by a finished probe run")
    n = (summary.get("plan") or {}).get("n_eval_sequences") or [None]
    return summary["aggregate"], "eval_00", n[0]


def analyse_summary(
    summary: dict[str, Any],
    *,
    eval_index: int = 0,
    per_token: bool = False,
    parts: Sequence[str] | None = None,
    criteria: LinearityCriteria | None = None,
) -> dict[str, Any]:
    """:func:`analyse_part` for every part of a run's ``summary.json`` (already parsed).

    Args:
        summary: the parsed ``summary.json``.
        eval_index: which evaluation batch (0: the first, ``aggregate``).
        per_token: analyse the per-token entropy change instead of the per-sequence one.
        parts: restrict to these parts (default: all the run measured).
        criteria: tolerances of the agreement test.

    Returns:
        JSON-ready ``{"eval", "n_sequences", "integrand", "per_token", "criteria", "parts": {part: ...}}``.
    """
    criteria = criteria or LinearityCriteria()
    etas = (summary.get("plan") or {}).get("etas")
    if not etas:
        raise ValueError("summary.json has no plan.etas: the run did not sweep any step size")
    results, name, n_sequences = _parts_of(summary, eval_index)
    if parts:
        missing = [p for p in parts if p not in results]
        if missing:
            raise ValueError(f"parts {missing} are not in the run; it measured {sorted(results)}")
    chosen = list(parts) if parts else list(results)
    if not chosen:
        raise ValueError("the run holds no part results to analyse")
    suffix = "_per_token" if per_token else ""
    out_parts = {}
    for part in chosen:
        res = results[part]
        dh_key = "delta_h_per_token" if per_token else "delta_h"
        if dh_key not in res:
            raise ValueError(f"part {part!r} has no {dh_key!r} in summary.json; the run did not measure it")
        se_key = "se_per_token" if per_token else "se"
        out_parts[part] = analyse_part(
            part,
            etas,
            res[dh_key],
            res.get(se_key),
            first_order=res.get(f"first_order{suffix}"),
            ess_fraction=res.get("ess_fraction"),
            linear_radius=res.get(f"linear_radius{suffix}"),
            criteria=criteria,
        ).to_dict()
    plan = summary.get("plan") or {}
    return {
        "eval": name,
        "n_sequences": n_sequences,
        "integrand": plan.get("integrand"),
        "per_token": per_token,
        "units": "nats per token" if per_token else "nats per sequence",
        "reference_eta": plan.get("reference_eta"),
        "criteria": asdict(criteria),
        "parts": out_parts,
    }


class SummaryError(ValueError):
    """A ``summary.json`` that cannot be analysed: not JSON, or without the fields (of the types) a finished probe
    run writes. ``python -m probe analyze`` exits with status 1 on it."""


SUMMARY_FIX = (
    "Fix: pass the directory of a finished `python -m probe predict` run; if this run finished, its summary.json was "
    "edited or damaged since: rerun it (same config, a new run.name) to write it again"
)
PART_LISTS = ("delta_h", "se", "delta_h_per_token", "se_per_token", "ess_fraction")  # one value (or null) per eta
PART_NUMBERS = ("first_order", "first_order_per_token", "linear_radius", "linear_radius_per_token")


def _kind(value: Any) -> str:
    """What a JSON value is, in words."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return f"the boolean {str(value).lower()}"
    if isinstance(value, (int, float)):
        return f"the number {value}"
    if isinstance(value, str):
        return f"the string {value[:40]!r}" + ("..." if len(value) > 40 else "")
    if isinstance(value, list):
        return f"a list of {len(value)} value{'' if len(value) == 1 else 's'}" if value else "an empty list"
    return "an object"


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def check_summary(summary: Any, path: str | Path) -> dict[str, Any]:
    """``summary`` (the parsed ``path``) when it holds what :func:`analyse_summary` reads, with the types a probe
    run writes: ``plan.etas`` (numbers) and ``evals[k].parts`` (or the older ``aggregate``), each part with its
    ``delta_h`` per eta. Else :class:`SummaryError`, naming the file and what is missing or of the wrong type; a
    summary whose ``status`` is not ``complete`` is said to be of an unfinished run."""
    status = summary.get("status") if isinstance(summary, dict) else None
    unfinished = (
        f" Its status is {status!r}, not 'complete': it is an unfinished run (probe writes status 'complete' when a "
        "run ends)."
        if status is not None and status != "complete"
        else ""
    )

    def fail(what: str) -> NoReturn:
        raise SummaryError(f"{path} {what}, so it cannot be analysed.{unfinished} {SUMMARY_FIX}")

    if not isinstance(summary, dict):
        fail(f"holds {_kind(summary)}, not the JSON object a probe run writes")
    plan = summary.get("plan")
    if not isinstance(plan, dict):
        fail(
            "has no 'plan' (the run's plan, with the etas it swept)"
            if plan is None
            else f"has 'plan' = {_kind(plan)}, not an object"
        )
    etas = plan.get("etas")
    if not isinstance(etas, list) or not etas or not all(_is_number(e) for e in etas):
        fail(
            "has no plan.etas (the step sizes the run swept)"
            if etas is None
            else f"has plan.etas = {_kind(etas)}, not a non-empty list of numbers (the step sizes the run swept)"
        )
    evals = summary.get("evals")
    if evals is not None and not isinstance(evals, list):
        fail(f"has 'evals' = {_kind(evals)}, not a list (one entry per evaluation batch)")
    if evals:
        batches = []
        for k, ev in enumerate(evals):
            parts = ev.get("parts") if isinstance(ev, dict) else None
            if not isinstance(ev, dict):
                fail(f"has evals[{k}] = {_kind(ev)}, not an object")
            if not isinstance(parts, dict):
                fail(
                    f"has no evals[{k}].parts (the results per part)"
                    if parts is None
                    else f"has evals[{k}].parts = {_kind(parts)}, not an object"
                )
            batches.append((f"evals[{k}].parts", parts))
    elif isinstance(summary.get("aggregate"), dict):  # summaries written before 'evals'
        batches = [("aggregate", summary["aggregate"])]
    else:
        fail(
            ("has an empty 'evals' list" if evals == [] else "has no 'evals'")
            + " (the results per evaluation batch)"
            + (" and no 'aggregate'" if "aggregate" in summary else "")
        )
    for where, parts in batches:
        if not parts:
            fail(f"has no part in {where} (an empty object: no results per part)")
        for part, result in parts.items():
            if not isinstance(result, dict):
                fail(f"has {where}.{part} = {_kind(result)}, not an object")
            if "delta_h" not in result:
                fail(f"has no {where}.{part}.delta_h (the measured entropy change per eta)")
            for key in PART_LISTS:
                values = result.get(key)
                if values is None:
                    continue
                if not isinstance(values, list) or len(values) != len(etas):
                    fail(
                        f"has {where}.{part}.{key} = {_kind(values)}, not a list of {len(etas)} numbers or nulls (one "
                        "per plan.etas)"
                    )
                for j, v in enumerate(values):
                    if v is not None and not _is_number(v):
                        fail(f"has {where}.{part}.{key}[{j}] = {_kind(v)}, not a number or null")
            for key in PART_NUMBERS:
                if result.get(key) is not None and not _is_number(result[key]):
                    fail(f"has {where}.{part}.{key} = {_kind(result[key])}, not a number or null")
    return summary


def read_summary(run_dir: str | Path) -> dict[str, Any]:
    """Parse ``RUN_DIR/summary.json`` with errors that say what to do (:func:`check_summary`)."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise FileNotFoundError(
            f"run directory {run_dir} does not exist; pass a directory written by `python -m probe predict` (e.g. "
            "runs/<name>)"
        )
    path = run_dir / "summary.json"
    if not path.is_file():
        raise FileNotFoundError(
            f"{run_dir} has no summary.json, so it is not a probe run directory (or the run has not written its "
            "results yet); pass a directory written by `python -m probe predict` (e.g. runs/<name>), or finish the "
            "run by rerunning it with the same run.name"
        )
    try:
        summary = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise SummaryError(
            f"{path} is not valid JSON ({e}), so it cannot be analysed: it was cut off (e.g. a full disk or an "
            f"interrupted copy) or is not a probe summary. {SUMMARY_FIX}"
        ) from None
    return check_summary(summary, path)


def analyse_run(
    run_dir: str | Path,
    *,
    eval_index: int = 0,
    per_token: bool = False,
    parts: Sequence[str] | None = None,
    criteria: LinearityCriteria | None = None,
    write: bool = True,
    plot: bool = True,
) -> dict[str, Any]:
    """Analyse a run directory; with ``write`` save ``analysis.json`` (and ``plots/linearity.png`` with ``plot``).

    Files of evaluation batch k > 0 and per-token analyses get a suffix (``analysis_eval_01_per_token.json``).
    """
    run_dir = Path(run_dir)
    summary = read_summary(run_dir)
    analysis = analyse_summary(summary, eval_index=eval_index, per_token=per_token, parts=parts, criteria=criteria)
    analysis["run_dir"] = str(run_dir)
    analysis["status"] = summary.get("status")
    if write:
        suffix = ("" if eval_index == 0 else f"_eval_{eval_index:02d}") + ("_per_token" if per_token else "")
        if plot:
            path = plot_linearity(analysis, run_dir / "plots" / f"linearity{suffix}.png")
            analysis["plot"] = str(path)
        path = run_dir / f"analysis{suffix}.json"
        path.write_text(dumps(analysis, indent=2))
        analysis["path"] = str(path)
    return analysis


# ---------------------------------------------------------------------------------------------
# reporting


def _fmt(x: Any, spec: str = ".3g", missing: str = "-") -> str:
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return missing
    return format(x, spec)


def markdown_table(analysis: dict[str, Any]) -> str:
    """One row per part: linear regime, departure, log-log fit, first-order slope, ESS."""
    head = (
        "| part | first-order slope | linear up to eta | departs at eta (why) | decades | log-log slope | R^2 | points "
        "| 2nd-order radius | ESS/M at departure |"
    )
    lines = [head, "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for part, r in analysis["parts"].items():
        fit = r["fit"]
        dep = r["departure_eta"]
        ess = "-"
        if dep is not None and r.get("ess_fraction"):
            ess = _fmt(r["ess_fraction"][r["n_linear"]], ".2f")
        slope = (
            "-"
            if fit is None
            else _fmt(fit["slope"], ".3f") + ("" if fit["slope_se"] is None else f" +- {fit['slope_se']:.3f}")
        )
        ref = _fmt(r["reference_slope"], ".4g") + ("" if r["reference"] == "first_order" else " (from smallest eta)")
        lines.append(
            f"| {part} | {ref} | {_fmt(r['last_linear_eta'])} | "
            + ("none in sweep" if dep is None else f"{_fmt(dep)} ({r['departure_reason']})")
            + f" | {r['decades']:.2f} | {slope} | {'-' if fit is None else _fmt(fit['r2'], '.5f')} | {r['n_linear']} | "
            f"{_fmt(r.get('linear_radius'))} | {ess} |"
        )
    return "\n".join(lines)


def format_analysis(analysis: dict[str, Any]) -> str:
    """The table :func:`main` prints."""
    c = analysis["criteria"]
    title = (
        f"{analysis.get('run_dir', '')} {analysis['eval']} ({analysis.get('n_sequences') or '?'} sequences, "
        f"integrand {analysis.get('integrand') or '?'}, {analysis['units']})"
    ).strip()
    rule = f"linear regime: |Delta H - s eta| <= {c['n_se']:g} SE and <= {c['rel_tol']:.0%} of |s eta| (ascending eta)"
    return "\n".join([title, rule, markdown_table(analysis)])


def plot_linearity(analysis: dict[str, Any], path: str | Path) -> Path:
    """|Delta H| vs eta on log-log axes per part (+-1 SE; filled: Delta H > 0, open: < 0) with the
    first-order line, the fit over the linear regime and the departure point; ESS/M vs eta below."""
    from probe.plots import plt, save_figure

    has_ess = any(r.get("ess_fraction") for r in analysis["parts"].values())
    fig, axes = plt.subplots(
        2 if has_ess else 1,
        1,
        figsize=(6.8, 7.2 if has_ess else 4.6),
        sharex=True,
        gridspec_kw={"height_ratios": [3, 1.3]} if has_ess else None,
        squeeze=False,
    )
    ax = axes[0, 0]
    for k, (part, r) in enumerate(analysis["parts"].items()):
        color = f"C{k}"
        eta = np.asarray(r["etas"], float)
        dh = np.asarray([np.nan if v is None else v for v in r["delta_h"]], float)
        se = np.asarray([np.nan if v is None else v for v in r["se"]], float)
        mag = np.abs(dh)
        lower = np.minimum(np.nan_to_num(se), mag * 0.999)  # keep error bars above zero on a log axis
        pos, neg = dh > 0, dh < 0
        ax.errorbar(
            eta[pos],
            mag[pos],
            yerr=[lower[pos], np.nan_to_num(se[pos])],
            fmt="o",
            color=color,
            capsize=2,
            label=f"{part}: |SNIS Delta H|",
        )
        ax.errorbar(
            eta[neg], mag[neg], yerr=[lower[neg], np.nan_to_num(se[neg])], fmt="o", mfc="none", color=color, capsize=2
        )
        s = r["reference_slope"]
        if s:
            ax.plot(
                eta,
                np.abs(s) * eta,
                ":",
                color=color,
                alpha=0.8,
                label=f"{part}: |first order|" if r["reference"] == "first_order" else None,
            )
        fit = r["fit"]
        if fit is not None:
            x = np.geomspace(fit["eta_min"], fit["eta_max"], 20)
            ax.plot(
                x,
                np.exp(fit["intercept"]) * x ** fit["slope"],
                "-",
                color=color,
                lw=2,
                alpha=0.6,
                label=f"{part}: fit slope {fit['slope']:.3f}, R^2 {fit['r2']:.4f}",
            )
        if r["departure_eta"] is not None:
            ax.axvline(r["departure_eta"], color=color, ls="--", lw=0.8, alpha=0.7)
    ax.set_xscale("log")
    ax.set_yscale("log")
    magnitudes = [
        abs(v)
        for r in analysis["parts"].values()
        for v in r["delta_h"]
        if v is not None and v != 0 and math.isfinite(v)
    ]
    if magnitudes:  # error bars reaching towards zero would otherwise stretch the log axis for decades
        ax.set_ylim(bottom=min(magnitudes) / 5)
    ax.set_ylabel(f"|Delta H| ({analysis['units']})")
    ref = analysis.get("reference_eta")
    title = f"{analysis['eval']}: linearity in eta\nopen markers: Delta H < 0; dashed: first order departs"
    if ref:
        title += "; grey: reference eta"
    ax.set_title(title, fontsize=9)
    if ref:
        ax.axvline(ref, color="grey", lw=0.5)
    ax.legend(fontsize=6.5, loc="upper left")
    if has_ess:
        ax2 = axes[1, 0]
        for k, (part, r) in enumerate(analysis["parts"].items()):
            if r.get("ess_fraction"):
                ess = np.asarray([np.nan if v is None else v for v in r["ess_fraction"]], float)
                ax2.plot(r["etas"], ess, "o-", ms=3, color=f"C{k}", label=part)
        ax2.axhline(0.1, color="grey", ls=":", lw=0.8)
        ax2.legend(fontsize=6.5, loc="lower left")
        ax2.set_ylim(0, 1.05)
        ax2.set_ylabel("ESS / M")
        ax2.set_xlabel("eta (learning rate)")
    else:
        ax.set_xlabel("eta (learning rate)")
    return save_figure(fig, Path(path))


# ---------------------------------------------------------------------------------------------
# command line


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m probe analyze",
        description="Log-log slope, R^2 over the linear regime and the eta where first order stops agreeing, "
        "per part, from a run directory's summary.json. Writes RUN_DIR/analysis.json and RUN_DIR/plots/linearity.png.",
    )
    p.add_argument("run_dir", help="a run directory written by `python -m probe predict` (holds summary.json)")
    p.add_argument("--eval", type=int, default=0, dest="eval_index", help="evaluation batch to analyse (default 0)")
    p.add_argument("--per-token", action="store_true", help="analyse the per-token entropy change")
    p.add_argument("--parts", nargs="+", default=None, help="parts to analyse (default: all)")
    p.add_argument(
        "--n-se", type=float, default=3.0, help="disagreement when the gap exceeds this many SEs (default 3)"
    )
    p.add_argument(
        "--rel-tol", type=float, default=0.10, help="... or this fraction of the first-order prediction (default 0.1)"
    )
    p.add_argument("--no-write", action="store_true", help="print only; write no files")
    p.add_argument("--no-plot", action="store_true", help="write analysis.json but no plot")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m probe analyze RUN_DIR [...]``; returns the exit status: 1 for a ``summary.json`` that cannot be
    analysed (:class:`SummaryError`), 2 for bad arguments (no such run directory, none with a ``summary.json``,
    ``--eval`` or ``--parts`` the run does not have)."""
    parser = build_parser()
    args = parser.parse_args(list(sys.argv[1:] if argv is None else argv))
    try:
        criteria = LinearityCriteria(n_se=args.n_se, rel_tol=args.rel_tol)
        analysis = analyse_run(
            args.run_dir,
            eval_index=args.eval_index,
            per_token=args.per_token,
            parts=args.parts,
            criteria=criteria,
            write=not args.no_write,
            plot=not args.no_plot,
        )
    except SummaryError as e:
        print(f"probe analyze: error: {e}", file=sys.stderr)
        return 1
    except (FileNotFoundError, ValueError) as e:
        print(f"probe analyze: error: {e}", file=sys.stderr)
        return 2
    if analysis.get("status") not in (None, "complete"):
        print(
            f"probe analyze: warning: {Path(args.run_dir) / 'summary.json'} has status {analysis['status']!r}, not "
            "'complete': it is an unfinished run (probe writes status 'complete' when a run ends), so these numbers "
            "may be partial. Fix: finish the run by rerunning its command (same run.name), then analyze it again",
            file=sys.stderr,
        )
    print(format_analysis(analysis))
    if "path" in analysis:
        print(f"wrote {analysis['path']}" + (f" and {analysis['plot']}" if "plot" in analysis else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
