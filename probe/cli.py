"""``python -m probe predict|fit --config ...`` through LightningCLI, and ``python -m probe analyze RUN_DIR``.

The console (section "What a run prints" of the README): at ``run.log_level: standard`` a run prints one line per
stage, its warnings and the result table; progress is a bar on a terminal and a line per 10% otherwise
(:mod:`callbacks.progress`). What libraries print on every run without it being a problem (Lightning's device and
seed lines and tips, W&B's offline-mode banner, version-mismatch deprecations) is silenced here, in
:func:`configure_console` and :meth:`ProbeCLI.quiet_wandb`, and nowhere else; ``run.log_level: detailed`` silences
nothing. Warnings about real problems are left alone.
"""

from __future__ import annotations

import logging
import os
import re
import sys
import warnings
from pathlib import Path
from typing import Any

from lightning.pytorch.cli import LightningCLI, SaveConfigCallback

from probe.live_contract import OwnsRunDirectory
from probe.rundir import default_run_name

log = logging.getLogger("probe")

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


def configure_console(quiet: bool) -> None:
    """Silence (``quiet``) or restore the per-run boilerplate of Lightning, Python warnings, transformers' progress
    bars (these only off a terminal) and the INFO lines of DDP ranks other than 0. Idempotent; a later call with
    ``quiet=False`` undoes an earlier one."""
    from callbacks.progress import console_is_terminal

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
    if quiet and not console_is_terminal():
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()  # "Loading weights" / "Writing model shards" bars, written as lines


class SaveRunConfig(SaveConfigCallback):
    """Save the resolved config as ``config.yaml`` in the run directory (rank 0)."""

    def __init__(self, *args, **kwargs):
        kwargs["save_to_log_dir"] = False
        super().__init__(*args, **kwargs)

    def save_config(self, trainer, pl_module, stage: str) -> None:
        """Called by Lightning on rank 0 only, after the DataModule's setup opened the run directory."""
        run_dir = pl_module.run_directory() if isinstance(pl_module, OwnsRunDirectory) else None
        if run_dir is not None:
            self.parser.save(
                self.config, str(run_dir / self.config_filename), skip_none=False, overwrite=True, multifile=False
            )


def check_gpu_request(trainer_cfg) -> None:
    """Refuse ``--trainer.accelerator gpu`` without a usable GPU, or more GPUs than the machine has, naming the fix.

    (Lightning runs any number of CPU processes, ``--trainer.devices N`` on CPU is allowed: it only oversubscribes.)
    """
    accelerator = str((trainer_cfg.get("accelerator") if hasattr(trainer_cfg, "get") else None) or "auto").lower()
    if accelerator not in ("gpu", "cuda"):
        return
    import torch

    available = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if available == 0:
        raise ValueError(
            f"--trainer.accelerator {accelerator} asks for a GPU but torch sees none on this machine (torch "
            f"{torch.__version__}, CUDA build: {torch.version.cuda or 'none'}). Fix: run on CPU with "
            "--trainer.accelerator cpu (or auto), or on a machine with a CUDA GPU and a CUDA build of torch"
        )
    devices = trainer_cfg.get("devices", "auto")
    text = str(devices).strip("[]() ")
    if isinstance(devices, (list, tuple)) or "," in text:  # device indices
        needed = max(int(d) for d in text.split(",") if d.strip()) + 1
    elif text.isdigit():
        needed = int(text)
    else:  # "auto", "-1": all of them
        return
    if needed > available:
        raise ValueError(
            f"--trainer.devices {devices} needs {needed} GPUs but this machine has {available}. "
            f"Fix: pass --trainer.devices {available} (or fewer), or run on a machine with more GPUs"
        )


class ProbeCLI(LightningCLI):
    @staticmethod
    def subcommands() -> dict[str, set[str]]:
        """``predict`` and ``fit`` only: a probe run has nothing to validate or test (``analyze`` is dispatched by
        :func:`main` before LightningCLI parses; :meth:`_add_subcommands` lists it in ``--help``)."""
        return {
            "predict": {"model", "dataloaders", "datamodule"},
            "fit": {"model", "train_dataloaders", "val_dataloaders", "datamodule"},
        }

    def _add_subcommands(self, parser, **kwargs: Any) -> None:
        """LightningCLI's, with probe's help line for each subcommand (not the Trainer method's docstring), and
        ``analyze``: dispatched by :func:`main` before LightningCLI parses, listed here so that ``--help`` names it."""
        self._subcommand_parsers = {}
        subcommands = parser.add_subcommands()
        for name, help_text in SUBCOMMAND_HELP.items():
            if name in self.subcommands():
                sub = self._prepare_subcommand_parser(
                    self.trainer_class, name, **{"description": help_text, **kwargs.get(name, {})}
                )
                self._subcommand_parsers[name] = sub
            else:
                sub = self.init_parser(description=help_text)
            subcommands.add_subcommand(name, sub, help=help_text)

    def run_settings(self) -> Any:
        """The parsed ``model.init_args.run`` (None when the model has none)."""
        cfg = self.config.get(str(self.config.get("subcommand")), self.config)
        return cfg.get("model", {}).get("init_args", {}).get("run") if hasattr(cfg, "get") else None

    def log_level(self) -> str:
        run = self.run_settings()
        if run is None:
            return "standard"
        level = getattr(run, "log_level", None)
        return level or (run.get("log_level", "standard") if hasattr(run, "get") else "standard")

    def parse_arguments(self, parser, args) -> None:
        super().parse_arguments(parser, args)
        configure_console(quiet=self.log_level() != "detailed")  # before the seed is set: it logs

    def instantiate_classes(self) -> None:
        """Instantiate the classes; a check inside one of them (e.g. a missing policy directory) surfaces as its own
        error, not wrapped in jsonargparse's "Does not validate against any of the Union subtypes" and a config dump."""
        try:
            super().instantiate_classes()
        except ValueError as e:
            inner = e.__cause__ or e.__context__
            if "Does not validate against any of the Union subtypes" in str(e) and isinstance(inner, Exception):
                raise inner from None
            raise

    def before_instantiate_classes(self) -> None:
        if self.subcommand == "analyze":  # reached only when options come before it: `-c x.yaml analyze`
            self.parser.error("analyze reads a run directory, not a config: python -m probe analyze RUN_DIR")
        # One run name for every DDP process: children inherit the environment of the launcher.
        os.environ["PROBE_RUN_NAME"] = default_run_name()
        cfg = self.config.get(self.subcommand, self.config)
        check_gpu_request(cfg.get("trainer") if hasattr(cfg, "get") else None)
        logging.basicConfig(
            level=logging.DEBUG if self.log_level() == "detailed" else logging.INFO,
            format="%(asctime)s %(levelname)s %(name)s: %(message)s",
            datefmt="%H:%M:%S",
        )

    def instantiate_trainer(self, **kwargs: Any):
        """The Trainer, plus :class:`callbacks.wandb_report.DiscardFailedOfflineRun` (a failed run leaves no offline
        W&B run) and, off a terminal, :class:`callbacks.progress.StepProgress` as the progress bar of a fit (unless
        the progress bar is off or the config names one)."""
        from lightning.pytorch.callbacks.progress.progress_bar import ProgressBar

        from callbacks.progress import StepProgress, console_is_terminal
        from callbacks.wandb_report import DiscardFailedOfflineRun

        config = self.config_init.get(str(self.subcommand), self.config_init).get("trainer", {})
        given = kwargs.get("callbacks", config.get("callbacks"))
        callbacks = list(given) if isinstance(given, (list, tuple)) else [] if given is None else [given]
        callbacks.append(DiscardFailedOfflineRun())
        bar_wanted = config.get("enable_progress_bar") is not False
        if bar_wanted and not console_is_terminal() and not any(isinstance(c, ProgressBar) for c in callbacks):
            callbacks.append(StepProgress())
        return super().instantiate_trainer(**{**kwargs, "callbacks": callbacks})

    def after_instantiate_classes(self) -> None:
        self.quiet_wandb(self.log_level() != "detailed")

    def quiet_wandb(self, quiet: bool) -> None:
        """Before the W&B run starts (Lightning starts it at setup): make its folder (W&B warns "git root ... does
        not exist" when it is missing) and, for an offline run at log_level standard, drop the banner and footer
        (:data:`WANDB_QUIET`) and the deprecated ``anonymous`` argument that Lightning always passes (W&B warns that
        it has no effect)."""
        from lightning.pytorch.loggers import WandbLogger

        loggers = [lg for lg in self.trainer.loggers if isinstance(lg, WandbLogger)]
        for lg in loggers:
            if lg.save_dir:
                os.makedirs(lg.save_dir, exist_ok=True)
            init = getattr(lg, "_wandb_init", None)
            if quiet and isinstance(init, dict) and "anonymous" in init and init["anonymous"] is None:
                del init["anonymous"]
        offline = os.environ.get("WANDB_MODE") in ("offline", "dryrun") or any(lg._offline for lg in loggers)
        for name, value in WANDB_QUIET.items():
            if quiet and offline and name not in os.environ:
                os.environ[name] = value
                _WANDB_SET.add(name)
            elif not quiet and name in _WANDB_SET:
                os.environ.pop(name, None)
                _WANDB_SET.discard(name)

    def after_predict(self) -> None:
        self.report_wandb()

    def after_fit(self) -> None:
        self.report_wandb()

    def report_wandb(self) -> None:
        """Finish each offline W&B run of a finished run (else W&B's exit hook prints its footer whatever the
        settings) and say in one line where it is and the command that uploads it."""
        from lightning.pytorch.loggers import WandbLogger

        from callbacks.wandb_report import offline_run_dir

        for lg in self.trainer.loggers:
            folder = offline_run_dir(lg) if isinstance(lg, WandbLogger) else None
            if folder is not None:
                lg.experiment.finish()
                shown = os.path.relpath(folder) if folder.is_relative_to(Path.cwd()) else str(folder)
                log.info("W&B: offline run in %s; upload it with `wandb sync %s`", shown, shown)


SUBCOMMAND_HELP = {  # the order of `python -m probe --help`
    "predict": "Probe one RL step: reconstruct the next AdamW step, measure and predict the entropy change over a "
    "sweep of step sizes, attribute it to the update's sequences (configs/toy.yaml).",
    "fit": "Train with GRPO, the live entropy probe attached (configs/toy_grpo.yaml).",
    "analyze": "How linear the entropy change is in the step size, from a finished run: python -m probe analyze "
    "RUN_DIR (its own --help).",
}


def main(args: list[str] | None = None) -> ProbeCLI:
    argv = sys.argv[1:] if args is None else list(args)
    if argv[:1] == ["analyze"]:  # not a LightningCLI subcommand: dispatch before it parses
        from probe.analyze import main as analyze

        sys.exit(analyze(argv[1:]))
    os.environ.setdefault("WANDB_MODE", "offline")  # no network at run time; `wandb sync` uploads later
    return ProbeCLI(
        subclass_mode_model=True,
        subclass_mode_data=True,
        save_config_callback=SaveRunConfig,
        save_config_kwargs={"overwrite": True},
        parser_kwargs={
            "prog": "python -m probe",
            "description": "Why did my policy's entropy change? Probe one RL step (predict), or train with the "
            "probe attached (fit); analyze a finished run. Add --help after a subcommand for its options.",
        },
        args=args,
    )
