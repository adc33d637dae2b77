"""The toy world: task, tokenizer, deterministic cached build, and a policy with a live reward signal."""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoTokenizer

from probe.loading import load_policy
from probe.sampling import SamplingSettings, group_advantages, sample_responses
from probe.toy import task
from probe.toy.tokenizer import build_tokenizer, save_tokenizer
from probe.toy.world import ToyWorldConfig, build_toy_world, is_complete, load_toy_world_info, toy_world_dir

# --------------------------------------------------------------------------- task


def test_prompts_are_deterministic_in_the_seed_and_distinct_up_to_100():
    assert task.make_prompts(30, seed=7) == task.make_prompts(30, seed=7)
    assert task.make_prompts(30, seed=7) != task.make_prompts(30, seed=8)
    problems = task.make_problems(100, seed=3)
    assert sorted(problems) == [(a, b) for a in range(10) for b in range(10)]  # every problem exactly once
    a, b = task.make_problems(1, seed=0)[0]
    expected = [task.BOS_ID, task.TOKEN_ID[str(a)], task.PLUS_ID, task.TOKEN_ID[str(b)], task.EQUALS_ID]
    assert task.make_prompts(1, seed=0)[0] == expected


def test_text_reward_is_one_exactly_for_the_sum_followed_by_eos():
    assert task.reward("3 + 4 =", "7 <eos>") == 1.0
    assert task.reward("<bos> 9 + 3 =", "1 2 <eos>") == 1.0
    assert task.reward("9 + 3 =", "1 2 <eos> <pad> <pad>") == 1.0  # padding after EOS is ignored
    assert task.reward("9 + 3 =", "12<eos>") == 1.0  # digits split one by one, as the tokenizer does
    assert task.reward("3 + 4 =", "8 <eos>") == 0.0
    assert task.reward("3 + 4 =", "7") == 0.0  # no EOS: cut at max_new_tokens
    assert task.reward("3 + 4 =", "7 7 <eos>") == 0.0
    assert task.reward("3 + 4 =", "<eos>") == 0.0


def test_text_reward_names_the_fix_for_a_prompt_that_is_not_an_addition():
    with pytest.raises(ValueError, match=r"not a toy addition prompt.*make_prompts"):
        task.reward("what is 3 plus 4?", "7 <eos>")


def test_id_and_text_rewards_agree_on_every_response_up_to_three_tokens():
    tokenizer = build_tokenizer()
    prompt = task.prompt_ids_of(6, 7)
    answers = [[a] for a in range(16)] + [[a, b] for a in range(16) for b in range(16)]
    answers += [[5, 7, task.EOS_ID], [5, 7, 4]]
    n_correct = 0
    for response in answers:
        by_ids = task.reward_ids(prompt, response)
        by_text = task.reward(tokenizer.decode(prompt), tokenizer.decode(response))
        assert by_ids == by_text, response
        n_correct += by_ids
    assert n_correct == 1  # only "1 3 <eos>"; "1 3" without EOS and "1 3 2" earn nothing
    assert task.reward_ids(prompt, task.answer_ids(6, 7)) == 1.0


def test_text_reward_decoded_without_special_tokens_learns_the_end_from_finished():
    tokenizer = build_tokenizer()
    prompt = task.prompt_ids_of(6, 7)
    answers = [[a] for a in range(16)] + [[a, b] for a in range(16) for b in range(16)]
    answers += [[5, 7, task.EOS_ID], [5, 7, 4], [5, 7, task.EOS_ID, task.PAD_ID]]
    for response in answers:  # as probe calls it by default: special tokens skipped, finished = holds an EOS
        text = tokenizer.decode(response, skip_special_tokens=True)
        finished = task.EOS_ID in response
        assert task.reward(tokenizer.decode(prompt, skip_special_tokens=True), text, finished) == task.reward_ids(
            prompt, response
        ), response
    assert tokenizer.decode([5, 7, task.EOS_ID], skip_special_tokens=True) == "1 3"
    assert task.reward("6 + 7 =", "1 3", finished=True) == 1.0
    assert task.reward("6 + 7 =", "1 3", finished=False) == 0.0  # cut at max_new_tokens
    assert task.reward("6 + 7 =", "1 3") == 0.0  # finished not given: no <eos> in the text, no end
    # what skipping special tokens hides: a <pad> inside the answer (0.5% of the toy policy's samples hold a
    # special token, a few in 10^4 also the right digits) vanishes from the text, while reward_ids sees it
    inner_pad = [5, task.PAD_ID, 7, task.EOS_ID]
    assert task.reward_ids(prompt, inner_pad) == 0.0
    assert task.reward("6 + 7 =", tokenizer.decode(inner_pad, skip_special_tokens=True), finished=True) == 1.0


# --------------------------------------------------------------------------- tokenizer


def test_tokenizer_round_trips_through_autotokenizer_offline(tmp_path):
    save_tokenizer(tmp_path)
    tokenizer = AutoTokenizer.from_pretrained(str(tmp_path), local_files_only=True)
    assert len(tokenizer) == len(task.VOCAB) < 40
    special = (tokenizer.pad_token_id, tokenizer.bos_token_id, tokenizer.eos_token_id)
    assert special == (task.PAD_ID, task.BOS_ID, task.EOS_ID)
    prompts, texts = task.make_prompts(20, seed=1), task.make_prompt_texts(20, seed=1)
    assert [tokenizer(t)["input_ids"] for t in texts] == prompts  # encoding adds BOS, digits split
    assert tokenizer("12+3=")["input_ids"] == [task.BOS_ID, 5, 6, task.PLUS_ID, 7, task.EQUALS_ID]
    ids = prompts[0] + [5, 6, task.EOS_ID]
    assert tokenizer.decode(ids) == "<bos> " + texts[0] + " 1 2 <eos>"
    assert tokenizer(tokenizer.decode(ids), add_special_tokens=False)["input_ids"] == ids


# --------------------------------------------------------------------------- build


def test_same_config_builds_bitwise_identical_weights_and_optimizer_state(toy_world_dir, tmp_path):
    again = build_toy_world(ToyWorldConfig(), root=tmp_path)
    assert again != toy_world_dir
    assert (again / "model.safetensors").read_bytes() == (toy_world_dir / "model.safetensors").read_bytes()
    first = torch.load(toy_world_dir / "optimizer.pt", weights_only=True)
    second = torch.load(again / "optimizer.pt", weights_only=True)
    assert first["param_groups"] == second["param_groups"]
    for k, state in first["state"].items():
        for name, value in state.items():
            assert torch.equal(value, second["state"][k][name]), (k, name)


def test_another_seed_gives_other_weights(tmp_path):
    cheap = ToyWorldConfig(pretrain_target_reward=0.0, grpo_steps=1, prompts_per_step=2, eval_prompts=2)
    one, other = build_toy_world(cheap, root=tmp_path), build_toy_world(replace(cheap, seed=1), root=tmp_path)
    a, b = load_file(one / "model.safetensors"), load_file(other / "model.safetensors")
    assert a.keys() == b.keys() and not torch.equal(a["model.embed_tokens.weight"], b["model.embed_tokens.weight"])


def test_world_is_an_hf_checkpoint_with_an_adamw_history_over_model_parameters(toy_world_dir):
    cfg = ToyWorldConfig()
    model, tokenizer = load_policy(toy_world_dir)
    assert type(model).__name__ == "LlamaForCausalLM" and tokenizer.eos_token_id == task.EOS_ID
    assert model.config.num_key_value_heads < model.config.num_attention_heads  # grouped-query attention
    state = torch.load(toy_world_dir / "optimizer.pt", weights_only=True)
    params = list(model.parameters())
    assert len(state["param_groups"]) == 1 and state["param_groups"][0]["params"] == list(range(len(params)))
    assert state["param_groups"][0]["lr"] == cfg.lr and state["param_groups"][0]["weight_decay"] == cfg.weight_decay
    for k, p in enumerate(params):
        assert state["state"][k]["exp_avg"].shape == p.shape
        assert int(state["state"][k]["step"]) == cfg.grpo_steps
    optimizer = torch.optim.AdamW(model.parameters(), lr=1.0)
    optimizer.load_state_dict(state)  # a real AdamW accepts it as is


def test_cache_returns_the_finished_world_without_rebuilding(toy_world_dir):
    before = (toy_world_dir / "model.safetensors").stat().st_mtime_ns
    assert build_toy_world(ToyWorldConfig()) == toy_world_dir  # default root is $PROBE_CACHE (the session's)
    assert (toy_world_dir / "model.safetensors").stat().st_mtime_ns == before
    assert toy_world_dir.name == f"toy_world-{ToyWorldConfig().key()}"
    assert ToyWorldConfig(seed=1).key() != ToyWorldConfig().key()


def test_interrupted_build_leaves_nothing_that_looks_complete(tmp_path, monkeypatch):
    import probe.toy.world as world

    def crash_after_saving_weights(directory: Path, cfg: ToyWorldConfig) -> dict:
        (directory / "model.safetensors").write_bytes(b"partial")
        (directory / "config.json").write_text("{}")
        raise KeyboardInterrupt

    monkeypatch.setattr(world, "_build_into", crash_after_saving_weights)
    cfg = ToyWorldConfig(seed=5)
    with pytest.raises(KeyboardInterrupt):
        build_toy_world(cfg, root=tmp_path)
    target = toy_world_dir(cfg, tmp_path)
    assert not target.exists() and not is_complete(target)
    assert list(tmp_path.iterdir()) == []  # the staging directory is cleaned up too


def test_toy_world_json_records_config_history_reward_and_versions(toy_world_dir):
    info = load_toy_world_info(toy_world_dir)
    assert info["config"] == json.loads(json.dumps(vars(ToyWorldConfig())))
    assert len(info["grpo_history"]) == ToyWorldConfig().grpo_steps
    assert info["mean_reward_initial"] < 0.05  # the untrained policy almost never answers
    assert {"torch", "transformers", "tokenizers"} <= set(info["versions"])
    assert 0.2 < info["final_mean_reward"] < 0.8


def test_fresh_samples_have_mean_reward_strictly_between_0_2_and_0_8_and_live_advantages(toy_world_dir):
    cfg = ToyWorldConfig()
    model, _ = load_policy(toy_world_dir)
    sampling = SamplingSettings(
        n_per_prompt=cfg.group_size, max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature, seed=4242
    )
    records = sample_responses(
        model, task.make_prompts(100, seed=999), sampling, eos_token_id=task.EOS_ID, pad_token_id=task.PAD_ID
    )
    rewards = torch.tensor([task.reward_ids(r["prompt_ids"], r["response_ids"]) for r in records])
    # 800 samples: the standard error of the mean is <= 0.018, so (0.2, 0.8) is a 15-sigma margin around ~0.5
    assert 0.2 < float(rewards.mean()) < 0.8
    advantages = group_advantages(rewards, [r["group"] for r in records]).view(100, cfg.group_size)
    live_groups = int((advantages.abs().amax(-1) > 1e-8).sum())
    assert live_groups >= 70  # most groups carry a learning signal (measured: 94-97 of 100 over three seeds)


def test_config_key_changes_with_any_field():
    base = ToyWorldConfig()
    assert replace(base, lr=base.lr * 2).key() != base.key()
    assert replace(base, hidden_size=32).key() != base.key()


def test_building_leaves_the_callers_random_state_and_thread_count_alone(tmp_path):
    torch.manual_seed(123)
    rng_before, threads_before = torch.get_rng_state(), torch.get_num_threads()
    deterministic_before = torch.are_deterministic_algorithms_enabled()
    cheap = ToyWorldConfig(pretrain_target_reward=0.0, grpo_steps=1, prompts_per_step=2, eval_prompts=2)
    build_toy_world(cheap, root=tmp_path)
    assert torch.equal(torch.get_rng_state(), rng_before)
    assert torch.get_num_threads() == threads_before
    assert torch.are_deterministic_algorithms_enabled() == deterministic_before


@pytest.mark.parametrize("damage", ["truncated_weights", "unreadable_marker"])
def test_a_corrupt_cached_world_is_rebuilt_with_a_warning_naming_it(damage, toy_world_dir, tmp_path, caplog):
    cached = tmp_path / toy_world_dir.name
    shutil.copytree(toy_world_dir, cached)
    if damage == "truncated_weights":  # e.g. a full disk while the cache was written, or a bad sector
        weights = cached / "model.safetensors"
        weights.write_bytes(weights.read_bytes()[:1000])
        named = "model.safetensors: not the file probe built"
    else:
        (cached / "toy_world.json").write_text('{"format": 2, "config": {')
        named = "toy_world.json: not the file probe built"
    with caplog.at_level(logging.WARNING, logger="probe"):
        assert build_toy_world(ToyWorldConfig(), root=tmp_path) == cached
    assert [r.getMessage() for r in caplog.records] == [
        f"the cached toy world {cached} is corrupt ({named}, e.g. after a disk error or an interrupted copy); "
        "rebuilding it (seconds; the same world, bit for bit, on this machine and software)"
    ]
    for name in ("model.safetensors", "optimizer.pt", "config.json", "tokenizer.json"):
        assert (cached / name).read_bytes() == (toy_world_dir / name).read_bytes(), name
    assert [p.name for p in tmp_path.iterdir()] == [cached.name]  # no staging or old copy left behind
    caplog.clear()
    before = (cached / "model.safetensors").stat().st_mtime_ns
    with caplog.at_level(logging.WARNING, logger="probe"):
        build_toy_world(ToyWorldConfig(), root=tmp_path)  # intact now: returned as is
    assert not caplog.records and (cached / "model.safetensors").stat().st_mtime_ns == before


def test_toy_world_json_records_the_sha256_of_every_file(toy_world_dir):
    files = load_toy_world_info(toy_world_dir)["files"]
    assert {"config.json", "model.safetensors", "optimizer.pt", "tokenizer.json"} <= set(files)
    for name, digest in files.items():
        assert hashlib.sha256((toy_world_dir / name).read_bytes()).hexdigest() == digest
