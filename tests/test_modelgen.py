"""Random-weight checkpoints load in both engines and decode identically.

Token-identical greedy decoding across transformers and mlx-lm is the cheap
precondition for the cross-engine KV handoff, so every arch in ``ARCHES`` is
checked end to end on the tiny preset.
"""
from __future__ import annotations

import json
import math
import subprocess
import sys
import unicodedata
from pathlib import Path

import numpy as np
import pytest
from conftest import requires_mlx, requires_torch
from safetensors.numpy import load_file
from tokenizers import Tokenizer

from workers.tools.modelgen import (
    ARCHES,
    MODEL_TYPES,
    SPECIAL_TOKENS,
    build_config,
    build_tokenizer,
    make_model,
    weight_specs,
)

PROMPT_TEXT = (
    "Once upon a time, the scheduler sent a long prompt to the graphics card; "
    "the cache moved layer by layer to the laptop, which answered one token at a time."
)
NUM_PROMPT_TOKENS = 40
NUM_NEW_TOKENS = 16
TRICKY_TEXT = (
    "Hello   world!\n\n  def f(x):\treturn x**2  # café e\u0301 12345 "
    "<|im_start|>user\nhi<|im_end|>\n"
)


def prompt_ids(model_dir: Path) -> list[int]:
    """The first ``NUM_PROMPT_TOKENS`` ids of a fixed prompt, repeated as needed."""
    tokenizer = Tokenizer.from_file(str(model_dir / "tokenizer.json"))
    ids = tokenizer.encode(PROMPT_TEXT).ids
    ids = (ids * math.ceil(NUM_PROMPT_TOKENS / len(ids)))[:NUM_PROMPT_TOKENS]
    assert len(ids) == NUM_PROMPT_TOKENS
    return ids


def torch_greedy(model_dir: Path, ids: list[int], num_new: int) -> tuple[list[int], list[float]]:
    """Greedy tokens from transformers in fp32, and each step's top-1 minus top-2 logit."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    tokens, margins, past = [], [], None
    inputs = torch.tensor([ids])
    with torch.no_grad():
        for _ in range(num_new):
            out = model(inputs, past_key_values=past, use_cache=True)
            logits, past = out.logits[0, -1], out.past_key_values  # [vocab]
            top2 = torch.topk(logits, 2).values
            margins.append(float(top2[0] - top2[1]))
            tokens.append(int(logits.argmax()))
            inputs = torch.tensor([[tokens[-1]]])
    return tokens, margins


def mlx_greedy(model_dir: Path, ids: list[int], num_new: int) -> list[int]:
    """Greedy tokens from mlx-lm with its own prompt cache."""
    import mlx.core as mx
    from mlx_lm.models.cache import make_prompt_cache

    model, _ = mlx_load(model_dir)
    cache = make_prompt_cache(model)
    tokens: list[int] = []
    inputs = mx.array([ids])
    for _ in range(num_new):
        logits = model(inputs, cache=cache)  # [1, tokens, vocab]
        tokens.append(int(mx.argmax(logits[0, -1]).item()))
        inputs = mx.array([[tokens[-1]]])
    return tokens


def mlx_load(model_dir: Path) -> tuple[object, object]:
    """mlx-lm's own ``load``; gpt_oss's model through the MLX engine's loader,
    since mlx-lm 0.32 reads gpt-oss experts only as MXFP4 blocks or in its own
    split layout, not in transformers' fused float one (``load_mlx_model``)."""
    from mlx_lm import load

    if json.loads((model_dir / "config.json").read_text())["model_type"] != "gpt_oss":
        return load(str(model_dir))
    from mlx_lm.utils import load_tokenizer

    from workers.engines.mlx_engine import load_mlx_model

    return load_mlx_model(model_dir), load_tokenizer(model_dir)


# ---------------------------------------------------------------- both engines


@requires_torch
@requires_mlx
@pytest.mark.parametrize("arch", ARCHES)
def test_torch_and_mlx_greedy_decoding_is_token_identical(make_tiny_model, arch: str) -> None:
    model_dir = make_tiny_model(arch)
    ids = prompt_ids(model_dir)
    torch_tokens, _ = torch_greedy(model_dir, ids, NUM_NEW_TOKENS)
    assert mlx_greedy(model_dir, ids, NUM_NEW_TOKENS) == torch_tokens


@requires_torch
@pytest.mark.parametrize("arch", ARCHES)
def test_greedy_decoding_is_decisive_and_does_not_collapse(make_tiny_model, arch: str) -> None:
    model_dir = make_tiny_model(arch)
    tokens, margins = torch_greedy(model_dir, prompt_ids(model_dir), NUM_NEW_TOKENS)
    # fp32 differences between engines are ~1e-5; margins must dwarf them.
    assert min(margins) > 1e-3, margins
    assert len(set(tokens)) >= NUM_NEW_TOKENS // 2, tokens
    num_tokens = Tokenizer.from_file(str(model_dir / "tokenizer.json")).get_vocab_size()
    assert max(tokens) < num_tokens  # padding rows never win


# ---------------------------------------------------------------- transformers


@requires_torch
@pytest.mark.parametrize("arch", ARCHES)
def test_transformers_loads_every_weight_with_no_missing_or_unexpected_keys(
    make_tiny_model, arch: str
) -> None:
    import torch
    from transformers import AutoModelForCausalLM

    model_dir = make_tiny_model(arch)
    model, info = AutoModelForCausalLM.from_pretrained(model_dir, output_loading_info=True)
    assert info["missing_keys"] == set() and info["unexpected_keys"] == set()
    assert not info["mismatched_keys"] and not info["error_msgs"]
    config = json.loads((model_dir / "config.json").read_text())
    assert type(model).__name__ == config["architectures"][0]
    assert model.dtype == torch.float32
    embed = load_file(model_dir / "model.safetensors")["model.embed_tokens.weight"]
    np.testing.assert_array_equal(model.model.embed_tokens.weight.detach().numpy(), embed)


@requires_torch
@pytest.mark.parametrize("arch", ARCHES)
def test_auto_tokenizer_gives_the_same_ids_as_tokenizer_json(make_tiny_model, arch: str) -> None:
    from transformers import AutoTokenizer

    model_dir = make_tiny_model(arch)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    raw = Tokenizer.from_file(str(model_dir / "tokenizer.json"))
    assert tokenizer.encode(TRICKY_TEXT) == raw.encode(TRICKY_TEXT).ids
    assert (tokenizer.bos_token, tokenizer.eos_token, tokenizer.pad_token) == (
        "<|endoftext|>", "<|im_end|>", "<|endoftext|>"
    )


@requires_torch
@pytest.mark.parametrize("arch", ARCHES)
def test_chat_template_renders_a_chatml_generation_prompt(make_tiny_model, arch: str) -> None:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(make_tiny_model(arch))
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": "hi"}], add_generation_prompt=True, tokenize=False
    )
    assert text == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"


# ---------------------------------------------------------------- mlx-lm


@requires_mlx
@pytest.mark.parametrize("arch", ARCHES)
def test_mlx_lm_loads_the_checkpoint_weights_and_tokenizer(make_tiny_model, arch: str) -> None:
    from mlx.utils import tree_flatten

    model_dir = make_tiny_model(arch)
    model, tokenizer = mlx_load(model_dir)
    weights = load_file(model_dir / "model.safetensors")
    params = dict(tree_flatten(model.parameters()))
    assert sum(p.size for p in params.values()) == sum(w.size for w in weights.values())
    np.testing.assert_array_equal(np.array(params["lm_head.weight"]), weights["lm_head.weight"])
    raw = Tokenizer.from_file(str(model_dir / "tokenizer.json"))
    assert tokenizer.encode(TRICKY_TEXT) == raw.encode(TRICKY_TEXT).ids


# ---------------------------------------------------------------- files alone


@pytest.mark.parametrize("arch", ARCHES)
def test_same_seed_gives_identical_bytes_and_other_seed_other_weights(
    tmp_path: Path, arch: str
) -> None:
    a = make_model(tmp_path / "a", arch, seed=7)
    b = make_model(tmp_path / "b", arch, seed=7)
    c = make_model(tmp_path / "c", arch, seed=8)
    for name in ("model.safetensors", "tokenizer.json", "config.json"):
        assert (a / name).read_bytes() == (b / name).read_bytes(), name
    wa, wc = load_file(a / "model.safetensors"), load_file(c / "model.safetensors")
    assert wa.keys() == wc.keys()
    assert not np.array_equal(wa["model.layers.0.self_attn.q_proj.weight"],
                              wc["model.layers.0.self_attn.q_proj.weight"])


def test_tokenizer_build_is_deterministic_with_chatml_specials() -> None:
    first, second = build_tokenizer(), build_tokenizer()
    assert first.to_str() == second.to_str()
    assert 1000 <= first.get_vocab_size() <= 2000
    assert [first.token_to_id(t) for t in SPECIAL_TOKENS] == [0, 1, 2]
    decoded = first.decode(first.encode(TRICKY_TEXT).ids, skip_special_tokens=False)
    assert decoded == unicodedata.normalize("NFC", TRICKY_TEXT)  # NFC like Qwen2Tokenizer


@pytest.mark.parametrize("arch", ARCHES)
def test_config_has_the_fields_both_engines_and_the_handoff_need(make_tiny_model, arch: str) -> None:
    model_dir = make_tiny_model(arch)
    config = json.loads((model_dir / "config.json").read_text())
    num_tokens = Tokenizer.from_file(str(model_dir / "tokenizer.json")).get_vocab_size()
    assert config["vocab_size"] % 64 == 0 and 0 <= config["vocab_size"] - num_tokens < 64
    assert config["torch_dtype"] == config["dtype"] == "float32"
    assert config["model_type"] == MODEL_TYPES.get(arch, arch) and config["tie_word_embeddings"] is False
    assert config["max_position_embeddings"] >= 4096
    assert config["num_key_value_heads"] < config["num_attention_heads"]  # GQA
    assert config["eos_token_id"] == 2 and config["bos_token_id"] == 0
    if arch == "mistral":
        assert "sliding_window" in config and config["sliding_window"] is None
    if arch == "qwen2":
        assert config["use_sliding_window"] is False
    tokenizer_config = json.loads((model_dir / "tokenizer_config.json").read_text())
    assert tokenizer_config["tokenizer_class"] == "PreTrainedTokenizerFast"
    for name in ("special_tokens_map.json", "generation_config.json"):
        assert json.loads((model_dir / name).read_text())


EXPECTED_LAYER0_NAMES = {
    "llama": {"self_attn.q_proj.weight", "mlp.gate_proj.weight"},
    "mistral": {"self_attn.q_proj.weight", "mlp.gate_proj.weight"},
    "qwen2": {"self_attn.q_proj.bias", "self_attn.k_proj.bias", "self_attn.v_proj.bias"},
    "qwen3": {"self_attn.q_norm.weight", "self_attn.k_norm.weight"},
    "qwen3_moe": {"self_attn.q_norm.weight", "mlp.gate.weight", "mlp.experts.3.down_proj.weight"},
    "gpt_oss": {"self_attn.sinks", "self_attn.o_proj.bias", "mlp.router.weight", "mlp.router.bias",
                "mlp.experts.gate_up_proj", "mlp.experts.gate_up_proj_bias", "mlp.experts.down_proj",
                "mlp.experts.down_proj_bias"},
    "gemma3": {"self_attn.q_norm.weight", "pre_feedforward_layernorm.weight", "post_feedforward_layernorm.weight"},
}
BIASED_ARCHES = ("qwen2", "gpt_oss")


@pytest.mark.parametrize("arch", ARCHES)
def test_weight_names_are_hugging_face_checkpoint_names(make_tiny_model, arch: str) -> None:
    names = set(load_file(make_tiny_model(arch) / "model.safetensors"))
    assert {"model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"} <= names
    assert {f"model.layers.0.{n}" for n in EXPECTED_LAYER0_NAMES[arch]} <= names
    has_bias = any(n.endswith("_proj.bias") for n in names)
    assert has_bias == (arch in BIASED_ARCHES)


@pytest.mark.parametrize("arch", ARCHES)
def test_tiny_checkpoint_is_under_10_mb(make_tiny_model, arch: str) -> None:
    total = sum(f.stat().st_size for f in make_tiny_model(arch).iterdir())
    assert total < 10 * 2**20


@pytest.mark.parametrize("arch", ARCHES)
def test_small_preset_has_50_to_150_million_parameters(arch: str) -> None:
    config = build_config(arch, "small", build_tokenizer().get_vocab_size())
    num_params = sum(math.prod(shape) for _, shape, _ in weight_specs(config))
    assert 50e6 <= num_params <= 150e6, num_params


def test_unknown_arch_or_preset_raises_naming_the_valid_ones(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="qwen3"):
        make_model(tmp_path, "gpt2")
    with pytest.raises(ValueError, match="small"):
        make_model(tmp_path, "llama", preset="huge")
    assert not any(tmp_path.iterdir())


def test_rewrite_overwrites_own_files_and_keeps_others(tmp_path: Path) -> None:
    (tmp_path / "notes.txt").write_text("keep me")
    (tmp_path / "config.json").write_text("{}")
    make_model(tmp_path, "llama")
    assert (tmp_path / "notes.txt").read_text() == "keep me"
    assert json.loads((tmp_path / "config.json").read_text())["model_type"] == "llama"


def test_progress_shows_a_bar(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    make_model(tmp_path, "llama", progress=True)
    assert "weights" in capsys.readouterr().err
    make_model(tmp_path, "llama", progress=False)
    assert "weights" not in capsys.readouterr().err


def test_modelgen_runs_without_torch_mlx_or_transformers(tmp_path: Path) -> None:
    # None in sys.modules makes `import torch` raise ImportError.
    script = (
        "import sys\n"
        "for name in ('torch', 'mlx', 'mlx_lm', 'transformers'):\n"
        "    sys.modules[name] = None\n"
        "from workers.tools.modelgen import make_model\n"
        f"make_model({str(tmp_path)!r}, 'qwen3_moe')\n"
    )
    root = Path(__file__).resolve().parents[1]
    subprocess.run([sys.executable, "-c", script], cwd=root, check=True)
    assert (tmp_path / "model.safetensors").stat().st_size > 0
