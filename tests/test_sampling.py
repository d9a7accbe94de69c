"""Sampling is deterministic per (seed, step) and honours every knob."""
from __future__ import annotations

import numpy as np
import pytest

from workers.engines.sampling import SamplingParams, sample


def _logits(seed: int = 0, vocab: int = 200) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=vocab).astype(np.float32)


def test_temperature_zero_is_argmax() -> None:
    logits = _logits()
    assert sample(logits, SamplingParams(temperature=0.0), step=3) == int(np.argmax(logits))


def test_top_k_one_is_argmax_at_any_temperature() -> None:
    logits = _logits(1)
    params = SamplingParams(temperature=5.0, top_k=1, seed=3)
    assert {sample(logits, params, step) for step in range(20)} == {int(np.argmax(logits))}


def test_same_seed_and_step_draw_the_same_token() -> None:
    logits = _logits(2)
    params = SamplingParams(temperature=1.0, seed=42)
    assert [sample(logits, params, s) for s in range(30)] == [sample(logits, params, s) for s in range(30)]


def test_different_steps_draw_from_different_streams() -> None:
    logits = np.zeros(50, dtype=np.float32)  # uniform
    params = SamplingParams(temperature=1.0, seed=42)
    assert len({sample(logits, params, s) for s in range(30)}) > 5


def test_top_k_keeps_only_the_k_best() -> None:
    logits = _logits(3)
    best = set(np.argsort(-logits)[:5].tolist())
    params = SamplingParams(temperature=2.0, top_k=5, seed=1)
    assert {sample(logits, params, s) for s in range(200)} <= best


def test_top_p_keeps_the_smallest_nucleus() -> None:
    logits = np.array([10.0, 9.0, 0.0, 0.0, 0.0], dtype=np.float32)  # ~73% / 27% / tiny
    params = SamplingParams(temperature=1.0, top_p=0.9, seed=5)
    drawn = {sample(logits, params, s) for s in range(300)}
    assert drawn == {0, 1}


@pytest.mark.parametrize(
    "kwargs", [dict(max_tokens=0), dict(temperature=-1.0), dict(top_p=0.0), dict(top_p=1.5), dict(top_k=-1)]
)
def test_bad_sampling_params_are_rejected(kwargs: dict) -> None:
    with pytest.raises(ValueError):
        SamplingParams(**kwargs)
