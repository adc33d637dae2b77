"""The live probe on one GPU: TRL's GRPOTrainer (callbacks/trl_live.py) and a Lightning GRPO fit (callbacks/live.py).

    python3 benchmarks/gpu_live_check.py OUT_DIR      (on the GPU machine, TRL and datasets carried as wheels)
    python3 benchmarks/gpu_live_check.py OUT_DIR cpu  (the same on the CPU: a dry run of the script)

Three steps each on the toy world, probed every step, float32 on CUDA. Writes OUT_DIR/gpu_live_check.json: per step
the verification (rounding units), the attribution's relative difference, the prediction at eta = lr with its SE,
the realised change with its SE and z, the probe's overhead; and whether TRL's training with the probe attached
gives the same parameters as without it (bitwise, and the largest difference).
"""

from __future__ import annotations

import importlib.util
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO)]


def summary(records: list[dict]) -> list[dict]:
    out = []
    for r in records:
        full, realised = r["eval"]["parts"]["full"], r.get("realised", {})
        at = r["plan"]["etas"].index(r["update"]["lr"])
        out.append(
            {
                "step": r["step"],
                "verification_units": r["verification"]["max_units"],
                "attribution_relative_difference": r["eval"].get("attribution", {}).get("relative_difference"),
                "predicted": full["delta_h"][at],
                "predicted_se": full["se"][at],
                "realised": realised.get("delta_h"),
                "realised_se": realised.get("se"),
                "z": realised.get("z", {}).get("snis"),
                "overhead_s": r["timings"]["total_s"],
            }
        )
    return out


def trl_check(root: Path, gpu: bool) -> dict:
    spec = importlib.util.spec_from_file_location("trl_grpo", REPO / "examples" / "trl_grpo.py")
    example = importlib.util.module_from_spec(spec)
    sys.modules["trl_grpo"] = example
    spec.loader.exec_module(example)
    from callbacks.trl_live import TRLEntropyProbe

    def train(name: str, probed: bool):
        trainer = example.make_trainer(example.ToyTRLRun(output_dir=str(root / name), steps=3, use_cpu=not gpu))
        probe = TRLEntropyProbe.attach(trainer, example.probe_settings()) if probed else None
        clock = time.perf_counter()
        trainer.train()
        return trainer, probe, time.perf_counter() - clock

    alone, _, alone_s = train("alone", False)
    probed, probe, probed_s = train("probed", True)
    a, b = dict(alone.model.named_parameters()), dict(probed.model.named_parameters())
    return {
        "device": str(next(probed.model.parameters()).device),
        "steps": summary(probe.records),
        "bitwise_equal": all(torch.equal(a[k], b[k]) for k in a),
        "max_abs_difference": max(float((a[k] - b[k]).abs().max()) for k in a),
        "train_s": {"alone": alone_s, "probed": probed_s},
    }


def lightning_check(root: Path, gpu: bool) -> dict:
    import lightning.pytorch as pl

    from callbacks.live import LiveEntropyProbe, LiveEvalSettings
    from datamodules.prompts import PromptDataModule
    from probe.grpo import AdamWSettings, FitRunSettings, GRPOModule
    from probe.sampling import SamplingSettings

    module = GRPOModule(
        optimizer=AdamWSettings(lr=1e-3),
        run=FitRunSettings(root=str(root), name="lightning"),
        checkpoint_every_n_steps=-1,
        save_policy=False,
    )
    probe = LiveEntropyProbe(eval=LiveEvalSettings(sampling=SamplingSettings(n_per_prompt=8, max_new_tokens=4)))
    quiet = dict(logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
    trainer = pl.Trainer(
        accelerator="gpu" if gpu else "cpu", devices=1, max_steps=3, gradient_clip_val=1.0, callbacks=[probe], **quiet
    )
    trainer.fit(module, datamodule=PromptDataModule(prompts_per_step=4))
    return {"device": str(next(module.policy.parameters()).device), "steps": summary(probe.records)}


def main(out: str, device: str = "gpu") -> None:
    out_dir, gpu = Path(out), device == "gpu"
    out_dir.mkdir(parents=True, exist_ok=True)
    result: dict = {"gpu": torch.cuda.get_device_name(0) if gpu else None, "torch": torch.__version__}
    with tempfile.TemporaryDirectory() as tmp:
        for name, check in (("trl", trl_check), ("lightning", lightning_check)):
            try:
                result[name] = check(Path(tmp) / name, gpu)
            except Exception as e:  # report and go on to the next check
                import traceback

                text = traceback.format_exc()
                result[name] = {"error": f"{type(e).__name__}: {e}", "traceback": text[:4000] + " ... " + text[-1500:]}
            (out_dir / "gpu_live_check.json").write_text(json.dumps(result, indent=2, default=str))
    print(json.dumps(result, indent=2, default=str))


if __name__ == "__main__":
    main(*sys.argv[1:3])
