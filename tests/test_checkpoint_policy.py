"""A training run's Lightning checkpoint as the policy: its weights, with the config and tokenizer of an HF directory;
and the warning when the policy's weights and the optimizer state were saved at different steps.

A toy GRPO fit of 3 steps that writes ``checkpoints/step=2.ckpt`` (weights and moments after 2 steps) and exports
its policy after 3 (``policy/``, with ``probe_fit.json`` saying ``global_step: 3``): the pairs a user can mix up.
"""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch

from probe.loading import PolicySettings, load_policy

from support import QUIET


@pytest.fixture(scope="module")
def fitted(tmp_path_factory, run_fit) -> Path:
    root = tmp_path_factory.mktemp("checkpoint_policy")
    keep = ("--model.init_args.checkpoint_every_n_steps", "2", "--trainer.enable_checkpointing", "true")
    keep += ("--model.init_args.save_policy", "true")
    steps = ("--trainer.max_steps", "3", "--data.init_args.prompts_per_step", "4")  # (the default lr: U stays varied)
    return run_fit(root, "fit", *QUIET, *steps, *keep)


def step2(run: Path) -> Path:
    (checkpoint,) = run.glob("checkpoints/step=2*.ckpt")
    return checkpoint


def test_a_lightning_checkpoint_gives_the_weights_it_saved(fitted):
    checkpoint = step2(fitted)
    model, tokenizer = PolicySettings(path=str(checkpoint), config_path=str(fitted / "policy")).load()
    saved = torch.load(checkpoint, map_location="cpu", weights_only=True)
    assert saved["global_step"] == 2 and model.probe_checkpoint_step == 2
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, saved["state_dict"][f"policy.{name}"]), name  # the module's `policy.` prefix
    exported, _ = load_policy(fitted / "policy")  # after the third step: other weights
    assert any(not torch.equal(a, b) for a, b in zip(model.state_dict().values(), exported.state_dict().values()))
    assert tokenizer.pad_token_id is not None


def test_a_lightning_checkpoint_without_a_config_directory_is_refused_with_the_fix(fitted):
    with pytest.raises(ValueError, match=r"is a Lightning checkpoint.*Fix: set policy.config_path"):
        PolicySettings(path=str(step2(fitted))).load()


def test_a_config_directory_of_another_model_is_refused(fitted, tiny_llama, tmp_path):
    other = tmp_path / "other"
    tiny_llama(0).save_pretrained(other)
    load_policy(fitted / "policy")[1].save_pretrained(other)  # a tokenizer, so that only the weights disagree
    with pytest.raises(ValueError, match=r"do not match the model of policy.config_path"):
        PolicySettings(path=str(step2(fitted)), config_path=str(other)).load()


def test_weights_and_moments_of_different_steps_are_warned_and_a_matching_pair_is_not(
    fitted, run_predict, tmp_path, caplog
):
    checkpoint = step2(fitted)
    optimizer = ("--model.init_args.optimizer.path", str(checkpoint))
    with caplog.at_level(logging.WARNING, logger="probe"):
        mixed = run_predict(tmp_path, "mixed", "--model.init_args.policy.path", str(fitted / "policy"), *optimizer)
    warned = [r.getMessage() for r in caplog.records if "saved at step 3" in r.getMessage()]
    assert len(warned) == 1 and "optimizer state at step 2" in warned[0] and "Fix:" in warned[0]
    assert mixed["choices"]["policy.step"]["value"] == 3
    caplog.clear()
    policy = ("--model.init_args.policy.path", str(checkpoint), "--model.init_args.policy.config_path")
    with caplog.at_level(logging.WARNING, logger="probe"):
        matched = run_predict(tmp_path, "matched", *policy, str(fitted / "policy"), *optimizer)
    assert not [r for r in caplog.records if "saved at step" in r.getMessage()]
    assert matched["choices"]["policy.step"]["value"] == matched["choices"]["optimizer.step"]["checkpoint_step"] == 2
