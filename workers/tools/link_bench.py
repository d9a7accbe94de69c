"""``pdc bench link``: home links, emulated and measured.

Two real ``pdc worker`` processes run as if on two machines joined by a home
link (workers/tools/netns.py): the prefill worker in one network namespace,
the decode worker (roles prefill and decode, held to ``--decode-cpu`` of one
CPU, a node that computes slower than its peer) and ``pdc serve`` in the
other, on a veth pair shaped with ``tc`` as 1 GbE, 2.5 GbE, 10 GbE or Wi-Fi 6.
The scheduler finds both workers through static ``--peers`` (no mDNS) and
probes the link itself (``ProbeLink``: its payload rate and latency are what
``conditional`` decides with and what the theory uses).

The pipeline, per link class:

1. shape the veth (tbf for the rate, netem for delay and jitter where the
   kernel has it) and start a fresh scheduler, which probes the link;
2. run the plan from inside the decode namespace (workers/tools/link_client.py):
   per prompt length and repeat, one request forced ``colocated`` and one
   forced ``disaggregated`` per codec (``"pdcluster": {"kv_codec": ...}``),
   then one per codec left to the ``conditional`` policy: its decision;
3. ask ``pdc simulate`` (a subprocess: tools never import the scheduler) for
   the same nodes, as they measured themselves, and the probed link;
4. one row per codec x prompt length (workers/tools/link_report.py).

Every request, wait and subprocess is bounded in time; the namespaces, the
cgroup and every process go on every exit path (finally, SIGTERM/SIGHUP,
atexit), and ``--cleanup`` (run first on every start) removes what a run
killed with SIGKILL left. Traffic: 127.0.0.1 inside the decode namespace and
the two private addresses of the veth, nothing else.
"""
from __future__ import annotations

import argparse
import atexit
import contextlib
import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from workers.tools import link_report as report
from workers.tools.bench import bench_main
from workers.tools.link_report import (
    LINK_CLASSES,
    SCALED_LINK_CLASSES,
    LinkClass,
    LinkMeasure,
)
from workers.tools.netns import CpuShare, NetnsError, NetnsPair, Shaping, cleanup_stale

REPO = Path(__file__).resolve().parents[2]
CODECS = ("raw", "int8", "fp8")
GRPC_PORT, KV_PORT, HTTP_PORT = 50051, 50052, 8000  # fresh namespaces: nothing else binds there
STOP_GRACE_S = 10.0
SIM_TIMEOUT_S = 120.0
# The bench's model: KV-heavy for its compute (MHA, 8 x 128 per layer, a 64-wide residual), so
# that on this kind of CPU a prefill produces KV about as fast as 1 GbE carries it; 96 KiB/token in
# bf16 (an 8B Llama's is 128 KiB). Built once from seeded random weights, like pdc make-model.
LINK_MODEL_SHAPE = {"hidden_size": 64, "num_hidden_layers": 24, "num_attention_heads": 8,
                    "num_key_value_heads": 8, "head_dim": 128, "intermediate_size": 128}
LINK_MODEL_NAME = "link-llama-seed0"


@dataclass(frozen=True)
class LinkBenchConfig:
    """One ``pdc bench link`` run."""

    links: tuple[LinkClass, ...]
    codecs: tuple[str, ...] = ("raw", "int8")
    prompt_tokens: tuple[int, ...] = (128, 256, 512)
    repeats: int = 2
    warmups: int = 2  # per placement, codec and prompt length, before the measured requests (calibration)
    decode_cpu: float = 0.5  # share of one CPU for the decode node (>= 1: unlimited)
    threads: int = 1  # OMP_NUM_THREADS of each worker
    model: str | None = None  # None: the bench's own model (built on first use)
    dtype: str = "bfloat16"
    request_timeout_s: float = 120.0
    link_deadline_s: float = 900.0  # the whole plan of one link
    ready_timeout_s: float = 300.0
    simulate: bool = True
    log_dir: str | None = None

    def __post_init__(self) -> None:
        if not self.links:
            raise ValueError("--emulate needs at least one link class")
        bad = [c for c in self.codecs if c not in CODECS]
        if not self.codecs or bad:
            raise ValueError(f"--codecs takes {', '.join(CODECS)}; got {','.join(self.codecs)!r}")
        if self.repeats < 1 or self.threads < 1 or self.warmups < 1:
            raise ValueError("--repeats, --warmups and --threads must be >= 1")
        if not 0.05 <= self.decode_cpu:
            raise ValueError(f"--decode-cpu must be >= 0.05 (a share of one CPU; 1: no limit), got {self.decode_cpu}")
        for name in ("request_timeout_s", "link_deadline_s", "ready_timeout_s"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be > 0")


# ---------------------------------------------------------------- the model


def ensure_link_model(folder: Path | None = None) -> Path:
    """The bench's model folder, built from seeded random weights on first use."""
    import numpy as np  # noqa: F401  (make_model's dependency, imported here for a clear error)
    from safetensors.numpy import save_file
    from tokenizers import Tokenizer

    from cluster.paths import cache_dir
    from workers.tools.modelgen import build_weights, make_model

    out = folder or cache_dir() / "models" / LINK_MODEL_NAME
    marker = out / "pdcluster-model.json"
    if marker.is_file() and json.loads(marker.read_text()).get("shape") == LINK_MODEL_SHAPE:
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".link-model-", dir=out.parent))  # same filesystem: rename is atomic
    make_model(tmp, "llama", seed=0, preset="tiny")
    config = {**json.loads((tmp / "config.json").read_text()), **LINK_MODEL_SHAPE,
              "torch_dtype": "bfloat16", "dtype": "bfloat16"}  # the cost model prices KV in bf16 too
    for key in ("sliding_window", "use_sliding_window", "layer_types"):  # every layer attends to the whole prompt
        config.pop(key, None)
    num_tokens = Tokenizer.from_file(str(tmp / "tokenizer.json")).get_vocab_size()
    save_file(build_weights(config, 0, num_tokens), str(tmp / "model.safetensors"), metadata={"format": "pt"})
    (tmp / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    marker_text = {"kind": "random", "arch": "llama", "seed": 0, "preset": "link", "shape": LINK_MODEL_SHAPE}
    (tmp / "pdcluster-model.json").write_text(json.dumps(marker_text) + "\n")
    if out.exists():
        shutil.rmtree(out)
    tmp.rename(out)
    return out


# ---------------------------------------------------------------- processes in namespaces


class Procs:
    """Child processes started inside namespaces, each logging to a file, each in its own
    session and killed with this process (PR_SET_PDEATHSIG) if it dies hard."""

    def __init__(self, log_dir: Path) -> None:
        self.log_dir = log_dir
        self.procs: dict[str, tuple[subprocess.Popen, Path]] = {}
        self.env = {k: v for k, v in os.environ.items() if "proxy" not in k.lower()}
        self.env.update(PYTHONUNBUFFERED="1", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", NO_PROXY="*")

    def spawn(self, name: str, ns: str, args: list[str], env: dict[str, str] | None = None,
              cpu: CpuShare | None = None) -> None:
        log = self.log_dir / f"{name}.log"

        def setup() -> None:  # in the child, before exec (the bench starts no threads of its own)
            _die_with_parent()
            if cpu is not None:
                cpu.join()

        with log.open("ab") as out:
            proc = subprocess.Popen(["ip", "netns", "exec", ns, sys.executable, "-P", "-m", "cluster.cli", *args],
                                    cwd=REPO, env={**self.env, **(env or {})}, stdout=out, stderr=subprocess.STDOUT,
                                    stdin=subprocess.DEVNULL, start_new_session=True,
                                    preexec_fn=setup)  # noqa: PLW1509
        self.procs[name] = (proc, log)

    def check_alive(self) -> None:
        for name, (proc, log) in self.procs.items():
            if proc.poll() is not None:
                raise RuntimeError(f"{name} exited with code {proc.returncode}; its log's end:\n{tail(log)}")

    def wait_line(self, name: str, needle: str, timeout_s: float) -> str:
        """The first line of ``name``'s log holding ``needle`` (a worker's ``ready:`` line)."""
        log = self.procs[name][1]
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            self.check_alive()
            for line in log.read_text(errors="replace").splitlines():
                if needle in line:
                    return line
            time.sleep(0.2)
        raise TimeoutError(f"{name} did not print {needle!r} within {timeout_s:.0f} s; its log's end:\n{tail(log)}")

    def stop(self, name: str | None = None) -> None:
        """SIGTERM (each process group), then SIGKILL after the grace period; all when ``name`` is None."""
        names = [name] if name else list(reversed(self.procs))
        for n in names:
            proc = self.procs[n][0]
            if proc.poll() is None:
                _signal_group(proc, signal.SIGTERM)
        deadline = time.monotonic() + STOP_GRACE_S
        for n in names:
            proc = self.procs.pop(n)[0]
            try:
                proc.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                _signal_group(proc, signal.SIGKILL)
                with contextlib.suppress(subprocess.TimeoutExpired):
                    proc.wait(5)


def tail(log: Path, num_lines: int = 30) -> str:
    return "\n".join(log.read_text(errors="replace").splitlines()[-num_lines:]) if log.exists() else "(no log)"


def _signal_group(proc: subprocess.Popen, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, sig)


def _die_with_parent() -> None:
    import ctypes

    with contextlib.suppress(Exception):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


# ---------------------------------------------------------------- one run


class LinkBench:
    """The emulated pair of hosts, its workers, and one scheduler per link class."""

    def __init__(self, config: LinkBenchConfig, model: Path) -> None:
        self.config, self.model = config, model
        self.pair = NetnsPair()
        self.prefill_id, self.decode_id = f"lb-prefill-{self.pair.tag}", f"lb-decode-{self.pair.tag}"
        self.log_dir = Path(config.log_dir or tempfile.mkdtemp(prefix="pdc-bench-link-"))
        self.log_dir.mkdir(parents=True, exist_ok=True)
        self.procs = Procs(self.log_dir)
        self.cpu: CpuShare | None = None
        self.key_file = self.log_dir / "cluster.key"
        self.closed = False
        self.prefill_kv_mb_s: float | None = None  # the prefill node's KV production, by its prefill probe

    def start(self) -> None:
        """Namespaces, the decode node's CPU share, both workers (until they print ``ready:``)."""
        self.pair.create()
        self.cpu = CpuShare(self.config.decode_cpu, self.pair.tag)
        self.key_file.write_text(secrets.token_hex(32) + "\n")
        self.key_file.chmod(0o600)
        threads = {"OMP_NUM_THREADS": str(self.config.threads)}
        for name, ns, addr, role, cpu in (
                ("prefill", self.pair.ns_prefill, self.pair.addr_prefill, "prefill", None),
                ("decode", self.pair.ns_decode, self.pair.addr_decode, "both", self.cpu)):
            node_id = self.prefill_id if name == "prefill" else self.decode_id
            self.procs.spawn(name, ns, [
                "worker", "--role", role, "--engine", "torch", "--model", str(self.model), "--dtype", self.config.dtype,
                "--host", addr, "--port", str(GRPC_PORT), "--kv-port", str(KV_PORT), "--no-advertise",
                "--node-id", node_id, "--cluster-key-file", str(self.key_file), "--prefix-cache-gb", "0",
            ], env=threads, cpu=cpu)
            # one at a time: each worker times its prefill at start-up (its probe) without the other's load
            self.procs.wait_line(name, " ready: ", self.config.ready_timeout_s)
        if any(link.scaled for link in self.config.links):
            self.prefill_kv_mb_s = report.kv_rate_mb_s(self.prefill_probe(),
                                                       kv_bytes_per_token(self.model, self.config.dtype),
                                                       max(self.config.prompt_tokens))

    def prefill_probe(self) -> list[list[float]]:
        """The prefill worker's start-up prefill probe, as a scheduler lists it in ``/health``
        (one started for this over the link as it is, then stopped)."""
        health, _ = self.serve_and_run("scheduler-probe", [])
        node = next((n for n in health["nodes"] if n["node_id"] == self.prefill_id), None)
        if node is None:
            raise RuntimeError(f"bench link: the scheduler does not list the prefill worker {self.prefill_id}")
        return node.get("prefill_probe") or []

    def run_link(self, link: LinkClass) -> list[dict[str, Any]]:
        """Shape, serve, measure, simulate: this link's rows. A scaled link class is shaped at
        this machine's scale (``link_report.scaled_link``, from the prefill node's probe)."""
        if link.scaled:
            link = report.scaled_link(link, self.prefill_kv_mb_s or 0.0)
        self.pair.shape(Shaping(link.gbit_s, link.delay_ms, link.jitter_ms))
        plan = build_plan(self.config, self.model, seed=len(link.name) * 7919 + int(link.gbit_s * 100))
        health, results = self.serve_and_run(f"scheduler-{link.name}", plan)
        measure = self.link_measure(health, link)
        return self.rows(link, health, measure, results)

    def serve_and_run(self, name: str, plan: list[dict[str, Any]]) -> tuple[dict, dict[tuple, list[dict]]]:
        """Start a scheduler (``name``) beside the decode worker, run ``plan`` through it, stop it."""
        peers = f"{self.pair.addr_prefill}:{GRPC_PORT},{self.pair.addr_decode}:{GRPC_PORT}"
        self.procs.spawn(name, self.pair.ns_decode, [
            "serve", "--host", "127.0.0.1", "--port", str(HTTP_PORT), "--no-mdns", "--peers", peers,
            "--cluster-key-file", str(self.key_file), "--policy", "conditional", "--link-probe-mib", "32"])
        try:
            return self.run_client(plan)
        finally:
            self.procs.stop(name)

    def run_client(self, plan: list[dict[str, Any]]) -> tuple[dict, dict[tuple, list[dict]]]:
        """Run ``plan`` from inside the decode namespace; (``/health``, results by key)."""
        body = json.dumps({"port": HTTP_PORT, "ready_timeout_s": self.config.ready_timeout_s,
                           "request_timeout_s": self.config.request_timeout_s,
                           "deadline_s": self.config.link_deadline_s, "requests": plan})
        cmd = ["ip", "netns", "exec", self.pair.ns_decode, sys.executable, "-P", "-m", "workers.tools.link_client"]
        budget = self.config.ready_timeout_s + self.config.link_deadline_s + 60
        done = subprocess.run(cmd, input=body, capture_output=True, text=True, cwd=REPO, env=self.procs.env,
                              timeout=budget, check=False)
        lines = [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]
        if not lines or "health" not in lines[0]:
            self.procs.check_alive()
            why = lines[0].get("error") if lines else done.stderr.strip()[-2000:]
            raise RuntimeError(f"the client in {self.pair.ns_decode} failed: {why}")
        results: dict[tuple, list[dict]] = defaultdict(list)  # (tokens, placement, codec[, "warmup"])
        health = lines[0]["health"]
        for line in lines[1:]:
            if not line.get("ok"):
                raise RuntimeError(f"request {line.get('key')} failed: {line.get('error')}\n"
                                   f"{tail(self.log_dir / 'decode.log', 10)}")
            if "health" in line:  # after the warm-ups: what the scheduler learned from them
                health = line["health"]
            elif line["key"][3] != "prewarm":
                warm = ("warmup",) if line["key"][3] == "warmup" else ()
                results[(*line["key"][:3], *warm)].append(line["pdcluster"])
        return health, results

    def link_measure(self, health: dict, link: LinkClass) -> LinkMeasure:
        probe = next((x for x in health["links"] if x["prefill_node"] == self.prefill_id
                      and x["decode_node"] == self.decode_id), None)
        if probe is None:
            raise RuntimeError(f"bench link: the scheduler measured no link {self.prefill_id} -> {self.decode_id}")
        delay = None if self.pair.netem_error and link.delay_ms else link.delay_ms
        return LinkMeasure(probe["gbps"], probe["latency_ms"] / 1e3, link.gbit_s, delay)

    def rows(self, link: LinkClass, health: dict, measure: LinkMeasure,
             results: dict[tuple, list[dict]]) -> list[dict[str, Any]]:
        actual = {n: int(report._median([s["prompt_tokens"] for s in results[(n, "colocated", "-")]]) or n)
                  for n in self.config.prompt_tokens}
        rows = []
        for codec in self.config.codecs:
            sims = self.simulate(health, measure, codec, [actual[n] for n in self.config.prompt_tokens])
            for n in self.config.prompt_tokens:
                warmups = {"disaggregated": results[(n, "disaggregated", codec, "warmup")],
                           "colocated": results[(n, "colocated", "-", "warmup")]}
                rows.append(report.build_row(
                    link.name, codec, n, results[(n, "disaggregated", codec)], results[(n, "colocated", "-")],
                    results[(n, "conditional", codec)], measure, sims.get(actual[n]) if sims else None, warmups))
        return rows

    def simulate(self, health: dict, measure: LinkMeasure, codec: str, prompts: list[int]) -> dict | None:
        """``pdc simulate --kv-codec CODEC`` for these nodes, as they measured themselves, and this
        link, as the scheduler probed it. None when off or failed (a warning says why)."""
        if not self.config.simulate:
            return None
        nodes = {n["node_id"]: n for n in health["nodes"]}
        folder = Path(tempfile.mkdtemp(prefix="sim-", dir=self.log_dir))
        (folder / "cluster.toml").write_text(report.sim_cluster_toml(nodes[self.prefill_id], nodes[self.decode_id],
                                                                     measure.gbps, measure.latency_s))
        (folder / "trace.jsonl").write_text(report.sim_trace(prompts))
        cmd = [sys.executable, "-P", "-m", "scheduler.sim.cli", "--cluster", str(folder / "cluster.toml"),
               "--model", str(self.model / "config.json"), "--trace", str(folder / "trace.jsonl"),
               "--policy", ",".join(report.SIM_POLICIES), "--kv-codec", codec, "--json"]
        done = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, timeout=SIM_TIMEOUT_S, check=False)
        if done.returncode != 0:
            print(f"pdc bench link: warning: pdc simulate failed: {done.stderr.strip()[-500:]}", file=sys.stderr)
            return None
        return report.read_sim(json.loads(done.stdout), prompts)

    def close(self) -> list[str]:
        """Stop every process, remove the cgroup and the namespaces; idempotent."""
        if self.closed:
            return []
        self.closed = True
        self.procs.stop()
        if self.cpu is not None:
            self.cpu.remove()
        return self.pair.destroy()


def kv_bytes_per_token(model: Path, dtype: str) -> float:
    """KV bytes per prompt token of a full-attention model in ``dtype`` (2 x layers x KV heads x head dim)."""
    config = json.loads((model / "config.json").read_text())
    heads = config.get("num_key_value_heads") or config["num_attention_heads"]
    head_dim = config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"]
    return 2.0 * config["num_hidden_layers"] * heads * head_dim * (4 if dtype in ("float32", "fp32") else 2)


def build_plan(config: LinkBenchConfig, model: Path, seed: int) -> list[dict[str, Any]]:
    """Every request of one link, in order; each prompt distinct (no prefix is ever reused).
    Keys: ``[prompt_tokens, placement, codec, repeat]``. First one cold round at the smallest
    length (``prewarm``, used for nothing), then the warm-ups, keyed ``warmup``: one
    per placement and codec at each prompt length and round, from which the scheduler learns its served
    corrections (``scheduler/calibration.py``); then ``/health`` (keyed ``health``), whose
    figures the simulator gets; then the measured requests."""
    import numpy as np

    from workers.tools.serve_bench import PromptMaker, load_tokenizer

    maker = PromptMaker(np.random.default_rng(seed), tokenizer=load_tokenizer(str(model)))
    plan = []

    def add(n: int, placement: str, codec: str, repeat: int | str) -> None:
        ext = {"placement": placement} if placement != "conditional" else {}
        if placement != "colocated":
            ext["kv_codec"] = codec
        plan.append({"key": [n, placement, codec, repeat], "prompt": maker.text(n), "pdcluster": ext,
                     "max_tokens": 1})

    small = min(config.prompt_tokens)  # one cold round first, unmeasured and outside the yardstick
    add(small, "colocated", "-", "prewarm")
    for codec in config.codecs:
        add(small, "disaggregated", codec, "prewarm")
    for _ in range(config.warmups):
        for n in config.prompt_tokens:
            add(n, "colocated", "-", "warmup")
            for codec in config.codecs:
                add(n, "disaggregated", codec, "warmup")
    plan.append({"key": [0, "-", "-", "health"], "health": True})
    for n in config.prompt_tokens:
        for r in range(config.repeats):
            add(n, "colocated", "-", r)
            for codec in config.codecs:
                add(n, "disaggregated", codec, r)
        for codec in config.codecs:
            add(n, "conditional", codec, 0)
    return plan


def run_link_bench(config: LinkBenchConfig, out: Any = sys.stdout) -> list[dict[str, Any]]:
    """Every link's rows. The hosts go on every exit path: here (finally), on SIGTERM/SIGHUP (made
    exceptions while this runs) and at exit; a SIGKILLed run's are removed by the next one."""
    for name in cleanup_stale():
        print(f"removed {name}, left by a run that is gone", file=out)
    model = Path(config.model) if config.model else ensure_link_model()
    bench = LinkBench(config, model)
    atexit.register(bench.close)
    previous = {sig: signal.signal(sig, _raise_exit) for sig in (signal.SIGTERM, signal.SIGHUP)}
    failed = True
    try:
        print(f"namespaces {bench.pair.ns_prefill} ({bench.pair.addr_prefill}, prefill) and {bench.pair.ns_decode} "
              f"({bench.pair.addr_decode}, decode at {config.decode_cpu:g} CPU + scheduler); logs in {bench.log_dir}",
              file=out, flush=True)
        bench.start()
        rows = []
        for link in config.links:
            started = time.monotonic()
            link_rows = bench.run_link(link)
            rows += link_rows
            note = f"; {bench.pair.netem_error}" if bench.pair.netem_error else ""
            if link.scaled:
                note += (f"; SCALED, not {link.name.removesuffix('-scaled')}: shaped at {link_rows[0]['shaped_gbit_s']:.3f} "
                         f"Gbit/s for a prefill node producing {bench.prefill_kv_mb_s:.1f} MB/s of KV")
            print(f"{link.name}: {len(link_rows)} rows in {time.monotonic() - started:.0f} s{note}", file=out, flush=True)
        failed = False
        return rows
    finally:
        problems = bench.close()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        atexit.unregister(bench.close)
        for problem in problems:
            print(f"pdc bench link: warning: {problem}", file=sys.stderr)
        if failed:
            print(f"pdc bench link: failed; logs kept in {bench.log_dir}", file=sys.stderr)
        elif not config.log_dir:
            shutil.rmtree(bench.log_dir, ignore_errors=True)


def _raise_exit(signum: int, _frame: object) -> None:
    raise SystemExit(128 + signum)


# ---------------------------------------------------------------- command line


def geteuid() -> int:
    """The effective uid (a function, so that tests can pretend not to be root)."""
    return os.geteuid()


def missing_tools() -> list[str]:
    return [t for t in ("ip", "tc") if shutil.which(t) is None]


def add_link_parser(sub: argparse._SubParsersAction) -> None:
    """Register ``link`` on the ``bench`` subcommands."""
    d = LinkBenchConfig(links=(LINK_CLASSES["1gbe"],))
    p = sub.add_parser(
        "link", help="emulate home links between two namespaces and measure prefill, transfer and TTFT over them",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description=(
            "Run a prefill worker and a decode worker in two network namespaces joined by a veth pair shaped\n"
            "with tc as a home link, and a scheduler beside the decode worker. For each link, codec and prompt\n"
            "length, report measured prefill, transfer and exposed transfer against the theory\n"
            "max(0, T_transfer - T_prefill), TTFT disaggregated and colocated, the simulator's TTFT and the\n"
            "conditional policy's decision. Needs root (namespaces, tc, a cgroup). docs/links.md explains it."),
        epilog="example: sudo pdc bench link --emulate 1gbe,wifi6 --codecs raw,int8 --json")
    p.add_argument("--emulate", default=",".join(LINK_CLASSES),
                   help=f"link classes, comma-separated: {', '.join(LINK_CLASSES)} (default: these), or "
                        f"{', '.join(SCALED_LINK_CLASSES)}: 1 GbE's rate-to-prefill proportion at this machine's "
                        f"scale, a far slower wire than 1 GbE, from the prefill node's probe (docs/links.md)")
    p.add_argument("--codecs", default=",".join(d.codecs),
                   help=f"KV codecs asked per request (\"pdcluster\": {{\"kv_codec\": ...}}), of {', '.join(CODECS)} "
                        f"(default: {','.join(d.codecs)})")
    p.add_argument("--prompt-tokens", default=",".join(map(str, d.prompt_tokens)),
                   help=f"prompt lengths (default: {','.join(map(str, d.prompt_tokens))}; the chat template adds a few)")
    p.add_argument("--repeats", type=int, default=d.repeats, help=f"requests per placement and row (default: {d.repeats})")
    p.add_argument("--warmups", type=int, default=d.warmups,
                   help="unmeasured requests per placement, codec and prompt length before the measured ones; the "
                        "scheduler learns its served corrections from them and the simulator gets those figures "
                        f"(default: {d.warmups})")
    p.add_argument("--decode-cpu", type=float, default=d.decode_cpu,
                   help=f"share of one CPU the decode node gets, a slower computer than the prefill node "
                        f"(default: {d.decode_cpu:g}; 1: no limit)")
    p.add_argument("--threads", type=int, default=d.threads, help="torch threads per worker (default: 1)")
    p.add_argument("--model", default=None,
                   help="model folder (default: the bench's KV-heavy random model, built on first use)")
    p.add_argument("--quick", action="store_true", help="1gbe only, one prompt length (256), one repeat")
    p.add_argument("--no-sim", action="store_true", help="do not run pdc simulate")
    p.add_argument("--plot", default=None, metavar="PNG", help="write a plot of exposed transfer and TTFT")
    p.add_argument("--log-dir", default=None, help="keep the processes' logs here (default: a temp folder, "
                                                   "removed after a successful run)")
    p.add_argument("--cleanup", action="store_true",
                   help="only remove namespaces and cgroups left by runs that were killed, then exit")
    p.add_argument("--json", action="store_true", help="end with one JSON line {\"rows\": [...]}")
    p.set_defaults(run=run_bench_link)


def config_from_args(args: argparse.Namespace) -> LinkBenchConfig:
    quick = args.quick
    return LinkBenchConfig(
        links=report.parse_links("1gbe" if quick and args.emulate == ",".join(LINK_CLASSES) else args.emulate),
        codecs=report.parse_list(args.codecs, "--codecs", CODECS),
        prompt_tokens=(256,) if quick else report.parse_ints(args.prompt_tokens, "--prompt-tokens"),
        repeats=1 if quick else args.repeats, warmups=1 if quick else args.warmups,
        decode_cpu=args.decode_cpu, threads=args.threads, model=args.model,
        simulate=not args.no_sim, log_dir=args.log_dir)


def run_bench_link(args: argparse.Namespace, out: Any = sys.stdout) -> int:
    """CLI body: 2 without root or iproute2 (saying so), 1 when the run failed, else 0."""
    if geteuid() != 0:
        print("pdc bench link: needs root: it creates network namespaces and a veth pair, shapes the link with tc "
              "and limits the decode node's CPU with a cgroup; run it as root (sudo)", file=sys.stderr)
        return 2
    if missing := missing_tools():
        print(f"pdc bench link: needs iproute2's {' and '.join(missing)}", file=sys.stderr)
        return 2
    if args.cleanup:
        removed = cleanup_stale()
        print("\n".join(f"removed {n}" for n in removed) or "nothing left by earlier runs", file=out)
        return 0
    config = config_from_args(args)
    try:
        rows = run_link_bench(config, out)
    except (NetnsError, RuntimeError, TimeoutError, subprocess.TimeoutExpired) as e:
        print(f"pdc bench link: error: {e}", file=sys.stderr)
        return 1
    print_report(rows, config, out)
    if args.plot:
        report.plot(rows, args.plot, f"pdc bench link: decode node at {config.decode_cpu:g} CPU")
        print(f"wrote {args.plot}", file=out)
    if args.json:
        print(report.rows_json(rows, decode_cpu=config.decode_cpu, threads=config.threads), file=out, flush=True)
    return 0


def print_report(rows: Sequence[dict[str, Any]], config: LinkBenchConfig, out: Any) -> None:
    print(file=out)
    for line in report.table_lines(rows):
        print(line, file=out)
    print(file=out)
    for line in report.summary_lines(rows):
        print(line, file=out)
    used = {r["codec"]: r["codec_used"] for r in rows if r["codec_used"] and r["codec_used"] != r["codec"]}
    for asked, got in used.items():
        print(f"note: asked for {asked}, the server sent {got}", file=out)


if __name__ == "__main__":
    sys.exit(bench_main(add_link_parser))
