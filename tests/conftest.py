"""Shared fixtures: a private probe cache, the toy world built once, a tiny-Llama factory, small predict and fit
runs through the CLI, and the enumerated world with a reconstructed AdamW step (tests/enumeration.py)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Callable

import pytest

import support


@pytest.fixture(scope="session", autouse=True)
def probe_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``$PROBE_CACHE`` points at a fresh temporary directory for the whole session (never ~/.cache)."""
    cache = tmp_path_factory.mktemp("probe_cache")
    previous = os.environ.get("PROBE_CACHE")
    os.environ["PROBE_CACHE"] = str(cache)
    yield cache
    if previous is None:
        os.environ.pop("PROBE_CACHE", None)
    else:
        os.environ["PROBE_CACHE"] = previous


@pytest.fixture(scope="session")
def toy_world_dir(probe_cache: Path) -> Path:
    """The default toy world (tiny Llama + tokenizer + optimizer.pt), built once per session in the test cache."""
    from probe.toy.world import build_toy_world

    return build_toy_world(root=probe_cache)


@pytest.fixture(scope="session")
def tiny_llama() -> Callable[..., Any]:
    """A factory of tiny Llama policies: ``tiny_llama(seed, dtype=..., vocab_size=..., ...)`` (tests/support.py)."""
    return support.tiny_llama


@pytest.fixture(scope="session")
def run_predict(toy_world_dir: Path) -> Callable[..., dict]:
    """``run_predict(root, name, *extra, eval_prompts=12, ...)``: a small toy ``predict`` run, in-process; returns
    its summary."""
    from probe.cli import main

    def run(root: Path, name: str, *extra: str, **sizes: int) -> dict:
        main(support.predict_args(root, name, *extra, **sizes))
        return support.read_summary(Path(root) / name)

    return run


@pytest.fixture(scope="session")
def run_fit(toy_world_dir: Path) -> Callable[..., Path]:
    """``run_fit(root, name, *extra)``: ``python -m probe fit`` on the toy GRPO config in-process; its run directory."""
    from probe.cli import main

    def run(root: Path, name: str, *extra: str) -> Path:
        main(support.fit_args(root, name, *extra))
        return Path(root) / name

    return run


@pytest.fixture(scope="session")
def enumerated_step():
    """The enumerated world after two real AdamW steps at lr 1e-2, the reconstructed third step and its U.

    Session-wide and read-only: tests sample E from it with their own seeds and never change the model."""
    from enumeration import world_with_update

    return world_with_update()


def pytest_configure(config: pytest.Config) -> None:
    """Tests never talk to W&B's servers and run on one torch thread (tiny models; fast on a busy 2-core box)."""
    os.environ.setdefault("WANDB_MODE", "disabled")
    os.environ.setdefault("WANDB_SILENT", "true")
    import torch

    torch.set_num_threads(1)
