"""Placement: where a request prefills, where it decodes, and with which codec.

Pure Python over plain dataclasses, so policies run the same way in the live
scheduler and in tests with fake node lists. A policy is a small class with a
``place`` method; ``POLICIES`` maps names to classes.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

from scheduler.request import GenerationRequest, NoCapacityError


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
    active_requests: int = 0

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


class Policy(Protocol):
    def place(self, request: GenerationRequest, nodes: list[NodeView]) -> Placement:
        """Choose nodes for ``request`` among ``nodes`` (all serve its model)."""
        ...


class FastestPair:
    """Prefill on the prefill-capable node with the most TFLOPS, decode on the
    decode-capable node with the most memory bandwidth; colocated when only
    one node exists or the request asks for it. Ties go to the less busy node."""

    def place(self, request: GenerationRequest, nodes: list[NodeView]) -> Placement:
        decoders = [n for n in nodes if n.can_decode]
        if not decoders:
            raise NoCapacityError(f"no decode-capable node serves model {request.model!r}")
        decode = max(decoders, key=lambda n: (n.mem_bw_gbps, -n.active_requests, n.node_id))
        if request.placement == "colocated":
            return Placement(None, _best_colocated(decoders).node_id)
        prefillers = [n for n in nodes if n.can_prefill and n.node_id != decode.node_id]
        if not prefillers:
            if request.placement == "disaggregated":
                raise NoCapacityError(
                    f"disaggregated placement needs a prefill-capable node other than {decode.node_id!r}"
                )
            return Placement(None, _best_colocated(decoders).node_id)
        prefill = max(prefillers, key=lambda n: (n.tflops, -n.active_requests, n.node_id))
        return Placement(prefill.node_id, decode.node_id)


def _best_colocated(decoders: list[NodeView]) -> NodeView:
    # A colocated node does both phases: prefer one that can prefill too, then bandwidth.
    return max(decoders, key=lambda n: (n.can_prefill, n.mem_bw_gbps, -n.active_requests, n.node_id))


POLICIES: dict[str, type] = {"fastest-pair": FastestPair}
