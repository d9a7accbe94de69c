"""``pdc bench link``: the pure parts (link table, theory, row schema, the simulator's inputs,
refusal without root), then the real thing: two namespaces over a shaped veth with real
workers, one short row, and the namespaces gone afterwards, also when the run is killed.

The real tests need root, iproute2 and network namespaces; elsewhere they skip saying why.
They never assert on speed: the targets the bench reports are data, not assertions.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from workers.tools import link_bench, link_report, netns
from workers.tools.link_report import LINK_CLASSES, LinkMeasure

ROOT = Path(__file__).resolve().parent.parent


# ---------------------------------------------------------------- link table and flags


def test_link_classes_parse_in_order_and_unknown_or_repeated_names_are_refused() -> None:
    links = link_report.parse_links(" wifi6, 1GbE ,10gbe")
    assert [link.name for link in links] == ["wifi6", "1gbe", "10gbe"]
    assert LINK_CLASSES["1gbe"].gbit_s == 1.0 and LINK_CLASSES["wifi6"].gbit_s == 0.6
    assert LINK_CLASSES["wifi6"].delay_ms > LINK_CLASSES["1gbe"].delay_ms > 0
    with pytest.raises(ValueError, match="unknown link class 'ethernet'.*1gbe"):
        link_report.parse_links("1gbe,ethernet")
    with pytest.raises(ValueError, match="twice"):
        link_report.parse_links("1gbe,1gbe")
    with pytest.raises(ValueError, match="at least one"):
        link_report.parse_links(" , ")


def test_the_scaled_link_keeps_1gbe_to_spark_kv_proportion_and_is_never_the_default() -> None:
    [scaled] = link_report.parse_links("1gbe-scaled")
    assert scaled.scaled and "1gbe-scaled" not in LINK_CLASSES  # opt-in: the default links are real rates
    # DESIGN's pair: 8,192 tokens x 128 KiB of KV in 1.47 s on the Spark, against 1 Gbit/s
    assert link_report.REFERENCE_KV_MB_S == pytest.approx(730.4, abs=0.1)
    kv_per_token = 2.0 * 24 * 8 * 128 * 2  # the bench's model: 96 KiB per token
    probe = [[128, 0.15], [512, 1.0], [2048, 7.0]]
    rate = link_report.kv_rate_mb_s(probe, kv_per_token, 768)  # the point nearest the longest prompt counts
    assert rate == pytest.approx(512 * 98304 / 1.0 / 1e6)
    assert link_report.kv_rate_mb_s(probe, kv_per_token, 1500) == pytest.approx(2048 * 98304 / 7.0 / 1e6)
    shaped = link_report.scaled_link(scaled, rate)
    assert shaped.gbit_s == pytest.approx(1.0 * rate / link_report.REFERENCE_KV_MB_S)
    assert shaped.gbit_s * 1e3 / 8 / rate == pytest.approx(1e3 / 8 / link_report.REFERENCE_KV_MB_S)  # the proportion
    assert link_report.scaled_link(LINK_CLASSES["1gbe"], rate) == LINK_CLASSES["1gbe"]
    with pytest.raises(ValueError, match="no prefill probe"):
        link_report.kv_rate_mb_s([], kv_per_token, 512)


def test_kv_bytes_per_token_reads_the_models_config(tmp_path: Path) -> None:
    config = {"num_hidden_layers": 24, "num_attention_heads": 8, "num_key_value_heads": 8, "head_dim": 128,
              "hidden_size": 64}
    (tmp_path / "config.json").write_text(json.dumps(config))
    assert link_bench.kv_bytes_per_token(tmp_path, "bfloat16") == 96 * 1024
    assert link_bench.kv_bytes_per_token(tmp_path, "float32") == 192 * 1024


def test_config_refuses_unknown_codecs_and_short_prompts() -> None:
    with pytest.raises(ValueError, match="unknown 'zstd'"):
        link_report.parse_list("raw,zstd", "--codecs", link_bench.CODECS)
    with pytest.raises(ValueError, match=">= 16"):
        link_report.parse_ints("128,8", "--prompt-tokens")
    assert link_report.parse_ints("512,128", "--prompt-tokens") == (512, 128)
    with pytest.raises(ValueError, match="--decode-cpu"):
        link_bench.LinkBenchConfig(links=(LINK_CLASSES["1gbe"],), decode_cpu=0.0)


def test_tc_arguments_shape_the_rate_with_tbf_and_the_delay_with_netem() -> None:
    shaping = netns.Shaping(1.0, delay_ms=0.1, jitter_ms=0.0)
    assert shaping.tbf_args()[:3] == ["tbf", "rate", "1000mbit"]
    assert shaping.burst_bytes == 125_000  # 1 ms at 1 Gbit/s
    assert netns.Shaping(0.01).burst_bytes == 64 << 10  # never below a GSO segment
    assert netns.Shaping(0.6, 2.0, 1.0).netem_args() == ["netem", "delay", "2ms", "1ms", "distribution", "normal"]


def test_only_namespaces_of_runs_that_are_gone_count_as_stale() -> None:
    names = ["pdclb-42-00ab-p", "pdclb-42-00ab-d", "pdclb-77-beef-d", "pdc-a-123456", "pdclb-x-00ab-p", "other"]
    assert netns.stale_namespaces(names, alive=lambda pid: pid == 77) == ["pdclb-42-00ab-p", "pdclb-42-00ab-d"]


# ---------------------------------------------------------------- theory and targets


def test_theory_is_the_transfer_that_outlasts_prefill_and_zero_when_it_hides() -> None:
    # 117.5 MB at 0.94 Gbit/s is 1.0 s of wire, plus 0.1 ms latency
    assert link_report.transfer_time(117.5e6, 0.94, 1e-4) == pytest.approx(1.0001)
    assert link_report.theory_exposed(117.5e6, 0.4, 0.94, 1e-4) == pytest.approx(0.6001)
    assert link_report.theory_exposed(117.5e6, 1.5, 0.94, 1e-4) == 0.0


def test_exposed_target_is_10_percent_of_theory_with_a_20_ms_floor() -> None:
    assert link_report.exposed_meets(0.549, 0.5) and not link_report.exposed_meets(0.551, 0.5)
    assert link_report.exposed_meets(0.019, 0.0) and not link_report.exposed_meets(0.021, 0.0)
    assert link_report.exposed_meets(0.115, 0.1)  # 10 % of 0.1 s is below the 20 ms floor
    assert link_report.sim_meets(1.19, 1.0) and not link_report.sim_meets(0.79, 1.0)
    assert link_report.physics(0.79, 1.0) == "disaggregated" and link_report.physics(0.81, 1.0) == "colocated"


def _stats(prefill: str, decode: str, **figures: float) -> dict:
    base = {"prefill_node": prefill, "decode_node": decode, "kv_codec": None if prefill == decode else "raw",
            "kv_bytes": 0, "prefill_s": 0.0, "transfer_s": 0.0, "exposed_transfer_s": 0.0, "ttft_s": 0.0,
            "prompt_tokens": 262}
    return {**base, **figures}


def test_a_row_carries_the_issue_schema_medians_and_verdicts() -> None:
    disagg = [_stats("p", "d", kv_bytes=58_750_000, prefill_s=p, transfer_s=0.6, exposed_transfer_s=e, ttft_s=t)
              for p, e, t in ((0.2, 0.31, 0.55), (0.3, 0.19, 0.52), (0.25, 0.25, 0.50))]
    colocated = [_stats("d", "d", prefill_s=0.9, ttft_s=0.95), _stats("d", "d", prefill_s=1.0, ttft_s=1.05)]
    conditional = [_stats("p", "d", ttft_s=0.5)]
    sim = {"ttft_s": 0.45, "placement": "disaggregated", "ttft_disagg_s": 0.45, "ttft_colocated_s": 0.8}
    row = link_report.build_row("1gbe", "raw", 256, disagg, colocated, conditional,
                                LinkMeasure(0.94, 1e-4, 1.0, 0.1), sim)
    link_report.check_row(row)
    line = json.loads(link_report.rows_json([row]))
    assert list(line) == ["rows"] and set(link_report.ROW_KEYS) <= set(line["rows"][0])
    assert row["prompt_tokens"] == 262  # as the server counted it, template included
    assert row["prefill_s"] == 0.25 and row["exposed_s"] == 0.25
    assert row["theory_exposed_s"] == pytest.approx(0.5 - 0.25 + 1e-4, abs=1e-4)  # 0.5 s of wire, prefill 0.25
    assert row["exposed_target_met"] is True  # 0.25 s measured against 0.2501 s
    assert row["ttft_disagg_s"] == 0.52 and row["ttft_colocated_s"] == 1.0
    assert row["decision"] == "disaggregated" and row["physics"] == "disaggregated"
    assert row["decision_matches_physics"] is True
    assert row["sim_error"] == pytest.approx((0.45 - 0.52) / 0.52, abs=1e-3) and row["sim_target_met"] is True
    assert row["codec_used"] == "raw" and row["kv_bytes"] == 58_750_000


def test_a_row_measures_how_steady_the_machine_was_by_its_warm_ups() -> None:
    """The warm-ups' median TTFT against the row's, in the placement the simulator is judged in."""
    disagg = [_stats("p", "d", ttft_s=t) for t in (0.5, 0.52)]
    colocated = [_stats("d", "d", ttft_s=1.0)]
    sim = {"ttft_s": 0.9, "placement": "colocated", "ttft_disagg_s": 0.45, "ttft_colocated_s": 0.9}
    warm = {"disaggregated": [_stats("p", "d", ttft_s=0.1)], "colocated": [_stats("d", "d", ttft_s=t) for t in (1.3, 1.2)]}
    row = link_report.build_row("1gbe", "raw", 256, disagg, colocated, [], LinkMeasure(0.94, 1e-4, 1.0, 0.1), sim, warm)
    assert row["steady_ttft_s"] == 1.25 and row["steady_error"] == 0.25 and row["steady_target_met"] is False
    without = link_report.build_row("1gbe", "raw", 256, disagg, colocated, [], LinkMeasure(0.94, 1e-4, 1.0, 0.1), sim)
    assert without["steady_target_met"] is None
    assert "how steady" in link_report.summary_lines([row, without])[2] and "0 of 1" in link_report.summary_lines([row])[2]


def test_check_row_names_what_is_missing_or_mistyped() -> None:
    with pytest.raises(ValueError, match="lacks 'decision'"):
        link_report.check_row({k: None for k in link_report.ROW_KEYS if k != "decision"})
    row = dict.fromkeys(link_report.ROW_KEYS, None) | {"link": "1gbe", "codec": "raw", "prompt_tokens": 64}
    link_report.check_row(row)
    with pytest.raises(TypeError, match="exposed_s"):
        link_report.check_row(row | {"exposed_s": "0.1"})


# ---------------------------------------------------------------- the simulator's inputs


def test_scaled_profiles_make_the_simulator_price_nodes_as_the_live_predictor_does() -> None:
    from scheduler import costmodel
    from scheduler.sim import cluster_file

    generic, measured = costmodel.GENERIC["bf16"], costmodel.MEASURED
    assert (generic.compute, generic.bandwidth) == (link_report.SIM_GENERIC_COMPUTE, link_report.SIM_GENERIC_BANDWIDTH)
    assert generic.attention / generic.compute == pytest.approx(measured.attention / measured.compute, rel=0.01)
    assert generic.kv_bandwidth / generic.bandwidth == pytest.approx(measured.kv_bandwidth, rel=0.01)
    prefill = {"node_id": "p", "roles": ["prefill"], "tflops": 0.15, "mem_bw_gbps": 20.0}
    decode = {"node_id": "d", "roles": ["prefill", "decode"], "tflops": 0.075, "mem_bw_gbps": 20.0}
    spec = cluster_file.loads(link_report.sim_cluster_toml(prefill, decode, 0.94, 1e-4))
    node = spec.node("p")
    assert node.machine().tflops * generic.compute == pytest.approx(0.15)
    assert spec.link_between("p", "d").payload_gbit_s == pytest.approx(0.94)
    assert node.prefill_probe == ()  # a worker that timed no prefill: priced from TFLOPS, as live


def test_the_workers_prefill_probe_and_device_reach_the_simulator_as_the_live_predictor_reads_them() -> None:
    from scheduler.sim import cluster_file

    probe = [[128, 0.143], [512, 0.958]]
    prefill = {"node_id": "p", "roles": ["prefill"], "tflops": 0.15, "mem_bw_gbps": 20.0, "prefill_probe": probe}
    decode = {"node_id": "d", "roles": ["prefill", "decode"], "tflops": 0.075, "mem_bw_gbps": 20.0,
              "prefill_probe": [[128, 0.4]]}
    spec = cluster_file.loads(link_report.sim_cluster_toml({**prefill, "device": "cpu"}, decode, 0.94, 1e-4))
    assert spec.node("p").prefill_probe == ((128, 0.143), (512, 0.958))
    assert (spec.node("p").device, spec.node("d").device) == ("cpu", "")  # a CPU's encode shares its prefill
    assert spec.node("d").prefill_probe == ((128, 0.4),)
    assert spec.node("p").served is None  # nothing served yet


def test_what_the_scheduler_learned_reaches_the_simulator_as_declared_figures() -> None:
    from scheduler.sim import cluster_file

    served = {"prefill_scale": {"local": 1.1, "int8": 0.7}, "overhead_s": {"colocated": 0.02}, "samples": {},
              "prefill_points": {"int8": [[141, 0.8], [525, 0.6]]}, "enabled": True}
    node = {"node_id": "p", "roles": ["prefill", "decode"], "tflops": 0.15, "mem_bw_gbps": 20.0, "served": served}
    spec = cluster_file.loads(link_report.sim_cluster_toml(node, {**node, "node_id": "d", "served": {}}, 0.94, 1e-4))
    got = spec.node("p").served
    assert got.overhead_s == (("colocated", 0.02),) and got.prefill_points == (("int8", ((141, 0.8), (525, 0.6))),)
    assert got.scale("local") == 1.1 and got.scale("int8", 141) == 0.8 and got.scale("int8", 525) == 0.6
    assert spec.node("d").served is None
    trace = [json.loads(line) for line in link_report.sim_trace([64, 128]).splitlines()]
    assert [t["prompt_tokens"] for t in trace] == [64, 128] and trace[1]["arrival_s"] >= 1000


def test_the_simulators_answer_is_read_per_prompt_and_policy() -> None:
    def requests(*placements: tuple[str, str, float]) -> dict:
        return {"requests": [{"arrival_s": i * 1000.0, "prefill_node": p, "decode_node": d, "ttft_s": t}
                             for i, (p, d, t) in enumerate(placements)]}
    answer = {"policies": {"colocated": requests(("d", "d", 1.0), ("d", "d", 2.0)),
                           "fastest-pair": requests(("p", "d", 0.6), ("p", "d", 1.5)),
                           "conditional": requests(("p", "d", 0.6), ("d", "d", 2.0))}}
    sims = link_report.read_sim(answer, [64, 128])
    assert sims[64] == {"ttft_colocated_s": 1.0, "ttft_disagg_s": 0.6, "ttft_s": 0.6, "placement": "disaggregated"}
    assert sims[128]["placement"] == "colocated" and sims[128]["ttft_s"] == 2.0


# ---------------------------------------------------------------- refusal without root


def test_without_root_the_command_says_so_and_exits_2(monkeypatch: pytest.MonkeyPatch,
                                                     capsys: pytest.CaptureFixture) -> None:
    from cluster.cli import main

    monkeypatch.setattr(link_bench, "geteuid", lambda: 1000)
    monkeypatch.setattr(link_bench, "run_link_bench", lambda *a, **k: pytest.fail("ran without root"))
    assert main(["bench", "link", "--quick", "--json"]) == 2
    assert "needs root" in capsys.readouterr().err


# ---------------------------------------------------------------- the real thing


def _require_namespaces() -> None:
    """Skip, saying why, unless this machine lets us make and remove a shaped namespace pair."""
    if sys.platform != "linux":
        pytest.skip("pdc bench link needs Linux network namespaces")
    missing = link_bench.missing_tools()
    if missing:
        pytest.skip(f"pdc bench link test skipped: iproute2's {' and '.join(missing)} not installed")
    if os.geteuid() != 0:
        pytest.skip(f"pdc bench link test skipped: network namespaces need root (euid {os.geteuid()})")
    pair = netns.NetnsPair()
    try:
        pair.create()
        pair.shape(netns.Shaping(1.0))
    except (netns.NetnsError, OSError, subprocess.TimeoutExpired) as e:
        reason = f"pdc bench link test skipped: cannot make shaped network namespaces here: {e}"
        print(reason)
        pytest.skip(reason)
    finally:
        pair.destroy()
    if netns.cgroup_root() is None:
        pytest.skip("pdc bench link test skipped: no cgroup cpu controller for the decode node's CPU share")


def _bench(tmp_path: Path, *flags: str) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PDC_HOME": str(tmp_path / "home"), "PYTHONUNBUFFERED": "1"}
    out = (tmp_path / "bench.out").open("w")
    return subprocess.Popen([sys.executable, "-m", "workers.tools.link_bench", "link", *flags], cwd=ROOT, env=env,
                            stdout=out, stderr=subprocess.STDOUT, start_new_session=True)


def _ours(pid: int) -> list[str]:
    return [n for n in netns.namespaces() if n.startswith(f"{netns.PREFIX}-{pid}-")]


def _cgroups(pid: int) -> list[Path]:
    root = netns.cgroup_root()
    return [] if root is None else list(root.glob(f"{netns.PREFIX}-{pid}-*"))


def _wait_for_workers(proc: subprocess.Popen, tmp_path: Path, timeout_s: float = 240) -> None:
    """Until both namespaces of ``proc``'s run hold a process (its workers are starting)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        assert proc.poll() is None, (tmp_path / "bench.out").read_text()
        names = _ours(proc.pid)
        if len(names) == 2 and all(netns.run_cmd("ip", "netns", "pids", n).stdout.split() for n in names):
            return
        time.sleep(0.2)
    pytest.fail(f"the bench's workers did not start in {timeout_s:.0f} s:\n{(tmp_path / 'bench.out').read_text()}")


def _kill(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(10)


@pytest.mark.slow
def test_one_row_over_a_shaped_veth_between_real_workers_and_the_namespaces_go(tmp_path: Path) -> None:
    _require_namespaces()
    proc = _bench(tmp_path, "--emulate", "1gbe", "--codecs", "raw", "--prompt-tokens", "64", "--repeats", "1",
                  "--json")
    try:
        rc = proc.wait(600)
    finally:
        _kill(proc)
    out = (tmp_path / "bench.out").read_text()
    print(out)
    assert rc == 0, out
    rows = json.loads(out.strip().splitlines()[-1])["rows"]
    assert len(rows) == 1
    row = rows[0]
    link_report.check_row(row)
    assert (row["link"], row["codec"]) == ("1gbe", "raw") and row["prompt_tokens"] >= 64
    assert row["kv_bytes"] > 0 and row["decision"] in ("disaggregated", "colocated")
    assert 0 < row["link_gbps"] <= 1.0  # the probe crossed the tbf-shaped veth, not loopback
    assert _ours(proc.pid) == [] and _cgroups(proc.pid) == []


@pytest.mark.slow
def test_a_run_killed_midway_leaves_no_namespace_cgroup_or_process(tmp_path: Path) -> None:
    _require_namespaces()
    proc = _bench(tmp_path, "--quick")
    try:
        _wait_for_workers(proc, tmp_path)
        names = _ours(proc.pid)
        pids = [p for n in names for p in netns.run_cmd("ip", "netns", "pids", n).stdout.split()]
        proc.send_signal(signal.SIGTERM)
        rc = proc.wait(60)
    finally:
        _kill(proc)
    assert rc != 0
    assert _ours(proc.pid) == [] and _cgroups(proc.pid) == [], (names, (tmp_path / "bench.out").read_text())
    assert not any(netns.pid_alive(int(p)) for p in pids)


@pytest.mark.slow
def test_a_run_killed_hard_is_cleaned_up_by_the_next(tmp_path: Path) -> None:
    _require_namespaces()
    proc = _bench(tmp_path, "--quick")
    try:
        _wait_for_workers(proc, tmp_path)
        os.kill(proc.pid, signal.SIGKILL)  # no handler runs: the namespaces stay behind
        proc.wait(10)
    finally:
        _kill(proc)
    assert len(_ours(proc.pid)) == 2
    cleanup = subprocess.run([sys.executable, "-m", "workers.tools.link_bench", "link", "--cleanup"], cwd=ROOT,
                             capture_output=True, text=True, timeout=120, check=False)
    assert cleanup.returncode == 0, cleanup.stderr
    assert _ours(proc.pid) == [] and _cgroups(proc.pid) == [], cleanup.stdout


def test_the_plan_warms_every_placement_and_length_then_reads_health_then_measures(model: Path) -> None:
    links = link_report.parse_links("1gbe")
    config = link_bench.LinkBenchConfig(links, prompt_tokens=(64, 128), codecs=("raw", "int8"), repeats=1, warmups=2)
    plan = link_bench.build_plan(config, model, seed=1)
    keys = [tuple(item["key"]) for item in plan]
    health = keys.index((0, "-", "-", "health"))
    assert keys[:3] == [(64, "colocated", "-", "prewarm"), (64, "disaggregated", "raw", "prewarm"),
                        (64, "disaggregated", "int8", "prewarm")]
    warm = keys[3:health]
    assert len(warm) == 2 * 2 * 3 and all(k[3] == "warmup" for k in warm)  # warmups x lengths x (colocated + 2)
    assert {(k[0], k[1], k[2]) for k in warm} == {(n, p, c) for n in (64, 128)
                                                 for p, c in (("colocated", "-"), ("disaggregated", "raw"),
                                                              ("disaggregated", "int8"))}
    assert plan[health] == {"key": [0, "-", "-", "health"], "health": True}
    assert all(k[3] != "warmup" for k in keys[health + 1:]) and len(keys) - health - 1 == 2 * (3 + 2)
    with pytest.raises(ValueError, match="--warmups"):
        link_bench.LinkBenchConfig(links, warmups=0)
