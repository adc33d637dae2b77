"""``python -m probe predict|fit --config ...`` through LightningCLI, and ``python -m probe analyze RUN_DIR``.

The console (section "What a run prints" of the README): at ``run.log_level: standard`` a run prints one line per
stage, its warnings and the result table; progress is a bar on a terminal and a line per 10% otherwise
(:mod:`callbacks.progress`). What libraries print on every run without it being a problem is silenced by
:mod:`probe.console` (the list, and why) and :func:`callbacks.wandb_report.prepare_wandb_loggers`, which
:class:`ProbeCLI` calls; ``run.log_level: detailed`` silences nothing.
"""

from __future__ import annotations

import logging
import os
import sys
from typing import Any

from lightning.pytorch.cli import LightningCLI, SaveConfigCallback

from probe.console import configure_console, quiet_wandb_environment
from probe.live_contract import OwnsRunDirectory
from probe.memory import return_freed_memory_to_os
from probe.rundir import default_run_name


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
    from probe.loading import gpus_available, no_gpu_error

    available = gpus_available()
    if available == 0:
        raise no_gpu_error(
            f"--trainer.accelerator {accelerator}", "run on CPU with --trainer.accelerator cpu (or auto)"
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


MAX_CONFIG_NODES = 100_000  # YAML nodes of one config once its aliases are expanded; configs/toy.yaml has ~130


def expanded_yaml_nodes(text: str, limit: int = MAX_CONFIG_NODES) -> tuple[int, int] | None:
    """``(nodes with every alias expanded, capped at limit + 1; nodes as written)`` of a YAML document, None when it
    is not one (the parser reports that); ``(limit + 1, 0)`` for an alias that refers to itself (unbounded).
    Composing does not expand aliases (a shared node stands for each), so this costs time linear in the text even
    for an alias bomb."""
    import yaml

    try:
        root = yaml.compose(text, Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))
    except yaml.YAMLError:
        return None
    if root is None:
        return 0, 0

    def children(node: yaml.Node) -> list[yaml.Node]:
        if isinstance(node, yaml.MappingNode):
            return [n for pair in node.value for n in pair]
        return list(node.value) if isinstance(node, yaml.SequenceNode) else []

    size: dict[int, int] = {}  # id(node) -> nodes below it, itself included, aliases expanded (capped)
    open_nodes: set[int] = set()  # on the current path: meeting one again is a recursive alias
    stack: list[tuple[yaml.Node, bool]] = [(root, False)]
    while stack:
        node, finished = stack.pop()
        if finished:
            size[id(node)] = min(limit + 1, 1 + sum(size[id(c)] for c in children(node)))
            open_nodes.discard(id(node))
        elif id(node) in open_nodes:
            return limit + 1, 0  # (0 as written: the caller names a recursive alias)
        elif id(node) not in size:
            open_nodes.add(id(node))
            stack.append((node, True))
            stack.extend((c, False) for c in children(node) if id(c) not in size)
    return size[id(root)], len(size)


def check_config_sizes(argv: list[str], limit: int = MAX_CONFIG_NODES) -> None:
    """Refuse, before jsonargparse parses it, a config (``--config``/``-c`` file or text, or an option's YAML value
    with anchors) whose YAML aliases expand to more than ``limit`` nodes: an alias bomb ("billion laughs") is read
    by PyYAML as shared objects, but jsonargparse copies and prints it node by node (a 9 x 9 bomb of 1 KB ran for a
    minute and ended in MemoryError at 3.5 GB). Prints the error and exits with status 2, as the parser does."""
    from pathlib import Path

    for i, arg in enumerate(argv):
        name, value = arg, None
        if arg.startswith("--") and "=" in arg:
            name, value = arg.split("=", 1)
        elif i + 1 < len(argv):
            value = argv[i + 1]
        if value is None or not name.startswith("-"):
            continue
        is_config = name in ("--config", "-c")
        if not is_config and not ("&" in value and "*" in value):  # no anchor and alias: nothing to expand
            continue
        where, text = f"the value of {name}", value
        if is_config:
            try:
                path = Path(value).expanduser()
                if path.is_file():
                    where, text = f"the config file {value}", path.read_text(errors="replace")
            except (OSError, ValueError):  # not a path (e.g. YAML text too long for a file name): checked as text
                pass
        counted = expanded_yaml_nodes(text, limit)
        if counted is not None and counted[0] > limit:
            held = f"it holds {counted[1]:,} as written" if counted[1] else "an alias refers to itself (&a ... *a)"
            print(
                f"python -m probe: error: {where} expands to more than {limit:,} YAML nodes once its aliases (*name) "
                f"are expanded ({held}): an alias bomb, or a config far larger than any "
                "probe config (configs/toy.yaml has about 130), which the config parser would copy node by node "
                "until memory runs out. Fix: write the repeated values out instead of nesting aliases, or check that "
                "this is the config you meant",
                file=sys.stderr,
            )
            raise SystemExit(2)


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
        # Written against Lightning 2.6.6's LightningCLI._add_subcommands, whose private contract it relies on: the
        # subcommand parsers go in `self._subcommand_parsers` (read by `_parser()` when the Trainer, the config
        # callback and the optimizers are set up), `_prepare_subcommand_parser(klass, subcommand, **kwargs)` builds
        # one and records the Trainer method's arguments (`--ckpt_path`, ...) for `_run_subcommand`, and
        # `self.trainer_class` is a class (Lightning's `class_from_function` for a builder function is dropped:
        # ProbeCLI always uses Trainer). If a Lightning upgrade renames or re-signs any of these, `--help` fails
        # (TypeError), a subcommand loses its method options, or every run fails in `_parser()` (AttributeError or
        # KeyError); tests/test_console.py's help test checks all three.
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
        W&B run, unless it is a fit that made an optimizer step) and, off a terminal,
        :class:`callbacks.progress.StepProgress` as the progress bar of a fit (unless the progress bar is off or the
        config names one)."""
        from lightning.pytorch.callbacks.progress.progress_bar import ProgressBar

        from callbacks.progress import StepProgress
        from callbacks.wandb_report import DiscardFailedOfflineRun
        from probe.console import console_is_terminal

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
        """Before the W&B run starts: :func:`callbacks.wandb_report.prepare_wandb_loggers`, then, for an offline run
        at log_level standard, W&B's quiet settings (:func:`probe.console.quiet_wandb_environment`)."""
        from callbacks.wandb_report import prepare_wandb_loggers

        quiet_wandb_environment(quiet, offline=prepare_wandb_loggers(self.trainer.loggers, quiet))

    def after_predict(self) -> None:
        self.report_wandb()

    def before_fit(self) -> None:
        """Refuse a resume whose checkpoint the run would delete first (``run.overwrite`` with ``--ckpt_path``
        inside the run folder): the module checks, before Lightning sets up."""
        check = getattr(self.model, "check_resume_source", None)
        if callable(check):
            check(self.config_init[self.subcommand].get("ckpt_path"))

    def after_fit(self) -> None:
        self.report_wandb()

    def report_wandb(self) -> None:
        """:func:`callbacks.wandb_report.report_offline_runs`: finish each offline W&B run, one line naming it."""
        from callbacks.wandb_report import report_offline_runs

        report_offline_runs(self.trainer.loggers)


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
    check_config_sizes(argv)
    return_freed_memory_to_os()  # a long run's resident set stays that of its live tensors (probe/memory.py)
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
