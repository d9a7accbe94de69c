"""A small asyncio client for one worker's control plane.

Every call is signed with the cluster key and carries a deadline. Servers and
clients share ``CHANNEL_OPTIONS``: ``Info`` replies carry a whole
``tokenizer.json`` (up to ~10 MB for large vocabularies), above gRPC's 4 MB
default.
"""
from __future__ import annotations

from types import TracebackType
from typing import TYPE_CHECKING

from grpc import aio

from cluster.auth import ClusterKey, auth_interceptors
from proto import pdcluster_pb2 as pb
from proto import pdcluster_pb2_grpc as pb_grpc

MAX_MESSAGE_BYTES = 64 << 20

CHANNEL_OPTIONS: list[tuple[str, int]] = [
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
    ("grpc.keepalive_time_ms", 30_000),
    ("grpc.keepalive_timeout_ms", 10_000),
    ("grpc.http2.min_ping_interval_without_data_ms", 10_000),
]

SERVER_OPTIONS: list[tuple[str, int]] = [
    *CHANNEL_OPTIONS,
    ("grpc.so_reuseport", 0),  # two workers must never share a port by accident
    ("grpc.keepalive_permit_without_calls", 1),
]

DEFAULT_TIMEOUT_S = 10.0

if TYPE_CHECKING:
    from cluster.node import NodeInfo


class WorkerClient:
    """``async with WorkerClient("host:port", key) as w: await w.health()``."""

    def __init__(self, address: str, key: ClusterKey, *, timeout: float = DEFAULT_TIMEOUT_S) -> None:
        self.address = address
        self.timeout = timeout
        self._channel = aio.insecure_channel(
            address, options=CHANNEL_OPTIONS, interceptors=auth_interceptors(key)
        )
        self._stub = pb_grpc.WorkerStub(self._channel)

    async def info(self, timeout: float | None = None) -> pb.InfoReply:
        """Model, tokenizer, chat template and node profile."""
        return await self._stub.Info(pb.InfoRequest(), timeout=timeout or self.timeout)

    async def health(self, timeout: float | None = None) -> pb.HealthReply:
        return await self._stub.Health(pb.HealthRequest(), timeout=timeout or self.timeout)

    async def drain(self, drain: bool, timeout_s: float = 0.0, timeout: float | None = None) -> pb.DrainReply:
        """Drain (``drain=True``; in-flight requests get ``timeout_s``, 0: the worker's own) or undrain."""
        return await self._stub.Drain(pb.DrainRequest(drain=drain, timeout_s=timeout_s),
                                      timeout=timeout or self.timeout)

    async def stats(self, timeout: float | None = None) -> pb.StatsReply:
        return await self._stub.Stats(pb.StatsRequest(), timeout=timeout or self.timeout)

    async def cancel(self, request_id: str, timeout: float | None = None) -> bool:
        """Cancel ``request_id`` on this worker; whether it was running here."""
        reply = await self._stub.Cancel(pb.CancelRequest(request_id=request_id), timeout=timeout or self.timeout)
        return reply.found

    async def prefill(self, request: pb.PrefillRequest, timeout: float) -> pb.PrefillReply:
        """Prefill and push the KV; returns once the last byte left."""
        return await self._stub.Prefill(request, timeout=timeout)

    def decode(self, request: pb.DecodeRequest, timeout: float) -> aio.UnaryStreamCall:
        """The Decode stream (``reserved``, ``token``*, ``done``); iterate it
        with ``async for``, or ``.read()`` one event at a time. ``timeout``
        bounds the whole stream; ``.cancel()`` ends it and frees the lease."""
        return self._stub.Decode(request, timeout=timeout)

    async def probe_link(self, kv_host: str, kv_port: int, *, payload_bytes: int = 0, pings: int = 0,
                         timeout: float = 10.0) -> pb.ProbeLinkReply:
        """Have this worker measure its data-plane link to the KV port at
        ``kv_host:kv_port`` (another worker's). Zero ``payload_bytes`` or
        ``pings`` take the worker's defaults. ``timeout`` bounds the probe on
        the worker; the call's deadline allows a little more for the reply."""
        request = pb.ProbeLinkRequest(kv_host=kv_host, kv_port=kv_port, payload_bytes=payload_bytes, pings=pings,
                                      timeout_s=timeout)
        return await self._stub.ProbeLink(request, timeout=timeout + 2.0)

    async def close(self) -> None:
        await self._channel.close()

    async def __aenter__(self) -> WorkerClient:
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                        tb: TracebackType | None) -> None:
        await self.close()


def node_from_info(info: pb.InfoReply, address: str, source: str = "static") -> NodeInfo:
    """The ``NodeInfo`` of the worker at ``address`` (``host:port``) from its Info reply.

    Workers older than ``NodeProfile.profile_source`` leave it empty; they measured.
    Workers older than ``NodeProfile.prefill_probe`` send none: the node timed no prefill."""
    from cluster.node import NodeInfo

    host, _, port = address.rpartition(":")
    node, model = info.node, info.model
    return NodeInfo(
        node_id=node.node_id, roles=tuple(node.roles), engine=node.engine, model_id=model.model_id,
        weights_fingerprint=model.fingerprint, host=host.strip("[]"), grpc_port=int(port),
        kv_port=node.kv_port, device=node.device, tflops=node.tflops, mem_bw_gbps=node.mem_bw_gbps,
        free_mem_bytes=node.free_mem_bytes, version=node.version, key_fingerprint=node.key_fingerprint,
        hardware=node.hardware, profile_source=node.profile_source or "measured", source=source,
        prefill_probe=tuple((p.tokens, p.seconds) for p in node.prefill_probe),
    )
