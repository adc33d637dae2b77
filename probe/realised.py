"""The realised entropy change of a live step, measured on fresh samples of the old and the new policy, and the
z-scores of the predictions against it (docs/DESIGN.md section 6, "A live step")."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from probe.results import PartResult
from probe.statistics import SequenceStats, mean_and_se, ratio_and_se


@dataclass
class RealisedChange:
    """H(new) - H(old) measured on independent fresh samples of the old and the new policy."""

    delta_h: float
    se: float  # sqrt(se_old^2 + se_new^2): the two samples are independent
    delta_h_per_token: float
    se_per_token: float
    old: dict[str, float]  # mean, se, n
    new: dict[str, float]
    z: dict[str, float] = field(default_factory=dict)  # (prediction - realised) / combined SE, per predictor


def realised_change(
    old: SequenceStats,
    new: SequenceStats,
    integrand: str,
    predicted: PartResult | None = None,
    at: int = 0,
    eta: float = math.nan,
) -> RealisedChange:
    """The realised entropy change of one step, and the z-scores against it of the predictions at the real step
    (eta index ``at``, step size ``eta``): ``snis`` (+- its SE), ``first_order`` (+- eta x its SE) and
    ``second_order`` (no SE)."""
    h_old, h_new = old.integrand(integrand), new.integrand(integrand)
    mean_old, se_old = mean_and_se(h_old)
    mean_new, se_new = mean_and_se(h_new)
    tok_old, tok_se_old = ratio_and_se(h_old, old.lengths)
    tok_new, tok_se_new = ratio_and_se(h_new, new.lengths)
    out = RealisedChange(
        delta_h=mean_new - mean_old,
        se=math.hypot(se_old, se_new),
        delta_h_per_token=tok_new - tok_old,
        se_per_token=math.hypot(tok_se_old, tok_se_new),
        old={"mean": mean_old, "se": se_old, "n": len(h_old)},
        new={"mean": mean_new, "se": se_new, "n": len(h_new)},
    )
    if predicted is None:
        return out
    candidates = {"snis": (predicted.delta_h[at], predicted.se[at])}
    if predicted.predicted_first is not None:
        candidates["first_order"] = (predicted.predicted_first[at], abs(eta) * (predicted.first_order_se or math.nan))
    if predicted.predicted_second is not None:
        candidates["second_order"] = (predicted.predicted_second[at], 0.0)
    for key, (value, value_se) in candidates.items():
        value_se = value_se if math.isfinite(value_se) else 0.0
        out.z[key] = (value - out.delta_h) / math.hypot(out.se, value_se) if math.isfinite(value) else math.nan
    return out
