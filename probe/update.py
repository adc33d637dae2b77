"""Exact reconstruction of the next Adam/AdamW step and its per-sequence parts (docs/DESIGN.md sections 2 and 5).

For every trained parameter p with optimizer state (m, v, step) the step that
``torch.optim.AdamW.step()`` / ``torch.optim.Adam.step()`` will take is ``lr_g * u`` with

    t   = step + 1 ;  bc1 = 1 - beta1^t ;  bc2 = 1 - beta2^t
    g~  = coef * g  (+ wd * p for Adam's L2 decay)        coef: clip_grad_norm_'s coefficient
    v'  = beta2 * v + (1 - beta2) * g~^2                   (amsgrad: max(vmax, v'))
    D   = 1 / (sqrt(v') / sqrt(bc2) + eps)
    u   = baseline + grad
    baseline = -wd * p - (1/bc1) * beta1 * m * D           (AdamW)
             = -(1/bc1) * (beta1 * m + (1 - beta1) * wd * p) * D   (Adam, L2 decay)
    grad     = -(1/bc1) * (1 - beta1) * coef * g * D  =  sum_i v_i ,   v_i = K * g_i
    K        = -(1/bc1) * (1 - beta1) * coef * D       (the ``scale`` of :class:`Update`)

with D frozen at the full-batch v'. Parts are given **per unit of a reference learning rate**
``lr_ref = max_g lr_g`` (the largest group lr; with one group it is simply the optimizer's lr):
each group's parts are multiplied by ``lr_g / lr_ref``, so ``theta + lr_ref * full`` is the real
step for every group at once and eta = ``Update.lr`` reproduces it.

The reconstruction computes the gradient with one forward+backward over U (``torch.autograd.grad``,
so ``.grad`` is never touched) and never writes to the model or the optimizer.
"""

from __future__ import annotations

import json
import logging
import math
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Mapping, Sequence

import torch
from torch import Tensor, nn
from torch.func import jvp

from probe.adam import AdamHyper, AdamState, ParamAdamState
from probe.batch import SequenceBatch, collate
from probe.logprobs import teacher_force
from probe.losses import ClipCounts, LossConfig, Normalisers, normalisers, per_sequence_loss, per_token_loss
from probe.precision import autocast, dtype_name, math_attention, resolve_dtype
from probe.sharding import all_reduce_sum, full, global_sum, is_dtensor, local, sharded_view

PARTS = ("full", "baseline", "grad")
# U's old_logprobs are reported as another policy's when more of its response tokens have a PPO ratio outside the
# clip range than this (right after sampling every ratio is 1)
MAX_RATIO_OUTSIDE_FRACTION = 0.9

log = logging.getLogger("probe")

# --------------------------------------------------------------------------------------
# settings and result
# --------------------------------------------------------------------------------------


@dataclass
class ReconstructionConfig:
    """How the trainer computed the gradient of the step being reconstructed.

    Args:
        max_grad_norm: global-norm gradient clipping as ``torch.nn.utils.clip_grad_norm_``
            (and Lightning's ``gradient_clip_val``); None: no clipping.
        microbatch_size: sequences per forward/backward; gradients are accumulated and the loss
            normalisers come from the whole U, so the result equals one big batch.
        autocast_dtype: ``bfloat16``/``float16`` to run the forward under ``torch.autocast``
            as a mixed-precision trainer does; None: the model's own dtype.
        grad_scale: loss scale of a ``GradScaler`` (fp16): the backward is of ``loss * scale``
            and gradients are multiplied by the float32 inverse scale before clipping.
        head_dtype: precision of the final log-softmax (``TeacherForcing.head_dtype`` of the loss's pass).
        parts_dtype: dtype of the stored parts; default float32, or float64 for float64 parameters.
    """

    max_grad_norm: float | None = None
    microbatch_size: int | None = None
    autocast_dtype: str | None = None  # a dtype name (a torch.dtype is accepted too, from Python)
    grad_scale: float | None = None
    head_dtype: str | None = "float64"
    parts_dtype: str | None = None

    def __post_init__(self) -> None:
        for name in ("autocast_dtype", "head_dtype", "parts_dtype"):
            resolve_dtype(getattr(self, name))  # an unknown dtype name is refused here, naming the key
        if self.max_grad_norm is not None and not self.max_grad_norm > 0:
            raise ValueError(
                f"reconstruction.max_grad_norm must be > 0 (or null: no clipping), got {self.max_grad_norm}"
            )
        if self.microbatch_size is not None and self.microbatch_size < 1:
            raise ValueError(
                f"reconstruction.microbatch_size must be >= 1 (or null: all of U), got {self.microbatch_size}"
            )


@dataclass
class Update:
    """The next optimizer step per unit reference learning rate, split into parts.

    ``lr * full`` is the change ``optimizer.step()`` makes to each trained parameter;
    ``full = baseline + grad`` and ``grad = sum_i v_i`` with ``v_i = scale * g_i``
    (``g_i`` the unclipped, unscaled gradient of sequence i's loss term ``c_i``).
    Parameters that get no gradient (frozen, or not touched by the loss) have no entry:
    the optimizer does not move them.
    """

    full: dict[str, Tensor]
    baseline: dict[str, Tensor]
    grad: dict[str, Tensor]
    scale: dict[str, Tensor]  # K: v_i = scale * g_i
    lr: float  # reference lr (max group lr); eta = lr reproduces the real step
    group_lr: dict[str, float]  # lr of each parameter's group
    clip_coef: float  # min(1, max_norm / (||g|| + 1e-6)); 1 without clipping
    grad_norm: float  # ||g|| before clipping (after unscaling)
    norms: dict[str, float]  # L2 norms of the parts (per unit lr) and of the clipped gradient
    n_sequences: int | None = None
    n_tokens: int | None = None
    loss: LossConfig | None = None
    normalisers: Normalisers | None = None
    loss_value: float | None = None  # L = sum_i c_i on U
    autocast_dtype: torch.dtype | None = None
    grad_scale: float | None = None
    head_dtype: torch.dtype | None = torch.float64
    max_grad_norm: float | None = None
    # with loss.use_old_logprobs: the fractions of U's response tokens whose PPO ratio lies outside the clip range
    # (``outside_fraction``) and whose gradient the clip zeroes (``clipped_fraction``, verl's pg_clipfrac)
    ppo_clip: dict[str, float] | None = None

    def summary(self) -> dict[str, Any]:
        """The step's scalars as ``summary.json`` and the live ``records.jsonl`` hold them (``update``);
        ``ppo_clip`` only where the loss used U's old_logprobs."""
        out = {
            "lr": self.lr,
            "clip_coef": self.clip_coef,
            "grad_norm": self.grad_norm,
            "norms": self.norms,
            "n_sequences": self.n_sequences,
            "n_tokens": self.n_tokens,
            "loss_value": self.loss_value,
        }
        if self.ppo_clip is not None:
            out["ppo_clip"] = self.ppo_clip
        return out

    def parts(self) -> dict[str, dict[str, Tensor]]:
        """``{"full": ..., "baseline": ..., "grad": ...}`` keyed by parameter name."""
        return {"full": self.full, "baseline": self.baseline, "grad": self.grad}

    def parts_with_scale(self) -> dict[str, dict[str, Tensor]]:
        """:meth:`parts` and ``scale`` (K), as the update file holds them."""
        return {**self.parts(), "scale": self.scale}

    @property
    def names(self) -> list[str]:
        return list(self.full)

    def save(self, path: str | Path) -> Path:
        """Write ``update.safetensors``: ``full.<name>``, ``baseline.<name>``, ``grad.<name>``
        (docs/DESIGN.md section 9) plus ``scale.<name>`` and the scalars as JSON metadata.

        A sharded update (DTensor parts) is written by every rank, each its own rows, to
        ``<stem>.shard-<r>-of-<N>.safetensors`` (:meth:`load` reads them back whole); the path of this rank's file
        is returned. Call it on every rank then."""
        from safetensors.torch import save_file

        path = Path(path)
        sharded = next((t for t in self.full.values() if is_dtensor(t)), None)
        shard_meta = {}
        if sharded is not None:
            mesh = sharded.device_mesh
            rank, world = mesh.get_local_rank(), mesh.size()
            path = path.with_name(f"{path.stem}.shard-{rank}-of-{world}{path.suffix}")
            shard_meta = {"rank": rank, "world": world}
        tensors = {
            f"{part}.{name}": local(t.detach()).contiguous().cpu()
            for part, d in self.parts_with_scale().items()
            for name, t in d.items()
        }
        meta = {
            "lr": self.lr,
            "group_lr": self.group_lr,
            "clip_coef": self.clip_coef,
            "grad_norm": self.grad_norm,
            "norms": self.norms,
            "n_sequences": self.n_sequences,
            "n_tokens": self.n_tokens,
            "loss": None if self.loss is None else asdict(self.loss),
            "normalisers": None if self.normalisers is None else asdict(self.normalisers),
            "loss_value": self.loss_value,
            "autocast_dtype": dtype_name(self.autocast_dtype),
            "grad_scale": self.grad_scale,
            "head_dtype": dtype_name(self.head_dtype),
            "max_grad_norm": self.max_grad_norm,
            "ppo_clip": self.ppo_clip,
        }
        if shard_meta:
            shard_meta["shapes"] = {
                f"{part}.{name}": list(t.shape) for part, d in self.parts_with_scale().items() for name, t in d.items()
            }
            meta["shard"] = shard_meta
        path.parent.mkdir(parents=True, exist_ok=True)
        save_file(tensors, str(path), metadata={"format": "probe.update/1", "probe_update": json.dumps(meta)})
        return path

    @classmethod
    def load(cls, path: str | Path) -> "Update":
        """Read a file written by :meth:`save` (``scale`` is empty if the file has none)."""
        from safetensors import safe_open

        path = Path(path)
        shards = sorted(path.parent.glob(f"{path.stem}.shard-*-of-*{path.suffix}")) if not path.is_file() else []
        if not path.is_file() and not shards:
            raise FileNotFoundError(f"no update file at {path}; write one with Update.save(path) or `--save_update`")
        parts: dict[str, dict[str, Tensor]] = {"full": {}, "baseline": {}, "grad": {}, "scale": {}}
        rows: dict[str, list[Tensor]] = {}
        metas = []
        for file in shards or [path]:
            with safe_open(str(file), framework="pt") as f:
                raw_meta = (f.metadata() or {}).get("probe_update")
                if raw_meta is None:
                    raise ValueError(f"{file} has no probe update metadata; it was not written by Update.save")
                metas.append(json.loads(raw_meta))
                for key in f.keys():
                    rows.setdefault(key, []).append(f.get_tensor(key))
        meta = metas[0]
        if shards:  # a sharded update: every rank's rows, in rank order
            world = meta["shard"]["world"]
            if sorted(m["shard"]["rank"] for m in metas) != list(range(world)) or len(metas) != world:
                raise ValueError(
                    f"{path.parent} holds {len(metas)} shard files of {path.stem} but they were written by {world} "
                    "ranks (one is missing or from another run); rerun the probe to write them again"
                )
            order = sorted(range(world), key=lambda i: metas[i]["shard"]["rank"])
            rows = {key: [pieces[i] for i in order] for key, pieces in rows.items()}
        for key, pieces in rows.items():
            part, _, name = key.partition(".")
            if part in parts:
                t = pieces[0] if len(pieces) == 1 else torch.cat(pieces)
                if shards and list(t.shape) != meta["shard"]["shapes"][key]:
                    raise ValueError(f"the shards of {key} in {path.parent} do not add up to its shape")
                parts[part][name] = t
        return cls(
            full=parts["full"],
            baseline=parts["baseline"],
            grad=parts["grad"],
            scale=parts["scale"],
            lr=meta["lr"],
            group_lr=meta["group_lr"],
            clip_coef=meta["clip_coef"],
            grad_norm=meta["grad_norm"],
            norms=meta["norms"],
            n_sequences=meta["n_sequences"],
            n_tokens=meta["n_tokens"],
            loss=None if meta["loss"] is None else LossConfig(**meta["loss"]),
            normalisers=None if meta["normalisers"] is None else Normalisers(**meta["normalisers"]),
            loss_value=meta["loss_value"],
            autocast_dtype=resolve_dtype(meta["autocast_dtype"]),
            grad_scale=meta["grad_scale"],
            head_dtype=resolve_dtype(meta["head_dtype"]),
            max_grad_norm=meta["max_grad_norm"],
            ppo_clip=meta.get("ppo_clip"),  # absent in files written before it was recorded
        )


# --------------------------------------------------------------------------------------
# the Adam/AdamW math (pure functions)
# --------------------------------------------------------------------------------------


@dataclass
class StepParts:
    """One parameter's step per unit reference lr (``baseline + grad``) and K (``v_i = K * g_i``)."""

    baseline: Tensor  # [*p]
    grad: Tensor  # [*p]
    scale: Tensor  # [*p]  K, v_i = K * g_i


@torch.no_grad()
def adam_step_parts(
    param: Tensor,  # [*p]  current value
    grad: Tensor,  # [*p]  gradient the optimizer sees: unscaled and clipped, before L2 decay
    state: ParamAdamState,  # m, v (vmax) after state.step steps; empty at step 0
    hyper: AdamHyper,
    clip_coef: float = 1.0,  # coefficient already applied to ``grad``; enters K only
    lr_scale: float = 1.0,  # lr_g / lr_ref
    dtype: torch.dtype = torch.float64,  # compute (and output) precision
) -> StepParts:
    """Split one parameter's Adam/AdamW step (per unit lr) into baseline and gradient parts (module docstring).

    Written with few temporaries (in place on fresh tensors only; inputs are never modified),
    as it runs over every trained parameter.
    """
    t = state.step + 1
    beta1, beta2, wd = hyper.beta1, hyper.beta2, hyper.weight_decay
    bc1 = 1.0 - beta1**t
    bc2_sqrt = (1.0 - beta2**t) ** 0.5
    p = param.detach().to(dtype)  # [*p]  (may alias param: read only)
    g = grad.detach().to(device=p.device, dtype=dtype)  # [*p]  (may alias grad: read only)
    read = lambda x: None if x is None else x.to(device=p.device, dtype=dtype)  # noqa: E731
    m, v = read(state.exp_avg), read(state.exp_avg_sq)  # None at step 0: zeros
    l2 = (not hyper.decoupled) and wd != 0.0
    g_seen = torch.add(g, p, alpha=wd) if l2 else g  # [*p]  what the moments see
    D = torch.mul(g_seen, g_seen).mul_(1.0 - beta2)  # [*p]  v' = beta2 v + (1-beta2) g~^2 ...
    if v is not None:
        D.add_(v, alpha=beta2)
    if hyper.amsgrad and state.max_exp_avg_sq is not None:
        torch.maximum(D, read(state.max_exp_avg_sq), out=D)  # ... amsgrad: max(vmax, v')
    D.sqrt_().div_(bc2_sqrt).add_(hyper.eps).reciprocal_()  # ... D = 1 / (sqrt(v')/sqrt(bc2) + eps)
    c = -(1.0 - beta1) / bc1 * lr_scale
    grad_part = torch.mul(g, D).mul_(c)  # [*p]  -(1/bc1)(1-beta1) g D
    K = torch.mul(D, c * clip_coef)  # [*p]  v_i = K g_i
    if m is not None:
        momentum = torch.mul(m, beta1)  # [*p]  beta1 m (+ (1-beta1) wd p for L2)
        if l2:
            momentum.add_(p, alpha=(1.0 - beta1) * wd)
    elif l2:
        momentum = torch.mul(p, (1.0 - beta1) * wd)
    else:
        momentum = None
    baseline = torch.zeros_like(p) if momentum is None else momentum.mul_(D).mul_(-lr_scale / bc1)  # [*p]
    if hyper.decoupled and wd != 0.0:
        baseline.add_(p, alpha=-wd * lr_scale)  # AdamW's decay, -wd p
    return StepParts(baseline=baseline, grad=grad_part, scale=K)


@torch.no_grad()
def clip_coefficient(grads: Sequence[Tensor], max_grad_norm: float | None) -> tuple[Tensor, Tensor]:
    """``(total_norm, coef)`` exactly as ``torch.nn.utils.clip_grad_norm_`` computes them (dtype included):
    ``coef = clamp(max_norm / (||g|| + 1e-6), max=1)``; ``coef = 1`` when ``max_grad_norm`` is None."""
    get_total_norm = getattr(torch.nn.utils, "get_total_norm", None)
    if get_total_norm is not None:
        total = get_total_norm(list(grads), 2.0)
        total = full(total)  # a sharded gradient's norm (a DTensor of partial norms) reduced over the ranks
    else:  # torch < 2.6: the same computation
        total = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g, 2.0) for g in grads]), 2.0)
    if max_grad_norm is None:
        return total, torch.ones((), dtype=total.dtype, device=total.device)
    if not max_grad_norm > 0:
        raise ValueError(f"max_grad_norm must be > 0 (or None for no clipping), got {max_grad_norm}")
    coef = torch.clamp(float(max_grad_norm) / (total + 1e-6), max=1.0)
    return total, coef


def unscale_gradient(grad: Tensor, grad_scale: Tensor) -> Tensor:
    """``grad * inv_scale`` with the float32 inverse scale, as ``GradScaler.unscale_`` does."""
    inv_scale = grad_scale.double().reciprocal().float()  # [] float32
    return grad * inv_scale.to(grad.device)


def adam_update(
    params: Mapping[str, Tensor],
    grads: Mapping[str, Tensor],  # unscaled and CLIPPED, as the optimizer sees them
    state: AdamState,
    clip_coef: float,
    parts_dtype: torch.dtype | None = None,
) -> tuple[dict[str, Tensor], dict[str, Tensor], dict[str, Tensor], float, dict[str, float]]:
    """``(baseline, grad, scale, lr_ref, group_lr)`` for every parameter that has a gradient."""
    names = [n for n in state.hyper if n in grads and grads[n] is not None]
    if not names:
        raise ValueError(
            "no trained parameter received a gradient; check that the loss depends on the optimizer's parameters"
        )
    group_lr = {n: float(state.hyper[n].lr) for n in names}
    lr_ref = max(group_lr.values())
    if lr_ref < 0:
        raise ValueError(f"negative learning rate {lr_ref}; check the scheduler")
    if lr_ref == 0.0:
        warnings.warn(
            "every param group has lr = 0 (e.g. the first warmup step): the real step is zero; parts are per unit lr "
            "with lr_g/lr_ref taken as 1",
            stacklevel=2,
        )
    baseline, grad, scale = {}, {}, {}
    for n in names:
        lr_scale = 1.0 if lr_ref == 0.0 else group_lr[n] / lr_ref
        p = params[n]
        dtype = parts_dtype or torch.promote_types(p.dtype, torch.float32)  # computed in the parts' dtype
        sp = adam_step_parts(
            p, grads[n], state.state.get(n, ParamAdamState()), state.hyper[n], clip_coef, lr_scale, dtype
        )
        baseline[n], grad[n], scale[n] = sp.baseline, sp.grad, sp.scale
    return baseline, grad, scale, lr_ref, group_lr


def _global_norm(tensors: Iterable[Tensor]) -> float:
    tensors = list(tensors)
    if any(is_dtensor(t) for t in tensors):  # sharded parts: each rank its rows, one all-reduce
        return math.sqrt(float(global_sum([t.double() ** 2 for t in tensors])))
    return math.sqrt(sum(float(torch.linalg.vector_norm(t)) ** 2 for t in tensors))


def _make_update(
    params: Mapping[str, Tensor],
    clipped: Mapping[str, Tensor],
    state: AdamState,
    total_norm: Tensor,
    coef: Tensor,
    parts_dtype: torch.dtype | None,
    **extra: Any,
) -> Update:
    baseline, grad, scale, lr_ref, group_lr = adam_update(params, clipped, state, float(coef), parts_dtype)
    full = {n: baseline[n] + grad[n] for n in baseline}
    norms = {
        "full": _global_norm(full.values()),
        "baseline": _global_norm(baseline.values()),
        "grad": _global_norm(grad.values()),
        "clipped_gradient": _global_norm(clipped[n] for n in baseline),
    }
    scalars = dict(lr=lr_ref, group_lr=group_lr, clip_coef=float(coef), grad_norm=float(total_norm), norms=norms)
    return Update(full=full, baseline=baseline, grad=grad, scale=scale, **scalars, **extra)


# --------------------------------------------------------------------------------------
# the live path: gradients from the trainer
# --------------------------------------------------------------------------------------


def update_from_gradients(
    named_params: Mapping[str, Tensor] | Iterable[tuple[str, Tensor]],
    grads: Mapping[str, Tensor | None],
    state: AdamState,
    max_grad_norm: float | None = None,
    *,
    clipped: bool = False,
    grad_norm: float | Tensor | None = None,
    loss: LossConfig | None = None,
    normalisers: Normalisers | None = None,
    parts_dtype: torch.dtype | str | None = None,
    autocast_dtype: torch.dtype | str | None = None,
    grad_scale: float | None = None,
    head_dtype: torch.dtype | str | None = torch.float64,
) -> Update:
    """The next step from the trainer's real (already unscaled) gradients; no forward or backward.

    Args:
        named_params: ``model.named_parameters()`` (or a dict of them), current values.
        grads: name -> gradient (e.g. ``p.grad``); names missing or None get no step, as in torch.
        state: the optimizer state (``AdamState.from_optimizer``), read before ``optimizer.step()``.
        max_grad_norm: the trainer's clip value (None: no clipping).
        clipped: True if ``grads`` were already clipped by ``clip_grad_norm_``; then ``grad_norm``
            (the value ``clip_grad_norm_`` returned) is required to recover the coefficient.
        grad_norm: pre-clip global norm, required when ``clipped`` and ``max_grad_norm`` are set.
        loss, normalisers: recorded on the Update so the per-sequence functions can use it.
        parts_dtype: dtype of the parts (default float32, or float64 for float64 parameters).
        autocast_dtype, grad_scale, head_dtype: the trainer's precision, recorded so the
            per-sequence functions recompute g_i the way the trainer computed g.
    """
    params = dict(named_params)
    _check_state(params, state)
    names = [n for n in state.hyper if n in params and grads.get(n) is not None]
    if not names:
        raise ValueError(
            "no gradient for any parameter the optimizer holds; call this after backward() and before zero_grad()"
        )
    g = {n: grads[n].detach() for n in names}
    _check_finite_gradients(g, grad_scale=None)
    if clipped:
        if max_grad_norm is not None and grad_norm is None:
            raise ValueError(
                "clipped=True with max_grad_norm needs grad_norm, the pre-clip norm that clip_grad_norm_ returned; "
                "pass it, or pass the gradients before clipping with clipped=False"
            )
        if grad_norm is None:
            total, coef = clip_coefficient(list(g.values()), None)
        else:
            # the tensor clip_grad_norm_ returned keeps its dtype; a plain number is taken in the gradients' dtype
            total = (
                grad_norm.detach()
                if isinstance(grad_norm, Tensor)
                else torch.tensor(float(grad_norm), dtype=next(iter(g.values())).dtype)
            )
            coef = (
                torch.clamp(float(max_grad_norm) / (total + 1e-6), max=1.0)
                if max_grad_norm is not None
                else torch.ones(())
            )
        clipped_grads = g
    else:
        total, coef = clip_coefficient(list(g.values()), max_grad_norm)
        clipped_grads = {n: t * coef.to(t.device) for n, t in g.items()}
    return _make_update(
        params,
        clipped_grads,
        state,
        total,
        coef,
        resolve_dtype(parts_dtype),
        n_sequences=None if normalisers is None else normalisers.n_sequences,
        n_tokens=None if normalisers is None else normalisers.n_tokens,
        loss=loss,
        normalisers=normalisers,
        max_grad_norm=max_grad_norm,
        autocast_dtype=resolve_dtype(autocast_dtype),
        grad_scale=None if grad_scale is None else float(grad_scale),
        head_dtype=resolve_dtype(head_dtype),
    )


# --------------------------------------------------------------------------------------
# the offline path: recompute the gradient on U
# --------------------------------------------------------------------------------------


def sequence_losses(
    model: nn.Module,
    batch: SequenceBatch,
    loss: LossConfig,
    norm: Normalisers,
    params: Mapping[str, Tensor] | None = None,
    head_dtype: torch.dtype | None = torch.float64,
    clip_counts: ClipCounts | None = None,
) -> Tensor:  # [B]  c_i, with the normalisers of the whole U
    """Each sequence's loss term c_i (differentiable; ``params`` overrides model parameters); ``clip_counts``
    (with ``loss.use_old_logprobs``) counts the tokens whose PPO ratio leaves the clip range."""
    stats = teacher_force(model, batch, params, loss.forcing(head_dtype))
    return per_sequence_loss(stats.logprobs, stats.mask, batch.advantages, norm, loss, batch.old_logprobs, clip_counts)


def loss_gradients(
    model: nn.Module,
    batch: SequenceBatch,
    params: Mapping[str, Tensor],
    loss: LossConfig,
    norm: Normalisers,
    config: ReconstructionConfig,
    grad_scale: Tensor | None = None,
    clip_counts: ClipCounts | None = None,
) -> tuple[dict[str, Tensor], float]:
    """Gradient of ``L = sum_i c_i`` w.r.t. ``params`` (unscaled, unclipped) and L's value.

    Replicates a trainer's accumulation: per microbatch of ``config.microbatch_size`` sequences, backward of
    ``loss_mb`` (under ``config``'s autocast, times ``grad_scale``) summed like ``.grad``; then multiplied by
    the float32 inverse scale. ``.grad`` is not touched. ``clip_counts`` counts U's PPO ratios on the way.
    """
    autocast_dtype, head_dtype = resolve_dtype(config.autocast_dtype), resolve_dtype(config.head_dtype)
    names, tensors = list(params), list(params.values())
    acc: list[Tensor | None] = [None] * len(tensors)
    total = 0.0
    sharded = sharded_view(model)  # a sharded policy: every rank runs all of U, keeps its rows of each gradient
    for mb in batch.chunks(config.microbatch_size):
        losses: list[Tensor] = []  # L on this microbatch, unscaled

        def scaled_loss(mb: SequenceBatch = mb, losses: list[Tensor] = losses) -> Tensor:
            with torch.enable_grad(), autocast(tensors[0].device, autocast_dtype):
                mb_loss = sequence_losses(model, mb, loss, norm, head_dtype=head_dtype, clip_counts=clip_counts).sum()
            losses.append(mb_loss.detach())
            return mb_loss * grad_scale.to(mb_loss.device) if grad_scale is not None else mb_loss

        if sharded is not None:
            _, by_name = sharded.gradient(scaled_loss, names)
            mb_grads = tuple(by_name[n] for n in names)
        else:
            mb_grads = torch.autograd.grad(scaled_loss(), tensors, allow_unused=True)
        total += float(losses[0])
        for k, g in enumerate(mb_grads):
            if g is not None:
                acc[k] = g if acc[k] is None else acc[k] + g  # same arithmetic as .grad accumulation
    if not math.isfinite(total):
        raise ValueError(
            f"the loss on U is not finite ({total}); check U's advantages and old_logprobs for nan/inf, "
            "or the model for overflow (use float32/bfloat16 instead of float16 without a grad scale)"
        )
    grads = {n: g for n, g in zip(names, acc) if g is not None}
    if grad_scale is not None:
        grads = {n: unscale_gradient(g, grad_scale) for n, g in grads.items()}
    _check_finite_gradients(grads, grad_scale)
    return grads, total


def reconstruct_update(
    model: nn.Module,
    optimizer: torch.optim.Optimizer | AdamState,
    batch: SequenceBatch | Sequence[dict],
    loss: LossConfig | None = None,
    config: ReconstructionConfig = ReconstructionConfig(),
    *,
    grad_scaler: Any = None,
    pad_token_id: int = 0,
) -> Update:
    """Reconstruct the step ``optimizer.step()`` would take after a backward over U (docs/DESIGN.md section 2).

    Args:
        model: the policy (HF causal LM, optionally PEFT-wrapped). Left bitwise untouched.
        optimizer: a live ``torch.optim.Adam``/``AdamW`` over ``model``'s parameters (read, never
            stepped), or an :class:`AdamState`. Its lr must be the one the next step uses.
        batch: U, a :class:`SequenceBatch` or rollout records (collated with ``pad_token_id``).
        loss: the trainer's loss settings (default :class:`LossConfig`).
        config: how the trainer computed the gradient (clipping, microbatches, autocast, loss scale,
            head and parts precision).
        grad_scaler: a live ``GradScaler`` whose current scale the fp16 step uses (instead of
            ``config.grad_scale``).
    Returns:
        The :class:`Update`, per unit of the reference lr ``Update.lr``.
    """
    loss = loss or LossConfig()
    grad_scale = grad_scaler if grad_scaler is not None else config.grad_scale
    _require_autograd()
    state = (
        optimizer if isinstance(optimizer, AdamState) else AdamState.from_optimizer(unwrap_optimizer(optimizer), model)
    )
    params = _trained_parameters(model, state)
    if sharded_view(model) is not None:  # moments read whole from a file: this rank keeps its rows
        state = state.laid_out_like(params)
    device = next(iter(params.values())).device
    batch = _as_batch(batch, pad_token_id).to(device)
    _check_batch(batch, loss)
    _warn_if_stochastic(model)
    norm = normalisers(batch.target_mask, loss)
    scale_t = _grad_scale_tensor(grad_scale)
    counts = ClipCounts() if loss.use_old_logprobs else None
    grads, loss_value = loss_gradients(model, batch, params, loss, norm, config, scale_t, counts)
    ppo_clip = None if counts is None else _check_ppo_ratios(counts, loss)
    order = [n for n in state.hyper if n in grads]  # clip over the optimizer's parameters, in its order
    total, coef = clip_coefficient([grads[n] for n in order], config.max_grad_norm)
    clipped = {n: grads[n] * coef.to(grads[n].device) for n in order}
    return _make_update(
        params,
        clipped,
        state,
        total,
        coef,
        resolve_dtype(config.parts_dtype),
        n_sequences=norm.n_sequences,
        n_tokens=norm.n_tokens,
        loss=loss,
        normalisers=norm,
        loss_value=loss_value,
        autocast_dtype=resolve_dtype(config.autocast_dtype),
        grad_scale=None if scale_t is None else float(scale_t),
        head_dtype=resolve_dtype(config.head_dtype),
        max_grad_norm=config.max_grad_norm,
        ppo_clip=ppo_clip,
    )


# --------------------------------------------------------------------------------------
# per-sequence parts
# --------------------------------------------------------------------------------------


def per_sequence_gradients(
    model: nn.Module,
    update: Update,
    batch: SequenceBatch | Sequence[dict],
    indices: Sequence[int] | None = None,
    chunk_size: int = 8,
    pad_token_id: int = 0,
) -> Iterator[tuple[int, dict[str, Tensor]]]:
    """``(row, g_i)``: each chosen sequence's unscaled, unclipped loss-term gradient, for the update's parameters.

    One forward per chunk of ``chunk_size`` rows and one batched backward (``is_grads_batched``),
    so memory is ``chunk_size`` copies of the trained parameters. ``row`` indexes ``batch``.
    """
    loss, norm = _require_loss(update)
    _require_autograd()
    if sharded_view(model) is not None:
        raise ValueError(
            "per-sequence gradients g_i are not computed on a sharded policy (each would be a full-size tensor). "
            "Fix: leave probe.per_sequence_exact empty and use the attributions (one backward over E, one JVP over U), "
            "or run on one process"
        )
    named = dict(model.named_parameters())
    names = _update_names_in_model(update, named)
    tensors = [named[n] for n in names]
    device = tensors[0].device
    batch = _as_batch(batch, pad_token_id).to(device)
    _check_batch(batch, loss)
    rows = list(range(len(batch))) if indices is None else [int(i) for i in indices]
    bad = [i for i in rows if not 0 <= i < len(batch)]
    if bad:
        raise ValueError(
            f"sequence indices {bad[:5]} are out of range for a batch of {len(batch)}; use 0..{len(batch) - 1}"
        )
    scale_t = _grad_scale_tensor(update.grad_scale)
    chunk_size = max(1, int(chunk_size))
    for start in range(0, len(rows), chunk_size):
        chunk = rows[start : start + chunk_size]
        sub = batch.select(chunk)
        with torch.enable_grad(), autocast(device, update.autocast_dtype):
            c = sequence_losses(model, sub, loss, norm, head_dtype=update.head_dtype)  # [b]
        if scale_t is not None:
            c = c * scale_t.to(c.device)
        eye = torch.eye(len(chunk), dtype=c.dtype, device=c.device)  # [b, b]: one backward per row, batched
        batched = torch.autograd.grad(c, tensors, grad_outputs=eye, is_grads_batched=True, allow_unused=True)
        for k, row in enumerate(chunk):
            g_i = {}
            for n, p, g in zip(names, tensors, batched):
                gk = torch.zeros_like(p) if g is None else g[k]
                g_i[n] = unscale_gradient(gk, scale_t) if scale_t is not None else gk
            yield row, g_i


def per_sequence_directions(
    model: nn.Module, update: Update, batch: SequenceBatch | Sequence[dict], **options: Any
) -> Iterator[tuple[int, dict[str, Tensor]]]:
    """``(row, v_i)`` with ``v_i = scale * g_i``, sequence i's part of ``update.grad`` (per unit lr); ``options``
    (``indices``, ``chunk_size``, ``pad_token_id``) as :func:`per_sequence_gradients`.

    ``sum_i v_i`` over all of U equals ``update.grad`` (up to float summation order).
    """
    for row, g_i in per_sequence_gradients(model, update, batch, **options):
        yield row, {n: update.scale[n] * g.to(update.scale[n].dtype) for n, g in g_i.items()}


def per_sequence_inner_products(
    model: nn.Module,
    update: Update,
    batch: SequenceBatch | Sequence[dict],
    w: Mapping[str, Tensor],
    microbatch_size: int | None = None,
    pad_token_id: int = 0,
) -> Tensor:  # [N] float64
    """``<w, v_i>`` for every sequence of ``batch`` at once, without materialising any v_i.

    ``<w, v_i> = <K * w, g_i> = d/de c_i(theta + e * (K * w))``: one forward-mode JVP of the
    vector ``[c_1..c_N]`` along ``K * w`` per microbatch. Names of ``w`` outside the update count as zero.
    """
    loss, norm = _require_loss(update)

    def sequence_terms(mb: SequenceBatch, params: Mapping[str, Tensor]) -> tuple[Tensor]:  # ([b],)
        return (sequence_losses(model, mb, loss, norm, params, head_dtype=update.head_dtype),)

    batch = _as_batch(batch, pad_token_id)
    pieces = _directional_derivatives(model, update, batch, w, sequence_terms, microbatch_size)
    if pieces is None:
        return torch.zeros(len(batch), dtype=torch.float64)
    return torch.cat([tangent.to(torch.float64) for (_,), (tangent,) in pieces]).cpu()


@dataclass
class TokenInnerProducts:
    """``<w, v_it>`` for every response token of a batch (v_it = K g_it, g_it the gradient of token t's loss term
    c_it; ``sum_t v_it = v_i``), with the tokens' log-probabilities at theta, all ``[N, T-1]`` float64, 0 off the
    response (:func:`per_token_inner_products`)."""

    values: Tensor  # [N, T-1] <w, v_it>
    logprobs: Tensor  # [N, T-1] log p of each response token at theta, at the loss temperature
    mask: Tensor  # [N, T-1] bool, the response tokens

    def per_sequence(self) -> Tensor:  # [N]  <w, v_i> = sum_t <w, v_it>
        return self.values.sum(-1)

    def flat(self) -> dict[str, Tensor]:
        """The response tokens only, sequence after sequence: ``values``, ``logprobs`` ``[T]`` and ``offsets``
        ``[N+1]`` (sequence i's tokens at ``offsets[i]:offsets[i+1]``)."""
        lengths = self.mask.sum(-1)
        offsets = torch.cat([lengths.new_zeros(1), lengths.cumsum(0)])
        return {"values": self.values[self.mask], "logprobs": self.logprobs[self.mask], "offsets": offsets}


def per_token_inner_products(
    model: nn.Module,
    update: Update,
    batch: SequenceBatch | Sequence[dict],
    w: Mapping[str, Tensor],
    microbatch_size: int | None = None,
    pad_token_id: int = 0,
) -> TokenInnerProducts:
    """``<w, v_it>`` for every response token of ``batch``: the JVP of :func:`per_sequence_inner_products` kept at
    token resolution (the vector of every token's loss term c_it along ``K * w``), so ``sum_t`` gives ``<w, v_i>``.
    A token whose PPO ratio the clip holds contributes 0 (its term does not depend on theta)."""
    loss, norm = _require_loss(update)
    forcing = loss.forcing(update.head_dtype)

    def token_terms(mb: SequenceBatch, params: Mapping[str, Tensor]) -> tuple[Tensor, Tensor]:  # [b, T-1] each
        stats = teacher_force(model, mb, params, forcing)
        terms = per_token_loss(stats.logprobs, stats.mask, mb.advantages, norm, loss, mb.old_logprobs)
        return terms, stats.logprobs

    batch = _as_batch(batch, pad_token_id)
    mask = batch.target_mask.cpu()
    pieces = _directional_derivatives(model, update, batch, w, token_terms, microbatch_size)
    if pieces is None:
        zeros = torch.zeros(mask.shape, dtype=torch.float64)
        with torch.no_grad():
            logprobs = teacher_force(model, batch.to(next(model.parameters()).device), forcing=forcing).logprobs
        return TokenInnerProducts(values=zeros, logprobs=logprobs.detach().double().cpu() * mask, mask=mask)
    values = torch.cat([tangent.to(torch.float64) for _, (tangent, _) in pieces]).cpu()
    logprobs = torch.cat([lp.detach().to(torch.float64) for (_, lp), _ in pieces]).cpu()
    return TokenInnerProducts(values=values * mask, logprobs=logprobs * mask, mask=mask)


def _directional_derivatives(
    model: nn.Module,
    update: Update,
    batch: SequenceBatch,
    w: Mapping[str, Tensor],
    fn: Callable[[SequenceBatch, Mapping[str, Tensor]], tuple[Tensor, ...]],
    microbatch_size: int | None,
) -> list[tuple[tuple[Tensor, ...], tuple[Tensor, ...]]] | None:
    """``(fn(mb, theta), d/de fn(mb, theta + e * (K * w)))`` per microbatch of ``batch``: one forward-mode JVP each
    (over the scalar e, each unit gathered in turn, on a sharded policy). None when ``w`` touches no parameter of
    the update."""
    loss, _ = _require_loss(update)
    named = dict(model.named_parameters())
    unknown = [n for n in w if n not in named]
    if unknown:
        raise ValueError(
            f"w has entries {unknown[:3]} that are not parameters of the model; key w by model.named_parameters() names"
        )
    names = [n for n in _update_names_in_model(update, named) if n in w]
    device = next(iter(named.values())).device
    batch = batch.to(device)
    _check_batch(batch, loss)
    if not names:
        return None
    for n in names:
        if w[n].shape != named[n].shape:
            raise ValueError(f"w[{n!r}] has shape {tuple(w[n].shape)} but the parameter has {tuple(named[n].shape)}")
    primals = {n: named[n].detach() for n in names}
    tangents = {
        n: (update.scale[n].to(device) * w[n].to(device=device, dtype=update.scale[n].dtype)).to(named[n].dtype)
        for n in names
    }  # K * w, in the parameter's dtype
    out = []
    sharded = sharded_view(model)  # a sharded policy: a JVP over the scalar eta, each unit gathered in turn
    with torch.no_grad(), math_attention(), autocast(device, update.autocast_dtype):
        for mb in batch.chunks(microbatch_size):
            if sharded is not None:
                value, tangent, _ = sharded.directional(lambda mb=mb: fn(mb, {}), tangents)
            else:
                value, tangent = jvp(lambda ps, mb=mb: fn(mb, ps), (primals,), (tangents,))
            out.append((tuple(value), tuple(tangent)))
    return out


# --------------------------------------------------------------------------------------
# checks and small helpers
# --------------------------------------------------------------------------------------


def unwrap_optimizer(optimizer: Any) -> torch.optim.Optimizer:
    """The torch optimizer inside ``optimizer``: itself, or the one its wrappers hold as ``.optimizer`` (Lightning's
    ``LightningOptimizer``, accelerate's ``AcceleratedOptimizer``, itself a ``torch.optim.Optimizer``)."""
    while isinstance(getattr(optimizer, "optimizer", None), torch.optim.Optimizer):
        optimizer = optimizer.optimizer
    if isinstance(optimizer, torch.optim.Optimizer):
        return optimizer
    raise TypeError(f"expected a torch.optim.Adam/AdamW or a probe.adam.AdamState, got {type(optimizer).__name__}")


def _trained_parameters(model: nn.Module, state: AdamState) -> dict[str, Tensor]:
    """Parameters the optimizer holds and autograd can differentiate, in the optimizer's order."""
    named = dict(model.named_parameters())
    missing = [n for n in state.hyper if n not in named]
    if missing:
        raise ValueError(
            f"optimizer state names {missing[:3]} are not parameters of this model; "
            "load the optimizer state of this model (map HF param groups by order, see probe.adam)"
        )
    params = {n: named[n] for n in state.hyper if named[n].requires_grad}
    if not params:
        raise ValueError(
            "no parameter is both held by the optimizer and requires_grad; unfreeze the trained parameters (e.g. "
            "LoRA adapters)"
        )
    _check_state(params, state)
    return params


def _check_state(params: Mapping[str, Tensor], state: AdamState) -> None:
    for n, p in params.items():
        if n not in state.hyper:
            continue
        st = state.state.get(n)
        if st is None:
            continue
        for key in ("exp_avg", "exp_avg_sq", "max_exp_avg_sq"):
            t = getattr(st, key)
            if t is not None and tuple(t.shape) != tuple(p.shape):
                raise ValueError(
                    f"optimizer state {key} of {n!r} has shape {tuple(t.shape)} but the parameter has shape "
                    f"{tuple(p.shape)}: the optimizer state belongs to another model or param-group order; "
                    "load the optimizer saved with this checkpoint"
                )
        if st.step > 0 and (st.exp_avg is None or st.exp_avg_sq is None):
            raise ValueError(
                f"optimizer state of {n!r} has step {st.step} but no exp_avg/exp_avg_sq; the state file is incomplete"
            )
        if state.hyper[n].amsgrad and st.step > 0 and st.max_exp_avg_sq is None:
            raise ValueError(
                f"amsgrad is on but the state of {n!r} has no max_exp_avg_sq; the state file is incomplete"
            )


def _check_batch(batch: SequenceBatch, loss: LossConfig) -> None:
    if batch.advantages is None:
        raise ValueError(
            "the update batch has no advantages; give every rollout record an 'advantage' "
            "(or compute group advantages from rewards before reconstructing the update)"
        )
    if loss.use_old_logprobs and batch.old_logprobs is None:
        raise ValueError(
            "loss.use_old_logprobs is on but U has no old_logprobs; add them to the rollouts or turn it off"
        )


def _check_ppo_ratios(counts: ClipCounts, loss: LossConfig) -> dict[str, float]:
    """The PPO-clip fractions of U; a WARNING when so many ratios lie outside the clip range that the stored
    old_logprobs cannot be the sampling policy's (``MAX_RATIO_OUTSIDE_FRACTION``)."""
    fractions = counts.fractions()
    if fractions["outside_fraction"] > MAX_RATIO_OUTSIDE_FRACTION:
        high = loss.clip_ratio if loss.clip_ratio_high is None else loss.clip_ratio_high
        log.warning(
            "U's old_logprobs look like those of another policy: the PPO ratio exp(log p - old_logprob) of %.1f%% of "
            "U's %d response tokens lies outside the clip range [%g, %g] (loss.clip_ratio, loss.clip_ratio_high); the "
            "clip zeroes the gradient of %.1f%% of the tokens and weighs the others by ratios far from 1, so the "
            "reconstructed step is (nearly) zero or dominated by a few tokens. Right after sampling every ratio is 1. "
            "Fix: store the log-probs of the policy that sampled U, at the sampling temperature (loss.temperature = "
            "%g), one per response token (not shifted by one position); or set loss.use_old_logprobs=false for the "
            "on-policy step",
            100 * fractions["outside_fraction"],
            counts.tokens,
            1.0 - loss.clip_ratio,
            1.0 + high,
            100 * fractions["clipped_fraction"],
            loss.temperature,
        )
    return fractions


def _check_finite_gradients(grads: Mapping[str, Tensor], grad_scale: Tensor | None) -> None:
    if not grads:
        return
    finite = torch.stack([torch.isfinite(local(g)).all().to(torch.device("cpu")) for g in grads.values()])
    sharded = next((g for g in grads.values() if is_dtensor(g)), None)
    if sharded is not None:  # each rank checked its rows: a tensor is finite where it is on every rank
        finite = all_reduce_sum((~finite).to(torch.int64), sharded) == 0
    if bool(finite.all()):
        return
    bad = [n for n, ok in zip(grads, finite.tolist()) if not ok]
    if grad_scale is not None:
        raise ValueError(
            f"gradients of {bad[:3]} are not finite under grad scale {float(grad_scale)}: GradScaler would skip "
            "this step; pass a smaller grad_scale (the scaler's scale after its update) or train in bfloat16"
        )
    raise ValueError(
        f"gradients of {bad[:3]} are not finite; check U (advantages, old_logprobs) and the model for overflow "
        "(use float32 or bfloat16 autocast instead of pure float16)"
    )


def _require_autograd() -> None:
    if torch.is_inference_mode_enabled():
        raise RuntimeError(
            "reconstructing the update needs a backward pass, which torch.inference_mode forbids; "
            "run it outside inference mode (Lightning: Trainer(inference_mode=False))"
        )


def _warn_if_stochastic(model: nn.Module) -> None:
    if any(isinstance(m, nn.Dropout) and m.p > 0 and m.training for m in model.modules()):
        warnings.warn(
            "the model is in training mode with dropout > 0: the reconstructed gradient uses one random dropout "
            "draw; call model.eval() (RL trainers normally disable dropout)",
            stacklevel=2,
        )


def _require_loss(update: Update) -> tuple[LossConfig, Normalisers]:
    if update.loss is None or update.normalisers is None:
        raise ValueError(
            "this Update has no loss settings/normalisers; build it with reconstruct_update, or pass "
            "loss= and normalisers= (of the whole U) to update_from_gradients"
        )
    return update.loss, update.normalisers


def _update_names_in_model(update: Update, named: Mapping[str, Tensor]) -> list[str]:
    if not update.scale:
        raise ValueError("this Update has no scale (K); it was saved without one - reconstruct it again")
    missing = [n for n in update.scale if n not in named]
    if missing:
        raise ValueError(
            f"update parameters {missing[:3]} are not in the model; use the model the update was built for"
        )
    return list(update.scale)


def _as_batch(batch: SequenceBatch | Sequence[dict], pad_token_id: int) -> SequenceBatch:
    if isinstance(batch, SequenceBatch):
        return batch
    return collate(list(batch), pad_token_id=pad_token_id)


def _grad_scale_tensor(grad_scale: Any) -> Tensor | None:
    """The loss scale as GradScaler holds it: a float32 scalar tensor."""
    if grad_scale is None:
        return None
    if hasattr(grad_scale, "get_scale") and hasattr(grad_scale, "is_enabled"):  # a GradScaler
        if not grad_scale.is_enabled():
            return None
        grad_scale = grad_scale.get_scale()
    scale = torch.as_tensor(grad_scale, dtype=torch.float32).detach().reshape(())
    if not (torch.isfinite(scale) and scale > 0):
        raise ValueError(f"grad_scale must be a finite positive number, got {float(scale)}")
    return scale
