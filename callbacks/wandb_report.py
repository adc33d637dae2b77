"""Weights & Biases reporting through Lightning's ``WandbLogger`` (offline by default; ``wandb sync`` uploads later).

What a finished predict run sends (``teardown``, after every writer, so its place among the callbacks does not
matter; the tables are built by :mod:`probe.wandb_tables`):

* the scalar metrics of every evaluation batch (:func:`probe.results.metrics`, the keys the live probe logs too) in
  the run's **summary**, not its history: a predict run measures one update, so each would be a one-point line
  panel; in the summary they are columns of the project's runs table and what bar, scatter and parallel-coordinates
  panels compare across runs;
* per evaluation batch ``tables/<eval>/delta_h`` (one row per part x eta: eta, eta/lr, part, Delta H, SE, per
  token, ESS, first- and second-order prediction) and the line chart ``charts/<eval>/delta_h_vs_eta`` over the same
  numbers (x: eta / lr; one line per part for SNIS, first and second order; W&B keeps its data as
  ``charts/<eval>/delta_h_vs_eta_table``);
* ``update_sequences``: the update sequences with text, reward, advantage, attribution a_i, and, when the first
  evaluation batch holds them, the reward attribution r_i and the response's log-probability;
* with the per-token arrays (``update_tokens/*``): ``update_tokens``, one row per response token (text, a_{i,t},
  its share of a_i, the covariance term, log p, the sequence's advantage; the sequences with the largest |a_i|
  first, at most ``wandb.Table.MAX_ROWS`` rows), and ``html/update_top_sequences``, the top sequences with each
  token coloured by a_{i,t};
* the plots (``plots/<name>``) and the run directory as an artifact;
* the run's settings (``summary.json["config"]``) and its plan as the W&B run's config, so the runs table can
  filter and group runs by them.

All of it is logged in one history step. With no ``WandbLogger`` attached (or ``WANDB_MODE=disabled``) it does
nothing.

The CLI's W&B handling lives here too: :func:`prepare_wandb_loggers` before the W&B run starts (its folder, no
deprecated ``anonymous`` argument at log_level standard) and :func:`report_offline_runs` after a finished run (finish
the offline run, one line naming its folder and the ``wandb sync`` command).

A failed run leaves no offline W&B run behind when nothing worth keeping was logged: Lightning starts the W&B run at
the start of setup, so a run that stops with an error (bad input found at setup, a crash, Ctrl+C, SIGTERM) would
leave an ``offline-run-*`` folder that ``wandb sync`` would upload as if it were a result. A predict run logs only
at its end, so its failed run is always deleted; a fit is deleted only if it failed before its first optimizer step
(``trainer.global_step == 0``). A fit that failed later (out of memory, Ctrl+C, SIGTERM preemption hours in) keeps
its training curves: its W&B run is finished as failed and kept, and one line says where.
:class:`DiscardFailedOfflineRun` (which the CLI attaches to every run) and ``WandbReport`` do this, and delete only
an offline run that a logger the CLI prepared started itself (never a run begun with ``wandb.init`` before, which
Lightning's logger adopts; outside the CLI nothing is deleted), whose folder lies under the logger's ``save_dir``.
"""

from __future__ import annotations

import logging
import os
import shutil
import sys
import weakref
from pathlib import Path
from typing import Any, Callable

import lightning.pytorch as pl
from lightning.pytorch.loggers import WandbLogger
from lightning.pytorch.trainer.states import TrainerFn

from probe.results import metrics, update_metrics
from probe.run_state import PredictRunState, run_state_of
from probe.wandb_tables import (
    Table,
    UpdateTokens,
    check_tokens_match,
    delta_h_series,
    delta_h_table,
    largest_first,
    token_table,
    top_sequences_html,
    update_sequence_table,
)

log = logging.getLogger("probe")


def _decoders(tokenizer: Any) -> tuple[Callable[[list[int]], str], Callable[[list[int]], list[str]]]:
    """The tokenizer's text of a list of ids, and of each id alone (special tokens shown)."""

    def decode(ids: list[int]) -> str:
        return tokenizer.decode(ids, skip_special_tokens=False)

    def decode_tokens(ids: list[int]) -> list[str]:
        return tokenizer.batch_decode([[i] for i in ids], skip_special_tokens=False)

    return decode, decode_tokens


def update_tokens(state: PredictRunState) -> UpdateTokens | None:
    """The per-token arrays of the update batch in the first evaluation batch's result (None when not computed),
    checked against U's sequences."""
    records, first = state.require("inputs").update_records, state.require("result")[0]
    tokens = UpdateTokens.from_arrays(first.arrays, len(records))
    if tokens is not None:
        check_tokens_match(records, tokens)
    return tokens


def update_table(state: PredictRunState) -> Table:
    """Columns and rows of the update sequences: text, reward, advantage and attribution, and the reward attribution
    and log-probability where computed (first evaluation batch; :func:`probe.wandb_tables.update_sequence_table`)."""
    records, first = state.require("inputs").update_records, state.require("result")[0]
    decode, _ = _decoders(state.tokenizer)
    return update_sequence_table(records, first.arrays, decode, update_tokens(state))


def predict_media(state: PredictRunState) -> dict[str, Any]:
    """The W&B objects of a finished predict run by key (module docstring): tables, charts, HTML and plots."""
    import wandb

    plan, run_dir, evals = state.require("plan"), state.require("run_dir").path, state.require("result")
    media: dict[str, Any] = {}
    for ev in evals:
        table = delta_h_table(ev, list(plan.etas), plan.lr)
        media[f"tables/{ev.name}/delta_h"] = wandb.Table(columns=table[0], data=table[1])
        columns, rows = delta_h_series(table)
        media[f"charts/{ev.name}/delta_h_vs_eta"] = wandb.plot.line(
            wandb.Table(columns=columns, data=rows),
            x="eta/lr",
            y="delta_h",
            stroke="series",
            title=f"{ev.name}: Delta H (nats per sequence) vs eta / lr",
        )
    records, first, tokens = state.require("inputs").update_records, evals[0], update_tokens(state)
    decode, decode_tokens = _decoders(state.tokenizer)
    columns, rows = largest_first(
        update_sequence_table(records, first.arrays, decode, tokens), "attribution", wandb.Table.MAX_ROWS
    )
    media["update_sequences"] = wandb.Table(columns=columns, data=rows)
    if len(rows) < len(records):
        log.info(
            "W&B: update_sequences holds the %d update sequences with the largest |a_i| (of %d): a W&B table shows at "
            "most %d rows",
            len(rows),
            len(records),
            wandb.Table.MAX_ROWS,
        )
    if tokens is not None:
        a = first.arrays.get("attributions")
        columns, rows, shown = token_table(records, tokens, a, decode_tokens, max_rows=wandb.Table.MAX_ROWS)
        media["update_tokens"] = wandb.Table(columns=columns, data=rows)
        media["html/update_top_sequences"] = wandb.Html(top_sequences_html(records, tokens, a, decode, decode_tokens))
        if len(shown) < len(records):
            log.info(
                "W&B: update_tokens holds the tokens of the %d update sequences with the largest |a_i| (of %d): a "
                "W&B table shows at most %d rows",
                len(shown),
                len(records),
                wandb.Table.MAX_ROWS,
            )
    for plot in sorted((run_dir / "plots").glob("*.png")):
        media[f"plots/{plot.stem}"] = wandb.Image(str(plot))
    return media


def prefixed(logger: WandbLogger, key: str) -> str:
    """``key`` as ``logger.log_metrics`` writes it (a ``WandbLogger(prefix=...)`` puts its prefix first)."""
    prefix = getattr(logger, "_prefix", "")  # Lightning keeps the prefix only privately
    return f"{prefix}{logger.LOGGER_JOIN_CHAR}{key}" if prefix else key


# The loggers that start their own W&B run (prepared by the CLI while no run was in progress): only their offline
# run folders are ever deleted (a run the user started with wandb.init, which the logger adopts, never is).
_STARTS_ITS_OWN_RUN: weakref.WeakSet = weakref.WeakSet()


def offline_run_dir(logger: WandbLogger) -> Path | None:
    """The folder of the offline W&B run ``logger`` started in this process (``<save_dir>/wandb/offline-run-*``), or
    None: no run started yet (this never starts one), an online or disabled run, or a folder outside ``save_dir``."""
    run = getattr(logger, "_experiment", None)  # Lightning's lazily created run; `logger.experiment` would start one
    if run is None:
        return None
    try:
        if run.offline is not True or run.disabled is not False:
            return None
        folder = Path(run.sync_dir).resolve()
    except Exception:  # not a wandb Run (a test double, a run object of another wandb version)
        return None
    save_dir = Path(logger.save_dir or ".").resolve()
    if not folder.name.startswith("offline-run-") or not folder.is_relative_to(save_dir) or folder == save_dir:
        return None
    return folder


def discard_offline_run(logger: WandbLogger) -> Path | None:
    """Finish the offline W&B run of ``logger`` (exit code 1) and delete its folder, with the links in its parent
    folder (``latest-run``, ``debug.log``, ``debug-internal.log``) that point into it; returns the deleted folder.
    Does nothing (None) unless :func:`offline_run_dir` names a folder."""
    folder = offline_run_dir(logger)
    if folder is None or logger not in _STARTS_ITS_OWN_RUN:  # a run someone else started (wandb.init before) stays
        return None
    logger.experiment.finish(exit_code=1)  # W&B stops writing into the folder
    if not folder.is_dir():
        return None
    for link in folder.parent.iterdir():
        if link.is_symlink() and Path(os.path.realpath(link)).is_relative_to(folder):
            link.unlink()
    shutil.rmtree(folder, ignore_errors=True)
    log.debug("deleted the offline W&B run of the failed run: %s", folder)
    return folder


def _shown(folder: Path) -> str:
    """``folder`` relative to the working directory when it lies under it (as a user would type it), else whole."""
    return os.path.relpath(folder) if folder.is_relative_to(Path.cwd()) else str(folder)


def keep_failed_offline_run(logger: WandbLogger, steps: int) -> Path | None:
    """Finish the offline W&B run of ``logger`` as failed (exit code 1), keep its folder and say in one line where it
    is (``steps``: the optimizer steps it logged); returns the folder. Does nothing (None) unless
    :func:`offline_run_dir` names a folder."""
    folder = offline_run_dir(logger)
    if folder is None:
        return None
    logger.experiment.finish(exit_code=1)  # else W&B's exit hook prints its footer whatever the settings
    shown = _shown(folder)
    log.info(
        "W&B: kept the offline run of the failed fit in %s (optimizer steps logged: %d); upload it with "
        "`wandb sync %s`",
        shown,
        steps,
        shown,
    )
    return folder


def discard_failed_offline_runs(trainer: pl.Trainer) -> None:
    """For every ``WandbLogger`` of the failed run of ``trainer`` (rank 0; a second call does nothing): a fit that
    made at least one optimizer step keeps its offline run (:func:`keep_failed_offline_run`), any other run has it
    deleted (:func:`discard_offline_run`); see the module docstring."""
    if trainer.global_rank != 0:
        return
    keep = trainer.state.fn == TrainerFn.FITTING and trainer.global_step > 0
    for lg in trainer.loggers:
        if isinstance(lg, WandbLogger):
            try:
                if keep:
                    keep_failed_offline_run(lg, trainer.global_step)
                else:
                    discard_offline_run(lg)
            except Exception as e:  # never hide the run's own error behind a cleanup error
                log.warning("could not %s the offline W&B run of the failed run: %s", "finish" if keep else "delete", e)


def prepare_wandb_loggers(loggers: list[Any], quiet: bool) -> bool:
    """Before the W&B run starts (Lightning starts it at setup), for each ``WandbLogger`` in ``loggers``: make its
    folder (W&B warns "git root ... does not exist" when it is missing) and, when ``quiet`` (log_level standard),
    drop the deprecated ``anonymous`` argument that Lightning always passes (W&B warns that it has no effect).
    Returns whether the W&B run will be offline (``WANDB_MODE`` offline, or a logger made with ``offline=True``)."""
    wandb_loggers = [lg for lg in loggers if isinstance(lg, WandbLogger)]
    running = getattr(sys.modules.get("wandb"), "run", None)  # Lightning's logger adopts a run already in progress
    for lg in wandb_loggers:
        if running is None and getattr(lg, "_experiment", None) is None:
            _STARTS_ITS_OWN_RUN.add(lg)  # its run will be this process's own: a failed run may delete it
        if lg.save_dir:
            os.makedirs(lg.save_dir, exist_ok=True)
        init = getattr(lg, "_wandb_init", None)
        if quiet and isinstance(init, dict) and "anonymous" in init and init["anonymous"] is None:
            del init["anonymous"]
    # Lightning 2.6's WandbLogger keeps `offline` only as the private `_offline` (no public equivalent)
    return os.environ.get("WANDB_MODE") in ("offline", "dryrun") or any(
        getattr(lg, "_offline", False) for lg in wandb_loggers
    )


def report_offline_runs(loggers: list[Any]) -> None:
    """Finish each offline W&B run of a finished run (else W&B's exit hook prints its footer whatever the
    settings) and say in one line where it is and the command that uploads it."""
    for lg in loggers:
        folder = offline_run_dir(lg) if isinstance(lg, WandbLogger) else None
        if folder is not None:
            lg.experiment.finish()
            shown = _shown(folder)
            log.info("W&B: offline run in %s; upload it with `wandb sync %s`", shown, shown)


class DiscardFailedOfflineRun(pl.Callback):
    """When the run fails (``on_exception``), delete the offline W&B run it started unless it is a fit that made an
    optimizer step, whose run is kept (see the module docstring). A finished run keeps its W&B run. The CLI attaches
    it to every ``fit`` and ``predict``."""

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        discard_failed_offline_runs(trainer)


class WandbReport(pl.Callback):
    """Send a finished probe run to every ``WandbLogger`` of the Trainer (rank 0 only); a failed run's offline
    W&B run is deleted (as :class:`DiscardFailedOfflineRun` does, for a predict run made without the CLI; a fit
    that made an optimizer step keeps it)."""

    def __init__(self, log_artifact: bool = True):
        self.log_artifact = log_artifact

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        discard_failed_offline_runs(trainer)

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        loggers = [lg for lg in trainer.loggers if isinstance(lg, WandbLogger)]
        if stage != "predict" or not loggers or trainer.global_rank != 0:
            return
        state = run_state_of(trainer)
        if not state.finished:
            return
        plan, run_dir = state.require("plan"), state.require("run_dir").path
        values = update_metrics(state.require("update").summary())
        for ev in state.require("result"):
            values.update(metrics(ev, list(plan.etas), plan.lr))
        settings = {**state.settings.as_dict(), "plan": plan.describe()}  # the run's settings, to filter runs by
        for lg in loggers:
            lg.log_hyperparams(settings)
            # the summary, not the history: one update (module docstring)
            lg.experiment.summary.update({prefixed(lg, key): value for key, value in values.items()})
            lg.log_metrics(predict_media(state))  # one history step; built per logger (a table binds to its run)
            if self.log_artifact and hasattr(lg.experiment, "log_artifact"):
                import wandb

                artifact = wandb.Artifact(name=f"probe-{run_dir.name}", type="probe-run")
                artifact.add_dir(str(run_dir))
                lg.experiment.log_artifact(artifact)
        log.debug("logged %d metrics to W&B (%s)", len(values), ", ".join(str(lg.save_dir) for lg in loggers))
