"""Draining a worker: nothing new is taken, what runs finishes, stragglers fail over.

In process: the Drain RPC and Health, a refused request, an undrain, a drain
timeout. Live (real processes, a scheduler and two decode nodes): SIGTERM on a
decode worker mid-stream, and ``pdc drain`` / ``pdc undrain`` through the
scheduler's keyed admin API, seen by the official openai client.
"""
from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import grpc
import pytest
from conftest import (
    ROOT,
    FAULT_MESSAGES,
    SchedulerProcess,
    config,
    generate_key,
    have,
    requires_torch_and_mlx,
    run,
    start_worker_process,
    started,
    status_code,
    stop_processes,
    write_config,
)

from proto import pdcluster_pb2 as pb
from workers.rpc.server import Worker

pytestmark = pytest.mark.skipif(not have("mlx.core"), reason="needs the mlx extra (decode engine)")

PROMPT = [(5 * i + 1) % 900 + 10 for i in range(40)]
STREAM_S = 60.0


def decode_request(rid: str, max_tokens: int) -> pb.DecodeRequest:
    return pb.DecodeRequest(request_id=rid, prompt_token_ids=PROMPT, local_prefill=True,
                            sampling=pb.SamplingParams(max_tokens=max_tokens))


async def count_tokens(call: Any) -> int:
    return len([1 async for event in call if event.HasField("token")])


def test_a_draining_worker_finishes_what_runs_refuses_new_work_and_undrains(model: Path) -> None:
    async def body() -> None:
        worker = Worker(config(model, generate_key(), "decode"))
        async with started(worker) as (client,):
            running = asyncio.ensure_future(count_tokens(client.decode(decode_request("long", 200), STREAM_S)))
            while not (await client.health()).active_requests:
                await asyncio.sleep(0.01)
            reply = await client.drain(True, timeout_s=30)
            assert reply.draining and reply.active_requests == 1
            health = await client.health()
            assert health.ok and health.draining
            code, details = await status_code(count_tokens(client.decode(decode_request("new", 4), STREAM_S)))
            assert code == grpc.StatusCode.UNAVAILABLE and "draining" in details
            assert await running == 200  # the request in flight ran to its end
            assert not (await client.drain(False)).draining
            assert not (await client.health()).draining
            assert await count_tokens(client.decode(decode_request("after", 4), STREAM_S)) == 4

    run(body)


def test_requests_still_running_at_the_drain_timeout_fail_over_with_unavailable(model: Path) -> None:
    async def body() -> None:
        worker = Worker(config(model, generate_key(), "decode"))
        async with started(worker) as (client,):
            call = client.decode(decode_request("endless", 6000), STREAM_S)
            first = await asyncio.wait_for(call.read(), 30)  # the stream is running
            assert first.HasField("token") or first.HasField("reserved")
            started_at = time.monotonic()
            await client.drain(True, timeout_s=0.3)
            code, details = await status_code(count_tokens(call))
            assert code == grpc.StatusCode.UNAVAILABLE and "drain timeout passed" in details
            assert time.monotonic() - started_at < 10
            for _ in range(200):  # the engine releases the cache a moment after the RPC ends
                if not (await client.health()).active_requests:
                    break
                await asyncio.sleep(0.05)
            assert not (await client.health()).active_requests

    run(body)


def test_drain_refuses_a_negative_timeout(model: Path) -> None:
    async def body() -> None:
        async with started(Worker(config(model, generate_key(), "decode"))) as (client,):
            code, _ = await status_code(client.drain(True, timeout_s=-1))
            assert code == grpc.StatusCode.INVALID_ARGUMENT
            assert not (await client.health()).draining

    run(body)


# ---------------------------------------------------------------- live: a scheduler, a prefill and two decode nodes


def health_of(scheduler: SchedulerProcess) -> dict:
    try:
        with urllib.request.urlopen(scheduler.url + "/health", timeout=2) as resp:
            return json.loads(resp.read())
    except urllib.error.HTTPError as e:
        return json.loads(e.read())


def wait_for(predicate: Any, what: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.1)
    raise AssertionError(f"{what}: not within {timeout} s")


@pytest.fixture
def cluster(make_tiny_model: Any, tmp_path: Path) -> Any:
    if not have("torch"):
        pytest.skip("needs the torch extra (prefill engine)")
    model = make_tiny_model("llama")
    key_file = write_config(tmp_path / "cluster.json", generate_key())
    workers = {"prefill": start_worker_process("prefill", "torch", model, key_file, tmp_path / "p.log")}
    for name in ("decode-a", "decode-b"):
        workers[name] = start_worker_process("decode", "mlx", model, key_file, tmp_path / f"{name}.log",
                                             "--node-id", f"proc-{name}", "--drain-timeout", "180")
    scheduler = None
    try:
        for name, worker in workers.items():
            assert worker.ready.wait(120), f"{name}:\n{worker.tail()}"
        scheduler = SchedulerProcess(key_file, [w.grpc for w in workers.values()], tmp_path / "serve.log")
        scheduler.wait_ready(3)
        yield scheduler, workers, key_file
    finally:
        if scheduler is not None:
            scheduler.stop()
        stop_processes(workers.values())


def stream_in_thread(scheduler: SchedulerProcess, max_tokens: int) -> tuple[threading.Thread, dict]:
    """A streamed chat through the openai client on a thread; ``out`` gets its text and record."""
    import openai

    out: dict = {"text": "", "first": threading.Event()}

    def go() -> None:
        client = openai.OpenAI(base_url=scheduler.url + "/v1", api_key="unused", timeout=120, max_retries=0)
        model = client.models.list().data[0].id
        stream = client.chat.completions.create(model=model, messages=FAULT_MESSAGES, max_tokens=max_tokens,
                                                temperature=0, stream=True, extra_body={"ignore_eos": True})
        for chunk in stream:
            if chunk.choices and chunk.choices[0].delta.content:
                out["text"] += chunk.choices[0].delta.content
                out["first"].set()
            extra = chunk.model_extra or {}
            if "pdcluster" in extra:
                out["record"] = extra["pdcluster"]

    thread = threading.Thread(target=go, daemon=True)
    thread.start()
    return thread, out


@requires_torch_and_mlx
def test_sigterm_on_a_decode_worker_mid_stream_finishes_the_stream_and_sends_new_requests_elsewhere(
        cluster: Any) -> None:
    scheduler, workers, _ = cluster
    # long enough (>= 6 s on a quiet host) that the scheduler's 1 s health check sees the drain before it ends
    thread, out = stream_in_thread(scheduler, max_tokens=2000)
    assert out["first"].wait(60), scheduler.log.read_text(errors="replace")[-3000:]
    busy = next(n["node_id"] for n in health_of(scheduler)["nodes"] if n["active_requests"] and "decode" in n["roles"])
    proc = workers[busy.removeprefix("proc-")].proc
    proc.send_signal(signal.SIGTERM)
    wait_for(lambda: busy in health_of(scheduler).get("draining", {}), "the scheduler to see the drain")
    record = scheduler.chat(max_tokens=4).model_extra["pdcluster"]  # type: ignore[attr-defined]
    assert record["decode_node"] != busy  # new work goes elsewhere
    thread.join(180)
    assert not thread.is_alive()
    assert out["record"]["decode_node"] == busy and out["record"]["migrations"] == 0
    assert out["record"]["completion_tokens"] == 2000  # the stream ran to its end on the draining node
    assert proc.wait(60) == 0  # then the worker exited cleanly


@requires_torch_and_mlx
def test_pdc_drain_moves_new_and_stuck_work_away_and_undrain_brings_the_node_back(cluster: Any) -> None:
    scheduler, workers, key_file = cluster
    pdc = [sys.executable, "-m", "cluster.cli"]

    def admin(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([*pdc, *args, "--url", scheduler.url, "--cluster-key-file", str(key_file)],
                              cwd=ROOT, capture_output=True, text=True, timeout=60, env=dict(os.environ))

    thread, out = stream_in_thread(scheduler, max_tokens=2000)
    assert out["first"].wait(60)
    busy = next(n["node_id"] for n in health_of(scheduler)["nodes"] if n["active_requests"] and "decode" in n["roles"])
    drained = admin("drain", busy, "--timeout", "0.5")
    assert drained.returncode == 0 and "draining" in drained.stdout, drained.stderr
    thread.join(180)
    assert not thread.is_alive()
    record = out["record"]  # the stream moved to the other decode node and finished there
    assert record["migrations"] == 1 and record["decode_node"] != busy and record["completion_tokens"] == 2000
    assert busy in health_of(scheduler)["draining"]
    assert scheduler.chat(max_tokens=4).model_extra["pdcluster"]["decode_node"] != busy  # type: ignore[attr-defined]
    assert workers[busy.removeprefix("proc-")].proc.poll() is None  # drained, not stopped
    undrained = admin("undrain", busy)
    assert undrained.returncode == 0 and "taking requests" in undrained.stdout, undrained.stderr
    wait_for(lambda: busy in {n["node_id"] for n in health_of(scheduler)["nodes"]}, "the node to come back")
    unknown = admin("drain", "no-such-node")
    assert unknown.returncode == 2 and "no node 'no-such-node'" in unknown.stderr
    unsigned = subprocess.run([*pdc, "drain", busy, "--url", scheduler.url, "--cluster-key-file",
                               str(write_config(key_file.parent / "other.json", generate_key()))],
                              cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert unsigned.returncode == 2 and "not authenticated" in unsigned.stderr
