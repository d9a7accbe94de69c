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

Engines are listed in ``workers/engines/registry.py``; this module imports
neither torch nor mlx.
"""
from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Protocol

import numpy as np

from workers.engines.sampling import SamplingParams, sample

# wire dtype name -> numpy dtype used to hold its bytes
WIRE_DTYPES: dict[str, np.dtype] = {
    "float32": np.dtype(np.float32),
    "float16": np.dtype(np.float16),
    "bfloat16": np.dtype(np.uint16),  # bit patterns; no numpy bf16
}
# The compute dtypes an engine accepts are exactly the wire dtypes: KV leaves an
# engine in its compute dtype.
DTYPES: tuple[str, ...] = tuple(WIRE_DTYPES)


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
class PrefillResult:
    """What a prefill leaves behind besides the slices it already emitted."""

    logits: np.ndarray  # [vocab] float32, for the last prompt token
    num_tokens: int
    compute_s: float


@dataclass(frozen=True)
class MeasuredProfile:
    """What a quick start-up measurement found on an engine's device and dtype."""

    tflops: float  # dense matmul, 1e12 FLOP/s
    mem_bw_gbps: float  # copy bandwidth, GB/s (bytes read + written)


SliceSink = Callable[[KVSlice], None]


class Engine(Protocol):
    """A model on one device that can prefill, load KV and decode.

    Every method runs on the engine's own thread (``EngineThread``) unless its
    docstring says it is safe from any thread."""

    name: str  # its key in workers.engines.registry.ENGINES
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

    def step_logits(self, request_id: str, token: int) -> np.ndarray:
        """Feed ``token`` to ``request_id``'s cache and return the new
        last-position logits ``[vocab]`` as float32: one step of
        ``decode_loop``, for callers that sample with their own step index
        (a migrated stream continues at ``first_step``)."""
        ...

    def cached_requests(self) -> list[str]:
        """The request ids whose cache this engine holds now (prefilled or
        loaded, not yet released), oldest first. Safe from any thread: a
        snapshot, which a job running on the engine thread may change at once."""
        ...

    def cached_tokens(self, request_id: str) -> int:
        """Tokens held in the last layer's cache of ``request_id`` (while a
        prefill runs, the last layer lags the layers already emitted).
        ``KeyError`` if the engine holds no cache for it."""
        ...

    def cached_layer(self, request_id: str, layer: int) -> KVSlice:
        """Layer ``layer`` of ``request_id``'s cache, tokens ``[0, cached)``,
        as a wire slice in this engine's dtype: what ``load_kv`` would need to
        rebuild it. ``KeyError`` if the engine holds no cache for it."""
        ...

    def measure_profile(self, budget_s: float) -> MeasuredProfile:
        """Dense matmul TFLOPS and copy bandwidth on this engine's device in its
        compute dtype, each timed for about ``budget_s`` seconds (plus warm-up)."""
        ...

    def free_memory_bytes(self) -> int:
        """Bytes free for KV where this engine keeps it (its accelerator's own
        memory, else the host's), or 0 where the platform does not say. Safe
        from any thread."""
        ...

    def close(self) -> None:
        """Free what the engine holds, including its library's per-thread state;
        the last call on the engine, on its own thread (``EngineThread.shutdown``).
        Afterwards the engine must not compute again."""
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
    token = first_token
    for index in range(1, params.max_tokens):
        if token in params.stop_token_ids:
            return
        token = sample(step(token), params, index)
        yield token


def timed_runs(run_once: Callable[[], object], sync: Callable[[], None], budget_s: float) -> tuple[int, float]:
    """Run ``run_once`` until ``budget_s`` has passed, at least twice, after one
    untimed warm-up; ``sync`` waits for queued device work. Returns (runs, seconds).
    The engines' ``measure_profile`` time their matmul and copy with it."""
    run_once()
    sync()  # warm-up
    runs, started = 0, time.perf_counter()
    while runs < 2 or time.perf_counter() - started < budget_s:
        run_once()
        runs += 1
    sync()
    return runs, time.perf_counter() - started
