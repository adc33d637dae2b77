"""Linearity analysis (probe.analyze) and ``python -m probe analyze RUN_DIR``.

The truths are synthetic curves whose answers are known in closed form: a power law
c * eta^p (the fit must return p, log c and R^2 = 1 to rounding), a line plus a quadratic
term s eta + q eta^2 (its relative gap to the line is |q eta / s|, so the first eta past 10%
is known), and numpy's own least squares (``np.polyfit``) for the slope's standard error.
"""

from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from probe.analyze import LinearityCriteria, analyse_part, analyse_run, analyse_summary, loglog_fit, main

ETAS = np.geomspace(3e-6, 9e-3, 12)  # 1e-2 x lr .. 30 x lr for lr = 3e-4


# ---------------------------------------------------------------------------------------------
# the log-log fit


def test_exact_power_law_gives_its_exponent_intercept_and_r2_of_one():
    for c, p, sign in [(75.0, 1.0, -1), (3.0, 1.5, 1), (0.02, 2.0, -1)]:
        fit = loglog_fit(ETAS, sign * c * ETAS**p)
        assert fit.slope == pytest.approx(p, abs=1e-12)  # exact data: only float rounding of log()
        assert fit.intercept == pytest.approx(math.log(c), abs=1e-10)
        assert fit.r2 == pytest.approx(1.0, abs=1e-12)
        assert fit.sign == sign
        np.testing.assert_allclose(fit.predict(ETAS), sign * c * ETAS**p, rtol=1e-10)


def test_slope_standard_error_and_r2_match_numpys_least_squares_on_noisy_data():
    rng = np.random.default_rng(0)
    dh = 5.0 * ETAS * np.exp(rng.normal(0.0, 0.2, len(ETAS)))  # log-normal noise around a line
    fit = loglog_fit(ETAS, dh)
    (slope, intercept), cov = np.polyfit(np.log(ETAS), np.log(dh), 1, cov=True)  # cov scaled by SS_res / (n - 2)
    assert fit.slope == pytest.approx(slope, rel=1e-10)
    assert fit.intercept == pytest.approx(intercept, rel=1e-10)
    assert fit.slope_se == pytest.approx(math.sqrt(cov[0, 0]), rel=1e-8)
    resid = np.log(dh) - (slope * np.log(ETAS) + intercept)
    r2 = 1 - (resid**2).sum() / ((np.log(dh) - np.log(dh).mean()) ** 2).sum()
    assert fit.r2 == pytest.approx(r2, rel=1e-10)
    assert 0.9 < fit.r2 < 1.0  # the noise is visible, the line still dominates over 3.5 decades


def test_fit_refuses_a_sign_change_zero_or_a_single_point():
    with pytest.raises(ValueError, match="changes sign"):
        loglog_fit(ETAS[:3], [1e-3, -2e-3, 3e-3])
    with pytest.raises(ValueError, match="non-zero"):
        loglog_fit(ETAS[:3], [1e-3, 0.0, 3e-3])
    with pytest.raises(ValueError, match="at least 2"):
        loglog_fit(ETAS[:1], [1e-3])


# ---------------------------------------------------------------------------------------------
# agreement with first order, linear regime, departure


def test_exactly_linear_data_agrees_everywhere_and_fits_slope_one():
    s = -75.0
    r = analyse_part("grad", ETAS, s * ETAS, 0.01 * np.abs(s * ETAS), first_order=s)
    assert all(r.agrees) and r.n_linear == len(ETAS)
    assert r.departure_eta is None and r.departure_reason is None
    assert r.last_linear_eta == pytest.approx(ETAS[-1])
    assert r.fit.slope == pytest.approx(1.0, abs=1e-12) and r.fit.r2 == pytest.approx(1.0, abs=1e-12)
    assert r.fit.intercept == pytest.approx(math.log(75.0), abs=1e-10)
    assert r.decades == pytest.approx(math.log10(ETAS[-1] / ETAS[0]))
    np.testing.assert_allclose(r.local_slopes, 1.0, atol=1e-10)


def test_quadratic_departure_is_found_at_the_first_eta_past_ten_percent():
    s, q = -75.0, 2.0e5  # relative gap |q eta / s| reaches 10% at eta* = 0.1 * 75 / 2e5 = 3.75e-5
    dh = s * ETAS + q * ETAS**2
    r = analyse_part("full", ETAS, dh, None, first_order=s)  # no SE: only the 10% test
    eta_star = 0.1 * abs(s) / q
    expected = ETAS[ETAS > eta_star][0]
    assert r.departure_eta == pytest.approx(expected)
    assert r.departure_reason == "relative"
    assert r.n_linear == int((ETAS <= eta_star).sum())
    assert all(r.agrees[: r.n_linear]) and not r.agrees[r.n_linear]
    np.testing.assert_allclose(r.relative_gap, q * ETAS / abs(s), rtol=1e-9)
    # the fit only sees the linear regime, where the quadratic term is < 10%: slope within 0.1 of 1
    assert r.fit is not None and abs(r.fit.slope - 1.0) < 0.1


def test_a_gap_of_more_than_three_se_departs_even_below_ten_percent():
    s = 10.0
    dh = s * ETAS * (1 + 0.05 * (ETAS >= ETAS[6]))  # 5% off from the 7th eta on
    se = 0.01 * np.abs(s * ETAS)  # 1% SE: a 5% gap is 5 SE
    r = analyse_part("grad", ETAS, dh, se, first_order=s)
    assert r.departure_eta == pytest.approx(ETAS[6]) and r.departure_reason == "se"
    assert r.gap_in_se[6] == pytest.approx(5.0, rel=1e-9)


def test_a_large_se_does_not_hide_a_gap_above_ten_percent():
    s = 10.0
    dh = s * ETAS * (1 + 0.2 * (ETAS >= ETAS[4]))  # 20% off from the 5th eta on
    se = 10.0 * np.abs(s * ETAS)  # huge SEs: the SE test never fires
    r = analyse_part("grad", ETAS, dh, se, first_order=s)
    assert r.departure_eta == pytest.approx(ETAS[4]) and r.departure_reason == "relative"


def test_criteria_are_configurable():
    s, q = -75.0, 2.0e5
    dh = s * ETAS + q * ETAS**2
    loose = analyse_part("full", ETAS, dh, None, first_order=s, criteria=LinearityCriteria(rel_tol=0.5))
    eta_star = 0.5 * abs(s) / q
    assert loose.departure_eta == pytest.approx(ETAS[ETAS > eta_star][0])
    with pytest.raises(ValueError, match="rel_tol"):
        LinearityCriteria(rel_tol=0.0)


def test_without_first_order_the_smallest_eta_sets_the_line():
    dh = 4.0 * ETAS * (1 + 0.3 * (ETAS >= ETAS[8]))
    r = analyse_part("baseline", ETAS, dh, None, first_order=None)
    assert r.reference == "smallest_eta" and r.reference_slope == pytest.approx(4.0)
    assert r.departure_eta == pytest.approx(ETAS[8]) and r.n_linear == 8


def test_a_non_finite_delta_h_ends_the_linear_regime_and_etas_are_sorted():
    dh = list(2.0 * ETAS)
    dh[5] = None  # e.g. the weights overflowed
    order = np.arange(len(ETAS))[::-1]  # given in descending order
    r = analyse_part("full", ETAS[order], [dh[i] for i in order], None, first_order=2.0)
    assert r.etas == sorted(r.etas)
    assert r.departure_eta == pytest.approx(ETAS[5]) and r.departure_reason == "non-finite"


def test_fewer_linear_points_than_min_points_gives_no_fit():
    s = 1.0
    dh = s * ETAS * 2.0  # 100% off everywhere
    r = analyse_part("full", ETAS, dh, None, first_order=s)
    assert r.n_linear == 0 and r.fit is None and r.last_linear_eta is None and r.departure_eta == pytest.approx(ETAS[0])


# ---------------------------------------------------------------------------------------------
# run directories and the command line


def _summary(etas: np.ndarray, status: str = "complete") -> dict:
    s, q = -75.0, 2.0e5

    def part(scale: float) -> dict:
        dh = scale * (s * etas + q * etas**2)
        return {
            "delta_h": dh.tolist(),
            "se": (0.02 * np.abs(dh)).tolist(),
            "delta_h_per_token": (dh / 2).tolist(),
            "se_per_token": (0.02 * np.abs(dh) / 2).tolist(),
            "first_order": scale * s,
            "first_order_per_token": scale * s / 2,
            "ess_fraction": np.linspace(1.0, 0.2, len(etas)).tolist(),
            "linear_radius": 0.2 * 75 / (2 * q),
        }

    parts = {"full": part(1.0), "grad": part(0.5)}
    return {
        "schema_version": 1,
        "plan": {"etas": etas.tolist(), "integrand": "token_entropy", "reference_eta": 3e-4, "n_eval_sequences": [64]},
        "aggregate": parts,
        "evals": [
            {"name": "eval_00", "n_sequences": 64, "parts": parts},
            {"name": "eval_01", "n_sequences": 32, "parts": {"full": part(-1.0)}},
        ],
        "status": status,
    }


@pytest.fixture()
def run_dir(tmp_path: Path) -> Path:
    d = tmp_path / "runs" / "synthetic"
    d.mkdir(parents=True)
    (d / "summary.json").write_text(json.dumps(_summary(ETAS)))
    return d


def test_cli_writes_analysis_json_and_plot_for_a_run_directory(run_dir: Path, capsys):
    assert main([str(run_dir)]) == 0
    out = capsys.readouterr().out
    assert "| full |" in out and "| grad |" in out
    analysis = json.loads((run_dir / "analysis.json").read_text())
    assert (run_dir / "plots" / "linearity.png").stat().st_size > 10_000
    full = analysis["parts"]["full"]
    eta_star = 0.1 * 75.0 / 2.0e5  # where q eta / s reaches 10%; the 2% SE fires first (gap > 6% of |s eta|)
    expected = ETAS[(2.0e5 * ETAS / 75.0) > 3 * 0.02 * np.abs(1 + 2.0e5 * ETAS / -75.0)][0]
    assert full["departure_eta"] == pytest.approx(expected) and expected < ETAS[ETAS > eta_star][0]
    assert full["reference"] == "first_order" and full["linear_radius"] == pytest.approx(0.2 * 75 / 4e5)
    assert analysis["parts"]["grad"]["departure_eta"] == pytest.approx(
        expected
    )  # scaling Delta H leaves the bend in place
    assert analysis["units"] == "nats per sequence" and analysis["n_sequences"] == 64


def test_cli_per_token_and_eval_selection(run_dir: Path):
    assert main([str(run_dir), "--eval", "1", "--per-token", "--no-plot"]) == 0
    analysis = json.loads((run_dir / "analysis_eval_01_per_token.json").read_text())
    assert analysis["eval"] == "eval_01" and list(analysis["parts"]) == ["full"]
    assert analysis["parts"]["full"]["reference_slope"] == pytest.approx(75.0 / 2)
    assert not (run_dir / "plots").exists()


def test_analyse_summary_matches_analyse_part_on_the_same_numbers(run_dir: Path):
    summary = json.loads((run_dir / "summary.json").read_text())
    a = analyse_summary(summary)["parts"]["full"]
    p = summary["aggregate"]["full"]
    b = analyse_part("full", summary["plan"]["etas"], p["delta_h"], p["se"], first_order=p["first_order"]).to_dict()
    assert a["departure_eta"] == b["departure_eta"] and a["fit"] == b["fit"]


def test_cli_reports_a_directory_without_summary_json_clearly(tmp_path: Path, capsys):
    (tmp_path / "empty").mkdir()
    assert main([str(tmp_path / "empty")]) == 2
    err = capsys.readouterr().err
    assert "no summary.json" in err and "python -m probe predict" in err
    with pytest.raises(FileNotFoundError, match="summary.json"):
        analyse_run(tmp_path / "empty")
    assert main([str(tmp_path / "missing")]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_cli_rejects_an_out_of_range_eval_and_unknown_parts(run_dir: Path, capsys):
    assert main([str(run_dir), "--eval", "5", "--no-write"]) == 2
    assert "--eval between 0 and 1" in capsys.readouterr().err
    assert main([str(run_dir), "--parts", "nope", "--no-write"]) == 2
    assert "not in the run" in capsys.readouterr().err


def test_python_dash_m_probe_analyze_dispatches_before_lightning_cli(run_dir: Path):
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    proc = subprocess.run(
        [sys.executable, "-m", "probe", "analyze", str(run_dir), "--no-plot"],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    assert "| full |" in proc.stdout and (run_dir / "analysis.json").is_file()


def _broken(summary: dict, path: str, value) -> dict:
    """``summary`` with the dotted ``path`` set to ``value`` (``DELETE``: removed)."""
    keys = path.split(".")
    node = summary
    for key in keys[:-1]:
        node = node[int(key)] if isinstance(node, list) else node[key]
    last = int(keys[-1]) if isinstance(node, list) else keys[-1]
    if value is DELETE:
        del node[last]
    else:
        node[last] = value
    return summary


DELETE = object()
SUMMARY_FIX = (
    "Fix: pass the directory of a finished `python -m probe predict` run; if this run finished, its summary.json was "
    "edited or damaged since: rerun it (same config, a new run.name) to write it again"
)


@pytest.mark.parametrize(
    "text, message",
    [
        ('{"plan": {"etas": [0.001', r"is not valid JSON \(Expecting .*\), so it cannot be analysed: it was cut off"),
        ("[1, 2]", r"holds a list of 2 values, not the JSON object a probe run writes"),
        (("plan", DELETE), r"has no 'plan' \(the run's plan, with the etas it swept\)"),
        (("plan.etas", DELETE), r"has no plan.etas \(the step sizes the run swept\)"),
        (("plan.etas", "0.001"), r"has plan.etas = the string '0.001', not a non-empty list of numbers"),
        (("evals", DELETE), None),  # the older 'aggregate' is still read
        (("evals", {}), r"has 'evals' = an object, not a list \(one entry per evaluation batch\)"),
        (("evals.1.parts", DELETE), r"has no evals\[1\].parts \(the results per part\)"),
        (("evals.0.parts", {}), r"has no part in evals\[0\].parts \(an empty object: no results per part\)"),
        (("evals.0.parts.full.delta_h", DELETE), r"has no evals\[0\].parts.full.delta_h \(the measured entropy "),
        (
            ("evals.0.parts.grad.se", [0.1, 0.2]),
            r"has evals\[0\].parts.grad.se = a list of 2 values, not a list of 12 numbers",
        ),
        (
            ("evals.0.parts.full.delta_h.3", "n/a"),
            r"has evals\[0\].parts.full.delta_h\[3\] = the string 'n/a', not a number or null",
        ),
        (
            ("evals.0.parts.full.first_order", True),
            r"has evals\[0\].parts.full.first_order = the boolean true, not a num",
        ),
    ],
)
def test_a_malformed_summary_names_the_file_and_what_is_missing_and_exits_1(run_dir: Path, capsys, text, message):
    path = run_dir / "summary.json"
    if isinstance(text, tuple):
        summary = _broken(json.loads(path.read_text()), *text)
        text = json.dumps(summary)
    path.write_text(text)
    status = main([str(run_dir), "--no-write"])
    err = capsys.readouterr().err
    if message is None:
        assert status == 0, err
        return
    assert status == 1
    assert re.search(f"^probe analyze: error: {re.escape(str(path))} " + message, err), err
    assert err.strip().endswith(SUMMARY_FIX)


def test_neither_evals_nor_aggregate_is_named(run_dir: Path, capsys):
    summary = json.loads((run_dir / "summary.json").read_text())
    del summary["evals"], summary["aggregate"]
    (run_dir / "summary.json").write_text(json.dumps(summary))
    assert main([str(run_dir), "--no-write"]) == 1
    assert "summary.json has no 'evals' (the results per evaluation batch), so it cannot be analysed" in (
        capsys.readouterr().err
    )
    (run_dir / "summary.json").write_text(json.dumps({**summary, "evals": []}))
    assert main([str(run_dir), "--no-write"]) == 1
    assert "summary.json has an empty 'evals' list (the results per evaluation batch)" in capsys.readouterr().err


def test_an_unfinished_run_is_said_to_be_one(run_dir: Path, tmp_path: Path, capsys):
    path = run_dir / "summary.json"
    path.write_text(json.dumps(_summary(ETAS, status="running")))
    assert main([str(run_dir), "--no-write"]) == 0  # its numbers are analysed, with the warning
    err = capsys.readouterr().err
    assert err.startswith(
        f"probe analyze: warning: {path} has status 'running', not 'complete': it is an unfinished run (probe writes "
        "status 'complete' when a run ends), so these numbers may be partial. Fix: finish the run by rerunning its "
        "command (same run.name), then analyze it again"
    )
    summary = _summary(ETAS, status="running")
    del summary["plan"]
    path.write_text(json.dumps(summary))
    assert main([str(run_dir), "--no-write"]) == 1
    err = capsys.readouterr().err
    assert "has no 'plan' (the run's plan, with the etas it swept), so it cannot be analysed. Its status is " in err
    assert "'running', not 'complete': it is an unfinished run" in err
