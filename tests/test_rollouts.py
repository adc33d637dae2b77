"""Rollout files (docs/DESIGN.md section 9): exact round trips, and an error naming file, line and fix for each bad
input."""

from __future__ import annotations

import json
import statistics

import pytest

from datamodules.rollouts import RolloutRecords, fill_advantages, read_rollouts, validate_rollouts, write_rollouts


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


# --------------------------------------------------------------------------- advantages


def test_fill_advantages_uses_group_means_and_keeps_given_advantages():
    sampling = pytest.importorskip("probe.sampling")
    assert hasattr(sampling, "group_advantages")
    records = [
        {"prompt_ids": [1], "response_ids": [2], "group": "a", "reward": 1.0},
        {"prompt_ids": [1], "response_ids": [3], "group": "a", "reward": 0.0},
        {"prompt_ids": [1], "response_ids": [4], "group": "a", "reward": 0.5},
        {"prompt_ids": [5], "response_ids": [6], "group": 1, "reward": 2.0, "advantage": 9.0},
        {"prompt_ids": [5], "response_ids": [7], "group": 1, "reward": 4.0},
    ]
    filled = fill_advantages(records, normalize_std=False)
    # truth by hand: reward minus its group's mean (group "a": mean 0.5; group 1: mean 3.0)
    assert [r["advantage"] for r in filled] == pytest.approx([0.5, -0.5, 0.0, 9.0, 1.0], abs=1e-12)
    assert "advantage" not in records[0]  # input untouched
    overwritten = fill_advantages(records, normalize_std=False, overwrite=True)
    assert overwritten[3]["advantage"] == pytest.approx(-1.0, abs=1e-12)
    normalised = fill_advantages(records, normalize_std=True, eps=0.0, overwrite=True)
    # truth: centred reward over the group's sample standard deviation (n-1, as verl and TRL)
    std_a, std_1 = statistics.stdev([1.0, 0.0, 0.5]), statistics.stdev([2.0, 4.0])
    expected = [0.5 / std_a, -0.5 / std_a, 0.0, -1.0 / std_1, 1.0 / std_1]
    assert [r["advantage"] for r in normalised] == pytest.approx(expected, abs=1e-12)


def test_fill_advantages_needs_a_reward_for_every_record(tmp_path):
    pytest.importorskip("probe.sampling")
    path = tmp_path / "u.jsonl"
    write_lines(path, [good_line(reward=1.0), good_line()])
    with pytest.raises(ValueError, match=r"u\.jsonl, line 2: no 'reward' to compute the advantage from.*Fix:"):
        fill_advantages(read_rollouts(path))
