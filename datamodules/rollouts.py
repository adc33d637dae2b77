"""Rollout files: read, validate and write the sequences of U and E (docs/DESIGN.md section 9).

A rollout file holds one sequence per record, as JSON lines (``.jsonl``, ``.json``,
``.ndjson``: one JSON object a line) or Parquet (``.parquet``, ``.pq``). Fields:

* ``prompt_ids`` (list[int], at least one token) and ``response_ids`` (list[int]),
* ``group`` (int or str): the prompt this response answers; responses to one prompt share it,
* optional ``advantage`` and ``reward`` (finite numbers), ``old_logprobs`` (list[float],
  one log-probability per response token), ``prompt`` and ``response`` (text),
* any other field, kept untouched as metadata (e.g. ``answer`` for the GSM8K reward).

Every error names the file, the line (JSONL, counted from 1 as editors do) or row
(Parquet, counted from 0 as pyarrow does), the problem and the fix. Writing is atomic
(temporary file, then ``os.replace``): a file that exists is a complete file.
"""

from __future__ import annotations

import json
import math
import numbers
import os
import tempfile
from pathlib import Path
from typing import Any, Iterable, Sequence

JSONL_SUFFIXES = (".jsonl", ".json", ".ndjson")
PARQUET_SUFFIXES = (".parquet", ".pq")
REQUIRED_FIELDS = ("prompt_ids", "response_ids", "group")
# A log-probability is <= 0; allow this much rounding above 0 before calling it a sign error.
LOGPROB_POSITIVE_TOLERANCE = 1e-3

__all__ = [
    "JSONL_SUFFIXES",
    "PARQUET_SUFFIXES",
    "REQUIRED_FIELDS",
    "RolloutRecords",
    "read_rollouts",
    "validate_rollouts",
    "write_rollouts",
    "fill_advantages",
]


class RolloutRecords(list):
    """A list of rollout records that remembers where each one came from.

    It is a plain ``list`` of dicts (compares equal to one); ``source`` is the file and
    ``locations[i]`` is "line 7" / "row 3", so that :func:`validate_rollouts` called later
    (e.g. with the model's ``vocab_size``) still points at the right line of the file.
    """

    def __init__(self, records: Iterable[dict] = (), source: str | None = None, locations: Sequence[str] | None = None):
        super().__init__(records)
        self.source = source
        self.locations = list(locations) if locations is not None else None


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
    if record.get("old_logprobs") is not None:
        old_logprobs = _as_list(record["old_logprobs"])
        if old_logprobs is None or not (
            set(map(type, old_logprobs)) <= {float, int} or all(_is_real(v) for v in old_logprobs)
        ):
            raise ValueError(
                f"{where}: 'old_logprobs' must be a list of numbers (one log-prob per response token). "
                "Fix: store a flat list of floats, or leave the field out"
            )
        if len(old_logprobs) != len(response_ids):
            raise ValueError(
                f"{where}: 'old_logprobs' has {len(old_logprobs)} entries but 'response_ids' has {len(response_ids)} "
                "tokens. Fix: store exactly one log-prob per response token (no entries for prompt tokens or padding)"
            )
        # a finite sum means every term is finite (nan / inf propagate); only then skip the scan
        finite_sum = math.isfinite(sum(old_logprobs))
        bad = None if finite_sum else next((v for v in old_logprobs if not math.isfinite(v)), None)
        if bad is not None:
            raise ValueError(
                f"{where}: 'old_logprobs' holds a non-finite value ({bad}). Fix: recompute the log-probs of "
                "the sampling policy for this response, or drop the record"
            )
        if old_logprobs and max(old_logprobs) > LOGPROB_POSITIVE_TOLERANCE:
            raise ValueError(
                f"{where}: 'old_logprobs' holds {max(old_logprobs)} > 0, which no log-probability can be. "
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
    try:
        text = raw.decode("utf-8")
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


def read_rollouts(
    path: str | os.PathLike, *, vocab_size: int | None = None, allow_empty_responses: bool = False
) -> RolloutRecords:
    """Read and validate a rollout file (JSON lines or Parquet, chosen by the suffix).

    Args:
        path: ``*.jsonl`` / ``*.json`` / ``*.ndjson`` (one JSON object a line, blank lines skipped)
            or ``*.parquet`` / ``*.pq``.
        vocab_size: when given, token ids must lie in ``[0, vocab_size)``.
        allow_empty_responses: accept records with an empty ``response_ids``.

    Returns:
        The records, in file order, as dicts with every field of the file (extra fields kept).
    """
    path = Path(path)
    kind = _format_of(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: rollout file not found. Fix: check the path (cwd is {os.getcwd()})")
    if path.is_dir():
        raise ValueError(f"{path}: is a directory, not a rollout file. Fix: point to the *.jsonl or *.parquet file")
    records = _read_jsonl(path) if kind == "jsonl" else _read_parquet(path)
    if len(records) == 0:
        raise ValueError(
            f"{path}: the file holds no rollouts (it is empty). "
            "Fix: check that the writer finished and that this is the right path"
        )
    validate_rollouts(records, vocab_size=vocab_size, allow_empty_responses=allow_empty_responses)
    return records


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


def fill_advantages(
    records: Sequence[dict], *, normalize_std: bool = True, eps: float = 1e-6, overwrite: bool = False
) -> RolloutRecords:
    """Records with group-relative advantages computed from their rewards (GRPO).

    Uses :func:`probe.sampling.group_advantages` over all records (groups by ``group``).
    Records that already carry an ``advantage`` keep it unless ``overwrite``.

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
    advantages = group_advantages(
        [float(record["reward"]) for record in records],
        [record["group"] for record in records],
        normalize_std=normalize_std,
        eps=eps,
    )
    advantages = advantages.tolist() if hasattr(advantages, "tolist") else list(advantages)
    out = []
    for record, advantage in zip(records, advantages):
        record = dict(record)
        if overwrite or record.get("advantage") is None:
            record["advantage"] = float(advantage)
        out.append(record)
    return RolloutRecords(out, source=getattr(records, "source", None), locations=getattr(records, "locations", None))
