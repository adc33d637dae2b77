"""Adam/AdamW optimizer state keyed by parameter name: what the reconstruction needs.

State is tied to parameters by identity (live optimizer) or by the documented param-group
order (files, see ``probe.optim_loading``), never by guessing; shapes are always checked.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any

import torch
from torch import Tensor, nn

from probe.sharding import like


@dataclass
class AdamHyper:
    """Hyperparameters of one param group, as ``torch.optim.Adam``/``AdamW`` store them.

    ``decoupled`` is True for AdamW (``p *= 1 - lr * wd``) and False for Adam with L2 decay
    (``wd * p`` is added to the gradient, after clipping).
    """

    lr: float
    beta1: float = 0.9
    beta2: float = 0.999
    eps: float = 1e-8
    weight_decay: float = 0.0
    amsgrad: bool = False
    decoupled: bool = True

    @classmethod
    def from_param_group(cls, group: dict[str, Any], decoupled: bool) -> AdamHyper:
        """The hyperparameters of a ``param_groups`` entry (live, or from a state dict; tensors are read as floats)."""

        def number(x: Any) -> float:
            return float(x.item() if isinstance(x, Tensor) else x)

        beta1, beta2 = (number(b) for b in group["betas"])
        scalars = {key: number(group[key]) for key in ("lr", "eps", "weight_decay")}
        return cls(**scalars, beta1=beta1, beta2=beta2, amsgrad=bool(group.get("amsgrad", False)), decoupled=decoupled)


@dataclass
class ParamAdamState:
    """Adam moments of one parameter after ``step`` completed steps (step 0: empty state)."""

    step: int = 0
    exp_avg: Tensor | None = None  # m, same shape as the parameter
    exp_avg_sq: Tensor | None = None  # v
    max_exp_avg_sq: Tensor | None = None  # amsgrad's running max of v


@dataclass
class AdamState:
    """Optimizer state and hyperparameters for every parameter the optimizer updates.

    Keys are names as in ``model.named_parameters()``; parameters absent from ``hyper``
    are not trained (frozen, e.g. the base weights under LoRA).
    """

    hyper: dict[str, AdamHyper]
    state: dict[str, ParamAdamState]
    group_of: dict[str, int] = field(default_factory=dict)
    source: str = "live optimizer"
    # what was read or chosen automatically, with where it came from (``summary.json["choices"]``):
    # key -> {"value": ..., "source": "..."}; see probe.optim_loading.load_optimizer_state
    choices: dict[str, dict[str, Any]] = field(default_factory=dict)

    @property
    def names(self) -> list[str]:
        return list(self.hyper)

    @classmethod
    def from_optimizer(cls, optimizer: torch.optim.Optimizer, model: nn.Module) -> "AdamState":
        """Read a live ``torch.optim.Adam``/``AdamW``, mapping its parameters to names by identity."""
        if not isinstance(optimizer, (torch.optim.Adam, torch.optim.AdamW)):
            raise TypeError(f"only torch.optim.Adam and AdamW can be reconstructed, got {type(optimizer).__name__}")
        name_of = {id(p): n for n, p in model.named_parameters()}
        hyper: dict[str, AdamHyper] = {}
        state: dict[str, ParamAdamState] = {}
        group_of: dict[str, int] = {}
        for gi, group in enumerate(optimizer.param_groups):
            if group.get("maximize", False):
                raise ValueError("optimizer uses maximize=True, which probe does not reconstruct; use maximize=False")
            # torch >= 2.x: AdamW has decoupled_weight_decay=True; older AdamW objects lack the key.
            decoupled = bool(group.get("decoupled_weight_decay", isinstance(optimizer, torch.optim.AdamW)))
            h = AdamHyper.from_param_group(group, decoupled)
            for p in group["params"]:
                if id(p) not in name_of:
                    raise ValueError(
                        "the optimizer holds a parameter that is not in model.named_parameters(); "
                        "pass the model the optimizer was built over"
                    )
                n = name_of[id(p)]
                hyper[n], group_of[n] = h, gi
                st = optimizer.state.get(p, {})
                step = st.get("step", 0)
                state[n] = ParamAdamState(
                    step=int(step.item() if isinstance(step, Tensor) else step),
                    exp_avg=st.get("exp_avg"),
                    exp_avg_sq=st.get("exp_avg_sq"),
                    max_exp_avg_sq=st.get("max_exp_avg_sq"),
                )
        return cls(hyper=hyper, state=state, group_of=group_of)

    def laid_out_like(self, params: dict[str, Tensor]) -> "AdamState":
        """This state with each moment laid out like its parameter: this rank's rows of a whole moment (read from a
        full-state file) as a DTensor where the parameter is one (``probe.sharding.like``), unchanged otherwise."""
        state = {}
        for n, st in self.state.items():
            p = params.get(n)
            if p is None:
                state[n] = st
                continue
            state[n] = replace(
                st,
                **{
                    key: like(getattr(st, key), p)
                    for key in ("exp_avg", "exp_avg_sq", "max_exp_avg_sq")
                    if getattr(st, key) is not None
                },
            )
        return replace(self, state=state)
