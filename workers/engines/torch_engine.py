"""The torch engine: a transformers causal LM on CUDA, MPS or CPU.

Layer-wise streaming comes from ``_StreamingCache``, a ``DynamicCache`` whose
``update`` is called by every attention layer with that layer's freshly
computed (post-RoPE) K/V for the current chunk. The hook copies the chunk to
the host and hands it to the caller's sink before the next layer runs, so the
first layers' KV can be on the wire while later layers still compute.

Each request owns a ``DynamicCache`` (batch 1) from prefill or ``load_kv``.
Running requests decode together in ``_Batch``, one left-padded batched cache
as transformers' batched ``generate`` keeps it (transformers' own continuous
batching owns a paged cache that it prefills itself, so it cannot take KV that
another engine computed). A request's cache moves into the batch when it joins
and back out, without its padding, when it leaves.

Sliding-window layers (gpt-oss, gemma3) are transformers' own
``DynamicSlidingWindowLayer``, which ``DynamicCache(config=...)`` builds from
the model config. NOTE on their invariant: such a layer of a cache holding
``n`` tokens keeps only the last ``min(n, window - 1)`` of them (all the next
token attends to besides itself) while its ``cumulative_length`` says ``n``;
the masks and positions read that length. Wherever this engine builds a cache
from tensors (``load_kv``, a batch joining or leaving) it hands each sliding
layer its window and then sets that length (``_cache_of``). In a left-padded
batch a row's held tokens sit at the right end like every row's tokens, so
padding and the sliding mask compose as in ``generate``.

This is the only module that imports torch or transformers; load it through
``workers.engines.registry``.
"""
from __future__ import annotations

import functools
import inspect
import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM, DynamicCache
from transformers.generation.streamers import BaseStreamer

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

_TORCH_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}

LayerHook = Callable[[int, torch.Tensor, torch.Tensor], None]
LayerKV = tuple[torch.Tensor, torch.Tensor]  # one layer's keys and values, [batch, kv_heads, tokens, head_dim]


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


@dataclass
class _Decoding:
    """A running request's sampling state."""

    sampler: TokenSampler  # its params, the sampling step that drew ``token``, its token counts
    token: int  # the last token drawn; the next step feeds it
    produced: int = 0  # tokens drawn after the first

    @property
    def params(self) -> SamplingParams:
        return self.sampler.params


@dataclass
class _Held:
    """One request whose KV this engine holds."""

    cache: DynamicCache | None  # its own batch-1 cache; None while its KV is a row of the batch
    decoding: _Decoding | None = None  # set while it runs (joining or in the batch)


class _Batch:
    """The running requests' KV as one left-padded batched cache.

    Row ``i`` of every layer's keys/values ``[rows, kv_heads, length, head_dim]``
    holds request ``ids[i]``'s tokens at ``[pads[i], length)`` and zeros before
    them, which the attention mask hides; the smallest pad is 0. The cache is
    rebuilt only when membership changes: a join pads and concatenates, a
    leave cuts its row back out and drops the padding every row shares."""

    def __init__(self, config: object) -> None:
        self.config = config
        self.ids: list[str] = []
        self.pads: list[int] = []
        self.cache: DynamicCache | None = None

    @property
    def length(self) -> int:
        return self.cache.get_seq_length() if self.cache is not None else 0

    def num_tokens(self, request_id: str) -> int:
        return self.length - self.pads[self.ids.index(request_id)]

    def layer(self, request_id: str, layer: int) -> LayerKV:
        """``request_id``'s keys and values in ``layer`` without padding, ``[1, kv_heads, tokens, head_dim]``:
        every token of a full layer, the held window of a sliding one."""
        row, entry = self.ids.index(request_id), self.cache.layers[layer]
        first = _first_held(entry, self.length - self.pads[row])
        return entry.keys[row : row + 1, :, first:], entry.values[row : row + 1, :, first:]

    def join(self, joining: dict[str, DynamicCache]) -> None:
        """Add rows for ``joining`` (request id -> its batch-1 cache), after the rows already here."""
        lengths = [self.length - pad for pad in self.pads] + [c.get_seq_length() for c in joining.values()]
        length = max(lengths)
        sources = ([self.cache] if self.cache is not None else []) + list(joining.values())
        layers: list[LayerKV] = []
        for parts in zip(*(_layers_of(source) for source in sources), strict=True):  # one layer of every source
            held = max(k.shape[-2] for k, _ in parts)  # length, or the longest held window of a sliding layer
            keys = torch.cat([_pad_left(k, held) for k, _ in parts])  # [rows, kv_heads, held, head_dim]
            layers.append((keys, torch.cat([_pad_left(v, held) for _, v in parts])))
        self.cache = _cache_of(self.config, layers, length)
        self.ids += list(joining)
        self.pads = [length - n for n in lengths]

    def leave(self, request_ids: list[str]) -> dict[str, DynamicCache]:
        """Take ``request_ids``' rows out: each one's batch-1 cache, without padding."""
        num_layers = len(self.cache.layers)
        left = {rid: _cache_of(self.config, [self.layer(rid, i) for i in range(num_layers)], self.num_tokens(rid))
                for rid in request_ids}
        keep = [row for row, rid in enumerate(self.ids) if rid not in left]
        if not keep:
            self.ids, self.pads, self.cache = [], [], None
            return left
        length = self.length - min(self.pads[row] for row in keep)
        index = torch.tensor(keep, device=self.cache.layers[0].keys.device)
        layers = [(e.keys[index, :, _first_held(e, length):], e.values[index, :, _first_held(e, length):])
                  for e in self.cache.layers]
        trim = self.length - length
        self.cache = _cache_of(self.config, layers, length)  # [len(keep), kv_heads, length (or held), head_dim]
        self.ids = [self.ids[row] for row in keep]
        self.pads = [self.pads[row] - trim for row in keep]
        return left

    def forward(self, model: torch.nn.Module, tokens: list[int]) -> np.ndarray:
        """Feed ``tokens`` (one per row, in row order): next-token logits ``[rows, vocab]`` float32."""
        device = model.device
        pads = torch.tensor(self.pads, device=device)[:, None]  # [rows, 1]
        ids = torch.tensor(tokens, dtype=torch.long, device=device)[:, None]  # [rows, 1]
        positions = self.length - pads  # [rows, 1]: each row's true length
        mask = (torch.arange(self.length + 1, device=device)[None, :] >= pads).long()  # [rows, length + 1]
        logits = _forward(model, ids, self.cache, attention_mask=mask, position_ids=positions)
        return logits[:, -1].float().cpu().numpy()  # [rows, vocab]


def _refuse_mlx_quantized(model_dir: str | Path) -> None:
    """Refuse mlx-lm-quantized weights (a ``quantization`` block in config.json;
    ``workers/tools/quantize.py``): transformers cannot load them."""
    from workers.engines.model_config import UnsupportedModelError, load_config

    quantization = load_config(model_dir).get("quantization")
    if quantization is not None:
        raise UnsupportedModelError(
            f"{model_dir}: the torch engine cannot load mlx-lm-quantized weights ({quantization}); serve this "
            f"folder with the mlx engine (a quantized decode node) and run torch on the full-precision model")


class TorchEngine:
    """transformers model behind the ``Engine`` protocol."""

    name = "torch"

    def __init__(self, model_dir: str | Path, device: str | None = None, dtype: str | None = None) -> None:
        self.spec = read_model_spec(model_dir)
        _refuse_mlx_quantized(model_dir)
        check_tokenizer(model_dir)
        self.grammar_tokenizer = GrammarTokenizer(Path(model_dir) / "tokenizer.json", self.spec.eos_token_ids)
        self.device = pick_device(device)
        self.dtype = dtype or _default_dtype(self.spec.dtype, self.device)
        self.model = AutoModelForCausalLM.from_pretrained(
            str(model_dir), dtype=_TORCH_DTYPES[self.dtype]
        ).to(self.device)
        self.model.eval()
        check_windows(self.model.config, self.spec.windows)
        self._held: dict[str, _Held] = {}
        self._batch = _Batch(self.model.config)
        self._joining: list[str] = []  # added since the last step, in order; they join at the next one
        self._logprobs: dict[str, TokenLogprobs] = {}  # the last step's, for the requests that asked
        self._errors: dict[str, Exception] = {}  # the last step's, for the requests it failed alone
        log.info("torch engine: %s (%s) on %s in %s", model_dir, self.spec.model_type, self.device, self.dtype)

    @property
    def layout_dtype(self) -> str:
        return self.dtype

    def kv_layout(self, num_tokens: int) -> KVLayout:
        return KVLayout(self.spec.num_layers, self.spec.kv_heads, self.spec.head_dim, self.dtype, num_tokens,
                        self.spec.windows)

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
        cache = _StreamingCache(self.model.config)
        self._held[request_id] = _Held(cache)
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
        layers = [self._loaded_layer(prefix[layer] if prefix else None, layout.dtype,
                                     *join_window(slices, layer, layout)) for layer in range(layout.num_layers)]
        cache = _cache_of(self.model.config, layers, num_cached + layout.num_tokens, _StreamingCache)
        self.release(request_id)
        self._held[request_id] = _Held(cache)

    def add(self, request_id: str, first_token: int, params: SamplingParams, first_step: int = 0,
            history: tuple[int, ...] = ()) -> None:
        held = self._held_of(request_id)
        if held.decoding is not None:
            raise ValueError(f"request {request_id!r} is already running")
        sampler = TokenSampler(params, first_step, (*history, first_token), self.grammar_tokenizer)
        held.decoding = _Decoding(sampler, first_token)
        self._joining.append(request_id)

    @torch.inference_mode()
    def step(self) -> dict[str, int]:
        self._admit_joining()
        self._logprobs, self._errors = {}, {}
        if not self._batch.ids:
            return {}
        rows = [self._held[rid].decoding for rid in self._batch.ids]
        logits = self._batch.forward(self.model, [d.token for d in rows])  # [rows, vocab]
        tokens: dict[str, int] = {}
        for request_id, decoding, row_logits in zip(self._batch.ids, rows, logits, strict=True):
            decoding.produced += 1
            try:
                decoding.token, logprobs = decoding.sampler.draw(row_logits)
            except GrammarError as e:  # this request only: it leaves without a token
                self._errors[request_id] = e
                continue
            tokens[request_id] = decoding.token
            if logprobs is not None:
                self._logprobs[request_id] = logprobs
        self._leave([rid for rid, d in zip(self._batch.ids, rows, strict=True)
                     if rid in self._errors or is_last(d.token, d.produced, d.params)])
        return tokens

    def step_logprobs(self) -> dict[str, TokenLogprobs]:
        return dict(self._logprobs)

    def step_errors(self) -> dict[str, Exception]:
        return dict(self._errors)

    def remove(self, request_id: str) -> None:
        if request_id in self._joining:
            self._joining.remove(request_id)
            self._held[request_id].decoding = None
        elif request_id in self._batch.ids:
            self._leave([request_id])

    def running(self) -> list[str]:
        return self._batch.ids + self._joining

    def release(self, request_id: str) -> None:
        self.remove(request_id)
        self._held.pop(request_id, None)

    def cached_requests(self) -> list[str]:
        return list(self._held)  # one C-level copy under the GIL: a consistent snapshot

    def cached_tokens(self, request_id: str) -> int:
        cache = self._held_of(request_id).cache
        if cache is None:
            return self._batch.num_tokens(request_id)
        return cache.get_seq_length(self.spec.num_layers - 1)

    def cached_layer(self, request_id: str, layer: int) -> KVSlice:
        """Every token of a full layer; of a sliding layer, the last
        ``min(n, window - 1)`` tokens it holds (all that decoding reads)."""
        keys, values = self._layer_of(request_id, layer)
        start = self.cached_tokens(request_id) - keys.shape[-2]
        # [1, kv_heads, tokens, head_dim] -> [kv_heads, tokens, head_dim]
        return KVSlice(layer, start, _to_wire(keys[0]), _to_wire(values[0]), self.dtype)

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
        # torch keeps no per-thread state that needs freeing here
        self._joining.clear()
        self._batch = _Batch(self.model.config)
        self._held.clear()

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
    def _prefill_chunk(self, cache: _StreamingCache, chunk: list[int], start: int, sink: SliceSink) -> np.ndarray:
        """Run ``chunk`` (tokens from ``start`` on) into ``cache``, emitting each layer's
        slice as it is written: the last position's logits ``[vocab]`` float32."""
        cache.hook = self._slice_hook(start, sink)
        try:
            ids = torch.tensor([chunk], dtype=torch.long, device=self.device)  # [1, chunk]
            logits = _forward(self.model, ids, cache, logits_to_keep=1)
        finally:
            cache.hook = None
        return logits[0, -1].float().cpu().numpy()  # [vocab]

    def _admit_joining(self) -> None:
        """Move the requests added since the last step into the batch (one rebuild)."""
        if not self._joining:
            return
        joining = {rid: self._held[rid].cache for rid in self._joining}
        self._batch.join(joining)
        for request_id in self._joining:
            self._held[request_id].cache = None
        self._joining = []

    @torch.inference_mode()
    def _leave(self, request_ids: list[str]) -> None:
        """Take ``request_ids`` out of the batch; each keeps its cache under its id."""
        if not request_ids:
            return
        for request_id, cache in self._batch.leave(request_ids).items():
            self._held[request_id].cache = cache
            self._held[request_id].decoding = None

    def _layer_of(self, request_id: str, layer: int) -> LayerKV:
        """``request_id``'s keys and values in ``layer``, in the batch or not, ``[1, kv_heads, tokens, head_dim]``."""
        cache = self._held_of(request_id).cache
        if cache is None:
            return self._batch.layer(request_id, layer)
        entry = cache.layers[layer]
        return entry.keys, entry.values

    @torch.inference_mode()
    def _loaded_layer(self, prefix: KVSlice | None, wire_dtype: str, start: int, keys: np.ndarray,
                      values: np.ndarray) -> LayerKV:
        """One layer of ``load_kv``: the received tokens (from ``start`` of the
        received part on) after the prefix's, ``[1, kv_heads, tokens, head_dim]``.
        A sliding layer received from ``start`` > 0 needs none of the prefix."""
        parts = [(keys, values, wire_dtype)]
        if prefix is not None and not start:
            parts.insert(0, (prefix.keys, prefix.values, prefix.dtype))
        # [kv_heads, tokens, head_dim] -> [1, kv_heads, tokens, head_dim]
        keys_t = torch.cat([self._to_torch(k, dtype) for k, _, dtype in parts], dim=1)[None]
        return keys_t, torch.cat([self._to_torch(v, dtype) for _, v, dtype in parts], dim=1)[None]

    @torch.inference_mode()
    def _load_layers(self, cache: DynamicCache, slices: list[KVSlice]) -> None:
        """Append one wire slice per layer (``slices[i]`` is layer ``i``) to ``cache``."""
        for kv_slice in slices:
            # [kv_heads, tokens, head_dim] -> [1, kv_heads, tokens, head_dim]
            keys = self._to_torch(kv_slice.keys, kv_slice.dtype)[None]
            cache.update(keys, self._to_torch(kv_slice.values, kv_slice.dtype)[None], kv_slice.layer)

    def _sync(self) -> None:
        """Wait for the work queued on this engine's device."""
        if self.device.startswith("cuda"):
            torch.cuda.synchronize()
        elif self.device == "mps":
            torch.mps.synchronize()

    def _held_of(self, request_id: str) -> _Held:
        try:
            return self._held[request_id]
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


def _forward(model: torch.nn.Module, input_ids: torch.Tensor, cache: DynamicCache, **kwargs: object) -> torch.Tensor:
    """``model``'s logits for ``input_ids`` ``[rows, tokens]``, appending to ``cache``."""
    return model(input_ids=input_ids, use_cache=True, **{_cache_keyword(type(model)): cache}, **kwargs).logits


@functools.cache
def _cache_keyword(model_class: type) -> str:
    """transformers renamed ``forward``'s ``past_key_values`` to ``cache`` during 5.x; the one place that knows."""
    return "cache" if "cache" in inspect.signature(model_class.forward).parameters else "past_key_values"


def _cache_of(config: object, layers: list[LayerKV], num_tokens: int,
              cache_class: type[DynamicCache] = DynamicCache) -> DynamicCache:
    """A cache of ``num_tokens`` tokens holding ``layers`` (keys, values per
    layer, ``[rows, kv_heads, tokens, head_dim]``; copied, so views of another
    cache are safe): all ``num_tokens`` of a full layer, at least the last
    ``min(num_tokens, window - 1)`` of a sliding one, whose length is then set
    to ``num_tokens`` (the invariant in the module docstring)."""
    cache = cache_class(config=config)
    for layer, (keys, values) in enumerate(layers):
        cache.update(keys, values, layer)
        entry = cache.layers[layer]
        if getattr(entry, "is_sliding", False):
            if keys.shape[-2] < min(num_tokens, entry.sliding_window - 1):
                raise ValueError(f"layer {layer}: {keys.shape[-2]} tokens do not cover its window of "
                                 f"{entry.sliding_window} at {num_tokens} tokens")
            entry.cumulative_length = num_tokens
        elif keys.shape[-2] != num_tokens:
            raise ValueError(f"layer {layer}: {keys.shape[-2]} tokens in a full-attention layer of {num_tokens}")
    return cache


def _first_held(entry: object, num_tokens: int) -> int:
    """Where a row of ``num_tokens`` tokens starts in a cache layer's tensors
    (the row's tokens are right-aligned): its padding in a full layer, in a
    sliding one the start of what the row holds of its window."""
    held = entry.keys.shape[-2]
    return held - min(num_tokens, held)


def check_windows(config: object, windows: tuple[int, ...]) -> None:
    """Raise unless transformers builds this model's cache with the sliding
    windows ``model_config`` reports (the ones on the wire)."""
    layers = DynamicCache(config=config).layers
    built = tuple(entry.sliding_window if getattr(entry, "is_sliding", False) else 0 for entry in layers)
    if (built if any(built) else ()) != windows:
        raise RuntimeError(f"transformers builds sliding windows {built} for this model, model_config reports "
                           f"{windows}; refusing a model whose windows the two disagree on")


def _layers_of(cache: DynamicCache) -> list[LayerKV]:
    return [(entry.keys, entry.values) for entry in cache.layers]


def _pad_left(tensor: torch.Tensor, length: int) -> torch.Tensor:
    """``tensor`` ``[rows, kv_heads, tokens, head_dim]`` zero-padded on the left to ``length`` tokens."""
    missing = length - tensor.shape[-2]
    return F.pad(tensor, (0, 0, missing, 0)) if missing else tensor


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
