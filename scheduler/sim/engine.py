"""The simulator's engine: a cluster file resolved against a model, and a
discrete-event run of one workload under one placement policy.

NOTE on the simulation. Time advances from event to event (a heap of
(time, sequence, callback)); nothing sleeps. Each request, on arrival, is
placed by the policy exactly as the live scheduler places it: the policy sees
a ``ClusterView`` built from the simulation's state at that instant, whose
load (requests active on each node, seconds of prefill queued there, resident
KV) comes from the same ``LoadLedger`` the live scheduler keeps
(``scheduler/load.py``), whose per-node cached prefixes come from a
``PrefixIndex`` (``scheduler/prefix_index.py``) fed by the simulation's own
placements as the live one is fed by workers, and its answer passes the same
``check_placement`` (plus: a remote pair needs a link in the cluster file).
Each node then behaves like our worker's engine thread: one FIFO queue of
jobs, run one at a time. A request's prefill is one job (the whole prompt
less the prefix that node holds). Decoding is one step loop per node
(continuous batching): a step is one job that gives every request in the
node's batch one token and costs ``costmodel.decode_step_time`` (the weights
read once, every member's KV); a request joins at the first step boundary
after its first token and leaves after its last. The next step is queued
behind whatever arrived meanwhile, so a prefill queued on a decoding node
pauses its batch for its duration. When prefill is remote, its KV streams
layer by layer over the link from the moment prefill starts; a link direction
carries one transfer at a time, so a transfer that finds the link busy starts
when the previous one ends. The first token reaches the decode node with the
last KV slice (decoded, under a compressed codec). Prefill and handoff come
from ``costmodel.request_cost`` (the function the live ``Predictor`` calls) for
the node's hardware, engine and weight format, in the codec the placement
settled on (``policy.choose_placement``, as live: ``--kv-codec`` or ``auto``).
"""
from __future__ import annotations

import heapq
import itertools
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

from cluster.blocks import block_hashes
from scheduler import catalog, costmodel
from scheduler.load import LoadLedger
from scheduler.placement import (
    ClusterView,
    LinkView,
    NodeView,
    Placement,
    PlacementError,
)
from scheduler.policy import Policy, choose_placement
from scheduler.prefix_index import PrefixIndex
from scheduler.request import (
    GenerationRequest,
    NoCapacityError,
    RequestStats,
    mean_tpot_s,
)
from scheduler.sim.cluster_file import ClusterSpec, NodeSpec
from scheduler.sim.workload import WorkItem, session_token_ids


class SimulationError(ValueError):
    """A simulation that cannot run: bad model, a node too small, a bad placement."""


# ---------------------------------------------------------------- the cluster, resolved


@dataclass(frozen=True)
class SimNode:
    """One node as the simulator computes with it."""

    spec: NodeSpec
    engine: str
    machine: costmodel.Hardware
    efficiency: costmodel.Efficiency

    @property
    def name(self) -> str:
        return self.spec.name


@dataclass(frozen=True)
class SimCluster:
    """A cluster file resolved against one model, engine default and weight format."""

    nodes: dict[str, SimNode]
    links: dict[tuple[str, str], costmodel.Link]  # (src, dst) -> payload-rate link, both directions
    model: costmodel.ModelCost
    model_name: str
    model_config: dict
    weight_format: str
    kv_dtype: str = costmodel.KV_DTYPE  # the KV's wire dtype: the checkpoint's (costmodel.kv_dtype_of)

    def link_views(self) -> dict[tuple[str, str], LinkView]:
        return {pair: LinkView(link.gbit_s, link.latency_s) for pair, link in self.links.items()}


def default_engine(hardware: str) -> str:
    """The engine a node runs when neither the cluster file nor --engine names one."""
    return "mlx" if hardware.startswith("mac-") else "torch"


def model_for_format(config: dict, weight_format: str | None, name: str | None = None) -> costmodel.ModelCost:
    """The model's cost figures with its weights in ``weight_format``: the
    checkpoint's native formats when None or equal to its native bulk format,
    else every weight in that format."""
    native = costmodel.model_cost(config, name=name)
    if weight_format is None or weight_format == native.weight_format:
        return native
    return costmodel.model_cost(config, name=name, dense_format=weight_format, expert_format=weight_format)


def build_cluster(spec: ClusterSpec, model: str, *, engine: str | None = None,
                  weight_format: str | None = None) -> SimCluster:
    """Resolve ``spec`` for ``model`` (a catalog name or a config.json path)."""
    try:
        config = catalog.model_config(model)
    except catalog.CatalogError as e:
        raise SimulationError(str(e)) from None
    name = model if model in catalog.MODELS else str(config.get("_name_or_path") or model)
    cost = model_for_format(config, weight_format, name)
    nodes = {}
    for node in spec.nodes:
        machine = node.machine()
        if cost.total_weight_bytes > machine.mem_gb * 1e9:
            raise SimulationError(
                f"node {node.name!r} ({node.hardware}, {machine.mem_gb:g} GB) cannot hold {name}'s "
                f"{cost.total_weight_bytes / 1e9:.1f} GB of weights; set mem_gb on the node to simulate it anyway"
            )
        node_engine = node.engine or engine or default_engine(node.hardware)
        eff = costmodel.with_probe(costmodel.efficiency(node.hardware, node_engine, cost.weight_format), cost,
                                   node.prefill_probe, device=node.device, served=node.served)
        nodes[node.name] = SimNode(node, node_engine, machine, eff)
    links = {}
    for link in spec.links:
        net = link.network()
        measured = costmodel.Link(net.name, net.bytes_per_s * 8 / 1e9, net.latency_s, payload_efficiency=1.0)
        a, b = link.nodes
        links[(a, b)] = links[(b, a)] = measured
    return SimCluster(nodes, links, cost, name, config, cost.weight_format, costmodel.kv_dtype_of(config))


# ---------------------------------------------------------------- event loop and engine queues


class EventLoop:
    """A clock and a heap of callbacks; ties run in scheduling order."""

    def __init__(self) -> None:
        self.now = 0.0
        self._heap: list[tuple[float, int, Callable[[], None]]] = []
        self._seq = itertools.count()

    def at(self, when: float, callback: Callable[[], None]) -> None:
        heapq.heappush(self._heap, (when, next(self._seq), callback))

    def run(self) -> None:
        while self._heap:
            self.now, _, callback = heapq.heappop(self._heap)
            callback()


@dataclass
class Job:
    """One call on a node's engine thread. ``duration_s`` may be a function,
    called when the job starts (a decode step's batch is known only then)."""

    duration_s: float | Callable[[], float]
    on_start: Callable[[float], None] | None = None
    on_done: Callable[[float], None] | None = None


class EngineQueue:
    """One node's engine thread: jobs run one at a time in submission order.
    It decides when work runs; what the node carries is the ``LoadLedger``'s."""

    def __init__(self, loop: EventLoop) -> None:
        self.loop = loop
        self.jobs: deque[Job] = deque()
        self.running: Job | None = None
        self.running_ends_at = 0.0

    def submit(self, job: Job) -> None:
        """Queue ``job``; it starts now if the engine is idle."""
        self.jobs.append(job)
        if self.running is None:
            self._start_next()

    def _start_next(self) -> None:
        if not self.jobs:
            self.running = None
            return
        job = self.running = self.jobs.popleft()
        self.running_ends_at = self.loop.now + (job.duration_s() if callable(job.duration_s) else job.duration_s)
        if job.on_start:
            job.on_start(self.loop.now)
        self.loop.at(self.running_ends_at, self._finish)

    def _finish(self) -> None:
        job = self.running
        # on_done runs while the finished job still holds the engine, so what it
        # submits queues behind the work already waiting; and a request it adds
        # to the decode batch joins a step that starts at this same instant.
        if job and job.on_done:
            job.on_done(self.loop.now)
        self._start_next()


# ---------------------------------------------------------------- one run


@dataclass
class Flight:
    """A request in flight: its placement, its cost and the times it reached each stage."""

    index: int
    item: WorkItem
    prefill_node: str
    decode_node: str
    cost: costmodel.RequestCost
    prefix_hashes: tuple[int, ...] = ()
    kv_bytes: float = 0.0  # the whole prompt's KV, resident on the nodes while the request runs
    prefill_start: float = 0.0
    prefill_end: float = 0.0
    first_byte: float = 0.0
    last_byte: float = 0.0
    first_token: float = 0.0
    finish: float = 0.0
    num_tokens: int = 0  # tokens produced so far

    @property
    def request_id(self) -> str:
        """The id the policy and the ledger know this request by."""
        return f"req-{self.index}"

    @property
    def colocated(self) -> bool:
        """One node prefills and decodes (as ``RequestStats.colocated``)."""
        return self.prefill_node == self.decode_node

    @property
    def depth(self) -> int:
        """Tokens in the decode node's cache before its next step: the prompt
        and every produced token but the last (which the step feeds)."""
        return self.item.prompt_tokens + self.num_tokens - 1

    def stats(self) -> RequestStats:
        """The request's record, as the live scheduler reports one."""
        item, arrival, cost = self.item, self.item.arrival_s, self.cost
        remote = not self.colocated
        return RequestStats(
            request_id=self.request_id, arrival_s=arrival, prompt_tokens=item.prompt_tokens,
            cached_prefix_tokens=cost.num_prefill_cached, completion_tokens=item.output_tokens,
            prefill_node=self.prefill_node, decode_node=self.decode_node,
            kv_codec=cost.codec if remote else None, kv_bytes=int(cost.shipped_bytes) if remote else 0,
            queue_s=self.prefill_start - arrival, prefill_s=cost.prefill_s,
            transfer_s=self.last_byte - self.first_byte if remote else 0.0,
            exposed_transfer_s=self.last_byte - self.prefill_end if remote else 0.0,
            ttft_s=self.first_token - arrival, tpot_s=mean_tpot_s(self.first_token, self.finish, item.output_tokens),
            e2e_s=self.finish - arrival,
        )


class Simulation:
    """One workload under one policy on one resolved cluster."""

    def __init__(self, cluster: SimCluster, policy: Policy, policy_name: str = "", *, kv_codec: str = "auto") -> None:
        self.cluster, self.policy, self.policy_name = cluster, policy, policy_name or type(policy).__name__
        self.kv_codec = kv_codec  # the run's codec mode, as pdc serve --kv-codec
        self.loop = EventLoop()
        self.engines = {name: EngineQueue(self.loop) for name in cluster.nodes}
        self.ledger = LoadLedger(clock=lambda: self.loop.now)  # what each node carries, as policies see it
        self.prefixes = PrefixIndex()  # which node holds which prefix, as policies see it
        self.batches: dict[str, list[Flight]] = {name: [] for name in cluster.nodes}  # decoding, joined order
        self.stepping = dict.fromkeys(cluster.nodes, False)  # a decode step is queued or running
        self.link_free_at = dict.fromkeys(cluster.links, 0.0)
        self.link_views = cluster.link_views()
        self.flights: list[Flight] = []

    def run(self, workload: list[WorkItem]) -> list[RequestStats]:
        """Simulate every request to its last token; records in arrival order."""
        for index, item in enumerate(sorted(workload, key=lambda w: w.arrival_s)):
            self.loop.at(item.arrival_s, lambda i=index, w=item: self._arrive(i, w))
        self.loop.run()
        return [flight.stats() for flight in self.flights]

    # ------------------------------------------------------------ placement

    def _arrive(self, index: int, item: WorkItem) -> None:
        hashes = tuple(self._hashes(item.session, item.prompt_tokens)) if item.session else ()
        cached = self._cached(item, hashes)
        request = GenerationRequest(
            f"req-{index}", self.cluster.model_name, (0,) * item.prompt_tokens, max_tokens=item.output_tokens,
            arrived_at=item.arrival_s, cached_prefix_tokens=item.cached_prefix_tokens, prefix_hashes=hashes,
        )
        placement = self._place(request, self._view(cached))
        decode = placement.decode_node
        prefill = placement.prefill_node or decode
        node = self.cluster.nodes[prefill]
        link = None if prefill == decode else self.cluster.links[(prefill, decode)]
        cost = costmodel.request_cost(self.cluster.model, node.machine, node.efficiency, item.prompt_tokens,
                                      cached[prefill], link=link, num_decode_cached=cached[decode] if link else 0,
                                      codec=placement.codec if link else "raw", kv_dtype=self.cluster.kv_dtype)
        flight = Flight(index, item, prefill, decode, cost, hashes,
                        kv_bytes=costmodel.kv_bytes(self.cluster.model, item.prompt_tokens))
        self.flights.append(flight)
        # The prediction is exact here: the simulated prefill takes the cost model's time. The
        # ledger counts prefill compute alone, as the live one (dispatch.predicted_prefill_s) does;
        # the engine stays busy for a CPU node's encode too.
        self.ledger.admit(flight.request_id, prefill, decode, cost.prefill_s - cost.encode_in_prefill_s,
                          flight.kv_bytes)
        self.engines[prefill].submit(Job(cost.prefill_s, lambda t: self._prefill_started(flight, t),
                                         lambda t: self._prefill_done(flight, t)))

    def _cached(self, item: WorkItem, hashes: tuple[int, ...]) -> dict[str, int]:
        """Node -> prompt tokens of ``item`` it holds: the prefix cached everywhere,
        or the longer one the index knows the node holds for its session."""
        held = self.prefixes.cached_by_node(hashes, item.prompt_tokens, self.cluster.nodes)
        return {name: max(item.cached_prefix_tokens, tokens) for name, tokens in held.items()}

    def _hashes(self, session: str, num_tokens: int) -> list[int]:
        return block_hashes(self.cluster.model_name, session_token_ids(session, num_tokens))

    def _place(self, request: GenerationRequest, view: ClusterView) -> Placement:
        """The policy's placement, checked as the live scheduler checks it, over a linked pair."""
        try:
            placement = choose_placement(self.policy, self.policy_name, request, view)
        except NoCapacityError as e:
            raise SimulationError(f"policy {self.policy_name!r} could not place {request.request_id}: {e}") from None
        except PlacementError as e:  # a user policy's bug or bad answer: say whose, without a traceback
            raise SimulationError(str(e)) from e.__cause__
        pair = (placement.prefill_node, placement.decode_node)
        if placement.prefill_node is not None and pair not in self.cluster.links:
            raise SimulationError(f"policy {self.policy_name!r} returned {placement}: the cluster file has no "
                                  f"link between {pair[0]!r} and {pair[1]!r}")
        return placement

    def _view(self, cached: dict[str, int]) -> ClusterView:
        nodes = []
        for name, node in self.cluster.nodes.items():
            resident = self.ledger.resident_kv_bytes(name)
            free = node.machine.mem_gb * 1e9 - self.cluster.model.total_weight_bytes - resident
            nodes.append(NodeView(
                name, node.spec.roles, node.engine, self.cluster.model_name,
                tflops=node.machine.tflops, mem_bw_gbps=node.machine.mem_bw_gbps,
                free_mem_bytes=max(0, int(free)), active_requests=self.ledger.active_requests(name),
                hardware=node.spec.hardware, prefill_backlog_s=self.ledger.prefill_backlog_s(name),
                prefill_probe=node.spec.prefill_probe, device_kind=node.spec.device, served=node.spec.served,
            ))
        return ClusterView(tuple(nodes), dict(self.link_views), self.cluster.model_config, self.cluster.weight_format,
                           cached_tokens=cached, kv_codec=self.kv_codec, kv_dtype=self.cluster.kv_dtype)

    # ------------------------------------------------------------ stages

    def _prefill_started(self, flight: Flight, now: float) -> None:
        flight.prefill_start = now
        self.ledger.prefill_started(flight.request_id)
        if flight.colocated:
            return
        pair = (flight.prefill_node, flight.decode_node)
        link, free_at, cost = self.cluster.links[pair], self.link_free_at[pair], flight.cost
        # Streaming from a link busy until free_at: the last slice is usable when the
        # busy link has sent everything (and the receiver decoded the last slice),
        # or as on an idle link, whichever is later.
        flight.last_byte = max(free_at + cost.wire_s + link.latency_s + cost.decode_tail_s,
                               now + cost.prefill_s + cost.exposed_s)
        flight.first_byte = max(free_at, now + cost.prefill_s / self.cluster.model.num_layers)
        self.link_free_at[pair] = flight.last_byte - cost.decode_tail_s - link.latency_s
        self.loop.at(flight.last_byte + self._overhead_s(flight), lambda: self._first_token(flight, self.loop.now))

    def _prefill_done(self, flight: Flight, now: float) -> None:
        flight.prefill_end = now
        self.ledger.prefill_done(flight.request_id)
        if flight.colocated:
            overhead = self._overhead_s(flight)
            if overhead > 0:
                self.loop.at(now + overhead, lambda: self._first_token(flight, self.loop.now))
            else:
                self._first_token(flight, now)
        elif flight.prefix_hashes:  # PrefillReply.prefix_blocks: the prefill node holds the prompt now
            self.prefixes.add(flight.prefill_node, flight.prefix_hashes)

    def _overhead_s(self, flight: Flight) -> float:
        """The decode node's fixed TTFT term (``costmodel.request_overhead_s``; 0 unless declared)."""
        return costmodel.request_overhead_s(self.cluster.nodes[flight.decode_node].efficiency, flight.colocated)

    def _first_token(self, flight: Flight, now: float) -> None:
        flight.first_token = now
        flight.num_tokens = 1
        if flight.num_tokens >= flight.item.output_tokens:
            self._finish(flight, now)
            return
        self.batches[flight.decode_node].append(flight)
        if not self.stepping[flight.decode_node]:
            self._queue_step(flight.decode_node)

    def _queue_step(self, name: str) -> None:
        """Queue the node's next decode step: its batch is whoever has joined when it starts."""
        self.stepping[name] = True
        node, members = self.cluster.nodes[name], []

        def start() -> float:
            members.extend(self.batches[name])
            return costmodel.decode_step_time(self.cluster.model, node.machine, node.efficiency,
                                              [f.depth for f in members])

        self.engines[name].submit(Job(start, None, lambda t: self._stepped(name, members, t)))

    def _stepped(self, name: str, members: list[Flight], now: float) -> None:
        """One token for every member; the finished leave the batch, the rest step again."""
        self.stepping[name] = False
        for flight in members:
            flight.num_tokens += 1
            if flight.num_tokens >= flight.item.output_tokens:
                self.batches[name].remove(flight)
                self._finish(flight, now)
        if self.batches[name]:
            self._queue_step(name)

    def _finish(self, flight: Flight, now: float) -> None:
        flight.finish = now
        self.ledger.finish(flight.request_id)
        if flight.item.session:  # Done.prefix_blocks: the decode node holds the conversation now
            held = flight.item.prompt_tokens + flight.item.output_tokens - 1  # the last token was never fed
            self.prefixes.add(flight.decode_node, self._hashes(flight.item.session, held))
