"""The scheduler's link table: which pairs it probes, when, and what policies see."""
from __future__ import annotations

import asyncio
import logging

import pytest

from cluster.links import LinkTable, link_pairs
from cluster.node import NodeInfo
from cluster.status import format_links
from scheduler.placement import LinkView


def _node(node_id: str, roles: tuple[str, ...]) -> NodeInfo:
    return NodeInfo(
        node_id=node_id, roles=roles, engine="torch", model_id="tiny", weights_fingerprint="abc",
        host="127.0.0.1", grpc_port=50000, kv_port=50001, device="cpu", tflops=1.0, mem_bw_gbps=10.0,
        free_mem_bytes=0, version="0", key_fingerprint="fp",
    )


SPARK = _node("spark", ("prefill",))
MAC = _node("mac", ("prefill", "decode"))
MINI = _node("mini", ("decode",))


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class FakeProbe:
    """Answers with a fixed bandwidth per pair; fails for pairs listed in ``failing``."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, str]] = []
        self.failing: set[tuple[str, str]] = set()
        self.in_flight = self.max_in_flight = 0

    async def __call__(self, src: NodeInfo, dst: NodeInfo) -> tuple[float, float]:
        self.in_flight += 1
        self.max_in_flight = max(self.max_in_flight, self.in_flight)
        try:
            await asyncio.sleep(0.001)
            self.calls.append((src.node_id, dst.node_id))
            if (src.node_id, dst.node_id) in self.failing:
                raise ConnectionRefusedError("KV port closed")
            return 9.4, 0.0002
        finally:
            self.in_flight -= 1


def _table(**kwargs) -> tuple[LinkTable, FakeProbe, Clock]:
    probe, clock = FakeProbe(), Clock()
    return LinkTable(probe, clock=clock, **kwargs), probe, clock


def test_pairs_are_every_prefill_capable_to_every_other_decode_capable_node() -> None:
    pairs = [(p.node_id, d.node_id) for p, d in link_pairs([SPARK, MAC, MINI])]
    assert pairs == [("mac", "mini"), ("spark", "mac"), ("spark", "mini")]


def test_first_refresh_measures_every_pair_and_policies_see_them() -> None:
    table, probe, _ = _table()
    assert asyncio.run(table.refresh([SPARK, MAC, MINI])) == 3
    assert sorted(probe.calls) == [("mac", "mini"), ("spark", "mac"), ("spark", "mini")]
    assert table.views()[("spark", "mac")] == LinkView(9.4, 0.0002)
    assert asyncio.run(table.refresh([SPARK, MAC, MINI])) == 0  # cached


def test_probes_run_one_at_a_time_even_when_refreshes_overlap() -> None:
    table, probe, _ = _table()

    async def scenario() -> None:
        await asyncio.gather(table.refresh([SPARK, MAC, MINI]), table.refresh([SPARK, MAC, MINI]))

    asyncio.run(scenario())
    assert probe.max_in_flight == 1 and len(probe.calls) == 3  # the second refresh found nothing due


def test_a_stale_link_is_reprobed_only_when_both_ends_are_idle() -> None:
    table, probe, clock = _table(refresh_s=60)
    asyncio.run(table.refresh([SPARK, MAC]))
    clock.now += 61
    assert asyncio.run(table.refresh([SPARK, MAC], busy=lambda n: n == "mac")) == 0
    assert ("spark", "mac") in table.views()  # the old measurement still serves placement
    assert asyncio.run(table.refresh([SPARK, MAC], busy=lambda n: False)) == 1
    assert probe.calls == [("spark", "mac")] * 2


def test_a_failed_probe_leaves_the_link_unknown_says_why_once_and_retries(caplog: pytest.LogCaptureFixture) -> None:
    table, probe, clock = _table(retry_s=30)
    probe.failing.add(("spark", "mac"))
    with caplog.at_level(logging.WARNING, logger="cluster.links"):
        asyncio.run(table.refresh([SPARK, MAC]))
        assert table.views() == {}
        [row] = table.snapshot()
        assert row["error"] == "ConnectionRefusedError: KV port closed" and row["gbps"] == 0
        clock.now += 10
        assert asyncio.run(table.refresh([SPARK, MAC])) == 0  # not yet due
        clock.now += 25
        assert asyncio.run(table.refresh([SPARK, MAC])) == 1  # retried, failed again
    assert sum("probe failed" in r.getMessage() for r in caplog.records) == 1
    probe.failing.clear()
    clock.now += 31
    asyncio.run(table.refresh([SPARK, MAC]))
    assert table.views() == {("spark", "mac"): LinkView(9.4, 0.0002)}


def test_a_node_that_leaves_takes_its_links_with_it() -> None:
    table, _, _ = _table()
    asyncio.run(table.refresh([SPARK, MAC, MINI]))
    table.forget("mac")
    assert list(table.views()) == [("spark", "mini")]


def test_status_prints_links_and_failed_probes_readably() -> None:
    table, probe, _ = _table()
    probe.failing.add(("spark", "mini"))
    asyncio.run(table.refresh([SPARK, MAC, MINI]))
    text = format_links([r for _, r in sorted(table.records.items())])
    header, rule, *rows = text.splitlines()
    assert header.split()[:4] == ["prefill", "node", "decode", "node"]
    assert rows[1].split()[:4] == ["spark", "mac", "9.40", "0.20"]
    assert "probe failed: ConnectionRefusedError: KV port closed" in rows[2]
