"""Data for probe: the update batch U and the evaluation batches E (sampled or read from rollout files), and the
prompts of a GRPO run."""

from datamodules.rollouts import RolloutRecords, fill_advantages, read_rollouts, validate_rollouts, write_rollouts


def __getattr__(name: str):
    # The LightningDataModules are imported lazily so that reading rollouts does not import Lightning.
    if name in ("ProbeDataModule", "UpdateBatchSettings", "EvalBatchSettings"):
        import datamodules.probe_data as probe_data

        return getattr(probe_data, name)
    if name in ("PromptDataModule", "StepPrompts"):
        import datamodules.prompts as prompts

        return getattr(prompts, name)
    raise AttributeError(f"module 'datamodules' has no attribute {name!r}")


__all__ = [
    "RolloutRecords",
    "fill_advantages",
    "read_rollouts",
    "validate_rollouts",
    "write_rollouts",
    "ProbeDataModule",
    "UpdateBatchSettings",
    "EvalBatchSettings",
    "PromptDataModule",
    "StepPrompts",
]
