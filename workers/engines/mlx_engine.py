"""The MLX engine: an mlx-lm model on Apple silicon (or mlx[cpu] on Linux).

Prefill is ours. mlx-lm's attention layers write through
``cache.update_and_fetch(keys, values)`` with post-RoPE ``[batch, kv_heads,
tokens, head_dim]`` arrays. ``_StreamingKVCache`` overrides that method: it
evaluates the layer's new K/V at once (MLX is lazy; ``mx.eval`` here forces
exactly the computation up to this layer) and hands it to the caller's sink
before the next layer is even built.

Decode is mlx-lm's continuous batching, ``BatchGenerator``. NOTE on how the
engine drives it:

* ``add`` inserts the request with the prompt ``[first_token]`` over its own
  per-layer cache (merged into the batch's left-padded ``BatchKVCache`` when it
  joins), ``max_tokens - 1`` tokens and its stop ids as one-token stop
  sequences, so that mlx-lm ends a request exactly where ``base.is_last`` does.
* ``step`` first admits the requests added since the last step (their first
  forward, over ``first_token``, without stepping the others: see
  ``_admit_inserted``), then runs one ``next``. mlx-lm pipelines one step
  ahead: ``next`` queues the forward over the token it returns before the
  caller reads it, so every running request gets one token per step.
* A request that leaves (finished, or ``remove``) takes its cache out of the
  batch (``BatchKVCache.extract``). That cache also holds the newest token,
  already fed by the step queued ahead; it is trimmed off, so a cache outside
  the batch always holds the prompt plus the tokens the protocol's steps fed
  (``first_token`` and every token but the newest), as ``add`` expects.
* mlx-lm hands samplers logprobs (logits - logsumexp); ours read the logits
  themselves (``_LogitsTap``), so greedy is numpy's argmax of the float32
  logits exactly and a seeded request draws the same tokens as ``sample`` on
  the prefill node's logits, alone or in any batch. Plain greedy rows share
  one on-device argmax; a row that samples, has penalties, a logit bias or a
  grammar, or wants logprobs draws through its own ``TokenSampler`` on its
  numpy row (the torch engine's code exactly). Its sampler runs one step
  ahead of the token ``step`` returns (the pipelining above), so what each
  draw gave (its logprobs, or the ``GrammarError`` it raised) waits in a
  queue until ``step`` hands out that token. A draw that failed returns the
  model's EOS, a stop token of every constrained request, so that mlx-lm ends
  that request at that token; ``step`` reports the error for it instead of
  the token (``step_errors``) and the rest of the batch never notices.

Sliding-window layers (gpt-oss, gemma3) use mlx-lm's own ``RotatingKVCache``
(``_StreamingRotatingKVCache`` during our prefill), which ``BatchGenerator``
merges into its ``BatchRotatingKVCache``. NOTE on their invariants: a
rotating cache of window ``w`` reports the absolute ``offset`` (tokens seen)
and holds at least the last ``min(offset, w)`` of them, which is what
``BatchRotatingKVCache.merge`` copies into the batch: after our chunked
prefill it holds ``w - 1`` plus the last chunk, in order; ``load_kv`` sets
exactly the ``w`` tokens the wire carries (``state``) at offset ``n``. Both
merge to the same batch rows. A cache extracted from the batch and trimmed by
one token (``_leave``) has its oldest slot stale: only its last
``min(offset, w - 1)`` tokens are real, all the next step reads (the stale
slot is the first one the next token overwrites), so ``cached_layer`` reads
that many.

This is the only module that imports mlx or mlx-lm; load it through
``workers.engines.registry``.
"""
from __future__ import annotations

import collections
import json
import logging
import math
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import mlx.core as mx
import numpy as np
from mlx.utils import tree_flatten
from mlx_lm.generate import BatchGenerator, GenerationBatch, StopSequences
from mlx_lm.models.cache import KVCache, RotatingKVCache, make_prompt_cache
from mlx_lm.utils import _get_classes, load_model

from workers.engines.base import (
    KVLayout,
    KVSlice,
    MeasuredProfile,
    PrefillResult,
    SliceSink,
    check_layout,
    check_prefix,
    check_prefill,
    chunked_prefill,
    is_last,
    join_window,
    run_prefill,
    timed_runs,
)
from workers.engines.grammar import GrammarError, GrammarTokenizer
from workers.engines.memory import host_free_bytes
from workers.engines.model_config import check_tokenizer, read_model_spec
from workers.engines.sampling import SamplingParams, TokenLogprobs, TokenSampler

log = logging.getLogger(__name__)

_MX_DTYPES = {"float32": mx.float32, "float16": mx.float16, "bfloat16": mx.bfloat16}
_WIRE_NAMES = {mx.float32: "float32", mx.float16: "float16", mx.bfloat16: "bfloat16"}
# The step loop bounds the batch (its max_batch); the generator admits whatever was added.
_UNBOUNDED = sys.maxsize

LayerHook = Callable[[int, mx.array, mx.array], None]
Sampler = Callable[[mx.array], mx.array]


class _ReportsWrites:
    """Mixin for an mlx-lm cache layer: after each write, hands the layer's new
    K/V to ``self.hook(layer, keys, values)`` (set by the subclass)."""

    layer: int
    hook: LayerHook | None

    def update_and_fetch(self, keys: mx.array, values: mx.array):
        out = super().update_and_fetch(keys, values)  # type: ignore[misc]
        if self.hook is not None:
            self.hook(self.layer, keys, values)
        return out


class _StreamingKVCache(_ReportsWrites, KVCache):
    """mlx-lm's KVCache, reporting each layer's new K/V as it is written.

    ``BatchKVCache.merge`` copies it into the batch like any ``KVCache``; what
    comes back out (``extract``) is a plain ``KVCache``."""

    def __init__(self, layer: int, hook: LayerHook | None = None) -> None:
        super().__init__()
        self.layer = layer
        self.hook = hook


class _StreamingRotatingKVCache(_ReportsWrites, RotatingKVCache):
    """mlx-lm's RotatingKVCache (a sliding-window layer), reporting each
    layer's new K/V as it is written; merged into the batch and extracted
    like any ``RotatingKVCache``."""

    def __init__(self, layer: int, window: int, hook: LayerHook | None = None) -> None:
        super().__init__(max_size=window, keep=0)
        self.layer = layer
        self.hook = hook


class _LogitsTap:
    """The model as ``BatchGenerator`` calls it, keeping its last forward's
    float32 logits for our samplers, which mlx-lm hands only logprobs.

    A ``GenerationBatch`` step runs one forward, then calls its samplers on the
    rows in batch order: once for all rows when they share one sampler, else
    once per row (mlx-lm 0.32). ``take`` hands the rows out in that order."""

    def __init__(self, model: object) -> None:
        self.model = model
        self.logits: mx.array | None = None  # [rows, vocab] float32
        self._next_row = 0

    def __call__(self, inputs: mx.array, cache: list | None = None, **kwargs: object) -> mx.array:
        out = self.model(inputs, cache=cache, **kwargs)  # [rows, tokens, vocab]
        self.logits = out[:, -1, :].astype(mx.float32)  # [rows, vocab]
        self._next_row = 0
        return out

    def take(self, num_rows: int) -> mx.array:
        """The logits of the next ``num_rows`` rows, ``[num_rows, vocab]``."""
        start, self._next_row = self._next_row, self._next_row + num_rows
        if self.logits is None or self._next_row > self.logits.shape[0]:
            raise RuntimeError("a sampler asked for more logits rows than the last forward made")
        return self.logits[start : self._next_row]


@dataclass
class _Decoding:
    """A request in the generator, from ``add`` until it leaves."""

    uid: int  # the generator's id
    params: SamplingParams
    num_prompt: int  # tokens its cache held at ``add``
    produced: int = 0  # tokens ``step`` gave it
    joined: bool = False  # admitted: its cache is in the batch and holds its newest token too
    # what its own sampler drew for tokens that ``step`` has not handed out yet, oldest first
    drawn: collections.deque[_Drawn] = field(default_factory=collections.deque)


@dataclass(frozen=True)
class _Drawn:
    """One draw of a request's own sampler: its token, with its logprobs when
    asked, or the error that stopped it (then ``token`` is the placeholder EOS)."""

    token: int
    logprobs: TokenLogprobs | None = None
    error: Exception | None = None


class MLXEngine:
    """mlx-lm model behind the ``Engine`` protocol."""

    name = "mlx"

    def __init__(self, model_dir: str | Path, dtype: str | None = None) -> None:
        self.spec = read_model_spec(model_dir)
        check_tokenizer(model_dir)
        self.grammar_tokenizer = GrammarTokenizer(Path(model_dir) / "tokenizer.json", self.spec.eos_token_ids)
        self.model = load_mlx_model(Path(model_dir))
        _check_windows(self.model, self.spec.windows)
        if dtype is not None:
            self.model.set_dtype(_MX_DTYPES[dtype])
        self.dtype = dtype or _weights_dtype(self.model)
        self.device = f"mlx:{mx.default_device()}"
        self._caches: dict[str, list[KVCache] | None] = {}  # None: in the generator (self._decoding)
        self._decoding: dict[str, _Decoding] = {}  # in the order they joined
        self._by_uid: dict[int, str] = {}
        self._tap = _LogitsTap(self.model)
        self._greedy = _greedy_sampler(self._tap)
        self._generator = BatchGenerator(self._tap, sampler=self._greedy, completion_batch_size=_UNBOUNDED,
                                         prefill_batch_size=_UNBOUNDED)
        self._view: tuple[str, list[KVCache]] | None = None  # a running request's cache, extracted this step
        self._logprobs: dict[str, TokenLogprobs] = {}  # the last step's, for the requests that asked
        self._errors: dict[str, Exception] = {}  # the last step's, for the requests it failed alone
        log.info("mlx engine: %s (%s) on %s in %s", model_dir, self.spec.model_type, self.device, self.dtype)

    @property
    def layout_dtype(self) -> str:
        return self.dtype

    def kv_layout(self, num_tokens: int) -> KVLayout:
        return KVLayout(self.spec.num_layers, self.spec.kv_heads, self.spec.head_dim, self.dtype, num_tokens,
                        self.spec.windows)

    # -- prefill and loaded KV ------------------------------------------------

    def prefill(
        self, request_id: str, token_ids: list[int], on_slice: SliceSink, chunk_size: int = 128,
        prefix: list[KVSlice] | None = None, emit_from: int = 0,
    ) -> PrefillResult:
        return run_prefill(self.prefill_chunks(request_id, token_ids, on_slice, chunk_size, prefix, emit_from))

    def prefill_chunks(
        self, request_id: str, token_ids: list[int], on_slice: SliceSink, chunk_size: int = 128,
        prefix: list[KVSlice] | None = None, emit_from: int = 0,
    ) -> Iterator[PrefillResult | None]:
        check_prefill(token_ids, chunk_size, prefix, emit_from, self.spec.num_layers)  # before touching any cache
        self.release(request_id)
        cache = self._caches[request_id] = self._new_cache()
        return chunked_prefill(
            token_ids, on_slice, chunk_size, prefix, emit_from, self.spec.num_layers,
            load_prefix=lambda layers: self._load_layers(cache, layers),
            cached_layer=lambda layer: self.cached_layer(request_id, layer),
            run_chunk=lambda chunk, start, sink: self._prefill_chunk(cache, chunk, start, sink))

    def load_kv(self, request_id: str, layout: KVLayout, slices: list[KVSlice],
                prefix: list[KVSlice] | None = None) -> None:
        check_layout(layout, self.kv_layout(layout.num_tokens))
        num_cached = prefix[0].num_tokens if prefix else 0
        check_prefix(prefix, layout.num_layers, num_cached + layout.num_tokens)
        cache = self._new_cache()
        for layer, layer_cache in enumerate(cache):
            start, keys, values = join_window(slices, layer, layout)
            if prefix and not start:  # a sliding layer received from start > 0 needs none of the prefix
                self._load_layers([layer_cache], [prefix[layer]])
            self._load_window(layer_cache, KVSlice(layer, num_cached + start, keys, values, layout.dtype),
                              num_cached + layout.num_tokens)
        mx.eval([c.keys for c in cache] + [c.values for c in cache])
        self.release(request_id)
        self._caches[request_id] = cache

    # -- the decode batch ----------------------------------------------------

    def add(self, request_id: str, first_token: int, params: SamplingParams, first_step: int = 0,
            history: tuple[int, ...] = ()) -> None:
        if request_id in self._decoding:
            raise ValueError(f"request {request_id!r} is already running")
        cache = self._cache_of(request_id)
        if is_last(first_token, 0, params):
            raise ValueError(f"request {request_id!r} has nothing to generate after its first token")
        drawn: collections.deque[_Drawn] = collections.deque()
        sampler = self._greedy
        if not params.is_plain_greedy:
            own = TokenSampler(params, first_step, (*history, first_token), self.grammar_tokenizer)
            sampler = _row_sampler(self._tap, own, drawn, self.spec.eos_token_ids)
        stops = StopSequences([(token,) for token in params.stop_token_ids])
        (uid,) = self._generator.insert([[first_token]], max_tokens=[params.max_tokens - 1], caches=[cache],
                                        samplers=[sampler], stop_sequences=[stops])
        self._decoding[request_id] = _Decoding(uid, params, num_prompt=cache[-1].offset, drawn=drawn)
        self._by_uid[uid] = request_id
        self._caches[request_id] = None

    def step(self) -> dict[str, int]:
        self._view = None
        if not self._decoding:
            return {}
        stepping = list(self._decoding)
        joining = [decoding for decoding in self._decoding.values() if not decoding.joined]
        if joining:
            _admit_inserted(self._generator)
            for decoding in joining:
                decoding.joined = True
        _, responses = self._generator.next()
        tokens: dict[str, int] = {}
        self._logprobs, self._errors = {}, {}
        for response in responses:
            request_id = self._by_uid[response.uid]
            decoding = self._decoding[request_id]
            decoding.produced += 1
            drawn = _drawn_of(decoding, request_id, response.token) if not decoding.params.is_plain_greedy else None
            if drawn is not None and drawn.error is not None:  # its placeholder EOS ended it in mlx-lm
                self._errors[request_id] = drawn.error
                self._leave(request_id, response.prompt_cache)
                continue
            tokens[request_id] = response.token
            if drawn is not None and drawn.logprobs is not None:
                self._logprobs[request_id] = drawn.logprobs
            if (response.finish_reason is not None) != is_last(response.token, decoding.produced, decoding.params):
                raise RuntimeError(f"mlx-lm and is_last disagree on whether token {decoding.produced} of "
                                   f"{request_id!r} is its last ({response.finish_reason})")
            if response.finish_reason is not None:
                self._leave(request_id, response.prompt_cache)
        if len(tokens) + len(self._errors) != len(responses) or {*tokens, *self._errors} != set(stepping):
            raise RuntimeError("a decode step gave some running request no token, or two")
        return tokens

    def step_logprobs(self) -> dict[str, TokenLogprobs]:
        return dict(self._logprobs)

    def step_errors(self) -> dict[str, Exception]:
        return dict(self._errors)

    def remove(self, request_id: str) -> None:
        decoding = self._decoding.get(request_id)
        if decoding is None:
            return
        self._view = None
        cache, _ = self._generator.remove([decoding.uid], return_prompt_caches=True)[decoding.uid]
        self._leave(request_id, cache)

    def running(self) -> list[str]:
        return list(self._decoding)

    def release(self, request_id: str) -> None:
        self.remove(request_id)
        self._caches.pop(request_id, None)

    # -- what the engine holds -----------------------------------------------

    def cached_requests(self) -> list[str]:
        return list(self._caches)  # one C-level copy under the GIL: a consistent snapshot

    def cached_tokens(self, request_id: str) -> int:
        decoding = self._decoding.get(request_id)
        if decoding is not None:
            return decoding.num_prompt + decoding.produced
        return self._cache_of(request_id)[-1].offset

    def cached_layer(self, request_id: str, layer: int) -> KVSlice:
        """Every token of a full layer; of a sliding layer, the last
        ``min(n, window - 1)`` tokens (all that decoding reads; the module
        docstring says why not the whole window)."""
        num_tokens = self.cached_tokens(request_id)
        cache = self._running_cache(request_id) if request_id in self._decoding else self._cache_of(request_id)
        entry = cache[layer]
        if isinstance(entry, RotatingKVCache):
            # [1, kv_heads, held, head_dim] in time order, ending at token ``entry.offset``
            keys_all, values_all = entry._temporal_order(entry.keys), entry._temporal_order(entry.values)
            end = keys_all.shape[2] - (entry.offset - num_tokens)  # drop a running request's newest token
            start = num_tokens - min(num_tokens, entry.max_size - 1)
            first = end - (num_tokens - start)
        else:
            start, first, end = 0, 0, num_tokens
        # [1, kv_heads, capacity, head_dim] -> [kv_heads, tokens, head_dim]
        keys, values = (np.ascontiguousarray(_to_wire(a[0, :, first:end, :])) for a in (
            (keys_all, values_all) if isinstance(entry, RotatingKVCache) else (entry.keys, entry.values)))
        return KVSlice(layer, start, keys, values, self.dtype)

    def measure_profile(self, budget_s: float) -> MeasuredProfile:
        on_gpu = mx.default_device() == mx.gpu
        n = 2048 if on_gpu else 256  # mlx[cpu] matmuls are slow; keep start-up quick
        a = mx.random.normal((n, n)).astype(_MX_DTYPES[self.dtype])
        b = mx.random.normal((n, n)).astype(_MX_DTYPES[self.dtype])
        mx.eval(a, b)
        runs, seconds = timed_runs(lambda: mx.eval(a @ b), lambda: None, budget_s)
        tflops = 2 * n**3 * runs / seconds / 1e12
        src = mx.zeros((64 << 20 if on_gpu else 16 << 20,), dtype=mx.uint8)
        mx.eval(src)
        runs, seconds = timed_runs(lambda: mx.eval(src + 1), lambda: None, budget_s)
        return MeasuredProfile(tflops=tflops, mem_bw_gbps=2 * src.size * runs / seconds / 1e9)

    def free_memory_bytes(self) -> int:
        # Unified memory on Apple silicon, host RAM with mlx[cpu]: the host figure either way.
        return host_free_bytes()

    def close(self) -> None:
        self._generator.remove([decoding.uid for decoding in self._decoding.values()])
        self._generator.close()
        self._decoding.clear()
        self._by_uid.clear()
        self._caches.clear()
        self._view = self._tap.logits = None
        # Frees this thread's streams and its random key now, while Python runs. Left to
        # the thread's exit, the key's destructor takes the GIL and, if the interpreter is
        # finalizing by then, aborts the process. No MLX call may follow on this thread.
        mx.clear_streams()

    def native_generate(self, token_ids: list[int], num_tokens: int, on_token: Callable[[int], None]) -> None:
        """Generate ``num_tokens`` tokens greedily with mlx-lm's own loop
        (``generate_step``: on-device argmax, ``mx.async_eval`` pipelining) on
        this engine's model, calling ``on_token`` as each comes out. Never
        stops early. The baseline of ``pdc bench decode``; mlx-lm 0.32 API."""
        from mlx_lm.generate import generate_step
        from mlx_lm.sample_utils import make_sampler

        steps = generate_step(mx.array(token_ids), self.model, max_tokens=num_tokens,
                              sampler=make_sampler(temp=0.0), prompt_cache=make_prompt_cache(self.model))
        for token, _ in steps:
            on_token(int(token))

    # -- helpers ---------------------------------------------------------------

    def _prefill_chunk(self, cache: list[KVCache], chunk: list[int], start: int, sink: SliceSink) -> np.ndarray:
        """Run ``chunk`` (tokens from ``start`` on) into ``cache``, emitting each layer's
        slice as it is written: the last position's logits ``[vocab]`` float32."""
        hook = self._slice_hook(start, sink)
        for layer_cache in cache:
            layer_cache.hook = hook
        try:
            logits = self.model(mx.array([chunk]), cache=cache)  # [1, chunk, vocab]
            last = logits[0, -1].astype(mx.float32)  # [vocab]
            mx.eval(last)
        finally:
            for layer_cache in cache:
                layer_cache.hook = None
        return np.asarray(last)

    def _load_layers(self, cache: list[KVCache], slices: list[KVSlice]) -> None:
        """Append one wire slice per layer (``slices[i]`` is ``cache[i]``'s) to ``cache``."""
        for kv_slice, layer_cache in zip(slices, cache, strict=True):
            keys, values = self._to_mx_kv(kv_slice)
            layer_cache.update_and_fetch(keys, values)
        mx.eval([c.keys for c in cache] + [c.values for c in cache])

    def _load_window(self, layer_cache: KVCache, kv_slice: KVSlice, num_tokens: int) -> None:
        """Put ``kv_slice``, the last tokens up to ``num_tokens`` of its layer,
        into ``layer_cache``: appended to a full layer (after what it holds), set
        as a sliding layer's window at offset ``num_tokens``."""
        if not isinstance(layer_cache, RotatingKVCache):
            self._load_layers([layer_cache], [kv_slice])
            return
        keys, values = self._to_mx_kv(kv_slice)
        if layer_cache.keys is not None:  # a prefix before the received tokens: window = its tail + them
            keys = mx.concatenate([layer_cache._temporal_order(layer_cache.keys), keys], axis=2)
            values = mx.concatenate([layer_cache._temporal_order(layer_cache.values), values], axis=2)
        held = min(num_tokens, layer_cache.max_size)
        if keys.shape[2] < held:
            raise ValueError(f"layer {kv_slice.layer}: {keys.shape[2]} tokens do not cover its window of "
                             f"{layer_cache.max_size} at {num_tokens} tokens")
        keys, values = keys[:, :, -held:], values[:, :, -held:]  # [1, kv_heads, held, head_dim]
        layer_cache.state = (keys, values, num_tokens, layer_cache.keep, layer_cache.max_size, held)

    def _to_mx_kv(self, kv_slice: KVSlice) -> tuple[mx.array, mx.array]:
        """A wire slice's keys and values as ``[1, kv_heads, tokens, head_dim]`` in this engine's dtype."""
        want = (self.spec.kv_heads, kv_slice.num_tokens, self.spec.head_dim)
        if kv_slice.keys.shape != want or kv_slice.values.shape != want:
            raise ValueError(f"layer {kv_slice.layer}: KV of shape {kv_slice.keys.shape}, expected {want}")
        # [kv_heads, tokens, head_dim] -> [1, kv_heads, tokens, head_dim]
        return self._to_mx(kv_slice.keys, kv_slice.dtype)[None], self._to_mx(kv_slice.values, kv_slice.dtype)[None]

    def _leave(self, request_id: str, cache: list[KVCache]) -> None:
        """``request_id`` is out of the generator: keep ``cache`` under its id,
        without the newest token that a joined request's cache also holds."""
        decoding = self._decoding.pop(request_id)
        del self._by_uid[decoding.uid]
        if decoding.joined:
            for layer_cache in cache:
                layer_cache.trim(1)
        mx.async_eval([c.keys for c in cache] + [c.values for c in cache])  # lets go of the batch's arrays
        self._caches[request_id] = cache

    def _running_cache(self, request_id: str) -> list[KVCache]:
        """A running request's cache, extracted from the batch once per step."""
        if self._view is None or self._view[0] != request_id:
            uid = self._decoding[request_id].uid
            self._view = (request_id, self._generator.extract_cache([uid])[uid][0])
        return self._view[1]

    def _new_cache(self) -> list[KVCache]:
        windows = self.spec.windows or (0,) * len(self.model.layers)
        return [_StreamingRotatingKVCache(i, window) if window else _StreamingKVCache(i)
                for i, window in enumerate(windows)]

    def _cache_of(self, request_id: str) -> list[KVCache]:
        cache = self._caches.get(request_id)
        if cache is None:
            raise KeyError(f"no KV cache for request {request_id!r}; prefill or load_kv first")
        return cache

    def _slice_hook(self, start: int, on_slice: SliceSink) -> LayerHook:
        def hook(layer: int, keys: mx.array, values: mx.array) -> None:
            mx.eval(keys, values)  # compute this layer now, not at the end of the graph
            # [1, kv_heads, chunk, head_dim] -> [kv_heads, chunk, head_dim]
            on_slice(KVSlice(layer, start, _to_wire(keys[0]), _to_wire(values[0]), self.dtype))

        return hook

    def _to_mx(self, array: np.ndarray, wire_dtype: str) -> mx.array:
        """Wire array -> mx.array in this engine's dtype."""
        tensor = mx.array(array)
        if wire_dtype == "bfloat16":
            tensor = tensor.view(mx.bfloat16)  # uint16 bit patterns
        return tensor.astype(_MX_DTYPES[self.dtype])


def load_mlx_model(model_dir: Path) -> object:
    """mlx-lm 0.32's ``load_model`` for ``model_dir``, plus what it lacks for
    checkpoints that transformers loads:

    * gpt-oss in float: transformers keeps the experts fused
      (``experts.gate_up_proj`` ``[experts, hidden, 2 * intermediate]``, gate
      and up interleaved; ``experts.down_proj`` ``[experts, intermediate,
      hidden]``), where mlx-lm reads MXFP4 blocks or its own split
      ``gate_proj``/``up_proj``/``down_proj`` (``[experts, out, in]``); the
      fused tensors are split and transposed before mlx-lm's ``sanitize``.
    * YaRN RoPE with ``truncate: false`` (gpt-oss's real configs): mlx-lm's
      ``YarnRoPE`` always rounds the correction range to whole dimensions;
      transformers does not when told so. Its frequencies are recomputed
      unrounded (``_untruncated_yarn``), so both engines rotate alike.

    ``load_mlx_model_and_config`` also returns the config as mlx-lm read it."""
    return load_mlx_model_and_config(model_dir)[0]


def _model_classes(config: dict) -> tuple[type, type]:
    """mlx-lm's classes for ``config`` (the one place that uses its private ``_get_classes``),
    gpt-oss's taught to read transformers' fused float experts."""
    model_class, args_class = _get_classes(config)
    if config.get("model_type") != "gpt_oss":
        return model_class, args_class

    class FromTransformers(model_class):
        def sanitize(self, weights: dict) -> dict:
            return super().sanitize(_split_fused_experts(weights))

    return FromTransformers, args_class


def load_mlx_model_and_config(model_dir: Path, lazy: bool = False) -> tuple[object, dict]:
    """``load_mlx_model``, lazily when asked (weights read on first use), with the config
    as mlx-lm's loader read it (``generation_config``'s eos merged in, a checkpoint's
    ``quantization_config`` turned into mlx-lm's ``quantization``)."""
    model, config = load_model(Path(model_dir), lazy=lazy, get_model_classes=_model_classes)
    rope = config.get("rope_scaling") or {}
    if rope.get("rope_type", rope.get("type")) == "yarn" and rope.get("truncate") is False:
        _untruncated_yarn(model, rope, float(config.get("rope_theta", 10000.0)))
    return model, config


def _split_fused_experts(weights: dict[str, mx.array]) -> dict[str, mx.array]:
    """transformers' fused float gpt-oss experts as mlx-lm's split ones (other weights unchanged)."""
    out: dict[str, mx.array] = {}
    for name, value in weights.items():
        if name.endswith("experts.gate_up_proj"):  # [experts, hidden, 2 * inter], gate/up interleaved
            base = name[: -len("gate_up_proj")]
            out[base + "gate_proj.weight"] = mx.contiguous(value[..., ::2].swapaxes(1, 2))  # [experts, inter, hidden]
            out[base + "up_proj.weight"] = mx.contiguous(value[..., 1::2].swapaxes(1, 2))
        elif name.endswith("experts.gate_up_proj_bias"):  # [experts, 2 * inter]
            base = name[: -len("gate_up_proj_bias")]
            out[base + "gate_proj.bias"] = mx.contiguous(value[..., ::2])
            out[base + "up_proj.bias"] = mx.contiguous(value[..., 1::2])
        elif name.endswith("experts.down_proj"):  # [experts, inter, hidden] -> [experts, hidden, inter]
            out[name + ".weight"] = mx.contiguous(value.swapaxes(1, 2))
        elif name.endswith("experts.down_proj_bias"):
            out[name[: -len("_bias")] + ".bias"] = value
        else:
            out[name] = value
    return out


def _untruncated_yarn(model: object, rope: dict, base: float) -> None:
    """Recompute every YaRN RoPE's frequencies of ``model`` without rounding
    the correction range (transformers' ``truncate=False``), by mlx-lm's own
    formula otherwise."""
    from mlx_lm.models.rope_utils import YarnRoPE

    factor = float(rope["factor"])
    original = float(rope.get("original_max_position_embeddings", 4096))
    beta_fast, beta_slow = float(rope.get("beta_fast", 32)), float(rope.get("beta_slow", 1))
    for _, module in model.named_modules():
        if not isinstance(module, YarnRoPE):
            continue
        dims = module.dims

        def correction_dim(num_rotations: float, dims: int = dims) -> float:
            return dims * math.log(original / (num_rotations * 2 * math.pi)) / (2 * math.log(base))

        low, high = max(correction_dim(beta_fast), 0.0), min(correction_dim(beta_slow), dims - 1.0)
        if low == high:
            high += 0.001  # as mlx-lm and transformers do
        ramp = mx.clip((mx.arange(dims // 2, dtype=mx.float32) - low) / (high - low), 0, 1)
        extra = base ** (mx.arange(0, dims, 2, dtype=mx.float32) / dims)
        inter = factor * extra
        mask = 1.0 - ramp
        module._freqs = (inter * extra) / (inter * mask + extra * (1 - mask))


def _check_windows(model: object, windows: tuple[int, ...]) -> None:
    """Raise unless mlx-lm builds this model's cache with the sliding windows
    ``model_config`` reports (the ones on the wire)."""
    built = tuple(c.max_size if isinstance(c, RotatingKVCache) else 0 for c in make_prompt_cache(model))
    if (built if any(built) else ()) != windows:
        raise RuntimeError(f"mlx-lm builds sliding windows {built} for this model, model_config reports "
                           f"{windows}; refusing a model whose windows the two disagree on")


def _admit_inserted(generator: BatchGenerator) -> None:
    """Move every request inserted since the last ``next`` into the decoding
    batch, running its first forward, without stepping the requests already
    decoding. ``BatchGenerator.next`` steps those first and admits after, so a
    joiner's first token would come one step late; this runs ``next`` over an
    empty decoding batch instead, which only admits, then appends what it
    admitted to the real one. The one place that touches mlx-lm 0.32's
    internals (``_generation_batch``, ``_unprocessed_sequences``)."""
    decoding = generator._generation_batch
    generator._generation_batch = GenerationBatch.empty(generator.model, generator.sampler)
    try:
        generator.next()
        if generator._unprocessed_sequences:
            raise RuntimeError("BatchGenerator left inserted requests waiting")
    finally:
        admitted, generator._generation_batch = generator._generation_batch, decoding
    decoding.extend(admitted)


def _greedy_sampler(tap: _LogitsTap) -> Sampler:
    """The batched sampler every greedy request shares: numpy's argmax of each row's logits."""

    def greedy(logprobs: mx.array) -> mx.array:
        return _argmax_like_numpy(tap.take(logprobs.shape[0]))

    return greedy


def _row_sampler(tap: _LogitsTap, sampler: TokenSampler, drawn: collections.deque[_Drawn],
                 eos_token_ids: tuple[int, ...]) -> Sampler:
    """One request's own sampler: ``sampler.draw`` on its row of logits, one
    draw (the next sampling step) per call, each going to the end of
    ``drawn``. A draw whose grammar matcher fails returns the model's first
    EOS instead (a stop token of every constrained request) and queues the error."""

    def draw(mlx_logprobs: mx.array) -> mx.array:
        (row,) = np.asarray(tap.take(mlx_logprobs.shape[0]))  # [1, vocab] float32 -> [vocab]
        try:
            token, logprobs = sampler.draw(row)
            drawn.append(_Drawn(token, logprobs))
        except GrammarError as e:
            token = eos_token_ids[0]
            drawn.append(_Drawn(token, error=e))
        return mx.array([token], dtype=mx.uint32)

    return draw


def _drawn_of(decoding: _Decoding, request_id: str, token: int) -> _Drawn:
    """The oldest draw ``decoding``'s own sampler queued: that of ``token``, which ``step`` hands out now."""
    if not decoding.drawn or decoding.drawn[0].token != token:
        raise RuntimeError(f"request {request_id!r}: its sampler's draws are out of step with its tokens")
    return decoding.drawn.popleft()


def _argmax_like_numpy(logits: mx.array) -> mx.array:
    """``np.argmax(logits, axis=-1)`` on device: each row's first maximal
    index, or its first NaN's when it has one (numpy treats NaN as the maximum)."""
    is_nan = mx.isnan(logits)  # [rows, vocab]
    return mx.where(mx.any(is_nan, axis=-1), mx.argmax(is_nan, axis=-1), mx.argmax(logits, axis=-1))


def _to_wire(array: mx.array) -> np.ndarray:
    """A numpy copy of ``array``; bf16 becomes its uint16 bit patterns."""
    if array.dtype == mx.bfloat16:
        array = array.view(mx.uint16)
    return np.array(array, copy=True)


def _weights_dtype(model: object) -> str:
    """The compute dtype: that of the first floating-point parameter."""
    for _, weight in tree_flatten(model.parameters()):
        if weight.dtype in _WIRE_NAMES:
            return _WIRE_NAMES[weight.dtype]
    return "float32"


def write_quantized(model_dir: str | Path, out_dir: str | Path, bits: int, group_size: int) -> None:
    """mlx-lm's own affine quantization of ``model_dir`` into ``out_dir`` (which
    must not exist): what ``mlx_lm.convert -q --q-bits BITS --q-group-size
    GROUP_SIZE`` writes, run in-process (mlx-lm 0.32 API). Layers whose input
    width is not a multiple of ``group_size`` stay unquantized, as mlx-lm decides.
    ``workers/tools/quantize.py`` drives it; this module is the one that imports mlx-lm.

    The model is read lazily by our loader (``load_mlx_model_and_config``, so a transformers
    gpt-oss checkpoint, whose fused experts mlx-lm's own loader refuses, quantizes too); the
    rest is ``convert``'s own steps on the config mlx-lm read: the checkpoint's dtype,
    ``quantize_model``, ``save``. A checkpoint quantized already (an MXFP4 gpt-oss) is refused."""
    import contextlib

    from mlx.utils import tree_map_with_path
    from mlx_lm.utils import load_tokenizer, quantize_model, save

    model_dir, out_dir = Path(model_dir), Path(out_dir)
    if out_dir.exists():
        raise ValueError(f"cannot write a quantized copy to {out_dir}: it exists")
    native = json.loads((model_dir / "config.json").read_text()).get("quantization_config") or {}
    if native.get("quant_method"):
        raise ValueError(f"{model_dir} is quantized already ({native['quant_method']}); quantize a float checkpoint")
    model, config = load_mlx_model_and_config(model_dir, lazy=True)
    dtype = config.get("torch_dtype") or (config.get("text_config") or {}).get("dtype")
    if dtype in ("float16", "bfloat16", "float32"):  # as convert: floats in the checkpoint's dtype
        target = getattr(mx, dtype)
        keep = getattr(model, "cast_predicate", lambda _: True)
        model.update(tree_map_with_path(
            lambda k, v: v.astype(target) if keep(k) and mx.issubdtype(v.dtype, mx.floating) else v,
            model.parameters()))
    with contextlib.redirect_stdout(sys.stderr):  # its progress lines are not our output
        model, config = quantize_model(model, config, group_size, bits, mode="affine")
        tokenizer = load_tokenizer(model_dir, {}, eos_token_ids=config.get("eos_token_id", None))
        save(out_dir, model_dir, model, tokenizer, config)
