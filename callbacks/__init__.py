"""Lightning callbacks of probe: update reconstruction, SNIS aggregation, run writing, W&B reporting, the live probe."""
from callbacks.aggregation import SNISAggregation, SequenceRows
from callbacks.progress import SweepProgress
from callbacks.reconstruction import UpdateReconstruction
from callbacks.wandb_report import WandbReport
from callbacks.writer import RunWriter
from callbacks.live import LiveEntropyProbe, LiveEvalSettings

__all__ = ["SweepProgress", "SNISAggregation", "SequenceRows", "UpdateReconstruction", "WandbReport", "RunWriter",
           "LiveEntropyProbe", "LiveEvalSettings"]
