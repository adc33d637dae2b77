"""What a run prints: a short console off a terminal (one line per stage, at most ten progress lines, the table
last, no library boilerplate), the W&B offline run kept for a finished run and deleted for a failed one, and a
``--help`` that lists the subcommands that do something."""

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

from support import predict_args, read_summary

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
    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert "{predict,fit,analyze}" in out
    assert "validate" not in out and not any(line.split()[:1] == ["test"] for line in out.splitlines())
    with pytest.raises(SystemExit) as exit_info:
        main(["analyze", "--help"])
    assert exit_info.value.code == 0
    assert "run_dir" in capsys.readouterr().out


def test_coarse_progress_logs_one_line_per_tenth(caplog):
    progress = CoarseProgress(total=96, what="probing", unit="passes")
    with caplog.at_level(logging.INFO, logger="probe"):
        for _ in range(96 * 4):
            progress.update(0.25)  # fractional ticks, as the engine's
    lines = [r.getMessage() for r in caplog.records]
    assert [line.split()[1] for line in lines] == [f"{p}%" for p in range(10, 101, 10)]
    assert lines[-1].startswith("probing: 100% (96/96 passes, ")


def test_lightning_boilerplate_is_dropped_and_detailed_brings_it_back():
    """The messages a GPU run logs (no GPU needed: they are sent through the loggers Lightning sends them through)."""
    import warnings

    from lightning.pytorch.utilities.rank_zero import rank_zero_info

    from probe.cli import configure_console

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

    try:
        assert run(quiet=True) == [
            "Restoring states from the checkpoint path at last.ckpt",
            "something else is deprecated",
        ]
        assert len(run(quiet=False)) == 6  # run.log_level detailed: nothing silenced
    finally:
        configure_console(quiet=True)  # what every standard CLI run sets
        for name in names:
            logging.getLogger(name).removeHandler(handler)
