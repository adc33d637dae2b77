"""Sequences (prompt + response) as padded tensors: the one batch type every part of probe uses.

A rollout *record* is a dict following the rollout-file contract (docs/DESIGN.md section 9):
``prompt_ids``, ``response_ids``, ``group`` and optionally ``advantage``, ``reward``,
``old_logprobs`` (one per response token), ``prompt``, ``response`` and any metadata.

Token alignment used everywhere: position ``t`` of a ``[B, T-1]`` per-token tensor scores
``targets[:, t] = input_ids[:, t + 1]`` given the prefix ``input_ids[:, : t + 1]``;
``target_mask`` is True where that target is a response token.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any, Iterator, Sequence

import torch
from torch import Tensor


@dataclass
class SequenceBatch:
    """A padded batch of prompt + response sequences."""

    input_ids: Tensor  # [B, T] long
    attention_mask: Tensor  # [B, T] long, 1 on real tokens (left or right padding)
    response_mask: Tensor  # [B, T] bool, True on response tokens
    advantages: Tensor | None = None  # [B] float64
    old_logprobs: Tensor | None = None  # [B, T-1] float64, aligned with targets, 0 off the response
    index: Tensor | None = None  # [B] long, position of each sequence in its whole set (U or E)
    group: list[Any] = field(default_factory=list)  # [B] prompt group of each sequence
    rewards: Tensor | None = None  # [B] float64, each sequence's reward (E sampled with a reward function, or read)

    def __post_init__(self) -> None:
        if self.index is None:
            self.index = torch.arange(self.input_ids.shape[0])

    def __len__(self) -> int:
        return int(self.input_ids.shape[0])

    @property
    def targets(self) -> Tensor:  # [B, T-1]
        return self.input_ids[:, 1:]

    @property
    def target_mask(self) -> Tensor:  # [B, T-1] bool
        return self.response_mask[:, 1:]

    @property
    def position_ids(self) -> Tensor:  # [B, T] positions counted from the first real token
        return (self.attention_mask.long().cumsum(-1) - 1).clamp(min=0)

    @property
    def response_lengths(self) -> Tensor:  # [B] long
        return self.target_mask.sum(-1)

    TENSORS = ("input_ids", "attention_mask", "response_mask", "advantages", "old_logprobs", "index", "rewards")

    def map_tensors(self, fn: Any, group: list[Any] | None = None) -> SequenceBatch:
        """A batch with ``fn`` applied to every tensor field (None stays None), and ``group`` if given."""
        tensors = {name: None if (t := getattr(self, name)) is None else fn(t) for name in self.TENSORS}
        return replace(self, **tensors, group=self.group if group is None else group)

    def to(self, device: torch.device | str) -> SequenceBatch:
        return self.map_tensors(lambda t: t.to(device))

    def select(self, rows: Sequence[int] | Tensor | slice) -> SequenceBatch:
        """The sub-batch of the given rows (padding columns kept)."""
        if isinstance(rows, slice):
            idx = torch.arange(len(self))[rows]
        else:
            idx = torch.as_tensor(rows, dtype=torch.long)
        group = [self.group[i] for i in idx.tolist()] if self.group else []
        return self.map_tensors(lambda t: t[idx.to(t.device)], group=group)

    def chunks(self, size: int | None) -> Iterator["SequenceBatch"]:
        """Consecutive sub-batches of at most ``size`` sequences (all of it when size is None)."""
        n = len(self)
        size = n if not size or size <= 0 else size
        for start in range(0, n, size):
            yield self.select(slice(start, min(start + size, n)))

    @staticmethod
    def concat(batches: Sequence[SequenceBatch], pad_token_id: int) -> SequenceBatch:
        """Stack batches of different widths (right-padded to the widest), rows sorted by ``index``."""
        T = max(b.input_ids.shape[1] for b in batches)

        def widen(x: Tensor, width: int, value: Any) -> Tensor:  # [B, t] -> [B, width]
            return torch.nn.functional.pad(x, (0, width - x.shape[1]), value=value)

        has_old = all(b.old_logprobs is not None for b in batches)
        has_advantages = all(b.advantages is not None for b in batches)
        has_rewards = all(b.rewards is not None for b in batches)
        merged = SequenceBatch(
            input_ids=torch.cat([widen(b.input_ids, T, pad_token_id) for b in batches]),
            attention_mask=torch.cat([widen(b.attention_mask, T, 0) for b in batches]),
            response_mask=torch.cat([widen(b.response_mask, T, False) for b in batches]),
            advantages=torch.cat([b.advantages for b in batches]) if has_advantages else None,
            old_logprobs=torch.cat([widen(b.old_logprobs, T - 1, 0.0) for b in batches]) if has_old else None,
            index=torch.cat([b.index for b in batches]),
            group=[g for b in batches for g in (b.group or [None] * len(b))],
            rewards=torch.cat([b.rewards for b in batches]) if has_rewards else None,
        )
        return merged.select(torch.argsort(merged.index, stable=True))


def collate(
    records: Sequence[dict], pad_token_id: int = 0, padding_side: str = "right", index: Sequence[int] | None = None
) -> SequenceBatch:
    """Pad rollout records into a :class:`SequenceBatch`.

    ``padding_side`` is "right" (default) or "left"; teacher forcing gives the same
    log-probs for both because positions are counted from the first real token.
    """
    if len(records) == 0:
        raise ValueError("collate() got no records: the batch is empty; check the rollout file or sampler settings")
    if padding_side not in ("left", "right"):
        raise ValueError(f"padding_side must be 'left' or 'right', got {padding_side!r}")
    lengths = [len(r["prompt_ids"]) + len(r["response_ids"]) for r in records]
    B, T = len(records), max(lengths)
    input_ids = torch.full((B, T), int(pad_token_id), dtype=torch.long)
    attention_mask = torch.zeros((B, T), dtype=torch.long)
    response_mask = torch.zeros((B, T), dtype=torch.bool)
    has_old = any(r.get("old_logprobs") is not None for r in records)
    old = torch.zeros((B, T), dtype=torch.float64) if has_old else None
    for b, r in enumerate(records):
        p, s = list(r["prompt_ids"]), list(r["response_ids"])
        if len(p) == 0:
            raise ValueError(f"record {b} has an empty prompt_ids: every sequence needs at least one prompt token")
        L = len(p) + len(s)
        start = 0 if padding_side == "right" else T - L
        input_ids[b, start : start + L] = torch.tensor(p + s, dtype=torch.long)
        attention_mask[b, start : start + L] = 1
        response_mask[b, start + len(p) : start + L] = True
        if has_old:
            lp = r.get("old_logprobs")
            if lp is None:
                raise ValueError(f"record {b} lacks old_logprobs while others have them: give them for all or none")
            if len(lp) != len(s):
                raise ValueError(
                    f"record {b}: old_logprobs has {len(lp)} entries but the response has {len(s)} tokens; "
                    "old_logprobs must hold one log-prob per response token"
                )
            old[b, start + len(p) : start + L] = torch.tensor(lp, dtype=torch.float64)
    advantages = rewards = None
    if all(r.get("advantage") is not None for r in records):
        advantages = torch.tensor([float(r["advantage"]) for r in records], dtype=torch.float64)
    if all(r.get("reward") is not None for r in records):
        rewards = torch.tensor([float(r["reward"]) for r in records], dtype=torch.float64)
    return SequenceBatch(
        input_ids=input_ids,
        attention_mask=attention_mask,
        response_mask=response_mask,
        advantages=advantages,
        old_logprobs=None if old is None else old[:, 1:].contiguous(),
        index=torch.as_tensor(list(index) if index is not None else range(B), dtype=torch.long),
        group=[r.get("group") for r in records],
        rewards=rewards,
    )
