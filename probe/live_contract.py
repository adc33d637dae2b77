"""What a training LightningModule declares to the live entropy probe (``callbacks.live.LiveEntropyProbe``).

A module that trains a policy with one Adam/AdamW optimizer and automatic optimisation implements
:class:`LiveProbeTarget`: it holds the ``policy`` (and its ``tokenizer``), and after each
``training_step`` its :meth:`~LiveProbeTarget.probed_step` returns a :class:`ProbedStep`: the update
batch U of the step on this rank and the loss settings its gradient came from. The module guarantees
that after backward (and DDP's all-reduce) ``p.grad = d/dp sum_{i in U} c_i``, with ``c_i`` the
per-sequence loss of :func:`probe.losses.per_sequence_loss` under those settings and the normalisers
of the global U; the live probe checks this (the step it reconstructs must be the step the optimizer
takes, and the attributions must add up to the gradient part's slope). ``probe.grpo.GRPOModule`` is
one implementation; README.md shows a minimal one. A module that also implements
:class:`OwnsRunDirectory` gets the probe's records in ``<run directory>/live_probe``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import torch
from torch import nn

from probe.batch import SequenceBatch
from probe.losses import LossConfig, Normalisers


@dataclass
class ProbedStep:
    """The update batch of the optimizer step about to happen, and how the module's loss was computed on it.

    Attributes:
        batch: U on this rank: ``index`` is each sequence's position in the step's global U (unique across
            ranks), ``advantages`` set (and ``old_logprobs`` when the loss uses them). None: this rank
            contributes no sequence to the step.
        loss: the loss settings of the step (aggregation mode, PPO clip, temperature).
        normalisers: the normalisers of the GLOBAL U (every rank's sequences); None: computed from the
            gathered U (allowed in one process only).
        head_dtype: the dtype of the loss's log-softmax head (None: the logits' own dtype).
    """

    batch: SequenceBatch | None
    loss: LossConfig
    normalisers: Normalisers | None = None
    head_dtype: torch.dtype | None = torch.float64


@runtime_checkable
class LiveProbeTarget(Protocol):
    """A training module the live entropy probe can attach to (check with :func:`is_live_probe_target`)."""

    policy: nn.Module  # the trained model (HF causal LM, optionally PEFT); the optimizer holds its parameters
    tokenizer: Any  # its tokenizer (EOS / pad ids, prompt files); None: the ids of the policy's config

    def probed_step(self) -> ProbedStep | None:
        """The step whose backward just ran (None: nothing to probe at this step)."""


def is_live_probe_target(module: Any) -> bool:
    """Whether ``module`` implements :class:`LiveProbeTarget`.

    Not ``isinstance(module, LiveProbeTarget)``: from Python 3.12 that looks attributes up with
    ``inspect.getattr_static``, which does not see an ``nn.Module``'s submodules (``policy`` lives in
    ``module._modules``), so every LightningModule would be refused there."""
    return all(hasattr(module, name) for name in ("policy", "tokenizer")) and callable(
        getattr(module, "probed_step", None)
    )


@runtime_checkable
class OwnsRunDirectory(Protocol):
    """A module that writes into a run directory of its own."""

    def run_directory(self) -> Path:
        """The run's folder (created)."""
