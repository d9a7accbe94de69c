"""Measured prefill -> decode links, probed over the data plane and cached.

Placement needs each link's bandwidth and latency: over 10GbE streaming hides
an 8k prompt's KV behind prefill, over 1GbE it does not. The scheduler cannot
measure a link it is not on, so it asks the *prefill* node to run a short,
authenticated probe against the *decode* node's KV port (``ProbeLink``) and
caches the answer.

NOTE on when probes run. Probes go one at a time (two probes sharing a NIC
would each measure half of it). A pair is probed when first seen, then again
every ``refresh_s``; a re-probe waits while either node has requests in
flight, so a probe neither slows a real transfer nor measures a link a
transfer is already using. A failed probe leaves the link unknown, and the
cost-model policies never send KV over an unknown link, which is the right
answer when, say, a firewall blocks the KV port; it is retried after
``retry_s``.
"""
from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass

from cluster.node import NodeInfo

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class LinkView:
    """A measured (or declared) prefill -> decode link."""

    gbps: float  # payload bandwidth, gigabits per second
    latency_s: float = 0.0


@dataclass(frozen=True)
class LinkRecord:
    """The latest probe of one (prefill, decode) pair."""

    src: str
    dst: str
    gbps: float = 0.0
    latency_s: float = 0.0
    measured_at: float = 0.0  # time.monotonic() of the probe's end
    error: str = ""  # the last probe failed, saying why (the link is then unknown)

    @property
    def ok(self) -> bool:
        return not self.error

    def as_json(self, now: float) -> dict:
        return {"prefill_node": self.src, "decode_node": self.dst, "gbps": round(self.gbps, 3),
                "latency_ms": round(self.latency_s * 1e3, 3), "age_s": round(now - self.measured_at, 1),
                "error": self.error or None}


# probe(prefill node, decode node) -> (gbps, latency_s); raises on failure.
Probe = Callable[[NodeInfo, NodeInfo], Awaitable[tuple[float, float]]]


def link_pairs(nodes: Iterable[NodeInfo]) -> list[tuple[NodeInfo, NodeInfo]]:
    """Every (prefill-capable, decode-capable) pair of distinct nodes, sorted."""
    nodes = sorted(nodes, key=lambda n: n.node_id)
    return [(p, d) for p in nodes if p.can_prefill for d in nodes if d.can_decode and d.node_id != p.node_id]


class LinkTable:
    """Cached link measurements, refreshed by ``refresh`` (called periodically)."""

    def __init__(self, probe: Probe, *, refresh_s: float = 300.0, retry_s: float = 30.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        if refresh_s <= 0 or retry_s <= 0:
            raise ValueError("refresh_s and retry_s must be positive")
        self.probe, self.refresh_s, self.retry_s, self.clock = probe, refresh_s, retry_s, clock
        self.records: dict[tuple[str, str], LinkRecord] = {}
        self._lock = asyncio.Lock()

    def views(self) -> dict[tuple[str, str], LinkView]:
        """The measured links, as policies see them."""
        return {pair: LinkView(r.gbps, r.latency_s) for pair, r in self.records.items() if r.ok}

    def snapshot(self) -> list[dict]:
        now = self.clock()
        return [r.as_json(now) for _, r in sorted(self.records.items())]

    def forget(self, node_id: str) -> None:
        """Drop every link to or from a node that left."""
        for pair in [p for p in self.records if node_id in p]:
            del self.records[pair]

    def due(self, nodes: Iterable[NodeInfo], busy: Callable[[str], bool] = lambda _: False
            ) -> list[tuple[NodeInfo, NodeInfo]]:
        """Pairs to probe now: never probed, failed and due a retry, or stale with both ends idle."""
        now, due = self.clock(), []
        for p, d in link_pairs(nodes):
            record = self.records.get((p.node_id, d.node_id))
            if record is None:
                due.append((p, d))
            elif not record.ok:
                if now - record.measured_at >= self.retry_s:
                    due.append((p, d))
            elif now - record.measured_at >= self.refresh_s and not busy(p.node_id) and not busy(d.node_id):
                due.append((p, d))
        return due

    async def refresh(self, nodes: Iterable[NodeInfo], busy: Callable[[str], bool] = lambda _: False) -> int:
        """Probe every due pair, one at a time; returns how many were probed."""
        async with self._lock:
            pairs = self.due(list(nodes), busy)
            for p, d in pairs:
                await self.measure(p, d)
            return len(pairs)

    async def measure(self, src: NodeInfo, dst: NodeInfo) -> LinkRecord:
        """Probe one pair now and record the result (or the failure)."""
        pair = (src.node_id, dst.node_id)
        try:
            gbps, latency_s = await self.probe(src, dst)
        except Exception as e:
            why = _describe(e)
            record = LinkRecord(*pair, measured_at=self.clock(), error=why)
            previous = self.records.get(pair)
            if previous is None or previous.error != why:  # say it once, not at every retry
                log.warning("link %s -> %s: probe failed (%s); placement will not send KV over it", *pair, why)
        else:
            record = LinkRecord(*pair, gbps=gbps, latency_s=latency_s, measured_at=self.clock())
            previous = self.records.get(pair)
            if previous is None or not previous.ok or abs(previous.gbps - gbps) > 0.2 * previous.gbps:
                log.info("link %s -> %s: %.2f Gbit/s, %.2f ms", *pair, gbps, latency_s * 1e3)
        self.records[pair] = record
        return record


def _describe(error: BaseException) -> str:
    details = getattr(error, "details", None)
    text = details() if callable(details) else str(error)
    return f"{type(error).__name__}: {text}" if text else type(error).__name__
