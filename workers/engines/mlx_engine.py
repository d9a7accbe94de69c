"""The MLX engine: an mlx-lm model on Apple silicon (or mlx[cpu] on Linux).

mlx-lm's attention layers write through ``cache.update_and_fetch(keys, values)``
with post-RoPE ``[batch, kv_heads, tokens, head_dim]`` arrays. ``_StreamingKVCache``
overrides that method: it evaluates the layer's new K/V at once (MLX is lazy;
``mx.eval`` here forces exactly the computation up to this layer) and hands it
to the caller's sink before the next layer is even built.

This is the only module that imports mlx or mlx-lm; load it through
``workers.engines.registry``.
"""
from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import mlx.core as mx
import numpy as np
from mlx.utils import tree_flatten
from mlx_lm.models.cache import KVCache
from mlx_lm.utils import load_model

from workers.engines.base import (
    KVLayout,
    KVSlice,
    MeasuredProfile,
    PrefillResult,
    SliceSink,
    check_layout,
    decode_loop,
    join_layer,
    timed_runs,
)
from workers.engines.memory import host_free_bytes
from workers.engines.sampling import SamplingParams
from workers.engines.model_config import check_tokenizer, read_model_spec

log = logging.getLogger(__name__)

_MX_DTYPES = {"float32": mx.float32, "float16": mx.float16, "bfloat16": mx.bfloat16}
_WIRE_NAMES = {mx.float32: "float32", mx.float16: "float16", mx.bfloat16: "bfloat16"}

LayerHook = Callable[[int, mx.array, mx.array], None]


class _StreamingKVCache(KVCache):
    """mlx-lm's KVCache, reporting each layer's new K/V as it is written."""

    def __init__(self, layer: int, hook: LayerHook | None = None) -> None:
        super().__init__()
        self.layer = layer
        self.hook = hook

    def update_and_fetch(self, keys: mx.array, values: mx.array):
        out = super().update_and_fetch(keys, values)
        if self.hook is not None:
            self.hook(self.layer, keys, values)
        return out


def _set_cache_state(cache: KVCache, keys: mx.array, values: mx.array) -> None:
    """Fill ``cache`` with ``[1, kv_heads, tokens, head_dim]`` K/V (mlx-lm 0.32 API)."""
    cache.state = (keys, values, keys.shape[2])


class MLXEngine:
    """mlx-lm model behind the ``Engine`` protocol."""

    name = "mlx"

    def __init__(self, model_dir: str | Path, dtype: str | None = None) -> None:
        self.spec = read_model_spec(model_dir)
        check_tokenizer(model_dir)
        self.model, _ = load_model(Path(model_dir))
        if dtype is not None:
            self.model.set_dtype(_MX_DTYPES[dtype])
        self.dtype = dtype or _weights_dtype(self.model)
        self.device = f"mlx:{mx.default_device()}"
        self._caches: dict[str, list[_StreamingKVCache]] = {}
        log.info("mlx engine: %s (%s) on %s in %s", model_dir, self.spec.model_type, self.device, self.dtype)

    @property
    def layout_dtype(self) -> str:
        return self.dtype

    def kv_layout(self, num_tokens: int) -> KVLayout:
        return KVLayout(self.spec.num_layers, self.spec.kv_heads, self.spec.head_dim, self.dtype, num_tokens)

    def prefill(
        self, request_id: str, token_ids: list[int], on_slice: SliceSink, chunk_size: int = 128
    ) -> PrefillResult:
        if not token_ids:
            raise ValueError("prefill needs at least one token")
        started = time.perf_counter()
        cache = self._new_cache()
        self._caches[request_id] = cache
        logits = None
        for start in range(0, len(token_ids), chunk_size):
            hook = self._slice_hook(start, on_slice)
            for layer_cache in cache:
                layer_cache.hook = hook
            logits = self.model(mx.array([token_ids[start : start + chunk_size]]), cache=cache)
            mx.eval(logits)
        for layer_cache in cache:
            layer_cache.hook = None
        last = _to_numpy(logits[0, -1].astype(mx.float32))  # [vocab]
        return PrefillResult(logits=last, num_tokens=len(token_ids), compute_s=time.perf_counter() - started)

    def load_kv(self, request_id: str, layout: KVLayout, slices: list[KVSlice]) -> None:
        check_layout(layout, self.kv_layout(layout.num_tokens))
        cache = self._new_cache()
        for layer, layer_cache in enumerate(cache):
            keys, values = join_layer(slices, layer, layout)
            # [kv_heads, tokens, head_dim] -> [1, kv_heads, tokens, head_dim]
            keys_mx = self._to_mx(keys, layout.dtype)[None]
            _set_cache_state(layer_cache, keys_mx, self._to_mx(values, layout.dtype)[None])
        mx.eval([c.keys for c in cache] + [c.values for c in cache])
        self._caches[request_id] = cache

    def decode(self, request_id: str, first_token: int, params: SamplingParams) -> Iterator[int]:
        cache = self._cache_of(request_id)
        if params.temperature == 0.0:
            return self._decode_greedy(cache, first_token, params)
        return decode_loop(lambda token: self._step(cache, token), first_token, params)

    def step_logits(self, request_id: str, token: int) -> np.ndarray:
        """Feed ``token`` to ``request_id``'s cache: the new last-position
        logits ``[vocab]`` as float32 (one ``decode_loop`` step)."""
        return self._step(self._cache_of(request_id), token)

    def _step(self, cache: list[_StreamingKVCache], token: int) -> np.ndarray:
        logits = self.model(mx.array([[token]]), cache=cache)
        return _to_numpy(logits[0, -1].astype(mx.float32))  # [vocab]

    def _decode_greedy(self, cache: list[_StreamingKVCache], first_token: int, params: SamplingParams) -> Iterator[int]:
        """``decode_loop`` for greedy requests, as mlx-lm's ``generate_step`` runs it.

        Invariants that keep it token-identical to ``decode_loop`` + ``sample``:
        the argmax is taken on device over the same float32 logits with numpy's
        rules (``_argmax_like_numpy``), and stop tokens and ``max_tokens`` end it
        at the same token. What differs is timing: only the token id crosses to
        the host, and step ``i + 1`` is built on the still-lazy token ``i`` and
        queued (``mx.async_eval``) before token ``i`` is read, so building one
        graph overlaps computing the previous one. A step queued past the last
        token (a stop token, or the caller closing the generator) is trimmed
        from the cache, which then holds what ``decode_loop`` would leave."""

        def step(token: mx.array) -> mx.array:
            logits = self.model(token.reshape(1, 1), cache=cache)  # [1, 1, vocab]
            return _argmax_like_numpy(logits[0, -1].astype(mx.float32))

        if params.max_tokens < 2 or first_token in params.stop_token_ids:
            return
        pending = step(mx.array(first_token))
        mx.async_eval(pending)
        queued_unread = False  # a step fed the last yielded token: the cache holds one token too many
        try:
            for index in range(1, params.max_tokens):
                current = pending
                queued_unread = False
                if index + 1 < params.max_tokens:
                    pending = step(current)
                    mx.async_eval(pending)
                    queued_unread = True
                token = current.item()
                yield token
                if token in params.stop_token_ids:
                    return
        finally:
            if queued_unread:
                for layer_cache in cache:
                    layer_cache.trim(1)

    def release(self, request_id: str) -> None:
        self._caches.pop(request_id, None)

    def cached_requests(self) -> list[str]:
        return list(self._caches)  # one C-level copy under the GIL: a consistent snapshot

    def cached_tokens(self, request_id: str) -> int:
        return self._cache_of(request_id)[-1].offset

    def cached_layer(self, request_id: str, layer: int) -> KVSlice:
        entry = self._cache_of(request_id)[layer]
        # [1, kv_heads, capacity, head_dim]; the first `offset` tokens are filled
        keys, values = (np.ascontiguousarray(_to_wire(a[0, :, : entry.offset, :])) for a in (entry.keys, entry.values))
        return KVSlice(layer, 0, keys, values, self.dtype)

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
        self._caches.clear()
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
        from mlx_lm.models.cache import make_prompt_cache
        from mlx_lm.sample_utils import make_sampler

        steps = generate_step(mx.array(token_ids), self.model, max_tokens=num_tokens,
                              sampler=make_sampler(temp=0.0), prompt_cache=make_prompt_cache(self.model))
        for token, _ in steps:
            on_token(int(token))

    def _new_cache(self) -> list[_StreamingKVCache]:
        return [_StreamingKVCache(i) for i in range(len(self.model.layers))]

    def _cache_of(self, request_id: str) -> list[_StreamingKVCache]:
        try:
            return self._caches[request_id]
        except KeyError:
            raise KeyError(f"no KV cache for request {request_id!r}; prefill or load_kv first") from None

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


def _to_wire(array: mx.array) -> np.ndarray:
    """A numpy copy of ``array``; bf16 becomes its uint16 bit patterns."""
    if array.dtype == mx.bfloat16:
        array = array.view(mx.uint16)
    return np.array(array, copy=True)


def _argmax_like_numpy(logits: mx.array) -> mx.array:
    """``np.argmax(logits)`` on device: the first maximal index, or the first
    NaN's when there is one (numpy treats NaN as the maximum)."""
    is_nan = mx.isnan(logits)  # [vocab]
    return mx.where(mx.any(is_nan), mx.argmax(is_nan), mx.argmax(logits))


def _to_numpy(array: mx.array) -> np.ndarray:
    return np.array(array, copy=False)


def _weights_dtype(model: object) -> str:
    """The compute dtype: that of the first floating-point parameter."""
    for _, weight in tree_flatten(model.parameters()):
        if weight.dtype in _WIRE_NAMES:
            return _WIRE_NAMES[weight.dtype]
    return "float32"
