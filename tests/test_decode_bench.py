"""``pdc bench decode`` on the tiny preset with a few tokens: the report has the
promised fields, the ratio is computed from the two measured rates, and the
greedy sequences of our decode loop and each library's own generate agree.
No test here asserts a speed: timings on a shared 2-core machine prove nothing."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
from conftest import have

from workers.engines import registry
from workers.engines.registry import available_engines, engine_spec, load_engine
from workers.tools.decode_bench import (
    DecodeBenchConfig,
    EngineResult,
    RoundResult,
    bench_engines,
    first_difference,
    native_name,
    run_decode_bench,
    run_native,
    run_ours,
)

REPO = Path(__file__).resolve().parents[1]
CLI_TIMEOUT_S = 120.0
ENGINES = available_engines(("mlx", "torch"))
requires_an_engine = pytest.mark.skipif(not ENGINES, reason="neither the torch nor the mlx extra is installed")


def _round(path: str, tokens: tuple[int, ...], seconds_per_token: float) -> RoundResult:
    return RoundResult("mlx", path, tokens, tuple(i * seconds_per_token for i in range(len(tokens))))


@pytest.mark.parametrize("bad", [
    {"new_tokens": 1}, {"prompt_tokens": 0}, {"rounds": 0}, {"warmup": -1},
    {"engines": ()}, {"engines": ("jax",)}, {"preset": "huge"},
])
def test_config_rejects_nonsense(bad: dict) -> None:
    with pytest.raises(ValueError):
        DecodeBenchConfig(**bad)


def test_rate_counts_decode_steps_between_the_first_and_last_token() -> None:
    r = RoundResult("torch", "ours", (1, 2, 3, 4, 5), (10.0, 10.1, 10.2, 10.3, 10.4))
    assert r.tokens_per_s == pytest.approx(4 / 0.4)


def test_ratio_is_median_ours_over_median_native() -> None:
    tokens = (7, 8, 9)
    result = EngineResult("mlx", "mlx-lm", [
        _round("ours", tokens, 0.10), _round("native", tokens, 0.05),
        _round("ours", tokens, 0.20), _round("native", tokens, 0.04),
        _round("ours", tokens, 0.25), _round("native", tokens, 0.08),
    ])
    assert result.median_rate("ours") == pytest.approx(5.0)  # median of 10, 5, 4 tok/s
    assert result.median_rate("native") == pytest.approx(20.0)  # median of 20, 25, 12.5 tok/s
    assert result.ratio == pytest.approx(0.25)
    assert result.summary()["ratio"] == pytest.approx(0.25)


def test_divergence_is_the_first_differing_token_over_all_rounds() -> None:
    assert first_difference((1, 2, 3), (1, 2, 3)) is None
    assert first_difference((1, 2, 3), (1, 5, 3)) == 1
    assert first_difference((1, 2), (1, 2, 3)) == 2
    same = EngineResult("mlx", "mlx-lm", [_round("ours", (1, 2, 3), 0.1), _round("native", (1, 2, 3), 0.1)])
    assert same.tokens_identical and same.first_divergence is None
    differ = EngineResult("mlx", "mlx-lm", [
        _round("ours", (1, 2, 3, 4), 0.1), _round("native", (1, 2, 3, 9), 0.1),
        _round("ours", (1, 2, 3, 4), 0.1), _round("native", (1, 6, 3, 4), 0.1),
    ])
    assert not differ.tokens_identical and differ.first_divergence == 1
    assert differ.summary()["first_divergence"] == 1


@requires_an_engine
def test_tiny_run_reports_both_paths_and_identical_greedy_tokens(make_tiny_model) -> None:
    config = DecodeBenchConfig(model=str(make_tiny_model("llama")), engines=ENGINES, prompt_tokens=24,
                               new_tokens=6, rounds=2, warmup=1)
    lines: list[str] = []
    result = run_decode_bench(config, report=lines.append)
    summary = result.summary()

    assert list(summary)[:2] == ["ratios", "engines"]
    assert list(summary["ratios"]) == list(summary["engines"]) == list(ENGINES)
    for name, engine in summary["engines"].items():
        assert len(engine["ours_rounds_tps"]) == len(engine["native_rounds_tps"]) == 2
        assert engine["ratio"] == pytest.approx(engine["ours_tps"] / engine["native_tps"], rel=1e-3)
        assert summary["ratios"][name] == pytest.approx(engine["ratio"], rel=1e-3)
        # fp32 greedy on the same weights: our loop and the library's pick the same tokens
        assert engine["tokens_identical"] is True and engine["first_divergence"] is None
        assert len(engine["cpu_wait"]) == 4
    for e in result.engines:
        assert [r.path for r in e.rounds] == ["ours", "native"] * 2  # alternating
        assert all(len(r.token_ids) == len(r.stamps) == 6 for r in e.rounds)
    assert sum(" ours " in line for line in lines) == 2 * len(ENGINES)
    json.dumps(summary)  # the --json line must serialise


@requires_an_engine
def test_cli_builds_the_preset_once_and_ends_with_the_json_line(tmp_path: Path) -> None:
    engine = ENGINES[0]
    command = [sys.executable, "-m", "workers.tools.decode_bench", "decode", "--preset", "tiny", "--engine", engine,
               "--prompt-tokens", "8", "--new-tokens", "3", "--rounds", "1", "--warmup", "0", "--json"]
    env = {**os.environ, "PDC_HOME": str(tmp_path)}
    done = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=CLI_TIMEOUT_S)
    assert done.returncode == 0, done.stderr
    assert "building the tiny llama checkpoint" in done.stdout
    assert (tmp_path / "models" / "tiny-llama-seed0" / "model.safetensors").is_file()
    summary = json.loads(done.stdout.strip().splitlines()[-1])
    assert list(summary["ratios"]) == [engine]
    assert summary["new_tokens"] == 3 and summary["rounds"] == 1


def test_engines_that_do_not_import_are_left_out_and_none_is_an_error(monkeypatch, make_tiny_model) -> None:
    if not ENGINES:
        pytest.skip("neither the torch nor the mlx extra is installed")
    monkeypatch.setitem(registry.ENGINES, "mlx", replace(registry.ENGINES["mlx"], requires="no_such_module_for_pdc"))
    assert available_engines(("mlx", "torch")) == (("torch",) if have("torch") else ())
    with pytest.raises(ValueError, match="none of"):
        run_decode_bench(DecodeBenchConfig(model=str(make_tiny_model("llama")), engines=("mlx",)))


def test_both_engines_are_benched_decode_engine_first() -> None:
    assert DecodeBenchConfig().engines == bench_engines() == ("mlx", "torch")


@pytest.mark.parametrize(("engine", "library"), [("torch", "transformers"), ("mlx", "mlx-lm")])
def test_the_native_baseline_is_named_by_the_registry_with_its_version(engine: str, library: str) -> None:
    if not have(library.replace("-", "_")):
        pytest.skip(f"{library} not installed")
    from importlib.metadata import version

    assert native_name(engine).startswith(f"{library} {version(library)} ")


# ---------------------------------------------------------------- ours vs the library's own generate

PROMPT = list(range(5, 105))


@pytest.mark.parametrize("engine_name", ["torch", "mlx"])
def test_our_batched_decode_of_one_request_is_token_identical_to_the_librarys_generate(make_tiny_model,
                                                                                       engine_name) -> None:
    """What ``pdc bench decode`` compares is the same computation: one request
    through ``add``/``step`` (the worker's batch path) gives the tokens of the
    library's own greedy generate (``model.generate`` / mlx-lm ``generate_step``)."""
    if not have(engine_spec(engine_name).requires):
        pytest.skip(f"{engine_spec(engine_name).requires} is not installed")
    engine = load_engine(engine_name, make_tiny_model("llama"), "float32")
    ours = run_ours(engine, engine_name, PROMPT, 20)
    native = run_native(engine, engine_name, PROMPT, 20)
    assert ours.token_ids == native.token_ids
