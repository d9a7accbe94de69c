"""Cluster files: a TOML description of machines and the links between them.

``pdc simulate`` reads one to build the nodes and links a policy sees::

    [[nodes]]
    name = "spark"
    hardware = "dgx-spark"          # a catalog name (scheduler/catalog.py)
    roles = ["prefill", "decode"]   # default: both
    # optional overrides: tflops, mem_bw_gbps, mem_gb, engine
    # optional: prefill_probe = [[128, 0.11], [512, 0.95]]  (prompt tokens, seconds of
    #   the served model's prefill, as a worker times it at start-up; prices prefill)
    # optional: device = "cpu"  (the engine device a worker reports; "cpu": a KV codec's
    #   encode shares the prefill's cores and lengthens it; default: the catalog's accelerator)
    # optional: prefill_scale = {local = 1.1, raw = 1.2, int8 = [[141, 1.3], [525, 1.1]]}  (served
    #   prefill / the cost model's, per mode: kept local, or streamed in a codec; a number, or
    #   [tokens, factor] pairs along prompt length; /health's "served")
    # optional: request_overhead_s = {colocated = 0.02, disaggregated = 0.03}  (TTFT beyond
    #   queue, prefill and exposed transfer, with this node decoding; /health's "served")

    [[links]]
    nodes = ["spark", "mac"]
    kind = "10gbe"                  # a catalog link
    # optional overrides: gbit_s (line rate), latency_s, payload_efficiency

A link joins two nodes in both directions, each direction a separate
full-duplex channel. A link without ``kind`` needs ``gbit_s``, taken as the
measured payload rate (``payload_efficiency`` 1). Every error names the
offending entry.
"""
from __future__ import annotations

import sys
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from scheduler import catalog, costmodel

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib

ROLES = ("prefill", "decode")
_NODE_KEYS = {"name", "hardware", "roles", "tflops", "mem_bw_gbps", "mem_gb", "engine", "prefill_probe", "device",
              "prefill_scale", "request_overhead_s"}
_LINK_KEYS = {"nodes", "kind", "gbit_s", "latency_s", "payload_efficiency"}
_TOP_KEYS = {"name", "description", "nodes", "links"}
_CUSTOM_LINK_LATENCY_S = 1e-4


class ClusterFileError(ValueError):
    """A cluster file that cannot describe a cluster; the message names the entry."""


@dataclass(frozen=True)
class NodeSpec:
    """One machine: a catalog hardware entry, its roles, optional overrides."""

    name: str
    hardware: str
    roles: tuple[str, ...] = ROLES
    tflops: float | None = None
    mem_bw_gbps: float | None = None
    mem_gb: float | None = None
    engine: str | None = None
    prefill_probe: tuple[tuple[int, float], ...] = ()  # (tokens, seconds): prices prefill (costmodel.with_probe)
    device: str = ""  # the engine device as a worker reports it ("cpu", "cuda:0"); "" = the catalog's accelerator
    served: costmodel.Served | None = None  # prefill_scale and request_overhead_s (scheduler/calibration.py)

    def machine(self) -> costmodel.Hardware:
        """The catalog hardware with this node's overrides applied."""
        base = catalog.hardware(self.hardware)
        return costmodel.Hardware(
            base.name,
            tflops=self.tflops or base.tflops,
            mem_bw_gbps=self.mem_bw_gbps or base.mem_bw_gbps,
            mem_gb=self.mem_gb or base.mem_gb,
        )


@dataclass(frozen=True)
class LinkSpec:
    """A link between two nodes: a catalog kind and/or explicit figures."""

    nodes: tuple[str, str]
    kind: str | None = None
    gbit_s: float | None = None
    latency_s: float | None = None
    payload_efficiency: float | None = None

    def network(self) -> costmodel.Link:
        """The catalog link with this entry's overrides applied."""
        if self.kind is None:
            base = costmodel.Link("custom", self.gbit_s or 1.0, _CUSTOM_LINK_LATENCY_S, payload_efficiency=1.0)
        else:
            base = catalog.link(self.kind)
        return costmodel.Link(
            base.name,
            gbit_s=self.gbit_s if self.gbit_s is not None else base.gbit_s,
            latency_s=self.latency_s if self.latency_s is not None else base.latency_s,
            payload_efficiency=self.payload_efficiency if self.payload_efficiency is not None
            else base.payload_efficiency,
        )

    @property
    def payload_gbit_s(self) -> float:
        """What a LinkView carries: the payload rate in Gbit/s."""
        return self.network().bytes_per_s * 8 / 1e9


@dataclass(frozen=True)
class ClusterSpec:
    """A whole cluster file, validated."""

    nodes: tuple[NodeSpec, ...]
    links: tuple[LinkSpec, ...] = ()
    name: str = ""

    def node(self, name: str) -> NodeSpec:
        return next(n for n in self.nodes if n.name == name)

    def link_between(self, a: str, b: str) -> LinkSpec | None:
        """The link joining ``a`` and ``b`` (either order), or None."""
        return next((l for l in self.links if set(l.nodes) == {a, b}), None)


def load(path: str | Path) -> ClusterSpec:
    """Read and validate a cluster file."""
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as e:
        raise ClusterFileError(f"cluster file {path}: cannot read it ({e.strerror or e})") from None
    return loads(text, source=str(path))


def loads(text: str, source: str = "<cluster>") -> ClusterSpec:
    """Parse and validate cluster-file TOML text; ``source`` prefixes errors."""
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise ClusterFileError(f"{source}: not valid TOML: {e}") from None
    return parse(data, source)


def parse(data: Mapping[str, Any], source: str = "<cluster>") -> ClusterSpec:
    """Validate a cluster description already read into a dict."""
    _check_keys(data, _TOP_KEYS, f"{source}: the top level")
    raw_nodes = data.get("nodes") or []
    if not isinstance(raw_nodes, list) or not raw_nodes:
        raise ClusterFileError(f"{source}: no [[nodes]]: a cluster needs at least one node")
    nodes = tuple(_parse_node(entry, i, source) for i, entry in enumerate(raw_nodes))
    _check_unique_names(nodes, source)
    if not any("decode" in n.roles for n in nodes):
        raise ClusterFileError(f"{source}: no node has the 'decode' role; at least one must decode")
    raw_links = data.get("links") or []
    if not isinstance(raw_links, list):
        raise ClusterFileError(f"{source}: 'links' must be an array of tables ([[links]])")
    names = {n.name for n in nodes}
    links = tuple(_parse_link(entry, i, names, source) for i, entry in enumerate(raw_links))
    _check_unique_links(links, source)
    return ClusterSpec(nodes, links, str(data.get("name", "")))


def _parse_node(entry: Any, index: int, source: str) -> NodeSpec:
    where = f"{source}: nodes[{index}]"
    if not isinstance(entry, Mapping):
        raise ClusterFileError(f"{where}: must be a table ([[nodes]])")
    name = entry.get("name")
    if not isinstance(name, str) or not name:
        raise ClusterFileError(f"{where}: needs a non-empty string 'name'")
    where = f"{where} ({name!r})"
    _check_keys(entry, _NODE_KEYS, where)
    hardware = entry.get("hardware")
    if not isinstance(hardware, str):
        raise ClusterFileError(f"{where}: needs 'hardware', one of: {', '.join(catalog.HARDWARE)}")
    if hardware not in catalog.HARDWARE:
        raise ClusterFileError(f"{where}: unknown hardware {hardware!r}; known hardware: {', '.join(catalog.HARDWARE)}")
    roles = _parse_roles(entry.get("roles", list(ROLES)), where)
    engine = entry.get("engine")
    if engine is not None and engine not in costmodel.known_engines():
        raise ClusterFileError(f"{where}: unknown engine {engine!r}; known engines: "
                               f"{', '.join(costmodel.known_engines())}")
    return NodeSpec(
        name, hardware, roles,
        tflops=_positive(entry, "tflops", where),
        mem_bw_gbps=_positive(entry, "mem_bw_gbps", where),
        mem_gb=_positive(entry, "mem_gb", where),
        engine=engine,
        prefill_probe=_parse_probe(entry.get("prefill_probe", []), where),
        device=_parse_device(entry.get("device", ""), where),
        served=_parse_served(entry, roles, where),
    )


def _parse_served(entry: Mapping[str, Any], roles: tuple[str, ...], where: str) -> costmodel.Served | None:
    """``prefill_scale`` (mode -> a factor > 0, or [tokens, factor] pairs in ascending tokens, the
    factor along prompt length; a prefill-capable node's) and ``request_overhead_s`` (kind ->
    seconds >= 0; a decode-capable node's) tables."""
    tables, points = [], []
    for key, names, low, role in (("prefill_scale", costmodel.PREFILL_MODES, "> 0", "prefill"),
                                  ("request_overhead_s", costmodel.PLACEMENT_KINDS, ">= 0", "decode")):
        if key in entry and role not in roles:
            raise ClusterFileError(f"{where}: '{key}' applies to a node with the {role!r} role; this one has "
                                   f"{list(roles)}")
        table = entry.get(key, {})
        pairs = " (or [tokens, factor] pairs)" if key == "prefill_scale" else ""
        shape = f"{where}: '{key}' must be a table of {', '.join(names)} to numbers {low}{pairs}"
        if not isinstance(table, Mapping):
            raise ClusterFileError(f"{shape}, got {table!r}")
        figures = []
        for name, value in table.items():
            if name not in names:
                raise ClusterFileError(f"{shape}: unknown key {name!r}")
            if key == "prefill_scale" and isinstance(value, list):
                along = _parse_points(value, f"{shape}, got {name} = {value!r}")
                points.append((name, along))
                value = sorted(f for _, f in along)[len(along) // 2]  # the overall figure: their median
            if not _is_number(value) or not (0 < value < float("inf") if low == "> 0" else 0 <= value < float("inf")):
                raise ClusterFileError(f"{shape}, got {name} = {value!r}")
            figures.append((name, float(value)))
        tables.append(tuple(figures))
    return costmodel.Served(tables[0], tables[1], tuple(points)) if any(tables) else None


def _parse_points(value: list, problem: str) -> tuple[tuple[int, float], ...]:
    """[[tokens >= 1, factor > 0], ...], at least one, in strictly ascending tokens."""
    if not value or not all(_is_token_pair(p) for p in value) or [p[0] for p in value] != sorted({p[0] for p in value}):
        raise ClusterFileError(problem)
    return tuple((int(n), float(f)) for n, f in value)


def _is_token_pair(point: object) -> bool:
    """``[tokens >= 1, a finite number > 0]``."""
    return (isinstance(point, list) and len(point) == 2 and isinstance(point[0], int)
            and not isinstance(point[0], bool) and point[0] >= 1 and _is_number(point[1])
            and 0 < point[1] < float("inf"))


def _parse_device(value: object, where: str) -> str:
    """``device``: the engine device a worker reports (``cpu``: a codec's encode shares its prefill's cores)."""
    if not isinstance(value, str):
        raise ClusterFileError(f"{where}: 'device' must be a string such as \"cpu\" or \"cuda:0\", got {value!r}")
    return value


def _parse_probe(points: Any, where: str) -> tuple[tuple[int, float], ...]:
    """``prefill_probe``: a list of [tokens >= 1, seconds > 0] pairs."""
    shape = f"{where}: 'prefill_probe' must be a list of [tokens, seconds] pairs (tokens >= 1, seconds > 0)"
    if not isinstance(points, list):
        raise ClusterFileError(f"{shape}, got {points!r}")
    for point in points:
        if not _is_token_pair(point):
            raise ClusterFileError(f"{shape}, got {point!r}")
    return tuple((int(n), float(t)) for n, t in points)


def _parse_roles(roles: Any, where: str) -> tuple[str, ...]:
    if not isinstance(roles, list) or not roles or not all(isinstance(r, str) for r in roles):
        raise ClusterFileError(f"{where}: 'roles' must be a non-empty list drawn from {list(ROLES)}, got {roles!r}")
    bad = [r for r in roles if r not in ROLES]
    if bad:
        raise ClusterFileError(f"{where}: bad role {bad[0]!r}; roles are {list(ROLES)}")
    if len(set(roles)) != len(roles):
        raise ClusterFileError(f"{where}: 'roles' lists a role twice: {roles!r}")
    return tuple(roles)


def _parse_link(entry: Any, index: int, names: set[str], source: str) -> LinkSpec:
    where = f"{source}: links[{index}]"
    if not isinstance(entry, Mapping):
        raise ClusterFileError(f"{where}: must be a table ([[links]])")
    ends = entry.get("nodes")
    if not isinstance(ends, list) or len(ends) != 2 or not all(isinstance(n, str) for n in ends):
        raise ClusterFileError(f"{where}: 'nodes' must name exactly two nodes, got {ends!r}")
    where = f"{where} ({ends[0]!r} <-> {ends[1]!r})"
    _check_keys(entry, _LINK_KEYS, where)
    if ends[0] == ends[1]:
        raise ClusterFileError(f"{where}: a link joins two different nodes")
    missing = [n for n in ends if n not in names]
    if missing:
        raise ClusterFileError(f"{where}: no node named {missing[0]!r}; nodes: {', '.join(sorted(names))}")
    kind = entry.get("kind")
    if kind is not None and kind not in catalog.LINKS:
        raise ClusterFileError(f"{where}: unknown link kind {kind!r}; known links: {', '.join(catalog.LINKS)}")
    gbit_s = _positive(entry, "gbit_s", where)
    if kind is None and gbit_s is None:
        raise ClusterFileError(f"{where}: needs 'kind' (one of: {', '.join(catalog.LINKS)}) or 'gbit_s'")
    latency = entry.get("latency_s")
    if latency is not None and (not _is_number(latency) or latency < 0):
        raise ClusterFileError(f"{where}: 'latency_s' must be a number >= 0, got {latency!r}")
    efficiency = _positive(entry, "payload_efficiency", where)
    if efficiency is not None and efficiency > 1:
        raise ClusterFileError(f"{where}: 'payload_efficiency' must be in (0, 1], got {efficiency!r}")
    return LinkSpec((ends[0], ends[1]), kind, gbit_s, None if latency is None else float(latency), efficiency)


def _check_keys(entry: Mapping[str, Any], allowed: set[str], where: str) -> None:
    unknown = sorted(set(entry) - allowed)
    if unknown:
        raise ClusterFileError(f"{where}: unknown key {unknown[0]!r}; allowed: {', '.join(sorted(allowed))}")


def _check_unique_names(nodes: tuple[NodeSpec, ...], source: str) -> None:
    seen: set[str] = set()
    for i, node in enumerate(nodes):
        if node.name in seen:
            raise ClusterFileError(f"{source}: nodes[{i}]: duplicate node name {node.name!r}")
        seen.add(node.name)


def _check_unique_links(links: tuple[LinkSpec, ...], source: str) -> None:
    seen: set[frozenset[str]] = set()
    for i, link in enumerate(links):
        key = frozenset(link.nodes)
        if key in seen:
            raise ClusterFileError(f"{source}: links[{i}]: a second link between {link.nodes[0]!r} and {link.nodes[1]!r}")
        seen.add(key)


def _positive(entry: Mapping[str, Any], key: str, where: str) -> float | None:
    value = entry.get(key)
    if value is None:
        return None
    if not _is_number(value) or value <= 0:
        raise ClusterFileError(f"{where}: {key!r} must be a number > 0, got {value!r}")
    return float(value)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)
