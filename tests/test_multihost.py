"""Two "hosts" for real: a prefill worker and a decode worker in two network
namespaces joined by a veth pair, so mDNS discovery and the KV stream cross a
link rather than the loopback interface.

    namespace A (10.213.N.1)             namespace B (10.213.N.2)
    prefill worker (torch)  --- veth --- decode worker (mlx, else torch)
                                         scheduler on 127.0.0.1 + openai client

The test creates the namespaces itself, optionally shapes the link with ``tc``,
and removes everything afterwards (processes first, then ``ip netns del``,
which also deletes the veth pair), even on failure. It needs root and
iproute2; where namespaces cannot be made it skips with the reason. Traffic
goes only to 127.0.0.1 inside B and to the two namespace addresses.
"""
from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import have

REPO = Path(__file__).resolve().parents[1]
READY_TIMEOUT_S = 120.0
CLIENT_TIMEOUT_S = 180.0
IP_TIMEOUT_S = 15.0

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(sys.platform != "linux", reason="network namespaces are Linux-only"),
    pytest.mark.skipif(not (have("torch") and have("openai")), reason="needs the torch extra and the openai client"),
]


def _ip(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["ip", *args], capture_output=True, text=True, timeout=IP_TIMEOUT_S)


def _must(*args: str) -> None:
    done = _ip(*args)
    if done.returncode != 0:
        raise RuntimeError(f"`ip {' '.join(args)}` failed ({done.returncode}): {done.stderr.strip()}")


class NetnsPair:
    """Two namespaces A and B, a veth pair between them, one address at each end."""

    def __init__(self) -> None:
        tag = secrets.token_hex(3)
        self.ns_a, self.ns_b = f"pdc-a-{tag}", f"pdc-b-{tag}"
        self.if_a, self.if_b = f"pdca{tag}", f"pdcb{tag}"  # <= 15 chars
        subnet = 16 + secrets.randbelow(224)
        self.addr_a, self.addr_b = f"10.213.{subnet}.1", f"10.213.{subnet}.2"
        self.created: list[str] = []
        self.shaping = "none"

    def create(self) -> None:
        for ns in (self.ns_a, self.ns_b):
            _must("netns", "add", ns)
            self.created.append(ns)
        # Made directly inside the namespaces: the host's own interface list is never touched.
        _must("link", "add", self.if_a, "netns", self.ns_a, "type", "veth", "peer", "name", self.if_b, "netns", self.ns_b)
        for ns, dev, addr in ((self.ns_a, self.if_a, self.addr_a), (self.ns_b, self.if_b, self.addr_b)):
            _must("-n", ns, "addr", "add", f"{addr}/24", "dev", dev)
            _must("-n", ns, "link", "set", "lo", "up")
            _must("-n", ns, "link", "set", dev, "up")
            # No multicast route is added: with --mdns-interface zeroconf sets IP_MULTICAST_IF
            # to that address, so mDNS leaves by the veth although the namespace has no routes
            # beyond its /24 (this test would fail if that ever stopped being true).
        self.shaping = self._shape()

    def _shape(self) -> str:
        """Shape both ends: 1 ms netem delay where the kernel has netem, else a 1 Gbit/s tbf."""
        tried = []
        for qdisc in (["netem", "delay", "1ms"], ["tbf", "rate", "1gbit", "burst", "256kb", "latency", "50ms"]):
            results = [subprocess.run(["tc", "-n", ns, "qdisc", "add", "dev", dev, "root", *qdisc],
                                      capture_output=True, text=True, timeout=IP_TIMEOUT_S)
                       for ns, dev in ((self.ns_a, self.if_a), (self.ns_b, self.if_b))]
            if all(r.returncode == 0 for r in results):
                return " ".join(qdisc) + " on both veth ends"
            tried.append(f"{qdisc[0]}: {'; '.join(r.stderr.strip() for r in results if r.returncode)}")
            for ns, dev in ((self.ns_a, self.if_a), (self.ns_b, self.if_b)):
                subprocess.run(["tc", "-n", ns, "qdisc", "del", "dev", dev, "root"], capture_output=True, timeout=IP_TIMEOUT_S)
        return "none (" + " | ".join(tried) + ")"

    def destroy(self) -> None:
        for ns in reversed(self.created):  # deleting a namespace deletes its end of the veth, and so the pair
            done = _ip("netns", "del", ns)
            if done.returncode != 0:
                print(f"warning: ip netns del {ns}: {done.stderr.strip()}", file=sys.stderr)
        self.created.clear()


@pytest.fixture()
def netns_pair():
    if shutil.which("ip") is None:
        pytest.skip("multi-host test skipped: iproute2's `ip` is not installed")
    if os.geteuid() != 0:
        pytest.skip(f"multi-host test skipped: creating network namespaces needs root (euid {os.geteuid()})")
    pair = NetnsPair()
    try:
        pair.create()
    except (RuntimeError, OSError, subprocess.TimeoutExpired) as e:
        pair.destroy()
        reason = f"multi-host test skipped: cannot create network namespaces here: {e}"
        print(reason)
        pytest.skip(reason)
    print(f"namespaces {pair.ns_a} ({pair.addr_a}) <-> {pair.ns_b} ({pair.addr_b}) over veth "
          f"{pair.if_a}/{pair.if_b}; link shaping: {pair.shaping}")
    try:
        yield pair
    finally:
        pair.destroy()


class Procs:
    """Child processes started inside namespaces, each logging to a file."""

    def __init__(self, log_dir: Path) -> None:
        self.log_dir = log_dir
        self.procs: list[tuple[str, subprocess.Popen, Path]] = []
        self.env = {k: v for k, v in os.environ.items() if "proxy" not in k.lower()}
        self.env.update(PYTHONUNBUFFERED="1", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", NO_PROXY="*")

    def spawn(self, name: str, ns: str, args: list[str]) -> None:
        log = self.log_dir / f"{name}.log"
        with log.open("w") as out:
            proc = subprocess.Popen(["ip", "netns", "exec", ns, sys.executable, "-m", "cluster.cli", *args],
                                    cwd=REPO, env=self.env, stdout=out, stderr=subprocess.STDOUT,
                                    stdin=subprocess.DEVNULL, start_new_session=True)
        self.procs.append((name, proc, log))

    def check_alive(self) -> None:
        for name, proc, _ in self.procs:
            if proc.poll() is not None:
                raise AssertionError(f"{name} exited with {proc.returncode}\n{self.tails()}")

    def tails(self, lines: int = 40) -> str:
        out = []
        for name, _, log in self.procs:
            text = log.read_text(errors="replace").splitlines() if log.exists() else []
            out.append(f"----- {name} ({log}), last {lines} lines -----\n" + "\n".join(text[-lines:]))
        return "\n".join(out)

    def stop(self) -> None:
        # `ip netns exec` execs the command, so each pid is the python process itself; each has its
        # own session, so its process group holds it and anything it started.
        for _, proc, _ in reversed(self.procs):
            if proc.poll() is None:
                _signal_group(proc, signal.SIGTERM)
        deadline = time.monotonic() + 10
        for _, proc, _ in self.procs:
            try:
                proc.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                _signal_group(proc, signal.SIGKILL)
                proc.wait(5)


def _signal_group(proc: subprocess.Popen, sig: int) -> None:
    try:
        os.killpg(proc.pid, sig)
    except ProcessLookupError:
        pass


def _in_ns(ns: str, code: str, env: dict, timeout: float) -> subprocess.CompletedProcess:
    return subprocess.run(["ip", "netns", "exec", ns, sys.executable, "-c", code], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=timeout)


HEALTH_SNIPPET = """
import json, sys, urllib.error, urllib.request
try:
    with urllib.request.urlopen("http://127.0.0.1:{port}/health", timeout=3) as r:
        print(json.dumps({{"status": r.status, "body": json.loads(r.read())}}))
except urllib.error.HTTPError as e:
    print(json.dumps({{"status": e.code, "body": json.loads(e.read() or b"null")}}))
except (OSError, ValueError) as e:
    print(json.dumps({{"status": None, "error": repr(e)}}))
"""

CLIENT_SNIPPET = """
import json, openai
client = openai.OpenAI(base_url="http://127.0.0.1:{port}/v1", api_key="x", timeout=120, max_retries=0)
model = client.models.list().data[0].id
messages = [{{"role": "user", "content": "Tell me about prefill and decode across two machines."}}]
out = {{"model": model}}
for placement in ("disaggregated", "colocated"):
    reply = client.chat.completions.create(model=model, messages=messages, max_tokens=24, temperature=0,
                                           extra_body={{"pdcluster": {{"placement": placement}}}})
    out[placement] = {{"text": reply.choices[0].message.content, "pdcluster": reply.model_extra["pdcluster"],
                      "completion_tokens": reply.usage.completion_tokens}}
print(json.dumps(out))
"""


def _free_port_hint() -> int:
    # The scheduler binds 127.0.0.1 inside B, a fresh namespace where nothing else binds loopback
    # (the decode worker binds B's veth address), so any port is free there.
    return 20000 + secrets.randbelow(20000)


def test_prefill_and_decode_in_two_namespaces_over_mdns_and_a_veth(netns_pair: NetnsPair, make_tiny_model,
                                                                  tmp_path: Path) -> None:
    from cluster.auth import generate_key, write_config

    pair = netns_pair
    model = str(make_tiny_model("qwen3"))
    key_file = str(write_config(tmp_path / "cluster.json", generate_key()))
    decode_engine = "mlx" if have("mlx.core") else "torch"
    tag = pair.ns_a.rsplit("-", 1)[1]
    prefill_id, decode_id = f"mh-prefill-a-{tag}", f"mh-decode-b-{tag}"
    port = _free_port_hint()
    common = ["--cluster-key-file", key_file]

    procs = Procs(tmp_path)
    started = time.monotonic()
    try:
        procs.spawn("scheduler-b", pair.ns_b, ["serve", "--host", "127.0.0.1", "--port", str(port),
                                               "--mdns-interface", pair.addr_b, *common])
        procs.spawn("prefill-a", pair.ns_a, ["worker", "--role", "prefill", "--engine", "torch", "--model", model,
                                             "--host", pair.addr_a, "--mdns-interface", pair.addr_a,
                                             "--node-id", prefill_id, *common])
        procs.spawn("decode-b", pair.ns_b, ["worker", "--role", "decode", "--engine", decode_engine, "--model", model,
                                            "--host", pair.addr_b, "--mdns-interface", pair.addr_b,
                                            "--node-id", decode_id, *common])

        health: dict = {}
        deadline = time.monotonic() + READY_TIMEOUT_S
        while time.monotonic() < deadline:
            procs.check_alive()
            done = _in_ns(pair.ns_b, HEALTH_SNIPPET.format(port=port), procs.env, timeout=15)
            if done.returncode == 0 and done.stdout.strip():
                health = json.loads(done.stdout.strip().splitlines()[-1])
                if health.get("status") == 200 and len(health["body"].get("nodes", [])) == 2:
                    break
            time.sleep(0.5)
        else:
            pytest.fail(f"cluster not ready after {READY_TIMEOUT_S:.0f} s; last health: {health}")
        ready_s = time.monotonic() - started

        nodes = {n["node_id"]: n for n in health["body"]["nodes"]}
        assert set(nodes) == {prefill_id, decode_id}, health
        assert nodes[prefill_id]["source"] == "mdns" and nodes[decode_id]["source"] == "mdns", health
        assert nodes[prefill_id]["address"].startswith(pair.addr_a + ":"), health
        assert nodes[decode_id]["address"].startswith(pair.addr_b + ":"), health

        try:
            done = _in_ns(pair.ns_b, CLIENT_SNIPPET.format(port=port), procs.env, timeout=CLIENT_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            pytest.fail(f"client did not finish in {CLIENT_TIMEOUT_S:.0f} s")
        assert done.returncode == 0, f"client failed:\n{done.stderr[-3000:]}"
        result = json.loads(done.stdout.strip().splitlines()[-1])
        split, single = result["disaggregated"], result["colocated"]
        print(f"ready in {ready_s:.1f} s; decode engine {decode_engine}; link shaping: {pair.shaping}")
        print(json.dumps(result, indent=2))

        stats = split["pdcluster"]
        assert stats["prefill_node"] == prefill_id, result
        assert stats["decode_node"] == decode_id, result
        assert stats["kv_bytes"] > 0, result
        assert single["pdcluster"]["prefill_node"] == single["pdcluster"]["decode_node"], result
        assert split["completion_tokens"] == single["completion_tokens"] == 24, result
        assert split["text"] == single["text"], result
    except BaseException:
        print(procs.tails(), file=sys.stderr)  # shown by pytest under "Captured stderr call"
        raise
    finally:
        procs.stop()


PROBE_SNIPPET = """
import asyncio, json
from cluster.auth import load_cluster_key
from workers.rpc.client import WorkerClient
async def main():
    async with WorkerClient("{prefill}", load_cluster_key("{key_file}")) as prefill:
        reply = await prefill.probe_link("{kv_host}", {kv_port}, payload_bytes={payload}, pings=5, timeout=30)
    print(json.dumps({{"gbps": reply.gbps, "latency_s": reply.latency_s, "payload_bytes": reply.payload_bytes,
                      "payload_s": reply.payload_s}}))
asyncio.run(main())
"""
SHAPED_GBPS = 1.0


def _shape_with_tbf(pair: NetnsPair) -> None:
    """Replace whatever shaping the pair has with a 1 Gbit/s tbf on both ends, or skip saying why."""
    for ns, dev in ((pair.ns_a, pair.if_a), (pair.ns_b, pair.if_b)):
        done = subprocess.run(["tc", "-n", ns, "qdisc", "replace", "dev", dev, "root", "tbf", "rate",
                               f"{SHAPED_GBPS:g}gbit", "burst", "256kb", "latency", "50ms"],
                              capture_output=True, text=True, timeout=IP_TIMEOUT_S)
        if done.returncode != 0:
            reason = f"link probe test skipped: cannot shape {dev} with tc tbf: {done.stderr.strip()}"
            print(reason)
            pytest.skip(reason)


def _wait_ready(procs: Procs, name: str) -> str:
    """The ready line a worker printed to its log."""
    log = next(log for n, _, log in procs.procs if n == name)
    deadline = time.monotonic() + READY_TIMEOUT_S
    while time.monotonic() < deadline:
        procs.check_alive()
        ready = [line for line in log.read_text(errors="replace").splitlines() if " ready: " in line]
        if ready:
            return ready[0]
        time.sleep(0.2)
    pytest.fail(f"{name} not ready after {READY_TIMEOUT_S:.0f} s\n{procs.tails()}")


def test_link_probe_across_the_veth_measures_its_1gbit_tbf_rate(netns_pair: NetnsPair, make_tiny_model,
                                                                 tmp_path: Path) -> None:
    from cluster.auth import generate_key, write_config

    pair = netns_pair
    if shutil.which("tc") is None:
        pytest.skip("link probe test skipped: iproute2's `tc` is not installed")
    _shape_with_tbf(pair)
    model = str(make_tiny_model("qwen3"))
    key_file = str(write_config(tmp_path / "cluster.json", generate_key()))
    port = _free_port_hint()  # fresh namespaces: nothing else binds their addresses
    common = ["--engine", "torch", "--model", model, "--cluster-key-file", key_file, "--no-advertise",
              "--tflops", "1", "--mem-bw-gbps", "100", "--port", str(port), "--kv-port", str(port + 1)]

    procs = Procs(tmp_path)
    try:
        procs.spawn("prefill-a", pair.ns_a, ["worker", "--role", "prefill", "--host", pair.addr_a, *common])
        procs.spawn("decode-b", pair.ns_b, ["worker", "--role", "decode", "--host", pair.addr_b, *common])
        for name in ("prefill-a", "decode-b"):
            _wait_ready(procs, name)

        payload = 32 << 20  # ~0.27 s at 1 Gbit/s: long enough that slow start and the tbf burst wash out
        snippet = PROBE_SNIPPET.format(prefill=f"{pair.addr_a}:{port}", key_file=key_file, kv_host=pair.addr_b,
                                       kv_port=port + 1, payload=payload)
        try:
            done = _in_ns(pair.ns_a, snippet, procs.env, timeout=60)
        except subprocess.TimeoutExpired:
            pytest.fail("ProbeLink did not answer in 60 s")
        assert done.returncode == 0, f"probe failed:\n{done.stderr[-3000:]}"
        measured = json.loads(done.stdout.strip().splitlines()[-1])
        print(f"probe {pair.addr_a} -> {pair.addr_b}:{port + 1} over tbf {SHAPED_GBPS:g} Gbit/s: "
              f"{measured['gbps']:.3f} Gbit/s, one-way latency {measured['latency_s'] * 1e3:.3f} ms, "
              f"{measured['payload_bytes']} bytes in {measured['payload_s']:.3f} s")

        assert measured["payload_bytes"] == payload, measured
        assert 0.5 * SHAPED_GBPS <= measured["gbps"] <= 1.2 * SHAPED_GBPS, measured
        assert 0 < measured["latency_s"] < 0.05, measured  # tbf may queue up to 50 ms; an idle veth far less
    except BaseException:
        print(procs.tails(), file=sys.stderr)
        raise
    finally:
        procs.stop()
