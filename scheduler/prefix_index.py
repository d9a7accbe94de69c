"""The prefix index: which node holds which prompt prefix, as the scheduler last heard.

Workers key their prefix caches by the chained block hashes of
``cluster/blocks.py`` and report the hashes they hold; this index keeps one
set per node, and answers "how many of this request's prompt tokens does node
N hold already" (the figure ``ClusterView.cached_tokens`` carries to the
policies). It is the scheduler's copy of the truth, like Dynamo's KV router or
llm-d's precise prefix-cache scorer: pure Python, no I/O, fed three ways:

    replace(node_id, hashes)   # a Stats snapshot: everything the node holds now
    add(node_id, hashes)       # Done / PrefillReply: what it holds now for one request
    forget(node_id)            # the node left

NOTE on staleness and bounds. Between two snapshots a node may evict blocks
the index still lists (the next ``replace`` corrects it) or gain blocks it has
not reported yet; a wrong guess costs one slower prefill, never a wrong
answer, because the worker checks its own cache. Chaining makes a held block
``i`` stand for the whole prefix up to ``i``, so forgetting an early hash of a
prefix does not lose the claim on the later ones. Each node keeps at most
``max_hashes_per_node`` hashes (default ``MAX_HASHES_PER_NODE``, about 1M,
~70 MB of Python ints at worst). A worker's cache is bounded in bytes far
below that (1M blocks of 64 tokens is 8 TB of Llama-3.1-8B KV), so the cap
only guards the scheduler against a buggy or hostile report, and what happens
past it is kept simple: a ``replace`` keeps the last ``max_hashes_per_node``
of its snapshot, an ``add`` that would overflow drops what the node held
before and keeps only the newest report (the last ``max_hashes_per_node`` of
it). Either way the next Stats snapshot sets the node right.
"""
from __future__ import annotations

from collections.abc import Iterable, Sequence

from cluster.blocks import BLOCK_TOKENS, longest_cached, reusable_tokens

MAX_HASHES_PER_NODE = 1 << 20


class PrefixIndex:
    """Per-node sets of held prefix-block hashes; lookups by a request's hashes."""

    def __init__(self, max_hashes_per_node: int = MAX_HASHES_PER_NODE, block_tokens: int = BLOCK_TOKENS) -> None:
        if max_hashes_per_node < 1 or block_tokens < 1:
            raise ValueError("max_hashes_per_node and block_tokens must be >= 1")
        self.max_hashes_per_node, self.block_tokens = max_hashes_per_node, block_tokens
        self._held: dict[str, set[int]] = {}  # node -> block hashes it holds

    # ------------------------------------------------------------ what nodes report

    def replace(self, node_id: str, hashes: Iterable[int]) -> None:
        """``node_id`` holds exactly ``hashes`` now (a Stats snapshot, oldest first)."""
        self._held[node_id] = self._bounded(hashes)

    def add(self, node_id: str, hashes: Iterable[int]) -> None:
        """``node_id`` holds ``hashes`` now, besides what it held (the blocks of one
        request, from ``Done.prefix_blocks`` or ``PrefillReply.prefix_blocks``)."""
        new = self._bounded(hashes)
        held = self._held.setdefault(node_id, set())
        held |= new
        if len(held) > self.max_hashes_per_node:  # past the cap: only the newest report counts (module NOTE)
            self._held[node_id] = new

    def forget(self, node_id: str) -> None:
        """``node_id`` left: it holds nothing the scheduler can use. Idempotent."""
        self._held.pop(node_id, None)

    # ------------------------------------------------------------ what placement asks

    def cached_blocks(self, node_id: str, request_hashes: Sequence[int]) -> int:
        """Leading blocks of a request (its ``request_hashes``) that ``node_id`` holds."""
        held = self._held.get(node_id)
        return longest_cached(request_hashes, held) if held else 0

    def cached_tokens(self, node_id: str, request_hashes: Sequence[int], prompt_tokens: int) -> int:
        """Prompt tokens of a ``prompt_tokens``-token request whose KV ``node_id``
        holds: its longest held whole-block prefix, never the last prompt token."""
        return reusable_tokens(self.cached_blocks(node_id, request_hashes), prompt_tokens, self.block_tokens)

    def cached_by_node(self, request_hashes: Sequence[int], prompt_tokens: int,
                       node_ids: Iterable[str]) -> dict[str, int]:
        """``cached_tokens`` for every node of ``node_ids`` (0 for a node the index does not know)."""
        return {n: self.cached_tokens(n, request_hashes, prompt_tokens) for n in node_ids}

    def sizes(self) -> dict[str, int]:
        """Node -> hashes held, for every node the index knows (for /health and logs)."""
        return {node: len(held) for node, held in self._held.items()}

    def __contains__(self, node_id: object) -> bool:
        return node_id in self._held

    def _bounded(self, hashes: Iterable[int]) -> set[int]:
        """``hashes`` as a set, cut to the last ``max_hashes_per_node`` when longer."""
        listed = list(dict.fromkeys(hashes))  # distinct, in the order given
        return set(listed[-self.max_hashes_per_node:])
