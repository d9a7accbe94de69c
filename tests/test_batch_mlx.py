"""The MLX engine's decode batch on mlx-lm's BatchGenerator: what is specific to it.

The engine-neutral batching properties (both engines) live in
tests/test_batching.py; these pin how ``MLXEngine`` drives mlx-lm: a joiner's
first token comes from the step right after ``add`` although mlx-lm pipelines
a step ahead, a cache that leaves the batch holds exactly the prompt and the
fed tokens (not the token mlx-lm already fed ahead), greedy is numpy's argmax of
the logits (not of mlx-lm's logprobs), and a finished request's cache serves as
a prefix.
"""
from __future__ import annotations

import threading
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from workers.engines.base import KVSlice, generate, is_last
from workers.engines.sampling import SamplingParams, sample

mlx_engine = pytest.importorskip("workers.engines.mlx_engine", reason="mlx extra not installed")
mx = pytest.importorskip("mlx.core")

GREEDY = SamplingParams(max_tokens=24)
PROMPTS = {f"r{i}": list(range(5 + 3 * i, 60 + 11 * i)) for i in range(5)}  # 55..99 tokens, all different


@pytest.fixture(scope="module")
def engine(make_tiny_model: Callable[..., Path]):
    return mlx_engine.MLXEngine(make_tiny_model("llama"), "float32")


def prefilled(engine, rid: str, params: SamplingParams = GREEDY, prompt: list[int] | None = None,
              first_step: int = 0) -> int:
    """Prefill ``rid`` and sample its first token at ``first_step``."""
    result = engine.prefill(rid, prompt if prompt is not None else PROMPTS[rid], lambda s: None)
    return sample(result.logits, params, first_step)


def alone(engine, rid: str, params: SamplingParams = GREEDY, first_step: int = 0) -> list[int]:
    """``rid`` decoded by itself: its first token and every one after it; its cache released."""
    first = prefilled(engine, rid, params, first_step=first_step)
    tokens = [first, *generate(engine, rid, first, params, first_step)]
    engine.release(rid)
    return tokens


def steps_until_done(engine, streams: dict[str, list[int]]) -> None:
    """Step the batch until it is empty, appending each token to its stream."""
    for _ in range(1000):
        before = engine.running()
        if not before:
            return
        tokens = engine.step()
        assert list(tokens) == before  # one token for every running request, in join order
        for rid, token in tokens.items():
            streams[rid].append(token)
    raise AssertionError("the batch never emptied")


# ---------------------------------------------------------------- BatchGenerator interplay


def test_a_request_added_while_others_decode_gets_its_tokens_from_the_next_step_in_order(engine) -> None:
    expected = {rid: alone(engine, rid) for rid in PROMPTS}
    streams = {rid: [prefilled(engine, rid)] for rid in PROMPTS}
    joined: list[str] = []
    for rid in PROMPTS:  # one joins every two steps: each lands in a batch already pipelined a step ahead
        engine.add(rid, streams[rid][0], GREEDY)
        joined.append(rid)
        for _ in range(2):
            before = engine.running()
            tokens = engine.step()
            assert list(tokens) == before and rid in tokens  # the joiner's first token comes in the next step
            for r, token in tokens.items():
                streams[r].append(token)
    steps_until_done(engine, streams)
    assert streams == expected
    for rid in PROMPTS:
        engine.release(rid)


def test_every_running_request_gets_exactly_one_token_per_step_and_leaves_after_its_last(engine) -> None:
    params = {rid: SamplingParams(max_tokens=2 + 3 * i) for i, rid in enumerate(PROMPTS)}
    streams = {rid: [prefilled(engine, rid, params[rid])] for rid in PROMPTS}
    for rid in PROMPTS:
        engine.add(rid, streams[rid][0], params[rid])
    while engine.running():
        before = engine.running()
        tokens = engine.step()
        assert list(tokens) == before  # one token each, in join order
        for rid, token in tokens.items():
            streams[rid].append(token)
            assert (rid in engine.running()) == (not is_last(token, len(streams[rid]) - 1, params[rid]))
    assert {rid: len(s) for rid, s in streams.items()} == {rid: p.max_tokens for rid, p in params.items()}
    for rid in PROMPTS:
        engine.release(rid)


def test_stop_tokens_end_a_request_exactly_where_is_last_does(engine) -> None:
    full = alone(engine, "r0", SamplingParams(max_tokens=24))
    for stop_at in sorted(set(full[1:]))[:4]:
        params = SamplingParams(max_tokens=24, stop_token_ids=(stop_at, 1_000_000))
        got = alone(engine, "r0", params)
        assert got == full[: full.index(stop_at, 1) + 1]


def test_a_cache_that_leaves_the_batch_holds_exactly_the_prompt_and_the_fed_tokens(engine) -> None:
    """mlx-lm has already fed a request's newest token when it hands it out;
    the engine trims it, so the cache matches a prefill of what was fed."""
    streams = {rid: [prefilled(engine, rid)] for rid in ("r0", "r1")}
    for rid in streams:
        engine.add(rid, streams[rid][0], GREEDY)
    for _ in range(5):
        for rid, token in engine.step().items():
            streams[rid].append(token)
    engine.remove("r1")  # a cancel mid-batch: 1 + 5 tokens given, the newest not fed
    steps_until_done(engine, streams)  # r0 finishes by itself
    for rid in streams:
        fed = PROMPTS[rid] + streams[rid][:-1]
        assert engine.cached_tokens(rid) == len(fed)
        engine.prefill("check", fed, lambda s: None)
        for layer in range(engine.spec.num_layers):
            got, want = engine.cached_layer(rid, layer), engine.cached_layer("check", layer)
            assert got.keys.shape == want.keys.shape == (engine.spec.kv_heads, len(fed), engine.spec.head_dim)
            np.testing.assert_allclose(got.keys, want.keys, rtol=1e-4, atol=1e-4)
            np.testing.assert_allclose(got.values, want.values, rtol=1e-4, atol=1e-4)
        engine.release(rid)
    engine.release("check")


def test_a_running_requests_cache_reads_the_same_as_after_it_leaves(engine) -> None:
    first = prefilled(engine, "r2")
    engine.add("r2", first, GREEDY)
    engine.add("r3", prefilled(engine, "r3"), GREEDY)
    for _ in range(3):
        engine.step()
    running = [engine.cached_layer("r2", layer) for layer in range(engine.spec.num_layers)]
    count = engine.cached_tokens("r2")
    engine.remove("r2")
    assert engine.cached_tokens("r2") == count == len(PROMPTS["r2"]) + 3
    for layer, seen in enumerate(running):
        np.testing.assert_array_equal(seen.keys, engine.cached_layer("r2", layer).keys)
    for rid in ("r2", "r3"):
        engine.release(rid)
    assert engine.running() == [] and engine.cached_requests() == []


def test_removing_a_request_that_just_joined_keeps_its_prompt_cache_and_it_can_join_again(engine) -> None:
    expected = alone(engine, "r1")
    slices: list[KVSlice] = []
    first = sample(engine.prefill("r1", PROMPTS["r1"], slices.append).logits, GREEDY, 0)
    engine.add("r0", prefilled(engine, "r0"), GREEDY)
    engine.step()  # r0 decodes; r1 joins behind it and leaves before any step
    engine.add("r1", first, GREEDY)
    engine.remove("r1")
    assert engine.running() == ["r0"] and engine.cached_tokens("r1") == len(PROMPTS["r1"])
    for layer in range(engine.spec.num_layers):
        wire = np.concatenate([s.keys for s in slices if s.layer == layer], axis=1)
        np.testing.assert_array_equal(engine.cached_layer("r1", layer).keys, wire)
    streams = {"r0": [], "r1": [first]}
    engine.add("r1", first, GREEDY)
    steps_until_done(engine, streams)
    assert streams["r1"] == expected
    for rid in streams:
        engine.release(rid)


def test_a_cancelled_request_resumes_identically_from_its_last_token(engine) -> None:
    """remove + add(last token, first_step=produced) continues the stream: the
    trimmed cache lacks exactly the token the new ``add`` feeds."""
    params = SamplingParams(max_tokens=20, temperature=0.8, top_k=50, seed=11)
    expected = alone(engine, "r3", params)
    stream = [prefilled(engine, "r3", params)]
    engine.add("r3", stream[0], params)
    engine.add("r4", prefilled(engine, "r4"), GREEDY)
    for _ in range(6):
        stream.append(engine.step()["r3"])
    engine.remove("r3")
    stream += list(generate(engine, "r3", stream[-1], SamplingParams(max_tokens=20 - 6, temperature=0.8,
                                                                      top_k=50, seed=11), first_step=6))
    assert stream == expected
    for rid in ("r3", "r4"):
        engine.release(rid)


# ---------------------------------------------------------------- sampling in the batch


def test_seeded_and_greedy_requests_in_one_batch_draw_what_they_draw_alone(engine) -> None:
    params = {
        "r0": SamplingParams(max_tokens=16, temperature=0.9, top_p=0.95, seed=1),
        "r1": GREEDY,
        "r2": SamplingParams(max_tokens=12, temperature=1.3, top_k=20, seed=2),
        "r3": GREEDY,
    }
    expected = {rid: alone(engine, rid, p, first_step=3) for rid, p in params.items()}
    assert len(set(expected["r0"])) > 3  # sampling actually varied
    streams = {rid: [prefilled(engine, rid, p, first_step=3)] for rid, p in params.items()}
    for rid, p in params.items():  # a mixed batch: mlx-lm calls each row's sampler on its own row
        engine.add(rid, streams[rid][0], p, first_step=3)
    steps_until_done(engine, streams)
    assert streams == expected
    for rid in params:
        engine.release(rid)


def test_batched_greedy_is_numpys_argmax_with_ties_and_nan() -> None:
    rows = np.array([
        [1.0, 3.0, 3.0, 2.0],  # tie: the first maximal index
        [np.nan, 5.0, np.nan, 1.0],  # NaN counts as the maximum: the first NaN
        [1.0, 2.0, 9.0, np.nan],
        [-np.inf, -np.inf, -np.inf, -np.inf],
        [7.0, 7.0, 7.0, 7.0],
    ], dtype=np.float32)
    rng = np.random.default_rng(0)
    many = rng.integers(0, 4, size=(64, 50)).astype(np.float32)  # ties everywhere
    many[rng.random(many.shape) < 0.01] = np.nan
    for batch in (rows, many):
        got = np.array(mlx_engine._argmax_like_numpy(mx.array(batch)))
        np.testing.assert_array_equal(got, np.argmax(batch, axis=-1))


def test_greedy_reads_the_logits_where_mlx_lms_logprobs_tie() -> None:
    """logprobs = logits - logsumexp rounds two close logits to one value
    (and NaN spreads to the whole row); the sampler argmaxes the logits."""
    vocab = 4096
    logits = np.full((2, vocab), 0.001, dtype=np.float32)
    logits[0, 7] = np.nextafter(np.float32(0.001), np.float32(1))  # the maximum, by one ulp
    logits[1, 9] = np.nan
    tap = mlx_engine._LogitsTap(lambda inputs, cache=None: mx.array(logits)[:, None, :])
    out = tap(mx.array([[1], [2]]))  # [rows, 1, vocab]
    logprobs = out[:, -1, :] - mx.logsumexp(out[:, -1, :], axis=-1, keepdims=True)
    assert np.array(mx.argmax(logprobs, axis=-1)).tolist() != [7, 9]  # what mlx-lm's own greedy_sampler picks
    assert np.array(mlx_engine._greedy_sampler(tap)(logprobs)).tolist() == [7, 9]


# ---------------------------------------------------------------- prefix reuse


def test_a_finished_requests_cache_serves_as_the_prefix_of_a_longer_prompt(engine) -> None:
    tokens = alone(engine, "r0")  # released: do it again and keep the cache
    first = prefilled(engine, "r0")
    assert [first, *generate(engine, "r0", first, GREEDY)] == tokens
    held = engine.cached_tokens("r0")
    prefix = [engine.cached_layer("r0", layer) for layer in range(engine.spec.num_layers)]
    prompt = PROMPTS["r0"] + tokens[:-1] + [tokens[-1], 17, 18, 19]  # the next turn of the conversation
    assert held == len(PROMPTS["r0"]) + len(tokens) - 1
    emitted: list[KVSlice] = []
    reused = engine.prefill("turn2", prompt, emitted.append, chunk_size=2, prefix=prefix, emit_from=held - 3)
    full = engine.prefill("full", prompt, lambda s: None)
    np.testing.assert_allclose(reused.logits, full.logits, rtol=1e-4, atol=1e-4)
    assert int(np.argmax(reused.logits)) == int(np.argmax(full.logits))
    layer0 = sorted((s.start, s.num_tokens) for s in emitted if s.layer == 0)
    assert layer0[0] == (0, 3) and sum(n for _, n in layer0) == len(prompt) - (held - 3)
    streams = {"turn2": [], "full": []}
    for rid, result in (("turn2", reused), ("full", full)):
        streams[rid].append(sample(result.logits, GREEDY, 0))
        engine.add(rid, streams[rid][0], GREEDY)
    steps_until_done(engine, streams)
    assert streams["turn2"] == streams["full"]
    for rid in ("r0", "turn2", "full"):
        engine.release(rid)


# ---------------------------------------------------------------- closing


def test_close_with_requests_decoding_drops_the_batch_and_every_cache(make_tiny_model) -> None:
    outcome: list[tuple[list[str], list[str], int]] = []

    def on_its_thread() -> None:  # MLX cannot compute on a thread after close: keep it off the test's
        engine = mlx_engine.MLXEngine(make_tiny_model("llama"), "float32")
        for rid in ("r0", "r1"):
            engine.add(rid, prefilled(engine, rid), GREEDY)
        tokens = engine.step()
        engine.close()
        outcome.append((engine.running(), engine.cached_requests(), len(tokens)))

    worker = threading.Thread(target=on_its_thread)
    worker.start()
    worker.join(timeout=120)
    assert outcome == [([], [], 2)]
