"""Data for probe: the update batch U and the evaluation batch E, sampled or read from rollout files."""
from datamodules.rollouts import (
    RolloutRecords,
    fill_advantages,
    read_rollouts,
    validate_rollouts,
    write_rollouts,
)


def __getattr__(name: str):
    # The LightningDataModule is imported lazily so that reading rollouts does not import Lightning.
    if name in ("ProbeDataModule", "UpdateBatchSettings", "EvalBatchSettings", "PromptSource"):
        import datamodules.probe_data as probe_data

        return getattr(probe_data, name)
    if name in ("PromptDataModule", "StepPrompts"): return getattr(__import__("datamodules.prompts", fromlist=[name]), name)  # noqa: E701
    raise AttributeError(f"module 'datamodules' has no attribute {name!r}")


__all__ = [
    "RolloutRecords", "fill_advantages", "read_rollouts", "validate_rollouts", "write_rollouts",
    "ProbeDataModule", "UpdateBatchSettings", "EvalBatchSettings", "PromptSource",
]
