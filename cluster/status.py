"""``pdc status``: what this machine can see of the cluster."""
from __future__ import annotations

import asyncio
import json
from dataclasses import asdict, dataclass

from cluster.discovery import SERVICE_TYPE, discover_once
from cluster.node import NodeInfo
from cluster.links import LinkRecord, LinkTable

COLUMNS = ("node", "roles", "engine", "model", "address", "kv", "device", "hardware", "TFLOPS", "GB/s", "free mem",
           "profile", "source")
LINK_COLUMNS = ("prefill node", "decode node", "Gbit/s", "latency ms", "")
LOAD_COLUMNS = ("node", "running", "leases", "reserved KV", "prefix cache", "prefix hits", "reused tokens")
STATS_TIMEOUT_S = 3.0
LINK_PROBE_TIMEOUT_S = 10.0


@dataclass(frozen=True)
class StatusConfig:
    timeout_s: float = 3.0
    peers: tuple[str, ...] = ()
    ray: str | None = None  # Ray cluster address whose worker actors to list ("auto": the one on this machine)
    interfaces: tuple[str, ...] | None = None
    cluster_key_file: str | None = None
    as_json: bool = False
    links: bool = True  # probe each prefill -> decode link

    def __post_init__(self) -> None:
        if self.timeout_s <= 0:
            raise ValueError("--timeout must be positive")


async def run_status(config: StatusConfig) -> int:
    from cluster.auth import load_cluster_key

    key = load_cluster_key(config.cluster_key_file)
    interfaces = list(config.interfaces) if config.interfaces else None
    nodes, refused = await discover_once(config.timeout_s, interfaces, key.fingerprint)
    peer_nodes, peer_errors = await _probe_peers(config.peers, key)
    if config.ray is not None:
        ray_nodes, ray_errors = await _probe_ray(config.ray, key)
        peer_nodes, peer_errors = [*peer_nodes, *ray_nodes], {**peer_errors, **ray_errors}
    nodes = sorted({n.node_id: n for n in [*nodes, *peer_nodes]}.values(), key=lambda n: n.node_id)
    links = await probe_links(nodes, key) if config.links else []
    loads = await node_loads(nodes, key)
    if config.as_json:
        print(json.dumps({"nodes": [asdict(n) for n in nodes], "links": [r.as_json(r.measured_at) for r in links],
                          "load": loads, "refused": refused, "peer_errors": peer_errors}))
        return 0 if nodes else 1
    if nodes:
        print(format_table(nodes))
        print()
        print(format_loads(loads))
    if links:
        print()
        print(format_links(links))
    for node_id, reason in refused.items():
        print(f"refused {node_id}: {reason}")
    for peer, error in peer_errors.items():
        print(f"peer {peer}: {error}")
    if not nodes:
        print(nothing_found(config, key.fingerprint, bool(refused)))
        return 1
    return 0


async def _probe_ray(address: str, key) -> tuple[list[NodeInfo], dict[str, str]]:
    """The Ray worker actors' nodes, each probed over the keyed control plane like a peer."""
    from cluster.ray_backend import RaySource

    source = RaySource(None if address == "auto" else address)
    try:
        listed = await source.addresses()
    except Exception as e:
        return [], {f"ray {address}": f"{type(e).__name__}: {e}"}
    return await _probe_peers(tuple(listed), key, source="ray")


async def _probe_peers(peers: tuple[str, ...], key, source: str = "static") -> tuple[list[NodeInfo], dict[str, str]]:
    from workers.rpc.client import WorkerClient, node_from_info

    found, errors = [], {}
    for peer in peers:
        client = WorkerClient(peer, key)
        try:
            found.append(node_from_info(await client.info(timeout=3.0), peer, source=source))
        except Exception as e:
            errors[peer] = f"{type(e).__name__}: {getattr(e, 'details', lambda: str(e))() or e}"
        finally:
            await client.close()
    return found, errors


async def probe_links(nodes: list[NodeInfo], key) -> list[LinkRecord]:
    """Ask each prefill-capable node to probe its link to each decode-capable node, one at a time."""
    from workers.rpc.client import WorkerClient

    clients: dict[str, WorkerClient] = {}

    async def probe(src: NodeInfo, dst: NodeInfo) -> tuple[float, float]:
        if src.grpc_address not in clients:
            clients[src.grpc_address] = WorkerClient(src.grpc_address, key)
        reply = await clients[src.grpc_address].probe_link(dst.host, dst.kv_port, timeout=LINK_PROBE_TIMEOUT_S)
        return reply.gbps, reply.latency_s

    table = LinkTable(probe)
    try:
        await table.refresh(nodes)
    finally:
        for client in clients.values():
            await client.close()
    return [record for _, record in sorted(table.records.items())]


def format_table(nodes: list[NodeInfo]) -> str:
    rows = [COLUMNS] + [
        (n.node_id, "/".join(n.roles), n.engine, n.model_id, n.grpc_address, str(n.kv_port), n.device,
         n.hardware or "-", f"{n.tflops:.3g}", f"{n.mem_bw_gbps:.3g}", _gib(n.free_mem_bytes), n.profile_source,
         n.source)
        for n in nodes
    ]
    return columns(rows)


async def node_loads(nodes: list[NodeInfo], key) -> dict[str, dict]:
    """Each node's ``Stats`` now: what it runs and holds (its decode batch, leases,
    prefix cache), or the error that kept it from answering."""
    from workers.rpc.client import WorkerClient

    async def one(node: NodeInfo) -> dict:
        client = WorkerClient(node.grpc_address, key)
        try:
            stats = await client.stats(timeout=STATS_TIMEOUT_S)
        except Exception as e:
            details = e.details() if callable(getattr(e, "details", None)) else ""
            return {"error": f"{type(e).__name__}: {details or e}"}
        finally:
            await client.close()
        return {"running_requests": stats.running_requests, "active_leases": stats.active_leases,
                "reserved_kv_bytes": stats.reserved_kv_bytes, "prefix_cache_bytes": stats.prefix_cache_bytes,
                "prefix_cache_capacity_bytes": stats.prefix_cache_capacity_bytes, "prefix_hits": stats.prefix_hits,
                "prefix_hit_tokens": stats.prefix_hit_tokens, "prefix_blocks": len(stats.prefix_blocks)}

    answers = await asyncio.gather(*(one(n) for n in nodes))
    return {n.node_id: answer for n, answer in zip(nodes, answers)}


def format_loads(loads: dict[str, dict]) -> str:
    """One row per node: its decode batch, leases, reserved KV and prefix cache."""
    rows = [LOAD_COLUMNS]
    for node_id, load in loads.items():
        if "error" in load:
            rows.append((node_id, "-", "-", "-", "-", "-", f"stats failed: {load['error']}"))
            continue
        cache = (f"{_mb(load['prefix_cache_bytes'])} of {_mb(load['prefix_cache_capacity_bytes'])}"
                 if load["prefix_cache_capacity_bytes"] else "off")
        rows.append((node_id, str(load["running_requests"]), str(load["active_leases"]),
                     _mb(load["reserved_kv_bytes"]), cache, str(load["prefix_hits"]), str(load["prefix_hit_tokens"])))
    return columns(rows)


def _mb(num_bytes: int) -> str:
    return f"{num_bytes / 1e6:.1f} MB"


def format_links(links: list[LinkRecord]) -> str:
    """One row per probed (prefill, decode) link; a failed probe shows why."""
    rows = [LINK_COLUMNS] + [
        (r.src, r.dst, f"{r.gbps:.2f}" if r.ok else "-", f"{r.latency_s * 1e3:.2f}" if r.ok else "-",
         "" if r.ok else f"probe failed: {r.error}")
        for r in links
    ]
    return columns(rows)


def columns(rows: list[tuple[str, ...]]) -> str:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in rows]
    lines.insert(1, "  ".join("-" * w for w in widths if w).rstrip())
    return "\n".join(lines)


def nothing_found(config: StatusConfig, fingerprint: str, any_refused: bool) -> str:
    where = ", ".join(config.interfaces) if config.interfaces else "all interfaces"
    tried = [f"mDNS browse for {SERVICE_TYPE} on {where} for {config.timeout_s:.0f} s "
             f"(cluster key fingerprint {fingerprint})"]
    tried += [f"static peer {p}" for p in config.peers]
    hints = [
        "is a worker running? start one with `pdc worker --role both --engine torch --model DIR`",
        "networks that drop multicast (VPNs, Wi-Fi client isolation, macOS over SSH): pass --peers host:port",
    ]
    if any_refused:
        hints.insert(0, "nodes answered but use another cluster key: copy the key file from `pdc init` to every node")
    return "no pdcluster nodes found.\ntried:\n" + "\n".join(f"  - {t}" for t in tried) + \
        "\nhints:\n" + "\n".join(f"  - {h}" for h in hints)


def _gib(num_bytes: int) -> str:
    return f"{num_bytes / (1 << 30):.1f} GiB" if num_bytes else "?"


if __name__ == "__main__":
    raise SystemExit(asyncio.run(run_status(StatusConfig())))
