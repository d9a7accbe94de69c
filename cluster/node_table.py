"""The scheduler's live node table: mDNS (``cluster.discovery.Browser``) merged with
static ``--peers`` and the worker actors of a Ray cluster (each address resolved by a
supplied ``probe``), minus nodes that fail a
supplied ``health`` check ``max_failures`` times in a row, minus nodes the scheduler
``suspend()``-ed until their next passing check. ``snapshot()`` is the scheduler's
view; ``refused``, ``down`` and ``tried`` feed ``pdc status``.
"""
from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import Protocol

from cluster.discovery import (
    SERVICE_TYPE,
    Browser,
    OnChange,
    _admission_problem,
    _describe,
)
from cluster.node import NodeInfo

log = logging.getLogger(__name__)

Probe = Callable[[str], Awaitable[NodeInfo]]
# True: healthy; False: failed; a string: healthy but taking no new request (e.g. "draining")
Health = Callable[[str], Awaitable[bool | str]]


class PeerSource(Protocol):
    """A source of worker addresses that come and go (cluster/ray_backend.py's ``RaySource``)."""

    def describe(self) -> str: ...

    async def addresses(self) -> dict[str, str]:
        """grpc address -> a name for it, for every worker there now; raises when it cannot tell."""
        ...


def parse_peer(address: str) -> tuple[str, int]:
    """``host:port`` or ``[v6]:port`` -> (host, port); ``ValueError`` with the address otherwise."""
    host, sep, port = address.rpartition(":")
    host = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    if not sep or not host or not port.isdigit() or not 1 <= int(port) <= 65535:
        raise ValueError(f"peer {address!r}: expected host:port (IPv6 as [addr]:port)")
    return host, int(port)


class NodeTable:
    """The scheduler's live node table: mDNS + static peers + Ray actors, minus nodes that fail health checks.

    Each round (every ``interval`` s): list ``ray``'s addresses (an address it no longer
    lists leaves at once, as a node that leaves mDNS; when the listing fails the last one
    stands and health checks decide), probe peers not yet resolved, then run
    ``health(grpc_address)`` on every known node, each bounded by ``call_timeout``.
    A node failing ``max_failures`` rounds in a row leaves ``snapshot()`` (and shows in
    ``down``) until a check passes again; a static peer is then re-probed. A node that leaves mDNS
    leaves at once. A static peer's address is the one given, whatever its probe says.
    ``suspend(node_id, reason)`` takes a node out of ``snapshot()`` at once; its next passing
    health check (the next round's, not ``max_failures`` of them) re-admits it.
    """

    def __init__(
        self,
        expected_key_fingerprint: str,
        *,
        use_mdns: bool = True,
        interfaces: list[str] | None = None,
        peers: Sequence[str] = (),
        probe: Probe | None = None,
        health: Health | None = None,
        interval: float = 1.0,
        max_failures: int = 3,
        call_timeout: float = 1.0,
        clock: Callable[[], float] = time.monotonic,
        on_change: OnChange | None = None,
        ray: PeerSource | None = None,
    ) -> None:
        if (peers or ray) and probe is None:
            raise ValueError("static peers and Ray actors need a probe(address) -> NodeInfo callable")
        if interval <= 0 or call_timeout <= 0 or max_failures < 1:
            raise ValueError("interval and call_timeout must be > 0 and max_failures >= 1")
        self.peers = {peer: parse_peer(peer) for peer in peers}
        self._peer_source = {peer: "static" for peer in peers}  # address -> "static" | "ray"
        self._ray_names: dict[str, str] = {}  # address -> actor name, as Ray last listed them
        self.ray = ray
        self._ray_status = "not listed yet"
        self.expected_key_fingerprint = expected_key_fingerprint
        self.interfaces = interfaces
        self.probe, self.health = probe, health
        self.interval, self.max_failures, self.call_timeout = interval, max_failures, call_timeout
        self.clock = clock
        self.on_change = on_change
        self.browser = Browser(interfaces, expected_key_fingerprint, self._on_browser_change) if use_mdns else None
        self._static: dict[str, NodeInfo] = {}  # peer address (static or Ray) -> node
        self._peer_status: dict[str, str] = {peer: "not probed yet" for peer in self.peers}
        self._static_refused: dict[str, tuple[str, str]] = {}  # peer address -> (node id, reason)
        self._failures: dict[str, int] = {}  # node id -> health failures in a row
        self._last_ok: dict[str, float] = {}
        # node id -> why the scheduler suspended it; cleared by the node's next passing check or its leaving
        self._suspended: dict[str, str] = {}
        # node id -> why it takes no new request (a drain), as its last health check said
        self._draining: dict[str, str] = {}
        self._published: dict[str, NodeInfo] = {}
        self._loop_task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        """Start browsing and the check loop (its first round runs at once)."""
        if self.browser is not None:
            await self.browser.start()
        self._loop_task = asyncio.get_running_loop().create_task(self._run())

    async def stop(self) -> None:
        task, self._loop_task = self._loop_task, None
        if task is not None:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
        if self.browser is not None:
            await self.browser.stop()

    async def __aenter__(self) -> NodeTable:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    def snapshot(self) -> list[NodeInfo]:
        """Live, admitted nodes sorted by id."""
        return sorted((n for n in self._known().values() if self._is_up(n.node_id)), key=lambda n: n.node_id)

    def node(self, node_id: str) -> NodeInfo | None:
        """The known node ``node_id``, placeable or not (draining, failing, suspended)."""
        return self._known().get(node_id)

    def known_ids(self) -> list[str]:
        return sorted(self._known())

    def suspend(self, node_id: str, reason: str) -> None:
        """Take ``node_id`` out of ``snapshot()`` now (``on_change`` fires); its next passing health check re-admits it.

        Without a ``health`` function the next check round re-admits it. Suspending an
        unknown or already suspended node only records the newest reason.
        """
        already = node_id in self._suspended
        self._suspended[node_id] = reason
        if not already:
            log.info("suspending node %s until its next health check passes: %s", node_id, reason)
        self._publish()

    @property
    def suspended(self) -> dict[str, str]:
        """Nodes the scheduler suspended, not yet re-admitted -> reason."""
        return dict(self._suspended)

    @property
    def refused(self) -> dict[str, str]:
        """Nodes not admitted (wrong cluster key, malformed record, duplicate id) -> reason."""
        refused = dict(self.browser.refused) if self.browser else {}
        refused.update(self._static_refused.values())
        return refused

    @property
    def down(self) -> dict[str, str]:
        """Known nodes currently dropped (failing health checks, or suspended) -> reason."""
        return {node_id: self._down_reason(node_id) for node_id in self._known() if not self._is_up(node_id)}

    def _down_reason(self, node_id: str) -> str:
        if node_id in self._draining and not self._failing(node_id):
            return self._draining[node_id]
        if node_id in self._suspended and not self._failing(node_id):
            return f"suspended: {self._suspended[node_id]}"
        now = self.clock()
        return f"failed {self._failures[node_id]} health checks in a row" + (
            f", last ok {now - self._last_ok[node_id]:.1f} s ago" if node_id in self._last_ok else "")

    @property
    def tried(self) -> list[str]:
        """What was tried, for ``pdc status`` to print when a node is missing."""
        lines = [f"mdns: browsing {SERVICE_TYPE} on {_describe(self.interfaces)}" if self.browser else "mdns: off"]
        if self.ray is not None:
            lines.append(f"ray: {self.ray.describe()}: {self._ray_status}")
        lines += [f"{self._peer_label(peer)}: {status}" for peer, status in self._peer_status.items()]
        return lines

    def _peer_label(self, peer: str) -> str:
        if self._peer_source[peer] == "ray":
            return f"ray actor {self._ray_names.get(peer, '?')} at {peer}"
        return f"static peer {peer}"

    async def _refresh_ray(self) -> None:
        """Follow Ray's listing: new addresses become peers to probe, vanished ones leave now."""
        try:
            listed = await asyncio.wait_for(self.ray.addresses(), max(self.call_timeout, 5.0))  # type: ignore[union-attr]
        except Exception as err:
            self._ray_status = f"listing failed ({type(err).__name__}: {err}); keeping the last listing"
            log.warning("ray: %s", self._ray_status)
            return
        self._ray_status = f"{len(listed)} ready worker actors"
        for peer in [p for p, source in self._peer_source.items() if source == "ray" and p not in listed]:
            log.info("ray actor %s at %s is gone from Ray", self._ray_names.get(peer, "?"), peer)
            self._forget_peer(peer)
        for peer, name in listed.items():
            self._ray_names[peer] = name
            if peer not in self.peers:
                self.peers[peer], self._peer_source[peer] = parse_peer(peer), "ray"
                self._peer_status[peer] = "not probed yet"

    def _forget_peer(self, peer: str) -> None:
        node = self._static.pop(peer, None)
        if node is not None:
            for table in (self._failures, self._suspended, self._draining, self._last_ok):
                table.pop(node.node_id, None)
        for table in (self.peers, self._peer_source, self._peer_status, self._static_refused, self._ray_names):
            table.pop(peer, None)

    async def check_once(self) -> None:
        """One round: follow Ray, probe unresolved peers, then health-check every known node."""
        if self.ray is not None:
            await self._refresh_ray()
        await asyncio.gather(*(self._probe_peer(peer) for peer in self.peers if peer not in self._static))
        if self.health is not None:
            known = self._known()
            results = await asyncio.gather(*(self._check(node) for node in known.values()))
            back = {node.node_id for node, ok in zip(known.values(), results) if self._record_health(node, ok)}
            # a static peer that was down may have restarted with a new profile
            await asyncio.gather(*(self._probe_peer(p) for p, n in self._static.items() if n.node_id in back))
        else:
            self._resume(list(self._suspended))
        self._publish()

    async def _run(self) -> None:
        while True:
            try:
                await self.check_once()
            except Exception:
                log.exception("node table check failed")
            await asyncio.sleep(self.interval)

    async def _probe_peer(self, peer: str) -> None:
        host, port = self.peers[peer]
        self._static_refused.pop(peer, None)
        try:
            node = await asyncio.wait_for(self.probe(peer), self.call_timeout)  # type: ignore[misc]
        except Exception as err:
            if _is_unauthenticated(err):  # it answered, but not to this cluster's key: another cluster's node
                reason = "it does not accept this cluster's key (UNAUTHENTICATED): a node of another cluster"
                self._peer_status[peer] = f"refused: {reason}"
                self._static_refused[peer] = (self._peer_label(peer), reason)
                log.warning("not admitting %s: %s", self._peer_label(peer), reason)
                return
            self._peer_status[peer] = f"probe failed: {type(err).__name__}: {err}".rstrip(": ")
            log.info("%s: %s", self._peer_label(peer), self._peer_status[peer])
            return
        node = dataclasses.replace(node, host=host, grpc_port=port, source=self._peer_source[peer])
        reason = _admission_problem(node, self.expected_key_fingerprint)
        if reason is not None:
            self._peer_status[peer] = f"refused: {reason}"
            self._static_refused[peer] = (node.node_id, reason)
            log.warning("not admitting %s: %s", self._peer_label(peer), reason)
            return
        self._peer_status[peer] = f"ok (node {node.node_id})"
        self._static[peer] = node
        self._failures.pop(node.node_id, None)

    async def _check(self, node: NodeInfo) -> bool:
        try:
            ok = await asyncio.wait_for(self.health(node.grpc_address), self.call_timeout)  # type: ignore[misc]
            return ok if isinstance(ok, str) else bool(ok)
        except Exception as err:
            log.debug("health check of %s at %s failed: %r", node.node_id, node.grpc_address, err)
            return False

    def _record_health(self, node: NodeInfo, ok: bool | str) -> bool:
        """Count a check; return True when the node just came back."""
        was_up, was_failing = self._is_up(node.node_id), self._failing(node.node_id)
        if ok:  # a failed check says nothing about a drain: it stands until a passing check says otherwise
            self._set_draining(node.node_id, ok if isinstance(ok, str) else None)
            self._failures[node.node_id] = 0
            self._last_ok[node.node_id] = self.clock()
            self._resume([node.node_id])
            if was_failing:
                log.info("node %s at %s is back", node.node_id, node.grpc_address)
            return not was_up
        self._failures[node.node_id] = self._failures.get(node.node_id, 0) + 1
        if not was_failing and self._failing(node.node_id):
            log.warning("dropping node %s at %s: %s", node.node_id, node.grpc_address, self.down[node.node_id])
        return False

    def _known(self) -> dict[str, NodeInfo]:
        """Admitted nodes from every source; mDNS wins over a static entry with the same id."""
        known = {node.node_id: node for node in self._static.values()}
        if self.browser is not None:
            known.update(self.browser.nodes)
        return known

    def _is_up(self, node_id: str) -> bool:
        return not self._failing(node_id) and node_id not in self._suspended and node_id not in self._draining

    def mark_draining(self, node_id: str, reason: str | None) -> None:
        """Take ``node_id`` out of placement now (``reason``) or put it back (None), ahead of the
        health check that will say the same; ``on_change`` fires."""
        self._set_draining(node_id, reason)
        self._publish()

    def _set_draining(self, node_id: str, reason: str | None) -> None:
        if reason is None:
            if self._draining.pop(node_id, None) is not None:
                log.info("node %s takes requests again", node_id)
        elif node_id not in self._draining:
            self._draining[node_id] = reason
            log.info("node %s is %s: placing nothing new there", node_id, reason)

    @property
    def draining(self) -> dict[str, str]:
        """Nodes taking no new request -> why."""
        return dict(self._draining)

    def _failing(self, node_id: str) -> bool:
        return self._failures.get(node_id, 0) >= self.max_failures

    def _resume(self, node_ids: list[str]) -> None:
        """Lift the suspension of each node (a check passed, a round ran without checks, or it left)."""
        for node_id in node_ids:
            reason = self._suspended.pop(node_id, None)
            if reason is not None:
                log.info("node %s re-admitted after its suspension (%s)", node_id, reason)

    def _on_browser_change(self, node_id: str, node: NodeInfo | None) -> None:
        if node is None:
            for table in (self._failures, self._suspended, self._draining, self._last_ok):
                table.pop(node_id, None)
        self._publish()

    def _publish(self) -> None:
        """Fire ``on_change`` for every difference between the last snapshot and this one."""
        current = {node.node_id: node for node in self.snapshot()}
        previous, self._published = self._published, current
        if self.on_change is None:
            return
        changes = [(node_id, None) for node_id in previous.keys() - current.keys()]
        changes += [(node_id, node) for node_id, node in current.items() if previous.get(node_id) != node]
        for node_id, node in changes:
            try:
                self.on_change(node_id, node)
            except Exception:
                log.exception("on_change callback failed for node %s", node_id)


def _is_unauthenticated(error: BaseException) -> bool:
    """Whether a probe failed because the worker refused our key (a gRPC UNAUTHENTICATED status)."""
    code = getattr(error, "code", None)
    try:
        return callable(code) and getattr(code(), "name", "") == "UNAUTHENTICATED"
    except Exception:
        return False
