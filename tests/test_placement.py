"""Built-in placement policies over fake node lists: the choices that separate them."""
from __future__ import annotations

from pathlib import Path

import pytest

from scheduler import catalog, costmodel
from scheduler.placement import ClusterView, LinkView, NodeView, Placement
from scheduler.policy import (
    POLICIES,
    Colocated,
    Conditional,
    FastestPair,
    LeastLoaded,
    Predictor,
    Roofline,
    RoundRobin,
    load_policy,
)
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


# ---------------------------------------------------------------- cost-model policies over fake nodes and links

LLAMA_CONFIG = catalog.model_config("llama-3.1-8b")
BIG = NodeView("big", ("prefill",), "torch", "m", tflops=125, mem_bw_gbps=273)
LOCAL = NodeView("local", ("prefill", "decode"), "mlx", "m", tflops=17, mem_bw_gbps=546)


def _long_req(max_tokens: int = 64) -> GenerationRequest:
    return GenerationRequest("r", "m", tuple(range(8192)), max_tokens=max_tokens)


def _costed(*nodes: NodeView, gbps: float | None = None, kv_codec: str = "auto") -> ClusterView:
    links = {("big", "local"): LinkView(gbps, 0.0002)} if gbps else {}
    return ClusterView(tuple(nodes), links, LLAMA_CONFIG, kv_codec=kv_codec)


def test_conditional_never_sends_kv_over_an_unmeasured_link() -> None:
    assert Conditional().place(_long_req(), _costed(BIG, LOCAL)) == Placement(None, "local")
    assert Conditional().place(_long_req(), _costed(BIG, LOCAL, gbps=10)) == Placement("big", "local")


def test_conditional_stays_local_when_the_link_eats_the_gain() -> None:
    assert Conditional().place(_long_req(), _costed(BIG, LOCAL, gbps=0.5)) == Placement(None, "local")


def test_conditional_with_a_decode_only_node_takes_the_fastest_prefill_node() -> None:
    decode_only = NodeView("local", ("decode",), "mlx", "m", tflops=17, mem_bw_gbps=546)
    assert Conditional().place(_long_req(), _costed(BIG, decode_only)) == Placement("big", "local")


def test_conditional_avoids_a_prefill_node_with_a_long_backlog() -> None:
    busy = NodeView("big", ("prefill",), "torch", "m", tflops=125, mem_bw_gbps=273, prefill_backlog_s=30.0)
    assert Conditional().place(_long_req(), _costed(busy, LOCAL, gbps=10)) == Placement(None, "local")


def test_conditional_rejects_a_nonsense_margin() -> None:
    with pytest.raises(ValueError, match="min_gain"):
        Conditional(min_gain=1.5)


def test_roofline_may_decode_on_the_prefill_node_where_conditional_never_does() -> None:
    # Two output tokens: end to end is all prefill, so roofline keeps everything on
    # the big node (colocated there); conditional still decodes on the bandwidth node.
    both = NodeView("big", ("prefill", "decode"), "torch", "m", tflops=125, mem_bw_gbps=273)
    view = _costed(both, LOCAL, gbps=1)
    assert Roofline().place(_long_req(max_tokens=2), view) == Placement(None, "big")
    assert Conditional().place(_long_req(max_tokens=2), view).decode_node == "local"


def test_a_measured_profile_is_taken_as_achieved_not_peak() -> None:
    peak = NodeView("n", ("prefill", "decode"), "torch", "m", tflops=10, mem_bw_gbps=100)
    measured = NodeView("n", ("prefill", "decode"), "torch", "m", tflops=10, mem_bw_gbps=100, measured=True)
    request = _long_req()
    t_peak = Predictor(request, ClusterView((peak,), model_config=LLAMA_CONFIG)).prefill_s(peak)
    t_measured = Predictor(request, ClusterView((measured,), model_config=LLAMA_CONFIG)).prefill_s(measured)
    assert t_measured < t_peak  # generic efficiency (0.75 of peak) is not applied again to achieved TFLOPS


# ---------------------------------------------------------------- what each Predictor input changes


def test_round_robin_rotates_the_prefill_node_too() -> None:
    other = NodeView("spark2", ("prefill",), "torch", "m", tflops=100, mem_bw_gbps=273)
    policy = RoundRobin()
    placements = [policy.place(_req(), _view(SPARK, other, MAC)) for _ in range(4)]
    assert [p.decode_node for p in placements] == ["mac"] * 4
    assert [p.prefill_node for p in placements] == ["spark", "spark2", "spark", "spark2"]


def test_conditional_sends_prefill_away_from_a_decode_node_with_a_prefill_backlog() -> None:
    # Raw KV over 0.5 Gb/s: the 1 GiB costs ~17 s, remote TTFT ~17.2 s against ~11.0 s local,
    # so an idle local node prefills itself; 30 s already queued there makes local ~41 s.
    # (Under auto, int8 would make remote ~8.8 s: a 20 % gain, a near tie; test_codec_choice.)
    assert Conditional().place(_long_req(), _costed(BIG, LOCAL, gbps=0.5, kv_codec="raw")) == Placement(None, "local")
    queued = NodeView("local", ("prefill", "decode"), "mlx", "m", tflops=17, mem_bw_gbps=546, prefill_backlog_s=30.0)
    predictor = Predictor(_long_req(), _costed(BIG, queued, gbps=0.5, kv_codec="raw"))
    assert predictor.estimate(None, queued).ttft_s == pytest.approx(30.0 + predictor.prefill_s(queued), rel=1e-12)
    assert Conditional().place(_long_req(), _costed(BIG, queued, gbps=0.5, kv_codec="raw")) == Placement("big", "local")


def test_roofline_leaves_a_fast_decoder_only_when_its_batch_is_large() -> None:
    # Same FLOPS, so prefill ties; the 819 GB/s node decodes 1.5x faster alone. Under
    # continuous batching its in-flight requests share each step's weight read and add
    # only their KV: with 3 of them it is still faster (~35 ms vs ~41 ms per token); with
    # 8 (~48 ms) the idle 546 GB/s node wins.
    def fast(active: int) -> NodeView:
        return NodeView("fast", ("prefill", "decode"), "mlx", "m", tflops=17, mem_bw_gbps=819, active_requests=active)

    idle = NodeView("slow", ("prefill", "decode"), "mlx", "m", tflops=17, mem_bw_gbps=546)
    assert Roofline().place(_long_req(), _costed(fast(0), idle)) == Placement(None, "fast")
    assert Roofline().place(_long_req(), _costed(fast(3), idle)) == Placement(None, "fast")
    assert Roofline().place(_long_req(), _costed(fast(8), idle)) == Placement(None, "slow")
    predictor = Predictor(_long_req(), _costed(fast(3), idle))
    model = costmodel.model_cost(LLAMA_CONFIG)
    depth = 8192 + 64 // 2
    step = (model.decode_weight_bytes / 0.75 + 4 * costmodel.kv_bytes(model, depth + 1) / 0.5) / 819e9
    assert predictor.tpot_s(fast(3)) == pytest.approx(step, rel=1e-12)  # one weight read, four requests' KV
    assert predictor.tpot_s(fast(3)) < 1.5 * predictor.tpot_s(fast(0))


def _cached_req(num_cached: int) -> GenerationRequest:
    return GenerationRequest("r", "m", tuple(range(8192)), max_tokens=64, cached_prefix_tokens=num_cached)


def test_a_cached_prefix_shortens_the_predicted_prefill_to_the_new_tokens() -> None:
    node = NodeView("n", ("prefill", "decode"), "mlx", "m", tflops=17, mem_bw_gbps=546)
    view = ClusterView((node,), model_config=LLAMA_CONFIG)
    hw = costmodel.Hardware("n", tflops=17, mem_bw_gbps=546, mem_gb=1.0)  # no catalog name: advertised peaks
    model, eff = costmodel.model_cost(LLAMA_CONFIG), costmodel.GENERIC["bf16"]
    cached = Predictor(_cached_req(8000), view).prefill_s(node)
    assert cached == pytest.approx(costmodel.prefill_time(model, hw, eff, 192, 8000), rel=1e-12)  # 192 new on 8000
    assert Predictor(_cached_req(0), view).prefill_s(node) == pytest.approx(
        costmodel.prefill_time(model, hw, eff, 8192, 0), rel=1e-12)
    assert cached * 20 < Predictor(_cached_req(0), view).prefill_s(node)


def test_roofline_trades_prefill_flops_for_decode_bandwidth_once_the_prompt_is_cached() -> None:
    # No links: both options are colocated. Uncached, prefill dominates (~1.5 s vs ~11 s) and
    # the 125-TFLOPS node wins; with 8000 of 8192 tokens cached, decode dominates and the
    # 546 GB/s node wins (~2.9 s vs ~5.2 s end to end).
    flops = NodeView("a", ("prefill", "decode"), "torch", "m", tflops=125, mem_bw_gbps=273)
    bandwidth = NodeView("b", ("prefill", "decode"), "mlx", "m", tflops=17, mem_bw_gbps=546)
    view = _costed(flops, bandwidth)
    assert Roofline().place(_cached_req(0), view) == Placement(None, "a")
    assert Roofline().place(_cached_req(8000), view) == Placement(None, "b")


def test_a_cached_prefix_is_not_sent_again_over_the_link() -> None:
    # Both chosen nodes hold the 8000 cached tokens: only the 192 new tokens' KV crosses.
    view = _costed(BIG, LOCAL, gbps=10)
    predictor = Predictor(_cached_req(8000), view)
    prefill_s = predictor.prefill_s(BIG)
    net = costmodel.Link("measured", 10, 0.0002, payload_efficiency=1.0)
    exposed = costmodel.exposed_transfer(costmodel.model_cost(LLAMA_CONFIG), net, 192, prefill_s)
    assert predictor.estimate(BIG, LOCAL).ttft_s == pytest.approx(prefill_s + exposed, rel=1e-9)


def test_the_cluster_weight_format_converts_the_model_before_predicting() -> None:
    node = NodeView("n", ("prefill", "decode"), "mlx", "m", tflops=17, mem_bw_gbps=546)
    hw = costmodel.Hardware("n", tflops=17, mem_bw_gbps=546, mem_gb=1.0)
    depth = 8192 + 64 // 2  # mid-generation
    native = Predictor(_long_req(), ClusterView((node,), model_config=LLAMA_CONFIG))
    int4 = Predictor(_long_req(), ClusterView((node,), model_config=LLAMA_CONFIG, weight_format="int4"))
    model_int4 = costmodel.model_cost(LLAMA_CONFIG, dense_format="int4", expert_format="int4")
    assert int4.tpot_s(node) == pytest.approx(
        costmodel.decode_time(model_int4, hw, costmodel.GENERIC["int4"], depth), rel=1e-12)
    # 4.5 of 16 bits a weight: decode reads ~0.28x the bytes, so it is much faster ...
    assert int4.tpot_s(node) < 0.4 * native.tpot_s(node)
    # ... while prefill dequantises at 0.4 of peak instead of 0.75: slower.
    assert int4.prefill_s(node) > 1.5 * native.prefill_s(node)


# ---------------------------------------------------------------- the one gate (live and simulated)


def test_check_placement_refuses_what_cannot_run_and_names_the_policy() -> None:
    from scheduler.placement import PlacementError, check_placement

    view = _view(SPARK, MAC, MINI)  # spark prefill-only, mac decode-only, mini both
    assert check_placement(Placement("spark", "mac"), view, "p") == Placement("spark", "mac")
    assert check_placement(Placement("mini", "mini", "int8"), view, "p") == Placement(None, "mini", "int8")
    for answer, why in ((None, "returned None, not a Placement"),
                        (Placement(None, "spark"), "node 'spark' lacks the 'decode' role"),
                        (Placement("mac", "mini"), "node 'mac' lacks the 'prefill' role"),
                        (Placement("nowhere", "mac"), "no node named 'nowhere'")):
        with pytest.raises(PlacementError, match=f"^policy 'p' .*{why}"):
            check_placement(answer, view, "p")
