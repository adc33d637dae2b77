"""First- and second-order predictions of Delta H(eta) by forward-mode AD, docs/DESIGN.md section 4.

Let F(eta) be the SNIS estimate of Delta H on E at theta + eta * d (no truncation, see
``probe.snis``). Its derivatives depend on the model only through the per-sequence Taylor
coefficients of l_j and h_j along d, which one JVP (first order) or a JVP of a JVP (second
order) gives per chunk of E (:func:`sequence_derivatives`). At eta = 0 the first derivative
has the closed form

    F'(0) = (1/M) sum_j [ l'_j (h_j - hbar) + h'_j ],   l'_j = <grad l_j, d>,  h'_j = <grad h_j, d>

(:func:`first_order`, with a delta-method standard error), the exact derivative of the
estimator on the same samples, so Delta H^(eta) / eta -> F'(0). :func:`snis_derivatives`
gets F, F' and F'' at any expansion point by nested ``torch.func.jvp`` of the estimator
itself (``probe.snis.snis_point_estimate``) with respect to the scalar eta, fed with the
second-order Taylor polynomials of l_j and h_j. Linear radius: the eta at which the
quadratic term reaches 10% of the linear one, |F''| eta^2 / 2 = 0.1 |F'| eta.

Forward-mode AD needs the MATH SDPA kernel (flash / memory-efficient kernels have no
forward AD); every JVP here runs under ``sdpa_kernel(SDPBackend.MATH)``.
"""

from __future__ import annotations

import math
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field, fields
from typing import Any, Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import grad, jvp, vmap

from probe.batch import SequenceBatch
from probe.jsonable import json_safe
from probe.logprobs import TeacherForcing, teacher_force
from probe.overrides import Direction, aligned_direction, base_parameters, shifted_parameters
from probe.precision import math_attention
from probe.sharding import sharded_view
from probe.snis import snis_point_estimate
from probe.statistics import SequenceStats, check_integrand, group_ids, group_sum, small_sample_correction


def _silu_composite(input: Tensor, inplace: bool = False) -> Tensor:
    return input * torch.sigmoid(input)


@contextmanager
def nested_forward_ad():
    """Let a JVP of a JVP run through SiLU (Llama, Qwen, Mistral MLPs).

    ``aten::silu_backward`` has no forward-AD formula in torch 2.13, so the second JVP fails
    inside ``F.silu``. While this context is active ``torch.nn.functional.silu`` (which
    ``nn.SiLU`` and transformers' activations call at run time) is swapped for the
    composite ``x * sigmoid(x)``: same function, every op of it twice forward-differentiable.
    The swap is process-wide while active (not thread-safe) and always undone on exit.
    """
    original = F.silu
    F.silu = _silu_composite
    try:
        yield
    finally:
        F.silu = original


# ---------------------------------------------------------------------------------------------
# per-sequence derivatives along a direction


@dataclass
class SequenceDerivatives:
    """E's per-sequence statistics at theta + eta * d and their first (and second) eta-derivatives."""

    eta: float  # expansion point
    value: SequenceStats  # l_j, sum_t H_t, T_j
    first: SequenceStats  # l'_j, (sum_t H_t)'; lengths are T_j
    second: SequenceStats | None = None  # l''_j, (sum_t H_t)''


def sequence_derivatives(
    model: nn.Module,
    batch: SequenceBatch,
    direction: Direction,
    forcing: TeacherForcing,
    *,
    order: int = 1,
    eta: float = 0.0,
) -> SequenceDerivatives:
    """Per-sequence l_j, h_j and their derivatives along ``direction`` at theta + eta * d.

    One JVP per chunk of E (``order=1``) or a JVP of a JVP (``order=2``), no reverse pass.

    Args:
        model: the policy at theta (never mutated).
        batch: the evaluation batch E.
        direction: name -> tangent (partial dict over parameter names).
        forcing: how E is teacher-forced (entropies are differentiated when ``forcing.with_entropy``).
        order: 1 (first derivatives) or 2 (also second derivatives).
        eta: expansion point (0: at theta itself, no copy of the parameters is made).
    """
    if order not in (1, 2):
        raise ValueError(f"order must be 1 or 2, got {order}")
    if not direction:
        raise ValueError("the direction touches no parameter; pass a non-empty dict name -> tensor")
    tangent = aligned_direction(model, direction)
    theta0 = base_parameters(model, direction)
    sharded = sharded_view(model)  # a sharded policy: a JVP over the scalar eta, each unit gathered in turn
    primal = theta0 if eta == 0 or sharded is not None else shifted_parameters(theta0, tangent, float(eta))
    device = next(model.parameters()).device
    with_entropy = forcing.with_entropy

    values, firsts, seconds = [], [], []
    with torch.no_grad(), math_attention(), nested_forward_ad() if order == 2 else nullcontext():
        for chunk in batch.chunks(forcing.batch_size):
            chunk = chunk.to(device)

            def stats_of(params: dict[str, Tensor], chunk: SequenceBatch = chunk) -> tuple[Tensor, Tensor]:
                ts = teacher_force(model, chunk, params, forcing)
                ent = ts.sequence_entropies if with_entropy else torch.zeros_like(ts.sequence_logprobs)
                return ts.sequence_logprobs, ent  # [c], [c]

            if sharded is not None:
                (l, e), (dl, de), second = sharded.directional(
                    lambda chunk=chunk: stats_of({}, chunk), tangent, order=order, eta=eta
                )
                if second is not None:
                    seconds.append(second)
            elif order == 1:
                (l, e), (dl, de) = jvp(stats_of, (primal,), (tangent,))
            else:

                def with_first(params: dict[str, Tensor]) -> tuple[tuple[Tensor, Tensor], tuple[Tensor, Tensor]]:
                    return jvp(stats_of, (params,), (tangent,))

                ((l, e), (dl, de)), (_, (ddl, dde)) = jvp(with_first, (primal,), (tangent,))
                seconds.append((ddl, dde))
            lengths = chunk.target_mask.sum(-1).double()
            values.append(SequenceStats(l.double(), e.double() if with_entropy else None, lengths))
            firsts.append(SequenceStats(dl.double(), de.double() if with_entropy else None, lengths))
    second = None
    if order == 2:
        second = SequenceStats.cat(
            [
                SequenceStats(ddl.double(), dde.double() if with_entropy else None, f.lengths)
                for (ddl, dde), f in zip(seconds, firsts)
            ]
        )
    return SequenceDerivatives(
        eta=float(eta), value=SequenceStats.cat(values), first=SequenceStats.cat(firsts), second=second
    )


# ---------------------------------------------------------------------------------------------
# delta method over (group) means


def _delta_method(
    samples: Tensor,  # [M, k] per-sample quantities whose (group) means enter f
    f: Callable[[Tensor], Tensor],  # [k] means -> scalar estimate
    gid: Tensor,  # [M]
    n_groups: int,
) -> tuple[Tensor, Tensor, Tensor]:
    """Estimate sum_g (M_g/M) f(mean_g X), its SE and per-sample influence terms (SE^2 = sum terms^2)."""
    M = samples.shape[0]
    count = group_sum(torch.ones(M, dtype=samples.dtype, device=samples.device), gid, n_groups)  # [G]
    means = torch.zeros(n_groups, samples.shape[1], dtype=samples.dtype, device=samples.device).index_add(
        0, gid, samples
    )
    means = means / count[:, None]  # [G, k]
    values = vmap(f)(means)  # [G]
    grads = vmap(grad(f))(means)  # [G, k]
    psi = ((samples - means[gid]) * grads[gid]).sum(-1)  # [M] influence within the group
    terms = psi / M * torch.sqrt(small_sample_correction(count))[gid]  # frac_g * psi / M_g = psi / M
    estimate = (count / M * values).sum()
    return estimate, terms.pow(2).sum().sqrt(), terms


@dataclass
class FirstOrder:
    """First-order prediction dDelta H / deta at eta = 0 (the exact derivative of the SNIS estimate)."""

    integrand: str
    normalisation: str
    n_samples: int
    slope: float  # F'(0), nats per unit eta
    slope_se: float
    slope_per_token: float
    slope_per_token_se: float
    contributions: Tensor = field(repr=False)  # [M] per eval sequence, sum to slope
    contributions_per_token: Tensor = field(repr=False)  # [M] sum to slope_per_token

    def predict(self, eta: float) -> float:
        return self.slope * eta

    def to_dict(self, per_sequence: bool = False) -> dict[str, Any]:
        out = {f.name: getattr(self, f.name) for f in fields(self) if not isinstance(getattr(self, f.name), Tensor)}
        if per_sequence:
            out.update(
                contributions=self.contributions.tolist(), contributions_per_token=self.contributions_per_token.tolist()
            )
        return out


def _first_order_seq(m: Tensor) -> Tensor:  # means of (l'h, h, l', h')
    return m[0] - m[1] * m[2] + m[3]


def _first_order_tok(m: Tensor) -> Tensor:  # means of (l'h, h, l'T, h', T)
    return (m[0] - m[1] / m[4] * m[2] + m[3]) / m[4]


def first_order(
    derivs: SequenceDerivatives, integrand: str, groups: Sequence[Any] | Tensor | None = None
) -> FirstOrder:
    """F'(0) = (1/M) sum_j [l'_j (h_j - hbar) + h'_j] and its per-token analogue
    R'(0) = sum_j [l'_j (h_j - r T_j) + h'_j] / sum_j T_j, with delta-method SEs.

    The SE treats the estimate as f(mean(l'h), mean(h), mean(l'), mean(h')) = a - b c + e
    (per token, f = (a - (b / t) mean(l'T) + e) / t with t = mean(T)) and propagates the
    sample covariance of those means through grad f. ``groups`` switches to ``per_prompt``
    normalisation (group-centred h, groups averaged with weights M_g / M).
    """
    check_integrand(integrand)
    if derivs.eta != 0:
        raise ValueError(
            f"first_order needs derivatives at eta = 0, got eta = {derivs.eta}; use snis_derivatives at other points"
        )
    l1 = derivs.first.logprobs  # [M] l'_j
    h = derivs.value.integrand(integrand)  # [M]
    h1 = derivs.first.integrand(integrand)  # [M] h'_j
    T = derivs.value.lengths  # [M]
    M = h.shape[0]
    gid, G = group_ids(groups, M) if groups is not None else (torch.zeros(M, dtype=torch.long), 1)
    gid = gid.to(h.device)
    seq, seq_se, _ = _delta_method(torch.stack([l1 * h, h, l1, h1], -1), _first_order_seq, gid, G)
    tok, tok_se, _ = _delta_method(torch.stack([l1 * h, h, l1 * T, h1, T], -1), _first_order_tok, gid, G)
    hbar = group_sum(h, gid, G) / group_sum(torch.ones_like(h), gid, G)  # [G]
    r = group_sum(h, gid, G) / group_sum(T, gid, G)  # [G]
    frac = group_sum(torch.ones_like(h), gid, G) / M
    contributions = (l1 * (h - hbar[gid]) + h1) / M  # [M]
    contributions_tok = frac[gid] * (l1 * (h - r[gid] * T) + h1) / group_sum(T, gid, G)[gid]  # [M]
    return FirstOrder(
        integrand=integrand,
        normalisation="global" if groups is None else "per_prompt",
        n_samples=M,
        slope=float(seq),
        slope_se=float(seq_se),
        slope_per_token=float(tok),
        slope_per_token_se=float(tok_se),
        contributions=contributions.cpu(),
        contributions_per_token=contributions_tok.cpu(),
    )


# ---------------------------------------------------------------------------------------------
# derivatives of the SNIS estimator itself (JVP of JVP in the scalar eta)


def _linear_radius(first: float, second: float) -> float:
    """eta at which |F''| eta^2 / 2 = 0.1 |F'| eta."""
    if math.isnan(second):
        return math.nan
    if second == 0:
        return math.inf
    return 0.2 * abs(first) / abs(second)


@dataclass
class SecondOrder:
    """The SNIS estimate F(eta) of Delta H and its first two eta-derivatives at an expansion point."""

    integrand: str
    normalisation: str
    eta: float  # expansion point eta0
    delta_entropy: float  # F(eta0) (0 at eta0 = 0)
    first: float  # F'(eta0)
    second: float  # F''(eta0)
    linear_radius: float  # 0.2 |F'| / |F''|
    delta_entropy_per_token: float
    first_per_token: float
    second_per_token: float
    linear_radius_per_token: float

    def predict(self, eta: float, per_token: bool = False) -> float:
        """F(eta0) + (eta - eta0) F' + (eta - eta0)^2 F'' / 2."""
        s = eta - self.eta
        if per_token:
            return self.delta_entropy_per_token + s * self.first_per_token + 0.5 * s * s * self.second_per_token
        return self.delta_entropy + s * self.first + 0.5 * s * s * self.second

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready (strict JSON: NaN / infinite values, e.g. the radius when F'' = 0, become None)."""
        return json_safe({f.name: getattr(self, f.name) for f in fields(self)})


def snis_derivatives(
    derivs: SequenceDerivatives, base: SequenceStats, integrand: str, groups: Sequence[Any] | Tensor | None = None
) -> SecondOrder:
    """F(eta0), F'(eta0), F''(eta0) of the SNIS estimate by nested ``torch.func.jvp`` in eta.

    F(eta) = snis_point_estimate(l(eta) - l(0), h(eta), h(0), T), where l(eta0 + s) and
    h(eta0 + s) are replaced by their second-order Taylor polynomials in s (built from
    ``derivs``, taken at eta0); F and its first two derivatives at s = 0 only depend on
    those coefficients, so the values are exact. ``base`` holds E's statistics at theta
    (eta = 0), the point the samples were drawn at. With first-order ``derivs`` (``order=1``)
    F and F' are still exact and F'', the linear radius are NaN.
    """
    check_integrand(integrand)
    l, dl = derivs.value.logprobs, derivs.first.logprobs
    h, dh = derivs.value.integrand(integrand), derivs.first.integrand(integrand)
    has_second = derivs.second is not None
    ddl = derivs.second.logprobs if has_second else torch.zeros_like(l)
    ddh = derivs.second.integrand(integrand) if has_second else torch.zeros_like(h)
    l0, h0, T = base.logprobs.to(l), base.integrand(integrand).to(h), base.lengths.to(h)
    M = l.shape[0]
    gid, G = group_ids(groups, M) if groups is not None else (torch.zeros(M, dtype=torch.long), 1)
    gid = gid.to(l.device)

    def estimate(s: Tensor) -> tuple[Tensor, Tensor]:
        l_s = l + s * dl + 0.5 * s * s * ddl  # [M]
        h_s = h + s * dh + 0.5 * s * s * ddh  # [M]
        return snis_point_estimate(l_s - l0, h_s, h0, T, gid, G)

    def estimate_and_slope(s: Tensor) -> tuple[tuple[Tensor, Tensor], tuple[Tensor, Tensor]]:
        return jvp(estimate, (s,), (torch.ones_like(s),))

    s0 = torch.zeros((), dtype=torch.float64, device=l.device)
    ((value, value_tok), (first, first_tok)), (_, (second, second_tok)) = jvp(
        estimate_and_slope, (s0,), (torch.ones_like(s0),)
    )
    first, first_tok = float(first), float(first_tok)
    second, second_tok = (float(second), float(second_tok)) if has_second else (math.nan, math.nan)
    return SecondOrder(
        integrand=integrand,
        normalisation="global" if groups is None else "per_prompt",
        eta=derivs.eta,
        delta_entropy=float(value),
        first=first,
        second=second,
        linear_radius=_linear_radius(first, second),
        delta_entropy_per_token=float(value_tok),
        first_per_token=first_tok,
        second_per_token=second_tok,
        linear_radius_per_token=_linear_radius(first_tok, second_tok),
    )
