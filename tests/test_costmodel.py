"""Cost model: parameter and KV counts against hand counts, prefill, decode and
transfer times against hand computation (one dense, one MoE model), the llama.cpp
calibration and its 20-figure reproduction, and the physics DESIGN relies on."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from scheduler import catalog
from scheduler.catalog import CatalogError
from scheduler.costmodel import (
    CALIBRATED,
    GENERIC,
    WEIGHT_BITS,
    BenchRow,
    Efficiency,
    Hardware,
    Link,
    attention_flops,
    calibrate,
    decode_time,
    efficiency,
    exposed_transfer,
    kv_bytes,
    kv_bytes_per_token,
    kv_wire_bytes_per_layer,
    linear_flops,
    model_cost,
    predict_row,
    prefill_compute_time,
    prefill_floor_time,
    prefill_time,
    transfer_time,
)

KIB = 1024
LLAMA = catalog.model("llama-3.1-8b")
PROMPT = 8192


# ---------------------------------------------------------------- counts


def test_llama_3_1_8b_params_and_kv_match_hand_count() -> None:
    h, inter, layers, vocab, q, kv = 4096, 14336, 32, 128256, 32 * 128, 8 * 128
    per_layer = h * q + 2 * h * kv + q * h + 3 * h * inter + 2 * h  # attention, MLP, two norms
    assert LLAMA.total_params == 2 * vocab * h + layers * per_layer + h == 8_030_261_248
    assert LLAMA.active_params == LLAMA.total_params  # dense
    # 2 (K and V) x 8 kv heads x 128 head_dim x 32 layers x 2 bytes (bf16)
    assert kv_bytes_per_token(LLAMA) == 2 * 8 * 128 * 32 * 2 == 128 * KIB
    assert kv_bytes(LLAMA, PROMPT) == PROMPT * 128 * KIB  # no sliding layers: linear in tokens


def test_qwen3_30b_a3b_moe_total_and_active_match_hand_count() -> None:
    model = catalog.model("qwen3-30b-a3b")
    h, layers, vocab, experts, k = 2048, 48, 151936, 128, 8
    attn = h * 32 * 128 + 2 * h * 4 * 128 + 32 * 128 * h + 2 * 128  # q, k, v, o, q_norm/k_norm
    expert = 3 * h * 768
    shared = attn + 2 * h + h * experts  # norms and router
    assert model.total_params == 2 * vocab * h + layers * (shared + experts * expert) + h
    assert model.active_params == 2 * vocab * h + layers * (shared + k * expert) + h
    assert model.total_params / 1e9 == pytest.approx(30.5, abs=0.05)  # model card: 30.5 B total
    assert model.active_params / 1e9 == pytest.approx(3.3, abs=0.06)  # model card: 3.3 B activated
    assert kv_bytes_per_token(model) == 2 * 4 * 128 * 48 * 2


@pytest.mark.parametrize(
    "name, total_b, active_b",
    [("gpt-oss-120b", 116.83, 5.13), ("gpt-oss-20b", 20.91, 3.61)],
)
def test_gpt_oss_counts_match_openai_model_card(name: str, total_b: float, active_b: float) -> None:
    model = catalog.model(name)
    assert model.total_params / 1e9 == pytest.approx(total_b, abs=0.01)
    # OpenAI's "active" leaves the input embedding table out.
    assert (model.active_params - model.embedding_params) / 1e9 == pytest.approx(active_b, abs=0.01)


def test_gpt_oss_weight_bytes_use_mxfp4_experts_and_bf16_elsewhere() -> None:
    model = catalog.model("gpt-oss-120b")
    assert (model.dense_format, model.expert_format, model.weight_format) == ("bf16", "mxfp4", "mxfp4")
    experts = model.num_moe_layers * model.num_experts * model.expert_params
    expected = experts * 4.25 / 8 + (model.total_params - experts) * 2
    assert model.total_weight_bytes == pytest.approx(expected)
    assert WEIGHT_BITS["mxfp4"] == 4.25 and WEIGHT_BITS["int4"] == 4.5


def test_sliding_window_layers_hold_at_most_their_window() -> None:
    model = catalog.model("gpt-oss-120b")  # 18 sliding (128) + 18 full layers, 2 KiB each per token
    per_layer_token = 2 * 8 * 64 * 2
    assert kv_bytes_per_token(model, 64) == 36 * per_layer_token == 72 * KIB
    assert kv_bytes(model, PROMPT) == 18 * PROMPT * per_layer_token + 18 * 128 * per_layer_token
    assert kv_bytes_per_token(model, 32768) < kv_bytes_per_token(model, 1024) < kv_bytes_per_token(model, 64)


@pytest.mark.parametrize("name, layers, experts", [("gpt-oss-120b", 36, 128), ("gpt-oss-20b", 24, 32)])
def test_gpt_oss_kv_bytes_at_a_prompt_length_by_hand(name: str, layers: int, experts: int) -> None:
    # The catalog's configs are OpenAI's: 64 query / 8 KV heads of 64, hidden 2880,
    # top-4 routing, sliding window 128 on every other layer (sliding first).
    config = catalog.model_config(name)
    assert (config["num_hidden_layers"], config["num_local_experts"], config["num_experts_per_tok"]) == \
        (layers, experts, 4)
    assert (config["num_attention_heads"], config["num_key_value_heads"], config["head_dim"],
            config["hidden_size"], config["sliding_window"]) == (64, 8, 64, 2880, 128)
    model = catalog.model(name)
    assert model.layer_windows == (128, None) * (layers // 2)
    assert (model.kv_heads, model.head_dim) == (8, 64)
    # 5,000 tokens: a full layer holds all 5,000, a sliding one its last 128;
    # K and V x 8 heads x 64 dims x 2 bytes = 2,048 bytes per token per layer.
    full, sliding = layers // 2 * 5000 * 2048, layers // 2 * 128 * 2048
    assert kv_bytes(model, 5000) == full + sliding
    assert kv_bytes_per_token(model, 5000) == pytest.approx((full + sliding) / 5000)
    if name == "gpt-oss-120b":
        # 18 x 5,000 x 2,048 + 18 x 128 x 2,048 = 184,320,000 + 4,718,592 (all 36 full: 368,640,000)
        assert kv_bytes(model, 5000) == 189_038_592
    # The transfer ships the same windows, and attention counts each layer's own window.
    assert sum(kv_wire_bytes_per_layer(model, 5000)) == kv_bytes(model, 5000)
    pairs = layers // 2 * (5000 * 5001 // 2) + layers // 2 * (128 * 129 // 2 + (5000 - 128) * 128)
    assert attention_flops(model, 5000) == pairs * 4 * 64 * 64


def test_gemma_windows_come_from_layer_types_the_pattern_or_gemma2s_alternation() -> None:
    base = {"hidden_size": 1152, "num_hidden_layers": 6, "num_attention_heads": 4, "num_key_value_heads": 1,
            "head_dim": 256, "vocab_size": 1000, "intermediate_size": 6912, "sliding_window": 512}
    gemma2 = model_cost({**base, "model_type": "gemma2"})  # no key says which: even layers slide
    assert gemma2.layer_windows == (512, None, 512, None, 512, None)
    gemma3 = model_cost({**base, "model_type": "gemma3_text", "sliding_window_pattern": 6})
    assert gemma3.layer_windows == (512,) * 5 + (None,)
    types = ["sliding_attention"] * 5 + ["full_attention"]
    assert model_cost({**base, "model_type": "gemma3_text", "layer_types": types}).layer_windows == \
        gemma3.layer_windows
    # Gemma 3 4B and up nest the language model under text_config.
    nested = model_cost({"model_type": "gemma3", "architectures": ["Gemma3ForConditionalGeneration"],
                         "text_config": {**base, "model_type": "gemma3_text", "layer_types": types}})
    assert nested.layer_windows == gemma3.layer_windows and nested.num_layers == 6
    per_token_layer = 2 * 1 * 256 * 2
    assert kv_bytes(gemma3, 4096) == (5 * 512 + 4096) * per_token_layer


def test_sliding_window_flags_follow_the_config() -> None:
    base = catalog.model_config("llama-3.1-8b")
    mistral = model_cost({**base, "sliding_window": 4096})  # every layer slides
    assert kv_bytes(mistral, 10_000) == kv_bytes(LLAMA, 4096)
    off = model_cost({**base, "sliding_window": 4096, "use_sliding_window": False})
    assert kv_bytes(off, 10_000) == kv_bytes(LLAMA, 10_000)
    gemma_like = model_cost({**base, "sliding_window": 1024, "sliding_window_pattern": 4})
    assert gemma_like.layer_windows.count(None) == 8


DEEPSEEK_V3 = {
    "model_type": "deepseek_v3",
    "hidden_size": 7168,
    "num_hidden_layers": 61,
    "num_attention_heads": 128,
    "num_key_value_heads": 128,
    "q_lora_rank": 1536,
    "kv_lora_rank": 512,
    "qk_nope_head_dim": 128,
    "qk_rope_head_dim": 64,
    "v_head_dim": 128,
    "intermediate_size": 18432,
    "moe_intermediate_size": 2048,
    "n_routed_experts": 256,
    "n_shared_experts": 1,
    "num_experts_per_tok": 8,
    "first_k_dense_replace": 3,
    "moe_layer_freq": 1,
    "vocab_size": 129280,
    "tie_word_embeddings": False,
    "torch_dtype": "bfloat16",
}


def test_mla_caches_the_latent_and_rope_key_per_layer() -> None:
    model = model_cost(DEEPSEEK_V3)
    # (kv_lora_rank 512 + qk_rope_head_dim 64) x 61 layers x 2 bytes, not 2 x 128 heads x 128
    assert kv_bytes_per_token(model) == (512 + 64) * 61 * 2 == 70_272
    assert model.num_moe_layers == 58
    assert model.total_params / 1e9 == pytest.approx(671, rel=0.005)  # model card: 671 B
    assert model.active_params / 1e9 == pytest.approx(37, rel=0.03)  # model card: 37 B activated


def test_attention_flops_count_causal_pairs_per_layer() -> None:
    pair = 4 * 32 * 128  # QK^T + PV per (query, key) pair per layer
    assert attention_flops(LLAMA, 1, 999) == 32 * 1000 * pair  # one decode token sees 1000 keys
    assert attention_flops(LLAMA, 4, 0) == 32 * (1 + 2 + 3 + 4) * pair
    oss = catalog.model("gpt-oss-120b")
    per = 4 * 64 * 64
    assert attention_flops(oss, 1, 10_000) == (18 * 10_001 + 18 * 128) * per


# ---------------------------------------------------------------- times against hand computation
#
# Every expected value below is worked out from the config numbers, step by step,
# on made-up hardware with round figures, so each line can be checked by hand.

# 100 TFLOPS = 1e14 FLOP/s peak; 1000 GB/s = 1e12 B/s peak.
ROUND = Hardware("round", tflops=100.0, mem_bw_gbps=1000.0, mem_gb=80.0)
# Achieved: weight matmuls 0.5 x 1e14 = 5e13 FLOP/s; attention 0.25 x 1e14 = 2.5e13 FLOP/s;
# weight reads 0.5 x 1e12 = 5e11 B/s; KV reads 0.25 x 1e12 = 2.5e11 B/s.
HALF = Efficiency(compute=0.5, attention=0.25, bandwidth=0.5, kv_bandwidth=0.25)
# The same memory with 0.2 TFLOPS: 0.5 x 2e11 = 1e11 FLOP/s, so a decode step's FLOPs outlast its reads.
FLOP_STARVED = Hardware("flop-starved", tflops=0.2, mem_bw_gbps=1000.0, mem_gb=80.0)
# 8 Gb/s line with half of it payload: 8e9 / 8 x 0.5 = 5e8 B/s, 1 ms latency.
HALF_8G = Link("half-8g", gbit_s=8.0, latency_s=1e-3, payload_efficiency=0.5)

# llama-3.1-8b (dense): hidden 4096, intermediate 14336, 32 layers, 32 query heads and
# 8 KV heads of head_dim 128, vocab 128256, untied lm_head, bf16 = 2 bytes per weight.
L8_LAYER = (
    4096 * 32 * 128  # q_proj
    + 2 * 4096 * 8 * 128  # k_proj, v_proj
    + 32 * 128 * 4096  # o_proj
    + 3 * 4096 * 14336  # gate, up, down
    + 2 * 4096  # two RMSNorms
)  # = 218_112_000
L8_LAYERS = 32 * L8_LAYER + 4096  # + final norm = 6_979_588_096
L8_LM_HEAD = 128256 * 4096  # = 525_336_576
L8_PAIR_FLOPS = 32 * 4 * 32 * 128  # per (query, key) pair, all 32 layers: QK^T + PV, 2 x 2 x q_dim = 524_288
L8_KV_PER_TOKEN = 32 * 2 * 8 * 128 * 2  # bytes, all layers: K and V x 8 heads x 128 x bf16 = 131_072
L8_DECODE_BYTES = (L8_LAYERS + L8_LM_HEAD) * 2  # layers + lm_head in bf16 = 15_009_849_344

# qwen3-30b-a3b (MoE): hidden 2048, 48 layers, 32 query heads and 4 KV heads of 128,
# 128 routed experts of moe_intermediate 768, 8 per token, vocab 151936, untied, bf16.
Q3_LAYER_DENSE = (
    2048 * 32 * 128  # q_proj
    + 2 * 2048 * 4 * 128  # k_proj, v_proj
    + 32 * 128 * 2048  # o_proj
    + 2 * 128  # q_norm, k_norm (per head_dim)
    + 2 * 2048  # two RMSNorms
    + 2048 * 128  # router
)  # = 19_140_864
Q3_LAYERS = 48 * Q3_LAYER_DENSE + 2048  # + final norm = 918_763_520
Q3_EXPERT = 3 * 2048 * 768  # gate, up, down of one expert = 4_718_592
Q3_ACTIVE_EXPERTS = 48 * 8 * Q3_EXPERT  # 8 experts per token in each of 48 layers = 1_811_939_328
Q3_LM_HEAD = 151936 * 2048  # = 311_164_928
Q3_PAIR_FLOPS = 48 * 4 * 32 * 128  # = 786_432
Q3_KV_PER_TOKEN = 48 * 2 * 4 * 128 * 2  # = 98_304
Q3_DENSE_BYTES = (Q3_LAYERS + Q3_LM_HEAD) * 2  # = 2_459_856_896
Q3_DECODE_BYTES = Q3_DENSE_BYTES + Q3_ACTIVE_EXPERTS * 2  # + 8 experts a layer = 6_083_735_552

QWEN3 = catalog.model("qwen3-30b-a3b")


def test_hand_counts_behind_the_time_tests_match_the_model() -> None:
    assert (LLAMA.layer_active_params, LLAMA.unembedding_params) == (L8_LAYERS, L8_LM_HEAD) == (
        6_979_588_096, 525_336_576)
    assert LLAMA.decode_weight_bytes == L8_DECODE_BYTES == 15_009_849_344
    assert (QWEN3.layer_params, QWEN3.expert_params) == (Q3_LAYERS, Q3_EXPERT) == (918_763_520, 4_718_592)
    assert QWEN3.layer_active_params == Q3_LAYERS + Q3_ACTIVE_EXPERTS == 2_730_702_848
    assert QWEN3.decode_weight_bytes == Q3_DECODE_BYTES == 6_083_735_552


def test_lm_head_flops_are_counted_once_per_prefill() -> None:
    # 2 FLOPs per layer weight per token, and 2 per lm_head weight for the last token only.
    assert linear_flops(LLAMA, 1) == 2 * (L8_LAYERS + L8_LM_HEAD) == 15_009_849_344
    assert linear_flops(LLAMA, 1000) == 2 * (1000 * L8_LAYERS + L8_LM_HEAD) == 13_960_226_865_152
    assert linear_flops(QWEN3, 1) == 2 * (Q3_LAYERS + Q3_ACTIVE_EXPERTS + Q3_LM_HEAD) == 6_083_735_552


def test_llama_prefill_is_compute_bound_at_the_hand_computed_time() -> None:
    # 1000 new tokens, nothing cached.
    linear = 2 * (1000 * L8_LAYERS + L8_LM_HEAD)  # 13_960_226_865_152 FLOPs
    linear_s = linear / 5e13  # 0.27920453730304 s
    attention = 1000 * 1001 // 2 * L8_PAIR_FLOPS  # 500_500 causal pairs -> 262_406_144_000 FLOPs
    attention_s = attention / 2.5e13  # 0.01049624576 s
    assert linear_s + attention_s == pytest.approx(0.28970078306304, rel=1e-12)
    # Floor: weights and lm_head once, plus the KV of 1000 tokens: 15_140_921_344 B / 5e11.
    floor_s = (L8_DECODE_BYTES + 1000 * L8_KV_PER_TOKEN) / 5e11
    assert floor_s == pytest.approx(0.030281842688, rel=1e-12)
    assert prefill_compute_time(LLAMA, ROUND, HALF, 1000) == pytest.approx(0.28970078306304, rel=1e-12)
    assert prefill_floor_time(LLAMA, ROUND, HALF, 1000) == pytest.approx(0.030281842688, rel=1e-12)
    assert prefill_time(LLAMA, ROUND, HALF, 1000) == pytest.approx(0.28970078306304, rel=1e-12)


def test_llama_short_prefill_on_a_long_context_is_floored_by_reads() -> None:
    # 10 new tokens on 990 cached.
    linear_s = 2 * (10 * L8_LAYERS + L8_LM_HEAD) / 5e13  # 140_642_435_072 FLOPs -> 0.00281284870144 s
    pairs = 1000 * 1001 // 2 - 990 * 991 // 2  # 500_500 - 490_545 = 9_955 new causal pairs
    attention_s = pairs * L8_PAIR_FLOPS / 2.5e13  # 5_219_287_040 FLOPs -> 0.0002087714816 s
    assert linear_s + attention_s == pytest.approx(0.00302162018304, rel=1e-12)
    floor_s = (L8_DECODE_BYTES + 1000 * L8_KV_PER_TOKEN) / 5e11  # all weights + KV of the 1000-token context
    assert floor_s == pytest.approx(0.030281842688, rel=1e-12)
    assert prefill_compute_time(LLAMA, ROUND, HALF, 10, 990) == pytest.approx(0.00302162018304, rel=1e-12)
    assert prefill_time(LLAMA, ROUND, HALF, 10, 990) == pytest.approx(0.030281842688, rel=1e-12)


def test_llama_decode_is_read_bound_and_then_flop_bound_on_a_flop_starved_device() -> None:
    # One token at depth 999: the new token attends to 1000 positions, reads 1000 tokens of KV.
    weights_s = L8_DECODE_BYTES / 5e11  # 0.030019698688 s
    kv_s = 1000 * L8_KV_PER_TOKEN / 2.5e11  # 131_072_000 B -> 0.000524288 s
    assert weights_s + kv_s == pytest.approx(0.030543986688, rel=1e-12)
    flops = 2 * (L8_LAYERS + L8_LM_HEAD) + 1000 * L8_PAIR_FLOPS  # 15_534_137_344 FLOPs
    assert flops / 5e13 == pytest.approx(0.00031068274688, rel=1e-12)  # far below the reads
    assert decode_time(LLAMA, ROUND, HALF, 999) == pytest.approx(0.030543986688, rel=1e-12)
    # At 1e11 FLOP/s the same FLOPs take 0.15534137344 s, five times the reads: the floor binds.
    assert flops / 1e11 == pytest.approx(0.15534137344, rel=1e-12)
    assert decode_time(LLAMA, FLOP_STARVED, HALF, 999) == pytest.approx(0.15534137344, rel=1e-12)


def test_llama_transfer_and_exposed_transfer_include_the_latency() -> None:
    kv = 1000 * L8_KV_PER_TOKEN  # 131_072_000 B
    assert kv_bytes(LLAMA, 1000) == kv
    # 131_072_000 B / 5e8 B/s = 0.262144 s on the wire, + 1 ms latency.
    assert transfer_time(kv, HALF_8G) == pytest.approx(0.263144, rel=1e-12)
    # Streamed per layer (32 slices of 0.008192 s): a 0.032 s prefill readies a slice every
    # 1 ms, faster than the link drains them, so the link runs from 1 ms to 0.263144 s;
    # exposed = 0.263144 - 0.032 + 0.001 latency = 0.232144 s (= T - P x 31/32 + latency).
    assert exposed_transfer(LLAMA, HALF_8G, 1000, 0.032) == pytest.approx(0.232144, rel=1e-9)
    # A 1 s prefill hides all but the last slice: 0.008192 + 0.001 = 0.009192 s.
    assert exposed_transfer(LLAMA, HALF_8G, 1000, 1.0) == pytest.approx(0.009192, rel=1e-9)


def test_expected_experts_touched_by_n_tokens() -> None:
    # Uniform routing, 8 of 128 per token: an expert is missed by one token with
    # probability 120/128 = 15/16, so n tokens touch 128 x (1 - (15/16)^n) experts.
    assert QWEN3.expected_experts_touched(1) == pytest.approx(8.0, rel=1e-12)  # exactly top-k
    assert QWEN3.expected_experts_touched(2) == pytest.approx(128 * 31 / 256, rel=1e-12)  # 1 - 225/256 -> 15.5
    assert QWEN3.expected_experts_touched(16) == pytest.approx(82.4225113, rel=1e-8)  # (15/16)^16 = 0.356074
    assert QWEN3.expected_experts_touched(4096) == pytest.approx(128.0, rel=1e-12)  # every expert
    assert LLAMA.expected_experts_touched(100) == 0.0  # dense


def test_moe_prefill_floor_reads_only_the_experts_the_prompt_touches() -> None:
    # Two new tokens touch 15.5 experts a layer on average (not 8, not 128).
    experts = 48 * 15.5 * Q3_EXPERT * 2  # 744 expert copies x 4_718_592 x 2 B = 7_021_264_896 B
    floor = Q3_DENSE_BYTES + experts + 2 * Q3_KV_PER_TOKEN  # 9_481_318_400 B
    assert floor / 5e11 == pytest.approx(0.0189626368, rel=1e-12)
    compute_s = 2 * (2 * (Q3_LAYERS + Q3_ACTIVE_EXPERTS) + Q3_LM_HEAD) / 5e13 + 3 * Q3_PAIR_FLOPS / 2.5e13
    assert compute_s == pytest.approx(0.00023090282496 + 9.437184e-08, rel=1e-12)  # far below the floor
    assert prefill_floor_time(QWEN3, ROUND, HALF, 2) == pytest.approx(0.0189626368, rel=1e-12)
    assert prefill_time(QWEN3, ROUND, HALF, 2) == pytest.approx(0.0189626368, rel=1e-12)


def test_moe_prefill_is_compute_bound_at_the_hand_computed_time() -> None:
    # 2000 new tokens: 2 FLOPs per active parameter (8 experts a token) per token, lm_head once.
    linear = 2 * (2000 * (Q3_LAYERS + Q3_ACTIVE_EXPERTS) + Q3_LM_HEAD)  # 10_923_433_721_856 FLOPs
    attention = 2000 * 2001 // 2 * Q3_PAIR_FLOPS  # 2_001_000 pairs -> 1_573_650_432_000 FLOPs
    assert linear / 5e13 + attention / 2.5e13 == pytest.approx(0.21846867443712 + 0.06294601728, rel=1e-12)
    # Floor: 2000 tokens touch all 128 experts (1 - (15/16)^2000 = 1 - 1e-56).
    floor = Q3_DENSE_BYTES + 48 * 128 * Q3_EXPERT * 2 + 2000 * Q3_KV_PER_TOKEN  # 60_638_523_392 B
    assert prefill_floor_time(QWEN3, ROUND, HALF, 2000) == pytest.approx(floor / 5e11, rel=1e-12)  # 0.1213 s
    assert prefill_time(QWEN3, ROUND, HALF, 2000) == pytest.approx(0.28141469171712, rel=1e-12)


def test_moe_decode_reads_eight_experts_and_is_flop_bound_on_a_flop_starved_device() -> None:
    weights_s = Q3_DECODE_BYTES / 5e11  # 0.012167471104 s
    kv_s = 1000 * Q3_KV_PER_TOKEN / 2.5e11  # 98_304_000 B -> 0.000393216 s
    assert weights_s + kv_s == pytest.approx(0.012560687104, rel=1e-12)
    assert decode_time(QWEN3, ROUND, HALF, 999) == pytest.approx(0.012560687104, rel=1e-12)
    flops = 2 * (Q3_LAYERS + Q3_ACTIVE_EXPERTS + Q3_LM_HEAD) + 1000 * Q3_PAIR_FLOPS  # 6_870_167_552
    assert flops / 1e11 == pytest.approx(0.06870167552, rel=1e-12)  # > 0.0126 s of reads
    assert decode_time(QWEN3, FLOP_STARVED, HALF, 999) == pytest.approx(0.06870167552, rel=1e-12)


def test_moe_transfer_and_exposed_transfer_include_the_latency() -> None:
    kv = 1000 * Q3_KV_PER_TOKEN  # 98_304_000 B
    assert transfer_time(kv, HALF_8G) == pytest.approx(0.196608 + 0.001, rel=1e-12)
    # 48 slices of 0.004096 s; a 0.048 s prefill readies one every 1 ms: link-bound.
    # exposed = 0.196608 - 0.048 x 47/48 + 0.001 = 0.150608 s.
    assert exposed_transfer(QWEN3, HALF_8G, 1000, 0.048) == pytest.approx(0.150608, rel=1e-9)
    assert exposed_transfer(QWEN3, HALF_8G, 1000, 1.0) == pytest.approx(0.004096 + 0.001, rel=1e-9)


@pytest.mark.parametrize(
    "fmt, bits, llama_decode_bytes",
    [
        ("fp8", 8.0, 7_504_924_672),  # (L8_LAYERS + L8_LM_HEAD) x 1 byte
        ("int8", 8.0, 7_504_924_672),
        ("int4", 4.5, 4_221_520_128),  # x (32 x 4 + 16) / 32 / 8 = 0.5625 byte
        ("mxfp4", 4.25, 3_986_991_232),  # x (32 x 4 + 8) / 32 / 8 = 0.53125 byte
    ],
)
def test_quantized_formats_store_their_bits_per_weight(fmt: str, bits: float, llama_decode_bytes: int) -> None:
    assert WEIGHT_BITS[fmt] == bits
    model = model_cost(catalog.model_config("llama-3.1-8b"), dense_format=fmt, expert_format=fmt)
    assert model.decode_weight_bytes == llama_decode_bytes == (L8_LAYERS + L8_LM_HEAD) * bits / 8
    # Decode on ROUND at depth 0 reads these bytes at 5e11 B/s plus one token of KV at 2.5e11 B/s.
    assert decode_time(model, ROUND, HALF, 0) == pytest.approx(
        llama_decode_bytes / 5e11 + L8_KV_PER_TOKEN / 2.5e11, rel=1e-12)


# ---------------------------------------------------------------- efficiency and calibration


def test_calibrated_factors_apply_only_to_their_combination() -> None:
    assert efficiency("dgx-spark", "llamacpp", "mxfp4") is CALIBRATED[("dgx-spark", "llamacpp", "mxfp4")]
    assert efficiency("dgx-spark", "vllm", "mxfp4") == GENERIC["mxfp4"]
    assert efficiency("dgx-spark", "llamacpp", "bf16") == GENERIC["bf16"]
    assert efficiency("rtx-4090", "llamacpp", "mxfp4") == GENERIC["mxfp4"]
    with pytest.raises(ValueError, match="q3_k"):
        efficiency("dgx-spark", "llamacpp", "q3_k")


@pytest.mark.parametrize("device", sorted(catalog.LLAMACPP_GPT_OSS_120B))
def test_calibrate_recomputes_the_stored_constants(device: str) -> None:
    table = catalog.LLAMACPP_GPT_OSS_120B[device]
    fitted, stored = calibrate(table), CALIBRATED[table.key]
    for field in ("compute", "attention", "bandwidth", "kv_bandwidth"):
        assert getattr(fitted, field) == pytest.approx(getattr(stored, field), rel=1e-3), field


_CASES = [
    (device, row, phase)
    for device, table in sorted(catalog.LLAMACPP_GPT_OSS_120B.items())
    for row in table.rows
    for phase in ("prefill", "decode")
]


@pytest.mark.parametrize("device, row, phase", _CASES, ids=[f"{d}-d{r.depth}-{p}" for d, r, p in _CASES])
def test_calibrated_model_reproduces_the_llamacpp_table_within_20_percent(
    device: str, row: BenchRow, phase: str
) -> None:
    table = catalog.LLAMACPP_GPT_OSS_120B[device]
    eff = efficiency(device, "llamacpp", table.model.weight_format)
    predicted = predict_row(table.model, table.hardware, eff, row.depth, table.num_prompt, table.num_gen)
    measured_tok_s = row.prefill_tok_s if phase == "prefill" else row.decode_tok_s
    predicted_tok_s = predicted.prefill_tok_s if phase == "prefill" else predicted.decode_tok_s
    assert predicted_tok_s == pytest.approx(measured_tok_s, rel=0.20)


# ggml-org/llama.cpp benches/dgx-spark.md (build 2f68ce7cf, -ub 2048 -fa 1): a later
# build than the calibration table, and a sibling model. Not used by any fit.
_LATER_SPARK = {
    "gpt-oss-120b": [(0, 1937.54, 59.02), (8192, 1580.60, 51.85), (32768, 1155.40, 41.35)],
    "gpt-oss-20b": [(0, 3782.76, 84.10), (8192, 2852.09, 74.00), (32768, 1899.37, 59.85)],
}


@pytest.mark.parametrize("name, tolerance", [("gpt-oss-120b", 0.15), ("gpt-oss-20b", 0.30)])
def test_spark_calibration_carries_to_a_later_build_and_a_sibling_model(name: str, tolerance: float) -> None:
    model, spark = catalog.model(name), catalog.hardware("dgx-spark")
    eff = efficiency("dgx-spark", "llamacpp", model.weight_format)
    for depth, pp, tg in _LATER_SPARK[name]:
        predicted = predict_row(model, spark, eff, depth, 2048, 32)
        assert predicted.prefill_tok_s == pytest.approx(pp, rel=tolerance), depth
        assert predicted.decode_tok_s == pytest.approx(tg, rel=tolerance), depth


def test_calibration_rows_are_compute_bound_and_a_single_token_prefill_is_not() -> None:
    table = catalog.LLAMACPP_GPT_OSS_120B["dgx-spark"]
    eff = efficiency("dgx-spark", "llamacpp", "mxfp4")
    model, spark = table.model, table.hardware
    assert prefill_floor_time(model, spark, eff, 2048) < prefill_compute_time(model, spark, eff, 2048) / 3
    # One prompt token reads the dense weights and 4 experts per layer: bandwidth-bound.
    assert prefill_time(model, spark, eff, 1) == prefill_floor_time(model, spark, eff, 1)
    assert prefill_time(model, spark, eff, 1) == pytest.approx(decode_time(model, spark, eff, 0), rel=0.5)


# ---------------------------------------------------------------- physics DESIGN relies on


def _prefill(device: str) -> float:
    hw = catalog.hardware(device)
    return prefill_time(LLAMA, hw, efficiency(device, "torch", LLAMA.weight_format), PROMPT)


def _decode(device: str) -> float:
    hw = catalog.hardware(device)
    return decode_time(LLAMA, hw, efficiency(device, "mlx", LLAMA.weight_format), PROMPT)


def test_spark_prefills_faster_and_m4_max_decodes_faster() -> None:
    assert _prefill("dgx-spark") * 3 < _prefill("mac-m4-max")
    assert _decode("mac-m4-max") * 1.5 < _decode("dgx-spark")


def test_generic_defaults_land_near_exo_published_prefill_times() -> None:
    # exo: Llama-3.1-8B fp16, 8k-token prompt, 1.47 s on the Spark vs 5.57 s on an M3 Ultra.
    assert _prefill("dgx-spark") == pytest.approx(1.47, rel=0.25)
    assert _prefill("mac-m3-ultra") == pytest.approx(5.57, rel=0.25)


def test_kv_over_10gbe_is_mostly_hidden_behind_spark_prefill() -> None:
    prefill = _prefill("dgx-spark")
    exposed = exposed_transfer(LLAMA, catalog.link("10gbe"), PROMPT, prefill)
    assert exposed < prefill / 20
    assert transfer_time(kv_bytes(LLAMA, PROMPT), catalog.link("10gbe")) > 10 * exposed  # streaming did it


def test_kv_over_1gbe_outlasts_the_macs_own_prefill() -> None:
    # DESIGN's published pair (Spark + M3 Ultra): 1 GiB of KV takes ~9 s on 1 GbE,
    # longer than the Mac prefilling the prompt itself, so colocated wins there.
    gbe = catalog.link("1gbe")
    spark, mac = _prefill("dgx-spark"), _prefill("mac-m3-ultra")
    assert transfer_time(kv_bytes(LLAMA, PROMPT), gbe) > mac
    assert spark + exposed_transfer(LLAMA, gbe, PROMPT, spark) > mac
    assert spark + exposed_transfer(LLAMA, catalog.link("10gbe"), PROMPT, spark) < mac / 2
    # It does not hide: most of the transfer comes after prefill ends.
    assert exposed_transfer(LLAMA, gbe, PROMPT, spark) > 3 * spark


@given(
    num_layers=st.integers(1, 128),
    prefill_s=st.floats(1e-3, 100),
    link_s=st.floats(1e-3, 100),
    latency_s=st.floats(0, 1e-2),
)
def test_exposed_transfer_matches_the_closed_form_for_uniform_layers(
    num_layers: int, prefill_s: float, link_s: float, latency_s: float
) -> None:
    config = {**catalog.model_config("llama-3.1-8b"), "num_hidden_layers": num_layers}
    model = model_cost(config)
    total = kv_bytes(model, 1000)
    link = Link("x", gbit_s=total * 8 / 1e9 / link_s, latency_s=latency_s, payload_efficiency=1.0)
    exposed = exposed_transfer(model, link, 1000, prefill_s)
    closed = max(link_s - prefill_s * (num_layers - 1) / num_layers, link_s / num_layers) + latency_s
    assert exposed == pytest.approx(closed, rel=1e-9, abs=1e-12)
    assert link_s / num_layers + latency_s - 1e-9 <= exposed <= link_s + latency_s + 1e-9
    assert exposed_transfer(model, link, 1000, prefill_s, num_chunks=4) <= exposed + 1e-9


def test_streaming_hides_exactly_when_link_outpaces_kv_production() -> None:
    # DESIGN: hidden iff link bytes/s >= KV bytes per token x prefill tokens/s.
    prefill = _prefill("dgx-spark")
    needed = kv_bytes_per_token(LLAMA) * PROMPT / prefill
    last_slice = kv_bytes(LLAMA, PROMPT) / LLAMA.num_layers
    fast = Link("fast", gbit_s=needed * 1.05 * 8 / 1e9, latency_s=0, payload_efficiency=1.0)
    slow = Link("slow", gbit_s=needed * 0.7 * 8 / 1e9, latency_s=0, payload_efficiency=1.0)
    assert exposed_transfer(LLAMA, fast, PROMPT, prefill) == pytest.approx(last_slice / fast.bytes_per_s)
    assert exposed_transfer(LLAMA, slow, PROMPT, prefill) > 0.2 * prefill


# ---------------------------------------------------------------- catalog lookups


def test_unknown_names_raise_errors_that_name_them_and_list_the_known() -> None:
    with pytest.raises(CatalogError, match=r"'dgx-sprak'.*dgx-spark"):
        catalog.hardware("dgx-sprak")
    with pytest.raises(CatalogError, match=r"'25gbe'.*10gbe"):
        catalog.link("25gbe")
    with pytest.raises(CatalogError, match=r"'llama-9b'.*llama-3.1-8b"):
        catalog.model_config("llama-9b")


def test_model_config_reads_a_config_json_path_or_folder(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text(json.dumps(catalog.model_config("qwen3-30b-a3b")))
    assert catalog.model(tmp_path).total_params == catalog.model("qwen3-30b-a3b").total_params
    assert catalog.model_config(tmp_path / "config.json")["num_experts"] == 128
    catalog.model_config("llama-3.1-8b")["hidden_size"] = 1  # a copy: the catalog is unchanged
    assert catalog.model("llama-3.1-8b").hidden_size == 4096


def test_every_catalog_entry_builds() -> None:
    for name in catalog.MODELS:
        model = catalog.model(name)
        assert model.total_params > model.layer_active_params > 0
    assert {h.name for h in catalog.HARDWARE.values()} >= {"dgx-spark", "mac-m4-max", "mac-m3-ultra", "h100"}
    assert catalog.hardware("dgx-spark").mem_bw_gbps == 273.0


def test_cost_model_imports_nothing_heavy() -> None:
    code = (
        "import sys, scheduler.catalog, scheduler.costmodel\n"
        "heavy = {'torch', 'mlx', 'grpc', 'zeroconf', 'numpy'} & set(sys.modules)\n"
        "assert not heavy, heavy\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).parent.parent)


# ---------------------------------------------------------------- a node's prefill probe


def _probe_points(model, linear_rate: float, attention_rate: float, lengths=(128, 512)) -> list[tuple[int, float]]:
    from scheduler import costmodel

    return [(n, costmodel.linear_flops(model, n) / linear_rate + costmodel.attention_flops(model, n) / attention_rate)
            for n in lengths]


def test_a_two_length_probe_recovers_the_linear_and_attention_rates_that_made_it() -> None:
    from scheduler import costmodel

    model = costmodel.model_cost(catalog.model_config("llama-3.1-8b"))
    probe = costmodel.probed_prefill(model, _probe_points(model, 20e12, 8e12))
    assert probe.fit == "linear and attention"
    assert probe.linear_flops_s == pytest.approx(20e12, rel=1e-9)
    assert probe.attention_flops_s == pytest.approx(8e12, rel=1e-9)
    expected = costmodel.linear_flops(model, 4096) / 20e12 + costmodel.attention_flops(model, 4096, 1024) / 8e12
    assert probe.compute_s(model, 4096, 1024) == pytest.approx(expected, rel=1e-9)


def test_one_length_or_a_fit_that_makes_no_sense_gives_one_rate_over_all_flops() -> None:
    from scheduler import costmodel

    model = costmodel.model_cost(catalog.model_config("llama-3.1-8b"))
    flops = costmodel.linear_flops(model, 256) + costmodel.attention_flops(model, 256)
    one = costmodel.probed_prefill(model, [(256, 0.5)])
    assert (one.fit, one.linear_flops_s, one.attention_flops_s) == ("one rate", flops / 0.5, flops / 0.5)
    # the longer prompt faster than the shorter: no positive pair of rates fits it
    noisy = costmodel.probed_prefill(model, [(128, 0.5), (512, 0.4)])
    assert noisy.fit == "one rate" and noisy.linear_flops_s == noisy.attention_flops_s


@pytest.mark.parametrize("points", [[], [(0, 1.0)], [(128, 0.0)], [(128, float("inf"))]])
def test_a_probe_without_points_or_with_an_impossible_one_is_refused(points: list) -> None:
    from scheduler import costmodel

    model = costmodel.model_cost(catalog.model_config("llama-3.1-8b"))
    with pytest.raises(ValueError, match="probe"):
        costmodel.probed_prefill(model, points)


def test_a_probe_prices_prefill_compute_in_place_of_tflops_and_leaves_decode_alone() -> None:
    from scheduler import costmodel

    model = costmodel.model_cost(catalog.model_config("llama-3.1-8b"))
    hw = costmodel.Hardware("cpu", 0.15, 20.0, 64.0)  # a matmul-measured CPU
    eff = costmodel.MEASURED
    probed = costmodel.with_probe(eff, model, _probe_points(model, 0.02e12, 0.01e12))
    assert costmodel.with_probe(eff, model, []) is eff  # no probe (declared profiles): today's arithmetic
    n = 1000
    want = costmodel.linear_flops(model, n) / 0.02e12 + costmodel.attention_flops(model, n) / 0.01e12
    assert costmodel.prefill_compute_time(model, hw, probed, n) == pytest.approx(want, rel=1e-9)
    assert costmodel.prefill_time(model, hw, probed, n) == max(
        costmodel.prefill_compute_time(model, hw, probed, n), costmodel.prefill_floor_time(model, hw, probed, n))
    assert costmodel.request_cost(model, hw, probed, n).prefill_s == costmodel.prefill_time(model, hw, probed, n)
    assert costmodel.decode_time(model, hw, probed, n) == costmodel.decode_time(model, hw, eff, n)
    assert costmodel.prefill_compute_time(model, hw, eff, n) != pytest.approx(want, rel=0.2)
