"""Finding nodes: mDNS advertise/browse, static peers, liveness. The only module that imports zeroconf.

Everything it hands out is a plain `NodeInfo` (cluster/node.py), so the scheduler
and its tests work with fake node lists.

- `Advertiser` publishes one node as ``<node_id>._pdcluster._tcp.local.``: the SRV
  port is the gRPC port, the TXT record is `NodeInfo.to_txt()`.
- `Browser` keeps ``nodes`` (admitted, by node id) and ``refused`` (node id, or the
  mDNS instance label when the TXT record could not be read, -> reason). A node
  whose cluster-key fingerprint differs from ours is refused and logged.
- `NodeTable` merges the browser with static ``--peers`` (resolved by a supplied
  ``probe``) and drops nodes that fail a supplied ``health`` check
  ``max_failures`` times in a row; ``snapshot()`` is the scheduler's view.
- `discover_once` browses for a while and returns what it saw, for ``pdc status``.

``interfaces=None`` means all interfaces (real use); tests pass ``["127.0.0.1"]``.
"""
from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import ipaddress
import logging
import time
from collections.abc import Awaitable, Callable, Sequence

import ifaddr
from zeroconf import IPVersion, ServiceStateChange, Zeroconf
from zeroconf.asyncio import AsyncServiceBrowser, AsyncServiceInfo, AsyncZeroconf

from cluster.node import NodeInfo

log = logging.getLogger(__name__)

SERVICE_TYPE = "_pdcluster._tcp.local."
REGISTER_TIMEOUT_S = 10.0  # probing + announcing takes ~1.7 s
RESOLVE_TIMEOUT_S = 3.0

OnChange = Callable[[str, "NodeInfo | None"], None]
Probe = Callable[[str], Awaitable[NodeInfo]]
Health = Callable[[str], Awaitable[bool]]


def instance_name(node_id: str) -> str:
    """The DNS-SD instance name of a node (dots would split the label, so they become dashes)."""
    return f"{node_id.replace('.', '-')}.{SERVICE_TYPE}"


def _zeroconf(interfaces: list[str] | None) -> AsyncZeroconf:
    return AsyncZeroconf() if interfaces is None else AsyncZeroconf(interfaces=list(interfaces))


def _describe(interfaces: list[str] | None) -> str:
    return "all interfaces" if interfaces is None else "interfaces " + ",".join(interfaces)


class Advertiser:
    """Publish one node over mDNS: ``await start()``, ``await update(node)``, ``await stop()``."""

    def __init__(self, node: NodeInfo, interfaces: list[str] | None = None) -> None:
        self.node = node
        self.interfaces = interfaces
        self._aiozc: AsyncZeroconf | None = None
        self._info: AsyncServiceInfo | None = None

    async def start(self) -> None:
        """Register the service; raises zeroconf's ``NonUniqueNameException`` if the node id is taken."""
        if self._aiozc is not None:
            raise RuntimeError("Advertiser already started")
        self._aiozc = _zeroconf(self.interfaces)
        try:
            self._info = await self._service_info(self.node)
            await asyncio.wait_for(_settle(self._aiozc.async_register_service(self._info)), REGISTER_TIMEOUT_S)
        except BaseException:
            await self.stop()
            raise
        node = self.node
        log.info("advertising node %s at %s on %s", node.node_id, node.grpc_address, _describe(self.interfaces))

    async def update(self, node: NodeInfo) -> None:
        """Re-publish the TXT record (and addresses) for the same node id."""
        if self._aiozc is None:
            raise RuntimeError("Advertiser not started")
        if node.node_id != self.node.node_id:
            raise ValueError(f"update cannot rename node {self.node.node_id!r} to {node.node_id!r}")
        info = await self._service_info(node)
        await asyncio.wait_for(_settle(self._aiozc.async_update_service(info)), REGISTER_TIMEOUT_S)
        self.node, self._info = node, info

    async def stop(self) -> None:
        """Send goodbyes and close; safe to call twice."""
        aiozc, info, self._aiozc, self._info = self._aiozc, self._info, None, None
        if aiozc is None:
            return
        try:
            if info is not None:
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(_settle(aiozc.async_unregister_service(info)), REGISTER_TIMEOUT_S)
        finally:
            await asyncio.wait_for(aiozc.async_close(), REGISTER_TIMEOUT_S)

    async def __aenter__(self) -> Advertiser:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    async def _service_info(self, node: NodeInfo) -> AsyncServiceInfo:
        label = node.node_id.replace(".", "-")
        return AsyncServiceInfo(
            SERVICE_TYPE,
            instance_name(node.node_id),
            port=node.grpc_port,
            properties=node.to_txt(),
            server=f"pdc-{label}.local.",
            parsed_addresses=await _advertised_addresses(node.host, self.interfaces),
        )


async def _settle(registration: Awaitable[Awaitable[object]]) -> None:
    """zeroconf's async register/update/unregister return a second awaitable: the announcements."""
    await (await registration)


async def _advertised_addresses(host: str, interfaces: list[str] | None) -> list[str]:
    """IP addresses for the A/AAAA records: the host itself, its resolution, or (0.0.0.0/::) the interfaces'."""
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        infos = await asyncio.wait_for(asyncio.get_running_loop().getaddrinfo(host, None), RESOLVE_TIMEOUT_S)
        return sorted({str(info[4][0]) for info in infos})
    if not ip.is_unspecified:
        return [host]
    if interfaces is not None:
        return [i for i in interfaces if not ipaddress.ip_address(i).is_unspecified]
    found = [
        str(a.ip if isinstance(a.ip, str) else a.ip[0]) for adapter in ifaddr.get_adapters() for a in adapter.ips
    ]
    usable = [a for a in found if not ipaddress.ip_address(a).is_loopback and not ipaddress.ip_address(a).is_link_local]
    return usable or ["127.0.0.1"]


class Browser:
    """Watch ``_pdcluster._tcp.local.``; keep ``nodes`` (admitted) and ``refused`` (with reasons)."""

    def __init__(
        self,
        interfaces: list[str] | None,
        expected_key_fingerprint: str,
        on_change: OnChange | None = None,
        resolve_timeout: float = RESOLVE_TIMEOUT_S,
    ) -> None:
        self.interfaces = interfaces
        self.expected_key_fingerprint = expected_key_fingerprint
        self.on_change = on_change
        self.resolve_timeout = resolve_timeout
        self.nodes: dict[str, NodeInfo] = {}
        self.refused: dict[str, str] = {}
        self._node_by_name: dict[str, str] = {}  # instance name -> admitted node id
        self._refused_by_name: dict[str, str] = {}  # instance name -> key in `refused`
        self._tasks: set[asyncio.Task[None]] = set()  # every resolution still running (strong references)
        self._latest: dict[str, asyncio.Task[None]] = {}  # instance name -> its newest resolution
        self._aiozc: AsyncZeroconf | None = None
        self._browser: AsyncServiceBrowser | None = None

    async def start(self) -> None:
        if self._aiozc is not None:
            raise RuntimeError("Browser already started")
        self._aiozc = _zeroconf(self.interfaces)
        self._browser = AsyncServiceBrowser(
            self._aiozc.zeroconf, [SERVICE_TYPE], handlers=[self._on_service_state_change]
        )
        log.debug("browsing %s on %s", SERVICE_TYPE, _describe(self.interfaces))

    async def stop(self) -> None:
        """Stop browsing, cancel pending resolutions and close; safe to call twice."""
        aiozc, browser, self._aiozc, self._browser = self._aiozc, self._browser, None, None
        if browser is not None:
            await browser.async_cancel()
        tasks = list(self._tasks)
        self._latest.clear()
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        if aiozc is not None:
            await asyncio.wait_for(aiozc.async_close(), REGISTER_TIMEOUT_S)

    async def __aenter__(self) -> Browser:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    def _on_service_state_change(
        self, zeroconf: Zeroconf, service_type: str, name: str, state_change: ServiceStateChange
    ) -> None:
        """zeroconf calls this on its event loop with exactly these keyword names."""
        previous = self._latest.pop(name, None)
        if previous is not None:  # a newer event supersedes it
            previous.cancel()
        if state_change is ServiceStateChange.Removed:
            self._forget(name)
            return
        task = asyncio.get_running_loop().create_task(self._resolve(zeroconf, service_type, name))
        self._tasks.add(task)
        self._latest[name] = task
        task.add_done_callback(lambda done, name=name: self._task_done(name, done))

    def _task_done(self, name: str, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        if self._latest.get(name) is task:
            del self._latest[name]
        if not task.cancelled() and task.exception() is not None:
            log.error("resolving %s failed", name, exc_info=task.exception())

    async def _resolve(self, zeroconf: Zeroconf, service_type: str, name: str) -> None:
        info = AsyncServiceInfo(service_type, name)
        label = name[: -len(service_type) - 1] if name.endswith("." + service_type) else name
        if not await info.async_request(zeroconf, self.resolve_timeout * 1000):
            if name in self._node_by_name:  # an update we could not read: keep what we have
                log.info("could not re-resolve %s; keeping its last profile", name)
                return
            self._refuse(name, label, f"did not resolve within {self.resolve_timeout:g} s", logging.INFO)
            return
        host = _pick_address(info)
        if host is None:
            self._refuse(name, label, "advertised no IP address", logging.WARNING)
            return
        try:
            node = NodeInfo.from_txt(info.properties, host, info.port, source="mdns")
        except ValueError as err:
            self._refuse(name, label, f"malformed TXT record: {err}", logging.WARNING)
            return
        reason = _admission_problem(node, self.expected_key_fingerprint)
        owner = next((n for n, node_id in self._node_by_name.items() if node_id == node.node_id and n != name), None)
        if reason is None and owner is not None:
            reason = f"duplicate node id: {owner} already advertises {node.node_id}"
        if reason is not None:
            self._refuse(name, node.node_id, reason, logging.WARNING)
            return
        self._admit(name, node)

    def _admit(self, name: str, node: NodeInfo) -> None:
        self._clear_refusal(name)
        if self._node_by_name.get(name, node.node_id) != node.node_id:
            self._forget(name)
        known = name in self._node_by_name
        self._node_by_name[name] = node.node_id
        if self.nodes.get(node.node_id) != node:
            log.info("node %s at %s %s", node.node_id, node.grpc_address, "updated" if known else "found")
            self.nodes[node.node_id] = node
            self._notify(node.node_id, node)

    def _refuse(self, name: str, key: str, reason: str, level: int) -> None:
        if self.refused.get(key) == reason:  # said so already; a refused node's updates must not flood the log
            level = logging.DEBUG
        self._forget(name)
        self._clear_refusal(name)
        self.refused[key] = reason
        self._refused_by_name[name] = key
        log.log(level, "not admitting mDNS service %s: %s", name, reason)

    def _forget(self, name: str) -> None:
        self._clear_refusal(name)
        node_id = self._node_by_name.pop(name, None)
        if node_id is not None and self.nodes.pop(node_id, None) is not None:
            log.info("node %s left", node_id)
            self._notify(node_id, None)

    def _clear_refusal(self, name: str) -> None:
        key = self._refused_by_name.pop(name, None)
        if key is not None:
            self.refused.pop(key, None)

    def _notify(self, node_id: str, node: NodeInfo | None) -> None:
        if self.on_change is None:
            return
        try:
            self.on_change(node_id, node)
        except Exception:
            log.exception("on_change callback failed for node %s", node_id)


def _pick_address(info: AsyncServiceInfo) -> str | None:
    """Prefer a routable IPv4 address, then any IPv4, then IPv6 (link-local ones with their scope)."""
    v4 = info.parsed_addresses(IPVersion.V4Only)
    routable = [a for a in v4 if not ipaddress.ip_address(a).is_link_local]
    v6 = info.parsed_scoped_addresses(IPVersion.V6Only)
    return (routable or v4 or v6 or [None])[0]


def _admission_problem(node: NodeInfo, expected_key_fingerprint: str) -> str | None:
    """Why a node must not join this cluster, or None."""
    if node.key_fingerprint != expected_key_fingerprint:
        return (
            f"node {node.node_id} at {node.grpc_address} has cluster-key fingerprint "
            f"{node.key_fingerprint!r}, this cluster expects {expected_key_fingerprint!r}"
        )
    return None


async def discover_once(
    timeout: float, interfaces: list[str] | None, expected_key_fingerprint: str
) -> tuple[list[NodeInfo], dict[str, str]]:
    """Browse for ``timeout`` seconds; return the admitted nodes (by id) and the refused ones with reasons."""
    browser = Browser(interfaces, expected_key_fingerprint)
    await browser.start()
    try:
        await asyncio.sleep(timeout)
        return sorted(browser.nodes.values(), key=lambda n: n.node_id), dict(browser.refused)
    finally:
        await browser.stop()


def parse_peer(address: str) -> tuple[str, int]:
    """``host:port`` or ``[v6]:port`` -> (host, port); ``ValueError`` with the address otherwise."""
    host, sep, port = address.rpartition(":")
    host = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    if not sep or not host or not port.isdigit() or not 1 <= int(port) <= 65535:
        raise ValueError(f"peer {address!r}: expected host:port (IPv6 as [addr]:port)")
    return host, int(port)


class NodeTable:
    """The scheduler's live node table: mDNS + static peers, minus nodes that fail health checks.

    Each round (every ``interval`` s): probe static peers not yet resolved, then run
    ``health(grpc_address)`` on every known node, each bounded by ``call_timeout``.
    A node failing ``max_failures`` rounds in a row leaves ``snapshot()`` (and shows in
    ``down``) until a check passes again; a static peer is then re-probed. A node that leaves mDNS
    leaves at once. A static peer's address is the one given, whatever its probe says.
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
    ) -> None:
        if peers and probe is None:
            raise ValueError("static peers need a probe(address) -> NodeInfo callable")
        if interval <= 0 or call_timeout <= 0 or max_failures < 1:
            raise ValueError("interval and call_timeout must be > 0 and max_failures >= 1")
        self.peers = {peer: parse_peer(peer) for peer in peers}
        self.expected_key_fingerprint = expected_key_fingerprint
        self.interfaces = interfaces
        self.probe, self.health = probe, health
        self.interval, self.max_failures, self.call_timeout = interval, max_failures, call_timeout
        self.clock = clock
        self.on_change = on_change
        self.browser = Browser(interfaces, expected_key_fingerprint, self._on_browser_change) if use_mdns else None
        self._static: dict[str, NodeInfo] = {}  # peer address -> node
        self._peer_status: dict[str, str] = {peer: "not probed yet" for peer in self.peers}
        self._static_refused: dict[str, tuple[str, str]] = {}  # peer address -> (node id, reason)
        self._failures: dict[str, int] = {}  # node id -> health failures in a row
        self._last_ok: dict[str, float] = {}
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

    @property
    def refused(self) -> dict[str, str]:
        """Nodes not admitted (wrong cluster key, malformed record, duplicate id) -> reason."""
        refused = dict(self.browser.refused) if self.browser else {}
        refused.update(self._static_refused.values())
        return refused

    @property
    def down(self) -> dict[str, str]:
        """Known nodes currently dropped for failing health checks -> reason."""
        now = self.clock()
        return {
            node_id: f"failed {self._failures[node_id]} health checks in a row"
            + (f", last ok {now - self._last_ok[node_id]:.1f} s ago" if node_id in self._last_ok else "")
            for node_id in self._known()
            if not self._is_up(node_id)
        }

    @property
    def tried(self) -> list[str]:
        """What was tried, for ``pdc status`` to print when a node is missing."""
        lines = [f"mdns: browsing {SERVICE_TYPE} on {_describe(self.interfaces)}" if self.browser else "mdns: off"]
        lines += [f"static peer {peer}: {status}" for peer, status in self._peer_status.items()]
        return lines

    async def check_once(self) -> None:
        """One round: probe unresolved static peers, then health-check every known node."""
        await asyncio.gather(*(self._probe_peer(peer) for peer in self.peers if peer not in self._static))
        if self.health is not None:
            known = self._known()
            results = await asyncio.gather(*(self._check(node) for node in known.values()))
            back = {node.node_id for node, ok in zip(known.values(), results) if self._record_health(node, ok)}
            # a static peer that was down may have restarted with a new profile
            await asyncio.gather(*(self._probe_peer(p) for p, n in self._static.items() if n.node_id in back))
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
            self._peer_status[peer] = f"probe failed: {type(err).__name__}: {err}".rstrip(": ")
            log.info("static peer %s: %s", peer, self._peer_status[peer])
            return
        node = dataclasses.replace(node, host=host, grpc_port=port, source="static")
        reason = _admission_problem(node, self.expected_key_fingerprint)
        if reason is not None:
            self._peer_status[peer] = f"refused: {reason}"
            self._static_refused[peer] = (node.node_id, reason)
            log.warning("not admitting static peer %s: %s", peer, reason)
            return
        self._peer_status[peer] = f"ok (node {node.node_id})"
        self._static[peer] = node
        self._failures.pop(node.node_id, None)

    async def _check(self, node: NodeInfo) -> bool:
        try:
            return bool(await asyncio.wait_for(self.health(node.grpc_address), self.call_timeout))  # type: ignore[misc]
        except Exception as err:
            log.debug("health check of %s at %s failed: %r", node.node_id, node.grpc_address, err)
            return False

    def _record_health(self, node: NodeInfo, ok: bool) -> bool:
        """Count a check; return True when the node just came back."""
        was_up = self._is_up(node.node_id)
        if ok:
            self._failures[node.node_id] = 0
            self._last_ok[node.node_id] = self.clock()
            if not was_up:
                log.info("node %s at %s is back", node.node_id, node.grpc_address)
            return not was_up
        self._failures[node.node_id] = self._failures.get(node.node_id, 0) + 1
        if was_up and not self._is_up(node.node_id):
            log.warning("dropping node %s at %s: %s", node.node_id, node.grpc_address, self.down[node.node_id])
        return False

    def _known(self) -> dict[str, NodeInfo]:
        """Admitted nodes from every source; mDNS wins over a static entry with the same id."""
        known = {node.node_id: node for node in self._static.values()}
        if self.browser is not None:
            known.update(self.browser.nodes)
        return known

    def _is_up(self, node_id: str) -> bool:
        return self._failures.get(node_id, 0) < self.max_failures

    def _on_browser_change(self, node_id: str, node: NodeInfo | None) -> None:
        if node is None:
            self._failures.pop(node_id, None)
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
