"""KV reservations on a decode worker, each under a lease.

A ``Decode`` call reserves its cache's bytes before anything arrives. A remote
request's lease carries a random transfer token that the prefill node presents
on the data plane; the KV listener ``claim``s the lease with it (once), reports
every arrival of bytes (``heard``) and ``deliver``s the finished transfer, or
the error that ended it, to the lease's future on the event loop. The lease
ends when its request ends, however it ends: ``free`` closes any transfer
still reading, so a receive thread never outlives its lease.

Time bounds, all read from the table's ``clock`` (``time.monotonic`` unless a
test injects another), decided here and enforced by the decode RPC, which
waits ``remaining(lease)`` and then calls ``expire_if_due``:

* a waiting lease expires ``queue_s + lease_s`` after it was reserved (and
  ``remaining`` has its waiter check back every ``lease_s``, so a claim that
  brings the deadline forward is noticed on time): no
  prefill node connected. A prefill node connects when its prefill starts
  computing, not when it is queued, and may queue on its engine for up to its
  queue deadline (``queue_s`` here, the table's allowance for it; 0 by default);
* a receiving lease expires after ``lease_s`` without a byte (``heard``; the
  claim counts as one): first the wait for the first KV byte of a running
  prefill, then any silence, so a long but steady transfer is never cut, a
  stalled one is;
* and ``max_transfer_s`` after its claim, however steady.

Invariants:

* ``reserved_bytes`` is the sum over live leases; both it and the lease count
  stay within the table's limits.
* a transfer token maps to at most one live lease and is claimed at most once;
  an expired or freed lease cannot be claimed.
* ``claim``, ``heard`` and ``deliver`` are safe from any thread (the KV
  listener's); ``reserve``, ``expire_if_due`` and ``free`` run on the event
  loop that owns the futures.
"""
from __future__ import annotations

import asyncio
import contextlib
import math
import secrets
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from workers.engines.base import KVLayout

TOKEN_BYTES = 16
MAX_TRANSFER_S = 900.0  # a claimed transfer must complete within this

Clock = Callable[[], float]  # seconds, never going backwards


class LeaseError(RuntimeError):
    """A reservation could not be made; ``reason`` is a gRPC-ish category."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason  # "exists" | "exhausted"


@dataclass(eq=False)
class Lease:
    """One request's reservation. ``kv`` resolves to the transfer's result.
    Times are the owning table's ``clock`` readings."""

    request_id: str
    layout: KVLayout
    reserved_bytes: int
    token: bytes | None  # None: colocated, no transfer expected
    kv: asyncio.Future[Any]
    lease_s: float  # the longest wait for a sender, and the longest silence within its transfer
    reserved_at: float
    state: str = "waiting"  # waiting -> receiving -> done; or loaded (colocated)
    claimed_at: float | None = None  # set with state "receiving"
    heard_at: float | None = None  # the latest arrival of bytes (the claim counts as one)
    first_byte_at: float | None = None  # the first arrival of KV bytes after the claim
    _sock: socket.socket | None = field(default=None, repr=False)


class LeaseTable:
    """Live leases of one worker, bounded by count and reserved bytes."""

    def __init__(self, *, max_leases: int, max_reserved_bytes: int | None = None,
                 max_transfer_s: float = MAX_TRANSFER_S, queue_s: float = 0.0,
                 clock: Clock = time.monotonic) -> None:
        if queue_s < 0:
            raise ValueError(f"queue_s must be >= 0, got {queue_s}")
        self.max_leases = max_leases
        self.queue_s = queue_s  # how long a sender may queue on its engine before it connects
        self.max_transfer_s = max_transfer_s
        self.max_reserved_bytes = max_reserved_bytes  # None: no KV budget, only the count bounds leases
        self.num_expired = 0
        self._clock = clock
        self._by_rid: dict[str, Lease] = {}
        self._by_token: dict[bytes, Lease] = {}
        self._lock = threading.Lock()

    @property
    def num_active(self) -> int:
        return len(self._by_rid)

    @property
    def reserved_bytes(self) -> int:
        with self._lock:
            return sum(lease.reserved_bytes for lease in self._by_rid.values())

    @property
    def usage(self) -> float:
        """How full the KV memory is (0-1): reserved bytes over the budget; without a budget,
        leases in use over ``max_leases`` (vLLM's ``kv_cache_usage_perc``)."""
        budget = self.max_reserved_bytes
        return self.reserved_bytes / budget if budget else self.num_active / self.max_leases

    def reserve(self, request_id: str, layout: KVLayout, lease_s: float, *, remote: bool,
                extra_bytes: int = 0) -> Lease:
        """Reserve ``layout.total_bytes`` (the transfer's) plus ``extra_bytes``
        (KV the request holds without receiving it: a reused cached prefix) for
        ``request_id`` under a ``lease_s`` lease. A remote lease gets a fresh
        transfer token. ``LeaseError`` ("exists" or "exhausted") when the id
        holds a lease or a limit is reached."""
        if extra_bytes < 0:
            raise ValueError(f"extra_bytes must be >= 0, got {extra_bytes}")
        need = layout.total_bytes + extra_bytes
        loop = asyncio.get_running_loop()
        with self._lock:
            if request_id in self._by_rid:
                raise LeaseError("exists", f"request {request_id!r} already holds a lease on this worker")
            if len(self._by_rid) >= self.max_leases:
                raise LeaseError("exhausted", f"all {self.max_leases} leases of this worker are in use")
            reserved = sum(lease.reserved_bytes for lease in self._by_rid.values())
            if self.max_reserved_bytes is not None and reserved + need > self.max_reserved_bytes:
                raise LeaseError(
                    "exhausted",
                    f"reserving {need} KV bytes would exceed this worker's KV budget of "
                    f"{self.max_reserved_bytes} bytes (--kv-budget-gb {self.max_reserved_bytes / 1e9:g}); "
                    f"{reserved} bytes are already reserved",
                )
            token = secrets.token_bytes(TOKEN_BYTES) if remote else None
            lease = Lease(request_id, layout, need, token, loop.create_future(), lease_s,
                          reserved_at=self._clock(), state="waiting" if remote else "loaded")
            self._by_rid[request_id] = lease
            if token is not None:
                self._by_token[token] = lease
            return lease

    def find(self, request_id: str) -> Lease | None:
        with self._lock:
            return self._by_rid.get(request_id)

    def deadline(self, lease: Lease) -> float:
        """When ``lease`` expires unless bytes arrive first (``math.inf``: it
        cannot expire, being colocated or past its transfer)."""
        if lease.state == "waiting":
            return lease.reserved_at + self.queue_s + lease.lease_s
        if lease.state == "receiving":
            assert lease.claimed_at is not None and lease.heard_at is not None
            return min(lease.claimed_at + self.max_transfer_s, lease.heard_at + lease.lease_s)
        return math.inf

    def remaining(self, lease: Lease) -> float:
        """Seconds until the decode RPC should ask ``expire_if_due`` again: until ``deadline(lease)``
        (negative once it passed), but at most ``lease_s`` while the lease waits for its sender.

        A claim can bring a waiting lease's deadline forward (its queue allowance is
        no longer needed); checking at least every ``lease_s`` notices the new
        deadline on time, since it is at least ``lease_s`` after the claim."""
        left = self._left(lease)
        return min(left, lease.lease_s) if lease.state == "waiting" else left

    def _left(self, lease: Lease) -> float:
        """Seconds until ``deadline(lease)``, negative once it passed."""
        return self.deadline(lease) - self._clock()

    def transfer_time_left(self, lease: Lease) -> float:
        """Seconds a claimed transfer has left before ``max_transfer_s``, however steady."""
        assert lease.claimed_at is not None, "the lease was not claimed"
        return lease.claimed_at + self.max_transfer_s - self._clock()

    def claim(self, token: bytes, sock: socket.socket) -> Lease | None:
        """The waiting, unexpired lease for ``token``, now receiving on
        ``sock``; None if there is none (unknown, already claimed, freed or expired)."""
        with self._lock:
            lease = self._by_token.pop(token, None)
            if lease is None or lease.state != "waiting" or self._left(lease) <= 0:
                return None
            lease.state = "receiving"
            lease._sock = sock
            lease.claimed_at = lease.heard_at = self._clock()
            return lease

    def heard(self, lease: Lease) -> None:
        """Bytes of ``lease``'s transfer arrived now: its silence starts over."""
        now = self._clock()
        if lease.first_byte_at is None:
            lease.first_byte_at = now
        lease.heard_at = now  # one attribute store: atomic under the GIL, no lock needed

    def expire_if_due(self, lease: Lease) -> str | None:
        """Free ``lease`` as expired if its deadline has passed, and say why;
        None (and nothing freed) if it has not, or the lease is no longer live."""
        with self._lock:
            if self._by_rid.get(lease.request_id) is not lease or self._left(lease) > 0:
                return None
            why = self._expiry_reason(lease)
            sock = self._unlink(lease, expired=True)
        self._cut(lease, sock)
        return why

    def deliver(self, lease: Lease, result: Any = None, error: BaseException | None = None) -> None:
        """Resolve ``lease.kv`` from any thread (ignored if already resolved)."""
        with self._lock:
            lease._sock = None
            if lease.state == "receiving":
                lease.state = "done"

        def resolve() -> None:
            if lease.kv.done():
                return
            if error is not None:
                lease.kv.set_exception(error)
            else:
                lease.kv.set_result(result)

        with contextlib.suppress(RuntimeError):  # loop already closed: nobody is waiting
            lease.kv.get_loop().call_soon_threadsafe(resolve)

    def free(self, lease: Lease, *, expired: bool = False) -> None:
        """End ``lease``: release its bytes and token, and cut any transfer
        still reading into it. Idempotent."""
        with self._lock:
            if self._by_rid.get(lease.request_id) is not lease:
                return
            sock = self._unlink(lease, expired=expired)
        self._cut(lease, sock)

    def _expiry_reason(self, lease: Lease) -> str:
        if lease.state == "waiting":
            if self.queue_s == 0:
                return f"no prefill node connected within {lease.lease_s:g}s"
            return (f"no prefill node connected within {self.queue_s + lease.lease_s:g}s (its queue deadline "
                    f"{self.queue_s:g}s, then the {lease.lease_s:g}s lease)")
        assert lease.claimed_at is not None
        if self._clock() >= lease.claimed_at + self.max_transfer_s:
            return f"the KV transfer did not complete within {self.max_transfer_s:g}s"
        if lease.first_byte_at is None:
            return f"the prefill node connected but sent no KV byte for {lease.lease_s:g}s"
        return f"the KV transfer stalled: no bytes for {lease.lease_s:g}s"

    def _unlink(self, lease: Lease, *, expired: bool) -> socket.socket | None:
        """Under the lock: forget a live lease; the socket its transfer reads from, if any."""
        del self._by_rid[lease.request_id]
        if lease.token is not None:
            self._by_token.pop(lease.token, None)
        sock, lease._sock = lease._sock, None
        lease.state = "done"
        if expired:
            self.num_expired += 1
        return sock

    @staticmethod
    def _cut(lease: Lease, sock: socket.socket | None) -> None:
        """Outside the lock: wake a receive thread still reading, and settle ``lease.kv``."""
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)  # wakes the receive thread at once
        if not lease.kv.done():
            lease.kv.cancel()
        elif not lease.kv.cancelled():
            lease.kv.exception()  # retrieved: an outcome nobody awaits is not an error to log
