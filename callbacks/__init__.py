"""Lightning callbacks of probe: update reconstruction, SNIS aggregation, run writing, W&B reporting."""
from callbacks.aggregation import SNISAggregation, SequenceRows
from callbacks.reconstruction import UpdateReconstruction
from callbacks.wandb_report import WandbReport
from callbacks.writer import RunWriter

__all__ = ["SNISAggregation", "SequenceRows", "UpdateReconstruction", "WandbReport", "RunWriter"]
