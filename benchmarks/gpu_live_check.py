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
import math
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
                "verification_worst": r["verification"]["worst_parameter"],
                "verification_step_rounding": r["verification"].get("step_rounding"),
                "verification_max_relative_error": r["verification"]["max_relative_error"],
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


def random_fingerprints_if_hashing_fails() -> bool:
    """On the GPU machine (Python 3.12.3, datasets 5.2, dill 0.4.1) ``datasets`` cannot hash a new in-memory table
    (dill fails on pyarrow's ``MonthDayNano``), so ``Dataset.from_dict`` raises: give datasets random fingerprints
    there (they only name its cache files). Returns whether it was needed."""
    import pickle

    import datasets

    try:
        datasets.Dataset.from_dict({"x": [1]})
        return False
    except pickle.PicklingError:
        from datasets import arrow_dataset, fingerprint

        arrow_dataset.generate_fingerprint = lambda dataset: fingerprint.generate_random_fingerprint()
        return True


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

    patched = random_fingerprints_if_hashing_fails()
    alone, _, alone_s = train("alone", False)
    device = str(next(alone.model.parameters()).device)
    probed, probe, probed_s = train("probed", True)
    a, b = dict(alone.model.named_parameters()), dict(probed.model.named_parameters())
    return {
        "device": device,
        "datasets_random_fingerprints": patched,
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
    # (Lightning moves the module back to the CPU at the end of fit: the device is read from the probed steps)
    peak = torch.cuda.max_memory_allocated() if gpu else 0
    return {"cuda_peak_bytes": peak, "steps": summary(probe.records)}


def adam_kernels_check(root: Path, gpu: bool) -> dict:
    """probe's reconstruction against torch's AdamW kernels (foreach, fused) on one float32 tensor of 1M elements:
    the verification's rounding units at each of five steps (random gradients, lr 1e-3, weight decay 0 and 0.1)."""
    from probe.adam import AdamState
    from probe.update import update_from_gradients
    from probe.verification import verify_step

    device = "cuda" if gpu else "cpu"
    out: dict = {}
    for decay in (0.0, 0.1):
        for kernel in ("foreach", "fused"):
            torch.manual_seed(0)
            model = torch.nn.Module()
            model.w = torch.nn.Parameter(torch.randn(1024, 1024, device=device))
            opt = torch.optim.AdamW([model.w], lr=1e-3, weight_decay=decay, **{kernel: True})
            gen = torch.Generator(device=device).manual_seed(1)
            units, worst = [], []
            for _ in range(5):
                model.w.grad = torch.randn(model.w.shape, generator=gen, device=device) * 1e-2
                state = AdamState.from_optimizer(opt, model)
                update = update_from_gradients(dict(model.named_parameters()), {"w": model.w.grad}, state)
                before = {"w": model.w.detach().clone()}
                opt.step()
                check = verify_step(model, update, before)
                units.append(check["max_units"])
                worst.append(check["max_relative_error"])
            out[f"{kernel}_decay{decay}"] = {"units": units, "max_relative_error": worst}
    return out


def fused_kernel_check(root: Path, gpu: bool) -> dict:
    """Which arithmetic the fused AdamW kernel follows: its steps against emulations in float64 with the bias
    corrections computed (a) in float64, (b) rounded to float32, (c) with float32 powers; in verify_step's units
    (the largest |difference| / (2 ulp(p_new) + 1e-6 |step|)) and the largest difference."""
    device = "cuda" if gpu else "cpu"
    torch.manual_seed(0)
    w = torch.nn.Parameter(torch.randn(1024, 1024, device=device))
    opt = torch.optim.AdamW([w], lr=1e-3, weight_decay=0.1, fused=True)
    gen = torch.Generator(device=device).manual_seed(1)
    b1, b2, eps, lr, wd = 0.9, 0.999, 1e-8, 1e-3, 0.1
    m = torch.zeros_like(w, dtype=torch.float64)
    v = torch.zeros_like(w, dtype=torch.float64)
    out: dict = {}
    for t in range(1, 6):
        g = torch.randn(w.shape, generator=gen, device=device) * 1e-2
        w.grad = g
        p0 = w.detach().clone()
        state = opt.state.get(w)
        m = state["exp_avg"].double() if state else m
        v = state["exp_avg_sq"].double() if state else v
        opt.step()
        p1 = w.detach()
        f32 = lambda x: torch.tensor(x, dtype=torch.float32).double().item()  # noqa: E731
        pow32 = lambda b: (1 - torch.tensor(b, dtype=torch.float32) ** float(t)).double().item()  # noqa: E731
        variants = {
            "float64": (1 - b1**t, (1 - b2**t) ** 0.5),
            "rounded_float32": (f32(1 - b1**t), f32(f32(1 - b2**t) ** 0.5)),
            "float32_pow": (f32(pow32(b1)), f32(f32(pow32(b2)) ** 0.5)),
        }
        row = {}
        for name, (bc1, bc2_sqrt) in variants.items():
            gd = g.double()
            p = p0.double() * (1 - lr * wd)
            m1 = (b1 * m + (1 - b1) * gd).float().double()
            v1 = (b2 * v + (1 - b2) * gd * gd).float().double()
            expected = p - (lr / bc1) * m1 / (v1.sqrt() / bc2_sqrt + eps)
            diff = (expected - p1.double()).abs()
            ulp = (torch.nextafter(p1.abs(), torch.full_like(p1, math.inf)) - p1.abs()).double()
            step = (p1.double() - p0.double()).abs()
            units = float((diff / (2 * ulp + 1e-6 * step)).max())  # verify_step's units, with the step as scale
            row[name] = {"units": units, "largest_difference": float(diff.max())}
        out[f"t{t}"] = row
    return out


def main(out: str, device: str = "gpu") -> None:
    out_dir, gpu = Path(out), device == "gpu"
    out_dir.mkdir(parents=True, exist_ok=True)
    result: dict = {"gpu": torch.cuda.get_device_name(0) if gpu else None, "torch": torch.__version__}
    with tempfile.TemporaryDirectory() as tmp:
        checks = (
            ("fused_kernel", fused_kernel_check),
            ("adam_kernels", adam_kernels_check),
            ("trl", trl_check),
            ("lightning", lightning_check),
        )
        for name, check in checks:
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
