"""Numerical precision helpers.

HF's RMSNorm casts its input to float32 and back, so a float64 model is only float32-exact
there; :func:`exact_float64_norms` makes RMSNorm keep float64 inputs in float64 (float32
and lower-precision inputs keep HF's own behaviour). Use a float64 model with SDPA (or
eager) attention for the tightest checks.
"""
from __future__ import annotations

import types

import torch
from torch import nn


def _float64_rmsnorm_forward(self: nn.Module, hidden_states: torch.Tensor) -> torch.Tensor:
    if hidden_states.dtype != torch.float64:
        return type(self).forward(self, hidden_states)
    variance = hidden_states.pow(2).mean(-1, keepdim=True)  # [..., 1]
    return self.weight * (hidden_states * torch.rsqrt(variance + self.variance_epsilon))


def exact_float64_norms(model: nn.Module) -> nn.Module:
    """Make every HF RMSNorm of ``model`` compute in float64 when its input is float64. Returns ``model``."""
    for module in model.modules():
        if type(module).__name__.endswith("RMSNorm") and hasattr(module, "variance_epsilon"):
            module.forward = types.MethodType(_float64_rmsnorm_forward, module)
    return model
