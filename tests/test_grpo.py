"""GRPO training with `python -m probe fit`: the toy policy gets better, and the run leaves files the predict
pipeline reads (a Lightning checkpoint whose AdamW state probe.optim_loading maps like torch does, the HF policy).

The reward is measured exactly (no sampling noise): the toy task has one correct response per prompt,
so the expected reward over all 100 problems is the mean probability of the correct answers
(``probe.toy.world.expected_reward``).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

STEPS = 12


@pytest.fixture(scope="module")
def trained(tmp_path_factory, run_fit) -> Path:
    """A 12-step GRPO run without the live probe (``--trainer.callbacks []``), checkpointed at the end."""
    root = tmp_path_factory.mktemp("grpo")
    extra = (
        "--trainer.callbacks",
        "[]",
        "--trainer.max_steps",
        str(STEPS),
        "--model.init_args.checkpoint_every_n_steps",
    )
    return run_fit(root, "run", *extra, "0")


def test_grpo_raises_the_expected_reward_of_the_toy_policy(trained, toy_world_dir):
    from probe.loading import load_policy
    from probe.toy.world import expected_reward

    before = expected_reward(load_policy(str(toy_world_dir))[0])
    after = expected_reward(load_policy(str(trained / "policy"))[0])
    # measured with this seed: 0.514 -> 0.551 after 12 steps at lr 1e-4 (other rollout seeds: +0.023 to +0.037)
    assert after > before + 0.01, (before, after)


def test_history_has_one_line_per_step_with_the_global_batch(trained):
    history = [json.loads(line) for line in (trained / "history.jsonl").read_text().splitlines()]
    assert [h["step"] for h in history] == list(range(STEPS))
    for h in history:
        assert h["responses"] == 16 * 8  # prompts_per_step x G, sampled on every step
        assert h["sequences"] == h["responses"] - 8 * h["groups_dropped"]  # dead groups leave U
        assert 0.0 <= h["mean_reward"] <= 1.0


def test_the_lightning_checkpoint_maps_to_the_saved_policy_like_torch_itself(trained):
    from probe.adam import AdamState
    from probe.loading import load_policy
    from probe.optim_loading import load_optimizer_state

    ckpt = trained / "checkpoints" / "last.ckpt"
    policy, _ = load_policy(str(trained / "policy"))
    raw = torch.load(ckpt, map_location="cpu", weights_only=True)
    assert raw["global_step"] == STEPS
    for n, p in policy.named_parameters():  # the checkpoint is of the same step as the saved policy
        assert torch.equal(raw["state_dict"][f"policy.{n}"], p.detach()), n

    loaded = load_optimizer_state(str(ckpt), policy)
    reference = torch.optim.AdamW(policy.parameters())  # torch's own loader maps the ids by position
    reference.load_state_dict(raw["optimizer_states"][0])
    truth = AdamState.from_optimizer(reference, policy)
    assert list(loaded.hyper) == list(truth.hyper) and loaded.hyper == truth.hyper
    assert loaded.hyper[next(iter(loaded.hyper))].lr == pytest.approx(1e-4)
    for n, st in truth.state.items():
        assert loaded.state[n].step == st.step == STEPS
        assert torch.equal(loaded.state[n].exp_avg, st.exp_avg) and torch.equal(
            loaded.state[n].exp_avg_sq, st.exp_avg_sq
        )


def test_the_run_directory_holds_config_checkpoints_and_policy(trained):
    for name in (
        "config.yaml",
        "checkpoints/last.ckpt",
        "policy/config.json",
        "policy/model.safetensors",
        "policy/tokenizer.json",
        "policy/probe_fit.json",
    ):
        assert (trained / name).is_file(), name


# ---- building blocks, no training ----------------------------------------------------------------


def test_every_step_sees_the_same_global_prompts_whatever_the_number_of_processes():
    from datamodules.prompts import StepPrompts

    prompts = [[1, k] for k in range(40)]
    answers = [None] * 40
    one = list(StepPrompts(prompts, answers, prompts_per_step=8))
    per_rank = [list(StepPrompts(prompts, answers, prompts_per_step=8, rank=r, world_size=2)) for r in range(2)]
    assert len(one) == len(per_rank[0]) == len(per_rank[1]) == 5
    for k, batch in enumerate(one):
        union = sorted(i for r in range(2) for i in per_rank[r][k]["index"])
        assert union == batch["index"] == list(range(8 * k, 8 * k + 8))
        assert per_rank[0][k]["prompt_ids"] == [prompts[i] for i in per_rank[0][k]["index"]]


def test_prompts_per_step_must_split_evenly_across_processes():
    from datamodules.prompts import StepPrompts

    with pytest.raises(ValueError, match="multiple of the number of processes"):
        StepPrompts([[1, 2]] * 10, [None] * 10, prompts_per_step=5, rank=0, world_size=2)


@pytest.fixture(scope="module")
def toy_policy(toy_world_dir):
    from probe.loading import load_policy

    return load_policy(str(toy_world_dir))


def _rollout(policy, tokenizer, reward, mode, attempts=2):
    from probe.grpo import RolloutSettings, sample_rollout
    from probe.toy.task import make_prompts

    settings = RolloutSettings(n_per_prompt=4, zero_advantage=mode, max_resample_attempts=attempts)
    prompts = make_prompts(3, seed=0)
    return sample_rollout(
        policy, tokenizer, prompts, [10, 11, 12], [None] * 3, settings, seed=0, rollout=0, reward_fn=reward
    )


@pytest.mark.parametrize("mode, kept, attempts", [("keep", 12, 0), ("drop", 0, 0), ("resample", 0, 3 * 2)])
def test_groups_whose_rewards_are_all_equal_are_kept_dropped_or_resampled(toy_policy, mode, kept, attempts):
    policy, tokenizer = toy_policy
    ro = _rollout(policy, tokenizer, lambda prompt, response: 1.0, mode)  # every group dead
    assert len(ro.records) == kept and ro.resampled == attempts
    assert ro.dropped == (3 if kept == 0 else 0)
    assert all(r["advantage"] == 0.0 for r in ro.records)


def test_rollouts_are_reproducible_per_prompt_and_indexed_by_their_place_in_the_global_batch(toy_policy):
    from probe.grpo import RolloutSettings, sample_rollout
    from probe.toy.task import make_prompts, reward

    policy, tokenizer = toy_policy
    prompts = make_prompts(4, seed=0)
    s = RolloutSettings(n_per_prompt=4, zero_advantage="keep")
    whole = sample_rollout(policy, tokenizer, prompts, [0, 1, 2, 3], [None] * 4, s, seed=5, rollout=2, reward_fn=reward)
    odd = sample_rollout(policy, tokenizer, prompts[1::2], [1, 3], [None] * 2, s, seed=5, rollout=2, reward_fn=reward)
    assert [r["index"] for r in whole.records] == list(range(16))
    by_index = {r["index"]: r for r in whole.records}
    for r in odd.records:  # a rank holding prompts 1 and 3 draws exactly what one process draws for them
        assert r["response_ids"] == by_index[r["index"]]["response_ids"] and r["group"] == by_index[r["index"]]["group"]


# ---- training never saves what it should not (issue 13 section 6)

USER_REWARDS = '''
from probe.toy.task import reward as toy


def extreme(prompt, response, finished=None):
    """The toy reward scaled to +-1e200: finite, but its advantages overflow float32 gradients."""
    return 1e200 * (2 * toy(prompt, response, finished=finished) - 1)


def broken(prompt, response):
    return len(response) / (len(response) - len(response))
'''


@pytest.fixture()
def user_rewards(tmp_path, monkeypatch) -> str:
    (tmp_path / "user_rewards_grpo.py").write_text(USER_REWARDS)
    monkeypatch.syspath_prepend(str(tmp_path))
    return "user_rewards_grpo"


def short_fit(run_fit, root: Path, name: str, *extra: str) -> Path:
    settings = ("--trainer.callbacks", "[]", "--trainer.max_steps", "2", "--model.init_args.checkpoint_every_n_steps")
    return run_fit(root, name, *settings, "1", *extra)


def test_a_step_with_non_finite_gradients_stops_the_fit_before_it_and_saves_nothing_non_finite(
    run_fit, tmp_path, user_rewards
):
    # step 0 needs one of its 16 groups of 8 to score unlike itself: the toy policy answers right about half the
    # time, so all 16 tie with probability about (2 * 0.5^8)^16 ~ 1e-34 whatever the CPU samples
    reward = ("--model.init_args.rollout.reward", f"{user_rewards}:extreme")
    with pytest.raises(FloatingPointError) as failure:
        short_fit(run_fit, tmp_path, "extreme", *reward, "--model.init_args.rollout.normalize_std", "false")
    message = str(failure.value)
    assert message.startswith("step 0: the loss is ") and "trained tensors" in message and "holds inf/NaN" in message
    assert "advantages span [-" in message and "rollout.normalize_std=false keeps their scale" in message
    run = tmp_path / "extreme"
    assert not (run / "policy").exists() and not list(run.rglob("*.ckpt"))  # nothing was saved


def test_a_reward_function_that_raises_is_named_with_the_sample(run_fit, tmp_path, user_rewards):
    from probe.rewards import RewardFunctionError

    reward = ("--model.init_args.rollout.reward", f"{user_rewards}:broken")
    with pytest.raises(RewardFunctionError) as failure:
        short_fit(run_fit, tmp_path, "broken", *reward)
    assert f"reward function '{user_rewards}:broken' raised ZeroDivisionError: division by zero on prompt '" in str(
        failure.value
    )
    assert isinstance(failure.value.__cause__, ZeroDivisionError)


def test_a_second_fit_never_continues_into_the_first_ones_folder(run_fit, tmp_path):
    from probe.rundir import RunDirectoryExists

    run = short_fit(run_fit, tmp_path, "twice")
    history = (run / "history.jsonl").read_text()
    with pytest.raises(RunDirectoryExists, match=r"twice holds an earlier fit \(.*history.jsonl.*Fix: choose another"):
        short_fit(run_fit, tmp_path, "twice")
    assert (run / "history.jsonl").read_text() == history  # untouched
    short_fit(run_fit, tmp_path, "twice", "--model.init_args.run.overwrite", "true")
    steps = [json.loads(line)["step"] for line in (run / "history.jsonl").read_text().splitlines()]
    assert steps == [0, 1]  # one run's history, not [0, 1, 0, 1]
    # overwrite would delete the checkpoint a resume is about to read: refused, the folder untouched
    resume = ("--model.init_args.run.overwrite", "true", "--ckpt_path", str(run / "checkpoints" / "last.ckpt"))
    with pytest.raises(ValueError, match=r"--ckpt_path .*last.ckpt lies inside the run folder .*Fix: continue"):
        short_fit(run_fit, tmp_path, "twice", *resume)
    assert (run / "checkpoints" / "last.ckpt").is_file()
