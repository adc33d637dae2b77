"""Bad input, specified: each one stops ``python -m probe predict`` with a message that names the
problem and the fix, a non-zero exit, and no finished-looking run (``summary.json`` absent or not
``complete``); numerical trouble in the middle of a run (a huge eta, collapsed ESS) is reported
in the summary and the table instead. The catalogue with the real messages is docs/bad_inputs.md.

Most cases call the CLI in-process (``probe.cli.main``: an exception, or ``SystemExit(2)`` for a
config the parser refuses); a few run ``python -m probe`` as a subprocess and check the exit code.
"""

from __future__ import annotations

import collections
import json
import logging
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from probe.cli import check_gpu_request, main
from probe.settings import ProbeSettings

from support import REPO, predict_args


def probe_args(root: Path, name: str, *extra: str) -> list[str]:
    return predict_args(root, name, *extra, eval_prompts=4)


def assert_no_finished_summary(run_dir: Path) -> None:
    summary = run_dir / "summary.json"
    assert not summary.exists() or json.loads(summary.read_text()).get("status") != "complete"


# ---------------------------------------------------------------------------------------------
# fixtures: broken copies of the toy world, rollout files, a constant reward


def _record(group: int, response: list[int], advantage: float | None = None, **extra) -> dict:
    # toy vocabulary (16 ids): 1 <bos>, 2 <eos>, digits, '+', '='; "<bos> 4 + 4 =" then an answer
    record = {"prompt_ids": [1, 8, 14, 8, 15], "response_ids": response, "group": group}
    if advantage is not None:
        record["advantage"] = advantage
    return {**record, **extra}


UPDATE = [_record(0, [12, 2], 1.0), _record(0, [13, 2], -1.0), _record(1, [11, 2], 0.5), _record(1, [12, 2], -0.5)]
FULL_DISTRIBUTION = {"temperature": 1.0, "top_p": 1.0, "top_k": 0}  # how E must be sampled (at the probe's tau = 1)
EVAL = [_record(0, [12, 2]), _record(0, [13, 2]), _record(1, [11, 2]), _record(1, [12, 2])]
EVAL = [dict(r, **FULL_DISTRIBUTION) for r in EVAL]


@pytest.fixture(scope="module")
def files(tmp_path_factory, toy_world_dir: Path, tiny_llama) -> dict[str, str]:
    """Paths of every broken input, by name (formatted into the CLI arguments below)."""
    root = tmp_path_factory.mktemp("bad_inputs")
    out = {"toy": str(toy_world_dir), "nowhere": str(root / "does-not-exist")}

    def world(name: str, drop: tuple[str, ...] = (), **overwrite: bytes) -> None:
        d = root / name
        shutil.copytree(toy_world_dir, d)
        for f in drop:
            (d / f).unlink()
        for f, data in overwrite.items():
            (d / f.replace("__", ".")).write_bytes(data)
        out[name] = str(d)

    world("no_weights", drop=("model.safetensors",))
    world("corrupt_weights", model__safetensors=os.urandom(4096))
    world("corrupt_config", config__json=b'{"model_type": "llama", "hidden_size": ')
    world("no_tokenizer", drop=("tokenizer.json", "tokenizer_config.json"))
    world("corrupt_tokenizer", tokenizer__json=b'{"version": "1.0", "model": {"type": "BPE"')
    world("no_optimizer", drop=("optimizer.pt",))
    world("nan_weights")  # a diverged checkpoint: 3 NaN and one inf in two weights
    from safetensors.torch import load_file, save_file

    tensors = load_file(toy_world_dir / "model.safetensors")
    tensors["model.layers.1.mlp.down_proj.weight"][0, :3] = float("nan")
    tensors["model.norm.weight"][5] = float("inf")
    save_file(tensors, Path(out["nan_weights"]) / "model.safetensors", metadata={"format": "pt"})
    saved = (toy_world_dir / "optimizer.pt").read_bytes()
    world("corrupt_optimizer", optimizer__pt=saved[: len(saved) // 2])  # an interrupted copy

    from transformers import AutoModelForCausalLM

    other = tiny_llama(vocab_size=16, hidden_size=32, intermediate_size=64)
    optimizer = torch.optim.AdamW(other.parameters(), lr=1e-3)
    ids = torch.tensor([[1, 8, 14, 8, 15, 12, 2]])
    other(ids, labels=ids).loss.backward()
    optimizer.step()
    world("other_models_optimizer")
    torch.save(optimizer.state_dict(), Path(out["other_models_optimizer"]) / "optimizer.pt")

    policy = AutoModelForCausalLM.from_pretrained(toy_world_dir)
    reversed_names = root / "reversed_order.txt"
    reversed_names.write_text("\n".join(n for n, _ in reversed(list(policy.named_parameters()))) + "\n")
    out["reversed_order"] = str(reversed_names)

    from peft import LoraConfig, get_peft_model

    adapter = root / "corrupt_adapter"
    get_peft_model(policy, LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"])).save_pretrained(adapter)
    (adapter / "adapter_model.safetensors").write_bytes(os.urandom(2048))
    out["corrupt_adapter"] = str(adapter)

    def jsonl(name: str, records: list[dict] | None = None, text: str | None = None) -> None:
        path = root / f"{name}.jsonl"
        path.write_text(text if text is not None else "".join(json.dumps(r) + "\n" for r in records))
        out[name] = str(path)

    jsonl("update_ok", UPDATE)
    jsonl("eval_ok", EVAL)
    jsonl("empty", text="")
    jsonl("update_empty_response", [UPDATE[0], _record(0, [], -1.0)])
    jsonl("eval_out_of_vocabulary", [EVAL[0], _record(0, [99, 2])])
    # json.dumps writes NaN / Infinity, as Python-based RL frameworks do
    jsonl("update_nan_advantage", [UPDATE[0], _record(0, [13, 2], float("nan"))])
    jsonl("update_infinite_advantage", [UPDATE[0], _record(0, [13, 2], float("inf"))])
    jsonl("update_truncated", text="".join(json.dumps(r) + "\n" for r in UPDATE) + json.dumps(UPDATE[0])[:25])
    jsonl("eval_top_p", [dict(r, top_p=0.9) for r in EVAL])
    jsonl("eval_unknown_sampling", [{k: v for k, v in r.items() if k not in FULL_DISTRIBUTION} for r in EVAL])
    jsonl("eval_other_temperature", [dict(r, temperature=0.5) for r in EVAL])
    jsonl("eval_without_temperature", [dict(r, temperature=None) for r in EVAL])  # top_p 1.0, top_k 0 only
    jsonl("eval_mixed_sampling", [EVAL[0], dict(EVAL[1], top_k=50), *EVAL[2:]])  # one record from generate()'s top_k
    rewards_only = [_record(r["group"], r["response_ids"], reward=float(r["advantage"] > 0)) for r in UPDATE]
    jsonl("update_padded_rewards_only", [dict(r, response_ids=r["response_ids"] + [0, 0]) for r in rewards_only])
    jsonl("update_token_after_eos", [UPDATE[0], _record(0, [13, 2, 0, 9], -1.0), *UPDATE[2:]])
    jsonl("update_some_advantages", [*UPDATE[:2], _record(1, [11, 2], reward=1.0), _record(1, [12, 2], reward=0.0)])
    # the exporter stored -A: in both groups the better response (reward 1) has the lower advantage
    jsonl("update_flipped_advantages", [dict(r, reward=float(r["advantage"] < 0)) for r in UPDATE])
    jsonl(
        "update_one_group_reversed", [dict(r, reward=float((r["advantage"] > 0) == (r["group"] == 0))) for r in UPDATE]
    )
    jsonl("eval_some_rewards", [dict(EVAL[0], reward=1.0), *EVAL[1:]])
    jsonl("eval_without_eos", [dict(r, response_ids=r["response_ids"][:1] + [13]) for r in EVAL])  # cut, no EOS
    # the toy policy's context is 32 positions: 5 prompt + 28 response tokens do not fit
    jsonl("eval_longer_than_context", [EVAL[0], dict(EVAL[1], response_ids=[12] * 27 + [2]), *EVAL[2:]])
    os.mkfifo(root / "update_fifo.jsonl")  # reading a named pipe waits for a writer for ever
    os.mkfifo(root / "prompts_fifo.jsonl")
    (root / "eval_zero.jsonl").symlink_to("/dev/zero")  # never ends: a MemoryError at best
    out.update({name: str(root / f"{name}.jsonl") for name in ("update_fifo", "prompts_fifo", "eval_zero")})

    jsonl("prompts", [{"prompt": f"{a} + {b} ="} for a, b in [(3, 4), (1, 2), (5, 5), (2, 7)]])

    (root / "misspelt.yaml").write_text("model:\n  init_args:\n    probe:\n      n_eta: 3\n")
    out["misspelt_yaml"] = str(root / "misspelt.yaml")
    # "billion laughs": 9 levels of 9 aliases, 9^9 strings once expanded, 1 KB as written
    laughs = ['a0: &a0 ["lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol"]']
    laughs += [f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 9)}]" for i in range(1, 9)]
    (root / "alias_bomb.yaml").write_text("x:\n" + "".join(f"  {line}\n" for line in laughs))
    out["alias_bomb"] = str(root / "alias_bomb.yaml")
    (root / "constant_reward_for_probe_tests.py").write_text(
        "def reward(prompt, response, answer=None):\n    return 1.0\n"
    )
    out["dir"] = str(root)
    return out


# ---------------------------------------------------------------------------------------------
# the catalogue: (CLI arguments, error raised in-process, the message it carries)

P, A, O = "--model.init_args.policy.path", "--model.init_args.policy.adapter_path", "--model.init_args.optimizer"
U, E = "--data.init_args.update.path", "--data.init_args.evals"
U_OK = (U, "{update_ok}")
REFUSED = [
    # policy, tokenizer, adapter
    pytest.param(
        [P, "{nowhere}"],
        FileNotFoundError,
        r"policy directory .* does not exist.*download the model first",
        id="policy-dir-missing",
    ),
    pytest.param(
        [P, "{no_weights}"],
        FileNotFoundError,
        r"no model weights in .*save them with model.save_pretrained",
        id="policy-weights-missing",
    ),
    pytest.param(
        [P, "{corrupt_weights}"],
        ValueError,
        r"could not load the model in .*SafetensorError.*corrupt.*Fix: copy the checkpoint again",
        id="policy-weights-corrupt",
    ),
    pytest.param(
        [P, "{corrupt_config}"],
        ValueError,
        r"config.json is not valid JSON.*corrupt. Fix: copy it again",
        id="policy-config-corrupt",
    ),
    pytest.param(
        [P, "{no_tokenizer}"], FileNotFoundError, r"no tokenizer in .*tokenizer.save_pretrained", id="tokenizer-missing"
    ),
    pytest.param(
        [P, "{corrupt_tokenizer}"],
        ValueError,
        r"could not load the tokenizer in .*corrupt.*Fix: copy the tokenizer files again",
        id="tokenizer-corrupt",
    ),
    pytest.param(
        [P, "{nan_weights}"],
        ValueError,
        r"the policy in .*nan_weights has non-finite weights \(NaN or inf\) in 2 parameter\(s\): "
        r"'model.layers.1.mlp.down_proj.weight' \(3 of 8192 entries\), 'model.norm.weight' \(1 of 64 entries\);.*"
        r"Fix: probe an earlier checkpoint",
        id="policy-weights-non-finite",
    ),
    pytest.param(
        ["--model.init_args.policy.device", "cuda"],
        ValueError,
        r"policy.device 'cuda' asks for a GPU but torch sees none on this machine .*Fix: set policy.device to cpu, "
        r"or run on a machine with a CUDA GPU and a CUDA build of torch",
        id="policy-device-gpu-without-gpu",
    ),
    pytest.param(
        ["--model.init_args.policy.device", "gpu"],
        ValueError,
        r"policy.device 'gpu' is not a device torch knows \(Expected one of cpu, cuda.*\). Fix: set policy.device to "
        r"cpu, cuda or cuda:N",
        id="policy-device-unknown",
    ),
    pytest.param(
        [A, "{nowhere}"],
        FileNotFoundError,
        r"adapter directory .* does not exist; pass the local directory",
        id="adapter-missing",
    ),
    pytest.param(
        [A, "{corrupt_adapter}"],
        ValueError,
        r"could not load the PEFT adapter in .*corrupt.*Fix: copy the adapter again",
        id="adapter-corrupt",
    ),
    # optimizer state
    pytest.param(
        [P, "{no_optimizer}"],
        FileNotFoundError,
        r"optimizer state not found: directory .* holds no optimizer.pt",
        id="optimizer-missing",
    ),
    pytest.param(
        [P, "{corrupt_optimizer}"],
        ValueError,
        r"could not read .*optimizer.pt with torch.load .*corrupt.*Fix: copy it again",
        id="optimizer-corrupt",
    ),
    pytest.param(
        [P, "{other_models_optimizer}"],
        ValueError,
        r"\(hf_trainer, 12 parameters .*does not fit the model \(21 parameters.*Fix: set optimizer.param_order",
        id="optimizer-of-another-model",
    ),
    pytest.param(
        [O, "{{path: {toy}, param_order: {reversed_order}}}"],
        ValueError,
        r"param_order=names from .*reversed_order.txt: parameter .* has shape .*Fix: set optimizer.param_order",
        id="parameter-order-mismatch",
    ),
    # rollout files
    pytest.param(
        [U, "{empty}"],
        ValueError,
        r"empty.jsonl: the file holds no rollouts .*Fix: check that the writer finished",
        id="update-batch-empty",
    ),
    pytest.param(
        [*U_OK, E, "[{{path: {empty}}}]"], ValueError, r"empty.jsonl: the file holds no rollouts", id="eval-batch-empty"
    ),
    pytest.param(
        [*U_OK, E, "[]"], ValueError, r"data.evals is empty: give at least one evaluation batch", id="no-eval-batch"
    ),
    pytest.param(
        [U, "{update_empty_response}"],
        ValueError,
        r"line 2: 'response_ids' is empty .*Fix: drop empty responses",
        id="response-empty",
    ),
    pytest.param(
        [*U_OK, E, "[{{path: {eval_out_of_vocabulary}}}]"],
        ValueError,
        r"line 2: field 'response_ids' holds token id 99, outside the model's vocabulary \(vocab_size=16.*re-tokenize",
        id="token-id-outside-vocabulary",
    ),
    pytest.param(
        [U, "{update_nan_advantage}"],
        ValueError,
        r"line 2: 'advantage' is nan \(not finite\). Fix:",
        id="advantage-nan",
    ),
    pytest.param(
        [U, "{update_infinite_advantage}"],
        ValueError,
        r"line 2: 'advantage' is inf \(not finite\). Fix:",
        id="advantage-infinite",
    ),
    pytest.param(
        [U, "{update_truncated}"],
        ValueError,
        r"line 5: the last line is not valid JSON .*looks truncated.*Fix: delete the last line",
        id="rollout-last-line-truncated",
    ),
    pytest.param(
        [*U_OK, E, "[{{path: {eval_top_p}}}]"],
        ValueError,
        r"eval_top_p.jsonl: 4 evaluation sequences were sampled with top-p/top-k truncation.*Fix: sample E without "
        r"top_p/top_k, or set data.init_args.evals\[0\].allow_truncated_sampling=true knowingly",
        id="eval-file-top-p",
    ),
    pytest.param(
        [*U_OK, E, "[{{path: {eval_unknown_sampling}}}]"],
        ValueError,
        r"eval_unknown_sampling.jsonl: no record says how this evaluation batch was sampled.*HF generate\(\) "
        r'samples with top_k=50.*Fix: check how the responses were sampled, then add "temperature": 1, "top_p": 1.0, '
        r'"top_k": 0',
        id="eval-file-without-sampling-fields",
    ),
    pytest.param(
        [*U_OK, E, "[{{path: {eval_without_temperature}}}]"],
        ValueError,
        r"eval_without_temperature.jsonl: no record gives the temperature this evaluation batch was sampled at "
        r"\('temperature' is absent or null in every record; line 1 has temperature=null, top_p=1.0, top_k=0\).*"
        r"\(data.init_args.evals\[0\].sampling.temperature\). Fix: add the temperature the responses were sampled at "
        r"to every record",
        id="eval-file-without-temperature",
    ),
    pytest.param(
        [*U_OK, E, "[{{path: {eval_other_temperature}}}]"],
        ValueError,
        r"eval_other_temperature.jsonl: the records say E was sampled at temperature 0.5, but the probe measures the "
        r"entropy at tau = 1 \(data.init_args.evals\[0\].sampling.temperature\).*Fix: to probe the entropy at "
        r"tau = 0.5, set data.init_args.evals\[0\].sampling.temperature to 0.5",
        id="eval-file-other-temperature",
    ),
    pytest.param(
        [*U_OK, E, "[{{path: {eval_mixed_sampling}}}]"],
        ValueError,
        r"eval_mixed_sampling.jsonl: the records disagree on how E was sampled: line 1 has temperature=1.0, "
        r"top_p=1.0, top_k=0, line 2 has temperature=1.0, top_p=1.0, top_k=50 \(top_p 1.0 and top_k 0 / -1 / null "
        r"/ absent mean off\).*Fix: split the file",
        id="eval-file-mixed-sampling",
    ),
    pytest.param(
        [*U_OK, E, '[{{path: {eval_some_rewards}, reward: ""}}]'],
        ValueError,
        r"eval_some_rewards.jsonl: 1 of the 4 records of this evaluation batch carry a reward and the others do not "
        r"\(line 2 has none\).*Fix: give every record its reward, remove the field from all, or score E with "
        r"data.init_args.evals\[0\].reward",
        id="eval-file-some-rewards",
    ),
    pytest.param(
        [U, "{update_token_after_eos}"],
        ValueError,
        r"update_token_after_eos.jsonl, line 2: 'response_ids' goes on after its first EOS \(id 2 at position 1, "
        r"counted from 0\): token 9 at position 3 is neither EOS nor padding.*Fix: cut each response after its first "
        r"EOS",
        id="response-goes-on-after-eos",
    ),
    pytest.param(
        [U, "{update_some_advantages}"],
        ValueError,
        r"update_some_advantages.jsonl: 2 of 4 records carry an 'advantage', the other 2 do not \(line 3, line 4\).*"
        r"Fix: store the advantage for every record",
        id="advantage-on-some-records",
    ),
    pytest.param(
        [U, "{update_flipped_advantages}"],
        ValueError,
        r"update_flipped_advantages.jsonl: advantages decrease where rewards increase in every group: in each of the 2 "
        r"prompt groups whose rewards differ, every response with a higher reward has a lower advantage \(group 0 "
        r"\(line 1, line 2\); group 1 \(line 3, line 4\)\)\. The advantages' sign is flipped\?.*Fix: store the "
        r"advantages the trainer's loss -A \* log p used",
        id="advantages-sign-flipped",
    ),
    pytest.param(
        [*U_OK, E, "[{{path: {eval_longer_than_context}}}]"],
        ValueError,
        r"eval_longer_than_context.jsonl, line 2: the sequence is 33 tokens long \(5 prompt \+ 28 response tokens\), "
        r"more than the model's context of 32 positions \(config.max_position_embeddings, times a RoPE scaling "
        r"factor\).*Fix: truncate the prompt "
        r"or the response so that each sequence fits 32 tokens",
        id="sequence-longer-than-context",
    ),
    pytest.param(
        [U, "{update_fifo}"],
        ValueError,
        r"update_fifo.jsonl: is a named pipe \(FIFO\), not a regular file; probe reads rollouts only from regular "
        r"files.*Fix: write the rollouts to a file",
        id="rollout-file-fifo",
    ),
    pytest.param(
        [*U_OK, E, "[{{path: {eval_zero}}}]"],
        ValueError,
        r"eval_zero.jsonl: is a character device \(such as /dev/zero\), not a regular file",
        id="rollout-file-dev-zero",
    ),
    pytest.param(
        ["--data.init_args.update.source.prompts", "{prompts_fifo}"],
        ValueError,
        r"prompt file .*prompts_fifo.jsonl is a named pipe \(FIFO\); prompts are read only from regular files.*Fix: "
        r"give 'toy', or write the prompts to a JSONL file",
        id="prompt-file-fifo",
    ),
    pytest.param(
        ["--data.init_args.update.source.prompts", "/dev/zero"],
        ValueError,
        r"prompt file /dev/zero is a device; prompts are read only from regular files",
        id="prompt-file-dev-zero",
    ),
    # sampling
    pytest.param(
        [
            "--data.init_args.update.reward",
            "constant_reward_for_probe_tests:reward",
            "--data.init_args.update.max_resample_attempts",
            "1",
        ],
        ValueError,
        r"every one of the 3 prompt groups got equal rewards within the group on the first sampling attempt \(every "
        r"reward was 1\), and 3 of 3 prompt groups still have all advantages .* after 1 resampling attempts.*One "
        r"example, as the reward function saw it: prompt '.+ = ?', response '[^']*' \(decoded with "
        r"skip_special_tokens=True\), finished=(True|False), reward 1\. Fix: check the reward function on this example",
        id="all-zero-advantages-after-resampling",
    ),
    pytest.param(
        [E, "[{{sampling: {{top_p: 0.9}}}}]"],
        ValueError,
        r"evaluation batch sampled with top_p=0.9.*Fix: remove top_p/top_k for E",
        id="eval-top-p",
    ),
    pytest.param(
        [E, "[{{sampling: {{top_k: 5}}}}]"],
        ValueError,
        r"evaluation batch sampled with top_p=None, top_k=5.*Fix:",
        id="eval-top-k",
    ),
    pytest.param(
        [E, "[{{sampling: {{temperature: 0}}}}]"],
        ValueError,
        r"sampling temperature must be > 0, got 0.0: greedy decoding .*use a small positive temperature",
        id="eval-temperature-0",
    ),
    # prompts
    pytest.param(
        ["--data.init_args.update.source.n_prompts", "0"],
        ValueError,
        r"source.n_prompts must be a whole number >= 1 .*got 0. Fix: set n_prompts",
        id="zero-prompts",
    ),
    pytest.param(
        ["--data.init_args.update.source.offset", "-1"],
        ValueError,
        r"source.offset must be a whole number >= 0 .*got -1. Fix: set offset to 0",
        id="prompt-offset-negative",
    ),
    pytest.param(
        ["--data.init_args.update.source.prompts", "{prompts}", "--data.init_args.update.source.chat_template", "on"],
        ValueError,
        r"prompts of .*prompts.jsonl: chat_template is 'on' but the policy's tokenizer has no chat template.*Fix: set "
        r"source.chat_template to off \(or auto\)",
        id="chat-template-on-without-one",
    ),
    # settings
    pytest.param(
        ["--model.init_args.probe.covariance_fraction", "0"],
        ValueError,
        r"probe.covariance_fraction must be in \(0, 1\], got 0.0: the fraction of U's response tokens compared",
        id="covariance-fraction-zero",
    ),
    pytest.param(
        ["--model.init_args.loss.temperature", "0"],
        ValueError,
        r"loss.temperature must be a finite number > 0, got 0.0.*Fix: set loss.temperature to the temperature U was "
        r"sampled at",
        id="loss-temperature-0",
    ),
    pytest.param(
        ["--model.init_args.loss.temperature", ".inf"],
        ValueError,
        r"loss.temperature must be a finite number > 0, got inf",
        id="loss-temperature-infinite",
    ),
    pytest.param(
        ["--model.init_args.probe.etas", "[0.001, -0.001]"],
        ValueError,
        r"probe.etas must be finite and > 0, got \[-0.001\]",
        id="eta-negative",
    ),
    pytest.param(
        ["--model.init_args.probe.n_etas", "0"],
        ValueError,
        r"an empty eta grid was asked for.*n_etas=0.*Fix: set probe.n_etas >= 1",
        id="eta-grid-empty",
    ),
    pytest.param(
        ["--model.init_args.probe.parts", "[full, gradient]"],
        ValueError,
        r"unknown part\(s\) \['gradient'\]; choose from full, baseline, grad",
        id="unknown-part",
    ),
    pytest.param(
        ["--model.init_args.probe.etas", "[0.0003, 1e39]"],
        ValueError,
        r"probe.etas reaches 1e\+39, beyond the largest number .*\(3.4e\+38\).*Fix: use smaller etas",
        id="eta-beyond-the-dtype",
    ),
    # hardware
    pytest.param(
        ["--trainer.accelerator", "gpu"],
        ValueError,
        r"--trainer.accelerator gpu asks for a GPU but torch sees none.*Fix: run on CPU",
        id="gpu-without-gpu",
    ),
    pytest.param(
        ["--trainer.accelerator", "gpu", "--trainer.devices", "2"],
        ValueError,
        r"asks for a GPU but torch sees none",
        id="two-gpus-without-gpu",
    ),
]
if torch.cuda.is_available():  # on a GPU machine these two are not bad input
    REFUSED = [p for p in REFUSED if "gpu" not in p.id]

PARSER_REFUSED = [  # refused by the config parser: SystemExit(2), the message on stderr
    pytest.param(
        ["--model.init_args.probe.n_etass", "3"], r"unrecognized arguments: --probe.n_etass=3", id="misspelt-key"
    ),
    pytest.param(
        ["--config", "{misspelt_yaml}"], r"Group 'probe' does not accept option 'n_eta'", id="misspelt-key-in-yaml"
    ),
    pytest.param(
        ["--config", "{alias_bomb}"],
        r"python -m probe: error: the config file .*alias_bomb.yaml expands to more than 100,000 YAML nodes once its "
        r"aliases \(\*name\) are expanded \(it holds 30 as written\).*Fix: write the repeated values out",
        id="config-alias-bomb",
    ),
    pytest.param(
        ["--model.init_args.probe.etas", "[.nan]"],
        r'Parser key "probe.etas":\s+Expected a <class .float.>. Got value: nan',
        id="eta-nan",
    ),
    pytest.param(
        ["--model.init_args.probe.etas", "[.inf]"],
        r'Parser key "probe.etas":\s+Expected a <class .float.>. Got value: inf',
        id="eta-infinite",
    ),
]


@pytest.mark.parametrize("args, error, message", REFUSED)
def test_bad_input_is_refused_with_a_clear_message(args, error, message, files, tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(files["dir"])  # the constant reward's module
    with pytest.raises(error, match="(?s)" + message):  # (?s): messages may span lines
        main(probe_args(tmp_path, "run", *(a.format(**files) for a in args)))
    assert_no_finished_summary(tmp_path / "run")


@pytest.mark.parametrize("args, message", PARSER_REFUSED)
def test_bad_config_is_refused_by_the_parser(args, message, files, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(probe_args(tmp_path, "run", *(a.format(**files) for a in args)))
    assert exit_info.value.code == 2
    assert re.search(message, capsys.readouterr().err), message
    assert not (tmp_path / "run").exists()


def test_more_gpus_than_the_machine_has_are_refused(monkeypatch):
    # the branch a one-GPU machine takes: torch sees 1 device, 2 (or device index 1) are asked for
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    for devices in (2, "2", [0, 1], "0,1"):
        with pytest.raises(ValueError, match=r"needs 2 GPUs but this machine has 1. Fix: pass --trainer.devices 1"):
            check_gpu_request({"accelerator": "gpu", "devices": devices})
    check_gpu_request({"accelerator": "gpu", "devices": 1})
    check_gpu_request({"accelerator": "cpu", "devices": 4})  # CPU processes: any number, Lightning allows it


def test_yaml_nodes_are_counted_with_aliases_expanded_without_expanding_them(capsys):
    from probe.cli import check_config_sizes, expanded_yaml_nodes

    assert expanded_yaml_nodes("a: &a [1, 2]\nb: [*a, *a]") == (13, 7)  # 1 + a, [1, 2] + b, [[1, 2], [1, 2]]
    assert expanded_yaml_nodes("a: &a [*a]") == (100_001, 0)  # a recursive alias has no end
    with pytest.raises(SystemExit):
        check_config_sizes(["predict", "--config", "a: &a [*a]"])
    assert "(an alias refers to itself (&a ... *a)): an alias bomb" in capsys.readouterr().err
    assert expanded_yaml_nodes("{a: [1") is None  # not YAML: the parser says so
    for config in sorted((REPO / "configs").glob("*.yaml")):  # every shipped config, far below the 100,000 limit
        assert expanded_yaml_nodes(config.read_text())[0] < 400, config.name
    laughs = "[" + ", ".join(["&a0 [x, x, x, x, x, x, x, x, x]"] + ["*a0"] * 8) + "]"
    for i in range(1, 7):
        laughs = "[" + ", ".join([f"&a{i} {laughs}"] + [f"*a{i}"] * 8) + "]"
    with pytest.raises(SystemExit) as exit_info:  # a bomb as an option's value, not in a file
        check_config_sizes(["predict", "--data.init_args.evals", laughs])
    assert exit_info.value.code == 2
    assert "error: the value of --data.init_args.evals expands to more than 100,000 YAML" in capsys.readouterr().err
    check_config_sizes(["predict", "--config", str(REPO / "configs" / "toy.yaml"), "--model.init_args.probe.etas=[1]"])


def test_an_empty_eta_list_means_the_default_grid():
    grid = ProbeSettings(etas=[], n_etas=5).eta_grid(3e-4)
    assert len(grid) == 5 and 3e-4 in grid and grid == sorted(grid)
    assert grid[0] == pytest.approx(3e-5) and grid[-1] == pytest.approx(3e-3)


# ---------------------------------------------------------------------------------------------
# accepted with a warning


def test_padding_after_eos_is_stripped_and_missing_advantages_computed_with_warnings(files, tmp_path, caplog):
    update = files["update_padded_rewards_only"]  # responses padded with id 0 after EOS, rewards but no advantages
    with caplog.at_level(logging.WARNING, logger="probe"):
        main(probe_args(tmp_path, "run", U, update, E, f"[{{path: {files['eval_ok']}}}]"))
    warnings = [
        r.getMessage() for r in caplog.records if r.levelname == "WARNING" and r.getMessage().startswith(update)
    ]
    assert warnings == [
        f"{update}: 4 of 4 responses go on after their first EOS with padding/EOS only (8 tokens, ids 0); stripped "
        "them (with their old_logprobs, if any) so they are not scored as response tokens. Fix: write each response "
        "cut after its first EOS, without padding",
        f"{update}: no record has an 'advantage': computed the 'advantage' of all 4 records from 'reward', by GRPO "
        "group normalisation over 2 groups: A = (r - group mean) / (group std + 1e-06), unbiased (n-1) std as verl "
        "and TRL, 0 for a group of one (normalize_std=true). Fix, if the trainer used other advantages (another "
        "normalisation, a KL or length term, a batch-wide baseline): store them as 'advantage' in every record",
    ]
    copied = [json.loads(line) for line in (tmp_path / "run" / "rollouts" / "update.jsonl").read_text().splitlines()]
    # the run used (and keeps) the responses cut after their EOS, with the advantages it computed: rewards 1, 0 in
    # each group of two, so (1 - 0.5) / (std 0.7071 + 1e-6) and its negative
    assert [r["response_ids"] for r in copied] == [r["response_ids"] for r in UPDATE]
    assert [r["advantage"] for r in copied] == pytest.approx([0.70710578, -0.70710578] * 2, abs=1e-8)
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["status"] == "complete"


def test_advantages_reversed_in_one_group_and_an_evaluation_file_without_eos_are_reported(files, tmp_path, caplog):
    update, evals = files["update_one_group_reversed"], files["eval_without_eos"]
    with caplog.at_level(logging.WARNING, logger="probe"):
        main(probe_args(tmp_path, "run", U, update, E, f"[{{path: {evals}}}]"))
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert [w for w in warnings if w.startswith(update)] == [
        f"{update}: in 1 of 2 prompt groups whose rewards differ, the advantages order the responses opposite to "
        "their rewards (every response with a higher reward has a lower advantage): group 1 (line 3, line 4). "
        "Advantages with other terms (a KL or length penalty) can do that; a sign flip in the exporter would reverse "
        "every group. Fix: check the advantages of these lines against the trainer's; if they are its own, nothing "
        "is wrong"
    ]
    unended = (
        ": only 0 of 4 responses of this evaluation batch end with an EOS id (2); the others stop without one "
        "(line 1, line 2, line 3, line 4): they were probably cut at max_new_tokens, or the file was written without "
        "their EOS. The probe measures the entropy of the policy's sequences, and the entropy of a cut response is "
        "not that. Fix: write each response with the EOS it ended with; if they were cut, sample E with a larger "
        "max_new_tokens so that most responses end"
    )
    assert evals + unended in warnings  # the user's file, named before it is copied into the run
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["status"] == "complete"


# ---------------------------------------------------------------------------------------------
# numerical trouble mid-run: reported, not a crash


@pytest.fixture(scope="module")
def huge_eta_run(tmp_path_factory, toy_world_dir) -> tuple[Path, dict, str]:
    """A run whose sweep reaches eta = 3 (10^4 x lr: the log-weights spread over tens of nats, so one sequence
    carries the weight whatever E was sampled) and 3e38 (theta + eta * d overflows float32)."""
    import contextlib
    import io

    root = tmp_path_factory.mktemp("huge_eta")
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        main(probe_args(root, "huge", "--model.init_args.probe.etas", "[0.0003, 3, 3e38]"))
    return root / "huge", json.loads((root / "huge" / "summary.json").read_text()), out.getvalue()


def test_a_huge_eta_is_reported_as_non_finite_not_a_crash(huge_eta_run):
    run, summary, table = huge_eta_run
    assert summary["status"] == "complete"
    parts = summary["aggregate"]
    non_finite = [(part, j) for part, res in parts.items() for j, ok in enumerate(res["finite"]) if not ok]
    assert non_finite, "theta + 3e38 * d overflows float32 for some part"
    for part, j in non_finite:
        assert j == 2 and parts[part]["delta_h"][j] is None and parts[part]["non_finite_sequences"][j] > 0
        assert any(
            w.startswith(f"{part} at eta=3e+38:") and "non-finite log-probs" in w
            for w in summary["evals"][0]["warnings"]
        )
    assert all(res["finite"][0] and res["non_finite_sequences"][0] == 0 for res in parts.values())
    assert "non-finite" in table
    assert (run / "per_sequence" / non_finite[0][0] / "eta_2.npy").is_file()


def test_collapsed_ess_is_reported_in_the_summary_and_the_table(huge_eta_run):
    run, summary, table = huge_eta_run
    full = summary["aggregate"]["full"]
    M = summary["plan"]["n_eval_sequences"][0]
    records = [json.loads(line) for line in (run / "rollouts" / "eval_00.jsonl").read_text().splitlines()]
    copies = collections.Counter((tuple(r["prompt_ids"]), tuple(r["response_ids"])) for r in records)
    # at 10^4 x lr the log-weights spread over tens of nats: the weight lands on one sequence and its identical
    # copies in E (which get exactly equal weights), so the ESS is at most the largest number of copies
    assert full["ess"][1] <= max(copies.values()) + 0.5 and full["ess_fraction"][1] < 0.25
    warned = any(w.startswith("full at eta=3: ESS") and "(< 10%)" in w for w in summary["evals"][0]["warnings"])
    row = next(line for line in table.splitlines() if line.split()[:2] == ["full", "3"])
    assert warned == (full["ess"][1] < 0.1 * M) == row.endswith("ESS<10%")
    assert float(row.split()[-2 if warned else -1]) == pytest.approx(full["ess"][1], abs=0.05)


def test_an_existing_finished_run_directory_is_refused(huge_eta_run):
    run, _, _ = huge_eta_run
    before = (run / "summary.json").read_bytes()
    with pytest.raises(
        FileExistsError, match=r"already holds a finished run .*choose another --run.name, or pass --run.overwrite=true"
    ):
        main(probe_args(run.parent, run.name))
    assert (run / "summary.json").read_bytes() == before


# ---------------------------------------------------------------------------------------------
# the real process: exit code and message (one case: starting python costs ~7 s of CPU; the
# parser's refusals above are SystemExit(2), which is the process's exit status)


def run_cli(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "WANDB_MODE": "disabled"}
    return subprocess.run(
        [sys.executable, "-m", "probe", *args], capture_output=True, text=True, cwd=REPO, env=env, timeout=300
    )


def test_a_missing_policy_exits_with_status_1_and_the_message(files, tmp_path):
    out = run_cli(*probe_args(tmp_path, "run", P, files["nowhere"]))
    assert out.returncode == 1
    last = out.stderr.strip().splitlines()[-1]
    assert last.startswith("FileNotFoundError: policy directory") and "download the model first" in last
    assert_no_finished_summary(tmp_path / "run")
