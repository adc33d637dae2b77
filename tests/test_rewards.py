"""Reward functions: GSM8K answer extraction, built-in specs, import paths and their errors, finite rewards."""

from __future__ import annotations

import textwrap
from decimal import Decimal

import pytest

from probe.rewards import RewardFunction, extract_final_number, gsm8k_reward, load_callable, resolve_reward


@pytest.fixture
def reward_module(tmp_path, monkeypatch):
    """A module `user_rewards_for_tests` on sys.path with good and bad reward functions."""
    (tmp_path / "user_rewards_for_tests.py").write_text(
        textwrap.dedent(
            """
            import math
            NOT_A_FUNCTION = 3

            def length_reward(prompt, response):
                return len(response) / 10

            def uses_answer(prompt, response, answer=None):
                return 1.0 if response == answer else 0.0

            def takes_kwargs(prompt, response, **kwargs):
                return float(kwargs.get("answer") == "yes")

            def uses_finished(prompt, response, finished=False):
                return 1.0 if finished else 0.0

            def echoes_keywords(prompt, response, **kwargs):
                return float(10 * ("answer" in kwargs) + kwargs.get("finished", 0))

            def nan_reward(prompt, response):
                return math.nan

            def text_reward(prompt, response):
                return "1.0"

            def none_reward(prompt, response):
                return None

            class Scorer:
                @staticmethod
                def score(prompt, response):
                    return 0.25
            """
        )
    )
    (tmp_path / "broken_rewards_for_tests.py").write_text("import a_package_that_does_not_exist_xyz\n")
    (tmp_path / "raising_rewards_for_tests.py").write_text("raise RuntimeError('boom at import')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    return "user_rewards_for_tests"


# --------------------------------------------------------------------------- GSM8K extraction


@pytest.mark.parametrize(
    "text, number",
    [
        ("Natalia sold 48 clips in April and 24 in May.\n#### 72", "72"),
        ("#### 72 clips, because 48 + 24 = 72 and not 99", "72"),  # the first number after ####
        ("so 3 + 4 = 7 and the answer is 12", "12"),  # no ####: the last number
        ("The total is 1,234,567 apples", "1234567"),  # thousands commas
        ("It costs $18.50 in all.", "18.50"),  # dollar sign, decimals, sentence full stop
        ("The temperature fell to -7 degrees", "-7"),  # negative
        ("#### -1,000", "-1000"),
        ("half of it: .5", "0.5"),
        ("from 3-5 people", "5"),  # a hyphen between numbers is not a minus sign
        ("lists 1,2,3", "3"),  # commas not in groups of three separate numbers
        ("x = 2.0", "2"),
    ],
)
def test_extract_final_number(text, number):
    assert extract_final_number(text) == Decimal(number)


@pytest.mark.parametrize("text", ["no number here", "", "#### ", "#### unknown"])
def test_extract_final_number_returns_none_without_a_number(text):
    assert extract_final_number(text) is None


@pytest.mark.parametrize(
    "response, answer, reward",
    [
        ("48 + 24 = 72\n#### 72", "Natalia sold 48/2 = 24 clips.\n#### 72", 1.0),
        ("The answer is 72.", "72", 1.0),
        ("The answer is $1,000.00", "#### 1000", 1.0),  # equal as numbers
        ("The answer is 72.5", 72.5, 1.0),  # a numeric answer from Parquet metadata
        ("The answer is 71", "#### 72", 0.0),
        ("#### -72", "#### 72", 0.0),
        ("I do not know", "#### 72", 0.0),  # no number -> 0
    ],
)
def test_gsm8k_reward_compares_final_numbers(response, answer, reward):
    assert gsm8k_reward("question", response, answer=answer) == reward
    assert resolve_reward("gsm8k")("question", response, answer=answer) == reward


def test_gsm8k_reward_without_reference_says_where_it_comes_from():
    no_answer = r"needs the reference answer.*Fix: give every prompt record an 'answer' field"
    with pytest.raises(ValueError, match=no_answer):
        resolve_reward("gsm8k")("q", "#### 3")
    with pytest.raises(ValueError, match=r"reference answer 'unknown' holds no number.*Fix:"):
        gsm8k_reward("q", "#### 3", answer="unknown")


# --------------------------------------------------------------------------- built-in specs


def test_toy_reward_is_the_toy_task_reward_imported_at_call_time():
    reward = resolve_reward("toy")
    assert isinstance(reward, RewardFunction) and reward._fn is None  # not imported yet
    from probe.toy.task import reward as toy_reward

    pairs = [("3 + 4 =", "7 <eos>"), ("3 + 4 =", "8 <eos>"), ("<bos> 9 + 3 =", "1 2 <eos>"), ("9 + 3 =", "1 2")]
    for prompt, response in pairs:
        assert reward(prompt, response) == toy_reward(prompt, response)
    assert reward("3 + 4 =", "7 <eos>") == 1.0 and reward("3 + 4 =", "7") == 0.0
    assert reward("3 + 4 =", "7 <eos>", answer="ignored") == 1.0  # answer is not passed to f(prompt, response)
    # decoded without special tokens (the default), the end of the answer comes as finished=True
    assert reward("3 + 4 =", "7", finished=True) == 1.0 and reward("3 + 4 =", "7", finished=False) == 0.0


def test_unknown_name_lists_the_choices():
    choices = r"unknown reward 'gsm9k'.*built-in reward \(toy, gsm8k\).*'package.module:function'"
    with pytest.raises(ValueError, match=choices):
        resolve_reward("gsm9k")


# --------------------------------------------------------------------------- import paths


def test_import_path_resolves_to_the_function(reward_module):
    reward = resolve_reward(f"{reward_module}:length_reward")
    assert reward("p", "abcde") == 0.5
    assert resolve_reward(f"{reward_module}:Scorer.score")("p", "r") == 0.25


def test_answer_is_passed_to_functions_that_take_it(reward_module):
    assert resolve_reward(f"{reward_module}:uses_answer")("p", "42", answer="42") == 1.0
    assert resolve_reward(f"{reward_module}:uses_answer")("p", "42", answer="41") == 0.0
    assert resolve_reward(f"{reward_module}:takes_kwargs")("p", "r", answer="yes") == 1.0


def test_finished_is_passed_when_known_to_functions_that_take_it(reward_module):
    uses_finished = resolve_reward(f"{reward_module}:uses_finished")
    assert uses_finished("p", "r", finished=True) == 1.0 and uses_finished("p", "r", finished=False) == 0.0
    assert uses_finished("p", "r") == 0.0  # not known: the function's own default
    echoes = resolve_reward(f"{reward_module}:echoes_keywords")  # **kwargs: answer always, finished when known
    assert echoes("p", "r") == 10.0 and echoes("p", "r", finished=True) == 11.0
    assert resolve_reward(f"{reward_module}:length_reward")("p", "abcde", answer="a", finished=True) == 0.5


def test_a_callable_is_wrapped_and_checked():
    reward = resolve_reward(lambda prompt, response: float("inf"))
    with pytest.raises(ValueError, match=r"reward function '.*<lambda>' returned inf.*must be finite"):
        reward("p", "r")


def test_missing_module_is_a_clear_error(reward_module):
    not_found = r"module 'no_such_reward_module_xyz' not found.*Fix: check the spelling.*PYTHONPATH"
    with pytest.raises(ValueError, match=not_found):
        resolve_reward("no_such_reward_module_xyz:score")


def test_module_failing_on_its_own_missing_import_names_the_dependency(reward_module):
    failed = r"importing 'broken_rewards_for_tests' failed.*Fix: install 'a_package_that_does_not_exist_xyz'"
    with pytest.raises(ValueError, match=failed):
        resolve_reward("broken_rewards_for_tests:score")
    with pytest.raises(ValueError, match=r"importing 'raising_rewards_for_tests' raised RuntimeError: boom at import"):
        resolve_reward("raising_rewards_for_tests:score")


def test_missing_attribute_lists_the_module_callables(reward_module):
    with pytest.raises(ValueError, match=r"has no attribute 'lenght_reward'.*found: .*length_reward"):
        resolve_reward(f"{reward_module}:lenght_reward")


def test_attribute_that_is_not_callable_is_an_error(reward_module):
    not_callable = (
        r"'user_rewards_for_tests:NOT_A_FUNCTION' is not callable \(it is of type int\)"
        r".*Fix: point to a function reward\(prompt: str, response: str\)"
    )
    with pytest.raises(ValueError, match=not_callable):
        resolve_reward(f"{reward_module}:NOT_A_FUNCTION")


@pytest.mark.parametrize("spec", ["user_rewards_for_tests:", ":score", "user_rewards_for_tests.length_reward"])
def test_malformed_import_path_is_an_error(reward_module, spec):
    with pytest.raises(ValueError, match=r"(not an import path|unknown reward).*'package.module:function'"):
        load_callable(spec) if ":" in spec else resolve_reward(spec)


# --------------------------------------------------------------------------- results must be finite numbers


def test_nan_reward_is_an_error_naming_the_function(reward_module):
    reward = resolve_reward(f"{reward_module}:nan_reward")
    not_finite = rf"reward function '{reward_module}:nan_reward' returned nan for response 'resp'.*finite"
    with pytest.raises(ValueError, match=not_finite):
        reward("p", "resp")


@pytest.mark.parametrize("name", ["text_reward", "none_reward"])
def test_non_numeric_reward_is_an_error_naming_the_function(reward_module, name):
    with pytest.raises(TypeError, match=rf"reward function '{reward_module}:{name}' returned .*Fix: return a float"):
        resolve_reward(f"{reward_module}:{name}")("p", "r")


def test_an_evaluation_batch_is_scored_with_its_reward_and_a_file_brings_its_answers():
    """E scored for the change of its expected reward (data.evals[k].reward): a sampled E's answers come from its
    prompt source, a file E's from each record's ``answer`` field; the file's own rewards are replaced."""
    from datamodules.probe_data import EvalBatchSettings, ProbeDataModule
    from probe.toy.tokenizer import build_tokenizer

    tokenizer = build_tokenizer()
    prompt, seven = (
        tokenizer.encode("3 + 4 =", add_special_tokens=False),
        tokenizer.encode("7", add_special_tokens=False),
    )
    records = [
        {"prompt_ids": prompt, "response_ids": seven + [tokenizer.eos_token_id], "answer": "7", "reward": 0.5},
        {"prompt_ids": [1, *prompt], "response_ids": seven + [tokenizer.eos_token_id], "answer": "8"},
    ]
    settings = EvalBatchSettings(path="E.jsonl", reward="gsm8k")
    scored = ProbeDataModule._score_eval(settings, None, tokenizer, records)
    assert [r["reward"] for r in scored] == [1.0, 0.0]  # each against its own record's answer
    assert records[0]["reward"] == 0.5, "the records read are not changed in place"
    assert ProbeDataModule._score_eval(EvalBatchSettings(path="E.jsonl"), None, tokenizer, records) is records
