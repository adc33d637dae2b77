"""The log-softmax head of teacher forcing within a fixed memory budget, docs/DESIGN.md section 8.

Per scored token the head needs ``log p(target) = z_t - logsumexp(z)`` and, for the ``token_entropy``
integrand, ``H = logsumexp(z) - sum_v softmax(z)_v z_v`` with ``z = logits / tau`` over the whole
vocabulary V. At V = 151,936 one float64 row is 1.2 MB, so the rows are processed in chunks whose
temporaries fit ``budget`` bytes, whatever V and the number of tokens are (:func:`rows_per_chunk`).
Where the model's head is a plain linear layer (:func:`linear_head`), the logits themselves are made
chunk by chunk from the final hidden states, so no ``[tokens, V]`` tensor ever exists.

Three ways a chunk is computed, chosen by what the caller differentiates (same arithmetic, same numbers):

* no autograd, no ``torch.func`` transform (the sweep, base statistics): in place, in two reused float64
  buffers, one ``exp`` per element (:func:`_plain_chunk`); allocating fresh ``[n, V]`` buffers costs more
  than the arithmetic on CPU;
* reverse mode (a loss gradient, G_E, per-sample gradients, also under ``is_grads_batched``): each chunk
  under activation checkpointing, so only its input rows are saved and the chunk is recomputed once in the
  backward pass; the saved memory no longer grows with the number of tokens;
* forward mode (``torch.func.jvp``, which gradient checkpointing does not support): plain differentiable ops,
  chunked.
"""

from __future__ import annotations

import logging
from typing import Callable

import torch
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from probe.precision import autocast

log = logging.getLogger("probe")

MIB = 1 << 20

# [n, V] temporaries alive at once per row of a chunk, counted in head-dtype elements, measured with
# probe.memory.TensorMemory (tests/test_head.py asserts the peak stays within the budget):
BUFFERS_PLAIN = 3  # the logits (model dtype), z and exp(z) (head dtype)
BUFFERS_FORWARD_AD = 10  # per level of torch.func nesting (a JVP of a JVP: 20): every temporary carries tangents
BUFFERS_REVERSE = 8  # the recomputed chunk's saved z, softmax, products and their gradients

# HF causal LMs whose logits are exactly ``lm_head(final hidden state)`` (no soft-capping or logit scale):
PLAIN_HEAD_MODEL_TYPES = frozenset(
    {
        "llama",
        "mistral",
        "mixtral",
        "qwen2",
        "qwen2_moe",
        "qwen3",
        "qwen3_moe",
        "phi3",
        "olmo",
        "olmo2",
        "gpt2",
        "gpt_neox",
        "starcoder2",
    }
)
_SCALED_LOGITS = ("final_logit_softcapping", "logit_scale", "logits_scaling", "output_multiplier_scale")
_warned_types: set[str] = set()


def linear_head(model: nn.Module) -> tuple[nn.Module, nn.Linear] | None:
    """``(body, lm_head)`` when ``model``'s logits are ``lm_head(body(...).last_hidden_state)`` exactly
    (a known HF causal LM, optionally PEFT-wrapped), else None: the caller then forms the full logits."""
    lm = model.get_base_model() if hasattr(model, "get_base_model") else model  # PEFT: the causal LM inside
    config = getattr(lm, "config", None)
    model_type = getattr(config, "model_type", None)
    if model_type not in PLAIN_HEAD_MODEL_TYPES or any(
        getattr(config, key, None) not in (None, 1, 1.0) for key in _SCALED_LOGITS
    ):
        if model_type is not None and model_type not in _warned_types:
            _warned_types.add(model_type)
            log.warning(
                "probe does not know that the logits of model type %r are a plain linear layer of the hidden states, "
                "so teacher forcing forms the full [tokens, vocabulary] logits of each forward batch: lower "
                "probe.forward_batch_size if memory runs short (plain heads: %s)",
                model_type,
                ", ".join(sorted(PLAIN_HEAD_MODEL_TYPES)),
            )
        return None
    head = lm.get_output_embeddings() if hasattr(lm, "get_output_embeddings") else None
    body = getattr(lm, getattr(lm, "base_model_prefix", ""), None)
    if not isinstance(head, nn.Linear) or not isinstance(body, nn.Module):
        return None
    return body, head


def rows_per_chunk(vocab: int, itemsize: int, buffers: int, budget: int) -> int:
    """Rows of ``vocab`` entries such that ``buffers`` temporaries of ``itemsize`` bytes fit ``budget`` bytes
    (at least one row: a budget below one row's temporaries is exceeded by that row)."""
    return max(1, budget // max(1, vocab * itemsize * buffers))


def _transform_depth() -> int:
    """How many ``torch.func`` transforms (jvp, vmap, grad) the caller is inside: 0 outside, 2 in a JVP of a JVP."""
    return torch._C._functorch.maybe_current_level() or 0


def _mode(rows: Tensor, head: nn.Linear | None) -> str:
    if _transform_depth():
        return "transformed"  # (forward mode, or torch.func.grad: no checkpointing under transforms)
    weight_grad = head is not None and any(p.requires_grad for p in head.parameters())
    if torch.is_grad_enabled() and (rows.requires_grad or weight_grad):
        return "reverse"
    return "plain"


def _differentiable_chunk(
    rows: Tensor,  # [n, hidden] or [n, V] logits
    targets: Tensor,  # [n]
    project: Callable[[Tensor], Tensor],
    temperature: float,
    with_entropy: bool,
    dtype: torch.dtype | None,
) -> tuple[Tensor, Tensor]:
    z = project(rows)  # [n, V]
    if dtype is not None:
        z = z.to(dtype)
    if temperature != 1.0:
        z = z / temperature
    y = z - z.detach().amax(-1, keepdim=True)  # [n, V] the shift is a constant: it cancels in both results
    e = torch.exp(y)  # [n, V]
    total = e.sum(-1)  # [n]
    log_total = torch.log(total)
    logp = y.gather(-1, targets[:, None]).squeeze(-1) - log_total  # [n]
    if not with_entropy:
        return logp, logp.new_zeros(0)
    return logp, log_total - (e * y).sum(-1) / total  # H = logsumexp(z) - E_p[z], one exp per element


class _Buffers:
    """Two ``[rows, V]`` head-dtype buffers reused by every chunk of one call (fresh pages cost more than math)."""

    def __init__(self) -> None:
        self.z: Tensor | None = None
        self.e: Tensor | None = None

    def take(self, n: int, V: int, dtype: torch.dtype, device: torch.device, with_entropy: bool) -> tuple[Tensor, ...]:
        if self.z is None or self.z.shape[0] < n or self.z.dtype != dtype:
            self.z = torch.empty(n, V, dtype=dtype, device=device)
            self.e = torch.empty(n, V, dtype=dtype, device=device) if with_entropy else None
        return self.z[:n], (self.e[:n] if with_entropy else None)


def _plain_chunk(
    rows: Tensor,
    targets: Tensor,
    project: Callable[[Tensor], Tensor],
    temperature: float,
    with_entropy: bool,
    dtype: torch.dtype | None,
    buffers: _Buffers,
) -> tuple[Tensor, Tensor]:
    logits = project(rows)  # [n, V] model dtype
    n, V = logits.shape
    z, e = buffers.take(n, V, dtype or logits.dtype, logits.device, with_entropy)
    z.copy_(logits)
    del logits
    if temperature != 1.0:
        z.div_(temperature)
    top = z.amax(-1, keepdim=True)  # [n, 1]
    z.sub_(top)
    zt = z.gather(-1, targets[:, None]).squeeze(-1)  # [n] shifted target logit
    if not with_entropy:
        log_sum = z.exp_().sum(-1).log()  # [n]
        return zt - log_sum, zt.new_zeros(0)
    torch.exp(z, out=e)
    total = e.sum(-1)  # [n]
    log_sum = total.log()
    entropy = log_sum - e.mul_(z).sum(-1) / total  # logsumexp(z) - E_p[z], the shift cancels
    return zt - log_sum, entropy


def head_statistics(
    rows: Tensor,  # [N, hidden] final hidden states of the scored positions (with ``head``), or [N, V] logits
    targets: Tensor,  # [N] long
    head: nn.Linear | None = None,
    *,
    temperature: float = 1.0,
    with_entropy: bool = False,
    dtype: torch.dtype | None = torch.float64,
    budget: int = 256 * MIB,
    autocast_dtype: torch.dtype | None = None,
) -> tuple[Tensor, Tensor | None]:
    """Per-token ``log p(target)`` and (``with_entropy``) entropies of ``z = head(rows) / temperature``
    (``rows`` themselves are the logits when ``head`` is None), in ``dtype`` (None: the logits' own),
    chunked so the head's ``[n, V]`` temporaries fit ``budget`` bytes (smaller chunks inside nested
    ``torch.func`` transforms, where every temporary carries more tangents). ``autocast_dtype``: the projection
    ``head(rows)`` runs under ``torch.autocast`` (the float64 part never does)."""
    N = rows.shape[0]
    V = head.out_features if head is not None else rows.shape[-1]
    out_dtype = dtype or (head.weight.dtype if head is not None else rows.dtype)
    if N == 0:
        empty = rows.new_zeros(0, dtype=out_dtype)
        return empty, (empty if with_entropy else None)
    mode = _mode(rows, head)
    project: Callable[[Tensor], Tensor] = (lambda x: x) if head is None else head
    if head is not None and autocast_dtype is not None:

        def project(x: Tensor) -> Tensor:
            with autocast(x.device, autocast_dtype):
                return head(x)

    itemsize = torch.finfo(out_dtype).bits // 8
    if mode == "plain":
        n = rows_per_chunk(V, itemsize, BUFFERS_PLAIN, budget)
        buffers = _Buffers()
        parts = [
            _plain_chunk(rows[s : s + n], targets[s : s + n], project, temperature, with_entropy, dtype, buffers)
            for s in range(0, N, n)
        ]
    elif mode == "reverse":
        n = rows_per_chunk(V, itemsize, BUFFERS_REVERSE, budget)
        parts = [
            checkpoint(
                _differentiable_chunk,
                rows[s : s + n],
                targets[s : s + n],
                project,
                temperature,
                with_entropy,
                dtype,
                use_reentrant=False,
            )
            for s in range(0, N, n)
        ]
    else:
        n = rows_per_chunk(V, itemsize, BUFFERS_FORWARD_AD * 2 ** (_transform_depth() - 1), budget)
        parts = [
            _differentiable_chunk(rows[s : s + n], targets[s : s + n], project, temperature, with_entropy, dtype)
            for s in range(0, N, n)
        ]
    logp = torch.cat([p[0] for p in parts])
    return logp, (torch.cat([p[1] for p in parts]) if with_entropy else None)
