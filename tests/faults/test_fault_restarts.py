"""Fault injection with real processes: a scheduler killed and restarted, a
stranger with another cluster key, a second cluster on the same host.

Each test starts real `pdc worker` and `pdc serve` processes on 127.0.0.1,
kills one with SIGKILL at the chosen moment, and asserts what clients see and
that no worker holds a lease, a reservation or a request afterwards.
"""
from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from cluster.auth import generate_key, load_cluster_key, write_config
from conftest import ROOT, free_port, have, start_worker_process
from workers.rpc.client import WorkerClient

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not (have("torch") and have("mlx.core")), reason="needs the torch and mlx extras"),
]

MESSAGES = [{"role": "user", "content": "Say something about caches."}]
READY_S = 120.0


class Scheduler:
    """One `pdc serve` process reaching its workers through static peers (no mDNS)."""

    def __init__(self, key_file: Path, peers: list[str], log: Path, port: int | None = None) -> None:
        self.port = port or free_port()
        cmd = [sys.executable, "-m", "cluster.cli", "serve", "--port", str(self.port), "--no-mdns",
               "--peers", ",".join(peers), "--cluster-key-file", str(key_file)]
        self.log = log
        self.proc = subprocess.Popen(cmd, cwd=ROOT, stdout=log.open("ab"), stderr=subprocess.STDOUT,
                                     stdin=subprocess.DEVNULL, env={**os.environ, "PYTHONUNBUFFERED": "1"})

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def health(self) -> dict | None:
        try:
            with urllib.request.urlopen(self.url + "/health", timeout=2) as resp:
                return json.loads(resp.read())
        except (urllib.error.URLError, ConnectionError, TimeoutError, ValueError):
            return None

    def wait_ready(self, num_nodes: int, timeout: float = READY_S) -> dict:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, self.log.read_text(errors="replace")[-3000:]
            health = self.health()
            if health and health.get("status") == "ok" and len(health["nodes"]) >= num_nodes and health["models"]:
                return health
            time.sleep(0.25)
        raise AssertionError(f"scheduler not ready in {timeout} s:\n{self.log.read_text(errors='replace')[-3000:]}")

    def chat(self, max_tokens: int = 12) -> object:
        import openai

        client = openai.OpenAI(base_url=self.url + "/v1", api_key="unused", timeout=120, max_retries=0)
        model = client.models.list().data[0].id
        return client.chat.completions.create(model=model, messages=MESSAGES, max_tokens=max_tokens, temperature=0)

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(10)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.kill()


@pytest.fixture
def key_file(tmp_path: Path) -> Path:
    return write_config(tmp_path / "cluster.json", generate_key())


@pytest.fixture
def workers(model: Path, key_file: Path, tmp_path: Path) -> Iterator[dict]:
    """A torch prefill worker and an MLX decode worker, each its own process."""
    procs = {role: start_worker_process(role, engine, model, key_file, tmp_path / f"{role}.log")
             for role, engine in (("prefill", "torch"), ("decode", "mlx"))}
    try:
        for role, proc in procs.items():
            assert proc.ready.wait(READY_S), f"{role} worker did not start:\n{proc.tail()}"
        yield procs
    finally:
        _stop_all(procs.values())


def _stop_all(procs) -> None:
    for proc in procs:
        if proc.proc.poll() is None:
            proc.proc.terminate()
    for proc in procs:
        try:
            proc.proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.proc.kill()
            proc.proc.wait(5)


def assert_nothing_held(addresses: list[str], key_file: Path, timeout: float = 15.0) -> None:
    """Every worker ends with no request, lease or reserved KV byte (polled: cleanup is asynchronous)."""
    key = load_cluster_key(str(key_file))

    async def held() -> list[tuple[str, int, int, int]]:
        rows = []
        for address in addresses:
            client = WorkerClient(address, key)
            try:
                h = await client.health(timeout=5)
                rows.append((address, h.active_requests, h.active_leases, h.reserved_kv_bytes))
            finally:
                await client.close()
        return rows

    deadline = time.monotonic() + timeout
    while True:
        rows = asyncio.run(held())
        if all(r[1:] == (0, 0, 0) for r in rows) or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    assert all(r[1:] == (0, 0, 0) for r in rows), f"(address, requests, leases, reserved bytes): {rows}"


# ---------------------------------------------------------------- scenarios


def test_scheduler_killed_and_restarted_finds_its_workers_and_serves(workers: dict, key_file: Path,
                                                                    tmp_path: Path) -> None:
    peers = [w.grpc for w in workers.values()]
    first = Scheduler(key_file, peers, tmp_path / "scheduler-1.log")
    try:
        first.wait_ready(2)
        before = first.chat()
        first.kill()  # SIGKILL: no goodbye, no cleanup
        second = Scheduler(key_file, peers, tmp_path / "scheduler-2.log", port=first.port)
        try:
            began = time.monotonic()
            second.wait_ready(2)
            found_in = time.monotonic() - began
            after = second.chat()
        finally:
            second.stop()
    finally:
        first.stop()
    assert after.choices[0].message.content == before.choices[0].message.content  # greedy: the same answer
    assert found_in < READY_S
    assert_nothing_held(peers, key_file)


def test_a_node_with_another_cluster_key_is_never_used(model: Path, workers: dict, key_file: Path,
                                                       tmp_path: Path) -> None:
    stranger_key = write_config(tmp_path / "stranger.json", generate_key())
    stranger = start_worker_process("decode", "mlx", model, stranger_key, tmp_path / "stranger.log",
                                    "--node-id", "stranger-decode")
    try:
        assert stranger.ready.wait(READY_S), stranger.tail()
        peers = [w.grpc for w in workers.values()]
        scheduler = Scheduler(key_file, [*peers, stranger.grpc], tmp_path / "scheduler.log")
        try:
            health = scheduler.wait_ready(2)
            replies = [scheduler.chat(max_tokens=4) for _ in range(4)]
            time.sleep(1.5)  # a few health-check rounds: the stranger must still be absent
            health = scheduler.health()
        finally:
            scheduler.stop()
        assert "stranger-decode" not in {n["node_id"] for n in health["nodes"]}
        for reply in replies:
            stats = reply.model_extra["pdcluster"]
            assert "stranger-decode" not in (stats["prefill_node"], stats["decode_node"])
        assert_nothing_held(peers, key_file)
    finally:
        _stop_all([stranger])


def test_two_clusters_on_one_host_both_keep_working(model: Path) -> None:
    """Two `pdc up` clusters, each with its own key, browsing mDNS on the same loopback."""
    from cluster.launcher import LocalCluster, UpConfig

    configs = [UpConfig(model=str(model), port=free_port()) for _ in range(2)]
    with LocalCluster(configs[0]) as one, LocalCluster(configs[1]) as two:
        healths = [one.wait_ready(), two.wait_ready()]
        texts = []
        for cluster in (one, two):
            import openai

            client = openai.OpenAI(base_url=cluster.url + "/v1", api_key="unused", timeout=120, max_retries=0)
            reply = client.chat.completions.create(model=client.models.list().data[0].id, messages=MESSAGES,
                                                   max_tokens=8, temperature=0)
            texts.append(reply.choices[0].message.content)
            stats = reply.model_extra["pdcluster"]
            own = {n["node_id"] for n in cluster.wait_ready()["nodes"]}
            assert {stats["prefill_node"], stats["decode_node"]} <= own
    assert texts[0] == texts[1]  # the same model, greedy: each cluster answered on its own nodes
    ids = [{n["node_id"] for n in h["nodes"]} for h in healths]
    assert len(ids[0]) == len(ids[1]) == 2 and not ids[0] & ids[1]
