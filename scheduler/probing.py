"""Keeps every prefill -> decode link measured, in the background.

The measurements and the rules for when a pair is (re-)probed live in
``cluster/links.py``'s ``LinkTable``; this object runs its refresh in a loop
and does each probe through the prefill node's gRPC client (``ProbeLink``).
"""
from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable

from cluster.links import LinkTable, LinkView
from cluster.node import NodeInfo
from scheduler.clients import ClientPool

log = logging.getLogger(__name__)


class LinkProber:
    """The link table plus the loop that refreshes it every ``interval_s``."""

    def __init__(self, clients: ClientPool, *, refresh_s: float = 300.0, interval_s: float = 1.0,
                 probe_bytes: int = 0, probe_timeout_s: float = 10.0) -> None:
        self.clients = clients
        self.interval_s, self.probe_bytes, self.probe_timeout_s = interval_s, probe_bytes, probe_timeout_s
        self.table = LinkTable(self.probe, refresh_s=refresh_s)
        self._task: asyncio.Task | None = None

    def start(self, nodes: Callable[[], list[NodeInfo]], busy: Callable[[str], bool]) -> None:
        """Refresh the links among ``nodes()`` until ``stop``; a busy node's links wait (needs a running loop)."""
        self._task = asyncio.get_running_loop().create_task(self._run(nodes, busy))

    async def stop(self) -> None:
        """End the loop (a probe in flight is cancelled)."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    async def probe(self, src: NodeInfo, dst: NodeInfo) -> tuple[float, float]:
        """Have ``src`` measure its data-plane link to ``dst``'s KV port: (Gbit/s, latency s)."""
        reply = await self.clients.of(src).probe_link(
            dst.host, dst.kv_port, payload_bytes=self.probe_bytes, timeout=self.probe_timeout_s)
        return reply.gbps, reply.latency_s

    def views(self) -> dict[tuple[str, str], LinkView]:
        """The measured links, as policies see them."""
        return self.table.views()

    def snapshot(self) -> list[dict]:
        """Every probed pair for ``/health``: rate, latency, age, or why its probe failed."""
        return self.table.snapshot()

    def forget(self, node_id: str) -> None:
        """Drop every link to or from a node that left."""
        self.table.forget(node_id)

    async def _run(self, nodes: Callable[[], list[NodeInfo]], busy: Callable[[str], bool]) -> None:
        while True:
            try:
                await self.table.refresh(nodes(), busy=busy)
            except Exception:  # never let the prober die: placement would go stale silently
                log.exception("link probing failed")
            await asyncio.sleep(self.interval_s)
