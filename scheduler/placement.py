"""What placement decides over: node and link views in, a ``Placement`` out.

Pure Python over plain dataclasses, so the policies in ``scheduler/policy.py``
run the same way in the live scheduler, in the simulator and in tests with
fake node lists.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from cluster.links import LinkView  # a measured link, as placement sees it


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
    active_requests: int = 0  # requests in flight on this node (our engines run one at a time)
    hardware: str = ""  # catalog name ("dgx-spark", ...) when known: selects calibrated efficiencies
    device_kind: str = ""  # "cuda", "mps", "cpu", "mlx:gpu", ... (for generic efficiencies)
    prefill_backlog_s: float = 0.0  # predicted seconds of prefill work already queued here
    measured: bool = False  # tflops/mem_bw_gbps are a start-up measurement (achieved), not peak figures

    @property
    def can_prefill(self) -> bool:
        return "prefill" in self.roles

    @property
    def can_decode(self) -> bool:
        return "decode" in self.roles


@dataclass(frozen=True)
class Placement:
    """``prefill_node`` None means the decode node prefills locally (colocated)."""

    prefill_node: str | None
    decode_node: str
    codec: str = "raw"

    @property
    def colocated(self) -> bool:
        return self.prefill_node is None


@dataclass(frozen=True)
class ClusterView:
    """Everything a policy may look at for one request."""

    nodes: tuple[NodeView, ...]
    links: dict[tuple[str, str], LinkView] = field(default_factory=dict)  # (prefill, decode) -> link
    model_config: dict | None = None  # the model's Hugging Face config.json, for cost models
    weight_format: str | None = None

    def link(self, src: str, dst: str) -> LinkView | None:
        return self.links.get((src, dst))

    def node(self, node_id: str) -> NodeView:
        return next(n for n in self.nodes if n.node_id == node_id)
