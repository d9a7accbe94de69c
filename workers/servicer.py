"""The gRPC ``Worker`` service: Info, Health, Prefill, Decode, Cancel, Stats.

NOTE on a request's life on a worker. Every engine call runs on the worker's
one engine thread (``EngineThread``); the event loop only waits.

* Decode, disaggregated: reserve the request's KV bytes under a lease and yield
  ``reserved`` at once (KV address and a one-time transfer token). The KV
  listener thread receives the transfer into the lease; the stream waits for
  it until the lease runs out, then loads the slices into the engine and
  yields one ``token`` per generated token (index 0 is the first token, sampled
  by the prefill node and carried by the ``end`` frame) and ``done``.
* Decode, colocated (``local_prefill``): the same lease, but the engine
  prefills here and nothing crosses the network.
* Prefill: connect to the decode node's KV port and pass the handshake, then
  prefill on the engine thread, handing each layer's slice to a ``KVPusher``
  that sends it while later layers compute; sample the first token, send
  ``end`` with it and the prefill timings, and reply once the last byte left.
  The prefill cache is dropped as soon as the transfer ends.

However a request ends (done, error, lease expiry, ``Cancel``, the client
going away), its lease is freed, any transfer into it is cut, and its engine
cache is released; ``active_requests`` counts a request until that release has
run. A failure is confined to its own request: it aborts that RPC only.
"""
from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import grpc
from grpc import aio

from cluster.auth import AuthError, ClusterKey
from proto import pdcluster_pb2 as pb
from proto import pdcluster_pb2_grpc as pb_grpc
from workers.dataplane import Arrival, KVPushError, KVPusher, open_kv_connection
from workers.engine import KVSlice, SamplingParams
from workers.engine_thread import EngineThread
from workers.kv_codec import FrameError, FrameTimeout
from workers.kv_transport import TransferAborted
from workers.leases import Lease, LeaseError, LeaseTable
from workers.model_config import ModelSpec
from workers.sampling import sample

log = logging.getLogger(__name__)

CODECS = ("", "raw")


class RPCFailure(Exception):
    """Ends one RPC with ``code`` and ``message``."""

    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


class _Cancelled(Exception):
    """Raised on the engine thread when a request is cancelled mid-compute."""


@dataclass(frozen=True)
class ServiceSettings:
    """What the servicer needs from the worker's config."""

    can_prefill: bool
    can_decode: bool
    kv_host: str  # advertised in ``reserved``
    kv_port: int
    chunk_size: int
    lease_s: float
    connect_timeout_s: float
    send_timeout_s: float
    threaded_send: bool
    max_queued_bytes: int


@dataclass
class Counters:
    """Monotonic counters behind ``Stats``; updated on the event loop only."""

    requests_total: int = 0
    requests_failed: int = 0
    requests_cancelled: int = 0
    kv_bytes_sent: int = 0
    kv_bytes_received: int = 0
    tokens_generated: int = 0


@dataclass(eq=False)
class ActiveRequest:
    """One Prefill or Decode in progress on this worker."""

    request_id: str
    kind: str  # "prefill" | "decode"
    cancelled: threading.Event = field(default_factory=threading.Event)  # polled on the engine thread
    lease: Lease | None = None
    tokens: Iterator[int] | None = None  # the engine's decode iterator, once started
    pusher: KVPusher | None = None  # a prefill's KV stream, once connected

    @property
    def cache_key(self) -> str:
        """The engine cache key: prefill and decode of one request may share a worker."""
        return f"{self.request_id}#{self.kind}"

    def cancel(self) -> None:
        self.cancelled.set()
        if self.pusher is not None:
            self.pusher.close()  # unblocks an engine thread waiting on a stalled stream
        if self.lease is not None and self.lease.token is not None and not self.lease.kv.done():
            self.lease.kv.set_exception(RPCFailure(grpc.StatusCode.CANCELLED, "request cancelled"))


class WorkerServicer(pb_grpc.WorkerServicer):
    """The control plane of one worker over one engine."""

    def __init__(self, settings: ServiceSettings, engines: EngineThread, leases: LeaseTable,
                 spec: ModelSpec, model: pb.ModelInfo, profile: Callable[[], pb.NodeProfile],
                 key: ClusterKey) -> None:
        self.settings = settings
        self.engines = engines
        self.leases = leases
        self.spec = spec
        self.model = model
        self.profile = profile
        self.key = key
        self.counters = Counters()
        self._active: dict[tuple[str, str], ActiveRequest] = {}

    # ---------------------------------------------------------------- small RPCs

    async def Info(self, request: pb.InfoRequest, context: aio.ServicerContext) -> pb.InfoReply:
        return pb.InfoReply(node=self.profile(), model=self.model)

    async def Health(self, request: pb.HealthRequest, context: aio.ServicerContext) -> pb.HealthReply:
        return pb.HealthReply(ok=True, active_requests=len(self._active),
                              active_leases=self.leases.num_active, reserved_kv_bytes=self.leases.reserved_bytes)

    async def Stats(self, request: pb.StatsRequest, context: aio.ServicerContext) -> pb.StatsReply:
        c = self.counters
        return pb.StatsReply(
            requests_total=c.requests_total, requests_failed=c.requests_failed,
            requests_cancelled=c.requests_cancelled, kv_bytes_sent=c.kv_bytes_sent,
            kv_bytes_received=c.kv_bytes_received, leases_expired=self.leases.num_expired,
            active_requests=len(self._active), active_leases=self.leases.num_active,
            reserved_kv_bytes=self.leases.reserved_bytes, tokens_generated=c.tokens_generated,
        )

    async def Cancel(self, request: pb.CancelRequest, context: aio.ServicerContext) -> pb.CancelReply:
        found = [a for (rid, _), a in self._active.items() if rid == request.request_id]
        for active in found:
            log.info("request %s: %s cancelled", active.request_id, active.kind)
            active.cancel()
        return pb.CancelReply(found=bool(found))

    # ---------------------------------------------------------------- Decode

    async def Decode(self, request: pb.DecodeRequest, context: aio.ServicerContext) -> AsyncIterator[pb.DecodeEvent]:
        arrival = time.monotonic()
        self.counters.requests_total += 1
        active: ActiveRequest | None = None
        try:
            params, prompt = self._check_decode(request)
            active = self._open(request.request_id, "decode")
            lease_s = request.lease_s or self.settings.lease_s
            layout = self.engines.engine.kv_layout(len(prompt))
            active.lease = self._reserve(request.request_id, layout, lease_s, remote=not request.local_prefill)
            if request.local_prefill:
                first, timings = await self._prefill_here(active, prompt, params, arrival)
            else:
                lease = active.lease
                yield pb.DecodeEvent(reserved=pb.Reserved(
                    kv_host=self.settings.kv_host, kv_port=self.settings.kv_port,
                    transfer_token=lease.token, reserved_kv_bytes=lease.reserved_bytes,
                ))
                arrived = await self._await_kv(lease, lease_s)
                first, timings = await self._load(active, arrived)
            timings.prompt_tokens = len(prompt)
            async for event in self._generate(active, first, params, timings):
                yield event
        except RPCFailure as e:
            self._count_failure(e.code)
            log.info("request %s: decode ended %s: %s", request.request_id, e.code.name, e.message)
            await context.abort(e.code, e.message)
        except asyncio.CancelledError:  # the client went away or its deadline passed
            self.counters.requests_cancelled += 1
            raise
        except Exception as e:
            self.counters.requests_failed += 1
            log.exception("request %s: decode failed", request.request_id)
            await context.abort(grpc.StatusCode.INTERNAL, f"decode failed: {type(e).__name__}: {e}")
        finally:
            if active is not None:
                self._close(active)

    def _check_decode(self, request: pb.DecodeRequest) -> tuple[SamplingParams, list[int]]:
        if not self.settings.can_decode:
            raise RPCFailure(grpc.StatusCode.FAILED_PRECONDITION, "this worker does not have the decode role")
        if request.codec not in CODECS:
            raise RPCFailure(grpc.StatusCode.INVALID_ARGUMENT, f"unsupported KV codec {request.codec!r}")
        if request.lease_s < 0:
            raise RPCFailure(grpc.StatusCode.INVALID_ARGUMENT, f"lease_s must be >= 0, got {request.lease_s}")
        prompt = self._check_prompt(request.request_id, request.prompt_token_ids)
        params = _sampling(request.sampling)
        limit = self.spec.max_position_embeddings
        if len(prompt) + params.max_tokens > limit:
            raise RPCFailure(grpc.StatusCode.INVALID_ARGUMENT,
                             f"prompt ({len(prompt)} tokens) plus max_tokens ({params.max_tokens}) exceeds "
                             f"the model's context of {limit} tokens")
        return params, prompt

    def _reserve(self, rid: str, layout: Any, lease_s: float, *, remote: bool) -> Lease:
        try:
            return self.leases.reserve(rid, layout, lease_s, remote=remote)
        except LeaseError as e:
            code = grpc.StatusCode.ALREADY_EXISTS if e.reason == "exists" else grpc.StatusCode.RESOURCE_EXHAUSTED
            raise RPCFailure(code, str(e)) from None

    async def _prefill_here(self, active: ActiveRequest, prompt: list[int], params: SamplingParams,
                            arrival: float) -> tuple[int, pb.Timings]:
        """Colocated: prefill on this engine, keep the cache, no transfer."""
        def job() -> tuple[int, float, float]:
            started = time.monotonic()
            self.engines.held.add(active.cache_key)
            result = self.engines.engine.prefill(active.cache_key, prompt, _cancellable(active, None),
                                                 self.settings.chunk_size)
            return sample(result.logits, params, 0), started - arrival, result.compute_s

        try:
            first, queue_s, prefill_s = await self.engines.run(job)
        except _Cancelled:
            raise RPCFailure(grpc.StatusCode.CANCELLED, "request cancelled") from None
        if active.lease is not None:
            active.lease.state = "loaded"
        return first, pb.Timings(queue_s=queue_s, prefill_s=prefill_s)

    async def _await_kv(self, lease: Lease, lease_s: float) -> Arrival:
        """The transfer into ``lease``, or an RPCFailure saying why there is none."""
        rid = lease.request_id
        try:
            return await asyncio.wait_for(asyncio.shield(lease.kv), timeout=max(lease.remaining(), 0.0))
        except (TimeoutError, FrameTimeout):
            self.leases.free(lease, expired=True)
            log.warning("request %s: lease expired after %.1fs without a complete KV transfer", rid, lease_s)
            raise RPCFailure(grpc.StatusCode.DEADLINE_EXCEEDED,
                             f"lease for request {rid!r} expired: the KV did not arrive within {lease_s:g}s "
                             "(prefill node never connected, stalled or is too slow); reservation freed") from None
        except TransferAborted as e:
            raise RPCFailure(grpc.StatusCode.ABORTED, f"the prefill node aborted the KV transfer: {e.reason}") from None
        except FrameError as e:
            raise RPCFailure(grpc.StatusCode.DATA_LOSS, f"KV transfer for request {rid!r} failed: {e}") from None
        except (OSError, AuthError) as e:
            raise RPCFailure(grpc.StatusCode.UNAVAILABLE, f"KV transfer for request {rid!r} failed: {e}") from None

    async def _load(self, active: ActiveRequest, arrived: Arrival) -> tuple[int, pb.Timings]:
        """Load a received transfer into the engine; the first token and timings so far."""
        kv = arrived.kv
        self.counters.kv_bytes_received += kv.bytes_received
        waited = time.monotonic()

        def job() -> float:
            self.engines.held.add(active.cache_key)
            started = time.monotonic()
            self.engines.engine.load_kv(active.cache_key, kv.layout, kv.slices)
            return started - waited

        try:
            load_queue_s = await self.engines.run(job)
        except ValueError as e:  # the KV does not fit this engine's model
            raise RPCFailure(grpc.StatusCode.FAILED_PRECONDITION, f"cannot load the received KV: {e}") from None
        meta = kv.meta or {}
        prefill_end = _number(meta.get("prefill_end_wall"))
        exposed = 0.0
        if arrived.last_byte_wall is not None and prefill_end is not None:
            exposed = max(0.0, arrived.last_byte_wall - prefill_end)
        timings = pb.Timings(
            queue_s=(_number(meta.get("queue_s")) or 0.0) + load_queue_s,
            prefill_s=_number(meta.get("prefill_s")) or 0.0,
            kv_bytes=kv.bytes_received,
            transfer_s=(kv.last_byte_at - kv.first_byte_at) if kv.last_byte_at is not None else 0.0,
            exposed_transfer_s=exposed,
        )
        return kv.first_token, timings

    async def _generate(self, active: ActiveRequest, first: int, params: SamplingParams,
                        timings: pb.Timings) -> AsyncIterator[pb.DecodeEvent]:
        """``token`` events from ``first`` on, then ``done``."""
        started = time.monotonic()
        tokens = [first]
        self.counters.tokens_generated += 1
        yield pb.DecodeEvent(token=pb.Token(token_id=first, index=0))
        if params.max_tokens > 1 and first not in params.stop_token_ids:
            engine = self.engines.engine
            active.tokens = await self.engines.run(engine.decode, active.cache_key, first, params)
            for index in range(1, params.max_tokens):
                if active.cancelled.is_set():
                    raise RPCFailure(grpc.StatusCode.CANCELLED, "request cancelled")
                token = await self.engines.run(next, active.tokens, None)
                if token is None:
                    break
                tokens.append(token)
                self.counters.tokens_generated += 1
                yield pb.DecodeEvent(token=pb.Token(token_id=token, index=index))
        timings.decode_s = time.monotonic() - started
        timings.completion_tokens = len(tokens)
        reason = "stop" if tokens[-1] in params.stop_token_ids else "length"
        yield pb.DecodeEvent(done=pb.Done(finish_reason=reason, timings=timings))

    # ---------------------------------------------------------------- Prefill

    async def Prefill(self, request: pb.PrefillRequest, context: aio.ServicerContext) -> pb.PrefillReply:
        arrival = time.monotonic()
        self.counters.requests_total += 1
        active: ActiveRequest | None = None
        pusher: KVPusher | None = None
        job = None
        try:
            prompt, params, chunk_size = self._check_prefill(request)
            active = self._open(request.request_id, "prefill")
            sock = await self._connect(request)
            pusher = active.pusher = KVPusher(
                sock, threaded=self.settings.threaded_send, max_queued_bytes=self.settings.max_queued_bytes,
                timeout=self.settings.send_timeout_s)
            job = self.engines.submit(self._prefill_job, active, prompt, params, chunk_size, pusher, arrival)
            first, queue_s, prefill_s = await asyncio.wrap_future(job)
            await asyncio.wait_for(asyncio.wrap_future(pusher.done), timeout=self.settings.send_timeout_s)
            self.counters.kv_bytes_sent += pusher.bytes_sent
            send_s = (pusher.last_byte_at or 0.0) - (pusher.first_byte_at or 0.0)
            return pb.PrefillReply(first_token=first, queue_s=queue_s, prefill_s=prefill_s,
                                   kv_bytes=pusher.bytes_sent, send_s=send_s)
        except asyncio.CancelledError:
            self.counters.requests_cancelled += 1
            raise
        except Exception as e:
            cancelled = active is not None and active.cancelled.is_set()
            failure = _prefill_failure(e, request, cancelled)
            self._count_failure(failure.code)
            if failure.code == grpc.StatusCode.INTERNAL:
                log.exception("request %s: prefill failed", request.request_id)
            await context.abort(failure.code, failure.message)
        finally:
            if pusher is not None:
                pusher.close()
                with contextlib.suppress(OSError):
                    pusher.sock.close()
            if active is not None:
                active.cancelled.set()  # a job still running stops at its next slice
                self._retire(active, job)

    def _check_prefill(self, request: pb.PrefillRequest) -> tuple[list[int], SamplingParams, int]:
        if not self.settings.can_prefill:
            raise RPCFailure(grpc.StatusCode.FAILED_PRECONDITION, "this worker does not have the prefill role")
        if request.codec not in CODECS:
            raise RPCFailure(grpc.StatusCode.INVALID_ARGUMENT, f"unsupported KV codec {request.codec!r}")
        if not request.kv_host or not 0 < request.kv_port < 65536 or not request.transfer_token:
            raise RPCFailure(grpc.StatusCode.INVALID_ARGUMENT,
                             "kv_host, kv_port and transfer_token (from the decode node's reserved event) are required")
        prompt = self._check_prompt(request.request_id, request.prompt_token_ids)
        return prompt, _sampling(request.sampling), request.chunk_size or self.settings.chunk_size

    async def _connect(self, request: pb.PrefillRequest) -> Any:
        """A KV connection to the decode node that passed the handshake."""
        loop = asyncio.get_running_loop()
        opening = loop.run_in_executor(
            None, lambda: open_kv_connection(request.kv_host, request.kv_port, self.key, request.transfer_token,
                                             timeout=self.settings.connect_timeout_s))
        try:
            return await opening
        except asyncio.CancelledError:
            opening.add_done_callback(lambda f: None if f.cancelled() or f.exception() else f.result().close())
            raise
        except AuthError as e:
            raise RPCFailure(grpc.StatusCode.UNAUTHENTICATED,
                             f"decode node {request.kv_host}:{request.kv_port} refused the KV connection: {e}") from None
        except OSError as e:
            raise RPCFailure(grpc.StatusCode.UNAVAILABLE,
                             f"cannot reach decode node KV port {request.kv_host}:{request.kv_port}: {e}") from None

    def _prefill_job(self, active: ActiveRequest, prompt: list[int], params: SamplingParams, chunk_size: int,
                     pusher: KVPusher, arrival: float) -> tuple[int, float, float]:
        """On the engine thread: prefill, streaming each slice as it is computed."""
        started = time.monotonic()
        engine = self.engines.engine
        self.engines.held.add(active.cache_key)
        try:
            pusher.begin(active.request_id, engine.kv_layout(len(prompt)))
            result = engine.prefill(active.cache_key, prompt, _cancellable(active, pusher.send_slice), chunk_size)
            first = sample(result.logits, params, 0)
            pusher.end(first, {"prefill_s": result.compute_s, "prefill_end_wall": time.time(),
                               "queue_s": started - arrival})
            return first, started - arrival, result.compute_s
        except BaseException as e:
            pusher.abort(f"prefill failed on the prefill node: {type(e).__name__}: {e}")
            raise
        finally:
            engine.release(active.cache_key)
            self.engines.held.discard(active.cache_key)

    # ---------------------------------------------------------------- bookkeeping

    def _check_prompt(self, rid: str, token_ids: Any) -> list[int]:
        if not rid:
            raise RPCFailure(grpc.StatusCode.INVALID_ARGUMENT, "request_id is required")
        prompt = list(token_ids)
        if not prompt:
            raise RPCFailure(grpc.StatusCode.INVALID_ARGUMENT, "prompt_token_ids is empty")
        bad = next((t for t in prompt if t >= self.spec.vocab_size), None)
        if bad is not None:
            raise RPCFailure(grpc.StatusCode.INVALID_ARGUMENT,
                             f"token id {bad} is outside the model's vocabulary of {self.spec.vocab_size}")
        return prompt

    def _open(self, rid: str, kind: str) -> ActiveRequest:
        if (rid, kind) in self._active:
            raise RPCFailure(grpc.StatusCode.ALREADY_EXISTS, f"request {rid!r} already has a {kind} on this worker")
        active = ActiveRequest(rid, kind)
        self._active[(rid, kind)] = active
        return active

    def _close(self, active: ActiveRequest) -> None:
        """End a Decode: free its lease now, its engine state on the engine thread."""
        active.cancelled.set()
        if active.lease is not None:
            self.leases.free(active.lease)
        tokens = active.tokens
        try:
            if tokens is not None:
                self.engines.submit(_close_iterator, tokens)
            released = self.engines.release(active.cache_key)
        except RuntimeError:  # engine thread already shut down
            released = None
        self._retire(active, released)

    def _retire(self, active: ActiveRequest, after: Any) -> None:
        """Forget ``active`` once ``after`` (an engine-thread future) is done."""
        def forget() -> None:
            if self._active.get((active.request_id, active.kind)) is active:
                del self._active[(active.request_id, active.kind)]

        if after is None or after.done():
            forget()
            return
        loop = asyncio.get_running_loop()

        def on_done(_: Any) -> None:
            with contextlib.suppress(RuntimeError):  # loop closed at shutdown
                loop.call_soon_threadsafe(forget)

        after.add_done_callback(on_done)

    def _count_failure(self, code: grpc.StatusCode) -> None:
        if code == grpc.StatusCode.CANCELLED:
            self.counters.requests_cancelled += 1
        else:
            self.counters.requests_failed += 1


def _sampling(params: pb.SamplingParams) -> SamplingParams:
    """Proto sampling -> engine sampling; proto's unset ``top_p`` (0) means 1."""
    try:
        return SamplingParams(
            max_tokens=params.max_tokens, temperature=params.temperature, top_p=params.top_p or 1.0,
            top_k=params.top_k, seed=params.seed if params.HasField("seed") else None,
            stop_token_ids=tuple(params.stop_token_ids),
        )
    except ValueError as e:
        raise RPCFailure(grpc.StatusCode.INVALID_ARGUMENT, f"sampling: {e}") from None


def _cancellable(active: ActiveRequest, sink: Callable[[KVSlice], None] | None) -> Callable[[KVSlice], None]:
    """A slice sink that stops the engine (by raising) once ``active`` is cancelled."""
    def on_slice(kv_slice: KVSlice) -> None:
        if active.cancelled.is_set():
            raise _Cancelled(active.request_id)
        if sink is not None:
            sink(kv_slice)

    return on_slice


def _prefill_failure(error: BaseException, request: pb.PrefillRequest, cancelled: bool) -> RPCFailure:
    if isinstance(error, RPCFailure):
        return error
    if cancelled or isinstance(error, _Cancelled):
        return RPCFailure(grpc.StatusCode.CANCELLED, "request cancelled")
    if isinstance(error, (KVPushError, OSError, TimeoutError)):
        return RPCFailure(grpc.StatusCode.UNAVAILABLE,
                          f"KV stream to {request.kv_host}:{request.kv_port} broke: {error}")
    return RPCFailure(grpc.StatusCode.INTERNAL, f"prefill failed: {type(error).__name__}: {error}")


def _close_iterator(tokens: Iterator[int]) -> None:
    close = getattr(tokens, "close", None)
    if close is not None:
        close()


def _number(value: object) -> float | None:
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None
