"""What libraries print on every run without it being a problem, silenced at ``run.log_level: standard``.

The console of a standard run is one line per stage, its warnings and the result table (README, "What a run
prints"). Lightning, W&B, transformers and Python's warnings add lines to every run that say nothing about it:
Lightning's device, seed and ``CUDA_VISIBLE_DEVICES`` lines, its tips and TF32 advice, the normal end of a fit and
the DDP banner (:data:`LIGHTNING_BOILERPLATE`); deprecation and advice warnings about library versions and fit's
own choices (:data:`BOILERPLATE_WARNINGS`); transformers' "Loading weights" bar off a terminal; the INFO lines of
DDP ranks other than 0 (they repeat rank 0's); and W&B's offline banner, "sync this run" footer and info lines
(:data:`WANDB_QUIET`; the CLI prints one line naming the run folder and the ``wandb sync`` command instead). These
tables are the whole list: nothing else is silenced anywhere, and warnings about real problems are left alone.

``run.log_level: detailed`` silences nothing: :func:`configure_console` and :func:`quiet_wandb_environment` with
``quiet=False`` undo what an earlier call did. The CLI (:class:`probe.cli.ProbeCLI`) calls them; the W&B logger's own
settings are adjusted in :func:`callbacks.wandb_report.prepare_wandb_loggers`.
"""

from __future__ import annotations

import logging
import os
import re
import sys
import warnings

# Lightning's per-run chatter at INFO level: {logger name: regexes matched at the start of the message}. None of it
# is a problem: device availability (the run's accelerator is in config.yaml), tips to install Lightning's cloud
# products, the seed (in config.yaml), the CUDA_VISIBLE_DEVICES of each rank, the TF32 advice (which would change
# the numbers this tool checks), the normal end of a fit, the DDP start-up banner, and GRPOModule's own checkpoint
# callback replacing the Trainer's default one.
LIGHTNING_BOILERPLATE: dict[str, tuple[str, ...]] = {
    "lightning.pytorch.utilities.rank_zero": (
        r"(GPU|TPU|HPU) available:",
        "\N{ELECTRIC LIGHT BULB} Tip:",
        r"You are using a CUDA device",
        r"`Trainer.fit` stopped: `max_(steps|epochs)=",
        r"-+\ndistributed_backend=",
        r"The following callbacks returned in `LightningModule.configure_callbacks` will override existing "
        r"callbacks passed to Trainer: ModelCheckpoint$",
    ),
    "lightning.fabric.utilities.seed": (r"(\[rank: \d+\] )?Seed set to",),
    "lightning.pytorch.accelerators.cuda": (r"LOCAL_RANK: \d+ - CUDA_VISIBLE_DEVICES",),
    "lightning.fabric.utilities.distributed": (r"Initializing distributed:",),
}
LIGHTNING_BOILERPLATE["lightning.fabric.utilities.rank_zero"] = LIGHTNING_BOILERPLATE[
    "lightning.pytorch.utilities.rank_zero"
]  # Fabric's rank_zero_info logs here until lightning.pytorch is imported

# Python warnings every run raises that are no problem of the run: (regex at the start of the message, category).
BOILERPLATE_WARNINGS: tuple[tuple[str, type[Warning]], ...] = (
    # torch 2.13 deprecates the LeafSpec that Lightning 2.6's own pytree helper still builds
    (r"`isinstance\(treespec, LeafSpec\)` is deprecated", FutureWarning),
    # fit's prompt stream (datamodules.prompts) loads with num_workers=0, where the warning does not apply
    (r"Your `IterableDataset` has `__len__` defined", UserWarning),
    # GRPOModule keeps the policy in eval mode on purpose (no dropout; probe.grpo's docstring)
    (r"Found \d+ module\(s\) in eval mode at the start of training", UserWarning),
)

# W&B settings (environment variables) of an offline run at log_level standard: no banner, no "sync this run"
# footer, no info lines; its warnings and errors still show. The CLI prints one line naming the run folder and the
# `wandb sync` command instead. A variable the user set is kept.
WANDB_QUIET = {"WANDB_QUIET": "true", "WANDB_SHOW_INFO": "false"}


class _DropBoilerplate(logging.Filter):
    def __init__(self, patterns: tuple[str, ...]) -> None:
        super().__init__()
        self.pattern = re.compile("|".join(f"(?:{p})" for p in patterns))

    def filter(self, record: logging.LogRecord) -> bool:
        return self.pattern.match(record.getMessage()) is None


_FILTERS = {name: _DropBoilerplate(patterns) for name, patterns in LIGHTNING_BOILERPLATE.items()}
_WANDB_SET: set[str] = set()  # the W&B variables this process set (so that a detailed run can unset them)
_HF_BARS_OFF = False  # whether this process turned transformers' progress bars off (so that a detailed run undoes it)


def console_is_terminal() -> bool:
    """Whether stderr (where progress goes) is an interactive terminal."""
    try:
        return sys.stderr.isatty()
    except (AttributeError, ValueError):  # replaced or closed stream
        return False


def configure_console(quiet: bool) -> None:
    """Silence (``quiet``) or restore the per-run boilerplate of Lightning, Python warnings, transformers' progress
    bars (these only off a terminal) and the INFO lines of DDP ranks other than 0. Idempotent; a later call with
    ``quiet=False`` undoes an earlier one."""
    global _HF_BARS_OFF
    for name, drop in _FILTERS.items():
        (logging.getLogger(name).addFilter if quiet else logging.getLogger(name).removeFilter)(drop)
    for message, category in BOILERPLATE_WARNINGS:
        if quiet:
            warnings.filterwarnings("ignore", message=message, category=category)
        else:
            warnings.filters[:] = [
                f for f in warnings.filters if not (f[0] == "ignore" and f[1] is not None and f[1].pattern == message)
            ]
    # The other DDP ranks would repeat rank 0's stage lines: they keep their warnings only.
    from lightning.fabric.utilities.rank_zero import rank_zero_only

    other_rank = getattr(rank_zero_only, "rank", 0) != 0
    logging.getLogger("probe").setLevel(logging.WARNING if quiet and other_rank else logging.NOTSET)
    from transformers.utils import logging as hf_logging

    if quiet and not console_is_terminal():
        if hf_logging.is_progress_bar_enabled():
            hf_logging.disable_progress_bar()  # "Loading weights" / "Writing model shards" bars, written as lines
            _HF_BARS_OFF = True
    elif not quiet and _HF_BARS_OFF:  # only what this process turned off: a user's own setting stays
        hf_logging.enable_progress_bar()
        _HF_BARS_OFF = False


def quiet_wandb_environment(quiet: bool, offline: bool) -> None:
    """Set :data:`WANDB_QUIET` (``quiet`` and an ``offline`` W&B run; a variable the user set is kept), or with
    ``quiet=False`` unset what an earlier call set. Called before the W&B run starts: W&B reads them then."""
    for name, value in WANDB_QUIET.items():
        if quiet and offline and name not in os.environ:
            os.environ[name] = value
            _WANDB_SET.add(name)
        elif not quiet and name in _WANDB_SET:
            os.environ.pop(name, None)
            _WANDB_SET.discard(name)
