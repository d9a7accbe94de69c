"""Continuing a stream on another node: the worker's ``first_step`` and the scheduler's migration.

Sampling depends only on (seed, step), so a Decode that prefills prompt +
the tokens already sent and starts sampling at ``first_step`` continues an
interrupted stream token for token."""
from __future__ import annotations

import pytest
from conftest import FakePool, FakeTable, config, have, run, started, status_code

from cluster.auth import generate_key
from proto import pdcluster_pb2 as pb
from workers.rpc.server import Worker

PROMPT = [(7 * i + 3) % 1000 + 10 for i in range(40)]
STREAM_TIMEOUT_S = 60.0
ENGINES = [e for e in ("torch", "mlx") if have("torch" if e == "torch" else "mlx.core")]


async def _tokens(client, rid: str, prompt: list[int], sampling: pb.SamplingParams, first_step: int = 0) -> list[int]:
    request = pb.DecodeRequest(request_id=rid, prompt_token_ids=prompt, sampling=sampling, local_prefill=True,
                               first_step=first_step)
    tokens = []
    async for event in client.decode(request, timeout=STREAM_TIMEOUT_S):
        if event.HasField("token"):
            assert event.token.index == len(tokens)  # indices stay 0-based per call
            tokens.append(event.token.token_id)
    return tokens


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("temperature", [0.0, 1.3])
def test_a_decode_at_first_step_continues_the_stream_token_for_token(model, engine: str, temperature: float) -> None:
    key = generate_key()
    worker = Worker(config(model, key, "both", engine=engine))
    sampling = dict(max_tokens=24, temperature=temperature, seed=1234)

    async def body() -> None:
        async with started(worker) as (client,):
            whole = await _tokens(client, "whole", PROMPT, pb.SamplingParams(**sampling))
            assert len(whole) == 24
            for cut in (1, 9, 23):
                rest = await _tokens(client, f"rest-{cut}", PROMPT + whole[:cut],
                                     pb.SamplingParams(**{**sampling, "max_tokens": 24 - cut}), first_step=cut)
                assert rest == whole[cut:], f"continued at step {cut}"
            if temperature > 0:  # negative control: the steps matter for a sampled stream
                restarted = await _tokens(client, "restarted", PROMPT + whole[:9],
                                          pb.SamplingParams(**{**sampling, "max_tokens": 15}))
                assert restarted != whole[9:]

    run(body)


def test_first_step_needs_local_prefill(model) -> None:
    key = generate_key()
    worker = Worker(config(model, key, "both", engine=ENGINES[0]))

    async def body() -> None:
        async with started(worker) as (client,):
            request = pb.DecodeRequest(request_id="x", prompt_token_ids=PROMPT, first_step=3,
                                       sampling=pb.SamplingParams(max_tokens=4))
            code, details = await status_code(client.decode(request, timeout=STREAM_TIMEOUT_S).read())
            assert code.name == "INVALID_ARGUMENT" and "local_prefill" in details

    run(body)


# ---------------------------------------------------------------- the scheduler: re-placement and migration


import asyncio  # noqa: E402
from collections.abc import AsyncIterator  # noqa: E402

import grpc  # noqa: E402
from grpc import aio  # noqa: E402

from cluster.node import NodeInfo  # noqa: E402
from scheduler.lifecycle import LifecycleConfig  # noqa: E402
from scheduler.request import (  # noqa: E402
    FinishEvent,
    GenerationRequest,
    RequestFailedError,
    TokenEvent,
)
from scheduler.service import ClusterBackend, SchedulerConfig  # noqa: E402

FAST = LifecycleConfig(request_timeout_s=10, prefill_timeout_s=5, cancel_timeout_s=1)


def _unavailable(details: str = "Socket closed") -> aio.AioRpcError:
    return aio.AioRpcError(grpc.StatusCode.UNAVAILABLE, aio.Metadata(), aio.Metadata(), details=details)


class StepWorker:
    """A fake worker whose token for sampling step i is ``1000 + i``: a continued
    stream is identical exactly when the steps line up. ``die_after``: tokens it
    sends on its next Decode before failing UNAVAILABLE (None: never)."""

    def __init__(self, name: str, die_after: int | None = None, prefill_fails: bool = False,
                 stall_s: float = 0.0) -> None:
        self.name, self.die_after, self.prefill_fails = name, die_after, prefill_fails
        self.stall_s = stall_s  # waited before dying
        self.decodes: list[pb.DecodeRequest] = []
        self.prefills: list[pb.PrefillRequest] = []
        self.cancelled: list[str] = []

    async def decode(self, request: pb.DecodeRequest, timeout: float) -> AsyncIterator[pb.DecodeEvent]:
        self.decodes.append(request)
        die_after, self.die_after = self.die_after, None
        if not request.local_prefill:
            yield pb.DecodeEvent(reserved=pb.Reserved(kv_host="127.0.0.1", kv_port=1, transfer_token=b"t"))
            await asyncio.sleep(0.05)  # the KV "arrives"
        for i in range(request.sampling.max_tokens):
            if die_after is not None and i == die_after:
                await asyncio.sleep(self.stall_s)
                raise _unavailable()
            await asyncio.sleep(0.001)
            yield pb.DecodeEvent(token=pb.Token(token_id=1000 + request.first_step + i, index=i))
        yield pb.DecodeEvent(done=pb.Done(finish_reason="length", timings=pb.Timings()))

    async def prefill(self, request: pb.PrefillRequest, timeout: float) -> pb.PrefillReply:
        self.prefills.append(request)
        if self.prefill_fails:
            raise _unavailable("failed to connect to all addresses; last error: Connection refused")
        return pb.PrefillReply(first_token=1000)

    async def cancel(self, request_id: str, timeout: float) -> bool:
        self.cancelled.append(request_id)
        return True


def _node(node_id: str, roles: tuple[str, ...], port: int) -> NodeInfo:
    return NodeInfo(node_id=node_id, roles=roles, engine="torch", model_id="tiny", weights_fingerprint="w",
                    host="127.0.0.1", grpc_port=port, kv_port=port + 1, device="cpu", tflops=1.0,
                    mem_bw_gbps=10.0, free_mem_bytes=0, version="0", key_fingerprint="k")


def _backend(workers: dict[str, StepWorker], roles: dict[str, tuple[str, ...]], **config) -> ClusterBackend:
    backend = ClusterBackend(SchedulerConfig(mdns=False, policy="least-loaded", lifecycle=FAST, **config),
                             generate_key())
    backend.table = FakeTable([_node(n, roles[n], 50000 + 10 * i) for i, n in enumerate(workers)])
    backend.clients = FakePool(workers)
    return backend


def _request(placement: str | None = "colocated", **kw) -> GenerationRequest:
    fields = dict(max_tokens=10, temperature=0.8, placement=placement, arrived_at=0.0)
    fields.update(kw)
    return GenerationRequest("chatcmpl-1", "tiny", (5, 6, 7), **fields)


async def _drain(backend: ClusterBackend, request: GenerationRequest) -> tuple[list[int], FinishEvent | None]:
    tokens, finish = [], None
    async for event in backend.generate(request):
        if isinstance(event, TokenEvent):
            tokens.append(event.token_id)
        else:
            finish = event
    return tokens, finish


BOTH = ("prefill", "decode")


def test_a_decode_node_dying_mid_stream_moves_the_stream_and_it_continues_identically() -> None:
    workers = {"a": StepWorker("a", die_after=3), "b": StepWorker("b")}
    backend = _backend(workers, {"a": BOTH, "b": BOTH})
    tokens, finish = asyncio.run(asyncio.wait_for(_drain(backend, _request()), 30))
    assert tokens == [1000 + i for i in range(10)]  # one unbroken stream, as if uninterrupted
    assert finish is not None and finish.stats.migrations == 1 and finish.stats.completion_tokens == 10
    assert finish.stats.request_id == "chatcmpl-1" and finish.stats.prompt_tokens == 3
    assert finish.stats.decode_node == "b"
    first, moved = workers["a"].decodes[0], workers["b"].decodes[0]
    assert list(moved.prompt_token_ids) == [5, 6, 7, 1000, 1001, 1002]  # prompt + the tokens already sent
    assert moved.first_step == 3 and moved.sampling.max_tokens == 7 and moved.local_prefill
    assert moved.request_id == "chatcmpl-1.1"
    # the scheduler fixed a seed up front (the client gave none): both nodes sample the same streams
    assert first.sampling.HasField("seed") and moved.sampling.seed == first.sampling.seed
    assert "a" in backend.table.suspended and "unreachable" in backend.table.suspended["a"]  # UNAVAILABLE: at once
    assert backend.ledger.active_requests("a") == backend.ledger.active_requests("b") == 0


def test_a_greedy_request_keeps_no_seed_and_a_seeded_one_keeps_its_own() -> None:
    for temperature, seed, want in ((0.0, None, False), (0.8, 42, True)):
        workers = {"a": StepWorker("a", die_after=2), "b": StepWorker("b")}
        backend = _backend(workers, {"a": BOTH, "b": BOTH})
        tokens, _ = asyncio.run(asyncio.wait_for(_drain(backend, _request(temperature=temperature, seed=seed)), 30))
        assert tokens == [1000 + i for i in range(10)]
        sampling = workers["b"].decodes[0].sampling
        assert sampling.HasField("seed") == want and (seed is None or sampling.seed == seed)


def test_a_stream_moves_at_most_max_migrations_times_then_ends_with_the_error() -> None:
    workers = {n: StepWorker(n, die_after=2) for n in "abcd"}
    backend = _backend(workers, {n: BOTH for n in workers}, max_migrations=2)
    sent: list[int] = []

    async def go() -> None:
        async for event in backend.generate(_request(max_tokens=20)):
            sent.append(event.token_id)

    with pytest.raises(RequestFailedError) as err:
        asyncio.run(asyncio.wait_for(go(), 30))
    assert sent == [1000 + i for i in range(6)]  # 2 tokens from each of three nodes, in order
    assert "decode on" in err.value.message and "unreachable" in err.value.message
    assert sum(len(w.decodes) for w in workers.values()) == 3  # the first node and two moves


def test_a_failed_migration_with_no_node_left_says_so() -> None:
    workers = {"a": StepWorker("a", die_after=3)}
    backend = _backend(workers, {"a": BOTH})
    with pytest.raises(RequestFailedError) as err:
        asyncio.run(asyncio.wait_for(_drain(backend, _request()), 30))
    message = err.value.message
    assert message.startswith("decode on a failed: the node is unreachable")
    assert "the stream could not move to another node" in message and "AioRpcError" not in message


def test_a_decode_node_failing_before_the_first_token_is_placed_again() -> None:
    workers = {"a": StepWorker("a", die_after=0), "b": StepWorker("b")}
    backend = _backend(workers, {"a": BOTH, "b": BOTH})
    tokens, finish = asyncio.run(asyncio.wait_for(_drain(backend, _request()), 30))
    assert tokens == [1000 + i for i in range(10)] and finish.stats.migrations == 0
    retried = workers["b"].decodes[0]
    assert retried.first_step == 0 and list(retried.prompt_token_ids) == [5, 6, 7]


def test_a_prefill_node_failing_is_placed_again_once_on_the_remaining_nodes() -> None:
    workers = {"d": StepWorker("d"), "p1": StepWorker("p1", prefill_fails=True), "p2": StepWorker("p2")}
    roles = {"d": ("decode",), "p1": ("prefill",), "p2": ("prefill",)}
    backend = _backend(workers, roles)
    tokens, finish = asyncio.run(asyncio.wait_for(_drain(backend, _request(placement="disaggregated")), 30))
    assert len(tokens) == 10 and finish.stats.migrations == 0
    used = [n for n in ("p1", "p2") if workers[n].prefills]
    assert len(used) == 2 and "p1" in backend.table.suspended  # one failed, the other took it
    # only once: with both prefill nodes failing, the second failure is the answer
    workers = {"d": StepWorker("d"), "p1": StepWorker("p1", prefill_fails=True),
               "p2": StepWorker("p2", prefill_fails=True), "p3": StepWorker("p3")}
    roles["p3"] = ("prefill",)
    backend = _backend(workers, roles)
    with pytest.raises(RequestFailedError, match=r"^prefill on p\d failed: the node is unreachable"):
        asyncio.run(asyncio.wait_for(_drain(backend, _request(placement="disaggregated")), 30))
    assert sum(bool(workers[n].prefills) for n in ("p1", "p2", "p3")) == 2


def test_no_recovery_once_the_deadline_has_passed() -> None:
    import time

    workers = {"a": StepWorker("a", die_after=0, stall_s=0.5), "b": StepWorker("b")}
    backend = _backend(workers, {"a": BOTH, "b": BOTH})
    late = _request(arrived_at=time.monotonic() - FAST.request_timeout_s + 0.3)  # 0.3 s of deadline left
    with pytest.raises(RequestFailedError, match="^decode on a failed"):  # a fails after its deadline passed
        asyncio.run(asyncio.wait_for(_drain(backend, late), 30))
    assert workers["a"].decodes and not workers["b"].decodes


# ---------------------------------------------------------------- live: kill -9 the decode worker mid-stream


def _wait(predicate, what: str, timeout: float = 60.0) -> None:
    import time

    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


@pytest.mark.slow
@pytest.mark.skipif(not have("mlx.core"), reason="needs the mlx extra (decode engine)")
def test_kill_9_the_decode_worker_mid_stream_and_the_client_sees_one_identical_answer(model, tmp_path) -> None:
    import json
    import os
    import signal
    import urllib.request

    import openai
    from conftest import ServerThread, start_worker_process

    from cluster.auth import write_config
    from scheduler.api import build_app

    key = generate_key()
    key_file = write_config(tmp_path / "cluster.json", key)
    procs = {name: start_worker_process("both", "mlx", model, key_file, tmp_path / f"{name}.log", "--node-id", name)
             for name in ("mig-a", "mig-b")}
    srv = None
    try:
        for name, proc in procs.items():
            assert proc.ready.wait(120), f"{name} did not start:\n{proc.tail()}"
        backend = ClusterBackend(SchedulerConfig(mdns=False, health_interval_s=0.3, api_key="k",
                                                 peers=tuple(p.grpc for p in procs.values())), key)
        srv = ServerThread(build_app(backend, api_key="k"))
        asyncio.run_coroutine_threadsafe(backend.start(), srv.loop).result(30)
        client = openai.OpenAI(base_url=srv.url + "/v1", api_key="k", timeout=60, max_retries=0)
        _wait(lambda: len(backend.table.snapshot()) == 2 and backend.models(), "both workers and the model")
        ask = dict(model=backend.models()[0].model_id, messages=[{"role": "user", "content": "tell me a story"}],
                   max_tokens=1500, temperature=0.9, seed=7, extra_body={"ignore_eos": True})
        reference = client.chat.completions.create(**ask).choices[0].message.content

        def busy() -> list[str]:
            """The nodes the ledger counts the request on: once prefill is over, the decode node only."""
            request = urllib.request.Request(srv.url + "/health", headers={"Authorization": "Bearer k"})
            with urllib.request.urlopen(request, timeout=10) as reply:
                return [n["node_id"] for n in json.loads(reply.read())["nodes"] if n["active_requests"]]

        text, final, killed = "", None, None
        for chunk in client.chat.completions.create(**ask, stream=True):
            text += chunk.choices[0].delta.content or "" if chunk.choices else ""
            if killed is None and text:
                _wait(lambda: len(busy()) == 1, "the prefill node's part to end", timeout=10)
                killed = busy()[0]
                os.kill(procs[killed].proc.pid, signal.SIGKILL)
            extra = chunk.model_extra or {}
            if "pdcluster" in extra:
                final = extra["pdcluster"]
        assert killed is not None and final is not None
        assert final["migrations"] == 1 and final["decode_node"] != killed
        assert text == reference  # one unbroken answer, token for token the uninterrupted one
    finally:
        if srv is not None:
            asyncio.run_coroutine_threadsafe(backend.stop(), srv.loop).result(30)
            srv.stop()
        for proc in procs.values():
            if proc.proc.poll() is None:
                proc.proc.send_signal(signal.SIGTERM)
                try:
                    proc.proc.wait(15)
                except Exception:
                    proc.proc.kill()


@pytest.mark.slow
@pytest.mark.skipif(not have("mlx.core"), reason="needs the mlx extra (decode engine)")
def test_kill_9_the_only_decode_worker_mid_stream_and_the_sdk_raises_then_503(model, tmp_path) -> None:
    import os
    import signal

    import openai
    from conftest import ServerThread, start_worker_process

    from cluster.auth import write_config
    from scheduler.api import build_app

    key = generate_key()
    key_file = write_config(tmp_path / "cluster.json", key)
    proc = start_worker_process("both", "mlx", model, key_file, tmp_path / "solo.log", "--node-id", "solo")
    srv = None
    try:
        assert proc.ready.wait(120), proc.tail()
        backend = ClusterBackend(SchedulerConfig(mdns=False, health_interval_s=0.3, peers=(proc.grpc,)), key)
        srv = ServerThread(build_app(backend))
        asyncio.run_coroutine_threadsafe(backend.start(), srv.loop).result(30)
        client = openai.OpenAI(base_url=srv.url + "/v1", api_key="unused", timeout=60, max_retries=0)
        _wait(lambda: backend.table.snapshot() and backend.models(), "the worker and its model")
        model_id = backend.models()[0].model_id
        ask = dict(model=model_id, messages=[{"role": "user", "content": "go"}], max_tokens=1500,
                   extra_body={"ignore_eos": True})
        text = ""
        with pytest.raises(openai.APIError) as err:
            for chunk in client.chat.completions.create(**ask, stream=True):
                text += chunk.choices[0].delta.content or "" if chunk.choices else ""
                if text and proc.proc.poll() is None:
                    os.kill(proc.proc.pid, signal.SIGKILL)
        message = err.value.message
        assert text and "decode on solo failed" in message and "could not move to another node" in message
        for raw in ("AioRpcError", "debug_error_string", "StatusCode."):
            assert raw not in message
        # the model is known but no node is left: 503 no_capacity, not 404 model_not_found
        with pytest.raises(openai.InternalServerError) as err:
            client.chat.completions.create(model=model_id, messages=[{"role": "user", "content": "x"}], max_tokens=2)
        assert err.value.status_code == 503 and err.value.code == "no_capacity"
    finally:
        if srv is not None:
            asyncio.run_coroutine_threadsafe(backend.stop(), srv.loop).result(30)
            srv.stop()
        if proc.proc.poll() is None:
            proc.proc.kill()
        proc.proc.wait(15)
