"""Teacher forcing: per-token log-probs and full-vocabulary entropies of a batch.

Differentiable (used for the update's gradient and for forward-mode JVPs) and usable
under parameter overrides through ``torch.func.functional_call``. The log-softmax head
runs in float64 on chunks of response tokens, so no ``[B, T, V]`` float64 tensor is
ever built (docs/DESIGN.md section 8: a float64 head costs ~1.07x a forward and cuts the
error of log-prob differences 7-10x). How a batch is teacher-forced is one settings object,
:class:`TeacherForcing`, passed whole to every function that forces sequences.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Mapping

import torch
from torch import Tensor
from torch.func import functional_call

from probe.batch import SequenceBatch


@dataclass(frozen=True)
class TeacherForcing:
    """How sequences are teacher-forced.

    Args:
        temperature: tau; log-probs and entropies are those of ``logits / tau`` (the temperature E was sampled at).
        with_entropy: also compute full-vocabulary token entropies (the ``token_entropy`` integrand).
        head_dtype: precision of the log-softmax head (None: the logits' own dtype).
        token_chunk: response tokens per chunk of the head (bounds the upcast copy of the logits).
        batch_size: sequences per forward pass where a batch is processed in chunks (None: all at once).
    """

    temperature: float = 1.0
    with_entropy: bool = False
    head_dtype: torch.dtype | None = torch.float64
    token_chunk: int = 4096
    batch_size: int | None = 256

    def __post_init__(self) -> None:
        if not (self.temperature > 0):
            raise ValueError(f"teacher-forcing temperature must be > 0, got {self.temperature}")
        if self.token_chunk < 1:
            raise ValueError(f"token_chunk must be >= 1 (response tokens per head chunk), got {self.token_chunk}")
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
    token_chunk: int = 4096,
) -> tuple[Tensor, Tensor | None]:
    """log p(target) and entropy H = logsumexp(z) - sum softmax(z) z, with z = logits / temperature.

    ``dtype`` is the head's precision (None keeps the logits' dtype). Work is done on
    chunks of ``token_chunk`` rows so the upcast copy stays small.
    """
    logps, ents = [], []
    for start in range(0, logits.shape[0], max(1, token_chunk)):
        z = logits[start : start + token_chunk]  # [n, V]
        if dtype is not None:
            z = z.to(dtype)
        if temperature != 1.0:
            z = z / temperature
        lse = torch.logsumexp(z, dim=-1)  # [n]
        zt = z.gather(-1, targets[start : start + token_chunk, None]).squeeze(-1)  # [n]
        logps.append(zt - lse)
        if with_entropy:
            p = torch.softmax(z, dim=-1)  # [n, V]
            ents.append(lse - (p * z).sum(-1))
    if not logps:  # no scored tokens at all
        empty = logits.new_zeros(0, dtype=dtype or logits.dtype)
        return empty, (empty if with_entropy else None)
    logp = torch.cat(logps)
    return logp, (torch.cat(ents) if with_entropy else None)


def _forward_logits(model: torch.nn.Module, batch: SequenceBatch) -> Tensor:
    out = model(
        input_ids=batch.input_ids, attention_mask=batch.attention_mask, position_ids=batch.position_ids, use_cache=False
    )
    return out.logits if hasattr(out, "logits") else out[0]


def teacher_force(
    model: torch.nn.Module,
    batch: SequenceBatch,
    params: Mapping[str, Tensor] | None = None,
    forcing: TeacherForcing = TeacherForcing(),
) -> TokenStats:
    """Teacher-force ``batch`` through ``model`` in one pass (optionally with ``params`` overriding
    some of ``model.named_parameters()``; the model itself is never mutated).

    Returns per-token log-probs (and entropies when ``forcing.with_entropy``) aligned with
    ``batch.targets``. Gradients and forward-mode tangents flow through unless the caller disables them.
    """
    if params:
        logits = functional_call(
            model,
            dict(params),
            args=(),
            kwargs=dict(
                input_ids=batch.input_ids,
                attention_mask=batch.attention_mask,
                position_ids=batch.position_ids,
                use_cache=False,
            ),
            strict=False,
        )
        logits = logits.logits if hasattr(logits, "logits") else logits[0]
    else:
        logits = _forward_logits(model, batch)  # [B, T, V]
    mask = batch.target_mask.to(logits.device)  # [B, T-1]
    scored = logits[:, :-1][mask]  # [N, V]
    targets = batch.targets.to(logits.device)[mask]  # [N]
    logp, ent = token_logprobs_and_entropy(
        scored,
        targets,
        temperature=forcing.temperature,
        with_entropy=forcing.with_entropy,
        dtype=forcing.head_dtype,
        token_chunk=forcing.token_chunk,
    )
    out_dtype = logp.dtype
    zeros = torch.zeros(mask.shape, dtype=out_dtype, device=logits.device)
    logprobs = zeros.masked_scatter(mask, logp)
    entropies = zeros.masked_scatter(mask, ent) if ent is not None else None
    return TokenStats(logprobs=logprobs, mask=mask, entropies=entropies)
