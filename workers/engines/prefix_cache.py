"""Each worker's prefix cache: finished requests' KV, kept in host memory so
that the next turn of a conversation, or another request with the same system
prompt, prefills only its new tokens.

The cache is engine-agnostic: it holds wire-format KV (``KVSlice`` layout,
``[kv_heads, tokens, head_dim]`` per layer) keyed by the chained block hashes
of ``cluster/blocks.py``, rooted in the model's weights fingerprint, so KV is
never reused across models or weights. A hit is a ``PrefixHit`` that an engine
passes to ``prefill(..., prefix=hit.layers)``.

NOTE on the design. The store is block-level (like vLLM), not whole sequences
(like mlx-lm's ``LRUPromptCache``): each full block of ``block_tokens`` tokens
is one numpy array ``[num_layers, 2, kv_heads, block_tokens, head_dim]`` under
its chained hash, with its parent's hash. Because the hash names the whole
prefix, a block is shared by every sequence that starts with the same tokens:
a long system prompt is held once however many conversations use it, and a
conversation's next turn adds only its new blocks (the older, shorter "entry"
is thereby replaced without a second copy). Memory is counted honestly: each
block owns its array (insert copies; it never keeps views of the caller's
arrays, which would pin their untracked tails), so ``nbytes`` is the sum of the
block arrays' ``nbytes`` and shared prefixes count once (Python object
overhead, ~100 bytes a block, is not counted). Invariant: a block is held only
while its parent is, so a held hash always names a complete prefix (what
``longest_cached`` and the scheduler's index assume). It is kept by the LRU
order: a touch moves a chain to the recent end leaf first, so every block sits
after all of its children, the least recently used block is always a leaf, and
eviction pops from the old end. A sequence's tail thus goes before the prefix
it shares with others. The price is one copy on ``lookup`` (blocks are joined
into one contiguous prefix), which the engine's load copies again anyway; the
copies run outside the lock, so a long hit never stalls the asyncio loop.
``num_entries`` counts sequences (blocks without a held child); ``evictions``
counts blocks. A chain larger than the whole capacity is not stored. Capacity 0
disables the cache.

Models with sliding-window layers (``KVLayout.windows``) get no prefix reuse:
such a layer holds only its window, not the blocks of a prefix. The cache is
off for them (it stores nothing and every lookup misses, so the scheduler sees
no cached blocks), said once in the log. It knows from ``windows`` at
construction, or at the first insert whose layers show it (some layer from
token 0, another only from later on: a sliding layer past its window); what it
held until then is dropped.
"""
from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from cluster.blocks import BLOCK_TOKENS, block_hashes, reusable_tokens
from workers.engines.base import KVLayout, KVSlice, numpy_dtype

log = logging.getLogger(__name__)
_SLIDING_OFF = ("prefix cache off: this model has sliding-window layers, whose cache holds only the last "
                "window of tokens rather than reusable prefix blocks")


@dataclass(frozen=True)
class PrefixHit:
    """A cached prefix a prompt can start from."""

    num_tokens: int  # p: whole blocks, always < len(prompt) (cluster.blocks.reusable_tokens)
    layers: list[KVSlice]  # one per layer, tokens [0, p), start 0; fresh copies the cache never touches again
    block_hashes: list[int]  # the hashes of the reused blocks


@dataclass
class _Block:
    parent: int | None  # hash of block i - 1; None for block 0
    kv: np.ndarray  # [num_layers, 2, kv_heads, block_tokens, head_dim]; never mutated
    last_used: float
    num_children: int = 0  # held blocks whose parent this is


class PrefixCache:
    """A byte-bounded LRU cache of prefix blocks for one model. Thread-safe:
    every method may be called from any thread."""

    def __init__(self, model_fingerprint: str, capacity_bytes: int, block_tokens: int = BLOCK_TOKENS,
                 clock: Callable[[], float] = time.monotonic, windows: tuple[int, ...] = ()) -> None:
        if capacity_bytes < 0:
            raise ValueError(f"capacity_bytes must be >= 0, got {capacity_bytes}")
        if block_tokens <= 0:
            raise ValueError(f"block_tokens must be positive, got {block_tokens}")
        self.model_fingerprint = model_fingerprint
        self.block_tokens = block_tokens
        self._clock = clock
        self._lock = threading.Lock()
        self._capacity = capacity_bytes
        self._blocks: OrderedDict[int, _Block] = OrderedDict()  # least recently used first
        self._layout: KVLayout | None = None  # fixed by the first insert, until clear()
        self._nbytes = 0
        self._hits = self._hit_tokens = self._misses = self._evictions = 0
        self._sliding = False  # the model has sliding-window layers: no prefix reuse (see ``sliding``)
        if any(windows):
            self._turn_off_for_sliding()

    # ---------------------------------------------------------------- lookup

    def lookup(self, token_ids: Sequence[int], *, touch: bool = True) -> PrefixHit | None:
        """The longest cached full-block prefix a prompt of ``token_ids`` can
        reuse (never all of it: at least the last token is prefilled), or None.
        With ``touch``, the reused blocks become most recently used and the hit
        or miss is counted."""
        if self._sliding:
            return None
        hashes = self._hashes(token_ids)
        with self._lock:
            num_blocks = self._num_reusable(hashes, len(token_ids))
            chain = hashes[:num_blocks]
            parts = [self._blocks[h].kv for h in chain]
            if touch:
                self._count(num_blocks * self.block_tokens)
                self._touch(chain)
            dtype = self._layout.dtype if self._layout is not None else ""
        if not parts:
            return None
        kv = np.concatenate(parts, axis=3)  # [num_layers, 2, kv_heads, p, head_dim]; a fresh copy
        layers = [KVSlice(layer, 0, kv[layer, 0], kv[layer, 1], dtype) for layer in range(kv.shape[0])]
        return PrefixHit(num_blocks * self.block_tokens, layers, chain)

    def peek(self, token_ids: Sequence[int]) -> int:
        """Tokens ``lookup`` would reuse now; changes neither LRU order nor counters."""
        hashes = self._hashes(token_ids)
        with self._lock:
            return self._num_reusable(hashes, len(token_ids)) * self.block_tokens

    def blocks_of(self, token_ids: Sequence[int]) -> list[int]:
        """The hashes held for this token sequence's prefix (every full block,
        the last token's included)."""
        hashes = self._hashes(token_ids)
        with self._lock:
            return hashes[: self._num_held(hashes)]

    def held_blocks(self) -> list[int]:
        """Every block hash held, least recently used first (for the
        scheduler's per-node index)."""
        with self._lock:
            return list(self._blocks)

    # ---------------------------------------------------------------- insert

    def insert(self, token_ids: Sequence[int], layers: list[KVSlice]) -> list[int]:
        """Store the full blocks of ``token_ids`` from ``layers`` (one slice per
        layer, in order, start 0, covering at least the full blocks; tokens
        past them are cut). Blocks already held are kept and touched, so a
        sequence that extends a held one adds only its new blocks, and one
        already covered only touches its blocks. A chain larger than the
        capacity is not stored. Evicts least recently used blocks until the
        byte bound holds. Returns the block hashes now held for this sequence
        ([] for a model with sliding-window layers, whose KV is not stored)."""
        if self._sliding or _shows_a_window(layers):
            self._turn_off_for_sliding()
            return []
        hashes = self._hashes(token_ids)
        layout = _layout_of(layers, len(hashes) * self.block_tokens)
        block_bytes = layout.bytes_per_token * self.block_tokens
        with self._lock:
            self._check_layout(layout)
            if not hashes or len(hashes) * block_bytes > self._capacity:
                return hashes[: self._num_held(hashes)]
            missing = [i for i, h in enumerate(hashes) if h not in self._blocks]
        copies = {i: self._copy_block(layers, layout, i) for i in missing}  # outside the lock: may be large
        with self._lock:
            if self._sliding:  # turned off meanwhile
                return []
            self._check_layout(layout)
            self._layout = layout
            num_stored = self._add_chain(hashes, copies)
            self._touch(hashes[:num_stored])
            self._evict_to(self._capacity)
            return hashes[: self._num_held(hashes)]

    def _add_chain(self, hashes: list[int], copies: dict[int, np.ndarray]) -> int:
        """Add the copied blocks whose parents are held; the chain's length now
        held. A block evicted between copy and commit that was not copied ends
        the chain there."""
        now = self._clock()
        for i, h in enumerate(hashes):
            if h in self._blocks:
                continue
            if i not in copies:
                return i
            parent = hashes[i - 1] if i else None
            self._blocks[h] = _Block(parent, copies[i], now)
            if parent is not None:
                self._blocks[parent].num_children += 1
            self._nbytes += copies[i].nbytes
        return len(hashes)

    def _copy_block(self, layers: list[KVSlice], layout: KVLayout, index: int) -> np.ndarray:
        """Block ``index`` of every layer, copied into one array it owns."""
        start, end = index * self.block_tokens, (index + 1) * self.block_tokens
        kv = np.empty((layout.num_layers, 2, layout.kv_heads, self.block_tokens, layout.head_dim),
                      dtype=numpy_dtype(layout.dtype))  # [num_layers, 2, kv_heads, block_tokens, head_dim]
        for layer, kv_slice in enumerate(layers):
            kv[layer, 0] = kv_slice.keys[:, start:end]
            kv[layer, 1] = kv_slice.values[:, start:end]
        return kv

    def _check_layout(self, layout: KVLayout) -> None:
        if self._layout is not None and self._layout != layout:
            held = self._layout
            raise ValueError(
                f"this prefix cache holds KV of {held.num_layers} layers x {held.kv_heads} heads x "
                f"{held.head_dim} dims ({held.dtype}), got {layout.num_layers} x {layout.kv_heads} x "
                f"{layout.head_dim} ({layout.dtype}); one cache serves one model and dtype")

    @property
    def sliding(self) -> bool:
        """Off because the model has sliding-window layers (no prefix reuse)."""
        return self._sliding

    def _turn_off_for_sliding(self) -> None:
        """No prefix reuse from now on; drop what is held; say so once."""
        if self._sliding:
            return
        self._sliding = True
        self.clear()
        log.info(_SLIDING_OFF)

    # ---------------------------------------------------------------- eviction

    def shrink_to(self, max_bytes: int) -> int:
        """Evict least recently used blocks until ``nbytes <= max_bytes`` (a
        negative bound empties the cache); the bytes freed. The KV budget calls
        this so the prefix cache yields to live requests."""
        with self._lock:
            return self._evict_to(max(0, max_bytes))

    def clear(self) -> None:
        """Drop every block and forget the KV layout; the counters stay."""
        with self._lock:
            self._blocks.clear()
            self._nbytes = 0
            self._layout = None

    def _evict_to(self, max_bytes: int) -> int:
        freed = 0
        while self._nbytes > max_bytes:
            _, block = self._blocks.popitem(last=False)
            assert block.num_children == 0, "LRU order keeps every parent after its children"
            if block.parent is not None:
                self._blocks[block.parent].num_children -= 1
            self._nbytes -= block.kv.nbytes
            freed += block.kv.nbytes
            self._evictions += 1
        return freed

    # ---------------------------------------------------------------- helpers

    def _hashes(self, token_ids: Sequence[int]) -> list[int]:
        return block_hashes(self.model_fingerprint, token_ids, self.block_tokens)

    def _num_held(self, hashes: list[int]) -> int:
        """Leading blocks of ``hashes`` held (a held block's parents all are)."""
        num = 0
        while num < len(hashes) and hashes[num] in self._blocks:
            num += 1
        return num

    def _num_reusable(self, hashes: list[int], prompt_tokens: int) -> int:
        return reusable_tokens(self._num_held(hashes), prompt_tokens, self.block_tokens) // self.block_tokens

    def _touch(self, chain: list[int]) -> None:
        """Make ``chain`` (a prefix, root first) most recently used, leaf first
        so that every block stays after its children."""
        now = self._clock()
        for h in reversed(chain):
            self._blocks.move_to_end(h)
            self._blocks[h].last_used = now

    def _count(self, num_tokens: int) -> None:
        if num_tokens:
            self._hits += 1
            self._hit_tokens += num_tokens
        else:
            self._misses += 1

    # ---------------------------------------------------------------- sizes and counters

    @property
    def capacity_bytes(self) -> int:
        """The byte bound; setting a smaller one evicts at once."""
        with self._lock:
            return self._capacity

    @capacity_bytes.setter
    def capacity_bytes(self, value: int) -> None:
        if value < 0:
            raise ValueError(f"capacity_bytes must be >= 0, got {value}")
        with self._lock:
            self._capacity = value
            self._evict_to(value)

    @property
    def nbytes(self) -> int:
        """Bytes of the block arrays held (shared prefixes counted once); at
        most ``capacity_bytes`` whenever the lock is free."""
        with self._lock:
            return self._nbytes

    @property
    def num_blocks(self) -> int:
        """Blocks held, each ``block_tokens`` tokens of every layer."""
        with self._lock:
            return len(self._blocks)

    @property
    def num_entries(self) -> int:
        """Sequences held: blocks that no held block extends."""
        with self._lock:
            return sum(1 for block in self._blocks.values() if block.num_children == 0)

    @property
    def oldest_idle_s(self) -> float:
        """Seconds since the least recently used block was last used; 0.0 when empty."""
        with self._lock:
            if not self._blocks:
                return 0.0
            return self._clock() - next(iter(self._blocks.values())).last_used

    @property
    def hits(self) -> int:
        """Touching lookups that reused at least one block."""
        with self._lock:
            return self._hits

    @property
    def hit_tokens(self) -> int:
        """Prompt tokens spared from prefill by touching lookups, in all."""
        with self._lock:
            return self._hit_tokens

    @property
    def misses(self) -> int:
        """Touching lookups that reused nothing."""
        with self._lock:
            return self._misses

    @property
    def evictions(self) -> int:
        """Blocks evicted (by the byte bound, ``shrink_to`` or a resize), in all."""
        with self._lock:
            return self._evictions


def _shows_a_window(layers: list[KVSlice]) -> bool:
    """Whether an insert's layers come from a model with sliding-window
    layers: one layer from token 0 and another only from a later token (a
    sliding layer past its window, ``Engine.cached_layer``)."""
    starts = {kv_slice.start for kv_slice in layers}
    return 0 in starts and len(starts) > 1


def _layout_of(layers: list[KVSlice], num_tokens: int) -> KVLayout:
    """The layout of an insert's slices; ``ValueError`` unless they are one
    slice per layer, in order, from token 0, alike in shape and dtype, each
    holding at least ``num_tokens`` tokens."""
    if not layers:
        raise ValueError("insert needs one KVSlice per layer, got none")
    first = layers[0]
    if first.keys.ndim != 3:
        raise ValueError(f"KVSlice keys must be [kv_heads, tokens, head_dim], got shape {first.keys.shape}")
    kv_heads, head_dim = first.keys.shape[0], first.keys.shape[2]
    expected_dtype = numpy_dtype(first.dtype)
    for index, kv_slice in enumerate(layers):
        if kv_slice.layer != index or kv_slice.start != 0:
            raise ValueError(f"insert needs one slice per layer in order, each from token 0; slice {index} is "
                             f"layer {kv_slice.layer} from token {kv_slice.start}")
        for name, array in (("keys", kv_slice.keys), ("values", kv_slice.values)):
            if array.ndim != 3 or (array.shape[0], array.shape[2]) != (kv_heads, head_dim):
                raise ValueError(f"layer {index} {name} has shape {array.shape}; expected "
                                 f"[{kv_heads}, tokens, {head_dim}] like layer 0")
            if kv_slice.dtype != first.dtype or array.dtype != expected_dtype:
                raise ValueError(f"layer {index} {name} is {array.dtype} ({kv_slice.dtype!r}); expected "
                                 f"{expected_dtype} ({first.dtype!r}) like layer 0")
        if kv_slice.keys.shape[1] != kv_slice.values.shape[1] or kv_slice.num_tokens < num_tokens:
            raise ValueError(f"layer {index} holds {kv_slice.keys.shape[1]} key and {kv_slice.values.shape[1]} "
                             f"value tokens; the sequence's full blocks need {num_tokens}")
    return KVLayout(len(layers), kv_heads, head_dim, first.dtype, num_tokens=0)
