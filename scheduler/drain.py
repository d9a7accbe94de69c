"""The scheduler's drain: how ``pdc serve`` stops on SIGTERM or SIGINT without cutting answers.

The first signal starts the drain. Every new request on an API route (``/v1/``
and ``/api/``, every dialect) gets 503 ``draining`` with ``Retry-After`` in its
dialect's error shape, ``/health`` says ``"draining"`` (503), and the requests
in flight (the request log's open traces: arrived and not yet answered to their
last byte, queued ones included) run to their end. The drain ends when none is
left ("drained"), when ``timeout_s`` (``pdc serve --drain-timeout``) has passed,
or at a second signal; in the last two cases every request still in flight is
cut: it ends with a 503 ``draining`` (an error event in its dialect once its
stream has started) and its generation is cancelled on the workers. Then the
process exits 0.

``Retry-After`` is the time left before the drain ends at the latest (when a
restarted scheduler can be listening), in whole seconds, from 1 to 60.
"""
from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import Callable

from scheduler.request import NoCapacityError
from scheduler.request_log import RequestLog

log = logging.getLogger(__name__)

CUT_GRACE_S = 2.0  # how long cut requests get to write their error event and cancel on the workers
MAX_RETRY_AFTER_S = 60


class DrainingError(NoCapacityError):
    """The scheduler is stopping: HTTP 503 ``draining`` with ``Retry-After``."""

    code = "draining"


class Drain:
    """Whether the scheduler drains, and the drain itself (``run``)."""

    def __init__(self, requests: RequestLog, timeout_s: float, clock: Callable[[], float] = time.monotonic) -> None:
        if not math.isfinite(timeout_s) or timeout_s < 0:
            raise ValueError(f"the drain timeout must be a finite number of seconds >= 0, got {timeout_s}")
        self.requests, self.timeout_s, self.clock = requests, timeout_s, clock
        self.deadline: float | None = None  # on ``clock``, once draining

    @property
    def draining(self) -> bool:
        return self.deadline is not None

    def begin(self) -> None:
        """Refuse new requests from now on."""
        if self.deadline is None:
            self.deadline = self.clock() + self.timeout_s

    def refusal(self) -> DrainingError:
        """The 503 for a request that arrives while draining."""
        error = DrainingError("the scheduler is shutting down and takes no new requests; retry after Retry-After "
                              "seconds (or on another scheduler)")
        error.retry_after_s = self.retry_after_s()
        return error

    def retry_after_s(self) -> float:
        """Whole seconds until the drain ends at the latest, in [1, 60]."""
        left = (self.deadline - self.clock()) if self.deadline is not None else self.timeout_s
        return float(min(MAX_RETRY_AFTER_S, max(1, math.ceil(left))))

    async def run(self, stop_now: asyncio.Event) -> str:
        """Drain: "drained" when no request is left, "timed_out" at the timeout, "stopped" when
        ``stop_now`` is set (a second signal); in the last two cases the requests left are cut."""
        self.begin()
        log.warning("draining: %d requests in flight; new requests get 503 (up to %g s: pdc serve --drain-timeout)",
                    self.requests.num_open, self.timeout_s)
        ending = await self._wait(stop_now)
        if ending == "drained":
            log.warning("drained")
            return ending
        if ending == "timed_out":
            log.warning("drain timed out with %d requests in flight; cancelling them", self.requests.num_open)
        else:
            log.warning("second signal: stopping now; cancelling %d requests in flight", self.requests.num_open)
        self.requests.cut_open(DrainingError("the scheduler shut down before this request ended "
                                             f"({'its drain timed out' if ending == 'timed_out' else 'stopped at once'})"))
        try:
            await asyncio.wait_for(self.requests.wait_idle(), CUT_GRACE_S)
        except asyncio.TimeoutError:
            log.warning("%d requests did not end within %g s of being cancelled", self.requests.num_open, CUT_GRACE_S)
        return ending

    async def _wait(self, stop_now: asyncio.Event) -> str:
        if not self.requests.num_open:
            return "drained"
        idle = asyncio.ensure_future(self.requests.wait_idle())
        now = asyncio.ensure_future(stop_now.wait())
        try:
            done, _ = await asyncio.wait({idle, now}, timeout=self.timeout_s, return_when=asyncio.FIRST_COMPLETED)
        finally:
            idle.cancel()
            now.cancel()
        return "drained" if idle in done else "stopped" if now in done else "timed_out"
