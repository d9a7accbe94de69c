"""Shared fixtures and helpers: tiny checkpoints built once per session (never
downloaded), KV slices and layouts, in-process and out-of-process workers.

Test modules import helpers from here (``from conftest import ...``), never
from one another.
"""
from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from hypothesis import strategies as st

os.environ.setdefault("HF_HUB_OFFLINE", "1")
# The tests run gRPC in this process and also spawn worker processes. With
# gRPC's fork support on, a child forked for subprocess.Popen restarts gRPC's
# poller before exec, finds its epoll fd closed (close_fds) and aborts
# ("epoll_wait error: Bad file descriptor", exit -6). Spawning needs none of it.
os.environ.setdefault("GRPC_ENABLE_FORK_SUPPORT", "false")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import grpc  # noqa: E402
from aiohttp import web  # noqa: E402
from grpc import aio  # noqa: E402

from cluster.auth import ClusterKey, generate_key, load_cluster_key, write_config  # noqa: E402
from proto import pdcluster_pb2 as pb  # noqa: E402,F401
from scheduler.request import (  # noqa: E402
    FinishEvent,
    GenerationRequest,
    ModelEntry,
    NoCapacityError,
    RequestStats,
    TokenEvent,
    mean_tpot_s,
)
from scheduler.tokenizer import PromptCodec, TokenizerBundle  # noqa: E402
from workers.engines.base import WIRE_DTYPES, KVLayout, KVSlice, join_layer, numpy_dtype  # noqa: E402
from workers.kv.transport import ReceivedKV  # noqa: E402
from workers.rpc.client import WorkerClient  # noqa: E402
from workers.rpc.server import Worker, WorkerConfig  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="session")
def make_tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Callable[..., Path]:
    """``make_tiny_model(arch, seed=0)`` -> folder of a tiny checkpoint, cached per session."""
    from workers.tools.modelgen import make_model

    built: dict[tuple[str, int], Path] = {}

    def build(arch: str = "llama", seed: int = 0) -> Path:
        key = (arch, seed)
        if key not in built:
            built[key] = make_model(tmp_path_factory.mktemp(f"{arch}-{seed}"), arch, seed=seed, preset="tiny")
        return built[key]

    return build


@pytest.fixture(scope="module")
def engines(make_tiny_model: Callable[..., Path]) -> Any:
    """``engines(kind, arch)`` -> an fp32 engine of the tiny ``arch``, loaded once per module."""
    from workers.engines.registry import load_engine

    loaded: dict[tuple[str, str], Any] = {}

    def get(kind: str, arch: str) -> Any:
        if (kind, arch) not in loaded:
            loaded[kind, arch] = load_engine(kind, make_tiny_model(arch), "float32")
        return loaded[kind, arch]

    yield get
    # not close(): the MLX engines computed on this (the test session's) thread, and MLX's close
    # clears the calling thread's streams, which would break every later MLX test on it
    for engine in loaded.values():
        for rid in engine.cached_requests():
            engine.release(rid)


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def have(module: str) -> bool:
    """Whether ``module`` imports; tests that need it skip with the reason otherwise."""
    try:
        __import__(module)
    except ImportError:
        return False
    return True


requires_torch = pytest.mark.skipif(not have("torch"), reason="torch extra not installed")
requires_mlx = pytest.mark.skipif(not have("mlx.core"), reason="mlx extra not installed")
requires_torch_and_mlx = pytest.mark.skipif(not (have("torch") and have("mlx.core")),
                                            reason="needs the torch and mlx extras")


# ---------------------------------------------------------------- KV slices and layouts

RID = "req-1"
TRANSFER_LAYOUT = KVLayout(num_layers=4, kv_heads=2, head_dim=8, dtype="bfloat16", num_tokens=50)
CHUNKS = [(0, 16), (16, 16), (32, 16), (48, 2)]
WAIT_S = 10.0  # generous bound on any wait that should end much sooner


def make_slices(layout: KVLayout, chunks: list[tuple[int, int]], seed: int = 0) -> list[KVSlice]:
    rng = np.random.default_rng(seed)
    return [
        random_slice(rng, layout, layer, start, ntok) for start, ntok in chunks for layer in range(layout.num_layers)
    ]


def random_slice(rng: np.random.Generator, layout: KVLayout, layer: int, start: int, ntok: int) -> KVSlice:
    """Random bit patterns (NaNs and infinities included) in the layout's wire dtype."""
    dtype = numpy_dtype(layout.dtype)
    shape = (layout.kv_heads, ntok, layout.head_dim)  # [kv_heads, ntok, head_dim]
    nbytes = int(np.prod(shape)) * dtype.itemsize
    keys = np.frombuffer(rng.bytes(nbytes), dtype).reshape(shape).copy()
    values = np.frombuffer(rng.bytes(nbytes), dtype).reshape(shape).copy()
    return KVSlice(layer, start, keys, values, layout.dtype)


def frame_bytes(buffers: list) -> bytes:
    return b"".join(bytes(b) for b in buffers)


def assert_same_slice(got: KVSlice, want: KVSlice) -> None:
    assert (got.layer, got.start, got.dtype) == (want.layer, want.start, want.dtype)
    assert got.keys.shape == want.keys.shape and got.values.shape == want.values.shape
    assert got.keys.dtype == want.keys.dtype and got.values.dtype == want.values.dtype
    assert got.keys.tobytes() == want.keys.tobytes()  # bit-exact, NaN payloads included
    assert got.values.tobytes() == want.values.tobytes()


@st.composite
def chunked_layouts(draw: st.DrawFn) -> tuple[KVLayout, list[tuple[int, int]], int]:
    """A random layout, a random split of its tokens into chunks, and a data seed."""
    layout = KVLayout(
        num_layers=draw(st.integers(1, 4)),
        kv_heads=draw(st.integers(1, 4)),
        head_dim=draw(st.sampled_from([1, 2, 8, 16])),
        dtype=draw(st.sampled_from(sorted(WIRE_DTYPES))),
        num_tokens=draw(st.integers(1, 40)),
    )
    cuts = draw(st.sets(st.integers(1, layout.num_tokens - 1), max_size=6)) if layout.num_tokens > 1 else set()
    bounds = [0, *sorted(cuts), layout.num_tokens]
    chunks = [(start, end - start) for start, end in zip(bounds, bounds[1:], strict=False)]
    return layout, chunks, draw(st.integers(0, 2**32 - 1))


def assert_layers_match(received: ReceivedKV, slices: list[KVSlice]) -> None:
    for layer in range(received.layout.num_layers):
        parts = sorted((s for s in slices if s.layer == layer), key=lambda s: s.start)
        keys, values = join_layer(received.slices, layer, received.layout)
        assert keys.shape == (received.layout.kv_heads, received.layout.num_tokens, received.layout.head_dim)
        assert keys.tobytes() == np.concatenate([s.keys for s in parts], axis=1).tobytes()
        assert values.tobytes() == np.concatenate([s.values for s in parts], axis=1).tobytes()


# ---------------------------------------------------------------- workers

@pytest.fixture(scope="module")
def model(make_tiny_model: Callable[..., Path]) -> Path:
    return make_tiny_model("llama")


def run(body: Callable[[], Any], timeout: float = 120.0) -> Any:
    """Run an async test body under one overall deadline."""
    return asyncio.run(asyncio.wait_for(body(), timeout))


def config(model: Path, key: ClusterKey, role: str, **overrides: Any) -> WorkerConfig:
    """An in-process worker (MLX unless ``engine`` is overridden); declaring a
    profile skips the start-up measurement. The prefix cache is off unless
    ``prefix_cache_bytes`` is given: tests of the transfer mechanics send the
    same prompt again and again and must see every transfer whole."""
    fields: dict[str, Any] = {"engine": "mlx", "tflops": 1.0, "mem_bw_gbps": 100.0, "prefix_cache_bytes": 0,
                              **overrides}
    return WorkerConfig(role=role, model=str(model), cluster_key=key, advertise=False,
                        node_id=f"test-{role}", grace_s=1.0, **fields)


@contextlib.asynccontextmanager
async def started(*workers: Worker) -> AsyncIterator[list[WorkerClient]]:
    """Start workers one after another (engine imports are not thread-safe) and
    yield a client per worker; stop everything afterwards."""
    clients: list[WorkerClient] = []
    try:
        for worker in workers:
            await worker.start()
            clients.append(WorkerClient(worker.grpc_address, worker.config.cluster_key))
        yield clients
    finally:
        for client in clients:
            await client.close()
        for worker in workers:
            await worker.stop()


async def status_code(awaitable: Any) -> tuple[grpc.StatusCode, str]:
    with pytest.raises(aio.AioRpcError) as failure:
        await awaitable
    return failure.value.code(), failure.value.details()


class GatedEngine:
    """A real engine whose prefill pauses after its first slice until ``gate`` opens."""

    def __init__(self, inner: Any, entered: threading.Event, gate: threading.Event) -> None:
        self.inner, self.entered, self.gate = inner, entered, gate

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    def _sink(self, on_slice: Any) -> Any:
        first = [True]

        def sink(kv_slice: KVSlice) -> None:
            on_slice(kv_slice)
            if first[0]:
                first[0] = False
                self.entered.set()
                self.gate.wait(20)

        return sink

    def prefill_chunks(self, request_id: str, token_ids: list[int], on_slice: Any, chunk_size: int = 128,
                       **kwargs: Any) -> Any:
        return self.inner.prefill_chunks(request_id, token_ids, self._sink(on_slice), chunk_size, **kwargs)

    def prefill(self, request_id: str, token_ids: list[int], on_slice: Any, chunk_size: int = 128,
                **kwargs: Any) -> Any:
        return self.inner.prefill(request_id, token_ids, self._sink(on_slice), chunk_size, **kwargs)


class PacedEngine(GatedEngine):
    """A real engine whose prefill pauses ``pause_s`` after every slice."""

    def __init__(self, inner: Any, pause_s: float) -> None:
        self.inner, self.pause_s = inner, pause_s

    def _sink(self, on_slice: Any) -> Any:
        def sink(kv_slice: KVSlice) -> None:
            on_slice(kv_slice)
            time.sleep(self.pause_s)

        return sink


@dataclass
class WorkerProcess:
    proc: subprocess.Popen
    lines: list[str]
    ready: threading.Event
    log: Path

    @property
    def grpc(self) -> str:
        return re.search(r"grpc=(\S+)", self._ready_line()).group(1)

    @property
    def kv(self) -> tuple[str, int]:
        host, port = re.search(r"kv=(\S+)", self._ready_line()).group(1).rsplit(":", 1)
        return host, int(port)

    def _ready_line(self) -> str:
        return next(line for line in self.lines if " ready: " in line)

    def tail(self) -> str:
        return "".join(self.lines)[-3000:] + self.log.read_text(errors="replace")[-3000:]


def start_worker_process(role: str, engine: str, model: Path, key_file: Path, log: Path,
                         *extra_args: str) -> WorkerProcess:
    """``pdc worker`` on 127.0.0.1 without mDNS; ``extra_args`` are more ``pdc worker`` flags. The
    prefix cache is off (as in ``config``) unless ``extra_args`` set ``--prefix-cache-gb``."""
    prefix = [] if "--prefix-cache-gb" in extra_args else ["--prefix-cache-gb", "0"]
    cmd = [sys.executable, "-m", "cluster.cli", "worker", "--role", role, "--engine", engine,
           "--model", str(model), "--host", "127.0.0.1", "--no-advertise", "--cluster-key-file", str(key_file),
           "--node-id", f"proc-{role}", "--dtype", "float32", *prefix, *extra_args]
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "HF_HUB_OFFLINE": "1"}
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=log.open("wb"),
                            stdin=subprocess.DEVNULL, text=True)
    worker = WorkerProcess(proc, [], threading.Event(), log)

    def read() -> None:
        for line in proc.stdout:  # ends when the process closes stdout
            worker.lines.append(line)
            if " ready: " in line:
                worker.ready.set()

    threading.Thread(target=read, daemon=True).start()
    return worker


@pytest.fixture(scope="module")
def processes(model: Path, tmp_path_factory: pytest.TempPathFactory) -> Any:
    """A torch prefill worker and an MLX decode worker, each its own process."""
    if not have("torch"):
        pytest.skip("needs the torch extra (prefill engine)")
    tmp = tmp_path_factory.mktemp("workers")
    key = generate_key()
    key_file = write_config(tmp / "cluster.json", key)
    workers = {role: start_worker_process(role, engine, model, key_file, tmp / f"{role}.log")
               for role, engine in (("prefill", "torch"), ("decode", "mlx"))}
    try:
        for role, worker in workers.items():
            if not worker.ready.wait(120):
                pytest.fail(f"{role} worker did not start:\n{worker.tail()}")
        yield key, workers
    finally:
        for worker in workers.values():
            if worker.proc.poll() is None:
                worker.proc.send_signal(signal.SIGTERM)
        for worker in workers.values():
            try:
                worker.proc.wait(15)
            except subprocess.TimeoutExpired:
                worker.proc.kill()
                worker.proc.wait(5)


# ---------------------------------------------------------------- the HTTP API against a fake backend

MODEL = "tiny"
REPLY_TEXT = "The quick brown fox jumps over the lazy dog."


class FakeBackend:
    """Answers every request with REPLY_TEXT; records requests and cancellations."""

    def __init__(self, codec: PromptCodec, ready: bool = True, capacity: bool = True) -> None:
        self.codec, self.ready, self.capacity = codec, ready, capacity
        self.requests: list[GenerationRequest] = []
        self.closed_early = 0
        self.token_delay_s = 0.0
        self.fail_with: Exception | None = None  # raised after ``fail_after`` tokens
        self.fail_after = 0
        self.reply_text = REPLY_TEXT  # what every request answers
        self.context_length = 512

    def models(self) -> list[ModelEntry]:
        return [ModelEntry(MODEL, context_length=self.context_length, eos_token_ids=(2,))]

    def codec_for(self, model: str) -> PromptCodec | None:
        return self.codec if model == MODEL else None

    def health(self) -> tuple[bool, dict]:
        return self.ready, {"nodes": [{"node_id": "p0"}, {"node_id": "d0"}] if self.ready else []}

    async def generate(self, request: GenerationRequest) -> AsyncIterator[TokenEvent | FinishEvent]:
        if not self.capacity:
            raise NoCapacityError("no decode-capable node is available")
        self.requests.append(request)
        ids = self.codec.encode(self.reply_text)[: request.max_tokens]
        finished = False
        try:
            for sent, token in enumerate(ids):
                if self.fail_with is not None and sent == self.fail_after:
                    raise self.fail_with
                if self.token_delay_s:
                    await asyncio.sleep(self.token_delay_s)
                yield TokenEvent(token)
            finished = True
            stats = RequestStats(request_id=request.request_id, prefill_node="p0", decode_node="d0", kv_bytes=1234,
                                 ttft_s=0.01, tpot_s=mean_tpot_s(0.01, 0.01 + 0.002 * (len(ids) - 1), len(ids)),
                                 prompt_tokens=len(request.prompt_token_ids), completion_tokens=len(ids))
            yield FinishEvent("length" if len(ids) == request.max_tokens else "stop", stats)
        finally:
            if not finished:
                self.closed_early += 1


@pytest.fixture(scope="module")
def codec(make_tiny_model) -> PromptCodec:
    folder: Path = make_tiny_model("llama")
    config = json.loads((folder / "tokenizer_config.json").read_text())
    return PromptCodec(TokenizerBundle((folder / "tokenizer.json").read_text(), config["chat_template"]))


class ServerThread:
    """The aiohttp app on 127.0.0.1:<ephemeral> in a background event loop."""

    def __init__(self, app: web.Application) -> None:
        self.loop = asyncio.new_event_loop()
        self.runner = web.AppRunner(app, handler_cancellation=True)
        ready = threading.Event()
        self.thread = threading.Thread(target=self._run, args=(ready,), daemon=True)
        self.thread.start()
        assert ready.wait(10), "server did not start"

    def _run(self, ready: threading.Event) -> None:
        asyncio.set_event_loop(self.loop)
        self.loop.run_until_complete(self.runner.setup())
        site = web.TCPSite(self.runner, "127.0.0.1", 0)
        self.loop.run_until_complete(site.start())
        self.port = site._server.sockets[0].getsockname()[1]
        ready.set()
        self.loop.run_forever()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def stop(self) -> None:
        asyncio.run_coroutine_threadsafe(self.runner.cleanup(), self.loop).result(10)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)


class WorkersThread:
    """In-process workers serving from a background event loop, for synchronous tests that
    drive ``pdc serve`` processes (``addresses`` go to its ``--peers``): real gRPC and KV
    ports on 127.0.0.1 without a process start-up per worker."""

    def __init__(self, *configs: WorkerConfig) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.workers = [Worker(c) for c in configs]
        try:
            self._call(self._start(), READY_S)
        except BaseException:
            self.stop()
            raise

    @property
    def addresses(self) -> list[str]:
        return [w.grpc_address for w in self.workers]

    async def _start(self) -> None:
        for worker in self.workers:  # one after another: engine imports are not thread-safe
            await worker.start()

    async def _stop(self) -> None:
        for worker in self.workers:
            await worker.stop()

    def _call(self, coro: Any, timeout: float) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def stop(self) -> None:
        try:
            self._call(self._stop(), 30)
        finally:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self.thread.join(10)


@pytest.fixture()
def backend(codec: PromptCodec) -> FakeBackend:
    return FakeBackend(codec)


@pytest.fixture()
def server(backend: FakeBackend) -> Any:
    """The real HTTP API (``scheduler.api.build_app``) over the fake backend."""
    from scheduler.api import build_app

    srv = ServerThread(build_app(backend))
    yield srv
    srv.stop()


class FakeTable:
    """A ``NodeTable`` stand-in for scheduler tests: fixed nodes, suspensions recorded."""

    def __init__(self, nodes: list) -> None:
        self.nodes = nodes
        self.suspended: dict[str, str] = {}
        self.refused: dict[str, str] = {}
        self.draining: dict[str, str] = {}

    def snapshot(self) -> list:
        return [n for n in self.nodes if n.node_id not in self.suspended]

    def suspend(self, node_id: str, reason: str) -> None:
        self.suspended[node_id] = reason


class FakePool:
    """A ``ClientPool`` stand-in: each node's fake worker, by node id."""

    def __init__(self, workers: dict) -> None:
        self.workers = workers

    def of(self, node: Any) -> Any:
        return self.workers[node.node_id]


# ---------------------------------------------------------------- real clusters, for fault injection

READY_S = 120.0  # a process's start-up bound on a loaded 2-core machine


@pytest.fixture
def key_file(tmp_path: Path) -> Path:
    """A fresh cluster key written as a `pdc init` config file."""
    return write_config(tmp_path / "cluster.json", generate_key())
FAULT_MESSAGES = [{"role": "user", "content": "Say something about caches."}]


class SchedulerProcess:
    """One `pdc serve` process reaching its workers through static peers (no mDNS)."""

    def __init__(self, key_file: Path, peers: list[str], log: Path, port: int | None = None,
                 *extra_args: str, env: dict[str, str] | None = None) -> None:
        self.port = port or free_port()
        cmd = [sys.executable, "-m", "cluster.cli", "serve", "--port", str(self.port), "--no-mdns",
               "--peers", ",".join(peers), "--cluster-key-file", str(key_file), *extra_args]
        self.log = log
        self.proc = subprocess.Popen(cmd, cwd=ROOT, stdout=log.open("ab"), stderr=subprocess.STDOUT,
                                     stdin=subprocess.DEVNULL,
                                     env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})})

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def health(self) -> dict | None:
        try:
            with urllib.request.urlopen(self.url + "/health", timeout=2) as resp:
                return json.loads(resp.read())
        except (urllib.error.URLError, ConnectionError, TimeoutError, ValueError):
            return None

    def wait_ready(self, num_nodes: int, timeout: float = READY_S) -> dict:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, self.log.read_text(errors="replace")[-3000:]
            health = self.health()
            if health and health.get("status") == "ok" and len(health["nodes"]) >= num_nodes and health["models"]:
                return health
            time.sleep(0.25)
        raise AssertionError(f"scheduler not ready in {timeout} s:\n{self.log.read_text(errors='replace')[-3000:]}")

    def chat(self, max_tokens: int = 12) -> object:
        import openai

        client = openai.OpenAI(base_url=self.url + "/v1", api_key="unused", timeout=120, max_retries=0)
        model = client.models.list().data[0].id
        return client.chat.completions.create(model=model, messages=FAULT_MESSAGES, max_tokens=max_tokens,
                                              temperature=0)

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(10)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.kill()


def stop_processes(procs) -> None:
    """SIGTERM every worker process, then SIGKILL what is left after 20 s."""
    for proc in procs:
        if proc.proc.poll() is None:
            proc.proc.terminate()
    for proc in procs:
        try:
            proc.proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.proc.kill()
            proc.proc.wait(5)


def assert_nothing_held(addresses: list[str], key_file: Path, timeout: float = 15.0) -> None:
    """Every worker ends with no request, lease or reserved KV byte (polled: cleanup is asynchronous)."""
    key = load_cluster_key(str(key_file))

    async def held() -> list[tuple[str, int, int, int]]:
        rows = []
        for address in addresses:
            client = WorkerClient(address, key)
            try:
                h = await client.health(timeout=5)
                rows.append((address, h.active_requests, h.active_leases, h.reserved_kv_bytes))
            finally:
                await client.close()
        return rows

    deadline = time.monotonic() + timeout
    while True:
        rows = asyncio.run(held())
        if all(r[1:] == (0, 0, 0) for r in rows) or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    assert all(r[1:] == (0, 0, 0) for r in rows), f"(address, requests, leases, reserved bytes): {rows}"


# ---------------------------------------------------------------- a real local Ray cluster


@dataclass
class RayHead:
    """A ``ray start --head --block`` process on 127.0.0.1: its GCS address and the
    environment a driver (``pdc ray ...``, ``ray.init``) needs to join it."""

    address: str
    env: dict[str, str]
    proc: subprocess.Popen


def ray_env(token: str) -> dict[str, str]:
    """Ray's own settings for a loopback-only, token-authenticated test cluster:
    ``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0`` keeps every Ray address on 127.0.0.1
    (Ray otherwise swaps 127.0.0.1 for the machine's routable address), and
    ``RAY_AUTH_MODE=token`` makes the GCS refuse drivers without the token."""
    return {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_USAGE_STATS_ENABLED": "0",
            "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": token}


@pytest.fixture(scope="session")
def ray_head() -> Any:
    """A real single-node Ray cluster for the session: 2 CPUs and the custom
    resources ``pdc_prefill: 1, pdc_decode: 1``, bound to 127.0.0.1, with Ray's
    token authentication on. Skips (saying why) when ray is not installed."""
    import secrets
    import shutil
    import tempfile

    if not have("ray"):
        pytest.skip("ray is not installed (pip install 'pdcluster[ray]'; make test installs it)")
    ray_bin = Path(sys.executable).with_name("ray")
    port = free_port()
    env = {**os.environ, **ray_env(secrets.token_hex(32))}
    temp_dir = tempfile.mkdtemp(prefix="pdcray-")  # short: Ray's socket paths must fit 107 bytes
    cmd = [str(ray_bin), "start", "--head", "--block", "--node-ip-address", "127.0.0.1", "--port", str(port),
           "--num-cpus", "2", "--resources", json.dumps({"pdc_prefill": 1, "pdc_decode": 1}),
           "--include-dashboard=false", "--disable-usage-stats", "--object-store-memory", str(200 << 20),
           "--temp-dir", temp_dir]
    log = open(Path(temp_dir) / "ray-start.log", "w")  # noqa: SIM115 - closed at teardown
    proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    address = f"127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    probe = [sys.executable, "-c", f"import ray; ray.init(address={address!r}, log_to_driver=False); ray.shutdown()"]
    while True:
        if proc.poll() is not None:
            log.close()
            pytest.fail(f"ray start exited {proc.returncode}:\n{(Path(temp_dir) / 'ray-start.log').read_text()[-3000:]}")
        if subprocess.run(probe, env=env, capture_output=True, timeout=60).returncode == 0:
            break
        if time.monotonic() > deadline:
            proc.kill()
            pytest.fail("the local Ray head did not accept a driver within 60 s")
        time.sleep(1.0)
    try:
        yield RayHead(address, {k: env[k] for k in ray_env("")} , proc)
    finally:
        proc.send_signal(signal.SIGTERM)  # --block: ray start stops every process it started
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)
        log.close()
        shutil.rmtree(temp_dir, ignore_errors=True)


# ---------------------------------------------------------------- `pdc up`, as people run it


class PdcUp:
    """``pdc up --model MODEL`` on 127.0.0.1 in its own process (its workers and scheduler are its
    children), ready once it prints how to switch the policy; ``stop`` sends SIGTERM and waits."""

    READY_MARKER = "pdc policy --url"

    def __init__(self, model: Path, *extra: str, ready_s: float = 180.0) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.lines: list[str] = []
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "cluster.cli", "up", "--model", str(model), "--port", str(self.port),
             "--host", "127.0.0.1", *extra],
            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, text=True,
            env={**os.environ, "PYTHONUNBUFFERED": "1"}, start_new_session=True)
        ready = threading.Event()
        threading.Thread(target=self._read, args=(ready,), daemon=True).start()
        if not ready.wait(ready_s):
            self.stop()
            pytest.fail(f"pdc up was not ready in {ready_s} s:\n{''.join(self.lines[-60:])}")

    def _read(self, ready: threading.Event) -> None:
        for line in self.proc.stdout:  # a thread: a buffered pipe's lines are not visible to select
            self.lines.append(line)
            if self.READY_MARKER in line:
                ready.set()

    def stop(self) -> int:
        """SIGTERM (pdc up stops its children); SIGKILL to the group if it hangs. Its exit code."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(90)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            return self.proc.wait(10)
