"""Logs: the line format of every ``pdc`` process (``--log-format``), and ``pdc logs``.

``--log-format text`` (the default) writes ``TIME LEVEL LOGGER: MESSAGE``;
``--log-format json`` writes one JSON object per line, for log shippers::

    {"ts": "2026-01-02T03:04:05.678Z", "level": "INFO", "logger": "scheduler.api", "message": "request ...",
     "request": {"request_id": ..., "outcome": ..., "status": ..., "ttft_s": ..., ...}}

``request`` is there on the scheduler's request lines only: the fields of
``RequestRecord.to_json`` (scheduler/request_log.py), so nothing has to parse
the message. A traceback goes in ``exc_info``. (A worker's ready line, which
tools wait for on its stdout, stays plain text.)

``pdc logs`` prints a running scheduler's last requests, read from its keyed
``GET /admin/requests`` (signed with the cluster key, as ``pdc policy``);
``--follow`` keeps polling for new ones until Ctrl-C or until the scheduler
stops answering.
"""
from __future__ import annotations

import argparse
import json
import logging
import time
from collections.abc import Callable
from datetime import datetime, timezone

LOG_FORMATS = ("text", "json")
TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
FOLLOW_MISSES = 3  # --follow ends after this many failed polls in a row
POLL_TIMEOUT_S = 10.0

AdminCall = Callable[..., dict]  # cluster/cli.py's admin_call


class JsonFormatter(logging.Formatter):
    """One JSON object per record: ts (UTC, ISO 8601), level, logger, message; ``request``
    when the record carries one (``extra={"request": {...}}``), ``exc_info`` for a traceback."""

    def format(self, record: logging.LogRecord) -> str:
        ts = datetime.fromtimestamp(record.created, timezone.utc)
        out = {"ts": ts.strftime("%Y-%m-%dT%H:%M:%S.") + f"{ts.microsecond // 1000:03d}Z",
               "level": record.levelname, "logger": record.name, "message": record.getMessage()}
        fields = getattr(record, "request", None)
        if isinstance(fields, dict):
            out["request"] = fields
        if record.exc_info:
            out["exc_info"] = self.formatException(record.exc_info)
        if record.stack_info:
            out["stack_info"] = self.formatStack(record.stack_info)
        return json.dumps(out, default=str)


def add_log_format_arg(p: argparse.ArgumentParser) -> None:
    """``--log-format text|json`` on a command that runs a service."""
    p.add_argument("--log-format", choices=LOG_FORMATS, default="text",
                   help="text (default) or json: one JSON object per line (ts, level, logger, message, and the "
                        "request's fields on the scheduler's request lines), for log shippers")


def use_log_format(name: str) -> None:
    """Give every handler of the root logger the ``name`` format (``logging.basicConfig`` ran)."""
    if name not in LOG_FORMATS:
        raise ValueError(f"log format must be one of {', '.join(LOG_FORMATS)}, got {name!r}")
    formatter = JsonFormatter() if name == "json" else logging.Formatter(TEXT_FORMAT)
    for handler in logging.getLogger().handlers:
        handler.setFormatter(formatter)
    logging.captureWarnings(name == "json")  # a Python warning becomes a JSON line too, not raw text


# ---------------------------------------------------------------- pdc logs


def add_logs_parser(sub: argparse._SubParsersAction, admin_call: AdminCall) -> None:
    p = sub.add_parser(
        "logs",
        help="show a running scheduler's last requests",
        description=(
            "Print the last requests of a running `pdc serve` (id, route, status, outcome, placement, "
            "timings, tokens, error), read from its keyed /admin/requests endpoint; calls are signed with "
            "the cluster key. The scheduler keeps the last --request-log-size requests (default 1000)."
        ),
    )
    p.add_argument("--url", default="http://127.0.0.1:8000", help="scheduler URL (default: http://127.0.0.1:8000)")
    p.add_argument("-n", "--num", type=int, default=20, metavar="N", help="how many requests (default: 20)")
    p.add_argument("--json", action="store_true", help="print each request as one JSON object per line")
    p.add_argument("--follow", "-f", action="store_true",
                   help="then keep printing new requests as they end, until Ctrl-C or until the scheduler "
                        f"stops answering ({FOLLOW_MISSES} failed polls in a row)")
    p.add_argument("--interval", type=float, default=None, metavar="S",
                   help="seconds between polls with --follow (default: 1)")
    p.add_argument("--cluster-key-file", default=None,
                   help="cluster key (default: $PDC_CLUSTER_KEY, then `pdc init`'s file)")
    p.set_defaults(run=lambda args: run_logs(args, admin_call))


def run_logs(args: argparse.Namespace, admin_call: AdminCall) -> int:
    """``pdc logs``: the last ``-n`` requests, then with ``--follow`` every newer one."""
    if args.num < 1:
        raise ValueError(f"-n must be >= 1, got {args.num}")
    if args.interval is not None and not args.follow:
        raise ValueError("--interval sets how often --follow polls: give --follow too")
    args.interval = 1.0 if args.interval is None else args.interval
    if not 0.1 <= args.interval <= 3600:
        raise ValueError(f"--interval must be in [0.1, 3600] seconds, got {args.interval}")

    def fetch(query: dict[str, int]) -> dict:
        return admin_call(args.url, args.cluster_key_file, "GET", "/admin/requests", None, expect="requests",
                          query=query, timeout_s=POLL_TIMEOUT_S)

    reply = fetch({"limit": args.num})
    records = reply["requests"]
    if not args.json:
        print(header())
        if not records:
            print(f"(no requests yet; {reply.get('in_flight', 0)} in flight)")
    show(records, args.json)
    if not args.follow:
        return 0
    last = records[-1]["seq"] if records else reply.get("recorded", 0)
    return follow(fetch, last, reply.get("size", 1000), args)


def follow(fetch: Callable[[dict[str, int]], dict], last: int, size: int, args: argparse.Namespace) -> int:
    """Poll for records after ``last`` every ``args.interval`` until Ctrl-C (0) or the scheduler
    stops answering (1)."""
    misses = 0
    try:
        while True:
            time.sleep(args.interval)
            try:
                reply = fetch({"limit": size, "after": last})
            except ValueError as e:
                misses += 1
                if misses >= FOLLOW_MISSES:
                    print(f"pdc logs: stopped following: {e}")
                    return 1
                continue
            misses = 0
            if reply.get("recorded", last) < last:  # its counter went back: a new scheduler process
                print(f"... the scheduler restarted (its log counts {reply['recorded']} requests, we had seen "
                      f"{last}); following from its start")
                last = 0
                continue
            records = reply["requests"]
            if records and records[0]["seq"] > last + 1:
                print(f"... {records[0]['seq'] - last - 1} requests ended between polls and were not kept")
            show(records, args.json)
            if records:
                last = records[-1]["seq"]
    except KeyboardInterrupt:
        return 0


COLUMNS = (("TIME", 8), ("REQUEST", 34), ("ROUTE", 20), ("STATUS", 6), ("OUTCOME", 18), ("PLACEMENT", 34),
           ("QUEUE", 7), ("TTFT", 7), ("TPOT", 7), ("E2E", 7), ("TOKENS", 9), ("ERROR", 0))


def header() -> str:
    return _row([name for name, _ in COLUMNS])


def show(records: list[dict], as_json: bool) -> None:
    for record in records:
        print(json.dumps(record) if as_json else row(record), flush=True)


def row(r: dict) -> str:
    """One request as a table row (times in seconds)."""
    def secs(value: float | None, digits: int = 3) -> str:
        return "-" if value is None else f"{value:.{digits}f}"

    if r.get("placement") == "colocated":
        where = f"{r['decode_node']} (colocated)"
    elif r.get("placement") == "disaggregated":
        where = f"{r['prefill_node']} -> {r['decode_node']} {r.get('kv_codec') or ''}".rstrip()
    else:
        where = "-"
    placed = bool(r.get("placement"))
    error = r.get("error") or ""
    return _row([
        time.strftime("%H:%M:%S", time.localtime(r["ts"])), r.get("request_id") or "-", r.get("route", ""),
        str(r.get("status", "")), r.get("outcome", ""), where, secs(r.get("queue_s")) if placed else "-",
        secs(r.get("ttft_s")) if r.get("completion_tokens") else "-", secs(r.get("tpot_s"), 4),
        secs(r.get("e2e_s")) if r.get("completion_tokens") else "-",
        f"{r.get('prompt_tokens', 0)}+{r.get('completion_tokens', 0)}",
        error if len(error) <= 80 else error[:77] + "...",
    ])


def _row(cells: list[str]) -> str:
    return "  ".join(cell.ljust(width) for cell, (_, width) in zip(cells, COLUMNS)).rstrip()
