"""Sampling responses from a policy, GRPO group advantages, and update batches without dead groups.

Pure torch/transformers. Records follow the rollout contract (docs/DESIGN.md section 9):
``prompt_ids``, ``response_ids`` (cut after the first EOS, EOS included), ``group``,
``old_logprobs`` (one per response token) and flat metadata fields (``temperature``,
``top_p``, ``top_k``, ``truncated``, ...).

``old_logprobs`` are log-probs of the temperature-``tau`` policy, ``log_softmax(z / tau)``
in float64, i.e. what :func:`probe.logprobs.teacher_force` gives at the same temperature.
With top-p/top-k truncation the behaviour distribution differs from that policy; its
log-probs (renormalised over the kept tokens) are then recorded as ``sampling_logprobs``.

Tokens are drawn with ``torch.multinomial`` from a generator, or, given common uniforms
(:func:`common_uniforms`, one per row and token position), by inverse CDF (:func:`inverse_cdf`):
each sample is then still exactly from the policy, and two policies sampled with the same
uniforms draw the same token wherever their CDFs put the uniform in the same bin (common random
numbers: the paired realised change of a live step, docs/DESIGN.md section 6).
"""

from __future__ import annotations

import hashlib
import inspect
import math
import numbers
from dataclasses import dataclass
from typing import Any, Callable, Hashable, Mapping, Sequence

import torch
from torch import Tensor

from probe.rewards import clip_text, resolve_reward
from probe.sharding import on_every_rank


@dataclass
class SamplingSettings:
    """How responses are sampled from the policy.

    Args:
        n_per_prompt: responses per prompt (the GRPO group size G); at least 2 for update batches.
        max_new_tokens: longest response; a response that reaches it without EOS is flagged ``truncated``.
        temperature: sampling temperature tau > 0; ``old_logprobs`` are those of ``logits / tau``.
        top_p: nucleus sampling mass (None: off). Recorded in each record.
        top_k: keep only the k most likely tokens (None: off). Recorded in each record.
        seed: seed of the sampling generator; the same seed gives the same responses.
        batch_size: sequences generated together (None: all at once).
    """

    n_per_prompt: int = 4
    max_new_tokens: int = 32
    temperature: float = 1.0
    top_p: float | None = None
    top_k: int | None = None
    seed: int = 0
    batch_size: int | None = None

    def __post_init__(self) -> None:
        if not (self.temperature > 0 and math.isfinite(self.temperature)):
            raise ValueError(
                f"sampling temperature must be > 0, got {self.temperature}: greedy decoding has no sampling "
                "distribution to take old_logprobs or importance weights from (and an infinite one no policy); "
                "use a small positive temperature instead"
            )
        if self.n_per_prompt < 1 or self.max_new_tokens < 1:
            raise ValueError(
                f"sampling.n_per_prompt and sampling.max_new_tokens must be >= 1, got {self.n_per_prompt} and "
                f"{self.max_new_tokens}"
            )
        if self.top_p is not None and not 0.0 < self.top_p <= 1.0:
            raise ValueError(
                f"sampling.top_p must be in (0, 1], got {self.top_p}; use null to turn nucleus sampling off"
            )
        if self.top_k is not None and self.top_k < 1:
            raise ValueError(f"sampling.top_k must be >= 1, got {self.top_k}; use null to turn top-k sampling off")

    @property
    def truncated(self) -> bool:
        """Top-p or top-k truncation is on: the sampling distribution is not the temperature-tau policy."""
        return (self.top_p is not None and self.top_p < 1.0) or self.top_k is not None


def derived_seed(*parts: Any) -> int:
    """A 63-bit seed from a hash of ``parts`` (e.g. run seed, step, stream): independent streams from one seed."""
    digest = hashlib.sha256(":".join(map(str, parts)).encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def _ids(value: Any) -> list[int]:
    """An EOS id or list of ids (None: none) as a list of ints."""
    if value is None:
        return []
    return [int(value)] if isinstance(value, numbers.Integral) else [int(v) for v in value]


def special_token_ids(
    tokenizer: Any = None, config: Any = None, *, model: Any = None, generation_config: Any = None
) -> tuple[int, list[int]]:
    """``(pad, eos)``: the pad id and every EOS id of a tokenizer and a model.

    The EOS ids are the union, in this order and without repeats, of the tokenizer's, the model config's and
    the generation config's ``eos_token_id`` (an int or a list: Llama-3 ends with ``<|eot_id|>`` or
    ``<|end_of_text|>``, Qwen with ``<|im_end|>`` or ``<|endoftext|>``), as HF ``generate`` stops at any of
    them. The pad id is the tokenizer's, else the config's, else the first EOS id (as RL trainers pad
    finished rows with EOS).

    Args:
        tokenizer: its ``eos_token_id`` comes first, its ``pad_token_id`` is the pad id.
        config: the model config (default: ``model.config``).
        model: an HF (or PEFT-wrapped) model: its ``config`` and ``generation_config``.
        generation_config: the model's generation config (default: ``model.generation_config``).
    """
    if config is None:
        config = getattr(model, "config", None)
    if generation_config is None:
        generation_config = getattr(model, "generation_config", None)
    eos_ids: list[int] = []
    for source in (tokenizer, config, generation_config):
        for e in _ids(getattr(source, "eos_token_id", None)):
            if e not in eos_ids:
                eos_ids.append(e)
    if not eos_ids:
        raise ValueError(
            "no EOS token id: the tokenizer, the model config and its generation config name none; "
            "set tokenizer.eos_token_id"
        )
    pad = getattr(tokenizer, "pad_token_id", None)
    if pad is None:
        pad = getattr(config, "pad_token_id", None)
    return int(eos_ids[0] if pad is None else pad), eos_ids


def pad_token_id(tokenizer: Any) -> int:
    """The id batches are padded with (:func:`special_token_ids`)."""
    return special_token_ids(tokenizer)[0]


def truncate_logits(logits: Tensor, top_p: float | None, top_k: int | None) -> Tensor:  # [R, V] -> [R, V]
    """Set to -inf every token outside the top-k and outside the smallest set of mass >= top_p."""
    if top_k is not None and 0 < top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]  # [R, 1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)  # [R, V]
        probs = torch.softmax(sorted_logits, dim=-1)
        mass_before = probs.cumsum(-1) - probs  # [R, V] mass of strictly more likely tokens
        drop_sorted = mass_before >= top_p  # the most likely token is always kept
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


def common_uniforms(seed: int, n_rows: int, max_new_tokens: int) -> Tensor:  # [R, S] float64 in [0, 1)
    """The uniforms of inverse-CDF sampling: row r, position t holds the uniform of token t of response r.

    Drawn on the CPU in float64 from one generator seeded with ``seed``, row after row, so they do not depend on
    the device, on the batch size of the sampling passes, or on how many rows follow (the first R rows of a
    longer draw are the same)."""
    if n_rows < 0 or max_new_tokens < 1:
        raise ValueError(f"common uniforms need n_rows >= 0 and max_new_tokens >= 1, got {n_rows}, {max_new_tokens}")
    generator = torch.Generator().manual_seed(int(seed))
    return torch.rand(n_rows, max_new_tokens, dtype=torch.float64, generator=generator)


def inverse_cdf(probs: Tensor, u: Tensor) -> Tensor:  # [R, V], [R] -> [R] long
    """The token of each row at uniform u: the first v (vocabulary order) whose cumulative probability exceeds u.

    ``probs`` (rows summing to ~1, zeros allowed) are accumulated in float64 and divided by their total, so the
    last token of positive probability reaches exactly 1 > u: rounding cannot leave u past the end, and a token of
    probability 0 is never drawn. P(token = v) = p_v / sum p, exactly the distribution (up to float64 rounding)."""
    cdf = probs.double().cumsum(-1)  # [R, V]
    total = cdf[:, -1:]  # [R, 1]
    if not bool((torch.isfinite(total) & (total > 0)).all()):
        raise ValueError(
            "the sampling distribution of some row is not finite or sums to 0 (non-finite logits): the policy's "
            "logits overflowed; check the policy's dtype and weights"
        )
    cdf.div_(total.clone())  # in place (no second [R, V] buffer); the total becomes exactly 1.0 (x / x)
    u = u.to(cdf).contiguous()[:, None]  # [R, 1]
    token = torch.searchsorted(cdf, u, right=True).squeeze(-1)  # [R] the first v with cdf_v > u
    return token.clamp(max=probs.shape[-1] - 1)  # (only u >= 1, which [0, 1) uniforms never are)


def _last_logits_only(model: torch.nn.Module) -> dict:
    """``logits_to_keep=1`` where the model takes it: the prompt pass then never builds [R, P, V] logits."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model  # PEFT wrapper -> HF model
    return {"logits_to_keep": 1} if "logits_to_keep" in inspect.signature(base.forward).parameters else {}


@torch.no_grad()
def _sample_rows(
    model: torch.nn.Module,
    rows: list[list[int]],
    sampling: SamplingSettings,
    eos: list[int],
    pad_id: int,
    generator: Any,
    uniforms: Tensor | None = None,  # [R, max_new_tokens] float64: draw by inverse CDF (None: multinomial)
) -> tuple[list[list[int]], list[list[float]], list[list[float]], list[bool]]:
    """Sample one response per row with a KV cache. Returns ids, policy log-probs, sampling log-probs, truncated.

    Token t of row r is ``multinomial`` from ``generator``, or with ``uniforms`` the inverse CDF at ``uniforms[r,
    t]`` (one uniform per position, used or not, so the positions of a row keep their uniforms)."""
    max_new_tokens, temperature = sampling.max_new_tokens, float(sampling.temperature)
    top_p, top_k = sampling.top_p, sampling.top_k
    device = next(model.parameters()).device
    R, P = len(rows), max(len(r) for r in rows)
    input_ids = torch.full((R, P), pad_id, dtype=torch.long, device=device)  # [R, P] left-padded
    attention_mask = torch.zeros((R, P), dtype=torch.long, device=device)
    for i, r in enumerate(rows):
        input_ids[i, P - len(r) :] = torch.tensor(r, dtype=torch.long, device=device)
        attention_mask[i, P - len(r) :] = 1
    position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)  # [R, P]
    eos_ids = torch.tensor(eos, device=device)

    out = model(
        input_ids=input_ids,
        attention_mask=attention_mask,
        position_ids=position_ids,
        use_cache=True,
        **_last_logits_only(model),
    )
    # transformers >= 5.2x names the KV cache `cache`; older versions `past_key_values`
    cache_key = "cache" if "cache" in out else "past_key_values"
    cache, logits = out[cache_key], out.logits[:, -1]  # [R, V]
    next_position = position_ids[:, -1:] + 1  # [R, 1]
    finished = torch.zeros(R, dtype=torch.bool, device=device)
    tokens, policy_lps, sampling_lps = [], [], []
    for step in range(max_new_tokens):
        z = logits.double() / temperature  # [R, V]
        policy_logp = torch.log_softmax(z, dim=-1)  # [R, V]
        sampling_logp = torch.log_softmax(truncate_logits(z, top_p, top_k), dim=-1)  # [R, V]
        if uniforms is None:
            token = torch.multinomial(sampling_logp.exp(), 1, generator=generator).squeeze(-1)  # [R]
        else:
            token = inverse_cdf(sampling_logp.exp(), uniforms[:, step].to(device))  # [R]
        token = torch.where(finished, torch.full_like(token, pad_id), token)
        tokens.append(token)
        policy_lps.append(policy_logp.gather(-1, token[:, None]).squeeze(-1))
        sampling_lps.append(sampling_logp.gather(-1, token[:, None]).squeeze(-1))
        finished = finished | torch.isin(token, eos_ids)
        if on_every_rank(bool(finished.all()), model) or step == max_new_tokens - 1:  # (a sharded policy: together)
            break
        attention_mask = torch.cat([attention_mask, attention_mask.new_ones(R, 1)], dim=-1)
        out = model(
            input_ids=token[:, None],
            attention_mask=attention_mask,
            position_ids=next_position,
            use_cache=True,
            **{cache_key: cache},
        )
        cache, logits = out[cache_key], out.logits[:, -1]
        next_position = next_position + 1

    token_mat = torch.stack(tokens, dim=1).tolist()  # [R, S]
    policy_mat = torch.stack(policy_lps, dim=1).tolist()
    sampling_mat = torch.stack(sampling_lps, dim=1).tolist()
    responses, policy, sampling, truncated = [], [], [], []
    for i in range(R):
        ids = token_mat[i]
        end = next((t + 1 for t, tok in enumerate(ids) if tok in eos), None)  # cut after the first EOS
        length = len(ids) if end is None else end
        responses.append(ids[:length])
        policy.append(policy_mat[i][:length])
        sampling.append(sampling_mat[i][:length])
        truncated.append(end is None)
    return responses, policy, sampling, truncated


def sample_responses(
    model: torch.nn.Module,
    prompts: Sequence[Sequence[int]],
    sampling: SamplingSettings,
    *,
    tokenizer: Any = None,
    eos_token_id: int | Sequence[int] | None = None,
    pad_token_id: int | None = None,
    generator: torch.Generator | None = None,
    groups: Sequence[Hashable] | None = None,
    uniforms: Tensor | None = None,
) -> list[dict]:
    """Sample ``sampling.n_per_prompt`` responses to each prompt; records are grouped prompt by prompt.

    Args:
        model: a causal LM (HF or PEFT-wrapped); its train/eval mode is left as it is.
        prompts: prompt token ids, one list per prompt.
        sampling: G, longest response, temperature (``old_logprobs`` are float64 log-probs of
            ``softmax(logits / tau)``), top-p/top-k (the truncated behaviour log-probs then go to
            ``sampling_logprobs``), seed and batch size. Responses cut at ``max_new_tokens`` without EOS get
            ``truncated=True``.
        tokenizer: where to read the EOS / pad ids from when they are not given, with the model's config and
            generation config (:func:`special_token_ids`: every EOS id of the three).
        eos_token_id: end-of-sequence id (or ids); responses are cut after the first one, EOS included.
        pad_token_id: filler for finished rows (default: the tokenizer's pad, else EOS).
        generator: a ``torch.Generator`` on the model's device, advanced in place (default: a fresh one
            seeded with ``sampling.seed``).
        groups: the ``group`` of each prompt (default: the prompt's position 0..len(prompts)-1).
        uniforms: ``[R, max_new_tokens]`` uniforms in [0, 1) (:func:`common_uniforms`), R = len(prompts) x
            n_per_prompt rows in record order: each token is drawn by inverse CDF (:func:`inverse_cdf`) from its
            row's and position's uniform instead of ``torch.multinomial`` (``generator`` is then unused). The
            responses are then a function of the uniforms alone (whatever ``sampling.batch_size``), each exactly
            from the policy, and two policies given the same uniforms are coupled (common random numbers). With
            top-p/top-k the inverse CDF is that of the truncated distribution.

    Returns:
        One record per response: ``prompt_ids``, ``response_ids``, ``group``, ``old_logprobs``,
        ``truncated``, ``temperature``, ``top_p``, ``top_k`` (+ ``sampling_logprobs`` when truncated sampling is on).
    """
    if groups is not None and len(groups) != len(prompts):
        raise ValueError(f"groups has {len(groups)} entries for {len(prompts)} prompts: give one group per prompt")
    for k, p in enumerate(prompts):
        if len(p) == 0:
            raise ValueError(f"prompt {k} is empty: every prompt needs at least one token (e.g. BOS)")
    if eos_token_id is None:
        pad_default, eos = special_token_ids(tokenizer, model=model)
    else:
        eos = _ids(eos_token_id)
        pad_default = getattr(tokenizer, "pad_token_id", None)
        pad_default = eos[0] if pad_default is None else int(pad_default)
    pad_id = pad_default if pad_token_id is None else int(pad_token_id)
    if generator is None:
        device = next(model.parameters()).device
        generator = torch.Generator(device=device).manual_seed(int(sampling.seed or 0))
    batch_size, truncated_sampling = sampling.batch_size, sampling.truncated

    rows = [(k, list(map(int, p))) for k, p in enumerate(prompts) for _ in range(sampling.n_per_prompt)]
    if uniforms is not None:
        expected = (len(rows), sampling.max_new_tokens)
        if uniforms.ndim != 2 or tuple(uniforms.shape) != expected:
            raise ValueError(
                f"uniforms of shape {tuple(uniforms.shape)} for {len(prompts)} prompts x {sampling.n_per_prompt} "
                f"responses of up to {sampling.max_new_tokens} tokens: give one uniform per row and token position, "
                f"shape {expected} (common_uniforms(seed, {expected[0]}, {expected[1]}))"
            )
        if not bool(((uniforms >= 0) & (uniforms < 1)).all()):
            raise ValueError("uniforms must lie in [0, 1) (common_uniforms draws them so)")
    size = len(rows) if not batch_size or batch_size <= 0 else batch_size
    records: list[dict] = []
    for start in range(0, len(rows), size):
        chunk = rows[start : start + size]
        rows_ids = [r for _, r in chunk]
        chunk_uniforms = None if uniforms is None else uniforms[start : start + size]
        responses, policy_lps, sampling_lps, truncated = _sample_rows(
            model, rows_ids, sampling, eos, pad_id, generator, chunk_uniforms
        )
        for (k, prompt), response, lp, slp, cut in zip(chunk, responses, policy_lps, sampling_lps, truncated):
            record = {
                "prompt_ids": prompt,
                "response_ids": response,
                "group": k if groups is None else groups[k],
                "old_logprobs": lp,
                "truncated": cut,
                "temperature": float(sampling.temperature),
                "top_p": sampling.top_p,
                "top_k": sampling.top_k,
            }
            if truncated_sampling:
                record["sampling_logprobs"] = slp
            records.append(record)
    return records


def group_advantages(
    rewards: Tensor,  # [N]
    groups: Sequence[Hashable],  # [N]
    normalize_std: bool = True,
    eps: float = 1e-6,
) -> Tensor:  # [N] float64
    """GRPO advantages: ``A_i = r_i - mean_g(r)``, divided by ``std_g(r) + eps`` when ``normalize_std``.

    ``std_g`` is the unbiased (n-1) standard deviation of the group, as verl and TRL compute it;
    a group of one sequence gets advantage 0.
    """
    rewards = torch.as_tensor(rewards, dtype=torch.float64)
    if rewards.ndim != 1 or rewards.shape[0] != len(groups):
        raise ValueError(
            f"rewards must be a vector with one entry per group label; got shape {tuple(rewards.shape)} and "
            f"{len(groups)} labels"
        )
    label_ids: dict[Hashable, int] = {}
    group_index = torch.tensor([label_ids.setdefault(g, len(label_ids)) for g in groups], dtype=torch.long)  # [N]
    n_groups = len(label_ids)
    counts = torch.zeros(n_groups, dtype=torch.float64).index_add_(0, group_index, torch.ones_like(rewards))  # [K]
    means = torch.zeros(n_groups, dtype=torch.float64).index_add_(0, group_index, rewards) / counts  # [K]
    centred = rewards - means[group_index]  # [N]
    if not normalize_std:
        return centred
    # the std of each group, computed on the group's values scaled by their largest |r - mean| so that squaring
    # cannot overflow (rewards of 1e200 would give an infinite std, and silently zero advantages)
    scale = torch.zeros(n_groups, dtype=torch.float64).scatter_reduce_(0, group_index, centred.abs(), "amax")  # [K]
    scale = scale.clamp(min=torch.finfo(torch.float64).tiny)
    sq = torch.zeros(n_groups, dtype=torch.float64).index_add_(0, group_index, (centred / scale[group_index]) ** 2)
    std = scale * torch.sqrt(sq / (counts - 1).clamp(min=1))  # [K]
    return centred / (std[group_index] + eps)


class TextReward:
    """A text reward on token ids: ``reward(prompt_ids, response_ids) -> float`` (made by :func:`ids_reward_from_text`).

    The one place where token ids become the text a reward function sees (:meth:`seen`).
    """

    def __init__(
        self,
        reward_fn: Callable[..., float],
        tokenizer: Any,
        answers: Mapping[tuple[int, ...], Any] | None = None,
        *,
        skip_special_tokens: bool = True,
        eos_token_id: int | Sequence[int] | None = None,
    ):
        self.reward_fn = resolve_reward(reward_fn)
        self.tokenizer, self.answers, self.skip_special_tokens = tokenizer, answers, bool(skip_special_tokens)
        if eos_token_id is None:
            eos_token_id = getattr(tokenizer, "eos_token_id", None)
        self.eos_ids: set[int] | None = None
        if eos_token_id is not None:
            self.eos_ids = set(_ids(eos_token_id))

    def seen(self, prompt_ids: Sequence[int], response_ids: Sequence[int]) -> dict[str, Any]:
        """What the reward function is given for this sequence: ``prompt``, ``response`` (text), ``answer``
        and ``finished`` (the response holds an EOS id: it ended rather than being cut at ``max_new_tokens``;
        None when the tokenizer names no EOS)."""
        decode = self.tokenizer.decode
        finished = None if self.eos_ids is None else any(int(t) in self.eos_ids for t in response_ids)
        return {
            "prompt": decode(list(prompt_ids), skip_special_tokens=self.skip_special_tokens),
            "response": decode(list(response_ids), skip_special_tokens=self.skip_special_tokens),
            "answer": None if self.answers is None else self.answers.get(tuple(prompt_ids)),
            "finished": finished,
        }

    def __call__(self, prompt_ids: Sequence[int], response_ids: Sequence[int]) -> float:
        seen = self.seen(prompt_ids, response_ids)
        return self.reward_fn(seen["prompt"], seen["response"], answer=seen["answer"], finished=seen["finished"])

    def __repr__(self) -> str:
        return f"TextReward({self.reward_fn.name!r}, skip_special_tokens={self.skip_special_tokens})"


def ids_reward_from_text(
    reward_fn: Callable[..., float],
    tokenizer: Any,
    answers: Mapping[tuple[int, ...], Any] | None = None,
    *,
    skip_special_tokens: bool = True,
    eos_token_id: int | Sequence[int] | None = None,
) -> TextReward:
    """Turn a text reward ``reward_fn(prompt, response[, answer][, finished])`` into one on token ids.

    Args:
        reward_fn: a reward callable or spec (:func:`probe.rewards.resolve_reward`).
        tokenizer: decodes prompt and response ids.
        answers: maps a prompt's ids to its reference answer (e.g. GSM8K's), passed as ``answer``.
        skip_special_tokens: decode without special tokens (``<eos>``, ``<pad>``, ...), as TRL and verl do;
            False keeps them in the text.
        eos_token_id: EOS id(s) that make a response ``finished`` (default: the tokenizer's).
    """
    return TextReward(reward_fn, tokenizer, answers, skip_special_tokens=skip_special_tokens, eos_token_id=eos_token_id)


def _example_seen_by_reward(record: dict, reward_fn: Callable) -> str:
    """One record as the reward function saw it: text for a :class:`TextReward`, else the token ids."""
    finished = not record.get("truncated", False)
    if isinstance(reward_fn, TextReward):
        seen = reward_fn.seen(record["prompt_ids"], record["response_ids"])
        shown = f"prompt {clip_text(seen['prompt'])!r}, response {clip_text(seen['response'])!r}"
        shown += f" (decoded with skip_special_tokens={reward_fn.skip_special_tokens})"
        if seen["answer"] is not None:
            shown += f", answer {clip_text(str(seen['answer']))!r}"
        finished = finished if seen["finished"] is None else seen["finished"]
    else:
        shown = f"prompt_ids {list(record['prompt_ids'])}, response_ids {list(record['response_ids'])}"
    return f"{shown}, finished={finished}, reward {record['reward']:g}"


def _all_dead_at_first_message(first_draw: list[list[dict]], reward_fn: Callable, still_dead: str) -> str:
    """The error when no group of the first draw told its responses apart (``still_dead``: what resampling left)."""
    rewards = sorted({r["reward"] for g in first_draw for r in g})
    values = f"every reward was {rewards[0]:g}" if len(rewards) == 1 else "rewards seen: "
    if len(rewards) > 1:
        values += ", ".join(f"{v:g}" for v in rewards[:6]) + (", ..." if len(rewards) > 6 else "")
    example = next((r for g in first_draw for r in g if not r.get("truncated", False)), first_draw[0][0])
    return (
        f"every one of the {len(first_draw)} prompt groups got equal rewards within the group on the first sampling "
        f"attempt ({values}), and {still_dead}: there is no policy-gradient signal. A reward function that scores "
        "every response alike is the usual cause. One example, as the reward function saw it: "
        f"{_example_seen_by_reward(example, reward_fn)}. Fix: check the reward function on this example (call it "
        "yourself on that prompt and response); if the text lacks what it looks for (special tokens such as '<eos>' "
        "are skipped by default: set skip_special_tokens=false next to the reward, or read its `finished` keyword), "
        "fix the decoding; sample more responses per prompt (n_per_prompt) or at a higher temperature; or set "
        "filter_zero_advantage_prompts=False to keep them."
    )


def sample_update_batch(
    model: torch.nn.Module,
    prompts: Sequence[Sequence[int]],
    sampling: SamplingSettings,
    *,
    reward_fn: Callable[[Sequence[int], Sequence[int]], float],
    tokenizer: Any = None,
    eos_token_id: int | Sequence[int] | None = None,
    pad_token_id: int | None = None,
    generator: torch.Generator | None = None,
    groups: Sequence[Hashable] | None = None,
    normalize_std: bool = True,
    eps: float = 1e-6,
    filter_zero_advantage_prompts: bool = True,
    max_resample_attempts: int = 5,
    zero_tol: float = 1e-8,
    spare_prompts: Sequence[Sequence[int]] = (),
) -> list[dict]:
    """Sample an update batch U: G responses per prompt, rewards, GRPO advantages.

    A prompt group whose advantages are all zero (``|A| <= zero_tol``: every response got
    the same reward) contributes nothing to the update; with ``filter_zero_advantage_prompts``
    such groups are sampled again, up to ``max_resample_attempts`` times, each time with
    the next of ``spare_prompts`` if any are left (else the same prompt). Groups still dead
    after that raise a ValueError; when no group of the first draw told its responses apart,
    the error says so and shows one response as the reward function saw it.

    Args:
        model: the policy.
        prompts: prompt token ids, one list per group.
        sampling: how responses are sampled (G = ``n_per_prompt`` >= 2; see :func:`sample_responses`).
        reward_fn: ``reward_fn(prompt_ids, response_ids) -> float`` (see :func:`ids_reward_from_text`; a
            :class:`TextReward` lets the error below show an example as text).
        tokenizer, eos_token_id, pad_token_id, generator, groups: as :func:`sample_responses`.
        normalize_std: divide advantages by the group's std (GRPO); off: mean-centred only (Dr. GRPO).
        eps: added to the std.
        filter_zero_advantage_prompts: resample all-zero-advantage groups (on) or keep them (off).
        max_resample_attempts: how many times dead groups are sampled again before giving up.
        zero_tol: an advantage with ``|A| <= zero_tol`` counts as zero.
        spare_prompts: replacement prompts for dead groups, used in order.

    Returns:
        Records as :func:`sample_responses` gives, plus ``reward``, ``advantage`` and
        ``resample_attempt`` (0 for the first draw); ordered group by group.
    """
    n_per_prompt = sampling.n_per_prompt
    if n_per_prompt < 2:
        raise ValueError(
            f"n_per_prompt={n_per_prompt}: group advantages need at least 2 responses per prompt "
            "(a group of one always has advantage 0); set n_per_prompt >= 2"
        )
    if max_resample_attempts < 0:
        raise ValueError(f"max_resample_attempts must be >= 0, got {max_resample_attempts}")
    if generator is None:
        device = next(model.parameters()).device
        generator = torch.Generator(device=device).manual_seed(int(sampling.seed or 0))
    labels = list(range(len(prompts))) if groups is None else list(groups)

    def draw(prompt_list: list[list[int]], label_list: list[Hashable], attempt: int) -> list[list[dict]]:
        records = sample_responses(
            model,
            prompt_list,
            sampling,
            tokenizer=tokenizer,
            eos_token_id=eos_token_id,
            pad_token_id=pad_token_id,
            generator=generator,
            groups=label_list,
        )
        rewards = torch.tensor(
            [float(reward_fn(r["prompt_ids"], r["response_ids"])) for r in records], dtype=torch.float64
        )
        advantages = group_advantages(rewards, [r["group"] for r in records], normalize_std=normalize_std, eps=eps)
        for r, rew, adv in zip(records, rewards.tolist(), advantages.tolist()):
            r.update(reward=rew, advantage=adv, resample_attempt=attempt)
        return [records[k * n_per_prompt : (k + 1) * n_per_prompt] for k in range(len(prompt_list))]

    def is_dead(group_records: list[dict]) -> bool:
        return all(abs(r["advantage"]) <= zero_tol for r in group_records)

    by_group = draw([list(p) for p in prompts], labels, attempt=0)
    first_draw = list(by_group)
    spares = iter([list(p) for p in spare_prompts])
    attempt = 0
    while filter_zero_advantage_prompts:
        dead = [k for k, g in enumerate(by_group) if is_dead(g)]
        if not dead:
            break
        if attempt >= max_resample_attempts:
            still_dead = (
                f"{len(dead)} of {len(by_group)} prompt groups still have all advantages |A| <= {zero_tol:g} (every "
                f"response got the same reward) after {attempt} resampling attempts (max_resample_attempts="
                f"{max_resample_attempts}, n_per_prompt={n_per_prompt}, temperature={sampling.temperature})"
            )
            if all(is_dead(g) for g in first_draw):
                raise ValueError(_all_dead_at_first_message(first_draw, reward_fn, still_dead))
            raise ValueError(
                f"{still_dead}. Fix: raise max_resample_attempts or n_per_prompt, raise the temperature, give spare "
                "prompts, use prompts of middling difficulty for this policy, or set filter_zero_advantage_prompts="
                "False to keep them."
            )
        attempt += 1
        new_prompts = [next(spares, None) or list(by_group[k][0]["prompt_ids"]) for k in dead]
        redrawn = draw(new_prompts, [labels[k] for k in dead], attempt=attempt)
        for k, group_records in zip(dead, redrawn):
            by_group[k] = group_records
    return [r for g in by_group for r in g]
