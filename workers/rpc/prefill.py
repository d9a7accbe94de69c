"""The ``Prefill`` RPC: prefill here and push the KV, layer by layer, to a decode node.

1. Queue the prefill in the worker's step loop (``workers/rpc/loop.py``:
   first come, first served, one chunk per step between the decode steps of
   running requests). Its wait there is bounded by the queue deadline
   (``queue_deadline_s``): past it the RPC fails with ``RESOURCE_EXHAUSTED``
   naming the wait, and the job is dropped unrun.
2. When the job starts, and only then, connect to the decode node's KV port
   and pass the cluster-key handshake, presenting the transfer token from its
   ``reserved`` event. So the decode side's lease never counts queue time: it
   sees a connection only once this prefill computes (``workers/kv/leases.py``).
3. Prefill in chunks, from this node's longest cached prefix of the prompt
   on (its prefix cache); each layer's slice goes to a ``KVPusher`` the moment
   the engine emits it, so it is on the wire while later layers compute. Only
   tokens from ``skip_tokens`` on are sent (the decode node holds the rest),
   numbered from 0. Sample the first token (masked by the request's grammar,
   when it has one: the decode node's matcher consumes this token before it
   draws the next) and send ``end`` with it and the
   prefill timings (``prefill_s``, ``prefill_end_wall``, ``queue_s``,
   ``cached_tokens``), and the first token's logprobs when the request asks
   for them (``first_logprobs``, ``TokenLogprobs.to_json``).
4. Keep the prompt's KV in the prefix cache, and reply once the last byte has
   left, with the prefix blocks now held. The prefill cache is released as
   soon as the transfer ends, whatever ended it.

A cancel (the ``Cancel`` RPC, or the caller going away) stops the engine at
its next slice and sends ``abort`` to the decode node.
"""
from __future__ import annotations

import asyncio
import logging
import socket
import time
from collections.abc import Generator

import grpc
from grpc import aio

from cluster.auth import AuthError
from proto import pdcluster_pb2 as pb
from workers.engines.prefix_cache import PrefixHit
from workers.engines.sampling import SamplingParams, TokenSampler
from workers.kv.listener import KVPusher, KVPushError, open_kv_connection
from workers.rpc.loop import LoopClosed, PrefillTask, StreamCancelled
from workers.rpc.state import (
    ActiveRequest,
    Cancelled,
    RPCFailure,
    WorkerState,
    cancellable,
)

log = logging.getLogger(__name__)

QUEUE_DEADLINE_S = 120.0  # the longest a prefill waits on the engine before it starts


class PrefillRPC:
    """Serves ``Prefill`` calls over one worker's state."""

    def __init__(self, state: WorkerState, *, queue_deadline_s: float = QUEUE_DEADLINE_S) -> None:
        if queue_deadline_s <= 0:
            raise ValueError(f"queue_deadline_s must be > 0, got {queue_deadline_s}")
        self.state = state
        self.queue_deadline_s = queue_deadline_s

    async def __call__(self, request: pb.PrefillRequest, context: aio.ServicerContext) -> pb.PrefillReply:
        state = self.state
        arrival = time.monotonic()
        state.counters.requests_total += 1
        active: ActiveRequest | None = None
        task: PrefillTask | None = None
        try:
            prompt, params, chunk_size = self._check(request)
            active = state.open(request.request_id, "prefill")
            loop = asyncio.get_running_loop()
            started: asyncio.Future[None] = loop.create_future()
            ahead = state.loop.num_prefills_waiting  # prefills queued or running before this one
            hit = await state.prefix_lookup(prompt)
            cached = hit.num_tokens if hit is not None else 0
            job = self._job(active, request, prompt, params, chunk_size, arrival, hit)
            hit = None  # the job holds it until the engine has loaded it
            task = active.prefill = state.loop.prefill(
                active.cache_key, job, lambda: loop.call_soon_threadsafe(_set_done, started))
            await self._until_started(started, task, active, ahead)
            first, queue_s, prefill_s, blocks = await asyncio.wrap_future(task.future)
            pusher = active.pusher
            assert pusher is not None
            await asyncio.wait_for(asyncio.wrap_future(pusher.done), timeout=state.settings.send_timeout_s)
            state.counters.kv_bytes_sent += pusher.bytes_sent
            if pusher.raw_fallbacks:
                log.warning("request %s: %d KV slice(s) held NaN/inf, which %s cannot encode; they went raw",
                            request.request_id, pusher.raw_fallbacks, request.codec)
            return pb.PrefillReply(first_token=first, queue_s=queue_s, prefill_s=prefill_s,
                                   kv_bytes=pusher.bytes_sent, send_s=pusher.send_s,
                                   cached_tokens=cached, prefix_blocks=blocks)
        except asyncio.CancelledError:  # the caller went away or its deadline passed
            state.counters.requests_cancelled += 1
            raise
        except Exception as e:
            cancelled = active is not None and active.cancelled.is_set()
            failure = active.cancelled_failure if cancelled and active.failure else _failure(e, request,
                                                                                             cancelled=cancelled)
            state.count_failure(failure.code)
            if failure.code == grpc.StatusCode.INTERNAL:
                log.exception("request %s: prefill failed", request.request_id)
            await context.abort(failure.code, failure.message)
        finally:
            if active is not None:
                active.cancelled.set()  # a job still running stops at its next slice
                if active.pusher is not None:
                    active.pusher.close()
                    active.pusher.sock.close()
                if task is not None:
                    task.cancel()  # dropped if it has not started
                state.retire(active, task.future if task is not None else None)

    def _check(self, request: pb.PrefillRequest) -> tuple[list[int], SamplingParams, int]:
        state = self.state
        if not state.settings.can_prefill:
            raise RPCFailure(grpc.StatusCode.FAILED_PRECONDITION, "this worker does not have the prefill role")
        state.check_codec(request.codec)
        if not request.kv_host or not 0 < request.kv_port < 65536 or not request.transfer_token:
            raise RPCFailure(grpc.StatusCode.INVALID_ARGUMENT,
                             "kv_host, kv_port and transfer_token (from the decode node's reserved event) are required")
        prompt = state.check_prompt(request.request_id, request.prompt_token_ids)
        if request.skip_tokens and state.engines.engine.kv_layout(1).sliding:
            raise RPCFailure(grpc.StatusCode.INVALID_ARGUMENT,
                             "skip_tokens must be 0 for a model with sliding-window layers: their KV is "
                             "not reused from a prefix cache")
        if request.skip_tokens >= len(prompt):
            raise RPCFailure(grpc.StatusCode.INVALID_ARGUMENT,
                             f"skip_tokens ({request.skip_tokens}) must be less than the prompt's "
                             f"{len(prompt)} tokens: the last token's KV is always sent")
        return prompt, state.check_sampling(request.sampling), request.chunk_size or state.settings.chunk_size

    async def _until_started(self, started: asyncio.Future[None], job: PrefillTask, active: ActiveRequest,
                             ahead: int) -> None:
        """Wait for the job to start on the engine (or to end unstarted: a
        cancel dropped it), at most the queue deadline; then drop it and fail."""
        ended = asyncio.wrap_future(job.future)
        ended.add_done_callback(_retrieved)  # the caller awaits the job's own future for its outcome
        try:
            await asyncio.wait_for(asyncio.wait({started, ended}, return_when=asyncio.FIRST_COMPLETED),
                                   self.queue_deadline_s)
        except asyncio.TimeoutError:
            pass
        if started.done() or ended.done():  # running, or over: the caller awaits the job's result
            return
        active.cancelled.set()  # a job that starts anyway stops before connecting
        job.cancel()  # drops it if still queued
        raise RPCFailure(
            grpc.StatusCode.RESOURCE_EXHAUSTED,
            f"prefill did not start within its queue deadline of {self.queue_deadline_s:g}s: the engine was "
            f"busy with {ahead} earlier request(s) (pdc worker --queue-deadline-s)")

    def _connect(self, request: pb.PrefillRequest) -> socket.socket:
        """On the engine thread, as the prefill starts: a KV connection that passed the handshake."""
        try:
            return open_kv_connection(request.kv_host, request.kv_port, self.state.key, request.transfer_token,
                                      timeout=self.state.settings.connect_timeout_s)
        except AuthError as e:
            raise RPCFailure(grpc.StatusCode.UNAUTHENTICATED,
                             f"decode node {request.kv_host}:{request.kv_port} refused the KV connection: {e}") from None
        except OSError as e:
            raise RPCFailure(grpc.StatusCode.UNAVAILABLE,
                             f"cannot reach decode node KV port {request.kv_host}:{request.kv_port}: {e}") from None

    def _open_pusher(self, active: ActiveRequest, request: pb.PrefillRequest) -> KVPusher:
        """Connect and wrap the socket in a pusher, owned by ``active`` (closed by the RPC or by a cancel)."""
        settings = self.state.settings
        pusher = KVPusher(self._connect(request), threaded=settings.threaded_send,
                          max_queued_bytes=settings.max_queued_bytes, timeout=settings.send_timeout_s)
        active.pusher = pusher
        # set before the check: the RPC's cleanup sets `cancelled` before it reads `pusher`,
        # so one of the two always closes this connection
        if active.cancelled.is_set():
            pusher.close()
            pusher.sock.close()
            raise Cancelled(active.request_id)
        return pusher

    def _job(self, active: ActiveRequest, request: pb.PrefillRequest, prompt: list[int], params: SamplingParams,
             chunk_size: int, arrival: float, hit: PrefixHit | None
             ) -> Generator[None, None, tuple[int, float, float, list[int]]]:
        """The step loop's prefill job (engine thread, one chunk per ``next``):
        connect, then prefill from the cached prefix on, streaming each slice
        as it is computed; then keep the prompt's KV in the prefix cache."""
        started = time.monotonic()
        if active.cancelled.is_set():  # its queue deadline passed, or it was cancelled while queued
            raise Cancelled(active.request_id)
        state = self.state
        engine = state.engines.engine
        skip = request.skip_tokens
        pusher = self._open_pusher(active, request)
        try:
            pusher.begin(active.request_id, engine.kv_layout(len(prompt) - skip), codec=request.codec or "raw")
            result = None
            for result in engine.prefill_chunks(active.cache_key, prompt, cancellable(active, pusher.send_slice),
                                                chunk_size, prefix=hit.layers if hit is not None else None,
                                                emit_from=skip):
                if result is None:
                    yield
            if result is None:
                raise RuntimeError("prefill_chunks ended without a result")
            # sampling step 0; a grammar's matcher starts here and the decode node's replays this token
            first, logprobs = TokenSampler(params, -1, (), engine.grammar_tokenizer).draw(result.logits)
            meta = {"prefill_s": result.compute_s, "prefill_end_wall": time.time(), "queue_s": started - arrival,
                    "cached_tokens": hit.num_tokens if hit is not None else 0}
            if logprobs is not None:  # the decode node reports them with the first token
                meta["first_logprobs"] = logprobs.to_json()
            pusher.end(first, meta)
            blocks = state.store_prefix(active.cache_key, prompt)
            return first, started - arrival, result.compute_s, blocks
        except BaseException as e:
            pusher.abort(f"prefill failed on the prefill node: {type(e).__name__}: {e}")
            raise
        finally:
            engine.release(active.cache_key)


def _failure(error: BaseException, request: pb.PrefillRequest, *, cancelled: bool) -> RPCFailure:
    if isinstance(error, RPCFailure):
        return error
    if isinstance(error, LoopClosed):
        return RPCFailure(grpc.StatusCode.UNAVAILABLE, str(error))
    if cancelled or isinstance(error, (Cancelled, StreamCancelled, GeneratorExit)):
        return RPCFailure(grpc.StatusCode.CANCELLED, "request cancelled")
    if isinstance(error, (KVPushError, OSError, TimeoutError, asyncio.TimeoutError)):
        return RPCFailure(grpc.StatusCode.UNAVAILABLE,
                          f"KV stream to {request.kv_host}:{request.kv_port} broke: {error}")
    return RPCFailure(grpc.StatusCode.INTERNAL, f"prefill failed: {type(error).__name__}: {error}")


def _retrieved(future: asyncio.Future) -> None:
    if not future.cancelled():
        future.exception()


def _set_done(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_result(None)
