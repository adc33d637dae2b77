"""probe: predict, measure and attribute the entropy change of an RL update on a language-model policy."""
from probe.batch import SequenceBatch, collate
from probe.logprobs import TokenStats, teacher_force, token_logprobs_and_entropy
from probe.losses import LossConfig, Normalisers, normalisers, per_sequence_loss

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
]
