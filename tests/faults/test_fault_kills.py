"""Fault injection with real processes: workers killed with SIGKILL around a
request, hostile connections on a KV port, more requests than leases.

Every scenario runs `pdc worker` and `pdc serve` processes on 127.0.0.1 (the
scheduler reaches its workers through static peers, so no mDNS timing is
involved), and ends by asserting that the surviving workers hold no request,
lease or reserved KV byte.
"""
from __future__ import annotations

import concurrent.futures
import contextlib
import json
import os
import signal
import socket
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import (
    READY_S,
    SchedulerProcess,
    assert_nothing_held,
    requires_torch_and_mlx,
    start_worker_process,
    stop_processes,
)

pytestmark = [
    pytest.mark.slow,
    requires_torch_and_mlx,
]

ASK = {"messages": [{"role": "user", "content": "Tell me about memory bandwidth."}], "temperature": 0}


@contextlib.contextmanager
def running(model: Path, key_file: Path, tmp_path: Path,
            *specs: tuple[str, str, str, tuple[str, ...]]) -> Iterator[dict]:
    """Worker processes by name, from (name, role, engine, extra flags); all stopped at exit."""
    procs = {name: start_worker_process(role, engine, model, key_file, tmp_path / f"{name}.log", "--node-id", name,
                                        *extra)
             for name, role, engine, extra in specs}
    try:
        for name, proc in procs.items():
            assert proc.ready.wait(READY_S), f"{name} did not start:\n{proc.tail()}"
        yield procs
    finally:
        stop_processes(procs.values())


def post(url: str, body: dict, timeout: float = 120.0) -> tuple[int, dict, dict]:
    """(status, JSON body, headers) of one chat completion over raw HTTP."""
    request = urllib.request.Request(url + "/v1/chat/completions", data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as reply:
            return reply.status, json.loads(reply.read()), dict(reply.headers)
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read() or b"{}"), dict(e.headers)


def model_id(scheduler: SchedulerProcess) -> str:
    with urllib.request.urlopen(scheduler.url + "/v1/models", timeout=10) as reply:
        return json.loads(reply.read())["data"][0]["id"]


# ---------------------------------------------------------------- before the first token


def test_a_decode_node_killed_between_requests_costs_no_request(model: Path, key_file: Path, tmp_path: Path) -> None:
    """The scheduler still lists the dead node (its health checks have not
    missed yet): the first request placed there is placed again, and the
    node is suspended at once, so no request fails."""
    specs = (("pre", "prefill", "torch", ()), ("dec-a", "decode", "mlx", ()), ("dec-b", "decode", "mlx", ()))
    with running(model, key_file, tmp_path, *specs) as procs:
        scheduler = SchedulerProcess(key_file, [p.grpc for p in procs.values()], tmp_path / "scheduler.log")
        try:
            scheduler.wait_ready(3)
            body = {**ASK, "model": model_id(scheduler), "max_tokens": 12}
            status, first, _ = post(scheduler.url, body)
            assert status == 200, first
            victim = first["pdcluster"]["decode_node"]
            os.kill(procs[victim].proc.pid, signal.SIGKILL)
            procs[victim].proc.wait(10)
            replies = [post(scheduler.url, body) for _ in range(5)]  # at once: before any health check misses
            health = scheduler.health()
        finally:
            scheduler.stop()
        assert [status for status, _, _ in replies] == [200] * 5, replies
        for _, reply, _ in replies:
            assert reply["choices"][0]["message"]["content"] == first["choices"][0]["message"]["content"]
            assert reply["pdcluster"]["decode_node"] != victim
        assert victim not in {n["node_id"] for n in health["nodes"]}
        assert_nothing_held([p.grpc for name, p in procs.items() if name != victim], key_file)


def test_a_dead_prefill_node_gives_a_retry_or_a_clean_error_and_leaks_nothing(model: Path, key_file: Path,
                                                                             tmp_path: Path) -> None:
    with running(model, key_file, tmp_path, ("pre", "prefill", "torch", ()), ("dec", "both", "mlx", ())) as procs:
        scheduler = SchedulerProcess(key_file, [p.grpc for p in procs.values()], tmp_path / "scheduler.log")
        try:
            scheduler.wait_ready(2)
            split = {**ASK, "model": model_id(scheduler), "max_tokens": 8,
                     "pdcluster": {"placement": "disaggregated"}}
            status, reference, _ = post(scheduler.url, split)
            assert status == 200 and reference["pdcluster"]["prefill_node"] == "pre", reference
            os.kill(procs["pre"].proc.pid, signal.SIGKILL)
            procs["pre"].proc.wait(10)
            forced_status, forced, _ = post(scheduler.url, split)  # no prefill node is left for a forced split
            free_status, free, _ = post(scheduler.url, {**split, "pdcluster": {}})  # the policy may place it alone
        finally:
            scheduler.stop()
        if forced_status == 200:
            assert forced["choices"][0]["message"]["content"] == reference["choices"][0]["message"]["content"]
        else:  # a clean error: the failed worker named in plain words, and why no other node could take it
            assert (forced_status, forced["error"]["code"]) in {(502, "worker_failed"), (503, "no_capacity")}, forced
            message = forced["error"]["message"]
            assert "pre" in message and "AioRpcError" not in message and "debug_error_string" not in message
        assert free_status == 200, free
        assert free["choices"][0]["message"]["content"] == reference["choices"][0]["message"]["content"]
        assert free["pdcluster"]["prefill_node"] == free["pdcluster"]["decode_node"] == "dec"
        assert_nothing_held([procs["dec"].grpc], key_file)


# ---------------------------------------------------------------- after the first token


def test_a_decode_node_killed_mid_stream_is_migrated_and_the_answer_is_identical(model: Path, key_file: Path,
                                                                                 tmp_path: Path) -> None:
    import openai

    with running(model, key_file, tmp_path, ("node-a", "both", "mlx", ()), ("node-b", "both", "mlx", ())) as procs:
        scheduler = SchedulerProcess(key_file, [p.grpc for p in procs.values()], tmp_path / "scheduler.log")
        try:
            scheduler.wait_ready(2)
            client = openai.OpenAI(base_url=scheduler.url + "/v1", api_key="unused", timeout=120, max_retries=0)
            ask = dict(model=model_id(scheduler), messages=ASK["messages"], max_tokens=1500, temperature=0.8,
                       seed=11, extra_body={"ignore_eos": True})
            reference = client.chat.completions.create(**ask).choices[0].message.content
            text, final, killed = "", None, None
            for chunk in client.chat.completions.create(**ask, stream=True):
                text += (chunk.choices[0].delta.content or "") if chunk.choices else ""
                if killed is None and text:
                    killed = _busy_node(scheduler)
                    os.kill(procs[killed].proc.pid, signal.SIGKILL)
                final = (chunk.model_extra or {}).get("pdcluster", final)
        finally:
            scheduler.stop()
        assert killed is not None and final is not None
        assert final["migrations"] == 1 and final["decode_node"] != killed
        assert text == reference  # one unbroken answer, token for token the uninterrupted one
        assert_nothing_held([p.grpc for name, p in procs.items() if name != killed], key_file)


def _busy_node(scheduler: SchedulerProcess, timeout: float = 10.0) -> str:
    """The one node the scheduler counts a request on (the decode node, once prefill is over)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        busy = [n["node_id"] for n in scheduler.health()["nodes"] if n["active_requests"]]
        if len(busy) == 1:
            return busy[0]
        time.sleep(0.02)
    raise AssertionError("no single busy node")


# ---------------------------------------------------------------- hostile connections and overload


def test_a_flood_of_idle_and_malformed_kv_connections_does_not_block_a_request(model: Path, key_file: Path,
                                                                              tmp_path: Path) -> None:
    with running(model, key_file, tmp_path, ("pre", "prefill", "torch", ()), ("dec", "decode", "mlx", ())) as procs:
        scheduler = SchedulerProcess(key_file, [p.grpc for p in procs.values()], tmp_path / "scheduler.log")
        flood: list[socket.socket] = []
        try:
            scheduler.wait_ready(2)
            host, port = procs["dec"].kv
            for index in range(64):
                sock = socket.create_connection((host, port), timeout=5)
                if index % 4 == 1:
                    sock.sendall(os.urandom(512))  # garbage where the handshake belongs
                elif index % 4 == 2:
                    sock.sendall(b"PDKV\x01\xff\xff\xff\xff")  # a frame prefix claiming a 4 GiB header
                flood.append(sock)  # the rest stay idle
            began = time.monotonic()
            status, reply, _ = post(scheduler.url, {**ASK, "model": model_id(scheduler), "max_tokens": 8,
                                                    "pdcluster": {"placement": "disaggregated"}})
            took = time.monotonic() - began
        finally:
            for sock in flood:
                sock.close()
            scheduler.stop()
        assert status == 200, reply
        assert reply["pdcluster"]["prefill_node"] == "pre" and reply["pdcluster"]["decode_node"] == "dec"
        assert took < 60  # a bound, not a speed claim: the flood must not hold it for its idle timeouts
        assert_nothing_held([p.grpc for p in procs.values()], key_file)


def test_64_concurrent_requests_against_16_leases_get_only_200_or_429(model: Path, key_file: Path,
                                                                      tmp_path: Path) -> None:
    specs = (("pre", "prefill", "torch", ()), ("dec", "decode", "mlx", ("--max-leases", "16")))
    with running(model, key_file, tmp_path, *specs) as procs:
        scheduler = SchedulerProcess(key_file, [p.grpc for p in procs.values()], tmp_path / "scheduler.log")
        try:
            scheduler.wait_ready(2)
            body = {**ASK, "model": model_id(scheduler), "max_tokens": 48,
                    "pdcluster": {"placement": "disaggregated"}}
            with concurrent.futures.ThreadPoolExecutor(64) as pool:
                results = list(pool.map(lambda _: post(scheduler.url, body, timeout=180), range(64)))
        finally:
            scheduler.stop()
        statuses = [status for status, _, _ in results]
        assert set(statuses) <= {200, 429}, [(s, r.get("error")) for s, r, _ in results if s not in (200, 429)]
        assert statuses.count(200) >= 1
        for status, reply, headers in results:
            if status == 429:
                assert int(headers["Retry-After"]) >= 1 and reply["error"]["code"] == "capacity_exhausted", reply
        assert_nothing_held([p.grpc for p in procs.values()], key_file)


# ---------------------------------------------------------------- mid-transfer


@pytest.fixture(scope="module")
def small_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The 77M-parameter random preset: a 2,000-token torch prefill takes seconds on 2 cores, long
    enough to kill the prefill node while its KV is streaming."""
    from workers.tools.modelgen import make_model

    return make_model(tmp_path_factory.mktemp("small-llama"), "llama", seed=0, preset="small")


def test_a_prefill_node_killed_mid_transfer_gives_a_clean_error_and_leaks_no_lease(small_model: Path,
                                                                                   key_file: Path,
                                                                                   tmp_path: Path) -> None:
    specs = (("pre", "prefill", "torch", ()), ("dec", "both", "torch", ()))
    with running(small_model, key_file, tmp_path, *specs) as procs:
        scheduler = SchedulerProcess(key_file, [p.grpc for p in procs.values()], tmp_path / "scheduler.log")
        try:
            scheduler.wait_ready(2)
            long_prompt = "The decode node streams every layer of the cache as the prefill node computes it. " * 90
            split = {"model": model_id(scheduler), "messages": [{"role": "user", "content": long_prompt}],
                     "max_tokens": 4, "temperature": 0, "pdcluster": {"placement": "disaggregated"}}
            with concurrent.futures.ThreadPoolExecutor(1) as pool:
                pending = pool.submit(post, scheduler.url, split, 180)
                _wait_for_a_lease(procs["dec"].grpc, key_file)  # the decode side has reserved: prefill is on
                time.sleep(1.0)  # into a prefill of several seconds: its KV is streaming
                os.kill(procs["pre"].proc.pid, signal.SIGKILL)
                status, reply, _ = pending.result(timeout=180)
            after_status, after, _ = post(scheduler.url, {**split, "max_tokens": 2, "pdcluster": {}})
        finally:
            scheduler.stop()
        assert (status, reply.get("error", {}).get("code")) in {(502, "worker_failed"), (503, "no_capacity")}, reply
        assert "pre" in reply["error"]["message"] and "AioRpcError" not in reply["error"]["message"]
        assert after_status == 200 and after["pdcluster"]["decode_node"] == "dec", after
        assert_nothing_held([procs["dec"].grpc], key_file)


def _wait_for_a_lease(address: str, key_file: Path, timeout: float = 60.0) -> None:
    import asyncio

    from cluster.auth import load_cluster_key
    from workers.rpc.client import WorkerClient

    async def leases() -> int:
        client = WorkerClient(address, load_cluster_key(str(key_file)))
        try:
            return (await client.health(timeout=5)).active_leases
        finally:
            await client.close()

    deadline = time.monotonic() + timeout
    while asyncio.run(leases()) == 0:
        assert time.monotonic() < deadline, "the decode node never reserved"
        time.sleep(0.05)
