"""Per-rank memory of a sharded (FSDP2) probe against the number of processes: what each rank holds and the peak
extra memory of a sweep point, a JVP pass, the reconstruction and the attribution.

    python benchmarks/bench_sharded_memory.py                 # llama-22m, 1 / 2 / 4 gloo processes on CPU
    python benchmarks/bench_sharded_memory.py --worlds 1 2 --out /tmp/m.json

For each world size W the policy (benchmarks/bench_probe.py's ``llama-22m``: 8 layers, hidden 512, vocabulary
4,096, untied embeddings, float32) is sharded with ``fully_shard`` per decoder layer and then as a whole over W
processes (W = 1 too: the same code on one shard), its optimizer state (one real AdamW step) is read from a
distributed checkpoint by every rank (only its rows), and rank 0 measures with ``probe.memory.TensorMemory`` (the
storages created inside each block and alive at once; a DTensor counted by its local shard):

* held: the rank's weights, moments and the update's four parts (baseline, grad, full, K);
* sweep point: one no-grad forward of E at theta + eta * full (``ShiftedPolicy``);
* first order: one JVP over E along full (``sequence_derivatives``);
* reconstruction: ``reconstruct_update`` over U (one forward and backward over all of U on every rank);
* attribution: ``attribute`` (one backward over E, one JVP over U).

The claim checked: the extra memory is one shard plus one gathered layer plus the head's chunks (the root unit,
embeddings and head, stays gathered through a forward), so it falls with W towards that floor, and what a rank
holds falls like 1/W. Activations do not shrink with W (every rank runs its passes over the same U and E).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import socket
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(1, str(HERE.parent))

from bench_probe import llama, random_batch  # noqa: E402

MIB = 1 << 20


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def write_checkpoint(model: torch.nn.Module, U, path: Path) -> None:
    """One real AdamW step of ``model`` on U's loss, its optimizer state saved as FSDP2's Lightning checkpoint holds
    it (``optimizer_0``, keyed by parameter names) with torch.distributed.checkpoint (one process)."""
    import torch.distributed.checkpoint as dcp

    from probe.losses import LossConfig, normalisers
    from probe.update import sequence_losses

    loss = LossConfig()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.01)
    norm = normalisers(U.target_mask, loss)
    sequence_losses(model, U, loss, norm).sum().backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    names = {id(p): n for n, p in model.named_parameters()}
    state = {names[id(p)]: dict(s) for p, s in optimizer.state.items()}
    groups = [
        {**{k: v for k, v in group.items() if k != "params"}, "params": [names[id(p)] for p in group["params"]]}
        for group in optimizer.param_groups
    ]
    dcp.save({"optimizer_0": {"state": state, "param_groups": groups}}, checkpoint_id=str(path), no_dist=True)


def rank_main(rank: int, world: int, port: int, args: argparse.Namespace, ckpt: str, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    torch.set_num_threads(1)
    from torch.distributed.device_mesh import init_device_mesh

    from probe.attribution import AttributionInputs, attribute
    from probe.logprobs import TeacherForcing
    from probe.losses import LossConfig
    from probe.memory import TensorMemory
    from probe.optim_loading import load_optimizer_state
    from probe.overrides import ShiftedPolicy, base_statistics
    from probe.sharding import local, shard_policy
    from probe.taylor import sequence_derivatives
    from probe.update import ReconstructionConfig, reconstruct_update

    model = llama(args.policy)
    shard_policy(model, init_device_mesh("cpu", (world,)))
    U = random_batch(4096, args.U_seqs, args.U_len // 4, args.U_len, seed=1)
    U.advantages = torch.randn(len(U), generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    E = random_batch(4096, args.E_seqs, args.E_len // 4, args.E_len, seed=3)
    forcing = TeacherForcing(with_entropy=True, batch_size=args.E_seqs)
    record: dict = {"world": world}

    def mib(tensors) -> float:
        return sum(local(t).numel() * local(t).element_size() for t in tensors) / MIB

    state = load_optimizer_state(ckpt, model)  # this rank's rows only
    record["held_weights_mib"] = mib(p.detach() for p in model.parameters())
    moments = (t for s in state.state.values() for t in (s.exp_avg, s.exp_avg_sq) if t is not None)
    record["held_moments_mib"] = mib(moments)
    with TensorMemory() as m:
        update = reconstruct_update(model, state, U, LossConfig(), ReconstructionConfig(max_grad_norm=1.0))
    record["reconstruction_peak_mib"] = m.peak_mib
    record["held_update_mib"] = mib(t for part in update.parts_with_scale().values() for t in part.values())
    base = base_statistics(model, E, forcing)
    shifted = ShiftedPolicy(model, {"full": update.full})
    with torch.no_grad(), TensorMemory() as m:
        shifted.teacher_force("full", update.lr, E, forcing)
    record["sweep_point_peak_mib"] = m.peak_mib
    with TensorMemory() as m:
        sequence_derivatives(model, E, update.full, forcing, order=1)
    record["first_order_peak_mib"] = m.peak_mib
    with TensorMemory() as m:
        attribute(AttributionInputs(model, update, U, E, forcing, base=base), check=False)
    record["attribution_peak_mib"] = m.peak_mib
    if rank == 0:
        Path(out).write_text(json.dumps(record))
    dist.barrier()
    dist.destroy_process_group()


def layer_sizes(args: argparse.Namespace) -> dict:
    model = llama(args.policy)
    layer = model.model.layers[0]
    root = [model.model.embed_tokens.weight, model.model.norm.weight, model.lm_head.weight]
    return {
        "model_mib": sum(p.numel() * 4 for p in model.parameters()) / MIB,
        "decoder_layer_mib": sum(p.numel() * 4 for p in layer.parameters()) / MIB,
        "root_unit_mib": sum(p.numel() * 4 for p in root) / MIB,
    }


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--policy", default="llama-22m")
    ap.add_argument("--worlds", type=int, nargs="+", default=[1, 2, 4])
    ap.add_argument("--E-seqs", dest="E_seqs", type=int, default=8)
    ap.add_argument("--E-len", dest="E_len", type=int, default=64)
    ap.add_argument("--U-seqs", dest="U_seqs", type=int, default=8)
    ap.add_argument("--U-len", dest="U_len", type=int, default=64)
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args(argv)
    started = time.perf_counter()
    result = {
        "date": time.strftime("%Y-%m-%d %H:%M"),
        "machine": {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count()},
        "torch": torch.__version__,
        "policy": args.policy,
        "sizes": {"E": [args.E_seqs, args.E_len], "U": [args.U_seqs, args.U_len], **layer_sizes(args)},
        "worlds": [],
    }
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = Path(tmp) / "last.ckpt"
        U = random_batch(4096, args.U_seqs, args.U_len // 4, args.U_len, seed=1)
        U.advantages = torch.randn(len(U), generator=torch.Generator().manual_seed(2), dtype=torch.float64)
        write_checkpoint(llama(args.policy), U, ckpt)
        for world in args.worlds:
            out = Path(tmp) / f"rank0-{world}.json"
            mp.spawn(rank_main, args=(world, _free_port(), args, str(ckpt), str(out)), nprocs=world)
            record = json.loads(out.read_text())
            result["worlds"].append(record)
            print(json.dumps(record), flush=True)
    result["wall_s"] = time.perf_counter() - started
    path = args.out or HERE / "results" / f"{time.strftime('%Y-%m-%d')}-sharded-memory-{args.policy}.json"
    path.write_text(json.dumps(result, indent=2))
    print(f"wrote {path}")
    return result


if __name__ == "__main__":
    main()
