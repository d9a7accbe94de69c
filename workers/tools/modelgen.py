"""Tiny Hugging Face-format checkpoints from seeded random weights.

``make_model`` writes a directory that both ``transformers`` and ``mlx_lm``
load as an ordinary local checkpoint: ``config.json``, ``model.safetensors``,
a byte-level BPE tokenizer with a ChatML chat template, and a generation
config. Nothing is downloaded; the weights are ``numpy.random.default_rng``
normals and the tokenizer is trained on a corpus embedded below.

This module runs in the scheduler's base install, so it imports numpy,
safetensors and tokenizers only (never torch, mlx or transformers).

Invariants:

* Same ``(arch, seed, preset)`` gives byte-identical files.
* Weight names are exactly the Hugging Face checkpoint names for ``arch``.
* Greedy decoding is decisive: ``lm_head`` has a larger std than the other
  projections, so top-1/top-2 logit gaps dwarf fp32 noise between engines.
* Embedding and ``lm_head`` rows past the tokenizer's vocabulary are zero, so
  padding ids never win an argmax (the top real logit is always well above 0).
"""
from __future__ import annotations

import json
import math
from collections.abc import Iterator
from pathlib import Path

import numpy as np
from safetensors.numpy import save_file
from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

from workers.tools.mxfp4 import QUANTIZATION_CONFIG as MXFP4_CONFIG
from workers.tools.mxfp4 import quantize as mxfp4_quantize

ARCHES: tuple[str, ...] = ("llama", "mistral", "qwen2", "qwen3", "qwen3_moe", "gpt_oss", "gemma3")
# The architectures with sliding-window layers (``KVLayout.windows``).
WINDOWED_ARCHES: tuple[str, ...] = ("gpt_oss", "gemma3")

# head_dim is always hidden_size // num_attention_heads: mlx-lm's qwen2 derives
# it that way instead of reading config.head_dim. The sliding window (gpt_oss,
# gemma3) is above the 107 tokens the batching tests reach and below the
# 300-token prompt of the handoff matrix, whose first 128-token chunk it cuts:
# the standard check thereby ships a clipped chunk, a whole one and a tail.
PRESETS: dict[str, dict] = {
    "tiny": dict(
        hidden_size=64, num_hidden_layers=4, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, intermediate_size=128,
        num_experts=4, num_experts_per_tok=2, moe_intermediate_size=64,
        sliding_window=256,
    ),
    "small": dict(
        hidden_size=768, num_hidden_layers=12, num_attention_heads=12,
        num_key_value_heads=4, head_dim=64, intermediate_size=2048,
        num_experts=4, num_experts_per_tok=2, moe_intermediate_size=1024,
        sliding_window=256,
    ),
}

SPECIAL_TOKENS: tuple[str, ...] = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")
BOS_TOKEN, PAD_TOKEN, EOS_TOKEN = "<|endoftext|>", "<|endoftext|>", "<|im_end|>"
TOKENIZER_VOCAB_TARGET = 1100  # the corpus supports up to ~1150
VOCAB_MULTIPLE = 64
MAX_POSITIONS = 8192
ROPE_THETA = 10000.0
RMS_NORM_EPS = 1e-6
LM_HEAD_GAIN = 4.0  # logits ~ N(0, LM_HEAD_GAIN^2) for a unit-RMS final hidden state

PRETOKENIZE_REGEX = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"""
    r"""| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""
)
# ChatML, with tools in the hermes/Qwen2.5 format: with ``tools`` the system turn
# lists them in <tools></tools> and asks for <tool_call>{"name", "arguments"}</tool_call>;
# an assistant turn's tool_calls render that way and "tool" results go in a user
# turn as <tool_response>. Without tools a conversation renders as plain ChatML.
# (One line per statement here; the lines are joined without separators.)
_CHAT_TEMPLATE_LINES = r"""
{%- if tools %}
{{- '<|im_start|>system\n' }}
{%- if messages[0]['role'] == 'system' %}{{- messages[0]['content'] + '\n\n' }}{%- endif %}
{{- '# Tools\n\nYou may call one or more functions to assist with the user query.\n\n' }}
{{- 'You are provided with function signatures within <tools></tools> XML tags:\n<tools>' }}
{%- for tool in tools %}{{- '\n' + (tool | tojson) }}{%- endfor %}
{{- '\n</tools>\n\nFor each function call, return a json object with function name and arguments ' }}
{{- 'within <tool_call></tool_call> XML tags:\n<tool_call>\n{"name": <function-name>, ' }}
{{- '"arguments": <args-json-object>}\n</tool_call><|im_end|>\n' }}
{%- endif %}
{%- for message in messages %}
{%- if message['role'] == 'system' and tools and loop.first %}
{%- elif message['role'] == 'assistant' and message.get('tool_calls') %}
{{- '<|im_start|>assistant' }}{%- if message['content'] %}{{- '\n' + message['content'] }}{%- endif %}
{%- for call in message['tool_calls'] %}
{%- set fn = call['function'] if call.get('function') else call %}
{%- set args = fn['arguments'] if fn['arguments'] is string else fn['arguments'] | tojson %}
{{- '\n<tool_call>\n{"name": "' + fn['name'] + '", "arguments": ' + args + '}\n</tool_call>' }}
{%- endfor %}
{{- '<|im_end|>\n' }}
{%- elif message['role'] == 'tool' %}
{%- if loop.first or messages[loop.index0 - 1]['role'] != 'tool' %}{{- '<|im_start|>user' }}{%- endif %}
{{- '\n<tool_response>\n' + message['content'] + '\n</tool_response>' }}
{%- if loop.last or messages[loop.index0 + 1]['role'] != 'tool' %}{{- '<|im_end|>\n' }}{%- endif %}
{%- else %}
{{- '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}
{%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}{{- '<|im_start|>assistant\n' }}{%- endif %}
"""
CHAT_TEMPLATE = "".join(line.strip() for line in _CHAT_TEMPLATE_LINES.splitlines())

_ARCHITECTURES: dict[str, str] = {
    "llama": "LlamaForCausalLM",
    "mistral": "MistralForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "qwen3": "Qwen3ForCausalLM",
    "qwen3_moe": "Qwen3MoeForCausalLM",
    "gpt_oss": "GptOssForCausalLM",
    "gemma3": "Gemma3ForCausalLM",
}
# config.json's model_type where it is not the arch's name: gemma3 is the
# text-only model (transformers' Gemma3ForCausalLM, mlx-lm's gemma3_text).
MODEL_TYPES: dict[str, str] = {"gemma3": "gemma3_text"}

_CORPUS = '''
The quick brown fox jumps over the lazy dog. A journey of a thousand miles begins with a single
step. Once upon a time, in a small village by the sea, there lived an old fisherman who went out
every morning before the sun rose. He would row his little boat past the rocks, cast his nets
into the water, and wait patiently while the gulls circled overhead. Some days the sea was
generous and some days it was not, but he always came home with a story.

Large language models read text as a sequence of tokens. During prefill the model processes the
whole prompt at once and fills a key-value cache; during decode it produces one new token at a
time, reading that cache at every step. Prefill is limited by compute, while decode is limited
by memory bandwidth. Splitting the two phases across different machines lets each one do the
work it is best at: a graphics card for the prompt, a laptop with fast unified memory for the
answer. The cache moves between them layer by layer.

Weather report: cloudy in the morning with light rain in the afternoon. The temperature will
reach eighteen degrees, and winds from the west will be moderate. Tomorrow should be sunny and
warmer, a good day for a walk in the park, a picnic with friends, or reading a book under a
tree.

Question: What is the capital of France? Answer: The capital of France is Paris. Question: How
many days are in a week? Answer: There are seven days in a week. Question: Why is the sky blue?
Answer: Sunlight is scattered by the air, and blue light is scattered more than red light.

def fibonacci(n: int) -> list[int]:
    """Return the first n Fibonacci numbers."""
    result = [0, 1]
    while len(result) < n:
        result.append(result[-1] + result[-2])
    return result[:n]


class Scheduler:
    def __init__(self, nodes, policy):
        self.nodes = list(nodes)
        self.policy = policy
        self.queue = []

    def schedule(self, request):
        for node in self.nodes:
            if node.can_allocate(request.num_tokens):
                return node.allocate(request)
        self.queue.append(request)
        return None

for i in range(10):
    if i % 2 == 0:
        print(f"{i} is even")
    else:
        print(f"{i} is odd")

import numpy as np
x = np.zeros((4, 16), dtype=np.float32)
y = x.reshape(2, 2, 16).sum(axis=-1)

The library opened at nine and closed at six. Students came to study for their examinations,
children gathered around the storyteller on Saturday afternoons, and a retired engineer spent
every Tuesday repairing the clock in the tower. Nobody remembered when the clock had last shown
the correct time, but everybody agreed that the sound of its bell was beautiful.

To bake bread, mix flour, water, salt and yeast in a large bowl. Knead the dough for ten minutes
until it is smooth and elastic, then cover it and let it rise in a warm place for about an hour.
Shape the loaf, let it rise again, and bake it in a hot oven until the crust is golden brown and
sounds hollow.

async def handle(reader, writer):
    data = await reader.read(1024)
    message = data.decode("utf-8").strip()
    writer.write(message.upper().encode())
    await writer.drain()
    writer.close()

SELECT name, count(*) AS total FROM orders WHERE status = 'shipped'
GROUP BY name ORDER BY total DESC LIMIT 10;

{"model": "tiny", "layers": 4, "heads": [4, 2], "ok": true, "score": 0.95}
'''


def build_tokenizer() -> Tokenizer:
    """Train the byte-level BPE tokenizer on the embedded corpus.

    Deterministic: two builds serialize to identical ``tokenizer.json`` bytes.
    Special tokens take ids 0, 1, 2 in ``SPECIAL_TOKENS`` order.
    """
    # The pipeline is Qwen2Tokenizer's: transformers 5 rebuilds that class
    # from vocab + merges for model_type "qwen2", ignoring tokenizer.json's
    # pipeline, so any other pipeline would give that arch different ids.
    tokenizer = Tokenizer(models.BPE())
    tokenizer.normalizer = normalizers.NFC()
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(PRETOKENIZE_REGEX), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=TOKENIZER_VOCAB_TARGET,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(_CORPUS.splitlines(keepends=True), trainer=trainer)
    return tokenizer


def make_model(
    out_dir: str | Path,
    arch: str,
    seed: int = 0,
    preset: str = "tiny",
    progress: bool = False,
    mxfp4: bool = False,
) -> Path:
    """Write a random-weight ``arch`` checkpoint of size ``preset`` into ``out_dir``.

    Creates ``out_dir`` if needed and overwrites only the files it writes.
    Raises ``ValueError`` for an unknown ``arch`` or ``preset``. With
    ``progress`` a tqdm bar tracks weight generation. ``mxfp4`` (gpt_oss
    only) stores the MoE experts as the released checkpoints do, MXFP4 blocks
    and scales (``workers/tools/mxfp4.py``). Returns ``out_dir``.
    """
    _check_choice("arch", arch, ARCHES)
    _check_choice("preset", preset, tuple(PRESETS))
    if mxfp4 and arch != "gpt_oss":
        raise ValueError(f"--mxfp4 is gpt-oss's expert format; arch {arch!r} has no MXFP4 checkpoint")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = build_tokenizer()
    num_tokens = tokenizer.get_vocab_size()
    config = build_config(arch, preset, num_tokens)
    weights = build_weights(config, seed, num_tokens, progress)
    if mxfp4:
        weights = _mxfp4_experts(weights)
        config["quantization_config"] = dict(MXFP4_CONFIG)
    save_file(weights, str(out / "model.safetensors"), metadata={"format": "pt"})
    tokenizer.save(str(out / "tokenizer.json"))
    _write_json(out / "config.json", config)
    _write_json(out / "generation_config.json", _generation_config())
    _write_json(out / "tokenizer_config.json", _tokenizer_config())
    _write_json(out / "special_tokens_map.json", _special_tokens_map())
    # says "random weights" to pdc demo and pdc models; no model loader reads it
    _write_json(out / "pdcluster-model.json", {"kind": "random", "arch": arch, "seed": seed, "preset": preset,
                                               **({"experts": "mxfp4"} if mxfp4 else {})})
    return out


def _mxfp4_experts(weights: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """gpt-oss's float expert matrices as MXFP4 ``_blocks`` and ``_scales`` (biases stay float)."""
    out = {}
    for name, value in weights.items():
        if name.endswith(("experts.gate_up_proj", "experts.down_proj")):
            out[name + "_blocks"], out[name + "_scales"] = mxfp4_quantize(value)
        else:
            out[name] = value
    return out


def _check_choice(kind: str, value: str, valid: tuple[str, ...]) -> None:
    if value not in valid:
        raise ValueError(f"unknown {kind} {value!r}; expected one of {list(valid)}")


def _write_json(path: Path, obj: dict) -> None:
    path.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n")


# ---------------------------------------------------------------- configs


def padded_vocab_size(num_tokens: int) -> int:
    """``num_tokens`` rounded up to a multiple of ``VOCAB_MULTIPLE``."""
    return -(-num_tokens // VOCAB_MULTIPLE) * VOCAB_MULTIPLE


def build_config(arch: str, preset: str, num_tokens: int) -> dict:
    """The ``config.json`` dict for ``arch`` at ``preset`` with a ``num_tokens`` tokenizer."""
    _check_choice("arch", arch, ARCHES)
    _check_choice("preset", preset, tuple(PRESETS))
    shape = dict(PRESETS[preset])
    if arch == "gemma3":
        shape["num_hidden_layers"] = max(shape["num_hidden_layers"], _GEMMA3_PATTERN)
    config = _common_config(arch, shape, padded_vocab_size(num_tokens))
    config.update(_ARCH_EXTRAS[arch])
    if _is_moe(arch):
        config.update(_moe_config(shape))
    if arch in _WINDOWED_CONFIGS:
        config.update(_WINDOWED_CONFIGS[arch](shape))
    return config


def _is_moe(arch: str) -> bool:
    return arch == "qwen3_moe"


def _common_config(arch: str, shape: dict, vocab_size: int) -> dict:
    # rope_theta stays top-level (mlx-lm's qwen3_moe requires it) and is also
    # given in transformers 5's nested rope_parameters form.
    return {
        "architectures": [_ARCHITECTURES[arch]],
        "model_type": MODEL_TYPES.get(arch, arch),
        "vocab_size": vocab_size,
        "hidden_size": shape["hidden_size"],
        "intermediate_size": shape["intermediate_size"],
        "num_hidden_layers": shape["num_hidden_layers"],
        "num_attention_heads": shape["num_attention_heads"],
        "num_key_value_heads": shape["num_key_value_heads"],
        "head_dim": shape["head_dim"],
        "hidden_act": "silu",
        "max_position_embeddings": MAX_POSITIONS,
        "rms_norm_eps": RMS_NORM_EPS,
        "rope_theta": ROPE_THETA,
        "rope_parameters": {"rope_type": "default", "rope_theta": ROPE_THETA},
        "initializer_range": 0.02,
        "attention_dropout": 0.0,
        "tie_word_embeddings": False,
        "use_cache": True,
        "bos_token_id": _token_id(BOS_TOKEN),
        "eos_token_id": _token_id(EOS_TOKEN),
        "pad_token_id": _token_id(PAD_TOKEN),
        "torch_dtype": "float32",
        "dtype": "float32",
    }


_NO_SLIDING = {"use_sliding_window": False, "sliding_window": None}

# Per-arch config.json keys on top of _common_config. Sliding windows are off
# for the full-attention arches (mlx-lm ignores mistral's and qwen2's window);
# gpt_oss and gemma3 have sliding layers (_WINDOWED_CONFIGS).
_ARCH_EXTRAS: dict[str, dict] = {
    "llama": {"attention_bias": False, "mlp_bias": False},
    "mistral": {"sliding_window": None},
    "qwen2": _NO_SLIDING,
    "qwen3": {"attention_bias": False, **_NO_SLIDING},
    "qwen3_moe": {"attention_bias": False, **_NO_SLIDING, "decoder_sparse_step": 1,
                  "norm_topk_prob": True, "router_aux_loss_coef": 0.001},
    "gpt_oss": {},  # _gpt_oss_config
    "gemma3": {},  # _gemma3_config
}


# gemma3 keeps the real checkpoints' five sliding layers to one global layer,
# so it has at least six layers (mlx-lm's gemma3_text reads the global layer's
# cache at index sliding_window_pattern - 1).
_GEMMA3_PATTERN = 6


def _gpt_oss_config(shape: dict) -> dict:
    """openai/gpt-oss-20b's config scaled down: alternating sliding and full
    layers (sliding first), per-head sinks, biased attention, top-k routed
    experts with the clamped SwiGLU, YaRN RoPE. The YaRN correction range is
    truncated (transformers' default) because mlx-lm 0.32's YarnRoPE always
    truncates it; the real checkpoints say ``truncate: false``, which the MLX
    engine honours itself (``mlx_engine._untruncated_yarn``)."""
    rope = {"rope_type": "yarn", "factor": 32.0, "beta_fast": 32.0, "beta_slow": 1.0,
            "original_max_position_embeddings": 4096, "truncate": True}
    return {
        "layer_types": [_GPT_OSS_LAYERS[i % 2] for i in range(shape["num_hidden_layers"])],
        "sliding_window": shape["sliding_window"],
        "num_local_experts": shape["num_experts"], "num_experts_per_tok": shape["num_experts_per_tok"],
        "experts_per_token": shape["num_experts_per_tok"], "intermediate_size": shape["moe_intermediate_size"],
        "attention_bias": True, "swiglu_limit": 7.0, "router_aux_loss_coef": 0.9,
        "output_router_logits": False, "initial_context_length": 4096, "rms_norm_eps": 1e-5,
        "max_position_embeddings": 131072,  # 32 x 4096, YaRN's reach
        "rope_theta": 150000.0, "rope_scaling": rope, "rope_parameters": {**rope, "rope_theta": 150000.0},
    }


_GPT_OSS_LAYERS = ("sliding_attention", "full_attention")


def _gemma3_config(shape: dict) -> dict:
    """google/gemma-3-1b-it's text config scaled down: five sliding layers
    (local RoPE base 10k) to one global layer (base 1M), q/k norms, sandwich
    norms, scaled embeddings, no soft-capping."""
    pattern = _GEMMA3_PATTERN
    return {
        "layer_types": ["full_attention" if (i + 1) % pattern == 0 else "sliding_attention"
                        for i in range(shape["num_hidden_layers"])],
        "sliding_window": shape["sliding_window"], "sliding_window_pattern": pattern,
        "hidden_activation": "gelu_pytorch_tanh", "query_pre_attn_scalar": shape["head_dim"],
        "attn_logit_softcapping": None, "final_logit_softcapping": None, "attention_bias": False,
        "rope_theta": 1_000_000.0, "rope_local_base_freq": 10_000.0, "rope_scaling": None,
        "rope_parameters": {"full_attention": {"rope_type": "default", "rope_theta": 1_000_000.0},
                            "sliding_attention": {"rope_type": "default", "rope_theta": 10_000.0}},
    }


_WINDOWED_CONFIGS = {"gpt_oss": _gpt_oss_config, "gemma3": _gemma3_config}


def _moe_config(shape: dict) -> dict:
    # Every layer is sparse (decoder_sparse_step 1, no mlp_only_layers).
    keys = ("num_experts", "num_experts_per_tok", "moe_intermediate_size")
    return {"mlp_only_layers": [], **{k: shape[k] for k in keys}}


def _generation_config() -> dict:
    return {
        "bos_token_id": _token_id(BOS_TOKEN),
        "eos_token_id": _token_id(EOS_TOKEN),
        "pad_token_id": _token_id(PAD_TOKEN),
        "do_sample": False,
    }


def _token_id(token: str) -> int:
    # build_tokenizer gives special tokens ids 0.. in SPECIAL_TOKENS order.
    return SPECIAL_TOKENS.index(token)


def _tokenizer_config() -> dict:
    return {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": BOS_TOKEN,
        "eos_token": EOS_TOKEN,
        "pad_token": PAD_TOKEN,
        "unk_token": None,
        "add_bos_token": False,
        "add_eos_token": False,
        "clean_up_tokenization_spaces": False,
        "model_max_length": MAX_POSITIONS,
        "chat_template": CHAT_TEMPLATE,
    }


def _special_tokens_map() -> dict:
    return {
        "bos_token": BOS_TOKEN,
        "eos_token": EOS_TOKEN,
        "pad_token": PAD_TOKEN,
        "additional_special_tokens": ["<|im_start|>", "<|im_end|>"],
    }


# ---------------------------------------------------------------- weights

# (name, shape, std); std None means a norm weight of ones.
TensorSpec = tuple[str, tuple[int, ...], float | None]


def weight_specs(config: dict) -> list[TensorSpec]:
    """Every checkpoint tensor of ``config`` in write order, with its init std."""
    hidden, vocab = config["hidden_size"], config["vocab_size"]
    specs: list[TensorSpec] = [("model.embed_tokens.weight", (vocab, hidden), 1.0)]
    for i in range(config["num_hidden_layers"]):
        specs += _layer_specs(config, f"model.layers.{i}")
    specs.append(("model.norm.weight", (hidden,), None))
    specs.append(("lm_head.weight", (vocab, hidden), LM_HEAD_GAIN / math.sqrt(hidden)))
    return specs


def _layer_specs(config: dict, prefix: str) -> list[TensorSpec]:
    hidden = config["hidden_size"]
    specs: list[TensorSpec] = [
        (f"{prefix}.input_layernorm.weight", (hidden,), None),
        (f"{prefix}.post_attention_layernorm.weight", (hidden,), None),
    ]
    if config["model_type"] == "gemma3_text":  # sandwich norms around the MLP too
        specs += [(f"{prefix}.{n}_feedforward_layernorm.weight", (hidden,), None) for n in ("pre", "post")]
    specs += _attention_specs(config, f"{prefix}.self_attn")
    if _is_moe(config["model_type"]):
        specs += _moe_specs(config, f"{prefix}.mlp")
    elif config["model_type"] == "gpt_oss":
        specs += _gpt_oss_expert_specs(config, f"{prefix}.mlp")
    else:
        specs += _mlp_specs(hidden, config["intermediate_size"], f"{prefix}.mlp")
    return specs


def _linear(name: str, out_features: int, in_features: int) -> TensorSpec:
    # std 1/sqrt(fan_in) keeps each projection's output at unit scale.
    return (f"{name}.weight", (out_features, in_features), 1.0 / math.sqrt(in_features))


def _attention_specs(config: dict, prefix: str) -> list[TensorSpec]:
    hidden, head_dim = config["hidden_size"], config["head_dim"]
    q_dim = config["num_attention_heads"] * head_dim
    kv_dim = config["num_key_value_heads"] * head_dim
    specs = [
        _linear(f"{prefix}.q_proj", q_dim, hidden),
        _linear(f"{prefix}.k_proj", kv_dim, hidden),
        _linear(f"{prefix}.v_proj", kv_dim, hidden),
        _linear(f"{prefix}.o_proj", hidden, q_dim),
    ]
    if config["model_type"] == "qwen2":
        specs += [(f"{prefix}.{p}_proj.bias", (d,), 0.1) for p, d in
                  (("q", q_dim), ("k", kv_dim), ("v", kv_dim))]
    if config["model_type"] in ("qwen3", "qwen3_moe", "gemma3_text"):
        specs += [(f"{prefix}.{p}_norm.weight", (head_dim,), None) for p in ("q", "k")]
    if config["model_type"] == "gpt_oss":
        specs += [(f"{prefix}.{p}_proj.bias", (d,), 0.1) for p, d in
                  (("q", q_dim), ("k", kv_dim), ("v", kv_dim), ("o", hidden))]
        specs.append((f"{prefix}.sinks", (config["num_attention_heads"],), 1.0))  # one learned logit per head
    return specs


def _gpt_oss_expert_specs(config: dict, prefix: str) -> list[TensorSpec]:
    """transformers' fused gpt-oss experts in float (the real checkpoints hold
    them as MXFP4 blocks and scales): ``gate_up_proj`` ``[experts, hidden,
    2 * intermediate]`` with gate and up interleaved, ``down_proj``
    ``[experts, intermediate, hidden]``, each with a bias; a biased router."""
    hidden, inter, num_experts = config["hidden_size"], config["intermediate_size"], config["num_local_experts"]
    return [
        (f"{prefix}.router.weight", (num_experts, hidden), 1.0 / math.sqrt(hidden)),
        (f"{prefix}.router.bias", (num_experts,), 0.1),
        (f"{prefix}.experts.gate_up_proj", (num_experts, hidden, 2 * inter), 1.0 / math.sqrt(hidden)),
        (f"{prefix}.experts.gate_up_proj_bias", (num_experts, 2 * inter), 0.1),
        (f"{prefix}.experts.down_proj", (num_experts, inter, hidden), 1.0 / math.sqrt(inter)),
        (f"{prefix}.experts.down_proj_bias", (num_experts, hidden), 0.1),
    ]


def _mlp_specs(hidden: int, intermediate: int, prefix: str) -> list[TensorSpec]:
    return [
        _linear(f"{prefix}.gate_proj", intermediate, hidden),
        _linear(f"{prefix}.up_proj", intermediate, hidden),
        _linear(f"{prefix}.down_proj", hidden, intermediate),
    ]


def _moe_specs(config: dict, prefix: str) -> list[TensorSpec]:
    hidden, num_experts = config["hidden_size"], config["num_experts"]
    specs = [_linear(f"{prefix}.gate", num_experts, hidden)]  # the router
    for e in range(num_experts):
        specs += _mlp_specs(hidden, config["moe_intermediate_size"], f"{prefix}.experts.{e}")
    return specs


def build_weights(
    config: dict, seed: int, num_tokens: int, progress: bool = False
) -> dict[str, np.ndarray]:
    """Seeded float32 weights for ``config``; rows ``>= num_tokens`` of the
    embedding and ``lm_head`` are zero."""
    rng = np.random.default_rng(seed)
    weights: dict[str, np.ndarray] = {}
    for name, shape, std in _progress(weight_specs(config), progress):
        weights[name] = _init_tensor(rng, shape, std)
    for name in ("model.embed_tokens.weight", "lm_head.weight"):
        weights[name][num_tokens:] = 0.0  # [vocab - num_tokens, hidden] padding rows
    return weights


def _init_tensor(rng: np.random.Generator, shape: tuple[int, ...], std: float | None) -> np.ndarray:
    if std is None:
        return np.ones(shape, dtype=np.float32)
    return rng.standard_normal(shape, dtype=np.float32) * np.float32(std)


def _progress(specs: list[TensorSpec], enabled: bool) -> Iterator[TensorSpec]:
    """Yield ``specs``, advancing a tqdm bar by each tensor's bytes when ``enabled``."""
    if not enabled:
        yield from specs
        return
    from tqdm import tqdm

    total = sum(4 * math.prod(shape) for _, shape, _ in specs)
    with tqdm(total=total, unit="B", unit_scale=True, desc="weights") as bar:
        for spec in specs:
            yield spec
            bar.update(4 * math.prod(spec[1]))
