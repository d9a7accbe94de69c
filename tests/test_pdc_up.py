"""`pdc up` as people run it: the flags it prints reach the cluster, its API
key guards the API, and a failed start says why and keeps its logs."""
from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import urllib.error
import urllib.request
from pathlib import Path

from conftest import ROOT, free_port, requires_torch_and_mlx

pytestmark = requires_torch_and_mlx
READY_S = 180.0


def read_until(proc: subprocess.Popen, marker: str, timeout: float = READY_S) -> list[str]:
    """stdout lines up to and including the first containing ``marker`` (read on a
    thread: a buffered pipe's lines are not visible to select)."""
    lines: list[str] = []
    found = threading.Event()

    def read() -> None:
        for line in proc.stdout:
            lines.append(line)
            if marker in line:
                found.set()

    threading.Thread(target=read, daemon=True).start()
    assert found.wait(timeout), f"no {marker!r} from pdc up in {timeout} s:\n{''.join(lines)}"
    return lines


def status_of(url: str, key: str | None) -> int:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    try:
        with urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=10) as reply:
            return reply.status
    except urllib.error.HTTPError as e:
        return e.code


def test_pdc_up_prints_flags_that_reach_it_and_its_api_key_guards_the_api(make_tiny_model, tmp_path: Path) -> None:
    port = free_port()
    up = subprocess.Popen(
        [sys.executable, "-m", "cluster.cli", "up", "--model", str(make_tiny_model("llama")), "--port", str(port),
         "--decode-engine", "torch", "--api-key", "sesame", "--host", "127.0.0.1"],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, stdin=subprocess.DEVNULL, text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"})
    try:
        lines = read_until(up, "pdc policy --url")
        status_line = next(line for line in lines if "pdc status --cluster-key-file" in line)
        key_file = re.search(r"--cluster-key-file (\S+)", status_line).group(1)
        status = subprocess.run([sys.executable, "-m", "cluster.cli", "status", "--cluster-key-file", key_file,
                                 "--mdns-interface", "127.0.0.1", "--json", "--no-links"],
                                cwd=ROOT, capture_output=True, text=True, timeout=120)
        assert status.returncode == 0, status.stderr
        found = json.loads(status.stdout)
        names = {n["node_id"] for n in found["nodes"]}
        assert any(n.startswith("local-prefill-torch-") for n in names), found
        assert any(n.startswith("local-decode-torch-") for n in names), found
        models = f"http://127.0.0.1:{port}/v1/models"
        assert status_of(models, None) == 401 and status_of(models, "wrong") == 401
        assert status_of(models, "sesame") == 200
        scheduler_cmd = Path(f"/proc/{_child(up.pid, 'serve')}/cmdline").read_bytes() if sys.platform == "linux" else b""
        assert b"sesame" not in scheduler_cmd  # the key travels in the environment, not on a command line
    finally:
        up.send_signal(signal.SIGTERM)
        assert up.wait(60) == 0


def _child(pid: int, word: str) -> int:
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
                cmdline = (entry / "cmdline").read_bytes()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid and word.encode() in cmdline:
                return int(entry.name)
    raise AssertionError(f"no child of {pid} running {word!r}")


def test_a_failed_pdc_up_says_why_in_one_message_and_keeps_its_logs(tmp_path: Path) -> None:
    broken = tmp_path / "broken-model"
    broken.mkdir()
    (broken / "config.json").write_text(json.dumps({"model_type": "llama"}))  # no weights, no tokenizer
    up = subprocess.run([sys.executable, "-m", "cluster.cli", "up", "--model", str(broken), "--port", str(free_port())],
                        cwd=ROOT, capture_output=True, text=True, timeout=READY_S, stdin=subprocess.DEVNULL)
    assert up.returncode == 1, up
    assert "cluster/launcher.py" not in up.stderr  # no traceback of pdc up's own (the child's log tail may have one)
    assert "pdc up: error:" in up.stderr and "exited with code" in up.stderr
    kept = re.search(r"kept in (\S+)", up.stderr).group(1)
    logs = sorted(p.name for p in Path(kept).glob("*.log"))
    assert "scheduler.log" in logs and any(name.endswith("worker.log") for name in logs), logs
