"""The live entropy probe, whatever the trainer: predict, verify and measure a training run's optimizer steps.

One :class:`LiveProbe` per training run; the trainer's adapter calls it at two points of every probed step
(docs/DESIGN.md section 6, "A live step"):

1. :meth:`LiveProbe.before_step`, after backward (and the data-parallel all-reduce), before ``optimizer.step()``:
   reconstructs the step about to happen from the REAL gradients and the optimizer's state
   (:func:`probe.update.update_from_gradients`: no second backward over U), then probes it on an evaluation batch
   E with the engine (:func:`probe.engine.probe_eval`): SNIS over a small sweep of eta around lr (eta = lr is the
   real step), first order (with its SE), second order by JVP, and the attribution of the gradient part's
   first-order change to the step's sequences;
2. :meth:`LiveProbe.after_step`, after ``optimizer.step()``: verifies that the parameters moved by exactly the
   reconstruction (:func:`probe.verification.verify_step`; loudly, ``logging.warning`` and ``warnings.warn``,
   beyond one rounding unit) and measures the realised change on FRESH samples
   (:func:`probe.realised.realised_change`): H(new) - H(old) on a sample of the old policy (drawn before the step,
   independent of E) and one of the new policy drawn with the same uniforms row by row (common random numbers: the
   paired difference resolves the change of one step), and the z-scores of the predictions against it.

One JSON line per probed step goes to ``<run_dir>/records.jsonl``: ``plan``, ``update`` and ``eval`` hold the same
fields as ``summary.json``'s ``plan``, ``update`` and ``evals[k]`` of an offline run; :meth:`LiveProbe.metrics` gives
the scalars an offline run logs (:func:`probe.results.metrics`) plus ``live/...`` for the verification, the
realised change and the overhead; :meth:`LiveProbe.finish` draws ``<run_dir>/plots/live_entropy.png``.

The adapters: ``callbacks.live.LiveEntropyProbe`` (a Lightning fit; the module declares its step through
:mod:`probe.live_contract`) and ``callbacks.trl_live.TRLEntropyProbe`` (TRL's ``GRPOTrainer``; the step's U is
captured from the trainer's own micro-batches). No Lightning, no transformers import here.

Data parallel (DDP): every rank reconstructs the step from its (identical, all-reduced) gradients and verifies its
own parameters; U is gathered to rank 0 (one ``all_gather_object``), which samples E, predicts, attributes and
measures; the verification numbers of all ranks are gathered to rank 0 after the step. On a policy sharded with
FSDP2 every rank reconstructs and verifies the rows of its own shards, U is gathered to every rank, and every rank
samples the same E (same seed) and takes part in every pass (each forward gathers the policy's layers, a
collective); rank 0 alone writes (docs/DESIGN.md section 11).
"""

from __future__ import annotations

import json
import logging
import math
import time
import warnings
from collections import OrderedDict
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Callable

import torch

from probe.adam import AdamState
from probe.batch import SequenceBatch, collate
from probe.engine import EvalBatch, Plan, probe_eval
from probe.jsonable import dumps, json_safe
from probe.live_contract import ProbedStep
from probe.loading import context_length
from probe.logprobs import TeacherForcing
from probe.losses import normalisers as loss_normalisers
from probe.overrides import base_statistics
from probe.plots import plot_covariance_law, plot_live
from probe.prompts import PromptSource, load_prompts
from probe.realised import check_pairing, identical_fraction, realised_change
from probe.results import EvalResult, metrics, update_metrics
from probe.rewards import resolve_reward
from probe.sampling import (
    SamplingSettings,
    common_uniforms,
    derived_seed,
    ids_reward_from_text,
    sample_responses,
    special_token_ids,
)
from probe.sharding import sharded_view
from probe.snis import SNISConfig
from probe.statistics import INTEGRANDS, SequenceStats
from probe.update import PARTS, Update, unwrap_optimizer, update_from_gradients
from probe.verification import step_rounding, verify_step

log = logging.getLogger("probe")


@dataclass
class LiveEvalSettings:
    """The evaluation batch E of the live probe.

    Args:
        path: a rollout file (JSONL or Parquet, docs/DESIGN.md section 9) holding E; empty: sample E from the policy.
        source: prompts E is sampled from (when ``path`` is empty); held out from training by ``offset``.
        sampling: how E is sampled (``temperature`` is the tau whose entropy is measured; no top-p/top-k).
        refresh: sample E afresh from the current policy at every probed step (same prompts, a new seed per
            step), so that E ~ pi_theta as the estimators assume. False: hold E fixed (sampled at the start
            of fit, or read from ``path`` and taken as sampled from the policy at the start); importance
            weights are then relative to that policy, and the attribution (which assumes E ~ pi_theta)
            is skipped.
        realised_n_per_prompt: responses per prompt of the fresh samples that measure the realised change
            (default: ``sampling.n_per_prompt``).
        realised_pairing: how the fresh samples of the old and the new policy are drawn.
            ``common_random_numbers``: before the step a sample of pi_old (independent of E), after it one of
            pi_new with the same uniforms row by row (inverse-CDF sampling); each is exactly from its policy, most
            rows come out identical after a small step, and the SE of the paired difference is many times smaller
            (docs/DESIGN.md section 6). ``independent``: two independent samples (the old one is E itself when
            refreshed), SE = hypot(se_old, se_new).
        forward_batch_size: sequences of E teacher-forced per forward pass (memory; results do not depend on it
            beyond float rounding).
        reward: score each sequence of a refreshed E with this reward (``toy``, ``gsm8k`` or
            ``package.module:function``, decoded without special tokens), so that each probed step also measures the
            change of E's expected reward and attributes it to the step's sequences (docs/DESIGN.md section 5);
            empty: none. (A held E is not scored: its reward change would be against the policy it came from.)
    """

    path: str = ""
    source: PromptSource = field(default_factory=lambda: PromptSource(prompts="toy", n_prompts=32, offset=1000, seed=0))
    sampling: SamplingSettings = field(
        default_factory=lambda: SamplingSettings(n_per_prompt=8, max_new_tokens=4, seed=1)
    )
    refresh: bool = True
    realised_n_per_prompt: int | None = None
    realised_pairing: str = "common_random_numbers"
    forward_batch_size: int = 256
    reward: str = ""

    def __post_init__(self) -> None:
        if self.sampling.truncated:
            raise ValueError(
                "the live probe's E must be sampled without top_p/top_k (its entropy is the temperature-tau "
                "policy's); remove them"
            )
        if self.path and self.refresh:
            raise ValueError(
                "eval.path gives a fixed E, which cannot be refreshed; set eval.refresh=false (or drop eval.path)"
            )
        check_pairing(self.realised_pairing)
        if self.realised_n_per_prompt is not None and self.realised_n_per_prompt < 1:
            raise ValueError(
                f"eval.realised_n_per_prompt={self.realised_n_per_prompt} must be >= 1 (null: sampling.n_per_prompt)"
            )


@dataclass
class LiveProbeSettings:
    """What the live probe does, and at which optimizer steps.

    Args:
        every_n_steps: probe the optimizer steps ``start_step``, ``start_step + k``, ... (k = every_n_steps).
        eval: the evaluation batch E (sampled from the policy, or a rollout file).
        integrand: ``token_entropy`` (sum of full-vocabulary token entropies) or ``logprob`` (-log p).
        eta_factors: the SNIS sweep, eta = factor * lr (1.0, the real step, is always included).
        second_order: also the second eta-derivative (a JVP of a JVP) and the linear radius.
        attribution: attribute the gradient part's first-order change to each update sequence.
        verify: after the step, compare the parameters' change with the reconstruction.
        realised: after the step, measure the realised entropy change on fresh samples.
        start_step: first probed step (0: the run's first optimizer step).
        parts: the parts of the update swept (``full``, ``baseline``, ``grad``); ``full``, the real step, is always
            swept (the realised change is compared with it).
        covariance_fraction: the fraction of the step's response tokens the covariance law's overlap takes (at
            least one; Clip-Cov's and KL-Cov's default 2e-4; docs/DESIGN.md section 5).
    """

    every_n_steps: int = 1
    eval: LiveEvalSettings = field(default_factory=LiveEvalSettings)
    integrand: str = "token_entropy"
    eta_factors: list[float] = field(default_factory=lambda: [0.1, 1.0, 10.0])
    second_order: bool = True
    attribution: bool = True
    verify: bool = True
    realised: bool = True
    start_step: int = 0
    parts: list[str] = field(default_factory=lambda: ["full"])
    covariance_fraction: float = 2e-4

    def __post_init__(self) -> None:
        if self.every_n_steps < 1:
            raise ValueError(f"every_n_steps={self.every_n_steps} must be >= 1")
        if self.start_step < 0:
            raise ValueError(f"start_step={self.start_step} must be >= 0 (0: the run's first optimizer step)")
        if self.integrand not in INTEGRANDS:
            raise ValueError(f"unknown integrand {self.integrand!r}; choose one of {', '.join(INTEGRANDS)}")
        bad = [f for f in self.eta_factors if not (isinstance(f, (int, float)) and f > 0 and math.isfinite(f))]
        if bad:
            raise ValueError(f"eta_factors must be finite and > 0, got {bad}")
        self.eta_factors = sorted(set(float(f) for f in self.eta_factors) | {1.0})
        unknown = [p for p in self.parts if p not in PARTS]
        if unknown:
            raise ValueError(f"unknown part(s) {unknown} in parts; choose from {', '.join(PARTS)}")
        if "full" not in self.parts:
            raise ValueError(
                f"parts={list(self.parts)} leaves out 'full', the real step (the realised change and the metrics at "
                "eta = lr compare with it); add full"
            )
        self.parts = [p for p in PARTS if p in self.parts]  # each once, in the update's order
        if not (0 < self.covariance_fraction <= 1):
            raise ValueError(
                f"covariance_fraction={self.covariance_fraction} must be in (0, 1]: the fraction of the step's "
                "response tokens compared. Fix: give a fraction in (0, 1], e.g. Clip-Cov's default 2e-4"
            )

    def is_probed(self, step: int) -> bool:
        return step >= self.start_step and (step - self.start_step) % self.every_n_steps == 0


@dataclass
class GradientHandling:
    """How the trainer turns its gradients into the optimizer's input at the probed step.

    Attributes:
        max_norm: the clip value of ``clip_grad_norm_`` (None: no clipping).
        clipped: the gradients the probe reads are already clipped (HF Trainer's ``on_pre_optimizer_step``);
            ``grad_norm`` then gives the pre-clip norm, from which the clip coefficient is recovered.
        grad_norm: the pre-clip global norm (only with ``clipped``).
        autocast: the autocast dtype of mixed precision (None: none).
        grad_scale: a GradScaler's scale of this step (None: none).
    """

    max_norm: float | None = None
    clipped: bool = False
    grad_norm: torch.Tensor | float | None = None
    autocast: torch.dtype | None = None
    grad_scale: float | None = None


@dataclass
class Processes:
    """The training run's processes as the probe sees them: this one's rank and how many there are."""

    rank: int = 0
    world_size: int = 1

    def gather(self, obj: Any) -> list[Any]:
        """``obj`` of every rank, in rank order (one ``all_gather_object``; ``[obj]`` in one process)."""
        if self.world_size > 1 and torch.distributed.is_available() and torch.distributed.is_initialized():
            out: list[Any] = [None] * self.world_size
            torch.distributed.all_gather_object(out, obj)
            return out
        return [obj]


@dataclass
class PendingStep:
    """What the probe keeps between :meth:`LiveProbe.before_step` and :meth:`LiveProbe.after_step`."""

    step: int
    update: Update
    snapshot: dict[str, torch.Tensor]  # parameters before the step (for the verification)
    record: dict[str, Any]  # the record so far (JSON-ready)
    timings: dict[str, float]
    result: EvalResult | None = None  # the prediction (rank 0; every rank of a sharded policy)
    plan: Plan | None = None
    old_sample: RealisedSample | None = None  # a sample of pi_old for the realised change
    rounding: float | None = None  # the optimizer kernel's relative rounding for the verification (step_rounding)


@dataclass
class RealisedSample:
    """A fresh sample of pi_old for the realised change, and how its partner of pi_new is drawn after the step."""

    stats: SequenceStats  # at theta_old
    pairing: str  # common_random_numbers: pi_new is sampled with the same uniforms; independent: with a new seed
    prompts: list[list[int]]  # the prompts, each n_per_prompt times in a row (the rows of the sample)
    n_per_prompt: int
    seed: int  # the uniforms' seed (paired); the seed of pi_old's own sample (independent, not E)
    responses: list[list[int]]  # the sampled responses, row by row


@dataclass
class ProbedRecord:
    """One probed step's outcome: the record written to ``records.jsonl`` and its scalar metrics."""

    record: dict[str, Any]  # (its "step" is the probed step)
    metrics: dict[str, float]


class LiveProbe:
    """The live probe of one training run (module docstring); its adapters call :meth:`setup`, :meth:`hold_eval`,
    :meth:`before_step`, :meth:`after_step` and :meth:`finish`."""

    def __init__(
        self,
        settings: LiveProbeSettings,
        processes: Processes = Processes(),
        run_dir: Path | None = None,
        settings_name: str = "the live probe's eval",
    ):
        """
        Args:
            settings: what to probe and how.
            processes: this process's rank and the world size.
            run_dir: where rank 0 writes ``settings.json``, ``records.jsonl`` and ``plots/`` (None: nowhere).
            settings_name: how error messages name ``settings.eval`` (the adapter's own config key).
        """
        self.settings, self.processes, self.settings_name = settings, processes, settings_name
        self.run_dir = run_dir if processes.rank == 0 else None
        self.records: list[dict] = []  # rank 0: full records; other ranks: their verification only
        self.pending: PendingStep | None = None
        self._prompts: list[list[int]] = []
        self._held: tuple[SequenceBatch, SequenceStats] | None = None  # held E and its stats at the sampling policy
        self._eos: list[int] = []
        self._pad = 0
        self._reward: Callable[[list[int], list[int]], float] | None = None  # E's reward on token ids (eval.reward)

    # ---- set-up -----------------------------------------------------------------------------
    def setup(self, policy: torch.nn.Module, tokenizer: Any, context: dict[str, Any] | None = None) -> None:
        """Read the special tokens and E's prompts; rank 0 writes ``settings.json`` (with ``context``: what the
        adapter adds, such as the trainer's name)."""
        self._pad, self._eos = special_token_ids(tokenizer, model=policy)  # + generation_config
        answers = None
        if not self.settings.eval.path:
            prompts, answers = load_prompts(self.settings.eval.source, tokenizer)
            self._prompts = [list(map(int, p)) for p in prompts]
        if self.settings.eval.reward:
            reward = resolve_reward(self.settings.eval.reward)
            self._reward = ids_reward_from_text(reward, tokenizer, answers, eos_token_id=self._eos)
        if self.run_dir is not None:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            written = {**asdict(self.settings), "world_size": self.processes.world_size, **(context or {})}
            (self.run_dir / "settings.json").write_text(json.dumps(written, indent=2, default=str))

    def _takes_part(self, policy: torch.nn.Module) -> bool:
        """Whether this rank runs the prediction's passes: rank 0, or every rank of a sharded policy."""
        return self.processes.rank == 0 or sharded_view(policy) is not None

    def hold_eval(self, policy: torch.nn.Module) -> None:
        """With ``eval.refresh`` off: sample (or read) the held E at the start of training."""
        if self.settings.eval.refresh or not self._takes_part(policy):
            return
        settings = self.settings.eval
        with eval_mode(policy):
            if settings.path:
                from datamodules.rollouts import check_eval_sampling, read_rollouts

                vocab = int(policy.get_input_embeddings().weight.shape[0])
                context = context_length(policy)  # with RoPE scaling; None: the config names none
                records = read_rollouts(
                    settings.path, vocab_size=vocab, max_length=context, eos_token_ids=self._eos, pad_token_id=self._pad
                )
                check_eval_sampling(  # E must say how it was sampled: from the full distribution at tau
                    records,
                    temperature=settings.sampling.temperature,
                    setting=f"{self.settings_name}.sampling.temperature",
                    allow_setting=None,  # the live probe has no allow_truncated_sampling: the fix is to resample E
                )
                E = collate(list(records), pad_token_id=self._pad)
            else:
                E = self._sample_eval(policy, self._seed(-1, "eval"))
            self._held = (E, self._statistics(policy, E))
            if settings.path and not self._prompts:  # the realised change samples the held E's prompts
                self._prompts = distinct_prompts(E)
        log.info("live probe: holding an evaluation batch of %d sequences (sampled at the start of fit)", len(E))

    # ---- helpers ----------------------------------------------------------------------------
    def _seed(self, step: int, purpose: str) -> int:
        return derived_seed("live", self.settings.eval.sampling.seed, step, purpose)

    def plan(self, lr: float, with_attribution: bool) -> Plan:
        """The engine's plan of one probed step: the swept parts over eta = factor * lr, first/second order."""
        s = self.settings
        return Plan(
            parts=tuple(s.parts),
            etas=tuple(f * lr for f in s.eta_factors),
            lr=lr,
            reference_eta=lr,
            integrand=s.integrand,
            snis=SNISConfig(),
            first_order=True,
            second_order=s.second_order,
            attribution=with_attribution,
            covariance_law=True,  # on the step's U, beside the exact change (probe.covariance)
            reward=True,  # where E carries rewards (eval.reward)
            covariance_fraction=s.covariance_fraction,
            eval_update_matrix=False,
            head_dtype=torch.float64,
            batch_size=s.eval.forward_batch_size,
        )

    def _sample_eval(self, policy: torch.nn.Module, seed: int) -> SequenceBatch:
        """A fresh E of ``eval.sampling``, each sequence scored with ``eval.reward`` when one is set."""
        records = self._sample_records(policy, self.settings.eval.sampling.n_per_prompt, seed)
        if self._reward is not None:
            records = [dict(r, reward=float(self._reward(r["prompt_ids"], r["response_ids"]))) for r in records]
        return collate(records, pad_token_id=self._pad)

    def _sample_records(
        self,
        policy: torch.nn.Module,
        n_per_prompt: int,
        seed: int,
        coupled: bool = False,
        prompts: list[list[int]] | None = None,
    ) -> list[dict]:
        """``n_per_prompt`` responses to each prompt (default: E's): drawn with a generator seeded ``seed``, or
        (``coupled``) by inverse CDF from the uniforms of ``seed`` (:func:`probe.sampling.common_uniforms`)."""
        prompts = self._prompts if prompts is None else prompts
        if not prompts:
            raise ValueError("the live probe has no prompts to sample from: call LiveProbe.setup first")
        device = next(policy.parameters()).device
        sampling = replace(self.settings.eval.sampling, n_per_prompt=n_per_prompt)
        uniforms = common_uniforms(seed, len(prompts) * n_per_prompt, sampling.max_new_tokens) if coupled else None
        return sample_responses(
            policy,
            prompts,
            sampling,
            eos_token_id=self._eos,
            pad_token_id=self._pad,
            generator=torch.Generator(device=device).manual_seed(seed),
            uniforms=uniforms,
        )

    def _statistics(self, policy: torch.nn.Module, E: SequenceBatch) -> SequenceStats:
        """E's statistics at the current theta, teacher-forced as the step's plan does."""
        s = self.settings.eval
        forcing = TeacherForcing(temperature=s.sampling.temperature, batch_size=s.forward_batch_size)
        return base_statistics(policy, E, forcing.for_integrand(self.settings.integrand))

    # ---- before the step: reconstruct and predict ------------------------------------------
    def before_step(
        self,
        step: int,
        policy: torch.nn.Module,
        optimizer: Any,
        probed: ProbedStep | None,
        gradients: GradientHandling = GradientHandling(),
        trainer_name: str = "the trainer",
    ) -> None:
        """Reconstruct the step about to happen and predict its entropy change (module docstring, 1.). Every rank
        calls it at every probed step (it holds collectives); ``probed`` is this rank's view of the step (None:
        nothing to probe). ``optimizer``: a torch Adam/AdamW, or a wrapper of one (Lightning's, accelerate's)."""
        self.pending = None
        timings: dict[str, float] = {}
        start = clock = time.perf_counter()

        def lap(name: str) -> None:
            nonlocal clock
            now = time.perf_counter()
            timings[f"{name}_s"] = now - clock
            clock = now

        # one collective on every rank before anything can return or raise, so that all ranks decide alike
        mine = (
            None if probed is None else (None if probed.batch is None else probed.batch.to("cpu"), probed.normalisers)
        )
        everyone = self.processes.gather(mine)
        lap("gather")
        if any(e is None for e in everyone):
            message = "live probe: %s declares no probed step at step %d on some rank; not probed"
            log.warning(message, trainer_name, step)
            return
        if self.processes.world_size > 1 and any(normalisers is None for _, normalisers in everyone):
            raise ValueError(
                "with several processes the ProbedStep must carry the normalisers of the global U (every rank's "
                "sequences); see probe.grpo.GRPOModule"
            )
        takes_part = self._takes_part(policy)
        batches = [b for b, _ in everyone if b is not None and len(b) > 0]
        U_all = SequenceBatch.concat(batches, self._pad) if batches and takes_part else None
        norm = probed.normalisers
        if norm is None and U_all is not None:
            norm = loss_normalisers(U_all.target_mask, probed.loss)
        adam = adam_of(optimizer)
        state = AdamState.from_optimizer(adam, policy)
        named = dict(policy.named_parameters())
        grads = {n: named[n].grad for n in state.hyper if n in named}
        try:
            update = update_from_gradients(
                named,
                grads,
                state,
                gradients.max_norm,
                clipped=gradients.clipped,
                grad_norm=gradients.grad_norm,
                loss=probed.loss,
                normalisers=norm,
                autocast_dtype=gradients.autocast,
                grad_scale=gradients.grad_scale,
                head_dtype=probed.head_dtype,
            )
        except ValueError as e:  # no or non-finite gradients (e.g. a GradScaler step that will be skipped)
            log.warning("live probe: step %d not reconstructed: %s", step, e)
            return
        snapshot = {n: named[n].detach().clone() for n in update.full} if self.settings.verify else {}
        lap("reconstruct")
        record: dict[str, Any] = {"step": step, "world_size": self.processes.world_size, "update": update.summary()}
        pending = PendingStep(
            step=step,
            update=update,
            snapshot=snapshot,
            record=record,
            timings=timings,
            rounding=step_rounding(adam, named),
        )
        if takes_part:
            with eval_mode(policy), torch.inference_mode(False):
                self._predict(pending, policy, U_all, lap)
        timings["before_step_s"] = time.perf_counter() - start
        self.pending = pending

    def _predict(self, pending: PendingStep, policy: torch.nn.Module, U: SequenceBatch | None, lap: Any) -> None:
        """Sample (or take) E, probe the step on it with the engine, keep a sample of pi_old."""
        settings, step, update = self.settings.eval, pending.step, pending.update
        tau = settings.sampling.temperature
        if settings.refresh:
            E = self._sample_eval(policy, self._seed(step, "eval"))
            E_batch = EvalBatch(name="eval_00", batch=E, temperature=tau)
        else:
            E, at_sampling = self._held
            E_batch = EvalBatch(name="eval_00", batch=E, temperature=tau, sampling=at_sampling)
        lap("sample_eval")
        # the attribution assumes E ~ pi_theta (a fresh E) and needs the step's sequences
        plan = self.plan(update.lr, self.settings.attribution and settings.refresh and U is not None)
        result, base = probe_eval(policy, update, U, E_batch, plan, timings=pending.timings)
        pending.result, pending.plan = result, plan
        pending.record.update(plan=plan.describe(), eval=result.to_dict())
        if "attributions" in result.arrays:
            pending.record["attributions"] = {
                "index": U.index.tolist(),
                "group": [_plain(g) for g in U.group],
                "values": result.arrays["attributions"].tolist(),
            }
        lap("probe")
        if self.settings.realised:
            pending.old_sample = self._old_sample(policy, step, base if settings.refresh else None)
            lap("sample_old")

    def _old_sample(self, policy: torch.nn.Module, step: int, E_stats: SequenceStats | None) -> RealisedSample:
        """The sample of pi_old the realised change starts from. Paired: a new sample (not E, so that the
        prediction's and the realisation's errors stay independent) drawn with the uniforms of this step's
        "realised" seed, which pi_new reuses after the step. Independent: E itself when it is a fresh sample of pi_old
        (``E_stats``), else a fresh sample."""
        settings = self.settings.eval
        n = settings.realised_n_per_prompt or settings.sampling.n_per_prompt
        pairing = settings.realised_pairing
        paired = pairing == "common_random_numbers"
        if not paired and E_stats is not None:
            return RealisedSample(E_stats, pairing, self._prompts, n, self._seed(step, "eval"), [])
        seed = self._seed(step, "realised" if paired else "realised_old")
        records = self._sample_records(policy, n, seed, coupled=paired)
        stats = self._statistics(policy, collate(records, pad_token_id=self._pad))
        return RealisedSample(stats, pairing, self._prompts, n, seed, [r["response_ids"] for r in records])

    # ---- after the step: verify and measure ------------------------------------------------
    def after_step(self, policy: torch.nn.Module) -> ProbedRecord | None:
        """Verify the step and measure its realised change (module docstring, 2.); every rank calls it after every
        step (it holds collectives when a step was probed). Rank 0 writes the record and gets it back with its
        metrics; other ranks and unprobed steps get None."""
        pending, self.pending = self.pending, None
        if pending is None:
            return None
        timings, record, update = pending.timings, pending.record, pending.update
        start = time.perf_counter()
        check = verify_step(policy, update, pending.snapshot, pending.rounding) if self.settings.verify else None
        timings["verify_s"] = time.perf_counter() - start
        # every rank verified its own parameters; rank 0 collects them (and checks the ranks took one step)
        everyone = self.processes.gather({"verification": check, "update_norm": update.norms["full"]})
        if check is not None:
            worst = max(e["verification"]["max_units"] for e in everyone)
            record["verification"] = dict(check, ranks=[e["verification"] for e in everyone], max_units_all_ranks=worst)
            self._warn_if_off(pending.step, worst, check)
        norms = [e["update_norm"] for e in everyone]
        record["update"]["rank_norm_spread"] = (max(norms) - min(norms)) / max(abs(max(norms)), 1e-300)
        if self._takes_part(policy) and pending.old_sample is not None:
            clock = time.perf_counter()
            with eval_mode(policy), torch.inference_mode(False):
                realised = self._realised(policy, pending)
            record["realised"] = json_safe(realised)
            timings["realised_s"] = time.perf_counter() - clock
        timings["after_step_s"] = time.perf_counter() - start
        timings["total_s"] = timings["before_step_s"] + timings["after_step_s"]
        record["timings"] = timings
        record = json_safe(record)
        self.records.append(record)
        if self.processes.rank != 0:
            return None
        self._write(record)
        return ProbedRecord(record=record, metrics=self.metrics(pending, record))

    def _warn_if_off(self, step: int, worst: float, check: dict) -> None:
        if worst > 1.0:
            message = (
                f"live probe: at step {step} the parameters moved {worst:.3g} rounding units away from the "
                f"reconstructed step (worst: {check['worst_parameter']}, |error| {check['max_abs_error']:.3g}); the "
                "optimizer step is not the AdamW step of the declared loss: check the step's batch, loss and "
                "normalisers, gradient clipping, and that nothing else changes parameters or gradients between "
                "backward and step"
            )
            log.warning(message)
            warnings.warn(message, stacklevel=3)

    def _realised(self, policy: torch.nn.Module, pending: PendingStep) -> Any:
        """H(new) - H(old) on the sample of pi_old taken before the step and one of pi_new (with the same uniforms
        when paired, else independent), and the predictions' z-scores."""
        old = pending.old_sample
        paired = old.pairing == "common_random_numbers"
        seed = old.seed if paired else self._seed(pending.step, "realised")
        records = self._sample_records(policy, old.n_per_prompt, seed, coupled=paired, prompts=old.prompts)
        new = self._statistics(policy, collate(records, pad_token_id=self._pad))
        identical = identical_fraction(old.responses, [r["response_ids"] for r in records]) if paired else None
        at = self.settings.eta_factors.index(1.0)
        predicted = None if pending.result is None else pending.result.parts["full"]
        integrand, eta = self.settings.integrand, pending.update.lr
        return realised_change(
            old.stats, new, integrand, predicted, at=at, eta=eta, pairing=old.pairing, identical=identical
        )

    # ---- outputs (rank 0) ---------------------------------------------------------------------
    def _write(self, record: dict) -> None:
        if self.run_dir is None:
            return
        with open(self.run_dir / "records.jsonl", "a") as f:
            f.write(dumps(record) + "\n")

    @staticmethod
    def metrics(pending: PendingStep, record: dict) -> dict[str, float]:
        """Scalar metrics of a probed step: the offline run's keys (``eval_00/full/delta_h@lr``, ``update/...``) and
        ``live/...`` for what only a live run has (verification, realised change, z-scores, overhead)."""
        out = update_metrics(record["update"])
        if pending.result is not None:
            out.update(metrics(pending.result, list(pending.plan.etas), pending.update.lr))
        live: dict[str, Any] = {"live/overhead_s": record["timings"]["total_s"]}
        if "verification" in record:
            live["live/verification/max_units"] = record["verification"]["max_units_all_ranks"]
        if "realised" in record:
            realised = record["realised"]
            live.update({"live/realised/delta_h": realised["delta_h"], "live/realised/se": realised["se"]})
            live["live/realised/se_independent"] = realised.get("se_independent")
            live["live/realised/identical_fraction"] = realised.get("identical_fraction")
            live.update({f"live/realised/z_{key}": z for key, z in realised.get("z", {}).items()})
        out.update({k: float(v) for k, v in live.items() if v is not None and math.isfinite(float(v))})
        return out

    def finish(self) -> Path | None:
        """Rank 0, at the end of training: ``plots/live_entropy.png`` of the probed steps (None: nothing probed)."""
        if self.run_dir is None or not self.records:
            return None
        path = plot_live(self.records, self.run_dir / "plots" / "live_entropy.png")
        plot_covariance_law(self.records, self.run_dir / "plots" / "covariance_law.png")
        overhead = self.overhead_seconds()
        log.info(
            "live probe: %d probed steps, %.3f s per probed step on average; records in %s",
            len(overhead),
            sum(overhead) / len(overhead),
            self.run_dir,
        )
        return path

    def overhead_seconds(self) -> list[float]:
        """The probe's own time per probed step (``timings.total_s`` of each record)."""
        return [r["timings"]["total_s"] for r in self.records]


def adam_of(optimizer: Any) -> torch.optim.Optimizer:
    """The torch Adam/AdamW inside a trainer's optimizer wrapper; anything else is refused."""
    inner = unwrap_optimizer(optimizer)
    if not isinstance(inner, (torch.optim.Adam, torch.optim.AdamW)):
        raise TypeError(
            "the live probe reconstructs torch.optim.Adam/AdamW steps, the run uses "
            f"{type(inner).__name__}; train with AdamW (or detach the probe)"
        )
    return inner


class eval_mode:
    """The policy as the probe's passes need it: in eval mode (no dropout, no gradient checkpointing) and without
    transformers' input-require-grads hooks (``enable_input_require_grads``, registered on the input embeddings by
    ``gradient_checkpointing_enable``, once per call: TRL's trainer leaves several). They call ``requires_grad_``
    inside the probe's ``torch.func`` transforms, which torch refuses, and are not needed by its passes. Both are
    restored after, the hooks in their order."""

    HOOK = "make_inputs_require_grads"  # the hook's name in transformers' enable_input_require_grads

    def __init__(self, module: torch.nn.Module):
        self.module, self.was_training = module, module.training
        self.suspended: list[tuple[torch.nn.Module, OrderedDict]] = []

    def __enter__(self) -> None:
        self.module.eval()
        for m in self.module.modules():
            hooks = m._forward_hooks
            if any(getattr(fn, "__name__", "") == self.HOOK for fn in hooks.values()):
                self.suspended.append((m, OrderedDict(hooks)))
                for key in [k for k, fn in hooks.items() if getattr(fn, "__name__", "") == self.HOOK]:
                    del hooks[key]

    def __exit__(self, *exc: Any) -> None:
        for m, hooks in self.suspended:
            m._forward_hooks.clear()
            m._forward_hooks.update(hooks)
        self.suspended = []
        self.module.train(self.was_training)


def distinct_prompts(E: SequenceBatch) -> list[list[int]]:
    """The prompts of E's sequences (the tokens before the response), each once, in order of first appearance."""
    out: dict[tuple[int, ...], None] = {}
    for ids, attention, response in zip(E.input_ids.tolist(), E.attention_mask.tolist(), E.response_mask.tolist()):
        start = response.index(True) if True in response else len(ids)
        prompt = tuple(t for t, a in zip(ids[:start], attention[:start]) if a)
        out.setdefault(prompt, None)
    return [list(p) for p in out]


def _plain(x: Any) -> Any:
    return x if isinstance(x, (int, float, str, type(None))) else str(x)
