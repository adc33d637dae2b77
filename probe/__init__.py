"""probe: predict, measure and attribute the entropy change of an RL update on a language-model policy."""

from probe.adam import AdamHyper, AdamState, ParamAdamState
from probe.analyze import (
    LinearityCriteria,
    LogLogFit,
    PartLinearity,
    analyse_part,
    analyse_run,
    analyse_summary,
    loglog_fit,
)
from probe.attribution import (
    Attribution,
    AttributionInputs,
    PerSequenceExact,
    attribute,
    eval_gradient,
    eval_update_matrix,
    per_sequence_exact,
)
from probe.batch import SequenceBatch, collate
from probe.engine import EvalBatch, Plan, batch_rows, complete_eval, make_plan, probe_eval, summarise_eval
from probe.live_contract import LiveProbeTarget, ProbedStep
from probe.loading import LoraSettings, PolicySettings, load_policy, toy_policy
from probe.logprobs import TeacherForcing, TokenStats, teacher_force, token_logprobs_and_entropy
from probe.losses import LossConfig, Normalisers, normalisers, per_sequence_loss
from probe.optim_loading import OptimizerSettings, hf_trainer_decay_names, load_optimizer_state
from probe.overrides import Sweep, base_statistics, iter_sweep, sweep
from probe.realised import RealisedChange, realised_change
from probe.results import AttributionSummary, BaseEntropy, EvalResult, PartResult
from probe.rewards import RewardFunction, extract_final_number, gsm8k_reward, resolve_reward
from probe.sampling import SamplingSettings, group_advantages, sample_responses, sample_update_batch
from probe.settings import PrecisionSettings, ProbeSettings, RunSettings
from probe.snis import SNISConfig, SNISResult, logprob_gap, snis_difference, snis_estimate, snis_estimates, snis_sweep
from probe.statistics import INTEGRANDS, SequenceStats
from probe.taylor import (
    FirstOrder,
    SecondOrder,
    SequenceDerivatives,
    first_order,
    sequence_derivatives,
    snis_derivatives,
)
from probe.toy.world import ToyWorldConfig, build_toy_world
from probe.update import (
    ReconstructionConfig,
    Update,
    adam_step_parts,
    clip_coefficient,
    per_sequence_directions,
    per_sequence_gradients,
    per_sequence_inner_products,
    reconstruct_update,
    update_from_gradients,
)

__all__ = [
    "SequenceBatch",
    "collate",
    "TeacherForcing",
    "TokenStats",
    "INTEGRANDS",
    "teacher_force",
    "token_logprobs_and_entropy",
    "LossConfig",
    "Normalisers",
    "normalisers",
    "per_sequence_loss",
    "AdamHyper",
    "AdamState",
    "ParamAdamState",
    "OptimizerSettings",
    "hf_trainer_decay_names",
    "load_optimizer_state",
    "RewardFunction",
    "extract_final_number",
    "gsm8k_reward",
    "resolve_reward",
    "PrecisionSettings",
    "ProbeSettings",
    "RunSettings",
    "LoraSettings",
    "PolicySettings",
    "load_policy",
    "toy_policy",
    "SamplingSettings",
    "group_advantages",
    "sample_responses",
    "sample_update_batch",
    "ToyWorldConfig",
    "build_toy_world",
    "ReconstructionConfig",
    "Update",
    "adam_step_parts",
    "clip_coefficient",
    "per_sequence_directions",
    "per_sequence_gradients",
    "per_sequence_inner_products",
    "reconstruct_update",
    "update_from_gradients",
    "SequenceStats",
    "Sweep",
    "base_statistics",
    "iter_sweep",
    "sweep",
    "SNISConfig",
    "SNISResult",
    "logprob_gap",
    "snis_difference",
    "snis_estimate",
    "snis_estimates",
    "snis_sweep",
    "FirstOrder",
    "SecondOrder",
    "SequenceDerivatives",
    "first_order",
    "sequence_derivatives",
    "snis_derivatives",
    "Attribution",
    "AttributionInputs",
    "PerSequenceExact",
    "attribute",
    "eval_gradient",
    "eval_update_matrix",
    "per_sequence_exact",
    "LinearityCriteria",
    "LogLogFit",
    "PartLinearity",
    "analyse_part",
    "analyse_run",
    "analyse_summary",
    "loglog_fit",
    "AttributionSummary",
    "BaseEntropy",
    "EvalResult",
    "PartResult",
    "EvalBatch",
    "Plan",
    "batch_rows",
    "complete_eval",
    "make_plan",
    "probe_eval",
    "realised_change",
    "RealisedChange",
    "summarise_eval",
    "LiveProbeTarget",
    "ProbedStep",
    "ProbeModule",
    "GRPOModule",
]


def __getattr__(name: str):
    # Lightning classes are imported lazily so that `import probe` stays light for the math.
    if name == "ProbeModule":
        from probe.module import ProbeModule

        return ProbeModule
    if name == "GRPOModule":
        from probe.grpo import GRPOModule

        return GRPOModule
    raise AttributeError(f"module 'probe' has no attribute {name!r}")
