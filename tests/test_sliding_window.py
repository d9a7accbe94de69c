"""Sliding-window models (gpt-oss, gemma3) hand their KV over token-identically.

The tiny checkpoints (``pdc make-model --arch gpt_oss|gemma3``) have a window
of 256 tokens on their sliding layers. Each handoff prefills on one engine,
ships the KV through the wire codec over loopback TCP (each sliding layer's
slices cut to its window by the sender), loads it into the other engine and
decodes greedily at fp32; the reference is the decode engine running the
whole request alone. Engines are loaded once for the module and released
(never closed: MLX's close clears the calling thread's streams).
"""
from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest
from conftest import requires_mlx, requires_torch_and_mlx

from workers.engines.base import Engine, KVSlice, generate
from workers.engines.prefix_cache import PrefixCache
from workers.engines.registry import load_engine
from workers.engines.sampling import SamplingParams, sample
from workers.tools.handoff import generate_alone, generate_handoff, prompt_token_ids
from workers.tools.modelgen import PRESETS, WINDOWED_ARCHES

pytestmark = requires_torch_and_mlx
WINDOW = PRESETS["tiny"]["sliding_window"]
DIRECTIONS = [("torch", "mlx"), ("mlx", "torch"), ("torch", "torch"), ("mlx", "mlx")]
# (prompt tokens, chunk size, tokens decoded): shorter than the window, shorter
# but decoding past it, equal, longer with the window's start (44) inside the
# first chunk, and longer with a one-token last chunk and the window starting
# one token into the second chunk.
CASES = [(120, 128, 16), (245, 128, 24), (WINDOW, 64, 16), (300, 100, 24), (385, 128, 16)]


def greedy(max_tokens: int) -> SamplingParams:
    return SamplingParams(max_tokens=max_tokens)


def prompt(make_tiny_model, arch: str, num_tokens: int) -> list[int]:
    return prompt_token_ids(make_tiny_model(arch), num_tokens)


# ---------------------------------------------------------------- identity


@pytest.mark.parametrize("case", CASES, ids=lambda c: f"prompt{c[0]}-chunk{c[1]}")
@pytest.mark.parametrize("direction", DIRECTIONS, ids=lambda d: f"{d[0]}-to-{d[1]}")
@pytest.mark.parametrize("arch", WINDOWED_ARCHES)
def test_windowed_handoff_is_token_identical(arch: str, direction: tuple[str, str], case: tuple[int, int, int],
                                             engines, make_tiny_model) -> None:
    num_tokens, chunk, max_tokens = case
    prefill, decode = engines(direction[0], arch), engines(direction[1], arch)
    ids, params = prompt(make_tiny_model, arch, num_tokens), greedy(max_tokens)
    reference, _ = generate_alone(decode, ids, params, chunk)
    tokens, kv, _, _ = generate_handoff(prefill, decode, ids, params, chunk)
    assert tokens == reference
    assert len(tokens) == max_tokens
    layout = prefill.kv_layout(num_tokens)
    assert kv.layout == layout and layout.sliding
    assert sum(s.nbytes for s in kv.slices) == layout.total_bytes  # only the windows travelled
    for layer in range(layout.num_layers):
        starts = sorted(s.start for s in kv.slices if s.layer == layer)
        window = layout.window(layer)
        assert starts[0] == layout.layer_start(layer) == (max(0, num_tokens - window) if window else 0)


@pytest.mark.parametrize("kind", ["torch", "mlx"])
@pytest.mark.parametrize("arch", WINDOWED_ARCHES)
def test_the_engine_alone_decodes_like_its_librarys_own_generate(arch: str, kind: str, engines,
                                                                 make_tiny_model) -> None:
    engine = engines(kind, arch)
    ids = prompt(make_tiny_model, arch, 300)
    ours, _ = generate_alone(engine, ids, greedy(20), chunk_size=128)
    native: list[int] = []
    engine.native_generate(ids, 20, native.append)  # transformers' generate / mlx-lm's generate_step
    assert ours == native


@pytest.mark.parametrize("arch", WINDOWED_ARCHES)
def test_both_engines_report_the_same_windows(arch: str, engines) -> None:
    torch_layout, mlx_layout = (engines(kind, arch).kv_layout(300) for kind in ("torch", "mlx"))
    assert torch_layout.windows == mlx_layout.windows
    assert set(torch_layout.windows) == {0, WINDOW}


# ---------------------------------------------------------------- what a sliding layer reads


def shipped(engine: Engine, ids: list[int]) -> tuple[list[KVSlice], int]:
    """``ids`` prefilled on ``engine``: the slices the wire would carry, and the first token."""
    layout, slices = engine.kv_layout(len(ids)), []
    result = engine.prefill("ship", ids, lambda s: slices.append(layout.clip(s)), chunk_size=128)
    engine.release("ship")
    return [s for s in slices if s is not None], sample(result.logits, greedy(1), 0)


def decode_loaded(engine: Engine, ids: list[int], slices: list[KVSlice], first: int) -> list[int]:
    engine.load_kv("loaded", engine.kv_layout(len(ids)), slices)
    tokens = list(generate(engine, "loaded", first, greedy(12)))
    engine.release("loaded")
    return tokens


def corrupted(slices: list[KVSlice], layout, position: int) -> list[KVSlice]:
    """``slices`` with every sliding layer's token ``position`` replaced by large noise."""
    rng, out = np.random.default_rng(0), []
    for s in slices:
        keys, values = s.keys.copy(), s.values.copy()
        if layout.window(s.layer) and s.start <= position < s.start + s.num_tokens:
            keys[:, position - s.start] = rng.standard_normal(keys[:, 0].shape) * 50
            values[:, position - s.start] = rng.standard_normal(values[:, 0].shape) * 50
        out.append(KVSlice(s.layer, s.start, keys, values, s.dtype))
    return out


@pytest.mark.parametrize("kind", ["torch", "mlx"])
@pytest.mark.parametrize("arch", WINDOWED_ARCHES)
def test_a_sliding_layer_reads_the_last_window_minus_one_tokens_and_never_the_oldest_shipped(
        arch: str, kind: str, engines, make_tiny_model) -> None:
    """Both libraries let position ``i`` attend to ``(i - window, i]``: the
    first decoded token (position ``n``) reads tokens ``[n - window + 1, n)``
    of the cache. The wire ships ``[n - window, n)``: token ``n - window`` is
    never read (noise there changes nothing), token ``n - window + 1`` is."""
    engine = engines(kind, arch)
    ids = prompt(make_tiny_model, arch, 300)
    layout = engine.kv_layout(300)
    slices, first = shipped(engine, ids)
    clean = decode_loaded(engine, ids, slices, first)
    assert decode_loaded(engine, ids, corrupted(slices, layout, 300 - WINDOW), first) == clean
    assert decode_loaded(engine, ids, corrupted(slices, layout, 300 - WINDOW + 1), first) != clean


@pytest.mark.parametrize("arch", WINDOWED_ARCHES)
def test_cached_layers_hold_the_same_window_in_both_engines(arch: str, engines, make_tiny_model) -> None:
    ids = prompt(make_tiny_model, arch, 300)
    held = {}
    for kind in ("torch", "mlx"):
        engine = engines(kind, arch)
        engine.prefill("c", ids, lambda s: None, chunk_size=100)
        held[kind] = [engine.cached_layer("c", layer) for layer in range(engine.kv_layout(0).num_layers)]
        engine.release("c")
    layout = engines("torch", arch).kv_layout(300)
    for got, want in zip(held["mlx"], held["torch"], strict=True):
        expected_start = 300 - (WINDOW - 1) if layout.window(got.layer) else 0
        assert got.start == want.start == expected_start
        assert got.num_tokens == want.num_tokens == 300 - expected_start
        np.testing.assert_allclose(got.keys, want.keys, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("kind", ["torch", "mlx"])
@pytest.mark.parametrize("arch", WINDOWED_ARCHES)
def test_load_kv_after_a_prefix_decodes_as_alone(arch: str, kind: str, engines, make_tiny_model) -> None:
    """A prefix of 128 tokens, then the rest received: the rest's sliding
    window reaches into the prefix (300 tokens) or starts past it (400)."""
    engine = engines(kind, arch)
    for num_tokens in (300, 400):
        ids = prompt(make_tiny_model, arch, num_tokens)
        want, _ = generate_alone(engine, ids, greedy(12), chunk_size=128)
        engine.prefill("p", ids[:128], lambda s: None, chunk_size=128)
        prefix = [engine.cached_layer("p", layer) for layer in range(engine.kv_layout(0).num_layers)]
        engine.release("p")
        assert all(s.start == 0 and s.num_tokens == 128 for s in prefix)  # under the window: all of it
        layout, rest = engine.kv_layout(num_tokens - 128), []
        result = engine.prefill("r", ids, lambda s: rest.append(layout.clip(s)), chunk_size=128, emit_from=128)
        engine.release("r")
        first = sample(result.logits, greedy(12), 0)
        engine.load_kv("x", layout, [s for s in rest if s is not None], prefix=prefix)
        assert engine.cached_tokens("x") == num_tokens
        assert [first, *generate(engine, "x", first, greedy(12))] == want
        engine.release("x")


# ---------------------------------------------------------------- batching


@pytest.mark.parametrize("kind", ["torch", "mlx"])
@pytest.mark.parametrize("arch", WINDOWED_ARCHES)
def test_a_windowed_request_decodes_in_a_batch_as_it_does_alone(arch: str, kind: str, engines,
                                                                make_tiny_model) -> None:
    """A 300-token request past its window beside a short one that joins late
    and leaves early, and a third cancelled mid-way and resumed: each draws
    what it draws alone."""
    engine = engines(kind, arch)
    long_ids = prompt(make_tiny_model, arch, 300)
    short_ids = long_ids[7:47]
    mid_ids = long_ids[3:253]  # crosses the window while decoding
    want = {}
    for rid, ids, n in (("long", long_ids, 24), ("short", short_ids, 6), ("mid", mid_ids, 20)):
        want[rid], _ = generate_alone(engine, ids, greedy(n), chunk_size=128)
    got: dict[str, list[int]] = {}
    params = {"long": greedy(24), "short": greedy(6), "mid": greedy(20)}
    for rid, ids in (("long", long_ids), ("mid", mid_ids)):
        result = engine.prefill(rid, ids, lambda s: None, chunk_size=128)
        got[rid] = [sample(result.logits, params[rid], 0)]
        engine.add(rid, got[rid][0], params[rid])
    for step in range(40):
        if step == 3:  # the short one joins
            result = engine.prefill("short", short_ids, lambda s: None, chunk_size=128)
            got["short"] = [sample(result.logits, params["short"], 0)]
            engine.add("short", got["short"][0], params["short"])
        if step == 12:  # "mid" (262 tokens by now) is cancelled, then resumes from its last token
            engine.remove("mid")
            produced = len(got["mid"]) - 1
            engine.add("mid", got["mid"][-1], greedy(20 - produced), first_step=produced)
        if not engine.running():
            break
        for rid, token in engine.step().items():
            got[rid].append(token)
    for rid in got:
        engine.release(rid)
    assert got == want


# ---------------------------------------------------------------- prefix cache


def test_the_prefix_cache_stores_and_finds_nothing_for_a_windowed_model(caplog) -> None:
    layers = [KVSlice(i, 0 if i % 2 else 45, np.zeros((2, 255 if i % 2 == 0 else 300, 4), np.float32),
                      np.zeros((2, 255 if i % 2 == 0 else 300, 4), np.float32), "float32") for i in range(4)]
    layers = [KVSlice(s.layer, s.start, s.keys[:, :300 - s.start], s.values[:, :300 - s.start], s.dtype)
              for s in layers]
    tokens = list(range(300))
    detected = PrefixCache("fp", 10**8)
    with caplog.at_level(logging.INFO, logger="workers.engines.prefix_cache"):
        assert detected.insert(tokens, layers) == []
        assert detected.insert(tokens, layers) == []
    assert detected.sliding and detected.num_blocks == 0 and detected.lookup(tokens + [1]) is None
    assert sum("sliding-window" in r.getMessage() for r in caplog.records) == 1  # said once
    told = PrefixCache("fp", 10**8, windows=(256, 0, 256, 0))
    short = [KVSlice(i, 0, np.zeros((2, 128, 4), np.float32), np.zeros((2, 128, 4), np.float32), "float32")
             for i in range(4)]  # under the window: looks like full attention, still not stored
    assert told.sliding and told.insert(tokens[:128], short) == [] and told.held_blocks() == []
    assert told.peek(tokens[:128] + [1]) == 0


@requires_mlx
def test_untruncated_yarn_rotates_like_transformers(make_tiny_model, tmp_path: Path) -> None:
    """gpt-oss's real configs say ``truncate: false``, which mlx-lm 0.32's
    YarnRoPE ignores; the MLX engine recomputes its frequencies to match."""
    import json
    import shutil

    import torch
    from mlx_lm.models.rope_utils import YarnRoPE
    from transformers import AutoModelForCausalLM

    folder = tmp_path / "gpt-oss-untruncated"
    shutil.copytree(make_tiny_model("gpt_oss"), folder)
    config = json.loads((folder / "config.json").read_text())
    for key in ("rope_scaling", "rope_parameters"):
        config[key]["truncate"] = False
    (folder / "config.json").write_text(json.dumps(config))
    mlx = load_engine("mlx", folder, "float32")
    ropes = [m for _, m in mlx.model.named_modules() if isinstance(m, YarnRoPE)]
    inv_freq = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).model.rotary_emb.inv_freq
    assert ropes and all(np.allclose(1 / np.array(r._freqs), inv_freq.numpy(), rtol=1e-5) for r in ropes)
    torch_engine = load_engine("torch", folder, "float32")
    ids = prompt_token_ids(folder, 300)
    reference, _ = generate_alone(mlx, ids, greedy(16), 128)
    tokens, _, _, _ = generate_handoff(torch_engine, mlx, ids, greedy(16), 128)
    assert tokens == reference


# ---------------------------------------------------------------- codec accuracy over a window


@pytest.mark.parametrize("arch", WINDOWED_ARCHES)
def test_codec_accuracy_runs_over_a_window_and_checks_its_own_method(arch: str) -> None:
    """examples/kv_codec_accuracy.py on a prompt longer than the window: its teacher forcing loads
    a whole-length prefix (the received window plus the emitted tokens before it) and checks that
    raw, fed its own greedy tokens, gives them back; it exits non-zero if not."""
    import json
    import os
    import subprocess
    import sys

    from conftest import ROOT

    done = subprocess.run(
        [sys.executable, "examples/kv_codec_accuracy.py", "--models", f"{arch}:tiny", "--steps", "4",
         "--prompt-tokens", str(WINDOW + 44), "--repeats", "1", "--json"],
        cwd=ROOT, capture_output=True, text=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr[-2000:]
    rows = {r["codec"]: r for r in json.loads(done.stdout.splitlines()[-1])["accuracy"]}
    assert rows["raw"]["mean_kl"] == 0.0 and rows["raw"]["top1_agreement"] == 1.0
    for codec in ("int8", "fp8"):
        assert 0.0 <= rows[codec]["mean_kl"] <= rows[codec]["max_kl"] and 0.0 <= rows[codec]["top1_agreement"] <= 1
