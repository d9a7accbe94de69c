"""Finding nodes: mDNS advertise/browse, static peers, liveness. The only module that imports zeroconf.

Everything it hands out is a plain `NodeInfo` (cluster/node.py), so the scheduler
and its tests work with fake node lists.

- `Advertiser` publishes one node as ``<node_id>-<key fingerprint>._pdcluster._tcp.local.``:
  the SRV port is the gRPC port, the TXT record is `NodeInfo.to_txt()`. The key
  fingerprint in the instance name keeps two clusters' records apart even when
  their node ids collide: their goodbyes and updates never touch each other's.
- `Browser` keeps ``nodes`` (admitted, by node id) and ``refused`` (node id, or the
  mDNS instance label when the TXT record could not be read or the id is one of
  ours, -> reason). Another cluster's node (another key fingerprint) is ignored
  quietly: one debug line, and it still shows in ``refused`` for ``pdc status``.
  A refused record never removes or replaces an admitted node.
- `cluster/node_table.py` builds the scheduler's live view on top of `Browser`.
- `discover_once` browses for a while and returns what it saw, for ``pdc status``.

``interfaces=None`` means all interfaces (real use); tests pass ``["127.0.0.1"]``.
"""
from __future__ import annotations

import asyncio
import contextlib
import hashlib
import ipaddress
import logging
import re
from collections.abc import Awaitable, Callable

import ifaddr
from zeroconf import IPVersion, ServiceStateChange, Zeroconf
from zeroconf.asyncio import AsyncServiceBrowser, AsyncServiceInfo, AsyncZeroconf

from cluster.node import NodeInfo

log = logging.getLogger(__name__)

SERVICE_TYPE = "_pdcluster._tcp.local."
REGISTER_TIMEOUT_S = 10.0  # probing + announcing takes ~1.7 s
RESOLVE_TIMEOUT_S = 3.0

OnChange = Callable[[str, "NodeInfo | None"], None]


MAX_LABEL_BYTES = 63  # one DNS label


def instance_name(node_id: str, key_fingerprint: str) -> str:
    """The DNS-SD instance name of a node: its id and its cluster-key fingerprint, one DNS label.

    Dots would split the label, so they become dashes; an id too long to fit beside
    the fingerprint is cut and given a hash of the whole id, so names stay distinct.
    """
    kfp = re.sub(r"[^A-Za-z0-9-]", "-", key_fingerprint)[:16] or "nokey"
    label = node_id.replace(".", "-")
    room = MAX_LABEL_BYTES - len(kfp) - 1
    if len(label) > room:
        label = f"{label[: room - 9]}-{hashlib.sha256(node_id.encode()).hexdigest()[:8]}"
    return f"{label}-{kfp}.{SERVICE_TYPE}"


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
            instance_name(node.node_id, node.key_fingerprint),
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
        label = _label(name)
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
        if reason is not None:  # another cluster's node: not ours to report loudly
            self._refuse(name, node.node_id, f"another cluster: {reason}", logging.DEBUG)
            return
        owner = next((n for n, node_id in self._node_by_name.items() if node_id == node.node_id and n != name), None)
        if owner is not None:
            self._refuse(name, node.node_id, f"duplicate node id: {owner} already advertises {node.node_id}",
                         logging.WARNING)
            return
        self._admit(name, node)

    def _admit(self, name: str, node: NodeInfo) -> None:
        self._clear_refusal(name)
        if self._node_by_name.get(name, node.node_id) != node.node_id:
            self._forget(name)
        self._rekey_refusals_of(node.node_id)
        known = name in self._node_by_name
        self._node_by_name[name] = node.node_id
        if self.nodes.get(node.node_id) != node:
            log.info("node %s at %s %s", node.node_id, node.grpc_address, "updated" if known else "found")
            self.nodes[node.node_id] = node
            self._notify(node.node_id, node)

    def _refuse(self, name: str, key: str, reason: str, level: int) -> None:
        """Record why ``name`` is not admitted; log it once.

        Invariant: a refused record never removes or replaces an admitted node; only
        the admitted instance's goodbye does (and the node table's health checks).
        """
        if key in self.nodes:  # the id is one of ours: a stranger must not shadow it in `refused`
            key = _label(name)
        said = self.refused.get(key) == reason  # a refused node's updates must not flood the log
        self._clear_refusal(name)
        self.refused[key] = reason
        self._refused_by_name[name] = key
        if not said:
            log.log(level, "not admitting mDNS service %s: %s", name, reason)

    def _rekey_refusals_of(self, node_id: str) -> None:
        """A node id just admitted: refusals filed under that id move to their instance labels."""
        for name, key in list(self._refused_by_name.items()):
            if key == node_id:
                self.refused[_label(name)] = self.refused.pop(key)
                self._refused_by_name[name] = _label(name)

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


def _label(name: str) -> str:
    """An mDNS instance name without the service type."""
    suffix = "." + SERVICE_TYPE
    return name[: -len(suffix)] if name.endswith(suffix) else name


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
