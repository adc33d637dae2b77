"""The realised entropy change of a live step, measured on fresh samples of the old and the new policy, and the
z-scores of the predictions against it (docs/DESIGN.md section 6, "A live step").

Two pairings of the samples:

* ``common_random_numbers`` (the live probe's default): row r of the old sample and row r of the new one are drawn
  with the same uniforms (inverse-CDF sampling, :func:`probe.sampling.common_uniforms`), same prompt, same
  position. Each marginal is exactly its policy's, so the per-row differences d_r = h_new_r - h_old_r are unbiased
  for H(new) - H(old); the rows coincide wherever the two CDFs put the uniforms in the same bins, which after one
  small step is most rows, so d_r is ~0 there and the SE (the sample std of d over sqrt(R)) is many times smaller
  than that of two independent samples.
* ``independent``: two independent samples; SE = hypot(se_old, se_new).

The record says which (``pairing``), and always carries ``se_independent`` (hypot of the marginals' SEs: the SE
two independent samples of these sizes would have) next to ``se``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Sequence

from torch import Tensor

from probe.results import PartResult
from probe.statistics import SequenceStats, mean_and_se, ratio_and_se

PAIRINGS = ("common_random_numbers", "independent")


def check_pairing(name: str) -> None:
    if name not in PAIRINGS:
        raise ValueError(
            f"unknown realised_pairing {name!r}; choose one of {', '.join(PAIRINGS)} (common_random_numbers: the old "
            "and the new policy sampled with the same uniforms, row by row; independent: two independent samples)"
        )


@dataclass
class RealisedChange:
    """H(new) - H(old) measured on fresh samples of the old and the new policy (paired or independent)."""

    delta_h: float  # nats per sequence
    se: float  # paired: std(h_new - h_old) / sqrt(R); independent: hypot(se_old, se_new)
    delta_h_per_token: float  # sum h_new / sum T_new - sum h_old / sum T_old
    se_per_token: float  # the delta method over the rows (jointly over old and new when paired)
    old: dict[str, float]  # mean, se, n
    new: dict[str, float]
    pairing: str = "independent"  # common_random_numbers or independent
    se_independent: float = math.nan  # hypot(se_old, se_new): the SE of two independent samples of these sizes
    se_per_token_independent: float = math.nan
    se_gain: float = math.nan  # se_independent / se: how many times smaller the SE is thanks to the pairing
    identical_fraction: float | None = None  # paired: rows whose responses are the same before and after the step
    z: dict[str, float] = field(default_factory=dict)  # (prediction - realised) / combined SE, per predictor


def paired_difference_and_se(h_old: Tensor, h_new: Tensor) -> tuple[float, float]:  # [R], [R]
    """mean(h_new - h_old) and its SE, std(h_new - h_old) / sqrt(R), of paired rows (NaN with one row)."""
    _check_paired(len(h_old), len(h_new))
    return mean_and_se(h_new.double() - h_old.double())


def paired_ratio_difference_and_se(
    h_old: Tensor,  # [R]
    T_old: Tensor,  # [R]
    h_new: Tensor,  # [R]
    T_new: Tensor,  # [R]
) -> tuple[float, float]:
    """The change of the per-token entropy, sum h_new / sum T_new - sum h_old / sum T_old, and its delta-method SE
    over the paired rows: the two ratios are smooth functions of the row means of (h_new, T_new, h_old, T_old), so
    the influence of row r is psi_r = (h_new_r - r_new T_new_r) / mean T_new - (h_old_r - r_old T_old_r) /
    mean T_old, and SE = std(psi) / sqrt(R) (NaN with one row)."""
    _check_paired(len(h_old), len(h_new))
    h_old, T_old, h_new, T_new = (x.double() for x in (h_old, T_old, h_new, T_new))
    r_old, r_new = h_old.sum() / T_old.sum(), h_new.sum() / T_new.sum()
    psi = (h_new - r_new * T_new) / T_new.mean() - (h_old - r_old * T_old) / T_old.mean()  # [R]
    n = psi.numel()
    se = float(psi.std(unbiased=True) / math.sqrt(n)) if n > 1 else math.nan
    return float(r_new - r_old), se


def identical_fraction(old: Sequence[Sequence[int]], new: Sequence[Sequence[int]]) -> float:
    """The fraction of paired rows whose sampled responses are the same token for token."""
    _check_paired(len(old), len(new))
    return sum(list(a) == list(b) for a, b in zip(old, new)) / max(len(old), 1)


def _check_paired(n_old: int, n_new: int) -> None:
    if n_old != n_new:
        raise ValueError(
            f"paired samples need one new row per old row, got {n_old} old and {n_new} new: sample both with the "
            "same prompts, responses per prompt and uniforms"
        )
    if n_old == 0:
        raise ValueError("the realised change of an empty sample is undefined; sample at least one sequence")


def realised_change(
    old: SequenceStats,
    new: SequenceStats,
    integrand: str,
    predicted: PartResult | None = None,
    at: int = 0,
    eta: float = math.nan,
    pairing: str = "independent",
    identical: float | None = None,
) -> RealisedChange:
    """The realised entropy change of one step, and the z-scores against it of the predictions at the real step
    (eta index ``at``, step size ``eta``): ``snis`` (+- its SE), ``first_order`` (+- eta x its SE) and
    ``second_order`` (no SE).

    Args:
        old, new: the statistics of the samples of pi_old and pi_new (each at its own policy).
        integrand: ``token_entropy`` or ``logprob``.
        predicted: the ``full`` part of the step's prediction (None: no z-scores).
        pairing: ``common_random_numbers`` (row r of ``old`` and of ``new`` drawn with the same uniforms: the
            paired estimator) or ``independent``.
        identical: with pairing, the fraction of rows whose responses did not change (:func:`identical_fraction`).
    """
    check_pairing(pairing)
    h_old, h_new = old.integrand(integrand), new.integrand(integrand)
    mean_old, se_old = mean_and_se(h_old)
    mean_new, se_new = mean_and_se(h_new)
    tok_old, tok_se_old = ratio_and_se(h_old, old.lengths)
    tok_new, tok_se_new = ratio_and_se(h_new, new.lengths)
    se_independent, se_per_token_independent = math.hypot(se_old, se_new), math.hypot(tok_se_old, tok_se_new)
    if pairing == "common_random_numbers":
        delta_h, se = paired_difference_and_se(h_old, h_new)
        delta_per_token, se_per_token = paired_ratio_difference_and_se(h_old, old.lengths, h_new, new.lengths)
    else:
        delta_h, se = mean_new - mean_old, se_independent
        delta_per_token, se_per_token = tok_new - tok_old, se_per_token_independent
    out = RealisedChange(
        delta_h=delta_h,
        se=se,
        delta_h_per_token=delta_per_token,
        se_per_token=se_per_token,
        old={"mean": mean_old, "se": se_old, "n": len(h_old)},
        new={"mean": mean_new, "se": se_new, "n": len(h_new)},
        pairing=pairing,
        se_independent=se_independent,
        se_per_token_independent=se_per_token_independent,
        se_gain=se_independent / se if se > 0 else math.nan,
        identical_fraction=identical if pairing == "common_random_numbers" else None,
    )
    if predicted is not None:
        out.z = z_scores(predicted, at, eta, out.delta_h, out.se)
    return out


def z_scores(predicted: PartResult, at: int, eta: float, realised: float, realised_se: float) -> dict[str, float]:
    """(prediction - realised) / hypot(realised SE, prediction SE) per predictor at the real step (eta index ``at``):
    ``snis``, ``first_order`` (SE: eta x the slope's SE), ``second_order`` (no SE). A prediction or an SE that is
    not finite, or a combined SE of 0, gives NaN."""
    candidates = {"snis": (predicted.delta_h[at], predicted.se[at])}
    if predicted.predicted_first is not None:
        candidates["first_order"] = (predicted.predicted_first[at], abs(eta) * (predicted.first_order_se or math.nan))
    if predicted.predicted_second is not None:
        candidates["second_order"] = (predicted.predicted_second[at], 0.0)
    out: dict[str, float] = {}
    for key, (value, value_se) in candidates.items():
        value_se = value_se if math.isfinite(value_se) else 0.0
        combined = math.hypot(realised_se, value_se)
        usable = value is not None and math.isfinite(value) and combined > 0
        out[key] = (value - realised) / combined if usable else math.nan
    return out
