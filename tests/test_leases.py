"""The lease table's time rules and limits, on a fake clock: nothing here sleeps.

``LeaseTable`` decides when a lease expires (no sender within ``lease_s``, a
transfer silent for ``lease_s``, or one past ``max_transfer_s``); the decode
RPC only waits and asks (``expire_if_due``). So advancing an injected clock
exercises every rule exactly, at the boundary, on any machine. The service
tests (tests/test_worker_service.py) check the same behaviour end to end with
real time and loose bounds.
"""
from __future__ import annotations

import asyncio
import math
import socket
import threading
from collections.abc import Awaitable, Callable, Iterator

import pytest

from workers.engines.base import KVLayout
from workers.kv.leases import MAX_TRANSFER_S, Lease, LeaseError, LeaseTable

LAYOUT = KVLayout(num_layers=2, kv_heads=2, head_dim=4, dtype="float32", num_tokens=10)  # 1280 bytes


class FakeClock:
    """A monotonic clock that moves only when told to."""

    def __init__(self, start: float = 1000.0) -> None:
        self.now = start

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        assert seconds >= 0, "a monotonic clock never goes back"
        self.now += seconds


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def pair() -> Iterator[tuple[socket.socket, socket.socket]]:
    """A connected pair: the first end is what a claim registers as the receiving socket."""
    receiving, sending = socket.socketpair()
    with receiving, sending:
        yield receiving, sending


def on_loop(body: Callable[[], Awaitable[None]]) -> None:
    """Run ``body`` on an event loop: leases' futures belong to one."""
    asyncio.run(asyncio.wait_for(body(), 10))


def was_cut(sock: socket.socket) -> bool:
    """Whether ``sock`` was shut down: a read on it returns at once, with nothing."""
    sock.settimeout(1.0)
    return sock.recv(1) == b""


def stream_steadily(table: LeaseTable, clock: FakeClock, lease: Lease, *, every: float, for_s: float) -> None:
    """Bytes arrive every ``every`` seconds for ``for_s`` seconds; the lease never expires meanwhile."""
    elapsed = 0.0
    while elapsed + every <= for_s:
        clock.advance(every)
        elapsed += every
        table.heard(lease)
        assert table.expire_if_due(lease) is None, f"cut after {elapsed:g}s of steady transfer"


# ---------------------------------------------------------------- waiting for a sender


def test_a_lease_with_no_sender_expires_at_its_deadline_and_frees_its_bytes(
        clock: FakeClock, pair: tuple[socket.socket, socket.socket]) -> None:
    table = LeaseTable(max_leases=4, clock=clock)

    async def body() -> None:
        lease = table.reserve("r", LAYOUT, lease_s=5.0, remote=True)
        assert (table.remaining(lease), table.reserved_bytes, lease.state) == (5.0, LAYOUT.total_bytes, "waiting")
        clock.advance(4.999)
        assert table.expire_if_due(lease) is None  # not yet: nothing freed
        assert (table.num_active, table.reserved_bytes, table.num_expired) == (1, LAYOUT.total_bytes, 0)
        clock.advance(0.001)  # exactly at the deadline
        assert table.expire_if_due(lease) == "no prefill node connected within 5s"
        assert (table.num_active, table.reserved_bytes, table.num_expired) == (0, 0, 1)
        assert lease.kv.cancelled() and table.find("r") is None
        assert table.claim(lease.token, pair[0]) is None  # a late sender is turned away
        assert table.expire_if_due(lease) is None  # already gone: expiring again counts nothing
        assert table.num_expired == 1
        table.reserve("r", LAYOUT, lease_s=5.0, remote=True)  # its id and bytes are free again

    on_loop(body)


def test_a_lease_past_its_deadline_cannot_be_claimed_even_before_it_is_freed(
        clock: FakeClock, pair: tuple[socket.socket, socket.socket]) -> None:
    table = LeaseTable(max_leases=4, clock=clock)

    async def body() -> None:
        lease = table.reserve("late", LAYOUT, lease_s=2.0, remote=True)
        clock.advance(2.0)
        assert table.claim(lease.token, pair[0]) is None
        assert lease.state == "waiting"  # the expiry itself is the decode RPC's to make
        assert table.expire_if_due(lease) == "no prefill node connected within 2s"

    on_loop(body)


def test_a_token_is_claimed_once_and_only_a_remote_lease_has_one(
        clock: FakeClock, pair: tuple[socket.socket, socket.socket]) -> None:
    table = LeaseTable(max_leases=4, clock=clock)

    async def body() -> None:
        remote = table.reserve("remote", LAYOUT, lease_s=5.0, remote=True)
        clock.advance(1.0)
        assert table.claim(remote.token, pair[0]) is remote
        assert (remote.state, remote.claimed_at, remote.heard_at) == ("receiving", clock.now, clock.now)
        assert table.claim(remote.token, pair[0]) is None
        assert table.claim(b"\0" * len(remote.token), pair[0]) is None
        local = table.reserve("local", LAYOUT, lease_s=5.0, remote=False)
        assert (local.token, local.state) == (None, "loaded")
        clock.advance(1e6)
        assert table.remaining(local) == math.inf and table.expire_if_due(local) is None  # colocated: nothing to wait for

    on_loop(body)


# ---------------------------------------------------------------- during a transfer


def test_a_steady_transfer_outlives_its_lease_but_a_stalled_one_is_cut(
        clock: FakeClock, pair: tuple[socket.socket, socket.socket]) -> None:
    table = LeaseTable(max_leases=4, clock=clock)

    async def body() -> None:
        lease = table.reserve("steady", LAYOUT, lease_s=2.0, remote=True)
        clock.advance(1.5)
        assert table.claim(lease.token, pair[0]) is lease
        assert table.remaining(lease) == 2.0  # the claim counts as hearing from the sender
        stream_steadily(table, clock, lease, every=1.9, for_s=60.0)  # 30x the lease, never 2 s silent
        assert (lease.state, table.num_active, table.num_expired) == ("receiving", 1, 0)
        clock.advance(1.999)
        assert table.expire_if_due(lease) is None
        clock.advance(0.001)  # 2 s without a byte
        assert table.expire_if_due(lease) == "the KV transfer stalled: no bytes for 2s"
        assert (table.num_active, table.reserved_bytes, table.num_expired) == (0, 0, 1)
        assert was_cut(pair[0])  # the receive thread reading it wakes up at once

    on_loop(body)


def test_max_transfer_caps_even_a_steady_transfer(clock: FakeClock, pair: tuple[socket.socket, socket.socket]) -> None:
    table = LeaseTable(max_leases=4, max_transfer_s=10.0, clock=clock)

    async def body() -> None:
        lease = table.reserve("long", LAYOUT, lease_s=2.0, remote=True)
        assert table.claim(lease.token, pair[0]) is lease
        assert table.transfer_time_left(lease) == 10.0
        stream_steadily(table, clock, lease, every=1.0, for_s=9.0)
        assert table.transfer_time_left(lease) == 1.0
        assert table.remaining(lease) == 1.0  # the cap, not the silence (2 s), is nearer
        clock.advance(1.0)
        table.heard(lease)  # bytes still flowing at the cap change nothing
        assert table.expire_if_due(lease) == "the KV transfer did not complete within 10s"
        assert was_cut(pair[0])

    on_loop(body)


def test_the_default_cap_is_max_transfer_s(clock: FakeClock, pair: tuple[socket.socket, socket.socket]) -> None:
    table = LeaseTable(max_leases=1, clock=clock)

    async def body() -> None:
        lease = table.reserve("r", LAYOUT, lease_s=1e9, remote=True)  # silences never matter here
        table.claim(lease.token, pair[0])
        clock.advance(MAX_TRANSFER_S - 0.001)
        assert table.expire_if_due(lease) is None
        clock.advance(0.001)
        assert table.expire_if_due(lease) == f"the KV transfer did not complete within {MAX_TRANSFER_S:g}s"

    on_loop(body)


def test_a_delivered_transfer_no_longer_expires_and_resolves_from_another_thread(
        clock: FakeClock, pair: tuple[socket.socket, socket.socket]) -> None:
    table = LeaseTable(max_leases=4, clock=clock)

    async def body() -> None:
        lease = table.reserve("done", LAYOUT, lease_s=2.0, remote=True)
        table.claim(lease.token, pair[0])
        receiver = threading.Thread(target=table.deliver, args=(lease, "the kv"))
        receiver.start()
        receiver.join()
        assert await asyncio.wait_for(asyncio.shield(lease.kv), 5) == "the kv"
        assert lease.state == "done"
        clock.advance(1e6)
        assert table.remaining(lease) == math.inf and table.expire_if_due(lease) is None
        assert table.num_active == 1  # still reserved: the request frees it when it ends
        table.free(lease)
        table.free(lease)  # idempotent
        assert (table.num_active, table.reserved_bytes, table.num_expired) == (0, 0, 0)

    on_loop(body)


# ---------------------------------------------------------------- limits


def test_the_lease_count_is_bounded_and_an_id_holds_one_lease(clock: FakeClock) -> None:
    table = LeaseTable(max_leases=2, clock=clock)

    async def body() -> None:
        first = table.reserve("a", LAYOUT, lease_s=5.0, remote=True)
        table.reserve("b", LAYOUT, lease_s=5.0, remote=False)
        with pytest.raises(LeaseError, match="all 2 leases of this worker are in use") as full:
            table.reserve("c", LAYOUT, lease_s=5.0, remote=True)
        assert full.value.reason == "exhausted"
        table.free(first)
        with pytest.raises(LeaseError, match="request 'b' already holds a lease") as taken:
            table.reserve("b", LAYOUT, lease_s=5.0, remote=True)
        assert taken.value.reason == "exists"
        table.reserve("c", LAYOUT, lease_s=5.0, remote=True)  # a freed lease makes room
        assert table.num_active == 2

    on_loop(body)


def test_reserved_bytes_stay_within_the_kv_budget(clock: FakeClock) -> None:
    budget = 2 * LAYOUT.total_bytes + LAYOUT.total_bytes // 2
    table = LeaseTable(max_leases=16, max_reserved_bytes=budget, clock=clock)

    async def body() -> None:
        first = table.reserve("a", LAYOUT, lease_s=5.0, remote=True)
        table.reserve("b", LAYOUT, lease_s=5.0, remote=True)
        with pytest.raises(LeaseError) as over:
            table.reserve("c", LAYOUT, lease_s=5.0, remote=True)
        assert over.value.reason == "exhausted"
        assert str(over.value) == (
            f"reserving {LAYOUT.total_bytes} KV bytes would exceed this worker's KV budget of {budget} bytes "
            f"(--kv-budget-gb {budget / 1e9:g}); {2 * LAYOUT.total_bytes} bytes are already reserved")
        assert table.reserved_bytes == 2 * LAYOUT.total_bytes
        clock.advance(5.0)
        assert table.expire_if_due(first) is not None  # an expired lease's bytes count no more
        table.reserve("c", LAYOUT, lease_s=5.0, remote=True)
        assert table.reserved_bytes == 2 * LAYOUT.total_bytes <= budget
        alone_too_big = KVLayout(2, 2, 4, "float32", num_tokens=budget // LAYOUT.bytes_per_token + 1)
        with pytest.raises(LeaseError, match="KV budget"):
            LeaseTable(max_leases=1, max_reserved_bytes=budget, clock=clock).reserve(
                "huge", alone_too_big, lease_s=5.0, remote=True)

    on_loop(body)


# ---------------------------------------------------------------- the sender's queue time


def test_a_waiting_lease_allows_the_senders_queue_deadline_before_its_lease(
        clock: FakeClock, pair: tuple[socket.socket, socket.socket]) -> None:
    """A prefill node connects when its prefill starts computing: its queue time is not a stall."""
    table = LeaseTable(max_leases=4, queue_s=60.0, clock=clock)

    async def body() -> None:
        lease = table.reserve("queued", LAYOUT, lease_s=30.0, remote=True)
        clock.advance(89.999)  # queued 60 s on the prefill engine, then nearly the whole lease
        assert table.expire_if_due(lease) is None
        clock.advance(0.001)
        assert table.expire_if_due(lease) == (
            "no prefill node connected within 90s (its queue deadline 60s, then the 30s lease)")

    on_loop(body)


def test_after_the_claim_the_lease_covers_the_first_byte_then_any_silence_is_a_stall(
        clock: FakeClock, pair: tuple[socket.socket, socket.socket]) -> None:
    table = LeaseTable(max_leases=4, queue_s=60.0, clock=clock)

    async def body() -> None:
        quiet = table.reserve("quiet", LAYOUT, lease_s=30.0, remote=True)
        clock.advance(50.0)  # queued 50 s on the sender's engine: no claim, no expiry
        assert table.claim(quiet.token, pair[0]) is quiet
        assert table.remaining(quiet) == 30.0  # the queue time is not charged to the lease
        clock.advance(30.0)
        assert table.expire_if_due(quiet) == "the prefill node connected but sent no KV byte for 30s"

        talking = table.reserve("talking", LAYOUT, lease_s=30.0, remote=True)
        assert table.claim(talking.token, pair[1]) is talking
        clock.advance(29.0)
        table.heard(talking)
        clock.advance(30.0)
        assert table.expire_if_due(talking) == "the KV transfer stalled: no bytes for 30s"

    on_loop(body)


def test_queue_allowance_must_not_be_negative() -> None:
    with pytest.raises(ValueError, match="queue_s"):
        LeaseTable(max_leases=1, queue_s=-1.0)


def test_a_waiter_that_checks_back_after_remaining_notices_a_claim_that_brings_the_deadline_forward(
        clock: FakeClock, pair: tuple[socket.socket, socket.socket]) -> None:
    """The decode RPC waits ``remaining`` then asks ``expire_if_due``; a stall right after a claim is cut on time."""
    table = LeaseTable(max_leases=4, queue_s=100.0, clock=clock)

    async def body() -> None:
        lease = table.reserve("r", LAYOUT, lease_s=10.0, remote=True)
        assert table.remaining(lease) == 10.0  # not the 110 s deadline: it checks back every lease_s
        checks: list[float] = []
        claimed = False
        for _ in range(100):  # the decode RPC's loop, on the fake clock
            wait = table.remaining(lease)
            if not claimed and clock.now + wait > 1025.0:  # the sender connects at t = 1025, then says nothing
                clock.advance(1025.0 - clock.now)
                assert table.claim(lease.token, pair[0]) is lease
                claimed = True
                continue
            clock.advance(max(wait, 0.0))
            checks.append(clock.now)
            why = table.expire_if_due(lease)
            if why is not None:
                assert why == "the prefill node connected but sent no KV byte for 10s"
                break
        assert checks[-1] == 1035.0  # exactly lease_s after the claim, not at the 1110 waiting deadline

    on_loop(body)


def test_usage_is_reserved_bytes_over_the_budget_or_leases_over_their_bound(clock: FakeClock) -> None:
    async def body() -> None:
        counted = LeaseTable(max_leases=4, clock=clock)
        budgeted = LeaseTable(max_leases=4, max_reserved_bytes=4 * LAYOUT.total_bytes, clock=clock)
        assert counted.usage == budgeted.usage == 0.0
        for table in (counted, budgeted):
            table.reserve("r", LAYOUT, lease_s=5.0, remote=True)
        assert counted.usage == 0.25 and budgeted.usage == 0.25
        budgeted.reserve("s", LAYOUT, lease_s=5.0, remote=True, extra_bytes=LAYOUT.total_bytes)
        assert budgeted.usage == 0.75 and budgeted.num_active == 2  # by bytes, not by count

    on_loop(body)
