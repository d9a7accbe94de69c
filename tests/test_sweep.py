"""``pdc simulate --sweep``: the grid and the checks made before anything runs,
local runs, Ray runs that give the local rows exactly, failures that name their
point, bounded waits, and a sweep that never imports ray unless asked to."""
from __future__ import annotations

import itertools
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from conftest import free_port, have, ray_env

from scheduler import catalog
from scheduler.sim import cluster_file
from scheduler.sim.cli import SimConfig, main, simulate
from scheduler.sim.sweep import SweepConfig, SweepError, build_points, run_point

ROOT = Path(__file__).parent.parent
EXAMPLES = ROOT / "examples" / "clusters"
PAIR = str(EXAMPLES / "spark-m4max-10gbe.toml")
TRIO = str(EXAMPLES / "spark-2x-m4max.toml")
PLUGIN = "examples/policies/streaming_rule.py:StreamingRule"  # relative to ROOT
LLAMA = "llama-3.1-8b"
SMALL = {"num_requests": 12, "output_tokens": 16}
PDC = [sys.executable, "-m", "cluster.cli", "simulate"]
POLICY_FILE = '''
import time


class Boom:
    def place(self, request, cluster):
        raise RuntimeError("boom")


class Stuck:
    def place(self, request, cluster):
        time.sleep(120)
'''


def _grid(**axes: Any) -> SweepConfig:
    """A small grid over the 10GbE pair; ``axes`` override any field."""
    fields = {"clusters": (PAIR,), "models": (LLAMA,), "policies": ("conditional",), "rates": (1.0,),
              "prompt_tokens": (512,), "shared": SMALL}
    return SweepConfig(**{**fields, **axes})


def _cli(*flags: str) -> list[str]:
    """``pdc simulate`` flags for a 2 x 2 x 2 grid of 12 short requests (8 points)."""
    return ["--cluster", PAIR, "--model", LLAMA, "--policy", "conditional,round-robin", "--rate", "0.5,4",
            "--num-requests", "12", "--prompt-tokens", "512,8192", "--output-tokens", "16", "--slo-ttft", "2",
            *flags]


def _run(argv: list[str], env: dict[str, str] | None = None, timeout: float = 180) -> subprocess.CompletedProcess:
    return subprocess.run(argv, check=False, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)


@pytest.fixture
def policy_file(tmp_path: Path) -> Path:
    path = tmp_path / "user_policies.py"
    path.write_text(POLICY_FILE)
    return path


# ---------------------------------------------------------------- the grid, checked before anything runs


def test_points_follow_the_grid_order_with_the_last_axis_fastest() -> None:
    axes = ((PAIR, TRIO), (LLAMA,), ("conditional", "roofline"), (0.5, 2.0), (512, 2048))
    points = build_points(_grid(clusters=axes[0], models=axes[1], policies=axes[2], rates=axes[3],
                                prompt_tokens=axes[4]))
    assert [p.index for p in points] == list(range(16))
    assert [(p.cluster, p.model, p.policy, p.config.rate, p.config.prompt_tokens) for p in points] == \
        list(itertools.product(*axes))
    assert all(p.config.policies == (p.policy,) and p.config.num_requests == 12 for p in points)
    assert points[0].config.cluster == cluster_file.load(PAIR) and points[8].config.cluster == cluster_file.load(TRIO)
    assert all(p.model_config is None for p in points)  # a catalog model travels by name


@pytest.mark.parametrize("axes, shared, expected", [
    ({"clusters": (PAIR, "missing.toml")}, {},
     r"2 of 4 sweep points .*\n  point 2 \(cluster=missing\.toml, .*prompt_tokens=512\) and 1 more: .*cannot read it"),
    ({"policies": ("conditional", "nah")}, {},
     r"2 of 4 .*\n  point 2 \(.*policy=nah, .*prompt_tokens=512\) and 1 more: unknown policy 'nah'"),
    ({"models": (LLAMA, "nope")}, {}, r"point 2 \(.*model=nope, .*\) and 1 more: unknown model 'nope'"),
    ({"models": (LLAMA, "llama-3.1-70b")}, {}, r"point 2 \(.*model=llama-3\.1-70b.*: node 'spark' .* cannot hold"),
    ({}, {**SMALL, "cached_prefix_tokens": 1024},
     r"1 of 2 .*\n  point 0 \(.*rate=1, prompt_tokens=512\): --cached-prefix-tokens"),
    ({"rates": (None, 1.0)}, {"output_tokens": 16},
     r"2 of 4 .*\n  point 2 \(.*rate=1, prompt_tokens=512\) and 1 more: --rate and --num-requests go together"),
], ids=["cluster-file", "policy", "model", "model-too-big", "prompt-vs-cached", "rate-without-count"])
def test_a_bad_value_refuses_the_whole_grid_naming_a_point_that_uses_it(
        axes: dict, shared: dict, expected: str) -> None:
    config = _grid(**{"prompt_tokens": (512, 4096), **axes}, shared=shared or SMALL)
    with pytest.raises(SweepError, match=expected) as refused:
        build_points(config)
    assert "(nothing was run)" in str(refused.value)


def test_an_axis_value_given_twice_or_an_empty_axis_is_refused() -> None:
    with pytest.raises(SweepError, match="--cluster lists .* twice"):
        _grid(clusters=(PAIR, PAIR))
    with pytest.raises(SweepError, match="--policy needs at least one value"):
        _grid(policies=())
    with pytest.raises(SweepError, match="not a setting a sweep's points share: 'trace'"):
        _grid(shared={"trace": "t.jsonl"})


# ---------------------------------------------------------------- one point


def test_a_points_row_is_that_point_simulated_alone() -> None:
    (point,) = build_points(_grid(rates=(2.0,), prompt_tokens=(4096,), shared={**SMALL, "slo_ttft_s": 1.0}))
    row = run_point(point)
    alone = simulate(SimConfig(cluster_file.load(PAIR), LLAMA, ("conditional",), prompt_tokens=4096, rate=2.0,
                               num_requests=12, output_tokens=16, slo_ttft_s=1.0))["conditional"]
    summary = alone.summary.to_json()
    assert {k: row[k] for k in ("point", "cluster", "model", "policy", "rate", "prompt_tokens", "seed")} == \
        {"point": 0, "cluster": PAIR, "model": LLAMA, "policy": "conditional", "rate": 2.0, "prompt_tokens": 4096,
         "seed": 0}
    assert (row["ttft_p50_s"], row["ttft_p99_s"], row["e2e_p50_s"]) == \
        (summary["ttft_s"]["p50"], summary["ttft_s"]["p99"], summary["e2e_s"]["p50"])
    assert (row["throughput_tok_s"], row["goodput_req_s"], row["num_requests"]) == \
        (summary["throughput_tok_s"], summary["goodput_req_s"], 12)
    remote = [r for r in alone.requests if not r.colocated]
    assert row["num_remote"] == len(remote) and sum(row["placements"].values()) == 12


def test_a_config_json_model_travels_as_data_not_as_a_path(tmp_path: Path) -> None:
    path = tmp_path / "llama" / "config.json"
    path.parent.mkdir()
    path.write_text(json.dumps(catalog.MODELS[LLAMA]))
    by_path, by_name = (build_points(_grid(models=(model,), rates=(1.0,)))[0] for model in (str(path), LLAMA))
    assert by_path.model_config == catalog.MODELS[LLAMA]
    path.unlink()  # a worker on another machine has no such file
    row, expected = run_point(by_path), run_point(by_name)
    assert row.pop("model") == str(path) and expected.pop("model") == LLAMA
    assert row == expected


def test_a_file_policy_runs_by_its_absolute_path_under_the_name_given(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(ROOT)
    (point,) = build_points(_grid(policies=(PLUGIN,)))
    assert point.config.policies == (str(ROOT / PLUGIN),)
    monkeypatch.chdir(tmp_path)  # where a worker runs need not be where the driver was started
    row = run_point(point)
    assert row["policy"] == PLUGIN and row["num_requests"] == 12


# ---------------------------------------------------------------- local runs


def test_a_local_sweep_prints_and_writes_a_row_per_point_in_grid_order(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "sweep.json"
    assert main(_cli("--sweep", "--jobs", "2", "--out", str(out))) == 0
    printed = capsys.readouterr()
    document = json.loads(out.read_text())
    rows = document["rows"]
    assert document["num_points"] == len(rows) == 8
    assert document["axes"] == {"cluster": [PAIR], "model": [LLAMA], "policy": ["conditional", "round-robin"],
                                "rate": [0.5, 4.0], "prompt_tokens": [512, 8192]}
    assert [(r["point"], r["policy"], r["rate"], r["prompt_tokens"], r["seed"]) for r in rows] == \
        [(i, p, r, n, 0) for i, (p, r, n) in enumerate(itertools.product(
            ("conditional", "round-robin"), (0.5, 4.0), (512, 8192)))]
    assert rows == [run_point(p) for p in build_points(_grid(
        policies=("conditional", "round-robin"), rates=(0.5, 4.0), prompt_tokens=(512, 8192),
        shared={**SMALL, "slo_ttft_s": 2.0}))]  # spawned processes give what this one does
    table = printed.out.splitlines()
    assert table[0].split()[:6] == ["point", "cluster", "model", "policy", "rate", "prompt"]
    assert "goodput" in table[0] and len(table) == 2 + 8
    assert "8/8" in printed.err and "swept 8 points" in printed.err


def test_json_prints_the_document_that_out_writes(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "sweep.json"
    assert main(_cli("--sweep", "--jobs", "1", "--json", "--out", str(out))) == 0
    assert json.loads(capsys.readouterr().out) == json.loads(out.read_text())


@pytest.mark.parametrize("flags, message", [
    (("--sweep", "--plot", "p.png"), "--plot does not go with --sweep"),
    (("--sweep", "--trace", "t.jsonl"), "--trace does not go with --sweep"),
    (("--sweep", "--ray", "--jobs", "2"), "--jobs sets local processes"),
    (("--ray",), "--ray goes with --sweep"),
    (("--jobs", "2"), "--jobs goes with --sweep"),
    (("--point-timeout", "5"), "--point-timeout goes with --sweep"),
    ((), "--prompt-tokens takes one value; several (512, 8192) need --sweep"),
], ids=["plot", "trace", "jobs-with-ray", "ray-alone", "jobs-alone", "timeout-alone", "several-prompts"])
def test_flags_that_mean_nothing_here_are_refused(
        flags: tuple[str, ...], message: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(_cli(*flags)) == 2
    assert message in capsys.readouterr().err


def test_without_ray_installed_ray_says_how_to_install_it(
        monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setitem(sys.modules, "ray", None)  # import ray -> ImportError
    assert main(_cli("--sweep", "--ray", "127.0.0.1:1")) == 2
    assert "pip install 'pdcluster[ray]'" in capsys.readouterr().err


def test_a_ray_address_where_nothing_listens_fails_fast_with_exit_2() -> None:
    if not have("ray"):
        pytest.skip("ray is not installed (pip install 'pdcluster[ray]')")
    address = f"127.0.0.1:{free_port()}"  # ray.init would wait for it forever
    env = {**os.environ, **ray_env("unused")}  # Ray keeps 127.0.0.1 rather than this machine's routable address
    start = time.monotonic()
    done = _run([*PDC, *_cli("--sweep", "--ray", address)], env, timeout=120)
    assert done.returncode == 2 and time.monotonic() - start < 60
    assert f"--ray: no Ray cluster answers at {address}" in done.stderr


def test_a_point_that_raises_is_named_and_the_sweep_exits_1(
        policy_file: Path, capsys: pytest.CaptureFixture[str]) -> None:
    flags = ["--sweep", "--jobs", "2", "--policy", f"conditional,{policy_file}:Boom", "--rate", "1"]
    assert main(_cli(*flags)) == 1
    error = capsys.readouterr().err
    assert re.search(rf"point [23] \(cluster=.*, policy={re.escape(str(policy_file))}:Boom, rate=1, "
                     r"prompt_tokens=(512|8192)\): .*RuntimeError: boom", error), error


def test_a_point_that_never_returns_stops_the_sweep_at_the_point_timeout(
        policy_file: Path, capsys: pytest.CaptureFixture[str]) -> None:
    start = time.monotonic()
    assert main(_cli("--sweep", "--jobs", "2", "--policy", f"{policy_file}:Stuck", "--point-timeout", "3")) == 1
    assert time.monotonic() - start < 60  # the stuck workers were killed, not waited for
    assert re.search(r"no sweep point finished within --point-timeout 3 s.*point 0 \(.*\) and 3 more unfinished",
                     capsys.readouterr().err)


def test_a_sweep_without_ray_never_imports_ray() -> None:
    # -X importtime reaches the spawned worker too: each import line ends in the module's name.
    done = _run([sys.executable, "-X", "importtime", "-m", "scheduler.sim.cli", *_cli("--sweep", "--jobs", "1")])
    assert done.returncode == 0, done.stderr[-3000:]
    modules = re.findall(r"^import time:.*\|\s*([\w.]+)\s*$", done.stderr, flags=re.MULTILINE)
    assert modules.count("scheduler.sim.sweep") == 2  # the driver and its worker were both traced
    assert not [m for m in modules if m == "ray" or m.startswith("ray.")]


# ---------------------------------------------------------------- on a real local Ray cluster


def test_a_sweep_on_ray_gives_the_local_sweeps_rows_exactly(ray_head: Any, tmp_path: Path) -> None:
    env = {**os.environ, **ray_head.env}
    flags = _cli("--sweep", "--cluster", f"{PAIR},{TRIO}")
    local = _run([*PDC, *flags, "--jobs", "2", "--out", str(tmp_path / "local.json")], env)
    on_ray = _run([*PDC, *flags, "--ray", ray_head.address, "--out", str(tmp_path / "ray.json")], env)
    assert local.returncode == 0, local.stderr[-3000:]
    assert on_ray.returncode == 0, on_ray.stderr[-3000:]
    assert "swept 16 points in" in on_ray.stderr and f"on Ray ({ray_head.address})" in on_ray.stderr
    assert "16/16" in on_ray.stderr  # the progress bar
    local_doc, ray_doc = (json.loads((tmp_path / name).read_text()) for name in ("local.json", "ray.json"))
    assert len(ray_doc["rows"]) == 16 and [r["point"] for r in ray_doc["rows"]] == list(range(16))
    assert ray_doc == local_doc
    assert on_ray.stdout == local.stdout  # the same table


def test_a_point_that_raises_on_ray_is_named_and_the_sweep_exits_1(
        ray_head: Any, policy_file: Path) -> None:
    flags = _cli("--sweep", "--policy", f"conditional,{policy_file}:Boom", "--ray", ray_head.address)
    done = _run([*PDC, *flags], {**os.environ, **ray_head.env})
    assert done.returncode == 1, done.stderr[-3000:]
    assert re.search(rf"pdc simulate: error: point \d \(.*policy={re.escape(str(policy_file))}:Boom, .*\): "
                     r".*RuntimeError: boom", done.stderr), done.stderr[-3000:]


@pytest.mark.slow
def test_the_documented_100_point_sweep_on_ray_matches_local(ray_head: Any, tmp_path: Path) -> None:
    # docs/ray.md: 5 policies x 4 rates x 5 prompt lengths.
    flags = ["--sweep", "--cluster", PAIR, "--model", LLAMA,
             "--policy", "conditional,roofline,fastest-pair,least-loaded,round-robin", "--rate", "0.5,1,2,4",
             "--num-requests", "200", "--prompt-tokens", "1024,2048,4096,8192,16384", "--slo-ttft", "2"]
    env = {**os.environ, **ray_head.env}
    local = _run([*PDC, *flags, "--jobs", "2", "--out", str(tmp_path / "local.json")], env, timeout=900)
    on_ray = _run([*PDC, *flags, "--ray", ray_head.address, "--out", str(tmp_path / "ray.json")], env, timeout=900)
    assert local.returncode == 0 and on_ray.returncode == 0, (local.stderr[-2000:], on_ray.stderr[-2000:])
    local_doc, ray_doc = (json.loads((tmp_path / name).read_text()) for name in ("local.json", "ray.json"))
    assert ray_doc["num_points"] == 100 and ray_doc == local_doc
