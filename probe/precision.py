"""Numerical precision: dtype names, the attention kernel of forward-mode AD, autocast, float64 norms.

* :func:`resolve_dtype` / :func:`dtype_name`: the one table of dtype names settings may use.
* :func:`math_attention`: forward-mode AD (``torch.func.jvp``) has no rule for the flash and
  memory-efficient SDPA kernels, so every JVP runs under the MATH kernel (matches eager to ~2e-6).
* :func:`autocast`: ``torch.autocast`` for a dtype, or nothing for None.
* :func:`exact_float64_norms`: HF's RMSNorm casts its input to float32 and back, so a float64
  model is only float32-exact there; this makes RMSNorm keep float64 inputs in float64 (float32
  and lower-precision inputs keep HF's own behaviour). Use a float64 model with SDPA (or eager)
  attention for the tightest checks.
"""

from __future__ import annotations

import contextlib
import types

import torch
from torch import nn

DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "float": torch.float32,
    "float64": torch.float64,
    "fp64": torch.float64,
    "double": torch.float64,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
    "half": torch.float16,
}


def resolve_dtype(dtype: str | torch.dtype | None) -> torch.dtype | None:
    """A torch dtype from a name such as ``"bfloat16"`` or ``"torch.float32"`` (None stays None)."""
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    key = str(dtype).lower().removeprefix("torch.")
    if key not in DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; use one of float32, bfloat16, float16, float64")
    return DTYPES[key]


def dtype_name(dtype: torch.dtype | None) -> str | None:
    """``"float32"`` for ``torch.float32`` (None stays None): the inverse of :func:`resolve_dtype`."""
    return None if dtype is None else str(dtype).removeprefix("torch.")


def math_attention() -> contextlib.AbstractContextManager:
    """Select the SDPA kernel that supports forward-mode AD (flash/efficient kernels lack JVP rules)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    return sdpa_kernel([SDPBackend.MATH])


def autocast(device: torch.device, dtype: torch.dtype | None) -> contextlib.AbstractContextManager:
    """``torch.autocast`` on ``device`` with ``dtype``; no autocast when ``dtype`` is None."""
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


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
