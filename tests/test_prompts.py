"""Prompts from a file are tokenised the way the policy was trained to read them (the tokenizer's chat template,
``PromptSource.chat_template``), and the prompt settings are checked where they are read (issue 13 sections 7, 8)."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest

import probe.prompts
from probe.prompts import PromptSource, load_prompts
from probe.toy.tokenizer import build_tokenizer

# a tiny chat template in the toy vocabulary: every turn "<bos> {content} =", and "<eos>" as the generation prompt
# (not a sensible template, but every piece of it shows in the ids)
TEMPLATE = (
    "{% for m in messages %}<bos> {{ m['content'] }} ={% endfor %}{% if add_generation_prompt %} <eos>{% endif %}"
)
PROMPTS = ["3 + 4", "1 + 2", "5 + 5"]


@pytest.fixture()
def prompt_file(tmp_path: Path) -> Path:
    path = tmp_path / "prompts.jsonl"
    path.write_text("".join(json.dumps({"prompt": p, "answer": str(i)}) + "\n" for i, p in enumerate(PROMPTS)))
    return path


@pytest.fixture(autouse=True)
def fresh_log_memory(monkeypatch):
    monkeypatch.setattr(probe.prompts, "_logged", set())  # each test sees the once-per-file INFO line


def chat_tokenizer():
    tokenizer = build_tokenizer()
    tokenizer.chat_template = TEMPLATE
    return tokenizer


def test_auto_applies_the_tokenizers_chat_template_as_one_user_turn_with_the_generation_prompt(prompt_file, caplog):
    tokenizer = chat_tokenizer()
    with caplog.at_level(logging.INFO, logger="probe"):
        prompts, answers = load_prompts(PromptSource(prompts=str(prompt_file), n_prompts=3), tokenizer)
    rendered = [
        tokenizer.apply_chat_template([{"role": "user", "content": p}], tokenize=False, add_generation_prompt=True)
        for p in PROMPTS
    ]
    assert rendered[0] == "<bos> 3 + 4 = <eos>"
    expected = [tokenizer(text, add_special_tokens=False)["input_ids"] for text in rendered]
    assert prompts == expected and prompts[0] == [1, 7, 14, 8, 15, 2]  # <bos> 3 + 4 = <eos>: one <bos>, not two
    assert list(answers.values()) == ["0", "1", "2"]
    assert [r.getMessage() for r in caplog.records] == [
        f"prompts of {prompt_file}: tokenizer chat template applied (chat_template: auto)"
    ]


def test_off_and_a_tokenizer_without_a_template_give_plain_text_said_once(prompt_file, caplog):
    plain = [build_tokenizer()(p, add_special_tokens=True)["input_ids"] for p in PROMPTS]
    assert plain[0] == [1, 7, 14, 8]  # <bos> 3 + 4
    with caplog.at_level(logging.INFO, logger="probe"):
        off = load_prompts(PromptSource(prompts=str(prompt_file), n_prompts=3, chat_template="off"), chat_tokenizer())
        auto = load_prompts(PromptSource(prompts=str(prompt_file), n_prompts=3), build_tokenizer())
        again = load_prompts(PromptSource(prompts=str(prompt_file), n_prompts=2, offset=1), build_tokenizer())
    assert off[0] == plain and auto[0] == plain and again[0] == plain[1:]
    assert [r.getMessage() for r in caplog.records] == [
        f"prompts of {prompt_file}: no chat template (chat_template: off)",
        f"prompts of {prompt_file}: no chat template (chat_template: auto)",  # the same file again: not repeated
    ]


def test_on_applies_the_template_and_is_refused_without_one(prompt_file):
    on = PromptSource(prompts=str(prompt_file), n_prompts=1, chat_template="on")
    assert load_prompts(on, chat_tokenizer())[0] == [[1, 7, 14, 8, 15, 2]]
    with pytest.raises(
        ValueError,
        match=r"prompts of .*prompts.jsonl: chat_template is 'on' but the policy's tokenizer has no chat template.*"
        r"Fix: set source.chat_template to off \(or auto\)",
    ):
        load_prompts(on, build_tokenizer())


def test_the_toy_task_ignores_the_chat_template_setting():
    assert load_prompts(PromptSource(n_prompts=2, chat_template="on"), build_tokenizer()) == load_prompts(
        PromptSource(n_prompts=2), build_tokenizer()
    )


@pytest.mark.parametrize(
    "settings, message",
    [
        ({"n_prompts": 0}, r"source.n_prompts must be a whole number >= 1 \(prompt groups to sample\), got 0. Fix: "),
        ({"n_prompts": -3}, r"source.n_prompts must be a whole number >= 1 .*got -3"),
        (
            {"offset": -1},
            r"source.offset must be a whole number >= 0 \(prompts to skip from the start\), got -1. Fix: ",
        ),
        ({"chat_template": "yes"}, r"source.chat_template must be one of auto, on, off, got 'yes'. Fix: "),
    ],
)
def test_prompt_settings_are_refused_naming_the_key_and_the_fix(settings, message):
    with pytest.raises(ValueError, match=message):
        PromptSource(**settings)


def test_yamls_booleans_for_an_unquoted_on_and_off_mean_on_and_off():
    assert PromptSource(chat_template=True).chat_template == "on"
    assert PromptSource(chat_template=False).chat_template == "off"


def test_the_default_is_documented_where_help_shows_it():
    doc = PromptSource.__doc__
    assert "chat_template: how a prompt file's text is tokenised: ``auto`` (default:" in doc
    assert PromptSource().chat_template == "auto"


def test_a_prompt_that_already_holds_template_text_is_not_wrapped_twice(tmp_path):
    path = tmp_path / "templated.jsonl"  # what a pipeline that templated its prompts itself writes
    path.write_text(json.dumps({"prompt": "<bos> 3 + 4 = <eos>"}) + "\n")
    with pytest.raises(ValueError, match=r"line 1 already holds chat-template text \('<eos>'\).*Fix: set source.chat"):
        load_prompts(PromptSource(prompts=str(path), n_prompts=1), chat_tokenizer())
    plain = load_prompts(PromptSource(prompts=str(path), n_prompts=1, chat_template="off"), chat_tokenizer())[0]
    assert plain == [build_tokenizer()("<bos> 3 + 4 = <eos>", add_special_tokens=True)["input_ids"]]
