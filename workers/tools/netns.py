"""Two emulated hosts on one machine: network namespaces, a veth pair, ``tc``, a CPU share.

``pdc bench link`` (workers/tools/link_bench.py) runs a prefill worker and a
decode worker as if on two machines joined by a home link:

    namespace <run>-p (10.218.X.1)  ==== veth, tbf (+ netem) ====  namespace <run>-d (10.218.X.2)

* ``NetnsPair`` makes the two namespaces and the veth pair directly inside
  them (the host's own interfaces are never touched), gives each end a
  private address, and shapes both directions with ``tc``: a token bucket
  (tbf) for the rate and, where the kernel has netem, a netem child for delay
  and jitter. Traffic stays inside the two namespaces.
* ``CpuShare`` puts one process (the decode worker) in a cgroup limited to a
  share of one CPU (cgroup v1 ``cpu.cfs_quota_us`` or v2 ``cpu.max``), to
  emulate a node that computes slower than its peer.
* ``cleanup_stale`` removes namespaces and cgroups that a run of this tool
  left behind when it was killed hard (SIGKILL skips every handler): their
  names carry the pid of the run that made them, and only those whose run is
  gone are removed.

Every name starts with ``PREFIX`` and carries the run's pid and a random tag,
so two runs, or a crashed run and a new one, never collide.
"""
from __future__ import annotations

import contextlib
import os
import re
import secrets
import signal
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

PREFIX = "pdclb"
IP_TIMEOUT_S = 15.0
# <prefix>-<pid>-<tag>-<p|d>: the pid of the run that made it, 4 hex digits
NETNS_RE = re.compile(rf"^{PREFIX}-(\d+)-([0-9a-f]{{4}})-[pd]$")
CGROUP_RE = re.compile(rf"^{PREFIX}-(\d+)-([0-9a-f]{{4}})$")
CGROUP_V1_CPU = Path("/sys/fs/cgroup/cpu")
CGROUP_V2 = Path("/sys/fs/cgroup")
CPU_PERIOD_US = 10_000  # 10 ms periods: a throttled process runs in short, even slices


class NetnsError(RuntimeError):
    """The machine refused a namespace, veth, tc or cgroup step; the message names the command."""


def run_cmd(*args: str) -> subprocess.CompletedProcess:
    """One iproute2 command, bounded in time; never raises for its exit code."""
    return subprocess.run(list(args), capture_output=True, text=True, timeout=IP_TIMEOUT_S, check=False)


def must(*args: str) -> None:
    done = run_cmd(*args)
    if done.returncode != 0:
        raise NetnsError(f"`{' '.join(args)}` failed ({done.returncode}): {done.stderr.strip()}")


@dataclass(frozen=True)
class Shaping:
    """How one direction of the link is shaped: rate, one-way delay, jitter."""

    gbit_s: float
    delay_ms: float = 0.0
    jitter_ms: float = 0.0

    @property
    def burst_bytes(self) -> int:
        """The token bucket: 1 ms at the rate, at least 64 KiB (a GSO segment and change)."""
        return max(64 << 10, int(self.gbit_s * 1e9 / 8 * 1e-3))

    def tbf_args(self) -> list[str]:
        return ["tbf", "rate", f"{self.gbit_s * 1000:g}mbit", "burst", str(self.burst_bytes), "latency", "50ms"]

    def netem_args(self) -> list[str]:
        args = ["netem", "delay", f"{self.delay_ms:g}ms"]
        return args + ([f"{self.jitter_ms:g}ms", "distribution", "normal"] if self.jitter_ms > 0 else [])


class NetnsPair:
    """Namespaces ``<run>-p`` and ``<run>-d``, a veth pair between them, one address at each end."""

    def __init__(self, tag: str | None = None) -> None:
        self.tag = tag or secrets.token_hex(2)
        run = f"{PREFIX}-{os.getpid()}-{self.tag}"
        self.ns_prefill, self.ns_decode = f"{run}-p", f"{run}-d"
        self.if_prefill, self.if_decode = f"lb{self.tag}{os.getpid() % 1000:03d}p", f"lb{self.tag}{os.getpid() % 1000:03d}d"
        subnet = 16 + secrets.randbelow(224)
        self.addr_prefill, self.addr_decode = f"10.218.{subnet}.1", f"10.218.{subnet}.2"
        self.created: list[str] = []
        self.netem_error = ""  # why delay and jitter could not be emulated ("" when they could or were not asked)

    @property
    def ends(self) -> tuple[tuple[str, str], tuple[str, str]]:
        return (self.ns_prefill, self.if_prefill), (self.ns_decode, self.if_decode)

    def create(self) -> None:
        """Make both namespaces and the veth pair; ``NetnsError`` (after undoing what was made) if refused."""
        try:
            for ns in (self.ns_prefill, self.ns_decode):
                must("ip", "netns", "add", ns)
                self.created.append(ns)
            must("ip", "link", "add", self.if_prefill, "netns", self.ns_prefill, "type", "veth",
                 "peer", "name", self.if_decode, "netns", self.ns_decode)
            for (ns, dev), addr in zip(self.ends, (self.addr_prefill, self.addr_decode)):
                must("ip", "-n", ns, "addr", "add", f"{addr}/24", "dev", dev)
                must("ip", "-n", ns, "link", "set", "lo", "up")
                must("ip", "-n", ns, "link", "set", dev, "up")
        except (NetnsError, OSError, subprocess.TimeoutExpired):
            self.destroy()
            raise

    def shape(self, shaping: Shaping) -> None:
        """Shape both directions: tbf at the rate as the root, netem (delay, jitter) as its child.
        A kernel without netem keeps the rate only and says why in ``netem_error``."""
        self.netem_error = ""
        for ns, dev in self.ends:
            run_cmd("tc", "-n", ns, "qdisc", "del", "dev", dev, "root")  # none yet is fine
            must("tc", "-n", ns, "qdisc", "add", "dev", dev, "root", "handle", "1:", *shaping.tbf_args())
            if shaping.delay_ms > 0 or shaping.jitter_ms > 0:
                done = run_cmd("tc", "-n", ns, "qdisc", "add", "dev", dev, "parent", "1:1", "handle", "10:",
                               *shaping.netem_args())
                if done.returncode != 0:
                    self.netem_error = f"netem refused ({done.stderr.strip()}): delay and jitter not emulated"

    def qdiscs(self) -> str:
        """``tc qdisc show`` of both ends, for the report."""
        return "\n".join(run_cmd("tc", "-n", ns, "qdisc", "show", "dev", dev).stdout.strip() for ns, dev in self.ends)

    def destroy(self) -> list[str]:
        """Stop whatever still runs in the namespaces, then delete them (and so the veth pair).
        Returns the problems met (empty when everything went)."""
        problems = []
        for ns in reversed(self.created):
            problems += delete_namespace(ns)
        self.created.clear()
        return problems


def delete_namespace(ns: str) -> list[str]:
    """SIGKILL the processes left in ``ns`` (ours: the namespace is ours), then ``ip netns del``."""
    problems = []
    pids = run_cmd("ip", "netns", "pids", ns).stdout.split()
    for pid in pids:
        with contextlib.suppress(ProcessLookupError, ValueError):
            os.kill(int(pid), signal.SIGKILL)
    deadline = time.monotonic() + 5
    while pids and time.monotonic() < deadline and run_cmd("ip", "netns", "pids", ns).stdout.split():
        time.sleep(0.05)
    done = run_cmd("ip", "netns", "del", ns)
    if done.returncode != 0 and ns in namespaces():
        problems.append(f"ip netns del {ns}: {done.stderr.strip()}")
    return problems


def namespaces() -> list[str]:
    """Names of the network namespaces ``ip netns`` knows."""
    done = run_cmd("ip", "netns", "list")
    return [line.split()[0] for line in done.stdout.splitlines() if line.strip()]


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def stale_namespaces(names: list[str], alive: Callable[[int], bool] = pid_alive) -> list[str]:
    """Those of ``names`` that this tool made in a run that is gone."""
    return [n for n in names if (m := NETNS_RE.match(n)) and not alive(int(m.group(1)))]


def cleanup_stale() -> list[str]:
    """Delete the namespaces and cgroups of runs of this tool that are gone; the names removed."""
    removed = []
    for ns in stale_namespaces(namespaces()):
        if not delete_namespace(ns):
            removed.append(ns)
    root = cgroup_root()
    if root is not None:
        for path in root.iterdir():
            m = CGROUP_RE.match(path.name)
            if m and path.is_dir() and not pid_alive(int(m.group(1))):
                _kill_cgroup(path)
                with contextlib.suppress(OSError):
                    path.rmdir()
                    removed.append(str(path))
    return removed


# ---------------------------------------------------------------- CPU share


def cgroup_root() -> Path | None:
    """Where this machine's cpu controller lives: cgroup v1's cpu hierarchy, else the v2 root
    (when it offers ``cpu``); None without either."""
    if (CGROUP_V1_CPU / "cpu.cfs_quota_us").exists():
        return CGROUP_V1_CPU
    controllers = CGROUP_V2 / "cgroup.controllers"
    if controllers.exists() and "cpu" in controllers.read_text().split():
        return CGROUP_V2
    return None


class CpuShare:
    """A cgroup holding at most ``share`` of one CPU (``share`` >= 1: no limit, no cgroup)."""

    def __init__(self, share: float, tag: str) -> None:
        self.share = share
        self.path: Path | None = None
        if share >= 1:
            return
        root = cgroup_root()
        if root is None:
            raise NetnsError("no cgroup cpu controller here (cgroup v1 cpu or v2 with cpu); "
                             "use --decode-cpu 1 to run without a CPU limit")
        self.path = root / f"{PREFIX}-{os.getpid()}-{tag}"
        quota = max(1000, int(share * CPU_PERIOD_US))
        try:
            self.path.mkdir()
            if root == CGROUP_V1_CPU:
                (self.path / "cpu.cfs_period_us").write_text(str(CPU_PERIOD_US))
                (self.path / "cpu.cfs_quota_us").write_text(str(quota))
            else:
                (self.path / "cpu.max").write_text(f"{quota} {CPU_PERIOD_US}")
        except OSError as e:
            self.remove()
            raise NetnsError(f"cannot limit the decode node's CPU with cgroup {self.path}: {e}") from None

    def join(self) -> None:
        """Move the calling process into the cgroup (run in a child before it execs)."""
        if self.path is not None:
            (self.path / "cgroup.procs").write_text(str(os.getpid()))

    def remove(self) -> None:
        """Kill what is left inside, then remove the cgroup."""
        if self.path is None or not self.path.exists():
            return
        _kill_cgroup(self.path)
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            try:
                self.path.rmdir()
                return
            except OSError:
                time.sleep(0.05)


def _kill_cgroup(path: Path) -> None:
    with contextlib.suppress(OSError):
        for pid in (path / "cgroup.procs").read_text().split():
            with contextlib.suppress(ProcessLookupError, ValueError):
                os.kill(int(pid), signal.SIGKILL)
