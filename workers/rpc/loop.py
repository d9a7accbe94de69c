"""The worker's step loop: one engine, many requests at once (continuous batching).

NOTE on the algorithm (nano-vllm's shape: schedule -> run -> postprocess).
Each iteration is one job on the engine thread (``EngineThread``), so other
engine jobs (``load_kv``, ``release``, prefix-cache copies) run between
iterations, at step boundaries, in the order they were submitted.
*Schedule*: cancelled requests leave the batch (``Engine.remove``); requests
whose KV has loaded or whose local prefill has ended join it
(``Engine.add``), oldest first, up to ``max_batch`` running. *Run*: at most
one prefill chunk of the oldest waiting prefill (first come, first served;
with ``interleave`` off, the whole prompt), then one decode step over every
running request (``Engine.step``). *Postprocess*: each token (with its logprobs,
when the request asked for them: ``Engine.step_logprobs``) goes to its
request's stream on the event loop; a request whose token is its last
(``is_last``) has left the batch by itself and its stream ends; a request
the step failed alone (its grammar matcher broke: ``Engine.step_errors``)
has left it too and its stream ends with that error, the others' untouched;
a finished prefill resolves its future. The loop then queues its next iteration while
any request runs or any prefill waits, and sleeps otherwise: a new request
wakes it. So a long prompt costs running streams one chunk's time per
token, not the whole prompt's, and a stream never waits for another to end.

Everything here runs on the engine thread except the public methods, which
the event loop calls; they only append to thread-safe queues and wake the loop.
"""
from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import logging
import threading
from collections.abc import AsyncIterator, Callable, Generator
from dataclasses import dataclass, field
from typing import Any

from workers.engines.base import is_last
from workers.engines.sampling import SamplingParams, TokenLogprobs
from workers.engines.thread import EngineThread

log = logging.getLogger(__name__)

MAX_BATCH = 64  # default: running requests per decode step


class StreamCancelled(Exception):
    """A decode stream ended by ``DecodeStream.cancel``."""


class LoopClosed(Exception):
    """The worker is shutting down: the step loop takes no more work."""


@dataclass(eq=False)
class PrefillTask:
    """A prefill the loop runs chunk by chunk: ``job`` yields after each chunk
    and returns its result; ``future`` gets it (or the job's exception)."""

    name: str
    job: Generator[None, None, Any]
    on_start: Callable[[], object] | None = None
    owner: StepLoop | None = None
    future: concurrent.futures.Future = field(default_factory=concurrent.futures.Future)
    started: bool = False
    cancelled: bool = False

    def cancel(self) -> None:
        """Drop it at the next step if it has not started, wherever it waits;
        a started one stops at its next chunk boundary (its job sees
        GeneratorExit). Either way its future ends with ``StreamCancelled``,
        unless the job finished first."""
        self.cancelled = True
        if self.owner is not None:
            self.owner._kick()


_END = object()


@dataclass(eq=False)
class DecodeStream:
    """One request's tokens, from the engine thread to the event loop.

    Iterate it (``async for``) for the tokens after the first, or ``draws()``
    for ``(token, logprobs)`` pairs (logprobs None unless ``params.logprobs``);
    either ends after the last one, or raises what ended it
    (``StreamCancelled``, an engine error). ``history``: the tokens the
    request generated before ``first_token`` (``Engine.add``)."""

    request_id: str  # the engine cache key
    first_token: int
    params: SamplingParams
    first_step: int
    loop: asyncio.AbstractEventLoop
    owner: StepLoop
    queue: asyncio.Queue = field(default_factory=asyncio.Queue)
    produced: int = 0  # tokens after the first so far (engine thread)
    joined_tokens: int = 0  # tokens its cache held when it joined (engine thread)
    done: bool = False
    history: tuple[int, ...] = ()

    def cancel(self) -> None:
        """Leave the batch at the next step boundary; the stream ends with ``StreamCancelled``."""
        if not self.done:
            self.owner._cancel(self)
            self._deliver(StreamCancelled(self.request_id))

    def __aiter__(self) -> AsyncIterator[int]:
        return self._tokens()

    async def _tokens(self) -> AsyncIterator[int]:
        async for token, _ in self.draws():
            yield token

    async def draws(self) -> AsyncIterator[tuple[int, TokenLogprobs | None]]:
        """Each token after the first with its logprobs (None unless the request asked)."""
        while True:
            item = await self.queue.get()
            if item is _END:
                return
            if isinstance(item, BaseException):
                raise item
            yield item

    def _deliver(self, item: object) -> None:
        """From any thread: hand ``item`` to the event loop's side."""
        try:
            self.loop.call_soon_threadsafe(self.queue.put_nowait, item)
        except RuntimeError:  # the event loop is closed: nobody is listening any more
            pass


class StepLoop:
    """Runs prefills and one batched decode over an ``EngineThread``."""

    def __init__(self, engines: EngineThread, *, interleave: bool = True, max_batch: int = MAX_BATCH,
                 max_batch_tokens: int | None = None) -> None:
        if max_batch < 1:
            raise ValueError(f"max_batch must be >= 1, got {max_batch}")
        if max_batch_tokens is not None and max_batch_tokens < 1:
            raise ValueError(f"max_batch_tokens must be >= 1 or None, got {max_batch_tokens}")
        self.engines = engines
        self.interleave = interleave
        self.max_batch = max_batch
        # Both engines batch left-padded: a batch of n rows costs n x its longest row in KV slots.
        # A join that would take that past this bound waits for rows to leave (None: no bound).
        self.max_batch_tokens = max_batch_tokens
        self._lock = threading.Lock()
        self._scheduled = False  # an iteration is queued on the engine thread
        self._closed = False
        # event loop -> engine thread
        self._joins: collections.deque[DecodeStream] = collections.deque()
        self._cancels: collections.deque[DecodeStream] = collections.deque()
        self._prefills: collections.deque[PrefillTask] = collections.deque()
        # engine thread only
        self._running: dict[str, DecodeStream] = {}
        self.steps = 0  # decode steps run (for Stats and tests)

    # -- the event loop's side --------------------------------------------

    @property
    def num_running(self) -> int:
        return len(self._running)

    @property
    def num_prefills_waiting(self) -> int:
        """Prefills queued or running: what a new prefill waits behind."""
        return sum(1 for task in list(self._prefills) if not task.cancelled)

    def prefill(self, name: str, job: Generator[None, None, Any], on_start: Callable[[], object] | None = None
                ) -> PrefillTask:
        """Queue a prefill job (a generator that yields after each chunk and
        returns its result, run on the engine thread); ``on_start`` runs on
        the engine thread just before its first chunk."""
        task = PrefillTask(name, job, on_start, owner=self)
        with self._lock:
            if self._closed:
                raise LoopClosed("the worker is shutting down")
            self._prefills.append(task)
        self._kick()
        return task

    def join(self, request_id: str, first_token: int, params: SamplingParams, first_step: int = 0,
             history: tuple[int, ...] = ()) -> DecodeStream:
        """Queue ``request_id`` (its cache ready in the engine) to join the
        batch at the next step boundary. The caller checks ``is_last(first_token, 0, params)``
        first: a request with nothing to generate never joins. ``history``:
        the tokens it generated before ``first_token`` (``Engine.add``)."""
        stream = DecodeStream(request_id, first_token, params, first_step, asyncio.get_running_loop(), self,
                              history=tuple(history))
        with self._lock:
            if self._closed:
                raise LoopClosed("the worker is shutting down")
            self._joins.append(stream)
        self._kick()
        return stream

    def close(self) -> None:
        """Take no more work; end every stream and waiting prefill with ``LoopClosed``."""
        with self._lock:
            self._closed = True
            joins, self._joins = list(self._joins), collections.deque()
            prefills, self._prefills = list(self._prefills), collections.deque()
        for stream in [*joins, *list(self._running.values())]:
            stream.done = True
            stream._deliver(LoopClosed("the worker is shutting down"))
        for task in prefills:
            _settle(task.future, error=LoopClosed("the worker is shutting down"))

    def _cancel(self, stream: DecodeStream) -> None:
        with self._lock:
            self._cancels.append(stream)
        self._kick()

    def _kick(self) -> None:
        """Make sure an iteration is queued on the engine thread."""
        with self._lock:
            if self._scheduled or self._closed:
                return
            self._scheduled = True
        try:
            self.engines.submit(self._iteration)
        except RuntimeError:  # the engine thread is shut down
            with self._lock:
                self._scheduled = False

    # -- the engine thread's side -----------------------------------------

    def _iteration(self) -> None:
        with self._lock:
            self._scheduled = False
        engine = self.engines.engine
        try:
            self._schedule(engine)
            self._run_prefill()
            if self._running:
                self._decode_step(engine)
        except Exception:  # a bug here must not stop the loop silently for everyone
            log.exception("step loop iteration failed")
            self._fail_running(engine, RuntimeError("the worker's step loop failed; see its log"))
        with self._lock:
            more = bool(self._running or self._prefills or self._joins or self._cancels)
        if more:
            self._kick()

    def _schedule(self, engine: Any) -> None:
        while True:
            with self._lock:
                if not self._cancels:
                    break
                stream = self._cancels.popleft()
            if self._running.pop(stream.request_id, None) is stream:
                engine.remove(stream.request_id)
            stream.done = True
        while len(self._running) < self.max_batch:
            with self._lock:
                if not self._joins:
                    return
                stream = self._joins.popleft()
            if stream.done:  # cancelled while waiting to join
                continue
            try:
                stream.joined_tokens = engine.cached_tokens(stream.request_id)
                if not self._fits(stream):
                    with self._lock:
                        self._joins.appendleft(stream)  # first in line when rows leave
                    return
                if stream.params.reads_history:  # only the penalties and a grammar read the history
                    engine.add(stream.request_id, stream.first_token, stream.params, stream.first_step,
                               history=stream.history)
                else:
                    engine.add(stream.request_id, stream.first_token, stream.params, stream.first_step)
            except Exception as e:  # no cache (released meanwhile), bad params: this request only
                stream.done = True
                stream._deliver(e)
                continue
            self._running[stream.request_id] = stream

    def _fits(self, joining: DecodeStream) -> bool:
        """Whether the padded batch with ``joining`` stays within ``max_batch_tokens``
        (a request alone always fits: its lease already did)."""
        if self.max_batch_tokens is None or not self._running:
            return True
        longest = max(joining.joined_tokens + 1,
                      *(s.joined_tokens + s.produced + 1 for s in self._running.values()))
        return (len(self._running) + 1) * longest <= self.max_batch_tokens

    def _run_prefill(self) -> None:
        """One chunk of the oldest waiting prefill (all of it without ``interleave``)."""
        self._drop_cancelled_prefills()
        while True:
            with self._lock:
                task = self._prefills[0] if self._prefills else None
            if task is None:
                return
            if not task.started and (task.cancelled or task.future.cancelled()):
                # dropped before it ran (a cancel, or its awaiter gave up and cancelled the future)
                self._pop_prefill(task)
                task.job.close()
                _settle(task.future, error=StreamCancelled(task.name))
                continue
            break
        try:
            if task.cancelled:
                task.job.close()  # GeneratorExit at its chunk boundary: its finally blocks run
                raise StreamCancelled(task.name)
            if not task.started:
                task.started = True
                task.future.set_running_or_notify_cancel()  # running futures cannot be cancelled any more
                if task.on_start is not None:
                    task.on_start()
            while True:
                next(task.job)
                if self.interleave:
                    return
        except StopIteration as stop:
            self._pop_prefill(task)
            _settle(task.future, result=stop.value)
        except BaseException as e:  # the job's own failure (a cancel, a broken KV stream): that request only
            self._pop_prefill(task)
            _settle(task.future, error=e)

    def _drop_cancelled_prefills(self) -> None:
        """Settle every prefill cancelled before it started, wherever it waits."""
        with self._lock:
            dropped = [t for t in self._prefills if not t.started and (t.cancelled or t.future.cancelled())]
            if dropped:
                self._prefills = collections.deque(t for t in self._prefills if t not in dropped)
        for task in dropped:
            task.job.close()
            _settle(task.future, error=StreamCancelled(task.name))

    def _pop_prefill(self, task: PrefillTask) -> None:
        with self._lock:
            if self._prefills and self._prefills[0] is task:
                self._prefills.popleft()

    def _decode_step(self, engine: Any) -> None:
        try:
            tokens = engine.step()
        except Exception as e:
            log.exception("decode step failed for %d request(s)", len(self._running))
            self._fail_running(engine, e)
            return
        self.steps += 1
        logprobs = engine.step_logprobs() if any(s.params.logprobs for s in self._running.values()) else {}
        errors = engine.step_errors() if any(s.params.grammar for s in self._running.values()) else {}
        for request_id, stream in list(self._running.items()):
            token = tokens.get(request_id)
            if token is None and request_id in errors:  # failed alone: it left the batch
                del self._running[request_id]
                stream.done = True
                stream._deliver(errors[request_id])
                continue
            if token is None:  # released behind the loop's back: nothing to deliver
                del self._running[request_id]
                stream.done = True
                stream._deliver(RuntimeError(f"request {request_id!r} left the batch without finishing"))
                continue
            stream.produced += 1
            stream._deliver((token, logprobs.get(request_id)))
            if is_last(token, stream.produced, stream.params):
                del self._running[request_id]  # the engine let it go after this step
                stream.done = True
                stream._deliver(_END)

    def _fail_running(self, engine: Any, error: Exception) -> None:
        for request_id, stream in list(self._running.items()):
            try:
                engine.remove(request_id)
            except Exception:
                log.exception("removing %s after a failed step", request_id)
            stream.done = True
            stream._deliver(error)
        self._running.clear()


def _settle(future: concurrent.futures.Future, *, result: Any = None, error: BaseException | None = None) -> None:
    """Set ``future``'s outcome unless it already has one (its awaiter may have cancelled it)."""
    try:
        if error is not None:
            future.set_exception(error)
        else:
            future.set_result(result)
    except concurrent.futures.InvalidStateError:
        pass
