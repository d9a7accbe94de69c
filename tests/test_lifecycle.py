"""Request lifecycle over fake workers: ordering, failure and cancellation."""
from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator

import pytest

from proto import pdcluster_pb2 as pb
from scheduler.lifecycle import LifecycleConfig, run_request
from scheduler.placement import Placement
from scheduler.request import (
    FinishEvent,
    GenerationRequest,
    RequestFailedError,
    TokenEvent,
)

FAST = LifecycleConfig(request_timeout_s=5, prefill_timeout_s=5, lease_s=5, cancel_timeout_s=1)


class FakeWorker:
    def __init__(self, name: str, *, prefill_fails: bool = False) -> None:
        self.name, self.prefill_fails = name, prefill_fails
        self.prefill_requests: list[pb.PrefillRequest] = []
        self.decode_requests: list[pb.DecodeRequest] = []
        self.cancelled: list[str] = []
        self.kv_arrived = asyncio.Event()

    async def decode(self, request: pb.DecodeRequest, timeout: float) -> AsyncIterator[pb.DecodeEvent]:
        self.decode_requests.append(request)
        if not request.local_prefill:
            yield pb.DecodeEvent(reserved=pb.Reserved(kv_host="127.0.0.1", kv_port=4242, transfer_token=b"tok"))
            await asyncio.wait_for(self.kv_arrived.wait(), timeout)  # a real decode node waits for its lease
        for i in range(request.sampling.max_tokens):
            await asyncio.sleep(0.001)
            yield pb.DecodeEvent(token=pb.Token(token_id=100 + i, index=i))
        yield pb.DecodeEvent(done=pb.Done(finish_reason="length", timings=pb.Timings(kv_bytes=999, transfer_s=0.5)))

    async def prefill(self, request: pb.PrefillRequest, timeout: float) -> pb.PrefillReply:
        self.prefill_requests.append(request)
        await asyncio.sleep(0.01)
        if self.prefill_fails:
            raise ConnectionError("prefill node went away")
        peer.kv_arrived.set()
        return pb.PrefillReply(first_token=100, prefill_s=0.25, kv_bytes=999)

    async def cancel(self, request_id: str, timeout: float) -> bool:
        self.cancelled.append(request_id)
        return True


peer: FakeWorker  # the decode worker a fake prefill "sends" to


def _request(max_tokens: int = 4, placement: str | None = None) -> GenerationRequest:
    return GenerationRequest("req-1", "m", (1, 2, 3), max_tokens=max_tokens, placement=placement)


async def _collect(gen: AsyncIterator) -> list:
    return [e async for e in gen]


def _workers(**prefill_kwargs) -> dict[str, FakeWorker]:
    global peer
    workers = {"p": FakeWorker("p", **prefill_kwargs), "d": FakeWorker("d")}
    peer = workers["d"]
    return workers


def test_disaggregated_request_opens_decode_first_then_prefills_to_its_address() -> None:
    workers = _workers()
    events = asyncio.run(_collect(run_request(_request(), Placement("p", "d"), workers.__getitem__, FAST)))
    assert [e.token_id for e in events if isinstance(e, TokenEvent)] == [100, 101, 102, 103]
    finish = events[-1]
    assert isinstance(finish, FinishEvent) and finish.finish_reason == "length"
    assert (finish.stats.prefill_node, finish.stats.decode_node) == ("p", "d")
    assert finish.stats.kv_bytes == 999 and finish.stats.prefill_s == 0.25 and finish.stats.ttft_s > 0
    prefill = workers["p"].prefill_requests[0]
    assert (prefill.kv_host, prefill.kv_port, prefill.transfer_token) == ("127.0.0.1", 4242, b"tok")
    assert not workers["d"].decode_requests[0].local_prefill
    assert workers["p"].cancelled == workers["d"].cancelled == []


def test_colocated_request_prefills_on_the_decode_node_only() -> None:
    workers = _workers()
    events = asyncio.run(_collect(run_request(_request(), Placement(None, "d"), workers.__getitem__, FAST)))
    assert events[-1].stats.prefill_node == events[-1].stats.decode_node == "d"
    assert workers["d"].decode_requests[0].local_prefill
    assert workers["p"].prefill_requests == []


def test_the_record_names_the_request_and_times_it_from_arrival() -> None:
    workers = _workers()
    request = GenerationRequest("req-7", "m", (1, 2, 3), max_tokens=4, arrived_at=time.monotonic())
    stats = asyncio.run(_collect(run_request(request, Placement("p", "d"), workers.__getitem__, FAST)))[-1].stats
    assert (stats.request_id, stats.arrival_s, stats.colocated) == ("req-7", request.arrived_at, False)
    assert (stats.prompt_tokens, stats.completion_tokens, stats.cached_prefix_tokens) == (3, 4, 0)
    assert 0 < stats.ttft_s < stats.e2e_s and stats.tpot_s > 0
    assert stats.e2e_s == pytest.approx(stats.ttft_s + 3 * stats.tpot_s)  # the last token ends the request


def test_one_token_has_no_tpot_and_colocated_is_prefill_node_equal_to_decode_node() -> None:
    workers = _workers()
    stats = asyncio.run(_collect(run_request(_request(max_tokens=1), Placement(None, "d"), workers.__getitem__,
                                             FAST)))[-1].stats
    assert stats.completion_tokens == 1 and stats.tpot_s is None and stats.to_json()["tpot_s"] is None
    assert stats.colocated and stats.to_json()["colocated"] is True


def test_failed_prefill_fails_the_request_fast_and_cancels_both_workers() -> None:
    workers = _workers(prefill_fails=True)

    async def scenario() -> float:
        start = asyncio.get_running_loop().time()
        with pytest.raises(RequestFailedError, match="prefill on p failed"):
            await _collect(run_request(_request(), Placement("p", "d"), workers.__getitem__, FAST))
        return asyncio.get_running_loop().time() - start

    assert asyncio.run(scenario()) < FAST.lease_s  # did not wait for the decode lease
    assert workers["d"].cancelled == ["req-1"] and workers["p"].cancelled == ["req-1"]


def test_closing_the_stream_early_cancels_on_both_workers() -> None:
    workers = _workers()

    async def scenario() -> None:
        gen = run_request(_request(max_tokens=50), Placement("p", "d"), workers.__getitem__, FAST)
        async for event in gen:
            if isinstance(event, TokenEvent):
                break
        await gen.aclose()

    asyncio.run(scenario())
    assert workers["d"].cancelled == ["req-1"] and workers["p"].cancelled == ["req-1"]


# ---------------------------------------------------------------- on_prefill_done (per-node load accounting)


def _timeline(placement: Placement, **prefill_kwargs) -> list[str]:
    """What happened, in order: 'prefill-done' (the callback), 'token', 'finish', 'error'."""
    workers = _workers(**prefill_kwargs)
    seen: list[str] = []

    async def scenario() -> None:
        gen = run_request(_request(), placement, workers.__getitem__, FAST,
                          on_prefill_done=lambda: seen.append("prefill-done"))
        try:
            async for event in gen:
                seen.append("token" if isinstance(event, TokenEvent) else "finish")
        except RequestFailedError:
            seen.append("error")

    asyncio.run(scenario())
    return seen


def test_prefill_done_fires_once_when_the_remote_prefill_returns() -> None:
    seen = _timeline(Placement("p", "d"))
    assert seen.count("prefill-done") == 1
    assert seen.index("prefill-done") < seen.index("token")  # the prefill node is free before decode ends


def test_prefill_done_fires_once_at_the_first_token_when_colocated() -> None:
    seen = _timeline(Placement(None, "d"))
    assert seen[:2] == ["prefill-done", "token"] and seen.count("prefill-done") == 1


def test_prefill_done_fires_once_when_the_prefill_fails() -> None:
    seen = _timeline(Placement("p", "d"), prefill_fails=True)
    assert seen == ["prefill-done", "error"]


# ---------------------------------------------------------------- worker failures in plain words


def _rpc_error(code, details: str):
    from grpc import aio
    return aio.AioRpcError(code, aio.Metadata(), aio.Metadata(), details=details,
                           debug_error_string='UNKNOWN:Error received from peer {grpc_status:14}')


@pytest.mark.parametrize(("code", "kind", "status"), [
    ("UNAVAILABLE", "RequestFailedError", 502),
    ("RESOURCE_EXHAUSTED", "CapacityExhaustedError", 429),
    ("DEADLINE_EXCEEDED", "WorkerTimeoutError", 504),
    ("INTERNAL", "RequestFailedError", 502),
])
def test_a_worker_rpc_error_becomes_plain_words_naming_the_node(code: str, kind: str, status: int) -> None:
    import grpc

    from scheduler.lifecycle import worker_error

    error = worker_error("decode", "mac-1", _rpc_error(getattr(grpc.StatusCode, code), "all 4 leases are in use"))
    assert type(error).__name__ == kind and error.status == status
    assert error.node == "mac-1" and error.grpc_code == code
    assert error.message.startswith("decode on mac-1 failed: the node ") and "all 4 leases are in use" in error.message
    for raw in ("AioRpcError", "debug_error_string", "StatusCode", "grpc_status"):
        assert raw not in error.message


def test_a_failed_decode_stream_names_the_node_and_cause() -> None:
    import grpc

    class DyingDecoder(FakeWorker):
        async def decode(self, request, timeout):
            yield pb.DecodeEvent(token=pb.Token(token_id=100, index=0))
            raise _rpc_error(grpc.StatusCode.UNAVAILABLE, "Socket closed")

    workers = {"d": DyingDecoder("d")}

    async def go() -> list:
        got = []
        with pytest.raises(RequestFailedError) as err:
            async for event in run_request(_request(placement="colocated"), Placement(None, "d"),
                                           workers.__getitem__, FAST):
                got.append(event)
        return got, err.value

    got, error = asyncio.run(go())
    assert [e.token_id for e in got] == [100]
    assert error.message == "decode on d failed: the node is unreachable or went away: Socket closed"
    assert error.node == "d" and error.grpc_code == "UNAVAILABLE" and workers["d"].cancelled == ["req-1"]


def test_the_lease_is_the_decode_workers_unless_the_operator_set_one() -> None:
    workers = _workers()
    asyncio.run(_collect(run_request(_request(placement="colocated"), Placement(None, "d"), workers.__getitem__,
                                     LifecycleConfig())))
    assert workers["d"].decode_requests[0].lease_s == 0  # 0: the worker's own --lease-s
    asyncio.run(_collect(run_request(_request(placement="colocated"), Placement(None, "d"), workers.__getitem__,
                                     LifecycleConfig(lease_s=12.5))))
    assert workers["d"].decode_requests[1].lease_s == 12.5
    with pytest.raises(ValueError, match="lease_s must be >= 0"):
        LifecycleConfig(lease_s=-1)
