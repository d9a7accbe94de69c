"""The worker's prefix cache (workers/engines/prefix_cache.py): whole-block
reuse keyed by chained hashes, LRU eviction under an honest byte bound, blocks
shared between sequences, and hits whose KV equals what was inserted.

KV here is small random numpy, a fixed function of (layer, position, token):
two sequences with the same prefix have the same prefix KV, as a real model's
would. No model is loaded.
"""
from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from cluster.blocks import block_hashes
from workers.engines.base import KVSlice
from workers.engines.prefix_cache import PrefixCache

B = 64  # tokens per block
LAYERS, HEADS, DIM, VOCAB = 2, 2, 4, 1000
BLOCK_BYTES = LAYERS * 2 * HEADS * B * DIM * 4  # float32
FP = "weights-a"
_TABLE = np.random.default_rng(0).standard_normal((LAYERS, 2, VOCAB, HEADS, DIM)).astype(np.float32)


def tokens(n: int, seed: int) -> list[int]:
    return [int(t) for t in np.random.default_rng(seed).integers(0, VOCAB, n)]


def kv_of(token_ids: list[int], extra: int = 0) -> list[KVSlice]:
    """One wire slice per layer for ``token_ids`` (plus ``extra`` tokens of junk)."""
    ids = np.asarray(token_ids + [0] * extra)
    positions = np.arange(len(ids), dtype=np.float32)[None, :, None]
    layers = []
    for layer in range(LAYERS):
        # [tokens, kv_heads, head_dim] -> [kv_heads, tokens, head_dim]
        keys = np.ascontiguousarray(_TABLE[layer, 0, ids].transpose(1, 0, 2)) + positions
        values = np.ascontiguousarray(_TABLE[layer, 1, ids].transpose(1, 0, 2)) - positions
        layers.append(KVSlice(layer, 0, keys, values, "float32"))
    return layers


def cache(capacity_blocks: float = 100, **kwargs) -> PrefixCache:
    return PrefixCache(FP, int(capacity_blocks * BLOCK_BYTES), **kwargs)


def put(c: PrefixCache, token_ids: list[int]) -> list[int]:
    return c.insert(token_ids, kv_of(token_ids))


def assert_hit_matches(hit, token_ids: list[int]) -> None:
    """The hit's slices equal the inserted KV for tokens [0, p)."""
    want = kv_of(token_ids[: hit.num_tokens])
    assert [s.layer for s in hit.layers] == list(range(LAYERS))
    for got, exp in zip(hit.layers, want):
        assert got.start == 0 and got.dtype == "float32" and got.num_tokens == hit.num_tokens
        assert got.keys.flags.c_contiguous and got.values.flags.c_contiguous
        np.testing.assert_array_equal(got.keys, exp.keys)
        np.testing.assert_array_equal(got.values, exp.values)


# ---------------------------------------------------------------- whole blocks


def test_only_whole_shared_blocks_are_reused() -> None:
    c = cache()
    cached = tokens(200, seed=1)
    put(c, cached)
    other = tokens(200, seed=2)
    assert c.lookup(cached[:63] + other[63:]) is None  # 63 shared tokens: no whole block
    hit = c.lookup(cached[:64] + other[64:])
    assert hit is not None and hit.num_tokens == 64
    assert hit.block_hashes == block_hashes(FP, cached)[:1]
    assert_hit_matches(hit, cached)


def test_the_last_prompt_token_is_never_reused() -> None:
    c = cache()
    cached = tokens(128, seed=1)
    put(c, cached)
    assert c.lookup(cached).num_tokens == 64  # both blocks held, but token 127 must be prefilled
    assert c.peek(cached[:64]) == 0
    assert c.peek(cached + [5]) == 128


def test_partial_last_block_is_cut_and_not_stored() -> None:
    c = cache()
    seq = tokens(100, seed=1)
    held = c.insert(seq, kv_of(seq, extra=7))  # slices may hold more tokens than the full blocks
    assert held == block_hashes(FP, seq)[:1]
    assert c.nbytes == BLOCK_BYTES and c.num_blocks == 1
    assert c.insert(seq[:50], kv_of(seq[:50])) == []


def test_next_turn_of_a_conversation_reuses_the_previous_turns_full_blocks() -> None:
    c = cache()
    turn1 = tokens(150, seed=1)  # prompt + answer
    put(c, turn1)
    turn2 = turn1 + tokens(90, seed=2)
    hit = c.lookup(turn2)
    assert hit is not None and hit.num_tokens == 128
    assert hit.block_hashes == block_hashes(FP, turn2)[:2]
    assert_hit_matches(hit, turn2)
    assert (c.hits, c.hit_tokens, c.misses) == (1, 128, 0)


def test_a_changed_early_token_misses_even_though_later_blocks_are_equal() -> None:
    c = cache()
    seq = tokens(256, seed=1)
    put(c, seq)
    changed = [seq[0] + 1] + seq[1:]
    assert c.peek(changed) == 0
    assert c.lookup(changed) is None
    assert c.misses == 1
    assert not set(block_hashes(FP, changed)) & set(c.held_blocks())


def test_no_reuse_across_model_fingerprints() -> None:
    seq = tokens(200, seed=1)
    a, b = PrefixCache("weights-a", 10**6), PrefixCache("weights-b", 10**6)
    put(a, seq)
    assert a.peek(seq) == 192
    assert b.lookup(seq) is None
    # what a scheduler's index would look up for model b never names a's blocks
    assert not set(block_hashes("weights-b", seq)) & set(a.held_blocks())


# ---------------------------------------------------------------- sharing and accounting


def test_an_extended_sequence_replaces_its_prefix_without_double_counting() -> None:
    c = cache()
    turn1 = tokens(150, seed=1)
    turn2 = turn1 + tokens(130, seed=2)  # 280 tokens: 4 blocks
    put(c, turn1)
    assert (c.num_entries, c.nbytes) == (1, 2 * BLOCK_BYTES)
    assert put(c, turn2) == block_hashes(FP, turn2)
    assert (c.num_entries, c.num_blocks, c.nbytes) == (1, 4, 4 * BLOCK_BYTES)
    # re-inserting a covered prefix stores nothing new
    assert put(c, turn1) == block_hashes(FP, turn1)
    assert (c.num_entries, c.nbytes) == (1, 4 * BLOCK_BYTES)


def test_a_shared_system_prompt_is_held_once() -> None:
    c = cache()
    system = tokens(128, seed=1)
    a, b = system + tokens(64, seed=2), system + tokens(64, seed=3)
    put(c, a)
    put(c, b)
    assert (c.num_entries, c.num_blocks, c.nbytes) == (2, 4, 4 * BLOCK_BYTES)
    assert c.blocks_of(a)[:2] == c.blocks_of(b)[:2]
    c.shrink_to(3 * BLOCK_BYTES)  # a's tail goes (least recently used); the shared prompt stays for b
    assert c.peek(b + [1]) == 192 and c.peek(a + [1]) == 128


def test_inserting_a_covered_prefix_touches_the_longer_entry() -> None:
    c = cache(capacity_blocks=4)
    long_seq, other = tokens(128, seed=1), tokens(128, seed=2)
    put(c, long_seq)
    put(c, other)
    put(c, long_seq[:64] + tokens(10, seed=3))  # covered by long_seq: touches its block 0 only
    c.shrink_to(2 * BLOCK_BYTES)
    # long_seq's tail was least recently used, then other's tail; block 0 of long_seq survives
    assert c.blocks_of(long_seq) == block_hashes(FP, long_seq)[:1]
    assert c.blocks_of(other) == block_hashes(FP, other)[:1]


# ---------------------------------------------------------------- eviction


def test_eviction_follows_lru_order_and_lookup_refreshes_it() -> None:
    c = cache(capacity_blocks=4)
    a, b, d = tokens(128, seed=1), tokens(128, seed=2), tokens(128, seed=3)
    put(c, a)
    put(c, b)
    assert c.lookup(a + [1]).num_tokens == 128  # a is now more recent than b
    put(c, d)
    assert c.nbytes == 4 * BLOCK_BYTES <= c.capacity_bytes
    assert c.peek(a + [1]) == 128 and c.peek(d + [1]) == 128
    assert c.blocks_of(b) == []
    assert c.evictions == 2


def test_lookup_without_touch_leaves_lru_order_and_counters_alone() -> None:
    c = cache(capacity_blocks=4)
    a, b, d = tokens(128, seed=1), tokens(128, seed=2), tokens(128, seed=3)
    put(c, a)
    put(c, b)
    hit = c.lookup(a + [1], touch=False)
    assert hit is not None and hit.num_tokens == 128
    assert (c.hits, c.misses) == (0, 0)
    put(c, d)
    assert c.blocks_of(a) == [] and c.peek(b + [1]) == 128


def test_shrink_to_evicts_lru_first_and_reports_bytes_freed() -> None:
    c = cache()
    seqs = [tokens(128, seed=s) for s in range(3)]
    for seq in seqs:
        put(c, seq)
    assert c.shrink_to(4 * BLOCK_BYTES) == 2 * BLOCK_BYTES
    assert c.blocks_of(seqs[0]) == [] and c.peek(seqs[2] + [1]) == 128
    assert c.shrink_to(10 * BLOCK_BYTES) == 0
    assert c.shrink_to(0) == 4 * BLOCK_BYTES
    assert (c.nbytes, c.num_blocks, c.num_entries, c.held_blocks()) == (0, 0, 0, [])


def test_lowering_capacity_evicts_at_once() -> None:
    c = cache()
    for s in range(3):
        put(c, tokens(128, seed=s))
    c.capacity_bytes = 3 * BLOCK_BYTES
    assert c.nbytes == 3 * BLOCK_BYTES and c.evictions == 3


def test_a_sequence_larger_than_the_capacity_is_not_stored() -> None:
    c = cache(capacity_blocks=2.5)
    small = tokens(128, seed=1)
    put(c, small)
    assert put(c, tokens(192, seed=2)) == []
    assert c.nbytes == 2 * BLOCK_BYTES and c.peek(small + [1]) == 128


def test_capacity_zero_disables_the_cache() -> None:
    c = PrefixCache(FP, 0)
    seq = tokens(200, seed=1)
    assert put(c, seq) == []
    assert c.lookup(seq) is None
    assert (c.nbytes, c.held_blocks(), c.misses) == (0, [], 1)


def test_oldest_idle_s_reads_the_injected_clock() -> None:
    now = [100.0]
    c = cache(clock=lambda: now[0])
    assert c.oldest_idle_s == 0.0
    a, b = tokens(64, seed=1), tokens(64, seed=2)
    put(c, a)
    now[0] = 110.0
    put(c, b)
    now[0] = 115.0
    assert c.oldest_idle_s == 15.0
    c.lookup(a + [1])
    assert c.oldest_idle_s == 5.0  # b is now the least recently used


# ---------------------------------------------------------------- validation


def test_invalid_layers_are_refused_with_a_reason() -> None:
    c = cache()
    seq = tokens(128, seed=1)
    with pytest.raises(ValueError, match="need 128"):
        c.insert(seq, kv_of(seq[:100]))
    with pytest.raises(ValueError, match="got none"):
        c.insert(seq, [])
    layers = kv_of(seq)
    with pytest.raises(ValueError, match="in order"):
        c.insert(seq, layers[::-1])
    with pytest.raises(ValueError, match="from token"):
        c.insert(seq, [KVSlice(s.layer, 64, s.keys, s.values, s.dtype) for s in layers])
    with pytest.raises(ValueError, match="float16"):
        c.insert(seq, [layers[0], KVSlice(1, 0, layers[1].keys.astype(np.float16),
                                          layers[1].values.astype(np.float16), "float16")])
    put(c, seq)
    with pytest.raises(ValueError, match="one cache serves one model"):
        c.insert(tokens(64, seed=2), kv_of(tokens(64, seed=2))[:1])  # one layer, not two
    assert c.nbytes == 2 * BLOCK_BYTES
    with pytest.raises(ValueError, match="capacity_bytes"):
        PrefixCache(FP, -1)


# ---------------------------------------------------------------- threads


def test_concurrent_inserts_and_lookups_stay_bounded_and_correct() -> None:
    c = cache(capacity_blocks=6)
    system = tokens(64, seed=99)
    conversations = [system + tokens(64 * (1 + s % 3), seed=s) for s in range(8)]

    def work(worker: int) -> None:
        rng = np.random.default_rng(worker)
        for _ in range(60):
            seq = conversations[int(rng.integers(len(conversations)))]
            if rng.random() < 0.5:
                put(c, seq)
            elif (hit := c.lookup(seq + [1])) is not None:
                assert_hit_matches(hit, seq)
            assert c.nbytes <= c.capacity_bytes

    with ThreadPoolExecutor(max_workers=4) as pool:
        for future in [pool.submit(work, w) for w in range(4)]:
            future.result(timeout=30)  # re-raises a worker's failure here
    assert c.nbytes == c.num_blocks * BLOCK_BYTES <= c.capacity_bytes
    held = set(c.held_blocks())
    for seq in conversations:  # every held chain is a whole prefix
        assert set(block_hashes(FP, seq)) & held == set(c.blocks_of(seq))
