"""The data-plane link probe: what it measures, what the receiver refuses, and
that it leaves real KV transfers alone.

Most tests probe a real ``KVListener`` on 127.0.0.1 from this process; the
last one asks a real ``pdc worker`` process, over gRPC, to probe another's KV
port. The probe across a shaped 1 Gbit/s link is in ``test_multihost.py``.
"""
from __future__ import annotations

import asyncio
import contextlib
import socket
import time
from collections.abc import Iterator
from typing import Any

import grpc
import pytest
from conftest import (
    CHUNKS,
    WAIT_S,
    assert_layers_match,
    have,
    make_slices,
    run,
    status_code,
)
from conftest import TRANSFER_LAYOUT as LAYOUT

from cluster.auth import client_handshake, generate_key
from workers.kv.leases import LeaseTable
from workers.kv.listener import KVListener, open_kv_connection
from workers.kv.net import connect
from workers.kv.probe import (
    MAX_CONCURRENT_PROBES,
    MAX_PINGS,
    MAX_PROBE_BYTES,
    PROBE_HEADER,
    PROBE_MAGIC,
    PROBE_TOKEN,
    PROBE_VERSION,
    LinkMeasurement,
    ProbeError,
    probe_link,
)
from workers.kv.transport import KVSender
from workers.rpc.client import WorkerClient


@pytest.fixture()
def listener() -> Iterator[KVListener]:
    """A decode worker's KV listener on 127.0.0.1 with an empty lease table."""
    kv = KVListener(LeaseTable(max_leases=4), generate_key(), handshake_timeout=WAIT_S)
    try:
        yield kv
    finally:
        kv.close()


def open_probe(kv: KVListener, header: bytes) -> socket.socket:
    """A probe connection past the handshake that has sent ``header`` and nothing else."""
    sock = connect("127.0.0.1", kv.port, timeout=WAIT_S)
    client_handshake(sock, kv.key, PROBE_TOKEN, WAIT_S)
    sock.sendall(header)
    return sock


def read_to_end(sock: socket.socket, limit: int = 4096) -> bytes:
    data = b""
    while len(data) < limit and (chunk := sock.recv(limit)):
        data += chunk
    return data


def header(payload_bytes: int = 1 << 20, pings: int = 3, magic: bytes = PROBE_MAGIC,
           version: int = PROBE_VERSION) -> bytes:
    return PROBE_HEADER.pack(magic, version, pings, payload_bytes)


# ---------------------------------------------------------------- measuring


def test_probe_over_loopback_reports_a_positive_rate_small_latency_and_the_exact_byte_count(
        listener: KVListener) -> None:
    payload = 8 << 20
    measured = probe_link("127.0.0.1", listener.port, listener.key, payload_bytes=payload, pings=5, timeout=WAIT_S)
    print(f"loopback: {measured.gbps:.2f} Gbit/s, one-way latency {measured.latency_s * 1e6:.0f} us, "
          f"{measured.payload_bytes} bytes in {measured.payload_s * 1e3:.2f} ms")
    assert isinstance(measured, LinkMeasurement)
    assert measured.payload_bytes == payload
    assert measured.gbps > 0.1  # loopback moves gigabits; anything less is a broken probe
    assert 0 < measured.latency_s < 0.05
    assert 0 < measured.payload_s < WAIT_S
    assert measured.gbps == pytest.approx(payload * 8 / measured.payload_s / 1e9)
    assert listener.leases.num_active == 0 and listener.num_refused == 0


def test_probe_with_a_wrong_cluster_key_is_refused_at_the_handshake(listener: KVListener) -> None:
    stranger = generate_key()
    with pytest.raises(ProbeError, match=rf"127\.0\.0\.1:{listener.port}.*wrong cluster key"):
        probe_link("127.0.0.1", listener.port, stranger, payload_bytes=1 << 20, pings=1, timeout=WAIT_S)
    # The listener counts the refusal just after it hangs up on us.
    deadline = time.monotonic() + WAIT_S
    while listener.num_refused == 0 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert listener.num_refused == 1


def test_probe_of_a_closed_port_fails_naming_the_target() -> None:
    with socket.socket() as placeholder:
        placeholder.bind(("127.0.0.1", 0))
        port = placeholder.getsockname()[1]  # bound, never listening: connections are refused
        with pytest.raises(ProbeError, match=rf"127\.0\.0\.1:{port}: cannot connect"):
            probe_link("127.0.0.1", port, generate_key(), payload_bytes=1, pings=1, timeout=WAIT_S)


def test_probe_of_a_silent_port_times_out_within_its_deadline() -> None:
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(1)  # the kernel completes the connect; nobody ever speaks
        began = time.monotonic()
        with pytest.raises(ProbeError, match=rf"127\.0\.0\.1:{silent.getsockname()[1]}.*timed out"):
            probe_link("127.0.0.1", silent.getsockname()[1], generate_key(), payload_bytes=1, pings=1, timeout=0.5)
        assert time.monotonic() - began < 3


# ---------------------------------------------------------------- refusals


def test_oversized_payload_is_refused_by_the_prober_before_it_connects() -> None:
    with pytest.raises(ValueError, match="payload_bytes must be in"):
        probe_link("127.0.0.1", 9, generate_key(), payload_bytes=MAX_PROBE_BYTES + 1, pings=1, timeout=WAIT_S)


@pytest.mark.parametrize(("fields", "reason"), [
    ({"payload_bytes": MAX_PROBE_BYTES + 1}, f"payload of {MAX_PROBE_BYTES + 1} bytes is outside 1..{MAX_PROBE_BYTES}"),
    ({"payload_bytes": 0}, "payload of 0 bytes is outside"),
    ({"pings": MAX_PINGS + 1}, f"{MAX_PINGS + 1} pings is outside"),
    ({"magic": b"XXXX"}, "not a v1 link probe header"),
    ({"version": 9}, "not a v1 link probe header"),
], ids=["oversized", "empty", "too-many-pings", "bad-magic", "bad-version"])
def test_receiver_refuses_a_bad_probe_header_with_its_reason(listener: KVListener, fields: dict[str, Any],
                                                              reason: str) -> None:
    with open_probe(listener, header(**fields)) as sock:
        verdict = read_to_end(sock)
    assert verdict[0] == 1, verdict  # refused, then the connection closes
    assert reason in verdict[3:].decode(), verdict


def test_probes_beyond_the_concurrency_limit_are_refused_as_busy_and_slots_come_back(listener: KVListener) -> None:
    with contextlib.ExitStack() as holders:
        for _ in range(MAX_CONCURRENT_PROBES):  # accepted, then idle: each holds a probe slot
            sock = holders.enter_context(open_probe(listener, header()))
            assert sock.recv(3) == b"\x00\x00\x00"
        with pytest.raises(ProbeError, match="refused the probe: busy"):
            probe_link("127.0.0.1", listener.port, listener.key, payload_bytes=1 << 20, pings=1, timeout=WAIT_S)
    # The holders hung up, which ends their probes; bounded retries while their threads notice.
    deadline = time.monotonic() + WAIT_S
    while True:
        try:
            measured = probe_link("127.0.0.1", listener.port, listener.key, payload_bytes=1 << 20, pings=1,
                                  timeout=WAIT_S)
            break
        except ProbeError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)
    assert measured.payload_bytes == 1 << 20


# ---------------------------------------------------------------- beside real transfers


def test_probe_in_the_middle_of_a_kv_transfer_leaves_that_transfer_bit_exact(listener: KVListener) -> None:
    slices = make_slices(LAYOUT, CHUNKS, seed=3)
    half = len(slices) // 2

    def send_with_a_probe_between(token: bytes) -> LinkMeasurement:
        with open_kv_connection("127.0.0.1", listener.port, listener.key, token, timeout=WAIT_S) as sock:
            sender = KVSender(sock, timeout=WAIT_S)
            sender.begin("real", LAYOUT)
            for kv_slice in slices[:half]:
                sender.send_slice(kv_slice)
            measured = probe_link("127.0.0.1", listener.port, listener.key, payload_bytes=16 << 20, pings=3,
                                  timeout=WAIT_S)
            for kv_slice in slices[half:]:
                sender.send_slice(kv_slice)
            sender.end(first_token=7)
        return measured

    async def body() -> None:
        lease = listener.leases.reserve("real", LAYOUT, 30.0, remote=True)
        try:
            measured = await asyncio.to_thread(send_with_a_probe_between, lease.token)
            arrival = await asyncio.wait_for(lease.kv, WAIT_S)
        finally:
            listener.leases.free(lease)
        assert measured.payload_bytes == 16 << 20 and measured.gbps > 0
        assert arrival.kv.first_token == 7
        assert_layers_match(arrival.kv, slices)
        assert listener.num_refused == 0

    asyncio.run(asyncio.wait_for(body(), 30))


# ---------------------------------------------------------------- over gRPC, between worker processes


@pytest.mark.skipif(not have("mlx.core"), reason="needs the mlx extra (the decode worker process)")
def test_probe_link_rpc_between_worker_processes_measures_the_decode_workers_kv_port(
        processes: Any, listener: KVListener) -> None:
    key, workers = processes

    async def body() -> None:
        async with WorkerClient(workers["prefill"].grpc, key) as p, WorkerClient(workers["decode"].grpc, key) as d:
            kv_port = (await d.info()).node.kv_port
            reply = await p.probe_link("127.0.0.1", kv_port, payload_bytes=4 << 20, pings=3, timeout=10)
            print(f"ProbeLink prefill -> decode over loopback: {reply.gbps:.2f} Gbit/s, "
                  f"one-way {reply.latency_s * 1e6:.0f} us")
            assert reply.payload_bytes == 4 << 20
            assert reply.gbps > 0.1 and 0 < reply.latency_s < 0.05 and reply.payload_s > 0

            capped = await p.probe_link("127.0.0.1", kv_port, payload_bytes=1 << 40, timeout=10)
            assert capped.payload_bytes == MAX_PROBE_BYTES  # the worker caps what the caller asks

            code, details = await status_code(p.probe_link("127.0.0.1", 0))
            assert code == grpc.StatusCode.INVALID_ARGUMENT and "kv_port" in details, details

            with socket.socket() as placeholder:
                placeholder.bind(("127.0.0.1", 0))
                closed = placeholder.getsockname()[1]
                code, details = await status_code(p.probe_link("127.0.0.1", closed, timeout=5))
            assert code == grpc.StatusCode.UNAVAILABLE and f"127.0.0.1:{closed}" in details, details

            # ``listener`` holds a key of its own: to the worker it is another cluster's node.
            code, details = await status_code(p.probe_link("127.0.0.1", listener.port, timeout=5))
            assert code == grpc.StatusCode.UNAVAILABLE and "wrong cluster key" in details, details
            assert (await d.health()).active_leases == 0  # probes never touch the lease table

    run(body)

