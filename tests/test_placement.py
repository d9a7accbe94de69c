"""Built-in placement policies over fake node lists: the choices that separate them."""
from __future__ import annotations

from pathlib import Path

import pytest

from scheduler import catalog
from scheduler.placement import ClusterView, NodeView, Placement
from scheduler.policy import POLICIES, Colocated, FastestPair, LeastLoaded, RoundRobin, load_policy
from scheduler.request import GenerationRequest, NoCapacityError


def _req(placement: str | None = None) -> GenerationRequest:
    return GenerationRequest("r", "m", (1, 2, 3), max_tokens=4, placement=placement)


def _view(*nodes: NodeView) -> ClusterView:
    return ClusterView(tuple(nodes))


SPARK = NodeView("spark", ("prefill",), "torch", "m", tflops=100, mem_bw_gbps=273)
RTX = NodeView("rtx", ("prefill", "decode"), "torch", "m", tflops=80, mem_bw_gbps=900)
MAC = NodeView("mac", ("decode",), "mlx", "m", tflops=30, mem_bw_gbps=819)
MINI = NodeView("mini", ("prefill", "decode"), "mlx", "m", tflops=10, mem_bw_gbps=120)


def test_fastest_pair_prefills_on_most_flops_and_decodes_on_most_bandwidth() -> None:
    assert FastestPair().place(_req(), _view(MINI, MAC, SPARK)) == Placement("spark", "mac")


def test_single_node_is_colocated_under_every_policy() -> None:
    view = ClusterView((MINI,), model_config=catalog.model_config("llama-3.1-8b"))
    for name, cls in POLICIES.items():
        assert cls().place(_req(), view) == Placement(None, "mini"), name


def test_forced_colocated_uses_one_node() -> None:
    placement = FastestPair().place(_req("colocated"), _view(SPARK, MAC, MINI))
    assert placement.colocated


def test_forced_disaggregated_without_a_second_node_is_refused() -> None:
    with pytest.raises(NoCapacityError, match="disaggregated"):
        FastestPair().place(_req("disaggregated"), _view(MINI))


def test_forced_disaggregated_overrides_the_colocated_policy() -> None:
    assert Colocated().place(_req("disaggregated"), _view(SPARK, MAC)) == Placement("spark", "mac")


def test_no_decoder_is_refused() -> None:
    with pytest.raises(NoCapacityError, match="decode-capable"):
        FastestPair().place(_req(), _view(SPARK))


def test_prefill_never_lands_on_the_decode_node() -> None:
    assert FastestPair().place(_req(), _view(RTX, MINI)) == Placement("mini", "rtx")


def test_colocated_keeps_both_phases_on_the_best_decoder() -> None:
    assert Colocated().place(_req(), _view(SPARK, MAC, RTX)) == Placement(None, "rtx")


def test_round_robin_rotates_decoders() -> None:
    policy = RoundRobin()
    decoders = [policy.place(_req(), _view(SPARK, MAC, RTX)).decode_node for _ in range(4)]
    assert decoders == ["mac", "rtx", "mac", "rtx"]


def test_least_loaded_avoids_the_busy_decoder_that_fastest_pair_would_pick() -> None:
    busy_rtx = NodeView("rtx", ("prefill", "decode"), "torch", "m", 80, 900, active_requests=5)
    view = _view(SPARK, MAC, busy_rtx)
    assert FastestPair().place(_req(), view).decode_node == "rtx"
    assert LeastLoaded().place(_req(), view).decode_node == "mac"


def test_a_policy_loads_from_a_file_path(tmp_path: Path) -> None:
    plugin = tmp_path / "my_policy.py"
    plugin.write_text(
        "from scheduler.placement import Placement\n"
        "class Slowest:\n"
        "    def place(self, request, cluster):\n"
        "        node = min(cluster.nodes, key=lambda n: n.mem_bw_gbps)\n"
        "        return Placement(None, node.node_id)\n"
    )
    policy = load_policy(f"{plugin}:Slowest")
    assert policy.place(_req(), _view(MAC, MINI)) == Placement(None, "mini")


def test_a_policy_loads_from_a_module_path() -> None:
    assert isinstance(load_policy("scheduler.policy:LeastLoaded"), LeastLoaded)


@pytest.mark.parametrize("spec, message", [
    ("nope", "unknown policy 'nope'"),
    ("no.such.module:X", "cannot be imported"),
    ("scheduler.policy:Missing", "no attribute 'Missing'"),
    ("/does/not/exist.py:X", "does not exist"),
])
def test_bad_policy_specs_get_clear_errors(spec: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        load_policy(spec)
