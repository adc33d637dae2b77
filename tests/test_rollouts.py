"""Rollout files (docs/DESIGN.md section 9): exact round trips, and an error naming file, line and fix for each bad
input."""

from __future__ import annotations

import json
import logging
import os
import statistics

import numpy as np
import pytest

from datamodules.rollouts import (
    RolloutRecords,
    check_advantages,
    check_eval_sampling,
    fill_advantages,
    read_rollouts,
    strip_after_eos,
    validate_rollouts,
    write_rollouts,
)

EOS, PAD = 2, 0


def make_records() -> list[dict]:
    """Records using every field of the contract, int and str groups, and extra metadata."""
    return [
        {
            "prompt_ids": [1, 4, 12, 5, 15],
            "response_ids": [11, 2],
            "group": 0,
            "advantage": 0.5,
            "reward": 1,
            "old_logprobs": [-0.1, -2.302585092994046],
            "prompt": "3 + 4 =",
            "response": "7 <eos>",
            "answer": "#### 7",
            "step": 3,
        },
        {
            "prompt_ids": [1, 4, 12, 5, 15],
            "response_ids": [12, 2, 0],
            "group": 0,
            "advantage": -0.5,
            "reward": 0,
            "old_logprobs": [-1e-300, -0.3333333333333333, -7.0],
            "prompt": "3 + 4 =",
            "response": "8 <eos>\u2028 ünïcode",
            "answer": "#### 7",
            "step": 3,
        },
    ]


def make_str_group_records() -> list[dict]:
    return [
        {"prompt_ids": [1, 2], "response_ids": [3], "group": "q-17", "reward": 0.25, "source": "verl"},
        {"prompt_ids": [1, 2], "response_ids": [4, 5], "group": "q-17", "reward": 0.75, "source": "verl"},
        {"prompt_ids": [1, 6], "response_ids": [7], "group": "7", "reward": 1.0, "source": "verl"},
    ]


def write_lines(path, lines: list[str], trailing_newline: bool = True) -> None:
    path.write_text("\n".join(lines) + ("\n" if trailing_newline else ""), encoding="utf-8")


def good_line(**changes) -> str:
    record = {"prompt_ids": [1, 2], "response_ids": [3, 4], "group": 0}
    record.update(changes)
    return json.dumps(record)


# --------------------------------------------------------------------------- round trips


def test_jsonl_round_trip_is_exact_including_types_and_metadata(tmp_path):
    records = make_records()
    path = write_rollouts(records, tmp_path / "u.jsonl")
    back = read_rollouts(path)
    assert back == records
    # ints stay ints, floats stay floats (bit-exact), key order kept
    assert type(back[0]["reward"]) is int and type(back[0]["advantage"]) is float
    assert back[1]["old_logprobs"][1] == -0.3333333333333333 and back[1]["old_logprobs"][0] == -1e-300
    assert list(back[0]) == list(records[0])
    assert back[1]["response"] == "8 <eos>\u2028 ünïcode"  # U+2028 is not a line break of the file


def test_jsonl_round_trip_keeps_str_groups_distinct_from_int_groups(tmp_path):
    records = make_str_group_records() + [{"prompt_ids": [1], "response_ids": [2], "group": 7}]
    back = read_rollouts(write_rollouts(records, tmp_path / "u.jsonl"))
    assert back == records
    assert back[2]["group"] == "7" and back[3]["group"] == 7


@pytest.mark.parametrize("make", [make_records, make_str_group_records])
def test_parquet_round_trip_is_exact_including_metadata(tmp_path, make):
    records = make()
    back = read_rollouts(write_rollouts(records, tmp_path / "u.parquet"))
    assert back == records
    assert [type(r["group"]) for r in back] == [type(r["group"]) for r in records]


def test_parquet_absent_optional_fields_read_back_absent(tmp_path):
    records = [
        {"prompt_ids": [1], "response_ids": [2], "group": 0, "note": "only here"},
        {"prompt_ids": [1], "response_ids": [3], "group": 0, "advantage": 1.5},
    ]
    back = read_rollouts(write_rollouts(records, tmp_path / "u.parquet"))
    assert back == records


def test_parquet_rejects_mixed_int_and_str_groups_with_a_fix(tmp_path):
    records = [
        {"prompt_ids": [1], "response_ids": [2], "group": 0},
        {"prompt_ids": [1], "response_ids": [2], "group": "a"},
    ]
    with pytest.raises(ValueError, match=r"u\.parquet.*'group' mixes int and str.*Fix: .*\*\.jsonl"):
        write_rollouts(records, tmp_path / "u.parquet")
    assert read_rollouts(write_rollouts(records, tmp_path / "u.jsonl")) == records  # JSONL keeps both


def test_numpy_values_are_written_as_plain_numbers(tmp_path):
    np = pytest.importorskip("numpy")
    records = [
        {"prompt_ids": np.array([1, 2]), "response_ids": [np.int64(3)], "group": np.int64(4), "w": np.float32(0.5)}
    ]
    back = read_rollouts(write_rollouts(records, tmp_path / "u.jsonl"))
    assert back == [{"prompt_ids": [1, 2], "response_ids": [3], "group": 4, "w": 0.5}]


def test_blank_lines_are_skipped_and_errors_count_file_lines(tmp_path):
    path = tmp_path / "u.jsonl"
    write_lines(path, [good_line(), "", "   ", good_line(group=None)])
    with pytest.raises(ValueError, match=r"u\.jsonl, line 4: missing required field\(s\) 'group'"):
        read_rollouts(path)


def test_write_is_atomic_and_leaves_no_temporary_file(tmp_path):
    path = tmp_path / "deep" / "u.jsonl"
    write_rollouts(make_records(), path)
    write_rollouts(make_str_group_records(), path)  # overwrite in place
    assert read_rollouts(path) == make_str_group_records()
    assert sorted(p.name for p in path.parent.iterdir()) == ["u.jsonl"]


def test_failed_write_keeps_the_previous_file(tmp_path):
    path = tmp_path / "u.jsonl"
    write_rollouts(make_records(), path)
    bad = make_str_group_records() + [{"prompt_ids": [1], "response_ids": [2], "group": 0, "meta": float("nan")}]
    with pytest.raises(ValueError, match=r"record 3: cannot be written as JSON.*Fix: keep metadata to JSON values"):
        write_rollouts(bad, path)
    assert read_rollouts(path) == make_records()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["u.jsonl"]


def test_read_rollouts_remembers_lines_for_later_validation(tmp_path):
    path = tmp_path / "u.jsonl"
    write_lines(path, [good_line(), good_line(response_ids=[3, 40])])
    records = read_rollouts(path)
    assert isinstance(records, RolloutRecords) and isinstance(records, list)
    with pytest.raises(ValueError, match=r"u\.jsonl, line 2: field 'response_ids' holds token id 40.*vocab_size=32"):
        validate_rollouts(records, vocab_size=32)
    validate_rollouts(records, vocab_size=41)


# --------------------------------------------------------------------------- validation errors, one each


@pytest.mark.parametrize(
    "line, message",
    [
        (good_line(prompt_ids=None), r"missing required field\(s\) 'prompt_ids'.*Fix: every record needs"),
        ('{"prompt_ids": [1]}', r"missing required field\(s\) 'response_ids', 'group'.*Fix:"),
        (
            good_line(prompt_ids="1 2 3"),
            r"field 'prompt_ids' must be a list of token ids.*Fix: store the tokenized ids",
        ),
        (good_line(response_ids=[3, 4.0]), r"field 'response_ids' must hold integer token ids, found 4.0.*Fix:"),
        (good_line(response_ids=[3, True]), r"field 'response_ids' must hold integer token ids, found True.*Fix:"),
        (good_line(prompt_ids=[]), r"'prompt_ids' is empty.*Fix: every sequence needs at least one prompt token"),
        (good_line(response_ids=[3, -100]), r"negative token id -100.*Fix: remove padding markers"),
        (good_line(group=1.5), r"'group' must be an int or a str, got 1.5.*Fix:"),
        (good_line(group=[0]), r"'group' must be an int or a str.*Fix:"),
        (good_line(advantage="high"), r"'advantage' must be a number.*Fix:"),
        (
            '{"prompt_ids": [1], "response_ids": [2], "group": 0, "advantage": NaN}',
            r"'advantage' is nan \(not finite\).*Fix:",
        ),
        (
            '{"prompt_ids": [1], "response_ids": [2], "group": 0, "reward": -Infinity}',
            r"'reward' is -inf \(not finite\).*Fix:",
        ),
        (good_line(response=5), r"'response' must be text \(str\).*Fix:"),
        (
            good_line(old_logprobs=[-0.5]),
            r"'old_logprobs' has 1 entries but 'response_ids' has 2 tokens.*Fix: store exactly one",
        ),
        (good_line(old_logprobs="x"), r"'old_logprobs' must be a list of numbers.*Fix:"),
        (
            '{"prompt_ids": [1], "response_ids": [2], "group": 0, "old_logprobs": [NaN]}',
            r"'old_logprobs' holds a non-finite value \(nan\).*Fix:",
        ),
        (good_line(old_logprobs=[0.5, 1.2]), r"holds 1.2 > 0.*Fix: store log p.*negate them"),
        (  # the log-probs of truncated sampling: one per response token too
            good_line(sampling_logprobs=[-0.5, -0.1, -0.2]),
            r"'sampling_logprobs' has 3 entries but 'response_ids' has 2 tokens.*Fix: store exactly one",
        ),
        ("[1, 2, 3]", r"must be a JSON object \(dict\), got list.*Fix:"),
    ],
)
def test_each_invalid_record_is_reported_with_file_line_and_fix(tmp_path, line, message):
    path = tmp_path / "bad.jsonl"
    write_lines(path, [good_line(), line, good_line()])
    with pytest.raises(ValueError, match=r"bad\.jsonl, line 2: .*" + message):
        read_rollouts(path)


def test_empty_response_is_an_error_unless_allowed(tmp_path):
    path = tmp_path / "u.jsonl"
    write_lines(path, [good_line(), good_line(response_ids=[])])
    with pytest.raises(ValueError, match=r"u\.jsonl, line 2: 'response_ids' is empty.*allow_empty_responses=True"):
        read_rollouts(path)
    assert read_rollouts(path, allow_empty_responses=True)[1]["response_ids"] == []


def test_ids_outside_the_vocabulary_are_an_error_naming_the_vocab_size(tmp_path):
    path = tmp_path / "u.jsonl"
    write_lines(path, [good_line(), good_line(prompt_ids=[1, 16])])
    read_rollouts(path)  # no vocabulary given: not checked
    outside = r"u\.jsonl, line 2: field 'prompt_ids' holds token id 16.*vocab_size=16.*re-tokenize"
    with pytest.raises(ValueError, match=outside):
        read_rollouts(path, vocab_size=16)
    assert len(read_rollouts(path, vocab_size=17)) == 2


def test_old_logprobs_given_for_some_records_only_is_an_error(tmp_path):
    path = tmp_path / "u.jsonl"
    write_lines(path, [good_line(old_logprobs=[-1.0, -2.0]), good_line()])
    some_only = (
        r"u\.jsonl, line 2: this record has no 'old_logprobs'.*Fix: store old_logprobs for every record or for none"
    )
    with pytest.raises(ValueError, match=some_only):
        read_rollouts(path)


def test_parquet_errors_name_the_row(tmp_path):
    records = [{"prompt_ids": [1], "response_ids": [2], "group": 0, "reward": 1.0} for _ in range(3)]
    path = write_rollouts(records, tmp_path / "u.parquet")
    with pytest.raises(ValueError, match=r"u\.parquet, row 0: field 'response_ids' holds token id 2.*vocab_size=2"):
        validate_rollouts(read_rollouts(path), vocab_size=2)


def test_writing_invalid_records_fails_before_touching_the_disk(tmp_path):
    records = [
        {"prompt_ids": [1], "response_ids": [2], "group": 0},
        {"prompt_ids": [1], "response_ids": [], "group": 0},
    ]
    with pytest.raises(ValueError, match=r"u\.jsonl \(records to write\), record 1: 'response_ids' is empty"):
        write_rollouts(records, tmp_path / "u.jsonl")
    assert list(tmp_path.iterdir()) == []


# --------------------------------------------------------------------------- broken files


@pytest.mark.parametrize("trailing_newline", [False, True])
def test_truncated_last_line_says_the_file_looks_truncated_and_how_to_fix_it(tmp_path, trailing_newline):
    path = tmp_path / "u.jsonl"
    full = good_line(prompt=" a long prompt")
    write_lines(path, [good_line(), good_line(), full[: len(full) // 2]], trailing_newline=trailing_newline)
    truncated = r"u\.jsonl, line 3: the last line is not valid JSON.*looks truncated.*Fix: delete the last line"
    with pytest.raises(ValueError, match=truncated):
        read_rollouts(path)


def test_invalid_json_in_the_middle_is_not_called_truncated(tmp_path):
    path = tmp_path / "u.jsonl"
    write_lines(path, [good_line(), "{oops", good_line()])
    with pytest.raises(ValueError, match=r"u\.jsonl, line 2: not valid JSON.*Fix: repair or delete this line") as err:
        read_rollouts(path)
    assert "truncated" not in str(err.value)


@pytest.mark.parametrize("content", ["", "\n\n  \n"])
def test_empty_file_is_an_error(tmp_path, content):
    path = tmp_path / "u.jsonl"
    path.write_text(content)
    with pytest.raises(ValueError, match=r"u\.jsonl: the file holds no rollouts.*Fix:"):
        read_rollouts(path)


def test_empty_parquet_file_is_an_error(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = tmp_path / "u.parquet"
    pq.write_table(pa.table({"prompt_ids": pa.array([], pa.list_(pa.int64()))}), path)
    with pytest.raises(ValueError, match=r"u\.parquet: the file holds no rollouts"):
        read_rollouts(path)


def test_truncated_parquet_file_is_an_error_with_a_fix(tmp_path):
    path = write_rollouts(make_records(), tmp_path / "u.parquet")
    path.write_bytes(path.read_bytes()[:-20])
    with pytest.raises(ValueError, match=r"u\.parquet: could not be read as Parquet.*truncated.*Fix: rewrite it"):
        read_rollouts(path)


def test_json_array_file_is_told_to_use_json_lines(tmp_path):
    path = tmp_path / "u.json"
    path.write_text("[\n" + good_line() + ",\n" + good_line() + "\n]\n")
    array = r"u\.json, line 1: this looks like a JSON array.*Fix: write one JSON object per line"
    with pytest.raises(ValueError, match=array):
        read_rollouts(path)


def test_parquet_content_under_a_jsonl_name_is_told_to_rename(tmp_path):
    path = write_rollouts(make_records(), tmp_path / "u.parquet")
    wrong = tmp_path / "u.jsonl"
    wrong.write_bytes(path.read_bytes())
    with pytest.raises(ValueError, match=r"Parquet file with a JSON-lines suffix. Fix: rename it to \*\.parquet"):
        read_rollouts(wrong)


def test_a_utf8_byte_order_mark_is_skipped_silently(tmp_path, caplog):
    path = tmp_path / "u.jsonl"
    write_lines(path, [good_line(), good_line(group=1)])
    with_bom = tmp_path / "bom.jsonl"
    with_bom.write_bytes(b"\xef\xbb\xbf" + path.read_bytes())  # as Windows tools write UTF-8
    with caplog.at_level(logging.DEBUG, logger="probe"):
        assert read_rollouts(with_bom) == read_rollouts(path)
    assert [r.levelname for r in caplog.records] == ["DEBUG"]  # said at DEBUG only, not as a truncated file
    assert caplog.records[0].getMessage() == f"{with_bom}: skipping the UTF-8 byte-order mark at the start of the file"


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="named pipes are POSIX")
def test_a_fifo_or_a_device_is_refused_before_it_is_read(tmp_path):
    fifo = tmp_path / "u.jsonl"
    os.mkfifo(fifo)  # reading it would wait for a writer for ever
    with pytest.raises(
        ValueError,
        match=r"u\.jsonl: is a named pipe \(FIFO\), not a regular file; probe reads rollouts only from regular files "
        r"\(a pipe or a device would block or never end\)\. Fix: write the rollouts to a file",
    ):
        read_rollouts(fifo)
    zero = tmp_path / "zero.jsonl"
    zero.symlink_to("/dev/zero")  # reading it never ends: a MemoryError at best
    with pytest.raises(ValueError, match=r"zero\.jsonl: is a character device \(such as /dev/zero\), not a regular"):
        read_rollouts(zero)


def test_a_fifo_or_a_device_given_as_a_prompt_file_is_refused_before_it_is_read(tmp_path):
    from probe.prompts import PromptSource, load_prompts

    fifo = tmp_path / "prompts.jsonl"
    os.mkfifo(fifo)
    for path, kind in ((fifo, r"a named pipe \(FIFO\)"), ("/dev/zero", "a device"), (tmp_path, "a directory")):
        with pytest.raises(
            ValueError,
            match=rf"prompt file {path} is {kind}; prompts are read only from regular files.*Fix: give 'toy', or "
            "write the prompts to a JSONL file",
        ):
            load_prompts(PromptSource(prompts=str(path), n_prompts=1), tokenizer=None)
    with pytest.raises(FileNotFoundError, match=r"prompt file .*nowhere\.jsonl not found"):
        load_prompts(PromptSource(prompts=str(tmp_path / "nowhere.jsonl"), n_prompts=1), tokenizer=None)


def test_a_prompt_file_with_a_utf8_byte_order_mark_reads_its_first_prompt(tmp_path):
    from probe.prompts import PromptSource, load_prompts

    path = tmp_path / "prompts.jsonl"
    path.write_bytes(b"\xef\xbb\xbf" + b'{"prompt": "1 + 2 =", "answer": "3"}\n{"prompt": "2 + 2 ="}\n')
    seen = []

    def tokenizer(text, add_special_tokens):  # a plain-text tokenizer: one id per character
        seen.append(text)
        return {"input_ids": [ord(c) for c in text]}

    prompts, answers = load_prompts(PromptSource(prompts=str(path), n_prompts=2), tokenizer)
    assert seen == ["1 + 2 =", "2 + 2 ="] and answers[tuple(prompts[0])] == "3"


def test_missing_file_and_unknown_suffix(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"nope\.jsonl: rollout file not found"):
        read_rollouts(tmp_path / "nope.jsonl")
    with pytest.raises(ValueError, match=r"suffix '\.csv'.*Fix: name the file \*\.jsonl"):
        read_rollouts(tmp_path / "u.csv")
    with pytest.raises(ValueError, match=r"suffix '\.txt'"):
        write_rollouts(make_records(), tmp_path / "u.txt")


def test_validate_rollouts_on_plain_lists_names_the_record_index():
    records = [
        {"prompt_ids": [1], "response_ids": [2], "group": 0},
        {"prompt_ids": [1], "response_ids": [2], "group": None},
    ]
    with pytest.raises(ValueError, match=r"rollout records, record 1: missing required field\(s\) 'group'"):
        validate_rollouts(records)
    with pytest.raises(ValueError, match=r"rollout records: there are no rollouts"):
        validate_rollouts([])


# --------------------------------------------------------------------------- the model's context


def test_a_sequence_longer_than_the_models_context_is_refused_naming_line_length_and_limit(tmp_path):
    path = tmp_path / "u.jsonl"
    write_lines(
        path, [good_line(), good_line(prompt_ids=[1] * 6, response_ids=[3, 4, 5, EOS]), good_line(response_ids=[3] * 9)]
    )
    too_long = (
        r"u\.jsonl, line 2: the sequence is 10 tokens long \(6 prompt \+ 4 response tokens\), more than the model's "
        r"context of 8 positions \(config\.max_position_embeddings, times a RoPE scaling factor\); 2 of 3 records are "
        r"that long \(line 2, line 3\)"
        r".*Fix: truncate the prompt or the response so that each sequence fits 8 tokens \(as the trainer did\), drop "
        r"these records, or load a model with a longer context"
    )
    with pytest.raises(ValueError, match=too_long):
        read_rollouts(path, max_length=8)
    assert len(read_rollouts(path, max_length=11)) == 3  # 2 + 9 tokens fit 11 exactly
    assert len(read_rollouts(path)) == 3  # no context given: not checked


def test_padding_after_eos_does_not_count_against_the_context(tmp_path):
    path = tmp_path / "u.jsonl"
    write_lines(path, [good_line(response_ids=[3, EOS] + [PAD] * 6)])  # 2 + 8 tokens as written, 2 + 2 as scored
    assert read_rollouts(path, max_length=4, eos_token_ids=EOS, pad_token_id=PAD)[0]["response_ids"] == [3, EOS]
    with pytest.raises(ValueError, match=r"line 1: the sequence is 10 tokens long .* context of 4 positions"):
        read_rollouts(path, max_length=4)  # without the EOS id the padding is part of the response


def test_the_probe_reads_the_context_from_the_policys_config_also_through_peft():
    from peft import LoraConfig, get_peft_model

    from support import tiny_llama

    policy = tiny_llama(max_position_embeddings=48)
    peft = get_peft_model(policy, LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"]))
    # what datamodules/probe_data.py and callbacks/live.py pass as read_rollouts(max_length=...)
    assert getattr(getattr(peft, "config", None), "max_position_embeddings", None) == 48


# --------------------------------------------------------------------------- advantages


def reward_records() -> list[dict]:
    return [
        {"prompt_ids": [1], "response_ids": [2], "group": "a", "reward": 1.0},
        {"prompt_ids": [1], "response_ids": [3], "group": "a", "reward": 0.0},
        {"prompt_ids": [1], "response_ids": [4], "group": "a", "reward": 0.5},
        {"prompt_ids": [5], "response_ids": [6], "group": 1, "reward": 2.0},
        {"prompt_ids": [5], "response_ids": [7], "group": 1, "reward": 4.0},
    ]


def test_fill_advantages_uses_group_means_and_says_what_it_computed(caplog):
    pytest.importorskip("probe.sampling")
    records = reward_records()
    with caplog.at_level(logging.WARNING, logger="probe"):
        filled = fill_advantages(records, normalize_std=False)
    # truth by hand: reward minus its group's mean (group "a": mean 0.5; group 1: mean 3.0)
    assert [r["advantage"] for r in filled] == pytest.approx([0.5, -0.5, 0.0, -1.0, 1.0], abs=1e-12)
    assert "advantage" not in records[0]  # input untouched
    said = caplog.records[-1].getMessage()
    assert caplog.records[-1].levelname == "WARNING"
    assert "no record has an 'advantage': computed the 'advantage' of all 5 records from 'reward'" in said
    assert "over 2 groups: A = r - group mean (Dr. GRPO, normalize_std=false)" in said
    assert "Fix, if the trainer used other advantages" in said and "store them as 'advantage'" in said
    normalised = fill_advantages(records, normalize_std=True, eps=0.0)
    # truth: centred reward over the group's sample standard deviation (n-1, as verl and TRL)
    std_a, std_1 = statistics.stdev([1.0, 0.0, 0.5]), statistics.stdev([2.0, 4.0])
    expected = [0.5 / std_a, -0.5 / std_a, 0.0, -1.0 / std_1, 1.0 / std_1]
    assert [r["advantage"] for r in normalised] == pytest.approx(expected, abs=1e-12)
    assert "A = (r - group mean) / (group std + 0), unbiased (n-1) std" in caplog.records[-1].getMessage()


def test_advantages_given_for_some_records_only_are_refused_unless_all_are_overwritten(tmp_path):
    pytest.importorskip("probe.sampling")
    records = reward_records()
    records[3]["advantage"] = 9.0
    path = write_rollouts(records, tmp_path / "u.jsonl")
    two_scales = (
        r"u\.jsonl: 1 of 5 records carry an 'advantage', the other 4 do not \(line 1, line 2, line 3, line 5\); "
        r"computing the missing ones from 'reward' would mix two scales.*Fix: store the advantage for every record, "
        r"or leave it out of every record"
    )
    with pytest.raises(ValueError, match=two_scales):
        fill_advantages(read_rollouts(path))
    overwritten = fill_advantages(records, normalize_std=False, overwrite=True)
    assert [r["advantage"] for r in overwritten] == pytest.approx([0.5, -0.5, 0.0, -1.0, 1.0], abs=1e-12)


def test_fill_advantages_needs_a_reward_for_every_record(tmp_path):
    pytest.importorskip("probe.sampling")
    path = tmp_path / "u.jsonl"
    write_lines(path, [good_line(reward=1.0), good_line()])
    with pytest.raises(ValueError, match=r"u\.jsonl, line 2: no 'reward' to compute the advantage from.*Fix:"):
        fill_advantages(read_rollouts(path))


def signed_records(groups: list[list[tuple[float, float]]]) -> RolloutRecords:
    """Records of prompt groups given as [(reward, advantage), ...], one line each."""
    records = [
        {"prompt_ids": [1], "response_ids": [3 + k], "group": g, "reward": reward, "advantage": advantage}
        for g, group in enumerate(groups)
        for k, (reward, advantage) in enumerate(group)
    ]
    return RolloutRecords(records, source="u.jsonl", locations=[f"line {i + 1}" for i in range(len(records))])


def test_advantages_reversed_against_the_rewards_in_every_group_are_refused_as_a_sign_flip(caplog):
    flipped = signed_records([[(1.0, -0.7), (0.0, 0.7)], [(0.0, 1.2), (0.5, 0.0), (1.0, -1.2)], [(2.0, -1), (2.0, -1)]])
    refused = (
        r"u\.jsonl: advantages decrease where rewards increase in every group: in each of the 2 prompt groups whose "
        r"rewards differ, every response with a higher reward has a lower advantage \(group 0 \(line 1, line 2\); "
        r"group 1 \(line 3, line 4, line 5\)\)\. The advantages' sign is flipped\?.*Fix: store the advantages the "
        r"trainer's loss -A \* log p used .*negate them; or leave 'advantage' out of every record"
    )
    with pytest.raises(ValueError, match=refused):  # group 2 has equal rewards: it says nothing about the sign
        check_advantages(flipped)
    unflipped = signed_records([[(r, -a) for r, a in group] for group in [[(1.0, -0.7), (0.0, 0.7)]] * 2])
    with caplog.at_level(logging.WARNING, logger="probe"):
        check_advantages(unflipped)
    assert caplog.records == []


def test_advantages_reversed_in_some_groups_only_are_reported_naming_the_lines(caplog):
    # group 1: a length penalty larger than its reward difference; group 2: a KL term that reorders a tie of
    # advantages within one reward (not a reversal); group 3: ties of advantage across rewards (not a reversal)
    records = signed_records(
        [
            [(1.0, 0.7), (0.0, -0.7)],
            [(1.0, -0.1), (0.9, 0.1)],
            [(1.0, 0.6), (1.0, 0.8), (0.0, -1.4)],
            [(1.0, 0.0), (0.0, 0.0)],
        ]
    )
    with caplog.at_level(logging.WARNING, logger="probe"):
        check_advantages(records)
    assert [r.getMessage() for r in caplog.records] == [
        "u.jsonl: in 1 of 4 prompt groups whose rewards differ, the advantages order the responses opposite to their "
        "rewards (every response with a higher reward has a lower advantage): group 1 (line 3, line 4). Advantages "
        "with other terms (a KL or length penalty) can do that; a sign flip in the exporter would reverse every group. "
        "Fix: check the advantages of these lines against the trainer's; if they are its own, nothing is wrong"
    ]
    caplog.clear()
    one_group = signed_records([[(0.0, 0.5), (1.0, -0.5)]])  # reversed, but one group is too little to refuse
    with caplog.at_level(logging.WARNING, logger="probe"):
        check_advantages(one_group)
    assert "in 1 of 1 prompt groups whose rewards differ" in caplog.records[0].getMessage()
    caplog.clear()
    without_rewards = [{k: v for k, v in r.items() if k != "reward"} for r in signed_records([[(0, 1), (1, -1)]] * 3)]
    with caplog.at_level(logging.WARNING, logger="probe"):
        check_advantages(without_rewards)  # nothing to compare the advantages with
    assert caplog.records == []


# --------------------------------------------------------------------------- what follows a response's EOS


def test_padding_after_eos_is_stripped_with_its_logprobs_and_a_warning(tmp_path, caplog):
    path = tmp_path / "u.jsonl"
    lines = [
        good_line(response_ids=[3, EOS], old_logprobs=[-0.5, -0.1]),
        good_line(response_ids=[3, EOS, PAD, PAD], old_logprobs=[-0.5, -0.1, -9.0, -9.0]),
        good_line(response_ids=[4, EOS, EOS, PAD, EOS], old_logprobs=[-0.2, -0.3, -9.0, -9.0, -9.0]),
    ]
    write_lines(path, lines)
    with caplog.at_level(logging.WARNING, logger="probe"):
        records = read_rollouts(path, eos_token_ids=EOS, pad_token_id=PAD)
    assert [r["response_ids"] for r in records] == [[3, EOS], [3, EOS], [4, EOS]]
    assert [r["old_logprobs"] for r in records] == [[-0.5, -0.1], [-0.5, -0.1], [-0.2, -0.3]]  # one per kept token
    said = caplog.records[-1].getMessage()
    assert said.startswith(f"{path}: 2 of 3 responses go on after their first EOS with padding/EOS only (5 tokens, ids")
    assert "Fix: write each response cut after its first EOS, without padding" in said
    assert read_rollouts(path)[1]["response_ids"] == [3, EOS, PAD, PAD]  # no EOS given: read as written


def test_padding_with_the_eos_id_itself_is_stripped():
    records = [{"prompt_ids": [1], "response_ids": [3, EOS, EOS, EOS], "group": 0}]
    assert strip_after_eos(records, [EOS], pad_token_id=EOS)[0]["response_ids"] == [3, EOS]  # pad == EOS


def test_a_real_token_after_eos_is_refused_with_the_record_and_position(tmp_path):
    path = tmp_path / "u.jsonl"
    write_lines(path, [good_line(), good_line(response_ids=[3, EOS, PAD, 7, PAD])])
    goes_on = (
        r"u\.jsonl, line 2: 'response_ids' goes on after its first EOS \(id 2 at position 1, counted from 0\): "
        r"token 7 at position 3 is neither EOS nor padding \(pad id 0\).*Fix: cut each response after its first "
        r"EOS \(EOS included\)"
    )
    with pytest.raises(ValueError, match=goes_on):
        read_rollouts(path, eos_token_ids=[EOS], pad_token_id=PAD)


def test_eos_inside_a_response_is_handled_by_the_reader(tmp_path):
    # issue 13 section 5, item 2: padding after the first EOS is stripped and other tokens refused (tests above);
    # an EOS id given as several ids (tokenizer, config, generation_config) counts each of them
    records = [{"prompt_ids": [1], "response_ids": [3, 7, PAD, 7], "group": 0}]
    assert strip_after_eos(records, [EOS, 7], pad_token_id=PAD)[0]["response_ids"] == [3, 7]


# --------------------------------------------------------------------------- how an evaluation batch was sampled


def eval_records(**sampling) -> RolloutRecords:
    records = [{"prompt_ids": [1], "response_ids": [3, EOS], "group": k // 2, **sampling} for k in range(4)]
    return RolloutRecords(records, source="e.jsonl", locations=[f"line {k + 1}" for k in range(4)])


@pytest.mark.parametrize(
    "sampling",
    [
        {"temperature": 1.0, "top_p": 1.0, "top_k": 0},
        {"temperature": 1.0, "top_p": None, "top_k": None},  # as probe samples E
        {"temperature": 1, "top_k": -1},  # vLLM / verl: -1 is off
        {"temperature": 1.0},  # a Parquet file of probe's records: null top_p / top_k read back absent
    ],
)
def test_an_evaluation_batch_sampled_from_the_full_distribution_at_tau_is_accepted(sampling):
    check_eval_sampling(eval_records(**sampling), temperature=1.0)


def test_an_evaluation_batch_that_does_not_say_how_it_was_sampled_is_refused():
    unknown = (
        r"e\.jsonl: no record says how this evaluation batch was sampled \(none has 'temperature', 'top_p' or "
        r"'top_k'\)\. The SNIS estimate needs E sampled from the full distribution at the probe temperature "
        r"\(tau = 0\.7\); HF generate\(\) samples with top_k=50 unless told otherwise.*Fix: check how the responses "
        r'were sampled, then add "temperature": 0\.7, "top_p": 1\.0, "top_k": 0 \(or null\) to every record'
    )
    with pytest.raises(ValueError, match=unknown):
        check_eval_sampling(eval_records(), temperature=0.7)


def test_an_evaluation_batch_sampled_at_another_temperature_is_refused_naming_both_and_the_key():
    other = (
        r"e\.jsonl: the records say E was sampled at temperature 0\.5, but the probe measures the entropy at "
        r"tau = 1 \(data\.init_args\.evals\[0\]\.sampling\.temperature\).*Fix: to probe the entropy at tau = 0\.5, "
        r"set data\.init_args\.evals\[0\]\.sampling\.temperature to 0\.5; to probe it at tau = 1, sample E at "
        r"temperature 1"
    )
    records = eval_records(temperature=0.5, top_p=1.0, top_k=0)
    with pytest.raises(ValueError, match=other):
        check_eval_sampling(records, temperature=1.0, setting="data.init_args.evals[0].sampling.temperature")
    check_eval_sampling(records, temperature=0.5)


def test_records_of_one_evaluation_batch_sampled_differently_are_refused():
    mixed = eval_records(temperature=1.0)
    del mixed[1]["temperature"], mixed[3]["temperature"]
    partly = r"e\.jsonl: 2 of 4 records say nothing about how they were sampled \(line 2, line 4\).*Fix: give every"
    with pytest.raises(ValueError, match=partly):
        check_eval_sampling(mixed, temperature=1.0)
    differ = eval_records(temperature=1.0, top_p=1.0)
    differ[2]["top_p"], differ[2]["top_k"] = 0.95, None
    disagree = (  # the values as the file gives them, not as normalised ("off") for the comparison
        r"e\.jsonl: the records disagree on how E was sampled: line 1 has temperature=1\.0, top_p=1\.0, no top_k, "
        r"line 3 has temperature=1\.0, top_p=0\.95, top_k=null \(top_p 1\.0 and top_k 0 / -1 / null / absent mean "
        r"off\)\. One evaluation batch is a sample of one distribution\. Fix: split the file"
    )
    with pytest.raises(ValueError, match=disagree):
        check_eval_sampling(differ, temperature=1.0, allow_truncated_sampling=True)
    some_without_temperature = eval_records(temperature=0.7, top_p=1.0)
    some_without_temperature[1]["temperature"] = None
    del some_without_temperature[3]["temperature"]
    no_temperature = (
        r"e\.jsonl: 2 of 4 records give no 'temperature' \(absent or null: line 2, line 4\) while the others do\. "
        r"One evaluation batch is a sample of one distribution at one known temperature\. Fix: give every record "
        r"the temperature it was sampled at, or drop the records whose temperature is unknown"
    )
    with pytest.raises(ValueError, match=no_temperature):
        check_eval_sampling(some_without_temperature, temperature=0.7)


@pytest.mark.parametrize(
    "sampling, has",
    [
        ({"top_k": 0}, "no temperature, no top_p, top_k=0"),
        ({"temperature": None, "top_p": 1.0}, "temperature=null, top_p=1.0, no top_k"),
        ({"temperature": None, "top_p": None, "top_k": None}, "temperature=null, top_p=null, top_k=null"),
    ],
)
def test_an_evaluation_batch_that_does_not_give_its_temperature_is_refused(sampling, has):
    unknown = (
        r"e\.jsonl: no record gives the temperature this evaluation batch was sampled at \('temperature' is absent or "
        rf"null in every record; line 1 has {has}\)\. top_p/top_k alone do not say it, and the importance weights "
        r"compare E's sampling distribution with the policy at tau = 0\.7 "
        r"\(data\.init_args\.evals\[1\]\.sampling\.temperature\)\. Fix: add the temperature the responses were "
        r'sampled at to every record \(e\.g\. "temperature": 0\.7 if they were sampled at tau = 0\.7\); if it is '
        r"unknown, resample E at temperature 0\.7 without top_p/top_k"
    )
    with pytest.raises(ValueError, match=unknown):
        check_eval_sampling(
            eval_records(**sampling), temperature=0.7, setting="data.init_args.evals[1].sampling.temperature"
        )


def test_top_p_or_top_k_sampling_of_an_evaluation_batch_is_refused_unless_allowed():
    records = eval_records(temperature=1.0, top_k=50)  # HF generate()'s default
    truncated = (
        r"e\.jsonl: 4 evaluation sequences were sampled with top-p/top-k truncation; the entropy would be of another "
        r"distribution\. Fix: sample E without top_p/top_k, or set "
    )
    with pytest.raises(ValueError, match=truncated + r"allow_truncated_sampling=true knowingly$"):
        check_eval_sampling(records, temperature=1.0)
    # the key is named in full, next to the temperature setting of the same evaluation batch
    with pytest.raises(ValueError, match=truncated + r"data\.init_args\.evals\[2\]\.allow_truncated_sampling=true"):
        check_eval_sampling(records, temperature=1.0, setting="data.init_args.evals[2].sampling.temperature")
    # where no setting accepts truncated sampling (the live probe), the fix names none
    live = "the LiveEntropyProbe callback's init_args.eval.sampling.temperature"
    with pytest.raises(ValueError) as info:
        check_eval_sampling(records, temperature=1.0, setting=live, allow_setting=None)
    assert str(info.value).endswith(
        "Fix: resample E without top_p/top_k (no setting accepts truncated sampling here)"
    ) and "allow_truncated_sampling" not in str(info.value)
    check_eval_sampling(records, temperature=1.0, allow_truncated_sampling=True)


def test_an_evaluation_file_whose_responses_mostly_stop_without_eos_is_reported(tmp_path, caplog):
    path = tmp_path / "e.jsonl"
    sampling = {"temperature": 1.0, "top_p": 1.0, "top_k": 0}
    lines = [good_line(response_ids=[3, 4], **sampling), good_line(response_ids=[3, EOS, PAD], **sampling)]
    write_lines(path, lines + [good_line(response_ids=[5, 6, 7], **sampling)] * 2)
    records = read_rollouts(path, eos_token_ids=[EOS], pad_token_id=PAD)
    with caplog.at_level(logging.WARNING, logger="probe"):
        check_eval_sampling(records, temperature=1.0)
    assert [r.getMessage() for r in caplog.records if r.getMessage().startswith(str(path))][-1] == (
        f"{path}: only 1 of 4 responses of this evaluation batch end with an EOS id (2); the others stop without one "
        "(line 1, line 3, line 4): they were probably cut at max_new_tokens, or the file was written without their "
        "EOS. The probe measures the entropy of the policy's sequences, and the entropy of a cut response is not "
        "that. Fix: write each response with the EOS it ended with; if they were cut, sample E with a larger "
        "max_new_tokens so that most responses end"
    )
    caplog.clear()
    half = [good_line(response_ids=[3, 4], **sampling), good_line(response_ids=[3, EOS], **sampling)]
    write_lines(path, half * 2)  # half of them end: accepted silently
    with caplog.at_level(logging.WARNING, logger="probe"):
        check_eval_sampling(read_rollouts(path, eos_token_ids=EOS), temperature=1.0)
        check_eval_sampling(read_rollouts(path), temperature=1.0)  # EOS unknown: not checked
    assert caplog.records == []


@pytest.mark.parametrize(
    "sampling, message",
    [
        (
            {"temperature": 1.0, "top_k": 50},
            r"e\.jsonl: 4 evaluation sequences were sampled with top-p/top-k truncation; the entropy would be of "
            r"another distribution\. Fix: resample E without top_p/top_k \(no setting accepts truncated sampling "
            r"here\)$",
        ),
        (
            {"temperature": 0.5},
            r"the probe measures the entropy at tau = 1 \(the LiveEntropyProbe callback's init_args\.eval\.sampling\."
            r"temperature\).*Fix: to probe the entropy at tau = 0\.5, set the LiveEntropyProbe callback's "
            r"init_args\.eval\.sampling\.temperature to 0\.5",
        ),
    ],
)
def test_the_live_probe_names_its_own_settings_when_it_refuses_an_evaluation_file(tmp_path, sampling, message):
    from probe.live import LiveEvalSettings, LiveProbe, LiveProbeSettings

    from support import tiny_llama

    path = tmp_path / "e.jsonl"
    write_rollouts(list(eval_records(**sampling)), path)
    settings = LiveProbeSettings(eval=LiveEvalSettings(path=str(path), refresh=False))
    probe = LiveProbe(settings, settings_name="the LiveEntropyProbe callback's init_args.eval")
    probe._pad, probe._eos = PAD, [EOS]  # what setup reads from the tokenizer and the policy
    with pytest.raises(ValueError, match=message) as info:
        probe.hold_eval(tiny_llama())
    assert "allow_truncated_sampling" not in str(info.value)  # the callback has no such setting


def test_the_live_probe_refuses_an_evaluation_file_longer_than_the_policys_context(tmp_path):
    from probe.live import LiveEvalSettings, LiveProbe, LiveProbeSettings

    from support import tiny_llama

    path = tmp_path / "e.jsonl"
    records = list(eval_records(temperature=1.0))
    records[2] = dict(records[2], response_ids=[3] * 7 + [EOS])  # 1 prompt + 8 response tokens
    write_rollouts(records, path)
    probe = LiveProbe(LiveProbeSettings(eval=LiveEvalSettings(path=str(path), refresh=False)))
    probe._pad, probe._eos = PAD, [EOS]
    with pytest.raises(ValueError, match=r"e\.jsonl, line 3: the sequence is 9 tokens long .* context of 8 positions"):
        probe.hold_eval(tiny_llama(max_position_embeddings=8))


def test_sampling_fields_read_back_from_float32_or_pandas_columns_are_what_was_written():
    from datamodules.rollouts import check_eval_sampling

    record = {"prompt_ids": [1], "response_ids": [2], "group": 0}
    float32_temperature = float(np.float32(0.7))  # 0.699999988: a float32 Parquet column's 0.7
    pandas = [dict(record, temperature=float32_temperature, top_p=1.0, top_k=float("nan")) for _ in range(3)]
    check_eval_sampling(pandas, temperature=0.7)  # NaN is pandas' missing cell: off, and alike in every record


def test_advantages_given_in_every_record_are_kept_not_recomputed():
    from datamodules.rollouts import fill_advantages

    records = [{"group": 0, "reward": 1.0, "advantage": 5.0}, {"group": 0, "reward": 0.0, "advantage": -5.0}]
    assert [r["advantage"] for r in fill_advantages(records)] == [5.0, -5.0]
    assert [round(r["advantage"], 3) for r in fill_advantages(records, overwrite=True)] == [0.707, -0.707]
