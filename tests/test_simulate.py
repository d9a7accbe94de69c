"""``pdc simulate``: the seed table through the simulator, the placement physics
DESIGN relies on, queueing and time-sharing, determinism, reports, plug-ins."""
from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from scheduler import catalog, costmodel
from scheduler.placement import ClusterView, Placement
from scheduler.policy import Conditional, load_policy
from scheduler.request import GenerationRequest
from scheduler.sim import cluster_file
from scheduler.sim.cli import SimConfig, add_simulate_parser, main, simulate, sweep
from scheduler.sim.engine import Simulation, SimulationError, build_cluster
from scheduler.sim.report import PlotError, Point, plot
from scheduler.sim.workload import WorkItem, WorkloadError, read_trace, single

ROOT = Path(__file__).parent.parent
EXAMPLES = ROOT / "examples" / "clusters"
PLUGIN = ROOT / "examples" / "policies" / "streaming_rule.py"
LLAMA = "llama-3.1-8b"


def _one_node(hardware: str) -> str:
    return f'[[nodes]]\nname = "solo"\nhardware = "{hardware}"\n'


def _pair(mac: str, link: str) -> cluster_file.ClusterSpec:
    text = (f'[[nodes]]\nname = "spark"\nhardware = "dgx-spark"\n[[nodes]]\nname = "mac"\nhardware = "{mac}"\n'
            f'[[links]]\nnodes = ["spark", "mac"]\nkind = "{link}"\n')
    return cluster_file.loads(text, source=f"spark+{mac} over {link}")


def _run_cli(capsys: pytest.CaptureFixture[str], *argv: str) -> dict:
    assert main([*argv, "--json"]) == 0
    return json.loads(capsys.readouterr().out)


# ---------------------------------------------------------------- the seed table, through pdc simulate

_SEED = [
    (device, row)
    for device, table in sorted(catalog.LLAMACPP_GPT_OSS_120B.items())
    for row in table.rows
]


LLAMACPP_CLUSTERS = {"dgx-spark": ("spark-llamacpp.toml", "spark"), "mac-m4-max": ("mac-m4max-llamacpp.toml", "mac")}


@pytest.mark.parametrize("device, row", _SEED, ids=[f"{d}-d{r.depth}" for d, r in _SEED])
def test_simulate_reproduces_the_llamacpp_table_within_20_percent(
    device: str, row: costmodel.BenchRow, capsys: pytest.CaptureFixture[str]
) -> None:
    # llama-bench -p 2048 -n 32 -d D: 2048 new prompt tokens on D cached, then 32
    # generated; the command on the shipped one-node llama.cpp clusters.
    cluster, node = LLAMACPP_CLUSTERS[device]
    out = _run_cli(capsys, "--cluster", str(EXAMPLES / cluster), "--model", "gpt-oss-120b", "--policy", "colocated",
                   "--prompt-tokens", str(row.depth + 2048), "--cached-prefix-tokens", str(row.depth),
                   "--output-tokens", "32")
    (request,) = out["requests"]
    assert request["prefill_node"] == request["decode_node"] == node
    assert 2048 / request["prefill_s"] == pytest.approx(row.prefill_tok_s, rel=0.20)
    assert 1 / request["tpot_s"] == pytest.approx(row.decode_tok_s, rel=0.20)


def test_the_engine_flag_selects_the_calibrated_factors(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # Without llamacpp the generic mxfp4 factors apply: prefill comes out far from the table.
    cluster = tmp_path / "spark.toml"
    cluster.write_text(_one_node("dgx-spark"))
    args = ("--cluster", str(cluster), "--model", "gpt-oss-120b", "--prompt-tokens", "2048", "--output-tokens", "32")
    generic = _run_cli(capsys, *args)["requests"][0]
    calibrated = _run_cli(capsys, *args, "--engine", "llamacpp")["requests"][0]
    measured = catalog.LLAMACPP_GPT_OSS_120B["dgx-spark"].rows[0].prefill_tok_s
    assert 2048 / calibrated["prefill_s"] == pytest.approx(measured, rel=0.1)
    assert 2048 / generic["prefill_s"] > 2 * measured


# ---------------------------------------------------------------- placement physics (Llama-3.1-8B bf16, 8k prompt)


def _placed(spec: cluster_file.ClusterSpec, policy: str, prompt: int = 8192, output: int = 128,
            kv_codec: str = "auto"):
    config = SimConfig(spec, LLAMA, (policy,), prompt_tokens=prompt, output_tokens=output, kv_codec=kv_codec)
    return simulate(config)[policy].requests[0]


def test_conditional_prefills_on_the_spark_and_decodes_on_the_mac_over_10gbe() -> None:
    r = _placed(_pair("mac-m4-max", "10gbe"), "conditional")
    assert (r.prefill_node, r.decode_node, r.colocated, r.kv_codec) == ("spark", "mac", False, "raw")
    assert r.exposed_transfer_s < r.prefill_s / 20  # layer-wise streaming hides the 1 GiB of KV
    assert r.transfer_s > 10 * r.exposed_transfer_s
    assert r.kv_bytes == 8192 * 128 * 1024


def test_with_raw_kv_conditional_keeps_an_m3_ultra_alone_over_1gbe() -> None:
    r = _placed(_pair("mac-m3-ultra", "1gbe"), "conditional", kv_codec="raw")
    assert (r.prefill_node, r.decode_node, r.colocated, r.kv_codec) == ("mac", "mac", True, None)


def test_with_raw_kv_conditional_keeps_an_m4_max_alone_over_1gbe() -> None:
    r = _placed(_pair("mac-m4-max", "1gbe"), "conditional", kv_codec="raw")
    assert (r.prefill_node, r.decode_node, r.colocated) == ("mac", "mac", True)


def test_over_1gbe_an_m4_max_is_a_near_tie_that_the_gain_margin_keeps_local() -> None:
    # Raw KV: the M4 Max prefills 8k tokens in ~10.9 s; the Spark in ~1.5 s plus ~7.7 s
    # of exposed transfer: remote is predicted ~16 % faster, inside the model's 20 %
    # error, so `conditional` stays local; with no margin it would go remote.
    spec = _pair("mac-m4-max", "1gbe")
    local = _placed(spec, "colocated", kv_codec="raw")  # the Mac: most bandwidth, prefills itself
    remote = _placed(spec, "fastest-pair", kv_codec="raw")  # the Spark prefills, the Mac decodes
    assert (local.prefill_node, remote.prefill_node) == ("mac", "spark")
    assert 0 < (local.ttft_s - remote.ttft_s) / local.ttft_s < 0.2
    [eager] = Simulation(build_cluster(spec, LLAMA), Conditional(min_gain=0.0), kv_codec="raw").run(single(8192, 128))
    assert (eager.prefill_node, eager.decode_node) == ("spark", "mac")
    assert eager.ttft_s == pytest.approx(remote.ttft_s)


def test_with_raw_kv_conditional_keeps_an_m4_max_alone_over_wifi6() -> None:
    r = _placed(_pair("mac-m4-max", "wifi6"), "conditional", kv_codec="raw")
    assert (r.prefill_node, r.decode_node, r.colocated) == ("mac", "mac", True)


@pytest.mark.parametrize("mac", ["mac-m4-max", "mac-m3-ultra"])
def test_over_1gbe_int8_kv_moves_conditional_to_remote_prefill(mac: str) -> None:
    # The flip docs/placement.md works through: int8 halves the 1 GiB on the wire, so
    # the exposed transfer falls from ~7.7 s to ~3.2 s, and the Spark's ~4.7 s TTFT
    # beats either Mac prefilling alone by more than the 20 % margin. auto picks int8.
    raw = _placed(_pair(mac, "1gbe"), "conditional", kv_codec="raw")
    for codec in ("int8", "auto"):
        r = _placed(_pair(mac, "1gbe"), "conditional", kv_codec=codec)
        assert (r.prefill_node, r.decode_node, r.kv_codec) == ("spark", "mac", "int8"), codec
        assert r.ttft_s < 0.8 * raw.ttft_s
        assert r.kv_bytes == 32 * 8 * 8192 * 2 * (128 + 2)  # 2*h*t*(d + 2) per layer: codes + fp16 scales


@pytest.mark.parametrize("link", ["10gbe", "2.5gbe", "1gbe", "wifi6"])
@pytest.mark.parametrize("prompt", [1024, 8192])
@pytest.mark.parametrize("policy", ["conditional", "fastest-pair", "roofline"])
def test_decode_lands_on_the_higher_bandwidth_node(link: str, prompt: int, policy: str) -> None:
    # roofline minimises end to end: with 512 output tokens decode dominates.
    r = _placed(_pair("mac-m4-max", link), policy, prompt=prompt, output=512)
    assert r.decode_node == "mac"


# ---------------------------------------------------------------- queueing, time-sharing, links


def test_a_node_runs_one_prefill_at_a_time_and_decodes_its_requests_in_one_batch() -> None:
    spec = cluster_file.loads(_one_node("mac-m4-max"))
    trace = [{"arrival_s": 0, "prompt_tokens": 1024, "output_tokens": 65}] * 2
    alone = simulate(SimConfig(spec, LLAMA, ("colocated",), prompt_tokens=1024, output_tokens=65))
    single = alone["colocated"].requests[0]
    cluster = build_cluster(spec, LLAMA)
    first, second = Simulation(cluster, load_policy("colocated")).run([WorkItem(**t) for t in trace])
    assert first.queue_s == 0 and second.queue_s == pytest.approx(first.prefill_s)  # FIFO
    assert second.ttft_s == pytest.approx(2 * single.ttft_s)
    # Continuous batching: once both decode, each step reads the weights once and both
    # requests' KV, so a token costs a little more than alone, nowhere near 2x.
    node = cluster.nodes["solo"]
    both = costmodel.decode_step_time(cluster.model, node.machine, node.efficiency, [1024 + 32] * 2)
    assert second.tpot_s == pytest.approx(both, rel=0.01)
    assert single.tpot_s < second.tpot_s < 1.1 * single.tpot_s
    assert first.tpot_s > single.tpot_s  # its first step waited behind the second prefill


def test_a_busy_link_delays_the_next_transfer() -> None:
    # Over 1GbE, each 8k-token transfer outlasts the Spark's next prefill: the link queues.
    spec = _pair("mac-m4-max", "1gbe")
    cluster = build_cluster(spec, LLAMA)
    first, second = Simulation(cluster, load_policy("fastest-pair")).run(
        [WorkItem(0.0, 8192, 2), WorkItem(0.0, 8192, 2)])
    wire_s = first.kv_bytes / cluster.links[("spark", "mac")].bytes_per_s
    assert second.queue_s == pytest.approx(first.prefill_s)
    assert second.ttft_s >= first.ttft_s + wire_s - 1e-9  # the second waits for the whole first transfer
    assert second.exposed_transfer_s > first.exposed_transfer_s


def test_policies_see_live_load_and_backlog() -> None:
    seen: list[ClusterView] = []

    class Spy:
        def place(self, request: GenerationRequest, cluster: ClusterView) -> Placement:
            seen.append(cluster)
            return Placement("spark", "mac")

    cluster = build_cluster(_pair("mac-m4-max", "10gbe"), LLAMA)
    results = Simulation(cluster, Spy()).run([WorkItem(0.0, 8192, 16), WorkItem(0.5, 8192, 16)])
    first, second = seen
    assert {n.node_id: n.active_requests for n in first.nodes} == {"spark": 0, "mac": 0}
    spark = second.node("spark")
    assert (spark.active_requests, second.node("mac").active_requests) == (1, 1)
    assert results[0].prefill_s > 1.0  # still prefilling at 0.5 s
    assert spark.prefill_backlog_s == pytest.approx(results[0].prefill_s - 0.5)
    assert first.node("spark").free_mem_bytes > spark.free_mem_bytes  # the first request's KV
    assert spark.hardware == "dgx-spark" and spark.mem_bw_gbps == 273.0
    assert second.link("spark", "mac").gbps == pytest.approx(9.4)
    assert second.model_config["hidden_size"] == 4096


# ---------------------------------------------------------------- workloads and reports


def _poisson(seed: int, policy: str = "least-loaded") -> dict:
    spec = cluster_file.load(EXAMPLES / "spark-2x-m4max.toml")
    config = SimConfig(spec, LLAMA, (policy,), prompt_tokens=2048, output_tokens=32, rate=1.5,
                       num_requests=40, seed=seed, slo_ttft_s=1.0, slo_tpot_s=0.06)
    return simulate(config)[policy].to_json()


def test_a_fixed_seed_gives_the_same_run() -> None:
    assert _poisson(7) == _poisson(7)
    assert [r["arrival_s"] for r in _poisson(7)["requests"]] != [r["arrival_s"] for r in _poisson(8)["requests"]]


def test_poisson_summary_agrees_with_its_requests() -> None:
    run = _poisson(3)
    requests, summary = run["requests"], run["summary"]
    assert len(requests) == summary["num_requests"] == 40
    arrivals = [r["arrival_s"] for r in requests]
    assert arrivals == sorted(arrivals) and arrivals[0] > 0
    for key in ("ttft_s", "tpot_s", "e2e_s"):
        values = [r[key] for r in requests]
        for p in (50, 90, 99):
            assert summary[key][f"p{p}"] == pytest.approx(np.percentile(values, p), abs=2e-6), (key, p)
    for r in requests:
        assert r["ttft_s"] >= r["queue_s"] + r["prefill_s"] - 1e-6
        assert r["e2e_s"] == pytest.approx(r["ttft_s"] + 31 * r["tpot_s"], abs=1e-4)
    end = max(r["arrival_s"] + r["e2e_s"] for r in requests)
    assert summary["duration_s"] == pytest.approx(end - arrivals[0], abs=1e-5)
    assert summary["throughput_tok_s"] == pytest.approx(40 * 32 / summary["duration_s"], rel=1e-5)
    within = sum(r["ttft_s"] <= 1.0 and r["tpot_s"] <= 0.06 for r in requests)
    assert 0 < within < 40  # the SLOs separate requests in this workload
    assert summary["num_within_slo"] == within
    assert summary["goodput_req_s"] == pytest.approx(within / summary["duration_s"], rel=1e-5)


def test_a_trace_in_jsonl_or_csv_drives_the_run(tmp_path: Path) -> None:
    jsonl = tmp_path / "t.jsonl"
    jsonl.write_text('{"arrival_s": 1.0, "prompt_tokens": 4096, "output_tokens": 8, "cached_prefix_tokens": 2048}\n'
                     '\n{"arrival_s": 0.5, "prompt_tokens": 512, "output_tokens": 4}\n')
    csv = tmp_path / "t.csv"
    csv.write_text("arrival_s,prompt_tokens,output_tokens,cached_prefix_tokens\n1.0,4096,8,2048\n0.5,512,4,\n")
    assert read_trace(jsonl) == read_trace(csv)
    spec = cluster_file.load(EXAMPLES / "spark-m4max-10gbe.toml")
    run = simulate(SimConfig(spec, LLAMA, ("conditional",), trace=jsonl))["conditional"]
    assert [(r.arrival_s, r.prompt_tokens, r.cached_prefix_tokens, r.completion_tokens) for r in run.requests] == [
        (0.5, 512, 0, 4), (1.0, 4096, 2048, 8)]


@pytest.mark.parametrize("line, message", [
    ('{"arrival_s": 0, "prompt_tokens": 10}', r"line 2: missing 'output_tokens'"),
    ('{"arrival_s": 0, "prompt_tokens": 10, "output_tokens": 2, "cached_prefix_tokens": 10}',
     r"line 2: cached_prefix_tokens must be in \[0, prompt_tokens\)"),
    ('{"arrival_s": 0, "prompt": 10, "output_tokens": 2}', r"line 2: unknown field 'prompt'"),
    ("[1, 2]", r"line 2: expected an object"),
    ("{oops", r"line 2: not JSON"),
])
def test_bad_trace_lines_are_named(tmp_path: Path, line: str, message: str) -> None:
    trace = tmp_path / "bad.jsonl"
    trace.write_text('{"arrival_s": 0, "prompt_tokens": 10, "output_tokens": 2}\n' + line + "\n")
    with pytest.raises(WorkloadError, match=message):
        read_trace(trace)


def test_cli_json_through_a_subprocess_with_several_policies() -> None:
    cmd = [sys.executable, "-m", "scheduler.sim.cli", "--cluster", str(EXAMPLES / "spark-m4max-10gbe.toml"),
           "--model", LLAMA, "--policy", "colocated,conditional", "--prompt-tokens", "8192",
           "--output-tokens", "16", "--json"]
    out = json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True, cwd=ROOT).stdout)
    colocated, conditional = out["policies"]["colocated"], out["policies"]["conditional"]
    assert colocated["requests"][0]["prefill_node"] == "mac"
    assert conditional["requests"][0]["prefill_node"] == "spark"
    assert conditional["summary"]["ttft_s"]["p50"] * 5 < colocated["summary"]["ttft_s"]["p50"]
    keys = {"prefill_node", "decode_node", "prefill_s", "transfer_s", "exposed_transfer_s", "ttft_s", "tpot_s",
            "e2e_s", "arrival_s", "queue_s"}
    assert keys <= set(conditional["requests"][0])


def test_the_readable_table_lists_requests_and_the_summary(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--cluster", str(EXAMPLES / "spark-2x-m4max.toml"), "--model", LLAMA, "--policy",
                 "fastest-pair,roofline", "--rate", "1", "--num-requests", "5", "--output-tokens", "8"]) == 0
    text = capsys.readouterr().out
    assert text.count("req-4") == 2 and "spark -> mac" in text
    assert "policy fastest-pair:" in text and "summary:" in text
    assert main(["--cluster", str(EXAMPLES / "mac-m4max.toml"), "--model", LLAMA, "--rate", "1",
                 "--num-requests", "21", "--output-tokens", "2"]) == 0
    assert "req-0" not in capsys.readouterr().out  # more than 20 requests: the summary only


@pytest.mark.parametrize("argv, message", [
    (["--model", "llama-9b"], r"unknown model 'llama-9b'.*llama-3.1-8b"),
    (["--model", LLAMA, "--policy", "fastest"], r"unknown policy 'fastest'"),
    (["--model", LLAMA, "--rate", "2"], r"--rate and --num-requests go together"),
    (["--model", LLAMA, "--cached-prefix-tokens", "4096"], r"--cached-prefix-tokens must be in"),
    (["--model", "llama-3.1-70b"], r"node 'spark' \(dgx-spark, 128 GB\) cannot hold llama-3.1-70b's 141.1 GB"),
])
def test_bad_invocations_exit_2_with_a_message(argv: list[str], message: str,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--cluster", str(EXAMPLES / "spark-m4max-10gbe.toml"), *argv]) == 2
    assert re.search(message, capsys.readouterr().err)


def test_a_bad_cluster_file_exits_2_naming_the_entry(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text(_one_node("mac-m4-max") + '[[links]]\nnodes = ["solo", "ghost"]\nkind = "10gbe"\n')
    assert main(["--cluster", str(bad), "--model", LLAMA]) == 2
    assert "no node named 'ghost'" in capsys.readouterr().err


def test_a_placement_the_cluster_cannot_carry_is_refused() -> None:
    class Nowhere:
        def place(self, request: GenerationRequest, cluster: ClusterView) -> Placement:
            return Placement("spark", "mac")

    no_link = cluster_file.loads('[[nodes]]\nname = "spark"\nhardware = "dgx-spark"\n'
                                 '[[nodes]]\nname = "mac"\nhardware = "mac-m4-max"\n')
    with pytest.raises(SimulationError, match=r"'Nowhere'.*no link between 'spark' and 'mac'"):
        Simulation(build_cluster(no_link, LLAMA), Nowhere()).run(single(10, 2))


@pytest.mark.parametrize("answer, message", [
    (Placement(None, "spark"), r"policy 'Misplaced' returned .*: node 'spark' lacks the 'decode' role"),
    (Placement("mac", "spark"), r"policy 'Misplaced' returned .*: node 'spark' lacks the 'decode' role"),
    (Placement("mini", "mac"), r"policy 'Misplaced' returned .*: node 'mini' lacks the 'prefill' role"),
    (Placement(None, "ghost"), r"policy 'Misplaced' returned .*: no node named 'ghost'"),
])
def test_a_placement_against_the_nodes_roles_is_refused_as_live(answer: Placement, message: str) -> None:
    # The live scheduler refuses the same placements with the same check (tests/test_dispatch.py).
    class Misplaced:
        def place(self, request: GenerationRequest, cluster: ClusterView) -> Placement:
            return answer

    roles = cluster_file.loads('[[nodes]]\nname = "spark"\nhardware = "dgx-spark"\nroles = ["prefill"]\n'
                               '[[nodes]]\nname = "mac"\nhardware = "mac-m4-max"\n'
                               '[[nodes]]\nname = "mini"\nhardware = "mac-m4-max"\nroles = ["decode"]\n'
                               '[[links]]\nnodes = ["spark", "mac"]\nkind = "10gbe"\n'
                               '[[links]]\nnodes = ["mini", "mac"]\nkind = "10gbe"\n')
    with pytest.raises(SimulationError, match=message):
        Simulation(build_cluster(roles, LLAMA), Misplaced()).run(single(10, 2))


def test_prefilling_on_the_decode_node_itself_is_colocated() -> None:
    class Same:
        def place(self, request: GenerationRequest, cluster: ClusterView) -> Placement:
            return Placement("mac", "mac")

    [r] = Simulation(build_cluster(_pair("mac-m4-max", "10gbe"), LLAMA), Same()).run(single(1024, 1))
    assert r.colocated and (r.prefill_node, r.kv_bytes, r.transfer_s) == ("mac", 0, 0.0)
    assert r.tpot_s is None and r.to_json()["tpot_s"] is None  # one output token: TPOT is undefined


def test_a_policy_loaded_from_a_file_runs_in_the_simulator(capsys: pytest.CaptureFixture[str]) -> None:
    spec = f"{PLUGIN}:StreamingRule"
    for link, expected in (("10gbe", "spark"), ("1gbe", "mac")):
        r = _placed(_pair("mac-m4-max", link), spec)
        assert (r.prefill_node, r.decode_node) == (expected, "mac"), link
    out = _run_cli(capsys, "--cluster", str(EXAMPLES / "spark-m4max-10gbe.toml"), "--model", LLAMA,
                   "--prompt-tokens", "8192", "--policy", f"{spec},conditional")
    assert set(out["policies"]) == {spec, "conditional"}


def test_add_simulate_parser_wires_the_subcommand() -> None:
    parser = argparse.ArgumentParser(prog="pdc")
    add_simulate_parser(parser.add_subparsers())
    args = parser.parse_args(["simulate", "--cluster", "c.toml", "--model", LLAMA, "--policy", "a,b"])
    assert args.run.__name__ == "run_simulate" and args.policy == "a,b" and args.output_tokens == 256


# ---------------------------------------------------------------- plot


def test_plot_without_matplotlib_says_how_to_install_it(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib -> ImportError
    with pytest.raises(PlotError, match="pip install matplotlib"):
        plot({"a": [Point(1, 1, 2)]}, "x", "t", tmp_path / "p.png")


def test_the_plot_sweep_follows_prompt_length_or_rate() -> None:
    spec = cluster_file.load(EXAMPLES / "spark-m4max-10gbe.toml")
    series, label, log_x = sweep(SimConfig(spec, LLAMA, ("colocated", "conditional"), output_tokens=16))
    assert label == "prompt tokens" and log_x
    xs = [p.x for p in series["colocated"]]
    assert xs == sorted(xs) and 8192 in xs
    assert all(c.ttft_p50_s > d.ttft_p50_s for c, d in zip(series["colocated"][2:], series["conditional"][2:]))
    series, label, _ = sweep(SimConfig(spec, LLAMA, ("conditional",), output_tokens=16, rate=0.5, num_requests=10))
    assert label.startswith("request rate") and [p.x for p in series["conditional"]][3] == pytest.approx(0.5)


def test_plot_writes_a_png(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    pytest.importorskip("matplotlib", reason="matplotlib not installed: --plot cannot be exercised")
    out = tmp_path / "p.png"
    assert main(["--cluster", str(EXAMPLES / "spark-m4max-10gbe.toml"), "--model", LLAMA, "--output-tokens", "8",
                 "--policy", "colocated,conditional", "--plot", str(out)]) == 0
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_the_simulator_imports_nothing_heavy() -> None:
    code = (
        "import sys, scheduler.sim.cli\n"
        "heavy = {'torch', 'mlx', 'grpc', 'zeroconf', 'matplotlib'} & set(sys.modules)\n"
        "assert not heavy, heavy\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT)


def test_a_cached_prefix_is_not_shipped_again() -> None:
    # Multi-turn chat: 7,680 of 8,192 prompt tokens are cached on both nodes, so
    # only the 512 new tokens' KV (128 KiB each for Llama-3.1-8B bf16) crosses the link.
    spec = _pair("mac-m4-max", "1gbe")
    config = SimConfig(spec, LLAMA, ("fastest-pair",), prompt_tokens=8192, cached_prefix_tokens=7680,
                       output_tokens=16, kv_codec="raw")
    r = simulate(config)["fastest-pair"].requests[0]
    assert r.kv_bytes == 512 * 128 * 1024
    wire_s = r.kv_bytes / build_cluster(spec, LLAMA).links[("spark", "mac")].bytes_per_s
    assert r.transfer_s == pytest.approx(wire_s, rel=0.05)


def test_a_policy_that_returns_no_placement_is_named() -> None:
    class Forgetful:
        def place(self, request: GenerationRequest, cluster: ClusterView) -> Placement:
            return None  # type: ignore[return-value]

    with pytest.raises(SimulationError, match=r"'Forgetful' returned None, not a Placement"):
        Simulation(build_cluster(_pair("mac-m4-max", "10gbe"), LLAMA), Forgetful()).run(single(10, 2))


def test_colocated_spreads_requests_over_idle_nodes() -> None:
    # The baseline moves no KV, but a cluster without disaggregation still uses its nodes.
    spec = cluster_file.load(EXAMPLES / "spark-2x-m4max.toml")
    cluster = build_cluster(spec, LLAMA)
    results = Simulation(cluster, load_policy("colocated")).run([WorkItem(0.0, 2048, 8)] * 3)
    assert all(r.colocated for r in results)
    assert [r.decode_node for r in results] == ["mac2", "mac1", "spark"]  # most bandwidth first, then idle ones
