"""The toy world's verifiable task: single-digit addition.

A prompt is ``<bos> a + b =`` with ``a, b`` in ``0..9``; the correct response is the
digits of ``a + b`` one token each, then ``<eos>`` (``3 + 9 =`` -> ``1 2 <eos>``). The
vocabulary is fixed (16 words, :data:`VOCAB`), so token ids are the same in every toy
world and :func:`reward_ids` needs no tokenizer.

Two reward functions, both returning 1.0 for a correct answer that ended (``<eos>``) and
0.0 otherwise:

* :func:`reward_ids` ``(prompt_ids, response_ids)`` on token ids;
* :func:`reward` ``(prompt: str, response: str, finished=None)`` on text, the reward ``toy``
  (``probe.toy.task:reward`` by import path). It knows the answer ended from ``finished=True``
  (responses decoded with ``skip_special_tokens=True``, the default, show no ``<eos>``) or from
  an ``<eos>`` word in the text (decoded with special tokens kept); a response cut at
  ``max_new_tokens`` earns 0.
"""

from __future__ import annotations

import re
from typing import Sequence

import torch

SPECIAL_TOKENS = ["<pad>", "<bos>", "<eos>", "<unk>"]
DIGITS = [str(d) for d in range(10)]
VOCAB = SPECIAL_TOKENS + DIGITS + ["+", "="]  # 16 words; id = position
TOKEN_ID = {word: i for i, word in enumerate(VOCAB)}
PAD_ID, BOS_ID, EOS_ID, UNK_ID = (TOKEN_ID[w] for w in SPECIAL_TOKENS)
PLUS_ID, EQUALS_ID = TOKEN_ID["+"], TOKEN_ID["="]

# Same splitting as the toy tokenizer: special tokens whole, digits one by one, other symbols singly.
_WORD = re.compile(r"<[a-z]+>|\d|[^\s\d<]+|<")


def split_words(text: str) -> list[str]:
    """Split text into the toy vocabulary's words (``"12+3"`` -> ``["1", "2", "+", "3"]``)."""
    return _WORD.findall(text)


def problem_text(a: int, b: int) -> str:
    """The prompt text of ``a + b`` without the BOS token, e.g. ``"3 + 4 ="``."""
    return f"{a} + {b} ="


def answer_words(a: int, b: int) -> list[str]:
    """The digits of ``a + b``, one word each (``9 + 3`` -> ``["1", "2"]``)."""
    return list(str(a + b))


def answer_ids(a: int, b: int) -> list[int]:
    """The correct response's token ids: the digits of ``a + b`` then ``<eos>``."""
    return [TOKEN_ID[d] for d in answer_words(a, b)] + [EOS_ID]


def make_problems(n: int, seed: int) -> list[tuple[int, int]]:
    """``n`` addition problems ``(a, b)``, deterministic in ``seed``.

    The 100 problems are drawn as successive seeded permutations, so ``n <= 100`` gives
    distinct problems and every problem appears before any repeats.
    """
    if n < 0:
        raise ValueError(f"make_problems needs n >= 0, got {n}")
    generator = torch.Generator().manual_seed(int(seed))
    problems: list[tuple[int, int]] = []
    while len(problems) < n:
        order = torch.randperm(100, generator=generator).tolist()
        problems.extend((k // 10, k % 10) for k in order)
    return problems[:n]


def prompt_ids_of(a: int, b: int) -> list[int]:
    """Token ids of the prompt ``<bos> a + b =``."""
    return [BOS_ID, TOKEN_ID[str(a)], PLUS_ID, TOKEN_ID[str(b)], EQUALS_ID]


def make_prompts(n: int, seed: int) -> list[list[int]]:
    """``n`` prompts as token ids ``[<bos>, a, +, b, =]``, deterministic in ``seed``."""
    return [prompt_ids_of(a, b) for a, b in make_problems(n, seed)]


def make_prompt_texts(n: int, seed: int) -> list[str]:
    """The same ``n`` prompts as :func:`make_prompts`, as text (``"3 + 4 ="``, no BOS)."""
    return [problem_text(a, b) for a, b in make_problems(n, seed)]


def parse_prompt(words: Sequence[str]) -> tuple[int, int]:
    """``(a, b)`` of a prompt given as words; special tokens are ignored."""
    content = [w for w in words if w not in SPECIAL_TOKENS]
    if (
        len(content) != 4
        or content[1] != "+"
        or content[3] != "="
        or not (content[0] in DIGITS and content[2] in DIGITS)
    ):
        raise ValueError(
            f"not a toy addition prompt: {' '.join(words)!r}; expected 'a + b =' with single digits a, b "
            "(make prompts with probe.toy.task.make_prompts or make_prompt_texts)"
        )
    return int(content[0]), int(content[2])


def _is_correct(a: int, b: int, response_words: Sequence[str], finished: bool | None = None) -> bool:
    """The words before the first ``<eos>`` are the sum's digits; without an ``<eos>`` word the response must be
    ``finished`` (it ended with EOS, decoded without special tokens) and be exactly those digits."""
    words = list(response_words)
    if "<eos>" in words:
        return words[: words.index("<eos>")] == answer_words(a, b)
    return bool(finished) and words == answer_words(a, b)


def reward_ids(prompt_ids: Sequence[int], response_ids: Sequence[int]) -> float:
    """1.0 if ``response_ids`` is the sum's digits followed by ``<eos>`` (tokens after ``<eos>`` are ignored), else
    0.0."""
    to_word = lambda i: VOCAB[i] if 0 <= int(i) < len(VOCAB) else "<unk>"  # noqa: E731
    a, b = parse_prompt([to_word(i) for i in prompt_ids])
    return float(_is_correct(a, b, [to_word(i) for i in response_ids]))


def reward(prompt: str, response: str, finished: bool | None = None) -> float:
    """Text-level reward, the reward ``toy`` (``probe.toy.task:reward``).

    Args:
        prompt: the prompt text, ``"3 + 4 ="`` (a leading ``<bos>`` is allowed).
        response: the decoded response: ``"7"`` (special tokens skipped, the default) or ``"7 <eos>"``
            (kept); everything after the first ``<eos>`` (e.g. padding) is ignored.
        finished: True when the response ended with EOS (given by probe to reward functions that take it);
            None or False: only an ``<eos>`` word in the text marks the end.

    Returns:
        1.0 when the answer is exactly the digits of the sum and it ended (an ``<eos>`` word right after the
        digits, or ``finished`` with no ``<eos>`` in the text), else 0.0 (a response cut at ``max_new_tokens``
        earns 0.0).
    """
    a, b = parse_prompt(split_words(prompt))
    return float(_is_correct(a, b, split_words(response), finished))
