"""Commands that bind a port name it when it is taken, and exit 2 with one line.

Each test holds a port on 127.0.0.1 itself, then runs ``pdc`` as a subprocess;
``pdc up`` must refuse before starting any child.
"""
from __future__ import annotations

import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
TIMEOUT_S = 60.0


@pytest.fixture
def held_port() -> Iterator[int]:
    """A port on 127.0.0.1 that this test listens on."""
    with socket.create_server(("127.0.0.1", 0)) as sock:
        yield sock.getsockname()[1]


def pdc(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "cluster.cli", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=TIMEOUT_S, stdin=subprocess.DEVNULL)


def test_pdc_up_checks_its_port_before_starting_anything(held_port: int) -> None:
    result = pdc("up", "--port", str(held_port))
    assert result.returncode == 2, result
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and f"port {held_port} on 127.0.0.1 is already in use" in lines[0], result.stderr
    assert "pdcluster is up" not in result.stdout and "Traceback" not in result.stderr


def test_pdc_worker_names_a_taken_kv_port(held_port: int, key_file: Path, model: Path) -> None:
    result = pdc("worker", "--role", "decode", "--engine", "torch", "--model", str(model), "--host", "127.0.0.1",
                 "--kv-port", str(held_port), "--cluster-key-file", str(key_file), "--no-advertise",
                 "--tflops", "1", "--mem-bw-gbps", "1")
    assert result.returncode == 2, result
    last = result.stderr.strip().splitlines()[-1]
    assert f"KV port {held_port} on 127.0.0.1" in last and "already in use" in last.lower(), result.stderr
    assert "Traceback" not in result.stderr


def test_pdc_version() -> None:
    result = pdc("--version")
    assert result.returncode == 0 and result.stdout.startswith("pdc "), result


def test_pdc_worker_names_a_taken_grpc_port(held_port: int, key_file: Path, model: Path) -> None:
    result = pdc("worker", "--role", "decode", "--engine", "torch", "--model", str(model), "--host", "127.0.0.1",
                 "--port", str(held_port), "--cluster-key-file", str(key_file), "--no-advertise",
                 "--tflops", "1", "--mem-bw-gbps", "1")
    assert result.returncode == 2, result
    last = result.stderr.strip().splitlines()[-1]
    assert f"gRPC port {held_port} on 127.0.0.1" in last and "already in use" in last, result.stderr
    assert "Traceback" not in result.stderr


def test_pdc_serve_names_a_taken_port(held_port: int, key_file: Path) -> None:
    result = pdc("serve", "--port", str(held_port), "--no-mdns", "--cluster-key-file", str(key_file))
    assert result.returncode == 2, result
    last = result.stderr.strip().splitlines()[-1]
    assert f"--port {held_port}" in last and "already in use" in last, result.stderr
    assert "Traceback" not in result.stderr


def test_pdc_demo_names_a_taken_port_before_starting_anything(held_port: int) -> None:
    result = pdc("demo", "--port", str(held_port))
    assert result.returncode == 2, result
    assert result.stderr.strip().splitlines() == [
        f"pdc demo: error: port {held_port} on 127.0.0.1 is already in use; choose another with --port "
        "(or leave it out for a free one)"]
