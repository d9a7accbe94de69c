"""A node's profile: declared in a file or on the command line, else measured at start-up.

Placement needs rough numbers, not a benchmark suite. Each figure (TFLOPS,
memory bandwidth) comes from the first of these that gives it:

1. the command line (``--tflops``, ``--mem-bw-gbps``);
2. a profile file (``--profile FILE.toml``, see ``load_profile_file``);
3. the catalog entry (``cluster/hardware.py``) of the declared hardware
   (``--hardware`` or the file's ``hardware``): peak dense fp16/bf16 figures,
   which the scheduler's cost model and its calibrated efficiencies expect;
4. a quick measurement, ``Engine.measure_profile(BUDGET_S)``: a dense matmul
   in the engine's compute dtype for TFLOPS, and a large copy for memory
   bandwidth, each within a small time budget. The worker runs it only when
   1-3 leave a figure unknown, on the engine's own thread (MLX streams are
   per thread).

A matmul says little about a small or attention-heavy model's prefill (on a
CPU, a 2048x2048 matmul ran 5-14x faster than such a model's prefill). So
when TFLOPS are measured, not declared, the worker also times a real
prefill of the model it serves (``probe_prefill``: ``PROBE_TOKENS`` prompt
lengths, as many as ``PROBE_BUDGET_S`` allows, the slices dropped) and
reports (tokens, seconds) in ``NodeProfile.prefill_probe``. The scheduler's
cost model turns them into this node's prefill rates with its own FLOP count
(``scheduler/costmodel.py`` ``with_probe``); no FLOP arithmetic lives here.
A declared profile keeps its figures and has no probe.
"""
from __future__ import annotations

import asyncio
import contextlib
import fcntl
import logging
import math
import os
import sys
import time
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from cluster import hardware as catalog
from cluster.hardware import Hardware
from workers.engines.base import Engine, KVSlice

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib

BUDGET_S = 0.3  # per figure measured at start-up (Engine.measure_profile)
PROFILE_KEYS = ("hardware", "tflops", "mem_bw_gbps")  # what a profile file may say
# The served model's prefill, timed at start-up where TFLOPS are measured (probe_prefill):
# prompt lengths tried in order while the budget lasts (the first always runs; two lengths
# separate the linear and the attention term, a third widens the range the fit covers), and
# the whole probe's budget in seconds: a GPU runs all three in well under a second, a CPU
# node of pdc bench link (or one held to a seventh of a core) two or three in 2-10 s.
PROBE_TOKENS = (128, 512, 2048)
PROBE_BUDGET_S = 12.0
PROBE_WARMUP_TOKENS = 16
PROBE_REQUEST_ID = "__pdc_profile_probe__"

log = logging.getLogger(__name__)


STARTUP_LOCK_TIMEOUT_S = 240.0  # the longest a worker waits for another's start-up (then measures anyway)


@contextlib.asynccontextmanager
async def startup_lock(path: str | None, timeout_s: float = STARTUP_LOCK_TIMEOUT_S,
                       poll_s: float = 0.1) -> AsyncIterator[bool]:
    """Hold an exclusive ``flock`` on ``path`` (created if missing) for a worker's start-up:
    loading the model, measuring the machine and timing the probe. Workers on one machine
    given the same path (``pdc up`` passes one) then measure one at a time, never under
    each other's load. Yields whether the lock is held: None as ``path`` holds nothing,
    and past ``timeout_s`` the worker goes on without it (a warning says so): the
    figures are advice, the worker still serves."""
    if path is None:
        yield False
        return
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    except OSError as e:
        log.warning("cannot open the start-up lock %s (%s); measuring this node without it", path, e.strerror or e)
        yield False
        return
    try:
        deadline = time.monotonic() + timeout_s
        held = False
        while not held:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                held = True
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    log.warning("another worker held the start-up lock %s for over %.0f s; measuring this node "
                                "under its load", path, timeout_s)
                    break
                await asyncio.sleep(poll_s)
        yield held
    finally:
        os.close(fd)  # releases the lock


class ProfileError(ValueError):
    """A declared profile that cannot be used; the message names where it came from and the offender."""


@dataclass(frozen=True)
class DeclaredProfile:
    """What a profile file, or the command line over it, declares; None where it is silent."""

    hardware: str | None = None  # a catalog name
    tflops: float | None = None  # > 0
    mem_bw_gbps: float | None = None  # > 0, GB/s


def load_profile_file(path: str | Path) -> DeclaredProfile:
    """Read and validate a profile file (TOML, every key optional)::

        hardware = "dgx-spark"   # a catalog name
        tflops = 125.0           # peak dense fp16/bf16 TFLOPS
        mem_bw_gbps = 273.0      # peak memory bandwidth, GB/s

    Raises ``ProfileError`` naming the file and the offending key or value.
    """
    where = f"profile file {path}"
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as e:
        raise ProfileError(f"{where}: cannot read it ({e.strerror or e})") from None
    except UnicodeDecodeError:
        raise ProfileError(f"{where}: not UTF-8 text") from None
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise ProfileError(f"{where}: not valid TOML: {e}") from None
    return parse_profile(data, where)


def declared_profile(path: str | Path | None, *, hardware: str | None = None, tflops: float | None = None,
                     mem_bw_gbps: float | None = None) -> DeclaredProfile:
    """The command line's declarations (None: not given) over the profile file's at ``path``, key by key."""
    in_file = load_profile_file(path) if path else DeclaredProfile()
    flags = {"hardware": hardware, "tflops": tflops, "mem_bw_gbps": mem_bw_gbps}
    return replace(in_file, **{key: value for key, value in flags.items() if value is not None})


def parse_profile(data: Mapping[str, Any], where: str) -> DeclaredProfile:
    """Validate a profile already read into a dict; ``where`` prefixes errors."""
    unknown = [key for key in data if key not in PROFILE_KEYS]
    if unknown:
        raise ProfileError(f"{where}: unknown key {unknown[0]!r}; known keys: {', '.join(PROFILE_KEYS)}")
    hardware = data.get("hardware")
    if hardware is not None:
        if not isinstance(hardware, str):
            raise ProfileError(f"{where}: hardware must be a string (a catalog name), got {hardware!r}")
        catalog_hardware(hardware, where)
    return DeclaredProfile(hardware, _figure(data, "tflops", where), _figure(data, "mem_bw_gbps", where))


def catalog_hardware(name: str, where: str = "") -> Hardware:
    """The catalog entry for ``name``; ``ProfileError`` listing the known names otherwise."""
    if name not in catalog.HARDWARE:
        prefix = f"{where}: " if where else ""
        raise ProfileError(f"{prefix}unknown hardware {name!r}; known hardware: {', '.join(catalog.HARDWARE)}")
    return catalog.HARDWARE[name]


def declared_figures(hardware: str, tflops: float, mem_bw_gbps: float) -> tuple[float, float]:
    """(TFLOPS, GB/s) known without measuring: the given figures, else the
    catalog's for ``hardware`` (if any); 0 where neither says."""
    if hardware:
        peak = catalog_hardware(hardware)
        return tflops or peak.tflops, mem_bw_gbps or peak.mem_bw_gbps
    return tflops, mem_bw_gbps


def profile_source(tflops_declared: bool, mem_bw_declared: bool) -> str:
    """What ``NodeProfile.profile_source`` says: which figures were declared, which measured."""
    if tflops_declared and mem_bw_declared:
        return "declared"
    return "measured+declared" if tflops_declared or mem_bw_declared else "measured"


def _figure(data: Mapping[str, Any], key: str, where: str) -> float | None:
    value = data.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ProfileError(f"{where}: {key} must be a number, got {value!r}")
    if not math.isfinite(value) or value <= 0:
        raise ProfileError(f"{where}: {key} must be a finite number > 0, got {value!r}")
    return float(value)


def probe_prefill(engine: Engine, vocab_size: int, max_tokens: int, chunk_size: int,
                  budget_s: float = PROBE_BUDGET_S, lengths: tuple[int, ...] = PROBE_TOKENS,
                  clock: Callable[[], float] = time.perf_counter) -> tuple[tuple[int, float], ...]:
    """Time ``engine.prefill`` of the served model: (prompt tokens, seconds) per length.

    Runs on the engine's own thread, before the worker serves. After an untimed
    warm-up of ``PROBE_WARMUP_TOKENS``, each of ``lengths`` (capped at
    ``max_tokens``, the model's context) runs once in ``chunk_size`` chunks
    as a served prefill does, its slices dropped, its cache released. The
    first length always runs; a later one only when its guessed time (the
    previous one's, scaled by twice the length ratio, for the attention
    term's growth) fits what is left of ``budget_s``. Token ids are spread
    over the vocabulary; prefill time does not depend on which they are.
    """
    def drop(_slice: KVSlice) -> None:
        return None

    def timed(num_tokens: int) -> float:
        token_ids = [(7 + 7919 * i) % vocab_size for i in range(num_tokens)]
        started = clock()
        try:
            engine.prefill(PROBE_REQUEST_ID, token_ids, drop, chunk_size)
            return clock() - started
        finally:
            engine.release(PROBE_REQUEST_ID)

    began = clock()
    timed(min(PROBE_WARMUP_TOKENS, max_tokens))
    points: list[tuple[int, float]] = []
    for n in sorted({min(n, max_tokens) for n in lengths}):
        if points:
            guess = points[-1][1] * 2 * n / points[-1][0]
            if clock() - began + guess > budget_s:
                break
        points.append((n, timed(n)))
    return tuple(points)
