"""``/metrics``: the scheduler's and each worker's Prometheus series parse with
prometheus_client's own parser, and their counters say what the requests did.

Unit tests feed records, fake Stats replies and fake worker state; the
service-level test drives ``ClusterBackend.generate`` over fake workers (a
request that finishes, one that moves, one the client drops, one that fails);
the live test sends requests through the openai client to a real ``pdc up``
cluster (mDNS on 127.0.0.1 only) and checks both ``/metrics`` against the
``pdcluster`` records the responses carried.
"""
from __future__ import annotations

import asyncio
import contextlib
import time
import urllib.error
import urllib.request
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from types import SimpleNamespace

import pytest
from conftest import FakeBackend, FakePool, FakeTable, ServerThread, free_port, requires_torch_and_mlx
from prometheus_client.parser import text_string_to_metric_families

from cluster.auth import generate_key
from cluster.links import LinkRecord
from cluster.node import NodeInfo
from proto import pdcluster_pb2 as pb
from scheduler.lifecycle import LifecycleConfig
from scheduler.metrics import ClusterSample, SchedulerMetrics
from scheduler.request import GenerationRequest, RequestFailedError, RequestStats, TokenEvent
from scheduler.service import ClusterBackend, SchedulerConfig
from workers.rpc.metrics import MetricsServer, WorkerMetrics

Samples = dict[tuple[str, frozenset], float]


def parse(text: str | bytes) -> Samples:
    """Every sample of a scrape, by (name, labels), through prometheus_client's parser."""
    text = text.decode() if isinstance(text, bytes) else text
    return {(s.name, frozenset(s.labels.items())): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def total(samples: Samples, name: str, **labels: str) -> float:
    """The sum of ``name``'s samples whose labels include ``labels``."""
    return sum(v for (n, ls), v in samples.items() if n == name and set(labels.items()) <= ls)


def labelled(samples: Samples, name: str, label: str) -> dict[str, float]:
    """``name``'s samples by the value of one label (summed over the others)."""
    out: dict[str, float] = {}
    for (n, ls), v in samples.items():
        if n == name:
            key = dict(ls).get(label, "")
            out[key] = out.get(key, 0.0) + v
    return out


def scrape(metrics: SchedulerMetrics | WorkerMetrics) -> Samples:
    body, content_type = metrics.exposition()
    assert content_type.startswith("text/plain; version=0.0.4")
    return parse(body)


def _node(node_id: str, roles: tuple[str, ...] = ("prefill", "decode"), port: int = 50000) -> NodeInfo:
    return NodeInfo(node_id=node_id, roles=roles, engine="torch", model_id="tiny", weights_fingerprint="w",
                    host="127.0.0.1", grpc_port=port, kv_port=port + 1, device="cpu", tflops=1.0,
                    mem_bw_gbps=10.0, free_mem_bytes=123, version="0", key_fingerprint="k")


# ---------------------------------------------------------------- requests, from their records


def test_a_finished_request_counts_tokens_by_node_kv_bytes_by_link_and_its_latencies_once() -> None:
    metrics = SchedulerMetrics()
    remote = RequestStats(prefill_node="p", decode_node="d", kv_codec="int8", kv_bytes=5000, ttft_s=0.2,
                          e2e_s=1.0, queue_s=0.01, prefill_s=0.1, transfer_s=0.05, exposed_transfer_s=0.02,
                          prompt_tokens=100, cached_prefix_tokens=64, completion_tokens=9)
    local = RequestStats(prefill_node="d", decode_node="d", ttft_s=0.1, e2e_s=0.5, prompt_tokens=7,
                         completion_tokens=3)
    metrics.observe_request("tiny", "length", remote)
    metrics.observe_request("tiny", "stop", local)
    s = scrape(metrics)
    assert labelled(s, "pdcluster:prompt_tokens_total", "node") == {"p": 100, "d": 7}
    assert labelled(s, "pdcluster:generation_tokens_total", "node") == {"d": 12}
    assert s["pdcluster:kv_bytes_transferred_total", frozenset({("src", "p"), ("dst", "d"), ("codec", "int8")})] \
        == 5000
    assert total(s, "pdcluster:kv_bytes_transferred_total") == 5000  # the colocated one moved none
    assert total(s, "pdcluster:kv_transfer_seconds_count") == 1
    assert total(s, "pdcluster:kv_exposed_transfer_seconds_sum", src="p", dst="d") == pytest.approx(0.02)
    assert labelled(s, "pdcluster:request_success_total", "finished_reason") == {"length": 1, "stop": 1}
    assert total(s, "pdcluster:time_to_first_token_seconds_count", model_name="tiny") == 2
    assert total(s, "pdcluster:time_to_first_token_seconds_sum") == pytest.approx(0.3)
    assert total(s, "pdcluster:e2e_request_latency_seconds_sum") == pytest.approx(1.5)
    assert total(s, "pdcluster:request_prefill_time_seconds_count", node="p") == 1
    assert labelled(s, "pdcluster:prefix_cache_queries_total", "node") == {"p": 100, "d": 7}
    assert labelled(s, "pdcluster:prefix_cache_hits_total", "node") == {"p": 64, "d": 0}
    # a histogram's buckets are cumulative: 0.2 s lands in le=0.25 and every bucket above
    assert total(s, "pdcluster:time_to_first_token_seconds_bucket", le="0.1") == 1
    assert total(s, "pdcluster:time_to_first_token_seconds_bucket", le="0.25") == 2


def test_an_abort_or_failure_counts_what_was_sent_but_no_latencies() -> None:
    metrics = SchedulerMetrics()
    metrics.observe_request("tiny", "abort", RequestStats(prefill_node="d", decode_node="d", prompt_tokens=10,
                                                          completion_tokens=4))
    metrics.observe_request("tiny", "no_capacity", RequestStats(prompt_tokens=10))  # never ran: no tokens
    s = scrape(metrics)
    assert labelled(s, "pdcluster:request_success_total", "finished_reason") == {"abort": 1}
    assert labelled(s, "pdcluster:request_failure_total", "code") == {"no_capacity": 1}
    assert labelled(s, "pdcluster:prompt_tokens_total", "node") == {"d": 10}
    assert labelled(s, "pdcluster:generation_tokens_total", "node") == {"d": 4}
    assert total(s, "pdcluster:time_to_first_token_seconds_count") == 0
    assert total(s, "pdcluster:prefix_cache_queries_total") == 0


def test_each_scheduler_keeps_its_own_registry() -> None:
    one, two = SchedulerMetrics(), SchedulerMetrics()  # the same names twice: no "Duplicated timeseries"
    one.observe_request("tiny", "stop", RequestStats(prefill_node="a", decode_node="a", completion_tokens=5))
    assert total(scrape(one), "pdcluster:generation_tokens_total") == 5
    assert total(scrape(two), "pdcluster:generation_tokens_total") == 0


# ---------------------------------------------------------------- the cluster-wide view


def test_the_cluster_view_shows_live_nodes_their_last_stats_the_links_and_the_queue() -> None:
    nodes = (_node("a"), _node("b", ("decode",), 50010))
    links = (LinkRecord("a", "b", gbps=8.0, latency_s=0.001, measured_at=1.0),
             LinkRecord("b", "a", error="refused"))  # a failed probe: no figures
    sample = ClusterSample(nodes=nodes, links=links, num_running=3, num_waiting=2, placed={"a": 1, "b": 2},
                           placements={("conditional", "colocated"): 4, ("conditional", "disaggregated"): 1},
                           now=100.0)
    metrics = SchedulerMetrics(lambda: sample)
    reply = pb.StatsReply(running_requests=2, active_requests=3, reserved_kv_bytes=4096, kv_bytes_received=777,
                          tokens_generated=50, prefix_hits=2, prefix_hit_tokens=128, active_leases=1,
                          kv_cache_usage_perc=0.25)
    metrics.record_stats("b", reply, at=97.5)
    metrics.record_stats("gone", reply, at=97.5)  # not in the table any more: not shown
    s = scrape(metrics)
    assert total(s, "pdcluster:num_requests_running") == 3 and total(s, "pdcluster:num_requests_waiting") == 2
    assert total(s, "pdcluster:placements_total", policy="conditional", mode="colocated") == 4
    assert total(s, "pdcluster:placements_total", mode="disaggregated") == 1
    assert labelled(s, "pdcluster:node_info", "node") == {"a": 1, "b": 1}
    assert total(s, "pdcluster:node_info", node="b", roles="decode", engine="torch", model_name="tiny") == 1
    assert labelled(s, "pdcluster:node_num_requests_placed", "node") == {"a": 1, "b": 2}
    assert labelled(s, "pdcluster:node_free_memory_bytes", "node") == {"a": 123, "b": 123}
    assert labelled(s, "pdcluster:node_stats_age_seconds", "node") == {"b": 2.5}  # a was never polled
    assert labelled(s, "pdcluster:node_num_requests_running", "node") == {"b": 2}
    assert labelled(s, "pdcluster:node_kv_reserved_bytes", "node") == {"b": 4096}
    assert labelled(s, "pdcluster:node_kv_cache_usage_perc", "node") == {"b": 0.25}  # a float, as the node sent it
    assert labelled(s, "pdcluster:node_kv_bytes_received_total", "node") == {"b": 777}
    assert labelled(s, "pdcluster:node_generation_tokens_total", "node") == {"b": 50}
    assert labelled(s, "pdcluster:node_prefix_cache_hit_tokens_total", "node") == {"b": 128}
    assert s["pdcluster:link_bandwidth_bytes_per_second", frozenset({("src", "a"), ("dst", "b")})] == 1e9
    assert labelled(s, "pdcluster:link_latency_seconds", "src") == {"a": 0.001}
    metrics.forget("b")
    assert "b" not in labelled(scrape(metrics), "pdcluster:node_stats_age_seconds", "node")


# ---------------------------------------------------------------- the live scheduler, over fake workers


class _Worker:
    """A fake worker: tokens 1000 + step. ``faults`` (shared by every fake worker):
    ``{"die_after": n}`` makes the next Decode anywhere fail UNAVAILABLE after n tokens."""

    def __init__(self, faults: dict) -> None:
        self.faults = faults

    async def decode(self, request: pb.DecodeRequest, timeout: float) -> AsyncIterator[pb.DecodeEvent]:
        import grpc
        from grpc import aio

        die_after = self.faults.pop("die_after", None)
        for i in range(request.sampling.max_tokens):
            if die_after is not None and i == die_after:
                raise aio.AioRpcError(grpc.StatusCode.UNAVAILABLE, aio.Metadata(), aio.Metadata(), "gone")
            await asyncio.sleep(0.001)
            yield pb.DecodeEvent(token=pb.Token(token_id=1000 + request.first_step + i, index=i))
        timings = pb.Timings(prompt_tokens=len(request.prompt_token_ids), completion_tokens=request.sampling.max_tokens)
        yield pb.DecodeEvent(done=pb.Done(finish_reason="length", timings=timings))

    async def cancel(self, request_id: str, timeout: float) -> bool:
        return True


def _backend(workers: dict[str, _Worker]) -> ClusterBackend:
    lifecycle = LifecycleConfig(request_timeout_s=10, prefill_timeout_s=5, cancel_timeout_s=1)
    backend = ClusterBackend(SchedulerConfig(mdns=False, policy="least-loaded", lifecycle=lifecycle),
                             generate_key())
    backend.table = FakeTable([_node(n, port=50000 + 10 * i) for i, n in enumerate(workers)])
    backend.clients = FakePool(workers)
    return backend


def test_the_service_observes_each_request_once_however_it_ends() -> None:
    faults: dict = {}
    backend = _backend({"a": _Worker(faults), "b": _Worker(faults)})

    def request(rid: str, max_tokens: int) -> GenerationRequest:
        return GenerationRequest(rid, "tiny", (5, 6, 7), max_tokens=max_tokens, placement="colocated",
                                 arrived_at=time.monotonic())

    async def body() -> None:
        async for _ in backend.generate(request("whole", 6)):
            pass
        faults["die_after"] = 2  # it moves once
        async for _ in backend.generate(request("moved", 6)):
            pass
        events = backend.generate(request("dropped", 50))
        async with contextlib.aclosing(events):  # the client goes away after 3 tokens
            for _ in range(3):
                assert isinstance(await anext(events), TokenEvent)
        backend.table.nodes = [backend.table.nodes[0]]
        backend.table.suspended.clear()
        faults["die_after"] = 1  # and no node is left to move to
        with pytest.raises(RequestFailedError):
            async for _ in backend.generate(request("failed", 6)):
                pass

    asyncio.run(asyncio.wait_for(body(), 30))
    s = scrape(backend.metrics)
    assert labelled(s, "pdcluster:request_success_total", "finished_reason") == {"length": 2, "abort": 1}
    assert labelled(s, "pdcluster:request_failure_total", "code") == {"worker_failed": 1}
    assert total(s, "pdcluster:generation_tokens_total") == 6 + 6 + 3 + 1  # every token sent, whatever the end
    assert total(s, "pdcluster:prompt_tokens_total") == 4 * 3
    assert total(s, "pdcluster:time_to_first_token_seconds_count") == 2  # finished requests only
    assert total(s, "pdcluster:inter_token_latency_seconds_count") == 5 + 5 + 2 + 0  # gaps between tokens sent
    # a placement per attempt: 1 + (1 + the move) + 1 + 1
    assert total(s, "pdcluster:placements_total", policy="least-loaded", mode="colocated") == 5
    assert total(s, "pdcluster:num_requests_running") == 0 and total(s, "pdcluster:num_requests_waiting") == 0


def test_metrics_follow_the_api_key_rule_of_health_details(codec) -> None:
    metrics = SchedulerMetrics()
    metrics.observe_request("tiny", "stop", RequestStats(prefill_node="a", decode_node="a", completion_tokens=2))
    from scheduler.api import build_app

    keyed = ServerThread(build_app(FakeBackend(codec), api_key="sesame", metrics=metrics.exposition))
    bare = ServerThread(build_app(FakeBackend(codec)))
    try:
        assert _get(keyed.url + "/metrics")[0] == 401
        assert _get(keyed.url + "/metrics", "wrong")[0] == 401
        status, body, content_type = _get(keyed.url + "/metrics", "sesame")
        assert status == 200 and content_type.startswith("text/plain")
        assert total(parse(body), "pdcluster:generation_tokens_total") == 2
        assert _get(bare.url + "/metrics")[0] == 404  # an app built without metrics has none
    finally:
        keyed.stop()
        bare.stop()


def _get(url: str, key: str | None = None) -> tuple[int, bytes, str]:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    try:
        with urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=10) as reply:
            return reply.status, reply.read(), reply.headers.get("Content-Type", "")
    except urllib.error.HTTPError as e:
        return e.code, e.read(), e.headers.get("Content-Type", "")


# ---------------------------------------------------------------- a worker's own /metrics


def _worker_state(*, budget: int | None) -> SimpleNamespace:
    leases = SimpleNamespace(max_reserved_bytes=budget, reserved_bytes=250, num_active=1, max_leases=4,
                             num_expired=2, usage=250 / budget if budget else 1 / 4)  # LeaseTable.usage's rule
    counters = SimpleNamespace(kv_bytes_sent=10, kv_bytes_received=20, tokens_generated=30, requests_total=4,
                               requests_failed=1, requests_cancelled=0)
    cache = SimpleNamespace(capacity_bytes=1000, nbytes=100)
    return SimpleNamespace(loop=SimpleNamespace(num_running=1), leases=leases, counters=counters,
                           active={("r1", "decode"): 1, ("r2", "prefill"): 1, ("r3", "decode"): 1},
                           prefix_cache=cache)


def test_a_worker_observes_completed_calls_and_reads_its_state_at_scrape_time() -> None:
    state = _worker_state(budget=1000)
    metrics = WorkerMetrics("w1", state)
    prefill = pb.PrefillRequest(request_id="r", prompt_token_ids=list(range(100)))
    metrics.observe_prefill(prefill, pb.PrefillReply(prefill_s=0.2, queue_s=0.01, cached_tokens=64))
    remote = pb.DecodeRequest(request_id="r", prompt_token_ids=list(range(100)))
    metrics.observe_done(remote, pb.Done(finish_reason="stop", timings=pb.Timings(
        transfer_s=0.03, exposed_transfer_s=0.01, prefill_s=9.0, decode_cached_tokens=0)))
    local = pb.DecodeRequest(request_id="q", prompt_token_ids=list(range(10)), local_prefill=True)
    metrics.observe_done(local, pb.Done(finish_reason="length", timings=pb.Timings(prefill_s=0.05)))
    s = scrape(metrics)
    assert {dict(ls)["node"] for (_, ls) in s if "node" in dict(ls)} == {"w1"}  # every series names its node
    assert total(s, "pdcluster:request_prefill_time_seconds_count") == 2  # the prefill and the local one
    assert total(s, "pdcluster:request_prefill_time_seconds_sum") == pytest.approx(0.25)  # not the remote 9 s
    assert total(s, "pdcluster:kv_transfer_seconds_count") == 1
    assert total(s, "pdcluster:prompt_tokens_total") == 110
    assert total(s, "pdcluster:prefix_cache_queries_total") == 210 and total(s, "pdcluster:prefix_cache_hits_total") == 64
    assert labelled(s, "pdcluster:request_success_total", "finished_reason") == {"stop": 1, "length": 1}
    assert total(s, "pdcluster:num_requests_running") == 1 and total(s, "pdcluster:num_requests_waiting") == 2
    assert total(s, "pdcluster:kv_cache_usage_perc") == 0.25 and total(s, "pdcluster:kv_budget_bytes") == 1000
    assert total(s, "pdcluster:kv_bytes_sent_total") == 10 and total(s, "pdcluster:kv_bytes_received_total") == 20
    assert total(s, "pdcluster:generation_tokens_total") == 30 and total(s, "pdcluster:kv_leases_expired_total") == 2
    state.loop.num_running = 3  # read at scrape time
    assert total(scrape(metrics), "pdcluster:num_requests_running") == 3
    unbudgeted = scrape(WorkerMetrics("w2", _worker_state(budget=None)))
    assert total(unbudgeted, "pdcluster:kv_cache_usage_perc") == 0.25  # 1 lease of 4
    assert ("pdcluster:kv_budget_bytes", frozenset({("node", "w2")})) not in unbudgeted


def test_a_worker_serves_metrics_on_a_free_port_and_a_taken_port_is_refused() -> None:
    metrics = WorkerMetrics("w1", _worker_state(budget=None))

    async def body() -> None:
        server = MetricsServer(metrics, "127.0.0.1", 0)
        await server.start()
        try:
            assert server.port > 0
            status, text, _ = await asyncio.to_thread(_get, f"http://127.0.0.1:{server.port}/metrics")
            assert status == 200 and total(parse(text), "pdcluster:generation_tokens_total", node="w1") == 30
            taken = MetricsServer(metrics, "127.0.0.1", server.port)
            with pytest.raises(OSError):
                await taken.start()
        finally:
            await server.stop()

    asyncio.run(asyncio.wait_for(body(), 30))


# ---------------------------------------------------------------- a real `pdc up` cluster

LONG_PROMPT = "Tell me about caches. " * 40  # several 64-token blocks: the second time, a prefix cache hit
LIVE_REQUESTS = (("disaggregated", LONG_PROMPT, False), ("disaggregated", LONG_PROMPT, True),
                 ("colocated", "Say hello.", False), ("colocated", LONG_PROMPT, True),
                 ("disaggregated", "Count to three.", False))


def _until(check: Callable[[], bool], what: str, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.2)


@requires_torch_and_mlx
def test_pdc_up_metrics_match_what_the_requests_did(make_tiny_model: Callable[..., Path]) -> None:
    import openai

    from cluster.launcher import LocalCluster, UpConfig

    declared = ("--tflops", "1", "--mem-bw-gbps", "100", "--dtype", "float32")  # no start-up measurement
    cluster = LocalCluster(UpConfig(model=str(make_tiny_model("llama")), port=free_port(), decode_engine="mlx",
                                    extra_worker_args=declared))
    cluster.start()
    try:
        cluster.wait_ready(120)
        client = openai.OpenAI(base_url=cluster.url + "/v1", api_key="unused", timeout=60, max_retries=0)
        model = client.models.list().data[0].id
        records = [_ask(client, model, mode, prompt, stream) for mode, prompt, stream in LIVE_REQUESTS]
        assert [r["colocated"] for r in records] == [mode == "colocated" for mode, _, _ in LIVE_REQUESTS]
        assert sum(r["cached_prefix_tokens"] + r["decode_cached_tokens"] for r in records) > 0  # a cache was hit
        status, body, _ = _get(cluster.url + "/metrics")
        assert status == 200
        _check_scheduler(parse(body), records, model)
        urls = cluster.worker_metrics_urls()
        assert set(urls) == {"prefill-worker", "decode-worker"}, cluster.log_tails()
        _check_workers(parse(_get(urls["prefill-worker"])[1]), parse(_get(urls["decode-worker"])[1]), records)
        # the scheduler's per-node series come from its Stats poll (every 5 s), the link's from its
        # probe in the background: both catch up
        link = {"src": records[0]["prefill_node"], "dst": records[0]["decode_node"]}
        generated = sum(r["completion_tokens"] for r in records)

        def caught_up() -> bool:
            s = parse(_get(cluster.url + "/metrics")[1])
            return (total(s, "pdcluster:node_generation_tokens_total", node=link["dst"]) == generated
                    and total(s, "pdcluster:link_bandwidth_bytes_per_second", **link) > 0)

        _until(caught_up, "the nodes' Stats and the measured link in the scheduler's /metrics")
    finally:
        cluster.stop()


def _ask(client, model: str, mode: str, prompt: str, stream: bool) -> dict:
    """One chat request; the ``pdcluster`` record its response carried."""
    fields = dict(model=model, messages=[{"role": "user", "content": prompt}], max_tokens=8, temperature=0,
                  extra_body={"pdcluster": {"placement": mode}})
    if not stream:
        return client.chat.completions.create(**fields).model_extra["pdcluster"]
    chunks = list(client.chat.completions.create(**fields, stream=True, stream_options={"include_usage": True}))
    return chunks[-1].model_extra["pdcluster"]


def _check_scheduler(s: Samples, records: list[dict], model: str) -> None:
    def by(node_key: str, value_key: str) -> dict[str, float]:
        out: dict[str, float] = {}
        for r in records:
            out[r[node_key]] = out.get(r[node_key], 0) + r[value_key]
        return out

    remote = [r for r in records if not r["colocated"]]
    assert total(s, "pdcluster:request_success_total", model_name=model) == len(records)
    assert labelled(s, "pdcluster:prompt_tokens_total", "node") == by("prefill_node", "prompt_tokens")
    assert labelled(s, "pdcluster:generation_tokens_total", "node") == by("decode_node", "completion_tokens")
    assert total(s, "pdcluster:kv_bytes_transferred_total") == sum(r["kv_bytes"] for r in remote) > 0
    link = {"src": remote[0]["prefill_node"], "dst": remote[0]["decode_node"]}
    assert total(s, "pdcluster:kv_bytes_transferred_total", **link) == sum(r["kv_bytes"] for r in remote)
    assert total(s, "pdcluster:kv_transfer_seconds_count", **link) == len(remote)
    assert total(s, "pdcluster:placements_total", policy="conditional", mode="disaggregated") == len(remote)
    assert total(s, "pdcluster:placements_total", mode="colocated") == len(records) - len(remote)
    assert total(s, "pdcluster:time_to_first_token_seconds_count") == len(records)
    assert total(s, "pdcluster:time_to_first_token_seconds_sum") == pytest.approx(
        sum(r["ttft_s"] for r in records), abs=1e-4)
    assert total(s, "pdcluster:inter_token_latency_seconds_count") == sum(r["completion_tokens"] - 1 for r in records)
    assert labelled(s, "pdcluster:prefix_cache_queries_total", "node") == by("prefill_node", "prompt_tokens")
    assert labelled(s, "pdcluster:prefix_cache_hits_total", "node") == by("prefill_node", "cached_prefix_tokens")
    assert total(s, "pdcluster:num_requests_running") == 0 and total(s, "pdcluster:num_requests_waiting") == 0
    assert set(labelled(s, "pdcluster:node_info", "node")) == {link["src"], link["dst"]}


def _check_workers(prefill: Samples, decode: Samples, records: list[dict]) -> None:
    remote = [r for r in records if not r["colocated"]]
    kv_bytes = sum(r["kv_bytes"] for r in remote)
    assert total(prefill, "pdcluster:kv_bytes_sent_total") == kv_bytes
    assert total(decode, "pdcluster:kv_bytes_received_total") == kv_bytes
    assert total(prefill, "pdcluster:prompt_tokens_total") == sum(r["prompt_tokens"] for r in remote)
    assert total(prefill, "pdcluster:request_prefill_time_seconds_count") == len(remote)
    assert total(prefill, "pdcluster:prefix_cache_hits_total") == sum(r["cached_prefix_tokens"] for r in remote)
    assert total(decode, "pdcluster:request_prefill_time_seconds_count") == len(records) - len(remote)
    assert total(decode, "pdcluster:kv_transfer_seconds_count") == len(remote)
    assert total(decode, "pdcluster:generation_tokens_total") == sum(r["completion_tokens"] for r in records)
    assert total(decode, "pdcluster:request_success_total") == len(records)
    assert total(decode, "pdcluster:prefix_cache_queries_total") == sum(r["prompt_tokens"] for r in records)
    assert total(decode, "pdcluster:prefix_cache_hits_total") == sum(r["decode_cached_tokens"] for r in records)
    for samples in (prefill, decode):
        assert total(samples, "pdcluster:num_requests_running") == 0
        assert total(samples, "pdcluster:kv_cache_usage_perc") == 0  # every lease freed
