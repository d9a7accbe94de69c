"""``pdc status``: a table of what it finds, and what it tried when it finds nothing."""
from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import uuid
from pathlib import Path

from cluster.auth import generate_key, write_config
from cluster.discovery import Advertiser
from cluster.node import NodeInfo


def _node(key_fp: str) -> NodeInfo:
    return NodeInfo(
        node_id=f"status-{uuid.uuid4().hex[:8]}", roles=("prefill", "decode"), engine="torch", model_id="tiny",
        weights_fingerprint="abc", host="127.0.0.1", grpc_port=50999, kv_port=50998, device="cpu",
        tflops=1.5, mem_bw_gbps=20.0, free_mem_bytes=8 << 30, version="0.1.0", key_fingerprint=key_fp,
    )


def _status(key_file: Path, *extra: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "cluster.cli", "status", "--mdns-interface", "127.0.0.1", "--timeout", "4",
         "--cluster-key-file", str(key_file), *extra],
        capture_output=True, text=True, timeout=60,
    )


def test_status_lists_an_advertised_node_as_a_table(tmp_path: Path) -> None:
    key = generate_key()
    key_file = write_config(tmp_path / "cluster.json", key)
    node = _node(key.fingerprint)

    async def scenario() -> subprocess.CompletedProcess:
        async with Advertiser(node, interfaces=["127.0.0.1"]):
            return await asyncio.to_thread(_status, key_file)

    proc = asyncio.run(scenario())
    assert proc.returncode == 0, proc.stdout + proc.stderr
    header, rule, *rows = proc.stdout.splitlines()
    assert header.split()[:4] == ["node", "roles", "engine", "model"]
    row = next(r for r in rows if r.startswith(node.node_id))
    assert "prefill/decode" in row and "127.0.0.1:50999" in row and "8.0 GiB" in row


def test_status_lists_a_node_with_another_key_as_refused(tmp_path: Path) -> None:
    key_file = write_config(tmp_path / "cluster.json", generate_key())
    stranger = _node(generate_key().fingerprint)

    async def scenario() -> subprocess.CompletedProcess:
        async with Advertiser(stranger, interfaces=["127.0.0.1"]):
            return await asyncio.to_thread(_status, key_file, "--json")

    proc = asyncio.run(scenario())
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    assert stranger.node_id not in [n["node_id"] for n in report["nodes"]]
    assert "key" in report["refused"][stranger.node_id]


def test_status_with_nothing_found_says_what_it_tried(tmp_path: Path) -> None:
    key_file = write_config(tmp_path / "cluster.json", generate_key())
    proc = _status(key_file, "--peers", "127.0.0.1:9")
    assert proc.returncode == 1
    assert "no pdcluster nodes found" in proc.stdout
    assert "_pdcluster._tcp.local. on 127.0.0.1" in proc.stdout
    assert "static peer 127.0.0.1:9" in proc.stdout
    assert "--peers" in proc.stdout  # the multicast hint


def test_status_names_a_refused_node_once_and_without_a_warning(tmp_path: Path) -> None:
    key_file = write_config(tmp_path / "cluster.json", generate_key())
    stranger = _node(generate_key().fingerprint)

    async def scenario() -> subprocess.CompletedProcess:
        async with Advertiser(stranger, interfaces=["127.0.0.1"]):
            return await asyncio.to_thread(_status, key_file)

    proc = asyncio.run(scenario())
    output = proc.stdout + proc.stderr
    mentions = [line for line in output.splitlines() if stranger.node_id in line]
    assert len(mentions) == 1 and mentions[0].startswith("refused "), output  # one line, nothing else
    assert "WARNING" not in proc.stderr
