"""What placement decides over: node and link views in, a ``Placement`` out.

Pure Python over plain dataclasses, so the policies in ``scheduler/policy.py``
run the same way in the live scheduler, in the simulator and in tests with
fake node lists. ``ask_policy`` and ``check_placement`` are the one gate a
policy's answer passes, live and simulated alike.
"""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from cluster.links import LinkView  # a measured link, as placement sees it
from scheduler.costmodel import Served
from scheduler.request import GenerationRequest, NoCapacityError, check_kv_codec


@dataclass(frozen=True)
class NodeView:
    """What placement needs to know about one node."""

    node_id: str
    roles: tuple[str, ...]
    engine: str
    model_id: str
    tflops: float
    mem_bw_gbps: float
    free_mem_bytes: int = 0
    # Requests with work left here (LoadLedger): decoding in the node's one batch, or
    # prefilling. A decode step serves the whole batch (continuous batching), so k of
    # them cost one weight read plus k requests' KV per step, not k separate steps.
    active_requests: int = 0
    hardware: str = ""  # catalog name ("dgx-spark", ...) when known: selects calibrated efficiencies
    device_kind: str = ""  # "cuda", "mps", "cpu", "mlx:gpu", ... (for generic efficiencies)
    prefill_backlog_s: float = 0.0  # predicted seconds of prefill work already queued here
    measured: bool = False  # tflops/mem_bw_gbps are a start-up measurement (achieved), not peak figures
    host: str = ""  # the address the node advertises ("" unknown): two nodes on one host never compress KV
    # (prompt tokens, seconds) of the served model's prefill timed at start-up: when present it
    # prices this node's prefill (costmodel.with_probe) in place of TFLOPS x efficiency
    prefill_probe: tuple[tuple[int, float], ...] = ()
    # what its served requests measured against the cost model (scheduler/calibration.py); None: nothing yet
    served: Served | None = None

    @property
    def can_prefill(self) -> bool:
        return "prefill" in self.roles

    @property
    def can_decode(self) -> bool:
        return "decode" in self.roles


CODECS = ("raw", "int8", "fp8")  # the KV codecs a transfer may use (workers/kv/kvcodecs.py)


@dataclass(frozen=True)
class Placement:
    """``prefill_node`` None means the decode node prefills locally (colocated).

    ``codec`` is the KV codec of the transfer (``raw``, ``int8``, ``fp8``). A
    policy may leave it ``raw``: under ``--kv-codec auto`` the scheduler then
    picks it (``policy.settle_codec``); a lossy codec a policy names is kept.
    An explicit ``--kv-codec`` or request hint overrides the policy's. It has no
    effect on a colocated placement (no KV moves)."""

    prefill_node: str | None
    decode_node: str
    codec: str = "raw"

    @property
    def colocated(self) -> bool:
        """The decode node prefills locally (``check_placement`` turns a placement
        naming the decode node as its prefill node into this form)."""
        return self.prefill_node is None


@dataclass(frozen=True)
class ClusterView:
    """Everything a policy may look at for one request.

    ``cached_tokens`` is per request: node id -> prompt tokens of *this*
    request whose KV that node holds in its prefix cache (whole 64-token
    blocks, never the last prompt token; ``scheduler/prefix_index.py``). A
    node missing from it is unknown: ``cached`` says 0, and ``cached_prefix``
    falls back to the request's own ``cached_prefix_tokens``."""

    nodes: tuple[NodeView, ...]
    links: dict[tuple[str, str], LinkView] = field(default_factory=dict)  # (prefill, decode) -> link
    model_config: dict | None = None  # the model's Hugging Face config.json, for cost models
    weight_format: str | None = None
    cached_tokens: Mapping[str, int] = field(default_factory=dict)  # node id -> prompt tokens it holds
    kv_codec: str = "auto"  # the server's codec mode (--kv-codec); a request's hint overrides it
    kv_dtype: str = "bfloat16"  # the KV's wire dtype (costmodel.kv_dtype_of): sizes transfers and codecs

    def __post_init__(self) -> None:
        check_kv_codec(self.kv_codec, "ClusterView.kv_codec")

    def link(self, src: str, dst: str) -> LinkView | None:
        return self.links.get((src, dst))

    def node(self, node_id: str) -> NodeView:
        return next(n for n in self.nodes if n.node_id == node_id)

    def cached(self, node_id: str) -> int:
        """Prompt tokens of this request whose KV ``node_id`` holds; 0 when unknown."""
        return self.cached_tokens.get(node_id, 0)


def cached_prefix(request: GenerationRequest, cluster: ClusterView, node_id: str) -> int:
    """Prompt tokens of ``request`` that ``node_id`` need not prefill (nor receive).

    The view's per-node figure wins when it has one for ``node_id``; otherwise
    the request's ``cached_prefix_tokens`` applies (the simulator's and old
    callers' "cached on every node" figure). Clamped to ``[0, prompt - 1]``:
    the last prompt token is always computed, its logits give the first token."""
    figure = cluster.cached_tokens.get(node_id, request.cached_prefix_tokens)
    return max(0, min(figure, len(request.prompt_token_ids) - 1))


class PlacementError(ValueError):
    """A policy failed, or answered with a placement that cannot be dispatched; the message names the policy."""


def ask_policy(policy: object, policy_name: str, request: GenerationRequest, view: ClusterView) -> Placement:
    """``policy.place(request, view)``, checked (see ``check_placement``).

    ``NoCapacityError`` from the policy passes through unchanged (no node can
    take the request); anything else it raises becomes a ``PlacementError``
    naming the policy and the request, chained to the original."""
    try:
        placement = policy.place(request, view)  # type: ignore[attr-defined]
    except NoCapacityError:
        raise
    except Exception as e:  # a policy's bug, or a view it cannot use: this request fails, the caller goes on
        raise PlacementError(f"policy {policy_name!r} failed on {request.request_id}: "
                             f"{type(e).__name__}: {e}") from e
    return check_placement(placement, view, policy_name)


def check_placement(placement: object, view: ClusterView, policy_name: str) -> Placement:
    """The placement to dispatch, or ``PlacementError`` naming the policy.

    Refused: anything but a ``Placement``; a codec not in ``CODECS``; a node not in ``view``; decode on a
    node without the decode role; a remote prefill on a node without the
    prefill role. A placement naming the decode node as its own prefill node
    means colocated and comes back as ``Placement(None, decode_node, codec)``,
    so live and simulated runs treat it alike."""
    if not isinstance(placement, Placement):
        raise PlacementError(f"policy {policy_name!r} returned {placement!r}, not a Placement")
    where = f"policy {policy_name!r} returned {placement}"
    if placement.codec not in CODECS:
        raise PlacementError(f"{where}: unknown KV codec {placement.codec!r} (known: {', '.join(CODECS)})")
    if placement.prefill_node == placement.decode_node:
        placement = Placement(None, placement.decode_node, placement.codec)
    nodes = {n.node_id: n for n in view.nodes}
    for node_id in (placement.decode_node, placement.prefill_node):
        if node_id is not None and node_id not in nodes:
            raise PlacementError(f"{where}: no node named {node_id!r} serves this request "
                                 f"(nodes: {', '.join(sorted(nodes)) or 'none'})")
    if not nodes[placement.decode_node].can_decode:
        raise PlacementError(f"{where}: node {placement.decode_node!r} lacks the 'decode' role")
    if placement.prefill_node is not None and not nodes[placement.prefill_node].can_prefill:
        raise PlacementError(f"{where}: node {placement.prefill_node!r} lacks the 'prefill' role")
    return placement
