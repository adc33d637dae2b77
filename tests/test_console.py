"""What a run prints: a short console off a terminal (one line per stage, at most ten progress lines, the table
last, no library boilerplate; ``run.log_level: detailed`` silences nothing, for predict and fit), the W&B offline
run kept for a finished run and for a fit that failed after an optimizer step, deleted for any other failed run,
and a ``--help`` that lists the subcommands that do something."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest

from callbacks.progress import CoarseProgress
from probe.cli import main
from probe.report import format_table

from support import fit_args, predict_args, read_summary

# Lines a run must not print at log_level standard (Lightning's and W&B's per-run boilerplate).
BOILERPLATE = (
    "Tip:",
    "GPU available",
    "TPU available",
    "LOCAL_RANK",
    "Seed set to",
    "LeafSpec",
    "anonymous setting",
    "git root",
    "wandb: Tracking run",
    "You can sync this run",
    "Loading weights",
)


def wandb_logger(save_dir: Path) -> str:
    return f"{{class_path: lightning.pytorch.loggers.WandbLogger, init_args: {{save_dir: {save_dir}, offline: true}}}}"


def offline_runs(save_dir: Path) -> list[Path]:
    return sorted((save_dir / "wandb").glob("offline-run-*"))


@pytest.fixture(scope="module")
def console_run(tmp_path_factory, toy_world_dir) -> tuple[Path, str]:
    """A small toy predict run with an offline W&B logger, in a subprocess whose stdout and stderr go to a pipe
    (not a terminal), with the W&B environment of a user (no WANDB_SILENT); its run directory and its console."""
    root = tmp_path_factory.mktemp("console")
    env = {k: v for k, v in os.environ.items() if k not in ("WANDB_SILENT", "WANDB_QUIET", "WANDB_SHOW_INFO")}
    env.pop("PROBE_RUN_NAME", None)
    env["WANDB_MODE"] = "offline"
    args = predict_args(root, "run", "--trainer.logger", wandb_logger(root / "wb"))
    out = subprocess.run(
        [sys.executable, "-m", "probe", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        cwd=root,
        env=env,
        timeout=600,
    )
    assert out.returncode == 0, out.stdout[-3000:]
    return root, out.stdout


def test_the_console_off_a_terminal_is_one_line_per_stage_and_the_table(console_run):
    root, console = console_run
    summary = read_summary(root / "run")
    table = format_table(summary["evals"], summary["plan"]["etas"])
    assert table in console, "the result table is printed whole"
    assert "\r" not in console, "no carriage-return progress bar off a terminal"
    progress = [line for line in console.splitlines() if "probing: " in line and "% (" in line]
    assert 1 <= len(progress) <= 10 and progress[-1].split("probing: ")[1].startswith("100%")
    for text in BOILERPLATE:
        assert text not in console, f"boilerplate printed: {text!r}"
    # Budget: the table, up to 10 progress lines (~80 bytes), and ~15 lines of stages, choices made automatically,
    # warnings and where things are (~250 bytes each). Before: a tqdm bar writing a line 10 times a second and ~15
    # lines of Lightning and W&B banners.
    rest = console.replace(table, "")
    assert len(rest.splitlines()) <= 10 + 15, rest
    assert len(rest.encode()) <= 10 * 80 + 15 * 250, rest


def test_a_finished_run_keeps_one_offline_wandb_run_and_names_it(console_run):
    root, console = console_run
    (run,) = offline_runs(root / "wb")
    assert list(run.rglob("*.wandb")), "the offline run holds its event log for `wandb sync`"
    assert f"wandb sync {run}" in console or f"wandb sync {os.path.relpath(run, root)}" in console


def test_a_failed_run_leaves_no_offline_wandb_run(tmp_path, monkeypatch, toy_world_dir):
    """eta = 1e39 is refused when the run starts (the update's dtype cannot hold it), after Lightning started W&B."""
    monkeypatch.setenv("WANDB_MODE", "offline")
    for name, value in (("WANDB_QUIET", "true"), ("WANDB_SHOW_INFO", "false")):
        monkeypatch.setenv(name, value)  # restored after the test, as the CLI would set them
    save_dir = tmp_path / "wb"
    args = predict_args(tmp_path, "failed", "--trainer.logger", wandb_logger(save_dir))
    with pytest.raises(ValueError, match="probe.etas reaches 1e\\+39"):
        main([*args, "--model.init_args.probe.etas", "[0.0003, 1e39]"])
    assert save_dir.is_dir(), "the W&B run had been started"
    assert offline_runs(save_dir) == []
    assert [p.name for p in (save_dir / "wandb").iterdir()] == [], "nor links into the deleted run"


def test_help_lists_predict_fit_and_analyze_only(capsys):
    """Also what ProbeCLI._add_subcommands takes from Lightning's internals (see its comment): each subcommand
    parser keeps the Trainer method's own options, and Lightning still finds the parsers in `_subcommand_parsers`."""
    import inspect

    from lightning.pytorch.cli import LightningCLI

    from probe.cli import SUBCOMMAND_HELP

    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert "{predict,fit,analyze}" in out
    assert "validate" not in out and not any(line.split()[:1] == ["test"] for line in out.splitlines())
    assert " ".join(SUBCOMMAND_HELP["fit"].split()) in " ".join(out.split()), "probe's help line, not Lightning's"
    for name in ("predict", "fit"):
        with pytest.raises(SystemExit) as exit_info:
            main([name, "--help"])
        assert exit_info.value.code == 0
        out = capsys.readouterr().out
        assert "--ckpt_path" in out and "--model" in out and "--trainer" in out, out[:2000]
    assert "self._subcommand_parsers[" in inspect.getsource(LightningCLI._parser), "Lightning reads another name"
    with pytest.raises(SystemExit) as exit_info:
        main(["analyze", "--help"])
    assert exit_info.value.code == 0
    assert "run_dir" in capsys.readouterr().out


def test_a_fit_that_failed_after_an_optimizer_step_keeps_its_offline_wandb_run(
    tmp_path, monkeypatch, caplog, toy_world_dir
):
    """Its training curves are worth keeping (an OOM, Ctrl+C or preemption hours in): the run is kept and named."""
    from probe.grpo import GRPOModule

    monkeypatch.setenv("WANDB_MODE", "offline")
    for name, value in (("WANDB_QUIET", "true"), ("WANDB_SHOW_INFO", "false")):
        monkeypatch.setenv(name, value)  # restored after the test, as the CLI would set them
    monkeypatch.delenv("PROBE_RUN_NAME", raising=False)  # restored after the test
    real_step = GRPOModule.training_step

    def fail_at_the_second_step(self, batch, batch_idx):
        if self.trainer.global_step >= 1:
            raise RuntimeError("injected failure after an optimizer step")
        return real_step(self, batch, batch_idx)

    monkeypatch.setattr(GRPOModule, "training_step", fail_at_the_second_step)
    save_dir = tmp_path / "wb"
    small = ["--trainer.callbacks", "[]", "--trainer.max_steps", "3", "--data.init_args.prompts_per_step", "2"]
    no_files = ["--model.init_args.save_policy", "false", "--model.init_args.checkpoint_every_n_steps", "0"]
    args = fit_args(tmp_path, "failed", *small, *no_files, "--trainer.logger", wandb_logger(save_dir))
    with caplog.at_level(logging.INFO):  # the root's level: the CLI resets probe's own (probe.console)
        with pytest.raises(RuntimeError, match="injected failure"):
            main(args)
    (run,) = offline_runs(save_dir)
    assert list(run.rglob("*.wandb")), "the offline run holds its event log for `wandb sync`"
    kept = [r.getMessage() for r in caplog.records if "kept the offline run of the failed fit" in r.getMessage()]
    assert len(kept) == 1 and "(optimizer steps logged: 1)" in kept[0] and run.name in kept[0], kept


def test_fit_at_log_level_detailed_silences_nothing(tmp_path, monkeypatch, toy_world_dir):
    """fit reads run.log_level as predict does: Lightning's seed line shows at detailed only (each fit stops at
    its missing policy, after the seed was set)."""
    from probe.console import configure_console

    monkeypatch.delenv("PROBE_RUN_NAME", raising=False)  # restored after the test
    seen: list[str] = []
    handler = logging.Handler()
    handler.emit = lambda record: seen.append(record.getMessage())
    seed_logger = logging.getLogger("lightning.fabric.utilities.seed")
    seed_logger.addHandler(handler)
    level = seed_logger.level
    seed_logger.setLevel(logging.INFO)
    missing = ["--model.init_args.policy.path", str(tmp_path / "no_policy")]

    def seed_lines(log_level: str) -> list[str]:
        seen.clear()
        with pytest.raises(Exception, match="no_policy"):
            main(fit_args(tmp_path, log_level, *missing, "--model.init_args.run.log_level", log_level))
        return [line for line in seen if "Seed set to" in line]

    try:
        assert seed_lines("standard") == []
        assert seed_lines("detailed") == ["Seed set to 0"]
    finally:
        configure_console(quiet=True)  # what every standard CLI run sets
        seed_logger.removeHandler(handler)
        seed_logger.setLevel(level)


def test_coarse_progress_logs_one_line_per_tenth(caplog):
    progress = CoarseProgress(total=96, what="probing", unit="passes")
    with caplog.at_level(logging.INFO, logger="probe"):
        for _ in range(96 * 4):
            progress.update(0.25)  # fractional ticks, as the engine's
    lines = [r.getMessage() for r in caplog.records]
    assert [line.split()[1] for line in lines] == [f"{p}%" for p in range(10, 101, 10)]
    assert lines[-1].startswith("probing: 100% (96/96 passes, ")


def test_lightning_boilerplate_is_dropped_and_detailed_brings_it_back(monkeypatch):
    """The messages a GPU run logs (no GPU needed: they are sent through the loggers Lightning sends them through)."""
    import warnings

    from lightning.pytorch.utilities.rank_zero import rank_zero_info

    from probe.console import configure_console

    seen: list[str] = []
    handler = logging.Handler()
    handler.emit = lambda record: seen.append(record.getMessage())
    names = ("lightning.pytorch.utilities.rank_zero", "lightning.pytorch.accelerators.cuda")
    for name in names:
        logging.getLogger(name).addHandler(handler)

    def run(quiet: bool) -> list[str]:
        configure_console(quiet=quiet)
        seen.clear()
        rank_zero_info("GPU available: True (cuda), used: True")
        rank_zero_info("You are using a CUDA device ('NVIDIA H200') that has Tensor Cores. To properly utilize them")
        rank_zero_info("Restoring states from the checkpoint path at last.ckpt")  # kept: says what the run does
        logging.getLogger("lightning.pytorch.accelerators.cuda").info("LOCAL_RANK: 0 - CUDA_VISIBLE_DEVICES: [0]")
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            configure_console(quiet=quiet)  # after simplefilter: its filters come first
            warnings.warn("`isinstance(treespec, LeafSpec)` is deprecated, use ...", FutureWarning, stacklevel=1)
            warnings.warn("something else is deprecated", FutureWarning, stacklevel=1)
        return seen + [str(w.message) for w in caught]

    from transformers.utils import logging as hf_logging

    monkeypatch.setattr("probe.console.console_is_terminal", lambda: False)
    try:
        hf_logging.enable_progress_bar()
        assert run(quiet=True) == [
            "Restoring states from the checkpoint path at last.ckpt",
            "something else is deprecated",
        ]
        assert not hf_logging.is_progress_bar_enabled(), "transformers' bars are off off a terminal"
        assert len(run(quiet=False)) == 6  # run.log_level detailed: nothing silenced
        assert hf_logging.is_progress_bar_enabled(), "and back on"
    finally:
        configure_console(quiet=True)  # what every standard CLI run sets
        for name in names:
            logging.getLogger(name).removeHandler(handler)


def test_a_wandb_run_the_user_started_is_never_deleted(tmp_path, monkeypatch):
    import types

    from lightning.pytorch.loggers import WandbLogger

    import callbacks.wandb_report as report

    class OfflineRun:  # what wandb.run is after the user's own wandb.init(mode="offline")
        offline, disabled = True, False
        sync_dir = str(tmp_path / "wandb" / "offline-run-20261128_120000-user")

        def finish(self, exit_code=0):
            raise AssertionError("the user's run was finished by probe")

    (tmp_path / "wandb" / "offline-run-20261128_120000-user").mkdir(parents=True)
    monkeypatch.setitem(sys.modules, "wandb", types.SimpleNamespace(run=OfflineRun()))
    adopted = WandbLogger(save_dir=str(tmp_path), offline=True)
    report.prepare_wandb_loggers([adopted], quiet=True)  # a run is in progress: the logger will adopt it
    adopted._experiment = sys.modules["wandb"].run
    assert report.discard_offline_run(adopted) is None
    assert (tmp_path / "wandb" / "offline-run-20261128_120000-user").is_dir()
