"""Self-normalised importance sampling (SNIS) of the entropy change Delta H(eta), docs/DESIGN.md section 3.

E holds M sequences y_j ~ pi_theta. For theta(eta) = theta + eta * d, with per-sequence
statistics at theta (``h_j(0)``) and at theta(eta) (``l_j(eta)``, ``h_j(eta)``):

    lambda_j = l_j(eta) - l_j(0)                      log-weights, float64
    w_j      = exp(lambda_j - max lambda)             optionally truncated at c * mean(w)
    W_j      = w_j / sum w                            normalised weights;  ESS = 1 / sum W_j^2
    H^(eta)  = sum_j W_j h_j(eta) ;  Delta H^ = H^(eta) - mean_j h_j(0)
    c_j      = W_j h_j(eta) - h_j(0) / M              per-sequence contributions, sum_j c_j = Delta H^

Per-token entropy (what RL frameworks log) is the ratio estimator
``R^ = sum w h(eta) / sum w T`` minus the base ``r = sum h(0) / sum T``.

``per_prompt`` normalisation: each prompt group g (M_g samples) gets its own SNIS estimate
Delta_g, and the groups are averaged with weights M_g / M. Equivalently the overall weights
are W_j = (M_g / M) * w_j / sum_{k in g} w_k, which still sum to 1, so H^, c_j and ESS keep
the formulas above. Per-group normalisation removes the prompt-to-prompt variation of the
weights but each group's estimate carries the O(1/M_g) SNIS bias: use it with many samples
per prompt only. Per-token, each group's ratio R_g - r_g is averaged with the same M_g / M.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields, replace
from typing import Any, Sequence

import torch
from torch import Tensor

from probe.overrides import Sweep
from probe.statistics import INTEGRANDS, SequenceStats, check_integrand, group_ids, group_sum, small_sample_correction

NORMALISATIONS = ("global", "per_prompt")


@dataclass
class SNISConfig:
    """How the importance weights are formed.

    Args:
        truncation: cap each weight at ``truncation * mean(w)`` (within its group under
            ``per_prompt``); ``None`` or 0 disables. Truncation trades bias for variance; the
            fraction of capped weights is reported, and standard errors treat the capped
            weights as given (they do not include the truncation bias).
        normalisation: ``global`` (one SNIS over all of E) or ``per_prompt`` (normalise within
            each prompt group, then average groups weighted by their sample counts).
    """

    truncation: float | None = None
    normalisation: str = "global"

    def __post_init__(self) -> None:
        if self.normalisation not in NORMALISATIONS:
            raise ValueError(f"unknown normalisation {self.normalisation!r}; choose one of {', '.join(NORMALISATIONS)}")
        if self.truncation is not None and (not math.isfinite(self.truncation) or self.truncation < 0):
            raise ValueError(
                f"truncation must be None, 0 (off) or a positive multiple of mean(w), got {self.truncation}"
            )
        if self.truncation is not None and 0 < self.truncation < 1:
            raise ValueError(
                f"truncation={self.truncation} < 1 would cap every weight below the mean; use c >= 1 (e.g. 10) or 0 "
                "to disable"
            )


def log_weights(base: SequenceStats, shifted: SequenceStats) -> Tensor:  # [M]
    """lambda_j = l_j(eta) - l_j(0), in float64."""
    return shifted.logprobs.double() - base.logprobs.double()


# ---------------------------------------------------------------------------------------------
# the estimator as a differentiable function (taylor.py differentiates it by JVP)


def snis_point_estimate(
    log_w: Tensor,  # [M] lambda_j, log-weights
    integrand_eta: Tensor,  # [M] h_j(eta)
    integrand_base: Tensor,  # [M] h_j(0)
    lengths: Tensor,  # [M] T_j
    gid: Tensor | None = None,  # [M] group ids (per_prompt); None: global
    n_groups: int = 1,
) -> tuple[Tensor, Tensor]:
    """(Delta H^, Delta per-token H^) without truncation, written so ``torch.func.jvp`` can differentiate it."""
    M = log_w.shape[0]
    gid = torch.zeros(M, dtype=torch.long, device=log_w.device) if gid is None else gid
    shift = torch.full((n_groups,), -math.inf, dtype=log_w.dtype, device=log_w.device)
    shift = shift.scatter_reduce(0, gid, log_w.detach(), "amax")  # [G], a constant: cancels in the ratios
    w = torch.exp(log_w - shift[gid])  # [M]
    frac = group_sum(torch.ones_like(w), gid, n_groups) / M  # [G] M_g / M
    H_g = group_sum(w * integrand_eta, gid, n_groups) / group_sum(w, gid, n_groups)  # [G]
    hbar_g = group_sum(integrand_base, gid, n_groups) / (frac * M)  # [G]
    R_g = group_sum(w * integrand_eta, gid, n_groups) / group_sum(w * lengths, gid, n_groups)  # [G]
    r_g = group_sum(integrand_base, gid, n_groups) / group_sum(lengths, gid, n_groups)  # [G]
    return (frac * (H_g - hbar_g)).sum(), (frac * (R_g - r_g)).sum()


# ---------------------------------------------------------------------------------------------
# the estimate with weights diagnostics and standard errors


@dataclass
class SNISResult:
    """SNIS estimate of the entropy change at one step size, for one integrand.

    ``influence`` holds each sequence's term of the delta-method variance, already scaled so
    that ``delta_entropy_se = sqrt(sum influence^2)``; the influence of a difference of two
    estimates on the same E is the difference of their influences (see :func:`snis_difference`).
    """

    integrand: str
    eta: float
    normalisation: str
    n_samples: int
    delta_entropy: float  # Delta H^ (sequence entropy, nats)
    delta_entropy_se: float
    entropy: float  # H^(eta)
    base_entropy: float  # mean_j h_j(0)
    delta_entropy_per_token: float  # R^(eta) - r
    delta_entropy_per_token_se: float
    entropy_per_token: float  # R^(eta)
    base_entropy_per_token: float  # r
    ess: float  # 1 / sum W_j^2
    ess_fraction: float  # ess / M
    truncated_fraction: float
    max_log_weight: float
    min_log_weight: float
    weights: Tensor = field(repr=False)  # [M] W_j, sum to 1
    contributions: Tensor = field(repr=False)  # [M] c_j, sum to delta_entropy
    contributions_per_token: Tensor = field(repr=False)  # [M] sum to delta_entropy_per_token
    influence: Tensor = field(repr=False)  # [M]
    influence_per_token: Tensor = field(repr=False)  # [M]

    _TENSORS = ("weights", "contributions", "contributions_per_token", "influence", "influence_per_token")

    def to_dict(self, per_sequence: bool = False) -> dict[str, Any]:
        """JSON-ready scalars (and the per-sequence vectors as lists when ``per_sequence``)."""
        out = {f.name: getattr(self, f.name) for f in fields(self) if f.name not in self._TENSORS}
        if per_sequence:
            out.update({k: getattr(self, k).tolist() for k in self._TENSORS})
        return out


def snis_estimate(
    base: SequenceStats,
    shifted: SequenceStats,
    *,
    integrand: str,
    eta: float = float("nan"),
    config: SNISConfig | None = None,
    groups: Sequence[Any] | Tensor | None = None,
) -> SNISResult:
    """SNIS estimate of Delta H at theta + eta * d from E's statistics at theta and at theta + eta * d.

    Standard errors (delta method, samples iid from pi_theta). Write the estimate as a smooth
    function of sample means, Delta H^ = mean(w h(eta)) / mean(w) - mean(h(0)) with w the
    (unnormalised) weights. Its influence function at sample j is

        psi_j = w_j (h_j(eta) - H^) / mean(w)  -  (h_j(0) - hbar),

    so Var(Delta H^) ~ Var(psi) / M. With W_j = w_j / sum w this is psi_j / M =
    W_j (h_j(eta) - H^) - (h_j(0) - hbar) / M, and both parts sum to zero over j, so

        SE^2 = M / (M - 1) * sum_j (psi_j / M)^2.

    Both terms use the SAME samples: the covariance between H^(eta) and the base mean is
    included (it makes SEs tiny at small eta, where the two nearly cancel). Per token, with
    R^ = sum w h / sum w T and r = sum h(0) / sum T:

        psi_j / M = w_j (h_j(eta) - R^ T_j) / sum(w T)  -  (h_j(0) - r T_j) / sum(T).

    Under ``per_prompt`` the group estimates are independent, each group uses its own centres
    (H^_g, hbar_g, R^_g, r_g), factor M_g / (M_g - 1), and its terms are scaled by M_g / M.
    A group of one sample (E of one sequence; ``per_prompt`` with one response per prompt) has no
    sample variance: the SEs are then NaN (unavailable), never 0.
    """
    config = config or SNISConfig()
    check_integrand(integrand)
    M = len(base)
    if M == 0:
        raise ValueError("the evaluation batch E is empty; sample at least one sequence")
    if len(shifted) != M:
        raise ValueError(
            f"statistics at eta cover {len(shifted)} sequences but the base covers {M}; they must be of the same E"
        )
    if config.normalisation == "per_prompt":
        if groups is None:
            raise ValueError(
                "per_prompt normalisation needs the prompt group of every sequence of E: pass groups=batch.group"
            )
        gid, G = group_ids(groups, M)
    else:
        gid, G = torch.zeros(M, dtype=torch.long), 1
    device = base.logprobs.device
    gid = gid.to(device)

    h0 = base.integrand(integrand).double()  # [M]
    h = shifted.integrand(integrand).double()  # [M]
    T = base.lengths.double()  # [M]
    log_w = log_weights(base, shifted)  # [M] lambda_j
    if not torch.isfinite(log_w).all():
        raise ValueError(
            "non-finite log-weights: a sequence has zero probability at theta + eta * d; use a smaller eta"
        )

    shift = torch.full((G,), -math.inf, dtype=torch.float64, device=device).scatter_reduce(0, gid, log_w, "amax")
    w = torch.exp(log_w - shift[gid])  # [M] in (0, 1]
    count = group_sum(torch.ones_like(w), gid, G)  # [G] M_g
    truncated = torch.zeros(M, dtype=torch.bool, device=device)
    if config.truncation:
        cap = config.truncation * group_sum(w, gid, G) / count  # [G]
        truncated = w > cap[gid]
        w = torch.minimum(w, cap[gid])
    frac = count / M  # [G]
    scale = torch.sqrt(small_sample_correction(count))  # [G]

    # sequence entropy
    sum_w = group_sum(w, gid, G)  # [G]
    W_in_group = w / sum_w[gid]  # [M] normalised within the group
    W = frac[gid] * W_in_group  # [M] overall, sums to 1
    H_g = group_sum(W_in_group * h, gid, G)  # [G]
    hbar_g = group_sum(h0, gid, G) / count  # [G]
    delta = (frac * (H_g - hbar_g)).sum()
    influence = frac[gid] * (W_in_group * (h - H_g[gid]) - (h0 - hbar_g[gid]) / count[gid]) * scale[gid]  # [M]
    contributions = W * h - h0 / M  # [M]

    # per-token entropy (ratio estimator)
    sum_wT = group_sum(w * T, gid, G)  # [G]
    sum_T = group_sum(T, gid, G)  # [G]
    if (sum_T == 0).any():
        raise ValueError(
            "a prompt group of E has no response tokens, so its per-token entropy is undefined; drop empty responses"
        )
    R_g = group_sum(w * h, gid, G) / sum_wT  # [G]
    r_g = group_sum(h0, gid, G) / sum_T  # [G]
    delta_tok = (frac * (R_g - r_g)).sum()
    influence_tok = frac[gid] * (w * (h - R_g[gid] * T) / sum_wT[gid] - (h0 - r_g[gid] * T) / sum_T[gid]) * scale[gid]
    contributions_tok = frac[gid] * (w * h / sum_wT[gid] - h0 / sum_T[gid])

    ess = float(1.0 / (W**2).sum())
    # a group of one sample has no sample variance: its estimate's SE cannot be estimated (NaN, never 0)
    se_defined = bool((count > 1).all())
    return SNISResult(
        integrand=integrand,
        eta=float(eta),
        normalisation=config.normalisation,
        n_samples=M,
        delta_entropy=float(delta),
        delta_entropy_se=float(influence.pow(2).sum().sqrt()) if se_defined else math.nan,
        entropy=float((frac * H_g).sum()),
        base_entropy=float((frac * hbar_g).sum()),
        delta_entropy_per_token=float(delta_tok),
        delta_entropy_per_token_se=float(influence_tok.pow(2).sum().sqrt()) if se_defined else math.nan,
        entropy_per_token=float((frac * R_g).sum()),
        base_entropy_per_token=float((frac * r_g).sum()),
        ess=ess,
        ess_fraction=ess / M,
        truncated_fraction=float(truncated.double().mean()),
        max_log_weight=float(log_w.max()),
        min_log_weight=float(log_w.min()),
        weights=W.cpu(),
        contributions=contributions.cpu(),
        contributions_per_token=contributions_tok.cpu(),
        influence=influence.cpu(),
        influence_per_token=influence_tok.cpu(),
    )


def snis_difference(a: SNISResult, b: SNISResult) -> SNISResult:
    """The entropy change between two points swept on the SAME E: H^_a - H^_b (e.g. the mixed
    form H(theta + eta b + eta v_i) - H(theta + eta b)), with its delta-method SE.

    Scalars describing weights (ESS, truncation, log-weight range) are those of ``a``;
    ``base_entropy`` is ``b``'s estimate H^_b.
    """
    if a.n_samples != b.n_samples or a.integrand != b.integrand or a.normalisation != b.normalisation:
        raise ValueError("snis_difference needs two estimates on the same E with the same integrand and normalisation")
    influence = a.influence - b.influence
    influence_tok = a.influence_per_token - b.influence_per_token
    se_defined = math.isfinite(a.delta_entropy_se) and math.isfinite(b.delta_entropy_se)  # NaN: one sample per group
    return replace(  # the weights' diagnostics, H^_a and the settings are a's
        a,
        delta_entropy=a.entropy - b.entropy,
        delta_entropy_se=float(influence.pow(2).sum().sqrt()) if se_defined else math.nan,
        base_entropy=b.entropy,
        delta_entropy_per_token=a.entropy_per_token - b.entropy_per_token,
        delta_entropy_per_token_se=float(influence_tok.pow(2).sum().sqrt()) if se_defined else math.nan,
        base_entropy_per_token=b.entropy_per_token,
        contributions=a.contributions - b.contributions,
        contributions_per_token=a.contributions_per_token - b.contributions_per_token,
        influence=influence,
        influence_per_token=influence_tok,
    )


def non_finite_result(M: int, *, integrand: str, eta: float, normalisation: str) -> SNISResult:
    """An all-NaN result: the point where theta + eta * d overflowed the model (reported, never a crash)."""
    scalars = {f.name: math.nan for f in fields(SNISResult) if f.name not in SNISResult._TENSORS}
    scalars.update(integrand=integrand, eta=float(eta), normalisation=normalisation, n_samples=M)
    return SNISResult(
        **scalars, **{name: torch.full((M,), math.nan, dtype=torch.float64) for name in SNISResult._TENSORS}
    )


def snis_estimates(
    swept: Sweep,
    part: str,
    *,
    integrand: str,
    config: SNISConfig | None = None,
    groups: Sequence[Any] | Tensor | None = None,
    sampling: SequenceStats | None = None,
) -> list[SNISResult]:
    """SNIS estimates of Delta H along one swept part, one per eta.

    ``sampling``: E's statistics at the policy E was sampled from when that is not theta (a held E in
    a live run); the change is then H^(theta + eta d) - H^(theta), both estimated against the sampling
    policy (:func:`snis_difference`). A point whose log-probs or integrand are not finite (theta + eta * d
    overflowed the model) gives an all-NaN result instead of an error.
    """
    config = config or SNISConfig()
    groups = groups if config.normalisation == "per_prompt" else None
    out = []
    for j, eta in enumerate(swept.etas.tolist()):
        at = swept.at(part, j)
        if not (torch.isfinite(at.logprobs).all() and torch.isfinite(at.integrand(integrand)).all()):
            out.append(non_finite_result(len(at), integrand=integrand, eta=eta, normalisation=config.normalisation))
        elif sampling is None:
            out.append(snis_estimate(swept.base, at, integrand=integrand, eta=eta, config=config, groups=groups))
        else:
            here = snis_estimate(sampling, at, integrand=integrand, eta=eta, config=config, groups=groups)
            there = snis_estimate(sampling, swept.base, integrand=integrand, eta=0.0, config=config, groups=groups)
            out.append(snis_difference(here, there))
    return out


def snis_sweep(
    swept: Sweep,
    *,
    integrands: Sequence[str] = INTEGRANDS,
    config: SNISConfig | None = None,
    groups: Sequence[Any] | Tensor | None = None,
) -> dict[str, dict[str, list[SNISResult]]]:
    """SNIS estimates for every swept part and eta: ``out[part][integrand][eta_index]``."""
    return {
        part: {name: snis_estimates(swept, part, integrand=name, config=config, groups=groups) for name in integrands}
        for part in swept.parts
    }


# ---------------------------------------------------------------------------------------------
# sampler consistency


def logprob_gap(
    teacher_forced: Tensor,  # [B, T-1] log-probs from teacher forcing at theta
    sampler_logprobs: Tensor,  # [B, T-1] the sampler's (behaviour) log-probs, aligned the same way
    mask: Tensor,  # [B, T-1] bool, response targets
) -> dict[str, float]:
    """How far the sampler's log-probs are from teacher forcing on the response tokens.

    SNIS assumes E was sampled from pi_theta at the same temperature; a large gap means the
    sampler's policy differs (other temperature, top-p/top-k, a stale or quantised copy).
    """
    if teacher_forced.shape != sampler_logprobs.shape or teacher_forced.shape != mask.shape:
        raise ValueError(
            f"logprob_gap needs equal shapes, got {tuple(teacher_forced.shape)}, {tuple(sampler_logprobs.shape)}, "
            f"{tuple(mask.shape)}; align sampler log-probs with batch.targets ([B, T-1])"
        )
    gap = (teacher_forced.double() - sampler_logprobs.double().to(teacher_forced.device)).abs()[mask.bool()]
    if gap.numel() == 0:
        return {"max_abs": 0.0, "mean_abs": 0.0}
    return {"max_abs": float(gap.max()), "mean_abs": float(gap.mean())}
