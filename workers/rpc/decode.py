"""The ``Decode`` RPC: reserve, receive (or prefill here), decode, stream tokens.

Disaggregated: reserve the request's KV bytes under a lease and yield
``reserved`` at once (KV address and a one-time transfer token). The KV
listener receives the transfer into the lease on its own thread; this stream
waits for it until the lease runs out, loads the slices into the engine, and
yields one ``token`` per generated token (index 0 is the first token, sampled
by the prefill node and carried by the ``end`` frame), then ``done``.
Colocated (``local_prefill``): the same lease, but the engine prefills here.

Continuing a stream (``first_step`` > 0, colocated only): the scheduler moved
a request here after ``first_step`` tokens were already sent; the prompt ends
with them. The first token sampled here uses sampling step ``first_step``,
the next ``first_step + 1``, ...: sampling depends only on (seed, step), so a
seeded or greedy stream continues token for token as if never interrupted.

However the stream ends (done, error, lease expiry, ``Cancel``, the client
going away), ``_close`` frees the lease, cuts any transfer into it and
releases the engine cache on the engine thread.
"""
from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import AsyncIterator, Callable, Iterator

import grpc
import numpy as np
from grpc import aio

from cluster.auth import AuthError
from proto import pdcluster_pb2 as pb
from workers.kv.listener import Arrival
from workers.engines.base import Engine, KVLayout
from workers.kv.codec import FrameError, FrameTimeout
from workers.kv.transport import TransferAborted
from workers.kv.leases import Lease, LeaseError
from workers.engines.sampling import SamplingParams, sample
from workers.rpc.state import (
    ActiveRequest,
    Cancelled,
    RPCFailure,
    WorkerState,
    cancellable,
    sampling_from_proto,
)

log = logging.getLogger(__name__)


class DecodeRPC:
    """Serves ``Decode`` streams over one worker's state."""

    def __init__(self, state: WorkerState) -> None:
        self.state = state

    async def __call__(self, request: pb.DecodeRequest, context: aio.ServicerContext) -> AsyncIterator[pb.DecodeEvent]:
        state = self.state
        arrival = time.monotonic()
        state.counters.requests_total += 1
        active: ActiveRequest | None = None
        try:
            params, prompt = self._check(request)
            active = state.open(request.request_id, "decode")
            lease_s = request.lease_s or state.settings.lease_s
            layout = state.engines.engine.kv_layout(len(prompt))
            active.lease = self._reserve(request.request_id, layout, lease_s, remote=not request.local_prefill)
            if request.local_prefill:
                first, timings = await self._prefill_here(active, prompt, params, arrival, request.first_step)
            else:
                yield pb.DecodeEvent(reserved=pb.Reserved(
                    kv_host=state.settings.kv_host, kv_port=state.settings.kv_port,
                    transfer_token=active.lease.token, reserved_kv_bytes=active.lease.reserved_bytes,
                ))
                first, timings = await self._load(active, await self._await_kv(active.lease))
            timings.prompt_tokens = len(prompt)
            async for event in self._generate(active, first, params, timings, request.first_step):
                yield event
        except RPCFailure as e:
            state.count_failure(e.code)
            log.info("request %s: decode ended %s: %s", request.request_id, e.code.name, e.message)
            await context.abort(e.code, e.message)
        except (asyncio.CancelledError, GeneratorExit):
            # The client went away or its deadline passed: CancelledError when it
            # happened while we awaited, GeneratorExit when grpc closed this
            # stream while it waited at a yield (common once decode is fast).
            state.counters.requests_cancelled += 1
            raise
        except Exception as e:
            state.counters.requests_failed += 1
            log.exception("request %s: decode failed", request.request_id)
            await context.abort(grpc.StatusCode.INTERNAL, f"decode failed: {type(e).__name__}: {e}")
        finally:
            if active is not None:
                self._close(active)

    def _check(self, request: pb.DecodeRequest) -> tuple[SamplingParams, list[int]]:
        state = self.state
        if not state.settings.can_decode:
            raise RPCFailure(grpc.StatusCode.FAILED_PRECONDITION, "this worker does not have the decode role")
        state.check_codec(request.codec)
        if request.lease_s < 0:
            raise RPCFailure(grpc.StatusCode.INVALID_ARGUMENT, f"lease_s must be >= 0, got {request.lease_s}")
        prompt = state.check_prompt(request.request_id, request.prompt_token_ids)
        params = sampling_from_proto(request.sampling)
        if request.first_step and not request.local_prefill:
            # a prefill node samples its first token at step 0: only this node can start at first_step
            raise RPCFailure(grpc.StatusCode.INVALID_ARGUMENT, "first_step > 0 needs local_prefill")
        limit = state.spec.max_position_embeddings
        if len(prompt) + params.max_tokens > limit:
            raise RPCFailure(grpc.StatusCode.INVALID_ARGUMENT,
                             f"prompt ({len(prompt)} tokens) plus max_tokens ({params.max_tokens}) exceeds "
                             f"the model's context of {limit} tokens")
        return params, prompt

    def _reserve(self, rid: str, layout: KVLayout, lease_s: float, *, remote: bool) -> Lease:
        try:
            return self.state.leases.reserve(rid, layout, lease_s, remote=remote)
        except LeaseError as e:
            code = grpc.StatusCode.ALREADY_EXISTS if e.reason == "exists" else grpc.StatusCode.RESOURCE_EXHAUSTED
            raise RPCFailure(code, str(e)) from None

    async def _prefill_here(self, active: ActiveRequest, prompt: list[int], params: SamplingParams,
                            arrival: float, first_step: int = 0) -> tuple[int, pb.Timings]:
        """Colocated: prefill on this engine and keep the cache; nothing is sent.
        The first token is sampled at step ``first_step``."""
        engines = self.state.engines

        def job() -> tuple[int, float, float]:
            started = time.monotonic()
            result = engines.engine.prefill(active.cache_key, prompt, cancellable(active, None),
                                            self.state.settings.chunk_size)
            return sample(result.logits, params, first_step), started - arrival, result.compute_s

        try:
            first, queue_s, prefill_s = await engines.run(job)
        except Cancelled:
            raise RPCFailure(grpc.StatusCode.CANCELLED, "request cancelled") from None
        return first, pb.Timings(queue_s=queue_s, prefill_s=prefill_s)

    async def _await_kv(self, lease: Lease) -> Arrival:
        """The transfer into ``lease``, or an RPCFailure saying why there is none.

        The lease table decides when the lease expires (no sender within
        ``lease_s``, a transfer silent for ``lease_s``, or one past
        ``max_transfer_s``); this waits until then, asks it, and waits on if
        bytes arrived meanwhile. Expiry frees the lease, which cuts the transfer."""
        rid, leases = lease.request_id, self.state.leases
        try:
            while True:
                try:
                    return await asyncio.wait_for(asyncio.shield(lease.kv), timeout=_timeout(leases.remaining(lease)))
                except asyncio.TimeoutError:  # TimeoutError itself from Python 3.11
                    if lease.kv.done():  # resolved as the wait ended: take it
                        continue
                    why = leases.expire_if_due(lease)
                    if why is not None:
                        raise _expiry(rid, why) from None
        except FrameTimeout as e:  # the receiver's cap (max_transfer_s) ran out before the lease noticed
            leases.free(lease, expired=True)
            raise _expiry(rid, f"the KV transfer did not complete in time ({e})") from None
        except TransferAborted as e:
            raise RPCFailure(grpc.StatusCode.ABORTED, f"the prefill node aborted the KV transfer: {e.reason}") from None
        except FrameError as e:
            raise RPCFailure(grpc.StatusCode.DATA_LOSS, f"KV transfer for request {rid!r} failed: {e}") from None
        except (OSError, AuthError) as e:
            raise RPCFailure(grpc.StatusCode.UNAVAILABLE, f"KV transfer for request {rid!r} failed: {e}") from None

    async def _load(self, active: ActiveRequest, arrived: Arrival) -> tuple[int, pb.Timings]:
        """Load a received transfer into the engine; the first token and timings so far."""
        kv, engines = arrived.kv, self.state.engines
        self.state.counters.kv_bytes_received += kv.bytes_received
        waited = time.monotonic()

        def job() -> float:
            started = time.monotonic()
            engines.engine.load_kv(active.cache_key, kv.layout, kv.slices)
            return started - waited

        try:
            load_queue_s = await engines.run(job)
        except ValueError as e:  # the KV does not fit this engine's model
            raise RPCFailure(grpc.StatusCode.FAILED_PRECONDITION, f"cannot load the received KV: {e}") from None
        meta = kv.meta or {}
        prefill_end = _number(meta.get("prefill_end_wall"))
        exposed = 0.0
        if arrived.last_byte_wall is not None and prefill_end is not None:
            exposed = max(0.0, arrived.last_byte_wall - prefill_end)  # wall clocks of two nodes: NTP-accurate
        timings = pb.Timings(
            queue_s=(_number(meta.get("queue_s")) or 0.0) + load_queue_s,
            prefill_s=_number(meta.get("prefill_s")) or 0.0,
            kv_bytes=kv.bytes_received,
            transfer_s=(kv.last_byte_at - kv.first_byte_at) if kv.last_byte_at is not None else 0.0,
            exposed_transfer_s=exposed,
        )
        return kv.first_token, timings

    async def _generate(self, active: ActiveRequest, first: int, params: SamplingParams,
                        timings: pb.Timings, first_step: int = 0) -> AsyncIterator[pb.DecodeEvent]:
        """``token`` events from ``first`` on (one engine step per event), then ``done``.
        ``first`` was sampled at step ``first_step``; the token at index i uses step ``first_step + i``."""
        engines, counters = self.state.engines, self.state.counters
        started = time.monotonic()
        tokens = [first]
        counters.tokens_generated += 1
        yield pb.DecodeEvent(token=pb.Token(token_id=first, index=0))
        if params.max_tokens > 1 and first not in params.stop_token_ids:
            active.tokens = await engines.run(_token_iterator, engines.engine, active.cache_key, first, params,
                                              first_step)
            for index in range(1, params.max_tokens):
                if active.cancelled.is_set():
                    raise RPCFailure(grpc.StatusCode.CANCELLED, "request cancelled")
                token = await engines.run(next, active.tokens, None)
                if token is None:
                    break
                tokens.append(token)
                counters.tokens_generated += 1
                yield pb.DecodeEvent(token=pb.Token(token_id=token, index=index))
        timings.decode_s = time.monotonic() - started
        timings.completion_tokens = len(tokens)
        reason = "stop" if tokens[-1] in params.stop_token_ids else "length"
        yield pb.DecodeEvent(done=pb.Done(finish_reason=reason, timings=timings))

    def _close(self, active: ActiveRequest) -> None:
        """Free the lease now, the engine state on the engine thread (after
        any job of this request still queued or running)."""
        state = self.state
        active.cancelled.set()
        if active.lease is not None:
            state.leases.free(active.lease)
        try:
            if active.tokens is not None:
                state.engines.submit(_close_iterator, active.tokens)
            released = state.engines.release(active.cache_key)
        except RuntimeError:  # engine thread already shut down
            released = None
        state.retire(active, released)


def _expiry(rid: str, why: str) -> RPCFailure:
    """The failure that ends a Decode whose lease expired (already freed)."""
    log.warning("request %s: lease expired: %s", rid, why)
    return RPCFailure(grpc.StatusCode.DEADLINE_EXCEEDED, f"lease for request {rid!r} expired: {why}; reservation freed")


def _timeout(remaining: float) -> float | None:
    """``asyncio.wait_for``'s timeout for ``remaining`` seconds (None: no deadline)."""
    return None if math.isinf(remaining) else max(remaining, 0.0)


def _token_iterator(engine: Engine, cache_key: str, first: int, params: SamplingParams,
                    first_step: int) -> Iterator[int]:
    """The tokens after ``first``: the engine's own ``decode`` when steps start at 0 or the
    request is greedy (argmax ignores the step), else ``decode_loop``'s exact steps shifted
    by ``first_step`` over the engine's ``step_logits`` (checked in ``_check``)."""
    if first_step == 0 or params.temperature == 0:
        return engine.decode(cache_key, first, params)
    step_logits = engine.step_logits  # type: ignore[attr-defined]  # both engines have it; _check made sure
    return _offset_steps(lambda token: step_logits(cache_key, token), first, params, first_step)


def _offset_steps(step: Callable[[int], np.ndarray], first: int, params: SamplingParams, first_step: int) -> Iterator[int]:
    """``workers.engines.base.decode_loop`` with sampling steps ``first_step + 1, ...``."""
    token = first
    for index in range(1, params.max_tokens):
        if token in params.stop_token_ids:
            return
        token = sample(step(token), params, first_step + index)
        yield token


def _close_iterator(tokens: object) -> None:
    close = getattr(tokens, "close", None)
    if close is not None:
        close()


def _number(value: object) -> float | None:
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None
