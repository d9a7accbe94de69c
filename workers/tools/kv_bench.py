"""``pdc bench kv``: KV data-plane throughput against a plain socket, on loopback.

A sender process holds a synthetic KV cache shaped like a real model's (by
default an 8B Llama: 32 layers x 8 kv heads x 128 head_dim, fp16) and, each
round, streams all of it to this process over a fresh TCP connection to
127.0.0.1, one of two ways:

* ``kv``: the real data plane. ``KVSender`` sends begin, one kv frame per
  (chunk, layer) in prefill order, and end; ``KVReceiver`` validates every
  frame and checksum and receives into a pre-reserved, pre-faulted ``KVArena``,
  as the decode node does.
* ``raw``: a plain socket. The same slices go out with one ``sendmsg`` each and
  are ``recv_into`` the same arena memory, with no header, no checksum and no
  validation: the ceiling the data plane is measured against.

Rounds alternate kv, raw, kv, raw, ... after one untimed warm-up of each, and
the report gives medians. A round's time runs on the receiver from accepting
the connection to holding every byte (kv: validated, end frame read). After
each round, outside the timed part, the arena is compared with the sender's
source by xxh3 digest, then zeroed, so every round proves it delivered every
byte. Sender and receiver are separate processes, as on two nodes, so they do
not share a GIL, and on Linux each is pinned to a CPU of its own.

Each round also records each side's CPU time per GB (with a core per side,
the busier side's figure sets the pace) and, from Linux PSI, how long tasks
waited for a CPU: a round that shared the machine with other work is flagged.
docs/performance.md has the figures and where the time goes.

Where the sender's checksum is taken (``--digest-at``). On a prefill node a
raw slice's xxh3 is taken on the engine thread the moment the engine produced
it (``KVPusher.send_slice``), while its bytes are in the CPU's cache; that is
engine-side work, not data-plane work. ``engine`` (the default) reproduces
it: each slice is digested as the sender process builds the cache, before
any round, and the digest travels in the frame; the cost of a hot digest is
measured separately (copy the slice into a scratch buffer as a producer
would, then time only the hash) and reported as ``engine_digest_ms_per_gb``
beside the cold figure. ``sender`` hashes in ``KVSender`` during the round,
over the cold source, as before.

``--codec int8|fp8``: the kv path encodes every slice (in the sender, during
the round) and the receiver decodes it into the arena. The source is then
N(0, 1) KV rather than random bits (the codecs refuse NaN and inf), the arena
is checked against the codec's own decode of the source, and the report adds
the bytes on the wire and encode/decode ms per GB, timed in the sender process
before the rounds.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import math
import multiprocessing as mp
import os
import socket
import statistics
import sys
import time
import traceback
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field, replace
from multiprocessing.connection import Connection
from typing import Any

import numpy as np
import xxhash

from workers.engines.base import KVLayout, KVSlice, numpy_dtype
from workers.kv import kvcodecs
from workers.kv.net import connect, send_buffers, serve_once
from workers.kv.transport import KVArena, KVReceiver, KVSender
from workers.tools.bench import (
    CONTENDED_CPU_WAIT,
    bench_main,
    contention_warning,
    cpu_wait_us,
)

HOST = "127.0.0.1"
CODECS = ("raw", "int8", "fp8")
DIGEST_AT = ("engine", "sender")
PATHS = ("kv", "raw")
DTYPE_ALIASES = {"fp16": "float16", "bf16": "bfloat16", "fp32": "float32"}
SENDER_READY_TIMEOUT_S = 300.0  # spawn, imports, and filling the source with random bytes
STOP_TIMEOUT_S = 10.0
# The raw path's recv size: the fastest of a 16 KiB..whole-transfer sweep on
# loopback (docs/performance.md); with larger recvs both sides sit idle more.
RAW_RECV_BYTES = 64 << 10


@dataclass(frozen=True)
class BenchConfig:
    """One ``pdc bench kv`` run. ``num_tokens=None`` picks the fewest tokens
    whose KV is at least ``gb`` GB (10^9 bytes)."""

    num_layers: int = 32
    kv_heads: int = 8
    head_dim: int = 128
    dtype: str = "float16"
    num_tokens: int | None = None
    gb: float = 1.0
    chunk: int = 256
    rounds: int = 5
    warmup: int = 1
    timeout_s: float = 120.0  # bounds every wait of one round
    seed: int = 0
    pin: bool = True  # sender and receiver on different CPUs, when there are two
    codec: str = "raw"  # the kv path's codec
    digest_at: str = "engine"  # where a raw slice's checksum is taken (module docstring)

    def __post_init__(self) -> None:
        numpy_dtype(self.dtype)
        if self.codec not in CODECS:
            raise ValueError(f"bench kv: codec must be one of {', '.join(CODECS)}, got {self.codec!r}")
        if self.digest_at not in DIGEST_AT:
            raise ValueError(f"bench kv: digest-at must be one of {', '.join(DIGEST_AT)}, got {self.digest_at!r}")
        for name in ("num_layers", "kv_heads", "head_dim", "chunk", "rounds"):
            if getattr(self, name) < 1:
                raise ValueError(f"bench kv: {name} must be >= 1, got {getattr(self, name)}")
        if self.warmup < 0:
            raise ValueError(f"bench kv: warmup must be >= 0, got {self.warmup}")
        if self.num_tokens is None and not self.gb > 0:
            raise ValueError(f"bench kv: --gb must be > 0, got {self.gb}")
        if self.num_tokens is not None and self.num_tokens < 1:
            raise ValueError(f"bench kv: tokens must be >= 1, got {self.num_tokens}")
        if not self.timeout_s > 0:
            raise ValueError(f"bench kv: timeout must be > 0, got {self.timeout_s}")

    @property
    def layout(self) -> KVLayout:
        per_token = KVLayout(self.num_layers, self.kv_heads, self.head_dim, self.dtype, 1).total_bytes
        tokens = self.num_tokens or math.ceil(self.gb * 1e9 / per_token)
        return KVLayout(self.num_layers, self.kv_heads, self.head_dim, self.dtype, tokens)

    @property
    def num_frames(self) -> int:
        return self.num_layers * math.ceil(self.layout.num_tokens / self.chunk)


@dataclass(frozen=True)
class RoundResult:
    """One timed transfer. Bytes are counted by each side independently;
    CPU is the thread's user+system time over the same span."""

    path: str  # "kv" or "raw"
    seconds: float
    payload_bytes: int  # K/V bytes that landed in the arena
    bytes_sent: int  # on the wire, counted by the sender (kv: with frame headers)
    bytes_received: int  # on the wire, counted by the receiver
    recv_cpu_s: float
    send_cpu_s: float
    send_s: float  # sender: connect to last byte handed to the kernel
    cpu_wait: float | None = None  # share of the round some task waited for a CPU (Linux PSI)

    @property
    def contended(self) -> bool:
        """Whether other work competed for the CPUs enough to distort this round."""
        return self.cpu_wait is not None and self.cpu_wait > CONTENDED_CPU_WAIT

    @property
    def gbps(self) -> float:
        return self.payload_bytes / self.seconds / 1e9

    def details(self) -> dict[str, Any]:
        """This round for the ``--json`` line."""
        return {
            "path": self.path, "gbps": round(self.gbps, 4),
            "send_cpu_ms_per_gb": round(self.cpu_ms_per_gb("send"), 1),
            "recv_cpu_ms_per_gb": round(self.cpu_ms_per_gb("recv"), 1),
            "cpu_wait": None if self.cpu_wait is None else round(self.cpu_wait, 3),
        }

    def cpu_ms_per_gb(self, side: str) -> float:
        """CPU milliseconds ``side`` ("send" or "recv") spent per GB moved; the
        busier side's figure bounds GB/s when each side has its own core."""
        return getattr(self, f"{side}_cpu_s") / (self.payload_bytes / 1e9) * 1e3


@dataclass(frozen=True)
class Preparation:
    """What the sender process measured while building the cache, before any
    round: milliseconds per GB of raw KV (10^9 bytes)."""

    expected_digest: int  # of the arena after a complete kv round
    source_digest: int  # of the arena after a complete raw round
    engine_digest_ms_per_gb: float  # xxh3 over each slice just written (hot), as KVPusher does
    cold_digest_ms_per_gb: float  # xxh3 over the slices where they lie in the source (cold)
    encode_ms_per_gb: float = 0.0  # --codec: encoding every slice
    decode_ms_per_gb: float = 0.0  # --codec: decoding every slice
    encoded_payload_bytes: int = 0  # --codec: codes + scales of every slice


@dataclass(frozen=True)
class BenchResult:
    """All timed rounds of a run; ``ratio`` is median kv over median raw GB/s."""

    config: BenchConfig
    layout: KVLayout
    num_frames: int
    cpus: tuple[int, int] | None  # (sender, receiver) CPUs when pinned
    preparation: Preparation | None = None
    rounds: list[RoundResult] = field(default_factory=list)

    def gbps(self, path: str) -> list[float]:
        return [r.gbps for r in self.rounds if r.path == path]

    def median_gbps(self, path: str) -> float:
        return statistics.median(self.gbps(path))

    def median_cpu_ms_per_gb(self, path: str, side: str) -> float:
        return statistics.median(r.cpu_ms_per_gb(side) for r in self.rounds if r.path == path)

    @property
    def ratio(self) -> float:
        return self.median_gbps("kv") / self.median_gbps("raw")

    def summary(self) -> dict[str, Any]:
        """The ``--json`` line: the three headline figures first."""
        first = {p: next(r for r in self.rounds if r.path == p) for p in PATHS}
        return {
            "kv_gbps": round(self.median_gbps("kv"), 4),
            "raw_gbps": round(self.median_gbps("raw"), 4),
            "ratio": round(self.ratio, 4),
            "kv_rounds_gbps": [round(g, 4) for g in self.gbps("kv")],
            "raw_rounds_gbps": [round(g, 4) for g in self.gbps("raw")],
            **{f"{p}_{side}_cpu_ms_per_gb": round(self.median_cpu_ms_per_gb(p, side), 1)
               for p in PATHS for side in ("send", "recv")},
            "contended_rounds": sum(r.contended for r in self.rounds),
            "round_details": [r.details() for r in self.rounds],
            "payload_bytes": self.layout.total_bytes,
            "num_frames": self.num_frames,
            **{f"{p}_{k}": getattr(first[p], k) for p in PATHS
               for k in ("payload_bytes", "bytes_sent", "bytes_received")},
            "layout": asdict(self.layout),
            "chunk": self.config.chunk,
            "rounds": self.config.rounds,
            "cpus": os.cpu_count(),
            "pinned_cpus": list(self.cpus) if self.cpus else None,
            "codec": self.config.codec,
            "digest_at": self.config.digest_at,
            **({k: round(v, 1) if isinstance(v, float) else v for k, v in asdict(self.preparation).items()
                if not k.endswith("digest")} if self.preparation else {}),
        }


# ---------------------------------------------------------------- sender process


def build_slices(layout: KVLayout, chunk: int, seed: int, finite: bool = False
                 ) -> tuple[np.ndarray, list[KVSlice]]:
    """Random bytes for the whole cache (``finite``: N(0, 1) values in the
    layout's dtype, which a lossy codec can encode) and the slices a chunked
    prefill emits over them (chunk by chunk, every layer of a chunk in turn).
    Each slice's keys then values lie contiguously in ``source``, in that
    order, so a complete raw transfer into a ``KVArena`` reproduces ``source``."""
    dtype = numpy_dtype(layout.dtype)
    rng = np.random.default_rng(seed)
    if finite:
        count = layout.total_bytes // dtype.itemsize
        values = np.empty(count, dtype)
        step = 1 << 24
        for i in range(0, count, step):  # bounded float32 scratch
            part = rng.standard_normal(min(step, count - i), np.float32)
            values[i : i + len(part)] = kvcodecs.from_float32(part, layout.dtype)
        source = values.view(np.uint8)
    else:
        words = rng.integers(0, 2**63, math.ceil(layout.total_bytes / 8), np.uint64)
        source = words.view(np.uint8)[: layout.total_bytes]
    slices, offset = [], 0
    for start in range(0, layout.num_tokens, chunk):
        ntok = min(chunk, layout.num_tokens - start)
        shape = (2, layout.kv_heads, ntok, layout.head_dim)  # [keys/values, kv_heads, ntok, head_dim]
        nbytes = math.prod(shape) * dtype.itemsize
        for layer in range(layout.num_layers):
            kv = source[offset : offset + nbytes].view(dtype).reshape(shape)
            slices.append(KVSlice(layer, start, kv[0], kv[1], layout.dtype))
            offset += nbytes
    return source, slices


def prepare(config: BenchConfig, source: np.ndarray, slices: list[KVSlice]
            ) -> tuple[Preparation, list[KVSlice]]:
    """Measure digests (hot and cold) and, with a codec, encode and decode
    costs; return them with the slices the kv path sends (``--digest-at
    engine``: carrying their checksums)."""
    gb = config.layout.total_bytes / 1e9
    scratch = np.empty(max(s.nbytes for s in slices), np.uint8)
    hot = 0.0
    digested = []
    for s in slices:
        produced = scratch[: s.nbytes]
        np.copyto(produced[: s.keys.nbytes], s.keys.reshape(-1).view(np.uint8))  # as an engine writes a layer
        np.copyto(produced[s.keys.nbytes :], s.values.reshape(-1).view(np.uint8))
        t0 = time.perf_counter()
        checksum = xxhash.xxh3_64_intdigest(produced)
        hot += time.perf_counter() - t0
        digested.append(replace(s, checksum=checksum))
    t0 = time.perf_counter()
    for s in slices:  # one cold pass over the whole source, as the sender's own hashing does
        xxhash.xxh3_64_intdigest(memoryview(s.keys).cast("B"))
        xxhash.xxh3_64_intdigest(memoryview(s.values).cast("B"))
    cold = time.perf_counter() - t0
    source_digest = xxhash.xxh3_64_intdigest(source)
    encode_s = decode_s = 0.0
    encoded_bytes = 0
    expected = source_digest
    if config.codec != "raw":
        hasher = xxhash.xxh3_64()
        for s in slices:
            t0 = time.perf_counter()
            encoded = kvcodecs.encode_slice(config.codec, s)
            t1 = time.perf_counter()
            keys, values = kvcodecs.decode(encoded)
            t2 = time.perf_counter()
            encode_s, decode_s = encode_s + t1 - t0, decode_s + t2 - t1
            encoded_bytes += encoded.nbytes
            hasher.update(keys)
            hasher.update(values)
        expected = hasher.intdigest()
    sent = digested if config.digest_at == "engine" and config.codec == "raw" else slices
    return Preparation(expected, source_digest, hot / gb * 1e3, cold / gb * 1e3,
                       encode_s / gb * 1e3, decode_s / gb * 1e3, encoded_bytes), sent


def send_kv(port: int, rid: str, layout: KVLayout, slices: list[KVSlice], timeout: float,
            codec: str = "raw") -> int:
    """One transfer through the real ``KVSender``; returns wire bytes sent."""
    with connect(HOST, port, timeout=timeout) as sock:
        sender = KVSender(sock, timeout=timeout)
        sender.begin(rid, layout, codec=codec)
        for kv_slice in slices:
            sender.send_slice(kv_slice)
        sender.end(first_token=0)
        return sender.bytes_sent


def send_raw(port: int, slices: list[KVSlice], timeout: float) -> int:
    """The same bytes over a plain socket: one ``sendmsg`` per slice, no framing."""
    with connect(HOST, port, timeout=timeout) as sock:
        return sum(send_buffers(sock, [s.keys, s.values]) for s in slices)


def _sender_main(conn: Connection, config: BenchConfig, cpu: int | None) -> None:
    """Sender process: build the cache, report its digest, then serve round
    commands ``(path, port, rid)`` until ``None`` or the parent goes away."""
    try:
        if cpu is not None:
            os.sched_setaffinity(0, {cpu})
        source, slices = build_slices(config.layout, config.chunk, config.seed, finite=config.codec != "raw")
        preparation, kv_slices = prepare(config, source, slices)
        conn.send(("ready", preparation))
        while conn.poll(config.timeout_s * 10):
            command = conn.recv()
            if command is None:
                return
            path, port, rid = command
            t0, cpu0 = time.monotonic(), time.thread_time()
            if path == "kv":
                sent = send_kv(port, rid, config.layout, kv_slices, config.timeout_s, config.codec)
            else:
                sent = send_raw(port, slices, config.timeout_s)
            conn.send(("sent", sent, time.monotonic() - t0, time.thread_time() - cpu0))
    except BaseException:  # handed to the parent, which raises it
        with contextlib.suppress(OSError):  # the parent may be gone
            conn.send(("error", traceback.format_exc()))


class SenderProcess:
    """The spawned sender and the pipe that commands it; every wait is bounded."""

    def __init__(self, config: BenchConfig, cpu: int | None) -> None:
        self.config = config
        context = mp.get_context("spawn")
        self.conn, child_conn = context.Pipe()
        self.process = context.Process(target=_sender_main, args=(child_conn, config, cpu), daemon=True)
        self.process.start()
        child_conn.close()
        self.preparation: Preparation = self.reply("ready", SENDER_READY_TIMEOUT_S)[0]

    def reply(self, expected: str, timeout: float) -> tuple[Any, ...]:
        """The sender's next message, which must be ``expected``."""
        if not self.conn.poll(timeout):
            raise TimeoutError(f"bench kv: no {expected!r} from the sender process within {timeout}s")
        kind, *rest = self.conn.recv()
        if kind == "error":
            raise RuntimeError(f"bench kv: the sender process failed:\n{rest[0]}")
        return tuple(rest)

    def start_round(self, path: str, port: int, rid: str) -> None:
        self.conn.send((path, port, rid))

    def close(self) -> None:
        """Ask the sender to stop; terminate it if it does not."""
        try:
            self.conn.send(None)
        except OSError:
            pass
        self.process.join(STOP_TIMEOUT_S)
        if self.process.is_alive():
            self.process.terminate()
            self.process.join(STOP_TIMEOUT_S)
        self.conn.close()


# ---------------------------------------------------------------- receiver (this process)


def receive_kv(sock: socket.socket, arena: KVArena, rid: str, timeout: float) -> tuple[float, int, int, float]:
    """The decode node's path: ``KVReceiver`` into ``arena``. Returns seconds,
    payload bytes, wire bytes and receiver CPU seconds."""
    t0, cpu0 = time.monotonic(), time.thread_time()
    received = KVReceiver().receive(sock, expect_rid=rid, timeout=timeout, arena=arena)
    seconds, cpu = time.monotonic() - t0, time.thread_time() - cpu0
    payload = sum(s.nbytes for s in received.slices)
    return seconds, payload, received.bytes_received, cpu


def receive_raw(sock: socket.socket, arena: KVArena, timeout: float) -> tuple[float, int, int, float]:
    """A plain socket at its best on loopback: ``recv_into`` ``arena.memory`` in
    ``RAW_RECV_BYTES`` pieces, one socket timeout for the whole transfer (so
    no per-call ``settimeout``). Same return as ``receive_kv``."""
    t0, cpu0 = time.monotonic(), time.thread_time()
    sock.settimeout(timeout)
    view = memoryview(arena.memory)
    got = 0
    while got < len(view):
        n = sock.recv_into(view[got : got + RAW_RECV_BYTES])
        if n == 0:
            raise ConnectionError(f"bench kv: raw sender closed after {got} of {len(view)} bytes")
        got += n
    return time.monotonic() - t0, got, got, time.thread_time() - cpu0


def run_round(sender: SenderProcess, arena: KVArena, path: str, rid: str) -> RoundResult:
    """One transfer of ``path`` into ``arena``, checked against the sender's source."""
    timeout = sender.config.timeout_s
    arena.memory.fill(0)  # so the digest check below proves this round wrote every byte
    if path == "kv":
        server = serve_once(lambda sock: receive_kv(sock, arena, rid, timeout), HOST, accept_timeout=timeout)
    else:
        server = serve_once(lambda sock: receive_raw(sock, arena, timeout), HOST, accept_timeout=timeout)
    wait0, t0 = cpu_wait_us(), time.monotonic()
    sender.start_round(path, server.port, rid)
    seconds, payload, received, recv_cpu = server.result(timeout + 5)
    wait1, t1 = cpu_wait_us(), time.monotonic()
    sent, send_s, send_cpu = sender.reply("sent", timeout)
    prep = sender.preparation
    expected = prep.expected_digest if path == "kv" else prep.source_digest
    if xxhash.xxh3_64_intdigest(arena.memory) != expected:
        what = "the sender's bytes" if expected == prep.source_digest else f"the {sender.config.codec} decode of them"
        raise RuntimeError(f"bench kv: {path} round {rid}: the arena does not match {what}")
    cpu_wait = None if wait0 is None or wait1 is None else (wait1 - wait0) / 1e6 / (t1 - t0)
    return RoundResult(path, seconds, payload, sent, received, recv_cpu, send_cpu, send_s, cpu_wait)


def pick_cpus(pin: bool) -> tuple[int, int] | None:
    """(sender CPU, receiver CPU) when pinning is asked for and possible, else None."""
    if not pin or not hasattr(os, "sched_setaffinity"):  # Linux only
        return None
    cpus = sorted(os.sched_getaffinity(0))
    return (cpus[0], cpus[1]) if len(cpus) >= 2 else None


@contextlib.contextmanager
def pinned_to(cpu: int | None) -> Iterator[None]:
    """Run the calling thread (and the threads it starts) on ``cpu``; restore after."""
    if cpu is None:
        yield
        return
    before = os.sched_getaffinity(0)
    os.sched_setaffinity(0, {cpu})
    try:
        yield
    finally:
        os.sched_setaffinity(0, before)


def run_kv_bench(config: BenchConfig, report: Callable[[str], None] = print) -> BenchResult:
    """Run warm-up and timed rounds (kv and raw alternating); ``report`` gets
    a progress line before each phase and a table row after each timed round."""
    layout = config.layout
    cpus = pick_cpus(config.pin)
    report(f"  preparing: reserving the arena, spawning the sender, filling {layout.total_bytes / 1e9:.2f} GB ...")
    arena = KVArena(layout, prefault=True)
    sender = SenderProcess(config, cpus[0] if cpus else None)
    result = BenchResult(config, layout, config.num_frames, cpus, sender.preparation)
    try:
        with pinned_to(cpus[1] if cpus else None):
            _run_rounds(config, sender, arena, result, report)
    finally:
        sender.close()
    return result


def _run_rounds(
    config: BenchConfig, sender: SenderProcess, arena: KVArena, result: BenchResult,
    report: Callable[[str], None],
) -> None:
    if config.warmup:
        report(f"  warming up: {config.warmup} untimed round(s) per path ...")
    for i in range(config.warmup):
        for path in PATHS:
            run_round(sender, arena, path, f"warmup-{path}-{i}")
    report(ROW.format("round", "path", "seconds", "GB/s", "recv cpu", "send cpu", "cpu wait"))
    for i in range(config.rounds):
        for path in PATHS:
            r = run_round(sender, arena, path, f"bench-{path}-{i}")
            result.rounds.append(r)
            report(format_round(i + 1, config.rounds, r))


# ---------------------------------------------------------------- report and CLI

ROW = "{:>7} {:>5} {:>8} {:>7} {:>9} {:>9} {:>9}"


def format_round(i: int, n: int, r: RoundResult) -> str:
    return ROW.format(f"{i}/{n}", r.path, f"{r.seconds:.3f}", f"{r.gbps:.2f}",
                      f"{r.recv_cpu_s / r.seconds:.0%}", f"{r.send_cpu_s / r.send_s:.0%}",
                      "n/a" if r.cpu_wait is None else f"{r.cpu_wait:.0%}{' !' if r.contended else ''}")


def format_header(config: BenchConfig) -> str:
    layout = config.layout
    cpus = pick_cpus(config.pin)
    placement = f"sender on CPU {cpus[0]}, receiver on CPU {cpus[1]}" if cpus else "not pinned"
    return (
        f"bench kv: {layout.num_layers} layers x {layout.kv_heads} kv heads x {layout.head_dim} head_dim "
        f"{layout.dtype}, {layout.num_tokens} tokens in {config.chunk}-token chunks\n"
        f"  {layout.total_bytes / 1e9:.3f} GB per transfer in {config.num_frames} frames, "
        f"{config.rounds} timed rounds per path after {config.warmup} warm-up, {HOST}, "
        f"{os.cpu_count()} CPUs, {placement}\n"
        f"  kv = KVSender -> KVReceiver into a KVArena ({config.codec}"
        f"{', checksums taken as slices are produced' if config.digest_at == 'engine' and config.codec == 'raw' else ''}"
        f"); raw = plain socket into the same memory"
    )


def format_summary(result: BenchResult) -> str:
    kv, raw = result.median_gbps("kv"), result.median_gbps("raw")
    verdict = "meets" if result.ratio >= 0.8 else "below"
    cpu = {p: {side: result.median_cpu_ms_per_gb(p, side) for side in ("send", "recv")} for p in PATHS}
    lines = [
        f"  median kv   {kv:.2f} GB/s   CPU per GB: send {cpu['kv']['send']:.0f} ms, recv {cpu['kv']['recv']:.0f} ms",
        f"  median raw  {raw:.2f} GB/s   CPU per GB: send {cpu['raw']['send']:.0f} ms, recv {cpu['raw']['recv']:.0f} ms",
        f"  ratio       {result.ratio:.3f} kv/raw ({verdict} the 0.80 target)",
    ]
    prep = result.preparation
    if prep is not None:
        lines.append(f"  digest      xxh3 per GB: {prep.engine_digest_ms_per_gb:.0f} ms over slices just written "
                     f"(engine side), {prep.cold_digest_ms_per_gb:.0f} ms over the cold source")
        if result.config.codec != "raw":
            first_kv = next(r for r in result.rounds if r.path == "kv")
            lines.append(
                f"  codec       {result.config.codec}: {prep.encoded_payload_bytes / result.layout.total_bytes:.3f} "
                f"of raw payload ({first_kv.bytes_sent / 1e9:.3f} GB on the wire with framing), encode "
                f"{prep.encode_ms_per_gb:.0f} ms/GB, decode {prep.decode_ms_per_gb:.0f} ms/GB (one thread)")
    warning = contention_warning([r.contended for r in result.rounds], "; rerun when it is idle")
    if warning:
        lines.append(f"  warning     {warning}")
    return "\n".join(lines)


def add_kv_parser(sub: argparse._SubParsersAction) -> None:
    """Register ``kv`` on the ``bench`` subcommands."""
    d = BenchConfig()
    p = sub.add_parser(
        "kv", help="KV data-plane throughput vs a plain socket on loopback",
        description=(
            "Stream a synthetic KV cache (default: an 8B Llama's, >= 1 GB) from a sender process "
            "to this one over 127.0.0.1 through the real KVSender/KVReceiver into a pre-reserved "
            "KVArena, alternating with a plain socket moving the same bytes into the same memory. "
            "Reports per-round and median GB/s and their ratio."
        ),
    )
    p.add_argument("--gb", type=float, default=d.gb, help=f"KV size in GB when --tokens is not given (default: {d.gb})")
    p.add_argument("--layers", type=int, default=d.num_layers, help=f"layers (default: {d.num_layers})")
    p.add_argument("--kv-heads", type=int, default=d.kv_heads, help=f"kv heads (default: {d.kv_heads})")
    p.add_argument("--head-dim", type=int, default=d.head_dim, help=f"head dim (default: {d.head_dim})")
    p.add_argument("--tokens", type=int, default=None, help="tokens (default: enough for --gb)")
    p.add_argument("--chunk", type=int, default=d.chunk, help=f"prefill chunk in tokens (default: {d.chunk})")
    p.add_argument("--dtype", choices=(*DTYPE_ALIASES, *DTYPE_ALIASES.values()), default="fp16",
                   help="KV dtype (default: fp16)")
    p.add_argument("--rounds", type=int, default=d.rounds, help=f"timed rounds per path (default: {d.rounds})")
    p.add_argument("--warmup", type=int, default=d.warmup, help=f"untimed rounds per path first (default: {d.warmup})")
    p.add_argument("--timeout", type=float, default=d.timeout_s, help=f"seconds allowed per round (default: {d.timeout_s:g})")
    p.add_argument("--no-pin", action="store_true",
                   help="let the OS place sender and receiver (default: pin them to two different CPUs)")
    p.add_argument("--codec", choices=CODECS, default=d.codec,
                   help="KV codec of the kv path; int8/fp8 send finite N(0,1) KV and report bytes on the wire "
                        "and encode/decode ms per GB (default: raw)")
    p.add_argument("--digest-at", choices=DIGEST_AT, default=d.digest_at,
                   help="where a raw slice's checksum is taken: 'engine' as the slice is produced (what a "
                        "prefill node does; its cost is reported beside the rounds) or 'sender' in KVSender "
                        "during the round, over the cold source (default: engine)")
    p.add_argument("--json", action="store_true", help="end with one JSON line holding the result")
    p.set_defaults(run=run_bench_kv)


def run_bench_kv(args: argparse.Namespace) -> int:
    """CLI body of ``pdc bench kv``."""
    config = BenchConfig(
        num_layers=args.layers, kv_heads=args.kv_heads, head_dim=args.head_dim,
        dtype=DTYPE_ALIASES.get(args.dtype, args.dtype),
        num_tokens=args.tokens, gb=args.gb, chunk=args.chunk, rounds=args.rounds,
        warmup=args.warmup, timeout_s=args.timeout, pin=not args.no_pin,
        codec=args.codec, digest_at=args.digest_at,
    )
    print(format_header(config), flush=True)
    result = run_kv_bench(config, report=lambda line: print(line, flush=True))
    print(format_summary(result))
    if args.json:
        print(json.dumps(result.summary()))
    return 0


def main(argv: list[str] | None = None) -> int:
    """``python -m workers.tools.kv_bench kv ...``: the same as ``pdc bench kv ...``."""
    return bench_main(add_kv_parser, argv)


if __name__ == "__main__":
    sys.exit(main())
