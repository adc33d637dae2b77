"""The typed state of one ``predict`` run in one process: what each stage hands to the next.

The stages of a run (docs/DESIGN.md section 6) never pass results through ad-hoc attributes of
each other: the :class:`~probe.module.ProbeModule` owns one :class:`PredictRunState`, and every
stage reads what it needs from it with :meth:`PredictRunState.require`, which names the stage that
provides a missing field. Producers fill it in this order:

=================  ======================================  ====================================
field              provided by                             when
=================  ======================================  ====================================
settings, policy,  ProbeModule                             construction
tokenizer
run_dir            ProbeModule.open_run_dir                ProbeDataModule.setup (every rank)
inputs             datamodules.ProbeDataModule             setup
update, plan,      callbacks.UpdateReconstruction          on_predict_start
directions,
resolution
choices            ProbeModule (policy.dtype),             construction, on_predict_start
                   callbacks.UpdateReconstruction (rank 0)
result             callbacks.SNISAggregation               on_predict_epoch_end
progress           callbacks.SweepProgress (optional)      first predict batch
=================  ======================================  ====================================

Observers (``RunWriter``, ``WandbReport``, ``SweepProgress``) only read it, at ``on_predict_end``
or later, so their order does not matter. No Lightning import here.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Callable

from torch import nn

from probe.batch import SequenceBatch, collate
from probe.engine import EtaResolution, EvalBatch, Plan
from probe.loading import PolicySettings
from probe.losses import LossConfig
from probe.optim_loading import OptimizerSettings
from probe.overrides import Direction
from probe.results import EvalResult
from probe.rundir import RunDirectory
from probe.settings import PrecisionSettings, ProbeSettings, RunSettings
from probe.update import ReconstructionConfig, Update

PROVIDERS = {
    "run_dir": "ProbeModule.open_run_dir, called by datamodules.ProbeDataModule in setup (use that DataModule)",
    "inputs": "datamodules.ProbeDataModule (setup): pass it as the run's data",
    "update": "callbacks.UpdateReconstruction (on_predict_start); ProbeModule.configure_callbacks adds it",
    "plan": "callbacks.UpdateReconstruction (on_predict_start); ProbeModule.configure_callbacks adds it",
    "directions": "callbacks.UpdateReconstruction (on_predict_start); ProbeModule.configure_callbacks adds it",
    "resolution": "callbacks.UpdateReconstruction (on_predict_start); ProbeModule.configure_callbacks adds it",
    "result": "callbacks.SNISAggregation (on_predict_epoch_end); ProbeModule.configure_callbacks adds it",
}


def indexed_collate(records: list[dict], pad_token_id: int) -> SequenceBatch:
    """Records that carry their position (``index``) as one padded batch."""
    return collate(records, pad_token_id=pad_token_id, index=[r["index"] for r in records])


@dataclass
class ProbeInputs:
    """The update batch U and the evaluation batches E of a run, as read from the run's rollout files."""

    update_records: list[dict]  # U, each with "index" = its row
    eval_records: list[list[dict]]  # one list per evaluation batch, each record with "index"
    temperatures: list[float]  # tau each evaluation batch was sampled at
    pad_token_id: int

    @property
    def update_batch(self) -> SequenceBatch:
        """U as one padded batch (index = position in U)."""
        return indexed_collate(self.update_records, self.pad_token_id)

    def eval_batch(self, k: int) -> EvalBatch:
        batch = indexed_collate(self.eval_records[k], self.pad_token_id)
        return EvalBatch(name=f"eval_{k:02d}", batch=batch, temperature=self.temperatures[k])


@dataclass(frozen=True)
class PredictSettings:
    """Every setting of a predict run, as the ProbeModule received them (``summary.json["config"]``)."""

    policy: PolicySettings
    optimizer: OptimizerSettings  # where the optimizer state is read (default: the policy directory)
    loss: LossConfig
    reconstruction: ReconstructionConfig
    probe: ProbeSettings
    precision: PrecisionSettings
    run: RunSettings

    def as_dict(self) -> dict[str, Any]:
        return {f.name: asdict(getattr(self, f.name)) for f in fields(self)}

    def resume_fingerprint(self) -> dict[str, Any]:
        """The settings a run's cached rows depend on: all but :data:`NOT_IN_RESUME_FINGERPRINT`."""
        out = self.as_dict()
        for key in NOT_IN_RESUME_FINGERPRINT:
            section, name = key.split(".")
            out[section].pop(name, None)
        return out


# Settings a resume may change: where and how loudly the run writes, memory and speed knobs (the cached rows
# do not depend on them beyond float rounding), and what is computed from all rows at the end of the run.
NOT_IN_RESUME_FINGERPRINT = (
    "run.root",
    "run.name",
    "run.overwrite",
    "run.log_level",
    "run.num_threads",
    "probe.forward_batch_size",
    "probe.head_budget_mib",
    "probe.save_update",
    "probe.attribution",
    "probe.eval_update_matrix",
    "probe.per_sequence_exact",
    "probe.per_token_views",
    "probe.reward",
    "probe.covariance_law",
    "probe.covariance_fraction",
)


def settings_key(key: str) -> str:
    """A key of :meth:`PredictSettings.resume_fingerprint` as the config spells it (``model.init_args.probe.etas``)."""
    return f"model.init_args.{key}"


@dataclass
class PredictRunState:
    """One process's state of a predict run (module docstring: who provides each field)."""

    settings: PredictSettings
    policy: nn.Module
    tokenizer: Any
    policy_dir: Path
    run_dir: RunDirectory | None = None
    inputs: ProbeInputs | None = None
    update: Update | None = None
    plan: Plan | None = None
    directions: dict[str, Direction] | None = None  # part -> direction per unit lr, on the policy's device
    resolution: EtaResolution | None = None  # which etas move theta in the policy's dtype
    result: list[EvalResult] | None = None  # one per evaluation batch (complete on rank 0)
    timings: dict[str, float] = field(default_factory=dict)
    # every automatic choice, with its source (``summary.json["choices"]``): ProbeModule (policy.dtype),
    # callbacks.UpdateReconstruction (the optimizer file's format, parameter order, kind, lr), on rank 0
    choices: dict[str, dict[str, Any]] = field(default_factory=dict)
    started: float = field(default_factory=time.perf_counter)
    progress: Callable[[float], None] | None = None  # set by callbacks.SweepProgress: passes done

    def plan_fingerprint(self) -> dict[str, Any]:
        """What the cached rows of E depend on beyond the settings and inputs (``partial/plan.json``): the resolved
        plan, the reconstructed update's scalars (a policy or optimizer file changed in place changes its norms),
        E's sizes and tau."""
        plan, update, inputs = self.require("plan"), self.require("update"), self.require("inputs")
        fingerprint = {f"plan.{k}": v for k, v in plan.describe().items()}
        fingerprint.update({f"update.{k}": v for k, v in update.summary().items()})
        fingerprint.update(rows=plan.row_layout(), evals=[len(r) for r in inputs.eval_records], tau=inputs.temperatures)
        return fingerprint

    def require(self, name: str) -> Any:
        """The field ``name``, or an error naming the stage that provides it."""
        value = getattr(self, name)
        if value is None:
            raise RuntimeError(f"the probe run has no {name!r} yet: it is provided by {PROVIDERS.get(name, 'the run')}")
        return value

    @property
    def finished(self) -> bool:
        """The run directory holds the finished run (``summary.json`` with status ``complete``)."""
        return self.run_dir is not None and self.run_dir.is_finished()

    def tick(self, n: float) -> None:
        """Report ``n`` teacher-forcing passes done (to the progress bar, if one is attached)."""
        if self.progress is not None:
            self.progress(n)


def on_rank_zero(trainer: Any, fn: Callable[[], Any]) -> Any:
    """``fn()`` on rank 0 only; its value there (None elsewhere). Under several processes a failure on rank 0 is
    broadcast and raised on every rank, so that no rank waits for ever in a later collective."""
    value, failure = None, None
    if trainer.global_rank == 0:
        try:
            value = fn()
        except Exception as e:  # re-raised below, on every rank
            failure = e
    if trainer.world_size > 1:
        message = trainer.strategy.broadcast(None if failure is None else f"{type(failure).__name__}: {failure}", src=0)
        if message is not None and failure is None:
            raise RuntimeError(f"rank 0 stopped the run: {message}")
    if failure is not None:
        raise failure
    return value


def run_state_of(trainer: Any) -> PredictRunState:
    """The run state of the Trainer's module, or a clear error when the module is not a probe module."""
    module = getattr(trainer, "lightning_module", None)
    state = getattr(module, "run_state", None)
    if not isinstance(state, PredictRunState):
        raise TypeError(
            f"{type(module).__name__} is not a probe predict module (it has no PredictRunState): the probe's "
            "DataModule and callbacks run with probe.ProbeModule"
        )
    return state
