"""The gRPC ``Worker`` service of one worker: Info, Health, Prefill, Decode, Cancel, Stats, ProbeLink.

Every engine call runs on the worker's one engine thread (``EngineThread``);
the event loop only waits. ``Prefill`` (``prefill_rpc.py``) prefills here and
pushes the KV to a decode node; ``Decode`` (``decode_rpc.py``) reserves a
lease, receives that KV (or prefills locally) and streams the tokens. A
failure is confined to its own request: it aborts that RPC only.
``ProbeLink`` measures this worker's data-plane link to another worker's KV
port (``link_probe.py``) on a thread of its own, off the loop and the engine.

``active_requests`` counts a request until its engine cache has actually been
released, so a worker that reports zero holds nothing.
"""
from __future__ import annotations

import asyncio
import logging
import math
from collections.abc import AsyncIterator, Callable

import grpc
from grpc import aio

from proto import pdcluster_pb2 as pb
from proto import pdcluster_pb2_grpc as pb_grpc
from workers.engines.prefix_cache import PrefixCache
from workers.rpc.decode import DecodeRPC
from workers.rpc.drain import Drain
from workers.kv.probe import (
    DEFAULT_PINGS,
    DEFAULT_PROBE_BYTES,
    DEFAULT_PROBE_TIMEOUT_S,
    MAX_PINGS,
    MAX_PROBE_BYTES,
    MAX_PROBE_S,
    ProbeError,
    probe_link,
)
from workers.rpc.prefill import QUEUE_DEADLINE_S, PrefillRPC
from workers.rpc.state import RPCFailure, WorkerState

log = logging.getLogger(__name__)

DRAIN_TIMEOUT_S = 30.0  # pdc worker --drain-timeout default


class WorkerServicer(pb_grpc.WorkerServicer):
    """The control plane of one worker over one engine."""

    def __init__(self, state: WorkerState, model: pb.ModelInfo, profile: Callable[[], pb.NodeProfile], *,
                 queue_deadline_s: float = QUEUE_DEADLINE_S, drain: Drain | None = None) -> None:
        self.state = state
        self.drain = drain or Drain(state, profile().node_id, DRAIN_TIMEOUT_S)
        self.model = model
        self.profile = profile
        self._prefill = PrefillRPC(state, queue_deadline_s=queue_deadline_s)
        self._decode = DecodeRPC(state)

    async def Info(self, request: pb.InfoRequest, context: aio.ServicerContext) -> pb.InfoReply:
        return pb.InfoReply(node=self.profile(), model=self.model)

    async def Health(self, request: pb.HealthRequest, context: aio.ServicerContext) -> pb.HealthReply:
        leases = self.state.leases
        return pb.HealthReply(ok=True, active_requests=len(self.state.active), active_leases=leases.num_active,
                              reserved_kv_bytes=leases.reserved_bytes, draining=self.drain.draining)

    async def Drain(self, request: pb.DrainRequest, context: aio.ServicerContext) -> pb.DrainReply:
        if not math.isfinite(request.timeout_s) or request.timeout_s < 0:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"timeout_s must be >= 0, got {request.timeout_s}")
        if self.drain.shutting_down:
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION,
                                "this worker is shutting down (a signal's drain): it cannot be drained again or "
                                "undrained")
        if request.drain:
            self.drain.start("asked over the control plane", request.timeout_s)
        else:
            self.drain.stop()
        return pb.DrainReply(draining=self.drain.draining, active_requests=len(self.state.active))

    async def Stats(self, request: pb.StatsRequest, context: aio.ServicerContext) -> pb.StatsReply:
        c, leases = self.state.counters, self.state.leases
        return pb.StatsReply(
            requests_total=c.requests_total, requests_failed=c.requests_failed,
            requests_cancelled=c.requests_cancelled, kv_bytes_sent=c.kv_bytes_sent,
            kv_bytes_received=c.kv_bytes_received, leases_expired=leases.num_expired,
            active_requests=len(self.state.active), active_leases=leases.num_active,
            reserved_kv_bytes=leases.reserved_bytes, tokens_generated=c.tokens_generated,
            running_requests=self.state.loop.num_running, kv_cache_usage_perc=leases.usage,
            **_prefix_stats(self.state.prefix_cache),
        )

    async def Cancel(self, request: pb.CancelRequest, context: aio.ServicerContext) -> pb.CancelReply:
        found = self.state.find(request.request_id)
        for active in found:
            log.info("request %s: %s cancelled", active.request_id, active.kind)
            active.cancel()
        return pb.CancelReply(found=bool(found))

    async def Prefill(self, request: pb.PrefillRequest, context: aio.ServicerContext) -> pb.PrefillReply:
        return await self._prefill(request, context)

    async def Decode(self, request: pb.DecodeRequest, context: aio.ServicerContext) -> AsyncIterator[pb.DecodeEvent]:
        async for event in self._decode(request, context):
            yield event

    async def ProbeLink(self, request: pb.ProbeLinkRequest, context: aio.ServicerContext) -> pb.ProbeLinkReply:
        """Probe the link to ``kv_host:kv_port``; zero fields take the defaults,
        larger ones are capped. The probe's thread ends by its own deadline
        even if this call is cancelled."""
        try:
            timeout = _check_probe(request)
            measured = await asyncio.to_thread(
                probe_link, request.kv_host, request.kv_port, self.state.key,
                payload_bytes=min(request.payload_bytes or DEFAULT_PROBE_BYTES, MAX_PROBE_BYTES),
                pings=min(request.pings or DEFAULT_PINGS, MAX_PINGS), timeout=timeout)
            log.info("link to %s:%d: %.3f Gbit/s, %.3f ms one way", request.kv_host, request.kv_port,
                     measured.gbps, measured.latency_s * 1e3)
            return pb.ProbeLinkReply(gbps=measured.gbps, latency_s=measured.latency_s,
                                     payload_bytes=measured.payload_bytes, payload_s=measured.payload_s)
        except RPCFailure as e:
            await context.abort(e.code, e.message)
        except ProbeError as e:
            log.warning("%s", e)
            await context.abort(grpc.StatusCode.UNAVAILABLE, str(e))


def _prefix_stats(cache: PrefixCache | None) -> dict:
    """The prefix cache's ``StatsReply`` fields (none without a cache)."""
    if cache is None:
        return {}
    return {"prefix_blocks": cache.held_blocks(), "prefix_block_tokens": cache.block_tokens,
            "prefix_cache_bytes": cache.nbytes, "prefix_cache_capacity_bytes": cache.capacity_bytes,
            "prefix_hits": cache.hits, "prefix_hit_tokens": cache.hit_tokens}


def _check_probe(request: pb.ProbeLinkRequest) -> float:
    """The probe's deadline in seconds (default if 0, capped); INVALID_ARGUMENT
    for a request without a target or with a negative timeout."""
    if not request.kv_host or not 0 < request.kv_port < 65536:
        raise RPCFailure(grpc.StatusCode.INVALID_ARGUMENT, "ProbeLink needs kv_host and a kv_port in 1..65535, "
                         f"got {request.kv_host!r}:{request.kv_port}")
    if not math.isfinite(request.timeout_s) or request.timeout_s < 0:
        raise RPCFailure(grpc.StatusCode.INVALID_ARGUMENT, f"timeout_s must be >= 0, got {request.timeout_s}")
    return min(request.timeout_s or DEFAULT_PROBE_TIMEOUT_S, MAX_PROBE_S)
