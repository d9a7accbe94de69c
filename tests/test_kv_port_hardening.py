"""The decode node's KV port against idle and hostile connections.

Idle unauthenticated connections get their own small cap (the oldest is evicted
for a newcomer), so they never take the slots authenticated transfers need; every
refusal names its cause to the sender and in the listener's log. Everything
talks to 127.0.0.1; every wait is bounded.
"""
from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import config, have, run, started

from cluster.auth import HANDSHAKE_MAGIC, KVRefused, generate_key
from proto import pdcluster_pb2 as pb
from workers.kv.leases import LeaseTable
from workers.kv.listener import KVListener, open_kv_connection
from workers.kv.probe import PROBE_TOKEN
from workers.rpc.client import WorkerClient
from workers.rpc.server import Worker

IDLE_CONNECTIONS = 64
WAIT_S = 10.0


@contextlib.contextmanager
def idle_connections(port: int, count: int) -> Iterator[list[socket.socket]]:
    """``count`` TCP connections to 127.0.0.1:``port`` that never say a word."""
    socks: list[socket.socket] = []
    try:
        for _ in range(count):
            socks.append(socket.create_connection(("127.0.0.1", port), timeout=WAIT_S))
        yield socks
    finally:
        for sock in socks:
            sock.close()


def read_to_end(sock: socket.socket, limit: int = 64) -> bytes:
    """What the listener sent on ``sock`` before closing it (bounded)."""
    sock.settimeout(WAIT_S)
    data = b""
    while len(data) < limit:
        chunk = sock.recv(limit - len(data))
        if not chunk:
            break
        data += chunk
    return data


def test_idle_connections_are_evicted_oldest_first_and_told_why(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG, logger="workers.kv.listener")
    key = generate_key()
    listener = KVListener(LeaseTable(max_leases=4), key, handshake_timeout=WAIT_S, max_unauthenticated=2)
    try:
        with idle_connections(listener.port, 3) as (first, second, third):
            said = read_to_end(first)  # evicted for the third
            assert said.startswith(HANDSHAKE_MAGIC)  # its greeting, then the refusal
            assert said.endswith(b"PDNO\x01")
            for _ in range(int(WAIT_S / 0.05)):
                if listener.num_refused >= 1:
                    break
                time.sleep(0.05)
            assert listener.num_evicted == 1 and listener.num_refused == 1
        messages = [r.getMessage() for r in caplog.records]
        assert any("too many unauthenticated connections" in m and "at most 2" in m for m in messages), messages
    finally:
        listener.close()


def test_a_sender_gets_through_64_idle_connections_with_the_handshake_cap() -> None:
    """Probe connections prove the key like a transfer: one gets through a flood of idle ones."""
    key = generate_key()
    listener = KVListener(LeaseTable(max_leases=4), key)
    try:
        with idle_connections(listener.port, IDLE_CONNECTIONS):
            sock = open_kv_connection("127.0.0.1", listener.port, key, PROBE_TOKEN, timeout=WAIT_S)
            sock.close()
        assert listener.num_evicted >= IDLE_CONNECTIONS - listener.max_unauthenticated
    finally:
        listener.close()


def test_refusals_name_their_cause_to_the_sender() -> None:
    key = generate_key()
    listener = KVListener(LeaseTable(max_leases=4), key, max_connections=1)
    try:
        with pytest.raises(KVRefused, match="refused the connection: wrong cluster key") as wrong:
            open_kv_connection("127.0.0.1", listener.port, generate_key(), b"some-token", timeout=WAIT_S)
        assert wrong.value.reason == "wrong-key"
        with pytest.raises(KVRefused, match="refused the connection: unknown, used or expired transfer token"):
            open_kv_connection("127.0.0.1", listener.port, key, b"never-issued", timeout=WAIT_S)
        held = open_kv_connection("127.0.0.1", listener.port, key, PROBE_TOKEN, timeout=WAIT_S)  # the one slot
        try:
            with pytest.raises(KVRefused, match="refused the connection: too many transfers in progress"):
                open_kv_connection("127.0.0.1", listener.port, key, PROBE_TOKEN, timeout=WAIT_S)
        finally:
            held.close()
    finally:
        listener.close()


def test_evicted_sender_is_told_too_many_unauthenticated_connections() -> None:
    """A sender still in its handshake when evicted reads the real cause, not 'peer closed'."""
    key = generate_key()
    listener = KVListener(LeaseTable(max_leases=4), key, handshake_timeout=WAIT_S, max_unauthenticated=1)
    outcome: dict[str, BaseException | None] = {}
    greeted = threading.Event()

    try:
        sock = socket.create_connection(("127.0.0.1", listener.port), timeout=WAIT_S)
        with idle_connections(listener.port, 1):  # evicts `sock`, which has not answered yet
            for _ in range(int(WAIT_S / 0.01)):
                if listener.num_evicted:
                    break
                time.sleep(0.01)
            assert listener.num_evicted == 1
            from cluster.auth import client_handshake

            def handshake() -> None:
                try:
                    client_handshake(sock, key, b"tok", WAIT_S)
                    outcome["error"] = None
                except BaseException as e:  # recorded for the assertion below
                    outcome["error"] = e
                greeted.set()

            thread = threading.Thread(target=handshake, daemon=True)
            thread.start()
            assert greeted.wait(WAIT_S)
        assert isinstance(outcome["error"], KVRefused), outcome
        assert "too many unauthenticated connections" in str(outcome["error"])
    finally:
        listener.close()


async def disaggregated(prefiller: WorkerClient, decoder: WorkerClient, rid: str) -> tuple[list[int], pb.Done]:
    """One disaggregated request: reserve on the decoder, prefill pushes the KV, tokens stream back."""
    prompt = [(7 * i + 3) % 1000 + 10 for i in range(300)]
    sampling = pb.SamplingParams(max_tokens=16)
    call = decoder.decode(pb.DecodeRequest(request_id=rid, prompt_token_ids=prompt, sampling=sampling),
                          timeout=60)
    first = await asyncio.wait_for(call.read(), 30)
    assert first.HasField("reserved"), first
    reserved = first.reserved
    prefill = asyncio.ensure_future(prefiller.prefill(pb.PrefillRequest(
        request_id=rid, prompt_token_ids=prompt, sampling=sampling, kv_host=reserved.kv_host,
        kv_port=reserved.kv_port, transfer_token=reserved.transfer_token,
                             skip_tokens=reserved.cached_tokens), timeout=30))
    tokens, done = [], None
    async for event in call:
        if event.HasField("token"):
            tokens.append(event.token.token_id)
        elif event.HasField("done"):
            done = event.done
    await prefill
    assert done is not None
    return tokens, done


@pytest.mark.skipif(not have("mlx.core"), reason="needs the mlx extra (decode engine)")
def test_disaggregated_request_succeeds_after_64_idle_connections_on_the_decode_kv_port(model: Path) -> None:
    key = generate_key()

    async def body() -> None:
        prefill, decode = Worker(config(model, key, "prefill")), Worker(config(model, key, "decode"))
        async with started(prefill, decode) as (p, d):
            with idle_connections(decode.listener.port, IDLE_CONNECTIONS):
                tokens, done = await disaggregated(p, d, "after-flood")
            assert len(tokens) == 16 and done.finish_reason == "length"
            assert decode.listener.num_evicted >= IDLE_CONNECTIONS - decode.listener.max_unauthenticated

    run(body)
