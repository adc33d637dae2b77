"""What a researcher browsing probe's W&B run finds, read back from the files W&B writes offline (no mocks of wandb).

An offline predict run: the scalar metrics in the run's summary (not as one-point history), per evaluation batch a
Delta H table (one row per part x eta, summary.json's numbers) with a line chart over it, the update sequences with
their decoded text and attributions, and, where the run computed the per-token arrays, one row per response token
and an HTML view. A live fit: the probe's series against the trainer's step and, at the end, one table of the probed
steps with a chart. The table-building functions (probe/wandb_tables.py) are also tested on inputs made here.
"""

from __future__ import annotations

import json
import math
import struct
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from probe.results import BaseEntropy, EvalResult, PartResult, metrics, update_metrics
from probe.wandb_tables import (
    UpdateTokens,
    check_tokens_match,
    delta_h_series,
    delta_h_table,
    live_series,
    live_steps_table,
    token_table,
    top_sequences_html,
    update_sequence_table,
)

# ---- reading an offline W&B run ------------------------------------------------------------------------------


def offline_run(save_dir: Path) -> Path:
    (run,) = sorted((save_dir / "wandb").glob("offline-run-*"))
    return run


def event_log(run: Path, timeout_s: float = 30.0) -> list[Any]:
    """The records of the run's ``run-*.wandb`` event log, once W&B has written its last (``exit``) record: its core
    process writes the file on its own, and may still be at it when ``finish()`` has returned."""
    (path,) = run.glob("run-*.wandb")
    deadline = time.monotonic() + timeout_s
    while True:
        records = read_event_log(path.read_bytes())
        if records and records[-1].WhichOneof("record_type") == "exit":
            return records
        assert time.monotonic() < deadline, f"{path}: no exit record after {timeout_s} s ({len(records)} records)"
        time.sleep(0.1)


def read_event_log(data: bytes) -> list[Any]:
    """The whole records of a W&B event log. wandb 0.31 has no Python reader of it any more (its Go core writes it),
    so this reads its layout: a 7-byte header (``:W&B``, magic, version), then LevelDB log records (32 KiB blocks;
    each record a 7-byte header: CRC, length, type FULL/FIRST/MIDDLE/LAST), each a ``wandb_internal_pb2.Record``."""
    from wandb.proto import wandb_internal_pb2

    assert data[:4] == b":W&B", "not a W&B event log"
    records, chunks, pos, block = [], [], 7, 32768
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # a block's trailer, too short for a header: zero padding
            pos += block - pos % block
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        if kind == 0 or pos + 7 + length > len(data):  # zeros after the last record, or one still being written
            break
        chunk, pos = data[pos + 7 : pos + 7 + length], pos + 7 + length
        chunks = [chunk] if kind in (1, 2) else [*chunks, chunk]
        if kind in (1, 4):  # FULL, LAST
            record = wandb_internal_pb2.Record()
            record.ParseFromString(b"".join(chunks))
            records.append(record)
    return records


def _key(item: Any) -> str:
    return item.key or "/".join(item.nested_key)


def final_summary(records: list[Any]) -> dict[str, Any]:
    summary: dict[str, Any] = {}
    for r in records:
        if r.WhichOneof("record_type") == "summary":
            summary.update({_key(item): json.loads(item.value_json) for item in r.summary.update})
    return summary


def history(records: list[Any]) -> list[dict[str, Any]]:
    return [
        {_key(item): json.loads(item.value_json) for item in r.history.item}
        for r in records
        if r.WhichOneof("record_type") == "history"
    ]


def config_updates(records: list[Any]) -> dict[str, Any]:
    out = {}
    for r in records:
        if r.WhichOneof("record_type") == "config":
            out.update({_key(item): json.loads(item.value_json) for item in r.config.update})
    return out


def defined_metrics(records: list[Any]) -> dict[str, str]:
    """name (or glob) -> its step metric."""
    out = {}
    for r in records:
        if r.WhichOneof("record_type") == "metric":
            out[r.metric.name or r.metric.glob_name] = r.metric.step_metric
    return out


def read_table(run: Path, key: str) -> dict[str, Any]:
    """The one table logged under ``key`` (``files/media/table/<key>_<step>_<hash>.table.json``)."""
    folder, name = (run / "files" / "media" / "table" / key).parent, Path(key).name
    (path,) = [p for p in folder.glob(f"{name}_*.table.json") if p.name[len(name) + 1 :].split("_")[0].isdigit()]
    return json.loads(path.read_text())


def wandb_logger_arg(save_dir: Path) -> str:
    return f"{{class_path: lightning.pytorch.loggers.WandbLogger, init_args: {{save_dir: {save_dir}, offline: true}}}}"


# ---- an offline predict run ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def predict_run(tmp_path_factory, run_predict) -> tuple[Path, Path, dict]:
    """A small toy predict run (U = 12, E = 16, 3 etas) with an offline W&B logger: its run directory, its W&B run
    folder and its summary.json."""
    root = tmp_path_factory.mktemp("wandb_predict")
    with pytest.MonkeyPatch.context() as env:  # what the CLI sets, restored afterwards
        env.setenv("WANDB_MODE", "offline")
        env.setenv("WANDB_QUIET", "true")
        env.setenv("WANDB_SHOW_INFO", "false")
        env.delenv("PROBE_RUN_NAME", raising=False)
        summary = run_predict(root, "run", "--trainer.logger", wandb_logger_arg(root / "wb"), eval_prompts=4)
    return root / "run", offline_run(root / "wb"), summary


def test_each_evaluation_batch_gets_a_delta_h_table_and_a_chart_of_summary_json_numbers(predict_run):
    _, run, summary = predict_run
    etas, lr = summary["plan"]["etas"], summary["update"]["lr"]
    visualize = config_updates(event_log(run))
    for ev in summary["evals"]:
        table = read_table(run, f"tables/{ev['name']}/delta_h")
        quantities = ["delta_h", "se", "delta_h_per_token", "ess", "predicted_first", "predicted_second"]
        assert table["columns"] == ["eta", "eta/lr", "part", *quantities]
        expected = [
            [eta, eta / lr, part, *(res[key][j] for key in quantities)]
            for part, res in ev["parts"].items()
            for j, eta in enumerate(etas)
        ]
        assert len(table["data"]) == len(ev["parts"]) * len(etas) == 9
        assert table["data"] == expected  # exactly: JSON floats both ways
        chart = read_table(run, f"charts/{ev['name']}/delta_h_vs_eta_table")
        assert chart["columns"] == ["eta/lr", "delta_h", "series"]
        lines = {(s, x): y for x, y, s in chart["data"]}
        for part, res in ev["parts"].items():
            for j, eta in enumerate(etas):
                assert lines[(f"{part}: SNIS", eta / lr)] == res["delta_h"][j]
                assert lines[(f"{part}: first order", eta / lr)] == res["predicted_first"][j]
                assert lines[(f"{part}: second order", eta / lr)] == res["predicted_second"][j]
        spec = visualize[f"_wandb/visualize/charts/{ev['name']}/delta_h_vs_eta"]
        assert spec["panel_config"]["panelDefId"] == "wandb/line/v0"
        assert spec["panel_config"]["fieldSettings"] == {"x": "eta/lr", "y": "delta_h", "stroke": "series"}


def test_the_scalar_metrics_are_in_the_run_summary_not_one_point_history(predict_run):
    _, run, summary = predict_run
    records = event_log(run)
    expected = update_metrics(summary["update"])
    for ev in summary["evals"]:
        expected.update(metrics(EvalResult.from_dict(ev), summary["plan"]["etas"], summary["update"]["lr"]))
    assert "eval_00/full/delta_h@lr" in expected and "eval_00/grad/first_order" in expected
    assert "eval_00/covariance_law/batch_mean" in expected and "eval_00/reward/full/delta_r@lr" in expected
    logged = final_summary(records)
    assert {k: logged[k] for k in expected} == expected
    rows = history(records)
    assert len(rows) == 1, "one history step: the tables, charts, HTML and plots"
    assert not set(expected) & set(rows[0]), "no scalar as a one-point line panel"
    assert {"plots/delta_h/_type", "update_sequences/_type", "tables/eval_00/delta_h/_type"} <= set(rows[0])


def test_the_runs_settings_and_plan_are_the_wandb_config(predict_run):
    _, run, summary = predict_run
    config = config_updates(event_log(run))
    for section, settings in summary["config"].items():  # what summary.json records, so runs can be filtered by it
        assert config[section] == json.loads(json.dumps(settings)), section
    assert config["plan"]["etas"] == summary["plan"]["etas"] and config["plan"]["parts"] == summary["plan"]["parts"]


def test_the_update_sequences_table_has_decoded_text_and_attributions(predict_run, toy_world_dir):
    from transformers import AutoTokenizer

    run_dir, run, summary = predict_run
    table = read_table(run, "update_sequences")
    update = [json.loads(line) for line in (run_dir / "rollouts" / "update.jsonl").read_text().splitlines()]
    assert len(table["data"]) == len(update) == summary["update"]["n_sequences"] == 12
    rows = [dict(zip(table["columns"], row)) for row in table["data"]]
    assert [r["index"] for r in rows] == list(range(12))
    tokenizer = AutoTokenizer.from_pretrained(toy_world_dir)
    attributions = np.load(run_dir / "attributions.npy")
    for r, record in zip(rows, update):
        assert r["prompt"] == tokenizer.decode(record["prompt_ids"], skip_special_tokens=False)
        assert r["response"] == tokenizer.decode(record["response_ids"], skip_special_tokens=False)
        assert r["response"].strip() and "=" in r["prompt"], r  # the toy task's text: "<bos> 3 + 4 =" -> "7 <eos>"
        assert r["reward"] == record["reward"] and r["advantage"] == record["advantage"]
        assert r["attribution"] == attributions[r["index"]]
    if (run_dir / "reward_attributions.npy").is_file():
        reward_attributions = np.load(run_dir / "reward_attributions.npy")
        assert [r["reward_attribution"] for r in rows] == reward_attributions.tolist()
    else:
        assert "reward_attribution" not in table["columns"]
    if (run_dir / "update_tokens" / "offsets.npy").is_file():
        offsets, logprobs = (np.load(run_dir / "update_tokens" / f"{k}.npy") for k in ("offsets", "logprobs"))
        assert [r["logprob"] for r in rows] == [float(logprobs[offsets[i] : offsets[i + 1]].sum()) for i in range(12)]
    else:
        assert "logprob" not in table["columns"]


def test_the_update_tokens_table_holds_every_response_token_where_the_run_computed_them(predict_run, toy_world_dir):
    from transformers import AutoTokenizer

    run_dir, run, _ = predict_run
    folder = run_dir / "update_tokens"
    tables = run / "files" / "media" / "table"
    html = list((run / "files" / "media" / "html").rglob("update_top_sequences_*.html"))
    if not (folder / "offsets.npy").is_file():  # not computed: no table, no HTML
        assert not list(tables.glob("update_tokens_*.table.json")) and not html
        return
    arrays = {k: np.load(folder / f"{k}.npy") for k in ("offsets", "token_ids", "attributions", "logprobs")}
    table = read_table(run, "update_tokens")
    rows = [dict(zip(table["columns"], row)) for row in table["data"]]
    assert len(rows) == len(arrays["token_ids"]) == arrays["offsets"][-1]  # 12 short responses: every token
    flat = [int(arrays["offsets"][r["sequence"]]) + r["position"] for r in rows]
    assert flat == list(range(len(rows))), "in sequence and position order"
    assert [r["token_id"] for r in rows] == arrays["token_ids"].tolist()
    assert [r["attribution"] for r in rows] == arrays["attributions"].tolist()
    assert [r["logprob"] for r in rows] == arrays["logprobs"].tolist()
    a = np.load(run_dir / "attributions.npy")
    for i in range(12):
        shares = [r["share"] for r in rows if r["sequence"] == i]
        assert sum(shares) == pytest.approx(1.0, abs=1e-6), (i, shares)  # a_i = sum_t a_it (float32 policy)
        assert sum(r["attribution"] for r in rows if r["sequence"] == i) == pytest.approx(a[i], rel=1e-6, abs=1e-9)
    tokenizer = AutoTokenizer.from_pretrained(toy_world_dir)
    assert [r["token"] for r in rows] == [tokenizer.decode([t], skip_special_tokens=False) for t in arrays["token_ids"]]
    (page,) = html
    assert page.read_text().count("<span title='a_(i,t) = ") == len(rows)  # 12 sequences <= 20 shown, all tokens


# ---- the table-building functions on inputs made here ------------------------------------------------------


def part(delta_h: list[float], first: float | None = 2.0, second: float | None = 10.0) -> PartResult:
    etas = [0.1, 1.0]
    n = len(delta_h)
    return PartResult(
        delta_h=delta_h,
        se=[0.01] * n,
        delta_h_per_token=[d / 4 for d in delta_h],
        se_per_token=[0.0025] * n,
        ess=[30.0] * n,
        ess_fraction=[0.9] * n,
        clip_fraction=[0.0] * n,
        max_log_weight=[0.1] * n,
        finite=[True] * n,
        non_finite_sequences=[0] * n,
        first_order=first,
        predicted_first=None if first is None else [first * e for e in etas],
        second_order=second,
        predicted_second=None if second is None else [first * e + second * e * e / 2 for e in etas],
    )


def eval_result(arrays: dict[str, np.ndarray] | None = None, **parts: PartResult) -> EvalResult:
    return EvalResult(
        name="eval_00",
        n_sequences=32,
        n_tokens=100,
        temperature=1.0,
        on_policy=True,
        base_entropy=BaseEntropy(1.0, 0.1, 0.25, 0.02),
        parts=parts,
        arrays=arrays or {},
    )


def test_delta_h_table_rows_and_chart_series():
    result = eval_result(full=part([0.19, math.nan]), grad=part([0.1, 1.2], first=None, second=None))
    columns, rows = delta_h_table(result, [0.1, 1.0], lr=0.5)
    assert rows == [
        [0.1, 0.2, "full", 0.19, 0.01, 0.0475, 30.0, 0.2, 0.25],
        [1.0, 2.0, "full", None, 0.01, None, 30.0, 2.0, 7.0],  # not computable: null, as in summary.json
        [0.1, 0.2, "grad", 0.1, 0.01, 0.025, 30.0, None, None],
        [1.0, 2.0, "grad", 1.2, 0.01, 0.3, 30.0, None, None],
    ]
    series_columns, series = delta_h_series((columns, rows))
    assert series_columns == ["eta/lr", "delta_h", "series"]
    assert sorted(series) == sorted(
        [
            [0.2, 0.19, "full: SNIS"],
            [0.2, 0.1, "grad: SNIS"],
            [2.0, 1.2, "grad: SNIS"],
            [0.2, 0.2, "full: first order"],
            [2.0, 2.0, "full: first order"],
            [0.2, 0.25, "full: second order"],
            [2.0, 7.0, "full: second order"],
        ]
    )
    with pytest.raises(ValueError, match="eval_00/full holds 2 etas but the plan 3"):
        delta_h_table(result, [0.1, 1.0, 10.0], lr=0.5)
    with pytest.raises(ValueError, match="positive finite"):
        delta_h_table(result, [0.1, 1.0], lr=0.0)


def update_records() -> list[dict]:
    """Three update sequences of 2, 0 and 3 response tokens (ids as words of a fake tokenizer)."""
    return [
        {"index": 0, "group": 0, "prompt_ids": [1, 2], "response_ids": [5, 6], "reward": 1.0, "advantage": 0.5},
        {"index": 1, "group": 0, "prompt_ids": [1, 2], "response_ids": [], "reward": 0.0, "advantage": -0.5},
        {"index": 2, "group": 1, "prompt": "<given>", "prompt_ids": [3], "response_ids": [7, 8, 9], "advantage": 0.0},
    ]


def token_arrays(**extra: np.ndarray) -> dict[str, np.ndarray]:
    return {
        "update_tokens/offsets": np.array([0, 2, 2, 5]),
        "update_tokens/token_ids": np.array([5, 6, 7, 8, 9]),
        "update_tokens/attributions": np.array([0.3, 0.1, -1.0, 2.0, -2.0]),
        "update_tokens/logprobs": np.array([-0.5, -0.25, -1.0, -2.0, -3.0]),
        **extra,
    }


def decode(ids: list[int]) -> str:
    return " ".join(f"w{i}" for i in ids)


def decode_tokens(ids: list[int]) -> list[str]:
    return [f"<w{i}>" for i in ids]


def test_the_update_sequence_table_adds_reward_attribution_and_logprob_when_computed():
    records = update_records()
    a = np.array([0.4, 0.0, -1.0])
    columns, rows = update_sequence_table(records, {"attributions": a}, decode)
    assert columns == ["index", "group", "prompt", "response", "reward", "advantage", "attribution"]
    assert rows[0] == [0, "0", "w1 w2", "w5 w6", 1.0, 0.5, 0.4]
    assert rows[2] == [2, "1", "<given>", "w7 w8 w9", None, 0.0, -1.0]  # its own text wins; no reward: null
    tokens = UpdateTokens.from_arrays(token_arrays(), 3)
    arrays = {"attributions": a, "reward_attributions": np.array([0.1, 0.2, 0.3])}
    columns, rows = update_sequence_table(records, arrays, decode, tokens)
    assert columns[-2:] == ["reward_attribution", "logprob"]
    assert [r[-2:] for r in rows] == [[0.1, -0.75], [0.2, 0.0], [0.3, -6.0]]
    columns, rows = update_sequence_table(records, {}, decode)
    assert [r[-1] for r in rows] == [None, None, None]  # no attribution computed
    with pytest.raises(ValueError, match=r"reward_attributions has shape \(2,\), expected \[3\]"):
        update_sequence_table(records, {"reward_attributions": np.zeros(2)}, decode)


def test_a_table_over_the_row_limit_keeps_the_rows_of_largest_magnitude_in_their_order():
    from probe.wandb_tables import largest_first

    table = (["index", "attribution"], [[0, 0.5], [1, -3.0], [2, None], [3, 2.0], [4, -0.1]])
    assert largest_first(table, "attribution", 5) == table
    assert largest_first(table, "attribution", 2) == (["index", "attribution"], [[1, -3.0], [3, 2.0]])
    assert largest_first(table, "attribution", 4)[1] == [[0, 0.5], [1, -3.0], [3, 2.0], [4, -0.1]]  # null last
    with pytest.raises(ValueError, match="max_rows must be at least 1"):
        largest_first(table, "attribution", 0)


def test_the_token_table_has_one_row_per_token_with_its_share_of_the_sequence():
    records = update_records()
    tokens = UpdateTokens.from_arrays(token_arrays(), 3)
    a = np.array([0.4, 0.0, -1.0])
    columns, rows, shown = token_table(records, tokens, a, decode_tokens, max_rows=100)
    assert columns == ["sequence", "position", "token", "token_id", "attribution", "share", "logprob", "advantage"]
    assert rows == [
        [0, 0, "<w5>", 5, 0.3, pytest.approx(0.75), -0.5, 0.5],
        [0, 1, "<w6>", 6, 0.1, pytest.approx(0.25), -0.25, 0.5],
        [2, 0, "<w7>", 7, -1.0, 1.0, -1.0, 0.0],
        [2, 1, "<w8>", 8, 2.0, -2.0, -2.0, 0.0],
        [2, 2, "<w9>", 9, -2.0, 2.0, -3.0, 0.0],
    ]
    assert shown == [2, 0, 1]  # by |a_i|
    cov, reward = np.array([1.0, 2.0, 3.0, 4.0, 5.0]), np.array([0.5, 0.5, 0.1, 0.2, 0.3])
    tokens = UpdateTokens.from_arrays(
        token_arrays(**{"update_tokens/covariance": cov, "update_tokens/reward_attributions": reward}), 3
    )
    columns, rows, _ = token_table(records, tokens, None, decode_tokens, max_rows=100)
    assert columns[-2:] == ["covariance", "reward_attribution"]
    assert [r[-2:] for r in rows] == [[1.0, 0.5], [2.0, 0.5], [3.0, 0.1], [4.0, 0.2], [5.0, 0.3]]
    assert [r[5] for r in rows[:2]] == [pytest.approx(0.75), pytest.approx(0.25)]  # a_i: the token sum (0.4)
    # a budget of 4 rows: the sequence with the largest |a_i| whole (3 tokens), then the first token of the next
    _, rows, shown = token_table(records, tokens, a, decode_tokens, max_rows=4)
    assert shown == [2, 0] and [(r[0], r[1]) for r in rows] == [(0, 0), (2, 0), (2, 1), (2, 2)]


def test_bad_per_token_arrays_are_refused_with_what_is_wrong():
    assert UpdateTokens.from_arrays({"attributions": np.zeros(3)}, 3) is None  # not computed
    with pytest.raises(ValueError, match="lack update_tokens/logprobs"):
        UpdateTokens.from_arrays({k: v for k, v in token_arrays().items() if "logprobs" not in k}, 3)
    with pytest.raises(ValueError, match=r"offsets has shape \(4,\), expected \[5\]"):
        UpdateTokens.from_arrays(token_arrays(), 4)
    with pytest.raises(ValueError, match="offsets must hold integers, not float64"):
        UpdateTokens.from_arrays(token_arrays(**{"update_tokens/offsets": np.array([0.0, 2.0, 2.0, 5.0])}), 3)
    with pytest.raises(ValueError, match="must rise from 0 to the 5 tokens"):
        UpdateTokens.from_arrays(token_arrays(**{"update_tokens/offsets": np.array([0, 3, 2, 5])}), 3)
    with pytest.raises(ValueError, match=r"update_tokens/covariance has shape \(4,\), expected \[5\]"):
        UpdateTokens.from_arrays(token_arrays(**{"update_tokens/covariance": np.zeros(4)}), 3)
    tokens = UpdateTokens.from_arrays(token_arrays(), 3)
    check_tokens_match(update_records(), tokens)
    records = update_records()
    records[2]["response_ids"] = [7, 9, 8]
    with pytest.raises(ValueError, match="token_ids of sequence 2 .* are not its response_ids"):
        check_tokens_match(records, tokens)


def test_the_html_view_colours_the_tokens_of_the_top_sequences():
    records = update_records()
    records[0]["prompt"] = "<b>x</b>"
    arrays = token_arrays(**{"update_tokens/covariance": np.arange(5.0)})
    tokens = UpdateTokens.from_arrays(arrays, 3)
    page = top_sequences_html(records, tokens, np.array([0.4, 0.0, -1.0]), decode, decode_tokens, n_top=2)
    assert page.index("#2 (group 1)") < page.index("#0 (group 0)") and "#1 " not in page  # by |a_i|, 2 of 3
    assert "&lt;b&gt;x&lt;/b&gt;" in page and "<b>" not in page  # text is escaped
    assert page.count("<span title='a_(i,t) = ") == 5
    assert "background:rgba(214,39,40,1.000);white-space:pre-wrap'>&lt;w8&gt;" in page  # +2.0, the largest |a_it|
    assert "background:rgba(31,119,180,0.500);white-space:pre-wrap'>&lt;w7&gt;" in page  # -1.0: half the scale
    assert "title='a_(i,t) = 2, log p = -2, covariance = 3'" in page  # the hover text (flat token 3)
    short = top_sequences_html(records, tokens, None, decode, decode_tokens, n_top=1, max_tokens=2)
    assert short.count("<span title=") == 2 and "(1 more tokens)" in short


def live_record(step: int, **extra: Any) -> dict:
    """A live record as records.jsonl holds it (what the table reads), at lr = 1e-3 among etas 0.1, 1, 10 x lr."""
    lr = 1e-3
    full = {"delta_h": [0.001, -0.01, 0.2], "se": [0.1, 0.002, 0.3], "first_order": -8.0}
    full["predicted_second"] = [0.0, -0.009, 0.0]
    plan, update = {"etas": [1e-4, lr, 1e-2]}, {"lr": lr}
    return {"step": step, "plan": plan, "update": update, "eval": {"parts": {"full": full}}, **extra}


def test_the_live_table_has_one_row_per_probed_step():
    columns, rows = live_steps_table([live_record(0), {"step": 0, "verification": {}}, live_record(5)])
    assert columns == ["step", "lr", "delta_h", "se", "first_order_x_lr", "predicted_second"]
    assert rows == [[0, 1e-3, -0.01, 0.002, -8e-3, -0.009], [5, 1e-3, -0.01, 0.002, -8e-3, -0.009]]
    with_more = live_record(5, realised={"delta_h": -0.02, "se": 0.005})
    with_more["eval"]["covariance_law"] = {"batch_mean": 3.5}
    with_more["eval"]["reward"] = {"parts": {"full": {"delta_r": [0.1, 0.3, 0.9], "se": [0.01, 0.02, 0.05]}}}
    columns, rows = live_steps_table([live_record(0), with_more])
    assert columns[-5:] == ["covariance_batch_mean", "delta_r", "delta_r_se", "realised_delta_h", "realised_se"]
    j = with_more["plan"]["etas"].index(with_more["update"]["lr"])
    expected = [3.5, [0.1, 0.3, 0.9][j], [0.01, 0.02, 0.05][j], -0.02, 0.005]
    assert [r[-5:] for r in rows] == [[None] * 5, expected]
    series_columns, series = live_series((columns, rows))
    assert series_columns == ["step", "delta_h", "series"]
    assert [s for s in series if s[0] == 5] == [
        [5, -0.01, "predicted (SNIS at eta = lr)"],
        [5, -8e-3, "first order"],
        [5, -0.009, "second order"],
        [5, -0.02, "realised"],
    ]
    bad = live_record(1)
    bad["plan"]["etas"] = [1e-4, 1e-2]
    with pytest.raises(ValueError, match="the record of step 1 has no eta = lr"):
        live_steps_table([bad])


# ---- a live fit ---------------------------------------------------------------------------------------------


def test_a_live_fit_shows_the_probed_steps_against_the_trainers_step(tmp_path, toy_world_dir):
    import lightning.pytorch as pl
    from lightning.pytorch.loggers import WandbLogger

    from callbacks.live import LiveEntropyProbe, LiveEvalSettings
    from callbacks.wandb_report import report_offline_runs
    from datamodules.prompts import PromptDataModule
    from probe.grpo import AdamWSettings, FitRunSettings, GRPOModule
    from probe.prompts import PromptSource
    from probe.sampling import SamplingSettings

    run = FitRunSettings(root=str(tmp_path), name="live")
    module = GRPOModule(optimizer=AdamWSettings(lr=1e-3), run=run, checkpoint_every_n_steps=-1, save_policy=False)
    E = LiveEvalSettings(
        source=PromptSource(prompts="toy", n_prompts=8, offset=1000), sampling=SamplingSettings(2, max_new_tokens=4)
    )
    probe = LiveEntropyProbe(every_n_steps=1, eval=E, attribution=False, realised=False)
    with pytest.MonkeyPatch.context() as env:  # WandbLogger(offline=True) sets WANDB_MODE; restored afterwards
        env.setenv("WANDB_MODE", "offline")
        logger = WandbLogger(save_dir=str(tmp_path / "wb"), offline=True)
        quiet = dict(enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
        settings = dict(max_steps=2, gradient_clip_val=1.0, log_every_n_steps=1, callbacks=[probe], logger=logger)
        trainer = pl.Trainer(accelerator="cpu", devices=1, **settings, **quiet)
        trainer.fit(module, datamodule=PromptDataModule(prompts_per_step=2))
        report_offline_runs([logger])  # finishes the run, as the CLI does
    records = [json.loads(x) for x in (tmp_path / "live" / "live_probe" / "records.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [0, 1]
    wb = offline_run(tmp_path / "wb")
    table = read_table(wb, "live/probed_steps")
    columns = ["step", "lr", "delta_h", "se", "first_order_x_lr", "predicted_second", "covariance_batch_mean"]
    assert table["columns"] == columns  # the covariance law is on U, so it comes without the attribution too
    assert table["data"] == live_steps_table(records)[1]
    for row, r in zip(table["data"], records):
        full, j = r["eval"]["parts"]["full"], r["plan"]["etas"].index(r["update"]["lr"])
        assert row[:4] == [r["step"], r["update"]["lr"], full["delta_h"][j], full["se"][j]]
    chart = read_table(wb, "charts/live/delta_h_per_step_table")
    assert {s for _, _, s in chart["data"]} == {"predicted (SNIS at eta = lr)", "first order", "second order"}
    log = event_log(wb)
    assert config_updates(log)["_wandb/visualize/charts/live/delta_h_per_step"]["panel_config"]["fieldSettings"] == {
        "x": "step",
        "y": "delta_h",
        "stroke": "series",
    }
    steps = defined_metrics(log)
    assert all(steps[name] == "trainer/global_step" for name in ("eval_00/*", "update/*", "live/*")), steps
    probed = [row for row in history(log) if "eval_00/full/delta_h@lr" in row]
    assert [row["trainer/global_step"] for row in probed] == [0, 1]  # each probed step at its own trainer step,
    trained = [row for row in history(log) if "train/loss" in row]
    assert [row["trainer/global_step"] for row in trained] == [0, 1]  # where the module logs that batch's loss
