"""``pdc bench serve``: a load generator for any OpenAI-compatible server, like ``vllm bench serve``.

It speaks HTTP only and imports no engine, so it measures pdcluster, vLLM or
anything else serving ``/v1/chat/completions`` the same way. The client is
aiohttp: it is already a base dependency (the scheduler serves with it) and
reads a streamed body line by line; httpx is not one of ours.

The pipeline, one function each:

1. ``build_workload``: conversations of synthetic random-word prompts, with
   Poisson arrival times (all at once for ``--request-rate inf``);
2. ``run_load``: stream every turn of every conversation as a chat
   completion, at most ``--max-concurrency`` at a time, into one
   ``RequestRecord`` per request;
3. ``summarize``: vLLM's metrics, under vLLM's JSON keys, in one dict that
   both the table (``print_report``) and ``--json`` read.

Timing is the client's, per request: TTFT is the time to the first chunk
carrying content, ITL the gaps between later content chunks, E2EL the time to
the last content chunk, TPOT = (E2EL - TTFT) / (output tokens - 1), undefined
below two tokens. Token counts are the server's ``usage`` whenever it sends
one. A request that fails (HTTP error, an error event in the stream, a stream
cut short, a timeout) is counted with its reason; none can hang the run.
"""
from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import os
import sys
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    import aiohttp
    from tqdm import tqdm

SLO_METRICS = ("ttft", "tpot", "e2el")  # what --goodput may bound, in ms
LATENCY_METRICS = ("ttft", "tpot", "itl", "e2el")
PERCENTILES = (90, 99)
PROBE_WORDS = 128  # the calibration prompt's extra words
SKIPPED = "skipped: an earlier turn failed"

# Short common English words: about one token each in most BPE vocabularies.
WORDS = tuple("""
time year people way day man thing woman life child world school state family student group country
problem hand part place case week company system program question work number night point home water
room mother area money story fact month lot right study book eye job word business issue side kind head
house service friend father power hour game line end member law car city name team minute idea body back
parent face level office door health person art war history party result change morning reason research
girl moment air teacher force education food music river light tree stone cloud paper road garden
""".split())


@dataclass(frozen=True)
class ServeBenchConfig:
    """One benchmark run against ``base_url`` (e.g. ``http://127.0.0.1:8000/v1``)."""

    base_url: str
    model: str | None = None  # None: the first id from GET /models
    api_key: str | None = field(default=None, repr=False)
    num_prompts: int = 100  # requests, or conversations in multi-turn mode
    request_rate: float = math.inf  # requests (conversations) per second, Poisson; inf: all at once
    max_concurrency: int | None = None  # requests in flight at most; None: no limit
    input_len: int = 256  # tokens of the first user message
    output_len: int = 128  # max_tokens of every request
    multi_turn: int = 1  # turns per conversation
    turn_len: int = 64  # tokens of each later user message
    seed: int = 0
    timeout_s: float = 300.0  # per request, from sending to the end of its stream
    temperature: float = 0.0
    ignore_eos: bool = False  # send "ignore_eos": true (vLLM and pdcluster honour it; OpenAI refuses it)
    extra_body: dict[str, Any] = field(default_factory=dict)  # merged into every request body
    tokenizer: str | None = None  # tokenizer.json (or its folder) to size prompts exactly
    tokens_per_word: float | None = None  # skip the calibration probes with this ratio
    goodput: tuple[tuple[str, float], ...] = ()  # (metric in SLO_METRICS, bound in ms)
    progress: bool = True  # a progress bar on stderr

    def __post_init__(self) -> None:
        if not self.base_url.startswith(("http://", "https://")):
            raise ValueError(f"--base-url must start with http:// or https://, got {self.base_url!r}")
        for name in ("num_prompts", "input_len", "output_len", "multi_turn", "turn_len"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(self, name)}")
        if not self.request_rate > 0:
            raise ValueError(f"--request-rate must be > 0 (inf: all at once), got {self.request_rate}")
        if self.max_concurrency is not None and self.max_concurrency < 1:
            raise ValueError(f"--max-concurrency must be at least 1, got {self.max_concurrency}")
        if not self.timeout_s > 0:
            raise ValueError(f"--timeout-s must be > 0, got {self.timeout_s}")
        for metric, bound in self.goodput:
            if metric not in SLO_METRICS or not bound > 0:
                raise ValueError(f"--goodput takes {'/'.join(SLO_METRICS)}:MS with MS > 0, got {metric}:{bound}")

    @property
    def chat_url(self) -> str:
        return self.base_url.rstrip("/") + "/chat/completions"

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}


@dataclass(frozen=True)
class Conversation:
    """One conversation: its arrival time and the user message of each turn (one turn: one request)."""

    index: int
    arrival_s: float
    user_messages: tuple[str, ...]


@dataclass
class RequestRecord:
    """What the client saw of one request. Times in seconds from sending it."""

    conversation: int
    turn: int  # 1-based
    ok: bool = False
    error: str = ""  # the failure's category (tallied), e.g. "HTTP 429 capacity_exhausted", "timeout"
    detail: str = ""  # the failure in the server's words
    ttft_s: float | None = None  # None: no content arrived
    e2el_s: float = 0.0
    itl_s: list[float] = field(default_factory=list)
    prompt_tokens: int | None = None  # usage.prompt_tokens (None: the server sent no usage)
    output_tokens: int = 0  # usage.completion_tokens, else the content chunks counted
    cached_tokens: int | None = None  # usage.prompt_tokens_details.cached_tokens or the pdcluster object's
    text: str = ""
    pdcluster: dict[str, Any] | None = None  # the last ``pdcluster`` object of the stream

    @property
    def tpot_s(self) -> float | None:
        """Mean seconds per output token after the first; None below two tokens."""
        if not self.ok or self.ttft_s is None or self.output_tokens < 2:
            return None
        return (self.e2el_s - self.ttft_s) / (self.output_tokens - 1)

    def fail(self, error: str, detail: str = "") -> None:
        self.ok, self.error, self.detail = False, error, detail


@dataclass
class BenchRun:
    """A finished run: every request's record and the wall time of the whole load."""

    config: ServeBenchConfig
    records: list[RequestRecord]
    duration_s: float

    def summary(self) -> dict[str, Any]:
        return summarize(self.records, self.duration_s, self.config)


# ---------------------------------------------------------------- workload

def arrival_times(num: int, rate: float, rng: np.random.Generator) -> list[float]:
    """Seconds from the start at which each of ``num`` arrivals happens: a
    Poisson process of ``rate`` per second starting at 0, or all at 0 for inf."""
    if math.isinf(rate):
        return [0.0] * num
    gaps = rng.exponential(1.0 / rate, num - 1)
    return [0.0, *np.cumsum(gaps).tolist()]


class PromptMaker:
    """Random-word text of about ``num_tokens`` tokens: cut exactly with a
    tokenizer when there is one, else sized by a tokens-per-word ratio."""

    def __init__(self, rng: np.random.Generator, tokens_per_word: float = 1.0, tokenizer: Any = None) -> None:
        self.rng, self.tokens_per_word, self.tokenizer = rng, tokens_per_word, tokenizer

    def text(self, num_tokens: int) -> str:
        num_words = max(1, round(num_tokens / self.tokens_per_word))
        if self.tokenizer is not None:
            num_words = num_tokens + 8  # at least one token a word: enough to cut from
        text = " ".join(self.rng.choice(WORDS, num_words).tolist())
        if self.tokenizer is not None:
            text = self.tokenizer.decode(self.tokenizer.encode(text, add_special_tokens=False).ids[:num_tokens])
        return text


def build_workload(config: ServeBenchConfig, tokens_per_word: float = 1.0, tokenizer: Any = None) -> list[Conversation]:
    """``num_prompts`` conversations of ``multi_turn`` user messages, with arrival times; seeded."""
    rng = np.random.default_rng(config.seed)
    maker = PromptMaker(rng, tokens_per_word, tokenizer)
    arrivals = arrival_times(config.num_prompts, config.request_rate, rng)
    return [Conversation(i, arrivals[i], tuple(maker.text(config.input_len if turn == 0 else config.turn_len)
                                               for turn in range(config.multi_turn)))
            for i in range(config.num_prompts)]


def load_tokenizer(path: str) -> Any:
    """A ``tokenizers.Tokenizer`` from ``tokenizer.json`` or the folder holding it."""
    from tokenizers import Tokenizer

    file = os.path.join(path, "tokenizer.json") if os.path.isdir(path) else path
    if not os.path.isfile(file):
        raise ValueError(f"--tokenizer: no tokenizer.json at {path}")
    return Tokenizer.from_file(file)


# ---------------------------------------------------------------- requests

async def first_model(session: aiohttp.ClientSession, config: ServeBenchConfig) -> str:
    """The first model id of ``GET /models``; ValueError naming the URL when there is none."""
    import aiohttp

    url = config.base_url.rstrip("/") + "/models"
    try:
        async with session.get(url, headers=config.headers, timeout=aiohttp.ClientTimeout(total=30)) as resp:
            body = await resp.json(content_type=None)
            if resp.status != 200:
                raise ValueError(f"GET {url}: HTTP {resp.status}: {_error_of(body)[1]}")
    except (aiohttp.ClientError, asyncio.TimeoutError, json.JSONDecodeError) as e:
        raise ValueError(f"cannot list models at {url}: {type(e).__name__}: {e}") from None
    models = body.get("data") if isinstance(body, dict) else None
    if not models:
        raise ValueError(f"GET {url} lists no model; pass --model")
    return str(models[0]["id"])


async def measure_tokens_per_word(session: aiohttp.ClientSession, config: ServeBenchConfig, model: str) -> float:
    """Ask the server: prompt tokens per random word, from the ``usage`` of two
    one-token requests whose prompts differ by ``PROBE_WORDS`` words."""
    rng = np.random.default_rng(config.seed + 1)
    counts = []
    for num_words in (8, 8 + PROBE_WORDS):
        record = RequestRecord(-1, 0)
        messages = [{"role": "user", "content": " ".join(rng.choice(WORDS, num_words).tolist())}]
        await send_chat(session, config, model, messages, record, max_tokens=1)
        if not record.ok or not record.prompt_tokens:
            raise ValueError(f"the calibration request failed ({record.error}: {record.detail})")
        counts.append(record.prompt_tokens)
    return max(0.1, (counts[1] - counts[0]) / PROBE_WORDS)


async def send_chat(session: aiohttp.ClientSession, config: ServeBenchConfig, model: str,
                    messages: list[dict[str, str]], record: RequestRecord, max_tokens: int | None = None) -> None:
    """Stream one chat completion into ``record``; every failure ends up in it, none is raised."""
    import aiohttp

    body = {"model": model, "messages": messages, "max_tokens": max_tokens or config.output_len,
            "temperature": config.temperature, "stream": True, "stream_options": {"include_usage": True},
            **({"ignore_eos": True} if config.ignore_eos else {}), **config.extra_body}
    try:
        await asyncio.wait_for(_stream_into(session, config, body, record), config.timeout_s)
    except asyncio.TimeoutError:
        record.fail("timeout", f"no complete answer within {config.timeout_s:g} s")
    except aiohttp.ClientError as e:  # refused, reset, a chunked body cut short
        record.fail(f"connection: {type(e).__name__}", str(e))
    except ValueError as e:  # a data line that is not JSON, or too long
        record.fail("malformed stream", str(e))


async def _stream_into(session: aiohttp.ClientSession, config: ServeBenchConfig, body: dict[str, Any],
                       record: RequestRecord) -> None:
    start = time.perf_counter()
    async with session.post(config.chat_url, json=body, headers=config.headers) as resp:
        if resp.status != 200:
            code, message = _error_of(await _json_or_text(resp))
            return record.fail(f"HTTP {resp.status}" + (f" {code}" if code else ""), message)
        last, num_chunks, done = start, 0, False
        async for raw in resp.content:
            line = raw.strip()
            if not line.startswith(b"data:"):
                continue  # SSE comments, blank separators
            data = line[len(b"data:"):].strip()
            if data == b"[DONE]":
                done = True
                break
            event = json.loads(data)
            if not isinstance(event, dict):
                raise ValueError(f"a data line that is not a JSON object: {data[:100]!r}")
            if "error" in event:
                code, message = _error_of(event)
                return record.fail(f"stream error: {code or 'unknown'}", message)
            now = time.perf_counter()
            if content := _content(event):
                if record.ttft_s is None:
                    record.ttft_s = now - start
                else:
                    record.itl_s.append(now - last)
                last, num_chunks = now, num_chunks + 1
                record.text += content
            _read_extras(event, record)
    if not done:
        return record.fail("stream ended without [DONE]", f"after {num_chunks} content chunks")
    record.ok, record.e2el_s = True, (last if num_chunks else time.perf_counter()) - start
    if record.output_tokens == 0:  # no usage: one token per content chunk
        record.output_tokens = num_chunks


def _content(event: dict[str, Any]) -> str:
    choices = event.get("choices") or []
    delta = (choices[0].get("delta") or {}) if choices else {}
    return delta.get("content") or ""


def _read_extras(event: dict[str, Any], record: RequestRecord) -> None:
    """Usage and the ``pdcluster`` object, from whichever chunk carries them."""
    if isinstance(usage := event.get("usage"), dict):
        record.prompt_tokens = usage.get("prompt_tokens", record.prompt_tokens)
        record.output_tokens = usage.get("completion_tokens") or record.output_tokens
        details = usage.get("prompt_tokens_details") or {}
        if details.get("cached_tokens") is not None:
            record.cached_tokens = details["cached_tokens"]
    if isinstance(ext := event.get("pdcluster"), dict):
        record.pdcluster = ext
        for key in ("cached_tokens", "cached_prefix_tokens"):
            if record.cached_tokens is None and ext.get(key) is not None:
                record.cached_tokens = ext[key]


async def _json_or_text(resp: aiohttp.ClientResponse) -> Any:
    text = await resp.text(errors="replace")
    try:
        return json.loads(text)
    except ValueError:
        return text


def _error_of(body: Any) -> tuple[str, str]:
    """(code, message) of an OpenAI-shaped error body; ("", the text) for anything else."""
    error = body.get("error") if isinstance(body, dict) else None
    if isinstance(error, dict):
        return str(error.get("code") or error.get("type") or ""), str(error.get("message", ""))
    return "", (str(error) if error else str(body))[:300]


# ---------------------------------------------------------------- load

async def run_load(config: ServeBenchConfig) -> BenchRun:
    """Run the whole benchmark: resolve the model, size the prompts, send every
    conversation at its arrival time; return every request's record."""
    import aiohttp
    from tqdm import tqdm

    connector = aiohttp.TCPConnector(limit=config.max_concurrency or 0)  # the bench, not aiohttp, queues
    async with aiohttp.ClientSession(connector=connector) as session:
        config = await _resolve(session, config)
        model = config.model or ""
        tokenizer = load_tokenizer(config.tokenizer) if config.tokenizer else None
        conversations = build_workload(config, config.tokens_per_word or 1.0, tokenizer)
        slots = asyncio.Semaphore(config.max_concurrency) if config.max_concurrency else contextlib.nullcontext()
        total = config.num_prompts * config.multi_turn
        with tqdm(total=total, desc="requests", unit="req", file=sys.stderr, disable=not config.progress) as bar:
            start = time.perf_counter()
            chats = [_converse(session, config, model, c, slots, bar, start) for c in conversations]
            records = [r for chat in await asyncio.gather(*chats) for r in chat]
            duration = time.perf_counter() - start
    return BenchRun(config, records, duration)


async def _resolve(session: aiohttp.ClientSession, config: ServeBenchConfig) -> ServeBenchConfig:
    """``config`` with ``model`` (GET /models) and, without a tokenizer, ``tokens_per_word`` (asked of the server)."""
    model = config.model or await first_model(session, config)
    ratio = config.tokens_per_word
    if ratio is None and config.tokenizer is None:
        try:
            ratio = await measure_tokens_per_word(session, config, model)
        except ValueError as e:
            print(f"pdc bench serve: prompts sized at one token a word: {e}", file=sys.stderr)
            ratio = 1.0
    return replace(config, model=model, tokens_per_word=ratio)


def resolve(config: ServeBenchConfig) -> ServeBenchConfig:
    """``config`` with its model and prompt sizing settled, once for several runs against one server."""
    import aiohttp

    async def settle() -> ServeBenchConfig:
        async with aiohttp.ClientSession() as session:
            return await _resolve(session, config)

    return asyncio.run(settle())


async def _converse(session: aiohttp.ClientSession, config: ServeBenchConfig, model: str, conversation: Conversation,
                    slots: Any, bar: tqdm, start: float) -> list[RequestRecord]:
    """Send a conversation's turns in order, each with the whole history so far;
    after a failed turn the rest are recorded as skipped."""
    await asyncio.sleep(max(0.0, conversation.arrival_s - (time.perf_counter() - start)))
    messages: list[dict[str, str]] = []
    records: list[RequestRecord] = []
    for turn, user in enumerate(conversation.user_messages, 1):
        record = RequestRecord(conversation.index, turn)
        records.append(record)
        if turn > 1 and not records[-2].ok:
            record.fail(SKIPPED)
        else:
            messages.append({"role": "user", "content": user})
            async with slots:
                await send_chat(session, config, model, messages, record)
            messages.append({"role": "assistant", "content": record.text})
        bar.update(1)
    return records


def run_serve_bench(config: ServeBenchConfig) -> BenchRun:
    """``run_load`` from synchronous code."""
    return asyncio.run(run_load(config))


# ---------------------------------------------------------------- statistics

def latency_stats(name: str, values_s: Sequence[float]) -> dict[str, float | None]:
    """mean_/median_/std_/p90_/p99_ + ``name`` + _ms, as vLLM names them; None without values."""
    ms = np.asarray(values_s, dtype=float) * 1000.0
    stats = {f"mean_{name}_ms": float(ms.mean()) if ms.size else None,
             f"median_{name}_ms": float(np.median(ms)) if ms.size else None,
             f"std_{name}_ms": float(ms.std()) if ms.size else None}
    for p in PERCENTILES:
        stats[f"p{p}_{name}_ms"] = float(np.percentile(ms, p)) if ms.size else None
    return stats


def meets_slos(record: RequestRecord, slos: Sequence[tuple[str, float]]) -> bool:
    """Whether a successful request meets every (metric, ms) bound. As in vLLM,
    a one-token output has no TPOT and meets any TPOT bound."""
    if not record.ok:
        return False
    values = {"ttft": record.ttft_s, "tpot": record.tpot_s or 0.0, "e2el": record.e2el_s}
    return all(values[m] is not None and values[m] * 1000.0 <= bound for m, bound in slos)


def placement_summary(records: Sequence[RequestRecord]) -> dict[str, Any] | None:
    """Shares of colocated / disaggregated requests, per decode node, and the KV
    bytes moved, from the ``pdcluster`` objects; None when no response had one."""
    seen = [r.pdcluster for r in records if r.ok and r.pdcluster is not None]
    if not seen:
        return None
    kinds = Counter("unknown" if not s.get("decode_node") else "colocated" if s.get("colocated") else "disaggregated"
                    for s in seen)
    decode = Counter(s.get("decode_node") or "unknown" for s in seen)
    return {"requests": len(seen),
            "shares": {k: kinds[k] / len(seen) for k in ("colocated", "disaggregated", "unknown") if kinds[k]},
            "decode_node_shares": {n: c / len(seen) for n, c in sorted(decode.items())},
            "total_kv_bytes": sum(int(s.get("kv_bytes") or 0) for s in seen)}


def per_turn(records: Sequence[RequestRecord]) -> list[dict[str, Any]]:
    """Per turn number: successful requests, mean TTFT and mean prompt tokens (the history grows)."""
    rows = []
    for turn in sorted({r.turn for r in records}):
        done = [r for r in records if r.turn == turn and r.ok]
        ttfts = [r.ttft_s * 1000.0 for r in done if r.ttft_s is not None]
        prompts = [r.prompt_tokens for r in done if r.prompt_tokens is not None]
        cached = [r.cached_tokens for r in done if r.cached_tokens is not None]
        rows.append({"turn": turn, "completed": len(done),
                     "mean_ttft_ms": float(np.mean(ttfts)) if ttfts else None,
                     "mean_prompt_tokens": float(np.mean(prompts)) if prompts else None,
                     "mean_cached_tokens": float(np.mean(cached)) if cached else None})
    return rows


def summarize(records: Sequence[RequestRecord], duration_s: float, config: ServeBenchConfig) -> dict[str, Any]:
    """The report, one flat dict under vLLM's keys (plus failure reasons,
    per-turn TTFT in multi-turn mode, placement for pdcluster servers)."""
    done = [r for r in records if r.ok]
    total_in = sum(r.prompt_tokens or 0 for r in done)
    total_out = sum(r.output_tokens for r in done)
    cached = [r.cached_tokens for r in done if r.cached_tokens is not None]
    per_s = 1.0 / duration_s if duration_s > 0 else 0.0
    out: dict[str, Any] = {
        "completed": len(done), "failed": len(records) - len(done),
        "failed_reasons": dict(Counter(r.error for r in records if not r.ok).most_common()),
        "failed_examples": {r.error: r.detail[:300] for r in reversed(records) if not r.ok},
        "model_id": config.model, "duration": duration_s, "max_concurrency": config.max_concurrency,
        "request_rate": "inf" if math.isinf(config.request_rate) else config.request_rate,
        "total_input_tokens": total_in, "total_output_tokens": total_out,
        "total_cached_tokens": sum(cached) if cached else None,
        "request_throughput": len(done) * per_s, "output_throughput": total_out * per_s,
        "total_token_throughput": (total_in + total_out) * per_s,
    }
    if config.goodput:
        out["request_goodput"] = sum(meets_slos(r, config.goodput) for r in done) * per_s
        out["goodput_slos_ms"] = dict(config.goodput)
    values = {"ttft": [r.ttft_s for r in done if r.ttft_s is not None],
              "tpot": [t for r in done if (t := r.tpot_s) is not None],
              "itl": [gap for r in done for gap in r.itl_s], "e2el": [r.e2el_s for r in done]}
    for name in LATENCY_METRICS:
        out.update(latency_stats(name, values[name]))
    if config.multi_turn > 1:
        out["per_turn"] = per_turn(records)
    if (placement := placement_summary(records)) is not None:
        out["pdcluster"] = placement
    return out


# ---------------------------------------------------------------- report

def print_report(summary: dict[str, Any], file: Any = None) -> None:
    """The summary as rich tables (plain text when ``file`` is not a terminal)."""
    from rich.console import Console
    from rich.table import Table

    console = Console(file=file or sys.stdout, width=100 if not (file or sys.stdout).isatty() else None)
    main = Table(title="Serving Benchmark Result", show_header=False, title_justify="left")
    main.add_column("metric")
    main.add_column("value", justify="right")
    for label, key, fmt in _MAIN_ROWS:
        if key in summary:
            main.add_row(label, _fmt(summary[key], fmt))
    console.print(main)
    latency = Table(title="Latency (ms)", title_justify="left")
    latency.add_column("metric")
    for column in ("mean", "median", *(f"p{p}" for p in PERCENTILES)):
        latency.add_column(column, justify="right")
    for name in LATENCY_METRICS:
        latency.add_row(name.upper(), *(_fmt(summary[f"{column}_{name}_ms"], ".2f")
                                        for column in ("mean", "median", *(f"p{p}" for p in PERCENTILES))))
    console.print(latency)
    if summary["failed_reasons"]:
        examples = summary["failed_examples"]
        _print_rows(console, "Failed requests", ("reason", "count", "example"),
                    [(reason, num, examples.get(reason, "")[:80]) for reason, num in summary["failed_reasons"].items()])
    if "per_turn" in summary:
        _print_rows(console, "Per turn", ("turn", "completed", "mean TTFT (ms)", "mean prompt tokens", "mean cached"),
                    [(t["turn"], t["completed"], _fmt(t["mean_ttft_ms"], ".2f"), _fmt(t["mean_prompt_tokens"], ".1f"),
                      _fmt(t["mean_cached_tokens"], ".1f")) for t in summary["per_turn"]])
    if "pdcluster" in summary:
        ext = summary["pdcluster"]
        rows = [(f"placement: {kind}", f"{share:.1%}") for kind, share in ext["shares"].items()]
        rows += [(f"decode node: {node}", f"{share:.1%}") for node, share in ext["decode_node_shares"].items()]
        rows.append(("KV bytes moved", f"{ext['total_kv_bytes']:,}"))
        _print_rows(console, f"pdcluster ({ext['requests']} responses)", ("", "share"), rows)


_MAIN_ROWS = (
    ("Successful requests", "completed", "d"), ("Failed requests", "failed", "d"),
    ("Maximum request concurrency", "max_concurrency", ""), ("Request rate (req/s)", "request_rate", ""),
    ("Benchmark duration (s)", "duration", ".2f"), ("Total input tokens", "total_input_tokens", "d"),
    ("Total generated tokens", "total_output_tokens", "d"), ("Total cached prompt tokens", "total_cached_tokens", "d"),
    ("Request throughput (req/s)", "request_throughput", ".2f"), ("Request goodput (req/s)", "request_goodput", ".2f"),
    ("Output token throughput (tok/s)", "output_throughput", ".2f"),
    ("Total token throughput (tok/s)", "total_token_throughput", ".2f"),
)


def _fmt(value: Any, fmt: str) -> str:
    return "-" if value is None else format(value, fmt) if fmt else str(value)


def _print_rows(console: Any, title: str, header: Sequence[str], rows: Any) -> None:
    from rich.table import Table

    table = Table(title=title, title_justify="left")
    cells = [[str(cell) for cell in row] for row in rows]
    for i, name in enumerate(header):  # numbers to the right
        numeric = i > 0 and all(row[i].replace(",", "").replace(".", "").rstrip("%").isdigit() or row[i] == "-"
                                for row in cells)
        table.add_column(name, justify="right" if numeric else "left")
    for row in cells:
        table.add_row(*row)
    console.print(table)


# ---------------------------------------------------------------- command line

def add_serve_parser(sub: argparse._SubParsersAction) -> None:
    """Register ``serve`` on the ``bench`` subcommands."""
    d = ServeBenchConfig("http://127.0.0.1:8000/v1")
    p = sub.add_parser(
        "serve", help="load any OpenAI-compatible server; report TTFT, TPOT, ITL, E2EL and throughput",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description=(
            "Send streamed chat completions of synthetic random-word prompts to an OpenAI-compatible server\n"
            "(pdcluster or any other) and report, under vLLM's names: successful and failed requests (with\n"
            "reasons), duration, request/output/total token throughput, goodput, and TTFT, TPOT, ITL and\n"
            "E2EL as mean/median/p90/p99 in ms. Token counts are the server's usage. Against pdcluster it\n"
            "also reports placement shares, KV bytes moved and cached prompt tokens.\n\n"
            "  TTFT  request sent -> first content chunk     ITL   gap between content chunks\n"
            "  E2EL  request sent -> last content chunk      TPOT  (E2EL - TTFT) / (output tokens - 1)"
        ),
        epilog="example: pdc bench serve --base-url http://127.0.0.1:8000/v1 --num-prompts 64 --max-concurrency 8",
    )
    p.add_argument("--base-url", default=d.base_url, help=f"the API's base URL, up to /v1 (default: {d.base_url})")
    p.add_argument("--model", default=None, help="model id (default: the first id from GET /models)")
    p.add_argument("--api-key", default=None,
                   help="sent as 'Authorization: Bearer KEY' (default: $OPENAI_API_KEY, else $PDC_API_KEY, else none)")
    p.add_argument("--num-prompts", type=int, default=d.num_prompts,
                   help=f"requests to send; conversations with --multi-turn (default: {d.num_prompts})")
    p.add_argument("--request-rate", type=float, default=d.request_rate,
                   help="requests (conversations) per second, Poisson arrivals; inf sends all at once (default: inf)")
    p.add_argument("--max-concurrency", type=int, default=None,
                   help="requests in flight at most, whatever the rate (default: no limit)")
    p.add_argument("--input-len", type=int, default=d.input_len,
                   help=f"tokens of each prompt (the first user message); the chat template adds a few, and the "
                        f"report counts the server's usage.prompt_tokens (default: {d.input_len})")
    p.add_argument("--output-len", type=int, default=d.output_len,
                   help=f"max_tokens of every request; a request may stop earlier at end of sequence, and the "
                        f"report counts the server's usage.completion_tokens (default: {d.output_len})")
    p.add_argument("--ignore-eos", action="store_true",
                   help="send \"ignore_eos\": true so every answer has --output-len tokens (pdcluster and vLLM "
                        "honour it; OpenAI's API refuses it)")
    p.add_argument("--multi-turn", type=int, default=d.multi_turn, metavar="K",
                   help="turns per conversation: each turn resends the history plus the last answer and a new "
                        "user message; the report shows TTFT per turn (default: 1, single requests)")
    p.add_argument("--turn-len", type=int, default=d.turn_len,
                   help=f"tokens of each later turn's user message (default: {d.turn_len})")
    p.add_argument("--tokenizer", default=None,
                   help="tokenizer.json or its folder, to cut prompts to exact token counts (default: ask the "
                        "server, two one-token requests, how many tokens a random word takes)")
    p.add_argument("--temperature", type=float, default=d.temperature, help="sampling temperature (default: 0)")
    p.add_argument("--extra-body", default=None, metavar="JSON",
                   help="a JSON object merged into every request body, e.g. "
                        "'{\"pdcluster\": {\"placement\": \"colocated\"}}'")
    p.add_argument("--goodput", nargs="+", default=None, metavar="METRIC:MS",
                   help="service-level objectives, e.g. ttft:500 tpot:50 (metrics: ttft, tpot, e2el); goodput is "
                        "the requests per second meeting all of them")
    p.add_argument("--seed", type=int, default=d.seed, help=f"seed of the prompts and arrivals (default: {d.seed})")
    p.add_argument("--timeout-s", type=float, default=d.timeout_s,
                   help=f"per request, from sending to the stream's end; a later end counts as failed "
                        f"(default: {d.timeout_s:g})")
    p.add_argument("--disable-tqdm", action="store_true", help="no progress bar on stderr")
    p.add_argument("--json", action="store_true", help="end with one JSON line holding the summary (vLLM's keys)")
    p.set_defaults(run=run_bench_serve)


def parse_goodput(items: Sequence[str] | None) -> tuple[tuple[str, float], ...]:
    """``["ttft:500", "tpot:50"]`` -> ``(("ttft", 500.0), ("tpot", 50.0))``."""
    slos = []
    for item in items or ():
        metric, _, ms = item.partition(":")
        try:
            slos.append((metric.strip().lower(), float(ms)))
        except ValueError:
            raise ValueError(f"--goodput takes METRIC:MS (e.g. ttft:500), got {item!r}") from None
    return tuple(slos)


def config_from_args(args: argparse.Namespace) -> ServeBenchConfig:
    try:
        extra = json.loads(args.extra_body) if args.extra_body else {}
    except ValueError as e:
        raise ValueError(f"--extra-body is not JSON: {e}") from None
    if not isinstance(extra, dict):
        raise ValueError("--extra-body must be a JSON object")
    return ServeBenchConfig(
        base_url=args.base_url, model=args.model,
        api_key=args.api_key or os.environ.get("OPENAI_API_KEY") or os.environ.get("PDC_API_KEY") or None,
        num_prompts=args.num_prompts, request_rate=args.request_rate, max_concurrency=args.max_concurrency,
        input_len=args.input_len, output_len=args.output_len, multi_turn=args.multi_turn, turn_len=args.turn_len,
        seed=args.seed, timeout_s=args.timeout_s, temperature=args.temperature, ignore_eos=args.ignore_eos,
        extra_body=extra, tokenizer=args.tokenizer, goodput=parse_goodput(args.goodput),
        progress=not args.disable_tqdm,
    )


def run_bench_serve(args: argparse.Namespace) -> int:
    """CLI body of ``pdc bench serve``: 0 whenever the load ran, failed requests included."""
    run = run_serve_bench(config_from_args(args))
    summary = run.summary()
    print_report(summary)
    if args.json:
        print(json.dumps(summary), flush=True)
    return 0


if __name__ == "__main__":
    from workers.tools.bench import bench_main

    sys.exit(bench_main(add_serve_parser))
