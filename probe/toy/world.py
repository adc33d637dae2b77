"""The built-in toy world: a tiny Llama policy on single-digit addition, with a real AdamW history.

:func:`build_toy_world` makes, deterministically from a :class:`ToyWorldConfig`:

1. a tiny ``LlamaForCausalLM`` initialised under the config's seed;
2. a short supervised pre-warm (cross-entropy on correct answers, its own Adam, discarded)
   so the policy is neither uniform nor already perfect;
3. a GRPO warm-up of a few steps with ``torch.optim.AdamW`` and ``clip_grad_norm_``, the loss
   built from :func:`probe.logprobs.teacher_force` and :func:`probe.losses.per_sequence_loss`;
   this optimizer's state is what gets saved, so the policy has a real optimizer history;
4. the mean reward on fresh samples, which the default config keeps between 0.2 and 0.8
   so GRPO advantages do not vanish.

Saved as an ordinary HF checkpoint directory: ``config.json``, ``model.safetensors``, the
tokenizer, ``optimizer.pt`` (``torch.save(AdamW(model.parameters()).state_dict())``, one
param group, parameters in ``model.parameters()`` order) and ``toy_world.json`` (config,
reward history, final mean reward, versions, the sha256 of every file). Worlds are cached under
``$PROBE_CACHE`` (default ``~/.cache/probe``) in ``toy_world-<hash of the config>/`` and built once; a
cached world whose files no longer match their sha256 (a disk error, a truncated copy) is rebuilt, with a
warning.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterator

import torch

from probe.batch import collate
from probe.logprobs import TeacherForcing, teacher_force
from probe.losses import LossConfig, normalisers, per_sequence_loss
from probe.sampling import SamplingSettings, sample_responses, sample_update_batch
from probe.toy import task
from probe.toy.tokenizer import save_tokenizer

FORMAT_VERSION = 2  # bump when the build procedure changes, so cached worlds are rebuilt (2: files' sha256 recorded)
COMPLETE_MARKER = "toy_world.json"  # written last; a directory without it is not a world

log = logging.getLogger("probe")


@dataclass
class ToyWorldConfig:
    """The toy world: model size, pre-warm and GRPO warm-up. Same config => bitwise-same world.

    Args:
        seed: seeds the initial weights, the prompts and every sampling generator.
        hidden_size: width of the tiny Llama.
        intermediate_size: MLP width.
        num_hidden_layers: transformer blocks.
        num_attention_heads: query heads.
        num_key_value_heads: key/value heads (fewer than query heads: grouped-query attention).
        pretrain_target_reward: the supervised pre-warm (full-batch cross-entropy on the 100 correct
            answers) stops once the exact expected reward over all 100 problems reaches this (0: no pre-warm).
        pretrain_max_steps: upper bound on pre-warm steps.
        pretrain_lr: Adam learning rate of the pre-warm.
        grpo_steps: GRPO warm-up steps; the saved AdamW state has ``step == grpo_steps``.
        prompts_per_step: prompt groups per GRPO step.
        group_size: responses per prompt (G).
        lr: AdamW learning rate of the GRPO warm-up (and of the saved optimizer).
        weight_decay: AdamW weight decay.
        betas: AdamW betas.
        max_grad_norm: gradient clipping norm of the GRPO warm-up.
        max_new_tokens: longest response (answers need at most 3 tokens with EOS).
        temperature: sampling temperature of the warm-up and of the reward measurement.
        eval_prompts: fresh prompts (G responses each) on which the final mean reward is measured.
    """

    seed: int = 0
    hidden_size: int = 64
    intermediate_size: int = 128
    num_hidden_layers: int = 2
    num_attention_heads: int = 4
    num_key_value_heads: int = 2
    pretrain_target_reward: float = 0.5
    pretrain_max_steps: int = 400
    pretrain_lr: float = 3e-3
    grpo_steps: int = 3
    prompts_per_step: int = 16
    group_size: int = 8
    lr: float = 3e-4
    weight_decay: float = 0.01
    betas: tuple[float, float] = (0.9, 0.999)
    max_grad_norm: float = 1.0
    max_new_tokens: int = 4
    temperature: float = 1.0
    eval_prompts: int = 100

    def sampling(self, seed: int = 0) -> SamplingSettings:
        """How the warm-up and the reward measurement sample: G responses at the world's temperature."""
        return SamplingSettings(
            n_per_prompt=self.group_size, max_new_tokens=self.max_new_tokens, temperature=self.temperature, seed=seed
        )

    def key(self) -> str:
        """Short hash of the config (and build format) naming the cache directory."""
        payload = json.dumps({"format": FORMAT_VERSION, **asdict(self)}, sort_keys=True)
        return hashlib.sha256(payload.encode()).hexdigest()[:12]


def default_cache_root() -> Path:
    """``$PROBE_CACHE`` if set, else ``~/.cache/probe``."""
    return Path(os.environ.get("PROBE_CACHE") or Path.home() / ".cache" / "probe")


def toy_world_dir(cfg: ToyWorldConfig | None = None, root: str | Path | None = None) -> Path:
    """Where the world of ``cfg`` lives (built or not)."""
    cfg = cfg or ToyWorldConfig()
    return Path(root or default_cache_root()) / f"toy_world-{cfg.key()}"


def is_complete(directory: str | Path) -> bool:
    """True when ``directory`` holds a finished toy world."""
    directory = Path(directory)
    needed = ["config.json", "model.safetensors", "optimizer.pt", "tokenizer.json", COMPLETE_MARKER]
    return all((directory / name).is_file() for name in needed)


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def damaged_files(directory: str | Path) -> list[str]:
    """The files of a complete toy world that differ from what was built (their sha256 in ``toy_world.json``), or
    are missing; ``toy_world.json`` itself when it cannot be read. Empty for an intact world (reading the toy's
    files, about 1 MB, takes milliseconds)."""
    directory = Path(directory)
    try:
        recorded = json.loads((directory / COMPLETE_MARKER).read_text()).get("files")
    except (OSError, ValueError, AttributeError):
        recorded = None
    if not isinstance(recorded, dict) or not recorded:
        return [COMPLETE_MARKER]
    return [
        name
        for name, digest in sorted(recorded.items())
        if not (directory / name).is_file() or _sha256(directory / name) != digest
    ]


def is_intact(directory: str | Path) -> bool:
    """True when ``directory`` holds a finished toy world whose every file is as it was built."""
    return is_complete(directory) and not damaged_files(directory)


@contextlib.contextmanager
def _deterministic_single_thread() -> Iterator[None]:
    """Deterministic algorithms on one thread (faster for a model this small, and thread-count independent)."""
    previous = torch.are_deterministic_algorithms_enabled(), torch.get_num_threads()
    torch.use_deterministic_algorithms(True)
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(previous[0])
        torch.set_num_threads(previous[1])


def make_policy(cfg: ToyWorldConfig) -> torch.nn.Module:
    """The untrained tiny Llama of ``cfg``, initialised under ``cfg.seed`` (float32, SDPA attention)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=len(task.VOCAB),
        hidden_size=cfg.hidden_size,
        intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_hidden_layers,
        num_attention_heads=cfg.num_attention_heads,
        num_key_value_heads=cfg.num_key_value_heads,
        max_position_embeddings=32,
        bos_token_id=task.BOS_ID,
        eos_token_id=task.EOS_ID,
        pad_token_id=task.PAD_ID,
        tie_word_embeddings=False,
        attn_implementation="sdpa",
    )
    torch.manual_seed(cfg.seed)  # HF initialises weights from the global generator
    return LlamaForCausalLM(config).float()


ALL_PROBLEMS = [(a, b) for a in range(10) for b in range(10)]


def _answer_batch(problems: list[tuple[int, int]]):
    records = [{"prompt_ids": task.prompt_ids_of(a, b), "response_ids": task.answer_ids(a, b)} for a, b in problems]
    return collate(records, pad_token_id=task.PAD_ID)


def expected_reward(model: torch.nn.Module, temperature: float = 1.0) -> float:
    """Exact mean reward over all 100 problems: mean_k p(correct answer then EOS | prompt_k) at ``temperature``.

    The reward is 1 for exactly one response per prompt, so its expectation is that
    response's probability; no sampling noise.
    """
    batch = _answer_batch(ALL_PROBLEMS)
    with torch.no_grad():
        stats = teacher_force(model, batch, forcing=TeacherForcing(temperature=temperature))
    return float(stats.sequence_logprobs.exp().mean())  # [100] -> mean


def _pretrain(model: torch.nn.Module, cfg: ToyWorldConfig) -> list[dict]:
    """Full-batch supervised pre-warm on the 100 correct answers until the exact expected reward
    reaches ``cfg.pretrain_target_reward`` (at most ``cfg.pretrain_max_steps`` steps); returns per-step stats."""
    optimizer = torch.optim.Adam(model.parameters(), lr=cfg.pretrain_lr)
    batch = _answer_batch(ALL_PROBLEMS)
    history: list[dict] = []
    for step in range(cfg.pretrain_max_steps + 1):
        model.train()
        stats = teacher_force(model, batch, forcing=TeacherForcing(temperature=cfg.temperature))
        reached = float(stats.sequence_logprobs.detach().exp().mean())  # exact expected reward before this step
        if reached >= cfg.pretrain_target_reward or step == cfg.pretrain_max_steps:
            break
        loss = -stats.logprobs.sum() / stats.mask.sum()  # mean token cross-entropy
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        history.append({"step": step + 1, "loss": float(loss.detach()), "expected_reward_before": reached})
    model.eval()
    return history


def mean_reward(model: torch.nn.Module, cfg: ToyWorldConfig, n_prompts: int, seed: int) -> float:
    """Mean reward of ``cfg.group_size`` fresh samples on each of ``n_prompts`` prompts drawn with ``seed``."""
    model.eval()
    records = sample_responses(
        model,
        task.make_prompts(n_prompts, seed=seed),
        cfg.sampling(seed=seed),
        eos_token_id=task.EOS_ID,
        pad_token_id=task.PAD_ID,
    )
    return sum(task.reward_ids(r["prompt_ids"], r["response_ids"]) for r in records) / len(records)


def _grpo_warmup(model: torch.nn.Module, cfg: ToyWorldConfig) -> tuple[torch.optim.AdamW, list[dict]]:
    """``cfg.grpo_steps`` GRPO steps with AdamW + gradient clipping; returns the optimizer and per-step stats."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, betas=cfg.betas, weight_decay=cfg.weight_decay)
    loss_cfg = LossConfig(agg_mode="seq-mean-token-mean", temperature=cfg.temperature)
    generator = torch.Generator().manual_seed(cfg.seed + 2)
    history = []
    for step in range(cfg.grpo_steps):
        model.eval()  # no dropout in the tiny Llama; eval just mirrors rollout workers
        prompts = task.make_prompts(cfg.prompts_per_step, seed=cfg.seed * 1000 + 10 + step)
        records = sample_update_batch(
            model,
            prompts,
            cfg.sampling(),
            reward_fn=task.reward_ids,
            eos_token_id=task.EOS_ID,
            pad_token_id=task.PAD_ID,
            generator=generator,
            filter_zero_advantage_prompts=False,  # a dead group just adds nothing; the warm-up never stalls
        )
        batch = collate(records, pad_token_id=task.PAD_ID)
        model.train()
        stats = teacher_force(model, batch, forcing=TeacherForcing(temperature=cfg.temperature))
        norm = normalisers(batch.target_mask, loss_cfg)
        loss = per_sequence_loss(stats.logprobs, stats.mask, batch.advantages, norm, loss_cfg).sum()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.max_grad_norm)
        optimizer.step()
        rewards = [r["reward"] for r in records]
        live = sum(1 for k in range(0, len(records), cfg.group_size) if len(set(rewards[k : k + cfg.group_size])) > 1)
        history.append(
            {
                "step": step + 1,
                "mean_reward": sum(rewards) / len(rewards),
                "groups_with_signal": live,
                "groups": len(prompts),
                "loss": float(loss.detach()),
                "grad_norm": float(grad_norm),
            }
        )
    model.eval()
    return optimizer, history


def _versions() -> dict[str, str]:
    import tokenizers
    import transformers

    import probe

    return {
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "tokenizers": tokenizers.__version__,
        "probe": getattr(probe, "__version__", "0.1.0"),
    }


@contextlib.contextmanager
def _timed(timings: dict[str, float], name: str) -> Iterator[None]:
    start = time.perf_counter()
    yield
    timings[name] = round(time.perf_counter() - start, 3)


def _build_into(directory: Path, cfg: ToyWorldConfig) -> dict:
    start = time.perf_counter()
    timings: dict[str, float] = {}
    with torch.random.fork_rng(devices=[]), _deterministic_single_thread():  # the caller's global RNG is left as it was
        with _timed(timings, "init"):
            model = make_policy(cfg)
            reward_init = mean_reward(model, cfg, n_prompts=20, seed=cfg.seed + 3)
        with _timed(timings, "pretrain"):
            pretrain_history = _pretrain(model, cfg)
            expected_after_pretrain = expected_reward(model, cfg.temperature)
            reward_after_pretrain = mean_reward(model, cfg, n_prompts=cfg.eval_prompts, seed=cfg.seed + 4)
        with _timed(timings, "grpo"):
            optimizer, history = _grpo_warmup(model, cfg)
        with _timed(timings, "final_reward"):
            final = mean_reward(model, cfg, n_prompts=cfg.eval_prompts, seed=cfg.seed + 5)
            expected_final = expected_reward(model, cfg.temperature)
    model.save_pretrained(str(directory), safe_serialization=True)
    save_tokenizer(directory)
    torch.save(optimizer.state_dict(), directory / "optimizer.pt")
    files = {p.name: _sha256(p) for p in sorted(directory.iterdir()) if p.is_file() and p.name != COMPLETE_MARKER}
    info = {
        "format": FORMAT_VERSION,
        "config": asdict(cfg),
        "key": cfg.key(),
        "task": "single-digit addition; reward callable probe.toy.task:reward (text) or probe.toy.task:reward_ids",
        "optimizer": "torch.optim.AdamW over model.parameters() (one param group, model.parameters() order)",
        "mean_reward_initial": reward_init,
        "pretrain_history": pretrain_history,
        "mean_reward_after_pretrain": reward_after_pretrain,
        "expected_reward_after_pretrain": expected_after_pretrain,
        "expected_reward_final": expected_final,
        "grpo_history": history,
        "final_mean_reward": final,
        "build_seconds": round(time.perf_counter() - start, 3),
        "timings": timings,
        "versions": _versions(),
        "files": files,  # sha256 of every file: a cached world that no longer matches is rebuilt
    }
    (directory / COMPLETE_MARKER).write_text(json.dumps(info, indent=2))
    return info


def build_toy_world(cfg: ToyWorldConfig | None = None, root: str | Path | None = None) -> Path:
    """Build (once) and return the toy world's checkpoint directory.

    Args:
        cfg: the world's config (default: :class:`ToyWorldConfig`).
        root: cache root (default: ``$PROBE_CACHE`` or ``~/.cache/probe``).

    Returns:
        ``<root>/toy_world-<config hash>/``, a complete HF checkpoint directory with ``optimizer.pt``.
        An existing complete directory whose files match their sha256 is returned as is; one whose files do not
        (a disk error, a truncated copy) is rebuilt, with a warning naming it. The build writes to a temporary
        sibling and renames it into place, so an interrupted build never looks complete.
    """
    cfg = cfg or ToyWorldConfig()
    target = toy_world_dir(cfg, root)
    if is_complete(target):
        damaged = damaged_files(target)
        if not damaged:
            return target
        log.warning(
            "the cached toy world %s is corrupt (%s: not the file%s probe built, e.g. after a disk error or an "
            "interrupted copy); rebuilding it (seconds; the same world, bit for bit, on this machine and software)",
            target,
            ", ".join(damaged),
            "s" if len(damaged) > 1 else "",
        )
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.building-", dir=target.parent))
    try:
        _build_into(staging, cfg)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(staging, 0o777 & ~umask)  # mkdtemp makes it private; the cache is an ordinary directory
        if target.exists() and not is_intact(target):
            shutil.rmtree(target, ignore_errors=True)  # leftovers of an older, broken layout, or a corrupt world
        try:
            os.rename(staging, target)
        except OSError:
            if not is_intact(target):  # someone else won the race with an intact world: keep theirs
                raise
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
    return target


def load_toy_world_info(directory: str | Path) -> dict:
    """The ``toy_world.json`` of a built world (config, reward history, final mean reward, versions)."""
    path = Path(directory) / COMPLETE_MARKER
    if not path.is_file():
        raise FileNotFoundError(
            f"{path} is missing: {directory} is not a complete toy world; build it with probe.toy.build_toy_world()"
        )
    return json.loads(path.read_text())
