"""``python -m probe predict|fit --config ...`` through LightningCLI."""
from __future__ import annotations

import logging
import os
import time

from lightning.pytorch.cli import LightningCLI, SaveConfigCallback


class SaveRunConfig(SaveConfigCallback):
    """Save the resolved config as ``config.yaml`` in the run directory (rank 0)."""

    def __init__(self, *args, **kwargs):
        kwargs["save_to_log_dir"] = False
        super().__init__(*args, **kwargs)

    def save_config(self, trainer, pl_module, stage: str) -> None:
        if not hasattr(pl_module, "open_run_dir"):
            return
        run_dir = pl_module.open_run_dir(trainer)
        if trainer.global_rank == 0:
            self.parser.save(self.config, str(run_dir.path / self.config_filename), skip_none=False,
                             overwrite=True, multifile=False)


class ProbeCLI(LightningCLI):
    def before_instantiate_classes(self) -> None:
        # One run name for every DDP process: children inherit the environment of the launcher.
        os.environ.setdefault("PROBE_RUN_NAME", time.strftime("%Y%m%d-%H%M%S"))
        cfg = self.config.get(self.subcommand, self.config)
        run = cfg.get("model", {}).get("init_args", {}).get("run") if hasattr(cfg, "get") else None
        level = getattr(run, "log_level", None) or (run or {}).get("log_level", "standard") if run else "standard"
        logging.basicConfig(level=logging.DEBUG if level == "detailed" else logging.INFO,
                            format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")


def main(args: list[str] | None = None) -> ProbeCLI:
    os.environ.setdefault("WANDB_MODE", "offline")  # no network at run time; `wandb sync` uploads later
    return ProbeCLI(
        subclass_mode_model=True,
        subclass_mode_data=True,
        save_config_callback=SaveRunConfig,
        save_config_kwargs={"overwrite": True},
        args=args,
    )
