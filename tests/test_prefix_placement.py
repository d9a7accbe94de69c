"""Placement that knows where prefixes live, and one cost model for live and simulated.

The prefix index on its own; every built-in policy's choice when the decode
node, the prefill node or neither holds a conversation's history (a DGX Spark
and an M4 Max over 10GbE, catalog figures, Llama-3.1-8B bf16); the live
``Predictor`` and the simulator agreeing to the last bit on what cached
tokens do to prefill and transfer; and the batched decode rule.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from cluster.blocks import BLOCK_TOKENS, block_hashes
from cluster.links import LinkView
from cluster.node import NodeInfo
from scheduler import catalog, costmodel
from scheduler.dispatch import Dispatcher
from scheduler.load import LoadLedger
from scheduler.placement import ClusterView, NodeView, Placement, cached_prefix
from scheduler.policy import (
    POLICIES,
    Colocated,
    Conditional,
    FastestPair,
    LeastLoaded,
    Predictor,
    load_policy,
)
from scheduler.prefix_index import PrefixIndex
from scheduler.request import GenerationRequest
from scheduler.sim import cluster_file
from scheduler.sim.cli import main
from scheduler.sim.engine import Simulation, build_cluster
from scheduler.sim.workload import (
    WorkItem,
    conversations,
    read_trace,
    session_token_ids,
)

EXAMPLES = Path(__file__).parent.parent / "examples" / "clusters"
LLAMA = "llama-3.1-8b"
LLAMA_CONFIG = catalog.model_config(LLAMA)
FINGERPRINT = "llama-weights"
# The fast prefiller and the fast decoder, as they advertise themselves (catalog peaks).
SPARK = NodeView("spark", ("prefill", "decode"), "torch", "m", tflops=125.0, mem_bw_gbps=273.0, hardware="dgx-spark")
MAC = NodeView("mac", ("prefill", "decode"), "mlx", "m", tflops=17.2, mem_bw_gbps=546.0, hardware="mac-m4-max")
TEN_GBE = LinkView(9.4, 5e-5)  # catalog 10gbe: 10 Gb/s x 0.94 payload, 50 us
LINKS = {("spark", "mac"): TEN_GBE, ("mac", "spark"): TEN_GBE}


def _hashes(num_tokens: int) -> list[int]:
    return block_hashes(FINGERPRINT, list(range(num_tokens)))


def _turn(history: int, new: int, holders: tuple[str, ...], *, nodes: tuple[NodeView, ...] = (SPARK, MAC),
          max_tokens: int = 256) -> tuple[GenerationRequest, ClusterView]:
    """A turn of ``history + new`` prompt tokens whose first ``history`` tokens
    ``holders`` hold, with the view a live scheduler would build for it."""
    tokens = tuple(range(history + new))
    hashes = _hashes(len(tokens))
    index = PrefixIndex()
    for node in holders:
        index.add(node, hashes[: history // BLOCK_TOKENS])
    request = GenerationRequest("r", "m", tokens, max_tokens=max_tokens, prefix_hashes=tuple(hashes))
    cached = index.cached_by_node(hashes, len(tokens), [n.node_id for n in nodes])
    return request, ClusterView(nodes, LINKS, LLAMA_CONFIG, cached_tokens=cached)


# ---------------------------------------------------------------- the index


def test_a_node_holds_the_longest_whole_block_prefix_it_reported() -> None:
    hashes = _hashes(1000)  # 15 whole blocks; the last 40 tokens are no block
    index = PrefixIndex()
    index.add("mac", hashes[:10])
    assert index.cached_tokens("mac", hashes, 1000) == 640
    assert index.cached_tokens("spark", hashes, 1000) == 0  # a node the index never heard of
    index.add("mac", hashes[12:13])  # block 12 stands for the whole prefix up to it (chained hashes)
    assert index.cached_tokens("mac", hashes, 1000) == 13 * 64
    assert index.cached_by_node(hashes, 1000, ["mac", "spark"]) == {"mac": 832, "spark": 0}


def test_a_changed_early_token_shares_only_the_blocks_before_it() -> None:
    index = PrefixIndex()
    index.add("mac", _hashes(640))
    edited = list(range(640))
    edited[200] = 99_999  # in block 3
    assert index.cached_tokens("mac", block_hashes(FINGERPRINT, edited), 640) == 3 * 64


def test_the_last_prompt_token_is_never_counted_as_cached() -> None:
    # A prompt of exactly two blocks, both held: its last token must still be computed
    # (its logits give the first token), so only the first block counts.
    index = PrefixIndex()
    index.add("mac", _hashes(128))
    assert index.cached_tokens("mac", _hashes(128), 128) == 64
    assert index.cached_tokens("mac", _hashes(129), 129) == 128


def test_replace_sets_the_node_add_extends_it_and_forget_drops_it() -> None:
    hashes = _hashes(64 * 8)
    index = PrefixIndex()
    index.add("mac", hashes[:4])
    index.add("mac", hashes[4:6])
    assert index.cached_tokens("mac", hashes, 10_000) == 6 * 64 and index.sizes() == {"mac": 6}
    index.replace("mac", hashes[:2])  # a Stats snapshot: blocks 2..5 were evicted
    assert index.cached_tokens("mac", hashes, 10_000) == 2 * 64 and index.sizes() == {"mac": 2}
    index.forget("mac")
    index.forget("mac")  # idempotent
    assert index.cached_tokens("mac", hashes, 10_000) == 0 and "mac" not in index and index.sizes() == {}


def test_the_index_holds_at_most_its_bound_per_node() -> None:
    hashes = _hashes(64 * 10)
    index = PrefixIndex(max_hashes_per_node=4)
    index.replace("mac", hashes)  # a snapshot over the bound keeps its last (newest) entries
    assert index.sizes() == {"mac": 4} and index.cached_tokens("mac", hashes, 10_000) == 10 * 64
    index.replace("spark", hashes[:3])
    index.add("spark", hashes[5:7])  # 5 > 4: only the newest report stays
    assert index.sizes()["spark"] == 2 and index.cached_tokens("spark", hashes[:3], 10_000) == 0
    with pytest.raises(ValueError, match=">= 1"):
        PrefixIndex(max_hashes_per_node=0)


def test_the_views_figure_wins_over_the_requests_cached_everywhere_figure() -> None:
    request = GenerationRequest("r", "m", tuple(range(1000)), max_tokens=4, cached_prefix_tokens=500)
    view = ClusterView((SPARK, MAC), cached_tokens={"mac": 128})
    assert (cached_prefix(request, view, "mac"), cached_prefix(request, view, "spark")) == (128, 500)
    assert (view.cached("mac"), view.cached("spark")) == (128, 0)  # the view alone: 0 when unknown
    greedy = ClusterView((MAC,), cached_tokens={"mac": 5000})
    assert cached_prefix(request, greedy, "mac") == 999  # never the last prompt token


# ---------------------------------------------------------------- each policy, by where the history lives

SHORT_TURN = (8192, 200)  # 8k of conversation held somewhere, 200 new tokens
EXPECTED_SHORT_TURN = {
    # history on the decode node (the Mac): the cost-model policies prefill the 200 new
    # tokens there (~0.3 s) rather than have the Spark recompute all 8,392 (~1.5 s)
    "mac": {"colocated": Placement(None, "mac"), "round-robin": Placement("spark", "mac"),
            "least-loaded": Placement("spark", "mac"), "fastest-pair": Placement("spark", "mac"),
            "roofline": Placement(None, "mac"), "conditional": Placement(None, "mac")},
    # history on the prefill node (the Spark): it computes only the 200 new tokens and
    # ships all 8,392 tokens' KV (the Mac holds none): TTFT ~0.9 s against ~11 s local
    "spark": {"colocated": Placement(None, "spark"), "round-robin": Placement("spark", "mac"),
              "least-loaded": Placement("spark", "mac"), "fastest-pair": Placement("spark", "mac"),
              "roofline": Placement("spark", "mac"), "conditional": Placement("spark", "mac")},
    # nowhere: the Spark prefills everything and streams it
    "": {"colocated": Placement(None, "mac"), "round-robin": Placement("spark", "mac"),
         "least-loaded": Placement("spark", "mac"), "fastest-pair": Placement("spark", "mac"),
         "roofline": Placement("spark", "mac"), "conditional": Placement("spark", "mac")},
}


@pytest.mark.parametrize("holder", ["mac", "spark", ""], ids=["history-on-decode-node", "history-on-prefill-node",
                                                             "no-history"])
@pytest.mark.parametrize("name", list(POLICIES))
def test_each_policy_places_a_short_turn_by_where_its_history_lives(name: str, holder: str) -> None:
    request, view = _turn(*SHORT_TURN, (holder,) if holder else ())
    assert POLICIES[name]().place(request, view) == EXPECTED_SHORT_TURN[holder][name]


def test_the_predicted_costs_behind_the_short_turn_choices() -> None:
    request, view = _turn(*SHORT_TURN, ("mac",))
    p = Predictor(request, view)
    local, remote = p.cost(None, MAC), p.cost(SPARK, MAC)
    assert (local.num_new_tokens, local.num_shipped_tokens) == (200, 0)
    assert (remote.num_new_tokens, remote.num_shipped_tokens) == (8392, 200)  # the Spark recomputes the history
    assert p.estimate(None, MAC).ttft_s < 0.3 * p.estimate(SPARK, MAC).ttft_s
    request, view = _turn(*SHORT_TURN, ("spark",))
    remote = Predictor(request, view).cost(SPARK, MAC)
    assert (remote.num_prefill_cached, remote.num_new_tokens, remote.num_shipped_tokens) == (8192, 200, 8392)
    assert remote.shipped_bytes == 8392 * 128 * 1024  # the Mac lacks the history: all of it crosses


def test_conditional_keeps_a_short_new_turn_on_the_node_holding_the_history() -> None:
    request, view = _turn(8192, 200, ("mac",))
    assert Conditional().place(request, view) == Placement(None, "mac")
    assert Conditional().place(*_turn(8192, 200, ())) == Placement("spark", "mac")  # the same prompt, uncached


def test_conditional_sends_a_long_new_document_to_the_prefill_node_despite_the_history() -> None:
    # 1k of history on the Mac, then a pasted 16k-token document: the Mac would prefill
    # ~16k new tokens (~27 s); the Spark prefills all 17k (~3.9 s) and ships the 16k the Mac lacks.
    request, view = _turn(1024, 16384, ("mac",))
    assert Conditional().place(request, view) == Placement("spark", "mac")
    remote = Predictor(request, view).cost(SPARK, MAC)
    assert (remote.num_new_tokens, remote.num_shipped_tokens) == (17408, 16384)


MAC2 = NodeView("mac2", ("prefill", "decode"), "mlx", "m", tflops=17.2, mem_bw_gbps=546.0, hardware="mac-m4-max")


@pytest.mark.parametrize("policy", [Colocated, LeastLoaded, FastestPair, Conditional])
def test_between_equal_nodes_the_one_holding_the_history_decodes(policy: type) -> None:
    nodes = (SPARK, MAC, MAC2)
    for holder in ("mac", "mac2"):
        request, view = _turn(8192, 200, (holder,), nodes=nodes)
        assert policy().place(request, view).decode_node == holder, holder


def test_round_robin_ignores_where_the_history_lives() -> None:
    policy = load_policy("round-robin")
    decoders = [policy.place(*_turn(8192, 200, ("mac",))).decode_node for _ in range(4)]
    assert decoders == ["mac", "spark", "mac", "spark"]


def test_the_dispatcher_gives_the_policy_what_the_index_holds_for_the_request() -> None:
    def node(node_id: str, hardware: str, tflops: float, bandwidth: float, engine: str) -> NodeInfo:
        return NodeInfo(node_id=node_id, roles=("prefill", "decode"), engine=engine, model_id="llama",
                        weights_fingerprint="w", host="127.0.0.1", grpc_port=1, kv_port=2, device="cuda",
                        tflops=tflops, mem_bw_gbps=bandwidth, free_mem_bytes=1 << 30, version="0",
                        key_fingerprint="k", hardware=hardware, profile_source="declared")

    nodes = (node("spark", "dgx-spark", 125.0, 273.0, "torch"), node("mac", "mac-m4-max", 17.2, 546.0, "mlx"))
    d = Dispatcher(load_policy("conditional"), "conditional", LoadLedger(lambda: 0.0))
    tokens = tuple(range(8392))
    request = GenerationRequest("r1", "llama", tokens, max_tokens=256, prefix_hashes=tuple(_hashes(len(tokens))))
    assert d.view(nodes, LINKS, LLAMA_CONFIG, request).cached_tokens == {"spark": 0, "mac": 0}
    assert d.place(request, d.view(nodes, LINKS, LLAMA_CONFIG, request)) == Placement("spark", "mac")
    d.finish("r1")
    d.prefixes.add("mac", _hashes(8192 + 256))  # Done.prefix_blocks: the Mac holds the conversation
    second = GenerationRequest("r2", "llama", tokens, max_tokens=256, prefix_hashes=request.prefix_hashes)
    view = d.view(nodes, LINKS, LLAMA_CONFIG, second)
    assert view.cached_tokens == {"spark": 0, "mac": 8384}  # 131 blocks; never the last token
    assert d.place(second, view) == Placement(None, "mac")
    # The backlog booked for the local prefill is the 8-token remainder's, not the whole prompt's.
    assert d.ledger.prefill_backlog_s("mac") == pytest.approx(Predictor(second, view).prefill_s(view.node("mac")))
    assert d.ledger.prefill_backlog_s("mac") < 0.1
    d.prefixes.forget("mac")
    assert d.view(nodes, LINKS, LLAMA_CONFIG, second).cached_tokens == {"spark": 0, "mac": 0}
    explicit = d.view(nodes, LINKS, LLAMA_CONFIG, second, cached_tokens={"mac": 640, "gone": 64})
    assert explicit.cached_tokens == {"mac": 640}  # given figures win; nodes outside the view are dropped
    assert d.view(nodes, LINKS, LLAMA_CONFIG).cached_tokens == {}  # no request: nothing known


# ---------------------------------------------------------------- one cost model, live and simulated


def _sim_pair(link: str = "10gbe") -> cluster_file.ClusterSpec:
    return cluster_file.loads('[[nodes]]\nname = "spark"\nhardware = "dgx-spark"\n'
                              '[[nodes]]\nname = "mac"\nhardware = "mac-m4-max"\n'
                              f'[[links]]\nnodes = ["spark", "mac"]\nkind = "{link}"\n')


class _Fixed:
    """Places every request as told and keeps the views it saw."""

    def __init__(self, placement: Placement) -> None:
        self.placement, self.seen = placement, []

    def place(self, request: GenerationRequest, cluster: ClusterView) -> Placement:
        self.seen.append((request, cluster))
        return self.placement


@pytest.mark.parametrize("prefill_held, decode_held, placement", [
    (6400, 3200, Placement("spark", "mac")),  # the prefill node holds more: it ships some of its cache
    (3200, 6400, Placement("spark", "mac")),  # the decode node holds more: computed from 3200, shipped from 6400
    (0, 0, Placement("spark", "mac")),
    (0, 6400, Placement(None, "mac")),  # colocated on the node holding the history
])
def test_the_live_predictor_and_the_simulator_agree_on_prefill_and_transfer(
        prefill_held: int, decode_held: int, placement: Placement) -> None:
    prompt, session = 8192, "chat"
    hashes = block_hashes(LLAMA, session_token_ids(session, prompt))
    # The simulator: its own index holds the figures, the policy is told where to place.
    cluster = build_cluster(_sim_pair(), LLAMA)
    policy = _Fixed(placement)
    sim = Simulation(cluster, policy)
    sim.prefixes.add("spark", hashes[: prefill_held // 64])
    sim.prefixes.add("mac", hashes[: decode_held // 64])
    [simulated] = sim.run([WorkItem(0.0, prompt, 16, session=session)])
    # The live path: a Dispatcher over NodeInfo-free views of the same nodes, links and figures.
    live_index = PrefixIndex()
    live_index.add("spark", hashes[: prefill_held // 64])
    live_index.add("mac", hashes[: decode_held // 64])
    request = GenerationRequest("r", LLAMA, tuple(session_token_ids(session, prompt)), max_tokens=16,
                                prefix_hashes=tuple(hashes))
    nodes = (NodeView("spark", ("prefill", "decode"), "torch", LLAMA, 125.0, 273.0, hardware="dgx-spark"),
             NodeView("mac", ("prefill", "decode"), "mlx", LLAMA, 17.2, 546.0, hardware="mac-m4-max"))
    view = ClusterView(nodes, cluster.link_views(), LLAMA_CONFIG,
                       cached_tokens=live_index.cached_by_node(hashes, prompt, ["spark", "mac"]))
    _, sim_view = policy.seen[0]
    assert sim_view.cached_tokens == view.cached_tokens == {"spark": prefill_held, "mac": decode_held}
    predictor = Predictor(request, view)
    prefill = view.node(placement.prefill_node) if placement.prefill_node else None
    cost = predictor.cost(prefill, view.node("mac"))
    estimate = predictor.estimate(prefill, view.node("mac"))
    assert simulated.prefill_s == cost.prefill_s  # identical, not close: one function computed both
    assert simulated.kv_bytes == int(cost.shipped_bytes)
    assert simulated.cached_prefix_tokens == cost.num_prefill_cached
    assert simulated.exposed_transfer_s == pytest.approx(cost.exposed_s, rel=1e-12, abs=1e-15)
    assert simulated.ttft_s == pytest.approx(estimate.ttft_s, rel=1e-12)
    if placement.colocated:
        assert (cost.num_new_tokens, simulated.kv_bytes) == (prompt - decode_held, 0)
    else:
        assert cost.num_new_tokens == prompt - prefill_held
        assert simulated.kv_bytes == (prompt - decode_held) * 128 * 1024


def test_request_cost_refuses_a_prefix_covering_the_whole_prompt() -> None:
    model, hw = costmodel.model_cost(LLAMA_CONFIG), catalog.hardware("dgx-spark")
    with pytest.raises(ValueError, match="num_prefill_cached must be in"):
        costmodel.request_cost(model, hw, costmodel.GENERIC["bf16"], 100, 100)


# ---------------------------------------------------------------- multi-turn in the simulator


def test_a_later_turn_reuses_the_history_each_node_holds_in_the_simulator() -> None:
    # Spark + M4 Max over 10GbE, conditional: turn 1 (8k) prefills on the Spark and ships
    # all of it; turn 2 (8k + the 128-token answer + 200 new) finds its prompt on the Spark
    # and the conversation on the Mac: the Spark computes 328 tokens, ships the 264 the Mac lacks.
    cluster = build_cluster(_sim_pair(), LLAMA)
    turns = conversations([WorkItem(0.0, 8192, 128)], turns=2, turn_tokens=200, think_s=60.0)
    assert [(t.arrival_s, t.prompt_tokens, t.session) for t in turns] == [(0.0, 8192, "c0"), (60.0, 8520, "c0")]
    first, second = Simulation(cluster, load_policy("conditional")).run(turns)
    assert (first.prefill_node, first.decode_node, first.cached_prefix_tokens) == ("spark", "mac", 0)
    assert (second.prefill_node, second.decode_node, second.cached_prefix_tokens) == ("spark", "mac", 8192)
    assert second.kv_bytes == (8520 - 8256) * 128 * 1024  # the Mac held 8,319 tokens: 129 whole blocks
    assert second.ttft_s < first.ttft_s / 10
    # The baseline stays on the Mac, where the conversation is: 10.9 s for turn 1, ~0.4 s for turn 2.
    first, second = Simulation(cluster, load_policy("colocated")).run(turns)
    assert first.decode_node == second.decode_node == "mac" and second.cached_prefix_tokens == 8256
    assert second.ttft_s < first.ttft_s / 20


def test_conditional_keeps_a_short_turn_local_when_only_the_decode_node_holds_the_history() -> None:
    # The Mac holds the conversation (say, from before the Spark joined); the Spark holds nothing.
    cluster = build_cluster(_sim_pair(), LLAMA)
    sim = Simulation(cluster, load_policy("conditional"))
    sim.prefixes.add("mac", block_hashes(LLAMA, session_token_ids("c0", 8192)))
    short, document = sim.run([WorkItem(0.0, 8392, 64, session="c0"), WorkItem(30.0, 8392 + 16384, 64, session="c0")])
    assert (short.prefill_node, short.decode_node, short.kv_bytes, short.cached_prefix_tokens) == (
        "mac", "mac", 0, 8192)
    assert (document.prefill_node, document.decode_node) == ("spark", "mac")  # 16k new tokens: the Spark


def test_pdc_simulate_turns_opens_conversations(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--cluster", str(EXAMPLES / "spark-m4max-10gbe.toml"), "--model", LLAMA, "--policy", "colocated",
                 "--prompt-tokens", "8192", "--output-tokens", "128", "--turns", "3", "--turn-tokens", "200",
                 "--json"]) == 0
    requests = json.loads(capsys.readouterr().out)["requests"]
    assert [(r["arrival_s"], r["prompt_tokens"], r["cached_prefix_tokens"], r["decode_node"]) for r in requests] == [
        (0.0, 8192, 0, "mac"), (60.0, 8520, 8256, "mac"), (120.0, 8848, 8640, "mac")]
    assert main(["--cluster", str(EXAMPLES / "spark-m4max-10gbe.toml"), "--model", LLAMA, "--turns", "2",
                 "--trace", "t.jsonl"]) == 2
    assert "--turns makes conversations" in capsys.readouterr().err


def test_a_trace_names_its_conversations_in_a_session_column(tmp_path: Path) -> None:
    trace = tmp_path / "chats.csv"
    trace.write_text("arrival_s,prompt_tokens,output_tokens,session\n0,4096,64,alice\n1,4096,64,bob\n"
                     "30,4360,64,alice\n31,300,64,\n")
    items = read_trace(trace)
    assert [i.session for i in items] == ["alice", "bob", "alice", ""]
    results = Simulation(build_cluster(_sim_pair(), LLAMA), load_policy("colocated")).run(items)
    # Alice's second turn finds her 4,096 + 63 tokens on the node that served her first (64 whole blocks);
    # Bob's stream and the session-less request share nothing with it.
    assert [r.cached_prefix_tokens for r in results] == [0, 0, 4096, 0]
    assert results[2].decode_node == results[0].decode_node


def test_requests_without_a_session_leave_the_index_empty() -> None:
    sim = Simulation(build_cluster(_sim_pair(), LLAMA), load_policy("conditional"))
    sim.run([WorkItem(0.0, 4096, 8), WorkItem(10.0, 4096, 8, cached_prefix_tokens=1024)])
    assert sim.prefixes.sizes() == {}


# ---------------------------------------------------------------- batched decode


def test_a_batch_step_reads_the_weights_once_and_every_requests_kv() -> None:
    model, hw, eff = costmodel.model_cost(LLAMA_CONFIG), catalog.hardware("mac-m4-max"), costmodel.GENERIC["bf16"]
    depths = [1000, 4000, 8000]
    bandwidth = 546e9
    expected = (model.decode_weight_bytes / (bandwidth * 0.75)
                + sum(costmodel.kv_bytes(model, d + 1) for d in depths) / (bandwidth * 0.5))
    assert costmodel.decode_step_time(model, hw, eff, depths) == pytest.approx(expected, rel=1e-12)
    assert costmodel.decode_step_time(model, hw, eff, [4000]) == costmodel.decode_time(model, hw, eff, 4000)
    four = costmodel.batched_decode_time(model, hw, eff, 4000, 4)
    one = costmodel.decode_time(model, hw, eff, 4000)
    assert one < four < 1.5 * one  # not 4x: the 15 GB of weights are read once per step
    with pytest.raises(ValueError, match="at least one"):
        costmodel.decode_step_time(model, hw, eff, [])


def test_a_moe_batch_reads_the_experts_its_tokens_route_to() -> None:
    qwen, hw, eff = catalog.model("qwen3-30b-a3b"), catalog.hardware("mac-m4-max"), costmodel.GENERIC["bf16"]
    assert costmodel.batch_weight_bytes(qwen, 1) == qwen.decode_weight_bytes
    eight = costmodel.batch_weight_bytes(qwen, 8)  # 8 tokens touch ~52 of 128 experts a layer, not 8
    expert_bytes = qwen.num_moe_layers * qwen.expert_params * 2
    assert eight - qwen.decode_weight_bytes == pytest.approx(
        (qwen.expected_experts_touched(8) - 8) * expert_bytes, rel=1e-12)
    assert costmodel.decode_step_time(qwen, hw, eff, [100] * 8) > costmodel.decode_time(qwen, hw, eff, 100)


def test_the_predictor_counts_active_requests_as_one_batch() -> None:
    busy = NodeView("mac", ("prefill", "decode"), "mlx", "m", 17.2, 546.0, active_requests=5, hardware="mac-m4-max")
    request = GenerationRequest("r", "m", tuple(range(4096)), max_tokens=64)
    predictor = Predictor(request, ClusterView((busy,), model_config=LLAMA_CONFIG))
    model, eff = costmodel.model_cost(LLAMA_CONFIG), costmodel.efficiency("mac-m4-max", "mlx", "bf16")
    assert predictor.tpot_s(busy) == costmodel.batched_decode_time(
        model, catalog.hardware("mac-m4-max"), eff, 4096 + 32, 6)


def test_the_simulator_decodes_a_nodes_requests_in_one_batch() -> None:
    # Four 2k-token requests land on one M4 Max at once (colocated): after the four
    # prefills, every step serves all four, so each token costs one batched step.
    spec = cluster_file.loads('[[nodes]]\nname = "solo"\nhardware = "mac-m4-max"\n')
    cluster = build_cluster(spec, LLAMA)
    results = Simulation(cluster, load_policy("colocated")).run([WorkItem(0.0, 2048, 33)] * 4)
    node = cluster.nodes["solo"]
    step = costmodel.decode_step_time(cluster.model, node.machine, node.efficiency, [2048 + 16] * 4)
    alone = costmodel.decode_time(cluster.model, node.machine, node.efficiency, 2048 + 16)
    last = results[-1]  # joined last: every one of its steps had all four members
    assert last.tpot_s == pytest.approx(step, rel=0.01)
    assert last.tpot_s < 1.3 * alone
