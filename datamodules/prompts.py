"""Prompts for ``python -m probe fit``: each training step gets a fixed global batch of prompts.

Step ``k`` (within an epoch) uses the prompts at stream positions ``k*P .. k*P + P - 1``
(``P = prompts_per_step``, the prompt list cycled); rank ``r`` of ``W`` takes the positions
``k*P + r, k*P + r + W, ...``. So the union over ranks of every step's prompts is the same
whatever the number of processes, and a DDP run sees the global batches of a one-process run.
Batches are dicts: ``prompt_ids`` (list of token-id lists), ``index`` (stream positions, the
prompt group labels) and ``answer`` (reference answers or None).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterator

import lightning.pytorch as pl
from torch.utils.data import DataLoader, IterableDataset

from probe.prompts import PromptSource, load_prompts


@dataclass
class StepPrompts(IterableDataset):
    """This rank's prompts of every step of one epoch (no sampler: the split is fixed here)."""

    prompts: list[list[int]]
    answers: list[Any]
    prompts_per_step: int
    rank: int = 0
    world_size: int = 1
    steps: int | None = None  # steps per epoch (default: one pass over the prompts, at least 1)

    def __post_init__(self) -> None:
        IterableDataset.__init__(self)
        if not self.prompts:
            raise ValueError("the prompt list is empty; give data.source.n_prompts > 0")
        if self.prompts_per_step < 1 or self.prompts_per_step % self.world_size:
            raise ValueError(
                f"prompts_per_step={self.prompts_per_step} must be a positive multiple of the number of processes "
                f"({self.world_size}) so that every rank gets the same number of prompts; change data.prompts_per_step"
            )

    def __len__(self) -> int:
        return self.steps or max(1, len(self.prompts) // self.prompts_per_step)

    def __iter__(self) -> Iterator[dict]:
        n, P = len(self.prompts), self.prompts_per_step
        for k in range(len(self)):
            positions = list(range(k * P + self.rank, (k + 1) * P, self.world_size))
            yield {
                "prompt_ids": [self.prompts[i % n] for i in positions],
                "index": positions,
                "answer": [self.answers[i % n] for i in positions],
            }


class PromptDataModule(pl.LightningDataModule):
    """Prompts of a GRPO run: ``train_dataloader`` yields this rank's prompts of each step."""

    def __init__(
        self,
        source: PromptSource = PromptSource(prompts="toy", n_prompts=1024, offset=0, seed=0),
        prompts_per_step: int = 16,
        steps_per_epoch: int | None = None,
    ):
        """
        Args:
            source: ``toy`` (the toy addition task) or a local JSONL file with a ``prompt`` field per line
                (optional ``answer``, passed to the reward); ``n_prompts`` of them after ``offset``.
            prompts_per_step: prompt groups per optimizer step over ALL processes (a multiple of the
                number of processes); each rank samples ``prompts_per_step / world_size`` of them.
            steps_per_epoch: steps in an epoch (default: one pass over the prompts); prompts are cycled.
        """
        super().__init__()
        self.source, self.prompts_per_step, self.steps_per_epoch = source, prompts_per_step, steps_per_epoch
        self.prompts: list[list[int]] = []
        self.answers: list[Any] = []

    def setup(self, stage: str) -> None:
        tokenizer = getattr(self.trainer.lightning_module, "tokenizer", None) if self.trainer is not None else None
        if tokenizer is None and self.source.prompts != "toy":
            raise ValueError(
                "prompt files are tokenised with the module's tokenizer; the LightningModule has no `tokenizer`"
            )
        prompts, answers = load_prompts(self.source, tokenizer)
        self.prompts = [list(map(int, p)) for p in prompts]
        self.answers = [answers.get(tuple(p)) for p in prompts]

    def train_dataloader(self) -> DataLoader:
        trainer = self.trainer
        rank, world = (trainer.global_rank, trainer.world_size) if trainer is not None else (0, 1)
        dataset = StepPrompts(self.prompts, self.answers, self.prompts_per_step, rank, world, self.steps_per_epoch)
        return DataLoader(dataset, batch_size=None, num_workers=0)
