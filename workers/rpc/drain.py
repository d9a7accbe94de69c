"""A worker's drain: take no new request, let the ones in flight finish, fail the stragglers over.

Draining sets ``WorkerState.draining``: ``WorkerState.open`` refuses every new
Prefill and Decode with UNAVAILABLE, and Health reports ``draining`` so the
scheduler places nothing new here. Requests in flight run on; those still
running ``timeout_s`` later are cancelled with UNAVAILABLE, which the scheduler
treats as a node failure: a stream that had sent tokens moves to another node
(a continuation), one that had not is placed again. ``pdc worker`` drains on its
first SIGTERM or SIGINT, then exits; the Drain RPC (``pdc drain NODE``) drains
without exiting, and undrains.
"""
from __future__ import annotations

import asyncio
import contextlib
import logging
import time

import grpc

from workers.rpc.state import RPCFailure, WorkerState

log = logging.getLogger(__name__)

POLL_S = 0.05


class Drain:
    """One worker's drain state; ``start`` and ``stop`` run on the event loop."""

    def __init__(self, state: WorkerState, node_id: str, default_timeout_s: float) -> None:
        self.state, self.node_id, self.default_timeout_s = state, node_id, default_timeout_s
        self._expiry: asyncio.Task[None] | None = None
        self.shutting_down = False  # a signal's drain: the process exits after it, so no undrain


    @property
    def draining(self) -> bool:
        return bool(self.state.draining)

    def start(self, reason: str, timeout_s: float = 0.0) -> None:
        """Drain (again: the newest timeout counts from now)."""
        timeout_s = timeout_s or self.default_timeout_s
        self.state.draining = reason
        self._cancel_expiry()
        self._expiry = asyncio.get_running_loop().create_task(self._expire(timeout_s))
        log.warning("worker %s: draining (%s): %d requests in flight get %g s to finish", self.node_id, reason,
                    len(self.state.active), timeout_s)

    def stop(self) -> None:
        """Take new requests again."""
        if self.draining:
            log.warning("worker %s: undrained, taking requests again", self.node_id)
        self.state.draining = ""
        self._cancel_expiry()

    async def wait_idle(self, timeout_s: float) -> bool:
        """Whether every request in flight has finished within ``timeout_s``."""
        deadline = time.monotonic() + timeout_s
        while self.state.active:
            if time.monotonic() >= deadline:
                return False
            await asyncio.sleep(POLL_S)
        return True

    async def _expire(self, timeout_s: float) -> None:
        if await self.wait_idle(timeout_s):
            log.warning("worker %s: drained: nothing in flight", self.node_id)
            return
        left = list(self.state.active.values())
        log.warning("worker %s: drain timeout (%g s) passed with %d requests in flight: failing them over",
                    self.node_id, timeout_s, len(left))
        failure = RPCFailure(grpc.StatusCode.UNAVAILABLE,
                             f"worker {self.node_id} is draining and its {timeout_s:g} s drain timeout passed: "
                             "the request moves to another node")
        for active in left:
            active.cancel(failure)

    def _cancel_expiry(self) -> None:
        task, self._expiry = self._expiry, None
        if task is not None and not task.done():
            task.cancel()
            with contextlib.suppress(RuntimeError):
                task.add_done_callback(lambda t: t.cancelled() or t.exception())
