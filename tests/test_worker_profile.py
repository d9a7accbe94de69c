"""A worker's declared profile: the profile file, the precedence of flags over
file over catalog over measurement, errors that name the offender, the real
start-up measurement on each engine, and a real ``pdc worker`` process reporting
what it declared (and its model's config.json).
"""
from __future__ import annotations

import argparse
import asyncio
import json
import math
import signal
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from conftest import have, requires_mlx, requires_torch

from cluster.auth import generate_key, write_config
from cluster.cli import build_parser, main
from cluster.node import NodeInfo
from proto import pdcluster_pb2 as pb
from scheduler.catalog import HARDWARE
from workers.engines.base import MeasuredProfile
from workers.engines.registry import load_engine
from workers.rpc import profile as profile_module
from workers.rpc.client import WorkerClient, node_from_info
from workers.rpc.profile import (
    BUDGET_S,
    PROBE_REQUEST_ID,
    PROBE_WARMUP_TOKENS,
    DeclaredProfile,
    ProfileError,
    load_profile_file,
    probe_prefill,
)
from workers.rpc.server import Worker, WorkerConfig, config_from_args

ROOT = Path(__file__).resolve().parent.parent
SPARK, M4_MAX = HARDWARE["dgx-spark"], HARDWARE["mac-m4-max"]
MEASURED = MeasuredProfile(tflops=3.0, mem_bw_gbps=40.0)


def write_profile(tmp_path: Path, text: str, name: str = "node.toml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def worker_args(key_file: Path, *flags: str) -> argparse.Namespace:
    """``pdc worker`` flags as the CLI parses them (the model is never loaded here)."""
    return build_parser().parse_args(["worker", "--role", "both", "--engine", "mlx", "--model", "unused",
                                      "--cluster-key-file", str(key_file), *flags])


# ---------------------------------------------------------------- the file


def test_profile_file_declares_hardware_and_figures(tmp_path: Path) -> None:
    path = write_profile(tmp_path, '# a DGX Spark\nhardware = "dgx-spark"\ntflops = 100\nmem_bw_gbps = 273.5\n')
    profile = load_profile_file(path)
    assert profile == DeclaredProfile(hardware="dgx-spark", tflops=100.0, mem_bw_gbps=273.5)
    assert isinstance(profile.tflops, float)  # TOML integers are figures too


def test_every_profile_key_is_optional(tmp_path: Path) -> None:
    assert load_profile_file(write_profile(tmp_path, "# nothing declared\n")) == DeclaredProfile()
    assert load_profile_file(write_profile(tmp_path, "mem_bw_gbps = 546")) == DeclaredProfile(mem_bw_gbps=546.0)


def test_example_profiles_load_and_name_catalog_hardware() -> None:
    paths = sorted((ROOT / "examples" / "profiles").glob("*.toml"))
    assert len(paths) >= 2, "examples/profiles/ should hold example profile files"
    for path in paths:
        assert load_profile_file(path).hardware in HARDWARE, path


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ('hardware = "dgx-sparc"', r"unknown hardware 'dgx-sparc'; known hardware: dgx-spark, mac-m4-max, "),
        ("hardware = 3", r"hardware must be a string \(a catalog name\), got 3"),
        ('[hardware]\nname = "dgx-spark"', r"hardware must be a string \(a catalog name\), got \{'name'"),
        ("tflop = 100.0", r"unknown key 'tflop'; known keys: hardware, tflops, mem_bw_gbps"),
        ('tflops = "fast"', r"tflops must be a number, got 'fast'"),
        ("tflops = true", r"tflops must be a number, got True"),
        ("mem_bw_gbps = -273.0", r"mem_bw_gbps must be a finite number > 0, got -273.0"),
        ("tflops = 0", r"tflops must be a finite number > 0, got 0"),
        ("tflops = nan", r"tflops must be a finite number > 0, got nan"),
        ("tflops = 125.0 TFLOPS", r"not valid TOML"),
        ('hardware = "dgx-spark"\nhardware = "h100"', r"not valid TOML"),
    ],
)
def test_bad_profile_file_is_refused_naming_the_file_and_the_offender(tmp_path: Path, text: str,
                                                                      message: str) -> None:
    path = write_profile(tmp_path, text)
    with pytest.raises(ProfileError, match=message) as caught:
        load_profile_file(path)
    assert str(caught.value).startswith(f"profile file {path}: ")


def test_missing_or_binary_profile_file_is_refused_naming_it(tmp_path: Path) -> None:
    missing = tmp_path / "absent.toml"
    with pytest.raises(ProfileError, match=rf"profile file {missing}: cannot read it \(No such file"):
        load_profile_file(missing)
    binary = tmp_path / "binary.toml"
    binary.write_bytes(b"\xff\xfe\x00tflops")
    with pytest.raises(ProfileError, match=rf"profile file {binary}: not UTF-8 text"):
        load_profile_file(binary)


# ---------------------------------------------------------------- precedence


def advertised(config: WorkerConfig, measured: MeasuredProfile | None) -> pb.NodeProfile:
    """The NodeProfile a worker with this config reports after ``measured`` (no engine needed)."""
    worker = Worker(config)
    worker.measured = measured
    return worker.profile()


@pytest.mark.parametrize(
    ("file_text", "flags", "expected"),
    [
        pytest.param('hardware = "dgx-spark"', (), ("dgx-spark", SPARK.tflops, SPARK.mem_bw_gbps, "declared"),
                     id="catalog-beats-measurement"),
        pytest.param('hardware = "dgx-spark"\ntflops = 100.0', (),
                     ("dgx-spark", 100.0, SPARK.mem_bw_gbps, "declared"), id="file-beats-catalog-per-figure"),
        pytest.param('hardware = "dgx-spark"\ntflops = 100.0', ("--tflops", "90"),
                     ("dgx-spark", 90.0, SPARK.mem_bw_gbps, "declared"), id="flag-beats-file"),
        # --hardware replaces the file's hardware; the file's own figure still beats that catalog entry
        pytest.param('hardware = "dgx-spark"\nmem_bw_gbps = 300.0', ("--hardware", "mac-m4-max"),
                     ("mac-m4-max", M4_MAX.tflops, 300.0, "declared"), id="hardware-flag-beats-file"),
        pytest.param("mem_bw_gbps = 819.0", (), ("", MEASURED.tflops, 819.0, "measured+declared"),
                     id="file-figure-plus-measurement"),
        pytest.param(None, ("--tflops", "50"), ("", 50.0, MEASURED.mem_bw_gbps, "measured+declared"),
                     id="flag-figure-plus-measurement"),
        pytest.param(None, (), ("", MEASURED.tflops, MEASURED.mem_bw_gbps, "measured"), id="nothing-declared"),
    ],
)
def test_flags_beat_the_file_which_beats_the_catalog_which_beats_measurement(
        tmp_path: Path, key_file: Path, file_text: str | None, flags: tuple[str, ...],
        expected: tuple[str, float, float, str]) -> None:
    profile_flags = ("--profile", str(write_profile(tmp_path, file_text))) if file_text is not None else ()
    config = config_from_args(worker_args(key_file, *profile_flags, *flags))
    profile = advertised(config, MEASURED)
    assert (profile.hardware, profile.tflops, profile.mem_bw_gbps, profile.profile_source) == expected


def test_unmeasurable_node_without_a_declaration_reports_zero_as_measured(key_file: Path) -> None:
    profile = advertised(config_from_args(worker_args(key_file)), None)
    assert (profile.tflops, profile.mem_bw_gbps, profile.profile_source) == (0.0, 0.0, "measured")


def test_worker_config_refuses_unknown_hardware_and_bad_figures(key_file: Path) -> None:
    args = worker_args(key_file)
    with pytest.raises(ProfileError, match=r"unknown hardware 'tpu-v9'; known hardware: dgx-spark, "):
        WorkerConfig(role="decode", engine="mlx", model="unused", cluster_key=generate_key(), hardware="tpu-v9")
    for name, value in (("tflops", -1.0), ("mem_bw_gbps", float("inf"))):
        with pytest.raises(ValueError, match=rf"{name} must be a finite number >= 0 .*, got {value!r}"):
            config_from_args(argparse.Namespace(**{**vars(args), name: value}))


def test_pdc_worker_with_a_bad_profile_exits_2_naming_file_key_and_known_names(
        tmp_path: Path, key_file: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bad = write_profile(tmp_path, 'hardware = "m4-max"')
    argv = ["worker", "--role", "decode", "--engine", "mlx", "--model", "unused", "--cluster-key-file", str(key_file)]
    assert main([*argv, "--profile", str(bad)]) == 2
    err = capsys.readouterr().err
    assert f"pdc: error: profile file {bad}: unknown hardware 'm4-max'; known hardware: " in err
    assert all(name in err for name in HARDWARE)
    with pytest.raises(SystemExit) as exited:
        main([*argv, "--hardware", "m4-max"])
    assert exited.value.code == 2
    assert "invalid choice: 'm4-max'" in capsys.readouterr().err


# ---------------------------------------------------------------- a real start


@pytest.mark.parametrize("kind", [pytest.param("torch", marks=requires_torch), pytest.param("mlx", marks=requires_mlx)])
def test_start_up_measurement_on_a_real_engine_gives_finite_positive_figures_quickly(
        make_tiny_model: Callable[..., Path], kind: str) -> None:
    engine = load_engine(kind, make_tiny_model("llama"), "float32")
    started = time.perf_counter()
    measured = engine.measure_profile(BUDGET_S)
    elapsed = time.perf_counter() - started
    assert math.isfinite(measured.tflops) and measured.tflops > 0, measured
    assert math.isfinite(measured.mem_bw_gbps) and measured.mem_bw_gbps > 0, measured
    # Two timed loops of BUDGET_S each, plus warm-up and allocation: loosely bounded.
    assert elapsed < 30, f"measurement took {elapsed:.1f} s with a {BUDGET_S} s budget per figure"


@requires_mlx
@pytest.mark.parametrize(
    ("declared", "num_measurements", "expected"),
    [
        pytest.param({"hardware": "dgx-spark"}, 0, (SPARK.tflops, SPARK.mem_bw_gbps, "declared"), id="hardware"),
        pytest.param({"tflops": 5.0, "mem_bw_gbps": 60.0}, 0, (5.0, 60.0, "declared"), id="both-figures"),
        pytest.param({"tflops": 5.0}, 1, (5.0, MEASURED.mem_bw_gbps, "measured+declared"), id="one-figure"),
    ],
)
def test_start_up_measures_only_when_a_figure_is_not_declared(
        make_tiny_model: Callable[..., Path], monkeypatch: pytest.MonkeyPatch, declared: dict[str, object],
        num_measurements: int, expected: tuple[float, float, str]) -> None:
    from workers.engines.mlx_engine import MLXEngine

    measurements: list[float] = []

    def fake_measure(engine: MLXEngine, budget_s: float) -> MeasuredProfile:
        measurements.append(budget_s)
        return MEASURED

    monkeypatch.setattr(MLXEngine, "measure_profile", fake_measure)
    config = WorkerConfig(role="decode", engine="mlx", model=str(make_tiny_model("llama")),
                          cluster_key=generate_key(), advertise=False, grace_s=1.0, **declared)

    async def body() -> NodeInfo:
        async with Worker(config) as worker:
            return NodeInfo(**worker.node_info())  # what mDNS advertises

    node = asyncio.run(asyncio.wait_for(body(), 60))
    assert measurements == [BUDGET_S] * num_measurements
    assert (node.tflops, node.mem_bw_gbps, node.profile_source) == expected
    assert node.hardware == declared.get("hardware", "")
    assert NodeInfo.from_txt(node.to_txt(), node.host, node.grpc_port, source="static") == node


# ---------------------------------------------------------------- the prefill probe


class _ProbeEngine:
    """Prefills by advancing a fake clock: 1 ms per token, plus attention's n^2 / 1e6 s."""

    def __init__(self) -> None:
        self.now = 0.0
        self.prefills: list[tuple[str, int, int]] = []
        self.released: list[str] = []

    def prefill(self, request_id: str, token_ids: list[int], on_slice: Callable, chunk_size: int = 128) -> None:
        self.prefills.append((request_id, len(token_ids), chunk_size))
        self.now += 1e-3 * len(token_ids) + len(token_ids) ** 2 / 1e6

    def release(self, request_id: str) -> None:
        self.released.append(request_id)


def test_prefill_probe_times_each_length_after_a_warm_up_and_releases_its_cache() -> None:
    engine = _ProbeEngine()
    points = probe_prefill(engine, vocab_size=100, max_tokens=4096, chunk_size=64, budget_s=100.0,
                           lengths=(512, 128), clock=lambda: engine.now)
    assert [n for _, n, _ in engine.prefills] == [PROBE_WARMUP_TOKENS, 128, 512]
    assert {(rid, chunk) for rid, _, chunk in engine.prefills} == {(PROBE_REQUEST_ID, 64)}
    assert engine.released == [PROBE_REQUEST_ID] * 3
    assert points == (pytest.approx((128, 0.128 + 0.016384)), pytest.approx((512, 0.512 + 0.262144)))


def test_prefill_probe_stops_before_a_length_the_budget_cannot_fit_and_caps_at_the_context() -> None:
    engine = _ProbeEngine()
    # 128 tokens take 0.144 s; 512 would be guessed at 0.144 * 2 * 4 = 1.15 s, over what is left of 1 s
    points = probe_prefill(engine, vocab_size=100, max_tokens=4096, chunk_size=128, budget_s=1.0,
                           lengths=(128, 512), clock=lambda: engine.now)
    assert [n for n, _ in points] == [128]
    engine = _ProbeEngine()
    points = probe_prefill(engine, vocab_size=100, max_tokens=300, chunk_size=128, budget_s=100.0,
                           lengths=(128, 512, 2048), clock=lambda: engine.now)
    assert [n for n, _ in points] == [128, 300]


@requires_mlx
@pytest.mark.parametrize(("declared", "probed"), [({}, True), ({"tflops": 5.0}, False),
                                                  ({"hardware": "dgx-spark"}, False)])
def test_the_prefill_probe_runs_only_where_tflops_are_measured_and_reaches_the_scheduler(
        make_tiny_model: Callable[..., Path], monkeypatch: pytest.MonkeyPatch, declared: dict[str, object],
        probed: bool) -> None:
    from workers.engines.mlx_engine import MLXEngine

    fake_points = ((128, 0.25), (512, 1.5))
    calls: list[int] = []

    def fake_probe(engine: object, vocab_size: int, max_tokens: int, chunk_size: int) -> tuple:
        calls.append(chunk_size)
        return fake_points

    monkeypatch.setattr(MLXEngine, "measure_profile", lambda engine, budget_s: MEASURED)
    monkeypatch.setattr("workers.rpc.server.probe_prefill", fake_probe)
    config = WorkerConfig(role="decode", engine="mlx", model=str(make_tiny_model("llama")),
                          cluster_key=generate_key(), advertise=False, grace_s=1.0, **declared)

    async def body() -> tuple[NodeInfo, pb.NodeProfile]:
        async with Worker(config) as worker:
            return NodeInfo(**worker.node_info()), worker.profile()

    node, profile = asyncio.run(asyncio.wait_for(body(), 60))
    expected = fake_points if probed else ()
    assert calls == ([config.chunk_size] if probed else [])
    assert node.prefill_probe == expected
    assert tuple((p.tokens, p.seconds) for p in profile.prefill_probe) == expected
    assert node_from_info(pb.InfoReply(node=profile), "10.0.0.1:50051").prefill_probe == expected
    assert NodeInfo.from_txt(node.to_txt(), node.host, node.grpc_port, source="static") == node


def test_the_probe_constants_leave_two_lengths_within_a_short_start_up() -> None:
    lengths = profile_module.PROBE_TOKENS
    assert list(lengths) == sorted(set(lengths)) and len(lengths) >= 2  # two lengths separate the two terms
    assert 0 < profile_module.PROBE_BUDGET_S <= 15


def test_worker_process_with_a_profile_file_reports_it_and_its_config_json(
        make_tiny_model: Callable[..., Path], tmp_path: Path) -> None:
    if not have("mlx.core"):
        pytest.skip("needs the mlx extra (the worker's engine)")
    from conftest import start_worker_process  # the same launcher the service tests use

    model = make_tiny_model("llama")
    profile = write_profile(tmp_path, 'hardware = "mac-m4-max"\nmem_bw_gbps = 500.0\n')
    key = generate_key()
    key_file = write_config(tmp_path / "worker-key.json", key)
    worker = start_worker_process("decode", "mlx", model, key_file, tmp_path / "decode.log", "--profile", str(profile))
    try:
        assert worker.ready.wait(120), f"worker did not start:\n{worker.tail()}"

        async def info() -> pb.InfoReply:
            async with WorkerClient(worker.grpc, key) as client:
                return await client.info()

        reply = asyncio.run(asyncio.wait_for(info(), 30))
        node = node_from_info(reply, worker.grpc)
        assert (node.hardware, node.profile_source) == ("mac-m4-max", "declared")
        assert (node.tflops, node.mem_bw_gbps) == (M4_MAX.tflops, 500.0)
        assert reply.model.config_json == (model / "config.json").read_text()
        assert json.loads(reply.model.config_json)["num_hidden_layers"] == reply.model.num_layers
    finally:
        worker.proc.send_signal(signal.SIGTERM)
        try:
            worker.proc.wait(20)
        except subprocess.TimeoutExpired:
            worker.proc.kill()
            worker.proc.wait(5)


# ---------------------------------------------------------------- one machine's workers measure one at a time


def test_workers_given_one_startup_lock_load_and_measure_one_at_a_time(tmp_path: Path) -> None:
    lock = str(tmp_path / "startup.lock")
    order: list[str] = []

    async def worker(name: str, hold_s: float) -> None:
        async with profile_module.startup_lock(lock, timeout_s=10, poll_s=0.01) as held:
            assert held
            order.append(f"{name} in")
            await asyncio.sleep(hold_s)
            order.append(f"{name} out")

    async def both() -> None:
        first = asyncio.ensure_future(worker("a", 0.2))
        await asyncio.sleep(0.05)
        await asyncio.gather(first, worker("b", 0.0))

    asyncio.run(both())
    assert order == ["a in", "a out", "b in", "b out"]


def test_a_startup_lock_held_too_long_is_given_up_with_a_warning(tmp_path: Path,
                                                                 caplog: pytest.LogCaptureFixture) -> None:
    import fcntl
    import os

    lock = str(tmp_path / "startup.lock")
    fd = os.open(lock, os.O_RDWR | os.O_CREAT)
    fcntl.flock(fd, fcntl.LOCK_EX)  # another process's worker, still starting

    async def body() -> bool:
        async with profile_module.startup_lock(lock, timeout_s=0.2, poll_s=0.02) as held:
            return held

    async def unlocked() -> bool:
        async with profile_module.startup_lock(None) as held:
            return held

    try:
        assert asyncio.run(body()) is False
    finally:
        os.close(fd)
    assert "measuring this node under its load" in caplog.text
    assert asyncio.run(unlocked()) is False

    async def unopenable() -> bool:  # a folder that is not there: the worker goes on without the lock
        async with profile_module.startup_lock(str(tmp_path / "gone" / "startup.lock")) as held:
            return held

    assert asyncio.run(unopenable()) is False and "cannot open the start-up lock" in caplog.text
    parsed = build_parser().parse_args(["worker", "--role", "both", "--engine", "torch", "--model", "x",
                                        "--startup-lock", lock])
    assert parsed.startup_lock == lock
