"""Adam/AdamW optimizer state from files, mapped to parameter names (docs/DESIGN.md section 2).

Three kinds of file are read, always with ``torch.load(..., map_location="cpu", weights_only=True)``
(a pickle that needs arbitrary classes is refused, never executed):

* ``torch``: ``torch.save(optimizer.state_dict())``.
* ``lightning``: a Lightning ``.ckpt``; its ``optimizer_states[optimizer_index]`` is such a state dict.
* ``hf_trainer``: a ``transformers.Trainer`` checkpoint directory (``checkpoint-N/``) holding
  ``optimizer.pt``; an ``optimizer.pt`` path with a ``trainer_state.json`` beside it counts as one too.
* ``distributed``: a distributed checkpoint directory (``torch.distributed.checkpoint``: ``.metadata`` and
  ``*.distcp``), as Lightning's ``ModelParallelStrategy`` (FSDP2) writes ``last.ckpt``. Its optimizer state is
  keyed by parameter names; it is read with ``torch.distributed.checkpoint.load``, each moment laid out like
  its parameter: a sharded policy's rank reads only its own rows (no rank holds the whole state), an ordinary
  one reads the whole tensor. torch reads a checkpoint's ``.metadata`` with ``pickle.load`` and its plain values
  with ``torch.load(weights_only=False)``; probe reads the first with an unpickler that admits only the
  checkpoint's own metadata classes and the second with ``weights_only=True``, so no code in it can run.

Mapping rules. A saved state dict names parameters only by integer ids, listed group by group in
``param_groups``. As ``torch.optim.Optimizer.load_state_dict`` does, the k-th id met walking the
groups in order belongs to the k-th parameter of the order the optimizer was built in. ``param_order``
says what that order is:

* ``model``: every parameter of ``model.named_parameters()`` (``AdamW(model.parameters())``).
* ``trainable``: those with ``requires_grad`` only (``AdamW(p for p in model.parameters() if p.requires_grad)``).
* ``hf_trainer``: what ``transformers.Trainer.create_optimizer`` builds: group 0 the trainable parameters
  that get weight decay, group 1 the trainable biases and norm weights (no decay), each in
  ``named_parameters()`` order. The split is re-derived here from the rule of transformers 5
  (not inside an ``nn.LayerNorm``, name without ``bias``/``layernorm``/``rmsnorm``/``norm`` parts) and, if
  the saved group sizes say so, from the older rule (not inside an ``nn.LayerNorm``, no ``bias``).
* a list of names in optimizer order, or a path to a text file with one name a line (``#`` comments
  allowed). Names may carry a wrapper's prefix (a LightningModule's ``model.``) or lack the model's
  own (PEFT's ``base_model.model.``): one common prefix is stripped or added to match
  ``model.named_parameters()``.
* ``auto`` (default): for HF Trainer checkpoints ``hf_trainer`` first, otherwise ``model`` / ``trainable``
  by the number of saved ids, then the other orders as fall-backs. The first order whose length,
  group sizes and every state tensor's shape fit is taken; if another order would fit too (e.g. an
  empty state has no shapes to tell them apart) ``AdamState.source`` says so.

For a Lightning checkpoint the default assumes ``configure_optimizers`` passed ``self.parameters()``
(or its ``requires_grad`` subset) of a LightningModule whose only parameters are the wrapped model's;
the LightningModule's ``model.`` prefix does not matter because mapping is by position. A module with
extra parameters (a value head) or custom groups needs an explicit ``param_order`` list.

Parameters with ``requires_grad=False`` on the model passed are left out of the result (torch skips
parameters without a gradient, so they are not trained). A trainable parameter listed in a group but
without state while others have taken steps is an error; an empty state everywhere is step 0.
Hyperparameters come from each saved group (its ``lr`` is the one the scheduler set for the next step),
``step`` from each parameter's state; every one can be overridden.
"""

from __future__ import annotations

import logging
import math
import pickle
import re
import zipfile
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from probe.adam import AdamHyper, AdamState, ParamAdamState
from probe.sharding import all_reduce_sum, global_sum, local

FORMATS = ("auto", "torch", "lightning", "hf_trainer", "distributed")
DCP_METADATA = ".metadata"  # the file that marks a torch.distributed.checkpoint directory
PARAM_ORDERS = ("auto", "model", "trainable", "hf_trainer")
KINDS = ("auto", "adamw", "adam")
HF_OPTIMIZER_FILE = "optimizer.pt"
log = logging.getLogger("probe")
EXPECTED_FILES = (
    "a torch.save(optimizer.state_dict()) file, a Lightning .ckpt (a file, or the directory ModelParallelStrategy "
    f"writes), or an HF Trainer checkpoint directory (checkpoint-N/) containing {HF_OPTIMIZER_FILE}"
)
FIX_ORDER = (
    "set optimizer.param_order to the order the optimizer was built in "
    "('model', 'trainable', 'hf_trainer', or a list / text file of parameter names), "
    "and pass the model (with the same LoRA adapters and frozen parameters) it was trained with"
)
# transformers 5 (Trainer.get_decay_parameter_names): names matching these get no weight decay.
HF_NO_DECAY_PATTERNS = (r"bias", r"layernorm", r"rmsnorm", r"(?:^|\.)norm(?:$|\.)", r"_norm(?:$|\.)")
HF_NO_DECAY_PATTERNS_LEGACY = (r"bias",)  # transformers before the norm patterns were added


@dataclass
class OptimizerSettings:
    """Where the Adam/AdamW state of the update lives and how to map it to parameters.

    Args:
        path: optimizer state file or directory: ``torch.save(optimizer.state_dict())``, a Lightning
            ``.ckpt``, or an HF Trainer ``checkpoint-N/`` directory.
        format: ``auto`` (from the path and contents), ``torch``, ``lightning``, ``hf_trainer`` or
            ``distributed`` (a ``torch.distributed.checkpoint`` directory, e.g. an FSDP2 ``last.ckpt``).
        param_order: the order the optimizer was built over: ``auto``, ``model`` (all of
            ``model.named_parameters()``), ``trainable`` (``requires_grad`` only), ``hf_trainer``
            (decay group then no-decay group, as ``transformers.Trainer`` builds them), a list of
            parameter names in optimizer order, or a path to a text file with one name per line.
        optimizer_index: which optimizer of a Lightning checkpoint (``optimizer_states[i]``).
        kind: ``adamw`` (decoupled weight decay), ``adam`` (Adam with L2 decay added to the gradient),
            or ``auto``: the saved ``decoupled_weight_decay`` flag, else ``adamw``.
        lr: override the saved learning rate (default: each group's saved lr, i.e. after the scheduler).
        beta1: override the saved first-moment decay.
        beta2: override the saved second-moment decay.
        eps: override the saved epsilon.
        weight_decay: override the saved weight decay (in every group).
        amsgrad: override the saved amsgrad flag.
    """

    path: str
    format: str = "auto"
    param_order: str | list[str] = "auto"
    optimizer_index: int = 0
    kind: str = "auto"
    lr: float | None = None
    beta1: float | None = None
    beta2: float | None = None
    eps: float | None = None
    weight_decay: float | None = None
    amsgrad: bool | None = None

    def __post_init__(self) -> None:
        self.path = str(self.path)
        if self.format not in FORMATS:
            raise ValueError(f"optimizer.format={self.format!r} is not one of {FORMATS}")
        if self.kind not in KINDS:
            raise ValueError(f"optimizer.kind={self.kind!r} is not one of {KINDS}")
        if self.optimizer_index < 0:
            raise ValueError(f"optimizer.optimizer_index={self.optimizer_index} must be >= 0")
        if isinstance(self.param_order, (list, tuple)):
            self.param_order = [str(n) for n in self.param_order]


@dataclass
class _Order:
    """A candidate optimizer order: names in position order; ``group_sizes`` if the rule fixes them."""

    label: str
    names: list[str]
    group_sizes: list[int] | None = None


# ---------------------------------------------------------------------------------------------
# public entry point
# ---------------------------------------------------------------------------------------------


def load_optimizer_state(
    settings_or_path: OptimizerSettings | str | Path, model: nn.Module, **overrides: Any
) -> AdamState:
    """Read Adam/AdamW state from a file and key it by ``model.named_parameters()`` names.

    ``settings_or_path`` is an ``OptimizerSettings`` or a path; keyword arguments set (or replace)
    its fields, e.g. ``load_optimizer_state("ckpt/optimizer.pt", model, param_order="trainable", lr=1e-6)``.
    """
    if isinstance(settings_or_path, OptimizerSettings):
        settings = replace(settings_or_path, **overrides) if overrides else settings_or_path
    else:
        settings = OptimizerSettings(path=str(settings_or_path), **overrides)

    file, fmt = _resolve_file(Path(settings.path), settings.format)
    if fmt == "distributed":
        saved = _read_distributed(file, model, settings.optimizer_index)
        optimizer_state, _ = _optimizer_state_dict(saved, file, "lightning", settings.optimizer_index)
    else:
        saved = _load_weights_only(file)
        optimizer_state, fmt = _optimizer_state_dict(saved, file, fmt, settings.optimizer_index)
    groups, state = optimizer_state["param_groups"], optimizer_state["state"]
    ids = [pid for g in groups for pid in g["params"]]  # position k -> saved id
    group_sizes = [len(g["params"]) for g in groups]
    if len(set(ids)) != len(ids):
        raise ValueError(
            f"{file}: a parameter id appears in more than one param group; the file is not a torch optimizer state_dict"
        )
    stray = sorted(set(state) - set(ids), key=str)
    if stray:
        raise ValueError(
            f"{file}: state holds ids {stray[:5]} that no param group lists; the file is not a torch optimizer "
            "state_dict"
        )

    identify_adam(groups, state, file)

    params = dict(model.named_parameters())
    candidates = _candidate_orders(settings.param_order, fmt, model, len(ids), saved_names=ids)
    fitting: list[tuple[_Order, list[str]]] = []
    problems: list[str] = []
    for order in candidates:
        problem = _check_order(order, ids, group_sizes, state, params, file)
        if problem is None:
            fitting.append((order, order.names))
        else:
            problems.append(f"param_order={order.label}: {problem}")
    if not fitting:
        tried = "\n  ".join(problems)
        raise ValueError(
            f"optimizer state in {file} ({fmt}, {len(ids)} parameters in groups of {group_sizes}) does not fit the "
            f"model ({len(params)} parameters, {sum(p.requires_grad for p in params.values())} trainable):\n  {tried}\n"
            f"Fix: {FIX_ORDER}."
        )
    chosen, names = fitting[0]
    notes = [f"param_order={chosen.label}"]
    others = [o.label for o, n in fitting[1:] if n != names]
    if others:
        notes.append(
            f"param_order={'/'.join(dict.fromkeys(others))} would fit the saved shapes too; "
            f"took the default {chosen.label} (set optimizer.param_order to choose)"
        )

    hyper: dict[str, AdamHyper] = {}
    states: dict[str, ParamAdamState] = {}
    group_of: dict[str, int] = {}
    any_steps = any(_step_of(s) > 0 for s in state.values())
    frozen = 0
    position = 0
    for gi, group in enumerate(groups):
        group_hyper = _group_hyper(group, gi, settings, file)
        for pid in group["params"]:
            name = names[position]
            position += 1
            if not params[name].requires_grad:
                frozen += 1  # torch skips parameters without a gradient: not trained
                continue
            entry = state.get(pid, {})
            if not entry and any_steps:
                raise ValueError(
                    f"{file}: parameter {name!r} (id {pid}, group {gi}) has no optimizer state while others have taken "
                    "steps. Fix: if it is not trained, set requires_grad=False on it (e.g. load the same "
                    f"LoRA/freezing setup); otherwise {FIX_ORDER}."
                )
            states[name] = _param_state(entry, name, pid, group_hyper, file)
            hyper[name], group_of[name] = group_hyper, gi
    if frozen:
        notes.append(f"{frozen} listed parameter(s) with requires_grad=False left out")
    moments = moments_record(states)
    if moments and moments.get("second_moments_underflowed", 0) > 0:
        log.warning(
            "%s: the moments are saved in %s and %.1f%% of the second moments are 0 where the first moment is not "
            "(they underflowed): the step divides by sqrt(v) + eps there, so those entries move by m / eps. The "
            "reconstruction takes the step the optimizer takes with these moments; know that it is not the step of "
            "exact moments",
            file,
            moments["dtype"],
            100 * moments["second_moments_underflowed"],
        )
    trainer_state = _trainer_state(file, fmt)
    choices = {
        "optimizer.format": {"value": fmt, "file": str(file), "source": _format_source(settings, file, saved)},
        "optimizer.param_order": {
            "value": chosen.label,
            "source": "set by optimizer.param_order"
            if settings.param_order != "auto"
            else f"auto: the first of {[o.label for o in candidates]} whose length, group sizes and shapes fit",
            "also_fits": list(dict.fromkeys(others)),
        },
        "optimizer.kind": _kind_choice(settings, groups),
        "optimizer.lr": {
            "value": sorted({h.lr for h in hyper.values()}),
            "source": "set by optimizer.lr"
            if settings.lr is not None
            else "saved in each param group (the lr the scheduler set for the next step)",
        },
        "optimizer.step": _step_choice(sorted({s.step for s in states.values()}), file, fmt, saved, trainer_state),
        **({"optimizer.moments": {"value": moments, "source": "the saved exp_avg_sq"}} if moments else {}),
        **(
            {"optimizer.schedule": schedule}
            if (schedule := _schedule_record(file, fmt, saved, groups, trainer_state))
            else {}
        ),
    }
    source = (
        f"{file} ({fmt}"
        + (f", optimizer {settings.optimizer_index}" if fmt in ("lightning", "distributed") else "")
        + "; "
        + "; ".join(notes)
        + ")"
    )
    return AdamState(hyper=hyper, state=states, group_of=group_of, source=source, choices=choices)


def _trainer_state(file: Path, fmt: str) -> dict[str, Any]:
    """An HF Trainer checkpoint's ``trainer_state.json`` beside ``file``, parsed once ({} when there is none, or it
    cannot be read: it only adds to what the optimizer file says)."""
    path = file.parent / "trainer_state.json"
    if fmt != "hf_trainer" or not path.is_file():
        return {}
    import json

    try:
        state = json.loads(path.read_text())
    except (json.JSONDecodeError, OSError):
        return {}
    return state if isinstance(state, dict) else {}


def _step_choice(steps: list[int], file: Path, fmt: str, saved: Any, trainer_state: dict[str, Any]) -> dict[str, Any]:
    """The saved step count, cross-checked with the step the checkpoint says it was written at (HF Trainer:
    ``trainer_state.json`` ``global_step``; Lightning: ``global_step``); a disagreement is logged (the moments may
    be of another run, or the optimizer was re-created mid-training)."""
    record: dict[str, Any] = {"value": steps, "source": "saved per-parameter state"}
    checkpoint_step = None
    if fmt in ("lightning", "distributed") and isinstance(saved, dict) and isinstance(saved.get("global_step"), int):
        checkpoint_step, where = saved["global_step"], f"{file} global_step"
    if isinstance(trainer_state.get("global_step"), int):
        checkpoint_step, where = trainer_state["global_step"], f"{file.parent / 'trainer_state.json'} global_step"
    if checkpoint_step is not None:
        record["checkpoint_step"] = checkpoint_step
        if steps and max(steps) != checkpoint_step:
            log.warning(
                "%s: the optimizer state has taken %s step(s) but %s says %d: the moments may be of another run "
                "(or the optimizer was re-created during training); the reconstruction uses the saved steps",
                file,
                max(steps),
                where,
                checkpoint_step,
            )
    return record


def _format_source(settings: OptimizerSettings, file: Path, saved: Any) -> str:
    """Why the file was read as its format (``summary.json["choices"]``)."""
    if settings.format != "auto":
        return "set by optimizer.format"
    if Path(settings.path).is_dir() and (Path(settings.path) / DCP_METADATA).is_file():
        return f"auto: a directory holding {DCP_METADATA} (a torch.distributed.checkpoint, e.g. FSDP2's last.ckpt)"
    if Path(settings.path).is_dir():
        return f"auto: a directory holding {HF_OPTIMIZER_FILE} (an HF Trainer checkpoint)"
    if file.name == HF_OPTIMIZER_FILE and (file.parent / "trainer_state.json").is_file():
        return f"auto: {HF_OPTIMIZER_FILE} beside trainer_state.json (an HF Trainer checkpoint)"
    if isinstance(saved, dict) and "optimizer_states" in saved:
        return "auto: the file holds optimizer_states (a Lightning checkpoint)"
    return "auto: the file is an optimizer state_dict (torch.save(optimizer.state_dict()))"


def _kind_choice(settings: OptimizerSettings, groups: list[dict]) -> dict[str, Any]:
    """Adam or AdamW, and why (the same rule as :func:`_group_hyper`)."""
    if settings.kind != "auto":
        return {"value": settings.kind, "source": "set by optimizer.kind"}
    flags = [g.get("decoupled_weight_decay") for g in groups]
    kinds = sorted({"adamw" if f is None or bool(f) else "adam" for f in flags})
    if all(f is None for f in flags):
        source = "auto: no decoupled_weight_decay flag saved, AdamW assumed (set optimizer.kind: adam for L2 decay)"
    else:
        source = "auto: the saved decoupled_weight_decay flag of each param group"
    return {"value": kinds[0] if len(kinds) == 1 else kinds, "source": source}


def _schedule_record(
    file: Path, fmt: str, saved: Any, groups: list[dict], trainer_state: dict[str, Any]
) -> dict[str, Any] | None:
    """What the checkpoint tells about the learning-rate schedule (``value``) and where it was read (``source``):
    each group's ``initial_lr`` (set by torch's schedulers), the scheduler's last lr (Lightning), and the last
    nonzero lr logged in ``trainer_state.json`` (HF Trainer). None when it tells nothing."""
    record: dict[str, Any] = {}
    initial = sorted({_as_float(g["initial_lr"]) for g in groups if "initial_lr" in g})
    if initial:
        record["initial_lr"] = initial
    if fmt in ("lightning", "distributed") and isinstance(saved, dict):
        for scheduler in saved.get("lr_schedulers") or []:
            if isinstance(scheduler, dict) and scheduler.get("_last_lr") is not None:
                record["scheduler_last_lr"] = [float(x) for x in scheduler["_last_lr"]]
                break
    history = trainer_state.get("log_history")
    if isinstance(history, list):
        logged = [h for h in history if isinstance(h, dict) and isinstance(h.get("learning_rate"), (int, float))]
        nonzero = [h for h in logged if h["learning_rate"] > 0]
        if nonzero:
            record["last_nonzero_logged_lr"] = float(nonzero[-1]["learning_rate"])
            record["last_nonzero_logged_step"] = nonzero[-1].get("step")
    if not record:
        return None
    sources = {
        "initial_lr": "each param group's initial_lr (set by torch's lr schedulers)",
        "scheduler_last_lr": "the Lightning checkpoint's lr_schedulers",
        "last_nonzero_logged_lr": f"the log_history of {file.parent / 'trainer_state.json'}",
    }
    return {"value": record, "source": "; ".join(text for key, text in sources.items() if key in record)}


def zero_lr_message(state: AdamState) -> str:
    """Why the saved lr is 0 and what eta to probe instead: the schedule has ended (or not started)."""
    schedule = state.choices.get("optimizer.schedule", {}).get("value", {})
    candidates = [
        ("the last nonzero lr logged in trainer_state.json", schedule.get("last_nonzero_logged_lr")),
        ("the schedule's initial lr", max(schedule.get("initial_lr", [0.0]) or [0.0])),
    ]
    hints = [f"{what} was {value:.3g}" for what, value in candidates if value]
    suggestion = next((value for _, value in candidates if value), None)
    why = (
        "this checkpoint's learning-rate schedule has reached 0 (the last step of a decayed schedule, or the first "
        "of a warmup from 0)"
    )
    example = (
        f"e.g. probe.etas: [{suggestion:.3g}] and probe.reference_eta: {suggestion:.3g}"
        if suggestion
        else "e.g. around the peak lr of the run"
    )
    fix = (
        "set probe.etas to the step sizes to probe and probe.reference_eta to the one the attribution, the eval x "
        f"update matrix and the per-token views use ({example}); "
    )
    known = f" ({'; '.join(hints)})" if hints else ""
    return (
        f"the optimizer's saved lr is 0 in every param group ({state.source}): {why}, so the real step is zero and "
        f"there is no lr to centre the eta sweep on{known}. Fix: {fix}the update's directions are per unit lr and "
        "do not depend on it"
    )


# ---------------------------------------------------------------------------------------------
# files
# ---------------------------------------------------------------------------------------------


def _resolve_file(path: Path, fmt: str) -> tuple[Path, str]:
    """The file to read and its format (``auto`` resolved as far as the path tells)."""
    if not path.exists():
        raise FileNotFoundError(f"optimizer state not found: {path} does not exist; expected {EXPECTED_FILES}")
    if path.is_dir() and (path / DCP_METADATA).is_file() and fmt in ("auto", "distributed"):
        return path, "distributed"
    if path.is_dir():
        file = path / HF_OPTIMIZER_FILE
        if file.is_file():
            return file, ("hf_trainer" if fmt == "auto" else fmt)
        checkpoints = sorted(p.name for p in path.glob("checkpoint-*") if (p / HF_OPTIMIZER_FILE).is_file())
        ckpts = sorted(p.name for p in path.glob("*.ckpt"))
        found = checkpoints + ckpts
        hint = f"; pass one of {found} inside it" if found else ""
        raise FileNotFoundError(
            f"optimizer state not found: directory {path} holds no {HF_OPTIMIZER_FILE}{hint}; expected {EXPECTED_FILES}"
        )
    if fmt == "auto" and path.name == HF_OPTIMIZER_FILE and (path.parent / "trainer_state.json").is_file():
        return path, "hf_trainer"
    return path, fmt


def _load_weights_only(file: Path) -> Any:
    """``torch.load`` with ``weights_only=True`` (memory-mapped when the file allows), with clear errors."""
    try:
        return torch.load(file, map_location="cpu", weights_only=True, mmap=zipfile.is_zipfile(file))
    except pickle.UnpicklingError as e:
        text = str(e).partition("WeightsUnpickler error:")[2].strip()  # e.g. "Unsupported global: GLOBAL exec ..."
        detail = text.split("\n")[0].split(". ")[0] if text else (str(e).splitlines() or [type(e).__name__])[0]
        raise ValueError(
            f"{file} was refused for safety: it is not a weights-only file (it pickles objects other than tensors and "
            "plain containers, which could run code when loaded, or it is not a torch file at all), and probe only "
            "loads with weights_only=True. Fix: if you trust the file, re-save just the optimizer state, e.g. "
            f"torch.save(torch.load(path, weights_only=False)['optimizer_states'][0], 'optimizer.pt') for a Lightning "
            f"checkpoint, or torch.save(optimizer.state_dict(), 'optimizer.pt') from the training script; if it is "
            f"corrupt, copy it again. (torch said: {detail})"
        ) from e
    except (
        RuntimeError,
        EOFError,
        IndexError,
        KeyError,
        ValueError,
        TypeError,
        OSError,
    ) as e:  # truncated/garbage files
        raise ValueError(
            f"could not read {file} with torch.load ({type(e).__name__}: {e}): the file is corrupt, truncated or not "
            "written by torch.save. Fix: copy it again, or save the state with torch.save(optimizer.state_dict(), "
            f"path); expected {EXPECTED_FILES}"
        ) from e


def checkpoint_entries(path: Path) -> dict[str, Any]:
    """A distributed checkpoint's entries (name -> tensor or value metadata), its ``.metadata`` read by
    :class:`_CheckpointMetadataUnpickler`: a pickle of anything else is refused for safety, with the fix."""
    try:
        return _safe_checkpoint_reader(path).read_metadata().state_dict_metadata
    except pickle.UnpicklingError as e:
        raise ValueError(
            f"{path / DCP_METADATA} was refused for safety: it pickles {e}, which a distributed checkpoint's "
            "metadata does not hold (it could run code when loaded). Fix: if you trust the checkpoint, save its "
            "optimizer state again (torch.save(optimizer.state_dict()) from a run that loads it); otherwise copy "
            "the checkpoint again from its source"
        ) from e
    except Exception as e:  # noqa: BLE001 - a corrupt or foreign directory: say which and why
        raise ValueError(f"could not read the distributed checkpoint {path} ({type(e).__name__}: {e})") from e


def load_checkpoint(path: Path, template: dict[str, Any]) -> None:
    """Fill ``template`` (entry name -> a tensor laid out as wanted, or None for a plain value) from the distributed
    checkpoint ``path``, on this rank alone (no collective); plain values with ``torch.load(weights_only=True)``."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.api import CheckpointException

    try:
        dcp.load(template, storage_reader=_safe_checkpoint_reader(path), planner=_weights_only_planner(), no_dist=True)
    except (Exception, CheckpointException) as e:  # noqa: BLE001 - torch wraps each rank's failure (a BaseException)
        refused = re.search(r"Unsupported global: (GLOBAL \S+)", str(e))
        if refused:
            raise ValueError(
                f"{path} was refused for safety: a plain value of it pickles {refused.group(1)}, which could run "
                "code when loaded, and probe only loads with weights_only=True. Fix: if you trust the checkpoint, "
                "save its optimizer state again (torch.save(optimizer.state_dict()) from a run that loads it); "
                "otherwise copy the checkpoint again from its source"
            ) from None
        raise ValueError(f"could not read the distributed checkpoint {path} ({type(e).__name__}: {e})") from e


def _read_distributed(path: Path, model: nn.Module, optimizer_index: int) -> dict[str, Any]:
    """A distributed checkpoint's optimizer state as a Lightning checkpoint holds one (``optimizer_states``,
    ``global_step``, ``lr_schedulers``), its moments laid out like the model's parameters (a sharded policy: this
    rank's rows only). Read with ``torch.distributed.checkpoint.load`` on this rank alone (no collective)."""
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    entries = checkpoint_entries(path)
    prefix = f"optimizer_{optimizer_index}."
    keys = [k for k in entries if k.startswith(prefix)]
    if not keys:
        found = sorted({k.split(".")[0] for k in entries})
        raise ValueError(
            f"{path} holds no optimizer_{optimizer_index} (it holds {found}; saved with save_weights_only=True?). "
            "Fix: save a full checkpoint, or set optimizer.optimizer_index"
        )
    params = dict(model.named_parameters())
    template: dict[str, Any] = {}
    for key in keys:
        meta = entries[key]
        if not isinstance(meta, TensorStorageMetadata):
            template[key] = None  # a plain value (hyperparameters, names): read as it was saved
            continue
        shape, dtype = tuple(meta.size), meta.properties.dtype
        fqn = key[len(prefix) :].removeprefix("state.").rpartition(".")[0]
        name = next((n for n in params if fqn == n or fqn.endswith("." + n)), None)
        reference = params.get(name) if name is not None else None
        if reference is not None and tuple(reference.shape) == shape and shape:
            template[key] = torch.zeros_like(reference, dtype=dtype)  # a DTensor of the parameter's layout, or whole
        else:
            template[key] = torch.zeros(shape, dtype=dtype)
    load_checkpoint(path, template)
    state: dict[str, dict[str, Any]] = {}
    groups: dict[int, dict[str, Any]] = {}
    for key, value in template.items():
        rest = key[len(prefix) :]
        if rest.startswith("state."):
            fqn, _, field = rest.removeprefix("state.").rpartition(".")
            state.setdefault(fqn, {})[field] = value
        elif rest.startswith("param_groups."):
            index, _, field = rest.removeprefix("param_groups.").partition(".")
            groups.setdefault(int(index), {})[field] = value
    meta_file = path / "meta.pt"
    extra = _load_weights_only(meta_file) if meta_file.is_file() else {}
    return {
        "optimizer_states": [{"state": state, "param_groups": [groups[i] for i in sorted(groups)]}],
        "global_step": extra.get("global_step") if isinstance(extra, dict) else None,
        "lr_schedulers": extra.get("lr_schedulers") if isinstance(extra, dict) else None,
    }


_CHECKPOINT_METADATA_CLASSES = {
    ("torch.distributed.checkpoint.filesystem", "_StorageInfo"),
    ("torch.serialization", "_get_layout"),
    ("torch", "Size"),
    ("pathlib", "PosixPath"),
    ("pathlib", "WindowsPath"),
    ("collections", "OrderedDict"),
}


class _CheckpointMetadataUnpickler(pickle.Unpickler):
    """Unpickles a distributed checkpoint's ``.metadata``: its own dataclasses, ``torch.Size``, dtypes and layouts,
    paths; any other global (a function that runs code) is refused."""

    def find_class(self, module: str, name: str) -> Any:
        if module == "torch.distributed.checkpoint.metadata" or (module, name) in _CHECKPOINT_METADATA_CLASSES:
            return super().find_class(module, name)
        if module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
            return getattr(torch, name)
        raise pickle.UnpicklingError(f"the global {module}.{name}")


def _safe_checkpoint_reader(path: Path) -> Any:
    """``FileSystemReader`` of ``path`` whose metadata is read by :class:`_CheckpointMetadataUnpickler`."""
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.metadata import StorageMeta

    class SafeReader(FileSystemReader):
        def read_metadata(self, *args: Any, **kwargs: Any) -> Any:
            with open(path / DCP_METADATA, "rb") as f:
                metadata = _CheckpointMetadataUnpickler(f).load()
            if getattr(metadata, "storage_meta", None) is None:
                metadata.storage_meta = StorageMeta()
            metadata.storage_meta.load_id = self.load_id
            return metadata

    return SafeReader(str(path))


def _weights_only_planner() -> Any:
    """torch's default load planner, with plain values read by ``torch.load(weights_only=True)``."""
    from torch.distributed.checkpoint import DefaultLoadPlanner

    class WeightsOnlyPlanner(DefaultLoadPlanner):
        def load_bytes(self, read_item: Any, value: Any) -> None:
            loaded = torch.load(value, weights_only=True)
            if self.flatten_state_dict:
                from torch.distributed.checkpoint._traverse import set_element

                set_element(self.original_state_dict, self.mappings[read_item.dest_index.fqn], loaded)
            else:
                self.state_dict[read_item.dest_index.fqn] = loaded

    return WeightsOnlyPlanner()


def _optimizer_state_dict(saved: Any, file: Path, fmt: str, optimizer_index: int) -> tuple[dict, str]:
    """The optimizer ``state_dict`` inside what was loaded, and the resolved format."""
    if not isinstance(saved, dict):
        raise ValueError(f"{file} holds a {type(saved).__name__}, not a dict; expected {EXPECTED_FILES}")
    if fmt == "auto":
        fmt = "lightning" if "optimizer_states" in saved else "torch"
    if fmt == "lightning":
        if "optimizer_states" not in saved:
            raise ValueError(
                f"{file} is not a Lightning checkpoint (no 'optimizer_states'; keys: {sorted(saved)[:10]}); set "
                "optimizer.format"
            )
        states = saved["optimizer_states"]
        if not states:
            raise ValueError(
                f"{file} holds no optimizer state (saved with save_weights_only=True?); "
                "save a full checkpoint (trainer.save_checkpoint(path) or ModelCheckpoint(save_weights_only=False))"
            )
        if optimizer_index >= len(states):
            raise ValueError(
                f"optimizer.optimizer_index={optimizer_index} but {file} holds {len(states)} optimizer state(s)"
            )
        saved = states[optimizer_index]
    if not (isinstance(saved, dict) and "state" in saved and "param_groups" in saved):
        keys = sorted(saved)[:10] if isinstance(saved, dict) else type(saved).__name__
        raise ValueError(
            f"{file} is not an optimizer state_dict (expected keys 'state' and 'param_groups', found {keys}); "
            f"expected {EXPECTED_FILES}"
        )
    return saved, fmt


# ---------------------------------------------------------------------------------------------
# orders
# ---------------------------------------------------------------------------------------------


def hf_trainer_decay_names(model: nn.Module, no_decay_patterns: tuple[str, ...] = HF_NO_DECAY_PATTERNS) -> set[str]:
    """Names ``transformers.Trainer`` applies weight decay to (its ``get_decay_parameter_names`` rule).

    A parameter is decayed unless a module on its path is an ``nn.LayerNorm`` or its lower-cased name
    matches one of ``no_decay_patterns``.
    """
    patterns = [re.compile(p) for p in no_decay_patterns]
    decay = set()
    for name, _ in model.named_parameters():
        parts = name.split(".")
        path = [model.get_submodule(".".join(parts[:k])) for k in range(1, len(parts))]  # children, not the root
        if any(isinstance(m, nn.LayerNorm) for m in path):
            continue
        if any(p.search(name.lower()) for p in patterns):
            continue
        decay.add(name)
    return decay


def _hf_trainer_order(model: nn.Module, no_decay_patterns: tuple[str, ...], label: str) -> _Order:
    decay = hf_trainer_decay_names(model, no_decay_patterns)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    decayed = [n for n in trainable if n in decay]
    not_decayed = [n for n in trainable if n not in decay]
    return _Order(label, decayed + not_decayed, [len(decayed), len(not_decayed)])


def _named_order(kind: str, model: nn.Module) -> list[_Order]:
    if kind == "model":
        return [_Order("model", [n for n, _ in model.named_parameters()])]
    if kind == "trainable":
        return [_Order("trainable", [n for n, p in model.named_parameters() if p.requires_grad])]
    return [  # hf_trainer: the current rule, then the older one (told apart by the saved group sizes)
        _hf_trainer_order(model, HF_NO_DECAY_PATTERNS, "hf_trainer"),
        _hf_trainer_order(
            model, HF_NO_DECAY_PATTERNS_LEGACY, "hf_trainer (older transformers rule: only biases undecayed)"
        ),
    ]


def _candidate_orders(
    param_order: str | list[str], fmt: str, model: nn.Module, n_ids: int, saved_names: list | None = None
) -> list[_Order]:
    if param_order == "auto" and fmt == "distributed":  # the checkpoint names its parameters
        return [_Order("the names saved in the checkpoint", _match_names([str(n) for n in saved_names], model, n_ids))]
    if isinstance(param_order, list):
        return [_Order("explicit list", _match_names(param_order, model, n_ids))]
    if param_order in PARAM_ORDERS[1:]:
        return _named_order(param_order, model)
    if param_order != "auto":
        file = Path(param_order)
        if not file.is_file():
            raise FileNotFoundError(
                f"optimizer.param_order={param_order!r} is neither one of {PARAM_ORDERS} nor an existing text file "
                "of parameter names"
            )
        names = [ln.strip() for ln in file.read_text().splitlines() if ln.strip() and not ln.strip().startswith("#")]
        return [_Order(f"names from {file}", _match_names(names, model, n_ids))]
    n_all = sum(1 for _ in model.parameters())
    if fmt == "hf_trainer":
        first = ["hf_trainer", "trainable", "model"]
    else:  # the count decides between model and trainable; hf_trainer grouping as a fall-back
        first = ["model", "trainable"] if n_ids == n_all else ["trainable", "model"]
        first.append("hf_trainer")
    orders: list[_Order] = []
    for order in (o for kind in first for o in _named_order(kind, model)):
        if not any(order.names == o.names and order.group_sizes == o.group_sizes for o in orders):
            orders.append(order)  # model and trainable coincide when everything is trainable
    return orders


def _match_names(names: list[str], model: nn.Module, n_ids: int) -> list[str]:
    """Map user-given names onto ``model.named_parameters()`` names, stripping/adding one common prefix."""
    if len(names) != n_ids:
        raise ValueError(
            f"optimizer.param_order lists {len(names)} names but the saved optimizer state holds {n_ids} parameters; "
            "list every parameter the optimizer was built over, in its order"
        )
    if len(set(names)) != len(names):
        dup = sorted({n for n in names if names.count(n) > 1})
        raise ValueError(f"optimizer.param_order lists {dup[:5]} more than once")
    model_names = [n for n, _ in model.named_parameters()]
    known = set(model_names)
    if all(n in known for n in names) or not names:
        return list(names)
    first = names[0].split(".")
    for k in range(len(first)):  # strip the first k components of the given names ...
        strip = ".".join(first[:k]) + ("." if k else "")
        rest = names[0][len(strip) :]
        for model_name in model_names:  # ... and add whatever the model's name holds before the rest
            if model_name == rest or model_name.endswith("." + rest):
                add = model_name[: len(model_name) - len(rest)]
                mapped = [add + n[len(strip) :] if n.startswith(strip) else None for n in names]
                if all(m in known for m in mapped):
                    return mapped  # type: ignore[return-value]
    unknown = [n for n in names if n not in known]
    raise ValueError(
        f"optimizer.param_order names {unknown[:3]} (and {max(0, len(unknown) - 3)} more) are not parameters of the "
        f"model, even after stripping or adding one common prefix; model names look like {model_names[:2]}"
    )


def _check_order(
    order: _Order, ids: list, group_sizes: list[int], state: dict, params: dict[str, Tensor], file: Path
) -> str | None:
    """None if ``order`` fits the saved groups and every state tensor's shape, else the first problem."""
    if len(order.names) != len(ids):
        return f"{len(order.names)} parameters in this order but {len(ids)} saved"
    if order.group_sizes is not None and order.group_sizes != group_sizes:
        return f"groups of sizes {order.group_sizes} expected but {group_sizes} saved"
    for position, (pid, name) in enumerate(zip(ids, order.names)):
        param_shape = tuple(params[name].shape)
        for key, value in state.get(pid, {}).items():
            if key == "step" or not isinstance(value, Tensor):
                continue
            if tuple(value.shape) != param_shape:
                return (
                    f"parameter {name!r} has shape {param_shape} but the saved {key} at position {position} (id {pid}) "
                    f"in {file} has shape {tuple(value.shape)}"
                )
    return None


# ---------------------------------------------------------------------------------------------
# what optimizer wrote the state
# ---------------------------------------------------------------------------------------------

ADAM_STATE_KEYS = {"step", "exp_avg", "exp_avg_sq", "max_exp_avg_sq"}
# state keys and param-group keys that name another optimizer (torch's own, bitsandbytes, transformers)
OTHER_STATE_KEYS = {
    "mu_product": "NAdam",
    "exp_inf": "Adamax",
    "row_var": "Adafactor",
    "col_var": "Adafactor",
    "exp_avg_sq_row": "Adafactor (transformers)",
    "exp_avg_sq_col": "Adafactor (transformers)",
    "momentum_buffer": "SGD with momentum",
    "sum": "Adagrad",
    "square_avg": "RMSprop",
    "state1": "a bitsandbytes 8-bit optimizer (quantised moments)",
    "state2": "a bitsandbytes 8-bit optimizer (quantised moments)",
    "qmap1": "a bitsandbytes 8-bit optimizer (quantised moments)",
}
OTHER_GROUP_KEYS = {"momentum_decay": "NAdam", "beta2_decay": "Adafactor", "lr_decay": "Adagrad", "nesterov": "SGD"}


def identify_adam(groups: list[dict], state: dict, file: Path) -> None:
    """Refuse a state that another optimizer wrote, naming it: probe reconstructs ``torch.optim.Adam`` and
    ``AdamW`` only. Told apart by the per-parameter state keys (NAdam's ``mu_product``, Adamax's ``exp_inf``,
    ...) and the param-group keys (RAdam's groups are Adam's without ``amsgrad``; transformers' old ``AdamW``
    without bias correction has ``correct_bias: False``)."""
    found: dict[str, str] = {}
    for entry in state.values():
        for key in entry:
            if key not in ADAM_STATE_KEYS:
                found.setdefault(OTHER_STATE_KEYS.get(key, "an optimizer other than Adam/AdamW"), f"state key {key!r}")
    for group in groups:
        for key in group:
            if key in OTHER_GROUP_KEYS:
                found.setdefault(OTHER_GROUP_KEYS[key], f"param-group key {key!r}")
        if "betas" in group and "decoupled_weight_decay" in group and "amsgrad" not in group:
            found.setdefault("RAdam", "param groups with decoupled_weight_decay but no amsgrad (torch.optim.RAdam)")
        if group.get("correct_bias") is False:
            found.setdefault("AdamW without bias correction", "param-group key 'correct_bias' = False")
    if found:
        name, evidence = next(iter(found.items()))
        raise ValueError(
            f"{file} holds the state of {name} ({evidence}), not of Adam or AdamW: probe reconstructs the steps of "
            "torch.optim.Adam and torch.optim.AdamW only, and reading another optimizer's moments as Adam's would "
            "give a wrong step. Fix: probe a run trained with AdamW (HF Trainer: optim='adamw_torch'), or point "
            "optimizer.path at that run's optimizer state"
        )


def check_hyper(h: AdamHyper, where: str, overridden: bool = False) -> None:
    """Refuse hyperparameters ``torch.optim.AdamW`` refuses, and ``eps <= 0`` (torch accepts 0, but a parameter
    whose second moment is 0 then divides 0 by 0)."""
    problems = []
    if not (math.isfinite(h.lr) and h.lr >= 0):
        problems.append(f"lr = {h.lr} (must be finite and >= 0)")
    if not 0.0 <= h.beta1 < 1.0:
        problems.append(f"beta1 = {h.beta1} (must be in [0, 1))")
    if not 0.0 <= h.beta2 < 1.0:
        problems.append(f"beta2 = {h.beta2} (must be in [0, 1))")
    if not (math.isfinite(h.eps) and h.eps > 0):
        problems.append(f"eps = {h.eps} (must be finite and > 0)")
    if not (math.isfinite(h.weight_decay) and h.weight_decay >= 0):
        problems.append(f"weight_decay = {h.weight_decay} (must be finite and >= 0)")
    if problems:
        fix = (
            "correct the override (optimizer.lr, beta1, beta2, eps, weight_decay)"
            if overridden
            else "check that optimizer.path is the state of the run you mean (these values are saved in it), or "
            "override them with optimizer.lr, beta1, beta2, eps or weight_decay"
        )
        raise ValueError(
            f"{where}: {'; '.join(problems)}, which torch.optim.AdamW would not take a step with. Fix: {fix}"
        )


def check_moments(entry: dict, name: str, pid: Any, file: Path) -> None:
    """Refuse moments no Adam step can have made: non-finite entries, or negative second moments. One sum (and one
    min for second moments) per tensor; entries are counted only where that finds something (as
    ``probe.loading.check_finite_parameters``)."""
    for key in ("exp_avg", "exp_avg_sq", "max_exp_avg_sq"):
        t = entry.get(key)
        if not isinstance(t, Tensor) or t.numel() == 0:
            continue
        rows = local(t)  # a sharded moment: this rank's rows, the counts summed over the ranks
        bad = 0 if rows.numel() == 0 or bool(torch.isfinite(rows.sum())) else int((~torch.isfinite(rows)).sum())
        negative = int((rows < 0).sum()) if key != "exp_avg" and rows.numel() and bool(rows.min() < 0) else 0
        bad, negative = (int(c) for c in all_reduce_sum(torch.tensor([bad, negative]), t).tolist())
        if bad or negative:
            what = ", ".join(text for n, text in ((bad, f"{bad} non-finite"), (negative, f"{negative} negative")) if n)
            raise ValueError(
                f"{file}: the saved {key} of parameter {name!r} (id {pid}) has {what} value(s) among its {t.numel()} "
                "entries; "
                "Adam's moments are finite and its second moments >= 0, so this state is corrupt or the training "
                "had already diverged. Fix: probe an earlier checkpoint, from before the loss or gradients became "
                "non-finite"
            )


def moments_record(states: dict[str, ParamAdamState]) -> dict[str, Any] | None:
    """The moments' dtype and, for half-precision moments, the fraction of second moments that underflowed to 0
    where the first moment is not 0 (a gradient was seen, so v > 0 in exact arithmetic)."""
    seen = [s for s in states.values() if s.exp_avg is not None and s.exp_avg_sq is not None]
    if not seen:
        return None
    dtypes = sorted({str(s.exp_avg_sq.dtype).removeprefix("torch.") for s in seen})
    record: dict[str, Any] = {"dtype": dtypes[0] if len(dtypes) == 1 else dtypes}
    half = [s for s in seen if s.exp_avg_sq.dtype in (torch.float16, torch.bfloat16)]
    if half:
        moved = int(global_sum([local(s.exp_avg) != 0 for s in half]))
        lost = int(global_sum([(local(s.exp_avg_sq) == 0) & (local(s.exp_avg) != 0) for s in half]))
        record["second_moments_underflowed"] = lost / moved if moved else 0.0
    return record


# ---------------------------------------------------------------------------------------------
# hyperparameters and per-parameter state
# ---------------------------------------------------------------------------------------------


def _as_float(x: Any) -> float:
    return float(x.item() if isinstance(x, Tensor) else x)


def _group_hyper(group: dict, gi: int, settings: OptimizerSettings, file: Path) -> AdamHyper:
    if group.get("maximize", False):
        raise ValueError(f"{file}: param group {gi} uses maximize=True, which probe does not reconstruct")
    missing = [k for k in ("lr", "betas", "eps", "weight_decay") if k not in group]
    if missing:
        raise ValueError(
            f"{file}: param group {gi} lacks {missing}; it is not an Adam/AdamW state (only those are reconstructed)"
        )
    if settings.kind == "auto":
        decoupled = bool(group.get("decoupled_weight_decay", True))
    else:
        decoupled = settings.kind == "adamw"
    saved = AdamHyper.from_param_group(group, decoupled)
    overrides = {k: getattr(settings, k) for k in ("lr", "beta1", "beta2", "eps", "weight_decay", "amsgrad")}
    given = {k: v for k, v in overrides.items() if v is not None}
    hyper = replace(saved, **given)
    where = f"{file}: param group {gi}" + (f" (with the overrides {given})" if given else "")
    check_hyper(hyper, where, overridden=bool(given))
    return hyper


def _step_of(entry: dict) -> int:
    step = entry.get("step", 0)
    return int(_as_float(step))


def _param_state(entry: dict, name: str, pid: Any, hyper: AdamHyper, file: Path) -> ParamAdamState:
    if "step" not in entry and any(isinstance(entry.get(k), Tensor) for k in ("exp_avg", "exp_avg_sq")):
        raise ValueError(
            f"{file}: the state of parameter {name!r} (id {pid}) holds moments but no 'step'; Adam's bias correction "
            "depends on the step count, and reading it as step 0 would be wrong. Fix: save the optimizer with "
            "optimizer.state_dict() (torch writes 'step' for every parameter), or add the step count to each "
            "parameter's state"
        )
    check_moments(entry, name, pid, file)
    step = _step_of(entry)
    if step > 0:
        needed = ["exp_avg", "exp_avg_sq"] + (["max_exp_avg_sq"] if hyper.amsgrad else [])
        missing = [k for k in needed if not isinstance(entry.get(k), Tensor)]
        if missing:
            raise ValueError(
                f"{file}: state of parameter {name!r} (id {pid}) at step {step} lacks {missing}"
                + (
                    "; amsgrad is on (saved or overridden) but the optimizer ran without it: set "
                    "optimizer.amsgrad=false"
                    if "max_exp_avg_sq" in missing
                    else ""
                )
            )
    return ParamAdamState(
        step=step,
        exp_avg=entry.get("exp_avg"),
        exp_avg_sq=entry.get("exp_avg_sq"),
        max_exp_avg_sq=entry.get("max_exp_avg_sq"),
    )
