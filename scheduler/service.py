"""``pdc serve``: the scheduler as a long-lived service.

``ClusterBackend`` composes objects with one job each and serves them to the
HTTP API:

* ``NodeTable`` (cluster/node_table.py): the live nodes (mDNS, static peers, health checks);
* ``ClientPool`` (scheduler/clients.py): one gRPC client per worker;
* ``ModelRegistry`` (scheduler/models.py): tokenizers and configs learned from the workers;
* ``LinkProber`` (scheduler/probing.py): every prefill -> decode link kept measured;
* ``Dispatcher`` (scheduler/dispatch.py): the ClusterView, the policy's checked
  answer and the ``LoadLedger`` (scheduler/load.py) the simulator keeps too;
* ``PolicyAdmin`` (scheduler/admin.py): ``/admin/policy``;
* ``AdmissionQueue`` (scheduler/admission.py): requests no node has room for, waiting in order;
* ``run_request`` (scheduler/lifecycle.py): one request across its workers;
* ``SchedulerMetrics`` (scheduler/metrics.py): ``/metrics``, each request observed once as it ends;
* ``RequestLog`` (scheduler/request_log.py): the requests in flight, each one's log line as it ends,
  the last N for ``/admin/requests``; ``Drain`` (scheduler/drain.py): ``serve``'s stop on SIGTERM/SIGINT;
* the dashboard (scheduler/dashboard.py) at ``/``: ``dashboard_state`` is its view of the cluster.

No weights are loaded here, so this runs on a NAS or a Pi. This module and the
ones it composes are the scheduler's only contact with gRPC and zeroconf.
"""
from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import ipaddress
import logging
import math
import signal
import time
from collections.abc import AsyncIterator, Iterable
from dataclasses import dataclass, field

from aiohttp import web

from cluster.auth import ClusterKey
from cluster.blocks import BLOCK_TOKENS, block_hashes
from cluster.node import NodeInfo
from cluster.node_table import NodeTable, PeerSource
from scheduler.admin import PolicyAdmin
from scheduler.admission import AdmissionConfig, AdmissionQueue, NoRoomError, Turn, nodes_with_room
from scheduler.api import build_app
from scheduler.calibration import ServedCalibration
from scheduler.clients import ClientPool
from scheduler.dashboard import STATE_KEY as DASHBOARD_STATE_KEY
from scheduler.dispatch import Dispatcher
from scheduler.drain import CUT_GRACE_S, Drain
from scheduler.lifecycle import LifecycleConfig, continuation, run_request, with_fixed_seed
from scheduler.load import LoadLedger
from scheduler.metrics import NodeStats, SchedulerMetrics, cluster_sample
from scheduler.models import ModelRegistry
from scheduler.placement import ClusterView, Placement, PlacementError, ask_policy
from scheduler.policy import load_policy
from scheduler.prefix_index import PrefixIndex
from scheduler.probing import LinkProber
from scheduler.request import (
    CapacityExhaustedError,
    FinishEvent,
    GenerationRequest,
    ModelEntry,
    NoCapacityError,
    RequestStats,
    SchedulerError,
    StopStringReached,
    TokenEvent,
    check_kv_codec,
    mean_tpot_s,
)
from scheduler.request_log import RequestLog
from scheduler.tokenizer import PromptCodec

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SchedulerConfig:
    """One scheduler process."""

    host: str = "127.0.0.1"
    port: int = 8000
    peers: tuple[str, ...] = ()
    ray: str | None = None  # Ray cluster address whose worker actors are nodes ("auto": the one on this machine)
    mdns: bool = True
    mdns_interfaces: tuple[str, ...] | None = None
    policy: str = "conditional"
    kv_codec: str = "auto"  # KV codec of each transfer: auto (the cost model picks) or raw|int8|fp8
    calibrate: bool = True  # correct the cost model per node from finished requests (scheduler/calibration.py)
    health_interval_s: float = 1.0
    link_refresh_s: float = 300.0  # re-probe each prefill -> decode link this often (when idle)
    prefix_refresh_s: float = 5.0  # read every node's held prefix blocks (Stats) this often
    link_probe_bytes: int = 0  # probe payload; 0: the worker's default (16 MiB)
    link_probe_timeout_s: float = 10.0
    lifecycle: LifecycleConfig = field(default_factory=LifecycleConfig)
    api_key: str | None = field(default=None, repr=False)  # bearer key for /v1/ (None: open); never logged
    allowed_origins: tuple[str, ...] = ()  # CORS origins ("*": any); empty: CORS off
    max_migrations: int = 2  # moves of one stream to another node after its first token
    admission: AdmissionConfig = field(default_factory=AdmissionConfig)
    drain_timeout_s: float = 30.0  # after the first SIGTERM/SIGINT, requests in flight get this long to end
    request_log_size: int = 1000  # request records kept for /admin/requests (pdc logs)

    def __post_init__(self) -> None:
        check_kv_codec(self.kv_codec, "kv_codec")
        if not math.isfinite(self.drain_timeout_s) or self.drain_timeout_s < 0:
            raise ValueError(f"drain_timeout_s must be a finite number >= 0, got {self.drain_timeout_s}")
        if self.request_log_size < 1:
            raise ValueError(f"request_log_size must be >= 1, got {self.request_log_size}")
        if not 0 <= self.port < 65536:
            raise ValueError(f"port must be in [0, 65535], got {self.port}")
        if self.max_migrations < 0:
            raise ValueError(f"max_migrations must be >= 0, got {self.max_migrations}")
        if self.prefix_refresh_s <= 0:
            raise ValueError(f"prefix_refresh_s must be positive, got {self.prefix_refresh_s}")
        if self.link_refresh_s <= 0 or self.link_probe_timeout_s <= 0 or self.link_probe_bytes < 0:
            raise ValueError("link_refresh_s and link_probe_timeout_s must be positive, link_probe_bytes >= 0")


class ClusterBackend:
    """The ``Backend`` the HTTP API serves: the composition of the objects above."""

    def __init__(self, config: SchedulerConfig, key: ClusterKey) -> None:
        self.config = config
        self.clients = ClientPool(key, health_timeout_s=config.health_interval_s)
        self.registry = ModelRegistry(self.clients.info)
        self.links = LinkProber(self.clients, refresh_s=config.link_refresh_s, interval_s=config.health_interval_s,
                                probe_bytes=config.link_probe_bytes, probe_timeout_s=config.link_probe_timeout_s)
        self.dispatcher = Dispatcher(load_policy(config.policy), config.policy, LoadLedger(),
                                     kv_codec=config.kv_codec,
                                     calibration=ServedCalibration(enabled=config.calibrate))
        self.admin = PolicyAdmin(key, self.dispatcher, drain=self.drain_node)
        self.admission = AdmissionQueue(config.admission)
        self.metrics = SchedulerMetrics(lambda: cluster_sample(self))  # /metrics
        self.requests = RequestLog(config.request_log_size)  # in flight, and the last N records
        self.table = NodeTable(
            key.fingerprint, use_mdns=config.mdns,
            interfaces=list(config.mdns_interfaces) if config.mdns_interfaces else None,
            peers=config.peers, probe=self.clients.node_at, health=self.clients.is_healthy,
            interval=config.health_interval_s, call_timeout=config.health_interval_s,
            on_change=self.on_node_change, ray=ray_source(config.ray),
        )

    @property
    def ledger(self) -> LoadLedger:
        """What each node carries now (the dispatcher's ledger)."""
        return self.dispatcher.ledger

    async def start(self) -> None:
        """Find nodes, start measuring the links between them and reading their prefix caches."""
        await self.table.start()
        self.links.start(self.table.snapshot, busy=self.ledger.is_busy)
        self._prefix_task = asyncio.get_running_loop().create_task(self._refresh_prefixes())

    async def stop(self) -> None:
        """Stop probing and learning, leave discovery, close every worker channel."""
        task, self._prefix_task = getattr(self, "_prefix_task", None), None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        await self.links.stop()
        await self.registry.stop()
        await self.table.stop()
        await self.clients.close()

    # ---------------------------------------------------------------- Backend

    def models(self) -> list[ModelEntry]:
        """Known models with a live decode-capable node."""
        return self.registry.entries(n.model_id for n in self.table.snapshot()
                                     if n.can_decode and self.registry.accepts(n))

    def codec_for(self, model: str) -> PromptCodec | None:
        """``model``'s tokenizer and chat template once any node has taught it (None: unknown, a 404).

        A known model whose nodes are all gone keeps its codec: the request then
        fails in ``generate`` with ``NoCapacityError``, a 503, not a 404."""
        record = self.registry.record(model)
        return record.codec if record else None

    def health(self) -> tuple[bool, dict]:
        """(ready, details for ``/health``): nodes with their load, links, policy, refused peers, models,
        the admission queue."""
        nodes = self.table.snapshot()
        ready = any(n.can_prefill for n in nodes) and any(n.can_decode for n in nodes)
        served = self.dispatcher.calibration.snapshot
        return ready, {"nodes": [node_json(n, self.ledger.active_requests(n.node_id), served(n.node_id))
                                 for n in nodes],
                       "links": self.links.snapshot(), "policy": self.dispatcher.policy_name,
                       "kv_codec": self.config.kv_codec,
                       "refused": {**self.table.refused, **self.registry.refused(nodes)},
                       "draining": self.table.draining,
                       "models": [m.model_id for m in self.models()],
                       "admission": self.admission.snapshot()}

    async def generate(self, request: GenerationRequest) -> AsyncIterator[TokenEvent | FinishEvent]:
        """Place ``request`` over the live nodes serving its model and run it; see ``Backend.generate``.

        Recovery (see docs/reliability.md, "Scheduler"): a worker that fails with
        UNAVAILABLE is suspended in the node table at once. Before the first
        token, a request whose prefill or decode node fails is placed once more
        without that node. After it, the stream moves (at most
        ``max_migrations`` times): a surviving node prefills prompt + the tokens
        already sent and decodes on from the next sampling step. Every attempt
        stays within the request's one deadline; whatever cannot be recovered
        raises the ``SchedulerError`` that says why.

        Admission (docs/reliability.md, "Admission"): a node that is full
        (``CapacityExhaustedError``) is skipped and the attempt placed again at
        once on the others; when no node has room, the request waits in the
        admission queue, holding nothing, and is placed again when capacity may
        have changed, until its queue timeout (then 429). A newcomer queues
        behind its model's waiters. The wait counts in the record's ``queue_s``."""
        request = with_fixed_seed(request)
        attempt = _Attempts(request, self.config.max_migrations,
                            (request.arrived_at or time.monotonic()) + self.config.lifecycle.request_timeout_s)
        turn = self.admission.line(request.model, attempt.deadline)
        ended: BaseException | None = None
        try:
            if self.admission.has_waiters(request.model) and self._serves(request.model):
                await turn.wait(f"earlier requests for model {request.model!r} are waiting for room")
            while True:
                try:
                    async with contextlib.aclosing(self._attempt(attempt, turn)) as events:
                        async for event in events:
                            yield event
                    return
                except CapacityExhaustedError as e:
                    if attempt.streamed():  # a node failed a running stream: recover as from any failure
                        self._recover(attempt, e)
                    elif e.node and not isinstance(e, NoRoomError):  # one node is full: try the others now
                        log.debug("request %s: %s; placing it elsewhere", request.request_id, e)
                        attempt.refused(e)
                    else:
                        log.debug("request %s: waiting for room (%d queued): %s", request.request_id,
                                  len(self.admission), e)
                        await turn.wait(e.message, running=bool(attempt.sent))
                        attempt.woke()
                except SchedulerError as e:
                    self._recover(attempt, e)
        except BaseException as e:
            ended = e
            raise
        finally:
            turn.close()
            outcome, stats = attempt.outcome(ended)
            self.metrics.observe_request(request.model, outcome, stats)  # once per request
            self.requests.ended(request.request_id, outcome, stats)  # joins the request's record

    def _recover(self, attempt: _Attempts, error: SchedulerError) -> None:
        """Set up the recovery from ``error`` (placing again, or migrating the stream), or raise it."""
        self._suspend_if_unreachable(error)
        if not attempt.may_recover(error):
            raise error
        log.warning("request %s: %s; %s", attempt.request.request_id, error,
                    "migrating the stream" if attempt.sent else "placing it again")
        attempt.failed(error)

    async def _attempt(self, attempt: _Attempts, turn: Turn) -> AsyncIterator[TokenEvent | FinishEvent]:
        """Run ``attempt``'s next request: its tokens, then the whole request's FinishEvent."""
        request = attempt.request
        async with contextlib.aclosing(self._run_placed(attempt.next_request(), attempt)) as events:
            async for event in events:
                if isinstance(event, TokenEvent):
                    turn.admitted()  # no-op unless it waited: it runs now, the next waiter may try
                    if not attempt.sent:
                        self.requests.marked(request.request_id, "first_token")  # the dashboard's timeline
                    previous = attempt.last_token_at
                    attempt.sent_token(event.token_id)
                    if previous is not None:
                        self.metrics.observe_token_gap(request.model, attempt.last_token_at - previous)
                    yield event
                else:
                    stats = attempt.merged_stats(event.stats)
                    stats = dataclasses.replace(stats, queue_s=stats.queue_s + turn.queued_s)
                    if attempt.attempts == 0:  # one placement's times: the cost model learns from them
                        self.dispatcher.served(request.request_id, stats)
                    # its INFO line is its record, logged by the API as the response ends
                    log.debug("request %s: done (%s) %s", request.request_id, event.finish_reason, describe(stats))
                    attempt.finished = FinishEvent(event.finish_reason, stats)
                    yield attempt.finished
                    return

    def _serves(self, model: str) -> bool:
        """Whether any live node serves ``model`` (else its requests are 503 at once, never queued)."""
        return any(n.model_id == model for n in self.table.snapshot())

    async def _run_placed(self, request: GenerationRequest, attempt: _Attempts
                          ) -> AsyncIterator[TokenEvent | FinishEvent]:
        """Place one attempt over the live nodes (less those that failed it before) and run it.

        Raises ``NoRoomError`` when the nodes left are full (they refused it, or
        sit at the in-flight cap) but the request could run on them."""
        nodes = {n.node_id: n for n in self.table.snapshot()
                 if n.model_id == request.model and n.node_id not in attempt.excluded
                 and self.registry.accepts(n)}  # a node serving another model under this id never pairs
        try:
            if not nodes:
                raise NoCapacityError(f"no node serves model {request.model!r} right now")
            placement = attempt.placement = self._place(request, list(nodes.values()), attempt)
        except NoCapacityError as e:
            raise attempt.unplaceable(e) from e
        rid, original = request.request_id, attempt.request.request_id
        self.requests.placed(original, placement.prefill_node or placement.decode_node, placement.decode_node)
        run = run_request(request, placement, lambda nid: self.clients.of(nodes[nid]), self.config.lifecycle,
                          on_prefill_done=lambda: self._prefill_done(rid, original), deadline=attempt.deadline,
                          on_prefix_blocks=self.dispatcher.prefixes.add)
        refused = False
        try:
            # aclosing: when our caller closes us (a client went away), close the
            # request's generator now, so it cancels on the workers now, not
            # whenever the garbage collector finalizes it.
            async with contextlib.aclosing(run) as events:
                async for event in events:
                    yield event
        except CapacityExhaustedError:
            refused = True  # it never held the node's capacity
            raise
        finally:
            self.dispatcher.finish(rid)  # invariant: every placed attempt leaves the ledger
            if not refused:
                self.admission.released(request.model)

    def _prefill_done(self, request_id: str, original_id: str) -> None:
        """Attempt ``request_id`` of ``original_id`` left its prefill node: the ledger and the timeline know."""
        self.dispatcher.prefill_done(request_id)
        self.requests.marked(original_id, "prefill_done")

    def _place(self, request: GenerationRequest, nodes: list[NodeInfo], attempt: _Attempts) -> Placement:
        """The policy's placement over the nodes with room; ``NoRoomError`` when only full nodes could take it."""
        offered, held = nodes_with_room(nodes, attempt.full, self.ledger.active_requests,
                                        self.config.admission.max_inflight_per_node)
        try:
            if held and not any(n.can_decode for n in offered):
                raise NoCapacityError(f"no decode-capable node serving {request.model!r} has room")
            return self.dispatcher.place(request, self.cluster_view(request.model, offered, request))
        except NoCapacityError as e:
            if not held or not self._placeable(request, nodes):
                raise
            cap = self.config.admission.max_inflight_per_node
            why = attempt.last_refusal or (f"every decode node serving {request.model!r} carries its "
                                           f"{cap} requests (pdc serve --max-inflight-per-node {cap})")
            raise NoRoomError(why) from e

    def _placeable(self, request: GenerationRequest, nodes: list[NodeInfo]) -> bool:
        """Whether the policy would place ``request`` on ``nodes`` if none were full (nothing is booked)."""
        try:
            ask_policy(self.dispatcher.policy, self.dispatcher.policy_name, request,
                       self.cluster_view(request.model, nodes, request))
        except (NoCapacityError, PlacementError):
            return False
        return True

    def _suspend_if_unreachable(self, error: SchedulerError) -> None:
        """A node whose RPC failed UNAVAILABLE leaves the table now, until a health check passes."""
        if error.grpc_code == "UNAVAILABLE" and error.node:
            self.table.suspend(error.node, error.message)

    def cluster_view(self, model: str, nodes: Iterable[NodeInfo], request: GenerationRequest | None = None
                     ) -> ClusterView:
        """What a policy sees now for ``model`` over ``nodes``; with ``request``,
        also how many of its prompt tokens each node holds in its prefix cache."""
        nodes = list(nodes)
        cached = prefix_cached_tokens(self.dispatcher.prefixes, request, nodes) if request is not None else None
        record = self.registry.record(model)
        return self.dispatcher.view(nodes, self.links.views(), self.registry.config_for(model),
                                    cached_tokens=cached, kv_dtype=record.dtype if record else "")

    async def _refresh_prefixes(self) -> None:
        """Every ``prefix_refresh_s``: each node's whole set of held prefix blocks
        (``Stats``), so evictions reach the index; Done and PrefillReply keep it
        current in between. A node that does not answer keeps its last set."""
        while True:
            await asyncio.sleep(self.config.prefix_refresh_s)
            for node in self.table.snapshot():
                self.registry.learn_soon(node)  # retries a node whose model info could not be fetched yet
                try:
                    stats = await self.clients.of(node).stats(timeout=self.config.health_interval_s)
                except Exception as e:  # its health checks decide whether it stays
                    log.debug("prefix blocks of %s: %s", node.node_id, e)
                    continue
                self.metrics.record_stats(node.node_id, stats)
                if stats.prefix_block_tokens in (0, BLOCK_TOKENS):
                    self.dispatcher.prefixes.replace(node.node_id, stats.prefix_blocks)

    async def drain_node(self, node_id: str, drain: bool, timeout_s: float) -> dict:
        """Ask ``node_id`` to drain (or undrain) and take it out of placement now (or put it back)."""
        node = self.table.node(node_id)
        if node is None:
            raise LookupError(f"no node {node_id!r} (known: {', '.join(self.table.known_ids()) or 'none'})")
        try:
            reply = await self.clients.of(node).drain(drain, timeout_s, timeout=self.config.health_interval_s * 5)
        except Exception as e:
            details = e.details() if callable(getattr(e, "details", None)) else str(e)
            raise ValueError(f"node {node_id} did not take the drain call: {details}") from None
        self.table.mark_draining(node_id, "draining" if reply.draining else None)
        return {"node": node_id, "draining": reply.draining, "active_requests": reply.active_requests}

    def on_node_change(self, node_id: str, node: NodeInfo | None) -> None:
        """The node table's callback: a node left (forget its links) or appeared (learn its model);
        either way capacity may have changed, so the admission queue wakes its waiters' heads."""
        self.admission.changed()
        if node is None:
            log.info("node %s left", node_id)
            self.links.forget(node_id)
            self.dispatcher.forget(node_id)  # its cached prefixes and its served figures
            self.metrics.forget(node_id)
            return
        log.info("node %s: %s %s %s at %s (%.1f TFLOPS, %.0f GB/s)", node_id, "/".join(node.roles), node.engine,
                 node.model_id, node.grpc_address, node.tflops, node.mem_bw_gbps)
        self.registry.learn_soon(node)


class _Attempts:
    """One request's attempts: the tokens sent, the nodes that failed it, what recovery is left.

    Invariants: one re-placement before the first token; at most
    ``max_migrations`` moves after it; none once ``deadline`` (monotonic) passed
    or for a failure that names no node (nothing to avoid next time)."""

    def __init__(self, request: GenerationRequest, max_migrations: int, deadline: float) -> None:
        self.request, self.max_migrations, self.deadline = request, max_migrations, deadline
        self.sent: list[int] = []
        self.excluded: set[str] = set()
        self.replaced = False  # the one re-placement before the first token is spent
        self.migrations = 0
        self.attempts = 0
        self.first_token_at: float | None = None
        self.last_token_at: float | None = None
        self.last_error: SchedulerError | None = None
        self.full: set[str] = set()  # nodes that refused it for capacity since its last wait
        self.last_refusal = ""  # the latest such refusal, in words
        self.sent_before = 0  # tokens sent before the current attempt began
        self.placement: Placement | None = None  # the latest attempt's
        self.finished: FinishEvent | None = None  # the whole request's end, once it came

    def next_request(self) -> GenerationRequest:
        """The request the next attempt runs."""
        self.sent_before = len(self.sent)
        if self.attempts == 0:
            return self.request
        return continuation(self.request, tuple(self.sent), self.attempts)

    def sent_token(self, token_id: int) -> None:
        """``token_id`` went to the client."""
        now = time.monotonic()
        self.sent.append(token_id)
        self.first_token_at = self.first_token_at or now
        self.last_token_at = now

    def may_recover(self, error: SchedulerError) -> bool:
        """Whether ``error`` (a node's failure) leaves a recovery to try."""
        if not error.node or error.grpc_code == "INVALID_ARGUMENT" or time.monotonic() >= self.deadline:
            return False
        if self.sent:
            if self.sent[-1] in self.request.stop_token_ids:  # it had ended: continuing would write past its stop
                return False
            return self.migrations < self.max_migrations and len(self.sent) < self.request.max_tokens
        return not self.replaced

    def failed(self, error: SchedulerError) -> None:
        """Count the recovery about to run and keep clear of the node at fault."""
        self.excluded.add(error.node)
        self.last_error = error
        if self.sent:
            self.migrations += 1
        else:
            self.replaced = True
        self.attempts += 1

    def streamed(self) -> bool:
        """Whether the current attempt sent tokens (it ran; its failure is not a refusal)."""
        return len(self.sent) > self.sent_before

    def refused(self, error: CapacityExhaustedError) -> None:
        """``error.node`` is full: place again at once without it (under a new worker-side id),
        spending no recovery; it is offered again after the next wait."""
        self.full.add(error.node)
        self.last_refusal = error.message
        self.attempts += 1

    def woke(self) -> None:
        """Back from the admission queue: capacity may have changed anywhere."""
        self.full.clear()

    def unplaceable(self, error: NoCapacityError) -> SchedulerError:
        """What to raise when an attempt finds no node: a recovery's failure names the original one."""
        if self.last_error is None:
            return error
        original = self.last_error
        where = "the stream could not move to another node" if self.sent else "no other node could take it"
        return type(original)(f"{original.message}; {where}: {error.message}", node=original.node,
                              grpc_code=original.grpc_code)

    def outcome(self, ended: BaseException | None) -> tuple[str, RequestStats]:
        """How the request ended, with its record, for the metrics and the request log: its finish
        reason and whole record once it finished; else the failure's code ("abort": closed before its
        end, e.g. the client went away) and what is known (its latest placement and codec, the tokens
        sent, and from the first token on its TTFT, TPOT and E2E so far)."""
        if self.finished is not None:
            return self.finished.finish_reason, self.finished.stats
        if isinstance(ended, StopStringReached):  # finished by the client's stop string: a "stop"
            return "stop", self._known_stats()
        if isinstance(ended, SchedulerError):
            outcome = ended.code
        else:
            outcome = "abort" if ended is None or isinstance(ended, (GeneratorExit, asyncio.CancelledError)) \
                else "internal_error"
        return outcome, self._known_stats()

    def _known_stats(self) -> RequestStats:
        """What is known of a request that did not finish on its own."""
        placement = self.placement
        arrived, first, last = self.request.arrived_at, self.first_token_at, self.last_token_at or 0.0
        times = {} if not arrived or first is None else {
            "ttft_s": first - arrived, "e2e_s": last - arrived, "tpot_s": mean_tpot_s(first, last, len(self.sent))}
        return RequestStats(
            request_id=self.request.request_id, prompt_tokens=len(self.request.prompt_token_ids),
            prefill_node=(placement.prefill_node or placement.decode_node) if placement else "",
            decode_node=placement.decode_node if placement else "", completion_tokens=len(self.sent),
            kv_codec=placement.codec if placement and not placement.colocated else None,
            migrations=self.migrations, **times)

    def merged_stats(self, last: RequestStats) -> RequestStats:
        """The record of the whole request from its last attempt's: original id and prompt,
        every token sent, the first token's TTFT, and the migrations."""
        if self.attempts == 0:
            return last
        arrived = self.request.arrived_at or last.arrival_s
        first = self.first_token_at or arrived
        end = self.last_token_at or first
        return dataclasses.replace(
            last, request_id=self.request.request_id, prompt_tokens=len(self.request.prompt_token_ids),
            completion_tokens=len(self.sent), ttft_s=first - arrived, e2e_s=end - arrived,
            tpot_s=mean_tpot_s(first, end, len(self.sent)), migrations=self.migrations,
        )


def ray_source(address: str | None) -> PeerSource | None:
    """The node table's Ray source for ``--ray ADDRESS`` (None without it): the only
    place the scheduler reaches for cluster/ray_backend.py, so only ``--ray`` imports ray."""
    if address is None:
        return None
    from cluster.ray_backend import RaySource

    return RaySource(None if address == "auto" else address)


def is_loopback(host: str) -> bool:
    """Whether binding ``host`` serves this machine only (``localhost``, 127.0.0.0/8, ::1)."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:  # a host name: it may resolve to anything
        return False


def exposure_warning(config: SchedulerConfig) -> str | None:
    """The start-up warning for an API reachable beyond this machine without a key, else None."""
    if config.api_key or is_loopback(config.host):
        return None
    return (f"serving on {config.host or 'every interface'} without an API key: anyone who can reach port "
            f"{config.port} can run requests on this cluster; set --api-key or $PDC_API_KEY")


def describe(stats: RequestStats) -> str:
    """One log line's worth of a finished request's record."""
    tpot = "-" if stats.tpot_s is None else f"{stats.tpot_s:.4f} s"
    return (f"{stats.completion_tokens} tokens, ttft {stats.ttft_s:.3f} s, tpot {tpot}, kv {stats.kv_bytes} B, "
            f"exposed {stats.exposed_transfer_s:.3f} s")


def node_json(node: NodeInfo, active: int, served: dict | None = None) -> dict:
    """One node's row in ``/health``: ``served`` is what its finished requests measured
    (``ServedCalibration.snapshot``)."""
    return {"node_id": node.node_id, "roles": list(node.roles), "engine": node.engine, "model": node.model_id,
            "address": node.grpc_address, "device": node.device, "tflops": node.tflops,
            "mem_bw_gbps": node.mem_bw_gbps, "hardware": node.hardware, "profile_source": node.profile_source,
            "source": node.source, "active_requests": active,
            "prefill_probe": [list(point) for point in node.prefill_probe],
            **({"served": served} if served is not None else {})}


def dashboard_state(backend: ClusterBackend) -> dict:
    """The dashboard's view of the cluster, from memory only (no RPC): every known node (placeable,
    draining or down) as in ``/health`` with its health and KV memory, the links, the policy."""
    table, ledger = backend.table, backend.ledger
    down, draining = table.down, table.draining
    nodes = []
    for node_id in table.known_ids():
        node = table.node(node_id)
        if node is None:
            continue
        health = "draining" if node_id in draining else "down" if node_id in down else "up"
        nodes.append({**node_json(node, ledger.active_requests(node_id)), "health": health,
                      "health_reason": down.get(node_id, ""),
                      **node_memory(node, backend.metrics.node_stats.get(node_id))})
    return {"nodes": nodes, "links": backend.links.snapshot(), "policy": backend.dispatcher.policy_name,
            "kv_codec": backend.config.kv_codec}


def node_memory(node: NodeInfo, stats: NodeStats | None) -> dict:
    """A node's KV memory: used is what its leases reserve plus its prefix cache (its latest ``Stats``,
    read every ``prefix_refresh_s``), of the free memory it advertised when it joined."""
    reserved, cached = (stats.reserved_kv_bytes, stats.prefix_cache_bytes) if stats else (0, 0)
    return {"kv_used_bytes": reserved + cached, "kv_total_bytes": node.free_mem_bytes,
            "kv_reserved_bytes": reserved, "prefix_cache_bytes": cached,
            "prefix_cache_capacity_bytes": stats.prefix_cache_capacity_bytes if stats else 0,
            "running_requests": stats.running_requests if stats else 0,
            "active_leases": stats.active_leases if stats else 0}


async def serve(config: SchedulerConfig, key: ClusterKey) -> None:
    """Run until SIGINT/SIGTERM, then drain (scheduler/drain.py): new requests get 503, the ones in
    flight run to their end within ``config.drain_timeout_s``; a second signal stops at once."""
    backend = ClusterBackend(config, key)
    await backend.start()
    drain = Drain(backend.requests, config.drain_timeout_s)
    app = build_app(backend, admin=backend.admin, api_key=config.api_key, allowed_origins=config.allowed_origins,
                    metrics=backend.metrics.exposition, request_log=backend.requests, drain=drain)
    app[DASHBOARD_STATE_KEY] = lambda: dashboard_state(backend)
    # the drain waits for requests itself; what is left after it (the last bytes, idle keep-alive
    # connections) gets CUT_GRACE_S before aiohttp cancels it
    runner = web.AppRunner(app, handler_cancellation=True, access_log=None, shutdown_timeout=CUT_GRACE_S)
    await runner.setup()
    site = web.TCPSite(runner, config.host, config.port)
    await site.start()
    log.warning("scheduler listening on http://%s:%d/v1 (policy %s, KV codec %s, API key %s, CORS %s)", config.host,
                config.port, config.policy, config.kv_codec, "required" if config.api_key else "off",
                ",".join(config.allowed_origins) if config.allowed_origins else "off")
    warning = exposure_warning(config)
    if warning:
        log.warning("%s", warning)
    stop, stop_now = asyncio.Event(), asyncio.Event()

    def on_signal() -> None:  # the first signal drains, a second one stops at once
        (stop_now if stop.is_set() else stop).set()

    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, on_signal)
    try:
        await stop.wait()
        await drain.run(stop_now)
    finally:
        log.warning("scheduler shutting down")
        await runner.cleanup()
        await backend.stop()


def prefix_cached_tokens(index: PrefixIndex, request: GenerationRequest, nodes: list[NodeInfo]) -> dict[str, int]:
    """Node -> prompt tokens of ``request`` whose KV its prefix cache holds, per
    the index. Hashes are rooted in each node's weights fingerprint (the root
    its own cache uses), so a node with other weights never matches."""
    hashes: dict[str, list[int]] = {}
    cached: dict[str, int] = {}
    prompt = request.prompt_token_ids
    for node in nodes:
        fingerprint = node.weights_fingerprint
        if fingerprint not in hashes:
            hashes[fingerprint] = block_hashes(fingerprint, prompt)
        cached[node.node_id] = index.cached_tokens(node.node_id, hashes[fingerprint], len(prompt))
    return cached
