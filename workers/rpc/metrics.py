"""One worker's Prometheus metrics, and the HTTP listener that serves them (``pdc worker --metrics-port``).

Every worker keeps its own ``CollectorRegistry`` (never prometheus_client's
global one), so several in-process workers (tests) never share a series. Every
series carries ``node`` (the worker's node id), under the names the
scheduler's ``/metrics`` uses (docs/operations.md, "Metrics"). Two sources:

* what the RPCs returned: ``MeteredServicer`` observes each ``PrefillReply``
  and each ``Decode``'s ``Done`` (prefill and queue time, transfer time,
  prompt tokens, prefix-cache queries and hits, finish reasons) and passes
  everything through unchanged;
* the worker's state, read at scrape time (``WorkerCollector``): the decode
  batch, calls in progress, leases and the KV budget, the prefix cache, and
  the counters behind the ``Stats`` RPC.

A scrape reads memory only, on the event loop (like ``Stats``); the listener is
plain aiohttp on the worker's ``--host``, off unless ``--metrics-port`` is given.
"""
from __future__ import annotations

import contextlib
import logging
from collections.abc import AsyncIterator, Iterator

from aiohttp import web
from grpc import aio
from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from proto import pdcluster_pb2 as pb
from workers.rpc.servicer import WorkerServicer
from workers.rpc.state import WorkerState

log = logging.getLogger(__name__)

PREFIX = "pdcluster:"
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"  # the classic text format, which every Prometheus reads
# seconds; the scheduler's buckets (scheduler/metrics.py), so the two sides' histograms compare
REQUEST_BUCKETS = (0.01, 0.05, 0.1, 0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0,
                   60.0, 120.0, 240.0, 480.0, 960.0, 1920.0, 7680.0)
TRANSFER_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
                    60.0)


class WorkerMetrics:
    """The metrics of one worker; ``exposition()`` is the body of its ``/metrics``."""

    def __init__(self, node_id: str, state: WorkerState) -> None:
        self.node_id, self.state = node_id, state
        self.registry = r = CollectorRegistry()
        node = ["node"]
        self.prefill = Histogram(PREFIX + "request_prefill_time_seconds", "Prefill compute of the prompts "
                                 "prefilled here.", node, buckets=REQUEST_BUCKETS, registry=r).labels(node_id)
        self.queue = Histogram(PREFIX + "request_queue_time_seconds", "Arrival to prefill start of the "
                               "prompts prefilled here.", node, buckets=REQUEST_BUCKETS, registry=r).labels(node_id)
        self.transfer = Histogram(PREFIX + "kv_transfer_seconds", "First KV byte to last KV byte received, per "
                                  "request decoded here with remote prefill.", node, buckets=TRANSFER_BUCKETS,
                                  registry=r).labels(node_id)
        self.exposed = Histogram(PREFIX + "kv_exposed_transfer_seconds", "Prefill end to last KV byte received, "
                                 "per request decoded here with remote prefill.", node, buckets=TRANSFER_BUCKETS,
                                 registry=r).labels(node_id)
        self.prompt = Counter(PREFIX + "prompt_tokens", "Prompt tokens of the requests prefilled here.", node,
                              registry=r).labels(node_id)
        self.queries = Counter(PREFIX + "prefix_cache_queries", "Prompt tokens looked up in this node's prefix "
                               "cache (by Prefill and Decode calls that completed).", node, registry=r).labels(node_id)
        self.hits = Counter(PREFIX + "prefix_cache_hits", "Prompt tokens whose KV this node's prefix cache held.",
                            node, registry=r).labels(node_id)
        self.success = Counter(PREFIX + "request_success", "Decode calls that finished here, by finish reason.",
                               ["node", "finished_reason"], registry=r)
        r.register(WorkerCollector(node_id, state))

    @property
    def prefix_cache_on(self) -> bool:
        cache = self.state.prefix_cache
        return cache is not None and cache.capacity_bytes > 0

    def observe_prefill(self, request: pb.PrefillRequest, reply: pb.PrefillReply) -> None:
        """A Prefill call that completed (its KV sent)."""
        self.prefill.observe(reply.prefill_s)
        self.queue.observe(reply.queue_s)
        self.prompt.inc(len(request.prompt_token_ids))
        if self.prefix_cache_on:
            self.queries.inc(len(request.prompt_token_ids))
            self.hits.inc(reply.cached_tokens)

    def observe_done(self, request: pb.DecodeRequest, done: pb.Done) -> None:
        """A Decode call that finished (its ``done`` event)."""
        timings = done.timings
        self.success.labels(self.node_id, done.finish_reason).inc()
        if request.local_prefill:  # else prefill_s and queue_s are the prefill node's
            self.prefill.observe(timings.prefill_s)
            self.queue.observe(timings.queue_s)
            self.prompt.inc(len(request.prompt_token_ids))
        else:
            self.transfer.observe(timings.transfer_s)
            self.exposed.observe(timings.exposed_transfer_s)
        if self.prefix_cache_on:
            self.queries.inc(len(request.prompt_token_ids))
            self.hits.inc(timings.decode_cached_tokens)

    def exposition(self) -> tuple[bytes, str]:
        """(body, content type) of the Prometheus text format."""
        return generate_latest(self.registry), CONTENT_TYPE


class WorkerCollector(Collector):
    """The series read from the worker's state at scrape time."""

    def __init__(self, node_id: str, state: WorkerState) -> None:
        self.node_id, self.state = node_id, state

    def collect(self) -> Iterator[Metric]:
        state, leases, c = self.state, self.state.leases, self.state.counters
        running = state.loop.num_running
        budget = leases.max_reserved_bytes
        reserved = leases.reserved_bytes
        usage = leases.usage
        yield self._gauge("num_requests_running", "Requests in the decode batch.", running)
        yield self._gauge("num_requests_waiting", "Prefill and Decode calls in progress that are not in the "
                          "decode batch (prefilling, waiting for KV or a batch slot).",
                          max(0, len(state.active) - running))
        yield self._gauge("kv_cache_usage_perc", "KV reserved by leases over the KV budget (0-1); without "
                          "--kv-budget-gb, leases in use over --max-leases.", usage)
        yield self._gauge("kv_leases_active", "KV reservations (leases) held.", leases.num_active)
        yield self._gauge("kv_reserved_bytes", "KV bytes the leases reserve.", reserved)
        if budget:
            yield self._gauge("kv_budget_bytes", "The KV budget (--kv-budget-gb).", budget)
        yield self._counter("kv_bytes_sent", "KV bytes this node sent (prefill side).", c.kv_bytes_sent)
        yield self._counter("kv_bytes_received", "KV bytes this node received (decode side).", c.kv_bytes_received)
        yield self._counter("generation_tokens", "Tokens generated here.", c.tokens_generated)
        yield self._counter("node_requests", "Prefill and Decode calls received.", c.requests_total)
        yield self._counter("node_requests_failed", "Calls that failed.", c.requests_failed)
        yield self._counter("node_requests_cancelled", "Calls cancelled.", c.requests_cancelled)
        yield self._counter("kv_leases_expired", "Leases that expired before their KV came.", leases.num_expired)
        cache = state.prefix_cache
        if cache is not None:
            yield self._gauge("prefix_cache_bytes", "Bytes the prefix cache holds.", cache.nbytes)
            yield self._gauge("prefix_cache_capacity_bytes", "The prefix cache bound.", cache.capacity_bytes)

    def _gauge(self, name: str, doc: str, value: float) -> Metric:
        family = GaugeMetricFamily(PREFIX + name, doc, labels=["node"])
        family.add_metric([self.node_id], value)
        return family

    def _counter(self, name: str, doc: str, value: float) -> Metric:
        family = CounterMetricFamily(PREFIX + name, doc, labels=["node"])
        family.add_metric([self.node_id], value)
        return family


class MeteredServicer(WorkerServicer):
    """The worker service, with each completed Prefill and finished Decode observed."""

    def __init__(self, metrics: WorkerMetrics, *args: object, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)
        self.metrics = metrics

    async def Prefill(self, request: pb.PrefillRequest, context: aio.ServicerContext) -> pb.PrefillReply:
        reply = await super().Prefill(request, context)
        if reply is not None:  # None: the call was aborted
            self.metrics.observe_prefill(request, reply)
        return reply

    async def Decode(self, request: pb.DecodeRequest, context: aio.ServicerContext) -> AsyncIterator[pb.DecodeEvent]:
        # aclosing: when grpc closes this stream, the inner one (and its clean-up) closes now, not at GC
        async with contextlib.aclosing(super().Decode(request, context)) as events:
            async for event in events:
                if event.HasField("done"):
                    self.metrics.observe_done(request, event.done)
                yield event


class MetricsServer:
    """``GET /metrics`` over HTTP on ``host:port`` (0: a free port): ``await start()``, ``await stop()``."""

    def __init__(self, metrics: WorkerMetrics, host: str, port: int) -> None:
        self.metrics, self.host, self.port = metrics, host, port
        app = web.Application()
        app.router.add_get("/metrics", self._metrics)
        self._runner = web.AppRunner(app, access_log=None)

    async def start(self) -> None:
        """Bind and serve; ``port`` is then the bound port."""
        await self._runner.setup()
        site = web.TCPSite(self._runner, self.host, self.port)
        try:
            await site.start()
        except OSError:
            await self._runner.cleanup()
            raise
        self.port = self._runner.addresses[0][1]

    async def stop(self) -> None:
        await self._runner.cleanup()

    async def _metrics(self, request: web.Request) -> web.Response:
        body, content_type = self.metrics.exposition()
        return web.Response(body=body, headers={"Content-Type": content_type})
