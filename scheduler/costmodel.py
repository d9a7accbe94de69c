"""Cost model: how long prefill, decode and the KV handoff take on given hardware.

Pure Python over plain dataclasses (no torch, no mlx), read from a model's
Hugging Face ``config.json`` dict. Units: seconds, bytes, FLOPs; GB = 1e9 bytes.

The model is a roofline with efficiency factors (achieved / peak):

* prefill of n new tokens on d cached =
  max(linear FLOPs / (peak x e.compute) + attention FLOPs / (peak x e.attention),
      bytes touched / (bandwidth x e.bandwidth));
  on a node that timed the served model's own prefill at start-up, the two
  FLOP terms are priced at its probed rates instead (``ProbedPrefill``,
  ``with_probe``);
* decode of one token at depth d =
  max(active weight bytes / (bandwidth x e.bandwidth)
      + KV bytes read / (bandwidth x e.kv_bandwidth), FLOPs / (peak x e.compute));
  a step of a continuous batch reads the weights once and every request's KV
  (``decode_step_time``);
* transfer = bytes / link rate + latency, and ``exposed_transfer`` for the part
  that layer-wise streaming does not hide behind prefill;
* ``request_cost``: one request's prefill and handoff with the prefix each
  node holds, in the transfer's KV codec (encoded bytes on the wire, encode
  and decode as stages of the stream: ``transfer_stages``; on a node that
  prefills on its CPU the encode is added to prefill instead), the arithmetic
  the live scheduler and the simulator share; ``auto_codec_cost`` is the
  codec ``--kv-codec auto`` picks (docs/placement.md, "KV codecs").

Efficiencies belong to a (device, engine, weight format) combination: those
fitted from a measured table live in ``CALIBRATED`` and apply to that
combination only; every other combination gets ``GENERIC[weight_format]``.
"""
from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

from cluster.hardware import Hardware  # noqa: F401  (the cost model's machine type)

# Bits stored per weight, scales included.
WEIGHT_BITS: dict[str, float] = {
    "fp32": 32.0,
    "bf16": 16.0,
    "fp16": 16.0,
    # E4M3/E5M2 with one scale per tensor or per 128x128 block: < 0.01 bit extra.
    "fp8": 8.0,
    # Per-output-channel scales: negligible (llama.cpp Q8_0, fp16 scale per 32, is 8.5).
    "int8": 8.0,
    # 32 4-bit weights + one fp16 scale per group: (32*4 + 16) / 32 (llama.cpp Q4_0;
    # GPTQ/AWQ with 128-groups and a 4-bit zero point come to about 4.16).
    "int4": 4.5,
    # OCP Microscaling (MX) v1.0: 32 FP4 E2M1 elements share one 8-bit E8M0 scale.
    "mxfp4": 4.25,
}


@dataclass(frozen=True)
class Link:
    """A network link: nominal line rate, the share of it left for payload, latency."""

    name: str
    gbit_s: float  # nominal line rate, Gb/s
    latency_s: float  # one-way latency of a small message through the OS stack
    payload_efficiency: float = 0.94  # payload / line rate (TCP over 1500-byte Ethernet frames)

    def __post_init__(self) -> None:
        if self.gbit_s <= 0 or self.latency_s < 0 or not 0 < self.payload_efficiency <= 1:
            raise ValueError(f"link {self.name!r}: need gbit_s > 0, latency_s >= 0, 0 < payload_efficiency <= 1")

    @property
    def bytes_per_s(self) -> float:
        return self.gbit_s * 1e9 / 8 * self.payload_efficiency


@dataclass(frozen=True)
class ModelCost:
    """Parameter, FLOP and KV figures of one model, from its config.json.

    Parameters are split so each phase can count what it reads:
    ``layer_params`` is everything in the decoder layers except routed experts
    (attention, norms, routers, dense and shared MLPs) plus the final norm.
    """

    name: str
    num_layers: int
    hidden_size: int
    embedding_params: int  # input token table: one row read per token
    unembedding_params: int  # lm_head (the same matrix when tied)
    tied_embeddings: bool
    layer_params: int
    expert_params: int  # one routed expert; 0 for a dense model
    num_experts: int  # routed experts per MoE layer
    experts_per_token: int
    num_moe_layers: int
    attn_flops_per_pair: int  # per layer, per (query, key) pair: QK^T and PV
    kv_elems_per_token: int  # per layer, per token: 2*kv_heads*head_dim, or MLA latent + rope key
    layer_windows: tuple[int | None, ...]  # per layer: None = full attention, else sliding window
    dense_format: str = "bf16"  # everything but the routed experts
    expert_format: str = "bf16"
    # The wire shape of one layer's K/V ([kv_heads, tokens, head_dim] each), which
    # the compressed codecs' scales depend on; 0 when the cache is not per-head
    # K/V (MLA latents), which only ``raw`` can carry.
    kv_heads: int = 0
    head_dim: int = 0

    def __post_init__(self) -> None:
        for fmt in (self.dense_format, self.expert_format):
            _check_format(fmt)
        if len(self.layer_windows) != self.num_layers:
            raise ValueError(f"{self.name}: {len(self.layer_windows)} layer windows for {self.num_layers} layers")

    @property
    def weight_format(self) -> str:
        """The format of the bulk of the weights: it keys the efficiency lookup."""
        return self.expert_format if self.num_moe_layers else self.dense_format

    @property
    def _untied_unembedding(self) -> int:
        return 0 if self.tied_embeddings else self.unembedding_params

    @property
    def total_params(self) -> int:
        experts = self.num_moe_layers * self.num_experts * self.expert_params
        return self.embedding_params + self._untied_unembedding + self.layer_params + experts

    @property
    def active_params(self) -> int:
        """Parameters one token uses, embedding table included (Qwen's model-card
        convention; OpenAI's gpt-oss "active" figure leaves the embedding out)."""
        experts = self.num_moe_layers * self.experts_per_token * self.expert_params
        return self.embedding_params + self._untied_unembedding + self.layer_params + experts

    @property
    def layer_active_params(self) -> int:
        """Decoder-layer parameters one token multiplies by: 2 FLOPs each."""
        return self.layer_params + self.num_moe_layers * self.experts_per_token * self.expert_params

    @property
    def total_weight_bytes(self) -> float:
        dense = self.embedding_params + self._untied_unembedding + self.layer_params
        experts = self.num_moe_layers * self.num_experts * self.expert_params
        return dense * _bytes(self.dense_format) + experts * _bytes(self.expert_format)

    @property
    def decode_weight_bytes(self) -> float:
        """Weight bytes one decode step reads: active layers plus lm_head."""
        dense = (self.layer_params + self.unembedding_params) * _bytes(self.dense_format)
        experts = self.num_moe_layers * self.experts_per_token * self.expert_params
        return dense + experts * _bytes(self.expert_format)

    def expected_experts_touched(self, num_tokens: int) -> float:
        """Distinct experts per MoE layer that num_tokens tokens route to, with
        uniform independent routing: E * (1 - (1 - k/E)^n)."""
        if not self.num_experts:
            return 0.0
        return self.num_experts * (1 - (1 - self.experts_per_token / self.num_experts) ** num_tokens)


def _check_format(fmt: str) -> None:
    if fmt not in WEIGHT_BITS:
        raise ValueError(f"unknown weight format {fmt!r}; known: {', '.join(WEIGHT_BITS)}")


def _bytes(fmt: str) -> float:
    return WEIGHT_BITS[fmt] / 8


# --------------------------------------------------------------- config.json -> ModelCost


def model_cost(
    config: Mapping[str, Any],
    name: str | None = None,
    *,
    dense_format: str | None = None,
    expert_format: str | None = None,
) -> ModelCost:
    """Build the ModelCost of a Hugging Face ``config.json`` dict.

    Handles dense and MoE (Mixtral/Qwen/gpt-oss/DeepSeek keys), GQA, MLA,
    sliding-window layers and gpt-oss attention sinks. Formats default to the
    checkpoint's native ones (``quantization_config``, else ``torch_dtype``).
    """
    config = _text_config(config)
    hidden = int(_need(config, "hidden_size"))
    num_layers = int(_need(config, "num_hidden_layers"))
    vocab = int(_need(config, "vocab_size"))
    attn_params, flops_per_pair, kv_elems = _attention_shape(config, hidden)
    moe_layers = _moe_layers(config, num_layers)
    num_experts = _num_experts(config)
    k = int(config.get("num_experts_per_tok") or config.get("experts_per_token") or 0)
    expert = _expert_params(config, hidden) if num_experts else 0
    dense_mlp = 3 * hidden * int(config.get("intermediate_size") or 0) + _mlp_bias(config, hidden)
    moe_extra = _router_params(config, hidden, num_experts) + _shared_expert_params(config, hidden)
    num_moe = sum(moe_layers)
    layer = num_layers * (attn_params + 2 * hidden) + hidden
    layer += num_moe * moe_extra + (num_layers - num_moe) * dense_mlp
    native_dense, native_expert = _native_formats(config)
    return ModelCost(
        name=name or str(config.get("_name_or_path") or config.get("model_type") or "model"),
        num_layers=num_layers,
        hidden_size=hidden,
        embedding_params=vocab * hidden,
        unembedding_params=vocab * hidden,
        tied_embeddings=bool(config.get("tie_word_embeddings", False)),
        layer_params=layer,
        expert_params=expert,
        num_experts=num_experts if num_moe else 0,
        experts_per_token=k if num_moe else 0,
        num_moe_layers=num_moe,
        attn_flops_per_pair=flops_per_pair,
        kv_elems_per_token=kv_elems,
        layer_windows=_layer_windows(config, num_layers),
        dense_format=dense_format or native_dense,
        expert_format=expert_format or native_expert,
        kv_heads=0 if config.get("kv_lora_rank") else kv_elems // (2 * _head_dim(config, hidden)),
        head_dim=0 if config.get("kv_lora_rank") else _head_dim(config, hidden),
    )


def _text_config(config: Mapping[str, Any]) -> Mapping[str, Any]:
    """The language model's own config: multimodal checkpoints (Gemma 3 4B and
    up, ``Gemma3ForConditionalGeneration``) nest it under ``text_config``, whose
    keys win over the wrapper's."""
    text = config.get("text_config")
    if isinstance(text, Mapping) and "hidden_size" not in config:
        return {**{k: v for k, v in config.items() if k != "text_config"}, **text}
    return config


def _head_dim(config: Mapping[str, Any], hidden: int) -> int:
    return int(config.get("head_dim") or hidden // int(_need(config, "num_attention_heads")))


def _need(config: Mapping[str, Any], key: str) -> Any:
    if config.get(key) is None:
        raise ValueError(f"config.json lacks {key!r}, which the cost model needs")
    return config[key]


def _attention_shape(config: Mapping[str, Any], hidden: int) -> tuple[int, int, int]:
    """(params per layer, FLOPs per (query, key) pair per layer, KV elements per token per layer)."""
    heads = int(_need(config, "num_attention_heads"))
    if config.get("kv_lora_rank"):  # MLA (DeepSeek-V2/V3): the cache holds the latent + rope key
        rank, rope = int(config["kv_lora_rank"]), int(config["qk_rope_head_dim"])
        nope, v_dim = int(config["qk_nope_head_dim"]), int(config["v_head_dim"])
        q_rank = int(config.get("q_lora_rank") or 0)
        q = hidden * q_rank + q_rank + q_rank * heads * (nope + rope) if q_rank else hidden * heads * (nope + rope)
        kv = hidden * (rank + rope) + rank + rank * heads * (nope + v_dim)
        params = q + kv + heads * v_dim * hidden
        return params, 2 * heads * (nope + rope) + 2 * heads * v_dim, rank + rope
    head_dim = _head_dim(config, hidden)
    kv_heads = int(config.get("num_key_value_heads") or heads)
    q_dim, kv_dim = heads * head_dim, kv_heads * head_dim
    params = hidden * (q_dim + 2 * kv_dim) + q_dim * hidden
    model_type = str(config.get("model_type", ""))
    if config.get("attention_bias"):
        params += q_dim + 2 * kv_dim + hidden
    elif model_type.startswith("qwen2"):  # q/k/v biases are hard-wired in Qwen2
        params += q_dim + 2 * kv_dim
    if model_type.startswith("qwen3"):  # per-head q_norm and k_norm
        params += 2 * head_dim
    if model_type == "gpt_oss":  # one learned sink logit per head
        params += heads
    return params, 4 * q_dim, 2 * kv_dim


def _num_experts(config: Mapping[str, Any]) -> int:
    for key in ("num_local_experts", "num_experts", "n_routed_experts"):
        if config.get(key):
            return int(config[key])
    return 0


def _moe_layers(config: Mapping[str, Any], num_layers: int) -> list[bool]:
    if not _num_experts(config):
        return [False] * num_layers
    first_dense = int(config.get("first_k_dense_replace") or 0)  # DeepSeek
    freq = int(config.get("moe_layer_freq") or 1)
    step = int(config.get("decoder_sparse_step") or 1)  # Qwen MoE
    dense_only = set(config.get("mlp_only_layers") or ())
    return [
        i >= first_dense and i % freq == 0 and (i + 1) % step == 0 and i not in dense_only
        for i in range(num_layers)
    ]


def _expert_params(config: Mapping[str, Any], hidden: int) -> int:
    inter = int(config.get("moe_intermediate_size") or _need(config, "intermediate_size"))
    params = 3 * hidden * inter  # gate, up, down
    if config.get("model_type") == "gpt_oss":  # gate_up and down biases
        params += 2 * inter + hidden
    return params


def _router_params(config: Mapping[str, Any], hidden: int, num_experts: int) -> int:
    bias = num_experts if config.get("model_type") in ("gpt_oss", "deepseek_v3") else 0
    return hidden * num_experts + bias


def _shared_expert_params(config: Mapping[str, Any], hidden: int) -> int:
    if config.get("n_shared_experts"):  # DeepSeek
        return int(config["n_shared_experts"]) * 3 * hidden * int(config["moe_intermediate_size"])
    if config.get("shared_expert_intermediate_size"):  # Qwen2-MoE, with a sigmoid gate
        return 3 * hidden * int(config["shared_expert_intermediate_size"]) + hidden
    return 0


def _mlp_bias(config: Mapping[str, Any], hidden: int) -> int:
    return 2 * int(config.get("intermediate_size") or 0) + hidden if config.get("mlp_bias") else 0


def layer_windows(config: Mapping[str, Any], num_layers: int) -> tuple[int | None, ...]:
    """Each layer's sliding window (None: full attention) of a config.json
    (its ``text_config`` when it nests one); see ``_layer_windows``."""
    return _layer_windows(config.get("text_config") or config, num_layers)


def _layer_windows(config: Mapping[str, Any], num_layers: int) -> tuple[int | None, ...]:
    """Each layer's sliding window (None: full attention), from, in order:
    ``layer_types`` ("sliding_attention" / "full_attention": gpt-oss, Gemma 3,
    newer Gemma 2 and Qwen configs); Gemma 3's ``sliding_window_pattern``
    (every pattern-th layer global); Gemma 2's fixed alternation (even layers
    slide, odd ones are global, as transformers' ``Gemma2DecoderLayer``);
    Qwen2's ``max_window_layers``; else every layer slides (Mistral)."""
    window = config.get("sliding_window")
    if config.get("layer_types"):
        types = list(config["layer_types"])
        if len(types) != num_layers:
            raise ValueError(f"layer_types has {len(types)} entries for {num_layers} layers")
        return tuple(int(window) if t == "sliding_attention" and window else None for t in types)
    if not window or config.get("use_sliding_window") is False:
        return (None,) * num_layers
    window = int(window)
    if config.get("sliding_window_pattern"):  # Gemma 3: every pattern-th layer is global
        pattern = int(config["sliding_window_pattern"])
        return tuple(None if (i + 1) % pattern == 0 else window for i in range(num_layers))
    if config.get("model_type") == "gemma2":  # no key says it: layer i slides when i is even
        return tuple(window if i % 2 == 0 else None for i in range(num_layers))
    if config.get("use_sliding_window") and config.get("max_window_layers") is not None:  # Qwen2
        first = int(config["max_window_layers"])
        return tuple(window if i >= first else None for i in range(num_layers))
    return (window,) * num_layers  # Mistral-style: every layer slides


def _native_formats(config: Mapping[str, Any]) -> tuple[str, str]:
    """(dense format, expert format) of the checkpoint as published."""
    method = (config.get("quantization_config") or {}).get("quant_method")
    if method == "mxfp4":  # gpt-oss: experts in MXFP4, attention/router/embeddings in bf16
        return "bf16", "mxfp4"
    if method == "fp8":
        return "fp8", "fp8"
    dtype = str(config.get("torch_dtype") or config.get("dtype") or "bfloat16")
    fmt = {"float16": "fp16", "float32": "fp32"}.get(dtype, "bf16")
    return fmt, fmt


# --------------------------------------------------------------- KV and attention


def _tokens_held(num_tokens: int, window: int | None) -> int:
    return num_tokens if window is None else min(num_tokens, window)


def kv_bytes_per_layer(model: ModelCost, num_tokens: int, dtype_bytes: float = 2.0) -> list[float]:
    """KV bytes each layer holds for a context of num_tokens: a sliding layer
    holds at most its window."""
    per_token = model.kv_elems_per_token * dtype_bytes
    return [_tokens_held(num_tokens, w) * per_token for w in model.layer_windows]


def kv_bytes(model: ModelCost, num_tokens: int, dtype_bytes: float = 2.0) -> float:
    """KV bytes a context of num_tokens holds, all layers."""
    return sum(kv_bytes_per_layer(model, num_tokens, dtype_bytes))


def kv_bytes_per_token(model: ModelCost, num_tokens: int = 1, dtype_bytes: float = 2.0) -> float:
    """Mean KV bytes per token at context num_tokens (falls with depth past a window)."""
    if num_tokens < 1:
        raise ValueError(f"num_tokens must be >= 1, got {num_tokens}")
    return kv_bytes(model, num_tokens, dtype_bytes) / num_tokens


def _pairs_upto(num_tokens: int, window: int | None) -> int:
    """Causal (query, key) pairs among the first num_tokens positions."""
    if window is None or num_tokens <= window:
        return num_tokens * (num_tokens + 1) // 2
    return window * (window + 1) // 2 + (num_tokens - window) * window


def attention_flops(model: ModelCost, num_new: int, num_cached: int = 0) -> float:
    """FLOPs of QK^T and PV for num_new tokens attending causally to
    num_cached + themselves; the term that grows with context."""
    pairs = sum(
        _pairs_upto(num_cached + num_new, w) - _pairs_upto(num_cached, w) for w in model.layer_windows
    )
    return float(pairs * model.attn_flops_per_pair)


def linear_flops(model: ModelCost, num_new: int) -> float:
    """FLOPs of the weight matmuls: 2 per active parameter per token, and the
    lm_head for the last token only (engines skip the other prompt logits)."""
    return 2.0 * (num_new * model.layer_active_params + model.unembedding_params)


# --------------------------------------------------------------- KV codecs on the wire

KV_DTYPE_BYTES: dict[str, int] = {"float32": 4, "float16": 2, "bfloat16": 2}
KV_DTYPE = "bfloat16"  # the wire dtype the cost model prices KV in by default (the catalog's models compute in bf16)


def kv_dtype_of(config: Mapping[str, Any] | None, engine_dtype: str = "") -> str:
    """The dtype a model's KV crosses the link in: the serving engine's (``ModelInfo.dtype``) when
    known, else the checkpoint's (``torch_dtype`` / ``dtype``, also under ``text_config``), else
    ``KV_DTYPE``; one the codecs do not know (an 8-bit cache) is priced as ``KV_DTYPE``."""
    candidates = [engine_dtype]
    for scope in (config or {}, (config or {}).get("text_config") or {}):
        candidates += [scope.get("torch_dtype"), scope.get("dtype")]
    return next((d for d in candidates if isinstance(d, str) and d in KV_DTYPE_BYTES), KV_DTYPE)


@dataclass(frozen=True)
class CodecSpeed:
    """What one codec costs per GB (1e9 bytes) of *raw* KV of one wire dtype:
    encoding on the prefill node's sender thread, decoding on the decode node's
    receiver as each frame lands."""

    encode_s_per_gb: float
    decode_s_per_gb: float

    @property
    def slowest_s_per_byte(self) -> float:
        return max(self.encode_s_per_gb, self.decode_s_per_gb) / 1e9


# docs/performance.md, "Compressed KV codecs (library)", "Size and speed on random
# normal data": ``workers/kv/kvcodecs.py`` in numpy on one thread of the 2-vCPU Xeon
# VM, one [8, 2048, 128] slice of keys and values, best of 5, ms per GB of raw KV in.
# A new measurement replaces a row.
CODEC_SPEED_SOURCE = "docs/performance.md, Compressed KV codecs: numpy, one thread, [8, 2048, 128] slices"
CODEC_SPEED: dict[tuple[str, str], CodecSpeed] = {
    ("int8", "float32"): CodecSpeed(0.400, 0.128),
    ("fp8", "float32"): CodecSpeed(0.907, 0.523),
    ("int8", "float16"): CodecSpeed(1.345, 1.129),
    ("fp8", "float16"): CodecSpeed(2.530, 2.084),
    ("int8", "bfloat16"): CodecSpeed(1.047, 0.997),
    ("fp8", "bfloat16"): CodecSpeed(2.068, 1.798),
}


# On a node that prefills on its CPU the sender thread's encode shares the prefill's cores
# (and, in our worker, its Python GIL), so it lengthens prefill instead of overlapping it,
# and it costs more than CODEC_SPEED's idle-core figure: in docs/links.md's run of
# ``pdc bench link`` before this term existed (one torch thread, [8, 141-525, 128] bf16
# slices), int8 requests prefilled 2.98 s per GB of raw KV longer than raw ones (the median
# of 12 int8/raw pairs of forced disaggregated requests, 1.15-4.63 s/GB, one pair -0.4),
# against int8's 1.047 s/GB in CODEC_SPEED: 2.85x. A measured figure for that machine,
# taken from prefill times alone (not from TTFT errors); ``request_cost`` applies it to
# every codec's CODEC_SPEED encode on a CPU prefill node (``Efficiency.encode_shares_prefill``).
# It is the prior: once a node has served prefills streamed in a codec, their measured
# scale (``Served``) prices that codec on that node instead (on a quiet host with a second
# core free, the encode overlaps the prefill and that scale is far below this prior's).
SHARED_CORE_ENCODE_FACTOR = 2.85
SHARED_CORE_ENCODE_SOURCE = ("docs/links.md: int8 minus raw prefill_s per GB of raw KV, median of 12 pairs, "
                             "2.98 s/GB / CODEC_SPEED int8 bf16 encode 1.047 s/GB")


@dataclass(frozen=True)
class CodecAccuracy:
    """A measured accuracy figure of one lossy codec: greedy tokens equal to the
    raw handoff's, out of ``num_steps``, on one preset and engine dtype."""

    model: str
    dtype: str
    num_equal: int
    num_steps: int
    source: str

    @property
    def agreement(self) -> float:
        return self.num_equal / self.num_steps


# The accuracy gate of issue 12: ``auto`` never picks a codec whose greedy
# agreement with raw is below MIN_GREEDY_AGREEMENT on the small preset. A codec
# is judged by its worst measured figure there; a codec absent from the table is
# never picked by ``auto`` (an explicit --kv-codec or request hint still works).
MIN_GREEDY_AGREEMENT = 0.99
_ACCURACY_SOURCE = ("docs/performance.md, Compressed KV codecs, Accuracy on models: torch prefill -> MLX "
                    "decode, a 300-token prompt, 32 greedy tokens (examples/kv_codec_accuracy.py)")
_POOLED_SOURCE = ("docs/performance.md, Compressed KV codecs, Accuracy on models: 6 prompts x 40 greedy tokens, "
                  "pooled (examples/kv_codec_accuracy.py --models small --prompts 6 --steps 40)")
CODEC_ACCURACY: dict[str, tuple[CodecAccuracy, ...]] = {
    "int8": (CodecAccuracy("small", "float32", 240, 240, _POOLED_SOURCE),
             CodecAccuracy("small", "bfloat16", 32, 32, _ACCURACY_SOURCE)),
    "fp8": (CodecAccuracy("small", "float32", 197, 240, _POOLED_SOURCE),
            CodecAccuracy("small", "bfloat16", 32, 32, _ACCURACY_SOURCE)),
}
GATE_PRESET = "small"


def passes_accuracy_gate(codec: str) -> bool:
    """Whether ``auto`` may pick ``codec``: raw always; a lossy codec when its
    worst measured greedy agreement on the small preset is at least 99 %."""
    if codec == "raw":
        return True
    figures = [a.agreement for a in CODEC_ACCURACY.get(codec, ()) if a.model == GATE_PRESET]
    return bool(figures) and min(figures) >= MIN_GREEDY_AGREEMENT


def codec_slice_bytes(codec: str, kv_heads: int, num_tokens: float, head_dim: int, kv_dtype: str = KV_DTYPE) -> float:
    """Bytes of one slice of keys and values on the wire, as
    ``workers.kv.kvcodecs.encoded_nbytes`` counts them (a test holds the two
    equal; the scheduler does not import workers): raw 2*h*t*d*itemsize; int8
    codes plus a float16 scale per head and token, 2*h*t*(d + 2); fp8 codes plus
    a float32 scale per head and slice, 2*(h*t*d + 4*h)."""
    if codec == "raw":
        return 2 * kv_heads * num_tokens * head_dim * KV_DTYPE_BYTES[kv_dtype]
    if codec == "int8":
        return 2 * kv_heads * num_tokens * (head_dim + 2)
    if codec == "fp8":
        return 2 * (kv_heads * num_tokens * head_dim + 4 * kv_heads)
    raise ValueError(f"unknown KV codec {codec!r}; known: raw, int8, fp8")


def can_encode(model: ModelCost, codec: str, kv_dtype: str = KV_DTYPE) -> bool:
    """Whether the cost model can price ``codec`` for ``model``: raw always; a
    lossy codec needs per-head K/V (not MLA) and a measured speed at ``kv_dtype``."""
    return codec == "raw" or (model.kv_heads > 0 and (codec, kv_dtype) in CODEC_SPEED)


def codec_ratio(model: ModelCost, codec: str, kv_dtype: str = KV_DTYPE) -> float:
    """Wire bytes under ``codec`` per raw byte of ``model``'s KV (long slices:
    fp8's per-slice scales vanish): int8 (d + 2) / (d x itemsize), fp8 1 / itemsize."""
    if codec == "raw":
        return 1.0
    num_tokens = 1 << 20
    raw = codec_slice_bytes("raw", model.kv_heads, num_tokens, model.head_dim, kv_dtype)
    return codec_slice_bytes(codec, model.kv_heads, num_tokens, model.head_dim, kv_dtype) / raw


def raw_always_wins_gbps(model: ModelCost, codec: str, kv_dtype: str = KV_DTYPE) -> float:
    """The link rate (Gbit/s of payload) at and above which ``auto`` never
    picks ``codec`` for ``model``, whatever the prompt: 8 x (1 - ratio) /
    (encode + decode s/GB). ``auto`` demands that a codec's exposed-transfer
    saving beat its whole encode + decode work, and the saving is at most the
    wire time of the bytes it removes, (1 - ratio) x raw bytes / R. int8 on
    bf16 KV at head_dim 128: 8 x 0.492 / 2.044 = 1.93 Gbit/s (so 1GbE and
    Wi-Fi may compress, 2.5GbE, 10GbE and loopback never); on fp32 KV 11.3."""
    speed = CODEC_SPEED[(codec, kv_dtype)]
    return 8 * (1 - codec_ratio(model, codec, kv_dtype)) / (speed.encode_s_per_gb + speed.decode_s_per_gb)


def kv_wire_bytes_per_layer(model: ModelCost, num_tokens: int, codec: str = "raw",
                            kv_dtype: str = KV_DTYPE) -> list[float]:
    """Bytes each layer's KV of a num_tokens context takes on the wire under
    ``codec`` (one slice per layer; a sliding layer ships its window)."""
    if codec == "raw":
        return kv_bytes_per_layer(model, num_tokens, float(KV_DTYPE_BYTES[kv_dtype]))
    if not can_encode(model, codec, kv_dtype):
        raise ValueError(f"{model.name}: no {codec} figures for its KV ({kv_dtype}, "
                         f"{model.kv_heads} kv heads x {model.head_dim})")
    return [codec_slice_bytes(codec, model.kv_heads, _tokens_held(num_tokens, w), model.head_dim, kv_dtype)
            if _tokens_held(num_tokens, w) else 0.0 for w in model.layer_windows]


# --------------------------------------------------------------- efficiency


# Above 1 only when an engine moves fewer bytes than the ModelCost counts (a
# smaller on-disk format than the native one); far above, the model is wrong.
_MAX_EFFICIENCY = 1.5


@dataclass(frozen=True)
class ProbedPrefill:
    """A node's prefill of the served model, timed at start-up (``workers/rpc/profile.py``),
    as the FLOP rates it implies by this cost model's own FLOP count.

    ``points`` are (prompt tokens, seconds). With two or more lengths the
    times are fitted as t = linear FLOPs / ``linear_flops_s`` + attention
    FLOPs / ``attention_flops_s`` (``_fit_relative``, as ``calibrate`` fits
    a table); with one length, or a fit that gives a non-positive or far-off
    coefficient, both rates are the probes' FLOPs over their seconds. It
    replaces peak TFLOPS x efficiency in the node's prefill compute time only:
    the weight-read floor and decode keep the node's TFLOPS and bandwidth."""

    linear_flops_s: float
    attention_flops_s: float
    points: tuple[tuple[int, float], ...]
    fit: str  # "linear and attention" (two rates fitted) or "one rate"

    def compute_s(self, model: ModelCost, num_new: int, num_cached: int = 0) -> float:
        """Seconds to compute num_new tokens on num_cached at the probed rates."""
        return (linear_flops(model, num_new) / self.linear_flops_s
                + attention_flops(model, num_new, num_cached) / self.attention_flops_s)


_PROBE_FIT_SPREAD = 10.0  # a fitted rate further than this factor from the one-rate figure is noise, not physics


def probed_prefill(model: ModelCost, points: Sequence[tuple[int, float]]) -> ProbedPrefill:
    """The prefill rates a node's probe implies for ``model`` (see ``ProbedPrefill``);
    ``ValueError`` for no points, a length < 1 or a time that is not finite and > 0."""
    points = tuple((int(n), float(t)) for n, t in points)
    if not points:
        raise ValueError("a prefill probe needs at least one (tokens, seconds) point")
    for n, t in points:
        if n < 1 or not 0 < t < float("inf"):
            raise ValueError(f"prefill probe point ({n}, {t}): need tokens >= 1 and 0 < seconds < inf")
    linear = [linear_flops(model, n) for n, _ in points]
    attention = [attention_flops(model, n) for n, _ in points]
    times = [t for _, t in points]
    one_rate = (sum(linear) + sum(attention)) / sum(times)
    if len({n for n, _ in points}) >= 2:
        try:
            a, b = _fit_relative(linear, attention, times)
        except ValueError:
            a = b = 0.0
        rates = (1 / a, 1 / b) if a > 0 and b > 0 else (0.0, 0.0)
        if all(one_rate / _PROBE_FIT_SPREAD <= r <= one_rate * _PROBE_FIT_SPREAD for r in rates):
            return ProbedPrefill(rates[0], rates[1], points, "linear and attention")
    return ProbedPrefill(one_rate, one_rate, points, "one rate")


PREFILL_MODES = ("local", "raw", "int8", "fp8")  # a prefill kept on its node, or streamed in one codec
PLACEMENT_KINDS = ("colocated", "disaggregated")


@dataclass(frozen=True)
class Served:
    """What a node's served requests measured against this cost model: the live scheduler
    learns it (``scheduler/calibration.py``), a cluster file may declare it for the simulator.

    ``prefill_scale``: mode -> served prefill seconds / the probe-priced (or TFLOPS-priced)
    compute, per ``PREFILL_MODES``: ``local`` for a prefill whose KV stays on the node, a codec
    for one streamed in it (its sender's work on the node's cores, the checksum, a lossy
    codec's encode). ``overhead_s``: per ``PLACEMENT_KINDS``, what a request's TTFT held
    beyond queue, prefill and exposed transfer on this node as the decode node (RPCs, the
    scheduler's hops, the first token's trip).

    ``prefill_points``: optionally, per mode, the factor at several prompt lengths
    ``((tokens, factor), ...)``, ascending: a node whose served / probed ratio changes with
    length is priced at each length by interpolating them in log2(tokens), flat beyond the
    ends (``scale`` with ``num_tokens``); ``prefill_scale`` stays the figure over all
    lengths, used where a mode has no points."""

    prefill_scale: tuple[tuple[str, float], ...] = ()
    overhead_s: tuple[tuple[str, float], ...] = ()
    prefill_points: tuple[tuple[str, tuple[tuple[int, float], ...]], ...] = ()

    def __post_init__(self) -> None:
        for mode, value in self.prefill_scale:
            if mode not in PREFILL_MODES:
                raise ValueError(f"prefill_scale mode {mode!r}: known modes are {', '.join(PREFILL_MODES)}")
            if not 0 < value < float("inf"):
                raise ValueError(f"prefill_scale {mode} = {value}: need a finite number > 0")
        scaled = {mode for mode, _ in self.prefill_scale}
        for mode, points in self.prefill_points:
            if mode not in scaled:
                raise ValueError(f"prefill_points for {mode!r} without a prefill_scale for it")
            tokens = [n for n, _ in points]
            if not points or tokens != sorted(set(tokens)) or tokens[0] < 1:
                raise ValueError(f"prefill_points {mode}: need (tokens >= 1, factor) pairs in ascending tokens")
            for n, value in points:
                if not 0 < value < float("inf"):
                    raise ValueError(f"prefill_points {mode} at {n} tokens = {value}: need a finite number > 0")
        for kind, value in self.overhead_s:
            if kind not in PLACEMENT_KINDS:
                raise ValueError(f"overhead kind {kind!r}: known kinds are {', '.join(PLACEMENT_KINDS)}")
            if not 0 <= value < float("inf"):
                raise ValueError(f"overhead {kind} = {value}: need a finite number >= 0")

    def measured(self, mode: str) -> bool:
        """Whether ``mode``'s own prefills were measured."""
        return any(m == mode for m, _ in self.prefill_scale)

    def scale(self, mode: str, num_tokens: int | None = None) -> float:
        """The factor on ``mode``'s computed prefill of ``num_tokens`` new tokens: its own, else the
        nearest measured mode's (a lossy codec falls back to raw, raw and local to each other),
        else 1; at ``num_tokens`` along that mode's ``prefill_points`` when it has them. A lossy
        codec without its own figure leaves its encode to the prior (``SHARED_CORE_ENCODE_FACTOR``)."""
        scales, points = dict(self.prefill_scale), dict(self.prefill_points)
        fallback = {"local": ("raw",), "raw": ("local",)}.get(mode, ("raw", "local"))
        for m in (mode, *fallback):
            if m in scales:
                if num_tokens is not None and m in points:
                    return _along(points[m], num_tokens)
                return scales[m]
        return 1.0

    def overhead(self, colocated: bool) -> float:
        """Seconds a request's TTFT carries beyond its queue, prefill and exposed transfer: its own
        kind's, else the other kind's (so neither placement looks free while one is unmeasured), else 0."""
        overheads = dict(self.overhead_s)
        mine, other = ("colocated", "disaggregated") if colocated else ("disaggregated", "colocated")
        return overheads.get(mine, overheads.get(other, 0.0))


def _along(points: Sequence[tuple[int, float]], num_tokens: int) -> float:
    """``points``' factor at ``num_tokens``: linear in log2(tokens) between the two around it,
    the end's factor beyond either end."""
    x = math.log2(max(1, num_tokens))
    (n0, f0), rest = points[0], points[1:]
    if x <= math.log2(n0) or not rest:
        return f0 if x <= math.log2(n0) else points[-1][1]
    for n1, f1 in rest:
        x0, x1 = math.log2(n0), math.log2(n1)
        if x <= x1:
            return f0 + (f1 - f0) * (x - x0) / (x1 - x0)
        n0, f0 = n1, f1
    return f0


@dataclass(frozen=True)
class Efficiency:
    """Achieved / peak for one (device, engine, weight format) combination.

    ``probe``: a node's own prefill of the served model (``with_probe``), which
    then prices that node's prefill compute in place of peak x compute/attention."""

    compute: float  # weight matmuls in prefill, against peak TFLOPS
    attention: float  # the context term (QK^T, PV) in prefill, against peak TFLOPS
    bandwidth: float  # weight reads in decode, against peak memory bandwidth
    kv_bandwidth: float  # KV-cache reads in decode, against peak memory bandwidth
    source: str = "generic"
    probe: ProbedPrefill | None = None
    # The node computes on its CPU (``computes_on_cpu``): a codec's encode runs on the cores
    # that prefill, so ``request_cost`` adds it to prefill instead of overlapping it.
    encode_shares_prefill: bool = False
    served: Served | None = None  # corrections from the node's served requests (``with_probe``)

    def __post_init__(self) -> None:
        for field in ("compute", "attention", "bandwidth", "kv_bandwidth"):
            value = getattr(self, field)
            if not 0 < value <= _MAX_EFFICIENCY:
                raise ValueError(f"efficiency {field}={value} is outside (0, {_MAX_EFFICIENCY}]")


# Generic defaults, per weight format, for every combination without a measured table.
# compute: large-batch bf16 GEMMs reach about 70-80 % of peak (cuBLAS on NVIDIA, MLX on
#   Apple); exo's Spark and M3 Ultra prefill times imply 75-90 %. Dequantising 8-bit
#   weights costs some of it, 4-bit more (llama.cpp's MXFP4 MoE measured 0.13-0.51).
# attention: FlashAttention-2 forward reaches 50-70 % of peak on NVIDIA, Metal less.
# bandwidth: streaming reads reach 75-90 % of peak; decode adds launch gaps.
# kv_bandwidth: decode attention reads the cache in scattered tiles, below a stream.
_BASE = {"attention": 0.5, "bandwidth": 0.75, "kv_bandwidth": 0.5}
GENERIC: dict[str, Efficiency] = {
    "fp32": Efficiency(compute=0.75, **_BASE),
    "bf16": Efficiency(compute=0.75, **_BASE),
    "fp16": Efficiency(compute=0.75, **_BASE),
    "fp8": Efficiency(compute=0.6, **_BASE),
    "int8": Efficiency(compute=0.6, **_BASE),
    "int4": Efficiency(compute=0.4, **_BASE),
    "mxfp4": Efficiency(compute=0.4, **_BASE),
}

# Against a worker's own start-up measurement (workers/rpc/profile.py) rather than a
# peak figure: its TFLOPS come from a large matmul in the compute dtype and its
# bandwidth from a large copy, so prefill GEMMs and decode's weight reads run at
# about the measured rates; attention and scattered KV reads keep the generic
# ratio to them (0.5 / 0.75).
MEASURED = Efficiency(compute=1.0, attention=0.67, bandwidth=1.0, kv_bandwidth=0.67,
                      source="relative to the node's start-up measurement")

_LLAMACPP_TABLE = "calibrate() on llama.cpp's gpt-oss-120b llama-bench table (catalog.LLAMACPP_GPT_OSS_120B)"

# Fitted by calibrate(); tests recompute them from the table.
CALIBRATED: dict[tuple[str, str, str], Efficiency] = {
    # The Spark's bandwidth factor is high because llama.cpp's GGUF keeps the
    # non-expert weights at ~8.5 bits where the native checkpoint (counted here)
    # has bf16: llama.cpp reads ~3.6 GB per token, not 5.0 (true factor ~0.7).
    ("dgx-spark", "llamacpp", "mxfp4"): Efficiency(
        compute=0.1330, attention=0.3280, bandwidth=0.9728, kv_bandwidth=0.6386, source=_LLAMACPP_TABLE
    ),
    ("mac-m4-max", "llamacpp", "mxfp4"): Efficiency(
        compute=0.5082, attention=0.1765, bandwidth=0.5550, kv_bandwidth=0.2442, source=_LLAMACPP_TABLE
    ),
}


def with_probe(eff: Efficiency, model: ModelCost, points: Sequence[tuple[int, float]], *,
               device: str = "", served: Served | None = None) -> Efficiency:
    """``eff`` for one node: its prefill probe (``probed_prefill``), when it has points, pricing
    its prefill; when its engine ``device`` is a CPU (``computes_on_cpu``), a codec's encode
    charged to its prefill (``Efficiency.encode_shares_prefill``); and what its served requests
    measured (``Served``), correcting both. The one rule the live ``Predictor`` and the
    simulator both apply."""
    if points:
        eff = replace(eff, probe=probed_prefill(model, points))
    if computes_on_cpu(device):
        eff = replace(eff, encode_shares_prefill=True)
    if served is not None:
        eff = replace(eff, served=served)
    return eff


def computes_on_cpu(device: str) -> bool:
    """Whether an engine device, as a worker reports it (torch ``cpu``, ``cuda:0``, ``mps``; mlx
    ``mlx:Device(cpu, 0)``), is a CPU; "" (unknown, or a declared catalog accelerator) is not."""
    name = device.lower().removeprefix("mlx:").replace("device(", "")
    return name.split(":")[0].split(",")[0].strip() == "cpu"


def known_engines() -> list[str]:
    """Engine names the cost model understands: ours, and every calibrated one."""
    return sorted({"torch", "mlx", *(engine for _, engine, _ in CALIBRATED)})


def efficiency(device: str, engine: str, weight_format: str) -> Efficiency:
    """Efficiency of ``engine`` running ``weight_format`` weights on ``device``:
    the calibrated factors for that exact combination, else the generic ones."""
    _check_format(weight_format)
    return CALIBRATED.get((device, engine, weight_format), GENERIC[weight_format])


# --------------------------------------------------------------- time


def prefill_time(model: ModelCost, hw: Hardware, eff: Efficiency, num_new: int, num_cached: int = 0) -> float:
    """Seconds to prefill num_new tokens on top of num_cached cached ones: the
    larger of the compute time and the weight-read floor (a roofline)."""
    return max(
        prefill_compute_time(model, hw, eff, num_new, num_cached),
        prefill_floor_time(model, hw, eff, num_new, num_cached),
    )


def prefill_compute_time(
    model: ModelCost, hw: Hardware, eff: Efficiency, num_new: int, num_cached: int = 0
) -> float:
    """Linear FLOPs / (peak x e.compute) + attention FLOPs / (peak x e.attention); with
    a probe (``Efficiency.probe``), the same FLOPs at the node's probed rates instead."""
    if eff.probe is not None:
        return eff.probe.compute_s(model, num_new, num_cached)
    peak = hw.tflops * 1e12
    linear = linear_flops(model, num_new) / (peak * eff.compute)
    return linear + attention_flops(model, num_new, num_cached) / (peak * eff.attention)


def prefill_floor_time(
    model: ModelCost, hw: Hardware, eff: Efficiency, num_new: int, num_cached: int = 0
) -> float:
    """Bytes touched / (bandwidth x e.bandwidth): the dense weights, the experts
    the prompt routes to, and the KV of the whole context, each read once."""
    touched = model.num_moe_layers * model.expected_experts_touched(num_new) * model.expert_params
    weights = model.decode_weight_bytes - _active_expert_bytes(model) + touched * _bytes(model.expert_format)
    return (weights + kv_bytes(model, num_cached + num_new)) / (hw.mem_bw_gbps * 1e9 * eff.bandwidth)


def _active_expert_bytes(model: ModelCost) -> float:
    return model.num_moe_layers * model.experts_per_token * model.expert_params * _bytes(model.expert_format)


def decode_time(model: ModelCost, hw: Hardware, eff: Efficiency, depth: int) -> float:
    """Seconds to decode one token with depth tokens already cached (batch 1):
    active weights / (bandwidth x e.bandwidth) + KV read / (bandwidth x e.kv_bandwidth),
    floored by its FLOPs at peak x e.compute."""
    return decode_step_time(model, hw, eff, (depth,))


def decode_step_time(model: ModelCost, hw: Hardware, eff: Efficiency, depths: Sequence[int]) -> float:
    """Seconds for one step of a continuous batch: every request, request i with
    ``depths[i]`` tokens cached, decodes one token.

    NOTE on the batched rule. A step reads the weights once for the whole
    batch (a MoE layer: the experts the batch's tokens route to,
    ``expected_experts_touched``) and each request's own KV:

        max(weights(k) / (bandwidth x e.bandwidth) + sum_i KV(depth_i + 1) / (bandwidth x e.kv_bandwidth),
            sum_i (linear FLOPs(1) + attention FLOPs(depth_i)) / (peak x e.compute))

    so k requests cost one weight read plus k KV reads per step, not k steps.
    Compute binds only for large batches: with bf16 weights (2 FLOPs and 2
    bytes per parameter) at about k = peak FLOP/s / bandwidth bytes/s
    requests, ~370 on a DGX Spark, ~30 on an M4 Max, fewer with quantised
    weights. One request is ``decode_time``."""
    if not depths:
        raise ValueError("a decode step needs at least one request")
    bandwidth = hw.mem_bw_gbps * 1e9
    memory = batch_weight_bytes(model, len(depths)) / (bandwidth * eff.bandwidth)
    memory += sum(kv_bytes(model, d + 1) for d in depths) / (bandwidth * eff.kv_bandwidth)
    flops = sum(linear_flops(model, 1) + attention_flops(model, 1, d) for d in depths)
    return max(memory, flops / (hw.tflops * 1e12 * eff.compute))


def batched_decode_time(model: ModelCost, hw: Hardware, eff: Efficiency, depth: int, num_requests: int) -> float:
    """Seconds per step of a batch of ``num_requests`` requests all at ``depth``
    (``decode_step_time``): what each of them waits per token."""
    if num_requests < 1:
        raise ValueError(f"num_requests must be >= 1, got {num_requests}")
    return decode_step_time(model, hw, eff, (depth,) * num_requests)


def batch_weight_bytes(model: ModelCost, num_requests: int) -> float:
    """Weight bytes one decode step of ``num_requests`` tokens reads: the dense
    layers and lm_head once, and the experts those tokens route to."""
    if num_requests == 1 or not model.num_moe_layers:
        return model.decode_weight_bytes
    touched = model.num_moe_layers * model.expected_experts_touched(num_requests) * model.expert_params
    return model.decode_weight_bytes - _active_expert_bytes(model) + touched * _bytes(model.expert_format)


def mean_decode_time(model: ModelCost, hw: Hardware, eff: Efficiency, depth: int, num_tokens: int) -> float:
    """Mean seconds per token over num_tokens decoded from depth on (1 / tok/s)."""
    return sum(decode_time(model, hw, eff, depth + i) for i in range(num_tokens)) / num_tokens


def transfer_time(num_bytes: float, link: Link) -> float:
    """Seconds to move num_bytes over link: bytes / payload rate + latency."""
    return num_bytes / link.bytes_per_s + link.latency_s


def exposed_transfer(
    model: ModelCost,
    link: Link,
    num_tokens: int,
    prefill_s: float,
    *,
    num_chunks: int = 1,
    codec: str = "raw",
    kv_dtype: str = KV_DTYPE,
) -> float:
    """Seconds from the end of prefill to the last KV slice landed (and, under a
    compressed codec, decoded), when each layer's slice is sent as soon as that
    layer finishes (``transfer_stages`` with the whole breakdown)."""
    return transfer_stages(model, link, num_tokens, prefill_s, num_chunks=num_chunks, codec=codec,
                           kv_dtype=kv_dtype).exposed_s


@dataclass(frozen=True)
class TransferStages:
    """One streamed transfer, prefill end as the origin: ``exposed_s`` until the
    last slice is usable on the decode node, of which ``decode_tail_s`` comes
    after its last byte landed (0 for raw)."""

    exposed_s: float
    decode_tail_s: float
    wire_bytes: float
    encode_s: float  # the codec's whole encode work (overlapping prefill), 0 for raw
    decode_s: float  # the codec's whole decode work (overlapping the wire), 0 for raw


def transfer_stages(
    model: ModelCost,
    link: Link,
    num_tokens: int,
    prefill_s: float,
    *,
    num_chunks: int = 1,
    codec: str = "raw",
    kv_dtype: str = KV_DTYPE,
    encode_in_prefill: bool = False,
) -> TransferStages:
    """The layer-wise stream of a num_tokens prompt's KV behind a prefill of
    prefill_s seconds, slice by slice through up to three stages.

    Model: prefill runs the prompt in ``num_chunks`` chunks through L layers at
    a uniform pace, so layer i of chunk j is ready at P * (j + (i+1)/L) / C.
    Each slice then passes, in order and one at a time per stage, the sender
    thread's encode (a compressed codec only: ``CODEC_SPEED`` s/GB of raw KV),
    the link (its wire bytes at rate R, landing one latency later) and the
    receiver's decode (likewise). That is how the workers run it: a sender
    thread drains the engine's slice queue, so encoding overlaps the next
    layers' compute, and the receiver decodes each frame into its arena slot as
    it lands. A prefill node computing on its CPU shares its cores with the
    encoder: ``request_cost`` then adds the encode to ``prefill_s`` and passes
    ``encode_in_prefill``, so each slice leaves encoded at its ready time (no
    encode stage; ``encode_s`` still reports the work). Simulating the queue
    gives the answer for uneven layers (sliding windows) too.

    Raw (one stage), the closed form (C = 1, L layers of b = T/L seconds each
    on the link, T = total bytes / R): slice i starts when both it is ready and
    the link is free, so the link finishes at max over i of
    (P*i/L + (L - i + 1) * b). That is linear in i, so the maximum sits at an
    end: i = 1 gives P/L + T (the link is the bottleneck and never idles once
    it starts), i = L gives P + T/L (prefill is the bottleneck and only the
    last slice is left). Subtracting P:

        exposed = max(T - P * (L-1)/L, T/L) + latency

    The rougher max(0, T - P*(L-1)/L) + T/L bounds it from above by at most
    T/L. Streaming hides the transfer (exposed = T/L + latency) exactly when
    T <= P, i.e. when link bytes/s >= KV bytes per token x prefill tokens/s.
    A sliding layer sends only the last ``window`` tokens the decode side keeps.

    A codec shortens the stream when its smaller T saves more than its stages
    add: on a slow link the wire binds and the saving approaches (1 - ratio)
    of the unhidden wire time; when raw already hides, only the last slice is
    exposed and little is left to save (``auto_codec_cost`` says when ``auto``
    takes a codec).
    """
    wire = kv_wire_bytes_per_layer(model, num_tokens, codec, kv_dtype)
    if codec == "raw":
        encode_per_byte = decode_per_byte = 0.0
        raw = wire
    else:
        speed = CODEC_SPEED[(codec, kv_dtype)]
        encode_per_byte, decode_per_byte = speed.encode_s_per_gb / 1e9, speed.decode_s_per_gb / 1e9
        raw = kv_bytes_per_layer(model, num_tokens, float(KV_DTYPE_BYTES[kv_dtype]))
    stage_encode_per_byte = 0.0 if encode_in_prefill else encode_per_byte
    num_layers = len(wire)
    encoded = link_free = decoded = 0.0
    for chunk in range(num_chunks):
        for i, size in enumerate(wire):
            ready = prefill_s * (chunk + (i + 1) / num_layers) / num_chunks
            encoded = max(encoded, ready) + raw[i] / num_chunks * stage_encode_per_byte
            link_free = max(link_free, encoded) + size / num_chunks / link.bytes_per_s
            decoded = max(decoded, link_free + link.latency_s) + raw[i] / num_chunks * decode_per_byte
    tail = decoded - (link_free + link.latency_s)
    total_raw = sum(raw)
    return TransferStages(link_free - prefill_s + link.latency_s + tail, tail, sum(wire),
                          total_raw * encode_per_byte, total_raw * decode_per_byte)


# --------------------------------------------------------------- one request's prefill and handoff


@dataclass(frozen=True)
class RequestCost:
    """What one request's prefill and KV handoff cost on one placement.

    Colocated: the decode node prefills, reusing ``num_prefill_cached`` tokens
    of its own cache; nothing ships (``num_decode_cached`` equals it). Remote:
    the prefill node reuses ``num_prefill_cached`` of its own and computes the
    rest; the decode node already holds ``num_decode_cached`` and receives the
    KV of every later prompt token, computed or reused (when it holds more
    than the prefill node, the prefill node still computes from its own
    prefix but ships from the decode node's), encoded with ``codec``."""

    num_prompt_tokens: int
    num_prefill_cached: int  # reused from the prefilling node's own prefix cache
    num_decode_cached: int  # already held by the decode node
    prefill_s: float  # computing the prompt's new tokens, attending to the whole context
    num_shipped_tokens: int  # tokens whose KV crosses the link (0 colocated)
    shipped_bytes: float  # on the wire, encoded with ``codec``
    wire_s: float  # shipped bytes / the link's payload rate, no latency (0 colocated)
    exposed_s: float  # prefill end -> last slice landed and decoded on an idle link, latency included (0 colocated)
    codec: str = "raw"  # the transfer's KV codec ("raw" colocated: nothing is encoded)
    encode_s: float = 0.0  # the codec's encode work on the prefill node (within exposed_s where it shows)
    decode_s: float = 0.0  # the codec's decode work on the decode node (likewise)
    decode_tail_s: float = 0.0  # of exposed_s, after the last byte landed: decoding the last slice
    encode_in_prefill_s: float = 0.0  # of prefill_s, the encode prior on a CPU prefill node's own cores (else 0)
    encode_within_prefill: bool = False  # the encode is inside prefill_s (CPU node: the prior, or a measured scale)

    @property
    def num_new_tokens(self) -> int:
        """Prompt tokens the prefilling node computes."""
        return self.num_prompt_tokens - self.num_prefill_cached

    @property
    def colocated(self) -> bool:
        return self.num_shipped_tokens == 0


def request_cost(
    model: ModelCost,
    hw: Hardware,
    eff: Efficiency,
    num_prompt_tokens: int,
    num_prefill_cached: int = 0,
    *,
    link: Link | None = None,
    num_decode_cached: int = 0,
    codec: str = "raw",
    kv_dtype: str = KV_DTYPE,
) -> RequestCost:
    """Prefill and handoff of a ``num_prompt_tokens`` prompt prefilled on ``hw``
    (which holds ``num_prefill_cached`` of it) and, with ``link``, shipped to a
    decode node holding ``num_decode_cached``, encoded with ``codec``; without
    ``link``, colocated (``codec`` ignored).

    The one place this arithmetic lives: the live ``Predictor`` and the
    simulator both call it, so they agree on how cached tokens and codecs
    change prefill and transfer. On a prefill node that computes on its CPU
    (``eff.encode_shares_prefill``) a lossy codec's encode runs on the prefill's
    own cores, so ``prefill_s`` = compute + ``SHARED_CORE_ENCODE_FACTOR`` x the
    codec's encode (``encode_in_prefill_s``); elsewhere the encode overlaps
    prefill as a stage of the stream. A node's served requests (``eff.served``)
    scale the computed prefill per mode (``Served.scale``: ``local`` colocated,
    the codec remote); a codec measured that way carries its encode in its
    scale and pays no ``SHARED_CORE_ENCODE_FACTOR``. Cached figures must be in
    ``[0, num_prompt_tokens)``: the last prompt token is always computed (its
    logits give the first token)."""
    for name, value in (("num_prefill_cached", num_prefill_cached), ("num_decode_cached", num_decode_cached)):
        if not 0 <= value < num_prompt_tokens:
            raise ValueError(f"{name} must be in [0, {num_prompt_tokens}), got {value}")
    num_new = num_prompt_tokens - num_prefill_cached
    compute_s = prefill_time(model, hw, eff, num_new, num_prefill_cached)
    served = eff.served or Served()
    if link is None:
        return RequestCost(num_prompt_tokens, num_prefill_cached, num_prefill_cached,
                           compute_s * served.scale("local", num_new), 0, 0.0, 0.0, 0.0)
    prefill_s = compute_s * served.scale(codec, num_new)
    num_shipped = num_prompt_tokens - num_decode_cached
    # On a CPU node a lossy codec's encode runs on the prefill's own cores: within its prefill. A
    # codec measured in served prefills has that encode in its scale; otherwise the prior adds it.
    within = eff.encode_shares_prefill and codec != "raw"
    prior = within and not served.measured(codec)
    encode_in_prefill_s = 0.0
    if prior:  # the encode takes the prefill's own cores: prefill + factor x encode, in series
        encode_in_prefill_s = SHARED_CORE_ENCODE_FACTOR * transfer_stages(
            model, link, num_shipped, 0.0, codec=codec, kv_dtype=kv_dtype).encode_s
    stages = transfer_stages(model, link, num_shipped, prefill_s + encode_in_prefill_s, codec=codec,
                             kv_dtype=kv_dtype, encode_in_prefill=within)
    return RequestCost(num_prompt_tokens, num_prefill_cached, num_decode_cached, prefill_s + encode_in_prefill_s,
                       num_shipped, stages.wire_bytes, stages.wire_bytes / link.bytes_per_s, stages.exposed_s, codec,
                       encode_in_prefill_s if prior else stages.encode_s, stages.decode_s, stages.decode_tail_s,
                       encode_in_prefill_s, within)


def request_overhead_s(decode_eff: Efficiency, colocated: bool) -> float:
    """The fixed part of a request's TTFT on its decode node (``Served.overhead``), added by the
    live ``Predictor`` and the simulator alike to queue + prefill + exposed transfer; 0 unknown."""
    return decode_eff.served.overhead(colocated) if decode_eff.served is not None else 0.0


def auto_codec_cost(
    model: ModelCost,
    hw: Hardware,
    eff: Efficiency,
    num_prompt_tokens: int,
    num_prefill_cached: int = 0,
    *,
    link: Link,
    num_decode_cached: int = 0,
    kv_dtype: str = KV_DTYPE,
) -> RequestCost:
    """``request_cost`` under the codec ``auto`` picks for this transfer.

    NOTE on the rule. Candidates are every lossy codec that passes the
    accuracy gate (``passes_accuracy_gate``), that the model's KV can take
    (``can_encode``) and that can win on this link at all (its rate below
    ``raw_always_wins_gbps``: loopback, 10GbE and 2.5GbE with bf16 KV stay
    raw). On an accelerator prefill is the same under every codec, so the
    codecs differ only in the exposed transfer (``transfer_stages``, where
    encode and decode overlap the stream as the workers run them); on a CPU
    prefill node a codec's prefill also carries its encode (``request_cost``).
    A codec is taken only when its predicted saving in prefill + exposed
    transfer exceeds its work not already charged in series (decode, and
    encode unless it is in prefill), so it still wins if none of that work
    overlapped anything; among those, the smallest prefill + exposed
    transfer. A short prompt whose raw KV already hides behind prefill saves a
    fraction of its last slice and stays raw."""
    raw = request_cost(model, hw, eff, num_prompt_tokens, num_prefill_cached, link=link,
                       num_decode_cached=num_decode_cached, kv_dtype=kv_dtype)
    best = raw
    for codec in auto_candidates(model, link, kv_dtype):
        cost = request_cost(model, hw, eff, num_prompt_tokens, num_prefill_cached, link=link,
                            num_decode_cached=num_decode_cached, codec=codec, kv_dtype=kv_dtype)
        saving = raw.prefill_s + raw.exposed_s - cost.prefill_s - cost.exposed_s
        unhidden = cost.decode_s + (0.0 if cost.encode_within_prefill else cost.encode_s)
        if saving > unhidden and cost.prefill_s + cost.exposed_s < best.prefill_s + best.exposed_s:
            best = cost
    return best


def auto_candidates(model: ModelCost, link: Link, kv_dtype: str = KV_DTYPE) -> list[str]:
    """The lossy codecs ``auto`` weighs against raw on ``link`` (see ``auto_codec_cost``)."""
    gbps = link.bytes_per_s * 8 / 1e9
    return [c for c in ("int8", "fp8") if passes_accuracy_gate(c) and can_encode(model, c, kv_dtype)
            and gbps < raw_always_wins_gbps(model, c, kv_dtype)]


# --------------------------------------------------------------- calibration


@dataclass(frozen=True)
class BenchRow:
    """One llama-bench depth: prefill and decode tokens/s after ``depth`` cached tokens."""

    depth: int
    prefill_tok_s: float
    decode_tok_s: float


@dataclass(frozen=True)
class BenchTable:
    """A measured ``llama-bench -p num_prompt -n num_gen -d depth`` table for one
    (device, engine, weight format) combination."""

    hardware: Hardware
    model: ModelCost
    engine: str
    rows: tuple[BenchRow, ...]
    num_prompt: int = 2048
    num_gen: int = 32
    source: str = ""

    @property
    def key(self) -> tuple[str, str, str]:
        return (self.hardware.name, self.engine, self.model.weight_format)


def predict_row(
    model: ModelCost, hw: Hardware, eff: Efficiency, depth: int, num_prompt: int, num_gen: int
) -> BenchRow:
    """What the cost model predicts llama-bench reports at ``depth``:
    num_prompt / prefill time, and 1 / mean decode time over num_gen tokens."""
    return BenchRow(
        depth=depth,
        prefill_tok_s=num_prompt / prefill_time(model, hw, eff, num_prompt, depth),
        decode_tok_s=1 / mean_decode_time(model, hw, eff, depth, num_gen),
    )


def calibrate(table: BenchTable) -> Efficiency:
    """Fit the four efficiencies of ``table``'s combination to its rows.

    Prefill time t = a * linear FLOPs + b * attention FLOPs(depth), with
    a = 1/(peak x compute) and b = 1/(peak x attention); decode time
    m = u * weight bytes + v * mean KV bytes(depth), with u = 1/(bw x bandwidth)
    and v = 1/(bw x kv_bandwidth). Each pair is linear least squares in
    relative error. Assumes the rows are compute-bound in prefill (the weight
    floor is below the fitted compute time; the fit checks this).
    """
    model, hw, n, g = table.model, table.hardware, table.num_prompt, table.num_gen
    times = [n / row.prefill_tok_s for row in table.rows]
    a, b = _fit_relative(
        [linear_flops(model, n)] * len(times), [attention_flops(model, n, r.depth) for r in table.rows], times
    )
    steps = [1 / row.decode_tok_s for row in table.rows]
    mean_kv = [sum(kv_bytes(model, r.depth + i + 1) for i in range(g)) / g for r in table.rows]
    u, v = _fit_relative([model.decode_weight_bytes] * len(steps), mean_kv, steps)
    peak, bandwidth = hw.tflops * 1e12, hw.mem_bw_gbps * 1e9
    eff = Efficiency(
        compute=1 / (a * peak),
        attention=1 / (b * peak),
        bandwidth=1 / (u * bandwidth),
        kv_bandwidth=1 / (v * bandwidth),
        source=f"calibrate() on {table.source or 'a measured table'}",
    )
    for row in table.rows:
        if prefill_floor_time(model, hw, eff, n, row.depth) > prefill_compute_time(model, hw, eff, n, row.depth):
            raise ValueError(f"{table.key}: the weight-read floor binds at depth {row.depth}; the fit assumes not")
    return eff


def _fit_relative(x1: Sequence[float], x2: Sequence[float], y: Sequence[float]) -> tuple[float, float]:
    """Least squares for y ~ a*x1 + b*x2 in relative error: minimise sum((a*x1 + b*x2)/y - 1)^2."""
    p = [xi / yi for xi, yi in zip(x1, y)]
    q = [xi / yi for xi, yi in zip(x2, y)]
    spp, sqq, spq = sum(v * v for v in p), sum(v * v for v in q), sum(i * j for i, j in zip(p, q))
    sp, sq = sum(p), sum(q)
    det = spp * sqq - spq * spq
    if det <= 0:
        raise ValueError("table rows do not separate the two terms (need at least two distinct depths)")
    a, b = (sp * sqq - sq * spq) / det, (sq * spp - sp * spq) / det
    if a <= 0 or b <= 0:
        raise ValueError(f"fit gives a non-positive coefficient (a={a:.3g}, b={b:.3g}): is the table this model's?")
    return a, b
