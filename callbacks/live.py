"""The live entropy probe (work in progress)."""
from __future__ import annotations

import lightning.pytorch as pl
from dataclasses import dataclass


@dataclass
class LiveEvalSettings:
    """Placeholder."""


class LiveEntropyProbe(pl.Callback):
    """Placeholder."""
