"""The torch engine: a transformers causal LM on CUDA, MPS or CPU.

Layer-wise streaming comes from ``_StreamingCache``, a ``DynamicCache`` whose
``update`` is called by every attention layer with that layer's freshly
computed (post-RoPE) K/V for the current chunk. The hook copies the chunk to
the host and hands it to the caller's sink before the next layer runs, so the
first layers' KV can be on the wire while later layers still compute.

This is the only module that imports torch or transformers; load it through
``workers.engines.registry``.
"""
from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import torch
from transformers import AutoModelForCausalLM, DynamicCache
from transformers.generation.streamers import BaseStreamer

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

_TORCH_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}

LayerHook = Callable[[int, torch.Tensor, torch.Tensor], None]


def pick_device(requested: str | None = None) -> str:
    """``requested`` if given, else CUDA, then MPS, then CPU."""
    if requested and requested != "auto":
        return requested
    if torch.cuda.is_available():
        return "cuda"
    if torch.backends.mps.is_available():
        return "mps"
    return "cpu"


class _StreamingCache(DynamicCache):
    """A DynamicCache that reports each layer's new K/V as it is written."""

    def __init__(self, config: object, hook: LayerHook | None = None) -> None:
        super().__init__(config=config)
        self.hook = hook

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args, **kwargs):
        out = super().update(key_states, value_states, layer_idx, *args, **kwargs)
        if self.hook is not None:
            self.hook(layer_idx, key_states, value_states)
        return out


class TorchEngine:
    """transformers model behind the ``Engine`` protocol."""

    name = "torch"

    def __init__(self, model_dir: str | Path, device: str | None = None, dtype: str | None = None) -> None:
        self.spec = read_model_spec(model_dir)
        check_tokenizer(model_dir)
        self.device = pick_device(device)
        self.dtype = dtype or _default_dtype(self.spec.dtype, self.device)
        self.model = AutoModelForCausalLM.from_pretrained(
            str(model_dir), dtype=_TORCH_DTYPES[self.dtype]
        ).to(self.device)
        self.model.eval()
        self._caches: dict[str, _StreamingCache] = {}
        log.info("torch engine: %s (%s) on %s in %s", model_dir, self.spec.model_type, self.device, self.dtype)

    @property
    def layout_dtype(self) -> str:
        return self.dtype

    def kv_layout(self, num_tokens: int) -> KVLayout:
        return KVLayout(self.spec.num_layers, self.spec.kv_heads, self.spec.head_dim, self.dtype, num_tokens)

    @torch.inference_mode()
    def prefill(
        self, request_id: str, token_ids: list[int], on_slice: SliceSink, chunk_size: int = 128
    ) -> PrefillResult:
        if not token_ids:
            raise ValueError("prefill needs at least one token")
        started = time.perf_counter()
        cache = _StreamingCache(self.model.config)
        self._caches[request_id] = cache
        logits = None
        for start in range(0, len(token_ids), chunk_size):
            chunk = token_ids[start : start + chunk_size]
            cache.hook = self._slice_hook(start, on_slice)
            ids = torch.tensor([chunk], dtype=torch.long, device=self.device)
            logits = self.model(input_ids=ids, past_key_values=cache, use_cache=True, logits_to_keep=1).logits
        cache.hook = None
        last = logits[0, -1].float().cpu().numpy()  # [vocab]
        return PrefillResult(logits=last, num_tokens=len(token_ids), compute_s=time.perf_counter() - started)

    def load_kv(self, request_id: str, layout: KVLayout, slices: list[KVSlice]) -> None:
        check_layout(layout, self.kv_layout(layout.num_tokens))
        cache = _StreamingCache(self.model.config)
        for layer in range(layout.num_layers):
            keys, values = join_layer(slices, layer, layout)
            # [kv_heads, tokens, head_dim] -> [1, kv_heads, tokens, head_dim]
            keys_t = self._to_torch(keys, layout.dtype)[None]
            cache.update(keys_t, self._to_torch(values, layout.dtype)[None], layer)
        self._caches[request_id] = cache

    def decode(self, request_id: str, first_token: int, params: SamplingParams) -> Iterator[int]:
        cache = self._cache_of(request_id)
        return decode_loop(lambda token: self._step(cache, token), first_token, params)

    def release(self, request_id: str) -> None:
        self._caches.pop(request_id, None)

    def cached_requests(self) -> list[str]:
        return list(self._caches)  # one C-level copy under the GIL: a consistent snapshot

    def cached_tokens(self, request_id: str) -> int:
        return self._cache_of(request_id).get_seq_length(self.spec.num_layers - 1)

    def cached_layer(self, request_id: str, layer: int) -> KVSlice:
        entry = self._cache_of(request_id).layers[layer]
        # [1, kv_heads, tokens, head_dim] -> [kv_heads, tokens, head_dim]
        return KVSlice(layer, 0, _to_wire(entry.keys[0]), _to_wire(entry.values[0]), self.dtype)

    def step_logits(self, request_id: str, token: int) -> np.ndarray:
        """Feed ``token`` to ``request_id``'s cache: the new last-position
        logits ``[vocab]`` as float32 (one ``decode_loop`` step)."""
        return self._step(self._cache_of(request_id), token)

    def measure_profile(self, budget_s: float) -> MeasuredProfile:
        torch_dtype = _TORCH_DTYPES[self.dtype]
        n = 2048 if self.device == "cpu" else 8192
        a = torch.randn(n, n, device=self.device, dtype=torch_dtype)
        b = torch.randn(n, n, device=self.device, dtype=torch_dtype)
        runs, seconds = timed_runs(lambda: torch.matmul(a, b), self._sync, budget_s)
        tflops = 2 * n**3 * runs / seconds / 1e12
        src = torch.empty(64 << 20 if self.device == "cpu" else 512 << 20, dtype=torch.uint8, device=self.device)
        dst = torch.empty_like(src)
        runs, seconds = timed_runs(lambda: dst.copy_(src), self._sync, budget_s)
        return MeasuredProfile(tflops=tflops, mem_bw_gbps=2 * src.numel() * runs / seconds / 1e9)

    def free_memory_bytes(self) -> int:
        return device_free_bytes(self.device)

    def close(self) -> None:
        self._caches.clear()  # torch keeps no per-thread state that needs freeing here

    @torch.inference_mode()
    def native_generate(self, token_ids: list[int], num_tokens: int, on_token: Callable[[int], None]) -> None:
        """Generate ``num_tokens`` tokens greedily with transformers' own
        ``model.generate(do_sample=False)``, calling ``on_token`` as its
        streamer receives each. Never stops early (no EOS). The baseline of
        ``pdc bench decode``; transformers 5.x API."""
        from transformers import GenerationConfig

        # eos_token_id=[] (not None, which generate fills from the checkpoint): run all num_tokens
        config = GenerationConfig(max_new_tokens=num_tokens, min_new_tokens=0, do_sample=False,
                                  eos_token_id=[], pad_token_id=self.model.generation_config.pad_token_id)
        ids = torch.tensor([token_ids], dtype=torch.long, device=self.device)
        self.model.generate(ids, attention_mask=torch.ones_like(ids), generation_config=config,
                            streamer=_TokenStreamer(on_token))

    @torch.inference_mode()
    def _step(self, cache: _StreamingCache, token: int) -> np.ndarray:
        ids = torch.tensor([[token]], dtype=torch.long, device=self.device)
        logits = self.model(input_ids=ids, past_key_values=cache, use_cache=True).logits
        return logits[0, -1].float().cpu().numpy()  # [vocab]

    def _sync(self) -> None:
        """Wait for the work queued on this engine's device."""
        if self.device.startswith("cuda"):
            torch.cuda.synchronize()
        elif self.device == "mps":
            torch.mps.synchronize()

    def _cache_of(self, request_id: str) -> _StreamingCache:
        try:
            return self._caches[request_id]
        except KeyError:
            raise KeyError(f"no KV cache for request {request_id!r}; prefill or load_kv first") from None

    def _slice_hook(self, start: int, on_slice: SliceSink) -> LayerHook:
        def hook(layer: int, keys: torch.Tensor, values: torch.Tensor) -> None:
            # [1, kv_heads, chunk, head_dim] -> [kv_heads, chunk, head_dim]
            on_slice(KVSlice(layer, start, _to_wire(keys[0]), _to_wire(values[0]), self.dtype))

        return hook

    def _to_torch(self, array: np.ndarray, wire_dtype: str) -> torch.Tensor:
        """Wire array -> tensor on this device in this engine's dtype."""
        tensor = torch.from_numpy(np.ascontiguousarray(array))
        if wire_dtype == "bfloat16":
            tensor = tensor.view(torch.int16).view(torch.bfloat16)  # uint16 bit patterns
        return tensor.to(device=self.device, dtype=_TORCH_DTYPES[self.dtype])


class _TokenStreamer(BaseStreamer):
    """A transformers streamer that hands each new token id to ``on_token``
    (``generate`` first puts the prompt, which is skipped)."""

    def __init__(self, on_token: Callable[[int], None]) -> None:
        self.on_token = on_token
        self.seen_prompt = False

    def put(self, value: torch.Tensor) -> None:
        if not self.seen_prompt:
            self.seen_prompt = True
            return
        for token in value.reshape(-1).tolist():  # [1] for batch 1
            self.on_token(int(token))

    def end(self) -> None:
        pass


def device_free_bytes(device: str) -> int:
    """Bytes free for KV on ``device``: a CUDA device's own free memory (the KV
    lives there, not in host RAM), else the host's (``memory.host_free_bytes``).
    Falls back to the host figure when CUDA cannot say (no GPU, no context)."""
    if device.startswith("cuda"):
        try:
            index = torch.device(device).index
            return int(torch.cuda.mem_get_info(index if index is not None else torch.cuda.current_device())[0])
        except Exception:  # no CUDA here, or no context on this thread: the host figure
            pass
    return host_free_bytes()


def _to_wire(tensor: torch.Tensor) -> np.ndarray:
    """A host numpy copy of ``tensor``; bf16 becomes its uint16 bit patterns."""
    tensor = tensor.detach().contiguous().cpu()
    if tensor.dtype == torch.bfloat16:
        return tensor.view(torch.int16).numpy().view(np.uint16)
    return tensor.numpy()


def _default_dtype(checkpoint_dtype: str, device: str) -> str:
    # CPUs run fp16 slowly and without some kernels; compute in fp32 there.
    if device == "cpu" and checkpoint_dtype == "float16":
        return "float32"
    return checkpoint_dtype
