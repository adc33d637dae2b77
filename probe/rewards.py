"""Reward functions: the built-in ones and any callable given by import path.

Every reward is called as ``reward(prompt, response, answer=None, finished=None) -> float`` on text:

* ``prompt``: the prompt text; ``response``: the decoded response. Update batches decode both with
  ``skip_special_tokens=True`` by default (as TRL and verl do), so ``<eos>``, ``<pad>`` ... are not
  in the text (the ``skip_special_tokens`` setting next to ``reward`` keeps them);
* ``answer``: the reference answer of the prompt, when its record has one (the ``answer``
  metadata field of a prompt / rollout record). It is passed only to functions that take an
  ``answer`` parameter (or ``**kwargs``); a function ``f(prompt, response)`` works as is;
* ``finished``: True when the response ended with an EOS token, False when it was cut at
  ``max_new_tokens``. Passed, when known, only to functions that take a ``finished`` parameter
  (or ``**kwargs``).

:func:`resolve_reward` turns a spec into such a callable:

* ``"toy"``: the toy addition task, ``probe.toy.task:reward`` (imported at the first call);
* ``"gsm8k"``: :func:`gsm8k_reward`, 1.0 when the response's final number equals the answer's;
* ``"package.module:function"``: any callable by import path (``module:obj.method`` works too).

A reward must be a finite number: anything else stops the run with an error naming the function.
"""

from __future__ import annotations

import importlib
import inspect
import math
import re
from decimal import Decimal
from typing import Any, Callable

BUILTIN_REWARDS = {"toy": "probe.toy.task:reward", "gsm8k": "probe.rewards:gsm8k_reward"}

__all__ = [
    "BUILTIN_REWARDS",
    "RewardFunction",
    "RewardFunctionError",
    "clip_text",
    "extract_final_number",
    "gsm8k_reward",
    "load_callable",
    "resolve_reward",
]

# --------------------------------------------------------------------------- GSM8K

# A number: optional sign (not when glued to a word, so "3-5" has no "-5"), optional "$",
# digits with optional thousands commas ("1,234,567"), optional decimals; or ".5".
_NUMBER = re.compile(r"(?<![\w.])-?\$?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?|(?<![\w.])-?\$?\.\d+")
_FINAL_MARK = "####"


def _to_decimal(token: str) -> Decimal:
    return Decimal(token.replace("$", "").replace(",", ""))


def extract_final_number(text: str) -> Decimal | None:
    """The final numeric answer of a GSM8K-style text, or None when it has none.

    After the last ``####`` when present (the first number there, as in GSM8K's
    ``"... #### 72"``), else the last number of the text. Commas and ``$`` are dropped
    (``"$1,234.50"`` -> ``Decimal("1234.50")``); a leading ``-`` makes it negative.
    A ``Decimal`` compares exactly: ``Decimal("72.0") == Decimal("72")``.
    """
    if _FINAL_MARK in text:
        found = _NUMBER.search(text.rsplit(_FINAL_MARK, 1)[1])
        return None if found is None else _to_decimal(found.group())
    numbers = _NUMBER.findall(text)
    return _to_decimal(numbers[-1]) if numbers else None


def gsm8k_reward(prompt: str, response: str, answer: str | float | int | None = None) -> float:
    """1.0 when the response's final number equals the reference answer's number, else 0.0.

    Args:
        prompt: the question (unused: the reference comes from ``answer``).
        response: the model's solution; its number after ``####``, else its last number, counts.
            A response with no number earns 0.0.
        answer: the reference, from the prompt record's ``answer`` field: GSM8K's solution text
            ending in ``"#### 72"``, or just the number (``"72"``, ``72``).
    """
    if answer is None:
        raise ValueError(
            "the gsm8k reward needs the reference answer, and none was given. Fix: give every prompt "
            "record an 'answer' field (GSM8K's solution ending in '#### <number>', or just the number)"
        )
    reference = extract_final_number(str(answer))
    if reference is None:
        raise ValueError(
            f"the gsm8k reference answer {str(answer)[-80:]!r} holds no number. "
            "Fix: store the numeric answer (e.g. '#### 72' or '72') in the record's 'answer' field"
        )
    predicted = extract_final_number(response)
    return float(predicted is not None and predicted == reference)


# --------------------------------------------------------------------------- import paths


def load_callable(path: str) -> Callable:
    """The callable named by ``"package.module:function"`` (or ``"package.module:Class.method"``).

    Raises ``ValueError`` saying what is wrong (format, module not found, import failure,
    missing attribute, not callable) and how to fix it.
    """
    module_name, colon, attribute = path.partition(":")
    if not colon or not module_name or not attribute:
        raise ValueError(
            f"reward {path!r} is not an import path. Fix: write 'package.module:function' "
            f"(e.g. 'my_rewards:score'), or use a built-in reward: {', '.join(BUILTIN_REWARDS)}"
        )
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as err:
        if err.name is not None and (module_name == err.name or module_name.startswith(err.name + ".")):
            raise ValueError(
                f"reward {path!r}: module {module_name!r} not found. Fix: check the spelling, install the "
                "package, or add the folder holding it to PYTHONPATH"
            ) from err
        raise ValueError(
            f"reward {path!r}: importing {module_name!r} failed: {err}. Fix: install {err.name!r}"
        ) from err
    except Exception as err:
        raise ValueError(
            f"reward {path!r}: importing {module_name!r} raised {type(err).__name__}: {err}. Fix the module"
        ) from err
    target: Any = module
    for part in attribute.split("."):
        if not hasattr(target, part):
            public = sorted(n for n in dir(module) if not n.startswith("_") and callable(getattr(module, n, None)))
            raise ValueError(
                f"reward {path!r}: {module_name!r} has no attribute {attribute!r}. "
                f"Fix: name one of its callables (found: {', '.join(public[:12]) or 'none'})"
            )
        target = getattr(target, part)
    if not callable(target):
        raise ValueError(
            f"reward {path!r} is not callable (it is of type {type(target).__name__}). "
            "Fix: point to a function reward(prompt: str, response: str) -> float"
        )
    return target


def _takes_keyword(fn: Callable, name: str) -> bool:
    """``fn`` has a parameter ``name`` or ``**kwargs``."""
    try:
        parameters = inspect.signature(fn).parameters.values()
    except (TypeError, ValueError):  # some builtins have no signature
        return False
    return any(p.name == name or p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters)


class RewardFunctionError(RuntimeError):
    """A reward function raised: the message names the function and the sample (the cause is chained)."""


def clip_text(text: str, n: int = 160) -> str:
    """``text``, shortened in the middle to about ``n`` characters for a message."""
    return text if len(text) <= n else text[: n // 2] + " ... " + text[-n // 2 :]


class RewardFunction:
    """A reward callable ``(prompt, response, answer=None, finished=None) -> float`` whose results are checked.

    ``answer`` and ``finished`` reach the function only when it takes them (by name or ``**kwargs``);
    ``finished`` only when it is known (not None).

    Args:
        name: how errors name the function (the spec, e.g. ``"toy"`` or ``"my_rewards:score"``).
        target: the function, or an import path resolved at the first call.
    """

    def __init__(self, name: str, target: Callable | str):
        self.name = name
        self._target = target
        self._fn: Callable | None = None if isinstance(target, str) else target
        self._keywords: tuple[bool, bool] | None = None  # takes (answer, finished)

    @property
    def fn(self) -> Callable:
        """The underlying function (imported now when given by path)."""
        if self._fn is None:
            self._fn = load_callable(self._target)
        return self._fn

    def __call__(self, prompt: str, response: str, answer: Any = None, finished: bool | None = None) -> float:
        fn = self.fn
        if self._keywords is None:
            self._keywords = (_takes_keyword(fn, "answer"), _takes_keyword(fn, "finished"))
        takes_answer, takes_finished = self._keywords
        keywords: dict[str, Any] = {"answer": answer} if takes_answer else {}
        if takes_finished and finished is not None:
            keywords["finished"] = bool(finished)
        try:
            value = fn(prompt, response, **keywords)
        except Exception as e:  # a bug in the user's function: name it and the sample, keep the original cause
            if self.name in BUILTIN_REWARDS:  # the built-in rewards raise messages that name the fix themselves
                raise
            sample = f"prompt {clip_text(prompt)!r}, response {clip_text(response)!r}"
            if answer is not None:
                sample += f", answer {clip_text(str(answer))!r}"
            raise RewardFunctionError(
                f"reward function {self.name!r} raised {type(e).__name__}: {e} on {sample}. Fix: make the function "
                "return a float for every response (e.g. 0.0 for one it cannot score); the traceback above shows "
                "where it failed"
            ) from e
        if isinstance(value, (str, bytes)) or value is None:
            raise TypeError(
                f"reward function {self.name!r} returned {value!r} ({type(value).__name__}) for response "
                f"{response[:80]!r}. Fix: return a float"
            )
        try:
            reward = float(value)
        except (TypeError, ValueError):
            raise TypeError(
                f"reward function {self.name!r} returned a {type(value).__name__}, not a number, for response "
                f"{response[:80]!r}. Fix: return a float"
            ) from None
        if not math.isfinite(reward):
            raise ValueError(
                f"reward function {self.name!r} returned {reward} for response {response[:80]!r}; rewards must "
                "be finite. Fix the function (e.g. return 0.0 for a response it cannot score)"
            )
        return reward

    def __repr__(self) -> str:
        return f"RewardFunction({self.name!r})"


def resolve_reward(spec: str | Callable) -> RewardFunction:
    """The reward function named by ``spec``.

    Args:
        spec: ``"toy"``, ``"gsm8k"``, ``"package.module:function"``, or a callable.

    Returns:
        A :class:`RewardFunction`: call it as ``reward(prompt, response, answer=None, finished=None) -> float``.
    """
    if isinstance(spec, RewardFunction):
        return spec
    if callable(spec):
        name = f"{getattr(spec, '__module__', '?')}:{getattr(spec, '__qualname__', type(spec).__name__)}"
        return RewardFunction(name, spec)
    if not isinstance(spec, str):
        raise TypeError(f"a reward spec must be a str or a callable, got {type(spec).__name__}")
    spec = spec.strip()
    if spec == "toy":
        return RewardFunction("toy", BUILTIN_REWARDS["toy"])  # imported at the first call
    if spec == "gsm8k":
        return RewardFunction("gsm8k", gsm8k_reward)
    if ":" not in spec:
        raise ValueError(
            f"unknown reward {spec!r}. Fix: use a built-in reward ({', '.join(BUILTIN_REWARDS)}) or an import "
            "path 'package.module:function'"
        )
    return RewardFunction(spec, load_callable(spec))
