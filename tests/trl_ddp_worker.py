"""One process of tests/test_trl_live.py's two-process check (run with ``python -m torch.distributed.run``).

Trains the toy world with TRL's GRPOTrainer in float64 (exact log-probs, no clipping) for two steps with the probe
attached; at each step, before the probe's own hook, sums over the processes probe's gradient of this process's U
(the micro-batches it kept, with the normalisers of the whole step) and compares it with the all-reduced gradient
DDP gives the optimizer. Writes ``<output_dir>/rank<r>.json``.

    python -m torch.distributed.run --nproc_per_node 2 tests/trl_ddp_worker.py OUTPUT_DIR LOSS_TYPE
"""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "tests")]

from transformers import TrainerCallback  # noqa: E402

from callbacks.trl_live import TRLEntropyProbe  # noqa: E402
from probe.live import eval_mode  # noqa: E402
from probe.update import ReconstructionConfig, loss_gradients  # noqa: E402

from support import use_exact_trl_logprobs  # noqa: E402


def main(output_dir: str, loss_type: str) -> None:
    spec = importlib.util.spec_from_file_location("trl_grpo", REPO / "examples" / "trl_grpo.py")
    example = importlib.util.module_from_spec(spec)
    sys.modules["trl_grpo"] = example
    spec.loader.exec_module(example)
    compared: list[dict] = []

    class Compare(TrainerCallback):
        def on_pre_optimizer_step(self, args, state, control, **kwargs):
            policy = trainer.model
            step = probe.probed_step()
            params = {n: p for n, p in policy.named_parameters() if p.requires_grad}
            with eval_mode(policy):
                ours, _ = loss_gradients(
                    policy, step.batch, params, step.loss, step.normalisers, ReconstructionConfig()
                )
            scale = max(float(p.grad.abs().max()) for p in params.values())
            worst = 0.0
            for name, p in params.items():
                summed = ours[name].clone()
                torch.distributed.all_reduce(summed)  # every process's sequences
                worst = max(worst, float((summed - p.grad).abs().max()) / scale)
            index = step.batch.index.tolist()
            compared.append({"n": len(index), "index": index, "N": step.normalisers.n_sequences, "worst": worst})

    run = example.ToyTRLRun(
        output_dir=output_dir,
        steps=2,
        dtype=torch.float64,
        max_grad_norm=0.0,
        prompts_per_micro_batch=4,
        loss_type=loss_type,
    )
    trainer = example.make_trainer(run)
    use_exact_trl_logprobs(trainer)
    trainer.add_callback(Compare())
    settings = example.probe_settings(n_prompts=4, n_per_prompt=2, second_order=False, realised=False)
    probe = TRLEntropyProbe.attach(trainer, settings)
    trainer.train()
    rank = trainer.accelerator.process_index
    result = {"world_size": trainer.accelerator.num_processes, "compared": compared, "records": probe.records}
    (Path(output_dir) / f"rank{rank}.json").write_text(json.dumps(result))


if __name__ == "__main__":
    main(*sys.argv[1:3])
