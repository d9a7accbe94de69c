"""Serving figures in one run: batching gain, multi-turn TTFT, prefix-hit TTFT, ITL under a long prefill.

Starts every cluster it needs as real processes on 127.0.0.1 (a fresh cluster
key each, wired with --peers, no mDNS), drives the load with ``pdc bench
serve``'s functions (workers/tools/serve_bench.py), stops each cluster, and
prints four ratios measured in this run:

1. batching    `pdc up`'s topology (a torch prefill worker, a decode worker):
               output tokens/s of N streams at once / one stream alone,
               same prompt and fixed output length (ignore_eos);
2. multiturn   one conversation of K turns whose history grows to ~4k
               tokens: TTFT per turn, turn K / turn 1, with the prefix cache
               on, then again on a cluster whose workers run --prefix-cache-gb 0;
3. prefix      two requests sharing a ~4k-token system prompt with different
               short user messages: TTFT of the second (hit) / the first (cold);
4. interleave  one `--role both` worker: running streams' inter-token latency
               while a ~4k-token prompt prefills, with chunked interleaving
               (default) and with --no-interleave-prefill: max and p99, and
               their ratio (not interleaved / interleaved).

    .venv/bin/python examples/bench_serving.py                     # all four, ~4 min on 2 cores
    .venv/bin/python examples/bench_serving.py --figures batching --decode-engine mlx --batch-output-len 32
    .venv/bin/python examples/bench_serving.py --json              # the last line is one JSON object

Every worker runs with OMP_NUM_THREADS=1 (--worker-threads): torch's default
of one OpenMP thread per core slows 7-13x as soon as another busy process
shares the cores, as `pdc up`'s two workers do on one machine (see
docs/performance.md, "Serving: batching, prefix reuse, interleaved prefill").
"""
from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import json
import os
import secrets
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, replace
from typing import Any, Self

import numpy as np

from cluster.launcher import LOOPBACK, LocalCluster, UpConfig
from workers.tools.builtin import DEFAULT_MODEL, resolve_model
from workers.tools.serve_bench import (
    PromptMaker,
    RequestRecord,
    ServeBenchConfig,
    resolve,
    run_load,
    run_serve_bench,
    send_chat,
)

FIGURES = ("batching", "multiturn", "prefix", "interleave")
TEMPLATE_TOKENS = 40  # room for the chat template's tokens when checking the context length
STARTED = time.monotonic()


@dataclass(frozen=True)
class BenchServingConfig:
    """The whole run: which figures, on which model, at which sizes."""

    model: str = DEFAULT_MODEL
    prefill_engine: str = "torch"
    decode_engine: str = "torch"
    figures: tuple[str, ...] = FIGURES
    streams: int = 16  # batching: concurrent streams against one
    batch_input_len: int = 64
    batch_output_len: int = 128
    turns: int = 6  # multiturn
    first_turn_len: int = 170  # first user message; with the template, ~200 prompt tokens
    turn_len: int = 720  # each later user message; the history reaches ~4k by the last turn
    turn_output_len: int = 32
    system_prompt_len: int = 4000  # prefix
    long_prompt_len: int = 4000  # interleave
    running_streams: int = 4
    running_output_len: int = 128
    long_delay_s: float = 4.0  # interleave: the long prompt arrives this long after the streams
    worker_threads: int = 1  # OMP_NUM_THREADS per worker; 0: unset (torch's default, one per core)
    timeout_s: float = 600.0  # per request
    log_dir: str | None = None

    def __post_init__(self) -> None:
        unknown = set(self.figures) - set(FIGURES)
        if unknown or not self.figures:
            raise ValueError(f"--figures takes a comma-separated subset of {','.join(FIGURES)}, got {self.figures}")
        for name in ("streams", "batch_input_len", "batch_output_len", "turns", "first_turn_len", "turn_len",
                     "turn_output_len", "system_prompt_len", "long_prompt_len", "running_streams",
                     "running_output_len"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be at least 1")
        if self.turns < 2 or self.batch_output_len < 2 or self.running_output_len < 2:
            raise ValueError("--turns, --batch-output-len and --running-output-len must be at least 2")
        if self.worker_threads < 0:
            raise ValueError("--worker-threads must be >= 0 (0: torch's default)")

    @property
    def longest_prompt(self) -> int:
        """Prompt tokens of the longest request, template included (roughly)."""
        history = self.first_turn_len + (self.turns - 1) * (self.turn_len + self.turn_output_len + TEMPLATE_TOKENS)
        return max(history, self.system_prompt_len, self.long_prompt_len) + TEMPLATE_TOKENS


# ---------------------------------------------------------------- clusters

class PeerCluster(LocalCluster):
    """``pdc up``'s processes (scheduler + workers), wired by --peers instead of mDNS.

    ``workers`` are (role, engine, extra ``pdc worker`` flags); stop, logs and
    the die-with-parent guard are ``LocalCluster``'s."""

    def __init__(self, up: UpConfig, workers: list[tuple[str, str, tuple[str, ...]]], threads: int) -> None:
        super().__init__(up)
        self.workers, self.threads = workers, threads

    def start(self) -> None:
        key = ["--cluster-key-file", self.key_file]
        ports = [_free_port() for _ in self.workers]
        peers = ",".join(f"{LOOPBACK}:{port}" for port in ports)
        self._spawn("scheduler", ["serve", "--host", LOOPBACK, "--port", str(self.config.port),
                                  "--policy", self.config.policy, "--no-mdns", "--peers", peers, *key])
        env = {"OMP_NUM_THREADS": str(self.threads)} if self.threads else {}
        suffix = secrets.token_hex(2)
        for (role, engine, extra), port in zip(self.workers, ports, strict=True):
            self._spawn(f"{role}-worker", [
                "worker", "--role", role, "--engine", engine, "--model", self.config.model, "--host", LOOPBACK,
                "--port", str(port), "--no-advertise", "--node-id", f"bench-{role}-{engine}-{suffix}", *key, *extra,
            ], env=env)


@contextlib.contextmanager
def running_cluster(config: BenchServingConfig, name: str, workers: list[tuple[str, str, tuple[str, ...]]]
                    ) -> Iterator[PeerCluster]:
    """One cluster, up and checked (the model's context holds the longest prompt), then stopped;
    its logs are kept when anything failed."""
    threads = config.worker_threads
    log_dir = os.path.join(config.log_dir, name) if config.log_dir else None
    up = UpConfig(model=config.model, port=_free_port(), prefill_engine=config.prefill_engine,
                  decode_engine=config.decode_engine, log_dir=log_dir)
    cluster = PeerCluster(up, workers, threads)
    say(f"starting cluster '{name}': " + ", ".join(f"{r} worker ({e}{' ' + ' '.join(x) if x else ''})"
                                                    for r, e, x in workers)
        + f"; OMP_NUM_THREADS={threads or 'unset'} per worker")
    failed = True
    try:
        cluster.start()
        cluster.wait_ready()
        with urllib.request.urlopen(cluster.url + "/v1/models", timeout=10) as resp:
            context = json.loads(resp.read())["data"][0]["context_length"]
        if context < config.longest_prompt:
            raise SystemExit(f"{config.model}: context {context} tokens < the longest prompt here "
                             f"(~{config.longest_prompt}); pick a model with a longer context or smaller sizes")
        say(f"cluster '{name}' is up at {cluster.url}/v1 (model context {context} tokens)")
        yield cluster
        failed = False
    finally:
        cluster.stop(keep_files=failed)
        if failed:
            say(f"cluster '{name}' failed; its logs are in {cluster.log_dir}")
        else:
            say(f"cluster '{name}' stopped")


# ---------------------------------------------------------------- figures

def measure_batching(url: str, config: BenchServingConfig) -> dict[str, Any]:
    """Output tokens/s of ``streams`` concurrent streams / one stream, same sizes."""
    base = bench_config(url, config, input_len=config.batch_input_len, output_len=config.batch_output_len)
    run_serve_bench(replace(base, num_prompts=2, max_concurrency=2, output_len=4, seed=900))  # warm-up
    result: dict[str, Any] = {}
    for label, num in (("one", 1), ("many", config.streams)):
        say(f"batching: {num} stream(s) x {config.batch_output_len} tokens")
        with CpuWait() as wait:
            run = run_serve_bench(replace(base, num_prompts=num, max_concurrency=num, seed=num))
        summary = check(run, f"batching, {num} stream(s)")
        result[label] = {"streams": num, "output_tok_s": summary["output_throughput"],
                         "steady_decode_tok_s": steady_decode_rate(run.records),
                         "median_tpot_ms": summary["median_tpot_ms"], "median_ttft_ms": summary["median_ttft_ms"],
                         "duration_s": summary["duration"], "cpu_wait": wait.share}
        say(f"  {summary['output_throughput']:.1f} output tok/s, steady decode "
            f"{_fmt(result[label]['steady_decode_tok_s'], '.1f')} tok/s, median TPOT "
            f"{summary['median_tpot_ms']:.0f} ms, {summary['duration']:.1f} s{wait.note}")
    result["ratio"] = result["many"]["output_tok_s"] / result["one"]["output_tok_s"]
    one, many = result["one"]["steady_decode_tok_s"], result["many"]["steady_decode_tok_s"]
    result["steady_ratio"] = many / one if one and many else None
    return result


def measure_multiturn(url: str, config: BenchServingConfig, label: str) -> dict[str, Any]:
    """One conversation of ``turns`` turns, one at a time: every turn's TTFT and where it went."""
    base = bench_config(url, config, input_len=config.first_turn_len, output_len=config.turn_output_len,
                        multi_turn=config.turns, turn_len=config.turn_len)
    run_serve_bench(replace(base, multi_turn=1, output_len=2, seed=901))  # warm-up
    say(f"multiturn ({label}): {config.turns} turns of {config.turn_len} tokens after a {config.first_turn_len}-token "
        "opening")
    with CpuWait() as wait:
        run = run_serve_bench(replace(base, seed=6))
    check(run, f"multiturn ({label})")
    turns = [turn_row(r) for r in run.records]
    for t in turns:
        say(f"  turn {t['turn']}: {t['prompt_tokens']} prompt tokens, {t['cached_prefix_tokens']} cached, "
            f"TTFT {t['ttft_s']:.2f} s (queue {t['queue_s']:.2f} s, prefill {t['prefill_s']:.2f} s)")
    say(f"  cpu wait {wait.share:.0%}" if wait.share is not None else "  cpu wait unknown")
    return {"turns": turns, "ratio_last_first": turns[-1]["ttft_s"] / turns[0]["ttft_s"],
            "ratio_last_second": turns[-1]["ttft_s"] / turns[1]["ttft_s"], "cpu_wait": wait.share}


def measure_prefix(url: str, config: BenchServingConfig) -> dict[str, Any]:
    """Two requests with one ~``system_prompt_len``-token system prompt, different user messages."""
    base = bench_config(url, config, input_len=16, output_len=4)
    run_serve_bench(replace(base, num_prompts=1, output_len=2, seed=902))  # warm-up
    say(f"prefix: cold then hit on a {config.system_prompt_len}-token system prompt")
    with CpuWait() as wait:
        cold, hit = asyncio.run(shared_system_prompt_pair(base, config.system_prompt_len))
    rows = {name: turn_row(record) for name, record in (("cold", cold), ("hit", hit))}
    for name, row in rows.items():
        say(f"  {name}: {row['prompt_tokens']} prompt tokens, {row['cached_prefix_tokens']} cached, "
            f"TTFT {row['ttft_s']:.3f} s (queue {row['queue_s']:.3f} s, prefill {row['prefill_s']:.3f} s){wait.note}")
    return {**rows, "ratio": rows["hit"]["ttft_s"] / rows["cold"]["ttft_s"], "cpu_wait": wait.share}


async def shared_system_prompt_pair(base: ServeBenchConfig, system_len: int) -> tuple[RequestRecord, RequestRecord]:
    """The cold request, then the hit: same system prompt, different short user messages."""
    import aiohttp

    maker = PromptMaker(np.random.default_rng(7), base.tokens_per_word or 1.0)
    system = maker.text(system_len)
    records = []
    async with aiohttp.ClientSession() as session:
        for turn in (1, 2):
            record = RequestRecord(0, turn)
            messages = [{"role": "system", "content": system}, {"role": "user", "content": maker.text(16)}]
            await send_chat(session, base, base.model or "", messages, record)
            if not record.ok:
                raise SystemExit(f"prefix, request {turn}: {record.error}: {record.detail}")
            records.append(record)
    return records[0], records[1]


def measure_interleave(url: str, config: BenchServingConfig, label: str) -> dict[str, Any]:
    """Running streams' ITL while a long prompt prefills on the same (colocated) worker."""
    streams = bench_config(url, config, input_len=config.batch_input_len, output_len=config.running_output_len)
    run_serve_bench(replace(streams, num_prompts=2, max_concurrency=2, output_len=4, seed=903))  # warm-up
    streams = replace(streams, num_prompts=config.running_streams, max_concurrency=config.running_streams, seed=8)
    long = replace(streams, num_prompts=1, max_concurrency=1, input_len=config.long_prompt_len, output_len=2, seed=9)
    say(f"interleave ({label}): {config.running_streams} streams, a {config.long_prompt_len}-token prompt "
        f"{config.long_delay_s:g} s later")
    with CpuWait() as wait:
        stream_run, long_record, t_streams, t_long = asyncio.run(streams_with_long_prompt(streams, long,
                                                                                            config.long_delay_s))
    result = prefill_window_itl(stream_run.records, t_streams, t_long, long_record)
    result["cpu_wait"] = wait.share
    say(f"  long prompt: {long_record.prompt_tokens} tokens, TTFT {long_record.ttft_s:.2f} s; running streams' ITL "
        f"during its prefill: max {result['max_itl_s']:.3f} s, p99 {result['p99_itl_s']:.3f} s, median "
        f"{result['median_itl_s']:.3f} s over {result['num_gaps']} gaps (median before it "
        f"{_fmt(result['median_itl_before_s'], '.3f')} s; max after it, while it joins the batch, "
        f"{_fmt(result['max_itl_after_s'], '.3f')} s){wait.note}")
    if not result["covered"]:
        say("  warning: not every stream ran through the whole prefill; raise --running-output-len")
    return result


async def streams_with_long_prompt(streams: ServeBenchConfig, long: ServeBenchConfig, delay_s: float
                                   ) -> tuple[Any, RequestRecord, float, float]:
    """Start the streams, send the long prompt ``delay_s`` later; their start times on perf_counter."""
    t_streams = time.perf_counter()  # run_load sends within a few ms of this (model and sizing already resolved)
    stream_task = asyncio.create_task(run_load(streams))
    await asyncio.sleep(delay_s)
    t_long = time.perf_counter()
    long_run = await run_load(long)
    stream_run = await stream_task
    for run, what in ((stream_run, "running streams"), (long_run, "long prompt")):
        check(run, f"interleave, {what}")
    return stream_run, long_run.records[0], t_streams, t_long


def prefill_window_itl(records: list[RequestRecord], t_streams: float, t_long: float,
                       long_record: RequestRecord) -> dict[str, Any]:
    """The streams' gaps between content chunks that overlap the long prompt's prefill
    ([sent, its first token]), and those after it, until it left the batch (it joins for one step)."""
    prefill_end, left = t_long + (long_record.ttft_s or 0.0), t_long + long_record.e2el_s
    during, after, before, covered = [], [], [], True
    for record in records:
        times = token_times(record, t_streams)
        covered = covered and bool(times.size and times[0] < t_long and times[-1] > left)
        for previous, now in itertools.pairwise(times):
            if now > t_long and previous < prefill_end:
                during.append(now - previous)
            elif previous >= prefill_end and previous < left:
                after.append(now - previous)
            elif now <= t_long:
                before.append(now - previous)
    gaps = np.asarray(during or [np.nan])
    num_chunks = sum(len(r.itl_s) + 1 for r in records)
    return {"long_prompt_tokens": long_record.prompt_tokens, "long_ttft_s": long_record.ttft_s,
            "long_prefill_s": (long_record.pdcluster or {}).get("prefill_s"),
            "max_itl_s": float(np.max(gaps)), "p99_itl_s": float(np.percentile(gaps, 99)),
            "median_itl_s": float(np.median(gaps)), "num_gaps": len(during),
            "median_itl_before_s": float(np.median(before)) if before else None,
            "max_itl_after_s": max(after) if after else None,
            "tokens_per_chunk": sum(r.output_tokens for r in records) / max(1, num_chunks), "covered": covered}


# ---------------------------------------------------------------- helpers

def bench_config(url: str, config: BenchServingConfig, **sizes: Any) -> ServeBenchConfig:
    """A serve_bench config for ``url`` with its model and prompt sizing resolved (two one-token probes)."""
    return resolve(ServeBenchConfig(url + "/v1", num_prompts=1, max_concurrency=1, ignore_eos=True, progress=False,
                                    timeout_s=config.timeout_s, **sizes))


def check(run: Any, what: str) -> dict[str, Any]:
    """The run's summary; exit naming the failures if any request failed."""
    summary = run.summary()
    if summary["failed"]:
        raise SystemExit(f"{what}: {summary['failed']} request(s) failed: {summary['failed_examples']}")
    return summary


def token_times(record: RequestRecord, t0: float) -> np.ndarray:
    """Each content chunk's arrival, on perf_counter, for a request sent at ``t0``."""
    if record.ttft_s is None:
        return np.zeros(0)
    return t0 + record.ttft_s + np.concatenate([[0.0], np.cumsum(record.itl_s)])


def steady_decode_rate(records: list[RequestRecord]) -> float | None:
    """Tokens per second while every stream decodes: from the last first token to the first last token
    (requests sent together); None when no such window exists."""
    times = [token_times(r, 0.0) for r in records]
    start, end = max(t[0] for t in times), min(t[-1] for t in times)
    if end <= start:
        return None
    return sum(int(np.sum((t > start) & (t <= end))) for t in times) / (end - start)


def turn_row(record: RequestRecord) -> dict[str, Any]:
    """The client's TTFT and the server's account of it (the ``pdcluster`` object; its TTFT counts from arrival)."""
    stats = record.pdcluster or {}
    return {"turn": record.turn, "prompt_tokens": record.prompt_tokens, "ttft_s": record.ttft_s,
            "server_ttft_s": stats.get("ttft_s"),
            **{key: stats.get(key) for key in ("cached_prefix_tokens", "decode_cached_tokens", "queue_s",
                                               "prefill_s", "transfer_s", "exposed_transfer_s", "kv_bytes")}}


class CpuWait:
    """Share of wall time some task waited for a CPU (Linux PSI), over a ``with`` block."""

    PATH = "/proc/pressure/cpu"

    def __enter__(self) -> Self:
        self.start, self.waited, self.share = time.monotonic(), self._total_us(), None
        return self

    def __exit__(self, *exc: object) -> None:
        end = self._total_us()
        if self.waited is not None and end is not None:
            self.share = (end - self.waited) / 1e6 / max(1e-9, time.monotonic() - self.start)

    @property
    def note(self) -> str:
        return "" if self.share is None else f", cpu wait {self.share:.0%}" + (" (!)" if self.share > 0.10 else "")

    def _total_us(self) -> int | None:
        try:
            with open(self.PATH) as f:
                return int(f.readline().split("total=")[1])
        except (OSError, IndexError, ValueError):
            return None


def say(message: str) -> None:
    elapsed = time.monotonic() - STARTED
    print(f"[{int(elapsed) // 60:02d}:{int(elapsed) % 60:02d}] {message}", flush=True)


def _fmt(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind((LOOPBACK, 0))
        return s.getsockname()[1]


# ---------------------------------------------------------------- run

def run_figures(config: BenchServingConfig) -> dict[str, Any]:
    """Every asked figure, each cluster started once and stopped before the next."""
    up = [("prefill", config.prefill_engine, ()), ("decode", config.decode_engine, ())]
    out: dict[str, Any] = {}
    if {"batching", "multiturn", "prefix"} & set(config.figures):
        with running_cluster(config, "up", up) as cluster:
            if "batching" in config.figures:
                out["batching"] = measure_batching(cluster.url, config)
            if "prefix" in config.figures:
                out["prefix"] = measure_prefix(cluster.url, config)
            if "multiturn" in config.figures:
                out["multiturn"] = {"cache_on": measure_multiturn(cluster.url, config, "prefix cache on")}
    if "multiturn" in config.figures:
        no_cache = [(role, engine, ("--prefix-cache-gb", "0")) for role, engine, _ in up]
        with running_cluster(config, "up-no-prefix-cache", no_cache) as cluster:
            out["multiturn"]["cache_off"] = measure_multiturn(cluster.url, config, "prefix cache off")
    if "interleave" in config.figures:
        modes: dict[str, Any] = {}
        for mode, flags in (("interleaved", ()), ("not_interleaved", ("--no-interleave-prefill",))):
            with running_cluster(config, f"both-{mode}", [("both", config.prefill_engine, flags)]) as cluster:
                modes[mode] = measure_interleave(cluster.url, config, mode.replace("_", " "))
        modes["ratio_max"] = modes["not_interleaved"]["max_itl_s"] / modes["interleaved"]["max_itl_s"]
        modes["ratio_p99"] = modes["not_interleaved"]["p99_itl_s"] / modes["interleaved"]["p99_itl_s"]
        out["interleave"] = modes
    return out


def print_summary(out: dict[str, Any]) -> None:
    print("\nfigure                                               measured")
    if b := out.get("batching"):
        print(f"1 batching: {b['many']['streams']} streams / 1, output tok/s    "
              f"{b['many']['output_tok_s']:.1f} / {b['one']['output_tok_s']:.1f} = {b['ratio']:.2f}x "
              f"(steady decode {_fmt(b['steady_ratio'], '.2f')}x)")
    if m := out.get("multiturn"):
        for key, row in m.items():
            ttfts = " ".join(f"{t['ttft_s']:.2f}" for t in row["turns"])
            print(f"2 multi-turn TTFT, cache {key[6:]:<3} (s)             {ttfts}; last / first "
                  f"{row['ratio_last_first']:.2f}, last / second {row['ratio_last_second']:.2f}")
    if p := out.get("prefix"):
        print(f"3 prefix hit / cold TTFT                          {p['hit']['ttft_s']:.3f} / "
              f"{p['cold']['ttft_s']:.3f} s = {p['ratio']:.3f}")
    if i := out.get("interleave"):
        for mode in ("interleaved", "not_interleaved"):
            print(f"4 ITL during a long prefill, {mode:<16}     max {i[mode]['max_itl_s']:.3f} s, "
                  f"p99 {i[mode]['p99_itl_s']:.3f} s (long TTFT {i[mode]['long_ttft_s']:.2f} s)")
        print(f"4 not interleaved / interleaved                   max {i['ratio_max']:.1f}x, p99 {i['ratio_p99']:.1f}x")


def parse_args() -> tuple[BenchServingConfig, bool]:
    d = BenchServingConfig()
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--figures", default=",".join(FIGURES), help="comma-separated subset (default: all)")
    parser.add_argument("--model", default=d.model, help=f"folder, hub id or `pdc models` name (default: {d.model})")
    parser.add_argument("--prefill-engine", default=d.prefill_engine, help="prefill worker's and --role both "
                        f"worker's engine (default: {d.prefill_engine})")
    parser.add_argument("--decode-engine", default=d.decode_engine, help=f"decode worker's engine (default: "
                        f"{d.decode_engine}; pdc up's default here is the first of mlx, torch that imports)")
    for name in ("streams", "batch_input_len", "batch_output_len", "turns", "first_turn_len", "turn_len",
                 "turn_output_len", "system_prompt_len", "long_prompt_len", "running_streams",
                 "running_output_len"):
        parser.add_argument(f"--{name.replace('_', '-')}", type=int, default=getattr(d, name),
                            help=f"(default: {getattr(d, name)})")
    parser.add_argument("--long-delay-s", type=float, default=d.long_delay_s,
                        help=f"interleave: seconds between the streams and the long prompt (default: {d.long_delay_s})")
    parser.add_argument("--worker-threads", type=int, default=d.worker_threads,
                        help=f"OMP_NUM_THREADS of every worker (default: {d.worker_threads}; 0: leave unset, torch "
                             "then runs one thread per core)")
    parser.add_argument("--timeout-s", type=float, default=d.timeout_s, help="per request (default: 600)")
    parser.add_argument("--log-dir", default=None, help="keep the clusters' logs here (default: temp folders)")
    parser.add_argument("--json", action="store_true", help="end with one JSON line holding every figure")
    args = parser.parse_args()
    sizes = {name: getattr(args, name) for name in BenchServingConfig.__dataclass_fields__
             if name not in ("model", "figures")}
    try:
        config = BenchServingConfig(model=resolve_model(args.model), figures=tuple(args.figures.split(",")), **sizes)
    except ValueError as e:
        parser.error(str(e))
    return config, args.json


def main() -> int:
    config, as_json = parse_args()
    say(f"model {config.model}; figures {', '.join(config.figures)}; {os.cpu_count()} CPUs")
    out = run_figures(config)
    say("done")
    print_summary(out)
    if as_json:
        print(json.dumps({"model": os.path.basename(config.model), "prefill_engine": config.prefill_engine,
                          "decode_engine": config.decode_engine, "cpus": os.cpu_count(), **out}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
