"""Sharded policies (FSDP2 ``fully_shard``): probe's own forwards over the shards, one unit gathered at a time.

docs/DESIGN.md section 11. A policy sharded by ``torch.distributed.fsdp.fully_shard`` holds every parameter as a
``DTensor`` whose local tensor is this rank's rows (dim-0 shards). probe does not run FSDP2's own forward hooks:
they install FSDP2's gathered parameters and would override what probe puts there (theta + eta * d, a tangent, a
differentiable gather). Instead :meth:`ShardedPolicy.gathered` switches FSDP2's hooks off for the duration and
installs its own on the same units (the modules ``fully_shard`` was applied to):

* the root unit (embeddings, final norm, output head: what no inner unit owns) is gathered on entry and kept to the
  end, because the chunked head (``probe.head``) calls the output embedding once per chunk of tokens, and ranks
  hold different numbers of tokens: every collective must happen the same number of times on every rank;
* every inner unit (a decoder layer) is gathered in its forward pre-hook and released in its forward hook, so a
  forward holds the shards, the root unit and one gathered layer.

What a parameter becomes once gathered is the ``value`` of the context:

* :meth:`ShardedPolicy.shift` ``theta + eta * d`` with ``torch.add(theta, d, alpha=eta)``: the arithmetic of the
  unsharded sweep, element for element (theta itself is never written, so it is restored bitwise);
* :meth:`ShardedPolicy.along` ``theta + eta * d`` with ``eta`` a (forward-mode dual) scalar tensor: the tangent of
  every gathered parameter is then exactly ``d``, so ``torch.func.jvp`` over ``eta`` gives the directional
  derivatives of the unsharded JVP (the all-gather is linear: gathering theta and d separately and combining them
  after is exact);
* :meth:`ShardedPolicy.differentiable` a gather whose backward takes this rank's rows of the gathered gradient, for
  reverse passes over data every rank holds whole (U in the reconstruction and the attribution, E in the
  attribution): every rank computes the same full gradient of each layer and keeps its own rows, so no collective
  runs during a backward except the re-gathers below. Saved-tensor hooks replace a gathered layer's weights in
  the autograd graph by their name and re-gather them when the backward needs them, so the graph holds no
  gathered layer either.

Every rank must make the same calls in the same order (the gathers are collectives).
"""

from __future__ import annotations

import logging
import weakref
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Mapping, Sequence

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.func import jvp

try:  # torch >= 2.6: FSDP2 and DTensor are public
    from torch.distributed.fsdp import FSDPModule
    from torch.distributed.tensor import DTensor, distribute_tensor
except ImportError:  # pragma: no cover - a torch without them has no sharded policies either
    FSDPModule = DTensor = None  # type: ignore[assignment,misc]
    distribute_tensor = None  # type: ignore[assignment]

Value = Callable[[str], Tensor]  # canonical parameter name -> the full tensor a forward uses for it


def is_dtensor(t: Any) -> bool:
    return DTensor is not None and isinstance(t, DTensor)


def sharded_view(model: nn.Module) -> "ShardedPolicy | None":
    """The :class:`ShardedPolicy` of a policy sharded with ``fully_shard`` (the policy itself is an FSDP2 module,
    whether its parameters are sharded or gathered by FSDP2 at this moment), None for an ordinary one."""
    if FSDPModule is not None and isinstance(model, FSDPModule):
        return ShardedPolicy.of(model)
    if model in _ORDINARY:  # (every teacher-forcing pass asks: the parameters are looked through once)
        return None
    if any(is_dtensor(p) for p in model.parameters()):
        raise ValueError(
            f"the policy ({type(model).__name__}) holds DTensor parameters but was not itself sharded with "
            "torch.distributed.fsdp.fully_shard (only some of its modules were, or another DTensor plan was used); "
            "probe gathers a sharded policy by its FSDP2 units, the policy itself the root. Fix: call "
            "fully_shard(policy) after its layers (probe.sharding.shard_policy does both)"
        )
    _ORDINARY.add(model)
    return None


_ORDINARY: "weakref.WeakSet[nn.Module]" = weakref.WeakSet()  # policies seen to hold no DTensor


def from_rows(rows: Tensor, reference: Tensor) -> Tensor:
    """This rank's ``rows`` as a DTensor laid out like ``reference`` (no communication)."""
    return DTensor.from_local(
        rows, reference.device_mesh, reference.placements, shape=reference.shape, stride=reference.stride()
    )


def full(t: Tensor) -> Tensor:
    """The whole tensor: ``t`` itself, or a DTensor's gather (a collective: call it on every rank), detached.

    The gather runs with torch.func's transforms off (a DTensor does not pass through them); forward-mode tangents
    are added after the gather (:meth:`ShardedPolicy.along`)."""
    if not is_dtensor(t):
        return t.detach()
    with torch._C._DisableFuncTorch(), torch.no_grad():
        return _gather_rows(t._local_tensor, t)


def _row_range(n: int, rank: int, world: int) -> tuple[int, int]:
    """Rows ``[start, stop)`` of a dim-0 shard (``torch.chunk`` layout, FSDP2's and DTensor's ``Shard(0)``)."""
    per = -(-n // world)
    start = min(rank * per, n)
    return start, min(start + per, n)


def _gather_rows(rows: Tensor, reference: Tensor) -> Tensor:
    """The whole tensor from every rank's rows of a dim-0 sharded DTensor ``reference`` (one all-gather; plain
    tensors only, so it also runs inside torch.func transforms)."""
    mesh, placements = reference.device_mesh, reference.placements
    if mesh.ndim != 1 or len(placements) != 1 or not placements[0].is_shard(0):
        return reference.full_tensor()  # another layout: DTensor's own redistribution (no transforms inside)
    group, world = mesh.get_group(), mesh.size()
    n = reference.shape[0]
    per = -(-n // world)
    padded = torch.zeros((per * world, *reference.shape[1:]), dtype=rows.dtype, device=rows.device)
    mine = torch.zeros((per, *reference.shape[1:]), dtype=rows.dtype, device=rows.device)
    mine[: rows.shape[0]] = rows
    dist.all_gather_into_tensor(padded, mine, group=group)
    return padded[:n]


def local(t: Tensor) -> Tensor:
    """This rank's part: a DTensor's local tensor, or ``t`` itself."""
    return t.to_local() if is_dtensor(t) else t


def like(value: Tensor, reference: Tensor) -> Tensor:
    """``value`` (a whole tensor, the same on every rank) laid out like ``reference``: a copy of this rank's rows as
    a DTensor of ``reference``'s mesh and placements when ``reference`` is one (no communication; ``value`` can be
    freed after), else ``value``."""
    if not is_dtensor(reference) or is_dtensor(value):
        return value
    mesh, placements = reference.device_mesh, reference.placements
    if mesh.ndim != 1 or len(placements) != 1 or not placements[0].is_shard(0):
        return distribute_tensor(value, mesh, placements, src_data_rank=None)
    start, stop = _row_range(value.shape[0], mesh.get_local_rank(), mesh.size())
    return from_rows(value[start:stop].clone(), reference)


def global_sum(values: Sequence[Tensor]) -> Tensor:
    """The sum of every element of ``values`` over all ranks (DTensors: each rank sums its rows, one all-reduce)."""
    total = sum((local(v).sum() for v in values), torch.zeros((), dtype=torch.float64))
    reference = next((v for v in values if is_dtensor(v)), None)
    return all_reduce_sum(total, reference) if reference is not None else total


def all_reduce_sum(t: Tensor, reference: Tensor | None = None) -> Tensor:
    """``t`` summed over the ranks of ``reference``'s mesh (every rank of the default group when None);
    ``t`` itself when nothing is distributed."""
    if reference is not None and not is_dtensor(reference):
        return t
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return t
    group = reference.device_mesh.get_group() if reference is not None else None
    out = t.to(local(reference).device if reference is not None else t.device, copy=True)  # (NCCL: on the GPU)
    dist.all_reduce(out, group=group)
    return out.to(t.device)


class _GatherRows(torch.autograd.Function):
    """Gather a sharded parameter from its local rows; the backward keeps this rank's rows of the gradient
    (exact when every rank computed the same gradient: the reverse passes run on data every rank holds whole)."""

    @staticmethod
    def forward(ctx: Any, rows: Tensor, param: Tensor) -> Tensor:  # [rows, ...] -> [*param.shape]
        ctx.param = param
        return full(param)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None]:
        mesh = ctx.param.device_mesh
        start, stop = _row_range(grad.shape[0], mesh.get_local_rank(), mesh.size())
        return grad[start:stop].clone(), None  # (a copy: a view would keep the whole layer's gradient alive)


@dataclass
class _Unit:
    """One FSDP2 unit: the module ``fully_shard`` was applied to and the parameters it (not an inner unit) owns."""

    module: nn.Module
    names: list[str]
    fsdp_hooks: list[tuple[dict, int, Any, list]] = field(default_factory=list)  # (hook dict, id, hook, order), off


_POLICIES: "weakref.WeakKeyDictionary[nn.Module, ShardedPolicy]" = weakref.WeakKeyDictionary()


class ShardedPolicy:
    """Forwards of a sharded policy with its parameters gathered one FSDP2 unit at a time (module docstring)."""

    @classmethod
    def of(cls, model: nn.Module) -> "ShardedPolicy":
        """The (cached) view of ``model``."""
        view = _POLICIES.get(model)
        if view is None:
            view = _POLICIES[model] = cls(model)
        return view

    def __init__(self, model: nn.Module) -> None:
        if FSDPModule is None or not isinstance(model, FSDPModule):
            raise ValueError("ShardedPolicy needs a policy sharded with torch.distributed.fsdp.fully_shard")
        self.model = model
        unit_modules = [m for m in model.modules() if isinstance(m, FSDPModule)]  # the policy itself first
        for module in unit_modules:  # FSDP2 may hold a unit gathered (the root after a forward): shards first
            module.reshard()
        self.params: dict[str, Tensor] = dict(model.named_parameters())  # canonical names (tied ones once)
        canonical = {id(p): n for n, p in self.params.items()}
        self.slots: dict[str, list[tuple[nn.Module, str]]] = {n: [] for n in self.params}  # every module slot
        for module in model.modules():
            for attr, p in module._parameters.items():
                if p is not None and id(p) in canonical:
                    self.slots[canonical[id(p)]].append((module, attr))
        owner = self._owners(unit_modules)
        self.units = [_Unit(module, [n for n in self.params if owner.get(n) is module]) for module in unit_modules]
        self.root, self.inner = self.units[0], self.units[1:]
        self._value: Value | None = None
        self._reverse = False  # a differentiable gather: the graph saves gathered layers by name
        self._gathered: dict[str, Tensor] = {}  # name -> the full tensor installed now
        self._saved: dict[int, str] = {}  # storage pointer of an inner unit's gathered theta -> name (reverse passes)

    def _owners(self, units: list[nn.Module]) -> dict[str, nn.Module]:
        """Parameter name -> the innermost unit whose subtree holds it."""
        out: dict[str, nn.Module] = {}
        ids = {id(p): n for n, p in self.params.items()}
        for unit in units:  # model.modules() order: outer units first, so inner ones overwrite
            for p in unit.parameters():
                if id(p) in ids:
                    out[ids[id(p)]] = unit
        return out

    # -----------------------------------------------------------------------------------------
    # what a gathered parameter becomes

    def theta(self) -> Value:
        """theta itself (no grad)."""
        return lambda name: full(self.params[name])

    def shift(self, direction: Mapping[str, Tensor], eta: float) -> Value:
        """``torch.add(theta, d, alpha=eta)`` where ``direction`` (DTensors laid out like the parameters, in their
        dtype) has an entry, theta elsewhere: the sweep's arithmetic."""

        def value(name: str) -> Tensor:
            param, d = self.params[name], direction.get(name)
            theta = full(param)
            if d is None:
                return theta
            if is_dtensor(param):  # theta was gathered into a fresh tensor: shift it there (the same arithmetic)
                return theta.add_(full(d), alpha=eta)
            return torch.add(theta, full(d), alpha=eta)

        return value

    def along(self, direction: Mapping[str, Tensor], eta: Tensor) -> Value:
        """``theta + eta * d`` with ``eta`` a scalar tensor (a forward-mode dual under ``torch.func.jvp``)."""

        def value(name: str) -> Tensor:
            theta = full(self.params[name])
            d = direction.get(name)
            return theta if d is None else theta + eta * full(d)

        return value

    def differentiable(self, rows: Mapping[str, Tensor]) -> Value:
        """theta gathered from ``rows`` (name -> this rank's rows, leaves that require grad): a backward gives each
        leaf this rank's rows of the gradient. Only for passes over data every rank holds whole."""

        def value(name: str) -> Tensor:
            leaf = rows.get(name)
            if leaf is None:
                return full(self.params[name])
            return _GatherRows.apply(leaf, self.params[name])

        value.reverse = True  # type: ignore[attr-defined]
        return value

    # -----------------------------------------------------------------------------------------
    # derivatives

    def directional(
        self, fn: Callable[[], Any], direction: Mapping[str, Tensor], *, order: int = 1, eta: float = 0.0
    ) -> tuple[Any, Any, Any]:
        """``(value, first, second)`` of ``fn()`` (a tuple of tensors computed by forwards of the policy) at
        ``theta + eta * d`` and its first (and, ``order=2``, second) derivatives along ``direction``: a JVP (of a
        JVP) over the scalar eta; ``second`` is None for ``order=1``."""

        def at(e: Tensor) -> Any:
            with self.gathered(self.along(direction, e)):
                return fn()

        e0 = torch.tensor(float(eta), dtype=torch.float64)
        one = torch.ones((), dtype=torch.float64)
        if order == 1:
            value, first = jvp(at, (e0,), (one,))
            return value, first, None
        (value, first), (_, second) = jvp(lambda e: jvp(at, (e,), (one,)), (e0,), (one,))
        return value, first, second

    def gradient(self, fn: Callable[[], Tensor], names: Sequence[str]) -> tuple[Tensor, dict[str, Tensor]]:
        """``(fn(), grads)``: a scalar ``fn()`` computed by forwards of the policy at theta, and its gradient with
        respect to the parameters ``names`` as DTensors laid out like them (None where it does not depend on one).
        Every rank must compute the same ``fn`` on the same data."""
        rows = {n: local(self.params[n]).detach().requires_grad_(True) for n in names}
        with torch.enable_grad(), self.gathered(self.differentiable(rows)):
            out = fn()
            grads = torch.autograd.grad(out, list(rows.values()), allow_unused=True)
        by_name = {n: None if g is None else from_rows(g, self.params[n]) for n, g in zip(names, grads)}
        return out.detach(), by_name  # type: ignore[return-value]

    # -----------------------------------------------------------------------------------------
    # the forward

    @property
    def active(self) -> bool:
        """Whether a :meth:`gathered` context is open (forwards inside it need nothing more)."""
        return self._value is not None

    def _install(self, unit: _Unit) -> None:
        assert self._value is not None
        for name in unit.names:
            t = self._value(name)
            self._gathered[name] = t
            if unit is not self.root and self._reverse:
                self._saved[t.untyped_storage().data_ptr()] = name
            for module, attr in self.slots[name]:
                module._parameters[attr] = t  # type: ignore[assignment]  # a plain tensor for this forward

    def _release(self, unit: _Unit) -> None:
        for name in unit.names:
            t = self._gathered.pop(name, None)
            if t is not None and self._reverse:
                self._saved.pop(t.untyped_storage().data_ptr(), None)
            for module, attr in self.slots[name]:
                module._parameters[attr] = self.params[name]  # type: ignore[assignment]

    def _pack(self, t: Tensor) -> Any:
        name = self._saved.get(t.untyped_storage().data_ptr()) if t.device.type != "meta" else None
        if name is None:
            return t
        return (name, t.dtype, tuple(t.shape), t.stride(), t.storage_offset())

    def _unpack(self, packed: Any) -> Tensor:
        if isinstance(packed, Tensor):
            return packed
        name, dtype, shape, stride, offset = packed
        return full(self.params[name]).to(dtype).as_strided(shape, stride, offset)

    def _fsdp_hooks_off(self, unit: _Unit) -> None:
        """Take FSDP2's forward hooks off ``unit`` (restored by :meth:`_fsdp_hooks_on`)."""
        module = unit.module
        state = module._get_fsdp_state()  # type: ignore[operator]
        ids = set()
        for attr in ("_pre_forward_hook_handle", "_post_forward_hook_handle"):
            handle = getattr(state, attr, None)
            for h in getattr(handle, "handles", (handle,)):  # a grouped unit keeps a tuple of handles
                if h is not None:
                    ids.add(h.id)
        for hooks in (module._forward_pre_hooks, module._forward_hooks):
            order = list(hooks)  # to put FSDP2's hooks back in their places
            for key in [k for k in order if k in ids]:
                unit.fsdp_hooks.append((hooks, key, hooks[key], order))
        if not any(kind is module._forward_pre_hooks for kind, *_ in unit.fsdp_hooks):
            raise RuntimeError(
                f"FSDP2's forward pre-hook of {type(module).__name__} was not found where torch "
                f"{torch.__version__} should keep it, so probe cannot set it aside for its own gathered forwards "
                "(FSDP2's would overwrite what probe computes). probe.sharding was written against torch 2.13's "
                "fully_shard; run the probe on one process or with DDP on this torch"
            )
        for hooks, key, _, _ in unit.fsdp_hooks:
            del hooks[key]

    @staticmethod
    def _fsdp_hooks_on(unit: _Unit) -> None:
        for hooks, key, hook, order in unit.fsdp_hooks:
            hooks[key] = hook
            for k in order:  # every hook in its original place (probe's own are gone by now)
                if k in hooks:
                    hooks.move_to_end(k)
        unit.fsdp_hooks.clear()

    @contextmanager
    def gathered(self, value: Value | None = None) -> Iterator[None]:
        """Forwards of ``self.model`` inside see every parameter as ``value(name)`` (default: theta), gathered one
        unit at a time; FSDP2's own forward hooks are off meanwhile. Not re-entrant."""
        if self._value is not None:
            raise RuntimeError("ShardedPolicy.gathered is not re-entrant")
        for unit in self.units:  # every FSDP2 unit sharded (a no-op where it is): its DTensors are the parameters
            unit.module.reshard()  # type: ignore[operator]
        self._value = value or self.theta()
        self._reverse = bool(getattr(self._value, "reverse", False))
        with ExitStack() as stack:
            stack.callback(self._clear)  # (last out: the parameters back to their shards, whatever failed)
            for unit in self.units:
                self._fsdp_hooks_off(unit)
                stack.callback(self._fsdp_hooks_on, unit)
            for unit in self.inner:
                pre = unit.module.register_forward_pre_hook(lambda m, a, unit=unit: self._install(unit))
                post = unit.module.register_forward_hook(
                    lambda m, a, o, unit=unit: self._release(unit), always_call=True
                )
                stack.callback(pre.remove)
                stack.callback(post.remove)
            if self._reverse:
                stack.enter_context(torch.autograd.graph.saved_tensors_hooks(self._pack, self._unpack))
            self._install(self.root)
            yield

    def _clear(self) -> None:
        for unit in self.units:
            self._release(unit)
        self._value = None
        self._reverse = False
        self._saved.clear()


def decoder_layers(model: nn.Module) -> list[nn.Module]:
    """The policy's repeated blocks, by the class names its ``_no_split_modules`` lists (HF models name their
    decoder layer there; a PEFT model's base model is asked)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    names = set(getattr(base, "_no_split_modules", None) or [])
    return [m for m in model.modules() if type(m).__name__ in names]


def shard_policy(model: nn.Module, mesh: Any) -> int:
    """``fully_shard`` every decoder layer of ``model`` over the 1-D ``mesh``, then the whole policy (the root unit:
    embeddings, final norm, head); returns the number of layers. Parameters are sharded by rows (dim 0)."""
    from torch.distributed.fsdp import fully_shard

    layers = decoder_layers(model)
    if not layers:
        raise ValueError(
            f"{type(model).__name__} names no decoder layer class in _no_split_modules, so probe cannot shard it per "
            "layer. Fix: run it without the model-parallel strategy (one process, or DDP)"
        )
    for layer in layers:
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return len(layers)


def on_every_rank(flag: bool, model: nn.Module) -> bool:
    """``flag`` and-ed over the ranks a sharded ``model`` spans (one all-reduce); ``flag`` itself otherwise. Loops
    of forwards that may stop early (sampling) stop together, since each forward of a sharded policy is a
    collective."""
    if sharded_view(model) is None or not dist.is_initialized():
        return flag
    reference = next(p for p in ShardedPolicy.of(model).params.values() if is_dtensor(p))
    t = torch.tensor([0 if flag else 1], dtype=torch.int64, device=local(reference).device)  # (NCCL: on the GPU)
    dist.all_reduce(t, group=reference.device_mesh.get_group())
    return int(t.item()) == 0


def shard_on_mesh(model: nn.Module, mesh: Any) -> None:
    """What a LightningModule's ``configure_model`` does with its policy: under ``ModelParallelStrategy`` (a device
    mesh of ``data_parallel`` x ``tensor_parallel``) shard it with FSDP2 over the data-parallel ranks, per decoder
    layer; under any other strategy (no mesh), or when it is sharded already, leave it as it is."""
    if mesh is None or (FSDPModule is not None and isinstance(model, FSDPModule)):
        return
    names = mesh.mesh_dim_names or ()
    if "tensor_parallel" in names and mesh["tensor_parallel"].size() > 1:
        raise ValueError(
            f"probe shards the policy with FSDP2 only (tensor parallelism is not supported), but the strategy has "
            f"tensor_parallel_size {mesh['tensor_parallel'].size()}. Fix: set the strategy's data_parallel_size to "
            "the number of processes and tensor_parallel_size: 1 (configs/toy_fsdp.yaml)"
        )
    dp = mesh["data_parallel"] if "data_parallel" in names else mesh
    layers = shard_policy(model, dp)
    logging.getLogger("probe").info(
        "policy sharded with FSDP2 over %d processes: %d decoder layers + the root", dp.size(), layers
    )
