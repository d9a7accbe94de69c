"""Fault injection with real processes: a scheduler killed and restarted, a
stranger with another cluster key, a second cluster on the same host.

Each test starts real `pdc worker` and `pdc serve` processes on 127.0.0.1,
kills one with SIGKILL at the chosen moment, and asserts what clients see and
that no worker holds a lease, a reservation or a request afterwards.
"""
from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import (
    READY_S,
    SchedulerProcess,
    assert_nothing_held,
    free_port,
    requires_torch_and_mlx,
    start_worker_process,
    stop_processes,
)

from cluster.auth import generate_key, write_config

pytestmark = [
    pytest.mark.slow,
    requires_torch_and_mlx,
]

MESSAGES = [{"role": "user", "content": "Say something about caches."}]


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
        stop_processes(procs.values())


# ---------------------------------------------------------------- scenarios


def test_scheduler_killed_and_restarted_finds_its_workers_and_serves(workers: dict, key_file: Path,
                                                                    tmp_path: Path) -> None:
    peers = [w.grpc for w in workers.values()]
    first = SchedulerProcess(key_file, peers, tmp_path / "scheduler-1.log")
    try:
        first.wait_ready(2)
        before = first.chat()
        first.kill()  # SIGKILL: no goodbye, no cleanup
        second = SchedulerProcess(key_file, peers, tmp_path / "scheduler-2.log", port=first.port)
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
        scheduler = SchedulerProcess(key_file, [*peers, stranger.grpc], tmp_path / "scheduler.log")
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
        stop_processes([stranger])


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
            nodes = cluster.wait_ready()["nodes"]
            assert {stats["prefill_node"], stats["decode_node"]} <= {n["node_id"] for n in nodes}
            assert_nothing_held([n["address"] for n in nodes], Path(cluster.key_file))
    assert texts[0] == texts[1]  # the same model, greedy: each cluster answered on its own nodes
    ids = [{n["node_id"] for n in h["nodes"]} for h in healths]
    assert len(ids[0]) == len(ids[1]) == 2 and not ids[0] & ids[1]
