"""The live scheduler's view: what a policy sees in ``pdc serve``.

Two real in-process workers (MLX, gRPC and KV ports on 127.0.0.1) and a
``ClusterBackend`` that finds them through static peers: the view must carry
the declared profiles, the link the prefill node measured to the decode node,
the model's config.json, and per-node load counted as the simulator counts it.
"""
from __future__ import annotations

import asyncio
import gc
import json
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from conftest import GatedEngine, config, have, run, started

from cluster.auth import generate_key
from scheduler.placement import ClusterView, Placement
from scheduler.request import (
    FinishEvent,
    GenerationRequest,
    NoCapacityError,
    TokenEvent,
)
from scheduler.service import ClusterBackend, SchedulerConfig
from workers.rpc.server import Worker

pytestmark = pytest.mark.skipif(not have("mlx.core"), reason="needs the mlx extra (decode engine)")

PROMPT = tuple((5 * i + 1) % 500 + 10 for i in range(200))


@pytest.fixture(scope="module")
def model(make_tiny_model: Callable[..., Path]) -> Path:
    return make_tiny_model("llama")


async def _until(predicate: Callable[[], bool], what: str, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.05)


def _spark_and_mac(model: Path, key) -> tuple[Worker, Worker]:
    """A prefill-only node declared as a dgx-spark, and a node with both roles
    declared at 1 TFLOPS / 100 GB/s (in-process MLX workers)."""
    return (Worker(config(model, key, "prefill", tflops=0.0, mem_bw_gbps=0.0, hardware="dgx-spark")),
            Worker(config(model, key, "both")))


def _scheduler(key, *workers: Worker, **overrides) -> ClusterBackend:
    fields = {"mdns": False, "health_interval_s": 0.2, "peers": tuple(w.grpc_address for w in workers), **overrides}
    return ClusterBackend(SchedulerConfig(**fields), key)


async def _ready(backend: ClusterBackend, model_id: str) -> None:
    await _until(lambda: backend.codec_for(model_id) is not None, "the model's tokenizer")
    await _until(lambda: ("test-prefill", "test-both") in backend.links.views(), "the link probe")


def test_the_live_view_carries_profiles_the_measured_link_and_the_config(model: Path) -> None:
    key = generate_key()
    spark, mac = _spark_and_mac(model, key)

    async def body() -> None:
        async with started(spark, mac):
            backend = _scheduler(key, spark, mac)
            await backend.start()
            try:
                await _ready(backend, model.name)
                view = backend.cluster_view(model.name, backend.table.snapshot())
                link = view.link("test-prefill", "test-both")
                assert link.gbps > 0 and link.latency_s >= 0
                assert view.link("test-both", "test-prefill") is None  # the prefill-only node cannot decode
                assert view.model_config == json.loads((model / "config.json").read_text())
                assert view.kv_dtype == "float32"  # the workers' engines' dtype, from their Info replies
                s, m = view.node("test-prefill"), view.node("test-both")
                assert (s.hardware, s.tflops, s.mem_bw_gbps, s.measured) == ("dgx-spark", 125.0, 273.0, False)
                assert (m.hardware, m.tflops, m.measured) == ("", 1.0, False)
                assert m.device_kind and s.device_kind
                ready, health = backend.health()
                assert ready and health["policy"] == "conditional"
                [row] = health["links"]
                assert (row["prefill_node"], row["decode_node"], row["error"]) == ("test-prefill", "test-both", None)
                assert {n["node_id"]: n["hardware"] for n in health["nodes"]}["test-prefill"] == "dgx-spark"
                backend.on_node_change("test-prefill", None)  # the node leaves: its links go with it
                assert backend.links.views() == {}
            finally:
                await backend.stop()

    run(body)


def test_load_is_counted_as_the_simulator_counts_it(model: Path) -> None:
    # A remote prefill node carries a request (and its predicted prefill time as
    # backlog) until its prefill ends; the decode node until the request ends.
    from workers.engines.mlx_engine import MLXEngine

    key = generate_key()
    entered, gate = threading.Event(), threading.Event()
    spark = Worker(config(model, key, "prefill", tflops=0.0, mem_bw_gbps=0.0, hardware="dgx-spark"),
                   engine_factory=lambda: GatedEngine(MLXEngine(model, dtype="float32"), entered, gate))
    mac = Worker(config(model, key, "both"))
    seen: list[ClusterView] = []

    class Remote:
        def place(self, request: GenerationRequest, cluster: ClusterView) -> Placement:
            seen.append(cluster)
            return Placement("test-prefill", "test-both")

    async def body() -> None:
        async with started(spark, mac):
            backend = _scheduler(key, spark, mac)
            await backend.start()
            try:
                await _ready(backend, model.name)
                backend.dispatcher.use(Remote(), "Remote")
                ledger = backend.dispatcher.ledger
                one = backend.generate(GenerationRequest("live-1", model.name, PROMPT, max_tokens=12))
                first = asyncio.ensure_future(anext(one))
                await _until(entered.is_set, "the first prefill to start")
                assert ledger.active_counts() == {"test-prefill": 1, "test-both": 1}
                queued = ledger.prefill_backlog_s("test-prefill")
                assert queued > 0  # the cost model's prefill time for 200 tokens on a dgx-spark

                two = backend.generate(GenerationRequest("live-2", model.name, PROMPT, max_tokens=4))
                second = asyncio.ensure_future(anext(two))
                await _until(lambda: len(seen) == 2, "the second placement")
                busy = seen[1].node("test-prefill")
                assert (busy.active_requests, busy.prefill_backlog_s) == (1, queued)
                assert seen[1].node("test-both").active_requests == 1

                gate.set()
                assert isinstance(await first, TokenEvent)
                await second
                await _until(lambda: ledger.active_requests("test-prefill") == 0, "both prefills to end")
                assert ledger.active_requests("test-both") >= 1  # still decoding
                assert ledger.prefill_backlog_s("test-prefill") == pytest.approx(0.0, abs=1e-12)
                rest = [e async for e in one] + [e async for e in two]
                assert [e.stats.prefill_node for e in rest if isinstance(e, FinishEvent)] == ["test-prefill"] * 2
                assert ledger.active_counts() == {} and len(ledger) == 0  # every node back to 0
                # both records taught the calibration (scheduler/calibration.py): the decode node's fixed
                # TTFT term; not the prefill scale, since a dgx-spark's 200 tokens price under its 10 ms floor
                served = {n["node_id"]: n["served"] for n in backend.health()[1]["nodes"]}
                assert served["test-both"]["samples"] == {"overhead:disaggregated": 2}
                assert served["test-prefill"]["prefill_scale"] == {} and served["test-prefill"]["enabled"]
            finally:
                gate.set()
                await backend.stop()

    run(body)


def test_a_failing_or_misplacing_policy_fails_only_its_request_with_a_clear_error(model: Path) -> None:
    key = generate_key()
    spark, mac = _spark_and_mac(model, key)

    class Broken:
        def place(self, request: GenerationRequest, cluster: ClusterView) -> Placement:
            raise KeyError("oops")

    class DecodeOnPrefillOnly:
        def place(self, request: GenerationRequest, cluster: ClusterView) -> Placement:
            return Placement(None, "test-prefill")

    async def body() -> None:
        async with started(spark, mac):
            backend = _scheduler(key, spark, mac)
            await backend.start()
            try:
                await _ready(backend, model.name)
                backend.dispatcher.use(Broken(), "broken.py:Broken")
                with pytest.raises(NoCapacityError, match=r"'broken.py:Broken' failed on bad: KeyError"):
                    await anext(backend.generate(GenerationRequest("bad", model.name, PROMPT, max_tokens=2)))
                assert backend.dispatcher.ledger.active_counts() == {} and len(backend.dispatcher.ledger) == 0
                backend.dispatcher.use(DecodeOnPrefillOnly(), "misplaced.py:Rule")  # refused before dispatch
                with pytest.raises(NoCapacityError, match=r"'misplaced.py:Rule' returned .*'test-prefill' lacks "
                                                          r"the 'decode' role"):
                    await anext(backend.generate(GenerationRequest("mis", model.name, PROMPT, max_tokens=2)))
                assert len(backend.dispatcher.ledger) == 0
                backend.admin.switch_policy("conditional")
                events = [e async for e in backend.generate(GenerationRequest("ok", model.name, PROMPT, max_tokens=3))]
                assert isinstance(events[-1], FinishEvent) and events[-1].stats.completion_tokens == 3
            finally:
                await backend.stop()

    run(body)


def test_a_user_policy_file_runs_live_unchanged(model: Path) -> None:
    # The same file `pdc simulate --policy` runs (tests/test_simulate.py), loaded
    # as `pdc serve --policy FILE:Class` loads it, over real workers and a probed link.
    from scheduler.policy import load_policy

    plugin = f"{Path(__file__).resolve().parent.parent / 'examples' / 'policies' / 'streaming_rule.py'}:StreamingRule"
    key = generate_key()
    spark, mac = _spark_and_mac(model, key)

    async def body() -> None:
        async with started(spark, mac):
            backend = _scheduler(key, spark, mac, policy=plugin)
            await backend.start()
            try:
                await _ready(backend, model.name)
                assert type(backend.dispatcher.policy).__name__ == "StreamingRule"
                assert backend.health()[1]["policy"] == plugin
                request = GenerationRequest("plugin", model.name, PROMPT, max_tokens=3)
                expected = load_policy(plugin).place(request, backend.cluster_view(model.name, backend.table.snapshot()))
                events = [e async for e in backend.generate(request)]
                stats = events[-1].stats
                assert (stats.prefill_node, stats.decode_node) == (expected.prefill_node or "test-both", "test-both")
                assert stats.completion_tokens == 3
            finally:
                await backend.stop()

    run(body)


def test_closing_a_request_cancels_it_on_the_workers_before_close_returns(model: Path,
                                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    # A client that goes away closes our generator; the workers must hear about it
    # then, not whenever the garbage collector finalizes the request's generator.
    from workers.rpc.client import WorkerClient

    key = generate_key()
    spark, mac = _spark_and_mac(model, key)
    cancels: list[tuple[str, str]] = []
    real_cancel = WorkerClient.cancel

    async def recording_cancel(self: WorkerClient, request_id: str, timeout: float | None = None) -> bool:
        cancels.append((self.address, request_id))
        return await real_cancel(self, request_id, timeout)

    monkeypatch.setattr(WorkerClient, "cancel", recording_cancel)

    class Remote:
        def place(self, request: GenerationRequest, cluster: ClusterView) -> Placement:
            return Placement("test-prefill", "test-both")

    async def body() -> None:
        async with started(spark, mac) as (_, decoder):
            backend = _scheduler(key, spark, mac)
            await backend.start()
            try:
                await _ready(backend, model.name)
                backend.dispatcher.use(Remote(), "Remote")
                events = backend.generate(GenerationRequest("gone", model.name, PROMPT, max_tokens=300))
                assert isinstance(await anext(events), TokenEvent)
                gc.disable()  # no help from the collector
                try:
                    await events.aclose()
                    assert sorted(cancels) == sorted([(spark.grpc_address, "gone"), (mac.grpc_address, "gone")])
                finally:
                    gc.enable()
                assert backend.dispatcher.ledger.active_counts() == {} and len(backend.dispatcher.ledger) == 0
                deadline = time.monotonic() + 10
                while (stats := await decoder.stats()).active_requests and time.monotonic() < deadline:
                    await asyncio.sleep(0.05)
                assert (stats.requests_cancelled, stats.active_requests, stats.active_leases) == (1, 0, 0)
            finally:
                await backend.stop()

    run(body)
