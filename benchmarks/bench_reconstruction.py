"""Cost of reconstructing the next AdamW step relative to one real training step.

    python benchmarks/bench_reconstruction.py [--sizes tiny 20m] [--repeats 3] [--device cpu]

A training step is what the trainer does on U: teacher-forced loss (float64 head, as probe
computes it) -> backward -> AdamW.step(). Reconstruction is ``probe.update.reconstruct_update``
on the same batch (one forward+backward plus elementwise AdamW math). Target: ratio <= 1.5.
Also timed, for information: all N per-sequence inner products <w, v_i> by one JVP pass.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from probe.batch import collate
from probe.logprobs import teacher_force
from probe.losses import LossConfig, normalisers, per_sequence_loss
from probe.update import ReconstructionConfig, per_sequence_inner_products, reconstruct_update

LLAMA_FIELDS = "vocab_size hidden_size intermediate_size num_hidden_layers num_attention_heads num_key_value_heads"
SIZES = {  # name -> LlamaConfig fields, in the order of LLAMA_FIELDS
    "tiny": dict(zip(LLAMA_FIELDS.split(), (24, 16, 32, 1, 4, 2))),
    "20m": dict(zip(LLAMA_FIELDS.split(), (8192, 512, 1376, 4, 8, 8))),
}


def build(size: str, device: str):
    cfg = LlamaConfig(**SIZES[size], max_position_embeddings=128, attn_implementation="sdpa")
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg).to(device)
    n_params = sum(p.numel() for p in model.parameters())
    return model, cfg.vocab_size, n_params


def make_batch(vocab: int, n: int = 32, prompt: int = 16, total: int = 64):
    gen = torch.Generator().manual_seed(0)
    records = [
        dict(
            prompt_ids=torch.randint(1, vocab, (prompt,), generator=gen).tolist(),
            response_ids=torch.randint(1, vocab, (total - prompt,), generator=gen).tolist(),
            group=i // 4,
            advantage=float(torch.randn((), generator=gen)),
        )
        for i in range(n)
    ]
    return collate(records)


def train_step(model, optimizer, batch, loss: LossConfig) -> None:
    optimizer.zero_grad(set_to_none=True)
    norm = normalisers(batch.target_mask, loss)
    stats = teacher_force(model, batch, forcing=loss.forcing())
    per_sequence_loss(stats.logprobs, stats.mask, batch.advantages, norm, loss).sum().backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    optimizer.step()


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def timed(fn) -> float:
    _sync()
    t0 = time.perf_counter()
    fn()
    _sync()
    return time.perf_counter() - t0


def paired(fn_a, fn_b, repeats: int) -> tuple[float, float, float]:
    """Median times of a and b and the median of the per-repeat ratios b/a, run interleaved
    (a shared, noisy machine slows both alike within a pair)."""
    fn_a(), fn_b()  # warm-up
    ta, tb = [], []
    for _ in range(repeats):
        ta.append(timed(fn_a))
        tb.append(timed(fn_b))
    ratios = [b / a for a, b in zip(ta, tb)]
    return statistics.median(ta), statistics.median(tb), statistics.median(ratios)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", nargs="+", default=["tiny", "20m"], choices=list(SIZES))
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = ap.parse_args()
    loss = LossConfig()
    for size in args.sizes:
        model, vocab, n_params = build(size, args.device)
        batch = make_batch(vocab).to(args.device)
        trainer_model = copy.deepcopy(model)
        trainer_opt = torch.optim.AdamW(trainer_model.parameters(), lr=1e-4, weight_decay=0.01)
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.01)
        train_step(model, optimizer, batch, loss)  # non-empty optimizer state
        holder = {}
        t_train, t_rec, ratio = paired(
            lambda: train_step(trainer_model, trainer_opt, batch, loss),
            lambda: holder.update(
                u=reconstruct_update(model, optimizer, batch, loss, ReconstructionConfig(max_grad_norm=1.0))
            ),
            args.repeats,
        )
        w = holder["u"].full
        _, t_jvp, ratio_jvp = paired(
            lambda: train_step(trainer_model, trainer_opt, batch, loss),
            lambda: per_sequence_inner_products(model, holder["u"], batch, w),
            max(1, args.repeats // 2),
        )
        print(
            f"{size:5s} {n_params / 1e6:6.2f}M params, {len(batch)}x{batch.input_ids.shape[1]} tokens, {args.device}: "
            f"train step {t_train * 1e3:8.1f} ms | reconstruction {t_rec * 1e3:8.1f} ms "
            f"(median paired ratio {ratio:.2f}, target <= 1.5) | all-N inner products by JVP {t_jvp * 1e3:8.1f} ms "
            f"({ratio_jvp:.2f}x a train step)"
        )


if __name__ == "__main__":
    main()
