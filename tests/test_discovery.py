"""Discovery over real mDNS, bound to 127.0.0.1 only; static peers and liveness with fake probes.

Every zeroconf instance here is created with ``interfaces=LOOPBACK``. Node ids carry
a random suffix so concurrent test runs on the same machine do not see each other's
nodes as ours. Every wait is bounded.
"""
from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
import uuid
from collections.abc import Callable, Coroutine
from typing import Any

import pytest

from cluster.discovery import SERVICE_TYPE, Advertiser, Browser, discover_once
from cluster.node import NodeInfo
from cluster.node_table import NodeTable, parse_peer

LOOPBACK = ["127.0.0.1"]
KFP = "kfp-good-1234"
WAIT_S = 10.0  # bound on any wait that should end in ~2 s
TEST_TIMEOUT_S = 30.0


def make_node(name: str, **overrides: object) -> NodeInfo:
    fields: dict[str, object] = dict(
        node_id=f"t-{name}-{uuid.uuid4().hex[:8]}",
        roles=("prefill", "decode"),
        engine="torch",
        model_id="tiny-llama",
        weights_fingerprint="wfp-1",
        host="127.0.0.1",
        grpc_port=50051,
        kv_port=50052,
        device="cpu",
        tflops=1.5,
        mem_bw_gbps=20.0,
        free_mem_bytes=2**30,
        version="0.1.0",
        key_fingerprint=KFP,
        source="mdns",
    )
    fields.update(overrides)
    return NodeInfo(**fields)  # type: ignore[arg-type]


def run(coro: Coroutine[Any, Any, None]) -> None:
    asyncio.run(asyncio.wait_for(coro, TEST_TIMEOUT_S))


async def wait_until(predicate: Callable[[], bool], what: str, timeout: float = WAIT_S) -> float:
    """Poll ``predicate`` until true; return the seconds it took, fail after ``timeout``."""
    start = time.monotonic()
    for _ in range(int(timeout / 0.05)):
        if predicate():
            return time.monotonic() - start
        await asyncio.sleep(0.05)
    pytest.fail(f"timed out after {timeout} s waiting for {what}")


def test_advertised_node_appears_in_browser_with_its_profile() -> None:
    async def body() -> None:
        node = make_node("appear")
        changes: list[tuple[str, NodeInfo | None]] = []
        async with Browser(LOOPBACK, KFP, on_change=lambda i, n: changes.append((i, n))) as browser:
            async with Advertiser(node, LOOPBACK):
                await wait_until(lambda: node.node_id in browser.nodes, "the node to appear")
                assert browser.nodes[node.node_id] == node  # every field, host from the A record
                assert (node.node_id, node) in changes
                assert node.node_id not in browser.refused

    run(body())


def test_browser_started_after_the_advertiser_still_finds_the_node() -> None:
    async def body() -> None:
        node = make_node("late")
        async with Advertiser(node, LOOPBACK):
            async with Browser(LOOPBACK, KFP) as browser:
                await wait_until(lambda: node.node_id in browser.nodes, "an already-advertised node")

    run(body())


def test_updating_the_advertisement_updates_the_browser_table() -> None:
    async def body() -> None:
        node = make_node("update")
        newer = dataclasses.replace(node, free_mem_bytes=123456789, tflops=2.75, roles=("decode",))
        async with Browser(LOOPBACK, KFP) as browser:
            async with Advertiser(node, LOOPBACK) as advertiser:
                await wait_until(lambda: node.node_id in browser.nodes, "the node to appear")
                await advertiser.update(newer)
                await wait_until(lambda: browser.nodes.get(node.node_id) == newer, "the updated profile")
                with pytest.raises(ValueError, match="cannot rename"):
                    await advertiser.update(dataclasses.replace(newer, node_id="other"))

    run(body())


def test_node_that_unregisters_is_removed_from_browser_and_table() -> None:
    async def body() -> None:
        node = make_node("leave")
        changes: list[tuple[str, NodeInfo | None]] = []
        table = NodeTable(KFP, interfaces=LOOPBACK, on_change=lambda i, n: changes.append((i, n)))
        async with table:
            advertiser = Advertiser(node, LOOPBACK)
            await advertiser.start()
            try:
                await wait_until(lambda: node in table.snapshot(), "the node to appear in the table")
            finally:
                await advertiser.stop()
            await wait_until(lambda: node.node_id not in table.browser.nodes, "the goodbye to remove the node")
            assert node not in table.snapshot()
            assert changes[-1] == (node.node_id, None)

    run(body())


def test_node_failing_health_is_dropped_within_bounded_time_and_returns_when_healthy() -> None:
    async def body() -> None:
        node = make_node("health")
        healthy = {"ok": True}
        checked: list[str] = []

        async def health(address: str) -> bool:
            checked.append(address)
            return healthy["ok"]

        table = NodeTable(KFP, interfaces=LOOPBACK, health=health, interval=0.05, max_failures=3, call_timeout=0.5)
        async with Advertiser(node, LOOPBACK), table:
            await wait_until(lambda: node in table.snapshot(), "the node to appear")
            healthy["ok"] = False
            took = await wait_until(lambda: node not in table.snapshot(), "the unhealthy node to be dropped", 3.0)
            assert took < 2.0, f"dropped after {took:.2f} s"
            assert "failed 3 health checks in a row" in table.down[node.node_id]
            assert node.node_id in table.browser.nodes  # still advertised, yet not offered to the scheduler
            healthy["ok"] = True
            await wait_until(lambda: node in table.snapshot(), "the node to come back")
        assert set(checked) == {"127.0.0.1:50051"}

    run(body())


def test_health_check_that_hangs_counts_as_a_failure() -> None:
    async def body() -> None:
        node = make_node("hang", source="static")

        async def probe(address: str) -> NodeInfo:
            return node

        async def hang(address: str) -> bool:
            await asyncio.sleep(3600)
            return True

        table = NodeTable(KFP, use_mdns=False, peers=["127.0.0.1:50051"], probe=probe, health=hang,
                          max_failures=2, call_timeout=0.05)
        await table.check_once()
        assert table.snapshot() == [node]
        await table.check_once()
        assert table.snapshot() == []

    run(body())


def test_node_with_wrong_key_fingerprint_is_refused_and_logged_once_at_debug(caplog: pytest.LogCaptureFixture) -> None:
    """Another cluster's node is not our problem: refused (``pdc status`` lists it), one debug line."""
    caplog.set_level(logging.DEBUG, logger="cluster.discovery")

    intruder = make_node("intruder", key_fingerprint="kfp-evil-9999")

    async def body() -> None:
        async with Browser(LOOPBACK, KFP) as browser:
            async with Advertiser(intruder, LOOPBACK):
                await wait_until(lambda: intruder.node_id in browser.refused, "the intruder to be refused")
                assert intruder.node_id not in browser.nodes
                reason = browser.refused[intruder.node_id]
                assert "kfp-evil-9999" in reason and KFP in reason
            await wait_until(lambda: intruder.node_id not in browser.refused, "the refusal to clear on goodbye")

    run(body())
    logged = [r for r in caplog.records if intruder.node_id in r.getMessage() and "not admitting" in r.getMessage()]
    assert len(logged) == 1, [r.getMessage() for r in logged]
    assert logged[0].levelno == logging.DEBUG
    assert all(s in logged[0].getMessage() for s in ("127.0.0.1:50051", "kfp-evil-9999", KFP))


def test_malformed_txt_record_over_mdns_is_refused_with_the_reason() -> None:
    from zeroconf.asyncio import (  # raw zeroconf: our Advertiser cannot send garbage
        AsyncServiceInfo,
        AsyncZeroconf,
    )

    async def body() -> None:
        node = make_node("garbled")
        txt = {k: v for k, v in node.to_txt().items() if k != "kfp"} | {"tflops": "fast"}
        name = f"{node.node_id}.{SERVICE_TYPE}"
        info = AsyncServiceInfo(SERVICE_TYPE, name, port=node.grpc_port, properties=txt,
                                server=f"{node.node_id}.local.", parsed_addresses=["127.0.0.1"])
        aiozc = AsyncZeroconf(interfaces=LOOPBACK)
        try:
            async with Browser(LOOPBACK, KFP) as browser:
                await asyncio.wait_for(await aiozc.async_register_service(info), WAIT_S)
                await wait_until(lambda: node.node_id in browser.refused, "the garbled record to be refused")
                assert node.node_id not in browser.nodes
                reason = browser.refused[node.node_id]
                assert "malformed TXT record" in reason and "missing TXT items ['kfp']" in reason
        finally:
            await asyncio.wait_for(aiozc.async_close(), WAIT_S)

    run(body())


def test_static_peers_come_from_the_probe_with_source_static() -> None:
    async def body() -> None:
        good = make_node("static", host="0.0.0.0", grpc_port=9999)  # what the node says of itself
        evil = make_node("evilstatic", key_fingerprint="kfp-evil")
        probed: list[str] = []

        async def probe(address: str) -> NodeInfo:
            probed.append(address)
            if address == "127.0.0.1:7001":
                return good
            if address == "127.0.0.1:7002":
                return evil
            raise ConnectionRefusedError("connection refused")

        peers = ["127.0.0.1:7001", "127.0.0.1:7002", "127.0.0.1:7003"]
        async with NodeTable(KFP, use_mdns=False, peers=peers, probe=probe, interval=0.05) as table:
            await wait_until(lambda: len(table.snapshot()) == 1, "the static peer to be probed")
            [node] = table.snapshot()
            assert node.source == "static" and node.node_id == good.node_id
            assert node.grpc_address == "127.0.0.1:7001"  # the address we were given, not the node's own view
            assert evil.node_id in table.refused and "kfp-evil" in table.refused[evil.node_id]
            await wait_until(lambda: probed.count("127.0.0.1:7003") >= 2, "the unreachable peer to be retried")
            assert probed.count("127.0.0.1:7001") == 1  # resolved once, not re-probed while healthy
            tried = "\n".join(table.tried)
            assert "mdns: off" in tried
            assert f"static peer 127.0.0.1:7001: ok (node {good.node_id})" in tried
            assert "static peer 127.0.0.1:7002: refused" in tried
            assert "static peer 127.0.0.1:7003: probe failed: ConnectionRefusedError: connection refused" in tried

    run(body())


def test_node_table_reports_how_long_a_dropped_node_has_been_silent_using_its_clock() -> None:
    async def body() -> None:
        now = {"t": 100.0}
        node = make_node("clock", source="static")
        results = iter([True, False, False, True])

        probed: list[str] = []

        async def probe(address: str) -> NodeInfo:
            probed.append(address)
            return node

        async def health(address: str) -> bool:
            return next(results)

        table = NodeTable(KFP, use_mdns=False, peers=["127.0.0.1:50051"], probe=probe, health=health,
                          max_failures=2, clock=lambda: now["t"])
        for _ in range(3):  # checks at t = 100 (ok), 102.5, 105
            await table.check_once()
            now["t"] += 2.5
        assert table.snapshot() == []
        assert table.down == {node.node_id: "failed 2 health checks in a row, last ok 7.5 s ago"}
        await table.check_once()
        assert table.snapshot() == [node] and table.down == {}
        assert probed == ["127.0.0.1:50051"] * 2  # re-probed when it came back

    run(body())


def test_discover_once_finds_an_advertised_node() -> None:
    async def body() -> None:
        node = make_node("once")
        intruder = make_node("onceintruder", key_fingerprint="kfp-other")
        advertisers = [Advertiser(node, LOOPBACK), Advertiser(intruder, LOOPBACK)]
        await asyncio.gather(*(a.start() for a in advertisers))
        try:
            nodes, refused = await discover_once(6.0, LOOPBACK, KFP)  # a browse window with room for a loaded CI host
        finally:
            await asyncio.gather(*(a.stop() for a in advertisers))
        assert node in nodes
        assert intruder not in nodes and intruder.node_id in refused

    run(body())


def test_service_type_and_peer_parsing() -> None:
    assert SERVICE_TYPE == "_pdcluster._tcp.local."
    assert parse_peer("10.0.0.5:50051") == ("10.0.0.5", 50051)
    assert parse_peer("[fe80::1]:7000") == ("fe80::1", 7000)
    assert parse_peer("spark.local:1") == ("spark.local", 1)
    for bad in ("10.0.0.5", "10.0.0.5:", ":50051", "host:0", "host:99999", "host:http"):
        with pytest.raises(ValueError, match="expected host:port"):
            parse_peer(bad)
    with pytest.raises(ValueError, match="need a probe"):
        NodeTable(KFP, use_mdns=False, peers=["10.0.0.5:50051"])


def test_suspended_node_leaves_the_snapshot_at_once_and_returns_on_its_next_passing_check(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="cluster.node_table")

    async def body() -> None:
        node = make_node("suspend", source="static")
        results = iter([True, False, True])
        changes: list[tuple[str, NodeInfo | None]] = []

        async def probe(address: str) -> NodeInfo:
            return node

        async def health(address: str) -> bool:
            return next(results)

        table = NodeTable(KFP, use_mdns=False, peers=["127.0.0.1:50051"], probe=probe, health=health,
                          max_failures=3, on_change=lambda i, n: changes.append((i, n)))
        await table.check_once()  # ok
        assert table.snapshot() == [node]
        table.suspend(node.node_id, "decode stream broke")
        assert table.snapshot() == []  # at once, no check round needed
        assert changes[-1] == (node.node_id, None)
        assert table.down == {node.node_id: "suspended: decode stream broke"}
        assert table.suspended == {node.node_id: "decode stream broke"}
        await table.check_once()  # fails: still suspended
        assert table.snapshot() == []
        await table.check_once()  # the next passing check re-admits it, not three of them
        assert table.snapshot() == [node] and table.down == {} and table.suspended == {}
        assert changes[-1] == (node.node_id, node)

    run(body())
    infos = [r.getMessage() for r in caplog.records if r.levelno == logging.INFO]
    assert any("decode stream broke" in m and "suspending" in m for m in infos), infos


def test_suspension_without_a_health_function_lasts_until_the_next_round() -> None:
    async def body() -> None:
        node = make_node("suspendnohealth", source="static")

        async def probe(address: str) -> NodeInfo:
            return node

        table = NodeTable(KFP, use_mdns=False, peers=["127.0.0.1:50051"], probe=probe)
        await table.check_once()
        table.suspend(node.node_id, "timeout")
        assert table.snapshot() == []
        await table.check_once()
        assert table.snapshot() == [node]

    run(body())


def test_another_cluster_with_the_same_node_id_neither_removes_nor_replaces_ours(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Two clusters on one host: same node id, other key. Ours stays, theirs is one debug line."""
    caplog.set_level(logging.DEBUG, logger="cluster")
    ours = make_node("twin")
    theirs = dataclasses.replace(ours, key_fingerprint="kfp-other-cluster", grpc_port=50061)
    changes: list[tuple[str, NodeInfo | None]] = []

    async def body() -> None:
        table = NodeTable(KFP, interfaces=LOOPBACK, interval=0.05, on_change=lambda i, n: changes.append((i, n)))
        async with Advertiser(ours, LOOPBACK), table:
            await wait_until(lambda: table.snapshot() == [ours], "our node to appear")
            async with Advertiser(theirs, LOOPBACK):
                await wait_until(lambda: any("another cluster" in r for r in table.refused.values()),
                                 "the stranger to be seen")
                assert table.snapshot() == [ours]
                [(key, reason)] = table.refused.items()
                assert key != ours.node_id and "kfp-other-clust" in key  # its instance label, not our id
                assert "kfp-other-cluster" in reason
            await wait_until(lambda: not table.refused, "the stranger's goodbye")
            assert table.snapshot() == [ours]  # its goodbye did not take ours with it
        assert (ours.node_id, None) not in changes[:-1]  # ours left only when our own advertiser stopped

    run(body())
    strangers = [r for r in caplog.records if "kfp-other-cluster" in r.getMessage()]
    assert len(strangers) == 1 and strangers[0].levelno == logging.DEBUG, [r.getMessage() for r in strangers]
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]


def test_instance_names_carry_the_key_fingerprint_and_fit_one_dns_label() -> None:
    from cluster.discovery import instance_name

    assert instance_name("a.b", "0123456789abcdef") == f"a-b-0123456789abcdef.{SERVICE_TYPE}"
    assert instance_name("n1", "k1") != instance_name("n1", "k2")
    long_a, long_b = "x" * 62 + "a", "x" * 62 + "b"
    label_a = instance_name(long_a, "0123456789abcdef").split(".")[0]
    assert len(label_a) <= 63 and label_a != instance_name(long_b, "0123456789abcdef").split(".")[0]


class FakeRay:
    """A PeerSource whose listing the test sets; ``fail`` makes the next listings raise."""

    def __init__(self) -> None:
        self.listed: dict[str, str] = {}
        self.fail = False

    def describe(self) -> str:
        return "fake Ray"

    async def addresses(self) -> dict[str, str]:
        if self.fail:
            raise ConnectionError("GCS unreachable")
        return dict(self.listed)


class Unauthenticated(Exception):
    """What a gRPC call refused for its key raises: an error with ``code()``."""

    def code(self) -> Any:
        return type("Code", (), {"name": "UNAUTHENTICATED"})()


def test_ray_actors_join_with_source_ray_leave_when_unlisted_and_survive_a_failed_listing() -> None:
    async def body() -> None:
        ray, nodes = FakeRay(), {"127.0.0.1:7101": make_node("actor-a"), "127.0.0.1:7102": make_node("actor-b")}

        async def probe(address: str) -> NodeInfo:
            if address == "127.0.0.1:7103":
                raise Unauthenticated("bad key")
            return nodes[address]

        async with NodeTable(KFP, use_mdns=False, probe=probe, ray=ray, interval=0.05) as table:
            ray.listed = {"127.0.0.1:7101": "pdc-a", "127.0.0.1:7102": "pdc-b"}
            await wait_until(lambda: len(table.snapshot()) == 2, "both actors to join")
            assert {n.source for n in table.snapshot()} == {"ray"}
            ray.fail = True  # Ray unreachable: the last listing stands
            await wait_until(lambda: "listing failed" in "\n".join(table.tried), "the failed listing to show")
            assert len(table.snapshot()) == 2
            ray.fail, ray.listed = False, {"127.0.0.1:7101": "pdc-a", "127.0.0.1:7103": "evil"}
            await wait_until(lambda: [n.node_id for n in table.snapshot()] == [nodes["127.0.0.1:7101"].node_id],
                             "the unlisted actor to leave")
            await wait_until(lambda: any("evil" in k for k in table.refused), "the actor refusing our key")
            tried = "\n".join(table.tried)
            assert "ray: fake Ray: 2 ready worker actors" in tried
            assert "ray actor evil at 127.0.0.1:7103: refused: it does not accept this cluster's key" in tried

    run(body())


def test_a_failed_health_check_does_not_undrain_a_node_a_passing_one_does() -> None:
    async def body() -> None:
        node = make_node("drainee")
        answers = iter(["draining", False, "draining", True])
        state: dict[str, bool | str] = {"now": "draining"}

        async def probe(address: str) -> NodeInfo:
            return node

        async def health(address: str) -> bool | str:
            return state["now"]

        table = NodeTable(KFP, use_mdns=False, peers=["127.0.0.1:7201"], probe=probe, health=health, interval=60)
        seen = []
        for answer in answers:
            state["now"] = answer
            await table.check_once()
            seen.append([n.node_id for n in table.snapshot()])
        assert seen == [[], [], [], [node.node_id]]  # draining, failed once (still draining), draining, back
        assert table.draining == {}

    run(body())
