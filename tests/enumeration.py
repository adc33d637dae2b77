"""An exactly solvable world for testing the entropy estimators against the truth.

A tiny float64 ``LlamaForCausalLM`` (SDPA attention, RMSNorm kept in float64) over a
vocabulary of four tokens, ``0, 1, 2`` and ``EOS = 3``. A response stops at EOS or is
truncated after ``MAX_RESPONSE = 4`` tokens, so each prompt has exactly
``1 + 3 + 9 + 27 + 81 = 121`` possible responses. :class:`EnumeratedWorld` computes the
probability of every one of them at temperature ``tau`` by a plain forward of the model
(no padding, no ``probe`` code), hence the exact entropy

    H(theta) = mean over prompts of  -sum_r p(r | x) log p(r | x)

and exact samples (a categorical draw over the enumerated responses with a seeded
generator). This is the independent truth the SNIS, Taylor and attribution tests compare with.
"""

from __future__ import annotations

import itertools
from typing import Mapping, Sequence

import torch
from torch import Tensor
from torch.func import functional_call
from transformers import LlamaForCausalLM

from probe.batch import SequenceBatch, collate
from probe.logprobs import TeacherForcing, teacher_force
from probe.losses import LossConfig, normalisers, per_sequence_loss

from support import tiny_llama

EOS = 3
VOCAB = 4
CONTENT = (0, 1, 2)  # tokens a response may continue with
MAX_RESPONSE = 4
PROMPTS = ((1, 2), (2, 0, 1))
LR = 1e-2  # the lr of the world's AdamW steps (world_with_update), so eta = LR is the real step
FORCING = TeacherForcing(with_entropy=True, batch_size=None)  # E in one pass, with token entropies


def tiny_model(seed: int = 0, init_scale: float = 0.4) -> LlamaForCausalLM:
    """A 1-layer float64 Llama over the 4-token vocabulary (exact float64 RMSNorm, SDPA)."""
    return tiny_llama(
        seed,
        dtype=torch.float64,
        vocab_size=VOCAB,
        num_key_value_heads=2,
        max_position_embeddings=16,
        initializer_range=init_scale,
        tie_word_embeddings=False,
        bos_token_id=None,
        eos_token_id=EOS,
        pad_token_id=0,
    )


def all_responses() -> list[tuple[int, ...]]:
    """Every response: content tokens then EOS (1 to 4 tokens), or 4 content tokens (truncated)."""
    out: list[tuple[int, ...]] = []
    for n in range(MAX_RESPONSE):
        out += [tuple(c) + (EOS,) for c in itertools.product(CONTENT, repeat=n)]
    out += [tuple(c) for c in itertools.product(CONTENT, repeat=MAX_RESPONSE)]
    return out


class EnumeratedWorld:
    """Exact response distributions of ``model`` for a few prompts.

    Args:
        model: the tiny float64 model (its parameters are theta; overrides never mutate it).
        prompts: prompt token ids, one tuple each.
        temperature: the sampling temperature tau of the policy.
    """

    def __init__(self, model: torch.nn.Module, prompts: Sequence[Sequence[int]] = PROMPTS, temperature: float = 1.0):
        self.model = model
        self.prompts = [tuple(p) for p in prompts]
        self.temperature = float(temperature)
        self.responses = all_responses()
        # Row r of the 27 prefixes (a, b, c) that carries response r: its first min(len, 3) tokens,
        # EOS excluded, padded with 0. Position k of that row predicts token k of the response.
        rows, tokens, valid = [], [], []
        for r in self.responses:
            content = [t for t in r[:3] if t != EOS] + [0] * 3
            rows.append(content[0] * 9 + content[1] * 3 + content[2])
            tokens.append(list(r) + [0] * (MAX_RESPONSE - len(r)))
            valid.append([k < len(r) for k in range(MAX_RESPONSE)])
        self._rows = torch.tensor(rows)  # [R]
        self._tokens = torch.tensor(tokens)  # [R, 4]
        self._valid = torch.tensor(valid)  # [R, 4]
        self._prefixes = torch.tensor(list(itertools.product(CONTENT, repeat=3)))  # [27, 3]

    @property
    def theta(self) -> dict[str, Tensor]:
        return {n: p.detach() for n, p in self.model.named_parameters()}

    def shifted(self, direction: Mapping[str, Tensor], eta: float) -> dict[str, Tensor]:
        """theta + eta * direction on the parameters the direction touches."""
        theta = self.theta
        return {n: theta[n] + eta * d.to(theta[n].dtype) for n, d in direction.items()}

    @torch.no_grad()
    def log_probs(self, params: Mapping[str, Tensor] | None = None) -> Tensor:  # [P, R]
        """Exact log pi(r | x_p) of every enumerated response, at theta or under ``params``."""
        out = []
        for prompt in self.prompts:
            P = len(prompt)
            ids = torch.cat([torch.tensor(prompt).expand(27, P), self._prefixes], dim=1)  # [27, P+3]
            logits = functional_call(self.model, dict(params or {}), args=(ids,), strict=False).logits
            logp = torch.log_softmax(logits[:, P - 1 :].double() / self.temperature, dim=-1)  # [27, 4, V]
            per_token = logp[self._rows].gather(-1, self._tokens[..., None]).squeeze(-1)  # [R, 4]
            out.append((per_token * self._valid).sum(-1))
        return torch.stack(out)

    def entropies(self, params: Mapping[str, Tensor] | None = None) -> Tensor:  # [P]
        """Exact sequence entropy -sum_r p(r|x) log p(r|x) of each prompt."""
        logp = self.log_probs(params)
        return -(logp.exp() * logp).sum(-1)

    def expected_lengths(self, params: Mapping[str, Tensor] | None = None) -> Tensor:  # [P]
        """Exact expected response length of each prompt."""
        lengths = self._valid.sum(-1).double()  # [R]
        return (self.log_probs(params).exp() * lengths).sum(-1)

    def summary(self, params: Mapping[str, Tensor] | None = None) -> dict[str, float]:
        """All exact targets from one enumeration: ``entropy``, ``per_token`` (global ratio) and
        ``per_token_per_prompt`` (mean over prompts of entropy / length)."""
        logp = self.log_probs(params)  # [P, R]
        p = logp.exp()
        entropies = -(p * logp).sum(-1)  # [P]
        lengths = (p * self._valid.sum(-1).double()).sum(-1)  # [P]
        return {
            "entropy": float(entropies.mean()),
            "per_token": float(entropies.mean() / lengths.mean()),
            "per_token_per_prompt": float((entropies / lengths).mean()),
        }

    def entropy(self, params: Mapping[str, Tensor] | None = None) -> float:
        """Exact sequence entropy, averaged over the prompts (E holds equally many samples of each)."""
        return float(self.entropies(params).mean())

    def entropy_per_token(self, params: Mapping[str, Tensor] | None = None) -> float:
        """What the global ratio estimator targets: mean entropy / mean length (prompts equally weighted)."""
        return float(self.entropies(params).mean() / self.expected_lengths(params).mean())

    def entropy_per_token_per_prompt(self, params: Mapping[str, Tensor] | None = None) -> float:
        """What the per-prompt ratio estimator targets: the mean over prompts of entropy / length."""
        return float((self.entropies(params) / self.expected_lengths(params)).mean())

    def entropy_along(self, direction: Mapping[str, Tensor], eta: float) -> float:
        return self.entropy(self.shifted(direction, eta))

    def sample_records(self, n_per_prompt: int, seed: int, params: Mapping[str, Tensor] | None = None) -> list[dict]:
        """Exact samples: ``n_per_prompt`` responses of every prompt, drawn from the enumerated distribution."""
        gen = torch.Generator().manual_seed(seed)
        probs = self.log_probs(params).exp()  # [P, R]
        records = []
        for p, prompt in enumerate(self.prompts):
            picks = torch.multinomial(probs[p], n_per_prompt, replacement=True, generator=gen)
            for k in picks.tolist():
                records.append({"prompt_ids": list(prompt), "response_ids": list(self.responses[k]), "group": p})
        return records

    def sample(self, n_per_prompt: int, seed: int) -> SequenceBatch:
        """The same draws as :meth:`sample_records`, right-padded, built with tensor ops (fast for thousands)."""
        gen = torch.Generator().manual_seed(seed)
        probs = self.log_probs().exp()  # [P, R]
        lengths = self._valid.sum(-1)  # [R]
        width = max(len(p) for p in self.prompts) + MAX_RESPONSE
        ids, attention, response, groups = [], [], [], []
        for p, prompt in enumerate(self.prompts):
            picks = torch.multinomial(probs[p], n_per_prompt, replacement=True, generator=gen)  # [n]
            P = len(prompt)
            row = torch.zeros(n_per_prompt, width, dtype=torch.long)
            row[:, :P] = torch.tensor(prompt)
            row[:, P : P + MAX_RESPONSE] = self._tokens[picks]  # content padded with 0 = pad id
            pos = torch.arange(width)[None, :]
            end = P + lengths[picks][:, None]  # [n, 1]
            ids.append(row * (pos < end))
            attention.append((pos < end).long())
            response.append((pos >= P) & (pos < end))
            groups += [p] * n_per_prompt
        input_ids, attention_mask = torch.cat(ids), torch.cat(attention)
        keep = int(attention_mask.sum(0).nonzero().max()) + 1  # drop all-padding columns, as collate does
        return SequenceBatch(
            input_ids=input_ids[:, :keep],
            attention_mask=attention_mask[:, :keep],
            response_mask=torch.cat(response)[:, :keep],
            group=groups,
        )

    def update_batch(self, n_per_prompt: int, seed: int) -> SequenceBatch:
        """A sampled update batch U with GRPO advantages (reward: number of 1s, group-normalised)."""
        records = self.sample_records(n_per_prompt, seed)
        rewards = torch.tensor([float(r["response_ids"].count(1)) for r in records], dtype=torch.float64)
        groups = torch.tensor([r["group"] for r in records])
        for g in groups.unique():
            sel = groups == g
            rewards[sel] = (rewards[sel] - rewards[sel].mean()) / (rewards[sel].std() + 1e-6)
        for r, a in zip(records, rewards.tolist()):
            r["advantage"] = a
        return collate(records, pad_token_id=0, padding_side="right")


def pg_loss(model: torch.nn.Module, batch: SequenceBatch, cfg: LossConfig) -> Tensor:
    """The trainer's loss sum_i c_i on ``batch`` (on-policy, ratio = 1)."""
    stats = teacher_force(model, batch, forcing=TeacherForcing(temperature=cfg.temperature))
    return per_sequence_loss(stats.logprobs, stats.mask, batch.advantages, normalisers(stats.mask, cfg), cfg).sum()


def adamw_after_two_steps(
    world: EnumeratedWorld, lr: float = 1e-2, weight_decay: float = 0.1, n_per_prompt: int = 6, seed: int = 100
) -> tuple[torch.optim.AdamW, SequenceBatch, LossConfig]:
    """Take two real ``torch.optim.AdamW`` steps on sampled update batches (moving ``world.model``),
    and return the optimizer, a third update batch U for the step to reconstruct, and the loss config."""
    cfg = LossConfig(agg_mode="seq-mean-token-mean", temperature=world.temperature)
    optimizer = torch.optim.AdamW(world.model.parameters(), lr=lr, weight_decay=weight_decay)
    for step in range(2):
        batch = world.update_batch(n_per_prompt, seed + step)
        optimizer.zero_grad()
        pg_loss(world.model, batch, cfg).backward()
        optimizer.step()
    optimizer.zero_grad()
    return optimizer, world.update_batch(n_per_prompt, seed + 2), cfg


def world_with_update(seed: int = 0, lr: float = LR):
    """A fresh world after two AdamW steps, the reconstructed third step (float64 parts) and its U."""
    from probe.update import reconstruct_update

    world = EnumeratedWorld(tiny_model(seed))
    optimizer, batch, cfg = adamw_after_two_steps(world, lr=lr)
    return world, reconstruct_update(world.model, optimizer, batch, cfg), batch
