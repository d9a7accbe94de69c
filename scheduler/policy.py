"""Placement policies: small classes behind one Protocol, collected in a dict.

A policy sees one request and a ``ClusterView`` (nodes serving the request's
model, measured links, the model's config) and returns a ``Placement``. The
live scheduler and tests call the same classes.

A user's policy is any class with a ``place(request, cluster)`` method,
selected with ``--policy package.module:Class`` or ``--policy path/to/file.py:Class``.
"""
from __future__ import annotations

import importlib
import importlib.util
import itertools
import logging
import sys
import traceback
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from types import ModuleType
from typing import Protocol

from scheduler import catalog, costmodel
from scheduler.placement import (
    ClusterView,
    NodeView,
    Placement,
    ask_policy,
    cached_prefix,
)
from scheduler.request import GenerationRequest, NoCapacityError

log = logging.getLogger(__name__)


class Policy(Protocol):
    def place(self, request: GenerationRequest, cluster: ClusterView) -> Placement:
        """Choose the prefill node (None: colocated), the decode node and the codec."""
        ...


def decoders_of(request: GenerationRequest, cluster: ClusterView) -> list[NodeView]:
    """Decode-capable nodes, or NoCapacityError naming the model."""
    decoders = [n for n in cluster.nodes if n.can_decode]
    if not decoders:
        raise NoCapacityError(f"no decode-capable node serves model {request.model!r}")
    return decoders


def prefillers_for(decode: NodeView, cluster: ClusterView) -> list[NodeView]:
    """Prefill-capable nodes other than ``decode``."""
    return [n for n in cluster.nodes if n.can_prefill and n.node_id != decode.node_id]


def forced(request: GenerationRequest, cluster: ClusterView, decode: NodeView, prefill: NodeView | None,
           codec: str = "raw") -> Placement:
    """Apply a request's ``placement`` override on top of a policy's choice
    (``codec``: the policy's for the transfer it chose, dropped if that changes)."""
    if request.placement == "colocated":
        return Placement(None, decode.node_id)
    if request.placement == "disaggregated" and prefill is None:
        others = prefillers_for(decode, cluster)
        if not others:
            raise NoCapacityError(f"disaggregated placement needs a prefill-capable node other than {decode.node_id!r}")
        cached = _cached(request, cluster)
        prefill = max(others, key=lambda n: (n.tflops, cached(n), -n.active_requests, n.node_id))
        codec = "raw"
    return Placement(prefill.node_id if prefill else None, decode.node_id, codec if prefill else "raw")


def _cached(request: GenerationRequest, cluster: ClusterView) -> Callable[[NodeView], int]:
    """node -> prompt tokens of ``request`` it holds (``placement.cached_prefix``), for sort keys."""
    return lambda node: cached_prefix(request, cluster, node.node_id)


class Colocated:
    """Each request on one node, no KV ever moves (the baseline): the least busy
    decode-capable node prefills locally and decodes; among equally busy ones,
    the one holding the longest prefix of the prompt, then the one with the
    most memory bandwidth. Spreading requests keeps the baseline fair: a
    cluster without disaggregation still uses all its nodes."""

    def place(self, request: GenerationRequest, cluster: ClusterView) -> Placement:
        cached = _cached(request, cluster)
        decode = max(decoders_of(request, cluster),
                     key=lambda n: (n.can_prefill, -n.active_requests, cached(n), n.mem_bw_gbps, n.node_id))
        return forced(request, cluster, decode, None)


class RoundRobin:
    """Decode nodes in turn; prefill on the next other prefill-capable node in
    turn. Blind to load and to cached prefixes by design: the rotation is the
    policy (a request that lands on a node holding its prefix still reuses it)."""

    def __init__(self) -> None:
        self._turn = itertools.count()

    def place(self, request: GenerationRequest, cluster: ClusterView) -> Placement:
        turn = next(self._turn)
        decoders = sorted(decoders_of(request, cluster), key=lambda n: n.node_id)
        decode = decoders[turn % len(decoders)]
        prefillers = sorted(prefillers_for(decode, cluster), key=lambda n: n.node_id)
        prefill = prefillers[turn % len(prefillers)] if prefillers else None
        return forced(request, cluster, decode, prefill)


class LeastLoaded:
    """Decode on the decode-capable node with the fewest requests in flight,
    prefill on the least loaded other prefill-capable node. Ties, decode: more
    bandwidth, then the longer cached prefix (it only spares transfer there);
    prefill: the longer cached prefix (compute that need not happen), then
    more FLOPS."""

    def place(self, request: GenerationRequest, cluster: ClusterView) -> Placement:
        cached = _cached(request, cluster)
        decode = min(decoders_of(request, cluster),
                     key=lambda n: (n.active_requests, -n.mem_bw_gbps, -cached(n), n.node_id))
        prefillers = prefillers_for(decode, cluster)
        prefill = min(prefillers, key=lambda n: (n.active_requests, -cached(n), -n.tflops, n.node_id),
                      default=None)
        return forced(request, cluster, decode, prefill)


class FastestPair:
    """Prefill on the prefill-capable node with the most TFLOPS, decode on the
    decode-capable node with the most memory bandwidth; colocated when no other
    prefill-capable node exists. Hardware decides; among equally fast nodes,
    the one holding the longer prefix of the prompt, then the less busy one."""

    def place(self, request: GenerationRequest, cluster: ClusterView) -> Placement:
        cached = _cached(request, cluster)
        decode = max(decoders_of(request, cluster),
                     key=lambda n: (n.mem_bw_gbps, cached(n), -n.active_requests, n.node_id))
        prefillers = prefillers_for(decode, cluster)
        prefill = max(prefillers, key=lambda n: (n.tflops, cached(n), -n.active_requests, n.node_id),
                      default=None)
        if prefill is None and request.placement != "disaggregated":
            decode = max(decoders_of(request, cluster),
                         key=lambda n: (n.can_prefill, n.mem_bw_gbps, cached(n), -n.active_requests, n.node_id))
        return forced(request, cluster, decode, prefill)


@dataclass(frozen=True)
class Estimate:
    """A cost-model prediction for one candidate placement."""

    placement: Placement
    ttft_s: float
    e2e_s: float


class Predictor:
    """Cost-model predictions for placements of one request on one ClusterView.

    Each node's cached prefix is ``cached_prefix(request, cluster, node)``;
    the arithmetic of prefill and handoff is ``costmodel.request_cost``, the
    one the simulator calls. Decode time is a continuous batch's step
    (``costmodel.batched_decode_time``) with the node's active requests taken
    as deep as this one. Nodes without a catalog hardware name use their
    advertised TFLOPS and bandwidth with the generic efficiencies (or
    ``costmodel.MEASURED`` when the node measured them); a node that timed the
    served model's prefill at start-up (``NodeView.prefill_probe``) has its
    prefill priced from that probe (``costmodel.with_probe``). Links
    without a measurement are treated as unknown, which rules remote prefill
    out (nothing to predict with).
    """

    def __init__(self, request: GenerationRequest, cluster: ClusterView) -> None:
        if cluster.model_config is None:
            raise ValueError("cost-model policies need the model's config.json in the ClusterView")
        self.request, self.cluster = request, cluster
        native = costmodel.model_cost(cluster.model_config)
        self.format = cluster.weight_format or native.weight_format
        self.model = native if self.format == native.weight_format else costmodel.model_cost(
            cluster.model_config, dense_format=self.format, expert_format=self.format)
        self.num_prompt_tokens = len(request.prompt_token_ids)
        self.codec_mode = codec_mode(request, cluster)
        self.kv_dtype = cluster.kv_dtype  # what a transfer's bytes and a codec's cost are counted in

    def cached(self, node: NodeView) -> int:
        """Prompt tokens of this request whose KV ``node`` holds."""
        return cached_prefix(self.request, self.cluster, node.node_id)

    def cost(self, prefill: NodeView | None, decode: NodeView) -> costmodel.RequestCost | None:
        """Prefill and handoff of this request on (``prefill`` or colocated, ``decode``);
        None when the link between them is unknown."""
        if prefill is None or prefill.node_id == decode.node_id:
            return self._cost(decode)
        net = self._link(prefill, decode)
        if net is None:
            return None
        return self._cost(prefill, net, self.cached(decode), self._fixed_codec(prefill, decode))

    def prefill_s(self, node: NodeView) -> float:
        """Seconds for ``node`` to prefill this request from its own cached prefix."""
        return self._cost(node).prefill_s

    def booked_prefill_s(self, placement: Placement) -> float:
        """Seconds ``placement``'s prefilling node is busy computing this request, its mode's served
        scale included and a CPU node's encode prior left out, as the simulator books it (the load
        ledger's backlog)."""
        decode = self.cluster.node(placement.decode_node)
        prefill = self.cluster.node(placement.prefill_node) if placement.prefill_node else None
        net = self._link(prefill, decode) if prefill is not None else None
        if prefill is None or net is None:
            cost = self._cost(prefill or decode)
        else:
            cost = self._cost(prefill, net, self.cached(decode), placement.codec or "raw")
        return cost.prefill_s - cost.encode_in_prefill_s

    def compute_s(self, node: NodeView) -> float:
        """``prefill_s`` as the probe (or TFLOPS) prices it, before what ``node``'s served
        requests measured: the figure a served prefill is compared with (``scheduler/calibration.py``)."""
        hw, eff = self._hardware(node)
        cached = self.cached(node)
        return costmodel.prefill_time(self.model, hw, replace(eff, served=None),
                                      self.num_prompt_tokens - cached, cached)

    def tpot_s(self, node: NodeView) -> float:
        """Per-token decode time at mid-generation depth, in one batch with the
        node's active requests (each taken as deep as this one)."""
        hw, eff = self._hardware(node)
        depth = self.num_prompt_tokens + self.request.max_tokens // 2
        return costmodel.batched_decode_time(self.model, hw, eff, depth, 1 + node.active_requests)

    def estimate(self, prefill: NodeView | None, decode: NodeView) -> Estimate | None:
        """Predicted TTFT and end-to-end time, or None when the link is unknown."""
        if prefill is not None and prefill.node_id == decode.node_id:
            prefill = None
        cost = self.cost(prefill, decode)
        if cost is None:
            return None
        overhead = costmodel.request_overhead_s(self._hardware(decode)[1], colocated=prefill is None)
        ttft = (prefill or decode).prefill_backlog_s + cost.prefill_s + cost.exposed_s + overhead
        e2e = ttft + (self.request.max_tokens - 1) * self.tpot_s(decode)
        return Estimate(Placement(prefill.node_id if prefill else None, decode.node_id, cost.codec), ttft, e2e)

    def _link(self, prefill: NodeView, decode: NodeView) -> costmodel.Link | None:
        """The measured link ``prefill`` -> ``decode`` as the cost model takes it; None when unknown."""
        link = self.cluster.link(prefill.node_id, decode.node_id)
        return None if link is None else costmodel.Link("measured", link.gbps, link.latency_s, payload_efficiency=1.0)

    def _fixed_codec(self, prefill: NodeView, decode: NodeView) -> str | None:
        """The codec of a transfer ``prefill`` -> ``decode`` when there is
        nothing to weigh; None: ``auto`` weighs the codecs on the link."""
        if self.codec_mode != "auto":  # explicit; a cache only raw can carry (MLA) is priced raw
            return self.codec_mode if costmodel.can_encode(self.model, self.codec_mode, self.kv_dtype) else "raw"
        return "raw" if same_host(prefill, decode) else None

    def _cost(self, node: NodeView, link: costmodel.Link | None = None,
              num_decode_cached: int = 0, codec: str | None = "raw") -> costmodel.RequestCost:
        hw, eff = self._hardware(node)
        args = (self.model, hw, eff, self.num_prompt_tokens, self.cached(node))
        if link is not None and codec is None:
            return costmodel.auto_codec_cost(*args, link=link, num_decode_cached=num_decode_cached,
                                             kv_dtype=self.kv_dtype)
        return costmodel.request_cost(*args, link=link, num_decode_cached=num_decode_cached, codec=codec or "raw",
                                      kv_dtype=self.kv_dtype)

    def _hardware(self, node: NodeView) -> tuple[costmodel.Hardware, costmodel.Efficiency]:
        """The node's machine and efficiencies, its prefill probe (if any) pricing its prefill,
        its device saying whether a codec's encode shares its prefill's cores, and what its
        served requests measured (``NodeView.served``) correcting both."""
        hw, eff = self._profile(node)
        return hw, costmodel.with_probe(eff, self.model, node.prefill_probe, device=node.device_kind,
                                        served=node.served)

    def _profile(self, node: NodeView) -> tuple[costmodel.Hardware, costmodel.Efficiency]:
        known = node.hardware in catalog.HARDWARE  # a newer worker may name hardware this catalog lacks
        if known:
            hw = catalog.hardware(node.hardware)
            hw = costmodel.Hardware(hw.name, node.tflops or hw.tflops, node.mem_bw_gbps or hw.mem_bw_gbps, hw.mem_gb)
        else:
            hw = costmodel.Hardware(node.node_id, max(node.tflops, 1e-3), max(node.mem_bw_gbps, 1e-3), 1.0)
            if node.measured:
                return hw, costmodel.MEASURED
        return hw, costmodel.efficiency(node.hardware if known else node.device_kind, node.engine, self.format)


class Roofline:
    """Minimise predicted end-to-end time over every (prefill, decode) pair,
    colocated included, counting current queues."""

    def place(self, request: GenerationRequest, cluster: ClusterView) -> Placement:
        predictor = Predictor(request, cluster)
        decoders = decoders_of(request, cluster)
        options = [predictor.estimate(None, d) for d in decoders if d.can_prefill]
        options += [predictor.estimate(p, d) for d in decoders for p in prefillers_for(d, cluster)]
        options = [o for o in options if o is not None]
        if not options:  # only decode-only nodes and unmeasured links: nothing to predict with
            return FastestPair().place(request, cluster)
        best = min(options, key=lambda o: (o.e2e_s, o.ttft_s))
        decode = cluster.node(best.placement.decode_node)
        prefill = cluster.node(best.placement.prefill_node) if best.placement.prefill_node else None
        return forced(request, cluster, decode, prefill, best.placement.codec)


class Conditional:
    """Decode on the decode-capable node with the most memory bandwidth; prefill
    remotely only when the predicted TTFT gain beats the exposed transfer by a
    clear margin, otherwise the decode node prefills locally. A decode node
    without the prefill role always takes the fastest prefill node (there is no
    choice).

    NOTE on ``min_gain``. Remote prefill must win by more than ``min_gain`` of
    the local TTFT (default 20 %, the error the cost model is held to against
    measured tables). A smaller predicted win is inside the model's error for
    uncalibrated hardware, and remote prefill is not free: it occupies a second
    node and the link, and a link slower than probed eats the gain first. So
    near-ties stay local: Spark + M4 Max over 1GbE on an 8k prompt predicts
    9.2 s remote against 10.9 s local (16 %) and stays on the Mac.
    """

    def __init__(self, min_gain: float = 0.2) -> None:
        if not 0 <= min_gain < 1:
            raise ValueError(f"min_gain must be in [0, 1), got {min_gain}")
        self.min_gain = min_gain

    def place(self, request: GenerationRequest, cluster: ClusterView) -> Placement:
        predictor = Predictor(request, cluster)
        decode = max(decoders_of(request, cluster),
                     key=lambda n: (n.mem_bw_gbps, predictor.cached(n), -n.active_requests, n.node_id))
        if not decode.can_prefill:
            return FastestPair().place(request, cluster)
        local = predictor.estimate(None, decode)
        remote = [e for p in prefillers_for(decode, cluster) if (e := predictor.estimate(p, decode)) is not None]
        best = min(remote, key=lambda e: e.ttft_s, default=None)
        wins = best is not None and local.ttft_s - best.ttft_s > self.min_gain * local.ttft_s
        prefill = cluster.node(best.placement.prefill_node) if wins else None
        return forced(request, cluster, decode, prefill, best.placement.codec if wins else "raw")


# --------------------------------------------------------------- the codec of a placement


def codec_mode(request: GenerationRequest, cluster: ClusterView) -> str:
    """The codec mode that governs ``request``: its own hint, else the server's."""
    return request.kv_codec or cluster.kv_codec


def same_host(a: NodeView, b: NodeView) -> bool:
    """Both nodes advertise one address (or both a loopback one): their link is
    memory copies, where compressing KV only adds work."""
    if not a.host or not b.host:
        return False
    return a.host == b.host or (_is_loopback(a.host) and _is_loopback(b.host))


def _is_loopback(host: str) -> bool:
    return host.startswith("127.") or host in ("::1", "localhost")


def settle_codec(placement: Placement, request: GenerationRequest, cluster: ClusterView) -> Placement:
    """``placement`` with the codec its transfer will use.

    Colocated: unchanged (no KV moves; the codec has no effect and the record
    reports none). An explicit mode (the request's hint, else the server's
    ``--kv-codec``) replaces the policy's codec on every transfer. Under
    ``auto`` a lossy codec the policy named is kept; a ``raw`` one (the
    default every policy may leave) becomes the ``Predictor``'s choice for the
    pair, so the cost-model policies and the others agree, and raw when the
    cost model cannot tell (no config, no measured link)."""
    if placement.colocated:
        return placement
    mode = codec_mode(request, cluster)
    if mode != "auto":
        return replace(placement, codec=mode)
    if placement.codec != "raw":
        return placement
    try:
        predictor = Predictor(request, cluster)
        cost = predictor.cost(cluster.node(placement.prefill_node), cluster.node(placement.decode_node))
    except Exception as e:  # advisory: a config the cost model cannot read must not fail the request
        log.debug("request %s: no codec estimate, sending raw: %s", request.request_id, e)
        return placement
    return placement if cost is None else replace(placement, codec=cost.codec)


def choose_placement(policy: object, policy_name: str, request: GenerationRequest, view: ClusterView) -> Placement:
    """The placement to dispatch: the policy's answer through the one gate
    (``placement.ask_policy``), with its transfer's codec settled
    (``settle_codec``). The live dispatcher and the simulator both call it."""
    return settle_codec(ask_policy(policy, policy_name, request, view), request, view)


POLICIES: dict[str, type] = {
    "colocated": Colocated,
    "round-robin": RoundRobin,
    "least-loaded": LeastLoaded,
    "fastest-pair": FastestPair,
    "roofline": Roofline,
    "conditional": Conditional,
}


def load_policy(spec: str) -> Policy:
    """A policy instance from a built-in name, ``package.module:Class`` or ``path/to/file.py:Class``.

    Raises ValueError naming ``spec`` and what went wrong: an unknown name, a
    module that cannot be imported or raises while it runs (with the file and
    line), a missing attribute, something that is not a class, a constructor
    that fails without arguments, or a class without ``place``.
    """
    if spec in POLICIES:
        return POLICIES[spec]()
    if ":" not in spec:
        raise ValueError(f"unknown policy {spec!r}: use one of {sorted(POLICIES)}, module:Class or file.py:Class")
    where, _, name = spec.rpartition(":")
    try:
        module = _load_file(Path(where)) if where.endswith(".py") else _import(where)
    except ValueError as e:
        raise ValueError(f"policy {spec!r}: {e}") from e.__cause__
    cls = getattr(module, name, None)
    if cls is None:
        raise ValueError(f"policy {spec!r}: {where} has no attribute {name!r}")
    if not isinstance(cls, type):
        raise ValueError(f"policy {spec!r}: {name} is not a class (got {type(cls).__name__})")
    try:
        policy = cls()
    except Exception as e:  # user code: any failure is a bad spec, not a crash
        raise ValueError(f"policy {spec!r}: {name}() failed: {_describe(e)}") from e
    if not callable(getattr(policy, "place", None)):
        raise ValueError(f"policy {spec!r}: {name} has no place(request, cluster) method")
    return policy


def _import(module_name: str) -> ModuleType:
    """The module, or ValueError saying why it cannot be imported."""
    try:
        return importlib.import_module(module_name)
    except Exception as e:  # ImportError, or whatever the module raises while it runs
        raise ValueError(f"module {module_name!r} cannot be imported: {_located(e)}") from e


def _load_file(path: Path) -> ModuleType:
    """The module run from ``path``, registered in sys.modules while it runs
    (dataclasses and typing resolve names through it); ValueError if it fails."""
    if not path.is_file():
        raise ValueError(f"{path} does not exist")
    name = f"pdc_user_policy_{path.stem}"
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)  # type: ignore[union-attr]
    except Exception as e:  # a syntax error, or whatever the file raises while it runs
        if sys.modules.get(name) is module:
            del sys.modules[name]
        raise ValueError(_located(e, str(path))) from e
    return module


def _located(e: BaseException, filename: str | None = None) -> str:
    """``"FILE line N: Type: message"`` for an exception raised while a module ran:
    the deepest line in ``filename`` when given, else the deepest outside importlib."""
    if isinstance(e, SyntaxError) and e.filename:
        return f"{e.filename} line {e.lineno}: {type(e).__name__}: {e.msg}"
    machinery = (__file__, importlib.__file__)
    frames = [f for f in traceback.extract_tb(e.__traceback__)
              if not f.filename.startswith("<frozen") and f.filename not in machinery]
    ours = [f for f in frames if f.filename == filename]
    frame = (ours or frames or [None])[-1]
    return (f"{frame.filename} line {frame.lineno}: " if frame else "") + _describe(e)


def _describe(e: BaseException) -> str:
    return f"{type(e).__name__}: {e}" if str(e) else type(e).__name__
