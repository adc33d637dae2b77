"""Teacher forcing of the evaluation batch E under parameter overrides theta + eta * d.

For every part d of the update (a plain dict ``name -> tensor`` over the parameters it
touches) and every step size eta, E is teacher-forced at ``theta0 + eta * d``
(``torch.add(theta0, d, alpha=eta)`` in the parameters' dtype). On the architectures whose
parameters are all used inside their own modules (:func:`probe.head.linear_head`) the shift is
applied one module at a time (:class:`LayerwiseShift`: one layer's worth of extra memory, not a
shifted copy of the model, theta restored bitwise); on others a partial dict of shifted
parameters goes to ``torch.func.functional_call``. theta itself is never written. Statistics at the
base point theta (eta = 0) are computed once per chunk of E and shared by all parts and
etas. Everything runs under ``torch.no_grad`` and per-sequence outputs are float64:

* ``l_j(eta)``: sequence log-prob of the response at temperature tau,
* ``sum_t H_t``: sum of full-vocabulary token entropies along the response,
* ``T_j``: response length,

from which the integrand is ``h_j = -l_j`` (``logprob``) or ``h_j = sum_t H_t``
(``token_entropy``), docs/DESIGN.md section 3.
"""

from __future__ import annotations

import math
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Iterator, Mapping, Sequence

import torch
from torch import Tensor, nn

from probe.batch import SequenceBatch
from probe.head import linear_head
from probe.logprobs import TeacherForcing, TokenStats, teacher_force
from probe.sharding import all_reduce_sum, is_dtensor, local, sharded_view
from probe.statistics import SequenceStats

Direction = Mapping[str, Tensor]  # parameter name -> step per unit eta (same shape as the parameter)


def base_parameters(model: nn.Module, direction: Direction) -> dict[str, Tensor]:
    """theta0 (detached, no copy) for the parameters ``direction`` touches, after checking names and shapes."""
    params = dict(model.named_parameters())
    theta0: dict[str, Tensor] = {}
    for name, d in direction.items():
        if name not in params:
            close = [n for n in params if n.endswith(name) or name.endswith(n)][:3]
            raise ValueError(
                f"direction names parameter {name!r}, which the model does not have"
                + (f" (did you mean {close}?)" if close else "")
                + "; directions must be keyed by model.named_parameters() names"
            )
        if tuple(d.shape) != tuple(params[name].shape):
            raise ValueError(
                f"direction for {name!r} has shape {tuple(d.shape)} but the parameter has {tuple(params[name].shape)}; "
                "the update was built for a different model"
            )
        theta0[name] = params[name].detach()
    return theta0


def aligned_direction(model: nn.Module, direction: Direction) -> dict[str, Tensor]:
    """The direction cast to each parameter's dtype and device (so theta0 + eta * d keeps the model's dtype)."""
    theta0 = base_parameters(model, direction)
    return {n: d.detach().to(device=theta0[n].device, dtype=theta0[n].dtype) for n, d in direction.items()}


def shifted_parameters(
    theta0: Mapping[str, Tensor], direction: Direction, eta: float, out: Mapping[str, Tensor] | None = None
) -> dict[str, Tensor]:
    """Overrides theta0 + eta * d for the parameters ``direction`` touches (a partial dict).

    ``out``: preallocated buffers (name -> tensor like theta0) written in place, so a sweep
    holds one copy of the touched parameters whatever the number of parts and etas.
    """
    if out is None:
        return {n: torch.add(theta0[n], d, alpha=eta) for n, d in direction.items()}
    return {n: torch.add(theta0[n], d, alpha=eta, out=out[n]) for n, d in direction.items()}


ROUNDING_CHUNK = 1 << 22  # elements per float64 temporary of step_resolution (32 MB): a 151,936 x 4096 embedding
# would otherwise need several 5 GB float64 copies at once


@dataclass
class StepResolution:
    """Per eta, what of the step ``eta * d`` survives when ``theta0 + eta * d`` is formed in the parameters' dtype."""

    rounding_error: list[float]  # ||(theta0 + eta d) - theta0 - eta d||_1 / ||eta d||_1: 0 taken exactly, 1 lost
    changed_fraction: list[float]  # of the elements d moves (d != 0), the fraction whose value changes at all


@torch.no_grad()
def step_resolution(theta0: Mapping[str, Tensor], direction: Direction, etas: Sequence[float]) -> StepResolution:
    """:class:`StepResolution` of ``etas``: the override formed as the sweep forms it (in the parameters' dtype),
    the comparison in float64, in chunks of :data:`ROUNDING_CHUNK` elements. The rounding error is about 0 for a
    step far above the dtype's resolution and 1 for one that rounds away entirely (the sweep then measures no
    change at all); the changed fraction falls towards 0 as eta * |d| drops below half a unit in the last place
    of the weights. Both NaN for a zero direction. One device sync."""
    if not direction:
        return StepResolution([math.nan] * len(etas), [math.nan] * len(etas))
    errors: Tensor | None = None  # [J]
    changed: Tensor | None = None  # [J]
    size: Tensor | None = None
    moved: Tensor | None = None
    sharded = next((t for t in theta0.values() if is_dtensor(t)), None)  # then each rank sums its own rows
    for n, d in direction.items():
        t = local(theta0[n].detach()).reshape(-1)
        d = local(d.detach()).to(device=t.device).reshape(-1)
        for t_part, d_part in zip(t.split(ROUNDING_CHUNK), d.split(ROUNDING_CHUNK)):
            cast = d_part.to(t.dtype)  # what the sweep adds
            intended = d_part.double()
            base = t_part.double()
            here, now = torch.zeros(2, len(etas), dtype=torch.float64, device=t.device)  # [J] each
            for j, eta in enumerate(etas):
                step = torch.add(t_part, cast, alpha=eta).double() - base  # [n] the step taken
                here[j] = (step - eta * intended).abs().sum()
                now[j] = (step != 0).sum()
            errors = here if errors is None else errors + here
            changed = now if changed is None else changed + now
            size = intended.abs().sum() if size is None else size + intended.abs().sum()
            count = (intended != 0).sum().double()
            moved = count if moved is None else moved + count
    if sharded is not None:  # one all-reduce of the four sums
        sums = all_reduce_sum(torch.cat([errors, changed, size[None], moved[None]]), sharded)
        J = len(etas)
        errors, changed, size, moved = sums[:J], sums[J : 2 * J], sums[2 * J], sums[2 * J + 1]
    scale = size * torch.tensor([abs(e) for e in etas], dtype=torch.float64, device=size.device)  # [J]
    return StepResolution(rounding_error=(errors / scale).tolist(), changed_fraction=(changed / moved).tolist())


class LayerwiseShift:
    """theta + eta * d applied in place to one module's own parameters at a time, for no-grad forwards.

    A forward pre-hook on every module that holds a touched parameter points the parameter at
    ``theta0 + eta * d`` (a fresh tensor; ``Parameter.data`` is re-pointed, no element of theta is
    written) and the module's post-hook points it back at theta's own storage, so theta is restored
    bitwise and a sweep point holds one layer's shifted parameters at a time instead of a shifted
    copy of the model. Parameters of ``keep`` (the output embedding, which the chunked head calls
    once per chunk of tokens and which a tied input embedding shares) stay shifted from their first
    use to the end of the point, in one buffer this object owns. Use only where every parameter is
    used inside its own module's forward (the architectures of :func:`probe.head.linear_head`).
    """

    def __init__(self, model: nn.Module, directions: Mapping[str, Direction], keep: Sequence[str] = ()) -> None:
        self.params = dict(model.named_parameters())
        touched = {n for d in directions.values() for n in d}
        by_id = {id(self.params[n]): n for n in touched}
        self.owners: dict[nn.Module, list[str]] = {}  # module -> canonical names of its touched parameters
        for module in model.modules():
            names = [by_id[id(p)] for p in module._parameters.values() if p is not None and id(p) in by_id]
            if names:
                self.owners[module] = names
        self.keep = {n for n in keep if n in touched}
        self.kept = {n: torch.empty_like(self.params[n]) for n in self.keep}  # the only buffers held across points
        self.direction: Direction = {}
        self.eta = 0.0
        self.theta: dict[str, Tensor] = {}  # name -> theta's own tensor, while the parameter points elsewhere

    def _shift(self, module: nn.Module, args: Any) -> None:
        for name in self.owners[module]:
            if name in self.theta or name not in self.direction:
                continue
            p = self.params[name]
            out = self.kept.get(name)
            shifted = torch.add(p.data, self.direction[name], alpha=self.eta, out=out)
            self.theta[name] = p.data
            p.data = shifted

    def _restore(self, module: nn.Module, args: Any, output: Any) -> None:
        for name in self.owners[module]:
            if name in self.theta and name not in self.keep:
                self.params[name].data = self.theta.pop(name)

    @contextmanager
    def at(self, direction: Direction, eta: float) -> Iterator[None]:
        """Forwards inside run at theta + eta * ``direction`` (aligned to the parameters' dtypes); theta after."""
        self.direction, self.eta = direction, float(eta)
        handles = []
        try:
            for module in self.owners:
                handles.append(module.register_forward_pre_hook(self._shift))
                handles.append(module.register_forward_hook(self._restore, always_call=True))
            yield
        finally:
            for handle in handles:
                handle.remove()
            for name, theta in self.theta.items():
                self.params[name].data = theta
            self.theta.clear()


class ShiftedPolicy:
    """Teacher forcing at theta + eta * d for any of several directions (no grad): one module at a time
    (:class:`LayerwiseShift`) on the architectures of :func:`probe.head.linear_head`, else ``functional_call`` over
    one shifted copy of the touched parameters, rewritten per point. The policy itself is left bitwise as it was."""

    def __init__(self, model: nn.Module, directions: Mapping[str, Direction]) -> None:
        self.model = model
        self.aligned = {p: aligned_direction(model, d) for p, d in directions.items()}
        self.theta0 = {p: base_parameters(model, d) for p, d in directions.items()}
        split = linear_head(model)
        self.layerwise: LayerwiseShift | None = None
        self.buffers: dict[str, Tensor] = {}
        self.sharded = sharded_view(model)  # a sharded policy: shifted as each unit is gathered
        if self.sharded is None and split is not None:  # every parameter is used inside its own module's forward
            keep = [n for n, p in model.named_parameters() if p is split[1].weight]
            self.layerwise = LayerwiseShift(model, self.aligned, keep=keep)
        elif self.sharded is None:
            touched = {n: t for part in self.theta0.values() for n, t in part.items()}
            self.buffers = {n: torch.empty_like(t) for n, t in touched.items()}

    @torch.no_grad()
    def teacher_force(self, part: str, eta: float, batch: SequenceBatch, forcing: TeacherForcing) -> TokenStats:
        """``batch`` teacher-forced at theta + ``eta`` * the direction ``part``."""
        if self.sharded is not None:
            with self.sharded.gathered(self.sharded.shift(self.aligned[part], eta)):
                return teacher_force(self.model, batch, forcing=forcing)
        if self.layerwise is not None:
            with self.layerwise.at(self.aligned[part], eta):
                return teacher_force(self.model, batch, forcing=forcing)
        params = shifted_parameters(self.theta0[part], self.aligned[part], eta, out=self.buffers)
        return teacher_force(self.model, batch, params, forcing)


@dataclass
class SweepChunk:
    """Statistics of one chunk of E at one point of the sweep."""

    part: str | None  # None: the base point theta (eta = 0), computed once per chunk
    eta_index: int  # position in the part's etas (-1 for the base point)
    eta: float
    start: int  # rows start .. start + len(stats) of E
    stats: SequenceStats


def _model_device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def iter_sweep(
    model: nn.Module,
    batch: SequenceBatch,
    directions: Mapping[str, Direction],
    etas: Sequence[float] | Mapping[str, Sequence[float]],
    forcing: TeacherForcing,
    *,
    base: SequenceStats | None = None,
) -> Iterator[SweepChunk]:
    """Teacher-force E at theta and at theta + eta * d for every (part, eta), chunk by chunk.

    Args:
        model: the policy at theta (never mutated).
        batch: the evaluation batch E.
        directions: part name -> direction (partial dict over parameter names).
        etas: step sizes shared by all parts, or part name -> its own step sizes.
        forcing: how E is teacher-forced (temperature tau, entropies, head precision, sequences per pass).
        base: statistics of E at theta if already known (skips the base passes; no base
            chunks are yielded then).

    Yields, for each chunk of E: the base point (``part=None``) unless ``base`` is given, then
    each part and eta in order.
    """
    etas_of = (
        {p: list(etas[p]) for p in directions} if isinstance(etas, Mapping) else {p: list(etas) for p in directions}
    )
    if base is not None and len(base) != len(batch):
        raise ValueError(f"base statistics cover {len(base)} sequences but E has {len(batch)}; pass the base of this E")
    device = _model_device(model)
    shifted = ShiftedPolicy(model, directions)
    start = 0
    with torch.no_grad():
        for chunk in batch.chunks(forcing.batch_size):
            chunk = chunk.to(device)
            if base is None:
                stats = SequenceStats.from_tokens(teacher_force(model, chunk, forcing=forcing))
                yield SweepChunk(part=None, eta_index=-1, eta=0.0, start=start, stats=stats)
            for part in directions:
                for k, eta in enumerate(etas_of[part]):
                    stats = SequenceStats.from_tokens(shifted.teacher_force(part, float(eta), chunk, forcing))
                    yield SweepChunk(part=part, eta_index=k, eta=float(eta), start=start, stats=stats)
            start += len(chunk)


@dataclass
class Sweep:
    """Per-sequence statistics of all of E over a sweep of parts and step sizes."""

    parts: list[str]
    etas: Tensor  # [J] float64
    base: SequenceStats  # [M] at theta
    logprobs: Tensor  # [K, J, M] l_j(eta) for part k, eta j
    entropies: Tensor | None  # [K, J, M] sum_t H_t

    def at(self, part: str, eta_index: int) -> SequenceStats:
        """Statistics of E at theta + etas[eta_index] * part."""
        if part not in self.parts:
            raise ValueError(f"part {part!r} was not swept; swept parts: {self.parts}")
        k = self.parts.index(part)
        return SequenceStats(
            logprobs=self.logprobs[k, eta_index],
            entropies=None if self.entropies is None else self.entropies[k, eta_index],
            lengths=self.base.lengths,
        )


def sweep(
    model: nn.Module,
    batch: SequenceBatch,
    directions: Mapping[str, Direction],
    etas: Sequence[float],
    forcing: TeacherForcing,
    *,
    base: SequenceStats | None = None,
) -> Sweep:
    """:func:`iter_sweep` collected into stacked ``[K, J, M]`` tensors (same etas for every part)."""
    parts, eta_list = list(directions), [float(e) for e in etas]
    M, K, J = len(batch), len(parts), len(eta_list)
    logprobs = torch.zeros(K, J, M, dtype=torch.float64)
    entropies = torch.zeros(K, J, M, dtype=torch.float64) if forcing.with_entropy else None
    base_chunks: list[SequenceStats] = []
    for item in iter_sweep(model, batch, directions, eta_list, forcing, base=base):
        if item.part is None:
            base_chunks.append(item.stats)
            continue
        rows = slice(item.start, item.start + len(item.stats))
        k = parts.index(item.part)
        logprobs[k, item.eta_index, rows] = item.stats.logprobs.cpu()
        if entropies is not None:
            entropies[k, item.eta_index, rows] = item.stats.entropies.cpu()
    base = (SequenceStats.cat(base_chunks) if base is None else base).cpu()
    return Sweep(
        parts=parts, etas=torch.tensor(eta_list, dtype=torch.float64), base=base, logprobs=logprobs, entropies=entropies
    )


def base_statistics(model: nn.Module, batch: SequenceBatch, forcing: TeacherForcing) -> SequenceStats:
    """Statistics of E at theta (the eta = 0 point), chunked, no grad."""
    return sweep(model, batch, {}, [], forcing).base
