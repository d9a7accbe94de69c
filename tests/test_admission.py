"""Admission control: the queue on its own (bound, FIFO, wake-ups, timeout, cancellation,
Retry-After), the scheduler placing again what no node could take (fake workers that
refuse past their leases), the 429/503 HTTP shapes (the openai client and raw aiohttp),
and a real local cluster driven past its capacity (``slow``)."""
from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import aiohttp
import grpc
import openai
import pytest
from conftest import (
    MODEL,
    READY_S,
    FakeBackend,
    FakePool,
    FakeTable,
    SchedulerProcess,
    ServerThread,
    assert_nothing_held,
    requires_torch_and_mlx,
    start_worker_process,
    stop_processes,
)
from grpc import aio

from cluster.auth import generate_key
from cluster.node import NodeInfo
from proto import pdcluster_pb2 as pb
from scheduler.admission import (
    AdmissionConfig,
    AdmissionQueue,
    NoRoomError,
    nodes_with_room,
)
from scheduler.api import build_app
from scheduler.lifecycle import LifecycleConfig
from scheduler.request import (
    CapacityExhaustedError,
    FinishEvent,
    GenerationRequest,
    NoCapacityError,
    RequestStats,
    TokenEvent,
)
from scheduler.service import ClusterBackend, SchedulerConfig
from scheduler.tokenizer import PromptCodec

BOUND_S = 20.0  # an outer bound on every async test body


def run(body: Callable[[], object], timeout: float = BOUND_S) -> object:
    return asyncio.run(asyncio.wait_for(body(), timeout))


class FakeClock:
    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


async def settle() -> None:
    """Let every ready task run (a few loop turns)."""
    for _ in range(5):
        await asyncio.sleep(0)


# ---------------------------------------------------------------- the queue on its own


def test_the_queue_refuses_past_its_bound_with_a_429_and_retry_after() -> None:
    async def body() -> None:
        queue = AdmissionQueue(AdmissionConfig(max_queued=2, queue_timeout_s=5))
        queue.join("m", "full"), queue.join("m", "full")
        with pytest.raises(CapacityExhaustedError) as err:
            queue.join("m", "decode on d0 failed: the node is full")
        assert err.value.status == 429 and err.value.code == "capacity_exhausted"
        assert "admission queue is full (2 requests waiting; pdc serve --max-queued 2)" in err.value.message
        assert "decode on d0 failed: the node is full" in err.value.message
        assert err.value.retry_after_s >= 1
        queue.join("m", "moving", running=True)  # a running stream is never refused by the bound
        assert len(queue) == 3 and queue.num_refused_full == 1

    run(body)


def test_a_queue_of_zero_refuses_every_waiter_at_once() -> None:
    queue = AdmissionQueue(AdmissionConfig(max_queued=0))
    with pytest.raises(CapacityExhaustedError, match=r"requests do not wait \(pdc serve --max-queued 0\)"):
        queue.join("m", "full")


def test_waiters_are_woken_in_arrival_order_one_release_each() -> None:
    async def body() -> None:
        queue = AdmissionQueue(AdmissionConfig(queue_timeout_s=10, recheck_s=5))
        order: list[int] = []
        tickets = [queue.join("m", "full") for _ in range(4)]

        async def waiter(i: int) -> None:
            await queue.wait(tickets[i])
            order.append(i)
            queue.leave(tickets[i])

        tasks = [asyncio.ensure_future(waiter(i)) for i in (3, 1, 0, 2)]  # they start waiting out of order
        await settle()
        for expected in range(1, 5):
            queue.released("m")
            await settle()
            assert order == list(range(expected))  # exactly one more, the oldest
        await asyncio.gather(*tasks)

    run(body)


def test_a_release_wakes_only_its_own_model_and_a_node_change_wakes_every_model() -> None:
    async def body() -> None:
        queue = AdmissionQueue(AdmissionConfig(queue_timeout_s=10, recheck_s=5))
        a, b, b2 = queue.join("a", "full"), queue.join("b", "full"), queue.join("b", "full")
        woken: list[str] = []

        async def waiter(name: str, ticket) -> None:
            await queue.wait(ticket)
            woken.append(name)

        tasks = [asyncio.ensure_future(waiter(n, t)) for n, t in (("a", a), ("b", b), ("b2", b2))]
        await settle()
        queue.released("b")
        await settle()
        assert woken == ["b"]
        queue.changed()
        await settle()
        assert sorted(woken) == ["a", "b", "b2"]
        await asyncio.gather(*tasks)

    run(body)


def test_an_admitted_waiter_passes_the_turn_to_the_next() -> None:
    async def body() -> None:
        queue = AdmissionQueue(AdmissionConfig(queue_timeout_s=10, recheck_s=5))
        first, second = queue.join("m", "full"), queue.join("m", "full")
        waits = [asyncio.ensure_future(queue.wait(t)) for t in (first, second)]
        await settle()
        queue.released("m")
        await waits[0]
        assert not waits[1].done()
        queue.leave(first, admitted=True)  # it got its first token: there may be more room
        await asyncio.wait_for(waits[1], 1)
        assert list(queue._tickets) == [second]

    run(body)


def test_a_waiter_past_its_queue_timeout_gets_a_429_and_leaves() -> None:
    async def body() -> None:
        queue = AdmissionQueue(AdmissionConfig(queue_timeout_s=0.2, recheck_s=5))
        ticket = queue.join("m", "decode on d0 failed: the node is full: all 2 leases are in use")
        began = time.monotonic()
        probes = 0
        with pytest.raises(CapacityExhaustedError) as err:
            while True:  # the head of its line probes now and then; refused each time, it waits again
                await queue.wait(ticket)
                probes += 1
        assert 0.15 < time.monotonic() - began < 2 and 1 <= probes <= 4
        message = err.value.message
        assert "within its queue timeout of 0.2 s (pdc serve --queue-timeout-s)" in message
        assert "all 2 leases are in use" in message and err.value.retry_after_s >= 1
        assert len(queue) == 0 and queue.num_timed_out == 1 and 0.15 < ticket.queued_s < 2

    run(body)


def test_a_cancelled_waiter_leaves_the_queue_at_once() -> None:
    async def body() -> None:
        queue = AdmissionQueue(AdmissionConfig(queue_timeout_s=10))
        tickets = [queue.join("m", "full") for _ in range(3)]
        tasks = [asyncio.ensure_future(queue.wait(t)) for t in tickets]
        await settle()
        tasks[1].cancel()  # the client of the middle one went away
        await settle()
        assert tasks[1].cancelled() and queue._tickets == [tickets[0], tickets[2]]
        queue.released("m")
        queue.released("m")
        await asyncio.wait_for(asyncio.gather(tasks[0], tasks[2]), 1)  # the others still get their turns

    run(body)


def test_only_the_head_of_a_line_probes_by_itself_backing_off() -> None:
    async def body() -> None:
        queue = AdmissionQueue(AdmissionConfig(queue_timeout_s=10, recheck_s=0.4))
        head, second = queue.join("m", "full"), queue.join("m", "full")
        behind = asyncio.ensure_future(queue.wait(second))
        probes: list[float] = []
        began = time.monotonic()
        for _ in range(4):  # refused after each probe, the head waits again, longer each time
            await queue.wait(head)
            probes.append(time.monotonic() - began)
        gaps = [b - a for a, b in zip([0.0, *probes], probes, strict=False)]
        assert gaps[0] < 0.3 and gaps[2] > gaps[0] and all(g < 0.9 for g in gaps)  # 0.05, 0.1, 0.2, 0.4
        assert not behind.done()  # the second never probes while the head is in line
        queue.leave(head)  # the head gave up: the second now heads the line and probes
        await asyncio.wait_for(behind, 2)

    run(body)


def test_retry_after_is_the_queue_drained_at_the_recent_release_rate() -> None:
    clock = FakeClock()
    queue = AdmissionQueue(AdmissionConfig(queue_timeout_s=30, rate_window_s=60), clock=clock)
    assert queue.retry_after_s() == 30  # nothing released yet: the queue timeout
    clock.now += 100
    for _ in range(30):  # 30 releases in the last minute: 0.5 per second
        queue.released("m")
    assert queue.release_rate() == pytest.approx(0.5)
    assert queue.retry_after_s() == 2  # (0 queued + 1) / 0.5
    for _ in range(9):
        queue.join("m", "full")
    assert queue.retry_after_s() == 20  # (9 + 1) / 0.5
    for _ in range(100):
        queue.join("m", "full")
    assert queue.retry_after_s() == 60  # capped
    clock.now += 61  # the releases left the window
    assert queue.release_rate() == 0 and queue.retry_after_s() == 30


def test_retry_after_is_at_least_one_second_and_uses_the_uptime_when_young() -> None:
    clock = FakeClock()
    queue = AdmissionQueue(AdmissionConfig(queue_timeout_s=0), clock=clock)
    assert queue.retry_after_s() == 1  # no rate, no queue timeout: the floor
    clock.now += 4
    for _ in range(40):  # 40 in 4 s of uptime: 10 per second
        queue.released("m")
    assert queue.release_rate() == pytest.approx(10) and queue.retry_after_s() == 1


def test_the_config_refuses_negative_bounds() -> None:
    for bad in ({"max_queued": -1}, {"queue_timeout_s": -1}, {"queue_timeout_s": float("inf")},
                {"max_inflight_per_node": -2}, {"recheck_s": 0}):
        with pytest.raises(ValueError):
            AdmissionConfig(**bad)


def _node(node_id: str, roles: tuple[str, ...], port: int = 50000) -> NodeInfo:
    return NodeInfo(node_id=node_id, roles=roles, engine="torch", model_id="tiny", weights_fingerprint="w",
                    host="127.0.0.1", grpc_port=port, kv_port=port + 1, device="cpu", tflops=1.0,
                    mem_bw_gbps=10.0, free_mem_bytes=0, version="0", key_fingerprint="k")


def test_a_node_at_its_cap_is_offered_to_prefill_only_and_a_refusing_node_not_at_all() -> None:
    nodes = [_node("p", ("prefill",)), _node("both", ("prefill", "decode")), _node("d", ("decode",)),
             _node("d2", ("decode",))]
    active = {"both": 2, "d": 2, "d2": 1}.get
    offered, held = nodes_with_room(nodes, {"d2"}, lambda n: active(n) or 0, max_inflight=2)
    assert [(n.node_id, n.roles) for n in offered] == [("p", ("prefill",)), ("both", ("prefill",))]
    assert held == ["both", "d", "d2"]
    offered, held = nodes_with_room(nodes, set(), lambda n: active(n) or 0, max_inflight=0)  # no cap
    assert offered == nodes and held == []


# ---------------------------------------------------------------- the scheduler with fake workers


def _full(details: str) -> aio.AioRpcError:
    return aio.AioRpcError(grpc.StatusCode.RESOURCE_EXHAUSTED, aio.Metadata(), aio.Metadata(), details=details)


class LeasedWorker:
    """A fake worker with ``max_leases`` KV reservations: a Decode past them fails at once
    with RESOURCE_EXHAUSTED, as a real decode node does; each request holds its lease
    until its stream ends, one token every ``token_s``."""

    def __init__(self, name: str, max_leases: int, token_s: float = 0.01) -> None:
        self.name, self.max_leases, self.token_s = name, max_leases, token_s
        self.leases: set[str] = set()
        self.most_leases = 0
        self.refusals = 0
        self.admitted: list[str] = []  # request ids, in the order they got a lease
        self.cancelled: list[str] = []

    async def decode(self, request: pb.DecodeRequest, timeout: float) -> AsyncIterator[pb.DecodeEvent]:
        if len(self.leases) >= self.max_leases:
            self.refusals += 1
            raise _full(f"all {self.max_leases} leases are in use")
        self.leases.add(request.request_id)
        self.admitted.append(request.request_id)
        self.most_leases = max(self.most_leases, len(self.leases))
        try:
            if not request.local_prefill:
                yield pb.DecodeEvent(reserved=pb.Reserved(kv_host="127.0.0.1", kv_port=1, transfer_token=b"t"))
            for i in range(request.sampling.max_tokens):
                await asyncio.sleep(self.token_s)
                yield pb.DecodeEvent(token=pb.Token(token_id=1000 + i, index=i))
            self.leases.discard(request.request_id)  # a real stream ends (and frees its lease) with done
            yield pb.DecodeEvent(done=pb.Done(finish_reason="length", timings=pb.Timings(queue_s=0.001)))
        finally:
            self.leases.discard(request.request_id)

    async def prefill(self, request: pb.PrefillRequest, timeout: float) -> pb.PrefillReply:
        return pb.PrefillReply(first_token=1000)

    async def cancel(self, request_id: str, timeout: float) -> bool:
        self.cancelled.append(request_id)
        return True


FAST = LifecycleConfig(request_timeout_s=15, prefill_timeout_s=5, cancel_timeout_s=1)


def _backend(workers: dict[str, LeasedWorker], **admission: object) -> ClusterBackend:
    config = SchedulerConfig(mdns=False, policy="least-loaded", lifecycle=FAST,
                             admission=AdmissionConfig(**admission))
    backend = ClusterBackend(config, generate_key())
    backend.table = FakeTable([_node(n, ("prefill", "decode"), 50000 + 10 * i) for i, n in enumerate(workers)])
    backend.clients = FakePool(workers)
    return backend


def _request(i: int, max_tokens: int = 5, model: str = "tiny") -> GenerationRequest:
    return GenerationRequest(f"chatcmpl-{i}", model, (5, 6, 7), max_tokens=max_tokens, temperature=0,
                             placement="colocated", arrived_at=time.monotonic())


async def _drain(backend: ClusterBackend, request: GenerationRequest) -> tuple[list[int], FinishEvent | None]:
    tokens: list[int] = []
    finish = None
    async for event in backend.generate(request):
        if isinstance(event, TokenEvent):
            tokens.append(event.token_id)
        else:
            finish = event
    return tokens, finish


async def _outcome(backend: ClusterBackend, request: GenerationRequest) -> object:
    try:
        return await _drain(backend, request)
    except CapacityExhaustedError as e:
        return e


def test_requests_beyond_the_leases_wait_and_all_complete_in_arrival_order() -> None:
    worker = LeasedWorker("d", max_leases=2, token_s=0.02)
    backend = _backend({"d": worker}, queue_timeout_s=10)

    async def body() -> list:
        results = []
        for i in range(8):  # they arrive in order, a moment apart
            results.append(asyncio.ensure_future(_drain(backend, _request(i))))
            await asyncio.sleep(0.005)
        return await asyncio.gather(*results)

    results = run(body)
    assert all(tokens == [1000 + i for i in range(5)] and finish is not None for tokens, finish in results)
    assert worker.most_leases == 2 and worker.refusals >= 1
    admitted = [rid.split(".")[0] for rid in worker.admitted]
    assert admitted == [f"chatcmpl-{i}" for i in range(8)]  # FIFO: nobody overtook an earlier waiter
    queued = [finish.stats.queue_s for _, finish in results]
    assert queued[0] < 0.05 and max(queued) > 0.1  # the scheduler-side wait is in queue_s
    assert all(f.stats.request_id == f"chatcmpl-{i}" for i, (_, f) in enumerate(results))
    assert len(backend.admission) == 0 and len(backend.ledger) == 0


def test_a_full_node_is_skipped_at_once_when_another_has_room() -> None:
    workers = {"a": LeasedWorker("a", max_leases=0), "b": LeasedWorker("b", max_leases=4)}
    backend = _backend(workers, queue_timeout_s=10)

    async def body() -> list:
        return await asyncio.gather(*(_drain(backend, _request(i)) for i in range(3)))

    began = time.monotonic()
    results = run(body)
    assert time.monotonic() - began < 2 and all(len(tokens) == 5 for tokens, _ in results)
    assert [f.stats.decode_node for _, f in results] == ["b"] * 3 and workers["b"].refusals == 0


def test_past_the_queue_bound_a_request_is_refused_at_once_with_retry_after() -> None:
    worker = LeasedWorker("d", max_leases=1, token_s=0.05)
    backend = _backend({"d": worker}, max_queued=1, queue_timeout_s=10)

    async def body() -> list:
        tasks = []
        for i in range(3):
            tasks.append(asyncio.ensure_future(_outcome(backend, _request(i, max_tokens=10))))
            await asyncio.sleep(0.02)
        return await asyncio.gather(*tasks)

    first, second, third = run(body)
    assert len(first[0]) == 10 and len(second[0]) == 10  # one ran, one waited, then ran
    assert isinstance(third, CapacityExhaustedError) and third.status == 429
    assert "admission queue is full" in third.message and third.retry_after_s >= 1
    assert backend.admission.num_refused_full == 1


def test_a_request_that_waits_its_whole_queue_timeout_gets_a_429() -> None:
    worker = LeasedWorker("d", max_leases=1, token_s=0.1)
    backend = _backend({"d": worker}, queue_timeout_s=0.3)

    async def body() -> list:
        long = asyncio.ensure_future(_outcome(backend, _request(0, max_tokens=20)))  # holds the lease ~2 s
        await asyncio.sleep(0.05)
        began = time.monotonic()
        refused = await _outcome(backend, _request(1))
        waited = time.monotonic() - began
        return [await long, refused, waited]

    long, refused, waited = run(body)
    assert len(long[0]) == 20  # the running request is untouched
    assert isinstance(refused, CapacityExhaustedError) and 0.25 < waited < 1.5
    assert "queue timeout of 0.3 s" in refused.message and "all 1 leases are in use" in refused.message
    assert refused.retry_after_s >= 1 and len(backend.admission) == 0


def test_no_node_serving_the_model_is_503_at_once_even_with_waiters() -> None:
    worker = LeasedWorker("d", max_leases=1, token_s=0.05)
    backend = _backend({"d": worker}, queue_timeout_s=10)

    async def body() -> None:
        busy = [asyncio.ensure_future(_outcome(backend, _request(i, max_tokens=10))) for i in range(2)]
        await asyncio.sleep(0.05)
        assert len(backend.admission) == 1
        began = time.monotonic()
        with pytest.raises(NoCapacityError, match="no node serves model 'other'"):
            await _drain(backend, _request(9, model="other"))
        assert time.monotonic() - began < 0.1
        await asyncio.gather(*busy)

    run(body)


def test_a_waiting_request_whose_client_goes_away_leaves_the_queue_at_once() -> None:
    worker = LeasedWorker("d", max_leases=1, token_s=0.05)
    backend = _backend({"d": worker}, queue_timeout_s=10)

    async def body() -> None:
        running = asyncio.ensure_future(_drain(backend, _request(0, max_tokens=20)))
        await asyncio.sleep(0.05)
        waiting = asyncio.ensure_future(_drain(backend, _request(1)))
        await asyncio.sleep(0.1)
        assert len(backend.admission) == 1
        waiting.cancel()  # the HTTP handler is cancelled when its client disconnects
        await settle()
        assert len(backend.admission) == 0 and "chatcmpl-1" not in backend.ledger
        tokens, _ = await running
        assert len(tokens) == 20

    run(body)


def test_the_in_flight_cap_keeps_requests_off_a_full_node_without_asking_it() -> None:
    worker = LeasedWorker("d", max_leases=8, token_s=0.02)
    backend = _backend({"d": worker}, queue_timeout_s=10, max_inflight_per_node=2)

    async def body() -> list:
        return await asyncio.gather(*(_drain(backend, _request(i)) for i in range(6)))

    results = run(body)
    assert all(len(tokens) == 5 for tokens, _ in results)
    assert worker.most_leases == 2 and worker.refusals == 0  # the scheduler held them back itself
    assert backend.health()[1]["admission"]["max_inflight_per_node"] == 2


def test_a_stream_moving_off_a_dead_node_waits_for_room_instead_of_failing() -> None:
    class DyingWorker(LeasedWorker):
        async def decode(self, request: pb.DecodeRequest, timeout: float) -> AsyncIterator[pb.DecodeEvent]:
            yield pb.DecodeEvent(token=pb.Token(token_id=1000, index=0))
            raise aio.AioRpcError(grpc.StatusCode.UNAVAILABLE, aio.Metadata(), aio.Metadata(), details="gone")

    workers = {"a": DyingWorker("a", max_leases=1), "b": LeasedWorker("b", max_leases=1, token_s=0.05)}
    backend = _backend(workers, queue_timeout_s=10, max_queued=0)  # no queue for new requests

    async def body() -> tuple:
        nodes = backend.table.nodes
        backend.table.nodes = [n for n in nodes if n.node_id == "b"]
        busy = asyncio.ensure_future(_drain(backend, _request(0, max_tokens=10)))  # fills b for ~0.5 s
        await asyncio.sleep(0.02)
        backend.table.nodes = nodes  # a joins: the next request goes there, and a dies after one token
        return await _drain(backend, _request(1, max_tokens=6)), await busy

    (moved, finish), _ = run(body)
    assert moved == [1000] + [1000 + i for i in range(5)] and finish.stats.migrations == 1
    assert finish.stats.decode_node == "b" and finish.stats.queue_s > 0.1  # it waited for b's lease


# ---------------------------------------------------------------- HTTP shapes


CHAT = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 20}


def _refusal(retry_after_s: float) -> CapacityExhaustedError:
    error = CapacityExhaustedError("no node had room for this request within its queue timeout of 30 s "
                                   "(pdc serve --queue-timeout-s): decode on d0 failed: the node is full")
    error.retry_after_s = retry_after_s
    return error


def test_the_openai_client_raises_rate_limit_error_with_the_computed_retry_after(
        server: ServerThread, backend: FakeBackend) -> None:
    backend.fail_with, backend.fail_after = _refusal(7.2), 0
    client = openai.OpenAI(base_url=server.url + "/v1", api_key="unused", timeout=10, max_retries=0)
    for stream in (False, True):
        with pytest.raises(openai.RateLimitError) as err:
            reply = client.chat.completions.create(**CHAT, stream=stream)
            if stream:
                list(reply)
        assert err.value.status_code == 429 and err.value.code == "capacity_exhausted"
        assert err.value.response.headers["retry-after"] == "8"  # whole seconds, rounded up
        assert "queue timeout" in err.value.message


async def _post(url: str, body: dict) -> tuple[int, dict, list[str]]:
    """(status, headers, SSE data lines or the JSON body) over raw aiohttp."""
    async with (aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as session,
                session.post(url + "/v1/chat/completions", json=body) as resp):
        text = await resp.text()
        lines = [ln[len("data: "):] for ln in text.splitlines() if ln.startswith("data: ")] or [text]
        return resp.status, dict(resp.headers), lines


def test_a_streaming_request_refused_before_its_first_token_gets_a_real_429(
        server: ServerThread, backend: FakeBackend) -> None:
    backend.fail_with, backend.fail_after = _refusal(3), 0
    for stream in (True, False):
        status, headers, payload = asyncio.run(_post(server.url, {**CHAT, "stream": stream}))
        assert status == 429 and headers["Retry-After"] == "3"
        assert headers["Content-Type"].startswith("application/json")  # no SSE began
        error = json.loads(payload[0])["error"]
        assert set(error) == {"message", "type", "param", "code"} and error["code"] == "capacity_exhausted"


def test_a_stream_refused_after_its_headers_ends_with_one_error_event_and_no_done(
        server: ServerThread, backend: FakeBackend) -> None:
    backend.fail_with, backend.fail_after = _refusal(3), 2  # e.g. a migration that found no room in time
    status, headers, events = asyncio.run(_post(server.url, {**CHAT, "stream": True}))
    assert status == 200 and headers["Content-Type"].startswith("text/event-stream")
    assert "[DONE]" not in events
    last = json.loads(events[-1])
    assert set(last) == {"error"} and last["error"]["code"] == "capacity_exhausted"
    assert "queue timeout" in last["error"]["message"]


def test_no_capacity_stays_a_503_without_retry_after(server: ServerThread, backend: FakeBackend) -> None:
    backend.capacity = False
    status, headers, payload = asyncio.run(_post(server.url, CHAT))
    assert status == 503 and "Retry-After" not in headers
    assert json.loads(payload[0])["error"]["code"] == "no_capacity"


def test_usage_reports_cached_prompt_tokens_as_openai_does(codec: PromptCodec) -> None:
    class CachedBackend(FakeBackend):
        async def generate(self, request: GenerationRequest) -> AsyncIterator[TokenEvent | FinishEvent]:
            yield TokenEvent(self.codec.encode("ok")[0])
            yield FinishEvent("stop", RequestStats(prompt_tokens=len(request.prompt_token_ids),
                                                   cached_prefix_tokens=64, completion_tokens=1,
                                                   prefill_node="p0", decode_node="d0"))

    srv = ServerThread(build_app(CachedBackend(codec)))
    try:
        client = openai.OpenAI(base_url=srv.url + "/v1", api_key="unused", timeout=10, max_retries=0)
        reply = client.chat.completions.create(**CHAT)
        assert reply.usage.prompt_tokens_details.cached_tokens == 64
        assert reply.model_extra["pdcluster"]["cached_prefix_tokens"] == 64
        chunks = list(client.chat.completions.create(**CHAT, stream=True, stream_options={"include_usage": True}))
        assert chunks[-1].usage.prompt_tokens_details.cached_tokens == 64
        text = client.completions.create(model=MODEL, prompt="x", max_tokens=3)
        assert text.usage.prompt_tokens_details.cached_tokens == 64
    finally:
        srv.stop()


def test_health_shows_the_admission_queue() -> None:
    backend = _backend({"d": LeasedWorker("d", max_leases=1)}, max_queued=7, queue_timeout_s=12)
    admission = backend.health()[1]["admission"]
    assert admission["queued"] == 0 and admission["max_queued"] == 7 and admission["queue_timeout_s"] == 12
    assert admission["retry_after_s"] >= 1


def test_pdc_serve_and_pdc_up_flags_reach_the_admission_config(monkeypatch: pytest.MonkeyPatch,
                                                                tmp_path: Path) -> None:
    from cluster.cli import _up_config, build_parser
    from cluster.launcher import LocalCluster, UpConfig

    parser = build_parser()
    serve = parser.parse_args(["serve", "--max-queued", "3", "--queue-timeout-s", "2.5",
                               "--max-inflight-per-node", "4"])
    assert (serve.max_queued, serve.queue_timeout_s, serve.max_inflight_per_node) == (3, 2.5, 4)
    defaults = parser.parse_args(["serve"])
    assert (defaults.max_queued, defaults.queue_timeout_s, defaults.max_inflight_per_node) == (
        AdmissionConfig().max_queued, AdmissionConfig().queue_timeout_s, 0)
    up = _up_config(parser.parse_args(["up", "--model", str(tmp_path), "--max-queued", "3",
                                       "--queue-timeout-s", "2.5"]), 8123)
    assert (up.max_queued, up.queue_timeout_s, up.max_inflight_per_node) == (3, 2.5, None)
    spawned: list[list[str]] = []
    monkeypatch.setattr(LocalCluster, "_spawn", lambda self, name, args, env=None: spawned.append(args))
    cluster = LocalCluster(up)
    try:
        cluster.start()
    finally:
        cluster.stop()
    serve_args = next(args for args in spawned if args[0] == "serve")
    assert serve_args[serve_args.index("--max-queued") + 1] == "3"
    assert serve_args[serve_args.index("--queue-timeout-s") + 1] == "2.5"
    assert "--max-inflight-per-node" not in serve_args  # unset: pdc serve's own default applies
    with pytest.raises(ValueError, match="max_queued"):
        UpConfig(model=str(tmp_path), max_queued=-1)


def test_no_room_is_a_429_if_it_ever_escapes() -> None:
    assert NoRoomError("full").status == 429 and NoRoomError("full").code == "capacity_exhausted"


# ---------------------------------------------------------------- a real cluster past its capacity

OVERLOAD_CLIENTS = 64
OVERLOAD_CLIENT_TIMEOUT_S = 40.0  # each request's own bound: none may hang past it


async def _overload_one(session: aiohttp.ClientSession, url: str, body: dict) -> dict:
    """One chat completion; what came back, and how long it took (a client timeout is an outcome too)."""
    began = time.monotonic()
    try:
        async with session.post(url + "/v1/chat/completions", json=body,
                                timeout=aiohttp.ClientTimeout(total=OVERLOAD_CLIENT_TIMEOUT_S)) as resp:
            text = await resp.text()
            return {"status": resp.status, "retry_after": resp.headers.get("Retry-After"), "text": text,
                    "content_type": resp.headers.get("Content-Type", ""), "took": time.monotonic() - began}
    except (asyncio.TimeoutError, aiohttp.ClientError) as e:
        return {"status": None, "error": f"{type(e).__name__}: {e}", "took": time.monotonic() - began}


def _check_overload_outcome(outcome: dict, body: dict) -> None:
    """200: a whole answer (a stream ends with [DONE], no error event); 429: capacity_exhausted with
    Retry-After >= 1 s; 503: no_capacity. Nothing else, and never a hang."""
    assert outcome["status"] in (200, 429, 503), outcome
    if outcome["status"] != 200:
        error = json.loads(outcome["text"])["error"]
        assert error["code"] == {429: "capacity_exhausted", 503: "no_capacity"}[outcome["status"]], error
        if outcome["status"] == 429:
            assert outcome["retry_after"] is not None and int(outcome["retry_after"]) >= 1, outcome
    elif body.get("stream"):
        events = [ln[len("data: "):] for ln in outcome["text"].splitlines() if ln.startswith("data: ")]
        assert events[-1] == "[DONE]" and not any('"error"' in e for e in events[:-1]), events[-3:]
    else:
        reply = json.loads(outcome["text"])
        assert reply["usage"]["completion_tokens"] >= 1 and reply["choices"][0]["finish_reason"], reply


@pytest.mark.slow
@requires_torch_and_mlx
def test_64_concurrent_chats_past_capacity_end_in_200_429_or_503_in_time_and_leak_nothing(
        model: Path, key_file: Path, tmp_path: Path, record_property: Callable[[str, object], None]) -> None:
    """A torch prefill worker and an MLX decode worker with 4 leases behind a scheduler with a
    queue of 16 and a 5 s queue timeout; 64 short chats at once (streamed and not, split and
    not). Every one ends within its client timeout as 200, 429 (with Retry-After) or 503;
    some succeed; afterwards no worker holds a request, a lease or a reserved KV byte."""
    workers = [start_worker_process("prefill", "torch", model, key_file, tmp_path / "pre.log", "--node-id", "pre"),
               start_worker_process("decode", "mlx", model, key_file, tmp_path / "dec.log", "--node-id", "dec",
                                    "--max-leases", "4")]
    scheduler = None
    try:
        for worker in workers:
            assert worker.ready.wait(READY_S), worker.tail()
        scheduler = SchedulerProcess(key_file, [w.grpc for w in workers], tmp_path / "scheduler.log", None,
                                     "--max-queued", "16", "--queue-timeout-s", "5")
        health = scheduler.wait_ready(2)
        model_id = health["models"][0]
        bodies = [{"model": model_id, "messages": [{"role": "user", "content": f"Say {i} about caches."}],
                   "max_tokens": 8, "temperature": 0, "stream": i % 2 == 1,
                   **({"pdcluster": {"placement": "disaggregated"}} if i % 4 < 2 else {})}
                  for i in range(OVERLOAD_CLIENTS)]

        async def burst() -> list[dict]:
            async with aiohttp.ClientSession() as session:
                return await asyncio.gather(*(_overload_one(session, scheduler.url, b) for b in bodies))

        began = time.monotonic()
        outcomes = asyncio.run(burst())
        wall = time.monotonic() - began
        after = scheduler.health()
    finally:
        if scheduler is not None:
            scheduler.stop()
        try:
            assert_nothing_held([w.grpc for w in workers if w.proc.poll() is None], key_file)
        finally:
            stop_processes(workers)
    counts = {status: sum(o["status"] == status for o in outcomes) for status in (200, 429, 503, None)}
    record_property("overload", {"counts": counts, "wall_s": round(wall, 1)})
    print(f"\noverload: {counts[200]} x 200, {counts[429]} x 429, {counts[503]} x 503 in {wall:.1f} s; "
          f"slowest {max(o['took'] for o in outcomes):.1f} s; queue afterwards {after['admission']}")
    for outcome, body in zip(outcomes, bodies, strict=True):
        _check_overload_outcome(outcome, body)
    assert counts[200] >= 4  # at least the first four leases' worth got through
    assert max(o["took"] for o in outcomes) < OVERLOAD_CLIENT_TIMEOUT_S
    assert after["admission"]["queued"] == 0 and after["admission"]["moving_streams"] == 0
