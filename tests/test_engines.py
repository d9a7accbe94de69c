"""Engine behaviour: layer-wise emission, decode knobs, bf16 at the edges."""
from __future__ import annotations

import numpy as np
import pytest
from conftest import requires_mlx, requires_torch

from workers.engines.base import KVSlice, SamplingParams
from workers.engines.sampling import sample
from workers.tools.handoff import load_engine

ENGINES = [pytest.param("torch", marks=requires_torch), pytest.param("mlx", marks=requires_mlx)]
PROMPT = list(range(5, 205))  # 200 tokens: two chunks of 128 and 72


def _last_layer_cached_tokens(engine, request_id: str) -> int:
    cache = engine._caches[request_id]
    if engine.name == "torch":
        return cache.get_seq_length(len(cache.layers) - 1)
    return cache[-1].offset


@pytest.mark.parametrize("kind", ENGINES)
def test_slices_are_emitted_while_later_layers_have_not_run(kind: str, make_tiny_model) -> None:
    engine = load_engine(kind, make_tiny_model("llama"), "float32")
    seen: list[tuple[int, int, int]] = []  # (layer, start, last layer's cached tokens at emission)

    def on_slice(s: KVSlice) -> None:
        seen.append((s.layer, s.start, _last_layer_cached_tokens(engine, "r")))

    engine.prefill("r", PROMPT, on_slice, chunk_size=128)
    num_layers = engine.spec.num_layers
    assert [(layer, start) for layer, start, _ in seen] == [
        (layer, start) for start in (0, 128) for layer in range(num_layers)
    ]
    # When layer 0 of a chunk is emitted, the last layer has not yet seen that chunk.
    for layer, start, last_layer_tokens in seen:
        if layer < num_layers - 1:
            assert last_layer_tokens == start


@pytest.mark.parametrize("kind", ENGINES)
def test_decode_stops_at_stop_token_and_at_max_tokens(kind: str, make_tiny_model) -> None:
    engine = load_engine(kind, make_tiny_model("llama"), "float32")
    greedy = SamplingParams(max_tokens=12)
    result = engine.prefill("a", PROMPT, lambda s: None)
    first = sample(result.logits, greedy, 0)
    tokens = [first, *engine.decode("a", first, greedy)]
    assert len(tokens) == 12
    stop_at = tokens[5]
    engine.release("a")
    result = engine.prefill("b", PROMPT, lambda s: None)
    stopped = [first, *engine.decode("b", first, SamplingParams(max_tokens=12, stop_token_ids=(stop_at,)))]
    assert stopped == tokens[: tokens.index(stop_at) + 1]


@requires_torch
@requires_mlx
def test_seeded_sampling_is_identical_across_engines(make_tiny_model) -> None:
    folder = make_tiny_model("qwen3")
    params = SamplingParams(max_tokens=20, temperature=0.9, top_p=0.95, top_k=40, seed=1234)
    outputs = []
    for kind in ("torch", "mlx"):
        engine = load_engine(kind, folder, "float32")
        result = engine.prefill("s", PROMPT, lambda s: None)
        first = sample(result.logits, params, 0)
        outputs.append([first, *engine.decode("s", first, params)])
    assert outputs[0] == outputs[1]
    assert outputs[0] != outputs[0][:1] * len(outputs[0])  # sampling actually varied


@requires_torch
@requires_mlx
@pytest.mark.parametrize("direction", [("torch", "mlx"), ("mlx", "torch")])
def test_bf16_kv_lands_bit_exact_in_the_other_engines_cache(direction: tuple[str, str], make_tiny_model) -> None:
    folder = make_tiny_model("llama")
    source, target = (load_engine(kind, folder, "bfloat16") for kind in direction)
    slices: list[KVSlice] = []
    source.prefill("x", PROMPT, slices.append)
    assert {s.dtype for s in slices} == {"bfloat16"} and slices[0].keys.dtype == np.uint16
    target.load_kv("x", source.kv_layout(len(PROMPT)), slices)
    for layer in range(target.spec.num_layers):
        keys = _cached_keys_bits(target, "x", layer)  # [kv_heads, tokens, head_dim] uint16
        wire = np.concatenate([s.keys for s in slices if s.layer == layer], axis=1)
        np.testing.assert_array_equal(keys, wire)


def _cached_keys_bits(engine, request_id: str, layer: int) -> np.ndarray:
    cache = engine._caches[request_id]
    if engine.name == "torch":
        import torch

        return cache.layers[layer].keys[0].view(torch.int16).numpy().view(np.uint16)
    import mlx.core as mx

    entry = cache[layer]
    return np.array(entry.keys[0, :, : entry.offset, :].view(mx.uint16))


@pytest.mark.parametrize("kind", ENGINES)
def test_load_kv_rejects_a_different_models_layout(kind: str, make_tiny_model) -> None:
    engine = load_engine(kind, make_tiny_model("llama"), "float32")
    layout = engine.kv_layout(4)
    wrong = type(layout)(layout.num_layers, layout.kv_heads + 1, layout.head_dim, layout.dtype, 4)
    with pytest.raises(ValueError, match="kv_heads"):
        engine.load_kv("w", wrong, [])
