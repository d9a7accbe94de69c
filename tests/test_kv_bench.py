"""``pdc bench kv`` end to end on 127.0.0.1 at a few MB: both paths deliver
exactly the layout's bytes, and the report has the promised shape. No test here
asserts a speed: timings on a shared 2-core machine prove nothing."""
from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from workers.tools.bench import add_bench_parser
from workers.tools.decode_bench import run_bench_decode
from workers.tools.kv_bench import (
    BenchConfig,
    build_slices,
    format_summary,
    main,
    run_bench_kv,
    run_kv_bench,
)

REPO = Path(__file__).resolve().parents[1]
CLI_TIMEOUT_S = 180.0
HEADLINE_KEYS = ["kv_gbps", "raw_gbps", "ratio"]

# ~8 MB: an 8B Llama's per-token KV (128 KiB) for 64 tokens, in chunks that leave a partial last one
SMALL = BenchConfig(num_tokens=64, chunk=24, rounds=1, warmup=0, timeout_s=60.0)


def test_default_config_is_an_8b_llama_stream_of_at_least_one_gb() -> None:
    config = BenchConfig()
    layout = config.layout
    assert layout.bytes_per_token == 128 * 1024  # 32 layers x 8 kv heads x 128 head_dim x fp16, K and V
    assert layout.total_bytes >= 1e9
    assert (layout.num_tokens - 1) * layout.bytes_per_token < 1e9  # the fewest tokens that reach 1 GB
    assert config.chunk == 256
    assert config.num_frames == 32 * math.ceil(layout.num_tokens / 256)


@pytest.mark.parametrize("bad", [{"gb": 0}, {"chunk": 0}, {"rounds": 0}, {"num_tokens": 0}, {"dtype": "int8"}])
def test_config_rejects_nonsense(bad: dict) -> None:
    with pytest.raises(ValueError):
        BenchConfig(**bad)


def test_slices_tile_the_source_in_prefill_order() -> None:
    layout = SMALL.layout
    source, slices = build_slices(layout, SMALL.chunk, seed=0)
    assert len(slices) == SMALL.num_frames
    # chunk by chunk, every layer of a chunk in turn; the last chunk is partial
    assert [(s.start, s.layer) for s in slices[:5]] == [(0, 0), (0, 1), (0, 2), (0, 3), (0, 4)]
    assert (slices[-1].start, slices[-1].layer, slices[-1].num_tokens) == (48, 31, 16)
    joined = np.concatenate([np.concatenate([s.keys.ravel(), s.values.ravel()]) for s in slices])
    assert joined.view(np.uint8).tobytes() == source.tobytes()
    assert sum(s.nbytes for s in slices) == layout.total_bytes


def test_both_paths_deliver_exactly_the_layouts_bytes() -> None:
    lines: list[str] = []
    result = run_kv_bench(SMALL, report=lines.append)
    summary = result.summary()
    payload = SMALL.layout.total_bytes

    assert list(summary)[:3] == HEADLINE_KEYS
    assert summary["payload_bytes"] == payload
    assert summary["kv_payload_bytes"] == summary["raw_payload_bytes"] == payload
    assert summary["raw_bytes_sent"] == summary["raw_bytes_received"] == payload
    # kv: the receiver counts exactly what the sender wrote, frame headers included
    assert summary["kv_bytes_sent"] == summary["kv_bytes_received"]
    assert 0 < summary["kv_bytes_sent"] - payload < (SMALL.num_frames + 2) * 1024
    assert summary["num_frames"] == SMALL.num_frames
    assert len(summary["kv_rounds_gbps"]) == len(summary["raw_rounds_gbps"]) == 1
    assert summary["ratio"] == pytest.approx(summary["kv_gbps"] / summary["raw_gbps"], rel=1e-3)
    assert [r.path for r in result.rounds] == ["kv", "raw"]
    assert any(" kv " in line for line in lines) and any(" raw " in line for line in lines)
    json.dumps(summary)  # the --json line must serialise


def test_cli_ends_with_the_json_line() -> None:
    command = [sys.executable, "-m", "workers.tools.kv_bench", "kv", "--json", "--gb", "0.01",
               "--rounds", "1", "--warmup", "0"]
    done = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=CLI_TIMEOUT_S)
    assert done.returncode == 0, done.stderr
    lines = done.stdout.strip().splitlines()
    summary = json.loads(lines[-1])
    assert list(summary)[:3] == HEADLINE_KEYS
    assert summary["payload_bytes"] >= 0.01e9
    assert summary["kv_bytes_sent"] == summary["kv_bytes_received"]
    assert any(line.strip().startswith("ratio") for line in lines)  # the human report comes first


def test_bench_parser_registers_bench_kv_and_decode() -> None:
    parser = argparse.ArgumentParser(prog="pdc")
    add_bench_parser(parser.add_subparsers())
    args = parser.parse_args(["bench", "kv", "--gb", "2", "--dtype", "bf16", "--rounds", "3", "--json"])
    assert args.run is run_bench_kv
    assert (args.gb, args.dtype, args.rounds, args.json) == (2.0, "bf16", 3, True)
    assert parser.parse_args(["bench", "decode", "--preset", "tiny"]).run is run_bench_decode
    bare = parser.parse_args(["bench"])
    assert bare.run is not run_bench_kv  # prints the bench help instead of running anything


def test_module_main_without_a_benchmark_prints_help_and_a_bad_config_exits_2(capsys) -> None:
    assert main([]) == 2
    assert "kv" in capsys.readouterr().out
    assert main(["kv", "--gb", "0", "--rounds", "1"]) == 2  # BenchConfig refuses it: a ValueError, no traceback
    assert "pdc bench: error:" in capsys.readouterr().err


@pytest.mark.parametrize("digest_at", ["engine", "sender"])
def test_raw_kv_path_delivers_exactly_with_the_checksum_taken_either_place(digest_at: str) -> None:
    config = BenchConfig(num_tokens=64, chunk=24, rounds=1, warmup=0, timeout_s=60.0, digest_at=digest_at)
    result = run_kv_bench(config, report=lambda _: None)  # the arena digest check passed in each round
    summary = result.summary()
    assert summary["digest_at"] == digest_at and summary["codec"] == "raw"
    assert summary["engine_digest_ms_per_gb"] > 0 and summary["cold_digest_ms_per_gb"] > 0


@pytest.mark.parametrize("codec", ["int8", "fp8"])
def test_codec_kv_path_sends_about_half_the_bytes_and_reports_its_costs(codec: str) -> None:
    config = BenchConfig(num_tokens=64, chunk=24, rounds=1, warmup=0, timeout_s=60.0, codec=codec)
    lines: list[str] = []
    result = run_kv_bench(config, report=lines.append)  # arena == the codec's decode of the source, each round
    summary = result.summary()
    payload = config.layout.total_bytes
    assert summary["kv_payload_bytes"] == payload  # decoded into the arena: raw-sized
    assert summary["encoded_payload_bytes"] < 0.52 * payload  # fp16 head_dim 128: int8 0.508, fp8 0.500
    assert summary["kv_bytes_sent"] - summary["encoded_payload_bytes"] < (config.num_frames + 2) * 1024
    assert summary["encode_ms_per_gb"] > 0 and summary["decode_ms_per_gb"] > 0
    assert "codec" in format_summary(result)


def test_finite_source_holds_no_nan_or_inf() -> None:
    source, _ = build_slices(SMALL.layout, SMALL.chunk, seed=1, finite=True)
    assert np.isfinite(source.view(np.float16)).all()
