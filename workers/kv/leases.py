"""KV reservations on a decode worker, each under a lease.

A ``Decode`` call reserves its cache's bytes before anything arrives. A remote
request's lease carries a random transfer token that the prefill node presents
on the data plane; the KV listener ``claim``s the lease with it (once) and
``deliver``s the finished transfer, or the error that ended it, to the lease's
future on the event loop. The lease ends when its request ends, however it
ends: ``free`` closes any transfer still reading, so a receive thread never
outlives its lease.

Time bounds: ``lease_s`` bounds the wait for the prefill node to connect and,
once it has, every silence within the transfer; a claim moves the deadline to
``max_transfer_s`` from then, so a long but steady prefill is not cut off.

Invariants:

* ``reserved_bytes`` is the sum over live leases; both it and the lease count
  stay within the table's limits.
* a transfer token maps to at most one live lease and is claimed at most once;
  an expired or freed lease cannot be claimed.
* ``claim`` and ``deliver`` are safe from any thread (the KV listener's);
  ``reserve`` and ``free`` run on the event loop that owns the futures.
"""
from __future__ import annotations

import asyncio
import contextlib
import secrets
import socket
import threading
import time
from dataclasses import dataclass, field
from typing import Any

from workers.engines.base import KVLayout

TOKEN_BYTES = 16
MAX_TRANSFER_S = 900.0  # a claimed transfer must complete within this


class LeaseError(RuntimeError):
    """A reservation could not be made; ``reason`` is a gRPC-ish category."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason  # "exists" | "exhausted"


@dataclass(eq=False)
class Lease:
    """One request's reservation. ``kv`` resolves to the transfer's result."""

    request_id: str
    layout: KVLayout
    reserved_bytes: int
    deadline: float  # time.monotonic()
    token: bytes | None  # None: colocated, no transfer expected
    kv: asyncio.Future[Any]
    state: str = "waiting"  # waiting -> receiving -> done; or loaded (colocated)
    lease_s: float = 0.0  # also the longest silence allowed mid-transfer
    _sock: socket.socket | None = field(default=None, repr=False)

    def remaining(self, now: float | None = None) -> float:
        return self.deadline - (time.monotonic() if now is None else now)


class LeaseTable:
    """Live leases of one worker, bounded by count and reserved bytes."""

    def __init__(self, *, max_leases: int, max_reserved_bytes: int | None = None,
                 max_transfer_s: float = MAX_TRANSFER_S) -> None:
        self.max_leases = max_leases
        self.max_transfer_s = max_transfer_s
        self.max_reserved_bytes = max_reserved_bytes
        self.num_expired = 0
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

    def reserve(self, request_id: str, layout: KVLayout, lease_s: float, *, remote: bool) -> Lease:
        """Reserve ``layout.total_bytes`` for ``request_id`` until ``lease_s``
        from now. A remote lease gets a fresh transfer token."""
        loop = asyncio.get_running_loop()
        with self._lock:
            if request_id in self._by_rid:
                raise LeaseError("exists", f"request {request_id!r} already holds a lease on this worker")
            if len(self._by_rid) >= self.max_leases:
                raise LeaseError("exhausted", f"all {self.max_leases} leases of this worker are in use")
            reserved = sum(lease.reserved_bytes for lease in self._by_rid.values())
            if self.max_reserved_bytes is not None and reserved + layout.total_bytes > self.max_reserved_bytes:
                raise LeaseError(
                    "exhausted",
                    f"reserving {layout.total_bytes} KV bytes would exceed this worker's limit "
                    f"({reserved} of {self.max_reserved_bytes} already reserved)",
                )
            token = secrets.token_bytes(TOKEN_BYTES) if remote else None
            lease = Lease(request_id, layout, layout.total_bytes, time.monotonic() + lease_s, token,
                          loop.create_future(), state="waiting" if remote else "loaded", lease_s=lease_s)
            self._by_rid[request_id] = lease
            if token is not None:
                self._by_token[token] = lease
            return lease

    def find(self, request_id: str) -> Lease | None:
        with self._lock:
            return self._by_rid.get(request_id)

    def claim(self, token: bytes, sock: socket.socket) -> Lease | None:
        """The waiting, unexpired lease for ``token``, now receiving on
        ``sock``; None if there is none (unknown, already claimed, freed or expired)."""
        with self._lock:
            lease = self._by_token.pop(token, None)
            if lease is None or lease.state != "waiting" or lease.remaining() <= 0:
                return None
            lease.state = "receiving"
            lease._sock = sock
            # The lease bounds how long the prefill node may take to connect; once it
            # has, a long prefill keeps streaming, bounded by max_transfer_s.
            lease.deadline = time.monotonic() + self.max_transfer_s
            return lease

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
            del self._by_rid[lease.request_id]
            if lease.token is not None:
                self._by_token.pop(lease.token, None)
            sock, lease._sock = lease._sock, None
            lease.state = "done"
            if expired:
                self.num_expired += 1
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)  # wakes the receive thread at once
        if not lease.kv.done():
            lease.kv.cancel()
        elif not lease.kv.cancelled():
            lease.kv.exception()  # retrieved: an outcome nobody awaits is not an error to log
