"""Live placement and load accounting on fake nodes and a fake clock: no worker, no gRPC.

In the style of vLLM's scheduler tests: build requests, place them, feed fake
progress (prefill done, finish) and check the counts, the backlog and what the
policy saw. The ``Dispatcher`` and ``LoadLedger`` here are the objects
``pdc serve`` runs; the ledger is also the simulator's.
"""
from __future__ import annotations

import pytest

from cluster.links import LinkView
from cluster.node import NodeInfo
from scheduler import catalog
from scheduler.dispatch import Dispatcher, node_view, predicted_prefill_s
from scheduler.load import LoadLedger
from scheduler.placement import ClusterView, Placement
from scheduler.policy import Predictor, load_policy
from scheduler.request import GenerationRequest, NoCapacityError

LLAMA = catalog.model_config("llama-3.1-8b")
LINK = {("spark", "mac"): LinkView(9.4, 1e-4)}


def _node(node_id: str, roles: tuple[str, ...], hardware: str = "", **overrides) -> NodeInfo:
    fields = {"node_id": node_id, "roles": roles, "engine": "torch", "model_id": "llama", "weights_fingerprint": "w",
              "host": "127.0.0.1", "grpc_port": 50051, "kv_port": 50052, "device": "cuda", "tflops": 10.0,
              "mem_bw_gbps": 100.0, "free_mem_bytes": 1 << 30, "version": "0", "key_fingerprint": "k",
              "hardware": hardware, "profile_source": "declared"}
    return NodeInfo(**{**fields, **overrides})


SPARK = _node("spark", ("prefill",), "dgx-spark", tflops=125.0, mem_bw_gbps=273.0)
MAC = _node("mac", ("prefill", "decode"), "mac-m4-max", engine="mlx", device="mlx:gpu", tflops=17.2,
            mem_bw_gbps=546.0)
MINI = _node("mini", ("decode",))
NODES = (SPARK, MAC)


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


class Scripted:
    """Returns the placements it is given, in order, and keeps every view it saw."""

    def __init__(self, *answers: object) -> None:
        self.answers, self.seen = list(answers), []

    def place(self, request: GenerationRequest, cluster: ClusterView) -> Placement:
        self.seen.append(cluster)
        return self.answers.pop(0)


def _request(rid: str, prompt: int = 2048, max_tokens: int = 16) -> GenerationRequest:
    return GenerationRequest(rid, "llama", (7,) * prompt, max_tokens=max_tokens)


def _dispatcher(policy: object, clock: Clock | None = None) -> Dispatcher:
    return Dispatcher(policy, "scripted", LoadLedger(clock or Clock()))  # type: ignore[arg-type]


def _place(d: Dispatcher, rid: str, nodes=NODES, config: dict | None = LLAMA, **kw) -> Placement:
    return d.place(_request(rid, **kw), d.view(nodes, LINK, config))


def _load(d: Dispatcher, node: str) -> tuple[int, float]:
    return d.ledger.active_requests(node), d.ledger.prefill_backlog_s(node)


# ---------------------------------------------------------------- counts and backlog


def test_a_remote_prefill_counts_on_both_nodes_until_its_prefill_ends() -> None:
    policy = Scripted(Placement("spark", "mac"))
    d = _dispatcher(policy)
    assert _place(d, "r1") == Placement("spark", "mac")
    predicted = Predictor(_request("r1"), policy.seen[0]).prefill_s(policy.seen[0].node("spark"))
    assert predicted > 0
    assert _load(d, "spark") == (1, predicted) and _load(d, "mac") == (1, 0.0)
    d.prefill_done("r1")
    assert _load(d, "spark") == (0, 0.0) and _load(d, "mac") == (1, 0.0)  # still decoding
    d.finish("r1")
    assert d.ledger.active_counts() == {} and len(d.ledger) == 0


def test_the_policy_sees_earlier_requests_load() -> None:
    policy = Scripted(Placement("spark", "mac"), Placement("spark", "mac"), Placement(None, "mac"))
    d = _dispatcher(policy)
    _place(d, "r1")
    _place(d, "r2")
    first, second = policy.seen[0], policy.seen[1]
    assert [(n.node_id, n.active_requests, n.prefill_backlog_s) for n in first.nodes] == [
        ("spark", 0, 0.0), ("mac", 0, 0.0)]
    one = predicted_prefill_s(_request("r1"), first, Placement("spark", "mac"))[0]
    assert (second.node("spark").active_requests, second.node("spark").prefill_backlog_s) == (1, one)
    assert second.node("mac").active_requests == 1
    d.prefill_done("r1")
    _place(d, "r3")
    third = policy.seen[2]
    assert third.node("spark").active_requests == 1  # r2 still prefilling
    assert third.node("spark").prefill_backlog_s == pytest.approx(one)  # r2's (same prompt)
    assert third.node("mac").active_requests == 2


def test_colocated_counts_once_and_queues_its_prefill_on_the_decode_node() -> None:
    d = _dispatcher(Scripted(Placement(None, "mac")))
    _place(d, "r1", prompt=4096)
    active, backlog = _load(d, "mac")
    assert active == 1 and backlog > 0 and _load(d, "spark") == (0, 0.0)
    d.prefill_done("r1")  # the first token: the local prefill is over, decoding goes on
    assert _load(d, "mac") == (1, 0.0)
    d.finish("r1")
    assert _load(d, "mac") == (0, 0.0)


def test_a_request_that_ends_before_its_prefill_leaves_every_node() -> None:
    # A failed or cancelled request: the service calls finish without prefill_done.
    d = _dispatcher(Scripted(Placement("spark", "mac")))
    _place(d, "r1")
    d.finish("r1")
    d.finish("r1")  # idempotent, as the service's finally may run after an error
    d.prefill_done("r1")  # a late callback from the lifecycle changes nothing
    assert _load(d, "spark") == (0, 0.0) and _load(d, "mac") == (0, 0.0) and len(d.ledger) == 0


def test_without_a_model_config_placement_works_with_no_backlog_estimate() -> None:
    d = _dispatcher(Scripted(Placement("spark", "mac")))
    _place(d, "r1", config=None)
    assert _load(d, "spark") == (1, 0.0)


def test_the_view_carries_profiles_and_only_links_among_its_nodes() -> None:
    d = _dispatcher(Scripted())
    links = {**LINK, ("spark", "gone"): LinkView(1.0)}
    view = d.view(NODES, links, LLAMA)
    assert view.links == LINK and view.model_config is LLAMA
    assert view.node("spark") == node_view(SPARK, d.ledger)
    spark = view.node("spark")
    assert (spark.hardware, spark.tflops, spark.device_kind, spark.measured) == ("dgx-spark", 125.0, "cuda", False)
    assert spark.free_mem_bytes == 1 << 30  # the worker's own figure: its KV is already counted there


# ---------------------------------------------------------------- what the policy may answer


@pytest.mark.parametrize("answer, nodes, message", [
    (None, NODES, r"policy 'scripted' returned None, not a Placement"),
    ("spark", NODES, r"policy 'scripted' returned 'spark', not a Placement"),
    (Placement(None, "ghost"), NODES, r"no node named 'ghost' serves this request \(nodes: mac, spark\)"),
    (Placement("ghost", "mac"), NODES, r"no node named 'ghost'"),
    (Placement(None, "spark"), NODES, r"node 'spark' lacks the 'decode' role"),  # a prefill-only node
    (Placement("mini", "mac"), (SPARK, MAC, MINI), r"node 'mini' lacks the 'prefill' role"),  # decode-only
])
def test_a_placement_that_cannot_run_is_a_503_naming_the_policy(answer: object, nodes, message: str) -> None:
    d = _dispatcher(Scripted(answer))
    with pytest.raises(NoCapacityError, match=message) as caught:
        _place(d, "r1", nodes=nodes)
    assert "policy 'scripted'" in str(caught.value)
    assert len(d.ledger) == 0 and d.ledger.active_counts() == {}  # nothing was booked


def test_a_failing_policy_is_named_with_the_request() -> None:
    class Broken:
        def place(self, request: GenerationRequest, cluster: ClusterView) -> Placement:
            raise KeyError("oops")

    d = Dispatcher(Broken(), "broken.py:Broken", LoadLedger(Clock()))  # type: ignore[arg-type]
    with pytest.raises(NoCapacityError, match=r"placement policy 'broken.py:Broken' failed on r1: KeyError: 'oops'"):
        _place(d, "r1")
    assert len(d.ledger) == 0


def test_a_policy_finding_no_capacity_passes_its_reason_through() -> None:
    class Full:
        def place(self, request: GenerationRequest, cluster: ClusterView) -> Placement:
            raise NoCapacityError("every node is full")

    with pytest.raises(NoCapacityError, match=r"^every node is full$"):
        _place(Dispatcher(Full(), "full", LoadLedger(Clock())), "r1")  # type: ignore[arg-type]


def test_prefilling_on_the_decode_node_itself_is_colocated() -> None:
    d = _dispatcher(Scripted(Placement("mac", "mac", "int8")))
    assert _place(d, "r1") == Placement(None, "mac", "int8")
    assert d.ledger.active_counts() == {"mac": 1}


def test_a_request_id_in_flight_is_refused_without_asking_the_policy() -> None:
    policy = Scripted(Placement(None, "mac"))
    d = _dispatcher(policy)
    _place(d, "r1")
    with pytest.raises(NoCapacityError, match="already in flight"):
        _place(d, "r1")
    assert len(policy.seen) == 1 and d.ledger.active_counts() == {"mac": 1}


def test_a_switched_policy_places_the_next_request() -> None:
    d = _dispatcher(Scripted(Placement("spark", "mac")))
    _place(d, "r1")
    d.use(load_policy("colocated"), "colocated")
    assert _place(d, "r2") == Placement(None, "mac") and d.policy_name == "colocated"
    assert d.ledger.active_counts() == {"spark": 1, "mac": 2}


def test_builtin_policies_place_over_the_dispatchers_view() -> None:
    # conditional over 10GbE and an 8k prompt: the Spark prefills, the Mac decodes.
    d = Dispatcher(load_policy("conditional"), "conditional", LoadLedger(Clock()))
    assert _place(d, "r1", prompt=8192) == Placement("spark", "mac")
    # A second 8k prompt finds the Spark's queue: its predicted backlog enters the TTFT estimate.
    view = d.view(NODES, LINK, LLAMA)
    assert view.node("spark").prefill_backlog_s == pytest.approx(
        Predictor(_request("r1", prompt=8192), view).prefill_s(view.node("spark")))


# ---------------------------------------------------------------- the ledger on its own


def test_a_started_prefill_counts_down_with_the_clock() -> None:
    clock = Clock()
    ledger = LoadLedger(clock)
    ledger.admit("a", "spark", "mac", predicted_prefill_s=2.0, kv_bytes=1000)
    ledger.admit("b", "spark", "mac", predicted_prefill_s=3.0, kv_bytes=500)
    assert ledger.prefill_backlog_s("spark") == 5.0
    ledger.prefill_started("a")
    clock.now += 0.5
    assert ledger.prefill_backlog_s("spark") == pytest.approx(1.5 + 3.0)
    clock.now += 10  # running late: a prefill never counts negative time
    assert ledger.prefill_backlog_s("spark") == pytest.approx(3.0)
    ledger.prefill_done("a")
    assert ledger.prefill_backlog_s("spark") == 3.0
    with pytest.raises(ValueError, match="already started"):
        ledger.prefill_started("a")


def test_resident_kv_follows_where_the_request_is_active() -> None:
    ledger = LoadLedger(Clock())
    ledger.admit("a", "spark", "mac", kv_bytes=1000)
    ledger.admit("b", None, "mac", kv_bytes=500)
    assert (ledger.resident_kv_bytes("spark"), ledger.resident_kv_bytes("mac")) == (1000, 1500)
    ledger.prefill_done("a")
    ledger.prefill_done("b")  # colocated: its KV stays on the decode node
    assert (ledger.resident_kv_bytes("spark"), ledger.resident_kv_bytes("mac")) == (0, 1500)
    ledger.finish("a")
    ledger.finish("b")
    assert ledger.resident_kv_bytes("mac") == 0 and not ledger.is_busy("mac") and "a" not in ledger


def test_the_ledger_refuses_what_it_cannot_count() -> None:
    ledger = LoadLedger(Clock())
    ledger.admit("a", None, "mac")
    with pytest.raises(ValueError, match="already in the ledger"):
        ledger.admit("a", None, "mac")
    with pytest.raises(ValueError, match=">= 0"):
        ledger.admit("b", None, "mac", predicted_prefill_s=-1.0)
    with pytest.raises(KeyError):
        ledger.prefill_started("unknown")


def test_the_live_ledger_never_reads_the_clock() -> None:
    # Live, nobody calls prefill_started: the prediction counts whole until prefill_done.
    def no_clock() -> float:
        raise AssertionError("the clock was read")

    ledger = LoadLedger(no_clock)
    ledger.admit("a", "spark", "mac", predicted_prefill_s=1.25)
    assert ledger.prefill_backlog_s("spark") == 1.25 and ledger.active_requests("spark") == 1
    ledger.prefill_done("a")
    assert ledger.prefill_backlog_s("spark") == 0.0
