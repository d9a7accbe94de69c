"""Built-in catalogs for the cost model: links, model configs, and the published
benchmark table the llama.cpp efficiencies are fitted to. The hardware catalog
lives in ``cluster/hardware.py`` (workers read it too) and is re-exported here.

Every figure's source is in ``docs/catalog.md``. Lookups raise
``CatalogError`` naming the unknown entry and listing the known ones.
"""
from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

from cluster.hardware import HARDWARE, Hardware
from scheduler.costmodel import BenchRow, BenchTable, Link, ModelCost, model_cost


class CatalogError(LookupError):
    """A name that is in no catalog (and, for models, no config.json path), or a
    config.json the cost model cannot use (not JSON, a key missing)."""


LINKS: dict[str, Link] = {
    l.name: l
    for l in (
        # 802.11ax 2x2 80 MHz PHY rate; MAC/contention overhead leaves about half.
        Link("wifi6", gbit_s=1.201, latency_s=2e-3, payload_efficiency=0.55),
        Link("1gbe", gbit_s=1.0, latency_s=1e-4),
        Link("2.5gbe", gbit_s=2.5, latency_s=1e-4),
        Link("10gbe", gbit_s=10.0, latency_s=5e-5),
        # IP over Thunderbolt: tunnelling and host-stack overhead (an estimate).
        Link("tb4", gbit_s=40.0, latency_s=5e-5, payload_efficiency=0.6),
        Link("tb5", gbit_s=80.0, latency_s=5e-5, payload_efficiency=0.6),
        # ConnectX-7 (the DGX Spark's QSFP ports), 9000-byte frames.
        Link("200gbe", gbit_s=200.0, latency_s=1e-5, payload_efficiency=0.99),
    )
}


def _llama(hidden: int, inter: int, layers: int, heads: int) -> dict[str, Any]:
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "attention_bias": False,
        "mlp_bias": False,
        "hidden_act": "silu",
        "hidden_size": hidden,
        "intermediate_size": inter,
        "num_hidden_layers": layers,
        "num_attention_heads": heads,
        "num_key_value_heads": 8,
        "head_dim": 128,
        "vocab_size": 128256,
        "max_position_embeddings": 131072,
        "rms_norm_eps": 1e-05,
        "rope_theta": 500000.0,
        "rope_scaling": {
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 8192,
            "rope_type": "llama3",
        },
        "tie_word_embeddings": False,
        "bos_token_id": 128000,
        "eos_token_id": [128001, 128008, 128009],
        "torch_dtype": "bfloat16",
    }


def _qwen3_moe(hidden: int, inter: int, moe_inter: int, layers: int, heads: int) -> dict[str, Any]:
    return {
        "architectures": ["Qwen3MoeForCausalLM"],
        "model_type": "qwen3_moe",
        "attention_bias": False,
        "hidden_act": "silu",
        "hidden_size": hidden,
        "intermediate_size": inter,
        "moe_intermediate_size": moe_inter,
        "num_hidden_layers": layers,
        "num_attention_heads": heads,
        "num_key_value_heads": 4,
        "head_dim": 128,
        "num_experts": 128,
        "num_experts_per_tok": 8,
        "norm_topk_prob": True,
        "decoder_sparse_step": 1,
        "mlp_only_layers": [],
        "vocab_size": 151936,
        "max_position_embeddings": 40960,
        "rms_norm_eps": 1e-06,
        "rope_theta": 1000000.0,
        "rope_scaling": None,
        "use_sliding_window": False,
        "sliding_window": None,
        "max_window_layers": layers,
        "tie_word_embeddings": False,
        "bos_token_id": 151643,
        "eos_token_id": 151645,
        "torch_dtype": "bfloat16",
    }


def _gpt_oss(layers: int, experts: int) -> dict[str, Any]:
    return {
        "architectures": ["GptOssForCausalLM"],
        "model_type": "gpt_oss",
        "attention_bias": True,
        "hidden_act": "silu",
        "hidden_size": 2880,
        "intermediate_size": 2880,
        "num_hidden_layers": layers,
        "num_attention_heads": 64,
        "num_key_value_heads": 8,
        "head_dim": 64,
        "num_local_experts": experts,
        "num_experts_per_tok": 4,
        "experts_per_token": 4,
        "vocab_size": 201088,
        "max_position_embeddings": 131072,
        "initial_context_length": 4096,
        "rms_norm_eps": 1e-05,
        "rope_theta": 150000,
        "rope_scaling": {
            "rope_type": "yarn",
            "factor": 32.0,
            "beta_fast": 32.0,
            "beta_slow": 1.0,
            "original_max_position_embeddings": 4096,
            "truncate": False,
        },
        # Alternating 128-token banded (sliding) and dense layers, sliding first.
        # Every layer also has a learned attention-sink logit per head ("sinks").
        "sliding_window": 128,
        "layer_types": ["sliding_attention", "full_attention"] * (layers // 2),
        "swiglu_limit": 7.0,
        "tie_word_embeddings": False,
        "eos_token_id": 200002,
        "pad_token_id": 199999,
        "quantization_config": {
            "quant_method": "mxfp4",
            "modules_to_not_convert": [
                "model.layers.*.self_attn",
                "model.layers.*.mlp.router",
                "model.embed_tokens",
                "lm_head",
            ],
        },
        "torch_dtype": "bfloat16",
    }


MODELS: dict[str, dict[str, Any]] = {
    "llama-3.1-8b": _llama(hidden=4096, inter=14336, layers=32, heads=32),
    "llama-3.1-70b": _llama(hidden=8192, inter=28672, layers=80, heads=64),
    "qwen3-30b-a3b": _qwen3_moe(hidden=2048, inter=6144, moe_inter=768, layers=48, heads=32),
    "qwen3-235b-a22b": _qwen3_moe(hidden=4096, inter=12288, moe_inter=1536, layers=94, heads=64),
    "gpt-oss-20b": _gpt_oss(layers=24, experts=32),
    "gpt-oss-120b": _gpt_oss(layers=36, experts=128),
}


def hardware(name: str) -> Hardware:
    """The catalog entry for ``name`` (e.g. "dgx-spark")."""
    return _lookup(HARDWARE, name, "hardware")


def link(name: str) -> Link:
    """The catalog entry for ``name`` (e.g. "10gbe")."""
    return _lookup(LINKS, name, "link")


def model_config(name_or_path: str | Path) -> dict[str, Any]:
    """A model's config.json dict: a catalog name, or a path to a config.json
    or to a folder holding one. Returns a copy the caller may change."""
    key = str(name_or_path)
    if key in MODELS:
        return copy.deepcopy(MODELS[key])
    path = Path(name_or_path)
    if path.is_dir():
        path = path / "config.json"
    if path.is_file():
        return _read_config(path)
    raise CatalogError(
        f"unknown model {key!r}: not in the catalog and no config.json at that path; "
        f"known models: {', '.join(MODELS)}"
    )


def _read_config(path: Path) -> dict[str, Any]:
    """``path``'s config dict, checked against the cost model; CatalogError naming the path if unusable."""
    try:
        config = json.loads(path.read_text())
    except (ValueError, OSError) as e:  # JSONDecodeError, UnicodeDecodeError, unreadable
        raise CatalogError(f"model config {path} is not readable JSON: {e}") from None
    if not isinstance(config, dict):
        raise CatalogError(f"model config {path} is not a JSON object")
    try:
        model_cost(config)
    except (ValueError, KeyError, TypeError) as e:
        why = f"lacks {e}" if isinstance(e, KeyError) else str(e)
        raise CatalogError(f"model config {path}: {why}") from None
    return config


def model(name_or_path: str | Path) -> ModelCost:
    """The ModelCost of a catalog model name or a config.json path."""
    name = str(name_or_path) if str(name_or_path) in MODELS else None
    return model_cost(model_config(name_or_path), name=name)


def _lookup(table: dict[str, Any], name: str, kind: str) -> Any:
    if name not in table:
        raise CatalogError(f"unknown {kind} {name!r}; known {kind}: {', '.join(table)}")
    return table[name]


# llama.cpp, gpt-oss-120b MXFP4, `llama-bench -p 2048 -n 32 -d D` (-fa 1, -ub 2048):
# depth, prefill tok/s, decode tok/s. Source: docs/catalog.md.
_LLAMACPP_SOURCE = (
    "llama.cpp gpt-oss-120b MXFP4 llama-bench -p 2048 -n 32 -d D (ggml-org/llama.cpp discussion #16578)"
)
_LLAMACPP_ROWS: dict[str, tuple[tuple[int, float, float], ...]] = {
    "dgx-spark": (
        (0, 1689.47, 52.87),
        (4096, 1733.41, 51.02),
        (8192, 1705.93, 48.46),
        (16384, 1514.78, 44.78),
        (32768, 1221.23, 38.76),
    ),
    "mac-m4-max": (
        (0, 871.16, 62.85),
        (4096, 643.32, 56.48),
        (8192, 516.77, 50.79),
        (16384, 351.42, 46.20),
        (32768, 235.87, 40.22),
    ),
}
LLAMACPP_GPT_OSS_120B: dict[str, BenchTable] = {
    device: BenchTable(
        hardware=HARDWARE[device],
        model=model_cost(MODELS["gpt-oss-120b"], name="gpt-oss-120b"),
        engine="llamacpp",
        rows=tuple(BenchRow(d, pp, tg) for d, pp, tg in rows),
        num_prompt=2048,
        num_gen=32,
        source=_LLAMACPP_SOURCE,
    )
    for device, rows in _LLAMACPP_ROWS.items()
}
