"""The tables a W&B run of probe shows, as plain columns and rows (no wandb, no Lightning import here).

``callbacks/wandb_report.py`` (a predict run) and ``callbacks/live.py`` (a fit with the live probe) turn them into
``wandb.Table`` objects, charts and HTML; keeping them pure lets tests read them without a W&B run. A number that is
undefined or not computable is None (null in the table), as in ``summary.json``.

* :func:`delta_h_table`: Delta H against eta of one evaluation batch, one row per part x eta, and
  :func:`delta_h_series`, the same numbers in the long form a line chart reads (SNIS, first and second order per part).
* :func:`update_sequence_table`: the update sequences with their text, reward, advantage and attribution a_i, plus
  the reward attribution r_i and the sequence's log-probability when the run computed them.
* :func:`token_table` and :func:`top_sequences_html`: the per-token attribution a_{i,t} of the update sequences
  (``update_tokens/*`` arrays, :class:`UpdateTokens`).
* :func:`live_steps_table` and :func:`live_series`: one row per probed step of a live run (its ``records.jsonl``).
"""

from __future__ import annotations

import html
import math
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import numpy as np

from probe.results import EvalResult

Table = tuple[list[str], list[list[Any]]]


def number(x: Any) -> float | None:
    """``x`` as a float, None where it is missing or not finite."""
    if x is None:
        return None
    x = float(x)
    return x if math.isfinite(x) else None


def number_at(values: Sequence[Any] | None, j: int) -> float | None:
    """``values[j]`` as :func:`number` (None when the list itself was not computed)."""
    return None if values is None else number(values[j])


def _check_lr(lr: float) -> None:
    if not (isinstance(lr, (int, float)) and math.isfinite(lr) and lr > 0):
        raise ValueError(f"the update's lr must be a positive finite number to express eta as a multiple of it: {lr!r}")


# ---------------------------------------------------------------------------------------------
# Delta H against eta (one evaluation batch)

DELTA_H_COLUMNS = [
    "eta",
    "eta/lr",
    "part",
    "delta_h",
    "se",
    "delta_h_per_token",
    "ess",
    "predicted_first",
    "predicted_second",
]
# the table's columns a chart draws against eta/lr, and how the chart names each line (after the part's name)
SERIES = {"delta_h": "SNIS", "predicted_first": "first order", "predicted_second": "second order"}


def delta_h_table(result: EvalResult, etas: Sequence[float], lr: float) -> Table:
    """One row per part x eta of ``result.parts`` (parts in their order, etas ascending as the plan's): eta, eta/lr,
    part, the SNIS Delta H with its SE, per token, the ESS and the first- and second-order predictions."""
    _check_lr(lr)
    rows = []
    for part, res in result.parts.items():
        if len(res.delta_h) != len(etas):
            raise ValueError(
                f"{result.name}/{part} holds {len(res.delta_h)} etas but the plan {len(etas)}: the result is not "
                "this plan's"
            )
        for j, eta in enumerate(etas):
            values = (res.delta_h, res.se, res.delta_h_per_token, res.ess, res.predicted_first, res.predicted_second)
            rows.append([float(eta), float(eta) / lr, part, *(number_at(v, j) for v in values)])
    return list(DELTA_H_COLUMNS), rows


def delta_h_series(table: Table) -> Table:
    """The rows of :func:`delta_h_table` in long form for a line chart: ``eta/lr``, ``delta_h``, ``series`` (the
    part's name and what the line is, ``full: SNIS``, ``full: first order``, ...); points without a value are left
    out (a line chart cannot draw a null)."""
    columns, rows = table
    if columns != DELTA_H_COLUMNS:
        raise ValueError(f"expected the columns of delta_h_table, got {columns}")
    at = {name: columns.index(name) for name in columns}
    out = []
    for quantity, label in SERIES.items():
        for row in rows:
            if row[at[quantity]] is not None:
                out.append([row[at["eta/lr"]], row[at[quantity]], f"{row[at['part']]}: {label}"])
    return ["eta/lr", "delta_h", "series"], out


# ---------------------------------------------------------------------------------------------
# the update sequences and their tokens


@dataclass(frozen=True)
class UpdateTokens:
    """The per-token arrays of the update batch (``EvalResult.arrays["update_tokens/..."]``): sequence i's tokens
    are ``offsets[i]:offsets[i+1]`` of every flat array, in response order."""

    offsets: np.ndarray  # [N+1] int
    token_ids: np.ndarray  # [T] int
    attributions: np.ndarray  # [T] a_{i,t}, summing over t to a_i
    logprobs: np.ndarray  # [T] log p of the token at theta
    covariance: np.ndarray | None = None  # [T] (log p - mean)(A - mean), Cui et al. 2025 (where computed)
    reward_attributions: np.ndarray | None = None  # [T] r_{i,t} (where computed)

    REQUIRED = ("offsets", "token_ids", "attributions", "logprobs")
    OPTIONAL = ("covariance", "reward_attributions")

    @classmethod
    def from_arrays(cls, arrays: dict[str, np.ndarray], n_sequences: int) -> UpdateTokens | None:
        """The ``update_tokens/*`` arrays of ``arrays`` (None when there is no ``update_tokens/offsets``), checked
        against U's ``n_sequences``: a missing array or a length that does not fit is a clear error."""
        if "update_tokens/offsets" not in arrays:
            return None
        missing = [k for k in cls.REQUIRED if f"update_tokens/{k}" not in arrays]
        if missing:
            raise ValueError(f"the per-token arrays of the update batch lack update_tokens/{', '.join(missing)}")
        fields = {k: np.asarray(arrays[f"update_tokens/{k}"]) for k in cls.REQUIRED}
        fields.update(
            {k: np.asarray(arrays[f"update_tokens/{k}"]) for k in cls.OPTIONAL if f"update_tokens/{k}" in arrays}
        )
        tokens = cls(**fields)
        tokens.check(n_sequences)
        return tokens

    def check(self, n_sequences: int) -> None:
        """The arrays fit together and U's ``n_sequences`` (else a ValueError that says what does not)."""
        offsets = self.offsets
        if not np.issubdtype(offsets.dtype, np.integer):
            raise ValueError(f"update_tokens/offsets must hold integers, not {offsets.dtype}")
        if offsets.ndim != 1 or len(offsets) != n_sequences + 1:
            raise ValueError(
                f"update_tokens/offsets has shape {offsets.shape}, expected [{n_sequences + 1}] (one more than the "
                f"{n_sequences} sequences of the update batch)"
            )
        n_tokens = len(self.token_ids)
        if offsets[0] != 0 or offsets[-1] != n_tokens or np.any(np.diff(offsets) < 0):
            raise ValueError(
                f"update_tokens/offsets must rise from 0 to the {n_tokens} tokens of update_tokens/token_ids; it runs "
                f"from {offsets[0]} to {offsets[-1]}{' and falls somewhere' if np.any(np.diff(offsets) < 0) else ''}"
            )
        for name in ("attributions", "logprobs", "covariance", "reward_attributions"):
            values = getattr(self, name)
            if values is not None and values.shape != (n_tokens,):
                raise ValueError(f"update_tokens/{name} has shape {values.shape}, expected [{n_tokens}] (one a token)")

    def span(self, i: int) -> slice:
        return slice(int(self.offsets[i]), int(self.offsets[i + 1]))

    def sequence_logprob(self, i: int) -> float:
        """log p of sequence i's response: the sum of its tokens' log-probs."""
        return float(self.logprobs[self.span(i)].sum())

    def sequence_attributions(self) -> np.ndarray:
        """a_i as the sum of each sequence's a_{i,t} (what ``attributions.npy`` holds, up to rounding)."""
        return np.array([self.attributions[self.span(i)].sum() for i in range(len(self.offsets) - 1)])


def _index(record: dict, n: int) -> int:
    i = record.get("index")
    if not isinstance(i, (int, np.integer)) or not 0 <= i < n:
        raise ValueError(f"an update record's index {i!r} is not a row of the update batch's {n} sequences")
    return int(i)


def _per_sequence(values: np.ndarray | None, name: str, n: int) -> np.ndarray | None:
    """``values`` (one per update sequence, or None), checked to be [n]."""
    if values is not None and np.shape(values) != (n,):
        raise ValueError(f"{name} has shape {np.shape(values)}, expected [{n}] (one per update sequence)")
    return values


def update_sequence_table(
    records: list[dict],
    arrays: dict[str, np.ndarray],
    decode: Callable[[list[int]], str],
    tokens: UpdateTokens | None = None,
) -> Table:
    """One row per update sequence: index, group, prompt and response text (the record's own, else ``decode`` of its
    ids), reward, advantage, attribution a_i (``arrays["attributions"]``, None when not computed); with
    ``arrays["reward_attributions"]`` also r_i (``reward_attribution``), with ``tokens`` the response's
    log-probability (``logprob``)."""
    n = len(records)
    attributions = _per_sequence(arrays.get("attributions"), "attributions", n)
    reward_attributions = _per_sequence(arrays.get("reward_attributions"), "reward_attributions", n)
    columns = ["index", "group", "prompt", "response", "reward", "advantage", "attribution"]
    columns += ["reward_attribution"] if reward_attributions is not None else []
    columns += ["logprob"] if tokens is not None else []
    rows = []
    for r in records:
        i = _index(r, n)
        prompt = r.get("prompt") or decode(r["prompt_ids"])
        response = r.get("response") or decode(r["response_ids"])
        row = [i, str(r.get("group")), prompt, response, number(r.get("reward")), number(r.get("advantage"))]
        row.append(None if attributions is None else number(attributions[i]))
        if reward_attributions is not None:
            row.append(number(reward_attributions[i]))
        if tokens is not None:
            row.append(number(tokens.sequence_logprob(i)))
        rows.append(row)
    return columns, rows


def largest_first(table: Table, column: str, max_rows: int) -> Table:
    """At most ``max_rows`` rows of ``table``: all of them when they fit, else those of largest |``column``| (rows
    without a value last, ties in their order), kept in their original order."""
    columns, rows = table
    if max_rows < 1:
        raise ValueError(f"max_rows must be at least 1, got {max_rows}")
    if len(rows) <= max_rows:
        return columns, rows
    k = columns.index(column)
    ranked = sorted(range(len(rows)), key=lambda i: (rows[i][k] is None, -abs(rows[i][k] or 0.0), i))
    keep = sorted(ranked[:max_rows])
    return columns, [rows[i] for i in keep]


def check_tokens_match(records: list[dict], tokens: UpdateTokens) -> None:
    """Each sequence's ``update_tokens/token_ids`` are its record's ``response_ids``: else the arrays belong to another
    update batch (or another order of it)."""
    for r in records:
        i = _index(r, len(records))
        ids = tokens.token_ids[tokens.span(i)]
        if list(map(int, ids)) != list(map(int, r["response_ids"])):
            raise ValueError(
                f"update_tokens/token_ids of sequence {i} ({len(ids)} tokens) are not its response_ids "
                f"({len(r['response_ids'])} tokens): the per-token arrays are not those of this update batch"
            )


def ranked_sequences(tokens: UpdateTokens, attributions: np.ndarray | None) -> list[int]:
    """The update sequences by |a_i|, largest first (ties by index); a_i from ``attributions`` when given, else the
    sum of the sequence's a_{i,t}."""
    a = tokens.sequence_attributions() if attributions is None else np.asarray(attributions, dtype=np.float64)
    magnitude = np.where(np.isfinite(a), np.abs(a), -1.0)  # non-finite last
    return [int(i) for i in np.lexsort((np.arange(len(a)), -magnitude))]


def token_table(
    records: list[dict],
    tokens: UpdateTokens,
    attributions: np.ndarray | None,
    decode_tokens: Callable[[list[int]], list[str]],
    max_rows: int,
) -> tuple[list[str], list[list[Any]], list[int]]:
    """One row per response token of the update sequences: ``sequence`` (its index in U), ``position`` (in the
    response), ``token`` (its text, ``decode_tokens`` of the ids, one string each), ``token_id``, ``attribution``
    (a_{i,t}), ``share`` (a_{i,t} / a_i; None where a_i is 0), ``logprob``, ``advantage`` (its sequence's), and
    ``covariance`` and ``reward_attribution`` where the arrays hold them. ``attributions``: a_i per sequence (None:
    the sum of its a_{i,t}).

    At most ``max_rows`` rows: the sequences with the largest |a_i| first, whole, until the budget (the last one
    may be cut). Rows are in sequence and position order. Returns the columns, the rows and the sequences shown (by
    rank)."""
    if max_rows < 1:
        raise ValueError(f"max_rows must be at least 1, got {max_rows}")
    n = len(records)
    a = tokens.sequence_attributions() if attributions is None else _per_sequence(attributions, "attributions", n)
    by_index = {_index(r, n): r for r in records}
    kept, budget = {}, max_rows  # sequence -> how many of its tokens the table shows
    for i in ranked_sequences(tokens, a):
        if budget == 0:
            break
        span = tokens.span(i)
        kept[i] = min(span.stop - span.start, budget)
        budget -= kept[i]
    columns = ["sequence", "position", "token", "token_id", "attribution", "share", "logprob", "advantage"]
    columns += ["covariance"] if tokens.covariance is not None else []
    columns += ["reward_attribution"] if tokens.reward_attributions is not None else []
    rows = []
    for i in sorted(kept):
        start = tokens.span(i).start
        ids = [int(t) for t in tokens.token_ids[start : start + kept[i]]]
        texts = decode_tokens(ids)
        if len(texts) != len(ids):
            raise ValueError(f"decode_tokens gave {len(texts)} strings for {len(ids)} tokens: one string a token")
        a_i, advantage = number(a[i]), number(by_index[i].get("advantage"))
        for t, (token_id, text) in enumerate(zip(ids, texts)):
            k = start + t
            a_it = number(tokens.attributions[k])
            share = None if a_it is None or not a_i else a_it / a_i
            row = [i, t, text, token_id, a_it, share, number(tokens.logprobs[k]), advantage]
            if tokens.covariance is not None:
                row.append(number(tokens.covariance[k]))
            if tokens.reward_attributions is not None:
                row.append(number(tokens.reward_attributions[k]))
            rows.append(row)
    return columns, rows, list(kept)


# red where a token raises the entropy (a_{i,t} > 0), blue where it lowers it
_RAISES, _LOWERS = (214, 39, 40), (31, 119, 180)


def _colour(value: float, scale: float) -> str:
    rgb = _RAISES if value > 0 else _LOWERS
    alpha = 0.0 if scale <= 0 or not math.isfinite(value) else min(abs(value) / scale, 1.0)
    return f"rgba({rgb[0]},{rgb[1]},{rgb[2]},{alpha:.3f})"


def top_sequences_html(
    records: list[dict],
    tokens: UpdateTokens,
    attributions: np.ndarray | None,
    decode: Callable[[list[int]], str],
    decode_tokens: Callable[[list[int]], list[str]],
    n_top: int = 20,
    max_tokens: int = 400,
) -> str:
    """A compact HTML page of the ``n_top`` update sequences with the largest |a_i| (``attributions``, None: the sums
    of a_{i,t}): each with its a_i, reward, advantage and log p, the prompt in grey and its first ``max_tokens``
    response tokens coloured by a_{i,t} (red raises the entropy, blue lowers it; one colour scale for the page, the
    largest |a_{i,t}| shown at full colour; hovering a token shows its numbers)."""
    n = len(records)
    a = tokens.sequence_attributions() if attributions is None else _per_sequence(attributions, "attributions", n)
    by_index = {_index(r, n): r for r in records}
    top = ranked_sequences(tokens, a)[:n_top]
    shown = {i: slice(tokens.span(i).start, min(tokens.span(i).stop, tokens.span(i).start + max_tokens)) for i in top}
    scale = max((abs(v) for i in top for v in tokens.attributions[shown[i]] if math.isfinite(v)), default=0.0)
    parts = [
        "<div style='font-family:monospace;font-size:13px;line-height:1.7'>",
        f"<p>The {len(top)} update sequences with the largest |a_i| (of {n}); a_i: the sequence's first-order share of "
        "the entropy change on E, per unit eta. Each response token coloured by its a_(i,t): "
        f"<span style='background:{_colour(1, 1)}'>raises</span> / "
        f"<span style='background:{_colour(-1, 1)}'>lowers</span> the entropy, full colour at |a_(i,t)| = "
        f"{scale:.3g}; hover a token for its numbers.</p>",
    ]
    for i in top:
        r, span = by_index[i], tokens.span(i)
        head = (
            f"#{i} (group {r.get('group')}): a_i = {_fmt(a[i])}, reward {_fmt(r.get('reward'))}, advantage "
            f"{_fmt(r.get('advantage'))}, log p {_fmt(tokens.sequence_logprob(i))}"
        )
        prompt = r.get("prompt") or decode(r["prompt_ids"])
        ids = [int(t) for t in tokens.token_ids[shown[i]]]
        spans = "".join(
            _token_span(text, tokens, k, scale)
            for k, text in zip(range(shown[i].start, shown[i].stop), decode_tokens(ids))
        )
        more = span.stop - shown[i].stop
        rest = f"<span style='color:#999'> ... ({more} more tokens)</span>" if more else ""
        parts.append(
            f"<div style='margin:6px 0;border-top:1px solid #ddd'><div style='color:#555'>{html.escape(head)}</div>"
            f"<span style='color:#999;white-space:pre-wrap'>{html.escape(prompt)}</span>{spans}{rest}</div>"
        )
    parts.append("</div>")
    return "".join(parts)


def _token_span(text: str, tokens: UpdateTokens, k: int, scale: float) -> str:
    """Token ``k`` (flat index) as an HTML span coloured by its a_(i,t), its numbers in the hover text."""
    value = float(tokens.attributions[k])
    hover = f"a_(i,t) = {_fmt(value)}, log p = {_fmt(tokens.logprobs[k])}"
    if tokens.covariance is not None:
        hover += f", covariance = {_fmt(tokens.covariance[k])}"
    style = f"background:{_colour(value, scale)};white-space:pre-wrap"
    return f"<span title='{html.escape(hover)}' style='{style}'>{html.escape(text)}</span>"


def _fmt(x: Any) -> str:
    value = number(x)
    return "n/a" if value is None else f"{value:.4g}"


# ---------------------------------------------------------------------------------------------
# the probed steps of a live run


def live_steps_table(records: list[dict]) -> Table:
    """One row per probed step of a live run (its records, those with a prediction): ``step``, ``lr``, the full
    update's SNIS ``delta_h`` and ``se`` at eta = lr, ``first_order_x_lr`` (the slope times lr) and
    ``predicted_second``; ``covariance_batch_mean`` when a record's ``eval`` holds ``covariance_law``, ``delta_r`` and
    ``delta_r_se`` (E's expected reward along the full step at lr) when it holds ``reward``, and ``realised_delta_h``
    and ``realised_se`` when a record holds ``realised`` (None in the other rows)."""
    probed = [r for r in records if "eval" in r]
    with_covariance = any("covariance_law" in r["eval"] for r in probed)
    with_reward = any("reward" in r["eval"] for r in probed)
    with_realised = any("realised" in r for r in probed)
    columns = ["step", "lr", "delta_h", "se", "first_order_x_lr", "predicted_second"]
    columns += ["covariance_batch_mean"] if with_covariance else []
    columns += ["delta_r", "delta_r_se"] if with_reward else []
    columns += ["realised_delta_h", "realised_se"] if with_realised else []
    rows = []
    for r in probed:
        lr, etas = r["update"]["lr"], r["plan"]["etas"]
        if lr not in etas:
            raise ValueError(f"the record of step {r['step']} has no eta = lr ({lr}) in its plan's etas {etas}")
        j, full = etas.index(lr), r["eval"]["parts"]["full"]
        first = full.get("first_order")
        row = [int(r["step"]), float(lr), number_at(full["delta_h"], j), number_at(full["se"], j)]
        row += [None if first is None else number(first * lr), number_at(full.get("predicted_second"), j)]
        if with_covariance:
            row.append(number((r["eval"].get("covariance_law") or {}).get("batch_mean")))
        if with_reward:
            reward = (r["eval"].get("reward") or {}).get("parts", {}).get("full", {})
            row += [number_at(reward.get("delta_r"), j), number_at(reward.get("se"), j)]
        if with_realised:
            realised = r.get("realised") or {}
            row += [number(realised.get("delta_h")), number(realised.get("se"))]
        rows.append(row)
    return columns, rows


LIVE_SERIES = {
    "delta_h": "predicted (SNIS at eta = lr)",
    "first_order_x_lr": "first order",
    "predicted_second": "second order",
    "realised_delta_h": "realised",
}


def live_series(table: Table) -> Table:
    """The Delta H columns of :func:`live_steps_table` in long form for a line chart: ``step``, ``delta_h``,
    ``series``; points without a value are left out."""
    columns, rows = table
    out = []
    for quantity, label in LIVE_SERIES.items():
        if quantity in columns:
            k = columns.index(quantity)
            out += [[row[0], row[k], label] for row in rows if row[k] is not None]
    return ["step", "delta_h", "series"], out
