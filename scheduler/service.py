"""``pdc serve``: the scheduler as a long-lived service.

Wires the pure parts together: the live node table (mDNS, static peers, health
checks), one gRPC client per worker, per-model tokenizers fetched from a
worker's Info (no weights are loaded here, so this runs on a NAS or a Pi), the
placement policy, the request lifecycle and the HTTP API. This module and the
client it imports are the scheduler's only contact with gRPC and zeroconf.
"""
from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import signal
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

from aiohttp import web

from cluster.auth import ClusterKey, NonceCache, verify_call
from cluster.node_table import NodeTable
from cluster.node import NodeInfo
from proto import pdcluster_pb2 as pb
from scheduler.api import build_app
from scheduler.lifecycle import LifecycleConfig, run_request
from cluster.links import LinkTable
from scheduler.placement import ClusterView, NodeView, Placement
from scheduler.policy import Policy, Predictor, load_policy
from scheduler.request import (
    FinishEvent,
    GenerationRequest,
    ModelEntry,
    NoCapacityError,
    TokenEvent,
)
from scheduler.tokenizer import PromptCodec, TokenizerBundle
from workers.rpc.client import WorkerClient, node_from_info

log = logging.getLogger(__name__)

INFO_TIMEOUT_S = 10.0


@dataclass(frozen=True)
class SchedulerConfig:
    """One scheduler process."""

    host: str = "127.0.0.1"
    port: int = 8000
    peers: tuple[str, ...] = ()
    mdns: bool = True
    mdns_interfaces: tuple[str, ...] | None = None
    policy: str = "conditional"
    health_interval_s: float = 1.0
    link_refresh_s: float = 300.0  # re-probe each prefill -> decode link this often (when idle)
    link_probe_bytes: int = 0  # probe payload; 0: the worker's default (16 MiB)
    link_probe_timeout_s: float = 10.0
    lifecycle: LifecycleConfig = field(default_factory=LifecycleConfig)

    def __post_init__(self) -> None:
        if not 0 <= self.port < 65536:
            raise ValueError(f"port must be in [0, 65535], got {self.port}")
        if self.link_refresh_s <= 0 or self.link_probe_timeout_s <= 0 or self.link_probe_bytes < 0:
            raise ValueError("link_refresh_s and link_probe_timeout_s must be positive, link_probe_bytes >= 0")


@dataclass
class _ModelRecord:
    entry: ModelEntry
    codec: PromptCodec
    config: dict | None  # the model's config.json, for the cost-model policies


class ClusterBackend:
    """The ``Backend`` the HTTP API serves: nodes, models, placement, lifecycle."""

    def __init__(self, config: SchedulerConfig, key: ClusterKey) -> None:
        self.config, self.key = config, key
        self.policy: Policy = load_policy(config.policy)
        self.policy_spec = config.policy
        self._admin_nonces = NonceCache()
        self.clients: dict[str, WorkerClient] = {}  # grpc address -> client
        self.models_by_id: dict[str, _ModelRecord] = {}
        self.active: dict[str, int] = {}  # node id -> requests with work left on this node
        self.backlog_s: dict[str, float] = {}  # node id -> predicted seconds of prefill placed there, not done
        self.links = LinkTable(self._probe_link, refresh_s=config.link_refresh_s)
        self._link_task: asyncio.Task | None = None
        self.table = NodeTable(
            key.fingerprint, use_mdns=config.mdns,
            interfaces=list(config.mdns_interfaces) if config.mdns_interfaces else None,
            peers=config.peers, probe=self._probe, health=self._health,
            interval=config.health_interval_s, call_timeout=config.health_interval_s,
            on_change=self._on_node_change,
        )

    async def start(self) -> None:
        await self.table.start()
        self._link_task = asyncio.get_running_loop().create_task(self._probe_links())

    async def stop(self) -> None:
        if self._link_task is not None:
            self._link_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._link_task
        await self.table.stop()
        for client in self.clients.values():
            await client.close()

    # ---------------------------------------------------------------- Backend

    def models(self) -> list[ModelEntry]:
        live = {n.model_id for n in self.table.snapshot() if n.can_decode}
        return [r.entry for model_id, r in sorted(self.models_by_id.items()) if model_id in live]

    def codec_for(self, model: str) -> PromptCodec | None:
        record = self.models_by_id.get(model)
        return record.codec if record and any(m.model_id == model for m in self.models()) else None

    def health(self) -> tuple[bool, dict]:
        nodes = self.table.snapshot()
        ready = any(n.can_prefill for n in nodes) and any(n.can_decode for n in nodes)
        return ready, {"nodes": [_node_json(n, self.active.get(n.node_id, 0)) for n in nodes],
                       "links": self.links.snapshot(), "policy": self.policy_spec,
                       "refused": self.table.refused, "models": [m.model_id for m in self.models()]}

    async def generate(self, request: GenerationRequest) -> AsyncIterator[TokenEvent | FinishEvent]:
        nodes = {n.node_id: n for n in self.table.snapshot() if n.model_id == request.model}
        if not nodes:
            raise NoCapacityError(f"no node serves model {request.model!r} right now")
        view = self.cluster_view(request.model, nodes.values())
        try:
            placement = self.policy.place(request, view)
        except NoCapacityError:
            raise
        except Exception as e:  # a policy bug or a view it cannot use: this request fails, the service goes on
            log.exception("policy %s failed to place request %s", self.policy_spec, request.request_id)
            raise NoCapacityError(f"placement policy {self.policy_spec!r} failed: {type(e).__name__}: {e}") from e
        if not isinstance(placement, Placement) or placement.decode_node not in nodes or (
                placement.prefill_node is not None and placement.prefill_node not in nodes):
            log.error("policy %s returned %r for request %s", self.policy_spec, placement, request.request_id)
            raise NoCapacityError(f"placement policy {self.policy_spec!r} returned {placement!r}, "
                                  f"not a Placement over the nodes serving {request.model!r}")
        log.info("request %s: prefill=%s decode=%s codec=%s", request.request_id,
                 placement.prefill_node or f"{placement.decode_node} (colocated)", placement.decode_node, placement.codec)
        prefill_done = self._account(request, view, placement)
        run = run_request(request, placement, lambda nid: self._client(nodes[nid]), self.config.lifecycle,
                          on_prefill_done=prefill_done)
        try:
            # aclosing: when our caller closes us (a client went away), close the
            # request's generator now, so it cancels on the workers now, not
            # whenever the garbage collector finalizes it.
            async with contextlib.aclosing(run) as events:
                async for event in events:
                    if isinstance(event, FinishEvent):
                        s = event.stats
                        log.info("request %s: done (%s) %d tokens, ttft %.3f s, tpot %.4f s, kv %d B, exposed %.3f s",
                                 request.request_id, event.finish_reason, s.completion_tokens, s.ttft_s, s.tpot_s,
                                 s.kv_bytes, s.exposed_transfer_s)
                    yield event
        finally:
            prefill_done()
            self.active[placement.decode_node] -= 1

    def cluster_view(self, model: str, nodes) -> ClusterView:
        """What a policy sees: the model's nodes with their load, measured links, the model's config."""
        record = self.models_by_id.get(model)
        views = tuple(self._view(n) for n in nodes)
        ids = {v.node_id for v in views}
        links = {pair: link for pair, link in self.links.views().items() if set(pair) <= ids}
        return ClusterView(views, links, record.config if record else None)

    def _account(self, request: GenerationRequest, view: ClusterView, placement: Placement):
        """Count the request on its nodes, as the simulator does: it is active on
        the decode node until it ends and on a remote prefill node until its
        prefill ends; the predicted prefill time is backlog until then. Returns
        the (idempotent) callback that ends the prefill part."""
        prefill_on = placement.prefill_node or placement.decode_node
        predicted = self._predicted_prefill_s(request, view, prefill_on)
        self.backlog_s[prefill_on] = self.backlog_s.get(prefill_on, 0.0) + predicted
        for node_id in {prefill_on, placement.decode_node}:
            self.active[node_id] = self.active.get(node_id, 0) + 1
        pending = [True]

        def prefill_done() -> None:
            if not pending:
                return
            pending.clear()
            self.backlog_s[prefill_on] = max(0.0, self.backlog_s[prefill_on] - predicted)
            if placement.prefill_node:
                self.active[prefill_on] -= 1

        return prefill_done

    def _predicted_prefill_s(self, request: GenerationRequest, view: ClusterView, node_id: str) -> float:
        if view.model_config is None:
            return 0.0
        try:
            return Predictor(request, view).prefill_s(view.node(node_id))
        except Exception as e:  # a config the cost model cannot read: no backlog estimate, placement still works
            log.debug("no prefill estimate for %s on %s: %s", request.request_id, node_id, e)
            return 0.0

    # ---------------------------------------------------------------- PolicyAdmin

    def authorize(self, method: str, token: str | None) -> str | None:
        return verify_call(self.key, method, token, self._admin_nonces)

    def current_policy(self) -> str:
        return self.policy_spec

    def switch_policy(self, spec: str) -> str:
        self.policy = load_policy(spec)  # raises ValueError naming what is wrong
        self.policy_spec = spec
        return spec

    # ---------------------------------------------------------------- nodes

    def _client(self, node: NodeInfo) -> WorkerClient:
        return self._client_at(node.grpc_address)

    def _view(self, node: NodeInfo) -> NodeView:
        return NodeView(node.node_id, node.roles, node.engine, node.model_id, node.tflops, node.mem_bw_gbps,
                        node.free_mem_bytes, self.active.get(node.node_id, 0), hardware=node.hardware,
                        device_kind=node.device, prefill_backlog_s=self.backlog_s.get(node.node_id, 0.0),
                        measured=node.profile_source != "declared")

    async def _probe_links(self) -> None:
        """Keep every prefill -> decode link measured (see cluster/links.py)."""
        while True:
            try:
                await self.links.refresh(self.table.snapshot(), busy=lambda n: self.active.get(n, 0) > 0)
            except Exception:  # never let the prober die: placement would go stale silently
                log.exception("link probing failed")
            await asyncio.sleep(self.config.health_interval_s)

    async def _probe_link(self, src: NodeInfo, dst: NodeInfo) -> tuple[float, float]:
        reply = await self._client(src).probe_link(
            dst.host, dst.kv_port, payload_bytes=self.config.link_probe_bytes,
            timeout=self.config.link_probe_timeout_s)
        return reply.gbps, reply.latency_s

    async def _probe(self, address: str) -> NodeInfo:
        info = await self._client_at(address).info(timeout=INFO_TIMEOUT_S)
        return node_from_info(info, address, source="static")

    async def _health(self, address: str) -> bool:
        try:
            return (await self._client_at(address).health(timeout=self.config.health_interval_s)).ok
        except Exception:
            return False

    def _client_at(self, address: str) -> WorkerClient:
        if address not in self.clients:
            self.clients[address] = WorkerClient(address, self.key)
        return self.clients[address]

    def _on_node_change(self, node_id: str, node: NodeInfo | None) -> None:
        if node is None:
            log.info("node %s left", node_id)
            self.links.forget(node_id)
            return
        log.info("node %s: %s %s %s at %s (%.1f TFLOPS, %.0f GB/s)", node_id, "/".join(node.roles), node.engine,
                 node.model_id, node.grpc_address, node.tflops, node.mem_bw_gbps)
        if node.model_id not in self.models_by_id:
            asyncio.get_running_loop().create_task(self._learn_model(node))

    async def _learn_model(self, node: NodeInfo) -> None:
        """Fetch tokenizer and chat template for ``node``'s model from the node itself."""
        try:
            info: pb.InfoReply = await self._client(node).info(timeout=INFO_TIMEOUT_S)
        except Exception as e:
            log.warning("could not fetch model info from %s: %s", node.node_id, e)
            return
        m = info.model
        bundle = TokenizerBundle(m.tokenizer_json, m.chat_template, m.bos_token, m.eos_token)
        entry = ModelEntry(m.model_id, m.max_position_embeddings, tuple(m.eos_token_ids))
        config = None
        try:
            config = json.loads(m.config_json) if m.config_json else None
        except ValueError as e:
            log.warning("model %s: %s sent an unreadable config.json (%s); cost-model policies cannot place it",
                        m.model_id, node.node_id, e)
        if config is None:
            log.warning("model %s: no config.json from %s; cost-model policies (conditional, roofline) "
                        "cannot place it", m.model_id, node.node_id)
        self.models_by_id.setdefault(m.model_id, _ModelRecord(entry, PromptCodec(bundle), config))
        log.info("model %s: %s, %d layers, context %d (tokenizer from %s)", m.model_id, m.model_type,
                 m.num_layers, m.max_position_embeddings, node.node_id)


def _node_json(node: NodeInfo, active: int) -> dict:
    return {"node_id": node.node_id, "roles": list(node.roles), "engine": node.engine, "model": node.model_id,
            "address": node.grpc_address, "device": node.device, "tflops": node.tflops,
            "mem_bw_gbps": node.mem_bw_gbps, "hardware": node.hardware, "profile_source": node.profile_source,
            "source": node.source, "active_requests": active}


async def serve(config: SchedulerConfig, key: ClusterKey) -> None:
    """Run until SIGINT/SIGTERM."""
    backend = ClusterBackend(config, key)
    await backend.start()
    runner = web.AppRunner(build_app(backend, admin=backend), handler_cancellation=True, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, config.host, config.port)
    await site.start()
    log.warning("scheduler listening on http://%s:%d/v1 (policy %s)", config.host, config.port, config.policy)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    try:
        await stop.wait()
    finally:
        log.warning("scheduler shutting down")
        await runner.cleanup()
        await backend.stop()
