"""Prefix block hashes: the one name a cached prefix has on every node.

A prompt's tokens are cut into blocks of ``BLOCK_TOKENS``. Block ``i``'s hash
covers its own tokens *and* the hash of block ``i - 1``, and block 0 starts
from the model's weights fingerprint. So one 64-bit number names a whole
prefix, of one model: two prompts share block ``i``'s hash only if their first
``(i + 1) * BLOCK_TOKENS`` tokens are equal (and the model is the same), and a
change in an early turn changes every later hash. Only full blocks get a hash;
a partial last block is never reused.

Workers key their prefix caches by these hashes (``workers/engines/prefix_cache.py``)
and report the ones they hold; the scheduler hashes each request the same way
and looks them up in its per-node index (``scheduler/prefix_index.py``). This
module is pure Python, so both sides import it.
"""
from __future__ import annotations

import hashlib
import struct
from collections.abc import Iterable, Sequence

BLOCK_TOKENS = 64


def root_hash(model_fingerprint: str) -> bytes:
    """The parent of block 0: a model's weights fingerprint, hashed."""
    return hashlib.blake2b(b"pdcluster-prefix-v1\0" + model_fingerprint.encode(), digest_size=8).digest()


def block_hashes(model_fingerprint: str, token_ids: Sequence[int], block_tokens: int = BLOCK_TOKENS) -> list[int]:
    """The chained hash of every full block of ``token_ids``, as unsigned 64-bit ints."""
    if block_tokens <= 0:
        raise ValueError(f"block_tokens must be positive, got {block_tokens}")
    parent = root_hash(model_fingerprint)
    hashes: list[int] = []
    for start in range(0, len(token_ids) - block_tokens + 1, block_tokens):
        block = token_ids[start : start + block_tokens]
        digest = hashlib.blake2b(parent + struct.pack(f"<{block_tokens}I", *block), digest_size=8).digest()
        hashes.append(int.from_bytes(digest, "little"))
        parent = digest
    return hashes


def longest_cached(hashes: Sequence[int], held: Iterable[int] | set[int] | frozenset[int]) -> int:
    """How many leading blocks of a request (its ``hashes``) are in ``held``.

    Chaining makes membership of block ``i`` imply the whole prefix up to it,
    so this is the largest ``k`` with ``hashes[k - 1] in held``."""
    held_set = held if isinstance(held, (set, frozenset)) else set(held)
    for k in range(len(hashes), 0, -1):
        if hashes[k - 1] in held_set:
            return k
    return 0


def reusable_tokens(num_blocks: int, prompt_tokens: int, block_tokens: int = BLOCK_TOKENS) -> int:
    """Tokens of a ``prompt_tokens`` prompt that ``num_blocks`` cached blocks
    can spare from prefill: whole blocks only, and never the last prompt
    token, whose logits the first token is sampled from."""
    return max(0, min(num_blocks, (prompt_tokens - 1) // block_tokens)) * block_tokens
