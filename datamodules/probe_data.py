"""The LightningDataModule of a probe run: the update batch U and one or more evaluation batches E.

Each batch is read from a rollout file or sampled from the policy. Whatever its source, it
is written to the run directory (``rollouts/update.jsonl``, ``rollouts/eval_00.jsonl``, ...)
before use, so every run can be repeated from files and a rerun on the same directory
reuses exactly the same sequences. Sampling happens on rank 0 only; all ranks then read
the written files. What it reads goes to the run state (``inputs``, :mod:`probe.run_state`).
"""

from __future__ import annotations

import logging
import re
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, Callable

import lightning.pytorch as pl
import torch
from torch.utils.data import DataLoader

from datamodules.rollouts import check_advantages, check_eval_sampling, fill_advantages, read_rollouts, write_rollouts
from probe.engine import check_prompt_groups
from probe.loading import context_length
from probe.prompts import PromptSource, load_prompts
from probe.rewards import resolve_reward
from probe.run_state import ProbeInputs, indexed_collate, on_rank_zero, run_state_of, settings_key
from probe.rundir import file_digest
from probe.sampling import (
    SamplingSettings,
    ids_reward_from_text,
    sample_responses,
    sample_update_batch,
    special_token_ids,
)

log = logging.getLogger("probe")


@dataclass
class UpdateBatchSettings:
    """The update batch U.

    Args:
        path: a rollout file (JSONL or Parquet, docs/DESIGN.md section 9) to read U from; empty: sample it.
        source: prompts to sample from (when ``path`` is empty).
        sampling: sampling settings (G = ``n_per_prompt`` responses per prompt).
        reward: ``toy``, ``gsm8k`` or ``package.module:function``
            (``reward(prompt, response[, answer][, finished]) -> float``, README "Reward functions").
        skip_special_tokens: decode prompt and response for the reward without special tokens (``<eos>``,
            ``<pad>``, ...), as TRL and verl do; false: keep them in the text.
        normalize_std: divide group advantages by the group's reward std (GRPO); off: Dr. GRPO.
        filter_zero_advantage_prompts: resample prompt groups whose advantages are all zero.
        max_resample_attempts: resampling attempts before a clear error.
        zero_tol: an advantage with ``|A| <= zero_tol`` counts as zero.
    """

    path: str = ""
    source: PromptSource = field(default_factory=PromptSource)
    sampling: SamplingSettings = field(default_factory=lambda: SamplingSettings(n_per_prompt=8, max_new_tokens=4))
    reward: str = "toy"
    skip_special_tokens: bool = True
    normalize_std: bool = True
    filter_zero_advantage_prompts: bool = True
    max_resample_attempts: int = 5
    zero_tol: float = 1e-8


@dataclass
class EvalBatchSettings:
    """One evaluation batch E (sequences from the policy whose entropy is probed).

    Args:
        path: a rollout file to read E from (its records say how they were sampled: ``temperature`` equal to
            ``sampling.temperature``, ``top_p`` 1.0, ``top_k`` 0 or null); empty: sample it from the policy.
        source: prompts to sample from (when ``path`` is empty).
        sampling: sampling settings; ``temperature`` is the tau whose entropy is measured.
        allow_truncated_sampling: accept top-p/top-k sampling for E. The entropy measured is then
            that of the untruncated temperature-tau policy while E came from another
            distribution: only turn this on knowingly.
        reward: score every sequence of E with this reward (``toy``, ``gsm8k`` or ``package.module:function``, as
            the update batch's), so that the run also measures the change of E's expected reward and attributes it
            (``probe.reward``); a file E's own ``reward`` fields are then replaced (logged). Empty: E's rewards are
            those of its file's ``reward`` field, if every record has one, else none.
        skip_special_tokens: decode prompt and response for the reward without special tokens, as for U.
    """

    path: str = ""
    source: PromptSource = field(default_factory=lambda: PromptSource(offset=1000))
    sampling: SamplingSettings = field(
        default_factory=lambda: SamplingSettings(n_per_prompt=16, max_new_tokens=4, seed=1)
    )
    allow_truncated_sampling: bool = False
    reward: str = ""
    skip_special_tokens: bool = True

    def __post_init__(self) -> None:
        s = self.sampling
        if s.truncated and not self.allow_truncated_sampling:
            raise ValueError(
                f"evaluation batch sampled with top_p={s.top_p}, top_k={s.top_k}: the entropy would be of another "
                "distribution than the policy's. Fix: remove top_p/top_k for E, or set allow_truncated_sampling=true "
                "knowingly"
            )


class ProbeDataModule(pl.LightningDataModule):
    """Yields the evaluation batches E (``predict_dataloader``); U and E go to the run state."""

    def __init__(
        self,
        update: UpdateBatchSettings = UpdateBatchSettings(),
        evals: list[EvalBatchSettings] = [EvalBatchSettings()],  # noqa: B006 (jsonargparse default)
        eval_batch_size: int = 64,
        num_workers: int = 0,
    ):
        """
        Args:
            update: the update batch U.
            evals: one or more evaluation batches (``eval_00``, ``eval_01``, ...), sharing one update.
            eval_batch_size: sequences of E per predict batch.
            num_workers: DataLoader workers.
        """
        super().__init__()
        if not evals:
            raise ValueError("data.evals is empty: give at least one evaluation batch")
        if eval_batch_size < 1:
            raise ValueError(f"data.eval_batch_size must be >= 1 sequences per predict batch, got {eval_batch_size}")
        self.update_settings, self.eval_settings = update, list(evals)
        self.eval_batch_size, self.num_workers = eval_batch_size, num_workers
        self.inputs: ProbeInputs | None = None

    # ---- building the batches ----------------------------------------------------------------
    def _sample_update(self, policy: torch.nn.Module, tokenizer: Any) -> list[dict]:
        s = self.update_settings
        prompts, answers = load_prompts(s.source, tokenizer)
        return sample_update_batch(
            policy,
            prompts,
            s.sampling,
            reward_fn=ids_reward_from_text(
                resolve_reward(s.reward),
                tokenizer,
                answers,
                skip_special_tokens=s.skip_special_tokens,
                eos_token_id=special_token_ids(tokenizer, model=policy)[1],  # `finished` by every EOS sampling stops at
            ),
            tokenizer=tokenizer,
            normalize_std=s.normalize_std,
            filter_zero_advantage_prompts=s.filter_zero_advantage_prompts,
            max_resample_attempts=s.max_resample_attempts,
            zero_tol=s.zero_tol,
        )

    @staticmethod
    def _sample_eval(settings: EvalBatchSettings, policy: torch.nn.Module, tokenizer: Any) -> list[dict]:
        prompts, _ = load_prompts(settings.source, tokenizer)
        return sample_responses(policy, prompts, settings.sampling, tokenizer=tokenizer)

    @staticmethod
    def _score_eval(
        settings: EvalBatchSettings, policy: torch.nn.Module, tokenizer: Any, records: list[dict]
    ) -> list[dict]:
        """E's records with ``reward`` from ``settings.reward``; the reference answers (GSM8K's) come from
        ``settings.source`` for a sampled E, from each record's ``answer`` field for a file E."""
        if not settings.reward:
            return records
        if settings.path:
            answers = {tuple(r["prompt_ids"]): r["answer"] for r in records if r.get("answer") is not None}
        else:
            answers = load_prompts(settings.source, tokenizer)[1]
        reward = ids_reward_from_text(
            resolve_reward(settings.reward),
            tokenizer,
            answers,
            skip_special_tokens=settings.skip_special_tokens,
            eos_token_id=special_token_ids(tokenizer, model=policy)[1],
        )
        replaced = sum(r.get("reward") is not None for r in records)
        if replaced:
            log.info("evaluation batch %s: %d rewards of the file replaced by %s", settings.path, replaced, reward)
        return [dict(r, reward=float(reward(r["prompt_ids"], r["response_ids"]))) for r in records]

    def _materialise(
        self,
        target: Path,
        settings: Any,
        make: Callable[[], list[dict]],
        read: Callable,
        score: Callable[[list[dict]], list[dict]] | None = None,
    ) -> None:
        """Write the batch's rollout file into the run directory unless a previous run already did; ``score`` adds
        what the records get from the run's settings (E's rewards)."""
        if target.exists():
            log.debug("reusing %s (resumed run)", target)
            return
        if settings.path:
            records = read(settings.path)
            if isinstance(settings, UpdateBatchSettings):  # the copy holds the advantages the run uses
                records = self._with_advantages(records, settings)
            if isinstance(settings, EvalBatchSettings):  # refuse before copying: name the user's file, keep no bad copy
                self._check_eval(records, Path(settings.path), settings)
            log.debug("read %d sequences from %s", len(records), settings.path)
        else:
            records = make()
        if score is not None:
            records = score(list(records))
        if not settings.path:
            self._log_sampled(target.stem, records)
        write_rollouts(list(records), target)

    @staticmethod
    def _with_advantages(records: list[dict], settings: UpdateBatchSettings) -> list[dict]:
        """U's advantages: given in every record, or computed from ``reward`` for all of them (logged);
        records of which only some carry one are refused."""
        check_advantages(records)
        if records[0].get("advantage") is None:
            return fill_advantages(records, normalize_std=settings.normalize_std)
        return records

    @staticmethod
    def _log_sampled(name: str, records: list[dict]) -> None:
        n = len(records)
        truncated = sum(bool(r.get("truncated")) for r in records)
        msg = f"sampled {name}: {n} sequences, {truncated} truncated at max_new_tokens ({truncated / max(n, 1):.0%})"
        if records and "reward" in records[0]:
            retries = sorted({int(r.get("resample_attempt", 0)) for r in records})
            mean_reward = sum(float(r["reward"]) for r in records) / n
            msg += f", mean reward {mean_reward:.3f}, resample attempts used: {max(retries)}"
        log.debug(msg)

    def inputs_fingerprint(self, policy: dict[str, Any]) -> dict[str, Any]:
        """What the run's rollout copies are made from: the policy's settings (but where it runs), U's and each
        E's settings (but the truncation check's switch), and the content of every input file they name (sha256)."""

        def files(batch: UpdateBatchSettings | EvalBatchSettings) -> dict[str, str]:
            named = {"path": batch.path, "source.prompts": batch.source.prompts if not batch.path else ""}
            return {key: file_digest(value) for key, value in named.items() if value and Path(value).is_file()}

        def evaluation(settings: EvalBatchSettings) -> dict[str, Any]:
            out = {**asdict(settings), "files": files(settings)}
            out.pop("allow_truncated_sampling")  # a check's switch: what it lets through is refused or not
            return out

        return {
            "policy": {k: v for k, v in policy.items() if k != "device"},
            "update": {**asdict(self.update_settings), "files": files(self.update_settings)},
            "evals": [evaluation(s) for s in self.eval_settings],
        }

    def setup(self, stage: str) -> None:
        trainer = self.trainer
        state = run_state_of(trainer)
        run_dir = trainer.lightning_module.open_run_dir(trainer)
        policy, tokenizer = state.policy, state.tokenizer
        vocab_size = int(policy.get_input_embeddings().weight.shape[0])
        pad, eos = special_token_ids(tokenizer, model=policy)  # every EOS id: tokenizer, config, generation_config
        # token ids checked against the vocabulary and lengths against the context (None: unknown, not checked);
        # padding after a response's EOS stripped, other tokens refused
        context = context_length(policy)  # with RoPE scaling; None: the config names none
        read = partial(read_rollouts, vocab_size=vocab_size, max_length=context, eos_token_ids=eos, pad_token_id=pad)
        rollouts = run_dir.path / "rollouts"

        def materialise() -> None:  # rank 0; a refusal here stops every rank (on_rank_zero), not rank 0 alone
            fingerprint = state.settings.resume_fingerprint()
            inputs = self.inputs_fingerprint(fingerprint.pop("policy"))
            run_dir.claim("inputs", inputs, stale=("rollouts",), key_name=inputs_key)
            run_dir.claim("settings", fingerprint, stale=("update.safetensors",), key_name=settings_key)
            policy.to(trainer.strategy.root_device)
            self._materialise(
                rollouts / "update.jsonl", self.update_settings, lambda: self._sample_update(policy, tokenizer), read
            )
            for k, settings in enumerate(self.eval_settings):
                self._materialise(
                    rollouts / f"eval_{k:02d}.jsonl",
                    settings,
                    partial(self._sample_eval, settings, policy, tokenizer),
                    read,
                    partial(self._score_eval, settings, policy, tokenizer),
                )

        on_rank_zero(trainer, materialise)
        trainer.strategy.barrier("probe-rollouts")
        update = read(rollouts / "update.jsonl")  # the copy holds its advantages (sampled, given or computed)
        if all(abs(float(r["advantage"])) <= self.update_settings.zero_tol for r in update):
            raise ValueError(
                f"every advantage of the update batch ({len(update)} sequences, {rollouts / 'update.jsonl'}) is zero "
                f"(|A| <= {self.update_settings.zero_tol}): the policy-gradient part of the step is zero and there is "
                "nothing to attribute. Fix: use a batch whose groups have different rewards, or sample U with "
                "filter_zero_advantage_prompts=true"
            )
        eval_records = []
        for k, settings in enumerate(self.eval_settings):
            records = read(rollouts / f"eval_{k:02d}.jsonl")
            first_look = trainer.global_rank == 0 and not settings.path  # a user's file was reported before its copy
            self._check_eval(records, rollouts / f"eval_{k:02d}.jsonl", settings, report_unended=first_look)
            eval_records.append([dict(r, index=i) for i, r in enumerate(records)])
        self.inputs = state.inputs = ProbeInputs(
            update_records=[dict(r, index=i) for i, r in enumerate(update)],
            eval_records=eval_records,
            temperatures=[float(s.sampling.temperature) for s in self.eval_settings],
            pad_token_id=pad,
        )
        for k in range(len(eval_records)):  # before any pass over E: per_prompt needs groups of >= 2
            check_prompt_groups(self.inputs.eval_batch(k), state.settings.probe.normalisation)

    def _check_eval(
        self, records: list[dict], path: Path, settings: EvalBatchSettings, report_unended: bool = True
    ) -> None:
        """E must say how it was sampled: the full distribution at the probe's tau (datamodules.rollouts);
        ``report_unended``: report an E whose responses mostly do not end (once per batch, not per look)."""
        k = next(k for k, s in enumerate(self.eval_settings) if s is settings)
        scored = [i for i, r in enumerate(records) if r.get("reward") is not None]
        if scored and len(scored) < len(records) and not settings.reward:
            unscored = next(i for i, r in enumerate(records) if r.get("reward") is None)
            raise ValueError(
                f"{path}: {len(scored)} of the {len(records)} records of this evaluation batch carry a reward and the "
                f"others do not (line {unscored + 1} has none), so the change of E's expected reward cannot be "
                "measured. Fix: give every record its reward, remove the field from all, or score E with "
                f"data.init_args.evals[{k}].reward (which replaces the file's rewards)"
            )
        check_eval_sampling(
            records,
            temperature=float(settings.sampling.temperature),
            allow_truncated_sampling=settings.allow_truncated_sampling,
            setting=f"data.init_args.evals[{k}].sampling.temperature",
            source=str(path),
            report_unended=report_unended,
        )

    def predict_dataloader(self) -> DataLoader | list[DataLoader]:
        if self.inputs is None:
            raise RuntimeError(
                "ProbeDataModule.setup has not run: the predict dataloaders come from the rollouts it reads"
            )
        loaders = [
            DataLoader(
                records,
                batch_size=self.eval_batch_size,
                shuffle=False,
                num_workers=self.num_workers,
                collate_fn=partial(indexed_collate, pad_token_id=self.inputs.pad_token_id),
            )
            for records in self.inputs.eval_records
        ]
        return loaders[0] if len(loaders) == 1 else loaders


def inputs_key(key: str) -> str:
    """A key of ``partial/inputs.json`` as the config spells it: ``data.init_args.evals[0].path (file content)``."""
    key = re.sub(r"^evals\.(\d+)\.", r"evals[\1].", key)
    if key.startswith("policy."):
        return f"model.init_args.{key}"
    section, _, rest = key.partition(".")
    if rest.startswith("files."):
        return f"data.init_args.{section}.{rest.removeprefix('files.')} (the file's content)"
    return f"data.init_args.{key}"
