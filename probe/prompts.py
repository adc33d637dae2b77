"""Prompts to sample from: the toy task's, or a local JSONL file with a ``prompt`` text field per line.

Shared by the predict DataModule (U and E), the GRPO DataModule (training prompts) and the live
probe (its evaluation prompts). No Lightning here.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any


@dataclass
class PromptSource:
    """Where prompts come from when a batch is sampled.

    Args:
        prompts: ``toy`` (the toy addition task) or a local JSONL file with a ``prompt`` text
            field per line (and optionally ``answer``, passed to the reward).
        n_prompts: number of prompts (prompt groups).
        offset: skip this many prompts first (disjoint prompts for U and E, or a held-out split).
        seed: seed of the toy prompt generator.
    """

    prompts: str = "toy"
    n_prompts: int = 8
    offset: int = 0
    seed: int = 0


def load_prompts(source: PromptSource, tokenizer: Any) -> tuple[list[list[int]], dict[tuple, Any]]:
    """Prompt token ids and, per prompt, its reference answer (or None)."""
    if source.prompts == "toy":
        from probe.toy.task import make_prompts

        prompts = make_prompts(source.offset + source.n_prompts, source.seed)[source.offset :]
        return prompts, {}
    path = Path(source.prompts)
    if not path.is_file():
        raise FileNotFoundError(
            f"prompt file {path} not found. Fix: give 'toy' or a local JSONL file with a 'prompt' field per line"
        )
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    rows = rows[source.offset : source.offset + source.n_prompts]
    if len(rows) < source.n_prompts:
        raise ValueError(f"{path} has {len(rows)} prompts after offset {source.offset}; asked for {source.n_prompts}")
    prompts, answers = [], {}
    for i, row in enumerate(rows):
        if "prompt" not in row:
            raise ValueError(
                f"{path}: line {source.offset + i + 1} has no 'prompt' field. Fix: one JSON object with 'prompt' per "
                "line"
            )
        ids = tokenizer(row["prompt"], add_special_tokens=True)["input_ids"]
        prompts.append(ids)
        answers[tuple(ids)] = row.get("answer")
    return prompts, answers
