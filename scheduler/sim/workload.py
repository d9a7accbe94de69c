"""Simulator workloads: when requests arrive and how long they are.

Three sources: one request at time 0, seeded Poisson arrivals, or a trace file
(JSONL or CSV with ``arrival_s, prompt_tokens, output_tokens`` and an optional
``cached_prefix_tokens`` column).
"""
from __future__ import annotations

import csv
import json
import random
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

TRACE_FIELDS = ("arrival_s", "prompt_tokens", "output_tokens", "cached_prefix_tokens")


class WorkloadError(ValueError):
    """A workload that cannot be simulated; the message names the entry."""


@dataclass(frozen=True)
class WorkItem:
    """One request to simulate: arrival time (s) and token counts."""

    arrival_s: float
    prompt_tokens: int
    output_tokens: int
    cached_prefix_tokens: int = 0

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
