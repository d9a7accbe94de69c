"""The engine registry: one dict names every engine, and nothing else has to.

Adding an engine must touch only ``workers/engines/registry.py`` and the
engine's own file: these tests register a third engine and find every command
line, config and the worker itself taking it, and they check that only the
engine modules import torch, transformers, mlx or mlx-lm.
"""
from __future__ import annotations

import ast
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
from conftest import config, have, requires_mlx, run, started

from cluster.auth import generate_key
from cluster.cli import build_parser
from cluster.launcher import UpConfig
from cluster.node import NodeInfo
from proto import pdcluster_pb2 as pb
from workers.engines import registry
from workers.engines.base import Engine
from workers.engines.registry import (
    ENGINES,
    EngineSpec,
    available_engines,
    default_decode_engine,
    describe_engines,
    engine_names,
    is_available,
    load_engine,
)
from workers.rpc.server import Worker, WorkerConfig
from workers.tools.decode_bench import DecodeBenchConfig
from workers.tools.handoff import HandoffConfig

ROOT = Path(__file__).resolve().parent.parent
HEAVY = ("torch", "transformers", "mlx", "mlx_lm")
ENGINE_MODULES = {"workers/engines/torch_engine.py", "workers/engines/mlx_engine.py",
                  "workers/tools/gguf_convert.py"}  # transformers' GGUF reader, run once for the built-in model
PROTOCOL = ("layout_dtype", "kv_layout", "prefill", "prefill_chunks", "load_kv", "add", "step", "remove", "running",
            "release", "cached_requests", "cached_tokens", "cached_layer", "measure_profile", "free_memory_bytes",
            "close")


def test_the_registry_lists_torch_and_mlx_with_their_libraries() -> None:
    assert engine_names() == ("torch", "mlx")
    assert all(name == spec.name for name, spec in ENGINES.items())
    assert [(s.requires, s.library) for s in ENGINES.values()] == [("torch", "transformers"), ("mlx.core", "mlx-lm")]
    assert describe_engines() == "torch (transformers) or mlx (mlx-lm)"


def test_importing_the_registry_imports_no_engine_library() -> None:
    code = ("import sys\nimport workers.engines.registry, workers.rpc.server, cluster.cli, cluster.launcher\n"
            f"print(sorted(m for m in sys.modules if m.split('.')[0] in {HEAVY!r}))")
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"


def test_only_the_engine_modules_import_engine_libraries() -> None:
    offenders = []
    for folder in ("workers", "cluster", "scheduler", "proto"):
        for path in sorted((ROOT / folder).rglob("*.py")):
            relative = path.relative_to(ROOT).as_posix()
            if relative not in ENGINE_MODULES:
                offenders += [f"{relative}: {name}" for name in _imported_roots(path) if name in HEAVY]
    assert offenders == []


def _imported_roots(path: Path) -> set[str]:
    roots = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            roots |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            roots.add(node.module.split(".")[0])
    return roots


def test_an_unknown_engine_is_refused_everywhere_with_the_known_names() -> None:
    for build in (lambda: load_engine("jax", "unused"), lambda: is_available("jax"),
                  lambda: WorkerConfig(role="decode", engine="jax", model="m", cluster_key=generate_key()),
                  lambda: UpConfig(model="m", prefill_engine="jax"),
                  lambda: HandoffConfig(model="m", decode_engine="jax"),
                  lambda: DecodeBenchConfig(engines=("jax",))):
        with pytest.raises(ValueError, match=r"'jax'") as refused:
            build()
        assert "torch" in str(refused.value) and "mlx" in str(refused.value)


def test_availability_follows_the_import_probe(monkeypatch: pytest.MonkeyPatch) -> None:
    assert is_available("torch") == have("torch") and is_available("mlx") == have("mlx.core")
    monkeypatch.setitem(ENGINES, "mlx", replace(ENGINES["mlx"], requires="no_such_module_for_pdc"))
    assert not is_available("mlx")
    assert available_engines() == (("torch",) if have("torch") else ())
    assert default_decode_engine() == "torch"  # mlx is preferred, but only where it imports


def test_decode_defaults_to_the_first_preferred_engine_that_imports(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(registry, "is_available", lambda name: name == "torch")
    assert default_decode_engine() == "torch"
    monkeypatch.setattr(registry, "is_available", lambda name: True)
    assert default_decode_engine() == registry.DECODE_PREFERENCE[0] == "mlx"
    monkeypatch.setattr(registry, "is_available", lambda name: False)
    assert default_decode_engine() == registry.DECODE_PREFERENCE[-1]  # and the worker will say what is missing


@pytest.mark.parametrize("name", [pytest.param("torch", marks=pytest.mark.skipif(not have("torch"), reason="torch")),
                                  pytest.param("mlx", marks=requires_mlx)])
def test_a_loaded_engine_has_its_registry_name_and_the_whole_protocol(name: str, make_tiny_model) -> None:
    engine = load_engine(name, make_tiny_model("llama"), "float32")
    assert engine.name == name and engine.layout_dtype == "float32"
    assert [m for m in PROTOCOL if not hasattr(engine, m)] == []
    assert [m for m in PROTOCOL if not hasattr(Engine, m)] == []  # and the protocol declares them all


# ---------------------------------------------------------------- a third engine


def _third_engine(monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, str | None, str | None]]:
    """Register ``mirror``: MLX under another name. Returns the loader's calls."""
    calls: list[tuple[str, str | None, str | None]] = []

    def load(model_dir: Path, dtype: str | None, device: str | None) -> Engine:
        from workers.engines.mlx_engine import MLXEngine

        calls.append((model_dir.name, dtype, device))
        engine = MLXEngine(model_dir, dtype=dtype)
        engine.name = "mirror"
        return engine

    monkeypatch.setitem(ENGINES, "mirror", EngineSpec("mirror", requires="mlx.core", library="mlx-lm",
                                                      native_entry="generate_step", loader=load))
    return calls


def test_a_third_engine_is_taken_by_every_command_and_config(monkeypatch: pytest.MonkeyPatch) -> None:
    _third_engine(monkeypatch)
    parser = build_parser()  # choices are read from the registry when the parser is built
    for argv in (["worker", "--role", "decode", "--engine", "mirror", "--model", "m"],
                 ["up", "--prefill-engine", "mirror", "--decode-engine", "mirror"],
                 ["demo", "--decode-engine", "mirror"],
                 ["check-handoff", "--model", "m", "--prefill", "mirror", "--decode", "mirror"],
                 ["bench", "decode", "--engine", "mirror"]):
        parser.parse_args(argv)
    WorkerConfig(role="decode", engine="mirror", model="m", cluster_key=generate_key())
    UpConfig(model="m", prefill_engine="mirror", decode_engine="mirror")
    HandoffConfig(model="m", prefill_engine="mirror", decode_engine="mirror")
    assert "mirror (mlx-lm)" in describe_engines()


@requires_mlx
def test_a_worker_serves_a_third_engine_from_its_registry_entry_alone(
        monkeypatch: pytest.MonkeyPatch, model: Path) -> None:
    calls = _third_engine(monkeypatch)
    worker = Worker(config(model, generate_key(), "both", engine="mirror", dtype="float32"))

    async def body() -> None:
        async with started(worker) as (client,):
            info = await client.info()
            assert (info.node.engine, info.node.device) == ("mirror", worker.engines.engine.device)
            assert info.node.free_mem_bytes > 0  # the engine's own figure
            assert NodeInfo(**worker.node_info()).engine == "mirror"  # what discovery would advertise
            request = pb.DecodeRequest(request_id="r", prompt_token_ids=list(range(10, 40)),
                                       sampling=pb.SamplingParams(max_tokens=4), local_prefill=True)
            events = [event async for event in client.decode(request, timeout=60)]
            assert [e.token.index for e in events if e.HasField("token")] == [0, 1, 2, 3]

    run(body)
    assert calls == [(model.name, "float32", None)]
