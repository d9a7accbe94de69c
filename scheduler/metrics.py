"""The scheduler's Prometheus metrics: what requests did, and the cluster-wide view.

Every scheduler keeps its own ``CollectorRegistry`` (``SchedulerMetrics.registry``,
never prometheus_client's global one), so several schedulers in one process
(tests) never share a series. Names follow vLLM's with a ``pdcluster:`` prefix;
docs/operations.md ("Metrics") lists each one with its labels.

Two sources feed it:

* requests: each request that ends is observed once, from its ``RequestStats``
  record (``observe_request``); the gap before every token sent after the first
  is observed as it happens (``observe_token_gap``);
* the cluster: read at scrape time from a ``ClusterSample`` (the node table,
  the load ledger, the admission queue, the placements, the measured links),
  built from memory, plus each node's last ``Stats`` reply as the service's
  prefix poll recorded it (``record_stats``). A scrape sends no RPC and waits
  on nothing, so it never holds up the event loop.

Pure Python over plain dataclasses: no grpc and no proto imports (a ``Stats``
reply is read by field name).
"""
from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from cluster.links import LinkRecord
from cluster.node import NodeInfo
from scheduler.request import RequestStats

if TYPE_CHECKING:
    from scheduler.service import ClusterBackend

PREFIX = "pdcluster:"
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"  # the classic text format, which every Prometheus reads
FINISH_REASONS = ("stop", "length")  # a request that ended with its record; "abort" and error codes have none
# Latency buckets in seconds: vLLM's, with finer steps below 10 ms for small models on fast machines.
TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
                20.0, 40.0, 80.0, 160.0, 640.0, 2560.0)
ITL_BUCKETS = (0.001, 0.0025, 0.005, 0.0075, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75,
               1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0)
REQUEST_BUCKETS = (0.01, 0.05, 0.1, 0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0,
                   60.0, 120.0, 240.0, 480.0, 960.0, 1920.0, 7680.0)
TRANSFER_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
                    60.0)


@dataclass(frozen=True)
class NodeStats:
    """One worker's ``Stats`` reply as the scheduler keeps it, and when it came (monotonic)."""

    at: float
    running_requests: int = 0  # in the decode batch
    active_requests: int = 0  # Prefill and Decode RPCs in progress
    active_leases: int = 0
    reserved_kv_bytes: int = 0
    requests_total: int = 0
    requests_failed: int = 0
    requests_cancelled: int = 0
    kv_bytes_sent: int = 0
    kv_bytes_received: int = 0
    tokens_generated: int = 0
    prefix_hits: int = 0  # lookups that reused at least one block
    prefix_hit_tokens: int = 0
    prefix_cache_bytes: int = 0
    prefix_cache_capacity_bytes: int = 0
    kv_cache_usage_perc: float = 0.0  # 0-1, as the node computes it

    @classmethod
    def from_reply(cls, reply: Any, at: float) -> NodeStats:
        """Read a ``StatsReply`` (or anything with its field names) received at ``at``."""
        fields = {name: f for name, f in cls.__dataclass_fields__.items() if name != "at"}
        return cls(at=at, **{name: (float if f.type in ("float", float) else int)(getattr(reply, name, 0))
                             for name, f in fields.items()})


@dataclass(frozen=True)
class ClusterSample:
    """What the cluster looks like to the scheduler now, for one scrape."""

    nodes: tuple[NodeInfo, ...] = ()
    links: tuple[LinkRecord, ...] = ()
    num_running: int = 0  # requests placed and not finished (the load ledger)
    num_waiting: int = 0  # requests in the admission queue
    placed: Mapping[str, int] = field(default_factory=dict)  # node -> requests the ledger counts there
    placements: Mapping[tuple[str, str], int] = field(default_factory=dict)  # (policy, mode) -> placements
    now: float = 0.0  # monotonic, for the age of each node's stats


def cluster_sample(backend: ClusterBackend) -> ClusterSample:
    """The live scheduler's sample: read from memory only (no RPC)."""
    return ClusterSample(
        nodes=tuple(backend.table.snapshot()), links=tuple(backend.links.table.records.values()),
        num_running=len(backend.ledger), num_waiting=len(backend.admission), placed=backend.ledger.active_counts(),
        placements=dict(backend.dispatcher.num_placements), now=time.monotonic(),
    )


class SchedulerMetrics:
    """The metrics of one scheduler; ``exposition()`` is the body of its ``/metrics``."""

    def __init__(self, sample: Callable[[], ClusterSample] | None = None) -> None:
        self.registry = CollectorRegistry()
        self.node_stats: dict[str, NodeStats] = {}
        self._requests = _RequestMetrics(self.registry)
        self.registry.register(ClusterCollector(sample or ClusterSample, self.node_stats))

    def observe_request(self, model: str, outcome: str, stats: RequestStats) -> None:
        """Count one request that ended. ``outcome``: its finish reason ("stop",
        "length") with its whole record; "abort" (closed before its end: the
        client went away, or a stop string matched) or a ``SchedulerError`` code
        ("no_capacity", "worker_failed", ...) with what is known (nodes, tokens sent)."""
        self._requests.observe(model, outcome, stats)

    def observe_token_gap(self, model: str, seconds: float) -> None:
        """Seconds between two consecutive tokens sent to one client."""
        self._requests.itl.labels(model).observe(seconds)

    def record_stats(self, node_id: str, reply: Any, at: float | None = None) -> None:
        """Keep ``node_id``'s latest ``Stats`` reply for the per-node series."""
        self.node_stats[node_id] = NodeStats.from_reply(reply, time.monotonic() if at is None else at)

    def forget(self, node_id: str) -> None:
        """A node left: drop its stats."""
        self.node_stats.pop(node_id, None)

    def exposition(self) -> tuple[bytes, str]:
        """(body, content type) of the Prometheus text format."""
        return generate_latest(self.registry), CONTENT_TYPE


class _RequestMetrics:
    """The per-request series, observed from ``RequestStats`` records."""

    def __init__(self, registry: CollectorRegistry) -> None:
        def histogram(name: str, doc: str, labels: list[str], buckets: tuple[float, ...]) -> Histogram:
            return Histogram(PREFIX + name, doc, labels, buckets=buckets, registry=registry)

        def counter(name: str, doc: str, labels: list[str]) -> Counter:
            return Counter(PREFIX + name, doc, labels, registry=registry)

        self.ttft = histogram("time_to_first_token_seconds", "Arrival to the first token sent, per finished "
                              "request.", ["model_name"], TTFT_BUCKETS)
        self.itl = histogram("inter_token_latency_seconds", "Seconds between consecutive tokens sent to a client.",
                             ["model_name"], ITL_BUCKETS)
        self.e2e = histogram("e2e_request_latency_seconds", "Arrival to the last token, per finished request.",
                             ["model_name"], REQUEST_BUCKETS)
        self.queue = histogram("request_queue_time_seconds", "Arrival to prefill start (admission queue "
                               "included), per finished request.", ["model_name"], REQUEST_BUCKETS)
        self.prefill = histogram("request_prefill_time_seconds", "Prefill compute on the node that prefilled, "
                                 "per finished request.", ["model_name", "node"], REQUEST_BUCKETS)
        self.transfer = histogram("kv_transfer_seconds", "First KV byte sent to last byte landed, per "
                                  "disaggregated request.", ["src", "dst"], TRANSFER_BUCKETS)
        self.exposed = histogram("kv_exposed_transfer_seconds", "Prefill end to last KV byte landed: the "
                                 "transfer time prefill did not hide, per disaggregated request.", ["src", "dst"],
                                 TRANSFER_BUCKETS)
        self.kv_bytes = counter("kv_bytes_transferred", "KV bytes sent prefill node -> decode node, as encoded.",
                                ["src", "dst", "codec"])
        self.prompt = counter("prompt_tokens", "Prompt tokens of requests that got their first token, by the "
                              "node that prefilled.", ["model_name", "node"])
        self.generation = counter("generation_tokens", "Tokens sent to clients, by the node that decoded them.",
                                  ["model_name", "node"])
        self.success = counter("request_success", "Requests that ended: stop or length (finished), abort "
                               "(closed before their end).", ["model_name", "finished_reason"])
        self.failure = counter("request_failure", "Requests that failed, by error code.", ["model_name", "code"])
        self.queries = counter("prefix_cache_queries", "Prompt tokens looked up in the prefilling node's prefix "
                               "cache, per finished request.", ["node"])
        self.hits = counter("prefix_cache_hits", "Prompt tokens whose KV came from a prefix cache (not "
                            "prefilled), per finished request.", ["node"])

    def observe(self, model: str, outcome: str, stats: RequestStats) -> None:
        if outcome in FINISH_REASONS or outcome == "abort":
            self.success.labels(model, outcome).inc()
        else:
            self.failure.labels(model, outcome).inc()
        if outcome in FINISH_REASONS or stats.completion_tokens:  # its prompt was prefilled
            self.prompt.labels(model, stats.prefill_node).inc(stats.prompt_tokens)
            self.generation.labels(model, stats.decode_node).inc(stats.completion_tokens)
        if outcome not in FINISH_REASONS:
            return  # no whole record: no latencies, no transfer
        self.ttft.labels(model).observe(stats.ttft_s)
        self.e2e.labels(model).observe(stats.e2e_s)
        self.queue.labels(model).observe(stats.queue_s)
        self.prefill.labels(model, stats.prefill_node).observe(stats.prefill_s)
        self.queries.labels(stats.prefill_node).inc(stats.prompt_tokens)
        self.hits.labels(stats.prefill_node).inc(stats.cached_prefix_tokens)
        if stats.decode_node and not stats.colocated:
            link = (stats.prefill_node, stats.decode_node)
            self.transfer.labels(*link).observe(stats.transfer_s)
            self.exposed.labels(*link).observe(stats.exposed_transfer_s)
            self.kv_bytes.labels(*link, stats.kv_codec or "raw").inc(stats.kv_bytes)


class ClusterCollector(Collector):
    """The gauges (and worker counters) read at scrape time: the scheduler's
    queue and ledger, placements, every live node's last ``Stats``, the links."""

    def __init__(self, sample: Callable[[], ClusterSample], node_stats: Mapping[str, NodeStats]) -> None:
        self.sample, self.node_stats = sample, node_stats

    def collect(self) -> Iterator[Metric]:
        sample = self.sample()
        yield _gauge("num_requests_running", "Requests placed and not finished.", [], [((), sample.num_running)])
        yield _gauge("num_requests_waiting", "Requests waiting in the admission queue for room.", [],
                     [((), sample.num_waiting)])
        yield _counter("placements", "Placements made, by policy and mode (a request placed again counts again).",
                       ["policy", "mode"], sorted(sample.placements.items()))
        yield from _node_metrics(sample, self.node_stats)
        yield from _link_metrics(sample.links)


# (name, help, NodeStats field, counter?) of each per-node series taken from the node's last Stats reply
_STATS_SERIES = (
    ("node_num_requests_running", "Requests in the node's decode batch.", "running_requests", False),
    ("node_num_requests_active", "Prefill and Decode calls in progress on the node.", "active_requests", False),
    ("node_kv_leases_active", "KV reservations (leases) the node holds.", "active_leases", False),
    ("node_kv_reserved_bytes", "KV bytes the node's leases reserve.", "reserved_kv_bytes", False),
    ("node_kv_cache_usage_perc", "The node's kv_cache_usage_perc (0-1): KV reserved over its budget.",
     "kv_cache_usage_perc", False),
    ("node_requests", "Prefill and Decode calls the node received.", "requests_total", True),
    ("node_requests_failed", "Calls that failed on the node.", "requests_failed", True),
    ("node_requests_cancelled", "Calls cancelled on the node.", "requests_cancelled", True),
    ("node_kv_bytes_sent", "KV bytes the node sent.", "kv_bytes_sent", True),
    ("node_kv_bytes_received", "KV bytes the node received.", "kv_bytes_received", True),
    ("node_generation_tokens", "Tokens the node generated.", "tokens_generated", True),
    ("node_prefix_cache_hits", "Prefix-cache lookups on the node that reused a block.", "prefix_hits", True),
    ("node_prefix_cache_hit_tokens", "Prompt tokens the node's prefix cache spared from prefill.",
     "prefix_hit_tokens", True),
    ("node_prefix_cache_bytes", "Bytes the node's prefix cache holds.", "prefix_cache_bytes", False),
    ("node_prefix_cache_capacity_bytes", "The node's prefix cache bound.", "prefix_cache_capacity_bytes", False),
)


def _node_metrics(sample: ClusterSample, node_stats: Mapping[str, NodeStats]) -> Iterator[Metric]:
    """Per live node: its description, the ledger's count, and its last ``Stats`` (nodes polled at least once)."""
    nodes = sorted(sample.nodes, key=lambda n: n.node_id)
    yield _gauge("node_info", "1 for every live node, labelled with what it is.",
                 ["node", "roles", "engine", "model_name", "device", "hardware"],
                 [((n.node_id, "/".join(n.roles), n.engine, n.model_id, n.device, n.hardware), 1) for n in nodes])
    yield _gauge("node_free_memory_bytes", "Free memory the node advertised when it joined.", ["node"],
                 [((n.node_id,), n.free_mem_bytes) for n in nodes])
    yield _gauge("node_num_requests_placed", "Requests the scheduler counts on the node (prefilling or decoding).",
                 ["node"], [((n.node_id,), sample.placed.get(n.node_id, 0)) for n in nodes])
    polled = [(n.node_id, node_stats[n.node_id]) for n in nodes if n.node_id in node_stats]
    yield _gauge("node_stats_age_seconds", "Age of the node's last Stats reply (the node_* series below).",
                 ["node"], [((node,), max(0.0, sample.now - s.at)) for node, s in polled])
    for name, doc, attribute, is_counter in _STATS_SERIES:
        rows = [((node,), getattr(s, attribute)) for node, s in polled]
        yield (_counter if is_counter else _gauge)(name, doc, ["node"], rows)


def _link_metrics(links: tuple[LinkRecord, ...]) -> Iterator[Metric]:
    """Every measured prefill -> decode link (a failed probe leaves its link out)."""
    ok = sorted((r for r in links if r.ok), key=lambda r: (r.src, r.dst))
    yield _gauge("link_bandwidth_bytes_per_second", "Measured payload bandwidth of a prefill -> decode link.",
                 ["src", "dst"], [((r.src, r.dst), r.gbps * 1e9 / 8) for r in ok])
    yield _gauge("link_latency_seconds", "Measured one-way latency of a prefill -> decode link.", ["src", "dst"],
                 [((r.src, r.dst), r.latency_s) for r in ok])


def _gauge(name: str, doc: str, labels: list[str], rows: list[tuple[tuple[str, ...], float]]) -> Metric:
    family = GaugeMetricFamily(PREFIX + name, doc, labels=labels)
    for values, value in rows:
        family.add_metric(list(values), value)
    return family


def _counter(name: str, doc: str, labels: list[str], rows: list[tuple[tuple[str, ...], float]]) -> Metric:
    family = CounterMetricFamily(PREFIX + name, doc, labels=labels)
    for values, value in rows:
        family.add_metric(list(values), value)
    return family
