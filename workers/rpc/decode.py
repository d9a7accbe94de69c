"""The ``Decode`` RPC: reserve, receive (or prefill here), decode, stream tokens.

Disaggregated: reserve the request's KV bytes under a lease and yield
``reserved`` at once (KV address, a one-time transfer token, and how many
prompt tokens this node's prefix cache already holds: the prefill node sends
only the rest). The KV listener receives the transfer into the lease on its
own thread; this stream waits for it until the lease runs out, loads the
slices (after the cached prefix) into the engine, joins the step loop's batch
(``workers/rpc/loop.py``) and yields one ``token`` per generated token (index
0 is the first token, sampled by the prefill node and carried by the ``end``
frame), then ``done``, which lists the prefix blocks this node now holds for
the conversation (prompt plus generated tokens, kept in the prefix cache).
Colocated (``local_prefill``): the same lease, but the prompt is prefilled
here, as a step-loop prefill (one chunk per step), from the cached prefix on.

Continuing a stream (``first_step`` > 0, colocated only): the scheduler moved
a request here after ``first_step`` tokens were already sent; the prompt ends
with them. The first token sampled here uses sampling step ``first_step``,
the next ``first_step + 1``, ...: sampling depends only on (seed, step), so a
seeded or greedy stream continues token for token as if never interrupted.
The last ``first_step`` prompt tokens count as generated for the presence
and frequency penalties, and a grammar's matcher consumes them before it
masks the next token, so a penalized or constrained stream continues as it
would have too.

A grammar (``sampling.grammar``) masks every token drawn here, the first one
of a local prefill included; a received first token (drawn under the same
grammar by the prefill node) is consumed by this node's matcher first. Once
the grammar is complete only EOS may follow, a stop token of every
constrained request (``state.check_sampling``), so the stream ends "stop".

Logprobs (``sampling.logprobs``): each ``token`` event carries its token's
logprob and top alternatives; the first token's come with it from the
prefill node (the ``end`` frame's ``first_logprobs``) or from the local prefill.

However the stream ends (done, error, lease expiry, ``Cancel``, the client
going away), ``_close`` frees the lease, cuts any transfer into it, takes the
request out of the batch at the next step boundary and releases the engine
cache on the engine thread.
"""
from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import AsyncIterator, Generator

import grpc
from grpc import aio

from cluster.auth import AuthError
from proto import pdcluster_pb2 as pb
from workers.kv.listener import Arrival
from workers.engines.base import KVLayout, PrefillResult, is_last
from workers.engines.prefix_cache import PrefixHit
from workers.kv.codec import FrameError, FrameTimeout
from workers.kv.transport import TransferAborted
from workers.kv.leases import Lease, LeaseError
from workers.engines.sampling import SamplingParams, TokenLogprobs, TokenSampler
from workers.rpc.loop import LoopClosed, StreamCancelled
from workers.rpc.state import (
    ActiveRequest,
    Cancelled,
    RPCFailure,
    WorkerState,
    cancellable,
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
            hit = await state.prefix_lookup(prompt)
            cached = hit.num_tokens if hit is not None else 0
            engine = state.engines.engine
            # the lease holds the whole prompt's KV: the transfer's, plus the cached prefix's copy
            transfer = engine.kv_layout(len(prompt) - (0 if request.local_prefill else cached))
            extra = engine.kv_layout(len(prompt)).total_bytes - transfer.total_bytes
            active.lease = self._reserve(request.request_id, transfer, lease_s, remote=not request.local_prefill,
                                         extra_bytes=extra)
            if request.local_prefill:
                first, timings = await self._prefill_here(active, prompt, params, arrival, request.first_step, hit)
            else:
                yield pb.DecodeEvent(reserved=pb.Reserved(
                    kv_host=state.settings.kv_host, kv_port=state.settings.kv_port,
                    transfer_token=active.lease.token, reserved_kv_bytes=active.lease.reserved_bytes,
                    cached_tokens=cached,
                ))
                first, timings = await self._load(active, await self._await_kv(active.lease), hit,
                                                  request.codec or "raw")
            hit = None  # the engine holds its own copy now: do not keep this one while decoding
            timings.prompt_tokens = len(prompt)
            timings.decode_cached_tokens = cached
            async for event in self._generate(active, prompt, first, params, timings, request.first_step):
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
        params = state.check_sampling(request.sampling)
        if request.first_step and not request.local_prefill:
            # a prefill node samples its first token at step 0: only this node can start at first_step
            raise RPCFailure(grpc.StatusCode.INVALID_ARGUMENT, "first_step > 0 needs local_prefill")
        limit = state.spec.max_position_embeddings
        if len(prompt) + params.max_tokens > limit:
            raise RPCFailure(grpc.StatusCode.INVALID_ARGUMENT,
                             f"prompt ({len(prompt)} tokens) plus max_tokens ({params.max_tokens}) exceeds "
                             f"the model's context of {limit} tokens")
        return params, prompt

    def _reserve(self, rid: str, layout: KVLayout, lease_s: float, *, remote: bool, extra_bytes: int) -> Lease:
        leases, need = self.state.leases, layout.total_bytes + extra_bytes
        if leases.max_reserved_bytes is None or leases.reserved_bytes + need <= leases.max_reserved_bytes:
            # it will fit the budget: the prefix cache yields first (a refused request evicts nothing)
            self.state.fit_prefix_cache(reserving=need)
        try:
            return self.state.leases.reserve(rid, layout, lease_s, remote=remote, extra_bytes=extra_bytes)
        except LeaseError as e:
            code = grpc.StatusCode.ALREADY_EXISTS if e.reason == "exists" else grpc.StatusCode.RESOURCE_EXHAUSTED
            raise RPCFailure(code, str(e)) from None

    async def _prefill_here(self, active: ActiveRequest, prompt: list[int], params: SamplingParams,
                            arrival: float, first_step: int, hit: PrefixHit | None) -> tuple[_First, pb.Timings]:
        """Colocated: prefill on this engine, from the cached prefix on, as a
        step-loop prefill (decode steps of running requests go on between its
        chunks); the cache stays for decoding. The first token is sampled at
        step ``first_step``, the prompt's last ``first_step`` tokens counting as generated."""
        state = self.state
        started: list[float] = []

        def job() -> Generator[None, None, PrefillResult]:
            chunks = state.engines.engine.prefill_chunks(
                active.cache_key, prompt, cancellable(active, None), state.settings.chunk_size,
                prefix=hit.layers if hit is not None else None)
            for result in chunks:
                if result is not None:
                    return result
                yield
            raise RuntimeError("prefill_chunks ended without a result")

        try:
            active.prefill = state.loop.prefill(active.cache_key, job(), lambda: started.append(time.monotonic()))
            result = await asyncio.wrap_future(active.prefill.future)
        except (Cancelled, StreamCancelled, asyncio.CancelledError) as e:
            if isinstance(e, asyncio.CancelledError) and not active.cancelled.is_set():
                raise
            raise active.cancelled_failure from None
        except LoopClosed as e:
            raise RPCFailure(grpc.StatusCode.UNAVAILABLE, str(e)) from None
        queue_s = (started[0] if started else arrival) - arrival
        cached = hit.num_tokens if hit is not None else 0
        try:
            sampler = TokenSampler(params, first_step - 1, _generated(prompt, first_step),
                                   state.engines.engine.grammar_tokenizer)
        except ValueError as e:  # a continued stream whose sent tokens its grammar refuses
            raise RPCFailure(grpc.StatusCode.INVALID_ARGUMENT, f"sampling: {e}") from None
        return sampler.draw(result.logits), pb.Timings(queue_s=queue_s, prefill_s=result.compute_s,
                                                        cached_tokens=cached)

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

    async def _load(self, active: ActiveRequest, arrived: Arrival, hit: PrefixHit | None,
                    codec: str) -> tuple[_First, pb.Timings]:
        """Load a received transfer, sent in the request's ``codec``, into the
        engine after the cached prefix (``hit``); the first token (with its
        logprobs when the prefill node sent them) and timings so far."""
        kv, engines = arrived.kv, self.state.engines
        if kv.codec != codec:
            raise RPCFailure(grpc.StatusCode.FAILED_PRECONDITION,
                             f"the prefill node sent {kv.codec} KV, but this request's codec is {codec}")
        self.state.counters.kv_bytes_received += kv.bytes_received
        waited = time.monotonic()

        def job() -> float:
            started = time.monotonic()
            engines.engine.load_kv(active.cache_key, kv.layout, kv.slices,
                                   prefix=hit.layers if hit is not None else None)
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
            cached_tokens=int(_number(meta.get("cached_tokens")) or 0),
        )
        logprobs = None
        if "first_logprobs" in meta:
            try:
                logprobs = TokenLogprobs.from_json(meta["first_logprobs"])
            except ValueError as e:
                raise RPCFailure(grpc.StatusCode.DATA_LOSS, f"the prefill node's first-token logprobs: {e}") from None
        return (kv.first_token, logprobs), timings

    async def _generate(self, active: ActiveRequest, prompt: list[int], first_drawn: _First, params: SamplingParams,
                        timings: pb.Timings, first_step: int = 0) -> AsyncIterator[pb.DecodeEvent]:
        """``token`` events from the first token on, one per step of the batch
        this request joins, then ``done``. The first was sampled at step
        ``first_step``; the token at index i uses step ``first_step + i``."""
        state, counters = self.state, self.state.counters
        started = time.monotonic()
        first, first_logprobs = first_drawn
        tokens = [first]
        counters.tokens_generated += 1
        yield _token_event(first, 0, first_logprobs)
        if not is_last(first, 0, params):
            try:
                active.stream = state.loop.join(active.cache_key, first, params, first_step,
                                                history=_generated(prompt, first_step))
            except LoopClosed as e:
                raise RPCFailure(grpc.StatusCode.UNAVAILABLE, str(e)) from None
            if active.cancelled.is_set():  # cancelled while it loaded
                active.stream.cancel()
            try:
                async for token, logprobs in active.stream.draws():
                    tokens.append(token)
                    counters.tokens_generated += 1
                    yield _token_event(token, len(tokens) - 1, logprobs)
            except StreamCancelled:
                raise active.cancelled_failure from None
            except LoopClosed as e:
                raise RPCFailure(grpc.StatusCode.UNAVAILABLE, str(e)) from None
        timings.decode_s = time.monotonic() - started
        timings.completion_tokens = len(tokens)
        reason = "stop" if tokens[-1] in params.stop_token_ids else "length"
        releasing = active.lease.reserved_bytes if active.lease is not None else 0
        blocks = await state.engines.run(state.store_prefix, active.cache_key, prompt + tokens, releasing)
        yield pb.DecodeEvent(done=pb.Done(finish_reason=reason, timings=timings, prefix_blocks=blocks))

    def _close(self, active: ActiveRequest) -> None:
        """Free the lease now, the engine state on the engine thread (after
        any job of this request still queued or running)."""
        state = self.state
        active.cancelled.set()
        if active.lease is not None:
            state.leases.free(active.lease)
        if active.stream is not None:
            active.stream.cancel()  # leaves the batch at the next step boundary (a no-op once it ended)
        if active.prefill is not None:
            active.prefill.cancel()  # dropped if it has not started
        try:
            released = state.engines.release(active.cache_key)
        except RuntimeError:  # engine thread already shut down
            released = None
        state.retire(active, released)


_First = tuple[int, TokenLogprobs | None]  # the first token, with its logprobs when the request asks


def _generated(prompt: list[int], first_step: int) -> tuple[int, ...]:
    """The tokens a continued stream generated before this call: its prompt's last ``first_step``."""
    return tuple(prompt[len(prompt) - first_step:]) if first_step else ()


def _token_event(token: int, index: int, logprobs: TokenLogprobs | None) -> pb.DecodeEvent:
    """The ``token`` event for the ``index``-th token, with its logprobs when there are any."""
    event = pb.Token(token_id=token, index=index)
    if logprobs is not None:
        event.logprob = logprobs.logprob
        event.top_logprobs.extend(pb.TopLogprob(token_id=i, logprob=lp) for i, lp in logprobs.top)
    return pb.DecodeEvent(token=event)


def _expiry(rid: str, why: str) -> RPCFailure:
    """The failure that ends a Decode whose lease expired (already freed)."""
    log.warning("request %s: lease expired: %s", rid, why)
    return RPCFailure(grpc.StatusCode.DEADLINE_EXCEEDED, f"lease for request {rid!r} expired: {why}; reservation freed")


def _timeout(remaining: float) -> float | None:
    """``asyncio.wait_for``'s timeout for ``remaining`` seconds (None: no deadline)."""
    return None if math.isinf(remaining) else max(remaining, 0.0)


def _number(value: object) -> float | None:
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None
