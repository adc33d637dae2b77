"""Optimizer state read from real saved files equals the live optimizer's state, bit for bit.

The truth is always ``AdamState.from_optimizer`` on the optimizer that wrote the file (mapped by
identity), so every test compares a file-mapping against an independent identity-mapping.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from probe.adam import AdamState
from probe.optim_loading import OptimizerSettings, hf_trainer_decay_names, load_optimizer_state, zero_lr_message

import support

VOCAB = 32


def tiny_llama(seed: int = 0, intermediate_size: int = 32) -> nn.Module:
    """q_proj [16,16], k/v_proj [8,16], mlp [32,16]/[16,32], norms [16]: shapes tell orders apart."""
    return support.tiny_llama(seed, vocab_size=VOCAB, intermediate_size=intermediate_size, max_position_embeddings=32)


def tiny_lora_llama(seed: int = 0) -> nn.Module:
    from peft import LoraConfig, get_peft_model

    base = tiny_llama(seed)
    lora = LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    with torch.random.fork_rng():  # random (non-zero) LoRA weights drawn with seed + 1; the global RNG is left alone
        torch.manual_seed(seed + 1)
        return get_peft_model(base, lora)


def token_batches(n: int = 2, seed: int = 1) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, VOCAB, (2, 8), generator=g) for _ in range(n)]


def train_two_steps(model: nn.Module, optimizer: torch.optim.Optimizer, scheduler=None) -> None:
    for input_ids in token_batches():
        model(input_ids=input_ids, labels=input_ids).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        if scheduler is not None:
            scheduler.step()


def assert_same_state(loaded: AdamState, truth: AdamState) -> None:
    """Same parameters in the same order, same hyperparameters and groups, bitwise-equal moments."""
    assert list(loaded.hyper) == list(truth.hyper)
    assert loaded.hyper == truth.hyper
    assert loaded.group_of == truth.group_of
    for name, want in truth.state.items():
        got = loaded.state[name]
        assert got.step == want.step > 0, name
        for key in ("exp_avg", "exp_avg_sq", "max_exp_avg_sq"):
            a, b = getattr(got, key), getattr(want, key)
            if b is None:
                assert a is None, (name, key)
            else:  # bitwise: the file holds exactly the optimizer's tensors
                assert a.dtype == b.dtype and torch.equal(a, b), (name, key)


def only_trainable(state: AdamState, model: nn.Module) -> AdamState:
    keep = {n for n, p in model.named_parameters() if p.requires_grad}
    return AdamState(
        hyper={n: h for n, h in state.hyper.items() if n in keep},
        state={n: s for n, s in state.state.items() if n in keep},
        group_of={n: g for n, g in state.group_of.items() if n in keep},
    )


# ------------------------------------------------------------------------------------------------
# (c) torch.save(optimizer.state_dict())
# ------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def saved_full_adamw(tmp_path_factory):
    """AdamW over model.parameters() in two groups with different hyperparameters (one with amsgrad), 2 steps."""
    model = tiny_llama()
    params = list(model.parameters())
    optimizer = torch.optim.AdamW(
        [
            {"params": params[:5], "weight_decay": 0.1, "amsgrad": True},
            {"params": params[5:], "lr": 2e-3, "betas": (0.8, 0.99), "eps": 1e-6, "weight_decay": 0.0},
        ],
        lr=1e-3,
    )
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0 / (s + 1))
    train_two_steps(model, optimizer, scheduler)
    file = tmp_path_factory.mktemp("torch") / "optimizer.pt"
    torch.save(optimizer.state_dict(), file)
    return model, optimizer, file


def test_adamw_over_all_parameters_loads_bitwise_with_group_hyperparameters(saved_full_adamw):
    model, optimizer, file = saved_full_adamw
    loaded = load_optimizer_state(file, model)
    assert_same_state(loaded, AdamState.from_optimizer(optimizer, model))
    assert loaded.hyper["model.embed_tokens.weight"].lr == pytest.approx(1e-3 / 3)  # lr after the scheduler's 2 steps
    assert loaded.hyper["lm_head.weight"].beta1 == 0.8 and loaded.hyper["lm_head.weight"].eps == 1e-6
    assert "param_order=model" in loaded.source and str(file) in loaded.source


def test_settings_object_and_explicit_model_order_give_the_same_state(saved_full_adamw):
    model, optimizer, file = saved_full_adamw
    loaded = load_optimizer_state(OptimizerSettings(path=str(file), format="torch", param_order="model"), model)
    assert_same_state(loaded, AdamState.from_optimizer(optimizer, model))


def test_lora_optimizer_over_trainable_parameters_only(tmp_path):
    model = tiny_lora_llama()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3, weight_decay=0.05)
    train_two_steps(model, optimizer)
    file = tmp_path / "opt.pt"
    torch.save(optimizer.state_dict(), file)
    loaded = load_optimizer_state(file, model)
    assert_same_state(loaded, AdamState.from_optimizer(optimizer, model))
    assert len(loaded.hyper) == 4 and all(".lora_" in n for n in loaded.hyper)  # q/v x A/B
    assert "param_order=trainable" in loaded.source


def test_frozen_parameters_listed_in_the_optimizer_are_left_out(tmp_path):
    model = tiny_lora_llama()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)  # frozen base weights never get a gradient
    train_two_steps(model, optimizer)
    file = tmp_path / "opt.pt"
    torch.save(optimizer.state_dict(), file)
    loaded = load_optimizer_state(file, model)
    assert_same_state(loaded, only_trainable(AdamState.from_optimizer(optimizer, model), model))
    assert "param_order=model" in loaded.source and "requires_grad=False left out" in loaded.source


def test_empty_state_is_step_zero_and_ambiguous_orders_are_reported(tmp_path):
    model = tiny_llama()
    decay = hf_trainer_decay_names(model)
    named = list(model.named_parameters())
    optimizer = torch.optim.AdamW(  # built like HF Trainer but saved as a plain file, before any step
        [
            {"params": [p for n, p in named if n in decay]},
            {"params": [p for n, p in named if n not in decay], "weight_decay": 0.0},
        ]
    )
    file = tmp_path / "fresh.pt"
    torch.save(optimizer.state_dict(), file)
    loaded = load_optimizer_state(file, model)
    assert set(loaded.hyper) == {n for n, _ in named}
    assert all(s.step == 0 and s.exp_avg is None for s in loaded.state.values())
    # no shapes to tell the orders apart: the documented default (model) is taken and the source says so
    assert "param_order=model;" in loaded.source and "hf_trainer" in loaded.source and "would fit" in loaded.source


def test_kind_auto_reads_adam_with_l2_decay_from_the_saved_flag(tmp_path):
    model = tiny_llama()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3, weight_decay=0.01)
    train_two_steps(model, optimizer)
    file = tmp_path / "adam.pt"
    torch.save(optimizer.state_dict(), file)
    loaded = load_optimizer_state(file, model)
    assert_same_state(loaded, AdamState.from_optimizer(optimizer, model))
    assert not any(h.decoupled for h in loaded.hyper.values())


def test_overrides_replace_hyperparameters_and_keep_the_moments(saved_full_adamw):
    model, optimizer, file = saved_full_adamw
    base = load_optimizer_state(file, model)
    loaded = load_optimizer_state(
        file, model, lr=5e-5, beta1=0.5, beta2=0.9, eps=1e-12, weight_decay=0.3, amsgrad=False, kind="adam"
    )
    for name, h in loaded.hyper.items():
        hyper = (h.lr, h.beta1, h.beta2, h.eps, h.weight_decay, h.amsgrad, h.decoupled)
        assert hyper == (5e-5, 0.5, 0.9, 1e-12, 0.3, False, False), name
    partial = load_optimizer_state(file, model, lr=7e-4)  # only what is given changes
    for name, h in partial.hyper.items():
        assert h.lr == 7e-4 and h.beta1 == base.hyper[name].beta1 and h.weight_decay == base.hyper[name].weight_decay
    for name, s in loaded.state.items():
        assert s.step == base.state[name].step and torch.equal(s.exp_avg, base.state[name].exp_avg)
    with pytest.raises(ValueError, match="lacks \\['max_exp_avg_sq'\\]; amsgrad is on .* set optimizer.amsgrad=false"):
        load_optimizer_state(file, model, amsgrad=True)  # group 1 ran without amsgrad: no running max to use


def test_explicit_names_with_a_wrapper_prefix_or_from_a_text_file_map_to_the_model(saved_full_adamw, tmp_path):
    model, optimizer, file = saved_full_adamw
    truth = AdamState.from_optimizer(optimizer, model)
    lightning_names = ["model." + n for n, _ in model.named_parameters()]  # as a LightningModule wrapping it names them
    assert_same_state(load_optimizer_state(file, model, param_order=lightning_names), truth)
    names_file = tmp_path / "order.txt"
    names_file.write_text("# optimizer order\n" + "\n".join(n for n, _ in model.named_parameters()) + "\n")
    assert_same_state(load_optimizer_state(file, model, param_order=str(names_file)), truth)


# ------------------------------------------------------------------------------------------------
# (a) a real Lightning run
# ------------------------------------------------------------------------------------------------


def test_lightning_checkpoint_of_a_real_fit_loads_bitwise(tmp_path):
    import lightning as L

    class Policy(L.LightningModule):
        def __init__(self, model, lr: float = 1e-3):
            super().__init__()
            self.save_hyperparameters(ignore=["model"])  # real checkpoints carry hyper_parameters, loops, callbacks
            self.model = model

        def training_step(self, input_ids, batch_idx):
            return self.model(input_ids=input_ids, labels=input_ids).loss

        def configure_optimizers(self):
            optimizer = torch.optim.AdamW(self.parameters(), lr=self.hparams.lr, weight_decay=0.1)
            scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0 / (s + 1))
            return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    policy = Policy(tiny_llama())
    trainer = L.Trainer(
        max_steps=2,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
    )
    trainer.fit(policy, torch.utils.data.DataLoader(torch.cat(token_batches()), batch_size=2))
    ckpt = tmp_path / "last.ckpt"
    trainer.save_checkpoint(ckpt)

    # the HF model; the LightningModule's "model." prefix is irrelevant
    loaded = load_optimizer_state(ckpt, policy.model)
    assert_same_state(loaded, AdamState.from_optimizer(trainer.optimizers[0], policy.model))
    assert loaded.hyper["lm_head.weight"].lr == pytest.approx(1e-3 / 3)  # after 2 scheduler steps
    assert "(lightning, optimizer 0;" in loaded.source
    with pytest.raises(ValueError, match="optimizer_index=1 but .* holds 1 optimizer"):
        load_optimizer_state(ckpt, policy.model, optimizer_index=1)


# ------------------------------------------------------------------------------------------------
# (b) a real transformers.Trainer run
# ------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def hf_trainer_run(tmp_path_factory):
    from transformers import Trainer, TrainingArguments

    out = tmp_path_factory.mktemp("hf")
    model = tiny_llama()
    args = TrainingArguments(
        output_dir=str(out),
        max_steps=2,
        per_device_train_batch_size=2,
        save_strategy="steps",
        save_steps=2,
        report_to=[],
        use_cpu=True,
        learning_rate=1e-3,
        weight_decay=0.1,
        lr_scheduler_type="constant_with_warmup",
        warmup_steps=4,
        logging_strategy="no",
        disable_tqdm=True,
        dataloader_num_workers=0,
    )
    dataset = [{"input_ids": x, "labels": x} for x in torch.cat(token_batches())]
    trainer = Trainer(model=model, args=args, train_dataset=dataset)
    trainer.train()
    return trainer, model, out / "checkpoint-2"


def test_hf_trainer_checkpoint_dir_loads_bitwise_in_decay_then_no_decay_order(hf_trainer_run):
    trainer, model, checkpoint = hf_trainer_run
    optimizer = getattr(trainer.optimizer, "optimizer", trainer.optimizer)  # accelerate wraps the torch optimizer
    truth = AdamState.from_optimizer(optimizer, model)
    loaded = load_optimizer_state(checkpoint, model)
    assert_same_state(loaded, truth)
    assert "(hf_trainer;" in loaded.source and "param_order=hf_trainer" in loaded.source
    decay = set(trainer.get_decay_parameter_names(model))
    assert {n for n, g in loaded.group_of.items() if g == 0} == decay
    assert loaded.hyper["model.norm.weight"].weight_decay == 0.0 and loaded.hyper["lm_head.weight"].weight_decay == 0.1
    assert loaded.hyper["lm_head.weight"].lr == pytest.approx(1e-3 * 2 / 4)  # warmup 2 of 4 steps
    # the optimizer.pt path itself is recognised as an HF Trainer file (trainer_state.json beside it)
    assert_same_state(load_optimizer_state(checkpoint / "optimizer.pt", model), truth)
    # read as if built over model.parameters(), the model order would put norm state on matrices: refused
    refused = "param_order=model: parameter 'model.layers.0.input_layernorm.weight' has shape"
    with pytest.raises(ValueError, match=refused):
        load_optimizer_state(checkpoint, model, param_order="model")


def test_decay_rule_matches_the_installed_transformers_trainer(hf_trainer_run):
    from transformers import GPT2Config, GPT2LMHeadModel

    trainer = hf_trainer_run[0]
    # nn.LayerNorm + biases
    gpt2 = GPT2LMHeadModel(GPT2Config(vocab_size=VOCAB, n_embd=16, n_layer=1, n_head=2, n_positions=16))
    for model in (tiny_llama(), tiny_lora_llama(), gpt2):
        # the Trainer tests `name in decay_names` for names of model.named_parameters() (tied copies such as
        # GPT-2's lm_head.weight appear only in its list, never there), so compare on those names
        names = {n for n, _ in model.named_parameters()}
        expected = set(trainer.get_decay_parameter_names(model)) & names
        assert hf_trainer_decay_names(model) == expected, type(model).__name__
    # GPT-2's ln_1/ln_2/ln_f weights match no name pattern: they are undecayed because they sit in an nn.LayerNorm
    assert {"transformer.h.0.ln_1.weight", "transformer.ln_f.weight"} <= names - hf_trainer_decay_names(gpt2)


# ------------------------------------------------------------------------------------------------
# errors
# ------------------------------------------------------------------------------------------------


def test_state_of_another_model_is_refused_naming_file_parameter_shapes_and_fix(tmp_path):
    other = tiny_llama(intermediate_size=24)
    optimizer = torch.optim.AdamW(other.parameters())
    train_two_steps(other, optimizer)
    file = tmp_path / "other.pt"
    torch.save(optimizer.state_dict(), file)
    model = tiny_llama()
    for order in ("model", "auto"):
        with pytest.raises(ValueError) as err:
            load_optimizer_state(file, model, param_order=order)
        msg = str(err.value)
        assert str(file) in msg and "'model.layers.0.mlp.gate_proj.weight' has shape (32, 16)" in msg
        assert "(24, 16)" in msg and "optimizer.param_order" in msg


def test_missing_state_for_a_trainable_parameter_is_an_error(saved_full_adamw, tmp_path):
    model, optimizer, _ = saved_full_adamw
    state_dict = optimizer.state_dict()
    del state_dict["state"][3]  # position 3 = model.layers.0.self_attn.v_proj.weight
    file = tmp_path / "missing.pt"
    torch.save(state_dict, file)
    missing = r"'model.layers.0.self_attn.v_proj.weight' \(id 3, group 0\) has no optimizer state"
    with pytest.raises(ValueError, match=missing):
        load_optimizer_state(file, model)


def test_missing_file_and_directory_without_optimizer_name_what_is_expected(tmp_path):
    model = tiny_llama()
    with pytest.raises(FileNotFoundError, match=r"nope\.pt does not exist; expected .*Lightning \.ckpt.*optimizer\.pt"):
        load_optimizer_state(tmp_path / "nope.pt", model)
    (tmp_path / "run" / "checkpoint-7").mkdir(parents=True)
    (tmp_path / "run" / "checkpoint-7" / "optimizer.pt").write_bytes(b"")
    with pytest.raises(FileNotFoundError, match=r"holds no optimizer\.pt; pass one of \['checkpoint-7'\]"):
        load_optimizer_state(tmp_path / "run", model)


def _write_marker(path: str) -> str:
    Path(path).write_text("code ran")
    return path


class _CodeOnLoad:
    """Unpickling this runs ``_write_marker``: what a malicious checkpoint would do."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (_write_marker, (self.marker,))


def test_a_pickle_that_is_not_weights_only_is_refused_without_running_it(tmp_path):
    marker = tmp_path / "marker"
    file = tmp_path / "evil.pt"
    torch.save({"state": {}, "param_groups": [], "payload": _CodeOnLoad(str(marker))}, file)
    with pytest.raises(ValueError, match=r"evil\.pt was refused for safety.*re-save just the optimizer state"):
        load_optimizer_state(file, tiny_llama())
    assert not marker.exists()
    torch.load(file, weights_only=False)  # the payload is live: an unsafe load would have run it
    assert marker.exists()


def test_param_order_list_of_the_wrong_length_is_an_error(saved_full_adamw):
    model, _, file = saved_full_adamw
    names = [n for n, _ in model.named_parameters()][:-1]
    with pytest.raises(ValueError, match="lists 11 names but the saved optimizer state holds 12 parameters"):
        load_optimizer_state(file, model, param_order=names)


def test_unknown_names_and_bad_settings_are_errors(saved_full_adamw):
    model, _, file = saved_full_adamw
    names = [n for n, _ in model.named_parameters()]
    with pytest.raises(ValueError, match="are not parameters of the model"):
        load_optimizer_state(file, model, param_order=names[:-1] + ["value_head.weight"])
    with pytest.raises(FileNotFoundError, match="neither one of"):
        load_optimizer_state(file, model, param_order="trainable_only")
    with pytest.raises(ValueError, match="optimizer.kind='sgd'"):
        OptimizerSettings(path=str(file), kind="sgd")


def test_every_automatic_choice_is_recorded_with_its_source(hf_trainer_run):
    _, model, checkpoint = hf_trainer_run
    choices = load_optimizer_state(checkpoint, model).choices
    assert choices["optimizer.format"] == {
        "value": "hf_trainer",
        "file": str(checkpoint / "optimizer.pt"),
        "source": "auto: a directory holding optimizer.pt (an HF Trainer checkpoint)",
    }
    order = choices["optimizer.param_order"]
    assert order["value"] == "hf_trainer" and order["source"].startswith("auto: the first of ['hf_trainer'")
    assert choices["optimizer.kind"]["value"] == "adamw" and choices["optimizer.kind"]["source"].startswith("auto: ")
    assert choices["optimizer.lr"] == {
        "value": [pytest.approx(5e-4)],
        "source": "saved in each param group (the lr the scheduler set for the next step)",
    }
    assert choices["optimizer.step"]["value"] == [2]
    assert choices["optimizer.schedule"]["value"]["initial_lr"] == [pytest.approx(1e-3)]  # the Trainer's LambdaLR

    chosen = load_optimizer_state(checkpoint, model, param_order="hf_trainer", kind="adamw", lr=1e-4).choices
    assert chosen["optimizer.param_order"]["source"] == "set by optimizer.param_order"
    assert chosen["optimizer.kind"] == {"value": "adamw", "source": "set by optimizer.kind"}
    assert chosen["optimizer.lr"] == {"value": [1e-4], "source": "set by optimizer.lr"}


def test_a_schedule_that_decayed_to_zero_is_named_with_the_last_nonzero_lr(hf_trainer_run, tmp_path):
    import json
    import shutil

    _, model, checkpoint = hf_trainer_run
    ended = tmp_path / "checkpoint-10"
    shutil.copytree(checkpoint, ended)
    saved = torch.load(ended / "optimizer.pt", weights_only=True)
    for group in saved["param_groups"]:
        group["lr"] = 0.0  # the last step of a linear decay
    torch.save(saved, ended / "optimizer.pt")
    history = [{"step": 8, "learning_rate": 6e-6}, {"step": 9, "learning_rate": 3e-6}, {"step": 10, "learning_rate": 0}]
    (ended / "trainer_state.json").write_text(json.dumps({"log_history": history}))

    message = zero_lr_message(load_optimizer_state(ended, model))
    assert "learning-rate schedule has reached 0" in message
    assert "the last nonzero lr logged in trainer_state.json was 3e-06" in message
    assert "Fix: set probe.etas to the step sizes to probe and probe.reference_eta" in message
    assert "(e.g. probe.etas: [3e-06] and probe.reference_eta: 3e-06)" in message


# ---- the state is Adam's, with hyperparameters and moments an Adam step can have (issue 13 section 4)

OTHER_OPTIMIZERS = {
    "RAdam": lambda p: torch.optim.RAdam(p, lr=1e-3),
    "NAdam": lambda p: torch.optim.NAdam(p, lr=1e-3),
    "Adamax": lambda p: torch.optim.Adamax(p, lr=1e-3),
    "Adafactor": lambda p: torch.optim.Adafactor(p, lr=1e-3),
    "SGD": lambda p: torch.optim.SGD(p, lr=1e-3, momentum=0.9),
    "Adagrad": lambda p: torch.optim.Adagrad(p, lr=1e-3),
    "RMSprop": lambda p: torch.optim.RMSprop(p, lr=1e-3),
}


@pytest.mark.parametrize("name", sorted(OTHER_OPTIMIZERS))
def test_the_state_of_another_optimizer_is_refused_by_its_name(name, tmp_path):
    model = tiny_llama()
    optimizer = OTHER_OPTIMIZERS[name](model.parameters())
    train_two_steps(model, optimizer)
    file = tmp_path / "optimizer.pt"
    torch.save(optimizer.state_dict(), file)
    with pytest.raises(ValueError, match=rf"holds the state of {name}\b.*not of Adam or AdamW.*Fix: probe a run"):
        load_optimizer_state(file, model)


def saved_adamw(tmp_path, edit=None) -> tuple[nn.Module, Path]:
    """A tiny Llama after two AdamW steps and its saved state, ``edit(state_dict)`` applied before saving."""
    model = tiny_llama()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.01)
    train_two_steps(model, optimizer)
    saved = optimizer.state_dict()
    if edit is not None:
        edit(saved)
    file = tmp_path / "optimizer.pt"
    torch.save(saved, file)
    return model, file


def test_a_state_without_step_counts_is_refused_not_read_as_step_zero(tmp_path):
    model, file = saved_adamw(tmp_path, lambda sd: sd["state"][3].pop("step"))
    with pytest.raises(ValueError, match=r"holds moments but no 'step'; Adam's bias correction depends on"):
        load_optimizer_state(file, model)


@pytest.mark.parametrize(
    "key, value, problem",
    [
        ("betas", (1.0, 0.999), r"beta1 = 1.0 \(must be in \[0, 1\)\)"),
        ("betas", (-0.1, 0.999), r"beta1 = -0.1"),
        ("betas", (0.9, 1.5), r"beta2 = 1.5"),
        ("eps", 0.0, r"eps = 0.0 \(must be finite and > 0\)"),
        ("weight_decay", -0.01, r"weight_decay = -0.01 \(must be finite and >= 0\)"),
        ("lr", float("nan"), r"lr = nan"),
    ],
)
def test_hyperparameters_adamw_refuses_are_refused(tmp_path, key, value, problem):
    model, file = saved_adamw(tmp_path, lambda sd: sd["param_groups"][0].update({key: value}))
    with pytest.raises(ValueError, match=rf"param group 0: {problem}.*torch.optim.AdamW would not take a step"):
        load_optimizer_state(file, model)


def test_an_override_adamw_refuses_is_refused_naming_it(tmp_path):
    model, file = saved_adamw(tmp_path)
    with pytest.raises(ValueError, match=r"param group 0 \(with the overrides \{'beta1': 1.0\}\): beta1 = 1.0"):
        load_optimizer_state(file, model, beta1=1.0)


@pytest.mark.parametrize(
    "key, value, what",
    [
        ("exp_avg", float("nan"), "1 non-finite"),
        ("exp_avg_sq", float("inf"), "1 non-finite"),
        ("exp_avg_sq", -1.0, "1 negative"),
    ],
)
def test_moments_no_adam_step_can_make_are_refused(tmp_path, key, value, what):
    def corrupt(sd):
        sd["state"][2][key].view(-1)[0] = value

    model, file = saved_adamw(tmp_path, corrupt)
    with pytest.raises(
        ValueError, match=rf"the saved {key} of parameter .* has {what} value\(s\) among its \d+ entries.*Fix: probe"
    ):
        load_optimizer_state(file, model)


def test_half_precision_moments_are_recorded_and_their_underflow_reported(tmp_path, caplog):
    import logging

    def to_half(sd):
        for entry in sd["state"].values():
            entry["exp_avg"], entry["exp_avg_sq"] = entry["exp_avg"].half(), entry["exp_avg_sq"].half()

    model, file = saved_adamw(tmp_path, to_half)
    with caplog.at_level(logging.WARNING, logger="probe"):
        choices = load_optimizer_state(file, model).choices
    moments = choices["optimizer.moments"]["value"]
    # squared gradients of ~1e-4 are below float16's smallest subnormal (6e-8): v underflows where m does not
    assert moments["dtype"] == "float16" and 0 < moments["second_moments_underflowed"] <= 1
    assert "of the second moments are 0 where the first moment is not (they underflowed)" in caplog.text
    assert load_optimizer_state(saved_adamw(tmp_path)[1], model).choices["optimizer.moments"]["value"] == {
        "dtype": "float32"
    }


def test_a_step_count_that_disagrees_with_the_checkpoint_is_reported(hf_trainer_run, tmp_path, caplog):
    import json
    import logging
    import shutil

    _, model, checkpoint = hf_trainer_run
    copy = tmp_path / "checkpoint-7"
    shutil.copytree(checkpoint, copy)
    state = json.loads((copy / "trainer_state.json").read_text())
    assert load_optimizer_state(copy, model).choices["optimizer.step"] == {
        "value": [2],
        "source": "saved per-parameter state",
        "checkpoint_step": state["global_step"],
    }
    (copy / "trainer_state.json").write_text(json.dumps({**state, "global_step": 7}))
    with caplog.at_level(logging.WARNING, logger="probe"):
        load_optimizer_state(copy, model)
    assert (
        "has taken 2 step(s) but" in caplog.text
        and "global_step says 7: the moments may be of another run" in caplog.text
    )
