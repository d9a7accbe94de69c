"""The default placement policy over fake node lists."""
from __future__ import annotations

import pytest

from scheduler.placement import FastestPair, NodeView, Placement
from scheduler.request import GenerationRequest, NoCapacityError


def _req(placement: str | None = None) -> GenerationRequest:
    return GenerationRequest("r", "m", (1, 2, 3), max_tokens=4, placement=placement)


SPARK = NodeView("spark", ("prefill",), "torch", "m", tflops=100, mem_bw_gbps=273)
RTX = NodeView("rtx", ("prefill", "decode"), "torch", "m", tflops=80, mem_bw_gbps=900)
MAC = NodeView("mac", ("decode",), "mlx", "m", tflops=30, mem_bw_gbps=819)
MINI = NodeView("mini", ("prefill", "decode"), "mlx", "m", tflops=10, mem_bw_gbps=120)


def test_prefills_on_most_flops_and_decodes_on_most_bandwidth() -> None:
    assert FastestPair().place(_req(), [MINI, MAC, SPARK]) == Placement("spark", "mac")


def test_single_node_is_colocated() -> None:
    assert FastestPair().place(_req(), [MINI]) == Placement(None, "mini")


def test_forced_colocated_uses_one_node() -> None:
    placement = FastestPair().place(_req("colocated"), [SPARK, MAC, MINI])
    assert placement.colocated and placement.decode_node == "mini"


def test_forced_disaggregated_without_a_second_node_is_refused() -> None:
    with pytest.raises(NoCapacityError, match="disaggregated"):
        FastestPair().place(_req("disaggregated"), [MINI])


def test_no_decoder_is_refused() -> None:
    with pytest.raises(NoCapacityError, match="decode-capable"):
        FastestPair().place(_req(), [SPARK])


def test_prefill_never_lands_on_the_decode_node() -> None:
    placement = FastestPair().place(_req(), [RTX, MINI])
    assert placement == Placement("mini", "rtx")


def test_ties_go_to_the_less_busy_node() -> None:
    busy = NodeView("a", ("decode",), "mlx", "m", 30, 819, active_requests=3)
    idle = NodeView("b", ("decode",), "mlx", "m", 30, 819, active_requests=0)
    assert FastestPair().place(_req(), [busy, idle, SPARK]).decode_node == "b"
