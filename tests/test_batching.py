"""Continuous batching and prefix reuse, on every engine and every tiny architecture.

A request must draw the same tokens whether it decodes alone or in a batch
that others join and leave at any step boundary; a prefill that starts from a
cached prefix must leave the same cache, logits and continuation as a full one,
and ``emit_from`` must emit exactly the tail of what a full prefill emits.

"Alone" is ``base.generate`` (add/step/remove with a batch of one). All in fp32.
"""
from __future__ import annotations

import itertools
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import pytest
from conftest import have, requires_mlx, requires_torch

from workers.engines.base import Engine, KVSlice, generate, is_last
from workers.engines.sampling import SamplingParams, sample
from workers.tools.modelgen import ARCHES

KINDS = [pytest.param("torch", marks=requires_torch), pytest.param("mlx", marks=requires_mlx)]
MAX_STEPS = 200  # bound on every step loop; no test here needs more than ~60
SAMPLED = {"temperature": 0.8, "top_p": 0.9}
# Engines whose batched tokens are identical to the request run alone; any other
# engine must agree on MIN_AGREEMENT of the tokens, position by position. Both are
# exact on CPU in fp32 (every token of every tiny arch agreed when this was written);
# an accelerator whose batched kernels round differently may need the looser bound.
EXACT = {"torch", "mlx"}
MIN_AGREEMENT = 0.99


@dataclass(frozen=True)
class Req:
    """A request to prefill and add at a step boundary."""

    rid: str
    prompt: list[int]
    params: SamplingParams


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread() -> Iterator[None]:
    """Run torch on one thread here, restoring the count afterwards. These
    models are tiny, and with two threads OpenMP's barriers make each decode
    step ~30x slower (3 ms -> 100 ms) whenever another process competes for the
    two cores of a CI machine."""
    if not have("torch"):
        yield
        return
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(params=KINDS)
def kind(request: pytest.FixtureRequest) -> str:
    return request.param


@pytest.fixture(params=ARCHES)
def engine(request: pytest.FixtureRequest, kind: str, engines) -> Iterator[Engine]:
    """A clean engine of ``kind`` for one tiny architecture; every cache is released afterwards."""
    engine = engines(kind, request.param)
    assert engine.running() == [] and engine.cached_requests() == []
    yield engine
    for rid in engine.cached_requests():
        engine.release(rid)


def prompt_of(length: int, seed: int) -> list[int]:
    return np.random.default_rng(seed).integers(5, 1000, size=length).tolist()


def greedy(max_tokens: int) -> SamplingParams:
    return SamplingParams(max_tokens=max_tokens)


def start(engine: Engine, req: Req, first_step: int = 0) -> int:
    """Prefill ``req`` under its id: its first token, drawn at ``first_step``."""
    result = engine.prefill(req.rid, req.prompt, lambda s: None, chunk_size=32)
    return sample(result.logits, req.params, first_step)


def alone(engine: Engine, req: Req) -> list[int]:
    """``req``'s tokens, first included, decoded with no other request; its cache is released."""
    rid = f"alone-{req.rid}"
    first = start(engine, Req(rid, req.prompt, req.params))
    tokens = [first, *generate(engine, rid, first, req.params)]
    engine.release(rid)
    return tokens


def drive(engine: Engine, joins: dict[int, list[Req]], removes: dict[int, list[str]] | None = None,
          ) -> dict[str, list[int]]:
    """Step until nothing runs and no join is left: before step ``s``, remove
    ``removes[s]`` and prefill and add ``joins[s]``. Each request's tokens,
    first included. Checks after every step that a request leaves the batch
    exactly when it drew its last token."""
    removes = removes or {}
    out: dict[str, list[int]] = {}
    params: dict[str, SamplingParams] = {}
    for step in range(MAX_STEPS):
        for rid in removes.get(step, []):
            engine.remove(rid)
        for req in joins.get(step, []):
            first = start(engine, req)
            out[req.rid], params[req.rid] = [first], req.params
            if not is_last(first, 0, req.params):  # as the caller must
                engine.add(req.rid, first, req.params)
        if not engine.running() and step >= max([*joins, *removes]):
            return out
        for rid, token in engine.step().items():
            out[rid].append(token)
            finished = is_last(token, len(out[rid]) - 1, params[rid])
            assert (rid in engine.running()) == (not finished), f"{rid} after token {len(out[rid])}"
    raise AssertionError(f"batch still running after {MAX_STEPS} steps")


def assert_same_tokens(kind: str, got: dict[str, list[int]], want: dict[str, list[int]]) -> None:
    """Identical for EXACT engines, else the same at >= MIN_AGREEMENT of positions."""
    assert {rid: len(tokens) for rid, tokens in got.items()} == {rid: len(tokens) for rid, tokens in want.items()}
    if kind in EXACT:
        assert got == want
        return
    total = sum(len(tokens) for tokens in want.values())
    agree = sum(a == b for rid in want for a, b in zip(got[rid], want[rid], strict=True))
    assert agree / total >= MIN_AGREEMENT, f"{agree}/{total} tokens agree"


def cut(engine: Engine, rid: str, num_tokens: int) -> list[KVSlice]:
    """``rid``'s cache, tokens ``[0, num_tokens)`` of every layer: a prefix-cache hit."""
    layers = [engine.cached_layer(rid, layer) for layer in range(num_layers(engine))]
    return [KVSlice(s.layer, 0, np.ascontiguousarray(s.keys[:, :num_tokens]),
                    np.ascontiguousarray(s.values[:, :num_tokens]), s.dtype) for s in layers]


def joined(slices: list[KVSlice], layer: int) -> tuple[int, np.ndarray, np.ndarray]:
    """One layer's emitted slices in emission order: (first start, keys, values) joined on tokens;
    asserts they are contiguous."""
    parts = [s for s in slices if s.layer == layer]
    for before, after in itertools.pairwise(parts):
        assert after.start == before.start + before.num_tokens
    keys = np.concatenate([s.keys for s in parts], axis=1)  # [kv_heads, tokens, head_dim]
    return parts[0].start, keys, np.concatenate([s.values for s in parts], axis=1)


def num_layers(engine: Engine) -> int:
    return engine.kv_layout(0).num_layers


def assert_close_caches(engine: Engine, rid: str, reference: str, num_tokens: int) -> None:
    """``rid``'s cache holds ``num_tokens`` tokens, close to the first ``num_tokens`` of ``reference``'s."""
    for layer in range(num_layers(engine)):
        got, want = engine.cached_layer(rid, layer), engine.cached_layer(reference, layer)
        assert got.keys.shape[1] == got.values.shape[1] == num_tokens
        np.testing.assert_allclose(got.keys, want.keys[:, :num_tokens], rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(got.values, want.values[:, :num_tokens], rtol=1e-5, atol=1e-5)


def mixed_requests(prefix: str = "r") -> list[Req]:
    """Four greedy requests of different prompt lengths and lengths of output."""
    shapes = [(7, 24), (40, 10), (75, 32), (23, 1)]  # (prompt tokens, max_tokens)
    return [Req(f"{prefix}{i}", prompt_of(n, seed=i), greedy(m)) for i, (n, m) in enumerate(shapes)]


# ---------------------------------------------------------------- batching


def test_each_request_in_a_batch_draws_what_it_draws_alone(kind: str, engine: Engine) -> None:
    reqs = mixed_requests()
    want = {req.rid: alone(engine, req) for req in reqs}
    assert_same_tokens(kind, drive(engine, {0: reqs}), want)


def test_a_request_joining_mid_batch_draws_what_it_draws_alone(kind: str, engine: Engine) -> None:
    early, late = mixed_requests()[:2], mixed_requests("late")[2:]
    want = {req.rid: alone(engine, req) for req in early + late}
    got = drive(engine, {0: early, 5: late[:1], 9: late[1:]})
    assert_same_tokens(kind, got, want)


def test_a_finished_request_leaves_with_its_cache_while_others_continue(kind: str, engine: Engine) -> None:
    short, long = Req("short", prompt_of(20, 1), greedy(6)), Req("long", prompt_of(33, 2), greedy(20))
    reference = Req("reference", short.prompt, short.params)
    first = start(engine, reference)
    want = [first, *generate(engine, reference.rid, first, reference.params)]  # alone; keeps its cache
    for req in (short, long):
        engine.add(req.rid, start(engine, req), req.params)
    steps = [engine.step() for _ in range(3)]
    # in the batch (behind 13 tokens of padding) "short" holds its own tokens and no padding
    assert engine.cached_tokens("short") == 20 + 3 and engine.cached_tokens("long") == 33 + 3
    assert_close_caches(engine, "short", reference.rid, num_tokens=20 + 3)
    steps += [engine.step() for _ in range(2)]
    assert [first, *(step["short"] for step in steps)] == want
    assert engine.running() == ["long"] and set(steps[-1]) == {"short", "long"}
    assert engine.step().keys() == {"long"}
    # prompt + the first token + the 4 tokens fed after it; the last token is never fed
    assert engine.cached_tokens("short") == engine.cached_tokens(reference.rid) == 20 + 5
    assert_close_caches(engine, "short", reference.rid, num_tokens=20 + 5)


def test_a_request_joining_in_the_step_another_finishes_draws_what_it_draws_alone(kind: str, engine: Engine) -> None:
    first, second, joiner = (Req("a", prompt_of(12, 3), greedy(4)), Req("b", prompt_of(50, 4), greedy(15)),
                             Req("c", prompt_of(64, 5), greedy(10)))
    want = {req.rid: alone(engine, req) for req in (first, second, joiner)}
    # "a" draws its 4th and last token in drive's step 2 and leaves; "c" joins at that boundary
    got = drive(engine, {0: [first, second], 3: [joiner]})
    assert_same_tokens(kind, got, want)


def test_a_removed_request_keeps_its_cache_and_the_others_are_unaffected(kind: str, engine: Engine) -> None:
    reqs = mixed_requests()[:3]
    want = {req.rid: alone(engine, req) for req in reqs}
    got = drive(engine, {0: reqs}, removes={4: ["r1"]})
    assert got["r1"] == want["r1"][:5]  # the first token and 4 steps
    assert_same_tokens(kind, {rid: got[rid] for rid in ("r0", "r2")}, {rid: want[rid] for rid in ("r0", "r2")})
    assert "r1" not in engine.running() and "r1" in engine.cached_requests()
    assert engine.cached_tokens("r1") == len(reqs[1].prompt) + 4
    # its cache is intact: it resumes where it stopped and draws the rest of what it drew alone
    engine.add("r1", got["r1"][-1], SamplingParams(max_tokens=len(want["r1"]) - 4), first_step=4)
    rest = [engine.step()["r1"] for _ in range(len(want["r1"]) - 5)]
    assert engine.running() == [] and got["r1"] + rest == want["r1"]
    engine.release("r1")
    assert "r1" not in engine.cached_requests()


def test_add_refuses_a_request_without_a_cache_or_already_running(engine: Engine) -> None:
    with pytest.raises(KeyError):
        engine.add("nobody", 5, greedy(3))
    req = Req("twice", prompt_of(9, 6), greedy(3))
    engine.add(req.rid, start(engine, req), req.params)
    with pytest.raises(ValueError):
        engine.add(req.rid, 5, req.params)
    assert engine.running() == ["twice"]
    engine.release("twice")
    assert engine.running() == [] and engine.step() == {}


# ---------------------------------------------------------------- seeded sampling


def test_seeded_sampled_requests_draw_the_same_tokens_alone_and_in_a_batch(kind: str, engine: Engine) -> None:
    reqs = [Req(f"s{i}", prompt_of(10 + 17 * i, 10 + i), SamplingParams(max_tokens=25 - 4 * i, seed=100 + i, **SAMPLED))
            for i in range(3)]
    want = {req.rid: alone(engine, req) for req in reqs}
    assert all(len(set(tokens)) > 3 for tokens in want.values())  # sampling varied
    assert_same_tokens(kind, drive(engine, {0: reqs[:2], 3: reqs[2:]}), want)


def test_first_step_shifts_the_sampling_steps(engine: Engine) -> None:
    """A request whose cache already holds its first ``k`` tokens, added with
    ``first_step=k``, draws what the unshifted request draws from step ``k`` on."""
    k, n = 6, 20
    params = SamplingParams(max_tokens=n, seed=7, **SAMPLED)
    prompt = prompt_of(30, 11)
    unshifted = alone(engine, Req("u", prompt, params))
    shifted = SamplingParams(max_tokens=n - k, seed=7, **SAMPLED)
    for rid, first_step in (("shifted", k), ("unshifted-steps", 0)):
        engine.prefill(rid, prompt + unshifted[:k], lambda s: None)
        engine.add(rid, unshifted[k], shifted, first_step=first_step)
    tokens: dict[str, list[int]] = {"shifted": [], "unshifted-steps": []}
    for _ in range(n):
        for rid, token in engine.step().items():
            tokens[rid].append(token)
    assert engine.running() == []
    assert tokens["shifted"] == unshifted[k + 1 :]
    assert tokens["unshifted-steps"] != unshifted[k + 1 :]  # the step, not only the cache, decides the draw


# ---------------------------------------------------------------- prefix reuse


def test_prefill_from_a_prefix_matches_a_full_prefill(kind: str, engine: Engine) -> None:
    prompt, num_cached = prompt_of(90, 12), 40
    full = engine.prefill("full", prompt, lambda s: None, chunk_size=32)
    prefix = cut(engine, "full", num_cached)
    emitted: list[KVSlice] = []
    part = engine.prefill("part", prompt, emitted.append, chunk_size=32, prefix=prefix)
    assert part.num_tokens == len(prompt) and engine.cached_tokens("part") == len(prompt)
    np.testing.assert_allclose(part.logits, full.logits, rtol=1e-4, atol=1e-4)
    params = greedy(25)
    first = sample(full.logits, params, 0)
    assert sample(part.logits, params, 0) == first
    for layer in range(num_layers(engine)):
        got, want = engine.cached_layer("part", layer), engine.cached_layer("full", layer)
        np.testing.assert_allclose(got.keys, want.keys, rtol=1e-4, atol=1e-4)
        np.testing.assert_allclose(got.values, want.values, rtol=1e-4, atol=1e-4)
        assert joined(emitted, layer)[0] == 0  # the prefix's slices are emitted too
    got = {"part": [first, *generate(engine, "part", first, params)]}
    want = {"part": [first, *generate(engine, "full", first, params)]}
    assert_same_tokens(kind, got, want)


@pytest.mark.parametrize(("num_cached", "emit_from"), [(0, 0), (0, 50), (40, 0), (40, 25), (40, 40), (40, 70)])
def test_emit_from_emits_exactly_the_tail_of_a_full_prefill(engine: Engine, num_cached: int, emit_from: int) -> None:
    """``emit_from`` on a full prefill or one from a prefix: slices cover tokens
    ``[emit_from, n)`` of every layer exactly once, renumbered from 0, and hold
    what a full prefill emitted there; ``prefill_chunks`` yields one None per
    chunk but the last."""
    prompt = prompt_of(90, 13)
    everything: list[KVSlice] = []
    engine.prefill("full", prompt, everything.append, chunk_size=32)
    prefix = cut(engine, "full", num_cached) if num_cached else None
    emitted: list[KVSlice] = []
    chunks = engine.prefill_chunks("tail", prompt, emitted.append, chunk_size=32, prefix=prefix, emit_from=emit_from)
    results = list(chunks)
    assert results[:-1] == [None] * (len(results) - 1) and results[-1].num_tokens == len(prompt)
    assert len(results) == -(-(len(prompt) - num_cached) // 32)
    assert {s.layer for s in emitted} == set(range(num_layers(engine)))
    for layer in range(num_layers(engine)):
        first, keys, values = joined(emitted, layer)
        _, all_keys, all_values = joined(everything, layer)
        assert first == 0 and keys.shape[1] == len(prompt) - emit_from
        np.testing.assert_allclose(keys, all_keys[:, emit_from:], rtol=1e-4, atol=1e-4)
        np.testing.assert_allclose(values, all_values[:, emit_from:], rtol=1e-4, atol=1e-4)


def test_load_kv_after_a_prefix_builds_the_cache_that_loading_everything_builds(kind: str, engine: Engine) -> None:
    prompt, num_cached = prompt_of(70, 14), 30
    everything: list[KVSlice] = []
    full = engine.prefill("source", prompt, everything.append, chunk_size=32)
    prefix = cut(engine, "source", num_cached)
    tail = [KVSlice(s.layer, s.start - num_cached, s.keys, s.values, s.dtype)
            for s in everything if s.start >= num_cached]  # chunks of 32 and a prefix of 30: cut the [0, 32) chunk
    tail += [KVSlice(s.layer, 0, np.ascontiguousarray(s.keys[:, num_cached:]),
                     np.ascontiguousarray(s.values[:, num_cached:]), s.dtype)
             for s in everything if s.start == 0]
    engine.load_kv("all", engine.kv_layout(len(prompt)), everything)
    engine.load_kv("rest", engine.kv_layout(len(prompt) - num_cached), tail, prefix=prefix)
    assert engine.cached_tokens("rest") == engine.cached_tokens("all") == len(prompt)
    for layer in range(num_layers(engine)):
        got, want = engine.cached_layer("rest", layer), engine.cached_layer("all", layer)
        np.testing.assert_array_equal(got.keys, want.keys)
        np.testing.assert_array_equal(got.values, want.values)
    params = greedy(15)
    first = sample(full.logits, params, 0)
    assert_same_tokens(kind, {"rest": list(generate(engine, "rest", first, params))},
                       {"rest": list(generate(engine, "all", first, params))})
