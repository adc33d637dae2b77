"""Prompts to sample from: the toy task's, or a local JSONL file with a ``prompt`` text field per line.

Shared by the predict DataModule (U and E), the GRPO DataModule (training prompts) and the live
probe (its evaluation prompts). No Lightning here.
"""

from __future__ import annotations

import json
import logging
import stat
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

log = logging.getLogger("probe")

CHAT_TEMPLATE_MODES = ("auto", "on", "off")


@dataclass
class PromptSource:
    """Where prompts come from when a batch is sampled.

    Args:
        prompts: ``toy`` (the toy addition task) or a local JSONL file with a ``prompt`` text
            field per line (and optionally ``answer``, passed to the reward).
        n_prompts: number of prompts (prompt groups), >= 1.
        offset: skip this many prompts first (disjoint prompts for U and E, or a held-out split), >= 0.
        seed: seed of the toy prompt generator.
        chat_template: how a prompt file's text is tokenised: ``auto`` (default: with the tokenizer's chat
            template when it has one, the prompt as a single user turn followed by the generation prompt; as
            plain text otherwise), ``on`` (the chat template, refused if the tokenizer has none) or ``off``
            (plain text, the tokenizer's special tokens added); true / false (YAML's reading of an unquoted on /
            off) mean on / off. The log says which was used. Not used by ``toy``.
    """

    prompts: str = "toy"
    n_prompts: int = 8
    offset: int = 0
    seed: int = 0
    chat_template: str | bool = "auto"

    def __post_init__(self) -> None:
        if isinstance(self.chat_template, bool):  # YAML 1.1 reads an unquoted on / off (or yes / no) as a boolean
            self.chat_template = "on" if self.chat_template else "off"
        if self.n_prompts < 1:
            raise ValueError(
                f"source.n_prompts must be a whole number >= 1 (prompt groups to sample), got {self.n_prompts!r}. "
                "Fix: set n_prompts to the number of prompts to sample from (e.g. 8)"
            )
        if self.offset < 0:
            raise ValueError(
                f"source.offset must be a whole number >= 0 (prompts to skip from the start), got {self.offset!r}. "
                "Fix: set offset to 0 to start at the first prompt, or to the number of prompts to skip"
            )
        if self.chat_template not in CHAT_TEMPLATE_MODES:
            raise ValueError(
                f"source.chat_template must be one of {', '.join(CHAT_TEMPLATE_MODES)}, got {self.chat_template!r}. "
                "Fix: auto (the tokenizer's chat template when it has one), on, or off (plain text)"
            )


_logged: set[tuple[str, str, bool]] = set()  # (file, mode, applied): the INFO line is said once per process


def _has_chat_template(tokenizer: Any) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


def _chat_ids(tokenizer: Any, text: str) -> list[int]:
    """``text`` as a single user turn with the generation prompt, tokenised by the tokenizer's chat template (the
    template writes its own special tokens, so none are added)."""
    out = tokenizer.apply_chat_template([{"role": "user", "content": text}], tokenize=True, add_generation_prompt=True)
    if isinstance(out, Mapping) or hasattr(out, "input_ids"):  # transformers 5 returns a BatchEncoding by default
        out = out["input_ids"]
    ids = list(out)
    if ids and isinstance(ids[0], (list, tuple)):  # a batch of one conversation
        ids = list(ids[0])
    return [int(i) for i in ids]


def _read_rows(path: Path, offset: int, n: int) -> list[tuple[int, Any]]:
    """Prompts ``offset .. offset + n`` of a JSONL file (blank lines skipped) with their line numbers. Lines are
    split on newlines only (a JSON string may hold U+2028 or a form feed), a BOM is dropped, and only the lines
    asked for are parsed; a line that is not JSON is named with its number."""
    lines = [(k, text) for k, text in enumerate(path.read_text(encoding="utf-8-sig").split("\n"), 1) if text.strip()]
    if len(lines) < offset + n:
        raise ValueError(
            f"{path} has {max(0, len(lines) - offset)} prompts after offset {offset}; asked for {n}. Fix: lower "
            "source.n_prompts or source.offset, or give a longer prompt file"
        )
    rows = []
    for k, text in lines[offset : offset + n]:
        try:
            rows.append((k, json.loads(text)))
        except json.JSONDecodeError as e:
            raise ValueError(
                f"{path}: line {k} is not valid JSON ({e.msg} at column {e.colno}). Fix: one JSON object with "
                "'prompt' per line"
            ) from None
    return rows


def _template_markers(tokenizer: Any) -> list[str]:
    """The special tokens the chat template writes around a user turn (``<|im_start|>``, ...): a prompt that
    already holds one is templated text."""
    rendered = tokenizer.apply_chat_template(
        [{"role": "user", "content": "x"}], tokenize=False, add_generation_prompt=True
    )
    # not the BOS / EOS / pad / unk a tokenizer also writes around plain text (Llama-2's "<s>" is also HTML)
    plain = {getattr(tokenizer, name, None) for name in ("bos_token", "pad_token", "unk_token")}
    return [t for t in getattr(tokenizer, "all_special_tokens", []) if t and t not in plain and t in str(rendered)]


def load_prompts(source: PromptSource, tokenizer: Any) -> tuple[list[list[int]], dict[tuple, Any]]:
    """Prompt token ids and, per prompt, its reference answer (or None).

    A prompt file's text goes through the tokenizer's chat template or not as ``source.chat_template`` says
    (:class:`PromptSource`); which one was used is logged once per file."""
    if source.prompts == "toy":
        from probe.toy.task import make_prompts

        prompts = make_prompts(source.offset + source.n_prompts, source.seed)[source.offset :]
        return prompts, {}
    path = Path(source.prompts)
    if not path.exists():
        raise FileNotFoundError(
            f"prompt file {path} not found. Fix: give 'toy' or a local JSONL file with a 'prompt' field per line"
        )
    mode = path.stat().st_mode
    if not stat.S_ISREG(mode):  # a FIFO would wait for a writer for ever, /dev/zero never ends (MemoryError)
        kinds = ((stat.S_ISDIR, "a directory"), (stat.S_ISFIFO, "a named pipe (FIFO)"), (stat.S_ISCHR, "a device"))
        kind = next((name for test, name in kinds if test(mode)), "not a regular file")
        raise ValueError(
            f"prompt file {path} is {kind}; prompts are read only from regular files (a pipe or a device would block "
            "or never end). Fix: give 'toy', or write the prompts to a JSONL file with a 'prompt' field per line and "
            "give its path"
        )
    has_template = _has_chat_template(tokenizer)
    if source.chat_template == "on" and not has_template:
        raise ValueError(
            f"prompts of {path}: chat_template is 'on' but the policy's tokenizer has no chat template "
            "(tokenizer_config.json / chat_template.jinja hold none). Fix: set source.chat_template to off (or auto) "
            "to tokenise the prompts as plain text, or save the chat template the policy was trained with next to "
            "its tokenizer (tokenizer.chat_template = ...; tokenizer.save_pretrained(dir))"
        )
    apply = source.chat_template == "on" or (source.chat_template == "auto" and has_template)
    rows = _read_rows(path, source.offset, source.n_prompts)  # [(line number, parsed object)]
    key = (str(path), source.chat_template, apply)
    if key not in _logged:
        _logged.add(key)
        what = "tokenizer chat template applied" if apply else "no chat template"
        log.info("prompts of %s: %s (chat_template: %s)", path, what, source.chat_template)
    markers = _template_markers(tokenizer) if apply else []
    prompts, answers = [], {}
    for line, row in rows:
        if not isinstance(row, dict) or "prompt" not in row:
            raise ValueError(f"{path}: line {line} has no 'prompt' field. Fix: one JSON object with 'prompt' per line")
        text = row["prompt"]
        held = [m for m in markers if m in str(text)]
        if held:
            raise ValueError(
                f"{path}: line {line} already holds chat-template text ({held[0]!r}), and "
                f"chat_template: {source.chat_template} would wrap it in the template a second time. Fix: set "
                "source.chat_template: off for a file of templated prompts, or store the plain prompts"
            )
        ids = _chat_ids(tokenizer, text) if apply else tokenizer(text, add_special_tokens=True)["input_ids"]
        prompts.append(ids)
        answers[tuple(ids)] = row.get("answer")
    return prompts, answers
