"""Placing one live request: the view a policy sees, its answer checked, the load booked.

Pure Python over plain dataclasses (``NodeInfo`` in, ``ClusterView`` and
``Placement`` out), so tests drive it with fake node lists and a fake clock.
The ``LoadLedger`` it keeps is the one the simulator keeps: a request counts
on its decode node until ``finish`` and on a remote prefill node until
``prefill_done``; the cost model's predicted prefill seconds are backlog on
the prefilling node until then. The ``PrefixIndex`` it keeps (``prefixes``)
is fed by the service from the workers' reports and gives each view the
prompt tokens every node holds for that request:

    dispatcher.prefixes.replace(node_id, stats.prefix_blocks)   # each Stats poll
    dispatcher.prefixes.add(node_id, done.prefix_blocks)        # Done (decode node)
    dispatcher.prefixes.add(node_id, reply.prefix_blocks)       # PrefillReply (prefill node)
    dispatcher.prefixes.forget(node_id)                         # the node left
    view = dispatcher.view(nodes, links, model_config, request) # request.prefix_hashes set
"""
from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping

from cluster.links import LinkView
from cluster.node import NodeInfo
from scheduler import costmodel
from scheduler.calibration import Observation, ServedCalibration
from scheduler.load import LoadLedger
from scheduler.placement import (
    ClusterView,
    NodeView,
    Placement,
    PlacementError,
)
from scheduler.policy import Policy, Predictor, choose_placement
from scheduler.prefix_index import PrefixIndex
from scheduler.request import GenerationRequest, NoCapacityError, RequestStats

log = logging.getLogger(__name__)


def node_view(node: NodeInfo, ledger: LoadLedger, served: costmodel.Served | None = None) -> NodeView:
    """``node`` as a policy sees it: its advertised profile, the ledger's load, and what its
    served requests measured (``scheduler/calibration.py``)."""
    return NodeView(node.node_id, node.roles, node.engine, node.model_id, node.tflops, node.mem_bw_gbps,
                    node.free_mem_bytes, ledger.active_requests(node.node_id), hardware=node.hardware,
                    device_kind=node.device, prefill_backlog_s=ledger.prefill_backlog_s(node.node_id),
                    measured=node.profile_source != "declared", host=node.host, prefill_probe=node.prefill_probe,
                    served=served)


def predicted_prefill_s(request: GenerationRequest, view: ClusterView, placement: Placement
                        ) -> tuple[float, float, int]:
    """The cost model's prefill of ``request`` placed as ``placement``: the seconds its prefilling
    node is booked for (``Predictor.booked_prefill_s``, as the simulator books them), its compute
    alone (``Predictor.compute_s``) and the cached prefix that assumes; zeros when it cannot tell."""
    if view.model_config is None:
        return 0.0, 0.0, 0
    try:
        predictor = Predictor(request, view)
        node = view.node(placement.prefill_node or placement.decode_node)
        return predictor.booked_prefill_s(placement), predictor.compute_s(node), predictor.cached(node)
    except Exception as e:  # a config the cost model cannot read: no backlog estimate, placement still works
        log.debug("no prefill estimate for %s: %s", request.request_id, e)
        return 0.0, 0.0, 0


class Dispatcher:
    """Holds the policy in use and the load ledger; places requests one at a time."""

    def __init__(self, policy: Policy, policy_name: str, ledger: LoadLedger | None = None,
                 prefixes: PrefixIndex | None = None, *, kv_codec: str = "auto",
                 calibration: ServedCalibration | None = None) -> None:
        self.policy, self.policy_name = policy, policy_name
        self.kv_codec = kv_codec  # the server's codec mode (pdc serve --kv-codec); requests may override it
        self.ledger = ledger if ledger is not None else LoadLedger()
        self.prefixes = prefixes if prefixes is not None else PrefixIndex()
        self.calibration = calibration if calibration is not None else ServedCalibration()
        # request id -> (prefill node, decode node, mode, the model's compute seconds, the cached
        # prefix they assume), until it ends
        self._priced: dict[str, tuple[str, str, str, float, int]] = {}
        self._profiles: dict[str, tuple] = {}  # node id -> what its served figures were measured against
        self.num_placements: dict[tuple[str, str], int] = {}  # (policy, mode) -> placements made (metrics)

    def use(self, policy: Policy, policy_name: str) -> None:
        """Place with ``policy`` from the next request on (requests in flight keep their placement)."""
        self.policy, self.policy_name = policy, policy_name

    def view(self, nodes: Iterable[NodeInfo], links: Mapping[tuple[str, str], LinkView],
             model_config: dict | None, request: GenerationRequest | None = None, *,
             cached_tokens: Mapping[str, int] | None = None, kv_dtype: str = "") -> ClusterView:
        """What the policy sees: ``nodes`` with their load, the links among them,
        the model's config, and the prompt tokens of ``request`` each node holds.

        The cached figures are ``cached_tokens`` when given (node id -> tokens;
        nodes it leaves out are unknown), else the prefix index's answer for
        ``request.prefix_hashes`` (every node of the view, 0 where it holds
        nothing), else none (no request, or a request without hashes).
        ``kv_dtype``: the serving engine's dtype, as its Info reply says ("": the config's)."""
        nodes = list(nodes)
        for node in nodes:  # a node that came back measured differently: its served figures no longer apply
            profile = (node.engine, node.device, node.tflops, node.mem_bw_gbps, node.prefill_probe,
                       node.weights_fingerprint)
            if self._profiles.setdefault(node.node_id, profile) != profile:
                self._profiles[node.node_id] = profile
                self.calibration.forget(node.node_id)
        views = tuple(node_view(n, self.ledger, self.calibration.served(n.node_id)) for n in nodes)
        ids = {v.node_id for v in views}
        among = {pair: link for pair, link in links.items() if set(pair) <= ids}
        if cached_tokens is None:
            cached_tokens = self.cached_tokens(request, ids) if request is not None else {}
        cached = {node: tokens for node, tokens in cached_tokens.items() if node in ids}
        return ClusterView(views, among, model_config, cached_tokens=cached, kv_codec=self.kv_codec,
                           kv_dtype=costmodel.kv_dtype_of(model_config, kv_dtype))

    def cached_tokens(self, request: GenerationRequest, node_ids: Iterable[str]) -> dict[str, int]:
        """Node -> prompt tokens of ``request`` it holds, per the prefix index; {} without hashes."""
        if not request.prefix_hashes:
            return {}
        return self.prefixes.cached_by_node(request.prefix_hashes, len(request.prompt_token_ids), node_ids)

    def place(self, request: GenerationRequest, view: ClusterView) -> Placement:
        """Ask the policy, check its answer and admit the request into the ledger.

        The placement's codec is settled here (``policy.choose_placement``): the
        request's hint or ``kv_codec`` when explicit, else the cost model's pick.
        Raises ``NoCapacityError`` (HTTP 503) when the policy finds no node, fails,
        or answers with a placement that cannot run; the message names the policy."""
        if request.request_id in self.ledger:
            raise NoCapacityError(f"request {request.request_id!r} is already in flight")
        try:
            placement = choose_placement(self.policy, self.policy_name, request, view)
        except PlacementError as e:
            log.error("%s", e, exc_info=e.__cause__)
            raise NoCapacityError(f"placement {e}") from e
        prefill_on = placement.prefill_node or placement.decode_node
        booked_s, compute_s, cached = predicted_prefill_s(request, view, placement)
        self.ledger.admit(request.request_id, placement.prefill_node, placement.decode_node, booked_s)
        self._priced[request.request_id] = (prefill_on, placement.decode_node,
                                            "local" if placement.colocated else placement.codec, compute_s, cached)
        counted = (self.policy_name, "colocated" if placement.colocated else "disaggregated")
        self.num_placements[counted] = self.num_placements.get(counted, 0) + 1
        # debug: the request's one INFO line (its record, as it ends) names its placement
        log.debug("request %s: prefill=%s decode=%s codec=%s (policy %s)", request.request_id,
                  placement.prefill_node or f"{placement.decode_node} (colocated)", placement.decode_node,
                  placement.codec, self.policy_name)
        return placement

    def prefill_done(self, request_id: str) -> None:
        """The prefill node's part of ``request_id`` is over (idempotent)."""
        self.ledger.prefill_done(request_id)

    def finish(self, request_id: str) -> None:
        """``request_id`` ended, however it ended (idempotent)."""
        self.ledger.finish(request_id)
        self._priced.pop(request_id, None)

    def served(self, request_id: str, stats: RequestStats) -> None:
        """``request_id`` finished on its first placement with the record ``stats`` (queue_s
        counting its admission wait): what it measured corrects the cost model for its nodes
        (``scheduler/calibration.py``). Call it before ``finish``."""
        priced = self._priced.pop(request_id, None)
        if priced is None:
            return
        prefill_node, decode_node, mode, compute_s, cached = priced
        if stats.cached_prefix_tokens != cached:  # it found another prefix than priced: no ratio to take
            compute_s = 0.0
        self.calibration.observe(Observation(prefill_node, decode_node, mode, compute_s, stats.prefill_s,
                                             stats.ttft_s, stats.queue_s, stats.exposed_transfer_s,
                                             stats.prompt_tokens - stats.cached_prefix_tokens))

    def forget(self, node_id: str) -> None:
        """``node_id`` left: drop its cached prefixes and what its served requests measured."""
        self.prefixes.forget(node_id)
        self.calibration.forget(node_id)
