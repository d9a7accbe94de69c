"""The one small protocol every engine implements, and the plain types it speaks.

An engine owns one model on one device. It can

* ``prefill`` a prompt in chunks, handing each layer's K/V slice to a callback
  the moment that layer has computed it (not after the forward pass), starting
  from a cached prefix when it is given one (``prefill_chunks`` is the same,
  one chunk per ``next``, so a step loop can interleave it with decode steps);
* ``load_kv`` slices that any engine produced into its own cache;
* decode many requests at once: ``add`` a request whose cache is ready to the
  running batch, call ``step`` for one token of every running request, and
  ``remove`` one at any step boundary (continuous batching). A request leaves
  the batch by itself after the step that produced its last token.

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

from workers.engines.grammar import GrammarTokenizer
from workers.engines.sampling import SamplingParams, TokenLogprobs

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
    """Shape of one request's whole KV cache on the wire.

    ``windows`` (empty: every layer is full attention) gives each layer's
    sliding window in tokens, 0 for a full-attention layer. A layer with
    window ``w`` ships only its last ``w`` tokens, ``[layer_start(layer),
    num_tokens)``: the only ones its attention reads from here on. A full
    layer ships ``[0, num_tokens)``."""

    num_layers: int
    kv_heads: int
    head_dim: int
    dtype: str  # a WIRE_DTYPES key
    num_tokens: int
    windows: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        numpy_dtype(self.dtype)
        for name in ("num_layers", "kv_heads", "head_dim"):
            if getattr(self, name) <= 0:
                raise ValueError(f"KVLayout.{name} must be positive, got {getattr(self, name)}")
        if self.num_tokens < 0:
            raise ValueError(f"KVLayout.num_tokens must be >= 0, got {self.num_tokens}")
        if self.windows:
            object.__setattr__(self, "windows", tuple(self.windows))
            if len(self.windows) != self.num_layers:
                raise ValueError(f"KVLayout.windows has {len(self.windows)} entries for "
                                 f"{self.num_layers} layers")
            bad = [w for w in self.windows if type(w) is not int or w < 0]
            if bad:
                raise ValueError(f"KVLayout.windows must be ints >= 0 (0: full attention), got {bad[0]!r}")
            if not any(self.windows):
                object.__setattr__(self, "windows", ())  # all full: the plain layout

    @property
    def sliding(self) -> bool:
        """Some layer has a sliding window."""
        return bool(self.windows)

    def window(self, layer: int) -> int:
        """Layer ``layer``'s sliding window in tokens; 0 for full attention."""
        return self.windows[layer] if self.windows else 0

    def layer_start(self, layer: int) -> int:
        """The first token of ``layer`` on the wire (0 unless it slides)."""
        window = self.window(layer)
        return max(0, self.num_tokens - window) if window else 0

    def layer_tokens(self, layer: int) -> int:
        """How many tokens of ``layer`` travel: ``num_tokens`` or its window."""
        return self.num_tokens - self.layer_start(layer)

    def with_tokens(self, num_tokens: int) -> KVLayout:
        """The same model's layout for ``num_tokens`` tokens."""
        return KVLayout(self.num_layers, self.kv_heads, self.head_dim, self.dtype, num_tokens, self.windows)

    @property
    def layer_bytes_per_token(self) -> int:
        """K plus V bytes for one token of one layer."""
        return 2 * self.kv_heads * self.head_dim * numpy_dtype(self.dtype).itemsize

    @property
    def bytes_per_token(self) -> int:
        """K plus V bytes for one token across all layers (as if every layer
        kept every token; ``total_bytes`` counts windows)."""
        return self.layer_bytes_per_token * self.num_layers

    @property
    def total_bytes(self) -> int:
        """Bytes of everything that travels: each layer's shipped tokens."""
        if not self.windows:
            return self.bytes_per_token * self.num_tokens
        return self.layer_bytes_per_token * sum(self.layer_tokens(i) for i in range(self.num_layers))

    def clip(self, kv_slice: KVSlice) -> KVSlice | None:
        """The part of ``kv_slice`` that travels under this layout: tokens
        before its layer's window are cut off; None when nothing is left."""
        first = self.layer_start(kv_slice.layer)
        if kv_slice.start >= first:
            return kv_slice
        end = kv_slice.start + kv_slice.num_tokens
        if end <= first:
            return None
        cut = first - kv_slice.start  # one copy each: a token cut of [heads, tokens, dim] is strided
        return KVSlice(kv_slice.layer, first, np.ascontiguousarray(kv_slice.keys[:, cut:]),
                       np.ascontiguousarray(kv_slice.values[:, cut:]), kv_slice.dtype)


@dataclass(frozen=True)
class KVSlice:
    """One layer's K/V for tokens ``[start, start + num_tokens)``.

    ``keys`` and ``values`` are C-contiguous ``[kv_heads, tokens, head_dim]``
    arrays of ``numpy_dtype(dtype)``; keys are post-RoPE. ``checksum``, when
    set, is the xxh3_64 of the key bytes then the value bytes, taken where
    the slice was produced (``slice_digest``), while its bytes were still in
    the CPU's cache; a raw KV frame carries it instead of hashing again.
    """

    layer: int
    start: int
    keys: np.ndarray
    values: np.ndarray
    dtype: str
    checksum: int | None = None

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
    # Its model's tokenizer for llguidance (built on first use, safe from any thread):
    # every TokenSampler of a request with a grammar gets it, on this engine or
    # beside it (the prefill node's first token, a continued stream's).
    grammar_tokenizer: GrammarTokenizer

    @property
    def layout_dtype(self) -> str:
        """Wire dtype of this engine's KV (its compute dtype)."""
        ...

    def kv_layout(self, num_tokens: int) -> KVLayout:
        """The wire layout of a cache holding ``num_tokens`` tokens."""
        ...

    def prefill(
        self, request_id: str, token_ids: list[int], on_slice: SliceSink, chunk_size: int = 128,
        prefix: list[KVSlice] | None = None, emit_from: int = 0,
    ) -> PrefillResult:
        """Run the prompt in chunks; call ``on_slice`` for every layer of every
        chunk as soon as that layer's K/V exists. Keeps the cache under
        ``request_id`` so that the request can ``add`` itself to the batch.

        ``prefix``: one wire slice per layer holding tokens ``[0, p)`` of
        ``token_ids`` (from the prefix cache, ``p < len(token_ids)``): they are
        loaded, not computed, and only ``token_ids[p:]`` runs through the model.
        ``emit_from``: ``on_slice`` sees only tokens ``[emit_from, n)``, the
        prefix's part included, each slice's ``start`` shifted down by
        ``emit_from`` (a decode node that already holds ``emit_from`` tokens is
        sent only the rest, numbered from 0). The same as draining
        ``prefill_chunks`` (``run_prefill``)."""
        ...

    def prefill_chunks(
        self, request_id: str, token_ids: list[int], on_slice: SliceSink, chunk_size: int = 128,
        prefix: list[KVSlice] | None = None, emit_from: int = 0,
    ) -> Iterator[PrefillResult | None]:
        """``prefill`` one chunk per ``next``: yields None after each chunk but
        the last, then the ``PrefillResult`` (whose ``compute_s`` counts only
        the time spent inside the generator). Closing it early leaves a
        partial cache under ``request_id``, which ``release`` drops."""
        ...

    def load_kv(self, request_id: str, layout: KVLayout, slices: list[KVSlice],
                prefix: list[KVSlice] | None = None) -> None:
        """Build this engine's cache for ``request_id`` from wire slices that
        cover every layer and token of ``layout`` exactly once, after
        ``prefix`` (one slice per layer, tokens ``[0, p)``) when given: the
        cache then holds ``p + layout.num_tokens`` tokens."""
        ...

    def add(self, request_id: str, first_token: int, params: SamplingParams, first_step: int = 0,
            history: tuple[int, ...] = ()) -> None:
        """Join the running batch. ``request_id``'s cache (from ``prefill`` or
        ``load_kv``) holds the prompt; ``first_token`` was sampled at sampling
        step ``first_step`` and is not in the cache yet. Each later ``step``
        feeds the request's previous token and samples the next one with
        sampling step ``first_step + 1``, ``first_step + 2``, ... and its own
        ``params`` (temperature, top_p, top_k, seed, penalties, logit bias,
        grammar), through a ``sampling.TokenSampler`` holding
        ``grammar_tokenizer``: a request draws the same tokens alone or in any
        batch. ``history``: the tokens the request generated before
        ``first_token`` (a continued stream's), which the penalties count and a
        grammar's matcher consumes, besides ``first_token`` and every token
        drawn here. ValueError when the grammar or its history is refused. The caller
        adds a request only when it has something to generate
        (``not is_last(first_token, 0, params)``).
        ``KeyError`` without a cache, ``ValueError`` when already running."""
        ...

    def step(self) -> dict[str, int]:
        """One forward pass over every running request: request id -> its next
        token. A request leaves the batch by itself after the step that gave it
        its last token (``is_last``); its cache stays under its id, holding
        ``cached_tokens`` tokens, until ``release``. An empty batch returns ``{}``."""
        ...

    def step_logprobs(self) -> dict[str, TokenLogprobs]:
        """The logprobs of the tokens the last ``step`` gave, for the requests
        whose params ask for them (``SamplingParams.logprobs``): request id ->
        its token's ``TokenLogprobs`` (``sampling.draw``)."""
        ...

    def step_errors(self) -> dict[str, Exception]:
        """The requests the last ``step`` failed alone (a grammar matcher's
        ``GrammarError``): request id -> why. Each got no token from that
        step and left the batch (its cache stays until ``release``); the other
        requests of the batch stepped as usual."""
        ...

    def remove(self, request_id: str) -> None:
        """Leave the batch at this step boundary (a cancel); the cache stays
        until ``release``. A no-op for a request that is not running."""
        ...

    def running(self) -> list[str]:
        """The ids in the batch now, in the order they joined."""
        ...

    def release(self, request_id: str) -> None:
        """Drop the cache for ``request_id``, leaving the batch first if it is
        running; a no-op if there is none."""
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
    for name in ("num_layers", "kv_heads", "head_dim", "windows"):
        if getattr(got, name) != getattr(expected, name):
            raise ValueError(
                f"KV layout mismatch: {name} is {getattr(got, name)} on the wire but "
                f"{getattr(expected, name)} in this engine's model; are both nodes serving the same model?"
            )


def join_layer(slices: list[KVSlice], layer: int, layout: KVLayout) -> tuple[np.ndarray, np.ndarray]:
    """One layer's slices joined in token order: keys and values, each
    ``[kv_heads, tokens, head_dim]``. Raises unless the slices cover the
    layer's tokens on the wire, ``[layout.layer_start(layer), num_tokens)``
    (all of them for a full-attention layer), exactly once."""
    return join_window(slices, layer, layout)[1:]


def join_window(slices: list[KVSlice], layer: int, layout: KVLayout) -> tuple[int, np.ndarray, np.ndarray]:
    """``join_layer`` with the layer's first token: ``(layout.layer_start(layer),
    keys, values)``; nonzero for a sliding layer that received only its window."""
    first = layout.layer_start(layer)
    parts = sorted((s for s in slices if s.layer == layer), key=lambda s: s.start)
    next_start = first
    for part in parts:
        if part.start != next_start:
            raise ValueError(f"layer {layer}: expected a slice at token {next_start}, got one at {part.start}")
        next_start += part.num_tokens
    if next_start != layout.num_tokens:
        raise ValueError(f"layer {layer}: slices cover tokens [{first}, {next_start}) of "
                         f"[{first}, {layout.num_tokens})")
    keys = np.concatenate([p.keys for p in parts], axis=1)  # [kv_heads, tokens, head_dim]
    values = np.concatenate([p.values for p in parts], axis=1)
    return first, keys, values


def is_last(token: int, produced: int, params: SamplingParams) -> bool:
    """Whether ``token``, the ``produced``-th token after a request's first one
    (0: the first token itself), ends the request: a stop token, or the
    ``params.max_tokens``-th token in all."""
    return token in params.stop_token_ids or produced + 1 >= params.max_tokens


def run_prefill(chunks: Iterator[PrefillResult | None]) -> PrefillResult:
    """Drain ``Engine.prefill_chunks``: its final ``PrefillResult``."""
    for result in chunks:
        if result is not None:
            return result
    raise RuntimeError("prefill_chunks ended without a result")


def emitting_from(on_slice: SliceSink, emit_from: int) -> SliceSink:
    """A sink that passes on only tokens ``[emit_from, ...)`` of each slice,
    renumbered so that token ``emit_from`` is token 0 (``Engine.prefill``)."""
    if emit_from == 0:
        return on_slice

    def sink(kv_slice: KVSlice) -> None:
        end = kv_slice.start + kv_slice.num_tokens
        if end <= emit_from:
            return
        skip = max(0, emit_from - kv_slice.start)
        keys, values = kv_slice.keys, kv_slice.values
        if skip:
            keys, values = np.ascontiguousarray(keys[:, skip:]), np.ascontiguousarray(values[:, skip:])
        on_slice(KVSlice(kv_slice.layer, kv_slice.start + skip - emit_from, keys, values, kv_slice.dtype))

    return sink


def check_prefix(prefix: list[KVSlice] | None, num_layers: int, prompt_tokens: int) -> int:
    """The prefix length ``p`` of a prefix-cache hit: one slice per layer, in
    layer order, all ``[0, p)`` with ``0 < p < prompt_tokens``; 0 for None."""
    if not prefix:
        return 0
    if len(prefix) != num_layers or any(s.layer != i for i, s in enumerate(prefix)):
        raise ValueError(f"a prefix needs one slice per layer in order ({num_layers}), got {len(prefix)}")
    p = prefix[0].num_tokens
    if any(s.start != 0 or s.num_tokens != p for s in prefix) or not 0 < p < prompt_tokens:
        raise ValueError(f"a prefix must cover tokens [0, p) of every layer with 0 < p < {prompt_tokens}")
    return p


def check_prefill(token_ids: list[int], chunk_size: int, prefix: list[KVSlice] | None, emit_from: int,
                  num_layers: int) -> int:
    """Validate a prefill's arguments; the cached prefix's length (0 without one)."""
    if not token_ids:
        raise ValueError("prefill needs at least one token")
    if chunk_size < 1 or not 0 <= emit_from <= len(token_ids):
        raise ValueError(f"bad prefill: chunk_size={chunk_size}, emit_from={emit_from} of {len(token_ids)} tokens")
    return check_prefix(prefix, num_layers, len(token_ids))


def chunked_prefill(token_ids: list[int], on_slice: SliceSink, chunk_size: int, prefix: list[KVSlice] | None,
                    emit_from: int, num_layers: int, *, load_prefix: Callable[[list[KVSlice]], None],
                    cached_layer: Callable[[int], KVSlice],
                    run_chunk: Callable[[list[int], int, SliceSink], np.ndarray]) -> Iterator[PrefillResult | None]:
    """The chunk loop of both engines' ``prefill_chunks``, over a cache the
    engine has just registered: load the cached prefix (emitting the part of
    it from ``emit_from`` on), then ``run_chunk(chunk, start, sink)`` for each
    chunk of the rest, which emits each layer's slice and returns the last
    position's logits. Yields None between chunks, then the ``PrefillResult``;
    ``compute_s`` counts only the time spent inside it."""
    num_cached = check_prefill(token_ids, chunk_size, prefix, emit_from, num_layers)
    sink = emitting_from(on_slice, emit_from)

    def chunks() -> Iterator[PrefillResult | None]:
        started = time.perf_counter()
        if num_cached:
            load_prefix(prefix)
            if emit_from < num_cached:
                for layer in range(num_layers):
                    sink(cached_layer(layer))
        compute_s = time.perf_counter() - started
        logits = None
        for start in range(num_cached, len(token_ids), chunk_size):
            if start > num_cached:
                yield None
            started = time.perf_counter()
            logits = run_chunk(token_ids[start : start + chunk_size], start, sink)
            compute_s += time.perf_counter() - started
        yield PrefillResult(logits=logits, num_tokens=len(token_ids), compute_s=compute_s)

    return chunks()


def generate(engine: Engine, request_id: str, first_token: int, params: SamplingParams,
             first_step: int = 0) -> Iterator[int]:
    """One request decoded alone, as an iterator: the tokens after
    ``first_token`` until its last (``is_last``). For tools and tests that
    drive an engine directly; the worker runs every request through its step
    loop (``workers/rpc/loop.py``). Closing the iterator early removes the
    request from the batch; its cache stays until ``release``."""
    if is_last(first_token, 0, params):
        return
    engine.add(request_id, first_token, params, first_step)
    try:
        while request_id in engine.running():
            token = engine.step().get(request_id)
            if token is None:
                raise engine.step_errors().get(request_id) or RuntimeError(
                    f"step() gave no token for running request {request_id!r}")
            yield token
    finally:
        engine.remove(request_id)


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
