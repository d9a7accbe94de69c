"""One request's life across workers, once placement has chosen them.

NOTE on the algorithm. The decode side is opened first: its Decode stream
reserves KV memory under a lease and answers with ``reserved`` (where the KV
should go). Only then is the prefill node asked to prefill and push the KV
straight to that address; the scheduler never touches KV bytes. Tokens stream
back on the Decode stream. Two things can end a request early, and both cancel
it on every worker it touched: the prefill call failing (a dead or broken
prefill node must not leave the decode node waiting for its lease to run out)
and the caller closing the iterator (a disconnected client). Colocated
requests skip the prefill call: the decode node prefills locally.

``on_prefill_done`` tells the caller (once) when the prefill node's work is
over: the Prefill call returned or failed, or, colocated, the first token
arrived. The scheduler uses it for per-node load, as the simulator does.
"""
from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import secrets
import time
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

import grpc

from proto import pdcluster_pb2 as pb
from scheduler.placement import Placement
from scheduler.request import (
    CapacityExhaustedError,
    FinishEvent,
    GenerationRequest,
    RequestFailedError,
    RequestStats,
    SchedulerError,
    TokenEvent,
    WorkerTimeoutError,
    mean_tpot_s,
)

log = logging.getLogger(__name__)

PrefixSink = Callable[[str, Sequence[int]], None]  # (node id, prefix-block hashes it holds now)


class WorkerAPI(Protocol):
    """The calls the scheduler makes on one worker; each has a deadline."""

    def decode(self, request: pb.DecodeRequest, timeout: float) -> AsyncIterator[pb.DecodeEvent]: ...

    async def prefill(self, request: pb.PrefillRequest, timeout: float) -> pb.PrefillReply: ...

    async def cancel(self, request_id: str, timeout: float) -> bool: ...


@dataclass(frozen=True)
class LifecycleConfig:
    """Deadlines for one request's worker calls."""

    request_timeout_s: float = 600.0  # whole Decode stream
    prefill_timeout_s: float = 300.0
    # Decode frees its reservation if no KV by then. 0 (the default): the decode
    # worker's own ``pdc worker --lease-s`` decides; only an operator's explicit
    # ``pdc serve --lease-s`` overrides it, on every request.
    lease_s: float = 0.0
    cancel_timeout_s: float = 5.0
    chunk_size: int = 0  # 0: the worker's default

    def __post_init__(self) -> None:
        if min(self.request_timeout_s, self.prefill_timeout_s, self.cancel_timeout_s) <= 0:
            raise ValueError("every timeout must be positive")
        if self.lease_s < 0:
            raise ValueError(f"lease_s must be >= 0 (0: the decode worker's own), got {self.lease_s}")


# What a worker's gRPC status means, in plain words, for the message a client reads.
_PLAIN_CAUSE = {
    grpc.StatusCode.UNAVAILABLE: "the node is unreachable or went away",
    grpc.StatusCode.DEADLINE_EXCEEDED: "the node did not answer in time",
    grpc.StatusCode.RESOURCE_EXHAUSTED: "the node is full",
    grpc.StatusCode.CANCELLED: "the call was cancelled",
    grpc.StatusCode.ABORTED: "the node aborted the request",
    grpc.StatusCode.DATA_LOSS: "the KV transfer was corrupted",
    grpc.StatusCode.INTERNAL: "the node hit an internal error",
    grpc.StatusCode.UNAUTHENTICATED: "the node refused the cluster key",
    grpc.StatusCode.INVALID_ARGUMENT: "the node refused the request",
    grpc.StatusCode.FAILED_PRECONDITION: "the node cannot run this request",
}


def worker_error(role: str, node: str, error: BaseException) -> SchedulerError:
    """``error`` from a ``role`` ("prefill" | "decode") call on ``node`` as a ``SchedulerError``.

    The message reads "<role> on <node> failed: <cause in plain words>[: <the
    worker's own detail>]", never gRPC's repr. RESOURCE_EXHAUSTED becomes a
    ``CapacityExhaustedError`` (429), DEADLINE_EXCEEDED a ``WorkerTimeoutError``
    (504), every other failure a ``RequestFailedError`` (502)."""
    if isinstance(error, SchedulerError):
        return error
    code = _status_of(error)
    if code is not None:
        details = (error.details() if callable(getattr(error, "details", None)) else "") or ""
        cause = _PLAIN_CAUSE.get(code, f"the node answered {code.name.lower().replace('_', ' ')}")
        message = f"{role} on {node} failed: {cause}" + (f": {details}" if details else "")
        kind = {grpc.StatusCode.RESOURCE_EXHAUSTED: CapacityExhaustedError,
                grpc.StatusCode.DEADLINE_EXCEEDED: WorkerTimeoutError}.get(code, RequestFailedError)
        return kind(message, node=node, grpc_code=code.name)
    if isinstance(error, (asyncio.TimeoutError, TimeoutError)):
        return WorkerTimeoutError(f"{role} on {node} failed: the node did not answer in time", node=node,
                                  grpc_code="DEADLINE_EXCEEDED")
    if isinstance(error, (ConnectionError, OSError)):
        return RequestFailedError(f"{role} on {node} failed: the node is unreachable or went away: {error}",
                                  node=node, grpc_code="UNAVAILABLE")
    return RequestFailedError(f"{role} on {node} failed: {type(error).__name__}: {error}", node=node)


def _status_of(error: BaseException) -> grpc.StatusCode | None:
    """The gRPC status code of an RPC error (``grpc.aio.AioRpcError`` or alike), else None."""
    code = getattr(error, "code", None)
    if not callable(code):
        return None
    try:
        value = code()
    except Exception:  # not an RPC error after all
        return None
    return value if isinstance(value, grpc.StatusCode) else None


def with_fixed_seed(request: GenerationRequest) -> GenerationRequest:
    """``request`` with a seed: the client's, else (sampled requests only) one the scheduler draws now.

    Invariant: every node that samples for one request draws from the same
    (seed, step) streams, so a stream moved to another node mid-way continues
    as it would have; greedy requests ignore the seed and keep none."""
    if request.seed is not None or request.temperature == 0:
        return request
    return dataclasses.replace(request, seed=secrets.randbits(63))


def continuation(request: GenerationRequest, sent: tuple[int, ...], attempt: int) -> GenerationRequest:
    """The request that places ``request`` again (attempt ``attempt`` >= 1) after ``sent`` tokens went out.

    Its worker-side id is ``<id>.<attempt>`` (the failed attempt's id may still be
    retiring on a surviving worker). With tokens sent, the prompt grows by them,
    ``max_tokens`` counts what is left, sampling resumes at step ``len(sent)``
    and the placement is colocated: only a decode node's own prefill samples
    its first token at a step other than 0."""
    if not sent:
        return dataclasses.replace(request, request_id=f"{request.request_id}.{attempt}")
    return dataclasses.replace(
        request, request_id=f"{request.request_id}.{attempt}",
        prompt_token_ids=request.prompt_token_ids + tuple(sent), max_tokens=request.max_tokens - len(sent),
        first_step=request.first_step + len(sent), placement="colocated",
    )


def sampling_of(request: GenerationRequest) -> pb.SamplingParams:
    """``request``'s sampling as the workers take it: the same for its prefill, its
    decode and every continuation (``continuation`` keeps the grammar too)."""
    params = pb.SamplingParams(
        max_tokens=request.max_tokens, temperature=request.temperature, top_p=request.top_p,
        top_k=request.top_k, stop_token_ids=list(request.stop_token_ids),
        presence_penalty=request.presence_penalty, frequency_penalty=request.frequency_penalty,
        logit_bias=dict(request.logit_bias), logprobs=request.logprobs, top_logprobs=request.top_logprobs,
        grammar=request.grammar,
    )
    if request.seed is not None:
        params.seed = request.seed
    return params


def token_event(token: pb.Token) -> TokenEvent:
    """A worker's ``token`` event as the scheduler's, logprobs included when it carries them."""
    if not token.HasField("logprob"):
        return TokenEvent(token.token_id)
    return TokenEvent(token.token_id, token.logprob, tuple((t.token_id, t.logprob) for t in token.top_logprobs))


async def run_request(
    request: GenerationRequest, placement: Placement, worker: Callable[[str], WorkerAPI],
    config: LifecycleConfig = LifecycleConfig(), on_prefill_done: Callable[[], None] | None = None,
    deadline: float | None = None, on_prefix_blocks: PrefixSink | None = None,
) -> AsyncIterator[TokenEvent | FinishEvent]:
    """Drive one request; yields tokens then one FinishEvent.

    ``on_prefix_blocks(node_id, hashes)`` hears, as the request ends, the
    prefix blocks each of its nodes now holds (``PrefillReply`` and
    ``Done.prefix_blocks``): the scheduler's prefix index is current before
    the next turn of the conversation arrives.

    Failures raise a ``SchedulerError`` naming the node and the cause
    (``worker_error``). ``deadline`` (``time.monotonic()``) caps the Decode
    stream's timeout below ``config.request_timeout_s``, so a request placed
    again keeps its original deadline."""
    if request.first_step and placement.prefill_node:
        # invariant: a continued stream (first_step > 0) is prefilled by its decode node,
        # which samples its first token at step first_step; a prefill node would use step 0.
        raise ValueError("a request continuing at first_step > 0 must be placed colocated")
    run = _Run(request, placement, worker, config, on_prefill_done, deadline, on_prefix_blocks)
    finished = False
    try:
        async with contextlib.aclosing(run.events()) as events:
            async for event in events:
                if isinstance(event, FinishEvent):
                    finished = True
                yield event
    finally:
        await run.close(cancel_workers=not finished)


class _Run:
    """State of one request in flight."""

    def __init__(self, request: GenerationRequest, placement: Placement,
                 worker: Callable[[str], WorkerAPI], config: LifecycleConfig,
                 on_prefill_done: Callable[[], None] | None = None, deadline: float | None = None,
                 on_prefix_blocks: PrefixSink | None = None) -> None:
        self.request, self.placement, self.config = request, placement, config
        self.deadline = deadline
        self._on_prefix_blocks = on_prefix_blocks
        self._on_prefill_done = on_prefill_done
        self.decoder = worker(placement.decode_node)
        self.prefiller = worker(placement.prefill_node) if placement.prefill_node else None
        self.prefill_task: asyncio.Task | None = None
        self.pending: asyncio.Future | None = None  # the Decode stream read in flight
        self.token_times: list[float] = []
        self.started = time.monotonic()

    async def events(self) -> AsyncIterator[TokenEvent | FinishEvent]:
        timeout = self.config.request_timeout_s
        if self.deadline is not None:
            timeout = min(timeout, self.deadline - time.monotonic())
            if timeout <= 0:
                raise WorkerTimeoutError(f"request {self.request.request_id} ran out of time before decode on "
                                         f"{self.placement.decode_node} could start", node="")
        stream = self.decoder.decode(self._decode_request(), timeout=timeout)
        stream_iter = aiter(stream)
        while True:
            event = await self._next_event(stream_iter)
            if event is None:
                raise RequestFailedError(f"decode on {self.placement.decode_node} failed: the node ended the stream "
                                         "without a result", node=self.placement.decode_node)
            kind = event.WhichOneof("event")
            if kind == "reserved":
                self._start_prefill(event.reserved)
            elif kind == "token":
                self.token_times.append(time.monotonic())
                if self.prefiller is None:
                    self._prefill_over()
                yield token_event(event.token)
            elif kind == "done":
                yield FinishEvent(event.done.finish_reason or "stop", await self._stats(event.done))
                return

    async def _next_event(self, stream_iter: AsyncIterator[pb.DecodeEvent]) -> pb.DecodeEvent | None:
        """The next Decode event, failing fast if the prefill call fails first.

        The pending read survives a prefill completion: cancelling a pending
        read would tear down the stream."""
        if self.pending is None:
            self.pending = asyncio.ensure_future(anext(stream_iter, None))
        while True:
            waiting = {self.pending}
            if self.prefill_task is not None and not self.prefill_task.done():
                waiting.add(self.prefill_task)
            done, _ = await asyncio.wait(waiting, return_when=asyncio.FIRST_COMPLETED)
            if self.pending in done:
                break
            self._raise_if_prefill_failed()
        pending, self.pending = self.pending, None
        try:
            return pending.result()
        except Exception as e:
            await self._blame_a_dead_sender(e)
            raise worker_error("decode", self.placement.decode_node, e) from e

    async def _blame_a_dead_sender(self, error: BaseException) -> None:
        """A decode that failed because its KV transfer broke (cut before its
        end frame, aborted) usually saw its prefill node die: give the Prefill
        call a moment to fail too, and report the prefill node when it did."""
        task = self.prefill_task
        if task is None or _status_of(error) not in (grpc.StatusCode.DATA_LOSS, grpc.StatusCode.ABORTED):
            return
        if not task.done():
            await asyncio.wait({task}, timeout=self.config.cancel_timeout_s)
        self._raise_if_prefill_failed()  # a no-op unless the prefill call failed

    def _raise_if_prefill_failed(self) -> None:
        task = self.prefill_task
        if task is None or not task.done():
            return
        error = task.exception() if not task.cancelled() else asyncio.CancelledError("prefill cancelled")
        if error is not None:
            raise worker_error("prefill", self.placement.prefill_node, error) from error

    def _start_prefill(self, reserved: pb.Reserved) -> None:
        if self.prefiller is None:
            return
        prefill_request = pb.PrefillRequest(
            request_id=self.request.request_id, prompt_token_ids=list(self.request.prompt_token_ids),
            sampling=sampling_of(self.request), kv_host=reserved.kv_host, kv_port=reserved.kv_port,
            transfer_token=reserved.transfer_token, chunk_size=self.config.chunk_size, codec=self.placement.codec,
            skip_tokens=reserved.cached_tokens,  # the decode node holds these already: ship only the rest
        )
        self.prefill_task = asyncio.ensure_future(
            self.prefiller.prefill(prefill_request, timeout=self.config.prefill_timeout_s)
        )
        self.prefill_task.add_done_callback(lambda _: self._prefill_over())
        self.prefill_task.add_done_callback(self._prefill_blocks)

    def _prefill_blocks(self, task: asyncio.Task) -> None:
        """The prefill node's held blocks, as soon as its prefill ends (not when decode does)."""
        if not task.cancelled() and task.exception() is None:
            self._tell_prefix_blocks(self.placement.prefill_node, task.result().prefix_blocks)

    def _prefill_over(self) -> None:
        callback, self._on_prefill_done = self._on_prefill_done, None
        if callback is not None:
            callback()

    def _decode_request(self) -> pb.DecodeRequest:
        return pb.DecodeRequest(
            request_id=self.request.request_id, prompt_token_ids=list(self.request.prompt_token_ids),
            sampling=sampling_of(self.request), local_prefill=self.placement.colocated,
            lease_s=self.config.lease_s, codec=self.placement.codec, first_step=self.request.first_step,
        )

    async def _stats(self, done: pb.Done) -> RequestStats:
        timings = done.timings
        prefill_s = timings.prefill_s
        queue_s = timings.queue_s
        self._tell_prefix_blocks(self.placement.decode_node, done.prefix_blocks)
        if self.prefill_task is not None:
            try:
                reply = await asyncio.wait_for(asyncio.shield(self.prefill_task), self.config.cancel_timeout_s)
            except Exception as e:
                raise worker_error("prefill", self.placement.prefill_node, e) from e
            prefill_s, queue_s = reply.prefill_s or prefill_s, reply.queue_s
        arrived = self.request.arrived_at or self.started
        now = time.monotonic()
        first, last = (self.token_times[0], self.token_times[-1]) if self.token_times else (now, now)
        request = self.request
        return RequestStats(
            request_id=request.request_id, arrival_s=arrived,
            prefill_node=self.placement.prefill_node or self.placement.decode_node,
            decode_node=self.placement.decode_node,
            kv_codec=None if self.placement.colocated else self.placement.codec,
            kv_bytes=timings.kv_bytes, queue_s=queue_s, prefill_s=prefill_s,
            transfer_s=timings.transfer_s, exposed_transfer_s=timings.exposed_transfer_s,
            ttft_s=first - arrived, tpot_s=mean_tpot_s(first, last, len(self.token_times)),
            e2e_s=last - arrived, prompt_tokens=len(request.prompt_token_ids),
            cached_prefix_tokens=timings.cached_tokens, decode_cached_tokens=timings.decode_cached_tokens,
            completion_tokens=len(self.token_times),
        )

    def _tell_prefix_blocks(self, node: str | None, hashes: Sequence[int]) -> None:
        if node and hashes and self._on_prefix_blocks is not None:
            try:
                self._on_prefix_blocks(node, list(hashes))
            except Exception:  # the index is advice for placement: never fail a request over it
                log.exception("request %s: recording prefix blocks of %s failed", self.request.request_id, node)

    async def close(self, *, cancel_workers: bool) -> None:
        self._prefill_over()  # whatever happened, the prefill node's part is over
        if self.pending is not None and not self.pending.done():
            self.pending.cancel()
        if self.prefill_task is not None and not self.prefill_task.done():
            self.prefill_task.cancel()
        if not cancel_workers:
            return
        log.info("request %s: cancelling on %s", self.request.request_id,
                 ", ".join(filter(None, [self.placement.prefill_node, self.placement.decode_node])))
        workers = [self.decoder] + ([self.prefiller] if self.prefiller else [])
        for w in workers:
            with contextlib.suppress(Exception):
                await w.cancel(self.request.request_id, timeout=self.config.cancel_timeout_s)
