"""The gRPC ``Worker`` service of one worker: Info, Health, Prefill, Decode, Cancel, Stats.

Every engine call runs on the worker's one engine thread (``EngineThread``);
the event loop only waits. ``Prefill`` (``prefill_rpc.py``) prefills here and
pushes the KV to a decode node; ``Decode`` (``decode_rpc.py``) reserves a
lease, receives that KV (or prefills locally) and streams the tokens. A
failure is confined to its own request: it aborts that RPC only.

``active_requests`` counts a request until its engine cache has actually been
released, so a worker that reports zero holds nothing.
"""
from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Callable

from grpc import aio

from proto import pdcluster_pb2 as pb
from proto import pdcluster_pb2_grpc as pb_grpc
from workers.decode_rpc import DecodeRPC
from workers.prefill_rpc import PrefillRPC
from workers.worker_state import WorkerState

log = logging.getLogger(__name__)


class WorkerServicer(pb_grpc.WorkerServicer):
    """The control plane of one worker over one engine."""

    def __init__(self, state: WorkerState, model: pb.ModelInfo, profile: Callable[[], pb.NodeProfile]) -> None:
        self.state = state
        self.model = model
        self.profile = profile
        self._prefill = PrefillRPC(state)
        self._decode = DecodeRPC(state)

    async def Info(self, request: pb.InfoRequest, context: aio.ServicerContext) -> pb.InfoReply:
        return pb.InfoReply(node=self.profile(), model=self.model)

    async def Health(self, request: pb.HealthRequest, context: aio.ServicerContext) -> pb.HealthReply:
        leases = self.state.leases
        return pb.HealthReply(ok=True, active_requests=len(self.state.active), active_leases=leases.num_active,
                              reserved_kv_bytes=leases.reserved_bytes)

    async def Stats(self, request: pb.StatsRequest, context: aio.ServicerContext) -> pb.StatsReply:
        c, leases = self.state.counters, self.state.leases
        return pb.StatsReply(
            requests_total=c.requests_total, requests_failed=c.requests_failed,
            requests_cancelled=c.requests_cancelled, kv_bytes_sent=c.kv_bytes_sent,
            kv_bytes_received=c.kv_bytes_received, leases_expired=leases.num_expired,
            active_requests=len(self.state.active), active_leases=leases.num_active,
            reserved_kv_bytes=leases.reserved_bytes, tokens_generated=c.tokens_generated,
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
