"""``python -m probe predict|fit --config ...`` through LightningCLI."""

from __future__ import annotations

import logging
import os
import sys

from lightning.pytorch.cli import LightningCLI, SaveConfigCallback

from probe.live_contract import OwnsRunDirectory
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
        # One run name for every DDP process: children inherit the environment of the launcher.
        os.environ["PROBE_RUN_NAME"] = default_run_name()
        cfg = self.config.get(self.subcommand, self.config)
        check_gpu_request(cfg.get("trainer") if hasattr(cfg, "get") else None)
        run = cfg.get("model", {}).get("init_args", {}).get("run") if hasattr(cfg, "get") else None
        level = getattr(run, "log_level", None) or (run or {}).get("log_level", "standard") if run else "standard"
        logging.basicConfig(
            level=logging.DEBUG if level == "detailed" else logging.INFO,
            format="%(asctime)s %(levelname)s %(name)s: %(message)s",
            datefmt="%H:%M:%S",
        )


def main(args: list[str] | None = None) -> ProbeCLI:
    argv = sys.argv[1:] if args is None else list(args)
    if argv[:1] == ["analyze"]:  # the `probe` console script: same dispatch as `python -m probe analyze`
        from probe.analyze import main as analyze

        sys.exit(analyze(argv[1:]))
    os.environ.setdefault("WANDB_MODE", "offline")  # no network at run time; `wandb sync` uploads later
    return ProbeCLI(
        subclass_mode_model=True,
        subclass_mode_data=True,
        save_config_callback=SaveRunConfig,
        save_config_kwargs={"overwrite": True},
        args=args,
    )
