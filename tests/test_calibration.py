"""Served-request corrections: the cost model's ``Served`` arithmetic, the live scheduler's
``ServedCalibration``, the ``Dispatcher`` feeding it, and the simulator reading the same
figures from a cluster file. No worker, no gRPC: fake nodes, fake records."""
from __future__ import annotations

import math

import pytest

from cluster.links import LinkView
from cluster.node import NodeInfo
from scheduler import catalog, costmodel
from scheduler.calibration import Observation, ServedCalibration
from scheduler.costmodel import Hardware, Served
from scheduler.dispatch import Dispatcher
from scheduler.load import LoadLedger
from scheduler.placement import Placement
from scheduler.policy import Conditional, Predictor
from scheduler.request import GenerationRequest, RequestStats
from scheduler.sim import cluster_file
from scheduler.sim.engine import build_cluster

LLAMA = catalog.model("llama-3.1-8b")
CPU_BOX = Hardware("cpu-box", tflops=1.0, mem_bw_gbps=50.0, mem_gb=64.0)
ONE_GBE = costmodel.Link("1gbe", 1.0, 1e-4, payload_efficiency=1.0)
CPU_EFF = costmodel.with_probe(costmodel.MEASURED, LLAMA, [], device="cpu")


def _cost(eff: costmodel.Efficiency, codec: str = "raw", link: costmodel.Link | None = ONE_GBE):
    return costmodel.request_cost(LLAMA, CPU_BOX, eff, 512, link=link, codec=codec)


# ---------------------------------------------------------------- the cost model's arithmetic


def test_without_served_figures_request_cost_is_unchanged() -> None:
    assert _cost(CPU_EFF) == _cost(costmodel.with_probe(CPU_EFF, LLAMA, [], served=None))
    assert costmodel.request_overhead_s(CPU_EFF, colocated=True) == 0.0


def test_a_mode_scales_only_its_own_prefill() -> None:
    base_local, base_raw = _cost(CPU_EFF, link=None).prefill_s, _cost(CPU_EFF).prefill_s
    eff = costmodel.with_probe(CPU_EFF, LLAMA, [], served=Served((("local", 1.5), ("raw", 2.0))))
    assert _cost(eff, link=None).prefill_s == pytest.approx(1.5 * base_local)
    assert _cost(eff).prefill_s == pytest.approx(2.0 * base_raw)


def test_a_measured_codec_carries_its_encode_and_pays_no_prior() -> None:
    """On a CPU node an unmeasured codec pays compute + SHARED_CORE_ENCODE_FACTOR x encode; once its
    served prefills are measured, their scale alone prices it (the encode is inside the figure)."""
    compute = _cost(CPU_EFF, link=None).prefill_s
    prior = _cost(CPU_EFF, "int8")
    assert prior.encode_in_prefill_s > 0 and prior.prefill_s == pytest.approx(compute + prior.encode_in_prefill_s)
    measured = _cost(costmodel.with_probe(CPU_EFF, LLAMA, [], served=Served((("int8", 1.1),))), "int8")
    assert measured.encode_in_prefill_s == 0.0 and measured.prefill_s == pytest.approx(1.1 * compute)


@pytest.mark.parametrize(("known", "mode", "expected"), [
    ((("raw", 1.4),), "int8", 1.4),  # a lossy codec without its own figure: raw's, then its encode prior
    ((("local", 1.2),), "raw", 1.2),  # raw and local stand for each other
    ((("raw", 1.3),), "local", 1.3),
    ((("fp8", 0.9),), "int8", 1.0),  # another lossy codec says nothing about this one
    ((), "raw", 1.0),
])
def test_an_unmeasured_mode_falls_back_to_the_nearest_measured_one(known, mode, expected) -> None:
    assert Served(known).scale(mode) == expected


def test_the_fixed_overhead_is_per_placement_kind_and_an_unmeasured_kind_takes_the_others() -> None:
    both = Served(overhead_s=(("colocated", 0.02), ("disaggregated", 0.05)))
    assert both.overhead(colocated=True) == 0.02 and both.overhead(colocated=False) == 0.05
    one = costmodel.with_probe(CPU_EFF, LLAMA, [], served=Served(overhead_s=(("colocated", 0.02),)))
    assert costmodel.request_overhead_s(one, colocated=False) == 0.02  # remote is not free while unmeasured
    assert costmodel.request_overhead_s(CPU_EFF, colocated=False) == 0.0


def test_auto_does_not_charge_a_measured_codecs_encode_twice() -> None:
    """A codec measured on a CPU node carries its encode in its scale: ``auto`` must not count that
    encode again as work outside prefill. Given the prior's own prediction as the measured scale,
    ``auto`` decides as it did under the prior (int8 over 1 GbE for an 8k prompt)."""
    node = Hardware("cpu-big", tflops=40.0, mem_bw_gbps=200.0, mem_gb=256.0)
    prior = costmodel.auto_codec_cost(LLAMA, node, CPU_EFF, 8192, link=ONE_GBE)
    assert prior.codec == "int8" and prior.encode_within_prefill
    compute = costmodel.request_cost(LLAMA, node, CPU_EFF, 8192).prefill_s
    same = Served((("int8", prior.prefill_s / compute),))
    measured = costmodel.auto_codec_cost(LLAMA, node, costmodel.with_probe(CPU_EFF, LLAMA, [], served=same), 8192,
                                         link=ONE_GBE)
    assert measured.codec == "int8" and measured.encode_within_prefill and measured.encode_in_prefill_s == 0.0
    assert measured.prefill_s == pytest.approx(prior.prefill_s)


@pytest.mark.parametrize("bad", [
    {"prefill_scale": (("remote", 1.0),)}, {"prefill_scale": (("raw", 0.0),)},
    {"prefill_scale": (("raw", math.inf),)}, {"overhead_s": (("colocated", -0.1),)},
    {"overhead_s": (("both", 0.1),)},
])
def test_served_figures_that_are_not_figures_are_refused(bad) -> None:
    with pytest.raises(ValueError):
        Served(**bad)


# ---------------------------------------------------------------- learning live


def _seen(mode: str = "raw", compute: float = 0.1, prefill: float = 0.15, ttft: float = 0.2, queue: float = 0.01,
          exposed: float = 0.01, prefill_node: str = "p", decode_node: str = "d", num_tokens: int = 0) -> Observation:
    return Observation(prefill_node, decode_node, mode, compute, prefill, ttft, queue, exposed, num_tokens)


def test_the_figures_are_medians_of_each_nodes_recent_requests_per_mode() -> None:
    cal = ServedCalibration(window=3, min_samples=1, skip_cold=False)
    assert cal.served("p") is None
    for prefill in (0.12, 0.3, 0.15, 0.16):  # the first falls out of the window of 3
        cal.observe(_seen(prefill=prefill))
    cal.observe(_seen("local", prefill_node="d", decode_node="d", prefill=0.05, ttft=0.08, queue=0.0, exposed=0.0))
    assert cal.served("p").prefill_scale == (("raw", pytest.approx(1.6)),)
    served_d = cal.served("d")
    assert served_d.scale("local") == pytest.approx(0.5)
    # ttft 0.2 less queue 0.01, exposed 0.01 and prefill 0.3 / 0.15 / 0.16: 0 (never below), 0.03, 0.02
    assert served_d.overhead(colocated=False) == pytest.approx(0.02)
    assert served_d.overhead(colocated=True) == pytest.approx(0.03)  # 0.08 - 0.05


def test_a_figure_applies_once_enough_recent_requests_back_it_and_old_ones_expire() -> None:
    clock = [0.0]
    cal = ServedCalibration(min_samples=3, max_age_s=100.0, skip_cold=False, clock=lambda: clock[0])
    for prefill in (0.5, 0.15):  # one slow request is not a slow node
        cal.observe(_seen(prefill=prefill))
    assert cal.served("p") is None and cal.snapshot("p")["samples"] == {"prefill:raw": 2}
    cal.observe(_seen(prefill=0.16))
    assert cal.served("p").scale("raw") == pytest.approx(1.6)
    clock[0] = 150.0  # a node no longer chosen returns to its probe's price
    assert cal.served("p") is None and cal.snapshot("p")["samples"] == {}


def test_a_nodes_first_prefill_in_each_mode_is_cold_and_set_aside() -> None:
    cal = ServedCalibration(min_samples=1)
    cal.observe(_seen(prefill=0.4))  # the first raw prefill: one-time costs
    assert cal.served("p") is None or not cal.served("p").prefill_scale
    cal.observe(_seen(prefill=0.15))
    assert cal.served("p").scale("raw") == pytest.approx(1.5)
    cal.observe(_seen("int8", prefill=0.3))  # int8's own first one
    assert cal.served("p").scale("int8") == pytest.approx(1.5)  # still raw's, by the fallback
    cal.forget("p")
    cal.observe(_seen(prefill=0.15))  # back, cold again
    assert cal.served("p") is None


def test_short_broken_or_disabled_observations_teach_nothing() -> None:
    cal = ServedCalibration(min_compute_s=0.01, min_samples=1, skip_cold=False)
    cal.observe(_seen(compute=0.001, prefill=0.003))  # too short to time against the model
    cal.observe(_seen(compute=0.1, prefill=5.0))  # 50x: a broken measurement, its TTFT too
    cal.observe(_seen(prefill=math.nan))
    cal.observe(_seen(mode="zstd"))
    assert cal.served("p") is None
    # the short prefill still timed its request's fixed overhead; the broken one taught nothing at all
    assert cal.snapshot("d")["samples"] == {"overhead:disaggregated": 1}
    off = ServedCalibration(enabled=False)
    off.observe(_seen())
    assert off.served("p") is None and off.served("d") is None and off.snapshot("p")["enabled"] is False


def test_a_node_that_left_is_forgotten_and_the_snapshot_counts_samples() -> None:
    cal = ServedCalibration(min_samples=2, skip_cold=False)
    cal.observe(_seen())
    cal.observe(_seen())
    snap = cal.snapshot("p")
    assert snap["prefill_scale"] == {"raw": 1.5} and snap["samples"] == {"prefill:raw": 2}
    assert cal.snapshot("d")["overhead_s"] == {"disaggregated": pytest.approx(0.03)}
    cal.forget("p")
    assert cal.served("p") is None and cal.served("d") is not None


# ---------------------------------------------------------------- the dispatcher feeds it, policies use it


def _node(node_id: str, roles: tuple[str, ...], **overrides) -> NodeInfo:
    fields = {"node_id": node_id, "roles": roles, "engine": "torch", "model_id": "llama", "weights_fingerprint": "w",
              "host": node_id, "grpc_port": 50051, "kv_port": 50052, "device": "cpu", "tflops": 2.0,
              "mem_bw_gbps": 50.0, "free_mem_bytes": 1 << 34, "version": "0", "key_fingerprint": "k",
              "hardware": "", "profile_source": "measured"}
    return NodeInfo(**{**fields, **overrides})


FAST, SLOW = _node("fast", ("prefill",), tflops=8.0), _node("slow", ("prefill", "decode"), tflops=2.0)
LINKS = {("fast", "slow"): LinkView(9.0, 1e-4)}
CONFIG = catalog.model_config("llama-3.1-8b")


class Fixed:
    def __init__(self, placement: Placement) -> None:
        self.placement = placement

    def place(self, request, cluster):
        return self.placement


def _request(rid: str, prompt: int = 1024) -> GenerationRequest:
    return GenerationRequest(rid, "llama", (7,) * prompt, max_tokens=4)


def test_a_finished_first_attempt_teaches_its_nodes_and_the_next_view_carries_it() -> None:
    d = Dispatcher(Fixed(Placement("fast", "slow", "raw")), "fixed", LoadLedger(),
                   calibration=ServedCalibration(min_samples=1, skip_cold=False))
    view = d.view((FAST, SLOW), LINKS, CONFIG, _request("r1"))
    d.place(_request("r1"), view)
    compute = Predictor(_request("r1"), view).compute_s(view.node("fast"))
    stats = RequestStats(prefill_s=1.5 * compute, ttft_s=1.5 * compute + 0.05, queue_s=0.01, exposed_transfer_s=0.02)
    d.served("r1", stats)
    d.finish("r1")
    later = d.view((FAST, SLOW), LINKS, CONFIG, _request("r2"))
    assert later.node("fast").served.prefill_scale == (("raw", pytest.approx(1.5)),)
    assert later.node("slow").served.overhead(colocated=False) == pytest.approx(0.02)
    predictor = Predictor(_request("r2"), later)
    assert predictor.prefill_s(later.node("fast")) == pytest.approx(1.5 * predictor.compute_s(later.node("fast")))
    # the ledger books the placed mode's scaled prefill, as the simulator does
    d.place(_request("r2"), later)
    assert d.ledger.prefill_backlog_s("fast") == pytest.approx(1.5 * predictor.compute_s(later.node("fast")))


def test_a_prefill_that_found_another_cached_prefix_teaches_no_scale_and_a_new_profile_forgets() -> None:
    d = Dispatcher(Fixed(Placement(None, "slow")), "fixed", LoadLedger(), calibration=ServedCalibration(min_samples=1, skip_cold=False))
    d.place(_request("r1"), d.view((FAST, SLOW), LINKS, CONFIG, _request("r1")))
    d.served("r1", RequestStats(prefill_s=0.5, ttft_s=0.6, cached_prefix_tokens=512))  # priced with none cached
    assert d.calibration.snapshot("slow")["samples"] == {"overhead:colocated": 1}
    view = d.view((FAST, SLOW), LINKS, CONFIG, _request("r2"))
    d.place(_request("r2"), view)
    compute = Predictor(_request("r2"), view).compute_s(view.node("slow"))
    d.served("r2", RequestStats(prefill_s=compute, ttft_s=compute + 0.1))
    assert d.calibration.snapshot("slow")["samples"] == {"overhead:colocated": 2, "prefill:local": 1}
    restarted = _node("slow", ("prefill", "decode"), tflops=2.0, prefill_probe=((128, 0.5),))
    assert d.view((FAST, restarted), LINKS, CONFIG).node("slow").served is None


def test_a_request_that_ended_without_its_record_teaches_nothing() -> None:
    d = Dispatcher(Fixed(Placement(None, "slow")), "fixed", LoadLedger())
    d.place(_request("r1"), d.view((FAST, SLOW), LINKS, CONFIG, _request("r1")))
    d.finish("r1")  # failed or re-placed: no served() call before finish
    d.served("r1", RequestStats(prefill_s=9.0, ttft_s=9.5))
    assert d.calibration.served("slow") is None


def test_a_prefill_node_slower_than_its_start_up_figures_loses_the_conditional_choice() -> None:
    """The same request, before and after the fast node's served prefills ran 4x its probe's pricing:
    remote prefill wins at first, and once the scheduler has learned, the decode node keeps it."""
    d = Dispatcher(Conditional(), "conditional", LoadLedger())
    request = _request("q", prompt=4096)
    before = d.view((FAST, SLOW), LINKS, CONFIG, request)
    assert Conditional().place(request, before).prefill_node == "fast"
    for _ in range(1 + 3):  # the cold first one, then MIN_SAMPLES requests
        d.calibration.observe(Observation("fast", "slow", "raw", 1.0, 4.0, 4.1, 0.0, 0.0))
    after = d.view((FAST, SLOW), LINKS, CONFIG, request)
    assert Conditional().place(request, after).prefill_node is None


# ---------------------------------------------------------------- the simulator reads the same figures


SIM_FILE = """
[[nodes]]
name = "a"
hardware = "dgx-spark"
roles = ["prefill"]
prefill_scale = {raw = 2.0}

[[nodes]]
name = "b"
hardware = "mac-m4-max"
roles = ["prefill", "decode"]
request_overhead_s = {colocated = 0.05, disaggregated = 0.07}

[[links]]
nodes = ["a", "b"]
kind = "10gbe"
"""


def test_a_cluster_file_declares_served_figures_and_the_simulator_applies_them() -> None:
    spec = cluster_file.loads(SIM_FILE)
    assert spec.node("a").served == Served((("raw", 2.0),))
    assert spec.node("b").served == Served((), (("colocated", 0.05), ("disaggregated", 0.07)))
    cluster = build_cluster(spec, "llama-3.1-8b")
    plain = build_cluster(cluster_file.loads(SIM_FILE.replace("prefill_scale = {raw = 2.0}", "")), "llama-3.1-8b")
    link = cluster.links[("a", "b")]
    scaled = costmodel.request_cost(cluster.model, cluster.nodes["a"].machine, cluster.nodes["a"].efficiency, 2048,
                                    link=link)
    base = costmodel.request_cost(plain.model, plain.nodes["a"].machine, plain.nodes["a"].efficiency, 2048, link=link)
    assert scaled.prefill_s == pytest.approx(2 * base.prefill_s)
    assert costmodel.request_overhead_s(cluster.nodes["b"].efficiency, colocated=False) == 0.07


@pytest.mark.parametrize(("old", "entry", "needle"), [
    ("prefill_scale = {raw = 2.0}", "prefill_scale = {remote = 1.0}", "unknown key 'remote'"),
    ("prefill_scale = {raw = 2.0}", "request_overhead_s = {colocated = 0.1}", "applies to a node with the 'decode'"),
    ("prefill_scale = {raw = 2.0}", "prefill_scale = {raw = 0}", "raw = 0"),
    ("prefill_scale = {raw = 2.0}", "prefill_scale = 2.0", "must be a table"),
    ("request_overhead_s = {colocated = 0.05, disaggregated = 0.07}", "request_overhead_s = {colocated = -1}",
     "colocated = -1"),
])
def test_a_cluster_files_bad_served_figures_are_refused_by_name(old: str, entry: str, needle: str) -> None:
    with pytest.raises(cluster_file.ClusterFileError, match=needle):
        cluster_file.loads(SIM_FILE.replace(old, entry))


# ---------------------------------------------------------------- the KV's wire dtype


@pytest.mark.parametrize(("config", "engine", "expected"), [
    ({"torch_dtype": "bfloat16"}, "", "bfloat16"),
    ({"dtype": "float32"}, "", "float32"),
    ({"text_config": {"dtype": "float16"}}, "", "float16"),
    ({"torch_dtype": "bfloat16"}, "float32", "float32"),  # the serving engine's dtype wins
    ({}, "", costmodel.KV_DTYPE),
    (None, "int8", costmodel.KV_DTYPE),  # not a dtype the codecs know: priced as the default
])
def test_the_kv_dtype_is_the_engines_else_the_checkpoints(config, engine: str, expected: str) -> None:
    assert costmodel.kv_dtype_of(config, engine) == expected


def test_a_float32_cluster_ships_twice_the_bytes_of_a_bfloat16_one() -> None:
    """The view's KV dtype sizes the transfer: the engine's dtype from the registry, live; the
    checkpoint's in the simulator."""
    d = Dispatcher(Fixed(Placement("fast", "slow", "raw")), "fixed", LoadLedger())
    shipped = {}
    for dtype in ("bfloat16", "float32"):
        view = d.view((FAST, SLOW), LINKS, CONFIG, _request("r"), kv_dtype=dtype)
        assert view.kv_dtype == dtype
        shipped[dtype] = Predictor(_request("r"), view).cost(view.node("fast"), view.node("slow")).shipped_bytes
    assert shipped["float32"] == pytest.approx(2 * shipped["bfloat16"])
    assert d.view((FAST, SLOW), LINKS, CONFIG).kv_dtype == "bfloat16"  # llama-3.1-8b's config says bf16
    assert build_cluster(cluster_file.loads(SIM_FILE), "llama-3.1-8b").kv_dtype == "bfloat16"


# ---------------------------------------------------------------- the factor along prompt length


def test_a_modes_factor_follows_its_points_along_prompt_length() -> None:
    points = ((141, 1.3), (269, 1.15), (525, 1.1))
    served = Served((("int8", 1.15),), prefill_points=(("int8", points),))
    assert served.scale("int8") == 1.15  # no length: the overall figure
    assert [served.scale("int8", n) for n in (64, 141, 269, 525, 4096)] == [1.3, 1.3, 1.15, 1.1, 1.1]
    midway = served.scale("int8", round((141 * 269) ** 0.5))  # halfway in log2(tokens)
    assert midway == pytest.approx(1.225, abs=2e-3)
    compute = _cost(CPU_EFF, link=None).prefill_s  # 512 new tokens
    eff = costmodel.with_probe(CPU_EFF, LLAMA, [], served=served)
    assert _cost(eff, "int8").prefill_s == pytest.approx(served.scale("int8", 512) * compute)
    with pytest.raises(ValueError, match="without a prefill_scale"):
        Served(prefill_points=(("raw", ((128, 1.0),)),))
    with pytest.raises(ValueError, match="ascending"):
        Served((("raw", 1.0),), prefill_points=(("raw", ((256, 1.0), (128, 1.1))),))


def test_the_calibration_keeps_a_point_per_length_band_once_two_bands_have_enough_samples() -> None:
    cal = ServedCalibration(min_samples=3, skip_cold=False)
    for tokens, prefill in ((141, 0.13), (141, 0.13), (150, 0.14)):
        cal.observe(_seen(prefill=prefill, num_tokens=tokens))
    one_band = cal.served("p")
    assert one_band.prefill_points == () and one_band.scale("raw", 500) == pytest.approx(1.3)
    for tokens, prefill in ((525, 0.11), (530, 0.11)):
        cal.observe(_seen(prefill=prefill, num_tokens=tokens))
    assert cal.served("p").prefill_points == ()  # the second band has 2 of its 3 samples
    cal.observe(_seen(prefill=0.11, num_tokens=520))
    served = cal.served("p")
    assert served.prefill_points == (("raw", ((141, pytest.approx(1.3)), (525, pytest.approx(1.1)))),)
    assert served.scale("raw", 1000) == pytest.approx(1.1) and served.scale("raw") == pytest.approx(1.2)
    assert cal.snapshot("p")["prefill_points"] == {"raw": [[141, 1.3], [525, 1.1]]}


def test_a_cluster_file_may_give_a_factor_along_prompt_length() -> None:
    text = SIM_FILE.replace("prefill_scale = {raw = 2.0}", "prefill_scale = {raw = [[128, 2.0], [512, 1.5], [2048, 1.2]]}")
    served = cluster_file.loads(text).node("a").served
    assert served.prefill_points == (("raw", ((128, 2.0), (512, 1.5), (2048, 1.2))),)
    assert served.prefill_scale == (("raw", 1.5),)  # their median, where no length is known
    for bad in ("[[512, 1.5], [128, 2.0]]", "[[128, 0]]", "[]", "[[128.5, 1.0]]"):
        with pytest.raises(cluster_file.ClusterFileError, match="tokens, factor"):
            cluster_file.loads(SIM_FILE.replace("prefill_scale = {raw = 2.0}", f"prefill_scale = {{raw = {bad}}}"))
