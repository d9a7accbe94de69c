"""A sliding-window model (gpt-oss, Gemma 3) served by a live cluster.

A scheduler, a torch prefill worker and an MLX decode worker run as separate
processes (``LocalCluster``, what ``pdc up`` runs), and the official openai
client asks for a prompt longer than the model's window: the split answer
equals the single-node one, and the KV that crossed the wire is only each
sliding layer's window (raw or int8, as the request asks).
"""
from __future__ import annotations

import json
from pathlib import Path

import openai
import pytest
from conftest import free_port, requires_torch_and_mlx

from cluster.launcher import LocalCluster, UpConfig
from workers.engines.model_config import read_model_spec
from workers.kv import kvcodecs

pytestmark = requires_torch_and_mlx
# ~400 tokens with the tiny checkpoints' tokenizer: longer than their 256-token window
PROMPT = " ".join(f"Step {i}: the prefill node streams layer {i % 7} to the decode node." for i in range(28))


@pytest.fixture(scope="module", params=["gpt_oss", pytest.param("gemma3", marks=pytest.mark.slow)])
def cluster(request, make_tiny_model, tmp_path_factory):
    model = make_tiny_model(request.param)
    # `pdc up` runs both workers on one host, where `auto` would never compress: raw by default,
    # the int8 test asks for it per request
    config = UpConfig(model=str(model), port=free_port(), prefill_engine="torch", decode_engine="mlx",
                      log_dir=str(tmp_path_factory.mktemp("logs")))
    with LocalCluster(config) as running:
        running.wait_ready(timeout=180)
        yield running, model


def _ask(client: openai.OpenAI, placement: str, **pdcluster: str) -> openai.types.Completion:
    return client.completions.create(
        model=client.models.list().data[0].id, prompt=PROMPT, max_tokens=24, temperature=0,
        extra_body={"pdcluster": {"placement": placement, **pdcluster}})


def _windowed_payload(model: Path, prompt_tokens: int, codec: str) -> int:
    """Bytes of K/V (without frame headers) that a windowed transfer of ``prompt_tokens`` carries."""
    spec = read_model_spec(model)
    windows = spec.windows or (0,) * spec.num_layers
    return sum(kvcodecs.encoded_nbytes(codec, spec.kv_heads, min(prompt_tokens, w) if w else prompt_tokens,
                                       spec.head_dim, "float32") for w in windows)


def test_split_answer_equals_single_node_and_only_the_windows_travel(cluster) -> None:
    running, model = cluster
    client = openai.OpenAI(base_url=running.url + "/v1", api_key="x", timeout=120, max_retries=0)
    split = _ask(client, "disaggregated")
    single = _ask(client, "colocated")
    stats = split.model_extra["pdcluster"]
    prompt_tokens = split.usage.prompt_tokens
    spec = read_model_spec(model)
    assert prompt_tokens > json.loads((model / "config.json").read_text())["sliding_window"]
    assert stats["prefill_node"] != stats["decode_node"] and stats["kv_codec"] == "raw"
    assert split.choices[0].text == single.choices[0].text
    assert split.usage.completion_tokens == 24
    payload = _windowed_payload(model, prompt_tokens, "raw")
    full = 2 * spec.num_layers * spec.kv_heads * spec.head_dim * 4 * prompt_tokens
    assert payload < full
    assert payload <= stats["kv_bytes"] < payload + 64 * 1024  # frame headers: a few hundred bytes each

    compressed = _ask(client, "disaggregated", kv_codec="int8").model_extra["pdcluster"]
    assert compressed["kv_codec"] == "int8"
    assert compressed["kv_bytes"] < 0.4 * stats["kv_bytes"]  # fp32 KV, head_dim 16: int8 sends ~0.28
