"""The probe's checks of its own results, each with a verdict and the tolerance it was read against.

* :func:`verify_step`: did the optimizer take the step we reconstructed? The live probe's check after
  each probed step compares the parameters' real change ``p_new - p_old`` with ``lr * full`` element
  by element, in units of the parameters' own rounding (docs/DESIGN.md section 2).
* :func:`attribution_check`: do the attributions add up to the gradient part's first-order slope?
  (docs/DESIGN.md section 5). No Lightning here.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from probe.sharding import local
from probe.update import Update

# The relative rounding of the optimizer step's own arithmetic, c below, for CUDA's fused AdamW kernel
# (``fused=True``, TRL's and transformers' default ``adamw_torch_fused``): measured on an H200 (torch 2.11) 3 to 9.6
# units at c = 1e-6 from Adam's second step on, where the foreach kernel and the CPU's fused one stay below 0.7;
# emulations of its bias corrections in float32 did not reproduce it (benchmarks/gpu_live_check.py). 1e-4 leaves
# a margin of 10; a wrong step (a clip coefficient, a missed or extra step) is off by far more.
FUSED_CUDA_ROUNDING = 1e-4


def step_rounding(optimizer: torch.optim.Optimizer, params: dict[str, Tensor]) -> float | None:
    """The relative rounding :func:`verify_step` allows the optimizer's kernel: :data:`FUSED_CUDA_ROUNDING` for a
    fused kernel on CUDA parameters, None (the dtype's default) otherwise."""
    fused = bool(optimizer.defaults.get("fused")) or any(g.get("fused") for g in optimizer.param_groups)
    on_cuda = any(p.is_cuda for p in params.values())
    return FUSED_CUDA_ROUNDING if fused and on_cuda else None


@torch.no_grad()
def verify_step(
    policy: torch.nn.Module, update: Update, before: dict[str, Tensor], rounding: float | None = None
) -> dict[str, Any]:
    """How far the parameters' real change is from ``lr * full``, in units of their own rounding.

    Per element, in units of ``2 ulp(max(|p_old|, |p_new|)) + c * scale`` with ``c = 1e-12`` for float64
    parameters and ``1e-6`` otherwise (a few roundings of the step's own arithmetic), or ``rounding`` when given
    (:func:`step_rounding`: CUDA's fused kernel):

    * ``max_units``: ``scale = lr * (|baseline| + |grad|)``, the size of the terms AdamW adds up. Its
      float32 arithmetic rounds the momentum and gradient terms before they cancel (``m' = beta1 m +
      (1 - beta1) g``), so where they nearly cancel the step's own error is relative to the terms,
      not to their sum: measured on the toy world, up to 8 ulps of ``|p_new - p_old|``.
    * ``max_units_step_scale``: ``scale = |p_new - p_old|`` (stricter; may exceed 1 where terms cancel).

    Also the largest absolute error, ``max_relative_error`` (the largest error over the largest change
    of the same parameter) and ``relative_error`` (``||lr * full - (p_new - p_old)|| / ||p_new - p_old||``
    over all parameters). Both relative errors are floored by the parameters' own rounding,
    ``ulp(|p|) / |step|`` (float64, |p| ~ 1, lr = 1e-4: ~2e-12).
    """
    named = dict(policy.named_parameters())
    max_units, max_step_units, max_abs, max_rel, worst = 0.0, 0.0, 0.0, 0.0, None
    error_sq = change_sq = 0.0
    for n, full in update.full.items():  # (a sharded policy: this rank's rows, as it holds them)
        full = local(full)
        p_old, p_new = local(before[n]), local(named[n].detach())
        if p_new.numel() == 0:  # a shard with no rows of this parameter
            continue
        device = p_new.device
        actual = p_new.double() - p_old.double()
        predicted = full.to(device=device, dtype=torch.float64) * update.lr
        error = (predicted - actual).abs()
        magnitude = torch.maximum(p_old.abs(), p_new.abs())
        ulp = (torch.nextafter(magnitude, torch.full_like(magnitude, math.inf)) - magnitude).double()
        c = rounding if rounding is not None else 1e-12 if p_new.dtype == torch.float64 else 1e-6
        terms = (
            local(update.baseline[n]).to(device=device, dtype=torch.float64).abs()
            + local(update.grad[n]).to(device=device, dtype=torch.float64).abs()
        ) * update.lr
        units = float((error / (2 * ulp + c * terms)).max())
        max_step_units = max(max_step_units, float((error / (2 * ulp + c * actual.abs())).max()))
        if worst is None or units > max_units:
            max_units, worst = units, n
        error_sq, change_sq = error_sq + float(error.pow(2).sum()), change_sq + float(actual.pow(2).sum())
        max_abs = max(max_abs, float(error.max()))
        max_rel = max(max_rel, float(error.max() / actual.abs().max().clamp(min=1e-300)))
    return {
        "max_units": max_units,
        "max_units_step_scale": max_step_units,
        "max_abs_error": max_abs,
        "max_relative_error": max_rel,
        "relative_error": math.sqrt(error_sq / max(change_sq, 1e-300)),
        "worst_parameter": worst,
        "ok": max_units <= 1.0,
        "n_parameters": len(update.full),
        "step_rounding": rounding,  # None: the dtype's (1e-12 float64, 1e-6 otherwise)
    }


# Agreement expected between two float routes to the same derivative, by the policy's dtype. Rounding gives
# differences near the unit roundoff u times the conditioning: measured 1.5e-8 to 1.1e-6 of the scale on the toy
# world and ~1e-4 on a real float32 checkpoint, so float32 gets 1e-3; float64 (u = 1.1e-16) 1e-8; half precision
# (bfloat16 u = 3.9e-3) 5e-2. A defect (a sequence left out of one side, a wrong normaliser) gives
# differences of the order of one sequence's share, 1/N of the scale: caught for any N below 1/tolerance.
ATTRIBUTION_TOLERANCE = {torch.float64: 1e-8, torch.float32: 1e-3, torch.bfloat16: 5e-2, torch.float16: 5e-2}


def attribution_check(total: float, slope: float, abs_sum: float, dtype: torch.dtype) -> dict[str, Any]:
    """Compare ``sum_i a_i`` with the gradient part's slope against a scale that cannot cancel.

    ``sum_i a_i`` may nearly cancel (0.49 against ``sum_i |a_i|`` = 166 on a real checkpoint), so the
    difference is read against ``max(sum_i |a_i|, |slope|)``, and compared with the tolerance of the policy's
    ``dtype`` (:data:`ATTRIBUTION_TOLERANCE`).

    Returns ``scaled_difference``, ``tolerance`` and ``ok``.
    """
    scale = max(abs(abs_sum), abs(slope))
    difference = abs(total - slope)
    scaled = 0.0 if difference == 0 else difference / scale if scale > 0 else math.inf
    tolerance = ATTRIBUTION_TOLERANCE.get(dtype, ATTRIBUTION_TOLERANCE[torch.float32])
    return {"scaled_difference": scaled, "tolerance": tolerance, "ok": bool(scaled <= tolerance)}
