"""The worker's ends of the KV data plane.

Decode side, ``KVListener``: one listening socket per worker. Each accepted
connection gets its own thread, which runs the cluster-key handshake (within
``handshake_timeout``, ~2 s), claims
the lease named by the transfer token the sender presented, and receives the
transfer into it, telling the lease of every arrival (``LeaseTable.heard``),
within the lease's ``max_transfer_s``. Whatever ends the transfer (its
``end`` frame, a malformed frame, the sender vanishing, the lease expiring
and cutting the connection) is delivered to that lease alone; the connection
is then closed. A connection
that presents ``PROBE_TOKEN`` instead claims no lease: it is a link probe
(``workers/kv/probe.py``), at most ``MAX_CONCURRENT_PROBES`` at a time.

Two caps keep the port open to the cluster whatever strangers do. Connections
still in the handshake (unauthenticated) are at most ``max_unauthenticated``;
when one more arrives, the oldest of them is evicted (a sender gets through
its handshake in one round trip, an idle connection only ever waits). Connections
that proved the key hold one of ``max_connections`` transfer slots, which
unauthenticated ones never take. Every refusal names its cause to the sender
(``cluster.auth.KVRefused``) and in this side's log.

Prefill side, ``KVPusher``: sends one transfer while the engine computes. In
``threaded`` mode the engine thread only queues each slice (bounded by bytes)
and a sender thread owns the socket, so a slow link stalls compute only when
the queue is full; ``direct`` mode sends from the engine thread itself
(``sendmsg`` releases the GIL, but a full socket buffer blocks compute).
"""
from __future__ import annotations

import collections
import concurrent.futures
import contextlib
import logging
import socket
import threading
import time
from dataclasses import dataclass, replace
from typing import Any

from cluster.auth import (
    REFUSALS,
    AuthError,
    ClusterKey,
    KVRefused,
    client_handshake,
    server_handshake,
)
from workers.engines.base import KVLayout, KVSlice
from workers.kv.codec import Begin, FrameError, FrameReader, slice_digest
from workers.kv.leases import Lease, LeaseTable
from workers.kv.net import connect, tune_socket
from workers.kv.probe import MAX_CONCURRENT_PROBES, PROBE_TOKEN, serve_probe
from workers.kv.transport import KVReceiver, KVSender, ReceivedKV

log = logging.getLogger(__name__)

ACCEPT_POLL_S = 0.5
HANDSHAKE_TIMEOUT_S = 2.0  # a sender answers in one round trip; only idle connections wait longer
MAX_UNAUTHENTICATED = 8  # connections in the handshake at once; the oldest is evicted for a newcomer


class _Pending:
    """One connection still in the handshake; ``evicted`` is set (under the listener's lock) to refuse it."""

    def __init__(self, conn: socket.socket) -> None:
        self.conn = conn
        self.evicted = False
        self.holds_slot = False  # a transfer slot, taken once the sender proved the key


@dataclass(frozen=True)
class Arrival:
    """A completed transfer and the wall-clock time of its last KV byte."""

    kv: ReceivedKV
    last_byte_wall: float | None


class _LeaseReceiver(KVReceiver):
    """A ``KVReceiver`` that accepts the leased layout in any wire dtype: the
    prefill engine's compute dtype may differ from ours, and ``load_kv``
    casts at our edge."""

    def __init__(self, layout: KVLayout) -> None:
        super().__init__()
        self.layout = layout

    def _read_begin(self, reader: FrameReader, expect_rid: str | None,  # type: ignore[override]
                    expected_layout: KVLayout | None, deadline: float) -> Begin:
        begin = KVReceiver._read_begin(reader, expect_rid, None, deadline)
        if replace(begin.layout, dtype=self.layout.dtype) != self.layout:
            raise FrameError(f"begin header field 'layout': expected {self.layout} (any dtype), "
                             f"got {begin.layout}")
        return begin


class KVListener:
    """Accepts authenticated KV transfers and routes each to its lease."""

    def __init__(
        self, leases: LeaseTable, key: ClusterKey, host: str = "127.0.0.1", port: int = 0, *,
        handshake_timeout: float = HANDSHAKE_TIMEOUT_S, max_connections: int = 64,
        max_unauthenticated: int = MAX_UNAUTHENTICATED,
    ) -> None:
        if max_unauthenticated < 1 or max_connections < 1:
            raise ValueError("max_connections and max_unauthenticated must be >= 1")
        self.leases = leases
        self.key = key
        self.handshake_timeout = handshake_timeout
        self.max_unauthenticated = max_unauthenticated
        self.num_refused = 0
        self.num_evicted = 0
        self._slots = threading.BoundedSemaphore(max_connections)  # authenticated connections only
        # connections in the handshake, oldest first; guarded by _lock
        self._pending: collections.OrderedDict[int, _Pending] = collections.OrderedDict()
        self._lock = threading.Lock()
        self._probe_slots = threading.BoundedSemaphore(MAX_CONCURRENT_PROBES)
        self._closed = threading.Event()
        self._sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        tune_socket(self._sock)  # buffer sizes must precede listen() to scale the window
        try:
            self._sock.bind((host, port))
        except OSError as e:  # name the port: "[Errno 98] Address already in use" alone does not
            self._sock.close()
            raise OSError(e.errno, f"KV port {port} on {host} (--kv-port): {e.strerror}") from e
        self._sock.listen(max_connections + max_unauthenticated)
        self._sock.settimeout(ACCEPT_POLL_S)
        self.host, self.port = self._sock.getsockname()[:2]
        self._thread = threading.Thread(target=self._accept_loop, name=f"kv-listen-{self.port}", daemon=True)
        self._thread.start()

    def close(self, timeout: float = 2.0) -> None:
        """Stop accepting; transfers in flight end with their leases."""
        self._closed.set()
        self._thread.join(timeout)
        self._sock.close()

    def _accept_loop(self) -> None:
        while not self._closed.is_set():
            try:
                conn, peer = self._sock.accept()
            except TimeoutError:
                continue
            except OSError:
                if not self._closed.is_set():
                    log.exception("KV listener on port %d failed", self.port)
                return
            pending = self._admit_pending(conn)
            threading.Thread(target=self._serve, args=(conn, peer, pending), name=f"kv-recv-{peer[1]}",
                             daemon=True).start()

    def _admit_pending(self, conn: socket.socket) -> _Pending:
        """Register a new unauthenticated connection, evicting the oldest one when the cap is reached."""
        pending = _Pending(conn)
        with self._lock:
            if len(self._pending) >= self.max_unauthenticated:
                _, oldest = self._pending.popitem(last=False)
                oldest.evicted = True
                self.num_evicted += 1
                # wakes its handshake thread's recv, which then sends the refusal and closes
                with contextlib.suppress(OSError):
                    oldest.conn.shutdown(socket.SHUT_RD)
            self._pending[id(pending)] = pending
        return pending

    def _authenticated(self, pending: _Pending) -> None:
        """The sender proved the key: leave the unauthenticated set for a transfer slot (or ``KVRefused``)."""
        with self._lock:
            if pending.evicted:
                raise KVRefused("busy")
            del self._pending[id(pending)]
        if not self._slots.acquire(blocking=False):
            raise KVRefused("full")
        pending.holds_slot = True

    def _serve(self, conn: socket.socket, peer: tuple[Any, ...], pending: _Pending) -> None:
        with conn:
            tune_socket(conn)
            claimed: list[Lease] = []

            def claim(token: bytes) -> bool:
                self._authenticated(pending)
                if token == PROBE_TOKEN:
                    return True
                lease = self.leases.claim(token, conn)
                claimed.extend([lease] if lease is not None else [])
                return lease is not None

            try:
                token = server_handshake(conn, self.key, self.handshake_timeout, accept_token=claim,
                                         refused=lambda: "busy" if pending.evicted else None)
            except AuthError as e:
                if pending.holds_slot:
                    self._slots.release()
                self._refused(peer, e)
                for lease in claimed:  # claimed, then the sender vanished before our proof
                    self.leases.deliver(lease, error=e)
                return
            finally:
                with self._lock:
                    self._pending.pop(id(pending), None)
            try:
                if token == PROBE_TOKEN:
                    serve_probe(conn, peer[0], slots=self._probe_slots)
                else:
                    self._receive(conn, claimed[0])
            finally:
                self._slots.release()

    def _refused(self, peer: tuple[Any, ...], error: AuthError) -> None:
        """Log a refused connection with its cause, then count it; most evictions of idle strangers at debug."""
        if isinstance(error, KVRefused) and error.reason == "busy":
            # idle strangers can be many: the first eviction warns, the rest are debug lines
            level = logging.WARNING if self.num_evicted == 1 else logging.DEBUG
            log.log(level, "KV connection from %s refused: %s (at most %d in the handshake; the oldest is "
                    "evicted; %d so far)", peer[0], REFUSALS["busy"], self.max_unauthenticated, self.num_evicted)
        elif isinstance(error, KVRefused):
            log.warning("KV connection from %s refused: %s", peer[0], REFUSALS[error.reason])
        else:  # the connection broke or timed out before the sender proved anything
            log.info("KV connection from %s refused: %s", peer[0], error)
        self.num_refused += 1  # after the log line: tests wait on this count, then read the log

    def _receive(self, conn: socket.socket, lease: Lease) -> None:
        leases = self.leases
        try:
            # The lease decides when silence is a stall (the decode RPC frees it, which
            # cuts this connection); the timeout here only caps the whole transfer.
            kv = _LeaseReceiver(lease.layout).receive(
                conn, expect_rid=lease.request_id, timeout=max(leases.transfer_time_left(lease), 0.0),
                on_bytes=lambda _: leases.heard(lease),
            )
        except BaseException as e:  # delivered to this lease's request only
            self.leases.deliver(lease, error=e)
            return
        last_wall = None if kv.last_byte_at is None else time.time() - (time.monotonic() - kv.last_byte_at)
        self.leases.deliver(lease, result=Arrival(kv, last_wall))


def open_kv_connection(host: str, port: int, key: ClusterKey, transfer_token: bytes, *,
                       timeout: float) -> socket.socket:
    """Connect to a decode worker's KV port and pass its handshake (blocking)."""
    sock = connect(host, port, timeout=timeout)
    client_handshake(sock, key, transfer_token, timeout)
    return sock


# ---------------------------------------------------------------- sending


class KVPushError(RuntimeError):
    """The KV stream to the decode worker broke; the transfer cannot complete."""


class KVPusher:
    """Sends one transfer: ``begin``, ``send_slice``*, then ``end`` or ``abort``.

    ``done`` resolves when the last frame has left (or the stream broke). The
    caller owns the socket and closes it after ``done``."""

    def __init__(self, sock: socket.socket, *, threaded: bool = True,
                 max_queued_bytes: int = 256 << 20, timeout: float = 30.0) -> None:
        self.sock = sock
        self.threaded = threaded
        self.max_queued_bytes = max_queued_bytes
        self.timeout = timeout
        self.done: concurrent.futures.Future[None] = concurrent.futures.Future()
        self.first_byte_at: float | None = None
        self.last_byte_at: float | None = None
        self._sender = KVSender(sock, timeout=timeout)
        self._queue: collections.deque[tuple[str, Any, int]] = collections.deque()
        self._queued_bytes = 0
        self._layout: KVLayout | None = None
        self._codec = "raw"
        self._error: BaseException | None = None
        self._cond = threading.Condition()
        self._closed = False
        if threaded:
            threading.Thread(target=self._drain, name="kv-push", daemon=True).start()

    @property
    def bytes_sent(self) -> int:
        return self._sender.bytes_sent

    @property
    def raw_fallbacks(self) -> int:
        """Slices the transfer's codec refused (non-finite values), sent raw."""
        return self._sender.raw_fallbacks

    @property
    def send_s(self) -> float:
        """First byte to last byte handed to the kernel."""
        if self.first_byte_at is None or self.last_byte_at is None:
            return 0.0
        return self.last_byte_at - self.first_byte_at

    def begin(self, rid: str, layout: KVLayout, meta: dict[str, Any] | None = None,
              codec: str = "raw") -> None:
        self._layout, self._codec = layout, codec
        self._put("begin", (rid, layout, meta, codec), 0)

    def send_slice(self, kv_slice: KVSlice) -> None:
        """Queue (or send) one slice; raises ``KVPushError`` once the stream broke.

        Runs on the engine thread the moment a layer's K/V exists, so this is
        where a raw slice's checksum is taken: its bytes are still in the
        CPU's cache here, where xxh3 runs several times faster than over the
        same bytes after they have waited in the queue (docs/performance.md).
        The slice is first cut to its layer's window."""
        if self._layout is not None:
            clipped = self._layout.clip(kv_slice)
            if clipped is None:
                return
            kv_slice = slice_digest(clipped) if self._codec == "raw" else clipped
        self._put("kv", kv_slice, kv_slice.nbytes)

    def end(self, first_token: int, meta: dict[str, Any] | None = None) -> None:
        self._put("end", (first_token, meta), 0)

    def abort(self, reason: str) -> None:
        """Best effort: tell the receiver the transfer will not complete."""
        with contextlib.suppress(KVPushError):
            self._put("abort", reason, 0)

    def close(self) -> None:
        """Stop. Before ``done`` this gives up on the transfer: it wakes an
        engine thread waiting for queue room and a send blocked on the socket."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        if not self.done.done():
            with contextlib.suppress(OSError):
                self.sock.shutdown(socket.SHUT_RDWR)

    def _put(self, kind: str, item: Any, nbytes: int) -> None:
        if not self.threaded:
            if self._closed:
                raise KVPushError("KV transfer stopped")
            self._send(kind, item)
            return
        with self._cond:
            room = self._cond.wait_for(
                lambda: self._error is not None or self._closed or not self._queue
                or self._queued_bytes + nbytes <= self.max_queued_bytes,
                timeout=self.timeout,
            )
            if self._closed:
                raise KVPushError("KV transfer stopped")
            if self._error is not None:
                raise KVPushError(f"KV stream broke: {self._error}") from self._error
            if not room:
                raise KVPushError(f"KV sender made no progress for {self.timeout:.0f}s")
            self._queue.append((kind, item, nbytes))
            self._queued_bytes += nbytes
            self._cond.notify_all()

    def _drain(self) -> None:
        while True:
            with self._cond:
                self._cond.wait_for(lambda: self._queue or self._closed, timeout=ACCEPT_POLL_S)
                if not self._queue:
                    if self._closed:
                        self._finish(KVPushError("KV pusher closed before the transfer ended"))
                        return
                    continue
                kind, item, nbytes = self._queue.popleft()
            try:
                self._send(kind, item)
            except BaseException as e:
                with self._cond:
                    self._error = e
                    self._queue.clear()
                    self._cond.notify_all()
                self._finish(e)
                return
            with self._cond:
                self._queued_bytes -= nbytes
                self._cond.notify_all()
            if kind in ("end", "abort"):
                return

    def _send(self, kind: str, item: Any) -> None:
        if self.first_byte_at is None:
            self.first_byte_at = time.monotonic()
        if kind == "begin":
            self._sender.begin(*item)
        elif kind == "kv":
            self._sender.send_slice(item)
        elif kind == "end":
            self._sender.end(*item)
        else:
            self._sender.abort(item)
        self.last_byte_at = time.monotonic()
        if kind in ("end", "abort"):
            self._finish(None)

    def _finish(self, error: BaseException | None) -> None:
        if self.done.done():
            return
        if error is None:
            self.done.set_result(None)
        else:
            self.done.set_exception(error)
