"""probe: predict, measure and attribute the entropy change of an RL update on a language-model policy."""
from probe.batch import SequenceBatch, collate
from probe.logprobs import TokenStats, teacher_force, token_logprobs_and_entropy
from probe.losses import LossConfig, Normalisers, normalisers, per_sequence_loss
from probe.adam import AdamHyper, AdamState, ParamAdamState
from probe.optim_loading import OptimizerSettings, hf_trainer_decay_names, load_optimizer_state
from probe.rewards import RewardFunction, extract_final_number, gsm8k_reward, resolve_reward
from probe.settings import PrecisionSettings, ProbeSettings, RunSettings

__all__ = [
    "SequenceBatch",
    "collate",
    "TokenStats",
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
]


def __getattr__(name: str):
    # Lightning classes are imported lazily so that `import probe` stays light for the math.
    if name == "ProbeModule":
        from probe.module import ProbeModule

        return ProbeModule
    raise AttributeError(f"module 'probe' has no attribute {name!r}")
