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
from probe.sharding import sharded_view
from probe.snis import SNISConfig, SNISResult, snis_difference, snis_estimates
from probe.statistics import INTEGRANDS, SequenceStats, check_integrand
from probe.taylor import SequenceDerivatives, first_order, sequence_derivatives
from probe.update import (
    TokenInnerProducts,
    Update,
    per_sequence_directions,
    per_sequence_inner_products,
    per_token_inner_products,
)

MATRIX_METHODS = ("auto", "reverse", "forward", "per_sample")


# ---------------------------------------------------------------------------------------------
# the inputs every route shares, and G_E


@dataclass
class AttributionInputs:
    """One attribution problem: the policy at theta, the step, U, E and how E is teacher-forced.

    Args:
        model: the policy at theta.
        update: the reconstructed step (``probe.update.reconstruct_update``).
        U: the update batch the step was reconstructed from.
        E: the evaluation batch, sampled from the policy at ``forcing.temperature``.
        forcing: how E is teacher-forced (its ``with_entropy`` is set from ``integrand``).
        integrand: ``token_entropy`` or ``logprob``.
        base: E's statistics at theta if already computed (else one forward over E, once, when first needed).
    """

    model: nn.Module
    update: Update
    U: SequenceBatch
    E: SequenceBatch
    forcing: TeacherForcing
    integrand: str = "token_entropy"
    base: SequenceStats | None = None

    def __post_init__(self) -> None:
        check_integrand(self.integrand)
        self.forcing = self.forcing.for_integrand(self.integrand)
        if self.base is not None and len(self.base) != len(self.E):
            raise ValueError(
                f"base statistics cover {len(self.base)} sequences but E has {len(self.E)}; pass the base of this E"
            )

    @property
    def M(self) -> int:
        return len(self.E)

    @property
    def hbar(self) -> float:
        """mean_j h_j over E at theta (teacher-forcing E once if ``base`` was not given)."""
        if self.base is None:
            self.base = base_statistics(self.model, self.E, self.forcing)
        return float(self.base.integrand(self.integrand).mean())


def eval_gradient(
    inputs: AttributionInputs, rows: SequenceBatch | None = None, rewards: Tensor | None = None
) -> dict[str, Tensor]:
    """G_E = grad_theta (1/M) sum_j [stopgrad(h_j - hbar) l_j + h_j] over the step's trained parameters.

    ``rows``: a part of E (one sequence for G_E,j) instead of all of it; ``hbar`` and M stay those of
    the whole E. ``rewards`` (``[M]``, one per sequence of E): the gradient of the expected reward's SNIS
    estimate instead, G_R = grad_theta (1/M) sum_j (r_j - rbar) l_j (a reward does not depend on theta).
    One backward per chunk of ``forcing.batch_size`` sequences; ``.grad`` is never touched.
    """
    model, forcing, M = inputs.model, inputs.forcing, inputs.M
    if rewards is not None:
        rewards = torch.as_tensor(rewards, dtype=torch.float64).cpu()
        if rewards.shape != (M,) or not torch.isfinite(rewards).all():
            raise ValueError(
                f"E's rewards must be {M} finite numbers, one per sequence of E (got shape {tuple(rewards.shape)}, or "
                "a nan/inf among them). Fix: give every sequence of E a finite reward"
            )
        forcing = replace(forcing, with_entropy=False)
    hbar = float(rewards.mean()) if rewards is not None else inputs.hbar
    named = dict(model.named_parameters())
    missing = [n for n in inputs.update.scale if n not in named]
    if missing:
        raise ValueError(
            f"update parameters {missing[:3]} are not in the model; use the model the update was built for"
        )
    leaves = {n: named[n].detach().requires_grad_(True) for n in inputs.update.scale}  # fresh leaves sharing storage
    device = next(model.parameters()).device
    total: dict[str, Tensor] = {n: torch.zeros_like(t) for n, t in leaves.items()}
    sharded = sharded_view(model)  # a sharded policy: every rank runs all of E, keeps its rows of G_E
    for chunk in (inputs.E if rows is None else rows).chunks(forcing.batch_size):
        chunk = chunk.to(device)
        if chunk.input_ids.is_inference():  # made under inference_mode (e.g. a predict loop): autograd cannot save it
            chunk = chunk.map_tensors(torch.clone)

        def objective(params: dict[str, Tensor], chunk: SequenceBatch = chunk) -> Tensor:  # []
            with torch.enable_grad():
                ts = teacher_force(model, chunk, params, forcing)
                l = ts.sequence_logprobs  # [c]
                if rewards is not None:  # r_j: a constant of theta
                    r = rewards[chunk.index.cpu()].to(l)  # [c]
                    return ((r - hbar) * l).sum() / M
                h = -l if inputs.integrand == "logprob" else ts.sequence_entropies  # [c]
                return ((h.detach() - hbar) * l + h).sum() / M

        if sharded is not None:
            _, by_name = sharded.gradient(lambda objective=objective: objective({}), list(leaves))
            grads = tuple(by_name[n] for n in leaves)
        else:
            grads = torch.autograd.grad(objective(leaves), list(leaves.values()), allow_unused=True)
        for n, g in zip(leaves, grads):
            if g is not None:
                total[n] += g
    return total


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
    tokens: TokenInnerProducts | None = field(default=None, repr=False)  # a_it per response token, sum_t a_it = a_i

    def to_dict(self, per_sequence: bool = False) -> dict[str, Any]:
        out = {f.name: getattr(self, f.name) for f in fields(self) if f.name not in ("attributions", "tokens")}
        if per_sequence:
            out["attributions"] = self.attributions.tolist()
        return out


def attribute(
    inputs: AttributionInputs, *, check: bool = True, microbatch_size: int | None = None, rewards: Tensor | None = None
) -> Attribution:
    """a_i = <G_E, v_i> for every sequence of U, and a_it for every one of its response tokens (sum_t a_it = a_i):
    one backward over E, one JVP over U kept at token resolution.

    Args:
        inputs: the policy, the step, U, E, teacher forcing and integrand.
        check: also compute the first-order slope of ``update.grad`` by a JVP over E and report
            how far sum_i a_i is from it (they are equal up to float rounding).
        microbatch_size: sequences of U per JVP (None: all of U at once).
        rewards: ``[M]`` rewards of E's sequences: attribute the first-order change of E's expected reward instead
            (r_i = <G_R, v_i>, :func:`eval_gradient`); the check then takes the reward's slope along ``update.grad``.
    """
    model, update, U = inputs.model, inputs.update, inputs.U
    G = eval_gradient(inputs, rewards=rewards)
    tokens = per_token_inner_products(model, update, U, G, microbatch_size=microbatch_size)
    a = tokens.per_sequence()  # [N]
    total = float(a.sum())
    slope = gap = None
    if check:
        derivs = sequence_derivatives(model, inputs.E, update.grad, inputs.forcing, order=1)
        slope = first_order(derivs, inputs.integrand).slope if rewards is None else reward_slope(derivs, rewards)
        gap = abs(total - slope) / max(abs(slope), 1e-300)
    counts = dict(integrand="reward" if rewards is not None else inputs.integrand, n_update=len(U), n_eval=inputs.M)
    return Attribution(**counts, total=total, first_order_grad=slope, relative_gap=gap, attributions=a, tokens=tokens)


def reward_slope(derivs: SequenceDerivatives, rewards: Tensor) -> float:
    """The first-order change of E's expected reward along the derivatives' direction, (1/M) sum_j l'_j (r_j - rbar)
    (a reward is a constant of theta, so only the importance weights move)."""
    r = torch.as_tensor(rewards, dtype=torch.float64).cpu()  # [M]
    return float((derivs.first.logprobs.double().cpu() * (r - r.mean())).mean())


# ---------------------------------------------------------------------------------------------
# S[j, i]


def eval_update_matrix(
    inputs: AttributionInputs, *, method: str = "auto", chunk_size: int = 8, memory_budget: float = 2e9
) -> Tensor:  # [M, N] float64
    """S[j, i] = <G_E,j, v_i>, first-order entropy change on E's term j from U's sequence i (per unit eta).

    Args:
        inputs: the policy, the step, U, E, teacher forcing and integrand.
        method: ``reverse`` (M backward passes over single eval sequences, each with one JVP
            over U), ``forward`` (N materialised v_i, each with one JVP over E), or ``auto``
            (``per_sample`` when it fits ``memory_budget``, else ``reverse`` when M <= N, else
            ``forward``); ``per_sample``: per-sequence gradients and a matrix product. All are exact.
        chunk_size: update sequences per batched backward when materialising v_i (and eval
            sequences per batched backward in ``per_sample``).
        memory_budget: bytes ``auto`` may spend on per-sample gradients.
    """
    if method not in MATRIX_METHODS:
        raise ValueError(f"unknown method {method!r}; choose one of {', '.join(MATRIX_METHODS)}")
    model, update, U, M, N = inputs.model, inputs.update, inputs.U, inputs.M, len(inputs.U)
    if sharded_view(model) is not None:  # no full-size per-sequence gradient or direction on a sharded policy
        if method not in ("auto", "reverse"):
            raise ValueError(
                f"the eval x update matrix's {method!r} route materialises full-size per-sequence vectors, which a "
                "sharded policy does not hold; use method='reverse' (or 'auto')"
            )
        method = "reverse"
    if method == "auto":
        P = sum(update.scale[n].numel() for n in update.scale)
        if (N + 2 * chunk_size) * P * 8 <= memory_budget:
            method = "per_sample"
        else:
            method = "reverse" if M <= N else "forward"
    if method == "per_sample":
        return _matrix_from_per_sample_gradients(inputs, chunk_size)
    S = torch.zeros(M, N, dtype=torch.float64)
    if method == "reverse":
        for j in range(M):
            S[j] = per_sequence_inner_products(model, update, U, eval_gradient(inputs, inputs.E.select([j])))
        return S
    for i, v_i in per_sequence_directions(model, update, U, chunk_size=chunk_size):
        derivs = sequence_derivatives(model, inputs.E, v_i, inputs.forcing, order=1)
        S[:, i] = first_order(derivs, inputs.integrand).contributions.double()
    return S


def _matrix_from_per_sample_gradients(inputs: AttributionInputs, eval_chunk: int) -> Tensor:  # [M, N]
    """S = ((h - hbar) * (G_l V^T) + G_h V^T) / M with per-sequence gradients G_l, G_h of E and V of U."""
    model, update, hbar, M = inputs.model, inputs.update, inputs.hbar, inputs.M
    names = list(update.scale)
    V = torch.stack(
        [  # [N, P] v_i flattened
            torch.cat([v_i[n].reshape(-1).double() for n in names])
            for _, v_i in per_sequence_directions(model, update, inputs.U, chunk_size=eval_chunk)
        ]
    )
    named = dict(model.named_parameters())
    leaves = {n: named[n].detach().clone().requires_grad_(True) for n in names}  # fresh leaves, never .grad
    device = V.device
    rows = []
    for chunk in inputs.E.chunks(eval_chunk):
        chunk = chunk.to(next(model.parameters()).device)
        with torch.enable_grad():
            ts = teacher_force(model, chunk, leaves, inputs.forcing)
            l = ts.sequence_logprobs  # [c]
            h = -l if inputs.integrand == "logprob" else ts.sequence_entropies  # [c]
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
    inputs: AttributionInputs,
    etas: Sequence[float],
    indices: Sequence[int],
    *,
    mixed: bool = True,
    integrands: Sequence[str] = INTEGRANDS,
    config: SNISConfig | None = None,
    groups: Sequence[Any] | Tensor | None = None,
    chunk_size: int = 8,
) -> list[PerSequenceExact]:
    """Measure Delta H along v_i (and the mixed form on top of the baseline b) for the rows ``indices`` of U.

    Each v_i is materialised once (``per_sequence_directions``, ``chunk_size`` sequences per batched
    backward) and swept over ``etas``; E's base statistics and the baseline sweep are computed once and
    shared. The estimates are made for each of ``integrands`` (``inputs.integrand`` is not used). The
    mixed form's SE accounts for both estimates using the same samples (``snis_difference``).
    """
    for name in integrands:
        check_integrand(name)
    model, update, E = inputs.model, inputs.update, inputs.E
    forcing = replace(inputs.forcing, with_entropy="token_entropy" in integrands)
    base = (
        inputs.base
        if inputs.base is not None and (inputs.base.entropies is not None or not forcing.with_entropy)
        else None
    )
    base = base_statistics(model, E, forcing) if base is None else base

    def estimates(swept: Sweep, part: str) -> dict[str, list[SNISResult]]:
        return {name: snis_estimates(swept, part, integrand=name, config=config, groups=groups) for name in integrands}

    on_baseline = estimates(sweep(model, E, {"b": update.baseline}, etas, forcing, base=base), "b") if mixed else None
    out = []
    for i, v_i in per_sequence_directions(model, update, inputs.U, indices=list(indices), chunk_size=chunk_size):
        directions: dict[str, Mapping[str, Tensor]] = {"v": v_i}
        if mixed:
            directions["b+v"] = {n: b + v_i[n].to(b) if n in v_i else b for n, b in update.baseline.items()}
        swept = sweep(model, E, directions, etas, forcing, base=base)
        alone = estimates(swept, "v")
        both = None
        if mixed:
            with_b = estimates(swept, "b+v")
            both = {
                name: [snis_difference(x, y) for x, y in zip(with_b[name], on_baseline[name])] for name in integrands
            }
        out.append(PerSequenceExact(index=i, alone=alone, mixed=both))
    return out
