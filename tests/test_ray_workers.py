"""pdcluster on a real local Ray cluster: workers as Ray actors, Ray as a node source.

The Ray head is the session's ``ray_head`` (conftest.py): ``ray start --head`` on
127.0.0.1 with token authentication and the resources ``pdc_prefill: 1,
pdc_decode: 1``. Every driver (``pdc ray ...``, ``pdc serve --ray``, the small
scripts that kill actors) is a subprocess; the pytest process never joins Ray.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from conftest import ROOT, SchedulerProcess, generate_key, have, write_config

pytestmark = pytest.mark.skipif(not (have("ray") and have("torch") and have("mlx.core")),
                                reason="needs the ray, torch and mlx extras")

CALL_S = 120.0
DROP_S = 20.0  # a killed actor leaves the table within a few health-check rounds (1 s each)


def pdc(ray_head: Any, *args: str, timeout: float = CALL_S) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "cluster.cli", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, **ray_head.env}, stdin=subprocess.DEVNULL)


def ray_script(ray_head: Any, body: str) -> str:
    """Run ``body`` in a driver joined to the test cluster; its stdout."""
    code = ("import ray\n"
            f"ray.init(address={ray_head.address!r}, namespace='pdcluster', log_to_driver=False)\n" + body)
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=CALL_S,
                          env={**os.environ, **ray_head.env})
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


def ray_up(ray_head: Any, model: Path, key_file: Path, *extra: str) -> list[dict]:
    done = pdc(ray_head, "ray", "up", "--address", ray_head.address, "--model", str(model),
               "--cluster-key-file", str(key_file), "--json", *extra, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])["actors"]


def wait_for(health_of: Callable[[], dict | None], check: Callable[[dict], bool], what: str,
             timeout: float = DROP_S) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        health = health_of()
        if health is not None and check(health):
            return health
        time.sleep(0.25)
    raise AssertionError(f"{what}: not within {timeout} s; last /health: {health_of()}")


def health_of(scheduler: SchedulerProcess) -> Callable[[], dict | None]:
    """/health's body whatever its status (503 while no decode node is up)."""
    def read() -> dict | None:
        try:
            with urllib.request.urlopen(scheduler.url + "/health", timeout=2) as resp:
                return json.loads(resp.read())
        except urllib.error.HTTPError as e:
            return json.loads(e.read())
        except (urllib.error.URLError, ConnectionError, TimeoutError, ValueError):
            return None
    return read


def node_ids(health: dict) -> set[str]:
    return {node["node_id"] for node in health["nodes"]}


@pytest.fixture(scope="module")
def ray_key(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_config(tmp_path_factory.mktemp("raykey") / "cluster.json", generate_key())


@pytest.fixture(scope="module")
def ray_model(make_tiny_model: Callable[..., Path]) -> Path:
    return make_tiny_model("llama")


def test_ray_up_serve_a_split_request_then_lose_an_actor_and_ray_down(
        ray_head: Any, ray_model: Path, ray_key: Path, tmp_path: Path) -> None:
    """Two commands: `pdc ray up`, `pdc serve --ray`. Prefill on one actor, decode on the other,
    through the official openai client; a killed actor leaves the node table; `pdc ray down` cleans up."""
    actors = {a["name"]: a for a in ray_up(ray_head, ray_model, ray_key)}
    assert set(actors) == {"pdc-prefill-0", "pdc-decode-0"}
    assert actors["pdc-prefill-0"]["resources"] == {"pdc_prefill": 1.0}
    assert actors["pdc-decode-0"]["resources"] == {"pdc_decode": 1.0}
    assert all(a["state"] == "ready" and a["grpc_address"].startswith("127.0.0.1:") for a in actors.values())
    scheduler = SchedulerProcess(ray_key, [], tmp_path / "serve.log", None, "--ray", ray_head.address,
                                 env=ray_head.env)
    try:
        health = scheduler.wait_ready(2)
        assert {n["node_id"]: n["source"] for n in health["nodes"]} == {"pdc-prefill-0": "ray", "pdc-decode-0": "ray"}
        reply: Any = scheduler.chat(max_tokens=6)
        record = reply.model_extra["pdcluster"]
        assert (record["prefill_node"], record["decode_node"], record["colocated"]) == \
            ("pdc-prefill-0", "pdc-decode-0", False)
        assert record["kv_bytes"] > 0 and reply.usage.completion_tokens == 6

        status = pdc(ray_head, "status", "--no-links", "--mdns-interface", "127.0.0.1", "--timeout", "0.5", "--ray",
                     ray_head.address, "--cluster-key-file", str(ray_key), "--json")
        assert status.returncode == 0, status.stderr[-2000:]
        assert {n["node_id"]: n["source"] for n in json.loads(status.stdout)["nodes"]} == \
            {"pdc-prefill-0": "ray", "pdc-decode-0": "ray"}
        listed = pdc(ray_head, "ray", "status", "--address", ray_head.address, "--cluster-key-file", str(ray_key),
                     "--json")
        assert listed.returncode == 0, listed.stdout + listed.stderr[-2000:]
        assert {a["name"]: a["health"] for a in json.loads(listed.stdout)["actors"]} == \
            {"pdc-prefill-0": "ok", "pdc-decode-0": "ok"}

        again = pdc(ray_head, "ray", "up", "--address", ray_head.address, "--model", str(ray_model))
        assert again.returncode == 2 and "already exist" in again.stderr, again.stderr[-2000:]

        ray_script(ray_head, "ray.kill(ray.get_actor('pdc-decode-0'), no_restart=True)\n")
        health = wait_for(health_of(scheduler), lambda h: node_ids(h) == {"pdc-prefill-0"}, "the killed actor to leave")
    finally:
        scheduler.stop()
        down = pdc(ray_head, "ray", "down", "--address", ray_head.address)
    assert down.returncode == 0, down.stdout + down.stderr[-2000:]
    assert "pdc-prefill-0: removed" in down.stdout
    assert "[]" in ray_script(ray_head, "from cluster import ray_backend as rb\nprint(rb.worker_names())\n")


def test_an_actor_with_another_clusters_key_is_refused(
        ray_head: Any, ray_model: Path, ray_key: Path, tmp_path: Path) -> None:
    """A worker actor started with another key answers no call of ours: refused, never placed."""
    other = write_config(tmp_path / "other.json", generate_key())
    ray_up(ray_head, ray_model, other, "--prefix", "evil", "--decode", "0")
    scheduler = SchedulerProcess(ray_key, [], tmp_path / "serve.log", None, "--ray", ray_head.address,
                                 env=ray_head.env)
    try:
        health = wait_for(health_of(scheduler), lambda h: any("evil-prefill-0" in k for k in h.get("refused", {})),
                          "the actor with another key to be refused", timeout=60)
        assert health["nodes"] == []
        (reason,) = [v for k, v in health["refused"].items() if "evil-prefill-0" in k]
        assert "UNAUTHENTICATED" in reason
    finally:
        scheduler.stop()
        pdc(ray_head, "ray", "down", "--address", ray_head.address)


@pytest.mark.slow
def test_with_restart_a_killed_actor_rejoins_on_new_ports_and_serves_again(
        ray_head: Any, ray_model: Path, ray_key: Path, tmp_path: Path) -> None:
    actors = {a["name"]: a for a in ray_up(ray_head, ray_model, ray_key, "--restart", "--prefix", "re")}
    before = actors["re-decode-0"]["grpc_address"]
    scheduler = SchedulerProcess(ray_key, [], tmp_path / "serve.log", None, "--ray", ray_head.address,
                                 env=ray_head.env)
    try:
        scheduler.wait_ready(2)
        ray_script(ray_head, "ray.kill(ray.get_actor('re-decode-0'), no_restart=False)\n")
        wait_for(health_of(scheduler), lambda h: "re-decode-0" not in node_ids(h), "the killed actor to leave")
        health = wait_for(health_of(scheduler), lambda h: node_ids(h) == {"re-prefill-0", "re-decode-0"},
                          "the restarted actor to rejoin", timeout=CALL_S)
        (after,) = [n["address"] for n in health["nodes"] if n["node_id"] == "re-decode-0"]
        assert after != before  # a new process on new ports
        record = scheduler.chat(max_tokens=4).model_extra["pdcluster"]  # type: ignore[attr-defined]
        assert (record["prefill_node"], record["decode_node"]) == ("re-prefill-0", "re-decode-0")
        listed = json.loads(pdc(ray_head, "ray", "status", "--address", ray_head.address, "--json",
                                "--cluster-key-file", str(ray_key)).stdout)["actors"]
        assert {a["name"]: a["restarted"] for a in listed} == {"re-prefill-0": False, "re-decode-0": True}
    finally:
        scheduler.stop()
        pdc(ray_head, "ray", "down", "--address", ray_head.address)


def test_ray_up_refuses_bad_resources_and_cleans_up_actors_no_node_can_host(ray_head: Any, ray_model: Path, ray_key: Path) -> None:
    bad = pdc(ray_head, "ray", "up", "--address", ray_head.address, "--prefill-resources", "[1]")
    assert bad.returncode == 2 and "JSON object of resource name" in bad.stderr
    missing = pdc(ray_head, "ray", "up", "--address", ray_head.address, "--model", str(ray_model),
                  "--cluster-key-file", str(ray_key), "--prefix", "nowhere", "--decode", "0",
                  "--prefill-resources", '{"pdc_gpu_box": 1}', "--timeout", "5")
    assert missing.returncode == 1 and "pdc_gpu_box" in missing.stderr, missing.stderr[-2000:]
    assert "nowhere" not in ray_script(ray_head, "from cluster import ray_backend as rb\nprint(rb.worker_names())\n")


def test_nothing_imports_ray_unless_a_ray_command_or_flag_is_used() -> None:
    code = ("import sys\n"
            "from cluster.cli import build_parser\n"
            "import scheduler.service, cluster.node_table, cluster.status, workers.rpc.server\n"
            "build_parser().parse_args(['serve'])\n"
            "assert scheduler.service.ray_source(None) is None\n"
            "print('ray' in sys.modules)\n")
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=CALL_S)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip() == "False"
