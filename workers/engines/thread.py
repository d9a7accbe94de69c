"""One dedicated thread per engine.

Engines are not thread-safe, and MLX arrays must stay on the thread that made
them, so every call into an engine (its construction included) runs on one
worker thread, in submission order. The event loop awaits the results and is
never blocked by compute.

The thread also keeps the set of request keys whose cache the engine holds
(``held``), so the service can report, and tests can check, that a finished
or cancelled request left nothing behind.
"""
from __future__ import annotations

import asyncio
import concurrent.futures
import threading
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
        self._thread_id: int | None = None
        self.held: set[str] = set()  # cache keys the engine holds; touched on the engine thread only

    @property
    def engine(self) -> Engine:
        if self._engine is None:
            raise RuntimeError("engine not started; await EngineThread.start() first")
        return self._engine

    async def start(self) -> Engine:
        """Build the engine on its thread."""
        def build() -> Engine:
            self._thread_id = threading.get_ident()
            return self._factory()

        self._engine = await self.run(build)
        return self._engine

    def on_engine_thread(self) -> bool:
        return threading.get_ident() == self._thread_id

    async def run(self, fn: Callable[..., T], *args: Any) -> T:
        """Run ``fn(*args)`` on the engine thread and await its result.

        If the awaiting task is cancelled before the job starts, the job is
        dropped; once it runs it runs to completion (jobs must be short, or
        poll a cancel flag of their own)."""
        return await asyncio.wrap_future(self._executor.submit(fn, *args))

    def submit(self, fn: Callable[..., T], *args: Any) -> concurrent.futures.Future[T]:
        """Queue ``fn(*args)`` without waiting: for cleanups that must run
        even when the caller is being cancelled."""
        return self._executor.submit(fn, *args)

    def release(self, key: str) -> concurrent.futures.Future[None]:
        """Drop the engine's cache for ``key`` (queued behind running jobs)."""
        def drop() -> None:
            self.engine.release(key)
            self.held.discard(key)

        return self.submit(drop)

    def shutdown(self) -> None:
        """Stop taking jobs; the running one (if any) finishes in the background."""
        self._executor.shutdown(wait=False, cancel_futures=True)
