"""One KV transfer per TCP connection on 127.0.0.1: bit-exact, complete, bounded in time."""
from __future__ import annotations

import contextlib
import random
import socket
import threading
import time
from collections.abc import Callable

import numpy as np
import pytest
from conftest import (
    CHUNKS,
    RID,
    WAIT_S,
    assert_layers_match,
    assert_same_slice,
    chunked_layouts,
    frame_bytes,
    make_slices,
    random_slice,
)
from conftest import TRANSFER_LAYOUT as LAYOUT
from hypothesis import given, settings
from hypothesis import strategies as st

from workers.engines.base import KVLayout, KVSlice
from workers.kv.codec import FrameError, FrameTimeout, encode_begin, encode_kv
from workers.kv.net import connect, send_buffers, serve_once
from workers.kv.transport import (
    KVArena,
    KVReceiver,
    KVSender,
    TokenCoverage,
    TransferAborted,
)


def receiving_server(**receive_kwargs: object) -> tuple:
    """A one-shot server on 127.0.0.1 whose handler receives one transfer."""
    arrivals: list[KVSlice] = []
    receiver = KVReceiver(on_slice=arrivals.append)
    kwargs = {"timeout": WAIT_S, **receive_kwargs}
    server = serve_once(lambda sock: receiver.receive(sock, **kwargs))
    return server, arrivals


def send_transfer(port: int, slices: list[KVSlice], layout: KVLayout = LAYOUT, rid: str = RID) -> KVSender:
    with connect("127.0.0.1", port, timeout=WAIT_S) as sock:
        sender = KVSender(sock, timeout=WAIT_S)
        sender.begin(rid, layout, {"prefill_s": 0.25})
        for kv_slice in slices:
            sender.send_slice(kv_slice)
        sender.end(first_token=1234, meta={"compute_s": 0.5})
    return sender


def send_transfer_to_hangup(port: int, slices: list[KVSlice], layout: KVLayout = LAYOUT) -> None:
    """Send a transfer the receiver will reject; it may hang up before the end."""
    with contextlib.suppress(OSError):
        send_transfer(port, slices, layout)


# ---------------------------------------------------------------- round trips


@pytest.mark.parametrize("use_arena", [False, True], ids=["fresh-arrays", "reserved-arena"])
def test_full_transfer_in_shuffled_chunk_order_is_bit_exact(use_arena: bool) -> None:
    slices = make_slices(LAYOUT, CHUNKS)
    random.Random(7).shuffle(slices)
    arena = KVArena(LAYOUT) if use_arena else None
    server, arrivals = receiving_server(expect_rid=RID, expected_layout=LAYOUT, arena=arena)
    sender = send_transfer(server.port, slices)
    received = server.result(WAIT_S)

    assert (received.rid, received.layout, received.first_token) == (RID, LAYOUT, 1234)
    assert received.meta == {"compute_s": 0.5} and received.begin_meta == {"prefill_s": 0.25}
    for got, want in zip(received.slices, slices, strict=True):
        assert_same_slice(got, want)
    assert [id(s) for s in arrivals] == [id(s) for s in received.slices]
    assert_layers_match(received, slices)
    assert received.bytes_received == sender.bytes_sent > LAYOUT.total_bytes
    assert received.first_byte_at <= received.last_byte_at <= time.monotonic()
    if arena is not None:
        assert all(np.shares_memory(s.keys, arena.memory) for s in received.slices)


@given(chunked_layouts())
@settings(max_examples=15, deadline=None)
def test_random_layouts_and_chunkings_round_trip_over_tcp(case) -> None:
    layout, chunks, seed = case
    slices = make_slices(layout, chunks, seed)
    random.Random(seed).shuffle(slices)
    server, _ = receiving_server(expected_layout=layout)
    send_transfer(server.port, slices, layout)
    received = server.result(WAIT_S)
    assert_layers_match(received, slices)


def test_receiving_into_an_arena_twice_reuses_its_memory() -> None:
    arena = KVArena(LAYOUT)
    for seed in (1, 2):
        slices = make_slices(LAYOUT, CHUNKS, seed)
        server, _ = receiving_server(arena=arena)
        send_transfer(server.port, slices)
        received = server.result(WAIT_S)
        assert_layers_match(received, slices)


# ---------------------------------------------------------------- coverage


def test_overlapping_chunk_is_rejected() -> None:
    slices = make_slices(LAYOUT, CHUNKS)
    overlapping = random_slice(np.random.default_rng(1), LAYOUT, layer=2, start=10, ntok=8)
    server, _ = receiving_server()
    send_transfer_to_hangup(server.port, slices[:6] + [overlapping] + slices[6:])
    with pytest.raises(FrameError, match=r"layer 2 tokens \[10, 18\) overlap tokens \[0, 16\)"):
        server.result(WAIT_S)


def test_duplicate_chunk_is_rejected() -> None:
    slices = make_slices(LAYOUT, CHUNKS)
    server, _ = receiving_server()
    send_transfer_to_hangup(server.port, slices + [slices[3]])
    with pytest.raises(FrameError, match="overlap"):
        server.result(WAIT_S)


def test_end_before_every_token_of_every_layer_arrived_is_rejected() -> None:
    slices = [s for s in make_slices(LAYOUT, CHUNKS) if not (s.layer == 3 and s.start == 16)]
    server, _ = receiving_server()
    send_transfer(server.port, slices)
    with pytest.raises(FrameError, match=r"layer 3 is missing tokens \[16, 32\)"):
        server.result(WAIT_S)


@settings(deadline=None)
@given(
    num_tokens=st.integers(1, 60),
    cuts=st.sets(st.integers(1, 59), max_size=8),
    seed=st.integers(0, 1000),
    drop=st.booleans(),
)
def test_token_coverage_is_complete_exactly_when_every_chunk_arrived(
    num_tokens: int, cuts: set[int], seed: int, drop: bool
) -> None:
    bounds = [0, *sorted(c for c in cuts if c < num_tokens), num_tokens]
    ranges = list(zip(bounds, bounds[1:], strict=False))
    random.Random(seed).shuffle(ranges)
    coverage = TokenCoverage(KVLayout(2, 1, 1, "float32", num_tokens))
    dropped = ranges.pop() if drop else None
    for start, end in ranges:
        coverage.add(1, start, end - start)
        coverage.add(0, start, end - start)
    if dropped is None:
        assert coverage.first_gap() is None
    else:
        assert coverage.first_gap() == (0, *dropped)
    for start, end in ranges:  # any repeat overlaps what arrived
        with pytest.raises(FrameError, match="overlap"):
            coverage.add(0, start, end - start)


# ---------------------------------------------------------------- request identity and layout


def test_layout_other_than_the_reserved_one_is_rejected() -> None:
    reserved = KVLayout(4, 2, 8, "bfloat16", 49)
    server, _ = receiving_server(expected_layout=reserved)
    send_transfer_to_hangup(server.port, make_slices(LAYOUT, CHUNKS))
    with pytest.raises(FrameError, match="'layout'.*num_tokens=49.*num_tokens=50"):
        server.result(WAIT_S)


def test_transfer_for_another_request_is_rejected() -> None:
    server, _ = receiving_server(expect_rid="req-other")
    send_transfer_to_hangup(server.port, make_slices(LAYOUT, CHUNKS))
    with pytest.raises(FrameError, match="'rid'"):
        server.result(WAIT_S)


def test_second_begin_is_rejected() -> None:
    server, _ = receiving_server()
    with connect("127.0.0.1", server.port, timeout=WAIT_S) as sock:
        send_buffers(sock, encode_begin(RID, LAYOUT) + encode_begin(RID, LAYOUT))
        with pytest.raises(FrameError, match="second begin"):
            server.result(WAIT_S)


# ---------------------------------------------------------------- abort and failures


def test_abort_propagates_the_senders_reason() -> None:
    server, _ = receiving_server()
    with connect("127.0.0.1", server.port, timeout=WAIT_S) as sock:
        sender = KVSender(sock, timeout=WAIT_S)
        sender.begin(RID, LAYOUT)
        sender.send_slice(make_slices(LAYOUT, CHUNKS)[0])
        sender.abort("prefill ran out of memory")
    with pytest.raises(TransferAborted, match="prefill ran out of memory") as excinfo:
        server.result(WAIT_S)
    assert (excinfo.value.rid, excinfo.value.reason) == (RID, "prefill ran out of memory")


def test_exception_inside_sender_context_aborts_with_its_message() -> None:
    server, _ = receiving_server()
    with connect("127.0.0.1", server.port, timeout=WAIT_S) as sock, pytest.raises(RuntimeError, match="crashed"):
        with KVSender(sock, timeout=WAIT_S) as sender:
            sender.begin(RID, LAYOUT)
            raise RuntimeError("engine crashed")
    with pytest.raises(TransferAborted) as excinfo:
        server.result(WAIT_S)
    assert excinfo.value.reason == "RuntimeError: engine crashed"


@pytest.mark.parametrize("cut", ["after-begin", "mid-header", "mid-payload"])
def test_sender_closing_mid_stream_fails_the_transfer_at_once(cut: str) -> None:
    begin = frame_bytes(encode_begin(RID, LAYOUT))
    kv = frame_bytes(encode_kv(RID, make_slices(LAYOUT, CHUNKS)[0]))
    sent = {"after-begin": begin, "mid-header": begin + kv[:20], "mid-payload": begin + kv[:-100]}[cut]
    server, _ = receiving_server()
    start = time.monotonic()
    with connect("127.0.0.1", server.port, timeout=WAIT_S) as sock:
        sock.sendall(sent)
    with pytest.raises(FrameError, match="closed"):
        server.result(WAIT_S)
    assert time.monotonic() - start < WAIT_S / 4


def test_stalled_sender_times_out_at_the_deadline() -> None:
    server, _ = receiving_server(timeout=0.5)
    with connect("127.0.0.1", server.port, timeout=WAIT_S) as sock:
        start = time.monotonic()
        sock.sendall(frame_bytes(encode_begin(RID, LAYOUT)))  # then nothing, connection left open
        with pytest.raises(FrameTimeout):
            server.result(WAIT_S)
        assert 0.4 < time.monotonic() - start < 2.5


def test_trickling_sender_cannot_stretch_the_transfer_past_its_deadline() -> None:
    """A byte every 50 ms never trips a per-recv timeout; the overall one must fire."""
    server, _ = receiving_server(timeout=0.6)
    stream = frame_bytes(encode_begin(RID, LAYOUT)) + frame_bytes(encode_kv(RID, make_slices(LAYOUT, CHUNKS)[0]))
    stop = threading.Event()
    with connect("127.0.0.1", server.port, timeout=WAIT_S) as sock:
        start = time.monotonic()
        trickle = threading.Thread(target=_trickle, args=(sock, stream, stop), daemon=True)
        trickle.start()
        try:
            with pytest.raises(FrameTimeout):
                server.result(WAIT_S)
            assert 0.5 < time.monotonic() - start < 2.5
        finally:
            stop.set()
            trickle.join(WAIT_S)


def _trickle(sock: socket.socket, data: bytes, stop: threading.Event) -> None:
    for i in range(len(data)):
        if stop.wait(0.05):
            return
        try:
            sock.send(data[i : i + 1])
        except OSError:
            return


def test_bad_frame_on_one_connection_leaves_a_concurrent_transfer_intact() -> None:
    good_slices = make_slices(LAYOUT, CHUNKS, seed=1)
    good_server, _ = receiving_server(expect_rid="good")
    bad_server, _ = receiving_server(expect_rid="bad")
    halfway, bad_done = threading.Event(), threading.Event()

    def send_good() -> None:
        with connect("127.0.0.1", good_server.port, timeout=WAIT_S) as sock:
            sender = KVSender(sock, timeout=WAIT_S)
            sender.begin("good", LAYOUT)
            for i, kv_slice in enumerate(good_slices):
                if i == len(good_slices) // 2:
                    halfway.set()
                    assert bad_done.wait(WAIT_S)
                sender.send_slice(kv_slice)
            sender.end(first_token=5)

    good_thread = _run(send_good)
    assert halfway.wait(WAIT_S)
    corrupt = bytearray(frame_bytes(encode_kv("bad", make_slices(LAYOUT, CHUNKS, seed=2)[0])))
    corrupt[-1] ^= 0xFF
    with connect("127.0.0.1", bad_server.port, timeout=WAIT_S) as sock:
        sock.sendall(frame_bytes(encode_begin("bad", LAYOUT)) + bytes(corrupt))
        with pytest.raises(FrameError, match="checksum"):
            bad_server.result(WAIT_S)
    bad_done.set()

    received = good_server.result(WAIT_S)
    good_thread.join(WAIT_S)
    assert not good_thread.is_alive() and good_thread.error is None
    assert received.first_token == 5
    assert_layers_match(received, good_slices)


class _Thread(threading.Thread):
    error: BaseException | None = None


def _run(target: Callable[[], None]) -> _Thread:
    def wrapped() -> None:
        try:
            target()
        except BaseException as exc:
            thread.error = exc

    thread = _Thread(target=wrapped, daemon=True)
    thread.start()
    return thread


# ---------------------------------------------------------------- sender


class TrickleSendSocket:
    """Accepts at most ``limit`` bytes per ``sendmsg``, as a busy socket may."""

    def __init__(self, limit: int) -> None:
        self.limit, self.received, self.calls = limit, bytearray(), 0

    def sendmsg(self, buffers: list[memoryview]) -> int:
        self.calls += 1
        budget = self.limit
        for buffer in buffers:
            take = bytes(buffer[:budget])
            self.received += take
            budget -= len(take)
            if budget == 0:
                break
        return self.limit - budget


@pytest.mark.parametrize("limit", [1, 7, 1000])
def test_send_buffers_resumes_after_partial_sendmsg(limit: int) -> None:
    buffers = encode_kv(RID, make_slices(LAYOUT, CHUNKS)[0])
    sock = TrickleSendSocket(limit)
    assert send_buffers(sock, buffers) == len(frame_bytes(buffers))  # type: ignore[arg-type]
    assert bytes(sock.received) == frame_bytes(buffers)
    assert sock.calls >= len(sock.received) // limit


def test_sender_refuses_slices_that_do_not_fit_the_layout() -> None:
    good = make_slices(LAYOUT, CHUNKS)[0]
    bad_slices = [
        KVSlice(4, 0, good.keys, good.values, good.dtype),  # layer out of range
        KVSlice(0, 40, good.keys, good.values, good.dtype),  # 40 + 16 > 50 tokens
        KVSlice(0, 0, good.keys, good.values, "float16"),  # dtype
        KVSlice(0, 0, good.keys[:1], good.values[:1], good.dtype),  # kv_heads
        KVSlice(0, 0, good.keys.view(np.float16), good.values, good.dtype),  # array dtype
    ]
    server, _ = receiving_server()
    with connect("127.0.0.1", server.port, timeout=WAIT_S) as sock:
        sender = KVSender(sock, timeout=WAIT_S)
        sender.begin(RID, LAYOUT)
        for bad in bad_slices:
            with pytest.raises(ValueError, match="does not fit"):
                sender.send_slice(bad)
        sent_before = sender.bytes_sent
        sender.abort("test over")
        assert sender.bytes_sent > sent_before
    with pytest.raises(TransferAborted):
        server.result(WAIT_S)


def test_sender_enforces_begin_slices_end_order() -> None:
    server, _ = receiving_server()
    with connect("127.0.0.1", server.port, timeout=WAIT_S) as sock:
        sender = KVSender(sock, timeout=WAIT_S)
        with pytest.raises(RuntimeError, match="begin"):
            sender.send_slice(make_slices(LAYOUT, CHUNKS)[0])
        sender.begin(RID, LAYOUT)
        sender.end(first_token=0)
        with pytest.raises(RuntimeError, match="already ended"):
            sender.end(first_token=0)
    with pytest.raises(FrameError, match="missing tokens"):
        server.result(WAIT_S)


def test_serve_once_gives_up_when_nobody_connects() -> None:
    server = serve_once(lambda sock: None, accept_timeout=0.2)
    with pytest.raises(TimeoutError):
        server.result(WAIT_S)
