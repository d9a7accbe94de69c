"""Cross-engine KV handoff is token-identical, per architecture and direction.

Each case prefills a prompt longer than one chunk on one engine, ships the KV
through the wire codec over a real loopback TCP socket, decodes greedily in
fp32 on the other engine, and compares with that engine generating alone.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import have

from workers.engines.registry import load_engine
from workers.engines.sampling import SamplingParams
from workers.tools.handoff import (
    HandoffConfig,
    check_handoff,
    generate_alone,
    generate_handoff,
)
from workers.tools.modelgen import ARCHES

pytestmark = pytest.mark.skipif(
    not (have("torch") and have("mlx.core")), reason="needs both the torch and mlx extras"
)
DIRECTIONS = [("torch", "mlx"), ("mlx", "torch"), ("torch", "torch"), ("mlx", "mlx")]


@pytest.mark.parametrize("direction", DIRECTIONS, ids=lambda d: f"{d[0]}-to-{d[1]}")
@pytest.mark.parametrize("arch", ARCHES)
def test_handoff_is_token_identical(arch: str, direction: tuple[str, str], make_tiny_model) -> None:
    config = HandoffConfig(
        model=str(make_tiny_model(arch)), prefill_engine=direction[0], decode_engine=direction[1],
        prompt_tokens=300, max_tokens=24, chunk_size=128,
    )
    result = check_handoff(config)
    assert result.identical, f"first mismatch at {result.first_mismatch}: {result.handoff_tokens} vs {result.reference_tokens}"
    assert result.tokens_compared == 24
    layout = load_engine(direction[0], Path(config.model), "float32").kv_layout(300)
    assert result.kv_bytes >= layout.total_bytes
    assert result.num_slices == layout.num_layers * 3  # 300 tokens = chunks of 128, 128, 44


def test_handoff_detects_a_cache_from_different_weights(make_tiny_model) -> None:
    """The comparison can fail: KV from another seed's weights must not match."""
    prefill = load_engine("torch", make_tiny_model("llama", seed=0), "float32")
    decode = load_engine("mlx", make_tiny_model("llama", seed=1), "float32")
    prompt = list(range(10, 310))
    params = SamplingParams(max_tokens=24)
    reference, _ = generate_alone(decode, prompt, params, chunk_size=128)
    tokens, _, _, _ = generate_handoff(prefill, decode, prompt, params, chunk_size=128)
    assert tokens != reference


def _pdc(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    return subprocess.run(
        [sys.executable, "-m", "cluster.cli", *args], capture_output=True, text=True, timeout=300, env=env
    )


def test_check_handoff_cli_prints_a_json_verdict(make_tiny_model) -> None:
    proc = _pdc("check-handoff", "--model", str(make_tiny_model("llama")), "--prefill", "torch",
                "--decode", "mlx", "--prompt-tokens", "300", "--max-tokens", "24", "--json")
    assert proc.returncode == 0, proc.stderr
    verdict = json.loads(proc.stdout.strip().splitlines()[-1])
    assert verdict["identical"] is True
    assert verdict["tokens_compared"] == 24
    assert verdict["kv_bytes"] >= 300 * 2 * 4 * 2 * 16 * 4
    assert "IDENTICAL" in proc.stdout


def test_check_handoff_cli_refuses_unsupported_architecture(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gemma2", "num_hidden_layers": 2}))
    proc = _pdc("check-handoff", "--model", str(tmp_path))
    assert proc.returncode == 2
    assert "gemma2" in proc.stderr and "sliding-window" in proc.stderr
