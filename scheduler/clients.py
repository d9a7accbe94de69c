"""One gRPC client per worker address, shared by everything that calls workers.

The scheduler's node table, link prober, model registry and request lifecycle
all reach a worker through the ``WorkerClient`` this pool keeps for its
address; ``close`` ends every channel.
"""
from __future__ import annotations

from cluster.auth import ClusterKey
from cluster.node import NodeInfo
from proto import pdcluster_pb2 as pb
from workers.rpc.client import WorkerClient, node_from_info

INFO_TIMEOUT_S = 10.0


class ClientPool:
    """Address -> ``WorkerClient``, created on first use."""

    def __init__(self, key: ClusterKey, *, health_timeout_s: float = 1.0,
                 info_timeout_s: float = INFO_TIMEOUT_S) -> None:
        self.key = key
        self.health_timeout_s, self.info_timeout_s = health_timeout_s, info_timeout_s
        self._clients: dict[str, WorkerClient] = {}  # grpc address -> client

    def at(self, address: str) -> WorkerClient:
        """The client for ``address`` (``host:port``)."""
        if address not in self._clients:
            self._clients[address] = WorkerClient(address, self.key)
        return self._clients[address]

    def of(self, node: NodeInfo) -> WorkerClient:
        """The client for ``node``'s gRPC address."""
        return self.at(node.grpc_address)

    async def info(self, node: NodeInfo) -> pb.InfoReply:
        """``node``'s Info reply (profile, model, tokenizer, config)."""
        return await self.of(node).info(timeout=self.info_timeout_s)

    async def node_at(self, address: str) -> NodeInfo:
        """The node answering at ``address``, from its Info (the node table's probe)."""
        info = await self.at(address).info(timeout=self.info_timeout_s)
        return node_from_info(info, address, source="static")

    async def is_healthy(self, address: str) -> bool | str:
        """Whether the worker at ``address`` answers Health ok in time (the node table's check);
        ``"draining"`` when it does but takes no new request."""
        try:
            reply = await self.at(address).health(timeout=self.health_timeout_s)
        except Exception:
            return False
        return "draining" if reply.ok and reply.draining else reply.ok

    async def close(self) -> None:
        """Close every client's channel."""
        for client in self._clients.values():
            await client.close()
        self._clients.clear()
