"""Simulator workloads: when requests arrive and how long they are.

Three sources: one request at time 0, seeded Poisson arrivals, or a trace file
(JSONL or CSV with ``arrival_s, prompt_tokens, output_tokens`` and optional
``cached_prefix_tokens`` and ``session`` columns); ``conversations`` turns
any of them into multi-turn chats.

NOTE on prefix sharing, two ways. ``cached_prefix_tokens`` is a prefix cached
on *every* node before the request arrives (a shared system prompt, or
llama-bench's ``-d``). ``session`` names a conversation: every request of one
session reads the same token stream (``session_token_ids``), each prompt a
prefix of it, so a later turn shares its history with whatever earlier turns
left in some node's prefix cache. The simulator keeps its own ``PrefixIndex``,
fed by its own placements as the live scheduler's is fed by workers (a
decode node holds the conversation once a turn ends, a remote prefill node
the prompt once its prefill ends), and shows each policy the per-node figures.
"""
from __future__ import annotations

import csv
import hashlib
import json
import random
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

TRACE_FIELDS = ("arrival_s", "prompt_tokens", "output_tokens", "cached_prefix_tokens", "session")


class WorkloadError(ValueError):
    """A workload that cannot be simulated; the message names the entry."""


@dataclass(frozen=True)
class WorkItem:
    """One request to simulate: arrival time (s), token counts, and the
    conversation it belongs to ("" for none)."""

    arrival_s: float
    prompt_tokens: int
    output_tokens: int
    cached_prefix_tokens: int = 0  # cached on every node before it arrives
    session: str = ""  # requests of one session share its token stream (module NOTE)

    def __post_init__(self) -> None:
        if self.arrival_s < 0:
            raise WorkloadError(f"arrival_s must be >= 0, got {self.arrival_s}")
        if self.prompt_tokens < 1 or self.output_tokens < 1:
            raise WorkloadError(f"prompt_tokens and output_tokens must be >= 1, got "
                                f"{self.prompt_tokens} and {self.output_tokens}")
        if not 0 <= self.cached_prefix_tokens < self.prompt_tokens:
            raise WorkloadError(f"cached_prefix_tokens must be in [0, prompt_tokens), got "
                                f"{self.cached_prefix_tokens} of {self.prompt_tokens}")


def single(prompt_tokens: int, output_tokens: int, cached_prefix_tokens: int = 0) -> list[WorkItem]:
    """One request arriving at time 0."""
    return [WorkItem(0.0, prompt_tokens, output_tokens, cached_prefix_tokens)]


def poisson(rate: float, num_requests: int, seed: int, prompt_tokens: int, output_tokens: int,
            cached_prefix_tokens: int = 0) -> list[WorkItem]:
    """``num_requests`` arrivals of a Poisson process of ``rate`` per second,
    the first at the first exponential gap; the same seed gives the same times."""
    if rate <= 0 or num_requests < 1:
        raise WorkloadError(f"--rate must be > 0 and --num-requests >= 1, got {rate} and {num_requests}")
    rng = random.Random(seed)
    items, now = [], 0.0
    for _ in range(num_requests):
        now += rng.expovariate(rate)
        items.append(WorkItem(now, prompt_tokens, output_tokens, cached_prefix_tokens))
    return items


def conversations(openers: list[WorkItem], turns: int, turn_tokens: int, think_s: float) -> list[WorkItem]:
    """Each of ``openers`` as the first of ``turns`` turns of its own conversation
    (``session`` "c0", "c1", ...). Turn k + 1 arrives ``think_s`` after turn k
    arrived, and its prompt is turn k's prompt, its answer and ``turn_tokens``
    new tokens: the whole history is a prefix of it. Open loop: a turn that
    arrives before the previous one ended finds only what nodes held then."""
    if turns < 1 or turn_tokens < 1 or think_s <= 0:
        raise WorkloadError(f"--turns and --turn-tokens must be >= 1 and --think-s > 0, got "
                            f"{turns}, {turn_tokens} and {think_s}")
    items = []
    for i, first in enumerate(openers):
        turn = replace(first, session=first.session or f"c{i}")
        for _ in range(turns):
            items.append(turn)
            turn = replace(turn, arrival_s=turn.arrival_s + think_s,
                           prompt_tokens=turn.prompt_tokens + turn.output_tokens + turn_tokens)
    return sorted(items, key=lambda item: item.arrival_s)


def session_token_ids(session: str, num_tokens: int) -> list[int]:
    """The first ``num_tokens`` tokens of ``session``'s stream: its first token
    is drawn from the session's name, so two sessions share no whole block
    (their chained block hashes differ from block 0 on)."""
    first = int.from_bytes(hashlib.blake2b(session.encode(), digest_size=4).digest(), "little")
    return [first, *range(1, num_tokens)][:num_tokens]


def read_trace(path: str | Path) -> list[WorkItem]:
    """A trace file's requests sorted by arrival: JSONL (one object per line)
    or CSV with a header row; ``.csv`` selects CSV, anything else JSONL."""
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as e:
        raise WorkloadError(f"trace {path}: cannot read it ({e.strerror or e})") from None
    rows = _csv_rows(text, path) if path.suffix.lower() == ".csv" else _jsonl_rows(text, path)
    items = [_item(row, where) for where, row in rows]
    if not items:
        raise WorkloadError(f"trace {path}: no requests")
    return sorted(items, key=lambda item: item.arrival_s)


def scaled(items: list[WorkItem], rate_factor: float) -> list[WorkItem]:
    """The same requests arriving ``rate_factor`` times as fast."""
    return [replace(item, arrival_s=item.arrival_s / rate_factor) for item in items]


def mean_rate(items: list[WorkItem]) -> float:
    """Requests per second between the first and last arrival (0 for one request)."""
    span = items[-1].arrival_s - items[0].arrival_s
    return (len(items) - 1) / span if span > 0 else 0.0


def _jsonl_rows(text: str, path: Path) -> list[tuple[str, dict[str, Any]]]:
    rows = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        where = f"trace {path}: line {number}"
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise WorkloadError(f"{where}: not JSON ({e.msg})") from None
        if not isinstance(row, dict):
            raise WorkloadError(f"{where}: expected an object with {', '.join(TRACE_FIELDS[:3])}")
        rows.append((where, row))
    return rows


def _csv_rows(text: str, path: Path) -> list[tuple[str, dict[str, Any]]]:
    reader = csv.DictReader(text.splitlines())
    if not reader.fieldnames or not set(TRACE_FIELDS[:3]) <= {f.strip() for f in reader.fieldnames}:
        raise WorkloadError(f"trace {path}: the CSV header must name {', '.join(TRACE_FIELDS[:3])}")
    return [(f"trace {path}: line {i}", {k.strip(): v for k, v in row.items() if k})
            for i, row in enumerate(reader, start=2)]


def _item(row: dict[str, Any], where: str) -> WorkItem:
    unknown = sorted(set(row) - set(TRACE_FIELDS))
    if unknown:
        raise WorkloadError(f"{where}: unknown field {unknown[0]!r}; fields: {', '.join(TRACE_FIELDS)}")
    try:
        return WorkItem(
            arrival_s=float(_field(row, "arrival_s")),
            prompt_tokens=_whole(_field(row, "prompt_tokens"), "prompt_tokens"),
            output_tokens=_whole(_field(row, "output_tokens"), "output_tokens"),
            cached_prefix_tokens=_whole(row.get("cached_prefix_tokens") or 0, "cached_prefix_tokens"),
            session=str(row.get("session") or ""),
        )
    except (TypeError, ValueError) as e:  # WorkloadError included
        raise WorkloadError(f"{where}: {e}") from None


def _field(row: dict[str, Any], key: str) -> Any:
    if row.get(key) in (None, ""):
        raise WorkloadError(f"missing {key!r}")
    return row[key]


def _whole(value: Any, key: str) -> int:
    number = float(value)
    if number != int(number):
        raise WorkloadError(f"{key} must be a whole number, got {value!r}")
    return int(number)
