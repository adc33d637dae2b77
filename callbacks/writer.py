"""Run writer: the run directory of docs/DESIGN.md section 9, written once the results are in.

Per-batch results are cached in ``partial/`` by the module as they are made (a rerun on the same
directory skips them); at the end of the run rank 0 writes the per-sequence arrays, the plots and
``summary.json`` (status ``complete``), prints the result table and drops the cache. The writer
only observes the run state (``on_predict_end``): its place among the callbacks does not matter.
"""

from __future__ import annotations

import logging
import time

import lightning.pytorch as pl
import numpy as np

from probe.engine import run_summary
from probe.plots import plot_attributions, plot_delta_h, plot_ess
from probe.report import environment, format_table
from probe.run_state import run_state_of
from probe.rundir import save_npy

log = logging.getLogger("probe")


class RunWriter(pl.Callback):
    """Write the run directory (rank 0) once the aggregation is done; release its lock if the run fails."""

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        run_dir = run_state_of(trainer).run_dir
        if run_dir is not None and trainer.global_rank == 0:
            run_dir.unlock()  # a rerun (even from another process) may resume it at once

    def on_predict_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.global_rank != 0:
            return
        state = run_state_of(trainer)
        evals, plan, update, run_dir = (
            state.require("result"),
            state.require("plan"),
            state.require("update"),
            state.require("run_dir"),
        )
        for k, ev in enumerate(evals):
            folder = run_dir.eval_dir(k)
            for path, array in ev.arrays.items():
                save_npy(folder / f"{path}.npy", array)
            suffix = "" if k == 0 else f"_{ev.name}"
            ev_json = ev.to_dict()
            plots = run_dir.path / "plots"
            plot_delta_h(ev_json, list(plan.etas), plots / f"delta_h{suffix}.png", title=f"{ev.name}: Delta H vs eta")
            plot_ess(ev_json, list(plan.etas), ev.n_sequences, plots / f"ess{suffix}.png")
            if "attributions" in ev.arrays:
                advantages = np.array([float(r["advantage"]) for r in state.require("inputs").update_records])
                offsets = ev.arrays["update_tokens/offsets"]
                token_logprobs = ev.arrays["update_tokens/logprobs"]
                logprobs = np.array([token_logprobs[s:e].sum() for s, e in zip(offsets[:-1], offsets[1:])])
                plot_attributions(
                    ev.arrays["attributions"],
                    advantages,
                    logprobs,
                    plan.reference_eta,
                    plots / f"attributions{suffix}.png",
                    reward_attributions=ev.arrays.get("reward_attributions"),
                )
            if ev.attribution is not None and ev.attribution.top_tokens:  # the tokens as text, for the table
                for token in ev.attribution.top_tokens:
                    token["text"] = state.tokenizer.decode([token["token_id"]])
            for part, res in ev.parts.items():
                low = [f"{e:.3g}" for e, f in zip(plan.etas, res.ess_fraction) if f < 0.1]
                if low:
                    log.warning(
                        "%s/%s: ESS below 10%% of the samples at eta = %s; the SNIS estimate there is unreliable "
                        "(use smaller etas or a larger E)",
                        ev.name,
                        part,
                        ", ".join(low),
                    )
        timings = {**state.timings, "total_s": time.perf_counter() - state.started}
        summary = run_summary(
            plan,
            update,
            evals,
            config=state.settings.as_dict(),
            timings=timings,
            environment=environment(),
            world_size=trainer.world_size,
            policy=str(state.policy_dir),
            choices=state.choices,
        )
        log.debug("timings: %s", ", ".join(f"{k} {v:.2f}s" for k, v in timings.items()))
        run_dir.finish(summary)
        print(format_table(summary["evals"], plan.etas, plan.lr))
        print(f"run directory: {run_dir.path}")
