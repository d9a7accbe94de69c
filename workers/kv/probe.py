"""A short probe of one prefill -> decode link over the KV data plane.

The scheduler places requests by how fast KV crosses each link, so it asks a
prefill worker to measure its link to a decode worker's KV port, over the
very path (and socket tuning) that KV transfers take. After the cluster-key
handshake, with the fixed token ``PROBE_TOKEN`` instead of a lease's:

    prober -> receiver   header: "PDLP" | version (u8) | pad | pings (u16) | payload bytes (u64)
    receiver -> prober   verdict: refused (u8) | reason length (u16) | reason (utf-8)
    pings times:         prober sends a sequence number (u64), the receiver echoes it
    prober -> receiver   payload bytes (incompressible)
    receiver -> prober   acknowledgement: bytes received (u64)

``latency_s`` is half the median ping round trip. ``payload_s`` runs from the
first payload byte sent to the acknowledgement, less one median round trip
(the last byte's flight and the ack's), so ``gbps`` is the payload rate alone.

Both ends hold one overall deadline. The receiver refuses payloads above
``MAX_PROBE_BYTES``, more than ``MAX_PINGS`` pings, and probes beyond its
concurrency limit, so a probe cannot tie up a decode node's link for long.
"""
from __future__ import annotations

import logging
import os
import socket
import statistics
import struct
import threading
import time
from dataclasses import dataclass

from cluster.auth import AuthError, ClusterKey, client_handshake
from workers.kv.net import connect

log = logging.getLogger(__name__)

PROBE_TOKEN = b"pdc-link-probe/1"  # the handshake's transfer token for a probe; claims no lease
PROBE_MAGIC = b"PDLP"
PROBE_VERSION = 1
PROBE_HEADER = struct.Struct(">4sBxHQ")  # magic, version, pad, pings, payload bytes

DEFAULT_PROBE_BYTES = 16 << 20
DEFAULT_PINGS = 5
DEFAULT_PROBE_TIMEOUT_S = 10.0
MAX_PROBE_BYTES = 64 << 20
MAX_PINGS = 64
MAX_CONCURRENT_PROBES = 2  # per KV listener, so probes cannot starve real transfers
MAX_PROBE_S = 60.0  # the receiver's deadline for a whole probe, and the most a prober may ask for
MIN_PAYLOAD_S = 1e-6  # floor for payload_s once the round trip is subtracted

_VERDICT = struct.Struct(">BH")
_U64 = struct.Struct(">Q")  # a ping's sequence number; the acknowledged byte count
_MAX_REASON_BYTES = 512
_CHUNK_BYTES = 1 << 20
_PAYLOAD = os.urandom(_CHUNK_BYTES)  # incompressible: a compressing tunnel cannot inflate the rate


class ProbeError(RuntimeError):
    """A link probe failed; the message names the target and what went wrong."""


@dataclass(frozen=True)
class LinkMeasurement:
    """One probe's result: payload rate and one-way latency of a link."""

    gbps: float  # payload gigabits per second
    latency_s: float  # one-way: half the median round trip
    payload_bytes: int
    payload_s: float  # first payload byte sent to acknowledgement, less one round trip


# ---------------------------------------------------------------- prober


def probe_link(host: str, port: int, key: ClusterKey, *, payload_bytes: int = DEFAULT_PROBE_BYTES,
               pings: int = DEFAULT_PINGS, timeout: float = DEFAULT_PROBE_TIMEOUT_S) -> LinkMeasurement:
    """Measure the link to the KV port at ``host:port`` (blocking).

    ``timeout`` bounds the whole probe, connect and handshake included.
    Raises ``ValueError`` for bad arguments and ``ProbeError`` for anything
    the link or the receiver did: unreachable, wrong cluster key, refused,
    timed out, short acknowledgement."""
    if not 1 <= payload_bytes <= MAX_PROBE_BYTES:
        raise ValueError(f"payload_bytes must be in [1, {MAX_PROBE_BYTES}], got {payload_bytes}")
    if not 1 <= pings <= MAX_PINGS:
        raise ValueError(f"pings must be in [1, {MAX_PINGS}], got {pings}")
    if not 0 < timeout <= MAX_PROBE_S:
        raise ValueError(f"timeout must be in (0, {MAX_PROBE_S:.0f}] seconds, got {timeout}")
    target = f"{host}:{port}"
    deadline = time.monotonic() + timeout
    try:
        sock = connect(host, port, timeout=timeout)
    except OSError as e:
        raise ProbeError(f"link probe to {target}: cannot connect: {e}") from None
    with sock:
        try:
            client_handshake(sock, key, PROBE_TOKEN, _remaining(deadline, "before the handshake"))
            header = PROBE_HEADER.pack(PROBE_MAGIC, PROBE_VERSION, pings, payload_bytes)
            _send(sock, header, deadline, "sending the header")
            _read_verdict(sock, deadline)
            rtt_s = statistics.median(_ping(sock, seq, deadline) for seq in range(pings))
            payload_s = _send_payload(sock, payload_bytes, deadline) - rtt_s
        except AuthError as e:
            raise ProbeError(f"link probe to {target}: {e}") from None
        except OSError as e:
            raise ProbeError(f"link probe to {target} failed: {e}") from None
    payload_s = max(payload_s, MIN_PAYLOAD_S)
    return LinkMeasurement(gbps=payload_bytes * 8 / payload_s / 1e9, latency_s=rtt_s / 2,
                           payload_bytes=payload_bytes, payload_s=payload_s)


def _read_verdict(sock: socket.socket, deadline: float) -> None:
    refused, reason_len = _VERDICT.unpack(_recv_exactly(sock, _VERDICT.size, deadline, "waiting for the verdict"))
    if refused:
        reason = _recv_exactly(sock, reason_len, deadline, "reading the refusal").decode(errors="replace")
        raise ConnectionError(f"the receiver refused the probe: {reason}")


def _ping(sock: socket.socket, seq: int, deadline: float) -> float:
    """One round trip of a sequence number; its duration."""
    began = time.monotonic()
    _send(sock, _U64.pack(seq), deadline, f"sending ping {seq}")
    (echo,) = _U64.unpack(_recv_exactly(sock, _U64.size, deadline, f"waiting for ping {seq}"))
    if echo != seq:
        raise ConnectionError(f"ping {seq} echoed as {echo}")
    return time.monotonic() - began


def _send_payload(sock: socket.socket, payload_bytes: int, deadline: float) -> float:
    """Send the payload and await its acknowledgement; seconds from first byte to ack."""
    began = time.monotonic()
    left = payload_bytes
    while left:
        chunk = min(left, _CHUNK_BYTES)
        _send(sock, memoryview(_PAYLOAD)[:chunk], deadline, f"sending the payload ({payload_bytes - left} bytes sent)")
        left -= chunk
    (acked,) = _U64.unpack(_recv_exactly(sock, _U64.size, deadline, "waiting for the acknowledgement"))
    elapsed = time.monotonic() - began
    if acked != payload_bytes:
        raise ConnectionError(f"short acknowledgement: the receiver got {acked} of {payload_bytes} bytes")
    return elapsed


# ---------------------------------------------------------------- receiver


def serve_probe(sock: socket.socket, peer: str, *, slots: threading.Semaphore,
                timeout: float = MAX_PROBE_S) -> None:
    """Answer one probe on an authenticated connection (blocking).

    Reads the header before any refusal, so the prober reads the verdict
    rather than a reset connection. A probe runs only while it holds one of
    ``slots``; beyond them it is refused. Refusals and failures are logged,
    never raised: they concern the prober alone."""
    deadline = time.monotonic() + timeout
    try:
        header = _recv_exactly(sock, PROBE_HEADER.size, deadline, "waiting for the header")
        magic, version, pings, payload_bytes = PROBE_HEADER.unpack(header)
        reason = _refusal(magic, version, pings, payload_bytes)
        if reason is None and not slots.acquire(blocking=False):
            reason = "busy: too many probes running on this KV port; try again later"
        if reason is not None:
            log.warning("link probe from %s refused: %s", peer, reason)
            _send_refusal(sock, reason, deadline)
            return
        try:
            _send(sock, _VERDICT.pack(0, 0), deadline, "sending the verdict")
            for _ in range(pings):
                _send(sock, _recv_exactly(sock, _U64.size, deadline, "waiting for a ping"), deadline, "echoing a ping")
            received = _receive_payload(sock, payload_bytes, deadline)
            _send(sock, _U64.pack(received), deadline, "sending the acknowledgement")
        finally:
            slots.release()
    except OSError as e:
        log.warning("link probe from %s failed: %s", peer, e)


def _refusal(magic: bytes, version: int, pings: int, payload_bytes: int) -> str | None:
    """Why a probe with this header is refused, or None."""
    if magic != PROBE_MAGIC or version != PROBE_VERSION:
        return f"not a v{PROBE_VERSION} link probe header (magic {magic!r}, version {version})"
    if not 1 <= payload_bytes <= MAX_PROBE_BYTES:
        return f"payload of {payload_bytes} bytes is outside 1..{MAX_PROBE_BYTES} (MAX_PROBE_BYTES)"
    if not 1 <= pings <= MAX_PINGS:
        return f"{pings} pings is outside 1..{MAX_PINGS}"
    return None


def _send_refusal(sock: socket.socket, reason: str, deadline: float) -> None:
    text = reason.encode()[:_MAX_REASON_BYTES]
    _send(sock, _VERDICT.pack(1, len(text)) + text, deadline, "sending the refusal")


def _receive_payload(sock: socket.socket, payload_bytes: int, deadline: float) -> int:
    """Read ``payload_bytes`` into a scratch buffer and drop them; the count read."""
    scratch = memoryview(bytearray(min(payload_bytes, _CHUNK_BYTES)))
    received = 0
    while received < payload_bytes:
        what = f"receiving the payload ({received} of {payload_bytes} bytes)"
        received += _recv_into(sock, scratch[:min(payload_bytes - received, len(scratch))], deadline, what)
    return received


# ---------------------------------------------------------------- plumbing


def _remaining(deadline: float, what: str) -> float:
    remaining = deadline - time.monotonic()
    if remaining <= 0:
        raise TimeoutError(f"timed out {what}")
    return remaining


def _send(sock: socket.socket, data: bytes | memoryview, deadline: float, what: str) -> None:
    sock.settimeout(_remaining(deadline, what))
    try:
        sock.sendall(data)
    except TimeoutError:
        raise TimeoutError(f"timed out {what}") from None


def _recv_exactly(sock: socket.socket, num_bytes: int, deadline: float, what: str) -> bytes:
    buf = bytearray(num_bytes)
    view = memoryview(buf)
    got = 0
    while got < num_bytes:
        got += _recv_into(sock, view[got:], deadline, what)
    return bytes(buf)


def _recv_into(sock: socket.socket, view: memoryview, deadline: float, what: str) -> int:
    """One ``recv_into`` within the deadline; raises rather than return 0 at end of stream."""
    sock.settimeout(_remaining(deadline, what))
    try:
        n = sock.recv_into(view)
    except TimeoutError:
        raise TimeoutError(f"timed out {what}") from None
    if n == 0:
        raise ConnectionError(f"the peer closed the connection {what}")
    return n
