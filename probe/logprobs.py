"""Teacher forcing: per-token log-probs and full-vocabulary entropies of a batch.

Differentiable (used for the update's gradient and for forward-mode JVPs) and usable
under parameter overrides through ``torch.func.functional_call``. The log-softmax head
(``probe.head``) runs in float64 on chunks of response tokens sized to a memory budget, and
where the model's head is a plain linear layer the logits themselves are made chunk by chunk
from the final hidden states of the response positions: no ``[B, T, V]`` tensor is ever built
(docs/DESIGN.md section 8). How a batch is teacher-forced is one settings object,
:class:`TeacherForcing`, passed whole to every function that forces sequences.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Mapping

import torch
from torch import Tensor, nn
from torch.func import functional_call

from probe.batch import SequenceBatch
from probe.head import MIB, head_statistics, linear_head
from probe.precision import autocast
from probe.sharding import sharded_view


@dataclass(frozen=True)
class TeacherForcing:
    """How sequences are teacher-forced.

    Args:
        temperature: tau; log-probs and entropies are those of ``logits / tau`` (the temperature E was sampled at).
        with_entropy: also compute full-vocabulary token entropies (the ``token_entropy`` integrand).
        head_dtype: precision of the log-softmax head (None: the logits' own dtype).
        head_budget_mib: MiB the head's ``[tokens, V]`` temporaries may take at once (logits, their float64
            copy, exp; with tangents under a JVP), whatever the vocabulary and the number of tokens.
        batch_size: sequences per forward pass where a batch is processed in chunks (None: all at once).
        autocast_dtype: run the model (not the float64 head) under ``torch.autocast`` in this dtype (None: no
            autocast of its own; a caller's autocast still applies).
    """

    temperature: float = 1.0
    with_entropy: bool = False
    head_dtype: torch.dtype | None = torch.float64
    head_budget_mib: float = 256.0
    batch_size: int | None = 256
    autocast_dtype: torch.dtype | None = None

    def __post_init__(self) -> None:
        if not (self.temperature > 0):
            raise ValueError(f"teacher-forcing temperature must be > 0, got {self.temperature}")
        if not (self.head_budget_mib > 0):
            raise ValueError(
                f"head_budget_mib must be > 0 (MiB for the log-softmax head's temporaries), got {self.head_budget_mib}"
            )
        if self.batch_size is not None and self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1 sequences (or None: all at once), got {self.batch_size}")

    def for_integrand(self, integrand: str) -> TeacherForcing:
        """The same settings, with entropies exactly when ``integrand`` is ``token_entropy``."""
        return replace(self, with_entropy=integrand == "token_entropy")


@dataclass
class TokenStats:
    """Per-token statistics of a teacher-forced batch, aligned with ``batch.targets``."""

    logprobs: Tensor  # [B, T-1], 0 off the response
    mask: Tensor  # [B, T-1] bool, response targets
    entropies: Tensor | None = None  # [B, T-1], 0 off the response

    @property
    def sequence_logprobs(self) -> Tensor:  # [B]  l_j
        return self.logprobs.sum(-1)

    @property
    def sequence_entropies(self) -> Tensor:  # [B]  sum_t H_t
        if self.entropies is None:
            raise ValueError(
                "entropies were not computed: teacher-force with forcing=TeacherForcing(with_entropy=True)"
            )
        return self.entropies.sum(-1)

    @property
    def lengths(self) -> Tensor:  # [B]  T_j
        return self.mask.sum(-1)


def token_logprobs_and_entropy(
    logits: Tensor,  # [N, V] logits of the N scored positions
    targets: Tensor,  # [N] long
    temperature: float = 1.0,
    with_entropy: bool = False,
    dtype: torch.dtype | None = torch.float64,
    head_budget_mib: float = 256.0,
) -> tuple[Tensor, Tensor | None]:
    """log p(target) and entropy H = logsumexp(z) - sum softmax(z) z, with z = logits / temperature.

    ``dtype`` is the head's precision (None keeps the logits' dtype); the upcast temporaries are made
    in chunks of rows that fit ``head_budget_mib`` (:func:`probe.head.head_statistics`).
    """
    return head_statistics(
        logits,
        targets,
        temperature=temperature,
        with_entropy=with_entropy,
        dtype=dtype,
        budget=int(head_budget_mib * MIB),
    )


class _Forced(nn.Module):
    """``policy`` as a module whose forward teacher-forces a batch (so ``functional_call`` can override its
    parameters, keyed ``policy.<name>``, around the whole computation, chunked head included)."""

    def __init__(self, policy: nn.Module) -> None:
        super().__init__()
        self.policy = policy

    def forward(self, batch: SequenceBatch, forcing: TeacherForcing) -> TokenStats:
        return _teacher_force(self.policy, batch, forcing)


def _teacher_force(
    model: nn.Module, batch: SequenceBatch, forcing: TeacherForcing, whole_model: bool = False
) -> TokenStats:
    inputs = dict(
        input_ids=batch.input_ids, attention_mask=batch.attention_mask, position_ids=batch.position_ids, use_cache=False
    )
    split = None if whole_model else linear_head(model)  # whole_model: the model's own forward, logits and all
    with autocast(batch.input_ids.device, forcing.autocast_dtype):
        if split is not None:
            body, head = split
            out = body(**inputs)
            hidden = out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]  # [B, T, hidden]
            rows = hidden[:, :-1]
        else:
            head = None
            out = model(**inputs)
            rows = out.logits if hasattr(out, "logits") else out[0]  # [B, T, V]
            rows = rows[:, :-1]
    mask = batch.target_mask.to(rows.device)  # [B, T-1]
    scored = rows[mask]  # [N, hidden] or [N, V]
    targets = batch.targets.to(rows.device)[mask]  # [N]
    logp, ent = head_statistics(
        scored,
        targets,
        head,
        temperature=forcing.temperature,
        with_entropy=forcing.with_entropy,
        dtype=forcing.head_dtype,
        budget=int(forcing.head_budget_mib * MIB),
        autocast_dtype=forcing.autocast_dtype,
    )
    zeros = torch.zeros(mask.shape, dtype=logp.dtype, device=rows.device)
    logprobs = zeros.masked_scatter(mask, logp)
    entropies = zeros.masked_scatter(mask, ent) if ent is not None else None
    return TokenStats(logprobs=logprobs, mask=mask, entropies=entropies)


def teacher_force(
    model: nn.Module,
    batch: SequenceBatch,
    params: Mapping[str, Tensor] | None = None,
    forcing: TeacherForcing = TeacherForcing(),
) -> TokenStats:
    """Teacher-force ``batch`` through ``model`` in one pass (optionally with ``params`` overriding
    some of ``model.named_parameters()``; the model itself is never mutated).

    Returns per-token log-probs (and entropies when ``forcing.with_entropy``) aligned with
    ``batch.targets``. Gradients and forward-mode tangents flow through unless the caller disables them.
    """
    view = sharded_view(model)
    if view is not None:  # a sharded policy: gathered one unit at a time (overrides go through the view's values)
        if params:
            raise ValueError(
                "teacher_force takes no parameter overrides on a sharded policy; use probe.sharding.ShardedPolicy"
            )
        if view.active:
            return _teacher_force(model, batch, forcing)
        if torch.is_grad_enabled():  # a trainer's own differentiable pass: FSDP2's forward, gradients reduce-scattered
            return _teacher_force(model, batch, forcing, whole_model=True)
        with view.gathered():
            return _teacher_force(model, batch, forcing)
    if not params:
        return _teacher_force(model, batch, forcing)
    overrides = {f"policy.{name}": tensor for name, tensor in params.items()}
    return functional_call(_Forced(model), overrides, args=(batch, forcing), strict=False)
