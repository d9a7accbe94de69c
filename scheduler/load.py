"""The load ledger: what each node carries, as placement sees it.

One ``LoadLedger`` answers, for the live scheduler and the simulator alike,
"how many requests are active on node N", "how many seconds of prefill are
queued on N" and "how many KV bytes are resident on N". Callers feed it a
request's life in four verbs:

    admit(request_id, prefill_node, decode_node, predicted_prefill_s, kv_bytes)
    prefill_started(request_id)   # optional: the simulator knows, the live scheduler does not
    prefill_done(request_id)
    finish(request_id)

NOTE on the rules (the same live and simulated). A request is active, and its
KV resident, on its decode node from admission until it finishes, and on a
remote prefill node until its prefill is done. Its predicted prefill seconds
are backlog on the node that prefills (the decode node when colocated): all of
them while the prefill waits, the remainder ``start + predicted - now`` once
``prefill_started`` was called, none once it is done. The clock is injectable
(the simulator's event clock, a test's fake); only ``prefill_started`` and the
backlog of a started prefill read it.

Each node keeps running sums (queued seconds, resident bytes) updated in the
order events arrive, so the numbers a policy sees do not depend on how many
requests the ledger has seen.
"""
from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass


@dataclass
class _Entry:
    """One admitted request. Invariant: ``prefill_ends_at`` is set only while the prefill runs."""

    prefill_node: str  # the node that prefills: decode_node when colocated
    decode_node: str
    predicted_prefill_s: float
    kv_bytes: float
    prefill_ends_at: float | None = None
    prefill_over: bool = False

    @property
    def remote(self) -> bool:
        return self.prefill_node != self.decode_node

    @property
    def nodes(self) -> tuple[str, ...]:
        return (self.prefill_node, self.decode_node) if self.remote else (self.decode_node,)


class LoadLedger:
    """Per-node load of admitted requests: active count, prefill backlog, resident KV."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self.clock = clock
        self._entries: dict[str, _Entry] = {}
        self._active: dict[str, int] = {}  # node -> requests active there; no zero entries
        self._queued_s: dict[str, float] = {}  # node -> predicted seconds of prefills admitted, not started
        self._running: dict[str, dict[str, float]] = {}  # node -> request id -> predicted end of its prefill
        self._kv: dict[str, float] = {}  # node -> KV bytes of the requests active there

    # ------------------------------------------------------------ the request's life

    def admit(self, request_id: str, prefill_node: str | None, decode_node: str,
              predicted_prefill_s: float = 0.0, kv_bytes: float = 0) -> None:
        """Count a placed request. ``prefill_node`` None (or the decode node) means colocated."""
        if request_id in self._entries:
            raise ValueError(f"request {request_id!r} is already in the ledger")
        if predicted_prefill_s < 0 or kv_bytes < 0:
            raise ValueError("predicted_prefill_s and kv_bytes must be >= 0")
        entry = _Entry(prefill_node or decode_node, decode_node, predicted_prefill_s, kv_bytes)
        self._entries[request_id] = entry
        for node in entry.nodes:
            self._active[node] = self._active.get(node, 0) + 1
            self._kv[node] = self._kv.get(node, 0) + kv_bytes
        self._queued_s[entry.prefill_node] = self._queued_s.get(entry.prefill_node, 0.0) + predicted_prefill_s

    def prefill_started(self, request_id: str) -> None:
        """The prefill left its node's queue and runs now: its backlog counts down with the clock."""
        entry = self._entries[request_id]
        if entry.prefill_over or entry.prefill_ends_at is not None:
            raise ValueError(f"request {request_id!r}: prefill already started")
        self._unqueue(entry)
        entry.prefill_ends_at = self.clock() + entry.predicted_prefill_s
        self._running.setdefault(entry.prefill_node, {})[request_id] = entry.prefill_ends_at

    def prefill_done(self, request_id: str) -> None:
        """The prefill node's part is over (done, failed or cancelled). Idempotent;
        a request no longer in the ledger is ignored."""
        entry = self._entries.get(request_id)
        if entry is None or entry.prefill_over:
            return
        entry.prefill_over = True
        if entry.prefill_ends_at is None:
            self._unqueue(entry)
        else:
            del self._running[entry.prefill_node][request_id]
        if entry.remote:
            self._leave(entry.prefill_node, entry)

    def finish(self, request_id: str) -> None:
        """The request ended (last token, error or cancellation): it leaves every node. Idempotent."""
        entry = self._entries.get(request_id)
        if entry is None:
            return
        self.prefill_done(request_id)
        self._leave(entry.decode_node, entry)
        del self._entries[request_id]

    # ------------------------------------------------------------ what placement reads

    def active_requests(self, node: str) -> int:
        """Requests with work left on ``node``."""
        return self._active.get(node, 0)

    def prefill_backlog_s(self, node: str) -> float:
        """Predicted seconds of prefill on ``node``: the running prefills' remainders plus the queued ones."""
        now = self.clock() if self._running.get(node) else 0.0
        running = sum(max(0.0, end - now) for end in self._running.get(node, {}).values())
        return running + self._queued_s.get(node, 0.0)

    def resident_kv_bytes(self, node: str) -> float:
        """KV bytes of the requests active on ``node`` (as admitted)."""
        return self._kv.get(node, 0)

    def is_busy(self, node: str) -> bool:
        """Whether any request has work left on ``node``."""
        return self.active_requests(node) > 0

    def active_counts(self) -> dict[str, int]:
        """Node -> active requests, for every node with at least one."""
        return dict(self._active)

    def __contains__(self, request_id: object) -> bool:
        return request_id in self._entries

    def __len__(self) -> int:
        """Requests admitted and not finished."""
        return len(self._entries)

    # ------------------------------------------------------------ internals

    def _unqueue(self, entry: _Entry) -> None:
        node = entry.prefill_node
        self._queued_s[node] = max(0.0, self._queued_s[node] - entry.predicted_prefill_s)

    def _leave(self, node: str, entry: _Entry) -> None:
        self._kv[node] -= entry.kv_bytes
        self._active[node] -= 1
        if not self._active[node]:
            del self._active[node]
