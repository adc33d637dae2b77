"""Sampling: deterministic responses with exact old log-probs, GRPO advantages, dead-group resampling."""

from __future__ import annotations

import itertools
import math
import statistics
from dataclasses import replace

import numpy as np
import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from transformers import LlamaForCausalLM

from probe.batch import collate
from probe.logprobs import TeacherForcing, teacher_force
from probe.sampling import (
    SamplingSettings,
    group_advantages,
    ids_reward_from_text,
    sample_responses,
    sample_update_batch,
    special_token_ids,
    truncate_logits,
)
from probe.toy.tokenizer import build_tokenizer

from support import tiny_llama

EOS, PAD = 2, 0
PROMPTS = [[1, 5, 14, 6, 15], [1, 7], [1, 4, 4, 4, 4, 4, 4, 14]]  # different lengths: left padding is exercised
# tiny_llama's settings of the policy (16-token vocabulary)
POLICY = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)
POLICY.update(bos_token_id=1, eos_token_id=EOS, pad_token_id=PAD)
SAMPLING = SamplingSettings(n_per_prompt=4, max_new_tokens=6, temperature=0.7, seed=3)


@pytest.fixture(scope="module")
def policy() -> LlamaForCausalLM:
    model = tiny_llama(0, **POLICY)
    with torch.no_grad():  # a peaked EOS logit so responses end at different lengths
        model.lm_head.weight[EOS] += 0.3 * model.lm_head.weight.norm(dim=-1).mean()
    return model


def sample(model, generator: torch.Generator | None = None, **settings):
    """``SAMPLING`` with ``settings`` changed, EOS and pad ids given."""
    sampling = replace(SAMPLING, **settings)
    return sample_responses(model, PROMPTS, sampling, eos_token_id=EOS, pad_token_id=PAD, generator=generator)


def test_same_seed_gives_the_same_records_and_another_seed_other_ones(policy):
    assert sample(policy) == sample(policy)
    assert [r["response_ids"] for r in sample(policy)] != [r["response_ids"] for r in sample(policy, seed=4)]
    generator = torch.Generator().manual_seed(3)
    # seed == a fresh generator with that seed (a given generator is used instead of the settings' seed)
    assert sample(policy, generator=generator, seed=4) == sample(policy)


def test_sampling_in_batches_keeps_the_prompt_order_and_exact_old_logprobs(policy):
    # batch_size 5 splits the 12 rows (3 prompts x 4) into 3 generation batches of different prompt lengths
    records = sample(policy, batch_size=5)
    assert [r["prompt_ids"] for r in records] == [p for p in PROMPTS for _ in range(4)]
    stats = teacher_force(policy, collate(records, pad_token_id=PAD), forcing=TeacherForcing(temperature=0.7))
    for i, r in enumerate(records):
        assert stats.logprobs[i][stats.mask[i]].tolist() == pytest.approx(r["old_logprobs"], abs=1e-5)


def test_records_are_grouped_by_prompt_cut_after_eos_and_flag_truncation(policy):
    records = sample(policy, n_per_prompt=8)
    assert [r["group"] for r in records] == [k for k in range(len(PROMPTS)) for _ in range(8)]
    assert [r["prompt_ids"] for r in records] == [p for p in PROMPTS for _ in range(8)]
    kinds = set()
    for r in records:
        ids = r["response_ids"]
        assert len(r["old_logprobs"]) == len(ids) >= 1
        assert EOS not in ids[:-1]  # cut after the first EOS
        if r["truncated"]:
            assert len(ids) == 6 and ids[-1] != EOS
        else:
            assert ids[-1] == EOS
        kinds.add(r["truncated"])
    assert kinds == {True, False}  # both cases occur, so the checks above were exercised
    assert all(r["temperature"] == 0.7 and r["top_p"] is None and r["top_k"] is None for r in records)
    assert all("sampling_logprobs" not in r for r in records)


def test_old_logprobs_equal_teacher_forced_logprobs_at_the_sampling_temperature(policy):
    records = sample(policy, n_per_prompt=8)
    batch = collate(records, pad_token_id=PAD)
    with torch.no_grad():
        stats = teacher_force(policy, batch, forcing=TeacherForcing(temperature=0.7))
    # float32 model: the KV-cache pass and the full pass differ only in summation order (~1e-7 observed)
    torch.testing.assert_close(batch.old_logprobs, stats.logprobs, rtol=0, atol=1e-5)
    assert float(stats.logprobs.abs().sum()) > 1.0  # not trivially zero


def test_old_logprobs_match_teacher_forcing_to_float64_precision_on_a_float64_policy(policy):
    model = tiny_llama(0, dtype=torch.float64, **POLICY)
    model.load_state_dict({k: v.double() for k, v in policy.state_dict().items()})
    with sdpa_kernel(SDPBackend.MATH):
        records = sample(model, temperature=1.3)
        with torch.no_grad():
            stats = teacher_force(model, collate(records, pad_token_id=PAD), forcing=TeacherForcing(temperature=1.3))
    old = collate(records, pad_token_id=PAD).old_logprobs
    torch.testing.assert_close(old, stats.logprobs, rtol=0, atol=1e-10)  # float64 end to end: ~1e-15 expected


def test_first_tokens_follow_the_tempered_softmax(policy):
    # independent truth: the model's own next-token distribution softmax(logits / tau)
    temperature, n = 0.8, 4000
    sampling = SamplingSettings(n_per_prompt=n, max_new_tokens=1, temperature=temperature, seed=11)
    records = sample_responses(policy, [[1, 7]], sampling, eos_token_id=EOS)
    counts = torch.bincount(torch.tensor([r["response_ids"][0] for r in records]), minlength=16).double()
    with torch.no_grad():
        probs = torch.softmax(policy(torch.tensor([[1, 7]])).logits[0, -1].double() / temperature, -1)
    bound = 5 * torch.sqrt(probs * (1 - probs) / n) + 1e-3  # 5 binomial standard errors per token
    assert torch.all((counts / n - probs).abs() <= bound)
    lp = torch.tensor([r["old_logprobs"][0] for r in records], dtype=torch.float64)
    torch.testing.assert_close(lp, probs.log()[[r["response_ids"][0] for r in records]], rtol=0, atol=1e-6)


def test_top_k_samples_only_the_k_most_likely_tokens_and_records_their_renormalised_logprobs(policy):
    sampling = SamplingSettings(n_per_prompt=500, max_new_tokens=1, temperature=1.0, top_k=3, seed=1)
    records = sample_responses(policy, [[1, 7]], sampling, eos_token_id=EOS)
    with torch.no_grad():
        logits = policy(torch.tensor([[1, 7]])).logits[0, -1].double()
    top3 = set(torch.topk(logits, 3).indices.tolist())
    seen = {r["response_ids"][0] for r in records}
    assert seen <= top3 and len(seen) >= 2
    kept = torch.log_softmax(logits[list(sorted(top3))], -1)
    truth = dict(zip(sorted(top3), kept.tolist()))
    full = torch.log_softmax(logits, -1)
    for r in records[:20]:
        token = r["response_ids"][0]
        assert r["top_k"] == 3 and r["top_p"] is None
        assert r["sampling_logprobs"][0] == pytest.approx(truth[token], abs=1e-6)  # behaviour distribution
        assert r["old_logprobs"][0] == pytest.approx(float(full[token]), abs=1e-6)  # untruncated policy


def test_top_p_keeps_the_smallest_set_of_mass_at_least_p():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]], dtype=torch.float64))
    kept = torch.isfinite(truncate_logits(logits, top_p=0.75, top_k=None))
    assert kept.tolist() == [[True, True, False, False]]  # 0.5 + 0.3 >= 0.75
    kept = torch.isfinite(truncate_logits(logits, top_p=0.85, top_k=None))
    assert kept.tolist() == [[True, True, True, False]]
    kept = torch.isfinite(truncate_logits(logits, top_p=0.1, top_k=None))
    assert kept.tolist() == [[True, False, False, False]]  # the most likely token always stays


def test_greedy_temperature_is_refused_with_the_fix():
    with pytest.raises(ValueError, match=r"temperature must be > 0.*small positive temperature"):
        SamplingSettings(temperature=0.0)


# --------------------------------------------------------------------------- advantages


def test_group_advantages_are_centred_and_scaled_by_the_unbiased_group_std():
    rewards = [1.0, 0.0, 0.5, 2.0, 4.0, 3.0]
    groups = ["a", "a", "a", 7, 7, "solo"]
    centred = group_advantages(torch.tensor(rewards), groups, normalize_std=False)
    assert centred.dtype == torch.float64
    assert centred.tolist() == pytest.approx([0.5, -0.5, 0.0, -1.0, 1.0, 0.0], abs=1e-12)
    eps = 1e-6
    std_a, std_7 = statistics.stdev([1.0, 0.0, 0.5]), statistics.stdev([2.0, 4.0])
    expected = [0.5 / (std_a + eps), -0.5 / (std_a + eps), 0.0, -1.0 / (std_7 + eps), 1.0 / (std_7 + eps), 0.0]
    advantages = group_advantages(rewards, groups, normalize_std=True, eps=eps)
    assert advantages.tolist() == pytest.approx(expected, abs=1e-12)


def test_normalised_advantages_do_not_depend_on_the_rewards_scale_even_where_squares_overflow():
    rewards, groups = torch.tensor([1.0, -1.0, 1.0, 0.5, -0.25], dtype=torch.float64), [0, 0, 0, 1, 1]
    unit = group_advantages(rewards, groups, eps=0.0)
    for scale in (1e-150, 1e200, 1e300):  # (1e200)^2 overflows float64: the std was inf, the advantages 0
        np.testing.assert_allclose(group_advantages(rewards * scale, groups, eps=0.0), unit, rtol=1e-12)


def test_a_group_with_equal_rewards_has_zero_advantages():
    advantages = group_advantages([1.0, 1.0, 1.0, 0.0, 1.0], [0, 0, 0, 1, 1])
    assert advantages[:3].abs().max() == 0.0 and advantages[3:].abs().min() > 0.5


# --------------------------------------------------------------------------- update batch


def alternating_reward_after(dead_calls: int):
    """Reward 0 for the first ``dead_calls`` calls, then 0, 1, 0, 1, ... (a live group)."""
    calls = []

    def reward(prompt_ids, response_ids) -> float:
        calls.append(1)
        k = len(calls) - 1
        return 0.0 if k < dead_calls else float(k % 2)

    return reward


def two_groups_dead_at_first(policy, **options) -> list[dict]:
    """U of PROMPTS[:2] x 4 whose first draw of group 0 gets equal rewards (then alternating ones)."""
    sampling = SamplingSettings(n_per_prompt=4, max_new_tokens=4, seed=0)
    return sample_update_batch(policy, PROMPTS[:2], sampling, reward_fn=alternating_reward_after(4), **options)


def test_update_batch_resamples_a_dead_group_until_it_has_signal(policy):
    records = two_groups_dead_at_first(policy, eos_token_id=EOS, pad_token_id=PAD, max_resample_attempts=2)
    assert [r["group"] for r in records] == [0, 0, 0, 0, 1, 1, 1, 1]
    assert [r["resample_attempt"] for r in records] == [1, 1, 1, 1, 0, 0, 0, 0]  # group 0 was drawn twice
    for k in (0, 1):
        group = [r for r in records if r["group"] == k]
        assert max(abs(r["advantage"]) for r in group) > 0.5
        rewards = [r["reward"] for r in group]
        assert sum(r["advantage"] for r in group) == pytest.approx(0.0, abs=1e-12)
        expected = (rewards[0] - statistics.mean(rewards)) / (statistics.stdev(rewards) + 1e-6)
        assert group[0]["advantage"] == pytest.approx(expected)


def test_update_batch_takes_spare_prompts_for_dead_groups(policy):
    spare = [1, 9, 14, 9, 15]
    records = two_groups_dead_at_first(policy, eos_token_id=EOS, spare_prompts=[spare])
    assert [r["prompt_ids"] for r in records[:4]] == [spare] * 4 and records[4]["prompt_ids"] == PROMPTS[1]


def test_update_batch_gives_up_after_the_attempt_limit_with_the_numbers_and_the_fix(policy):
    calls = itertools.count()  # group 0's rewards alternate 0, 1, 0, 1; the other two groups always get 1.0
    live_first = lambda p, r: float(next(calls) % 2) if list(p) == PROMPTS[0] else 1.0  # noqa: E731
    with pytest.raises(ValueError) as info:
        sample_update_batch(
            policy,
            PROMPTS,
            SamplingSettings(n_per_prompt=4, max_new_tokens=3, seed=0),
            reward_fn=live_first,
            eos_token_id=EOS,
            max_resample_attempts=2,
            zero_tol=1e-7,
        )
    message = str(info.value)
    assert message.startswith("2 of 3 prompt groups still have all advantages |A| <= 1e-07")
    assert "after 2 resampling attempts" in message and "max_resample_attempts=2" in message
    assert "Fix: raise max_resample_attempts" in message and "first sampling attempt" not in message


def example_of(first_draw: list[dict]) -> dict:
    """The record the equal-rewards error shows: the first response that ended, else the first response."""
    return next((r for r in first_draw if not r["truncated"]), first_draw[0])


def dead_groups_message(policy, sampling: SamplingSettings, **kwargs) -> str:
    """The error of sampling U from PROMPTS when no group ever tells its responses apart."""
    with pytest.raises(ValueError) as info:
        sample_update_batch(policy, PROMPTS, sampling, **kwargs)
    return str(info.value)


def test_equal_rewards_in_every_group_of_the_first_draw_are_reported_with_an_example(policy):
    sampling = SamplingSettings(n_per_prompt=3, max_new_tokens=3, seed=0)
    message = dead_groups_message(
        policy, sampling, reward_fn=lambda p, r: 1.0, eos_token_id=EOS, max_resample_attempts=2, zero_tol=1e-7
    )
    first = "every one of the 3 prompt groups got equal rewards within the group on the first sampling attempt"
    assert message.startswith(first + " (every reward was 1), and 3 of 3 prompt groups still have all advantages")
    assert "|A| <= 1e-07" in message and "after 2 resampling attempts (max_resample_attempts=2" in message
    # a reward on token ids saw token ids: the example (the first response of the first draw that ended, else the
    # first response: which one depends on the tokens this CPU samples) shows them
    example = example_of(sample_responses(policy, PROMPTS, sampling, eos_token_id=EOS))
    finished = not example["truncated"]
    shown = f"prompt_ids {example['prompt_ids']}, response_ids {example['response_ids']}, finished={finished}, reward 1"
    assert f"One example, as the reward function saw it: {shown}." in message
    assert "Fix: check the reward function on this example" in message


def test_the_example_is_the_text_the_reward_function_saw(policy):
    tokenizer = build_tokenizer()  # the toy vocabulary: 0 <pad>, 1 <bos>, 2 <eos>, as this policy's ids
    looks_for_eos = lambda prompt, response: float("<eos>" in response)  # noqa: E731 (a common bug)
    sampling = SamplingSettings(n_per_prompt=4, max_new_tokens=4, seed=0)
    reward_fn = ids_reward_from_text(looks_for_eos, tokenizer)
    message = dead_groups_message(policy, sampling, reward_fn=reward_fn, tokenizer=tokenizer, max_resample_attempts=1)
    # the example is the first response of the first draw that ended with EOS (else the first), decoded as the reward
    # saw it
    example = example_of(sample_responses(policy, PROMPTS, sampling, tokenizer=tokenizer))
    prompt = tokenizer.decode(example["prompt_ids"], skip_special_tokens=True)
    response = tokenizer.decode(example["response_ids"], skip_special_tokens=True)
    assert "<eos>" not in response and "<bos>" not in prompt
    finished = not example["truncated"]
    shown = f"prompt {prompt!r}, response {response!r} (decoded with skip_special_tokens=True), finished={finished}"
    shown += ", reward 0"
    assert f"One example, as the reward function saw it: {shown}." in message
    assert "(every reward was 0)" in message
    fixes = ["check the reward function on this example", "set skip_special_tokens=false", "`finished` keyword"]
    fixes += ["more responses per prompt (n_per_prompt)", "higher temperature"]
    assert all(fix in message for fix in fixes), message
    # the fix it names works: with special tokens kept the same reward tells ended responses from cut ones
    kept = ids_reward_from_text(looks_for_eos, tokenizer, skip_special_tokens=False)
    records = sample_update_batch(
        policy, PROMPTS, sampling, reward_fn=kept, tokenizer=tokenizer, filter_zero_advantage_prompts=False
    )
    assert [r["reward"] for r in records] == [float(not r["truncated"]) for r in records]
    assert kept(PROMPTS[0], [12, EOS]) == 1.0 and kept(PROMPTS[0], [12, 12]) == 0.0


def test_a_text_reward_sees_text_without_special_tokens_and_whether_the_response_ended():
    tokenizer = build_tokenizer()
    seen = []

    def reward(prompt, response, finished=None):
        seen.append((prompt, response, finished))
        return 0.5

    prompt = [1, 8, 14, 8, 15]  # <bos> 4 + 4 =
    score = ids_reward_from_text(reward, tokenizer)
    assert score(prompt, [12, 2]) == 0.5 and score(prompt, [12, 12]) == 0.5
    assert seen == [("4 + 4 =", "8", True), ("4 + 4 =", "8 8", False)]  # ended with EOS / cut at max_new_tokens
    ids_reward_from_text(reward, tokenizer, skip_special_tokens=False)(prompt, [12, 2])
    assert seen[-1] == ("<bos> 4 + 4 =", "8 <eos>", True)
    with_answer = ids_reward_from_text(lambda p, r, answer=None: float(r == answer), tokenizer, {tuple(prompt): "8"})
    assert with_answer(prompt, [12, 2]) == 1.0 and with_answer([1, 4, 14, 4, 15], [12, 2]) == 0.0


def test_update_batch_keeps_dead_groups_when_filtering_is_off(policy):
    records = sample_update_batch(
        policy,
        PROMPTS,
        SamplingSettings(n_per_prompt=2, max_new_tokens=3, seed=0),
        reward_fn=lambda p, r: 1.0,
        eos_token_id=EOS,
        filter_zero_advantage_prompts=False,
    )
    assert len(records) == 6 and all(r["advantage"] == 0.0 and r["reward"] == 1.0 for r in records)


def test_update_batch_needs_two_responses_per_prompt(policy):
    sampling = SamplingSettings(n_per_prompt=1, max_new_tokens=3)
    with pytest.raises(ValueError, match=r"n_per_prompt=1.*at least 2"):
        sample_update_batch(policy, PROMPTS, sampling, reward_fn=lambda p, r: 1.0, eos_token_id=EOS)


def test_update_batch_is_deterministic_under_a_seed(policy):
    reward = lambda p, r: float(len(r) % 2)  # noqa: E731
    sampling = SamplingSettings(n_per_prompt=4, max_new_tokens=5, seed=5, temperature=1.0)
    kw = dict(reward_fn=reward, eos_token_id=EOS)
    first = sample_update_batch(policy, PROMPTS, sampling, **kw)
    second = sample_update_batch(policy, PROMPTS, sampling, **kw)
    assert first == second and all(math.isfinite(r["advantage"]) for r in first)


@pytest.mark.parametrize("temperature", [0.0, -1.0, float("inf"), float("nan")])
def test_a_temperature_that_is_not_a_positive_number_is_refused(temperature):
    with pytest.raises(ValueError, match=r"temperature must be > 0"):
        SamplingSettings(temperature=temperature)


# --------------------------------------------------------------------------- several EOS ids (Llama-3, Qwen)

SECOND_EOS = 5  # a second EOS id of the generation config, as Llama-3's <|end_of_text|> next to <|eot_id|>


def two_eos_policy(certain: int | None = None) -> LlamaForCausalLM:
    """A tiny Llama whose generation config ends at EOS 2 or 5 (config and tokenizer: 2 only); ``certain``: a token
    whose logit is raised by 1e4 at every position, so it is sampled whatever the seed and CPU."""
    model = tiny_llama(0, **POLICY)
    model.generation_config.eos_token_id = [EOS, SECOND_EOS]
    if certain is not None:
        bias = torch.zeros(16)
        bias[certain] = 1e4
        model.lm_head.register_forward_hook(lambda module, inputs, logits: logits + bias)
    return model


def test_the_eos_ids_are_those_of_the_tokenizer_the_config_and_the_generation_config():
    tokenizer, model = build_tokenizer(), two_eos_policy()
    assert special_token_ids(tokenizer, model=model) == (PAD, [EOS, SECOND_EOS])  # tokenizer's first, no repeats
    assert special_token_ids(tokenizer, model.config) == (PAD, [EOS])  # a config alone: no generation config
    generation_config = model.generation_config
    assert special_token_ids(tokenizer, model.config, generation_config=generation_config)[1] == [EOS, SECOND_EOS]
    model.generation_config.eos_token_id = 7  # an int
    model.config.eos_token_id = [9, EOS]  # a list
    assert special_token_ids(tokenizer, model=model) == (PAD, [EOS, 9, 7])
    assert special_token_ids(None, model=model) == (PAD, [9, EOS, 7])  # no tokenizer: the config's pad and EOS
    with pytest.raises(ValueError, match=r"no EOS token id"):
        special_token_ids(None, None)


def test_padding_after_the_second_eos_is_stripped_and_the_response_counts_as_finished(tmp_path):
    from datamodules.rollouts import read_rollouts

    tokenizer, model = build_tokenizer(), two_eos_policy()
    pad, eos = special_token_ids(tokenizer, model=model)
    path = tmp_path / "u.jsonl"
    path.write_text('{"prompt_ids": [1, 8], "response_ids": [7, 5, 0, 0], "group": 0}\n')
    assert read_rollouts(path, eos_token_ids=eos, pad_token_id=pad)[0]["response_ids"] == [7, SECOND_EOS]
    seen = ids_reward_from_text(lambda p, r: 0.0, tokenizer, eos_token_id=eos).seen([1, 8], [7, SECOND_EOS])
    assert seen["finished"] is True
    assert ids_reward_from_text(lambda p, r: 0.0, tokenizer, eos_token_id=eos).seen([1, 8], [7, 7])["finished"] is False


def test_sampling_stops_at_every_eos_of_the_model_and_the_reward_sees_it_finished():
    from probe.grpo import RolloutSettings, sample_rollout

    tokenizer, model = build_tokenizer(), two_eos_policy(certain=SECOND_EOS)
    sampling = SamplingSettings(n_per_prompt=2, max_new_tokens=4, seed=0)
    records = sample_responses(model, [[1, 7]], sampling, tokenizer=tokenizer)  # EOS ids from tokenizer and model
    assert [r["response_ids"] for r in records] == [[SECOND_EOS]] * 2 and not any(r["truncated"] for r in records)
    seen = []

    def reward(prompt, response, finished=None):
        seen.append(finished)
        return 1.0

    settings = RolloutSettings(n_per_prompt=2, max_new_tokens=4, zero_advantage="keep")
    rollout = sample_rollout(model, tokenizer, [[1, 7]], [0], [None], settings, seed=0, rollout=0, reward_fn=reward)
    assert [r["response_ids"] for r in rollout.records] == [[SECOND_EOS]] * 2 and seen == [True, True]
