"""Rollout files: read, validate and write the sequences of U and E (docs/DESIGN.md section 9).

A rollout file holds one sequence per record, as JSON lines (``.jsonl``, ``.json``,
``.ndjson``: one JSON object a line) or Parquet (``.parquet``, ``.pq``). Fields:

* ``prompt_ids`` (list[int], at least one token) and ``response_ids`` (list[int]),
* ``group`` (int or str): the prompt this response answers; responses to one prompt share it,
* optional ``advantage`` and ``reward`` (finite numbers), ``old_logprobs`` (list[float],
  one log-probability per response token), ``prompt`` and ``response`` (text),
* sampling fields ``temperature``, ``top_p``, ``top_k`` (how the response was sampled; an
  evaluation batch E needs them, :func:`check_eval_sampling`),
* any other field, kept untouched as metadata (e.g. ``answer`` for the GSM8K reward).

A response ends at its first EOS (EOS included): given the EOS and pad ids, :func:`read_rollouts`
strips padding after it (with a warning) and refuses other tokens there; given the model's context
(``max_length``), it refuses longer sequences. Advantages are given for every record or for none (then
computed from ``reward``, :func:`fill_advantages`, and logged); advantages ordered against the rewards in
every prompt group (a sign flip) are refused (:func:`check_advantages`). Only regular files are read (a FIFO
or a device would hang or fill the memory); a UTF-8 byte-order mark is skipped.

Every error names the file, the line (JSONL, counted from 1 as editors do) or row
(Parquet, counted from 0 as pyarrow does), the problem and the fix. Writing is atomic
(temporary file, then ``os.replace``): a file that exists is a complete file.
"""

from __future__ import annotations

import codecs
import json
import logging
import math
import numbers
import os
import stat
import tempfile
from pathlib import Path
from typing import Any, Iterable, Sequence

JSONL_SUFFIXES = (".jsonl", ".json", ".ndjson")
PARQUET_SUFFIXES = (".parquet", ".pq")
REQUIRED_FIELDS = ("prompt_ids", "response_ids", "group")
# A log-probability is <= 0; allow this much rounding above 0 before calling it a sign error.
LOGPROB_POSITIVE_TOLERANCE = 1e-3
SAMPLING_FIELDS = ("temperature", "top_p", "top_k")
PER_TOKEN_FIELDS = ("old_logprobs", "sampling_logprobs")  # one value per response token
# an evaluation batch whose responses mostly stop without EOS (cut at max_new_tokens?) is reported below this
MIN_ENDED_FRACTION = 0.5

log = logging.getLogger("probe")

__all__ = [
    "JSONL_SUFFIXES",
    "PARQUET_SUFFIXES",
    "REQUIRED_FIELDS",
    "SAMPLING_FIELDS",
    "RolloutRecords",
    "check_advantage_signs",
    "check_advantages",
    "check_eval_sampling",
    "check_lengths",
    "check_regular_file",
    "read_rollouts",
    "strip_after_eos",
    "validate_rollouts",
    "warn_unended",
    "write_rollouts",
    "fill_advantages",
]


class RolloutRecords(list):
    """A list of rollout records that remembers where each one came from.

    It is a plain ``list`` of dicts (compares equal to one); ``source`` is the file and
    ``locations[i]`` is "line 7" / "row 3", so that :func:`validate_rollouts` called later
    (e.g. with the model's ``vocab_size``) still points at the right line of the file.
    ``eos_token_ids`` are the EOS ids the responses were cut at (:func:`strip_after_eos`), or None.
    """

    def __init__(
        self,
        records: Iterable[dict] = (),
        source: str | None = None,
        locations: Sequence[str] | None = None,
        eos_token_ids: Sequence[int] | None = None,
    ):
        super().__init__(records)
        self.source = source
        self.locations = list(locations) if locations is not None else None
        self.eos_token_ids = list(eos_token_ids) if eos_token_ids is not None else None


# --------------------------------------------------------------------------- format


def _format_of(path: Path) -> str:
    suffix = path.suffix.lower()
    if suffix in JSONL_SUFFIXES:
        return "jsonl"
    if suffix in PARQUET_SUFFIXES:
        return "parquet"
    raise ValueError(
        f"{path}: cannot tell the rollout file format from the suffix {suffix!r}. "
        f"Fix: name the file *.jsonl (one JSON object a line; also {', '.join(JSONL_SUFFIXES[1:])}) or *.parquet"
    )


def _where(records: Sequence[dict], i: int, source: str | None) -> str:
    """'file, line 7' for records read from a file, else 'records, record 3' (0-based list index)."""
    locations = getattr(records, "locations", None)
    source = source if source is not None else getattr(records, "source", None)
    if locations is not None and len(locations) == len(records):
        return f"{source}, {locations[i]}"
    return f"{source if source is not None else 'rollout records'}, record {i}"


def _name(records: Sequence[dict], source: str | None = None) -> str:
    """The file the records came from, else 'rollout records'."""
    source = source if source is not None else getattr(records, "source", None)
    return source if source is not None else "rollout records"


def _several(records: Sequence[dict], indices: Sequence[int], limit: int = 5) -> str:
    """'line 2, line 5 (and 3 more)' (or 'record 1, ...' for plain lists)."""
    locations = getattr(records, "locations", None)
    if locations is None or len(locations) != len(records):
        locations = [f"record {i}" for i in range(len(records))]
    shown = ", ".join(locations[i] for i in indices[:limit])
    return shown + (f" (and {len(indices) - limit} more)" if len(indices) > limit else "")


# --------------------------------------------------------------------------- validation


def _is_int(x: Any) -> bool:
    return isinstance(x, numbers.Integral) and not isinstance(x, bool)


def _is_real(x: Any) -> bool:
    return isinstance(x, numbers.Real) and not isinstance(x, bool)


def _as_list(value: Any) -> list | None:
    """A list from a list / tuple / numpy or torch array (``tolist``); None for anything else."""
    if isinstance(value, list):
        return value  # read-only use: no copy
    if isinstance(value, tuple):
        return list(value)
    if hasattr(value, "tolist") and not isinstance(value, (str, bytes)):
        out = value.tolist()
        return out if isinstance(out, list) else None
    return None


def _check_token_ids(record: dict, name: str, where: str, vocab_size: int | None) -> list:
    ids = _as_list(record[name])
    if ids is None:
        raise ValueError(
            f"{where}: field {name!r} must be a list of token ids (int), got {type(record[name]).__name__}. "
            f'Fix: store the tokenized ids, e.g. "{name}": [1, 2, 3]'
        )
    if not set(map(type, ids)) <= {int}:  # fast path for plain ints; else the exact check
        bad = [t for t in ids if not _is_int(t)][:1]
        if bad:
            bad = bad[0]
            raise ValueError(
                f"{where}: field {name!r} must hold integer token ids, found {bad!r} ({type(bad).__name__}). "
                "Fix: write token ids as integers, not floats or strings"
            )
    if ids:
        low, high = min(ids), max(ids)
        if low < 0:
            raise ValueError(
                f"{where}: field {name!r} holds a negative token id {low}. "
                "Fix: remove padding markers such as -100 (loss-ignore labels) and store only real token ids"
            )
        if vocab_size is not None and high >= vocab_size:
            raise ValueError(
                f"{where}: field {name!r} holds token id {high}, outside the model's vocabulary "
                f"(vocab_size={vocab_size}, ids 0..{vocab_size - 1}). Fix: the file was tokenized with another "
                "tokenizer; re-tokenize the text with the policy's tokenizer, or load the matching model"
            )
    return ids


def _check_record(record: Any, where: str, vocab_size: int | None, allow_empty_responses: bool) -> None:
    if not isinstance(record, dict):
        raise ValueError(
            f"{where}: a rollout record must be a JSON object (dict), got {type(record).__name__}. "
            'Fix: write one object a line, e.g. {"prompt_ids": [..], "response_ids": [..], "group": 0}'
        )
    missing = [name for name in REQUIRED_FIELDS if record.get(name) is None]
    if missing:
        raise ValueError(
            f"{where}: missing required field(s) {', '.join(repr(m) for m in missing)}. "
            "Fix: every record needs 'prompt_ids' (list[int]), 'response_ids' (list[int]) and 'group' "
            "(int or str, the prompt it answers: responses to the same prompt share it)"
        )
    prompt_ids = _check_token_ids(record, "prompt_ids", where, vocab_size)
    if len(prompt_ids) == 0:
        raise ValueError(
            f"{where}: 'prompt_ids' is empty. Fix: every sequence needs at least one prompt token "
            "(e.g. the BOS token or the chat template's first token)"
        )
    response_ids = _check_token_ids(record, "response_ids", where, vocab_size)
    if len(response_ids) == 0 and not allow_empty_responses:
        raise ValueError(
            f"{where}: 'response_ids' is empty (an empty response has no tokens to score). "
            "Fix: drop empty responses from the file, or pass allow_empty_responses=True to keep them"
        )
    group = record["group"]
    if not (_is_int(group) or isinstance(group, str)):
        raise ValueError(
            f"{where}: 'group' must be an int or a str, got {group!r} ({type(group).__name__}). "
            "Fix: use the prompt's index or a string id of the prompt"
        )
    for name in ("advantage", "reward"):
        value = record.get(name)
        if value is None:
            continue
        if not _is_real(value):
            raise ValueError(
                f"{where}: {name!r} must be a number, got {value!r} ({type(value).__name__}). "
                f"Fix: store {name} as a JSON number, or leave the field out"
            )
        if not math.isfinite(value):
            raise ValueError(
                f"{where}: {name!r} is {value} (not finite). Fix: find why the trainer produced it (e.g. a "
                f"zero-variance group divided by its std without eps) and store a finite {name}, or drop the record"
            )
    for name in ("prompt", "response"):
        value = record.get(name)
        if value is not None and not isinstance(value, str):
            raise ValueError(
                f"{where}: {name!r} must be text (str), got {type(value).__name__}. "
                f"Fix: store the decoded text, or leave {name!r} out"
            )
    for field in PER_TOKEN_FIELDS:  # old_logprobs, and sampling_logprobs of truncated sampling: one per token
        if record.get(field) is None:
            continue
        values = _as_list(record[field])
        if values is None or not (set(map(type, values)) <= {float, int} or all(_is_real(v) for v in values)):
            raise ValueError(
                f"{where}: {field!r} must be a list of numbers (one log-prob per response token). "
                "Fix: store a flat list of floats, or leave the field out"
            )
        if len(values) != len(response_ids):
            raise ValueError(
                f"{where}: {field!r} has {len(values)} entries but 'response_ids' has {len(response_ids)} tokens. "
                "Fix: store exactly one log-prob per response token (no entries for prompt tokens or padding)"
            )
        # a finite sum means every term is finite (nan / inf propagate); only then skip the scan
        bad = None if math.isfinite(sum(values)) else next((v for v in values if not math.isfinite(v)), None)
        if bad is not None:
            raise ValueError(
                f"{where}: {field!r} holds a non-finite value ({bad}). Fix: recompute the log-probs of "
                "the sampling policy for this response, or drop the record"
            )
        if values and max(values) > LOGPROB_POSITIVE_TOLERANCE:
            raise ValueError(
                f"{where}: {field!r} holds {max(values)} > 0, which no log-probability can be. "
                "Fix: store log p (<= 0); positive values look like negative log-likelihoods: negate them"
            )


def validate_rollouts(
    records: Sequence[dict],
    *,
    vocab_size: int | None = None,
    allow_empty_responses: bool = False,
    source: str | None = None,
) -> None:
    """Check rollout records against the file contract; raise ``ValueError`` on the first problem.

    Args:
        records: rollout records (as :func:`read_rollouts` returns; a plain list of dicts works too).
        vocab_size: when given, every token id must lie in ``[0, vocab_size)``.
        allow_empty_responses: accept records whose ``response_ids`` is empty.
        source: name used in messages; default: the file the records were read from.
    """
    if len(records) == 0:
        name = source if source is not None else getattr(records, "source", None) or "rollout records"
        raise ValueError(f"{name}: there are no rollouts. Fix: check that the writer finished and the path is right")
    for i, record in enumerate(records):
        _check_record(record, _where(records, i, source), vocab_size, allow_empty_responses)
    with_old = [record.get("old_logprobs") is not None for record in records]
    if any(with_old) and not all(with_old):
        i = with_old.index(False)
        raise ValueError(
            f"{_where(records, i, source)}: this record has no 'old_logprobs' while others have them. "
            "Fix: store old_logprobs for every record or for none"
        )


# --------------------------------------------------------------------------- reading


def _read_jsonl(path: Path) -> RolloutRecords:
    raw = path.read_bytes()
    if raw.startswith(b"PAR1"):
        raise ValueError(f"{path}: this is a Parquet file with a JSON-lines suffix. Fix: rename it to *.parquet")
    if raw.startswith(codecs.BOM_UTF8):  # written by some Windows tools; not part of the first record
        log.debug("%s: skipping the UTF-8 byte-order mark at the start of the file", path)
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        raise ValueError(f"{path}: not UTF-8 text ({err}). Fix: write the rollout file as UTF-8 JSON lines") from None
    lines = text.split("\n")
    filled = [n for n, line in enumerate(lines) if line.strip()]
    last = filled[-1] if filled else -1
    records, locations = [], []
    for n in filled:
        line = lines[n].strip()
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            if n == filled[0] and line.startswith("["):
                raise ValueError(
                    f"{path}, line {n + 1}: this looks like a JSON array, not JSON lines. "
                    "Fix: write one JSON object per line (JSONL), e.g. with write_rollouts()"
                ) from None
            if n == last:
                ending = "" if text.endswith("\n") else " and the file does not end with a newline"
                raise ValueError(
                    f"{path}, line {n + 1}: the last line is not valid JSON ({err.msg} at column {err.colno}){ending}; "
                    "the file looks truncated, e.g. by an interrupted writer. "
                    f"Fix: delete the last line (e.g. `sed -i '$d' {path}`) or rerun the writer"
                ) from None
            raise ValueError(
                f"{path}, line {n + 1}: not valid JSON ({err.msg} at column {err.colno}). "
                "Fix: repair or delete this line"
            ) from None
        records.append(record)
        locations.append(f"line {n + 1}")
    return RolloutRecords(records, source=str(path), locations=locations)


def _read_parquet(path: Path) -> RolloutRecords:
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path)
    except Exception as err:  # pyarrow raises ArrowInvalid / OSError for broken files
        raise ValueError(
            f"{path}: could not be read as Parquet ({err}). The file may be truncated by an interrupted writer "
            "or be in another format. Fix: rewrite it (write_rollouts writes atomically) or fix its suffix"
        ) from None
    # Parquet cannot tell an absent field from a null one: a null cell is dropped, as if absent.
    records = [{k: v for k, v in row.items() if v is not None} for row in table.to_pylist()]
    return RolloutRecords(records, source=str(path), locations=[f"row {i}" for i in range(len(records))])


def _file_kind(mode: int) -> str:
    """What a non-regular file is, in words (for messages)."""
    kinds = [
        (stat.S_ISFIFO, "a named pipe (FIFO)"),
        (stat.S_ISCHR, "a character device (such as /dev/zero)"),
        (stat.S_ISBLK, "a block device"),
        (stat.S_ISSOCK, "a socket"),
    ]
    return next((name for test, name in kinds if test(mode)), "not a regular file")


def check_regular_file(path: Path, what: str, fix: str) -> None:
    """Refuse a path that is not a regular file (after links) before it is read: reading a FIFO waits for a
    writer for ever, and a device such as /dev/zero never ends (a MemoryError at best)."""
    mode = path.stat().st_mode
    if not stat.S_ISREG(mode):
        raise ValueError(
            f"{path}: is {_file_kind(mode)}, not a regular file; probe reads {what} only from regular files (a pipe "
            f"or a device would block or never end). Fix: {fix}"
        )


def check_lengths(records: Sequence[dict], max_length: int, source: str | None = None) -> None:
    """Refuse sequences (prompt + response) longer than the model's context of ``max_length`` positions."""
    too_long = [
        i
        for i, r in enumerate(records)
        if len(_as_list(r["prompt_ids"])) + len(_as_list(r["response_ids"])) > max_length
    ]
    if not too_long:
        return
    i = too_long[0]
    n_prompt, n_response = len(_as_list(records[i]["prompt_ids"])), len(_as_list(records[i]["response_ids"]))
    more = (
        f"; {len(too_long)} of {len(records)} records are that long ({_several(records, too_long)})"
        if len(too_long) > 1
        else ""
    )
    raise ValueError(
        f"{_where(records, i, source)}: the sequence is {n_prompt + n_response} tokens long ({n_prompt} prompt + "
        f"{n_response} response tokens), more than the model's context of {max_length} positions "
        f"(config.max_position_embeddings, times a RoPE scaling factor){more}. The model cannot score tokens "
        "beyond it as it was trained to (a learned position table ends there; rotary positions extrapolate "
        "silently). Fix: truncate the prompt or "
        f"the response so that each sequence fits {max_length} tokens (as the trainer did), drop these records, or "
        "load a model with a longer context"
    )


def read_rollouts(
    path: str | os.PathLike,
    *,
    vocab_size: int | None = None,
    max_length: int | None = None,
    allow_empty_responses: bool = False,
    eos_token_ids: int | Sequence[int] | None = None,
    pad_token_id: int | None = None,
) -> RolloutRecords:
    """Read and validate a rollout file (JSON lines or Parquet, chosen by the suffix).

    Args:
        path: ``*.jsonl`` / ``*.json`` / ``*.ndjson`` (one JSON object a line, blank lines skipped, a UTF-8
            byte-order mark skipped) or ``*.parquet`` / ``*.pq``; a regular file (not a FIFO or a device).
        vocab_size: when given, token ids must lie in ``[0, vocab_size)``.
        max_length: the model's context (``config.max_position_embeddings``): when given, every sequence
            (prompt + response, after padding is stripped) must fit in it (:func:`check_lengths`).
        allow_empty_responses: accept records with an empty ``response_ids``.
        eos_token_ids: the tokenizer's EOS id(s): when given, responses that go on after their first EOS
            are stripped (padding / EOS only, with a warning) or refused (:func:`strip_after_eos`).
        pad_token_id: the pad id that may follow an EOS (with ``eos_token_ids``).

    Returns:
        The records, in file order, as dicts with every field of the file (extra fields kept).
    """
    path = Path(path)
    kind = _format_of(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: rollout file not found. Fix: check the path (cwd is {os.getcwd()})")
    if path.is_dir():
        raise ValueError(f"{path}: is a directory, not a rollout file. Fix: point to the *.jsonl or *.parquet file")
    check_regular_file(path, "rollouts", "write the rollouts to a file (e.g. with write_rollouts) and give its path")
    records = _read_jsonl(path) if kind == "jsonl" else _read_parquet(path)
    if len(records) == 0:
        raise ValueError(
            f"{path}: the file holds no rollouts (it is empty). "
            "Fix: check that the writer finished and that this is the right path"
        )
    validate_rollouts(records, vocab_size=vocab_size, allow_empty_responses=allow_empty_responses)
    if eos_token_ids is not None:
        records = strip_after_eos(records, eos_token_ids, pad_token_id)
    if max_length is not None:
        check_lengths(records, int(max_length))
    return records


# --------------------------------------------------------------------------- what follows EOS


def _first_eos(ids: list, eos: set[int]) -> int | None:
    """Position of the first EOS in ``ids`` (list.index runs in C: files hold millions of tokens)."""
    found = [ids.index(e) for e in eos if e in ids]
    return min(found) if found else None


def strip_after_eos(
    records: Sequence[dict], eos_token_ids: int | Sequence[int], pad_token_id: int | None = None
) -> RolloutRecords:
    """Responses cut after their first EOS: trailing padding is stripped, anything else refused.

    A response whose tokens after the first EOS are all padding or EOS (``pad_token_id`` may equal the
    EOS id) loses them, with its per-token fields (``old_logprobs``, ``sampling_logprobs``), and a
    WARNING names the file, how many records and tokens were stripped and the fix. A response with
    another token after its first EOS is refused with a ``ValueError`` naming the record and position:
    probe scores every token of ``response_ids`` as one response of the policy.

    Returns:
        The records (new dicts where stripped), with the source and locations of ``records``.
    """
    eos = _eos_set(eos_token_ids)
    filler = eos | ({int(pad_token_id)} if pad_token_id is not None else set())
    out, n_records, n_tokens, seen = [], 0, 0, set()
    for i, record in enumerate(records):
        ids = _as_list(record["response_ids"])
        first = _first_eos(ids, eos)
        if first is None or first == len(ids) - 1:
            out.append(record)
            continue
        tail = ids[first + 1 :]
        if not set(tail) <= filler:
            k = next(k for k, t in enumerate(tail) if t not in filler)
            raise ValueError(
                f"{_where(records, i, None)}: 'response_ids' goes on after its first EOS (id {ids[first]} at position "
                f"{first}, counted from 0): token {tail[k]} at position {first + 1 + k} is neither EOS nor padding "
                f"(pad id {pad_token_id}). probe scores every token of response_ids as one response of the policy. "
                "Fix: cut each response after its first EOS (EOS included), as the policy generated it"
            )
        record = dict(record, response_ids=ids[: first + 1])
        for name in PER_TOKEN_FIELDS:
            values = _as_list(record.get(name)) if record.get(name) is not None else None
            if values is not None and len(values) == len(ids):
                record[name] = values[: first + 1]
        out.append(record)
        n_records, n_tokens = n_records + 1, n_tokens + len(tail)
        seen.update(tail)
    if n_records:
        log.warning(
            "%s: %d of %d responses go on after their first EOS with padding/EOS only (%d tokens, ids %s); stripped "
            "them (with their old_logprobs, if any) so they are not scored as response tokens. Fix: write each "
            "response cut after its first EOS, without padding",
            _name(records),
            n_records,
            len(records),
            n_tokens,
            ", ".join(map(str, sorted(seen))),
        )
    return RolloutRecords(
        out,
        source=getattr(records, "source", None),
        locations=getattr(records, "locations", None),
        eos_token_ids=sorted(eos),
    )


# --------------------------------------------------------------------------- how E was sampled


def _top_p_off(value: Any) -> bool:
    return value is None or value == 1.0


def _top_k_off(value: Any) -> bool:
    return value is None or value in (0, -1)  # 0: HF and TRL; -1: vLLM and verl


def _sampling_of(record: dict) -> tuple:
    """``(temperature, top_p, top_k)`` with "off" values (top_p 1.0, top_k 0 / -1, absent, NaN: pandas' missing
    cell) as None, and the temperature rounded to 6 significant digits (a float32 column reads 0.7 back as
    0.699999988)."""
    top_p, top_k = (None if _is_nan(v) else v for v in (record.get("top_p"), record.get("top_k")))
    temperature = record.get("temperature")
    if _is_real(temperature):
        temperature = float(f"{float(temperature):.6g}")
    return (temperature, None if _top_p_off(top_p) else top_p, None if _top_k_off(top_k) else top_k)


def _is_nan(value: Any) -> bool:
    return isinstance(value, float) and math.isnan(value)


def _raw_value(value: Any) -> str:
    """A sampling field's value as the file gives it (null for None)."""
    if value is None:
        return "null"
    return repr(value) if isinstance(value, (str, bool)) else str(value)


def _describe(record: dict) -> str:
    """The record's sampling fields as written in it: ``temperature=1.0, top_p=1.0, no top_k``."""
    return ", ".join(
        f"{name}={_raw_value(record[name])}" if name in record else f"no {name}" for name in SAMPLING_FIELDS
    )


def check_eval_sampling(
    records: Sequence[dict],
    *,
    temperature: float,
    allow_truncated_sampling: bool = False,
    setting: str = "sampling.temperature of the evaluation batch",
    allow_setting: str | None = "allow_truncated_sampling",
    source: str | None = None,
    report_unended: bool = True,
) -> None:
    """Refuse an evaluation batch E that was not sampled from the full distribution at the probe's temperature.

    The SNIS estimate weighs E's responses by the policy at temperature tau against the distribution
    they were sampled from, so that must be the same. Every record must give the ``temperature`` it was
    sampled at (a number > 0, not null), all records alike, at ``temperature``, without top-p/top-k
    truncation (unless ``allow_truncated_sampling``). ``top_p`` and ``top_k`` may be absent (Parquet reads
    a null cell back as absent): absent, null, top_p 1.0 and top_k 0 / -1 mean off.

    Args:
        records: the records of E.
        temperature: tau, the temperature the probe measures the entropy at.
        allow_truncated_sampling: accept top-p/top-k truncated sampling knowingly.
        setting: how messages name the setting that holds tau (``data.init_args.evals[0].sampling.temperature``).
        allow_setting: how messages name the setting that accepts truncated sampling; by default the
            ``allow_truncated_sampling`` next to ``setting``'s ``sampling`` (``data.init_args.evals[0].sampling.
            temperature`` -> ``data.init_args.evals[0].allow_truncated_sampling``); None where there is no such
            setting: the fix then says to resample E without top_p/top_k.
        source: name used in messages; default: the file the records were read from.
        report_unended: False for a second look at the same batch (its copy), so that the report is made once.
    """
    name = _name(records, source)
    if allow_setting == "allow_truncated_sampling" and setting.endswith(".sampling.temperature"):
        allow_setting = setting.removesuffix("sampling.temperature") + allow_setting  # evals[k]: next to sampling
    with_fields = [i for i, r in enumerate(records) if any(k in r for k in SAMPLING_FIELDS)]
    if not with_fields:
        raise ValueError(
            f"{name}: no record says how this evaluation batch was sampled (none has 'temperature', 'top_p' or "
            f"'top_k'). The SNIS estimate needs E sampled from the full distribution at the probe temperature "
            f"(tau = {temperature:g}); HF generate() samples with top_k=50 unless told otherwise, which cuts the "
            "distribution. Fix: check how the responses were sampled, then add "
            f'"temperature": {temperature:g}, "top_p": 1.0, "top_k": 0 (or null) to every record; if they were '
            "sampled with top-k/top-p, resample E without it (e.g. generate(..., top_k=0, top_p=1.0))"
        )
    if len(with_fields) < len(records):
        without = sorted(set(range(len(records))) - set(with_fields))
        raise ValueError(
            f"{name}: {len(without)} of {len(records)} records say nothing about how they were sampled "
            f"({_several(records, without)}) while the others give 'temperature'/'top_p'/'top_k'. Fix: give every "
            "record the sampling fields it was sampled with, or drop the records whose sampling is unknown"
        )
    no_temperature = [i for i, r in enumerate(records) if r.get("temperature") is None]
    if len(no_temperature) == len(records):
        raise ValueError(
            f"{name}: no record gives the temperature this evaluation batch was sampled at ('temperature' is absent "
            f"or null in every record; {_several(records, [0])} has {_describe(records[0])}). top_p/top_k alone do "
            f"not say it, and the importance weights compare E's sampling distribution with the policy at "
            f"tau = {temperature:g} ({setting}). Fix: add the temperature the responses were sampled at to every "
            f'record (e.g. "temperature": {temperature:g} if they were sampled at tau = {temperature:g}); if it is '
            f"unknown, resample E at temperature {temperature:g} without top_p/top_k"
        )
    if no_temperature:
        raise ValueError(
            f"{name}: {len(no_temperature)} of {len(records)} records give no 'temperature' (absent or null: "
            f"{_several(records, no_temperature)}) while the others do. One evaluation batch is a sample of one "
            "distribution at one known temperature. Fix: give every record the temperature it was sampled at, or "
            "drop the records whose temperature is unknown"
        )
    for i, record in enumerate(records):
        value = record["temperature"]
        if not _is_real(value) or not value > 0:
            raise ValueError(
                f"{_where(records, i, source)}: 'temperature' must be a number > 0, got {value!r}. "
                "Fix: store the temperature the response was sampled at"
            )
    first = _sampling_of(records[0])
    other = next((i for i, r in enumerate(records) if _sampling_of(r) != first), None)
    if other is not None:
        raise ValueError(
            f"{name}: the records disagree on how E was sampled: {_several(records, [0])} has "
            f"{_describe(records[0])}, {_several(records, [other])} has {_describe(records[other])} (top_p 1.0 "
            "and top_k 0 / -1 / null / absent mean off). One evaluation batch is a sample of one distribution. "
            "Fix: split the file into one evaluation batch per sampling setting, or resample E with one setting"
        )
    truncated = [r for r in records if _sampling_of(r)[1:] != (None, None)]
    if truncated and not allow_truncated_sampling:
        fix = (
            f"sample E without top_p/top_k, or set {allow_setting}=true knowingly"
            if allow_setting is not None
            else "resample E without top_p/top_k (no setting accepts truncated sampling here)"
        )
        raise ValueError(
            f"{name}: {len(truncated)} evaluation sequences were sampled with top-p/top-k truncation; the entropy "
            f"would be of another distribution. Fix: {fix}"
        )
    sampled_at = first[0]
    if not math.isclose(float(sampled_at), float(temperature), rel_tol=1e-6):  # float32 files: ~6e-8 relative
        raise ValueError(
            f"{name}: the records say E was sampled at temperature {sampled_at:g}, but the probe measures the "
            f"entropy at tau = {temperature:g} ({setting}): the importance weights would compare two different "
            f"distributions. Fix: to probe the entropy at tau = {sampled_at:g}, set {setting} to {sampled_at:g}; "
            f"to probe it at tau = {temperature:g}, sample E at temperature {temperature:g}"
        )
    eos_token_ids = getattr(records, "eos_token_ids", None)  # those read_rollouts cut the responses at
    if eos_token_ids is not None and report_unended:
        warn_unended(records, eos_token_ids, source=source)


def _eos_set(eos_token_ids: int | Sequence[int]) -> set[int]:
    """An EOS id or a list of them, as a set of ints."""
    return {int(eos_token_ids)} if isinstance(eos_token_ids, numbers.Integral) else set(map(int, eos_token_ids))


def warn_unended(records: Sequence[dict], eos_token_ids: int | Sequence[int], source: str | None = None) -> None:
    """Report an evaluation batch of which fewer than half (``MIN_ENDED_FRACTION``) the responses end with EOS.

    Such responses were cut at ``max_new_tokens`` or written without their EOS: the probe then measures the
    entropy of cut responses, not of whole sequences of the policy. A WARNING names the file, the count, lines
    of responses that do not end and the fix (when EOS ids are known: :func:`check_eval_sampling`).
    """
    eos = _eos_set(eos_token_ids)
    unended = [i for i, r in enumerate(records) if not (ids := _as_list(r["response_ids"])) or ids[-1] not in eos]
    ended = len(records) - len(unended)
    if records and ended < MIN_ENDED_FRACTION * len(records):
        log.warning(
            "%s: only %d of %d responses of this evaluation batch end with an EOS id (%s); the others stop without "
            "one (%s): they were probably cut at max_new_tokens, or the file was written without their EOS. The "
            "probe measures the entropy of the policy's sequences, and the entropy of a cut response is not that. "
            "Fix: write each response with the EOS it ended with; if they were cut, sample E with a larger "
            "max_new_tokens so that most responses end",
            _name(records, source),
            ended,
            len(records),
            ", ".join(map(str, sorted(eos))),
            _several(records, unended),
        )


# --------------------------------------------------------------------------- writing


def _json_default(value: Any) -> Any:
    """numpy / torch scalars and arrays become Python numbers and lists."""
    if hasattr(value, "tolist"):
        return value.tolist()
    raise TypeError(f"cannot store a {type(value).__name__} in a rollout file")


def _parquet_table(records: Sequence[dict], path: Path):
    import pyarrow as pa

    names: dict[str, None] = {}
    for record in records:
        names.update(dict.fromkeys(record))
    columns = {}
    for name in names:
        values = [record.get(name) for record in records]
        present = [v for v in values if v is not None]
        if name in ("prompt_ids", "response_ids"):
            kind = pa.list_(pa.int64())
            values = [None if v is None else _as_list(v) for v in values]
        elif name == "old_logprobs":
            kind = pa.list_(pa.float64())
            values = [None if v is None else _as_list(v) for v in values]
        elif name in ("advantage", "reward"):
            kind = pa.int64() if all(_is_int(v) for v in present) else pa.float64()
        elif name == "group":
            if not (all(_is_int(v) for v in present) or all(isinstance(v, str) for v in present)):
                raise ValueError(
                    f"{path}: 'group' mixes int and str values, but a Parquet column has one type. "
                    "Fix: make every group a str (or every group an int), or write a *.jsonl file"
                )
            kind = None
        else:
            kind = None
        try:
            columns[name] = pa.array(values, type=kind)
        except (pa.ArrowInvalid, pa.ArrowTypeError, TypeError) as err:
            raise ValueError(
                f"{path}: field {name!r} cannot be stored as one Parquet column ({err}). "
                "Fix: give the field one type in every record, or write a *.jsonl file"
            ) from None
    return pa.table(columns)


def write_rollouts(records: Sequence[dict], path: str | os.PathLike, *, allow_empty_responses: bool = False) -> Path:
    """Validate and write rollout records atomically (JSON lines or Parquet, by the suffix).

    The file appears complete or not at all (temporary file in the same folder, then
    ``os.replace``), so a rerun can trust any file it finds. JSON lines round-trip exactly
    (ints stay ints, floats are written with ``repr`` precision). In Parquet a null cell reads
    back as an absent field, and a number column mixing ints and floats reads back as floats.

    Args:
        records: rollout records (dicts following the rollout-file contract; extra fields kept).
        path: destination, ``*.jsonl`` / ``*.json`` / ``*.ndjson`` or ``*.parquet`` / ``*.pq``;
            parent folders are created.
        allow_empty_responses: accept records with an empty ``response_ids``.

    Returns:
        The path written.
    """
    path = Path(path)
    kind = _format_of(path)
    validate_rollouts(records, allow_empty_responses=allow_empty_responses, source=f"{path} (records to write)")
    if kind == "jsonl":
        lines = []
        for i, record in enumerate(records):
            try:
                lines.append(json.dumps(record, ensure_ascii=False, allow_nan=False, default=_json_default))
            except (TypeError, ValueError) as err:
                raise ValueError(
                    f"{path} (records to write), record {i}: cannot be written as JSON ({err}). "
                    "Fix: keep metadata to JSON values (str, finite numbers, bool, None, lists, dicts)"
                ) from None
        payload = ("\n".join(lines) + "\n").encode("utf-8")
    else:
        table = _parquet_table(records, path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        if kind == "jsonl":
            with os.fdopen(fd, "wb") as f:
                f.write(payload)
                f.flush()
                os.fsync(f.fileno())
        else:
            import pyarrow.parquet as pq

            os.close(fd)
            pq.write_table(table, tmp_name)
        os.replace(tmp_name, path)
    except BaseException:
        if os.path.exists(tmp_name):
            os.unlink(tmp_name)
        raise
    return path


# --------------------------------------------------------------------------- advantages


def check_advantages(records: Sequence[dict], source: str | None = None) -> None:
    """Refuse records of which some carry an ``advantage`` and others do not (two scales in one batch), and
    advantages that order the responses against their rewards in every prompt group (:func:`check_advantage_signs`).
    """
    missing = [i for i, record in enumerate(records) if record.get("advantage") is None]
    if missing and len(missing) < len(records):
        raise ValueError(
            f"{_name(records, source)}: {len(records) - len(missing)} of {len(records)} records carry an "
            f"'advantage', the other {len(missing)} do not ({_several(records, missing)}); computing the missing "
            "ones from 'reward' would mix two scales in one update batch. Fix: store the advantage for every "
            "record, or leave it out of every record to have probe compute all of them from 'reward' (GRPO group "
            "normalisation)"
        )
    check_advantage_signs(records, source)


def _reversed_groups(records: Sequence[dict]) -> tuple[list[list[int]], list[list[int]]]:
    """The prompt groups whose records carry different rewards (each a list of record indices, with both a
    ``reward`` and an ``advantage``), and those of them whose advantages order the responses opposite to their
    rewards: every response with a higher reward has a strictly lower advantage than every one with a lower reward.
    """
    by_group: dict[Any, list[int]] = {}
    for i, record in enumerate(records):
        if record.get("reward") is not None and record.get("advantage") is not None:
            by_group.setdefault(record["group"], []).append(i)
    informative, reversed_ = [], []
    for indices in by_group.values():
        levels: dict[float, list[float]] = {}  # reward -> the advantages of the responses that got it
        for i in indices:
            levels.setdefault(float(records[i]["reward"]), []).append(float(records[i]["advantage"]))
        if len(levels) < 2:
            continue
        informative.append(indices)
        ordered = [levels[reward] for reward in sorted(levels)]  # by increasing reward
        # reversed over every pair of responses with different rewards iff it is between neighbouring reward levels
        if all(min(lower) > max(higher) for lower, higher in zip(ordered, ordered[1:])):
            reversed_.append(indices)
    return informative, reversed_


def _groups_text(records: Sequence[dict], groups: list[list[int]], limit: int = 3) -> str:
    """'group 0 (line 1, line 2), group 'q-7' (line 5, line 9) (and 4 more groups)'."""
    shown = "; ".join(f"group {records[g[0]]['group']!r} ({_several(records, g, 4)})" for g in groups[:limit])
    return shown + (f" (and {len(groups) - limit} more groups)" if len(groups) > limit else "")


def check_advantage_signs(records: Sequence[dict], source: str | None = None) -> None:
    """Refuse advantages whose sign looks flipped against the rewards in the same records; report some groups.

    Within each prompt group whose records carry both a ``reward`` and an ``advantage`` and differ in reward,
    the advantages should order the responses as the rewards do. Advantages may hold other terms (a KL or
    length penalty) that reverse a group now and then, so a WARNING names the groups that are reversed; when
    every one of at least two such groups is reversed (rank agreement -1 in each: the exporter stored -A), the
    records are refused with a ``ValueError``. One group alone is only reported: it is too little to tell.
    """
    informative, reversed_ = _reversed_groups(records)
    if not reversed_:
        return
    name = _name(records, source)
    if len(reversed_) == len(informative) >= 2:
        raise ValueError(
            f"{name}: advantages decrease where rewards increase in every group: in each of the {len(informative)} "
            "prompt groups whose rewards differ, every response with a higher reward has a lower advantage "
            f"({_groups_text(records, reversed_)}). The advantages' sign is flipped? (e.g. an exporter that stored "
            "-A); the reconstructed step would go against the trainer's. Fix: store the advantages the trainer's loss "
            "-A * log p used (A > 0 for a response better than its group), e.g. negate them; or leave 'advantage' out "
            "of every record to have probe compute them from 'reward'. If these are the trainer's own advantages "
            "(other terms outweigh the reward differences in every group), drop the 'reward' field"
        )
    log.warning(
        "%s: in %d of %d prompt groups whose rewards differ, the advantages order the responses opposite to their "
        "rewards (every response with a higher reward has a lower advantage): %s. Advantages with other terms (a KL "
        "or length penalty) can do that; a sign flip in the exporter would reverse every group. Fix: check the "
        "advantages of these lines against the trainer's; if they are its own, nothing is wrong",
        name,
        len(reversed_),
        len(informative),
        _groups_text(records, reversed_),
    )


def _normalisation(normalize_std: bool, eps: float) -> str:
    if normalize_std:
        return (
            f"A = (r - group mean) / (group std + {eps:g}), unbiased (n-1) std as verl and TRL, 0 for a group of "
            "one (normalize_std=true)"
        )
    return "A = r - group mean (Dr. GRPO, normalize_std=false)"


def fill_advantages(
    records: Sequence[dict], *, normalize_std: bool = True, eps: float = 1e-6, overwrite: bool = False
) -> RolloutRecords:
    """Records with group-relative advantages computed from their rewards (GRPO), logged as a WARNING.

    Uses :func:`probe.sampling.group_advantages` over all records (groups by ``group``). Either
    no record carries an ``advantage`` (all are computed), or ``overwrite`` replaces every one;
    records of which only some carry one are refused (:func:`check_advantages`).

    Args:
        records: rollout records; every record needs a finite ``reward``.
        normalize_std: also divide by the group's reward std (GRPO, the default, as in
            ``probe.sampling.group_advantages``); False only subtracts the group mean (Dr. GRPO).
        eps: added to the std before dividing.
        overwrite: replace advantages already in the records.

    Returns:
        New dicts (the input is not modified), in the same order.
    """
    from probe.sampling import group_advantages

    if not overwrite:
        check_advantages(records)
        if records and all(record.get("advantage") is not None for record in records):
            return RolloutRecords(  # every advantage given: kept as it is
                [dict(r) for r in records],
                source=getattr(records, "source", None),
                locations=getattr(records, "locations", None),
            )
    missing = [i for i, record in enumerate(records) if record.get("reward") is None]
    if missing:
        raise ValueError(
            f"{_where(records, missing[0], None)}: no 'reward' to compute the advantage from. "
            "Fix: store a reward for every record, or store the advantages themselves"
        )
    for i, record in enumerate(records):
        reward = record["reward"]
        if not _is_real(reward) or not math.isfinite(reward):
            raise ValueError(
                f"{_where(records, i, None)}: 'reward' must be a finite number, got {reward!r}. "
                "Fix: store a finite reward for every record"
            )
    groups = [record["group"] for record in records]
    advantages = group_advantages(
        [float(record["reward"]) for record in records], groups, normalize_std=normalize_std, eps=eps
    )
    advantages = advantages.tolist() if hasattr(advantages, "tolist") else list(advantages)
    had = sum(record.get("advantage") is not None for record in records)
    log.warning(
        "%s: %s the 'advantage' of all %d records from 'reward', by GRPO group normalisation over %d groups: %s. "
        "Fix, if the trainer used other advantages (another normalisation, a KL or length term, a batch-wide "
        "baseline): store them as 'advantage' in every record",
        _name(records),
        "replaced" if had else "no record has an 'advantage': computed",
        len(records),
        len(set(groups)),
        _normalisation(normalize_std, eps),
    )
    out = [dict(record, advantage=float(advantage)) for record, advantage in zip(records, advantages)]
    return RolloutRecords(out, source=getattr(records, "source", None), locations=getattr(records, "locations", None))
