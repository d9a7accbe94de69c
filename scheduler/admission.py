"""Admission control: a request no node can take now waits here, in order, for a bounded time.

NOTE on the algorithm. The scheduler cannot see a worker's free capacity: a
decode node answers ``RESOURCE_EXHAUSTED`` when its leases or its KV budget
are full, and the scheduler hears it before the request's first token. A
request refused that way is placed again at once on the nodes that did not
refuse it; when every node serving its model has refused it (or sits at the
scheduler's own in-flight cap, ``nodes_with_room``), it joins this queue. A
queued request holds nothing: no ledger entry, no lease, no slot. It waits
until capacity may have changed, then it is placed again (anywhere):

* a request that held capacity left its node (``released``: finished, failed
  or cancelled): the oldest waiting request of that model is woken;
* a woken request got its first token (``Turn.admitted``): there may be more
  room, so the next waiting request of that model is woken;
* the node table changed (``changed``): the oldest waiting request of every
  model is woken;
* nothing happened: the oldest request of a model (unless it is being placed
  right now) probes by itself after 0.05 s, doubling up to ``recheck_s``, so a
  lease freed where the scheduler cannot see it (a worker's asynchronous
  clean-up, another scheduler) is found without a herd of retries.

A request refused again waits again in its original place. Order is FIFO per
model: a newcomer queues behind its model's waiters instead of overtaking
them, and a running stream that must move (migration) goes ahead of new
requests and is never refused by the bound. Bounds: at most ``max_queued``
new requests wait (one more is refused at once), each for at most
``queue_timeout_s`` in all (then refused). Refusals are 429
``capacity_exhausted`` with ``Retry-After`` (``retry_after_s``):

    retry_after = clamp(ceil((queued + 1) / release_rate), 1, 60) seconds

where ``release_rate`` is requests that left their nodes in the last
``rate_window_s`` (60 s) per second, over the window or the scheduler's
uptime if shorter (at least 1 s); with none in the window it is
``queue_timeout_s`` (clamped the same way). That is when the queue ahead of
the refused request would have drained, had it been served at the recent rate.

Pure asyncio, no gRPC: tests drive it with fake keys and short timeouts, and
the clock (accounting, deadlines, the rate) is injectable.
"""
from __future__ import annotations

import asyncio
import dataclasses
import itertools
import logging
import math
import time
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from cluster.node import NodeInfo
from scheduler.request import CapacityExhaustedError

log = logging.getLogger(__name__)

MIN_PROBE_S = 0.05  # the head of a line probes this soon after a wake-up, then backs off
MAX_RETRY_AFTER_S = 60.0


@dataclass(frozen=True)
class AdmissionConfig:
    """The scheduler's admission queue (``pdc serve --max-queued``, ``--queue-timeout-s``,
    ``--max-inflight-per-node``)."""

    max_queued: int = 256  # new requests that may wait at once; 0: none (refuse at once)
    queue_timeout_s: float = 30.0  # the longest one request waits in all; 0: never wait
    max_inflight_per_node: int = 0  # requests the scheduler places on one decode node at once; 0: no cap
    recheck_s: float = 1.0  # the longest the head of a line goes without probing
    rate_window_s: float = 60.0  # the window of the release rate behind Retry-After

    def __post_init__(self) -> None:
        if self.max_queued < 0 or self.max_inflight_per_node < 0:
            raise ValueError("max_queued and max_inflight_per_node must be >= 0 (0: no queue, no cap)")
        if not math.isfinite(self.queue_timeout_s) or self.queue_timeout_s < 0:
            raise ValueError(f"queue_timeout_s must be a finite number >= 0, got {self.queue_timeout_s}")
        if self.recheck_s <= 0 or self.rate_window_s <= 0:
            raise ValueError("recheck_s and rate_window_s must be positive")


class NoRoomError(CapacityExhaustedError):
    """Every node serving the model refused the request or is at its in-flight cap: it
    should wait in the queue (a 429 like its parent if it escapes)."""


@dataclass(eq=False)
class Ticket:
    """One request's place in the queue, from its first wait until it runs or gives up."""

    key: str  # the model
    order: tuple[int, int]  # (0 running stream | 1 new request, arrival in the queue): smaller goes first
    deadline: float  # on the queue's clock
    reason: str  # why it waits: the last refusal, for the 429's message
    waiting: bool = False  # inside ``wait`` (else being placed)
    queued_s: float = 0.0  # time spent inside ``wait``
    probe_s: float = MIN_PROBE_S
    woken: asyncio.Event = field(default_factory=asyncio.Event)

    @property
    def running(self) -> bool:
        return self.order[0] == 0


class AdmissionQueue:
    """The waiting requests of one scheduler, by model, in FIFO order."""

    def __init__(self, config: AdmissionConfig = AdmissionConfig(),
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.config, self.clock = config, clock
        self._tickets: list[Ticket] = []  # sorted by order
        self._seq = itertools.count()
        self._releases: deque[float] = deque()  # when requests left their nodes, within the window
        self._started = clock()
        self.num_refused_full = 0  # refused because the queue was full
        self.num_timed_out = 0  # refused after waiting their whole queue timeout

    def __len__(self) -> int:
        return len(self._tickets)

    def __contains__(self, ticket: object) -> bool:
        return ticket in self._tickets

    @property
    def num_new(self) -> int:
        """New requests in the queue (the ones ``max_queued`` bounds)."""
        return sum(not t.running for t in self._tickets)

    def has_waiters(self, key: str) -> bool:
        """Whether requests for ``key`` are queued: a newcomer for it queues behind them."""
        return any(t.key == key for t in self._tickets)

    def line(self, key: str, deadline: float | None = None) -> Turn:
        """One request's dealings with the queue; ``deadline`` (queue clock) caps its waits."""
        return Turn(self, key, deadline)

    # ------------------------------------------------------------ joining, waiting, leaving

    def join(self, key: str, reason: str, *, running: bool = False, deadline: float | None = None) -> Ticket:
        """A place in the line for ``key``; raises the 429 at once when the queue is full.

        ``running``: a stream past its first token (never refused here, ahead of new requests)."""
        now = self.clock()
        if not running and self.num_new >= self.config.max_queued:
            self.num_refused_full += 1
            bound = (f"the admission queue is full ({self.num_new} requests waiting; pdc serve --max-queued "
                     f"{self.config.max_queued})" if self.config.max_queued else
                     "requests do not wait (pdc serve --max-queued 0)")
            raise self.refusal(f"no node has room for this request now and {bound}: {reason}")
        limit = now + self.config.queue_timeout_s
        ticket = Ticket(key, (0 if running else 1, next(self._seq)),
                        limit if deadline is None else min(limit, deadline), reason)
        self._tickets.append(ticket)
        self._tickets.sort(key=lambda t: t.order)
        return ticket

    async def wait(self, ticket: Ticket) -> None:
        """Until capacity may have changed for ``ticket`` (then place its request again).

        Raises the 429 at the ticket's deadline (it leaves the queue); a
        cancelled waiter (its client went away) leaves the queue at once."""
        if ticket not in self._tickets:
            raise ValueError("the ticket is not in the queue")
        ticket.woken.clear()
        ticket.waiting = True
        began = self.clock()
        try:
            while True:
                left = ticket.deadline - self.clock()
                if left <= 0:
                    self.leave(ticket)
                    self.num_timed_out += 1
                    raise self.refusal(f"no node had room for this request within its queue timeout of "
                                       f"{self.config.queue_timeout_s:g} s (pdc serve --queue-timeout-s): "
                                       f"{ticket.reason}")
                head = self._oldest(ticket.key) is ticket
                try:
                    await asyncio.wait_for(ticket.woken.wait(), min(left, ticket.probe_s if head
                                                                    else self.config.recheck_s))
                    ticket.probe_s = MIN_PROBE_S  # woken by an event: a quick probe if refused again
                    return
                except asyncio.TimeoutError:
                    if left > ticket.probe_s and self._oldest(ticket.key) is ticket:
                        ticket.probe_s = min(2 * ticket.probe_s, self.config.recheck_s)
                        return  # the head of its line probes
        except asyncio.CancelledError:
            self.leave(ticket)
            raise
        finally:
            ticket.waiting = False
            ticket.queued_s += self.clock() - began

    def leave(self, ticket: Ticket, *, admitted: bool = False) -> None:
        """``ticket`` is done with the queue (idempotent). ``admitted``: its request runs now,
        so the next waiter of its model is woken (there may be more room)."""
        if ticket in self._tickets:
            self._tickets.remove(ticket)
            if admitted:
                self._wake(ticket.key)

    # ------------------------------------------------------------ what wakes waiters

    def released(self, key: str) -> None:
        """A request for ``key`` that held capacity left its node: count it, wake the oldest waiter."""
        self._releases.append(self.clock())
        self._wake(key)

    def changed(self) -> None:
        """The node table changed: wake the oldest waiter of every model."""
        for key in {t.key for t in self._tickets}:
            self._wake(key)

    def _wake(self, key: str) -> None:
        waiting = next((t for t in self._tickets if t.key == key and t.waiting and not t.woken.is_set()), None)
        if waiting is not None:
            waiting.woken.set()

    def _oldest(self, key: str) -> Ticket | None:
        return next((t for t in self._tickets if t.key == key), None)

    # ------------------------------------------------------------ Retry-After and status

    def release_rate(self) -> float:
        """Requests that left their nodes per second, over the window (or the uptime, at least 1 s)."""
        now = self.clock()
        while self._releases and self._releases[0] < now - self.config.rate_window_s:
            self._releases.popleft()
        span = min(self.config.rate_window_s, max(now - self._started, 1.0))
        return len(self._releases) / span

    def retry_after_s(self) -> float:
        """Whole seconds a refused client should wait: see the module's note."""
        rate = self.release_rate()
        estimate = (len(self) + 1) / rate if rate > 0 else self.config.queue_timeout_s
        return float(min(MAX_RETRY_AFTER_S, max(1, math.ceil(estimate))))

    def refusal(self, message: str) -> CapacityExhaustedError:
        """The 429 for ``message``, with the Retry-After the queue computes now."""
        error = CapacityExhaustedError(message, grpc_code="RESOURCE_EXHAUSTED")
        error.retry_after_s = self.retry_after_s()
        return error

    def snapshot(self) -> dict:
        """The queue for ``/health``."""
        return {"queued": self.num_new, "moving_streams": len(self) - self.num_new,
                "max_queued": self.config.max_queued, "queue_timeout_s": self.config.queue_timeout_s,
                "max_inflight_per_node": self.config.max_inflight_per_node,
                "release_rate_per_s": round(self.release_rate(), 3), "retry_after_s": self.retry_after_s(),
                "refused_queue_full": self.num_refused_full, "refused_timed_out": self.num_timed_out}


class Turn:
    """One request's dealings with the queue: it joins on its first wait, waits as
    often as it is refused, and leaves once it runs or ends (``close``)."""

    def __init__(self, queue: AdmissionQueue, key: str, deadline: float | None) -> None:
        self.queue, self.key, self.deadline = queue, key, deadline
        self.ticket: Ticket | None = None
        self.queued_s = 0.0  # time spent waiting, over every wait

    async def wait(self, reason: str, *, running: bool = False) -> None:
        """Wait (joining the queue first if need be) until capacity may have changed.

        Raises the 429 (``CapacityExhaustedError``) when the queue is full or the wait times out."""
        if self.ticket is None or self.ticket not in self.queue:
            self.ticket = self.queue.join(self.key, reason, running=running, deadline=self.deadline)
        self.ticket.reason = reason
        before = self.ticket.queued_s
        try:
            await self.queue.wait(self.ticket)
        finally:
            self.queued_s += self.ticket.queued_s - before

    def admitted(self) -> None:
        """The request runs (its first token came): leave, and pass the turn on."""
        if self.ticket is not None:
            self.queue.leave(self.ticket, admitted=True)
            self.ticket = None

    def close(self) -> None:
        """The request ended: leave the queue if still in it."""
        if self.ticket is not None:
            self.queue.leave(self.ticket)
            self.ticket = None


def nodes_with_room(nodes: Iterable[NodeInfo], refused: set[str], active: Callable[[str], int],
                    max_inflight: int) -> tuple[list[NodeInfo], list[str]]:
    """``nodes`` as placement may use them now, and the ids of those held back.

    A node that refused this request since its last wait is left out. With a
    cap (``max_inflight`` > 0), a decode-capable node carrying that many
    requests (``active``: the load ledger's count) is offered without its
    decode role: it may still prefill for another node."""
    offered: list[NodeInfo] = []
    held: list[str] = []
    for node in nodes:
        if node.node_id in refused:
            held.append(node.node_id)
            continue
        if max_inflight and node.can_decode and active(node.node_id) >= max_inflight:
            held.append(node.node_id)
            roles = tuple(r for r in node.roles if r != "decode")
            if not roles:
                continue
            node = dataclasses.replace(node, roles=roles)
        offered.append(node)
    return offered, held
