"""The one small protocol every engine implements, and the plain types it speaks.

An engine owns one model on one device. It can

* ``prefill`` a prompt in chunks, handing each layer's K/V slice to a callback
  the moment that layer has computed it (not after the forward pass);
* ``load_kv`` slices that any engine produced into its own cache;
* ``decode`` from a loaded (or locally prefilled) cache.

Everything that crosses an engine boundary is numpy in the wire layout
``[kv_heads, tokens, head_dim]``, post-RoPE, batch 1. Each engine converts only
at its own edge. bfloat16 has no numpy dtype, so bf16 arrays travel as their
``uint16`` bit patterns with ``dtype="bfloat16"`` beside them.
"""
from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np

# wire dtype name -> numpy dtype used to hold its bytes
WIRE_DTYPES: dict[str, np.dtype] = {
    "float32": np.dtype(np.float32),
    "float16": np.dtype(np.float16),
    "bfloat16": np.dtype(np.uint16),  # bit patterns; no numpy bf16
}


def numpy_dtype(wire_dtype: str) -> np.dtype:
    """The numpy dtype that holds ``wire_dtype``'s bytes (uint16 for bf16)."""
    try:
        return WIRE_DTYPES[wire_dtype]
    except KeyError:
        raise ValueError(
            f"unsupported KV dtype {wire_dtype!r}; expected one of {sorted(WIRE_DTYPES)}"
        ) from None


@dataclass(frozen=True)
class KVLayout:
    """Shape of one request's whole KV cache on the wire."""

    num_layers: int
    kv_heads: int
    head_dim: int
    dtype: str  # a WIRE_DTYPES key
    num_tokens: int

    def __post_init__(self) -> None:
        numpy_dtype(self.dtype)
        for name in ("num_layers", "kv_heads", "head_dim"):
            if getattr(self, name) <= 0:
                raise ValueError(f"KVLayout.{name} must be positive, got {getattr(self, name)}")
        if self.num_tokens < 0:
            raise ValueError(f"KVLayout.num_tokens must be >= 0, got {self.num_tokens}")

    @property
    def bytes_per_token(self) -> int:
        """K plus V bytes for one token across all layers."""
        return 2 * self.num_layers * self.kv_heads * self.head_dim * numpy_dtype(self.dtype).itemsize

    @property
    def total_bytes(self) -> int:
        return self.bytes_per_token * self.num_tokens


@dataclass(frozen=True)
class KVSlice:
    """One layer's K/V for tokens ``[start, start + num_tokens)``.

    ``keys`` and ``values`` are C-contiguous ``[kv_heads, tokens, head_dim]``
    arrays of ``numpy_dtype(dtype)``; keys are post-RoPE.
    """

    layer: int
    start: int
    keys: np.ndarray
    values: np.ndarray
    dtype: str

    @property
    def num_tokens(self) -> int:
        return int(self.keys.shape[1])

    @property
    def nbytes(self) -> int:
        return int(self.keys.nbytes + self.values.nbytes)


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


@dataclass(frozen=True)
class PrefillResult:
    """What a prefill leaves behind besides the slices it already emitted."""

    logits: np.ndarray  # [vocab] float32, for the last prompt token
    num_tokens: int
    compute_s: float


SliceSink = Callable[[KVSlice], None]


class Engine(Protocol):
    """A model on one device that can prefill, load KV and decode."""

    name: str  # "torch" or "mlx"
    device: str

    @property
    def layout_dtype(self) -> str:
        """Wire dtype of this engine's KV (its compute dtype)."""
        ...

    def kv_layout(self, num_tokens: int) -> KVLayout:
        """The wire layout of a cache holding ``num_tokens`` tokens."""
        ...

    def prefill(
        self, request_id: str, token_ids: list[int], on_slice: SliceSink, chunk_size: int = 128
    ) -> PrefillResult:
        """Run the prompt in chunks; call ``on_slice`` for every layer of every
        chunk as soon as that layer's K/V exists. Keeps the cache under
        ``request_id`` so that ``decode`` can continue from it locally."""
        ...

    def load_kv(self, request_id: str, layout: KVLayout, slices: list[KVSlice]) -> None:
        """Build this engine's cache for ``request_id`` from wire slices that
        cover every layer and token of ``layout`` exactly once."""
        ...

    def decode(
        self, request_id: str, first_token: int, params: SamplingParams
    ) -> Iterator[int]:
        """Yield tokens after ``first_token`` (which is already decided and is
        not yielded again), feeding each back, until a stop token or
        ``params.max_tokens - 1`` more tokens."""
        ...

    def release(self, request_id: str) -> None:
        """Drop the cache for ``request_id``; a no-op if there is none."""
        ...


def check_layout(got: KVLayout, expected: KVLayout) -> None:
    """Raise ``ValueError`` unless an incoming layout fits this engine's model.

    The dtype may differ: the receiving engine casts at its own edge."""
    for name in ("num_layers", "kv_heads", "head_dim"):
        if getattr(got, name) != getattr(expected, name):
            raise ValueError(
                f"KV layout mismatch: {name} is {getattr(got, name)} on the wire but "
                f"{getattr(expected, name)} in this engine's model; are both nodes serving the same model?"
            )


def join_layer(slices: list[KVSlice], layer: int, layout: KVLayout) -> tuple[np.ndarray, np.ndarray]:
    """One layer's slices joined in token order: keys and values, each
    ``[kv_heads, num_tokens, head_dim]``. Raises unless the slices cover
    ``[0, layout.num_tokens)`` exactly once."""
    parts = sorted((s for s in slices if s.layer == layer), key=lambda s: s.start)
    next_start = 0
    for part in parts:
        if part.start != next_start:
            raise ValueError(f"layer {layer}: expected a slice at token {next_start}, got one at {part.start}")
        next_start += part.num_tokens
    if next_start != layout.num_tokens:
        raise ValueError(f"layer {layer}: slices cover {next_start} of {layout.num_tokens} tokens")
    keys = np.concatenate([p.keys for p in parts], axis=1)  # [kv_heads, tokens, head_dim]
    values = np.concatenate([p.values for p in parts], axis=1)
    return keys, values


def decode_loop(
    step: Callable[[int], np.ndarray], first_token: int, params: SamplingParams
) -> Iterator[int]:
    """The decode loop both engines share: feed a token, sample the next.

    ``step(token)`` runs one forward pass on the request's cache and returns the
    new last-position logits ``[vocab]`` as float32. ``first_token`` is not
    yielded; a stop token is yielded and ends the loop; at most
    ``params.max_tokens - 1`` tokens come out."""
    from workers.engines.sampling import sample  # sampling imports this module

    token = first_token
    for index in range(1, params.max_tokens):
        if token in params.stop_token_ids:
            return
        token = sample(step(token), params, index)
        yield token
