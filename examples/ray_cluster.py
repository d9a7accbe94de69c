"""A prefill/decode pdcluster on Ray, end to end on one machine.

Starts a private single-node Ray cluster on 127.0.0.1 (token auth on, the
resources ``pdc_prefill: 1, pdc_decode: 1``), then runs the two commands a Ray
user runs: ``pdc ray up`` and ``pdc serve --ray``. Asks one question through
the openai client, prints where it ran, and tears everything down.

    python examples/ray_cluster.py                      # the built-in default model
    python examples/ray_cluster.py --model tiny-llama   # a random-weight preset, faster

With an existing Ray cluster, skip this script: see docs/ray.md.
"""
from __future__ import annotations

import argparse
import json
import os
import secrets
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

PDC = [sys.executable, "-m", "cluster.cli"]
ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_ray_head(env: dict[str, str], temp_dir: str) -> tuple[subprocess.Popen, str]:
    port = free_port()
    head = subprocess.Popen(
        [str(Path(sys.executable).with_name("ray")), "start", "--head", "--block", "--node-ip-address", "127.0.0.1", "--port", str(port),
         "--num-cpus", "2", "--resources", json.dumps({"pdc_prefill": 1, "pdc_decode": 1}),
         "--include-dashboard=false", "--disable-usage-stats", "--temp-dir", temp_dir],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    address = f"127.0.0.1:{port}"
    probe = [sys.executable, "-c", f"import ray; ray.init(address={address!r}, log_to_driver=False)"]
    for _ in range(60):
        if subprocess.run(probe, env=env, capture_output=True, timeout=60).returncode == 0:
            return head, address
        time.sleep(1)
    head.terminate()
    raise SystemExit("the local Ray head did not come up within a minute")


def wait_ready(url: str, timeout_s: float = 300) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(url + "/health", timeout=2) as resp:
                if json.loads(resp.read())["status"] == "ok":
                    return
        except (urllib.error.URLError, ConnectionError, TimeoutError, ValueError):
            pass
        time.sleep(0.5)
    raise SystemExit(f"the scheduler at {url} was not ready within {timeout_s:g} s")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="model folder or built-in name (default: the built-in default)")
    args = parser.parse_args()
    import openai

    workdir = tempfile.mkdtemp(prefix="pdcray-")
    env = {**os.environ, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_USAGE_STATS_ENABLED": "0",
           "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(32),
           "PDC_CLUSTER_KEY": secrets.token_hex(32)}
    head, address = start_ray_head(env, workdir)
    scheduler = None
    try:
        model = ["--model", args.model] if args.model else []
        if subprocess.run([*PDC, "ray", "up", "--address", address, *model], env=env, cwd=ROOT,
                          timeout=600).returncode != 0:
            return 1  # pdc ray up said why
        port = free_port()
        scheduler = subprocess.Popen([*PDC, "serve", "--no-mdns", "--ray", address, "--port", str(port)], env=env,
                                     cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        url = f"http://127.0.0.1:{port}"
        wait_ready(url)
        client = openai.OpenAI(base_url=url + "/v1", api_key="unused", timeout=120, max_retries=0)
        model_id = client.models.list().data[0].id
        reply = client.chat.completions.create(model=model_id, max_tokens=24, temperature=0,
                                               messages=[{"role": "user", "content": "What is the capital of France?"}])
        record = reply.model_extra["pdcluster"]
        print(f"\nanswer: {reply.choices[0].message.content!r}")
        print(f"prefill on {record['prefill_node']}, decode on {record['decode_node']}, "
              f"{record['kv_bytes']:,} KV bytes, TTFT {record['ttft_s'] * 1000:.0f} ms")
    finally:
        if scheduler is not None:
            scheduler.terminate()
            scheduler.wait(30)
        subprocess.run([*PDC, "ray", "down", "--address", address], env=env, cwd=ROOT, timeout=120)
        head.send_signal(signal.SIGTERM)  # ray start --block stops what it started
        head.wait(60)
    return 0


if __name__ == "__main__":
    sys.exit(main())
