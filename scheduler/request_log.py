"""One record per request: the line it writes to the log, and the last N kept for ``/admin/requests``.

Every generation request that reaches the HTTP API (a ``POST`` under
``/v1/`` or ``/api/``) gets a ``RequestTrace`` when it arrives (api.py's
``_traced`` middleware) and leaves one ``RequestRecord`` when its response
ends, whatever the end: a finish reason, an error before or after the first
byte (400, 404, 429, 503 ...), a client that went away, a stream the drain cut.
The record merges what three places know:

* the API: the route, the id, the model, the user, the status;
* the text deltas (``RequestTrace.watch``): the finish (a stop string
  included) or the error that ended them;
* the backend (``RequestLog.ended``, from ``ClusterBackend.generate``): its
  ``RequestStats``, whole once it finished, else the placement, tokens and
  times known when it ended.

The open traces are the requests in flight, from arrival to the last byte:
the drain (scheduler/drain.py) waits for them and, at its timeout, cuts them
(``cut_open``). The ring keeps the last ``size`` records for ``pdc logs``.

Timelines (the dashboard's bars): a record's ``phases()`` lay its stats out as
queue, prefill, KV transfer and decode, each on the node that ran it, in
seconds from its arrival. A request in flight has no stats yet: the backend
marks its trace as it goes (``placed``, ``marked``: prefill done, first token),
and ``RequestTrace.phases(now)`` draws what is known so far.
"""
from __future__ import annotations

import asyncio
import json
import time
from collections import deque
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field

from scheduler.request import (
    FinishEvent,
    GenerationRequest,
    RequestStats,
    SchedulerError,
)

CLIENT_GONE_STATUS = 499  # the client closed the request before its end (nginx's convention)
DEFAULT_SIZE = 1000
Deltas = AsyncIterator[tuple[str, FinishEvent | None]]


@dataclass(frozen=True, kw_only=True)
class RequestRecord:
    """One request as it ended: the fields of its log line and of ``/admin/requests``.

    ``outcome`` is the finish reason ("stop", "length") of a request that
    completed, else the error's code ("capacity_exhausted", "no_capacity",
    "draining", "worker_failed", "invalid_request_error", ...) or "cancelled"
    (the client went away). ``status`` is the HTTP status the client got; for a
    stream that failed after its headers, the status of its error event."""

    seq: int  # its place in this scheduler's log, from 1
    ts: float  # wall clock (Unix seconds) when it ended
    request_id: str  # "" when it was refused before it had one
    route: str
    model: str
    status: int
    outcome: str
    error: str = ""
    stop: str | None = None  # the client's stop string that ended it, if one did
    user: str | None = None
    stream: bool = False
    stats: RequestStats = field(default_factory=RequestStats)
    arrived_ts: float = 0.0  # wall clock (Unix seconds) when it arrived; 0: unknown

    @property
    def placement(self) -> str:
        """"colocated", "disaggregated", or "" when it was never placed."""
        if not self.stats.decode_node:
            return ""
        return "colocated" if self.stats.colocated else "disaggregated"

    def to_json(self) -> dict:
        """Every field, the stats flattened in (``RequestStats.to_json``'s names, less the
        scheduler-clock ``arrival_s``), with ``placement``."""
        stats = self.stats.to_json()
        stats.pop("arrival_s")
        stats.pop("request_id")
        return {"seq": self.seq, "ts": round(self.ts, 3), "request_id": self.request_id, "route": self.route,
                "model": self.model, "status": self.status, "outcome": self.outcome, "error": self.error,
                "stop": self.stop, "user": self.user, "stream": self.stream, "placement": self.placement, **stats}

    def phases(self) -> list[Phase]:
        """Its timeline from its stats (``phases_of``); empty when it was never placed."""
        return phases_of(self.stats)

    def line(self) -> str:
        """The log line: ``request ID`` then ``key=value`` pairs named as in ``to_json`` (the
        placement and times once it was placed, the tokens once it was tokenized)."""
        s = self.stats
        pairs = [("model", self.model or "-"), ("route", self.route), ("stream", str(self.stream).lower())]
        if self.placement:  # placed: where it ran and where its time went
            pairs += [("placement", self.placement), ("prefill_node", s.prefill_node), ("decode_node", s.decode_node)]
            if not s.colocated:
                pairs += [("kv_codec", s.kv_codec or "-"), ("kv_bytes", str(s.kv_bytes))]
            tpot = "-" if s.tpot_s is None else f"{s.tpot_s:.4f}"
            pairs += [("queue_s", f"{s.queue_s:.3f}"), ("prefill_s", f"{s.prefill_s:.3f}"),
                      ("transfer_s", f"{s.transfer_s:.3f}"), ("exposed_transfer_s", f"{s.exposed_transfer_s:.3f}"),
                      ("ttft_s", f"{s.ttft_s:.3f}"), ("tpot_s", tpot), ("e2e_s", f"{s.e2e_s:.3f}")]
        if self.request_id:  # tokenized
            pairs += [("prompt_tokens", str(s.prompt_tokens)), ("cached_tokens", str(s.cached_prefix_tokens)),
                      ("completion_tokens", str(s.completion_tokens)), ("migrations", str(s.migrations))]
        if self.stop is not None:
            pairs.append(("stop", json.dumps(self.stop)))
        if self.user is not None:
            pairs.append(("user", repr(self.user)))
        if self.error:
            pairs.append(("error", json.dumps(self.error)))
        head = f"request {self.request_id or '-'} outcome={self.outcome} status={self.status} "
        return head + " ".join(f"{k}={v}" for k, v in pairs)


@dataclass(frozen=True)
class Phase:
    """One stretch of a request's timeline, in seconds from its arrival."""

    name: str  # "queue", "prefill", "transfer" or "decode"
    node: str  # where it ran: a node id, "PREFILL -> DECODE" for a transfer, "" while queued
    start_s: float
    end_s: float

    def to_json(self) -> dict:
        return {"phase": self.name, "node": self.node, "start_s": round(self.start_s, 6),
                "end_s": round(self.end_s, 6)}


def phases_of(stats: RequestStats) -> list[Phase]:
    """A placed request's timeline from its record: queued until its prefill started
    (``queue_s``), prefill (``prefill_s``) on the prefill node, the KV transfer when
    it crossed a link (ending ``exposed_transfer_s`` after the prefill, lasting
    ``transfer_s``), then decode on the decode node until its last token (``e2e_s``)."""
    if not stats.decode_node:
        return []
    prefill_start = max(0.0, stats.queue_s)
    prefill_end = prefill_start + max(0.0, stats.prefill_s)
    phases = [Phase("queue", "", 0.0, prefill_start)] if prefill_start > 0 else []
    phases.append(Phase("prefill", stats.prefill_node, prefill_start, prefill_end))
    decode_start = prefill_end
    if not stats.colocated and stats.transfer_s > 0:
        landed = prefill_end + max(0.0, stats.exposed_transfer_s)
        link = f"{stats.prefill_node} -> {stats.decode_node}"
        phases.append(Phase("transfer", link, max(prefill_start, landed - stats.transfer_s), landed))
        decode_start = landed
    phases.append(Phase("decode", stats.decode_node, decode_start, max(decode_start, stats.e2e_s)))
    return phases


@dataclass(eq=False)
class RequestTrace:
    """One HTTP request in flight, from its arrival to its last byte (the API owns it)."""

    route: str
    task: asyncio.Task | None = None  # the handler's task: the drain cancels it at its timeout
    request_id: str = ""
    model: str = ""
    user: str | None = None
    stream: bool = False
    prompt_tokens: int = 0
    finish: FinishEvent | None = None  # how its text ended, when it completed
    failure: tuple[int, str, str] | None = None  # (status, code, message) of the first failure seen
    backend: tuple[str, RequestStats] | None = None  # the backend's outcome and record (``RequestLog.ended``)
    status: int | None = None  # the status of the response the handler returned
    cut: SchedulerError | None = None  # set by ``RequestLog.cut_open``: end with this error
    arrived_ts: float = 0.0  # the log's clock when it arrived
    prefill_node: str = ""  # its latest placement (the decode node when colocated); "" until placed
    decode_node: str = ""
    marks: dict[str, float] = field(default_factory=dict)  # "placed", "prefill_done", "first_token" -> log's clock

    def phases(self, now: float) -> list[Phase]:
        """What is known of its timeline at ``now`` (the log's clock): queued until placed,
        prefill until the prefill node is done (or the first token came), then decode."""
        elapsed = max(0.0, now - self.arrived_ts)
        if "placed" not in self.marks:
            return [Phase("queue", "", 0.0, elapsed)]
        at = {name: max(0.0, t - self.arrived_ts) for name, t in self.marks.items()}
        first = at.get("first_token")
        prefill_end = at.get("prefill_done", first if first is not None else elapsed)
        phases = [Phase("queue", "", 0.0, at["placed"])] if at["placed"] > 0 else []
        phases.append(Phase("prefill", self.prefill_node, at["placed"], max(at["placed"], prefill_end)))
        if first is not None:
            phases.append(Phase("decode", self.decode_node, first, max(first, elapsed)))
        return phases

    def started(self, gen: GenerationRequest, stream: bool) -> None:
        """Its generation started as ``gen``."""
        self.request_id, self.model, self.user = gen.request_id, gen.model, gen.user
        self.prompt_tokens, self.stream = len(gen.prompt_token_ids), stream

    def failed(self, status: int, code: str, message: str) -> None:
        """Keep the first failure (the most precise: later ones are the same error, caught further out)."""
        if self.failure is None:
            self.failure = (status, code, message)

    async def watch(self, deltas: Deltas) -> Deltas:
        """``deltas`` passed through, noting the finish or the failure that ends them. When the
        drain cuts this request (its task cancelled, ``cut`` set), the cancellation becomes
        ``cut``: the API answers it in its dialect (an error event, or a 503 before the stream)."""
        try:
            async for item in deltas:
                if item[1] is not None:
                    self.finish = item[1]
                yield item
        except asyncio.CancelledError:
            if self.cut is None:
                raise
            task = asyncio.current_task()
            if task is not None and hasattr(task, "uncancel"):  # 3.11+: this cancellation is handled
                task.uncancel()
            self.failed(self.cut.status, self.cut.code, self.cut.message)
            raise self.cut from None
        except SchedulerError as e:
            self.failed(e.status, e.code, e.message)
            raise
        except Exception as e:
            self.failed(500, "internal_error", f"{type(e).__name__}: {e}")
            raise
        finally:
            await deltas.aclose()  # type: ignore[attr-defined]


class RequestLog:
    """The requests in flight (open traces) and the last ``size`` records, in order."""

    def __init__(self, size: int = DEFAULT_SIZE, clock: Callable[[], float] = time.time) -> None:
        if size < 1:
            raise ValueError(f"the request log keeps at least 1 record, got size={size}")
        self.size, self.clock = size, clock
        self._records: deque[RequestRecord] = deque(maxlen=size)
        self._open: set[RequestTrace] = set()
        self._by_id: dict[str, RequestTrace] = {}
        self._idle = asyncio.Event()
        self._idle.set()
        self.num_recorded = 0  # records made since start (the last one's ``seq``)

    @property
    def num_open(self) -> int:
        """Requests in flight: arrived and not yet answered to their last byte."""
        return len(self._open)

    def open(self, route: str, task: asyncio.Task | None = None) -> RequestTrace:
        """A request arrived on ``route`` (handled by ``task``)."""
        trace = RequestTrace(route, task, arrived_ts=self.clock())
        self._open.add(trace)
        self._idle.clear()
        return trace

    def started(self, trace: RequestTrace, gen: GenerationRequest, stream: bool) -> None:
        """``trace``'s generation started: the backend's record of ``gen`` will join it."""
        trace.started(gen, stream)
        self._by_id[gen.request_id] = trace

    def ended(self, request_id: str, outcome: str, stats: RequestStats) -> None:
        """The backend's end of ``request_id``: its outcome and record (ignored without an open trace)."""
        trace = self._by_id.get(request_id)
        if trace is not None:
            trace.backend = (outcome, stats)

    def placed(self, request_id: str, prefill_node: str, decode_node: str) -> None:
        """The backend placed ``request_id`` (again, after a failure: its new nodes and marks)."""
        trace = self._by_id.get(request_id)
        if trace is not None:
            trace.prefill_node, trace.decode_node = prefill_node, decode_node
            first = trace.marks.get("first_token")
            trace.marks = {"placed": self.clock(), **({"first_token": first} if first is not None else {})}

    def marked(self, request_id: str, event: str) -> None:
        """``request_id`` reached ``event`` ("prefill_done", "first_token"); the first time counts."""
        trace = self._by_id.get(request_id)
        if trace is not None:
            trace.marks.setdefault(event, self.clock())

    def in_flight(self) -> list[RequestTrace]:
        """The requests in flight, oldest first."""
        return sorted(self._open, key=lambda t: t.arrived_ts)

    def close(self, trace: RequestTrace) -> RequestRecord | None:
        """``trace``'s response ended: its record, kept in the ring (None for a request that
        started no generation and did not fail, e.g. Ollama's load call)."""
        self._open.discard(trace)
        self._by_id.pop(trace.request_id, None)
        if not self._open:
            self._idle.set()
        record = self._record(trace)
        if record is not None:
            self._records.append(record)
        return record

    def _record(self, trace: RequestTrace) -> RequestRecord | None:
        stop = getattr(trace.finish, "stop", None)
        if trace.failure is not None:
            status, outcome, error = trace.failure
        elif trace.finish is not None:
            status, outcome, error = trace.status or 200, trace.finish.finish_reason, ""
        elif trace.request_id:
            status, outcome, error = CLIENT_GONE_STATUS, "cancelled", "the client closed the request before its end"
        else:
            return None
        if trace.backend is not None:
            stats = trace.backend[1]
        elif trace.finish is not None:
            stats = trace.finish.stats
        else:
            stats = RequestStats(request_id=trace.request_id, prompt_tokens=trace.prompt_tokens)
        self.num_recorded += 1
        return RequestRecord(seq=self.num_recorded, ts=self.clock(), request_id=trace.request_id, route=trace.route,
                             model=trace.model, status=status, outcome=outcome, error=error, stop=stop,
                             user=trace.user, stream=trace.stream, stats=stats, arrived_ts=trace.arrived_ts)

    def recent(self, limit: int, after: int = 0) -> list[RequestRecord]:
        """The newest ``limit`` records with ``seq > after``, oldest first."""
        newer = [r for r in self._records if r.seq > after]
        return newer[-limit:] if limit > 0 else []

    async def wait_idle(self) -> None:
        """Until no request is in flight."""
        await self._idle.wait()

    def cut_open(self, error: SchedulerError) -> int:
        """End every request in flight with ``error`` (cancelling its handler); how many were cut."""
        cut = 0
        for trace in list(self._open):
            if trace.cut is None and trace.task is not None and not trace.task.done():
                trace.cut = error
                trace.task.cancel()
                cut += 1
        return cut
