"""Plots of a run (matplotlib, headless): Delta H vs eta, the attributions against advantage and reward, ESS vs eta."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402


def save_figure(fig: plt.Figure, path: Path) -> Path:
    """Lay out, write (creating the folder) and close a figure."""
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_delta_h(eval_result: dict, etas: list[float], path: Path, title: str = "") -> Path:
    """Delta H (SNIS, +-1 SE) vs eta for each part, with the first- and second-order predictions."""
    fig, ax = plt.subplots(figsize=(9.0, 4.6))
    eta = np.asarray(etas, float)
    dense = np.geomspace(eta.min(), eta.max(), 200) if len(eta) > 1 else eta
    lows, highs = [], []
    for k, (part, res) in enumerate(eval_result["parts"].items()):
        color = f"C{k}"
        dh = np.asarray([np.nan if v is None else v for v in res["delta_h"]], float)
        se = np.asarray([np.nan if v is None else v for v in res["se"]], float)
        ax.errorbar(eta, dh, yerr=se, fmt="o", color=color, capsize=3, label=f"{part} (SNIS +- 1 SE)")
        lows.append(np.nanmin(dh - se) if np.isfinite(dh - se).any() else 0.0)
        highs.append(np.nanmax(dh + se) if np.isfinite(dh + se).any() else 0.0)
        if res.get("first_order") is not None:
            ax.plot(dense, res["first_order"] * dense, "-", color=color, alpha=0.7, lw=1, label=f"{part} 1st order")
        if res.get("second_order") is not None and res.get("first_order") is not None:
            ax.plot(
                dense,
                res["first_order"] * dense + 0.5 * res["second_order"] * dense**2,
                "--",
                color=color,
                alpha=0.7,
                lw=1,
                label=f"{part} 2nd order",
            )
    lo, hi = min(lows + [0.0]), max(highs + [0.0])
    pad = 0.15 * (hi - lo) or 1e-6
    ax.set_ylim(lo - pad, hi + pad)  # the measured points set the scale; predictions may leave it
    ax.set_xscale("log")
    ax.axhline(0.0, color="grey", lw=0.5)
    ax.set_xlabel("eta (learning rate)")
    ax.set_ylabel("Delta H (nats / sequence)")
    ax.set_title(title or "entropy change vs step size")
    ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5))
    return save_figure(fig, path)


def plot_ess(eval_result: dict, etas: list[float], n_samples: int, path: Path) -> Path:
    """Effective sample size of the importance weights vs eta, per part."""
    fig, ax = plt.subplots(figsize=(6.4, 4.0))
    for k, (part, res) in enumerate(eval_result["parts"].items()):
        ax.plot(etas, res["ess"], "o-", color=f"C{k}", label=part)
    ax.axhline(0.1 * n_samples, color="grey", ls=":", label="10% of samples")
    ax.set_xscale("log")
    ax.set_xlabel("eta (learning rate)")
    ax.set_ylabel("ESS")
    ax.set_ylim(0, n_samples * 1.05)
    ax.legend(fontsize=7)
    return save_figure(fig, path)


def plot_attributions(
    attributions: np.ndarray,  # [N] a_i per unit eta
    advantages: np.ndarray,  # [N]
    logprobs: np.ndarray,  # [N] log p of each update sequence's response
    eta: float,
    path: Path,
    reward_attributions: np.ndarray | None = None,  # [N] r_i per unit eta
) -> Path:
    """Each update sequence's first-order share eta * a_i of Delta H against its advantage, coloured by its
    log-probability; beside it, with rewards on E, eta * a_i against its share eta * r_i of Delta R: which sequences
    buy reward at the cost of entropy."""
    panels = 1 if reward_attributions is None else 2
    fig, axes = plt.subplots(1, panels, figsize=(6.4 * panels, 4.4), squeeze=False)
    a = eta * np.asarray(attributions)
    ax = axes[0, 0]
    points = ax.scatter(advantages, a, c=logprobs, cmap="viridis", s=18)
    fig.colorbar(points, ax=ax, label="log p of the response")
    ax.axhline(0.0, color="grey", lw=0.5)
    ax.axvline(0.0, color="grey", lw=0.5)
    ax.set_xlabel("advantage A_i")
    ax.set_ylabel(f"eta * a_i at eta = {eta:.3g} (nats)")
    ax.set_title("per-sequence share of the first-order Delta H")
    if reward_attributions is not None:
        ax = axes[0, 1]
        r = eta * np.asarray(reward_attributions)
        points = ax.scatter(r, a, c=advantages, cmap="coolwarm", s=18)
        fig.colorbar(points, ax=ax, label="advantage A_i")
        ax.axhline(0.0, color="grey", lw=0.5)
        ax.axvline(0.0, color="grey", lw=0.5)
        ax.set_xlabel("eta * r_i (share of Delta R, reward units)")
        ax.set_ylabel("eta * a_i (nats)")
        ax.set_title("entropy vs reward, per update sequence")
    return save_figure(fig, path)


def plot_live(records: list[dict], path: Path) -> Path:
    """Predicted (SNIS at eta = lr +- SE, first and second order) vs realised (+- SE) entropy change per probed step,
    and the verification error in rounding units, from the live probe's records."""
    fig, (ax, ax2) = plt.subplots(2, 1, figsize=(7.0, 6.4), sharex=True, gridspec_kw={"height_ratios": [3, 1]})
    predicted = [
        (r["step"], r["eval"]["parts"]["full"], r["plan"]["etas"].index(r["update"]["lr"]))
        for r in records
        if "eval" in r
    ]

    def at(values: list | None, j: int) -> float:
        return np.nan if values is None or values[j] is None else values[j]

    if predicted:
        steps = [s for s, _, _ in predicted]
        ax.errorbar(
            steps,
            [at(p["delta_h"], j) for _, p, j in predicted],
            yerr=[at(p["se"], j) for _, p, j in predicted],
            fmt="o",
            capsize=3,
            label="predicted (SNIS at eta = lr)",
        )
        ax.plot(steps, [at(p.get("predicted_first"), j) for _, p, j in predicted], "-", alpha=0.7, label="first order")
        ax.plot(
            steps, [at(p.get("predicted_second"), j) for _, p, j in predicted], "--", alpha=0.7, label="second order"
        )
    real = [r for r in records if "realised" in r]
    if real:
        paired = real[0]["realised"].get("pairing") == "common_random_numbers"
        ax.errorbar(
            [r["step"] + 0.15 for r in real],
            [r["realised"]["delta_h"] for r in real],
            yerr=[r["realised"]["se"] for r in real],
            fmt="s",
            capsize=3,
            color="C3",
            label="realised (fresh samples, paired by common uniforms)" if paired else "realised (fresh samples)",
        )
    ax.axhline(0.0, color="grey", lw=0.5)
    ax.set_ylabel("Delta H (nats / sequence)")
    ax.set_title("entropy change per optimizer step: predicted vs realised")
    ax.legend(fontsize=7)
    ver = [r for r in records if "verification" in r]
    if ver:
        ax2.semilogy([r["step"] for r in ver], [max(r["verification"]["max_units_all_ranks"], 1e-6) for r in ver], "o-")
        ax2.axhline(1.0, color="C3", lw=0.8, ls=":")
    ax2.set_ylabel("step error (ulp units)")
    ax2.set_xlabel("optimizer step")
    return save_figure(fig, path)


def plot_covariance_law(records: list[dict], path: Path) -> Path | None:
    """The covariance law of Cui et al. 2025 on a training run: per probed step, the law's prediction -lr Cov(log p, A)
    on U beside probe's exact change at eta = lr (SNIS +- SE, and the first order of the full step and of its gradient
    part); and the exact first-order change against the batch covariance across steps, with their rank correlation.
    None when no record holds the covariance law."""
    laws = [(r["step"], r["eval"]["covariance_law"]) for r in records if r.get("eval", {}).get("covariance_law")]
    if not laws:
        return None
    import torch

    from probe.covariance import rank_correlation

    def value(law: dict, key: str) -> float:
        return np.nan if law.get(key) is None else float(law[key])

    steps = [s for s, _ in laws]
    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(12.0, 4.4))
    se = [
        (r["eval"]["parts"]["full"]["se"][r["plan"]["etas"].index(r["update"]["lr"])] or np.nan)
        for r in records
        if r.get("eval", {}).get("covariance_law")
    ]
    ax.errorbar(steps, [value(law, "delta_h_at_lr") for _, law in laws], yerr=se, fmt="o", capsize=3, label="SNIS")
    ax.plot(steps, [value(law, "first_order_at_lr") for _, law in laws], "-", label="first order, full step")
    ax.plot(steps, [value(law, "grad_first_order_at_lr") for _, law in laws], ":", label="first order, gradient part")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("Delta H at eta = lr (nats / sequence)")
    ax.axhline(0.0, color="grey", lw=0.5)
    twin = ax.twinx()
    twin.plot(steps, [value(law, "law_at_lr") for _, law in laws], "s--", color="C3", alpha=0.7)
    twin.set_ylabel("-lr Cov(log p, A) on U (the law)", color="C3")
    ax.legend(fontsize=7)
    ax.set_title("exact change vs the covariance law, per step")
    cov = np.array([value(law, "batch_mean") for _, law in laws])
    first = np.array([value(law, "first_order_at_lr") for _, law in laws])
    ax2.scatter(cov, first, c=steps, cmap="viridis")
    ax2.axhline(0.0, color="grey", lw=0.5)
    ax2.axvline(0.0, color="grey", lw=0.5)
    ok = np.isfinite(cov) & np.isfinite(first)
    rho = rank_correlation(torch.as_tensor(cov[ok]), torch.as_tensor(first[ok])) if ok.sum() >= 2 else np.nan
    ax2.set_xlabel("Cov(log p, A) on U")
    ax2.set_ylabel("first-order Delta H at eta = lr (nats)")
    ax2.set_title(f"across steps: rank correlation {rho:.2f} (the law: negative)")
    return save_figure(fig, path)
