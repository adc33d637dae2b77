"""Which sequences of the update batch U drive the entropy change on E, docs/DESIGN.md section 5.

The first-order change along the gradient part d = sum_i v_i is

    dDelta H/deta = <G_E, d> = sum_i <G_E, v_i> = sum_i a_i,
    G_E = grad_theta (1/M) sum_j [ stopgrad(h_j - hbar) l_j + h_j ]

(the gradient whose inner product with any direction is the first-order SNIS slope of
``probe.taylor``). :func:`attribute` gets all N attributions a_i with ONE backward over E
(G_E, only for the trained parameters) and ONE JVP over U
(``probe.update.per_sequence_inner_products``), whatever N is; eta * a_i is sequence i's
share of the first-order Delta H.

The eval x update matrix S[j, i] = <G_E,j, v_i> (G_E,j: sequence j's term of G_E, so
sum_j S[j, i] = a_i and sum_i S[j, i] is eval sequence j's first-order contribution) is
computed by the cheaper of two exact routes (:func:`eval_update_matrix`):

* ``reverse``: M backward passes (one G_E,j per eval sequence), each followed by one JVP over U;
* ``forward``: N materialised directions v_i, each followed by one JVP over E;
* ``per_sample``: per-sequence gradients of U (``[N, P]``) and, chunk by chunk, of E
  (``[c, P]`` for l_j and h_j, one batched backward per chunk), then one matrix product;
  the fastest route when the trained parameters are few (LoRA, small models).

``auto`` takes ``per_sample`` when ``(N + 2c) * P`` float64 numbers fit ``memory_budget``,
else the cheaper of ``reverse`` and ``forward``.

:func:`per_sequence_exact` measures the entropy change along single v_i by SNIS (the slow,
exact path), alone and in the mixed form H(theta + eta b + eta v_i) - H(theta + eta b).
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields, replace
from typing import Any, Mapping, Sequence

import torch
from torch import Tensor, nn

from probe.batch import SequenceBatch
from probe.logprobs import TeacherForcing, teacher_force
from probe.overrides import Sweep, base_statistics, sweep
from probe.snis import SNISConfig, SNISResult, snis_difference, snis_estimates
from probe.statistics import INTEGRANDS, SequenceStats, check_integrand
from probe.taylor import first_order, sequence_derivatives
from probe.update import Update, per_sequence_directions, per_sequence_inner_products

MATRIX_METHODS = ("auto", "reverse", "forward", "per_sample")


# ---------------------------------------------------------------------------------------------
# G_E


def eval_gradient(
    model: nn.Module,
    batch: SequenceBatch,
    names: Sequence[str],
    forcing: TeacherForcing,
    *,
    integrand: str = "token_entropy",
    hbar: float,
    n_total: int,
) -> dict[str, Tensor]:
    """grad_theta (1/n_total) sum_{j in batch} [stopgrad(h_j - hbar) l_j + h_j] for the parameters ``names``.

    ``batch`` may be all of E or a part of it (one sequence for G_E,j); ``hbar`` and
    ``n_total`` are those of the whole E. One backward per chunk of ``forcing.batch_size``
    sequences; ``.grad`` is never touched.
    """
    check_integrand(integrand)
    named = dict(model.named_parameters())
    missing = [n for n in names if n not in named]
    if missing:
        raise ValueError(f"parameters {missing[:3]} are not in the model; pass names from model.named_parameters()")
    leaves = {n: named[n].detach().requires_grad_(True) for n in names}  # fresh leaves sharing storage
    device = next(model.parameters()).device
    forcing = forcing.for_integrand(integrand)
    total: dict[str, Tensor] = {n: torch.zeros_like(t) for n, t in leaves.items()}
    for chunk in batch.chunks(forcing.batch_size):
        chunk = chunk.to(device)
        if chunk.input_ids.is_inference():  # made under inference_mode (e.g. a predict loop): autograd cannot save it
            chunk = replace(
                chunk,
                input_ids=chunk.input_ids.clone(),
                attention_mask=chunk.attention_mask.clone(),
                response_mask=chunk.response_mask.clone(),
            )
        with torch.enable_grad():
            ts = teacher_force(model, chunk, leaves, forcing)
            l = ts.sequence_logprobs  # [c]
            h = -l if integrand == "logprob" else ts.sequence_entropies  # [c]
            objective = ((h.detach() - hbar) * l + h).sum() / n_total  # []
        grads = torch.autograd.grad(objective, list(leaves.values()), allow_unused=True)
        for n, g in zip(leaves, grads):
            if g is not None:
                total[n] += g
    return total


def _base_integrand(
    model: nn.Module, batch: SequenceBatch, integrand: str, base: SequenceStats | None, forcing: TeacherForcing
) -> tuple[float, int]:
    """hbar and M of E (teacher forcing once when ``base`` is not given)."""
    if base is None:
        base = base_statistics(model, batch, forcing.for_integrand(integrand))
    if len(base) != len(batch):
        raise ValueError(f"base statistics cover {len(base)} sequences but E has {len(batch)}; pass the base of this E")
    return float(base.integrand(integrand).mean()), len(batch)


# ---------------------------------------------------------------------------------------------
# a_i


@dataclass
class Attribution:
    """First-order attribution of the gradient part's entropy change to the sequences of U."""

    integrand: str
    n_update: int
    n_eval: int
    total: float  # sum_i a_i
    first_order_grad: float | None  # dDelta H/deta along update.grad by a JVP over E (None: not checked)
    relative_gap: float | None  # |total - first_order_grad| / |first_order_grad|
    attributions: Tensor = field(repr=False)  # [N] a_i, nats per unit eta

    def to_dict(self, per_sequence: bool = False) -> dict[str, Any]:
        out = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "attributions"}
        if per_sequence:
            out["attributions"] = self.attributions.tolist()
        return out


def attribute(
    model: nn.Module,
    update: Update,
    update_batch: SequenceBatch,
    eval_batch: SequenceBatch,
    forcing: TeacherForcing,
    *,
    integrand: str = "token_entropy",
    base: SequenceStats | None = None,
    check: bool = True,
    microbatch_size: int | None = None,
) -> Attribution:
    """a_i = <G_E, v_i> for every sequence of U: one backward over E, one JVP over U.

    Args:
        model: the policy at theta.
        update: the reconstructed step (``probe.update.reconstruct_update``).
        update_batch: U, the batch the update was reconstructed from.
        eval_batch: E, sampled from the policy at ``forcing.temperature``.
        forcing: how E is teacher-forced (entropies follow ``integrand``).
        integrand: ``token_entropy`` or ``logprob``.
        base: E's statistics at theta if already computed (saves one forward over E).
        check: also compute the first-order slope of ``update.grad`` by a JVP over E and report
            how far sum_i a_i is from it (they are equal up to float rounding).
        microbatch_size: sequences of U per JVP (None: all of U at once).
    """
    forcing = forcing.for_integrand(integrand)
    hbar, M = _base_integrand(model, eval_batch, integrand, base, forcing)
    G = eval_gradient(model, eval_batch, list(update.scale), forcing, integrand=integrand, hbar=hbar, n_total=M)
    a = per_sequence_inner_products(model, update, update_batch, G, microbatch_size=microbatch_size)  # [N]
    total = float(a.sum())
    slope = gap = None
    if check:
        derivs = sequence_derivatives(model, eval_batch, update.grad, forcing, order=1)
        slope = first_order(derivs, integrand).slope
        gap = abs(total - slope) / max(abs(slope), 1e-300)
    return Attribution(
        integrand=integrand,
        n_update=len(update_batch),
        n_eval=M,
        total=total,
        first_order_grad=slope,
        relative_gap=gap,
        attributions=a,
    )


# ---------------------------------------------------------------------------------------------
# S[j, i]


def eval_update_matrix(
    model: nn.Module,
    update: Update,
    update_batch: SequenceBatch,
    eval_batch: SequenceBatch,
    forcing: TeacherForcing,
    *,
    integrand: str = "token_entropy",
    method: str = "auto",
    base: SequenceStats | None = None,
    microbatch_size: int | None = None,
    direction_chunk_size: int = 8,
    memory_budget: float = 2e9,
) -> Tensor:  # [M, N] float64
    """S[j, i] = <G_E,j, v_i>, first-order entropy change on E's term j from U's sequence i (per unit eta).

    Args:
        method: ``reverse`` (M backward passes over single eval sequences, each with one JVP
            over U), ``forward`` (N materialised v_i, each with one JVP over E), or ``auto``
            (``per_sample`` when it fits ``memory_budget``, else ``reverse`` when M <= N, else
            ``forward``); ``per_sample``: per-sequence gradients and a matrix product. All are exact.
        direction_chunk_size: update sequences per batched backward when materialising v_i
            (and eval sequences per batched backward in ``per_sample``).
        memory_budget: bytes ``auto`` may spend on per-sample gradients.
        (other arguments as :func:`attribute`)
    """
    if method not in MATRIX_METHODS:
        raise ValueError(f"unknown method {method!r}; choose one of {', '.join(MATRIX_METHODS)}")
    forcing = forcing.for_integrand(integrand)
    hbar, M = _base_integrand(model, eval_batch, integrand, base, forcing)
    N = len(update_batch)
    if method == "auto":
        P = sum(update.scale[n].numel() for n in update.scale)
        if (N + 2 * direction_chunk_size) * P * 8 <= memory_budget:
            method = "per_sample"
        else:
            method = "reverse" if M <= N else "forward"
    if method == "per_sample":
        return _matrix_from_per_sample_gradients(
            model, update, update_batch, eval_batch, forcing, integrand, hbar, M, direction_chunk_size
        )
    S = torch.zeros(M, N, dtype=torch.float64)
    if method == "reverse":
        for j in range(M):
            G_j = eval_gradient(
                model, eval_batch.select([j]), list(update.scale), forcing, integrand=integrand, hbar=hbar, n_total=M
            )
            S[j] = per_sequence_inner_products(model, update, update_batch, G_j, microbatch_size=microbatch_size)
        return S
    for i, v_i in per_sequence_directions(model, update, update_batch, chunk_size=direction_chunk_size):
        derivs = sequence_derivatives(model, eval_batch, v_i, forcing, order=1)
        S[:, i] = first_order(derivs, integrand).contributions.double()
    return S


def _matrix_from_per_sample_gradients(
    model: nn.Module,
    update: Update,
    update_batch: SequenceBatch,
    eval_batch: SequenceBatch,
    forcing: TeacherForcing,
    integrand: str,
    hbar: float,
    M: int,
    eval_chunk: int,
) -> Tensor:  # [M, N]
    """S = ((h - hbar) * (G_l V^T) + G_h V^T) / M with per-sequence gradients G_l, G_h of E and V of U."""
    names = list(update.scale)
    V = torch.stack(
        [  # [N, P] v_i flattened
            torch.cat([v_i[n].reshape(-1).double() for n in names])
            for _, v_i in per_sequence_directions(model, update, update_batch, chunk_size=eval_chunk)
        ]
    )
    named = dict(model.named_parameters())
    leaves = {n: named[n].detach().clone().requires_grad_(True) for n in names}  # fresh leaves, never .grad
    device = V.device
    rows = []
    for chunk in eval_batch.chunks(eval_chunk):
        chunk = chunk.to(next(model.parameters()).device)
        with torch.enable_grad():
            ts = teacher_force(model, chunk, leaves, forcing)
            l = ts.sequence_logprobs  # [c]
            h = -l if integrand == "logprob" else ts.sequence_entropies  # [c]
            c = l.shape[0]
            eye = torch.eye(c, dtype=l.dtype, device=l.device)
            grads = torch.autograd.grad(
                torch.cat([l, h]),
                list(leaves.values()),
                allow_unused=True,
                is_grads_batched=True,
                grad_outputs=torch.block_diag(eye, eye),
            )  # each [2c, *p.shape]
        flat = torch.cat(
            [  # [2c, P]
                (
                    torch.zeros(2 * c, leaves[n].numel(), dtype=torch.float64)
                    if g is None
                    else g.reshape(2 * c, -1).double()
                )
                for n, g in zip(names, grads)
            ],
            dim=1,
        ).to(device)
        Gl, Gh = flat[:c], flat[c:]  # [c, P]
        rows.append(((h.detach().double().to(device) - hbar)[:, None] * (Gl @ V.T) + Gh @ V.T) / M)  # [c, N]
    return torch.cat(rows).cpu()


# ---------------------------------------------------------------------------------------------
# the exact per-sequence path


@dataclass
class PerSequenceExact:
    """SNIS entropy changes along one update sequence's own direction v_i."""

    index: int  # row of U
    alone: dict[str, list[SNISResult]]  # integrand -> per eta: H(theta + eta v_i) - H(theta)
    mixed: dict[str, list[SNISResult]] | None  # H(theta + eta b + eta v_i) - H(theta + eta b)

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "index": self.index,
            "alone": {k: [r.to_dict() for r in v] for k, v in self.alone.items()},
        }
        if self.mixed is not None:
            out["mixed"] = {k: [r.to_dict() for r in v] for k, v in self.mixed.items()}
        return out


def per_sequence_exact(
    model: nn.Module,
    update: Update,
    update_batch: SequenceBatch,
    eval_batch: SequenceBatch,
    etas: Sequence[float],
    forcing: TeacherForcing,
    *,
    indices: Sequence[int],
    mixed: bool = True,
    integrands: Sequence[str] = INTEGRANDS,
    config: SNISConfig | None = None,
    groups: Sequence[Any] | Tensor | None = None,
    base: SequenceStats | None = None,
    direction_chunk_size: int = 8,
) -> list[PerSequenceExact]:
    """Measure Delta H along v_i (and the mixed form on top of the baseline b) for the chosen rows of U.

    Each v_i is materialised once (``per_sequence_directions``) and swept over ``etas``;
    E's base statistics and the baseline sweep are computed once and shared. The mixed
    form's SE accounts for both estimates using the same samples (``snis_difference``).
    """
    for name in integrands:
        check_integrand(name)
    forcing = replace(forcing, with_entropy="token_entropy" in integrands)
    if base is None:
        base = base_statistics(model, eval_batch, forcing)

    def estimates(swept: Sweep, part: str) -> dict[str, list[SNISResult]]:
        return {name: snis_estimates(swept, part, integrand=name, config=config, groups=groups) for name in integrands}

    on_baseline = (
        estimates(sweep(model, eval_batch, {"b": update.baseline}, etas, forcing, base=base), "b") if mixed else None
    )
    out = []
    for i, v_i in per_sequence_directions(
        model, update, update_batch, indices=list(indices), chunk_size=direction_chunk_size
    ):
        directions: dict[str, Mapping[str, Tensor]] = {"v": v_i}
        if mixed:
            directions["b+v"] = {n: b + v_i[n].to(b) if n in v_i else b for n, b in update.baseline.items()}
        swept = sweep(model, eval_batch, directions, etas, forcing, base=base)
        alone = estimates(swept, "v")
        both = None
        if mixed:
            with_b = estimates(swept, "b+v")
            both = {
                name: [snis_difference(x, y) for x, y in zip(with_b[name], on_baseline[name])] for name in integrands
            }
        out.append(PerSequenceExact(index=i, alone=alone, mixed=both))
    return out
