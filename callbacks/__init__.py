"""Lightning callbacks of probe, thin adapters over probe.engine: update reconstruction and SNIS aggregation (the
stages of a predict run), run writing, W&B reporting and progress (observers), and the live probe of a fit."""

from callbacks.aggregation import SequenceRows, SNISAggregation
from callbacks.live import LiveEntropyProbe, LiveEvalSettings
from callbacks.progress import SweepProgress
from callbacks.reconstruction import UpdateReconstruction
from callbacks.wandb_report import WandbReport
from callbacks.writer import RunWriter

__all__ = [
    "LiveEntropyProbe",
    "LiveEvalSettings",
    "RunWriter",
    "SNISAggregation",
    "SequenceRows",
    "SweepProgress",
    "UpdateReconstruction",
    "WandbReport",
]
