"""``pdc worker``: one process = one engine + the gRPC ``Worker`` service + a KV listener.

Start-up builds everything once from one ``WorkerConfig``: the engine (on its
own thread), the lease table, the KV data-plane listener and the gRPC server,
both behind the cluster key. The worker then prints one line with its bound
addresses, hands its node description to the discovery hook (``on_started``),
and serves until SIGINT or SIGTERM, when it stops the server with a grace
period, which ends every request and frees every lease.
"""
from __future__ import annotations

import argparse
import asyncio
import concurrent.futures
import contextlib
import errno
import logging
import math
import re
import secrets
import signal
import socket
import sys
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from grpc import aio

from cluster.auth import AuthServerInterceptor, ClusterKey, load_cluster_key
from proto import pdcluster_pb2 as pb
from proto import pdcluster_pb2_grpc as pb_grpc
from cluster.hardware import HARDWARE
from workers.rpc.client import SERVER_OPTIONS
from workers.rpc.prefill import QUEUE_DEADLINE_S
from workers.kv.listener import KVListener
from workers.engines.base import DTYPES, Engine, MeasuredProfile
from workers.engines.memory import host_free_bytes
from workers.engines.registry import check_engine, describe_engines, engine_names, load_engine
from workers.engines.thread import EngineThread
from workers.kv.leases import LeaseTable
from workers.engines.model_config import ModelSpec, read_model_spec, resolve_model
from workers.engines.prefix_cache import PrefixCache
from workers.rpc.profile import (
    BUDGET_S,
    catalog_hardware,
    declared_figures,
    declared_profile,
    probe_prefill,
    profile_source,
    startup_lock,
)
from workers.rpc.metrics import MeteredServicer, MetricsServer, WorkerMetrics
from workers.rpc.info import model_info, pdcluster_version
from workers.rpc.loop import MAX_BATCH, StepLoop
from workers.rpc.state import ServiceSettings, WorkerState
from workers.rpc.drain import Drain
from workers.rpc.servicer import DRAIN_TIMEOUT_S

log = logging.getLogger(__name__)

ROLES: dict[str, tuple[str, ...]] = {"prefill": ("prefill",), "decode": ("decode",), "both": ("prefill", "decode")}
SEND_MODES = ("thread", "direct")
_WILDCARD_HOSTS = ("", "0.0.0.0", "::")

PREFIX_CACHE_BYTES = 1_000_000_000  # --prefix-cache-gb default: 1 GB

# Called once the worker serves, with its node description (the fields of
# cluster.node.NodeInfo); may return an async function that undoes it (e.g.
# stops advertising), which runs before the server stops.
OnStarted = Callable[[dict[str, Any]], Awaitable[Callable[[], Awaitable[None]] | None]]
# The discovery hook for a worker that advertises itself; the composition root
# (cluster/cli.py) passes mDNS's, since the worker service does not know discovery.
Discovery = Callable[["WorkerConfig"], OnStarted]
# Turns the --model flag (None when absent) into a model folder or hub id; the CLI
# passes one that knows the built-in models and builds them on first use.
ModelResolver = Callable[[str | None], str]


@dataclass(frozen=True)
class WorkerConfig:
    """One worker process, built once at start-up."""

    role: str  # prefill | decode | both
    engine: str  # a name in workers.engines.registry.ENGINES
    model: str  # a model folder, or a hub id when online
    cluster_key: ClusterKey
    host: str = "127.0.0.1"  # bind address of both planes
    port: int = 0  # gRPC; 0 picks a free port
    kv_port: int = 0  # KV data plane; 0 picks a free port
    advertise_host: str | None = None  # address peers use; default: host, or this machine's IP if host is a wildcard
    device: str | None = None  # torch: cuda, mps or cpu (default: best available)
    dtype: str | None = None  # compute dtype (default: the checkpoint's)
    node_id: str = ""  # "" picks <hostname>-<engine>-<random>
    model_id: str | None = None  # name clients use (default: a quantized copy's declared base id, else the folder name)
    lease_s: float = 30.0  # default lease when a Decode does not set one
    # prefill side: the longest a Prefill waits on the engine before it starts; decode side:
    # the allowance a waiting lease gives its sender's queue before the lease counts
    queue_deadline_s: float = QUEUE_DEADLINE_S
    chunk_size: int = 128  # default prefill chunk
    max_leases: int = 16
    max_reserved_bytes: int | None = None  # KV budget (--kv-budget-gb); None: leases are bounded by count only
    prefix_cache_bytes: int = PREFIX_CACHE_BYTES  # --prefix-cache-gb; 0 turns prefix reuse off
    max_batch: int = MAX_BATCH  # requests decoding at once in the step loop
    interleave_prefill: bool = True  # one prefill chunk per decode step (off: whole prompts between steps)
    connect_timeout_s: float = 10.0  # prefill -> decode KV connect + handshake
    send_timeout_s: float = 30.0  # longest the KV stream may make no progress
    handshake_timeout_s: float = 2.0  # KV listener side: a sender answers in one round trip
    send_mode: str = "thread"  # thread: a sender thread drains a bounded queue; direct: send on the engine thread
    max_queued_bytes: int = 256 << 20  # KV slices queued ahead of the sender thread
    hardware: str = ""  # declared catalog name (cluster/hardware.py); its peaks fill undeclared figures
    tflops: float = 0.0  # declared compute, for placement (0: the hardware's, else measure at start-up)
    mem_bw_gbps: float = 0.0  # declared memory bandwidth, GB/s (0: the hardware's, else measure at start-up)
    peers: tuple[str, ...] = ()  # static host:port peers, for the discovery hook
    advertise: bool = True  # advertise over mDNS (through the discovery hook)
    mdns_interfaces: tuple[str, ...] | None = None  # None: all interfaces
    grace_s: float = 5.0  # shutdown grace for in-flight RPCs
    drain_timeout_s: float = DRAIN_TIMEOUT_S  # a drain gives requests in flight this long, then fails them over
    metrics_port: int | None = None  # HTTP /metrics on host (--metrics-port); 0 picks a free port; None: off
    startup_lock: str | None = None  # a lock file held while loading and measuring (--startup-lock)

    def __post_init__(self) -> None:
        if self.role not in ROLES:
            raise ValueError(f"role must be one of {sorted(ROLES)}, got {self.role!r}")
        check_engine(self.engine)
        if not self.model:
            raise ValueError("model is required (a model folder or hub id)")
        if not isinstance(self.cluster_key, ClusterKey):
            raise ValueError("cluster_key must be a ClusterKey (see cluster.auth.load_cluster_key)")
        for name in ("port", "kv_port"):
            if not 0 <= getattr(self, name) < 65536:
                raise ValueError(f"{name} must be in [0, 65535], got {getattr(self, name)}")
        if self.port and self.port == self.kv_port:
            raise ValueError(f"port and kv_port must differ, both are {self.port}")
        if self.metrics_port is not None and not 0 <= self.metrics_port < 65536:
            raise ValueError(f"metrics_port must be in [0, 65535] (or None: off), got {self.metrics_port}")
        if self.dtype is not None and self.dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {DTYPES}, got {self.dtype!r}")
        if self.send_mode not in SEND_MODES:
            raise ValueError(f"send_mode must be one of {SEND_MODES}, got {self.send_mode!r}")
        for name in ("lease_s", "queue_deadline_s", "connect_timeout_s", "send_timeout_s", "handshake_timeout_s",
                     "grace_s", "drain_timeout_s"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        if self.prefix_cache_bytes < 0:
            raise ValueError(f"prefix_cache_bytes must be >= 0 (0: off), got {self.prefix_cache_bytes}")
        for name in ("chunk_size", "max_leases", "max_queued_bytes", "max_batch"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.max_reserved_bytes is not None and self.max_reserved_bytes < 1:
            raise ValueError(f"max_reserved_bytes must be >= 1 or None, got {self.max_reserved_bytes}")
        for name in ("tflops", "mem_bw_gbps"):
            value = getattr(self, name)
            if not math.isfinite(value) or value < 0:
                raise ValueError(f"{name} must be a finite number >= 0 (0: not declared), got {value!r}")
        if self.hardware:
            catalog_hardware(self.hardware)
        if not self.node_id:
            object.__setattr__(self, "node_id", _auto_node_id(self.engine))
        elif not re.fullmatch(r"[A-Za-z0-9._-]{1,63}", self.node_id):
            raise ValueError(f"node_id {self.node_id!r}: need 1-63 characters from [A-Za-z0-9._-]")
        object.__setattr__(self, "peers", tuple(self.peers))

    @property
    def roles(self) -> tuple[str, ...]:
        return ROLES[self.role]

    @property
    def public_host(self) -> str:
        """The address other nodes use to reach this worker."""
        if self.advertise_host:
            return self.advertise_host
        return _this_machine_ip() if self.host in _WILDCARD_HOSTS else self.host

    @property
    def declared_figures(self) -> tuple[float, float]:
        """(TFLOPS, GB/s) known without measuring: this config's, else the
        declared hardware's catalog peaks; 0 where neither says."""
        return declared_figures(self.hardware, self.tflops, self.mem_bw_gbps)


class Worker:
    """A running worker: ``await start()``, serve, ``await stop()``.

    ``engine_factory`` replaces the engine built from the config (tests wrap
    a real engine with this); it runs on the engine thread."""

    def __init__(self, config: WorkerConfig, *, engine_factory: Callable[[], Engine] | None = None) -> None:
        self.config = config
        self._engine_factory = engine_factory
        self.engines: EngineThread | None = None
        self.leases = LeaseTable(max_leases=config.max_leases, max_reserved_bytes=config.max_reserved_bytes,
                                 queue_s=config.queue_deadline_s)
        self.listener: KVListener | None = None
        self.server: aio.Server | None = None
        self.servicer: MeteredServicer | None = None
        self.drain: Drain | None = None  # once started
        self.metrics: WorkerMetrics | None = None
        self.metrics_server: MetricsServer | None = None  # with config.metrics_port
        self.loop: StepLoop | None = None
        self.port = 0
        self.model_info: pb.ModelInfo | None = None
        self.measured: MeasuredProfile | None = None  # start-up measurement, where not declared
        self.prefill_probe: tuple[tuple[int, float], ...] = ()  # (tokens, seconds), where TFLOPS are measured

    @property
    def grpc_address(self) -> str:
        return f"{_bracket(self.config.public_host)}:{self.port}"

    @property
    def kv_port(self) -> int:
        return self.listener.port if self.listener else 0

    @property
    def metrics_url(self) -> str | None:
        """Where this worker serves ``/metrics`` (None: ``--metrics-port`` not given)."""
        if self.metrics_server is None:
            return None
        return f"http://{_bracket(self.config.public_host)}:{self.metrics_server.port}/metrics"

    async def start(self) -> None:
        """Load the model, then open the KV listener and the gRPC server."""
        config = self.config
        model_dir = resolve_model(config.model)
        spec = read_model_spec(model_dir)  # refuses unsupported architectures before loading weights
        factory = self._engine_factory or (lambda: _load_engine(config, model_dir))
        self.engines = EngineThread(factory, name=f"engine-{config.engine}")
        async with startup_lock(config.startup_lock):  # load and measure alone among this machine's workers
            engine = await self.engines.start()
            await asyncio.to_thread(_warm_grammar_tokenizer, engine)
            self.model_info = model_info(model_dir, spec, engine, config.model_id)
            if not all(config.declared_figures):
                self.measured = await self._measure(engine)
            if not config.declared_figures[0]:
                self.prefill_probe = await self._probe(engine, spec)
        self.listener = KVListener(self.leases, config.cluster_key, config.host, config.kv_port,
                                   handshake_timeout=config.handshake_timeout_s,
                                   max_connections=config.max_leases + 16)
        settings = ServiceSettings(
            can_prefill="prefill" in config.roles, can_decode="decode" in config.roles,
            kv_host=config.public_host, kv_port=self.listener.port, chunk_size=config.chunk_size,
            lease_s=config.lease_s, connect_timeout_s=config.connect_timeout_s,
            send_timeout_s=config.send_timeout_s, threaded_send=config.send_mode == "thread",
            max_queued_bytes=config.max_queued_bytes,
        )
        # with a KV budget, the left-padded batch (rows x longest row) stays within it too
        per_token = engine.kv_layout(1).total_bytes
        max_batch_tokens = max(1, config.max_reserved_bytes // per_token) if config.max_reserved_bytes else None
        self.loop = StepLoop(self.engines, interleave=config.interleave_prefill, max_batch=config.max_batch,
                             max_batch_tokens=max_batch_tokens)
        prefix_cache = PrefixCache(self.model_info.fingerprint, config.prefix_cache_bytes,
                                   windows=engine.kv_layout(0).windows)  # sliding layers: no prefix reuse
        state = WorkerState(settings, self.engines, self.leases, spec, config.cluster_key, loop=self.loop,
                            prefix_cache=prefix_cache)
        self.metrics = WorkerMetrics(config.node_id, state)
        self.drain = Drain(state, config.node_id, config.drain_timeout_s)
        self.servicer = MeteredServicer(self.metrics, state, self.model_info, self.profile,
                                        queue_deadline_s=config.queue_deadline_s, drain=self.drain)
        self.server = aio.server(interceptors=[AuthServerInterceptor(config.cluster_key)], options=SERVER_OPTIONS)
        pb_grpc.add_WorkerServicer_to_server(self.servicer, self.server)
        try:
            self.port = self.server.add_insecure_port(f"{_bracket(config.host)}:{config.port}")
        except RuntimeError:  # grpc says only "Failed to bind"; SO_REUSEPORT is off, so a fixed port is taken
            self.port = 0
        if not self.port:
            raise OSError(errno.EADDRINUSE, f"gRPC port {config.port} on {config.host} is already in use "
                                            "(or not bindable); choose another with --port")
        await self.server.start()
        if config.metrics_port is not None:
            self.metrics_server = MetricsServer(self.metrics, config.host, config.metrics_port)
            try:
                await self.metrics_server.start()
            except OSError as e:
                self.metrics_server = None
                raise OSError(e.errno, f"metrics port {config.metrics_port} on {config.host}: {e.strerror or e}; "
                                       "choose another with --metrics-port") from e

    async def stop(self) -> None:
        """Stop serving: in-flight RPCs get ``grace_s``, then every lease is freed."""
        try:
            if self.metrics_server is not None:
                await self.metrics_server.stop()
            if self.server is not None:
                await self.server.stop(self.config.grace_s)
        finally:
            if self.loop is not None:
                self.loop.close()  # ends whatever the grace period left running
            if self.listener is not None:
                self.listener.close()
            if self.engines is not None:
                await self._close_engine(self.engines.shutdown())

    async def _close_engine(self, closing: concurrent.futures.Future[None] | None) -> None:
        """Wait up to ``grace_s`` for the engine's close on its thread (it runs
        after any job still running; the interpreter waits for it at exit anyway)."""
        if closing is None:
            return
        done, _ = await asyncio.wait([asyncio.wrap_future(closing)], timeout=self.config.grace_s)
        if not done:
            log.warning("worker %s: the engine is still busy; it closes when its job ends", self.config.node_id)
        elif not closing.cancelled() and closing.exception() is not None:
            log.warning("worker %s: closing the engine failed: %s", self.config.node_id, closing.exception())

    async def _measure(self, engine: Engine) -> MeasuredProfile | None:
        """TFLOPS and memory bandwidth on the engine's thread, device and dtype."""
        try:
            measured = await self.engines.run(engine.measure_profile, BUDGET_S)
        except Exception as e:  # an unmeasurable device reports 0 (unknown), it still serves
            log.warning("could not measure this node's profile (%s: %s); declare it with --profile "
                        "(or --hardware, --tflops, --mem-bw-gbps)", type(e).__name__, e)
            return None
        log.info("measured %.2f TFLOPS, %.1f GB/s on %s", measured.tflops, measured.mem_bw_gbps, engine.device)
        return measured

    async def _probe(self, engine: Engine, spec: ModelSpec) -> tuple[tuple[int, float], ...]:
        """The served model's prefill timed on the engine's thread (workers/rpc/profile.py)."""
        try:
            points = await self.engines.run(probe_prefill, engine, spec.vocab_size,
                                            spec.max_position_embeddings - 1, self.config.chunk_size)
        except Exception as e:  # the probe is advice: without it the scheduler prices prefill from TFLOPS
            log.warning("could not time a prefill of the model (%s: %s); the scheduler will price this "
                        "node's prefill from its TFLOPS", type(e).__name__, e)
            return ()
        log.info("prefill probe: %s", ", ".join(f"{n} tokens in {t:.3f} s" for n, t in points))
        return points

    def profile(self) -> pb.NodeProfile:
        """This node's ``NodeProfile``: declared figures, else measured ones; free memory now."""
        config, measured = self.config, self.measured
        tflops, mem_bw_gbps = config.declared_figures
        engine = self.engines.engine if self.engines else None
        return pb.NodeProfile(
            node_id=config.node_id, roles=list(config.roles), engine=config.engine,
            device=engine.device if engine else "",
            tflops=tflops or (measured.tflops if measured else 0.0),
            mem_bw_gbps=mem_bw_gbps or (measured.mem_bw_gbps if measured else 0.0),
            free_mem_bytes=engine.free_memory_bytes() if engine else host_free_bytes(),
            version=pdcluster_version(),
            grpc_address=self.grpc_address, kv_port=self.kv_port,
            key_fingerprint=config.cluster_key.fingerprint,
            hardware=config.hardware, profile_source=profile_source(bool(tflops), bool(mem_bw_gbps)),
            prefill_probe=[pb.PrefillProbe(tokens=n, seconds=t) for n, t in self.prefill_probe],
        )

    def node_info(self) -> dict[str, Any]:
        """What discovery advertises: the fields of ``cluster.node.NodeInfo``."""
        profile = self.profile()
        return {
            "node_id": profile.node_id, "roles": tuple(profile.roles), "engine": profile.engine,
            "model_id": self.model_info.model_id if self.model_info else "",
            "weights_fingerprint": self.model_info.fingerprint if self.model_info else "",
            "host": self.config.public_host, "grpc_port": self.port, "kv_port": self.kv_port,
            "device": profile.device, "tflops": profile.tflops, "mem_bw_gbps": profile.mem_bw_gbps,
            "free_mem_bytes": profile.free_mem_bytes, "version": profile.version,
            "key_fingerprint": profile.key_fingerprint,
            "hardware": profile.hardware, "profile_source": profile.profile_source,
            "prefill_probe": tuple((p.tokens, p.seconds) for p in profile.prefill_probe),
        }

    async def __aenter__(self) -> Worker:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()


async def run_worker(config: WorkerConfig, on_started: OnStarted | None = None) -> None:
    """Serve until SIGINT or SIGTERM, then drain (``config.drain_timeout_s``) and stop; a second
    signal stops at once. ``on_started`` is the discovery hook."""
    worker = Worker(config)
    signals: asyncio.Queue[int] = asyncio.Queue()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, signals.put_nowait, sig)
    undo: Callable[[], Awaitable[None]] | None = None
    try:
        await worker.start()
        print(f"pdc worker {config.node_id} ready: role={config.role} engine={config.engine} "
              f"model={worker.model_info.model_id} grpc={worker.grpc_address} "
              f"kv={_bracket(config.public_host)}:{worker.kv_port} key={config.cluster_key.fingerprint}"
              + (f" metrics={worker.metrics_url}" if worker.metrics_url else ""), flush=True)
        if on_started is not None:
            undo = await on_started(worker.node_info())
        first = await signals.get()
        await _drain_until_idle(worker, signal.Signals(first).name, signals)
        log.warning("worker %s: shutting down", config.node_id)
    finally:
        if undo is not None:
            with contextlib.suppress(Exception):
                await undo()
        await worker.stop()


async def _drain_until_idle(worker: Worker, reason: str, signals: asyncio.Queue[int]) -> None:
    """Drain ``worker`` until nothing is in flight (stragglers fail over at the drain timeout,
    then get ``grace_s`` to go), or until a second signal."""
    if worker.drain is None:
        return
    worker.drain.shutting_down = True
    worker.drain.start(reason)
    idle = asyncio.ensure_future(worker.drain.wait_idle(worker.config.drain_timeout_s + worker.config.grace_s))
    again = asyncio.ensure_future(signals.get())
    done, _ = await asyncio.wait([idle, again], return_when=asyncio.FIRST_COMPLETED)
    for task in (idle, again):
        task.cancel()
    if again in done:
        log.warning("worker %s: a second signal: stopping now", worker.config.node_id)


# ---------------------------------------------------------------- CLI


def add_worker_parser(sub: Any, discovery: Discovery | None = None,
                      models: ModelResolver | None = None) -> None:
    """``pdc worker``: serve one engine to the cluster, advertised with
    ``discovery(config)`` unless ``--no-advertise`` (no hook without one).
    ``models`` turns ``--model`` (None when not given) into a model folder or
    hub id; without it ``--model`` is required."""
    p = sub.add_parser(
        "worker",
        help="serve one engine (prefill, decode or both) to the cluster",
        description=(
            "Load a model on one engine and serve it over gRPC (control plane) and a raw TCP port "
            "(KV data plane), both authenticated with the cluster key (see `pdc init`). Prints one "
            "line with the bound addresses, advertises itself over mDNS unless --no-advertise, and "
            "runs until Ctrl-C or SIGTERM."
        ),
    )
    p.add_argument("--role", choices=sorted(ROLES), required=True, help="what this worker does")
    p.add_argument("--engine", choices=engine_names(), required=True, help=describe_engines())
    p.add_argument("--model", required=models is None, default=None,
                   help="model folder, hub id when online, or a built-in model name (`pdc models`)"
                        + ("; default: the built-in default model" if models is not None else ""))
    p.add_argument("--host", default="127.0.0.1", help="bind address (default: 127.0.0.1; 0.0.0.0 for all)")
    p.add_argument("--port", type=int, default=0, help="gRPC port (default: a free one)")
    p.add_argument("--kv-port", type=int, default=0, help="KV data-plane port (default: a free one)")
    p.add_argument("--metrics-port", type=int, default=None,
                   help="serve Prometheus metrics at http://HOST:PORT/metrics on --host, without authentication "
                        "(0: a free port, printed in the ready line; default: off; the scheduler's /metrics "
                        "carries every node's main figures)")
    p.add_argument("--startup-lock", default=None, metavar="PATH",
                   help="hold an exclusive lock on this file while loading the model and measuring this node, so "
                        "workers on one machine given the same file measure one at a time, not under each other's "
                        "load (pdc up passes one; default: none)")
    p.add_argument("--advertise-host", default=None, help="address other nodes use (default: --host)")
    p.add_argument("--peers", default="", help="static peers, host:port,... (where multicast does not work)")
    p.add_argument("--no-advertise", action="store_true", help="do not advertise over mDNS")
    p.add_argument("--mdns-interface", action="append", default=None, help="advertise only on this address (repeatable)")
    p.add_argument("--cluster-key-file", default=None, help="cluster key (default: $PDC_CLUSTER_KEY, then `pdc init`'s file)")
    p.add_argument("--node-id", default="", help="node id (default: <hostname>-<engine>-<random>)")
    p.add_argument("--model-id", default=None, help="model name clients send (default: a quantized copy's declared base id, else the folder name)")
    p.add_argument("--device", default=None, help="torch device: cuda, mps or cpu (default: best available)")
    p.add_argument("--dtype", choices=DTYPES, default=None, help="compute dtype (default: the checkpoint's)")
    p.add_argument("--lease-s", type=float, default=30.0,
                   help="free a reservation when its prefill node sends no KV byte for this long once it is "
                        "computing (default: 30)")
    p.add_argument("--queue-deadline-s", type=float, default=QUEUE_DEADLINE_S,
                   help="fail a prefill that waits longer than this on the engine before it starts; a decode "
                        f"node allows its senders this much queue time (default: {QUEUE_DEADLINE_S:g})")
    p.add_argument("--chunk-size", type=int, default=128, help="prefill chunk in tokens (default: 128)")
    p.add_argument("--max-leases", type=int, default=16, help="concurrent KV reservations (default: 16)")
    p.add_argument("--kv-budget-gb", type=kv_budget_bytes, default=None, metavar="GB", dest="kv_budget_bytes",
                   help="KV budget: the most KV cache, in GB (1e9 bytes), that this worker's reservations "
                        "may hold at once, e.g. the memory it can spare beside the weights; a Decode whose KV "
                        "would take the total over it fails at once with RESOURCE_EXHAUSTED, naming the budget "
                        "(default: no budget; only --max-leases bounds reservations)")
    p.add_argument("--prefix-cache-gb", type=gb_bytes, default=PREFIX_CACHE_BYTES, metavar="GB",
                   dest="prefix_cache_bytes",
                   help="keep finished requests' KV (prompt plus answer) for reuse by later requests that start "
                        "with the same tokens, up to this many GB (1e9 bytes), least recently used out first; "
                        "with --kv-budget-gb it also yields to live requests' KV; 0 turns it off "
                        f"(default: {PREFIX_CACHE_BYTES / 1e9:g})")
    p.add_argument("--max-batch", type=int, default=MAX_BATCH,
                   help=f"requests decoding together in one step (continuous batching; default: {MAX_BATCH})")
    p.add_argument("--no-interleave-prefill", action="store_false", dest="interleave_prefill",
                   help="run each prompt's prefill to its end before the next decode step, instead of one "
                        "chunk per step (running streams then stall for a whole prefill; for measurement)")
    p.add_argument("--profile", default=None, metavar="FILE.toml",
                   help="declare this machine's profile: hardware, tflops, mem_bw_gbps (see examples/profiles/)")
    p.add_argument("--hardware", choices=list(HARDWARE), default=None,
                   help="catalog hardware; its peak TFLOPS and bandwidth are declared (overrides --profile's)")
    p.add_argument("--tflops", type=float, default=None,
                   help="declared peak TFLOPS (overrides --profile and --hardware; default: measured at start-up)")
    p.add_argument("--mem-bw-gbps", type=float, default=None,
                   help="declared memory bandwidth, GB/s (overrides --profile and --hardware; default: measured)")
    p.add_argument("--drain-timeout", type=float, default=DRAIN_TIMEOUT_S, metavar="S", dest="drain_timeout_s",
                   help="on SIGTERM/SIGINT (or `pdc drain`) take no new request and give those in flight this long "
                        "to finish; the rest fail over to other nodes (the scheduler moves them). A second signal "
                        f"stops at once (default: {DRAIN_TIMEOUT_S:g})")
    p.add_argument("--send-mode", choices=SEND_MODES, default="thread", help="KV sending: sender thread or engine thread")
    p.set_defaults(run=lambda args: run_worker_command(args, discovery, models))


def gb_bytes(text: str) -> int:
    """A GB flag's value in bytes (``--prefix-cache-gb``): a finite number of GB >= 0, rounded up."""
    try:
        gb = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not math.isfinite(gb) or gb < 0:
        raise argparse.ArgumentTypeError(f"must be a finite number of GB >= 0, got {text!r}")
    return math.ceil(gb * 1e9)


def kv_budget_bytes(text: str) -> int:
    """``--kv-budget-gb``'s value in bytes: a finite number of GB > 0, rounded up to a whole byte."""
    try:
        gb = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not math.isfinite(gb) or gb <= 0:
        raise argparse.ArgumentTypeError(f"must be a finite number of GB > 0, got {text!r}")
    return math.ceil(gb * 1e9)


def config_from_args(args: argparse.Namespace) -> WorkerConfig:
    """``pdc worker`` flags -> ``WorkerConfig`` (reads the cluster key and the profile file).

    Each profile key comes from its flag, else the profile file; the config
    then fills a missing figure from the declared hardware's catalog entry,
    and the worker measures the rest at start-up."""
    declared = declared_profile(args.profile, hardware=args.hardware, tflops=args.tflops,
                                mem_bw_gbps=args.mem_bw_gbps)
    return WorkerConfig(
        role=args.role, engine=args.engine, model=args.model, cluster_key=load_cluster_key(args.cluster_key_file),
        host=args.host, port=args.port, kv_port=args.kv_port, advertise_host=args.advertise_host,
        metrics_port=args.metrics_port, startup_lock=args.startup_lock,
        device=args.device, dtype=args.dtype, node_id=args.node_id, model_id=args.model_id,
        lease_s=args.lease_s, queue_deadline_s=args.queue_deadline_s, chunk_size=args.chunk_size,
        max_leases=args.max_leases, max_reserved_bytes=args.kv_budget_bytes,
        prefix_cache_bytes=args.prefix_cache_bytes, max_batch=args.max_batch,
        interleave_prefill=args.interleave_prefill,
        hardware=declared.hardware or "", tflops=declared.tflops or 0.0, mem_bw_gbps=declared.mem_bw_gbps or 0.0,
        send_mode=args.send_mode, drain_timeout_s=args.drain_timeout_s,
        peers=tuple(p.strip() for p in args.peers.split(",") if p.strip()),
        advertise=not args.no_advertise,
        mdns_interfaces=tuple(args.mdns_interface) if args.mdns_interface else None,
    )


def run_worker_command(args: argparse.Namespace, discovery: Discovery | None = None,
                       models: ModelResolver | None = None) -> int:
    """CLI body of ``pdc worker``: serve, advertised with ``discovery(config)`` unless ``--no-advertise``."""
    if models is not None:
        args.model = models(args.model)
    config = config_from_args(args)
    hook = discovery(config) if discovery is not None and config.advertise else None
    try:
        asyncio.run(run_worker(config, hook))
    except (OSError, RuntimeError) as e:  # a port in use, an unreachable address, ...
        print(f"pdc worker: error: {e.strerror if isinstance(e, OSError) and e.strerror else e}", file=sys.stderr)
        # a taken port is a usage error (exit 2, as every command that binds one); the rest are failures
        return 2 if isinstance(e, OSError) and e.errno == errno.EADDRINUSE else 1
    return 0


# ---------------------------------------------------------------- helpers


def _load_engine(config: WorkerConfig, model_dir: Path) -> Engine:
    return load_engine(config.engine, model_dir, config.dtype, config.device)


def _warm_grammar_tokenizer(engine: Engine) -> None:
    """Build the engine's llguidance tokenizer now (it walks the vocabulary), not
    on the event loop when the first grammar arrives. A model it cannot serve
    grammars for still serves everything else: its grammars fail then, saying why."""
    tokenizer = getattr(engine, "grammar_tokenizer", None)  # a test's stand-in engine may have none
    if tokenizer is None:
        return
    try:
        tokenizer.llg
    except Exception as e:  # noqa: BLE001 - any reason is a reason to log, not to refuse to start
        log.warning("grammar-constrained sampling is unavailable on this worker: %s", e)


def _auto_node_id(engine: str) -> str:
    host = re.sub(r"[^A-Za-z0-9-]", "-", socket.gethostname().split(".")[0]).strip("-") or "node"
    return f"{host[:48]}-{engine}-{secrets.token_hex(2)}"


def _this_machine_ip() -> str:
    """The local address of the default route (a UDP connect sends no packet)."""
    with contextlib.suppress(OSError), socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.connect(("192.0.2.1", 9))  # TEST-NET-1: never routed anywhere real
        return s.getsockname()[0]
    return socket.gethostname()


def _bracket(host: str) -> str:
    return f"[{host}]" if ":" in host and not host.startswith("[") else host
