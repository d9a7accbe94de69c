"""Token sampling shared by every engine.

Engines hand the last position's logits over as a float32 numpy vector and this
module picks the token, as ``SamplingParams`` says. Sampling in one place means
a seeded request gives the same tokens whichever engine (or node) draws each
one: the random stream for step ``i`` depends only on ``(seed, i)``, so the
prefill node can draw token 0 and the decode node tokens 1, 2, ... without
sharing generator state.

This module imports nothing from the engines (``base`` imports it).
"""
from __future__ import annotations

import secrets
from dataclasses import dataclass, field

import numpy as np


@dataclass(frozen=True)
class SamplingParams:
    """How to pick tokens. ``temperature == 0`` means greedy."""

    max_tokens: int = 16
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0  # 0 disables
    seed: int | None = None
    stop_token_ids: tuple[int, ...] = field(default_factory=tuple)

    def __post_init__(self) -> None:
        if self.max_tokens < 1:
            raise ValueError(f"max_tokens must be >= 1, got {self.max_tokens}")
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0, got {self.top_k}")


def sample(logits: np.ndarray, params: SamplingParams, step: int) -> int:
    """Pick the token for generation step ``step`` from ``logits`` [vocab]."""
    if params.temperature == 0.0:
        return int(np.argmax(logits))
    scores = logits.astype(np.float64)
    if not np.isfinite(scores).all():
        # a row that overflowed (fp16) must not fail the batch it runs in: +inf wins, NaN never does
        if np.isposinf(scores).any():
            return int(np.argmax(np.isposinf(scores)))
        scores = np.where(np.isnan(scores), -np.inf, scores)
        if np.isneginf(scores).all():
            return int(np.argmax(logits))
    scores = scores / params.temperature
    scores = _keep_top_k(scores, params.top_k)
    probs = _softmax(scores)
    probs = _keep_top_p(probs, params.top_p)
    rng = np.random.default_rng([_seed_of(params), step])
    return int(rng.choice(probs.shape[0], p=probs))


def _seed_of(params: SamplingParams) -> int:
    return params.seed if params.seed is not None else secrets.randbits(63)


def _keep_top_k(scores: np.ndarray, top_k: int) -> np.ndarray:
    if top_k <= 0 or top_k >= scores.shape[0]:
        return scores
    kth = np.partition(scores, -top_k)[-top_k]
    return np.where(scores >= kth, scores, -np.inf)


def _softmax(scores: np.ndarray) -> np.ndarray:
    shifted = np.exp(scores - np.max(scores))
    return shifted / shifted.sum()


def _keep_top_p(probs: np.ndarray, top_p: float) -> np.ndarray:
    if top_p >= 1.0:
        return probs
    order = np.argsort(-probs, kind="stable")
    cumulative = np.cumsum(probs[order])
    # keep the smallest prefix whose mass reaches top_p (always at least one token)
    num_keep = int(np.searchsorted(cumulative, top_p) + 1)
    kept = np.zeros_like(probs)
    kept[order[:num_keep]] = probs[order[:num_keep]]
    return kept / kept.sum()
