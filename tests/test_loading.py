"""Loading policies from local directories: HF checkpoints, PEFT adapters, clear errors for missing pieces."""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import Qwen2Config, Qwen2ForCausalLM

from probe.loading import LoraSettings, PolicySettings, check_device, load_policy, toy_policy
from probe.toy import task
from probe.toy.tokenizer import save_tokenizer

INPUT = torch.tensor([[1, 7, 14, 8, 15, 5, 6, 2], [1, 4, 14, 4, 15, 12, 2, 0]])
MASK = torch.tensor([[1] * 8, [1] * 7 + [0]])


def qwen2_gqa(seed: int = 0) -> Qwen2ForCausalLM:
    torch.manual_seed(seed)
    config = Qwen2Config(
        vocab_size=len(task.VOCAB),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        bos_token_id=task.BOS_ID,
        eos_token_id=task.EOS_ID,
        pad_token_id=task.PAD_ID,
        attn_implementation="sdpa",
    )
    return Qwen2ForCausalLM(config).eval()


@pytest.fixture()
def qwen_dir(tmp_path):
    model = qwen2_gqa()
    model.save_pretrained(tmp_path / "base")
    save_tokenizer(tmp_path / "base")
    return tmp_path / "base", model


def logits_of(model: torch.nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=INPUT, attention_mask=MASK).logits


def test_gqa_qwen2_with_a_saved_lora_adapter_loads_with_the_in_memory_logits(qwen_dir, tmp_path):
    base_dir, base = qwen_dir
    assert base.config.num_key_value_heads < base.config.num_attention_heads
    base_logits = logits_of(base)
    adapter = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"])
    in_memory = get_peft_model(base, adapter)
    with torch.no_grad():  # LoRA B starts at zero; give the adapter a real effect
        generator = torch.Generator().manual_seed(0)
        for name, p in in_memory.named_parameters():
            if "lora_B" in name:
                p.normal_(0.0, 0.5, generator=generator)
    in_memory.save_pretrained(tmp_path / "adapter")
    expected = logits_of(in_memory.eval())
    assert (expected - base_logits).abs().max() > 1e-2  # the adapter changes the output

    model, tokenizer = load_policy(base_dir, adapter_path=tmp_path / "adapter")
    assert isinstance(model, PeftModel) and not model.training
    # same float32 weights and kernels: only summation order could differ
    torch.testing.assert_close(logits_of(model), expected, rtol=0, atol=1e-5)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)  # adapter trainable, base frozen
    assert tokenizer.eos_token_id == task.EOS_ID


def test_plain_checkpoint_loads_with_the_saved_logits_in_eval_mode(qwen_dir):
    base_dir, base = qwen_dir
    model, _ = load_policy(base_dir)
    assert type(model).__name__ == "Qwen2ForCausalLM" and not model.training
    assert model.config.num_key_value_heads == 2
    torch.testing.assert_close(logits_of(model), logits_of(base), rtol=0, atol=1e-6)


def test_fresh_lora_wraps_the_model_without_changing_its_output(qwen_dir):
    base_dir, base = qwen_dir
    model, _ = load_policy(base_dir, lora=LoraSettings(r=2, alpha=4, target_modules=["q_proj", "v_proj"]))
    assert isinstance(model, PeftModel)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]  # e.g. ...q_proj.lora_A.default.weight
    assert {n.split(".")[-3] for n in trainable} == {"lora_A", "lora_B"}
    assert {n.split(".")[-4] for n in trainable} == {"q_proj", "v_proj"}
    torch.testing.assert_close(logits_of(model), logits_of(base), rtol=0, atol=1e-6)  # B = 0 at start


def test_float64_loading_gives_a_float64_model(qwen_dir):
    base_dir, base = qwen_dir
    model, _ = load_policy(base_dir, dtype="float64")
    assert {p.dtype for p in model.parameters()} == {torch.float64}
    # float32 vs float64 forward
    torch.testing.assert_close(logits_of(model).float(), logits_of(base), rtol=0, atol=1e-4)


def test_policy_settings_load_like_load_policy(qwen_dir):
    base_dir, _ = qwen_dir
    model, _ = PolicySettings(path=str(base_dir), dtype="bfloat16").load()
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}


def test_missing_directory_names_the_path_and_says_hub_ids_are_not_fetched(tmp_path):
    not_fetched = r"'Qwen/Qwen2-0.5B' does not exist.*never fetches hub ids.*--local-dir"
    with pytest.raises(FileNotFoundError, match=not_fetched):
        load_policy("Qwen/Qwen2-0.5B")
    with pytest.raises(FileNotFoundError, match=r"config\.json is missing.*save_pretrained"):
        load_policy(tmp_path)


def test_missing_weights_name_the_expected_files_and_the_fix(qwen_dir):
    base_dir, _ = qwen_dir
    (base_dir / "model.safetensors").unlink()
    no_weights = rf"no model weights in {base_dir}.*model\.safetensors.*save_pretrained"
    with pytest.raises(FileNotFoundError, match=no_weights):
        load_policy(base_dir)


def test_missing_tokenizer_names_the_directory_and_the_fix(qwen_dir):
    base_dir, _ = qwen_dir
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (base_dir / name).unlink()
    with pytest.raises(FileNotFoundError, match=rf"no tokenizer in {base_dir}.*tokenizer\.save_pretrained"):
        load_policy(base_dir)


def test_missing_adapter_pieces_are_named(qwen_dir, tmp_path):
    base_dir, _ = qwen_dir
    with pytest.raises(FileNotFoundError, match=r"adapter directory .*nowhere.* does not exist"):
        load_policy(base_dir, adapter_path=tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match=r"adapter_config\.json is missing"):
        load_policy(base_dir, adapter_path=tmp_path / "empty")
    with pytest.raises(ValueError, match=r"either adapter_path .* or lora"):
        load_policy(base_dir, adapter_path=tmp_path / "empty", lora=LoraSettings())


def test_unknown_dtype_lists_the_choices(qwen_dir):
    with pytest.raises(ValueError, match=r"unknown dtype 'float8'.*bfloat16"):
        load_policy(qwen_dir[0], dtype="float8")


def test_toy_policy_loads_the_cached_toy_world(toy_world_dir, tmp_path):
    model, tokenizer = toy_policy()  # default root: the session's $PROBE_CACHE, already built
    reference, _ = load_policy(toy_world_dir)
    torch.testing.assert_close(logits_of(model), logits_of(reference), rtol=0, atol=0)
    copy = tmp_path / "copy"
    shutil.copytree(toy_world_dir, copy)
    assert load_policy(copy)[1].eos_token_id == tokenizer.eos_token_id == task.EOS_ID


def test_dtype_auto_loads_the_dtype_the_weights_were_saved_in(qwen_dir, tmp_path):
    import json

    directory, model = qwen_dir
    assert PolicySettings(path=str(directory)).resolved_dtype() == (torch.float32, "auto: weights saved as float32")
    assert next(PolicySettings(path=str(directory)).load()[0].parameters()).dtype == torch.float32

    # a config.json copied from a bfloat16 base onto float32 weights: the weights are what was trained
    config = json.loads((directory / "config.json").read_text())
    (directory / "config.json").write_text(json.dumps({**config, "dtype": "bfloat16"}))
    dtype, source = PolicySettings(path=str(directory)).resolved_dtype()
    assert (
        dtype == torch.float32 and "config.json says dtype = bfloat16, but the weights are what was trained" in source
    )

    # bfloat16 weights are loaded as float32 (exactly): a step of a real lr would round away against them
    model.to(torch.bfloat16).save_pretrained(tmp_path / "bf16")
    save_tokenizer(tmp_path / "bf16")
    dtype, source = PolicySettings(path=str(tmp_path / "bf16")).resolved_dtype()
    assert dtype == torch.float32 and source.startswith("auto: weights saved as bfloat16, loaded as float32 (exact;")
    loaded = next(PolicySettings(path=str(tmp_path / "bf16")).load()[0].parameters())
    assert loaded.dtype == torch.float32
    assert torch.equal(loaded, next(model.parameters()).to(torch.bfloat16).float())  # the upcast is exact

    # pickled weights have no header to read: the config says it
    model.to(torch.float32).save_pretrained(tmp_path / "bin")
    save_tokenizer(tmp_path / "bin")
    (tmp_path / "bin" / "model.safetensors").unlink()
    torch.save(model.state_dict(), tmp_path / "bin" / "pytorch_model.bin")
    assert PolicySettings(path=str(tmp_path / "bin")).resolved_dtype()[1].startswith("auto: config.json dtype = ")
    # an explicit dtype is taken as it is
    assert PolicySettings(path=str(directory), dtype="float64").resolved_dtype() == (
        torch.float64,
        "set by policy.dtype",
    )


# ---------------------------------------------------------------------------------------------
# issue 13 section 8: settings checked where they are read


def test_policy_path_toy_with_a_local_toy_folder_warns_that_the_built_in_world_is_used(
    toy_world_dir, tmp_path, monkeypatch, caplog
):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "toy").mkdir()
    with caplog.at_level(logging.WARNING, logger="probe"):
        assert PolicySettings(path="toy").directory() == toy_world_dir
        assert PolicySettings(path="toy").directory() == toy_world_dir  # said once per folder, not per call
        assert PolicySettings(path="./toy").directory() == Path("./toy")  # how the local folder is named
    assert [r.getMessage() for r in caplog.records] == [
        f"policy.path is 'toy': using the built-in toy world, not the local folder {tmp_path.resolve() / 'toy'}. "
        "Fix: to use that folder, write policy.path: ./toy"
    ]


def test_policy_path_toy_without_a_local_toy_folder_says_nothing(toy_world_dir, tmp_path, monkeypatch, caplog):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "toy").write_text("a file, not a folder")
    with caplog.at_level(logging.WARNING, logger="probe"):
        assert PolicySettings(path="toy").directory() == toy_world_dir
    assert not caplog.records


@pytest.mark.parametrize(
    "device, message",
    [
        ("gpu", r"policy.device 'gpu' is not a device torch knows \(.*\)"),  # (torch's own words in between)
        ("cuda:x", r"policy.device 'cuda:x' is not a device torch knows \(.*\)"),
        ("", r"policy.device '' is not a device torch knows \(.*\)"),
    ],
)
def test_an_unknown_device_is_refused_with_the_fix(device, message):
    with pytest.raises(ValueError, match=message + r".*Fix: set policy.device to cpu, cuda or cuda:N"):
        PolicySettings(path="toy", device=device)


def test_a_gpu_device_is_refused_before_loading_when_torch_sees_none_or_fewer(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    for device in ("cuda", "cuda:0", "cuda:3"):
        settings = PolicySettings(path="does-not-matter", device=device)  # a config written for a GPU machine
        with pytest.raises(ValueError, match=r"asks for a GPU but torch sees none .*Fix: set policy.device to cpu"):
            settings.load()  # refused before anything is read (the path does not even exist)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    with pytest.raises(ValueError, match=r"'cuda:2' asks for GPU 2 but this machine has 2 \(cuda:0 to cuda:1\)"):
        check_device("cuda:2")
    assert [check_device(d).type for d in ("cuda:1", "cuda", "cpu")] == ["cuda", "cuda", "cpu"]


def test_non_finite_weights_are_refused_naming_three_parameters_the_count_and_the_fix(qwen_dir, tmp_path):
    base_dir, model = qwen_dir
    names = [n for n, _ in model.named_parameters()]
    with torch.no_grad():
        for name in names[:4]:
            dict(model.named_parameters())[name].view(-1)[0] = float("nan") if "norm" in name else float("-inf")
    model.save_pretrained(tmp_path / "diverged")
    save_tokenizer(tmp_path / "diverged")
    with pytest.raises(ValueError) as info:
        load_policy(tmp_path / "diverged")
    message = str(info.value)
    assert message.startswith(f"the policy in {tmp_path / 'diverged'} has non-finite weights (NaN or inf) in 4 ")
    assert all(f"{n!r} (1 of " in message for n in names[:3]) and names[3] not in message
    assert "and 1 more;" in message and message.endswith(
        "Fix: probe an earlier checkpoint, from before the loss or gradients became non-finite (or copy this one "
        "again if the copy is corrupt)"
    )
    load_policy(base_dir)  # the finite original loads


def test_finite_weights_whose_sum_overflows_are_accepted(tmp_path):
    from probe.loading import check_finite_parameters

    big = torch.nn.Linear(4, 4, bias=False)
    with torch.no_grad():
        big.weight.fill_(3e38)  # every entry finite, their float32 sum is inf
    assert not torch.isfinite(big.weight.sum())
    check_finite_parameters(big, tmp_path)
    with torch.no_grad():
        big.weight[1, 2] = float("nan")
    with pytest.raises(ValueError, match=r"in 1 parameter\(s\): 'weight' \(1 of 16 entries\)"):
        check_finite_parameters(big, tmp_path)


def test_the_context_length_counts_rope_scaling_that_keeps_the_original_length():
    from types import SimpleNamespace

    from probe.loading import context_length

    def policy(**config):
        return SimpleNamespace(config=SimpleNamespace(**config))

    assert context_length(policy(max_position_embeddings=32768)) == 32768
    yarn = {"rope_type": "yarn", "factor": 4.0}  # Qwen2.5's long-context recipe: the config keeps 32768
    assert context_length(policy(max_position_embeddings=32768, rope_scaling=yarn)) == 131072
    extended = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 8192}  # already extended
    assert context_length(policy(max_position_embeddings=32768, rope_parameters=extended)) == 32768
    assert context_length(policy(max_position_embeddings=64, rope_parameters={"rope_type": "default"})) == 64
    assert context_length(SimpleNamespace()) is None
