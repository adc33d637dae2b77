"""TRL's GRPOTrainer on the toy world with probe's live entropy probe attached.

    python examples/trl_grpo.py --steps 4 --output-dir runs/trl_grpo

(needs ``pip install 'probe[trl]'``). Trains the toy world's policy (a tiny Llama on single-digit addition,
``probe.toy``) with TRL's GRPO for a few optimizer steps on one CPU, two micro-batches a step, and probes every
step: the reconstructed step is verified against the parameters' real change, the entropy change is predicted on
a fresh evaluation batch (SNIS at eta = 0.1, 1, 10 x lr, first and second order), attributed to the step's
sequences and compared with the change measured on fresh samples of the new policy. Writes
``<output-dir>/live_probe/records.jsonl`` and ``plots/live_entropy.png`` and prints one line per probed step.
``--wandb`` also logs to W&B (offline unless ``WANDB_MODE`` says otherwise). README "Trained with TRL".
"""

from __future__ import annotations

import argparse
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch


@dataclass
class ToyTRLRun:
    """A TRL GRPO run on the toy world (the fields of its ``GRPOConfig`` that matter here)."""

    output_dir: str
    steps: int = 4
    loss_type: str = "dapo"
    learning_rate: float = 1e-3
    prompts_per_micro_batch: int = 2  # prompt groups per micro-batch
    num_generations: int = 8
    gradient_accumulation_steps: int = 2
    steps_per_generation: int | None = None
    num_iterations: int = 1
    max_grad_norm: float = 1.0
    seed: int = 0
    report_to: list[str] = field(default_factory=list)
    dtype: torch.dtype = torch.float32
    use_cpu: bool = True  # False: the accelerator TRL finds (one GPU)


def toy_reward(prompts: list[str], completions: list[str], completion_ids: list[list[int]], **_: Any) -> list[float]:
    """The toy task's reward (1 for the right sum ended by EOS); TRL decodes completions without special tokens, so
    whether a completion ended is read from its ids."""
    from probe.toy.task import reward
    from probe.toy.tokenizer import build_tokenizer

    eos = build_tokenizer().eos_token_id
    return [reward(p, c, finished=eos in ids) for p, c, ids in zip(prompts, completions, completion_ids)]


def make_trainer(run: ToyTRLRun) -> Any:
    """The GRPOTrainer of ``run`` over the toy world's policy and tokenizer (built once into ``$PROBE_CACHE``)."""
    from datasets import Dataset
    from trl import GRPOConfig, GRPOTrainer

    from probe.loading import load_policy
    from probe.toy.task import make_prompt_texts
    from probe.toy.world import build_toy_world

    model, tokenizer = load_policy(build_toy_world())
    model = model.to(run.dtype)
    per_device = run.prompts_per_micro_batch * run.num_generations
    args = GRPOConfig(
        output_dir=run.output_dir,
        use_cpu=run.use_cpu,
        bf16=False,
        per_device_train_batch_size=per_device,
        num_generations=run.num_generations,
        gradient_accumulation_steps=run.gradient_accumulation_steps,
        steps_per_generation=run.steps_per_generation,
        num_iterations=run.num_iterations,
        max_completion_length=4,
        max_steps=run.steps,
        learning_rate=run.learning_rate,
        max_grad_norm=run.max_grad_norm,
        loss_type=run.loss_type,
        seed=run.seed,
        report_to=run.report_to,
        logging_steps=1,
        save_strategy="no",
        disable_tqdm=True,
    )
    # (the toy task has 100 problems, so E's prompts, probe_settings, are drawn from the same ones)
    train = Dataset.from_dict({"prompt": make_prompt_texts(256, seed=3)})
    return GRPOTrainer(model=model, reward_funcs=toy_reward, args=args, train_dataset=train, processing_class=tokenizer)


def probe_settings(every_n_steps: int = 1, n_prompts: int = 32, n_per_prompt: int = 8, **changes: Any) -> Any:
    """The live probe's settings for the toy world: E is sampled from held-out toy prompts."""
    from probe.live import LiveEvalSettings, LiveProbeSettings
    from probe.prompts import PromptSource
    from probe.sampling import SamplingSettings

    E = LiveEvalSettings(
        source=PromptSource(prompts="toy", n_prompts=n_prompts, offset=1000, seed=0),
        sampling=SamplingSettings(n_per_prompt=n_per_prompt, max_new_tokens=4, seed=1),
    )
    return LiveProbeSettings(every_n_steps=every_n_steps, eval=E, **changes)


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=4, help="optimizer steps")
    parser.add_argument("--every", type=int, default=1, help="probe every k-th step")
    parser.add_argument("--loss-type", default="dapo", help="TRL's loss_type (grpo, dr_grpo, dapo, ...)")
    parser.add_argument("--output-dir", default="runs/trl_grpo")
    parser.add_argument("--wandb", action="store_true", help="also report to W&B (offline by default)")
    a = parser.parse_args(argv)
    from callbacks.trl_live import TRLEntropyProbe

    if a.wandb:
        os.environ.setdefault("WANDB_MODE", "offline")
    run = ToyTRLRun(
        output_dir=a.output_dir, steps=a.steps, loss_type=a.loss_type, report_to=["wandb"] if a.wandb else []
    )
    trainer = make_trainer(run)
    probe = TRLEntropyProbe.attach(trainer, probe_settings(every_n_steps=a.every))
    trainer.train()
    print("step  verified(units)  predicted dH at lr (SNIS +- SE)  first order  realised dH +- SE  z")
    for r in probe.records:
        full, realised = r["eval"]["parts"]["full"], r.get("realised", {})
        at = r["plan"]["etas"].index(r["update"]["lr"])
        print(
            f"{r['step']:>4}  {r['verification']['max_units']:>15.3f}  "
            f"{full['delta_h'][at]:>+12.5f} +- {full['se'][at]:.5f}"
            f"  {full['predicted_first'][at]:>+11.5f}  {realised.get('delta_h', float('nan')):>+9.5f} +- "
            f"{realised.get('se', float('nan')):.5f}  {realised.get('z', {}).get('snis', float('nan')):+.2f}"
        )
    print(f"records: {Path(a.output_dir) / 'live_probe' / 'records.jsonl'}")
    return probe.records


if __name__ == "__main__":
    main()
