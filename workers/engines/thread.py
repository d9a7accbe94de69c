"""One dedicated thread per engine.

Engines are not thread-safe, and MLX arrays must stay on the thread that made
them, so every call into an engine (its construction included) runs on one
worker thread, in submission order. The event loop awaits the results and is
never blocked by compute.

Which request caches the engine holds is the engine's to say
(``Engine.cached_requests``).

The engine's last job is ``Engine.close``, on the same thread: MLX keeps
per-thread state (streams, the random key) whose thread-exit destructors take
the GIL; left to them, a thread that ends while the interpreter finalizes
aborts the process ("terminate called without an active exception").
"""
from __future__ import annotations

import asyncio
import concurrent.futures
from collections.abc import Callable
from typing import Any, TypeVar

from workers.engines.base import Engine

T = TypeVar("T")


class EngineThread:
    """Runs ``factory()`` and then every job on the same single thread."""

    def __init__(self, factory: Callable[[], Engine], name: str = "engine") -> None:
        self._factory = factory
        # one worker thread, kept for the executor's lifetime: all jobs share it
        self._executor = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix=name)
        self._engine: Engine | None = None
        self._queued: set[concurrent.futures.Future[Any]] = set()  # submitted, not done (set ops are atomic)

    @property
    def engine(self) -> Engine:
        if self._engine is None:
            raise RuntimeError("engine not started; await EngineThread.start() first")
        return self._engine

    @property
    def num_pending(self) -> int:
        """Jobs submitted and not yet done (the running one included): what a new job queues behind."""
        return len(self._queued)

    async def start(self) -> Engine:
        """Build the engine on its thread."""
        self._engine = await self.run(self._factory)
        return self._engine

    async def run(self, fn: Callable[..., T], *args: Any) -> T:
        """Run ``fn(*args)`` on the engine thread and await its result.

        If the awaiting task is cancelled before the job starts, the job is
        dropped; once it runs it runs to completion (jobs must be short, or
        poll a cancel flag of their own)."""
        return await asyncio.wrap_future(self.submit(fn, *args))

    def submit(self, fn: Callable[..., T], *args: Any) -> concurrent.futures.Future[T]:
        """Queue ``fn(*args)`` without waiting: for cleanups that must run
        even when the caller is being cancelled."""
        future = self._executor.submit(fn, *args)
        self._queued.add(future)
        future.add_done_callback(self._queued.discard)  # on the engine thread, or here if already done
        return future

    def release(self, key: str) -> concurrent.futures.Future[None]:
        """Drop the engine's cache for ``key`` (queued behind running jobs)."""
        return self.submit(self.engine.release, key)

    def shutdown(self) -> concurrent.futures.Future[None] | None:
        """Stop taking jobs: queued ones are dropped, the running one (if any)
        finishes in the background, then ``Engine.close`` runs as the thread's
        last job and the thread ends. Returns the close's future to await
        (None when no engine was built). Even unawaited, the close runs before
        the interpreter finalizes: it joins the thread at exit."""
        for future in list(self._queued):
            future.cancel()  # drops a queued job; the running one cannot be cancelled
        closing = self._executor.submit(self._engine.close) if self._engine is not None else None
        self._executor.shutdown(wait=False)
        return closing
