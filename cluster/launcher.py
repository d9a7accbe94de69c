"""``pdc up``: the whole cluster on one machine, each part a real process.

The launcher starts one prefill worker, one decode worker and the scheduler as
child processes of its own, all discovering each other over mDNS on the
loopback interface, and waits until the scheduler's ``/health`` says ready.
Children get ``PR_SET_PDEATHSIG`` on Linux, so they die with the launcher even
if it is killed hard; a normal exit (Ctrl-C, SIGTERM) stops them in order with
SIGTERM, then SIGKILL after a grace period. No orphans either way.
"""
from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

from cluster.logs_cmd import LOG_FORMATS
from workers.engines.registry import (
    DEFAULT_DECODE_ENGINE,
    DEFAULT_PREFILL_ENGINE,
    check_engine,
)

log = logging.getLogger(__name__)

LOOPBACK = "127.0.0.1"
READY_TIMEOUT_S = 600.0  # the workers load and measure in turn (--startup-lock): room for both
STOP_GRACE_S = 10.0


@dataclass(frozen=True)
class UpConfig:
    """One local cluster."""

    model: str
    port: int = 8000
    prefill_engine: str = DEFAULT_PREFILL_ENGINE
    decode_engine: str = DEFAULT_DECODE_ENGINE
    host: str = LOOPBACK
    cluster_key_file: str | None = None
    log_dir: str | None = None  # child logs; a temp folder when None
    policy: str = "conditional"  # the scheduler's placement policy (name, module:Class or file.py:Class)
    kv_codec: str = "auto"  # the scheduler's KV codec (`pdc serve --kv-codec`)
    api_key: str | None = None  # passed to the scheduler as `pdc serve --api-key` when set
    # the scheduler's admission queue (`pdc serve --max-queued`, ...); None: pdc serve's default
    max_queued: int | None = None
    queue_timeout_s: float | None = None
    max_inflight_per_node: int | None = None
    log_format: str = "text"  # every child's --log-format (text|json)
    extra_worker_args: tuple[str, ...] = field(default_factory=tuple)

    def __post_init__(self) -> None:
        for role in ("prefill_engine", "decode_engine"):
            check_engine(getattr(self, role), role)
        if not 0 <= self.port < 65536:
            raise ValueError(f"port must be in [0, 65535], got {self.port}")
        if self.log_format not in LOG_FORMATS:
            raise ValueError(f"log_format must be one of {', '.join(LOG_FORMATS)}, got {self.log_format!r}")
        for name in ("max_queued", "queue_timeout_s", "max_inflight_per_node"):
            value = getattr(self, name)
            if value is not None and not 0 <= value < float("inf"):
                raise ValueError(f"{name} must be a finite number >= 0 (or None: pdc serve's default), got {value}")

    def admission_flags(self) -> list[str]:
        """The ``pdc serve`` flags of the admission queue that this cluster sets."""
        flags = {"--max-queued": self.max_queued, "--queue-timeout-s": self.queue_timeout_s,
                 "--max-inflight-per-node": self.max_inflight_per_node}
        return [part for flag, value in flags.items() if value is not None for part in (flag, str(value))]


def worker_threads(num_workers: int) -> dict[str, str]:
    """Each local worker's share of this machine's cores, as ``OMP_NUM_THREADS``
    (torch's CPU thread pool), unless the user set it. Workers on one machine
    that each take every core oversubscribe it: OpenMP's spinning barriers
    then make a CPU decode step many times slower."""
    if "OMP_NUM_THREADS" in os.environ:
        return {}
    return {"OMP_NUM_THREADS": str(max(1, (os.cpu_count() or 1) // num_workers))}


class LocalCluster:
    """Start, wait for and stop the processes of one local cluster."""

    def __init__(self, config: UpConfig) -> None:
        self.config = config
        self.procs: list[tuple[str, subprocess.Popen]] = []
        self._tmp = tempfile.mkdtemp(prefix="pdc-up-")  # removed by stop() unless the run failed
        self.log_dir = Path(config.log_dir or self._tmp)
        self.log_dir.mkdir(parents=True, exist_ok=True)
        self.key_file = config.cluster_key_file or self._ephemeral_key()

    @property
    def url(self) -> str:
        return f"http://{self.config.host}:{self.config.port}"

    def start(self) -> None:
        """Start the scheduler and both workers, in that order."""
        common = ["--cluster-key-file", self.key_file, "--log-format", self.config.log_format]
        mdns = ["--mdns-interface", LOOPBACK]
        # a suffix per launch: two local clusters on one machine (or two machines'
        # `pdc up` on one LAN) must not claim the same mDNS instance names
        suffix = secrets.token_hex(2)
        # the API key reaches `pdc serve` as $PDC_API_KEY, not a flag: a command line is visible in `ps`
        api_key = {"PDC_API_KEY": self.config.api_key} if self.config.api_key else {}
        self._spawn("scheduler", ["serve", "--host", self.config.host, "--port", str(self.config.port),
                                  "--policy", self.config.policy, "--kv-codec", self.config.kv_codec,
                                  *self.config.admission_flags(), *common, *mdns],
                    env=api_key)
        workers = (("prefill", self.config.prefill_engine), ("decode", self.config.decode_engine))
        for role, engine in workers:
            self._spawn(f"{role}-worker", [
                "worker", "--role", role, "--engine", engine, "--model", self.config.model,
                "--host", LOOPBACK, "--node-id", f"local-{role}-{engine}-{suffix}", *common, *mdns,
                "--metrics-port", "0",  # a free port: its ready line (the worker's log) says which
                # both load and measure one at a time: neither times its prefill under the other's load
                "--startup-lock", str(self.log_dir / "startup.lock"),
                *self.config.extra_worker_args,
            ], env=worker_threads(len(workers)))

    def wait_ready(self, timeout: float = READY_TIMEOUT_S) -> dict:
        """Block until ``/health`` is 200 (both roles known); raise on timeout or a dead child."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self._check_alive()
            # with an API key, /health shows its details (the nodes) only to a caller presenting it
            auth = {"Authorization": f"Bearer {self.config.api_key}"} if self.config.api_key else {}
            request = urllib.request.Request(self.url + "/health", headers=auth)
            with contextlib.suppress(urllib.error.URLError, ConnectionError, TimeoutError, json.JSONDecodeError):
                with urllib.request.urlopen(request, timeout=2) as resp:
                    if resp.status == 200:
                        return json.loads(resp.read())
            time.sleep(0.25)
        raise TimeoutError(f"the local cluster was not ready after {timeout:.0f} s; logs in {self.log_dir}; "
                           f"their last lines:\n{self.log_tails()}")

    def log_tails(self, num_lines: int = 8) -> str:
        """The last lines of every child's log (the log folder may be temporary)."""
        parts = []
        for name, _ in self.procs:
            lines = (self.log_dir / f"{name}.log").read_text(errors="replace").splitlines()[-num_lines:]
            parts.append(f"--- {name}\n" + "\n".join(lines))
        return "\n".join(parts)

    def worker_metrics_urls(self) -> dict[str, str]:
        """Each ready worker's ``/metrics`` address, read from the ready line in its log."""
        urls = {}
        for name, _ in self.procs:
            log_file = self.log_dir / f"{name}.log"
            found = re.search(r" ready: .* metrics=(\S+)", log_file.read_text(errors="replace")) \
                if log_file.exists() else None
            if found:
                urls[name] = found.group(1)
        return urls

    def stop(self, *, keep_files: bool = False) -> None:
        """SIGTERM every child (workers first), then SIGKILL what is left after the grace period.

        ``keep_files``: leave the temporary folder (logs, the run's key) for a post-mortem."""
        for name, proc in reversed(self.procs):
            if proc.poll() is None:
                log.info("stopping %s (pid %d)", name, proc.pid)
                proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + STOP_GRACE_S
        for name, proc in self.procs:
            try:
                proc.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                log.warning("%s did not stop in %.0f s; killing it", name, STOP_GRACE_S)
                proc.kill()
                proc.wait(5)
        self.procs.clear()
        if not keep_files:
            shutil.rmtree(self._tmp, ignore_errors=True)

    def __enter__(self) -> LocalCluster:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _spawn(self, name: str, args: list[str], env: dict[str, str] | None = None) -> None:
        logfile = open(self.log_dir / f"{name}.log", "ab")  # noqa: SIM115 (owned by the child)
        # -P: do not put the working directory on the child's sys.path, where a
        # stray proto.py or scheduler.py would shadow our packages (3.11+).
        safe_path = ["-P"] if sys.version_info >= (3, 11) else []
        cmd = [sys.executable, *safe_path, "-m", "cluster.cli", *args]
        log.info("starting %s: %s", name, " ".join(cmd))
        proc = subprocess.Popen(
            cmd, stdout=logfile, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            preexec_fn=_die_with_parent if sys.platform == "linux" else None,
            env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})},
        )
        logfile.close()
        self.procs.append((name, proc))

    def _check_alive(self) -> None:
        for name, proc in self.procs:
            if proc.poll() is not None:
                tail = (self.log_dir / f"{name}.log").read_text(errors="replace")[-2000:]
                raise RuntimeError(f"{name} exited with code {proc.returncode}:\n{tail}")

    def _ephemeral_key(self) -> str:
        from cluster.auth import generate_key, write_config

        path = Path(self._tmp) / "cluster.json"
        write_config(path, generate_key())
        return str(path)


def _die_with_parent() -> None:
    """In the child: get SIGTERM when the launcher dies (Linux prctl)."""
    import ctypes

    pr_set_pdeathsig = 1
    with contextlib.suppress(Exception):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(pr_set_pdeathsig, signal.SIGTERM)


def port_in_use(host: str, port: int) -> bool:
    """Whether ``host:port`` cannot be bound because something listens there."""
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError as e:
            if e.errno == errno.EADDRINUSE:
                return True
            raise
    return False


def run_up(config: UpConfig) -> int:
    """``pdc up``: run in the foreground until Ctrl-C or SIGTERM.

    The caller (``pdc up``) has checked its port before resolving the model. On
    success it prints the flags that reach it (``pdc status``, ``pdc policy``);
    when it fails, it keeps its folder (logs, the run's key) and says where."""
    cluster = LocalCluster(config)
    stopping = False
    failed = True

    def on_signal(signum: int, _frame: object) -> None:
        nonlocal stopping
        stopping = True

    previous = signal.signal(signal.SIGTERM, on_signal)
    try:
        cluster.start()
        health = cluster.wait_ready()
        nodes = ", ".join(n.get("node_id", "?") for n in health.get("nodes", []))
        print(f"pdcluster is up: {cluster.url}/v1 (nodes: {nodes}); logs in {cluster.log_dir}. Ctrl-C to stop.")
        print(f"reach it with: pdc status --cluster-key-file {cluster.key_file} --mdns-interface {LOOPBACK}")
        print(f"               pdc policy --url {cluster.url} --cluster-key-file {cluster.key_file}")
        print(f"dashboard: {cluster.url}/ (to switch the policy there: pdc dashboard --url {cluster.url} "
              f"--cluster-key-file {cluster.key_file})")
        workers = ", ".join(cluster.worker_metrics_urls().values())
        print(f"metrics (Prometheus): {cluster.url}/metrics" + (f"; each worker's: {workers}" if workers else ""))
        while not stopping:
            cluster._check_alive()
            time.sleep(0.5)
        failed = False
    except KeyboardInterrupt:
        failed = False
    except (RuntimeError, TimeoutError) as e:  # a child died or never became ready: say so, no traceback
        print(f"pdc up: error: {e}", file=sys.stderr)
    finally:
        print("pdcluster: shutting down")
        cluster.stop(keep_files=failed)
        signal.signal(signal.SIGTERM, previous)
        if failed:
            print(f"pdcluster: failed; logs and the run's key kept in {cluster.log_dir}", file=sys.stderr)
    return 1 if failed else 0
