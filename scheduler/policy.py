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
from pathlib import Path
from typing import Protocol

from scheduler.placement import ClusterView, NodeView, Placement
from scheduler.request import GenerationRequest, NoCapacityError


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


def forced(request: GenerationRequest, cluster: ClusterView, decode: NodeView, prefill: NodeView | None) -> Placement:
    """Apply a request's ``placement`` override on top of a policy's choice."""
    if request.placement == "colocated":
        return Placement(None, decode.node_id)
    if request.placement == "disaggregated" and prefill is None:
        others = prefillers_for(decode, cluster)
        if not others:
            raise NoCapacityError(f"disaggregated placement needs a prefill-capable node other than {decode.node_id!r}")
        prefill = max(others, key=lambda n: (n.tflops, -n.active_requests, n.node_id))
    return Placement(prefill.node_id if prefill else None, decode.node_id)


class Colocated:
    """Every request on one node (the baseline): the decode-capable node with
    the most memory bandwidth prefills locally and decodes."""

    def place(self, request: GenerationRequest, cluster: ClusterView) -> Placement:
        decode = max(decoders_of(request, cluster), key=lambda n: (n.can_prefill, n.mem_bw_gbps, n.node_id))
        return forced(request, cluster, decode, None)


class RoundRobin:
    """Decode nodes in turn; prefill on the next other prefill-capable node in turn."""

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
    prefill on the least loaded other prefill-capable node (ties: more bandwidth,
    more FLOPS)."""

    def place(self, request: GenerationRequest, cluster: ClusterView) -> Placement:
        decode = min(decoders_of(request, cluster), key=lambda n: (n.active_requests, -n.mem_bw_gbps, n.node_id))
        prefillers = prefillers_for(decode, cluster)
        prefill = min(prefillers, key=lambda n: (n.active_requests, -n.tflops, n.node_id)) if prefillers else None
        return forced(request, cluster, decode, prefill)


class FastestPair:
    """Prefill on the prefill-capable node with the most TFLOPS, decode on the
    decode-capable node with the most memory bandwidth; colocated when no other
    prefill-capable node exists. Ties go to the less busy node."""

    def place(self, request: GenerationRequest, cluster: ClusterView) -> Placement:
        decode = max(decoders_of(request, cluster), key=lambda n: (n.mem_bw_gbps, -n.active_requests, n.node_id))
        prefillers = prefillers_for(decode, cluster)
        prefill = max(prefillers, key=lambda n: (n.tflops, -n.active_requests, n.node_id)) if prefillers else None
        if prefill is None and request.placement != "disaggregated":
            decode = max(decoders_of(request, cluster),
                         key=lambda n: (n.can_prefill, n.mem_bw_gbps, -n.active_requests, n.node_id))
        return forced(request, cluster, decode, prefill)


POLICIES: dict[str, type] = {
    "colocated": Colocated,
    "round-robin": RoundRobin,
    "least-loaded": LeastLoaded,
    "fastest-pair": FastestPair,
}


def load_policy(spec: str) -> Policy:
    """A policy instance from a built-in name, ``package.module:Class`` or ``path/to/file.py:Class``."""
    if spec in POLICIES:
        return POLICIES[spec]()
    if ":" not in spec:
        raise ValueError(f"unknown policy {spec!r}: use one of {sorted(POLICIES)}, module:Class or file.py:Class")
    where, _, name = spec.rpartition(":")
    module = _load_file(Path(where)) if where.endswith(".py") else _import(where)
    cls = getattr(module, name, None)
    if cls is None:
        raise ValueError(f"policy {spec!r}: {where} has no attribute {name!r}")
    policy = cls()
    if not callable(getattr(policy, "place", None)):
        raise ValueError(f"policy {spec!r}: {name} has no place(request, cluster) method")
    return policy


def _import(module_name: str):
    try:
        return importlib.import_module(module_name)
    except ImportError as e:
        raise ValueError(f"policy module {module_name!r} cannot be imported: {e}") from None


def _load_file(path: Path):
    if not path.is_file():
        raise ValueError(f"policy file {path} does not exist")
    spec = importlib.util.spec_from_file_location(f"pdc_user_policy_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)  # type: ignore[union-attr]
    return module
