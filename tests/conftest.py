"""Shared fixtures: tiny checkpoints built once per session, never downloaded."""
from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


@pytest.fixture(scope="session")
def make_tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Callable[..., Path]:
    """``make_tiny_model(arch, seed=0)`` -> folder of a tiny checkpoint, cached per session."""
    from workers.tools.modelgen import make_model

    built: dict[tuple[str, int], Path] = {}

    def build(arch: str = "llama", seed: int = 0) -> Path:
        key = (arch, seed)
        if key not in built:
            built[key] = make_model(tmp_path_factory.mktemp(f"{arch}-{seed}"), arch, seed=seed, preset="tiny")
        return built[key]

    return build


def have(module: str) -> bool:
    """Whether ``module`` imports; tests that need it skip with the reason otherwise."""
    try:
        __import__(module)
    except ImportError:
        return False
    return True


requires_torch = pytest.mark.skipif(not have("torch"), reason="torch extra not installed")
requires_mlx = pytest.mark.skipif(not have("mlx.core"), reason="mlx extra not installed")
