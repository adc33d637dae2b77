"""Per-sequence statistics of an evaluation batch and the small sample statistics built on them.

``SequenceStats`` holds, for every sequence j of E at one parameter point, its log-prob l_j, the
sum of its full-vocabulary token entropies and its response length T_j; the integrand h_j of the
entropy estimators (docs/DESIGN.md section 3) is read from it by name. Group helpers serve the
``per_prompt`` normalisation; ``mean_and_se`` and ``ratio_and_se`` are the plain (not importance
weighted) estimates used where E is a fresh sample of the policy itself.

A standard error needs at least two samples: with one, the functions here return NaN (written as
null in JSON, "n/a" in tables), never 0.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Sequence

import torch
from torch import Tensor

INTEGRANDS = ("logprob", "token_entropy")


def check_integrand(name: str) -> None:
    if name not in INTEGRANDS:
        raise ValueError(f"unknown integrand {name!r}; choose one of {', '.join(INTEGRANDS)}")


@dataclass
class SequenceStats:
    """Per-sequence statistics of (part of) E at one parameter point, all float64 ``[M]``."""

    logprobs: Tensor  # [M] l_j
    entropies: Tensor | None  # [M] sum_t H_t over the response (None: not computed)
    lengths: Tensor  # [M] T_j, response tokens

    def __len__(self) -> int:
        return int(self.logprobs.shape[0])

    def integrand(self, name: str) -> Tensor:  # [M] h_j
        """h_j for ``logprob`` (-l_j) or ``token_entropy`` (sum_t H_t)."""
        check_integrand(name)
        if name == "logprob":
            return -self.logprobs
        if self.entropies is None:
            raise ValueError("no token entropies: teacher-force E with TeacherForcing(with_entropy=True)")
        return self.entropies

    @staticmethod
    def from_tokens(stats: Any) -> SequenceStats:
        """From :class:`probe.logprobs.TokenStats` (sums over each response)."""
        return SequenceStats(
            logprobs=stats.sequence_logprobs.double(),
            entropies=None if stats.entropies is None else stats.sequence_entropies.double(),
            lengths=stats.lengths.double(),
        )

    @staticmethod
    def cat(parts: Sequence[SequenceStats]) -> SequenceStats:
        """Concatenate the statistics of consecutive chunks."""
        has_entropy = all(p.entropies is not None for p in parts)
        return SequenceStats(
            logprobs=torch.cat([p.logprobs for p in parts]),
            entropies=torch.cat([p.entropies for p in parts]) if has_entropy else None,
            lengths=torch.cat([p.lengths for p in parts]),
        )

    def select(self, rows: slice | Tensor) -> SequenceStats:
        return SequenceStats(
            logprobs=self.logprobs[rows],
            entropies=None if self.entropies is None else self.entropies[rows],
            lengths=self.lengths[rows],
        )

    def cpu(self) -> SequenceStats:
        return SequenceStats(
            logprobs=self.logprobs.cpu(),
            entropies=None if self.entropies is None else self.entropies.cpu(),
            lengths=self.lengths.cpu(),
        )


# ---------------------------------------------------------------------------------------------
# prompt groups


def group_ids(groups: Sequence[Any] | Tensor | None, n: int) -> tuple[Tensor, int]:
    """Integer id ``[n]`` of each sequence's prompt group (all zeros when ``groups`` is None), and the number of
    groups."""
    if groups is None:
        return torch.zeros(n, dtype=torch.long), 1
    if isinstance(groups, Tensor):
        groups = groups.tolist()
    if len(groups) != n:
        raise ValueError(f"got {len(groups)} group labels for {n} sequences; give one prompt group per sequence of E")
    if any(g is None for g in groups):
        raise ValueError(
            "per_prompt normalisation needs a group for every sequence of E, some are None; "
            "add 'group' to the rollouts or use normalisation='global'"
        )
    index: dict[Any, int] = {}
    ids = [index.setdefault(g, len(index)) for g in groups]
    return torch.tensor(ids, dtype=torch.long), len(index)


def group_sum(x: Tensor, gid: Tensor, n_groups: int) -> Tensor:  # [M] -> [G]
    return torch.zeros(n_groups, dtype=x.dtype, device=x.device).index_add(0, gid, x)


def small_sample_correction(count: Tensor) -> Tensor:  # [G] M_g / (M_g - 1), 1 where M_g = 1
    return torch.where(count > 1, count / (count - 1).clamp(min=1), torch.ones_like(count))


# ---------------------------------------------------------------------------------------------
# plain means (E a fresh sample of the policy)


def mean_and_se(x: Tensor) -> tuple[float, float]:
    """Mean and its standard error (unbiased variance); the SE of one sample is NaN (undefined)."""
    x = x.double()
    n = x.numel()
    if n == 0:
        raise ValueError("the mean of an empty sample is undefined; sample at least one sequence")
    return float(x.mean()), float(x.std(unbiased=True) / math.sqrt(n)) if n > 1 else math.nan


def ratio_and_se(h: Tensor, T: Tensor) -> tuple[float, float]:
    """Per-token entropy ``sum h / sum T`` and its delta-method SE (NaN with one sample)."""
    h, T = h.double(), T.double()
    r = float(h.sum() / T.sum())
    n = h.numel()
    se = float((h - r * T).std(unbiased=True) / (T.mean() * math.sqrt(n))) if n > 1 else math.nan
    return r, se
