"""The probe engine: one update and evaluation batches in, typed results out (docs/DESIGN.md section 6).

Plain functions, no Lightning. The offline run and the live callback call the same ones:

* :func:`batch_rows` teacher-forces one batch of E at theta and at theta + eta * d for every
  part and eta of the :class:`Plan`, and takes the first/second eta-derivatives by JVP: per-sequence
  numbers only, nothing reduced (``ProbeModule.predict_step`` runs it on each rank's batches);
* :func:`summarise_eval` turns the rows of the whole of E (any split, sorted by sequence index)
  into an :class:`~probe.results.EvalResult`: SNIS Delta H with SEs, ESS and clipping, first and
  second order, warnings (``SNISAggregation`` runs it after its one gather);
* :func:`complete_eval` adds what needs all of E in one process: the attribution to U's
  sequences and tokens (of Delta H, and of Delta R where E carries rewards), the covariance law on U
  (:mod:`probe.covariance`), the eval x update matrix, the exact per-sequence path and per-token views;
* :func:`probe_eval` is the three in one process (the live callback, and library use).

The realised change of a live step, measured on fresh samples, is :mod:`probe.realised`.
"""

from __future__ import annotations

import functools
import math
import time
from dataclasses import asdict, dataclass, field, replace
from typing import Any, Callable, Sequence

import numpy as np
import torch
from torch import Tensor, nn

from probe.attribution import AttributionInputs, attribute, eval_update_matrix, per_sequence_exact, reward_slope
from probe.batch import SequenceBatch
from probe.covariance import covariance_law
from probe.logprobs import TeacherForcing, teacher_force
from probe.overrides import Direction, ShiftedPolicy, Sweep, base_parameters, iter_sweep, step_resolution
from probe.precision import resolve_dtype
from probe.results import (
    CHANGED_FLAGGED,
    ROUNDING_FLAGGED,
    ROUNDING_UNMEASURABLE,
    AttributionSummary,
    BaseEntropy,
    EvalResult,
    PartResult,
)
from probe.settings import PrecisionSettings, ProbeSettings
from probe.snis import SNISConfig, SNISResult, snis_estimate, snis_estimates
from probe.statistics import SequenceStats, mean_and_se, ratio_and_se
from probe.taylor import SequenceDerivatives, first_order, sequence_derivatives, snis_derivatives
from probe.update import TokenInnerProducts, Update
from probe.verification import attribution_check

Tick = Callable[[float], None]  # progress: called with the number of teacher-forcing passes just done


# ---------------------------------------------------------------------------------------------
# what is measured


@dataclass(frozen=True)
class Plan:
    """What is measured for one update (``summary.json["plan"]`` holds its main fields).

    Resolved once the update's lr is known (:func:`make_plan`): the etas are then numbers.
    """

    parts: tuple[str, ...]  # update parts, and "baseline_plus_grad" (the additivity check)
    etas: tuple[float, ...]  # step sizes of the sweep, ascending
    lr: float  # the update's reference lr: eta = lr is the real step
    reference_eta: float  # eta of the eval x update matrix and the per-token views
    integrand: str  # token_entropy or logprob
    snis: SNISConfig
    first_order: bool = True
    second_order: bool = True
    attribution: bool = True
    eval_update_matrix: bool = False
    per_sequence_exact: tuple[int, ...] = ()
    per_token_views: bool = False
    reward: bool = False  # E's expected reward as well, where E carries rewards
    covariance_law: bool = False  # the covariance term of Cui et al. 2025 on U (probe.covariance)
    covariance_fraction: float = 2e-4
    head_dtype: torch.dtype | None = torch.float64
    head_budget_mib: float = 256.0  # MiB for the head's [tokens, V] temporaries
    autocast_dtype: torch.dtype | None = None  # forwards over E under torch.autocast (parameters keep their dtype)
    batch_size: int | None = 32  # sequences of E per forward pass

    def forcing(self, temperature: float) -> TeacherForcing:
        """How E, sampled at ``temperature``, is teacher-forced under this plan."""
        return TeacherForcing(
            temperature=temperature,
            with_entropy=self.integrand == "token_entropy",
            head_dtype=self.head_dtype,
            head_budget_mib=self.head_budget_mib,
            autocast_dtype=self.autocast_dtype,
            batch_size=self.batch_size,
        )

    @property
    def passes_per_batch(self) -> int:
        """Progress units of one batch of E: one per (part, eta) and one per part's derivatives."""
        K = len(self.parts)
        return K * len(self.etas) + (K if self.first_order else 0)

    def row_layout(self) -> dict[str, tuple[int, ...]]:
        """The per-sequence columns :func:`batch_rows` returns: key -> shape before the sequence axis (sorted)."""
        K, J = len(self.parts), len(self.etas)
        layout: dict[str, tuple[int, ...]] = {
            "index": (),
            "logprobs": (),
            "lengths": (),
            "sweep_logprobs": (K, J),
            "sampler_gap_max": (),
            "sampler_gap_sum": (),
        }
        entropy = self.integrand == "token_entropy"
        if entropy:
            layout.update(entropies=(), sweep_entropies=(K, J))
        if self.first_order:
            orders = ("d", "d2") if self.second_order else ("d",)
            for prefix in orders:
                layout[f"{prefix}_logprobs"] = (K,)
                if entropy:
                    layout[f"{prefix}_entropies"] = (K,)
        return dict(sorted(layout.items()))

    def describe(self) -> dict[str, Any]:
        """The plan as ``summary.json`` records it."""
        return {
            "parts": list(self.parts),
            "etas": list(self.etas),
            "reference_eta": self.reference_eta,
            "integrand": self.integrand,
            "truncation": self.snis.truncation or 0.0,
            "normalisation": self.snis.normalisation,
        }


def make_plan(settings: ProbeSettings, precision: PrecisionSettings, lr: float) -> Plan:
    """The plan of an offline run: ``settings`` with its eta grid resolved around the update's ``lr``."""
    return Plan(
        parts=tuple(settings.parts),
        etas=tuple(settings.eta_grid(lr)),
        lr=lr,
        reference_eta=settings.reference_eta or lr,
        integrand=settings.integrand,
        snis=SNISConfig(truncation=settings.truncation or None, normalisation=settings.normalisation),
        first_order=settings.first_order,
        second_order=settings.second_order,
        attribution=settings.attribution,
        eval_update_matrix=settings.eval_update_matrix,
        per_sequence_exact=tuple(settings.per_sequence_exact),
        per_token_views=settings.per_token_views,
        reward=settings.reward,
        covariance_law=settings.covariance_law,
        covariance_fraction=settings.covariance_fraction,
        head_dtype=torch.float64 if precision.float64_head else None,
        head_budget_mib=settings.head_budget_mib,
        autocast_dtype=resolve_dtype(precision.autocast),
        batch_size=settings.forward_batch_size,
    )


def check_etas_fit(etas: Sequence[float], policy: nn.Module) -> None:
    """Refuse etas beyond what the policy's dtype can hold (theta + eta * d could not even be formed)."""
    largest = min(torch.finfo(p.dtype).max for p in policy.parameters() if p.is_floating_point())
    if max(etas) > largest:
        raise ValueError(
            f"probe.etas reaches {max(etas):.3g}, beyond the largest number the policy's parameters can hold "
            f"({largest:.3g}), so theta + eta * d cannot even be formed. Fix: use smaller etas (a very large eta is "
            "reported as non-finite in the summary as long as it fits the dtype)"
        )


def part_directions(update: Update, parts: Sequence[str]) -> dict[str, Direction]:
    """Part name -> direction per unit lr; ``baseline_plus_grad`` is baseline + grad added up as one direction."""
    available = update.parts()
    out: dict[str, Direction] = {}
    for name in parts:
        if name == "baseline_plus_grad":
            out[name] = {n: available["baseline"][n] + available["grad"][n] for n in available["full"]}
        else:
            out[name] = available[name]
    return out


@dataclass
class EvalBatch:
    """One evaluation batch E and how it was sampled."""

    name: str  # eval_00, eval_01, ...
    batch: SequenceBatch  # index = position in E; group = prompt group of each sequence
    temperature: float  # tau it was sampled at
    sampling: SequenceStats | None = None  # E's statistics at the policy it came from, when that is not theta


# ---------------------------------------------------------------------------------------------
# per-sequence rows of one batch of E


def batch_rows(
    policy: nn.Module,
    batch: SequenceBatch,
    directions: dict[str, Direction],
    plan: Plan,
    temperature: float,
    tick: Tick | None = None,
) -> dict[str, np.ndarray]:
    """Per-sequence statistics of one batch of E: ``[B]`` arrays at theta, ``[K, J, B]`` over the sweep,
    ``[K, B]`` first/second eta-derivatives; the columns of :meth:`Plan.row_layout`, float64."""
    forcing = plan.forcing(temperature)
    device = next(policy.parameters()).device
    batch = batch.to(device)
    B = len(batch)
    rows = {key: np.zeros((*shape, B)) for key, shape in plan.row_layout().items()}
    rows["index"][:] = batch.index.cpu().numpy()
    entropy = forcing.with_entropy

    base_chunks, start = [], 0
    with torch.no_grad():
        for chunk in batch.chunks(forcing.batch_size):
            tokens = teacher_force(policy, chunk, forcing=forcing)
            base_chunks.append(SequenceStats.from_tokens(tokens))
            span = slice(start, start + len(chunk))
            if chunk.old_logprobs is None:
                rows["sampler_gap_max"][span] = rows["sampler_gap_sum"][span] = np.nan
            else:
                gap = (tokens.logprobs - chunk.old_logprobs.to(tokens.logprobs)).abs() * tokens.mask  # [c, T-1]
                rows["sampler_gap_max"][span] = gap.max(-1).values.cpu().numpy()
                rows["sampler_gap_sum"][span] = gap.sum(-1).cpu().numpy()
            start += len(chunk)
    base = SequenceStats.cat(base_chunks)
    rows["logprobs"][:] = base.logprobs.cpu().numpy()
    rows["lengths"][:] = base.lengths.cpu().numpy()
    if entropy:
        rows["entropies"][:] = base.entropies.cpu().numpy()

    parts = list(directions)
    for item in iter_sweep(policy, batch, directions, plan.etas, forcing, base=base):
        k, span = parts.index(item.part), slice(item.start, item.start + len(item.stats))
        rows["sweep_logprobs"][k, item.eta_index, span] = item.stats.logprobs.cpu().numpy()
        if entropy:
            rows["sweep_entropies"][k, item.eta_index, span] = item.stats.entropies.cpu().numpy()
        if tick is not None:
            tick(len(item.stats) / B)

    if plan.first_order:
        order = 2 if plan.second_order else 1
        for k, direction in enumerate(directions.values()):
            derivs = sequence_derivatives(policy, batch, direction, forcing, order=order)
            for prefix, stats in (("d", derivs.first), ("d2", derivs.second)):
                if stats is None:
                    continue
                rows[f"{prefix}_logprobs"][k] = stats.logprobs.cpu().numpy()
                if entropy:
                    rows[f"{prefix}_entropies"][k] = stats.entropies.cpu().numpy()
            if tick is not None:
                tick(1)
    return rows


def sort_rows(table: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The rows sorted by sequence index, so results do not depend on how E was split; a sequence seen twice
    (a sampler that repeats sequences across ranks) is kept once."""
    index = table["index"]
    keep = np.unique(index, return_index=True)[1]  # sorted by index, first occurrence of each
    return {key: v[..., keep] for key, v in table.items()}


# ---------------------------------------------------------------------------------------------
# the whole of E


def _stats(rows: dict[str, np.ndarray], logprobs: str, entropies: str, *index: int) -> SequenceStats:
    def pick(a: np.ndarray) -> Tensor:
        return torch.as_tensor(a[index] if index else a, dtype=torch.float64)

    return SequenceStats(
        logprobs=pick(rows[logprobs]),
        entropies=pick(rows[entropies]) if entropies in rows else None,
        lengths=torch.as_tensor(rows["lengths"], dtype=torch.float64),
    )


def _base_entropy(base: SequenceStats, E: EvalBatch, plan: Plan) -> tuple[BaseEntropy, float | None]:
    """H(theta) on E with SEs: the plain mean when E ~ pi_theta; the SNIS estimate against the policy a held E
    was sampled from otherwise (no SE: it would need the weights' own variance), with that ESS."""
    h = base.integrand(plan.integrand)
    if E.sampling is None:
        mean, se = mean_and_se(h)
        per_token, per_token_se = ratio_and_se(h, base.lengths)
        return BaseEntropy(mean, se, per_token, per_token_se), None
    r = snis_estimate(E.sampling, base, integrand=plan.integrand)
    return BaseEntropy(r.entropy, math.nan, r.entropy_per_token, math.nan), r.ess


def _part_result(
    results: list[SNISResult], rows: dict[str, np.ndarray], k: int, base: SequenceStats, plan: Plan, E: EvalBatch
) -> PartResult:
    etas = plan.etas
    bad = ~np.isfinite(rows["sweep_logprobs"][k])  # [J, M]
    if "sweep_entropies" in rows:
        bad |= ~np.isfinite(rows["sweep_entropies"][k])
    part = PartResult(
        delta_h=[r.delta_entropy for r in results],
        se=[r.delta_entropy_se for r in results],
        delta_h_per_token=[r.delta_entropy_per_token for r in results],
        se_per_token=[r.delta_entropy_per_token_se for r in results],
        ess=[r.ess for r in results],
        ess_fraction=[r.ess_fraction for r in results],
        clip_fraction=[r.truncated_fraction for r in results],
        max_log_weight=[r.max_log_weight for r in results],
        finite=[bool(math.isfinite(r.delta_entropy)) for r in results],
        non_finite_sequences=[int(n) for n in bad.sum(-1)],
    )
    if "d_logprobs" not in rows:
        return part
    groups = E.batch.group if plan.snis.normalisation == "per_prompt" else None
    derivs = SequenceDerivatives(
        eta=0.0,
        value=base,
        first=_stats(rows, "d_logprobs", "d_entropies", k),
        second=_stats(rows, "d2_logprobs", "d2_entropies", k) if "d2_logprobs" in rows else None,
    )
    # F, F', F'' of the estimate (against the policy E was sampled from), when the curvature or a held E needs them
    so = None
    if derivs.second is not None or E.sampling is not None:
        so = snis_derivatives(derivs, base if E.sampling is None else E.sampling, plan.integrand, groups)
    if E.sampling is None:
        fo = first_order(derivs, plan.integrand, groups)
        slope, slope_se, slope_tok, slope_tok_se = fo.slope, fo.slope_se, fo.slope_per_token, fo.slope_per_token_se
    else:  # held E: the derivative of the estimate against the sampling policy; its SE is not derived
        slope, slope_se, slope_tok, slope_tok_se = so.first, math.nan, so.first_per_token, math.nan
    part.first_order, part.first_order_se = slope, slope_se
    part.first_order_per_token, part.first_order_per_token_se = slope_tok, slope_tok_se
    part.predicted_first = [slope * e for e in etas]
    if derivs.second is not None:
        part.second_order, part.second_order_per_token = so.second, so.second_per_token
        part.linear_radius, part.linear_radius_per_token = so.linear_radius, so.linear_radius_per_token
        part.predicted_second = [slope * e + 0.5 * so.second * e * e for e in etas]
    return part


def _warnings(parts: dict[str, PartResult], etas: Sequence[float], M: int) -> list[str]:
    out = []
    for name, res in parts.items():
        for j, eta in enumerate(etas):
            if res.non_finite_sequences[j]:
                out.append(
                    f"{name} at eta={eta:.3g}: {res.non_finite_sequences[j]} of {M} sequences have non-finite "
                    "log-probs/entropies at theta + eta * d (the step overflows the model): no estimate there; "
                    "use smaller etas"
                )
            elif res.ess_fraction[j] < 0.1:
                out.append(
                    f"{name} at eta={eta:.3g}: ESS {res.ess[j]:.1f} of {M} samples (< 10%): the SNIS estimate is "
                    "unreliable there; use smaller etas or a larger E"
                )
    return out


@dataclass(frozen=True)
class EtaResolution:
    """Per part and eta, what of the step survives when the sweep forms ``theta + eta * d`` in the policy's dtype
    (:func:`probe.overrides.step_resolution`): ``rounding_error[part][j]``, how far the step taken is from
    ``eta * d`` relative to it (near 1 where ``theta + eta * d`` rounds to ``theta``, so that the sweep would
    report a change of exactly 0 as a measurement), and ``changed_fraction[part][j]``, the fraction of the
    elements the step moves whose value changes at all."""

    dtype: str  # the policy's parameter dtype(s)
    rounding_error: dict[str, list[float]]
    changed_fraction: dict[str, list[float]] = field(default_factory=dict)


def eta_resolution(policy: nn.Module, directions: dict[str, Direction], etas: Sequence[float]) -> EtaResolution:
    """:class:`EtaResolution` of the plan's etas, with the sweep's own arithmetic."""
    errors, changed, dtypes = {}, {}, set()
    for part, d in directions.items():
        theta = base_parameters(policy, d)  # names the parameters a direction does not match
        dtypes |= {str(t.dtype).removeprefix("torch.") for t in theta.values()}
        resolution = step_resolution(theta, d, etas)
        errors[part], changed[part] = resolution.rounding_error, resolution.changed_fraction
    return EtaResolution(dtype="/".join(sorted(dtypes)), rounding_error=errors, changed_fraction=changed)


def check_prompt_groups(E: EvalBatch, normalisation: str) -> None:
    """Refuse ``per_prompt`` normalisation on an E with a prompt group of one sequence: its one weight normalises
    to 1, so its term is a plain difference of the integrand, not an importance-sampling estimate."""
    if normalisation != "per_prompt":
        return
    sizes: dict[Any, int] = {}
    for g in E.batch.group:
        sizes[g] = sizes.get(g, 0) + 1
    single = [g for g, n in sizes.items() if n < 2]
    if single:
        raise ValueError(
            f"probe.normalisation: per_prompt needs at least 2 responses per prompt, but {E.name} has "
            f"{len(single)} of {len(sizes)} prompt groups with one sequence (e.g. group {single[0]!r}); in a group "
            "of one the importance weight normalises to 1 and its Delta H is not an importance-sampling estimate. "
            "Fix: sample E with n_per_prompt >= 2, or set probe.normalisation: global"
        )


def _resolution_warnings(parts: dict[str, PartResult], etas: Sequence[float], dtype: str) -> list[str]:
    out = []
    half = "float16" in dtype  # (bfloat16 too)
    fix = (
        "Load the policy in float32 (policy.dtype: float32; precision.autocast runs its forwards in half precision), "
        "or use larger etas"
        if half
        else "Use larger etas, or load the policy in float64"
    )
    for name, res in parts.items():
        for j, eta in enumerate(etas):
            error = (res.step_rounding_error or [0.0] * len(etas))[j]
            changed = (res.changed_fraction or [1.0] * len(etas))[j]
            moved = f"only {changed:.1%} of the parameters the step moves change" if changed < CHANGED_FLAGGED else ""
            if not error <= ROUNDING_UNMEASURABLE:  # (NaN: a zero direction, nothing to measure either)
                out.append(
                    f"{name} at eta={eta:.3g}: theta + eta * d formed in {dtype} differs from eta * d by {error:.0%} "
                    f"of its size{f' ({moved})' if moved else ''}: most of the step rounds away against the weights, "
                    "so the sweep would measure another step, or none (Delta H reported null; the first order still "
                    f"predicts one). {fix}"
                )
            elif error > ROUNDING_FLAGGED or moved:
                out.append(
                    f"{name} at eta={eta:.3g}: theta + eta * d formed in {dtype} differs from eta * d by {error:.1%} "
                    f"of its size{f' and {moved}' if moved else ''} (steps below half a unit in the last place of "
                    f"their weight round away): the measured Delta H is that of the rounded step. {fix}"
                )
    return out


def _reward_result(
    rows: dict[str, np.ndarray], plan: Plan, E: EvalBatch, swept: Sweep, groups: Sequence[Any] | None
) -> dict[str, Any]:
    """E's expected reward and its change along every part, by the entropy's machinery with the reward as the
    integrand: r_j does not depend on theta, so its eta-derivatives are 0 and only the weights move (SNIS
    R^(eta) = sum_j W_j r_j; first order (1/M) sum_j l'_j (r_j - rbar); docs/DESIGN.md section 3)."""
    r = E.batch.rewards.double().cpu().numpy()  # [M]
    as_entropy = {**rows, "entropies": r, "sweep_entropies": np.broadcast_to(r, rows["sweep_logprobs"].shape).copy()}
    for prefix in ("d", "d2"):
        if f"{prefix}_logprobs" in rows:
            as_entropy[f"{prefix}_entropies"] = np.zeros_like(rows[f"{prefix}_logprobs"])
    on_reward = replace(plan, integrand="token_entropy")
    base = _stats(as_entropy, "logprobs", "entropies")
    swept = replace(swept, base=base, entropies=torch.as_tensor(as_entropy["sweep_entropies"], dtype=torch.float64))
    mean, se = mean_and_se(base.entropies)
    out: dict[str, Any] = {"base": mean, "base_se": se, "parts": {}}
    for k, part in enumerate(plan.parts):
        estimates = snis_estimates(swept, part, integrand="token_entropy", config=plan.snis, groups=groups)
        res = _part_result(estimates, as_entropy, k, base, on_reward, E)
        out["parts"][part] = {
            "delta_r": res.delta_h,
            "se": res.se,
            "first_order": res.first_order,
            "first_order_se": res.first_order_se,
            "predicted_first": res.predicted_first,
            "second_order": res.second_order,
            "predicted_second": res.predicted_second,
        }
    return out


def summarise_eval(
    rows: dict[str, np.ndarray], plan: Plan, E: EvalBatch, resolution: EtaResolution | None = None
) -> EvalResult:
    """Delta H per (part, eta) with SEs, ESS and clipping, and the first/second-order predictions, on all of E.

    ``rows`` holds the columns of :meth:`Plan.row_layout` for every sequence of E, sorted by index.
    Per-sequence contributions (summing to each Delta H) go to ``arrays["per_sequence/<part>/eta_<j>"]``.
    ``resolution`` (:func:`eta_resolution`): a step that rounds away at some eta is reported null there, and one
    that partly rounds away is flagged, with a warning each.
    """
    check_prompt_groups(E, plan.snis.normalisation)
    base = _stats(rows, "logprobs", "entropies")
    M = len(base)
    if not (np.array_equal(rows["index"], np.arange(M)) and E.batch.index.tolist() == list(range(M))):
        raise ValueError(
            f"the rows of {E.name} must be its sequences 0..{M - 1} in order, and E's index 0..{M - 1} in order "
            "(prompt groups and statistics are matched by position). Fix: give E index = arange(M), pass all its rows"
        )
    swept = Sweep(
        parts=list(plan.parts),
        etas=torch.tensor(plan.etas, dtype=torch.float64),
        base=base,
        logprobs=torch.as_tensor(rows["sweep_logprobs"], dtype=torch.float64),
        entropies=torch.as_tensor(rows["sweep_entropies"], dtype=torch.float64) if "sweep_entropies" in rows else None,
    )
    groups = E.batch.group if plan.snis.normalisation == "per_prompt" else None
    base_entropy, ess_vs_sampling = _base_entropy(base, E, plan)
    result = EvalResult(
        name=E.name,
        n_sequences=M,
        n_tokens=int(base.lengths.sum()),
        temperature=float(E.temperature),
        on_policy=E.sampling is None,
        base_entropy=base_entropy,
        parts={},
        ess_vs_sampling_policy=ess_vs_sampling,
    )
    estimates: dict[str, list[SNISResult]] = {}
    for k, part in enumerate(plan.parts):
        estimates[part] = snis_estimates(
            swept, part, integrand=plan.integrand, config=plan.snis, groups=groups, sampling=E.sampling
        )
        result.parts[part] = _part_result(estimates[part], rows, k, base, plan, E)
        for j, r in enumerate(estimates[part]):
            result.arrays[f"per_sequence/{part}/eta_{j}"] = r.contributions.numpy()
    if plan.reward and E.batch.rewards is not None and E.sampling is None:
        result.reward = _reward_result(rows, plan, E, swept, groups)
    if resolution is not None:
        for part, res in result.parts.items():
            res.step_rounding_error = list(resolution.rounding_error[part])
            res.changed_fraction = list(resolution.changed_fraction.get(part, [])) or None
            for j, error in enumerate(res.step_rounding_error):
                if not error <= ROUNDING_UNMEASURABLE:  # the passes were of theta, or of a mostly rounded-away step
                    res.delta_h[j] = res.se[j] = res.delta_h_per_token[j] = res.se_per_token[j] = math.nan
                    if result.reward is not None:
                        result.reward["parts"][part]["delta_r"][j] = result.reward["parts"][part]["se"][j] = math.nan
                    path = f"per_sequence/{part}/eta_{j}"
                    result.arrays[path] = np.full_like(result.arrays[path], np.nan)  # no contributions either
    if "full" in result.parts and "baseline_plus_grad" in result.parts:  # (null where a step rounded away)
        pairs = zip(result.parts["full"].delta_h, result.parts["baseline_plus_grad"].delta_h)
        diff = [a - b for a, b in pairs]
        result.additivity = {
            "full_minus_baseline_plus_grad": diff,
            "max_abs": max((abs(d) for d in diff if math.isfinite(d)), default=math.nan),
        }
    result.warnings = _warnings(result.parts, plan.etas, M)
    if resolution is not None:
        result.warnings += _resolution_warnings(result.parts, plan.etas, resolution.dtype)
    if np.isfinite(rows["sampler_gap_max"]).all():
        result.sampler_gap = {
            "max_abs": float(rows["sampler_gap_max"].max()),
            "mean_abs": float(rows["sampler_gap_sum"].sum() / base.lengths.sum().item()),
        }
    return result


def complete_eval(
    policy: nn.Module,
    update: Update,
    U: SequenceBatch | None,
    E: EvalBatch,
    result: EvalResult,
    rows: dict[str, np.ndarray],
    plan: Plan,
    timings: dict[str, float] | None = None,
) -> None:
    """Add to ``result`` what needs all of E in one process: the attribution a_i and a_it (one backward over E, one
    JVP over U) and, where E carries rewards, r_i and r_it; the covariance law on U; the eval x update matrix, the
    exact per-sequence path and per-token views, as the plan asks.
    ``U`` (the update batch) is needed for all but the per-token views. ``timings`` (if given) gets the seconds
    of each, as ``attribution_<E>_s``, ``eval_update_matrix_<E>_s``, ``per_sequence_exact_<E>_s`` and
    ``per_token_views_<E>_s``."""
    clock = time.perf_counter()

    def timed(stage: str) -> None:
        nonlocal clock
        now = time.perf_counter()
        if timings is not None:
            timings[f"{stage}_{E.name}_s"] = now - clock
        clock = now

    if not (plan.attribution or plan.eval_update_matrix or plan.per_sequence_exact or plan.per_token_views) and not (
        plan.covariance_law and U is not None
    ):
        return
    if U is None and (plan.attribution or plan.eval_update_matrix or plan.per_sequence_exact):
        raise ValueError("the attribution, the eval x update matrix and the exact per-sequence path need U; pass it")
    device = next(policy.parameters()).device
    batch = E.batch.to(device)
    base = _stats(rows, "logprobs", "entropies")
    ref_eta = plan.reference_eta
    inputs = None
    if U is not None:
        forcing = plan.forcing(E.temperature)
        inputs = AttributionInputs(policy, update, U.to(device), batch, forcing, integrand=plan.integrand, base=base)
    tokens = None  # a_it and U's log-probs at theta, from the attribution's JVP over U

    @functools.cache
    def along_grad() -> SequenceDerivatives:  # the JVP over E along the grad part: taken at most once, for the checks
        return sequence_derivatives(policy, batch, update.grad, inputs.forcing, order=1)

    with torch.inference_mode(False):
        if (plan.attribution or plan.eval_update_matrix or plan.per_sequence_exact) and E.sampling is not None:
            result.warnings.append(
                "the attribution, the eval x update matrix and the exact per-sequence path assume E ~ pi_theta; E was "
                "sampled from another policy (a held E), so they are not computed"
            )
        elif plan.attribution:
            # the grad part's slope from the sweep is the check on sum_i a_i (no JVP over E) where it is the same
            # estimator; else one JVP over E along the grad part, shared with the reward's check
            swept = "grad" in result.parts and plan.snis.normalisation == "global"
            slope = result.parts["grad"].first_order if swept else first_order(along_grad(), plan.integrand).slope
            att = attribute(inputs, check=False)
            a = att.attributions.numpy()
            order = np.argsort(a)
            result.arrays["attributions"] = a
            tokens = att.tokens
            result.arrays.update(_update_token_arrays(U, tokens))
            abs_sum = float(np.abs(a).sum())
            result.attribution = AttributionSummary(
                sum=att.total,
                abs_sum=abs_sum,
                grad_first_order=slope,
                relative_difference=abs(att.total - slope) / max(abs(slope), 1e-300),
                **attribution_check(att.total, slope, abs_sum, next(policy.parameters()).dtype),
                reference_eta=ref_eta,
                top_positive=[int(i) for i in order[::-1][:5]],
                top_negative=[int(i) for i in order[:5]],
                top_tokens=_top_tokens(result.arrays),
            )
            if not result.attribution.ok:
                result.warnings.append(
                    f"the attributions do not add up: sum_i a_i = {att.total:.6g} but the grad part's first-order "
                    f"slope is {slope:.6g}, a difference of {result.attribution.scaled_difference:.2g} of "
                    f"sum_i |a_i| (tolerance {result.attribution.tolerance:.0e} for this dtype). The loss may not be a "
                    "sum of per-sequence terms, or the update was computed on other sequences than U; see "
                    "docs/DESIGN.md section 5"
                )
            if result.reward is not None:
                _attribute_reward(inputs, result, plan, along_grad)
            timed("attribution")
        if plan.covariance_law and U is not None and U.advantages is not None:
            if tokens is None:  # no attribution: U's log-probs by one forward
                _covariance_law(U, _update_token_logprobs(policy, update, U), None, result, plan)
            else:
                _covariance_law(U, tokens.logprobs, tokens.values, result, plan)
            timed("covariance_law")
        if plan.eval_update_matrix and E.sampling is None:
            S = eval_update_matrix(inputs).numpy()
            result.arrays["eval_delta_matrix"] = ref_eta * S  # [M, N] at the reference eta
            result.eval_update_matrix = {
                "reference_eta": ref_eta,
                "sum": float(ref_eta * S.sum()),
                "shape": list(S.shape),
            }
            timed("eval_update_matrix")
        if plan.per_sequence_exact and E.sampling is None:
            result.per_sequence_exact = _per_sequence_exact(inputs, result, plan)
            timed("per_sequence_exact")
    if plan.per_token_views:
        result.arrays.update(
            {f"per_token/{k}": v for k, v in per_token_views(policy, update, batch, plan, E.temperature).items()}
        )
        timed("per_token_views")


def _update_token_arrays(U: SequenceBatch, tokens: TokenInnerProducts, prefix: str = "") -> dict[str, Any]:
    """U's response tokens, flat (sequence i's at ``offsets[i]:offsets[i+1]``): ``update_tokens/offsets``,
    ``token_ids``, ``logprobs`` and ``<prefix>attributions`` (a_it, or r_it with ``prefix="reward_"``)."""
    flat = tokens.flat()
    out = {f"update_tokens/{prefix}attributions": flat["values"].numpy()}
    if not prefix:
        out["update_tokens/offsets"] = flat["offsets"].numpy()
        out["update_tokens/token_ids"] = U.targets.cpu()[tokens.mask].numpy()
        out["update_tokens/logprobs"] = flat["logprobs"].numpy()
    return out


def _top_tokens(arrays: dict[str, np.ndarray], n: int = 10) -> list[dict[str, Any]]:
    """The n response tokens of U with the largest |a_it|: sequence, position in its response, token id, a_it."""
    values, offsets = arrays["update_tokens/attributions"], arrays["update_tokens/offsets"]
    sequence = np.searchsorted(offsets, np.arange(len(values)), side="right") - 1  # [T] each token's sequence
    out = []
    for t in np.argsort(-np.abs(values), kind="stable")[:n]:
        i = int(sequence[t])
        out.append(
            {
                "sequence": i,
                "position": int(t - offsets[i]),
                "token_id": int(arrays["update_tokens/token_ids"][t]),
                "value": float(values[t]),
            }
        )
    return out


def _attribute_reward(
    inputs: AttributionInputs, result: EvalResult, plan: Plan, along_grad: Callable[[], SequenceDerivatives]
) -> None:
    """r_i and r_it: each update sequence's (and token's) share of the first-order change of E's expected reward,
    checked against the gradient part's reward slope (from the sweep, else from ``along_grad``, the JVP over E along
    the grad part; docs/DESIGN.md section 5)."""
    grad = result.reward["parts"].get("grad")
    if grad is not None and plan.snis.normalisation == "global":
        slope = grad["first_order"]
    else:
        slope = reward_slope(along_grad(), inputs.E.rewards)
    att = attribute(inputs, check=False, rewards=inputs.E.rewards)
    r = att.attributions.numpy()
    result.arrays["reward_attributions"] = r
    result.arrays.update(_update_token_arrays(inputs.U, att.tokens, prefix="reward_"))
    abs_sum = float(np.abs(r).sum())
    order = np.argsort(r)
    result.reward["attribution"] = {
        "sum": att.total,
        "abs_sum": abs_sum,
        "grad_first_order": slope,
        **attribution_check(att.total, slope, abs_sum, next(inputs.model.parameters()).dtype),
        "top_positive": [int(i) for i in order[::-1][:5]],
        "top_negative": [int(i) for i in order[:5]],
    }
    if not result.reward["attribution"]["ok"]:
        result.warnings.append(
            f"the reward attributions do not add up: sum_i r_i = {att.total:.6g} but the grad part's first-order "
            f"reward slope is {slope:.6g}; see docs/DESIGN.md section 5"
        )


def _update_token_logprobs(policy: nn.Module, update: Update, U: SequenceBatch) -> Tensor:  # [N, T-1]
    """U's response-token log-probs at theta, as the step's loss teacher-forces them (0 off the response)."""
    if update.loss is None:
        raise ValueError(
            "the update carries no loss settings, so U's log-probs cannot be teacher-forced as its loss does. Fix: "
            "build it with reconstruct_update, or pass loss= to update_from_gradients"
        )
    device = next(policy.parameters()).device
    with torch.no_grad():
        stats = teacher_force(policy, U.to(device), forcing=update.loss.forcing(update.head_dtype))
    return (stats.logprobs.double() * stats.mask).cpu()


def _covariance_law(
    U: SequenceBatch,
    token_logprobs: Tensor,  # [N, T-1]
    token_attributions: Tensor | None,  # [N, T-1] a_it (None: not computed)
    result: EvalResult,
    plan: Plan,
) -> None:
    """The covariance term of Cui et al. 2025 on U (``update_tokens/covariance``), next to the exact changes."""
    mask = U.target_mask.cpu()
    law, cov = covariance_law(
        token_logprobs, U.advantages.cpu(), mask, token_attributions, fraction=plan.covariance_fraction
    )
    result.arrays["update_tokens/covariance"] = cov[mask].numpy()
    lr = plan.lr
    law.law_at_lr = -lr * law.batch_mean
    if "full" in result.parts:
        full = result.parts["full"]
        at = [j for j, eta in enumerate(plan.etas) if math.isclose(eta, lr, rel_tol=1e-9)]
        law.delta_h_at_lr = full.delta_h[at[0]] if at else None
        law.first_order_at_lr = None if full.first_order is None else lr * full.first_order
    if result.attribution is not None:
        law.grad_first_order_at_lr = lr * result.attribution.sum
    result.covariance_law = asdict(law)


def _per_sequence_exact(inputs: AttributionInputs, result: EvalResult, plan: Plan) -> list[dict]:
    """The exact per-sequence path on the plan's rows of U, next to each row's first-order share eta a_i."""
    config = SNISConfig(truncation=plan.snis.truncation)
    exact = per_sequence_exact(inputs, plan.etas, plan.per_sequence_exact, integrands=[plan.integrand], config=config)
    a = result.arrays.get("attributions")
    out = []
    for item in exact:
        alone, mixed_results = item.alone[plan.integrand], None if item.mixed is None else item.mixed[plan.integrand]
        out.append(
            {
                "index": item.index,
                "attribution_first_order": None if a is None else [float(a[item.index]) * e for e in plan.etas],
                "alone": [r.delta_entropy for r in alone],
                "alone_se": [r.delta_entropy_se for r in alone],
                "mixed": None if mixed_results is None else [r.delta_entropy for r in mixed_results],
                "mixed_se": None if mixed_results is None else [r.delta_entropy_se for r in mixed_results],
            }
        )
    return out


def per_token_views(
    policy: nn.Module, update: Update, batch: SequenceBatch, plan: Plan, temperature: float
) -> dict[str, np.ndarray]:
    """Per-token log-probs and entropies of E at theta and at theta + reference_eta * full.

    Flat over response tokens, sequence j's tokens at ``offsets[j]:offsets[j+1]``.
    """
    forcing = replace(plan.forcing(temperature), with_entropy=True)
    shifted = ShiftedPolicy(policy, {"full": update.full})
    views: dict[str, list[np.ndarray]] = {
        k: [] for k in ("logprobs_theta", "entropies_theta", "logprobs_ref", "entropies_ref")
    }
    lengths = []
    device = next(policy.parameters()).device
    with torch.no_grad():
        for chunk in batch.chunks(plan.batch_size):
            chunk = chunk.to(device)
            at_reference = shifted.teacher_force("full", plan.reference_eta, chunk, forcing)
            for tag, ts in (("theta", teacher_force(policy, chunk, forcing=forcing)), ("ref", at_reference)):
                views[f"logprobs_{tag}"].append(ts.logprobs[ts.mask].cpu().numpy())
                views[f"entropies_{tag}"].append(ts.entropies[ts.mask].cpu().numpy())
            lengths.append(chunk.target_mask.sum(-1).cpu().numpy())
    out = {key: np.concatenate(v) for key, v in views.items()}
    out["offsets"] = np.concatenate([[0], np.cumsum(np.concatenate(lengths))]).astype(np.int64)
    out["reference_eta"] = np.asarray(plan.reference_eta)
    return out


def probe_eval(
    policy: nn.Module,
    update: Update,
    U: SequenceBatch | None,
    E: EvalBatch,
    plan: Plan,
    *,
    tick: Tick | None = None,
    timings: dict[str, float] | None = None,
) -> tuple[EvalResult, SequenceStats]:
    """The whole probe of one evaluation batch in one process: :func:`batch_rows` over E,
    :func:`summarise_eval`, :func:`complete_eval`. Returns the result and E's statistics at theta;
    ``timings`` (if given) gets the seconds of each stage."""
    clock = time.perf_counter()
    directions = part_directions(update, plan.parts)
    rows = sort_rows(batch_rows(policy, E.batch, directions, plan, E.temperature, tick))
    result = summarise_eval(rows, plan, E, eta_resolution(policy, directions, plan.etas))
    if timings is not None:
        timings["eval_passes_s"] = time.perf_counter() - clock
    complete_eval(policy, update, U, E, result, rows, plan, timings)
    return result, _stats(rows, "logprobs", "entropies")


# ---------------------------------------------------------------------------------------------
# the run's summary


def run_summary(
    plan: Plan,
    update: Update,
    evals: Sequence[EvalResult],
    *,
    config: dict[str, Any],
    timings: dict[str, float],
    environment: dict[str, str],
    world_size: int,
    policy: str,
    choices: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """``summary.json`` (docs/DESIGN.md section 9): plan, config, the automatic choices (``choices``: key ->
    value and where it came from), update, one entry per evaluation batch."""
    return {
        "plan": {
            **plan.describe(),
            "n_update_sequences": update.n_sequences,
            "n_eval_sequences": [ev.n_sequences for ev in evals],
            "world_size": world_size,
            "policy": policy,
        },
        "config": config,
        "choices": choices or {},
        "update": update.summary(),
        "aggregate": evals[0].to_dict()["parts"],
        "evals": [ev.to_dict() for ev in evals],
        "timings": timings,
        "environment": environment,
    }
