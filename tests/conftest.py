"""Shared fixtures: a private probe cache for the whole test session and the toy world built once in it."""
from __future__ import annotations

import os
from pathlib import Path

import pytest


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


def pytest_configure(config: pytest.Config) -> None:
    """Tests never talk to W&B's servers and run on one torch thread (tiny models; fast on a busy 2-core box)."""
    os.environ.setdefault("WANDB_MODE", "disabled")
    os.environ.setdefault("WANDB_SILENT", "true")
    import torch

    torch.set_num_threads(1)
