"""End to end through the official openai client against real worker processes.

A scheduler, a torch prefill worker and an MLX decode worker run as separate
processes (``LocalCluster``, what ``pdc up`` runs) and find each other over
mDNS on 127.0.0.1.
"""
from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import anthropic
import ollama
import openai
import pytest
from conftest import free_port, requires_torch_and_mlx

from cluster.launcher import LocalCluster, UpConfig

pytestmark = requires_torch_and_mlx
MESSAGES = [{"role": "user", "content": "Tell me about prefill and decode."}]


@pytest.fixture(scope="module")
def cluster(make_tiny_model, tmp_path_factory):
    config = UpConfig(model=str(make_tiny_model("qwen3")), port=free_port(), prefill_engine="torch",
                      decode_engine="mlx", log_dir=str(tmp_path_factory.mktemp("logs")))
    with LocalCluster(config) as running:
        running.wait_ready(timeout=180)
        yield running


@pytest.fixture()
def client(cluster: LocalCluster) -> openai.OpenAI:
    return openai.OpenAI(base_url=cluster.url + "/v1", api_key="x", timeout=120, max_retries=0)


def _model(client: openai.OpenAI) -> str:
    return client.models.list().data[0].id


def test_disaggregated_chat_is_identical_to_a_single_node_run(client: openai.OpenAI) -> None:
    model = _model(client)
    split = client.chat.completions.create(model=model, messages=MESSAGES, max_tokens=24, temperature=0,
                                           extra_body={"pdcluster": {"placement": "disaggregated"}})
    single = client.chat.completions.create(model=model, messages=MESSAGES, max_tokens=24, temperature=0,
                                            extra_body={"pdcluster": {"placement": "colocated"}})
    stats = split.model_extra["pdcluster"]
    assert stats["prefill_node"] != stats["decode_node"]
    assert stats["kv_bytes"] > 0 and stats["ttft_s"] > 0
    assert single.model_extra["pdcluster"]["prefill_node"] == single.model_extra["pdcluster"]["decode_node"]
    assert split.choices[0].message.content == single.choices[0].message.content
    assert split.usage.completion_tokens == 24


def test_streamed_completion_matches_the_non_streamed_one(client: openai.OpenAI) -> None:
    model = _model(client)
    whole = client.completions.create(model=model, prompt="Once upon a time", max_tokens=16, temperature=0)
    chunks = list(client.completions.create(model=model, prompt="Once upon a time", max_tokens=16, temperature=0,
                                            stream=True, stream_options={"include_usage": True}))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == whole.choices[0].text
    final = chunks[-1].model_extra["pdcluster"]
    assert final["prefill_node"] != final["decode_node"]
    assert chunks[-1].usage.completion_tokens == 16


def test_default_placement_is_disaggregated_with_two_nodes(client: openai.OpenAI) -> None:
    reply = client.chat.completions.create(model=_model(client), messages=MESSAGES, max_tokens=4, temperature=0)
    stats = reply.model_extra["pdcluster"]
    assert stats["prefill_node"].startswith("local-prefill") and stats["decode_node"].startswith("local-decode")


def test_unknown_model_is_404_in_openai_shape(client: openai.OpenAI) -> None:
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="no-such-model", messages=MESSAGES)


def test_client_disconnect_frees_kv_on_both_workers(client: openai.OpenAI, cluster: LocalCluster) -> None:
    stream = client.chat.completions.create(model=_model(client), messages=MESSAGES, max_tokens=4000,
                                            temperature=0, stream=True)
    for chunk in stream:
        if chunk.choices and chunk.choices[0].delta.content:
            break
    stream.close()
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        stats = asyncio.run(_worker_stats(cluster))
        if all(s.active_requests == 0 and s.active_leases == 0 for s in stats):
            break
        time.sleep(0.25)
    assert all(s.active_requests == 0 and s.active_leases == 0 for s in stats), stats
    assert any(s.requests_cancelled >= 1 for s in stats)


def test_ollama_anthropic_and_responses_clients_hold_a_two_turn_chat_streamed_and_not(
    client: openai.OpenAI, cluster: LocalCluster
) -> None:
    """Greedy, so each turn's streamed text is its non-streamed text, and every dialect's first
    answer is the chat route's: one chat template, one tokenizer, the same tokens."""
    model = _model(client)
    ollama_client = ollama.Client(host=cluster.url, timeout=120)
    claude = anthropic.Anthropic(base_url=cluster.url, api_key="x", timeout=120, max_retries=0)

    def ask_ollama(history: list[dict]) -> tuple[str, str, int]:
        args = {"model": model, "messages": history, "options": {"temperature": 0, "num_predict": 8}}
        whole = ollama_client.chat(**args)
        streamed = "".join(p.message.content for p in ollama_client.chat(**args, stream=True))
        return whole.message.content, streamed, whole.prompt_eval_count

    def ask_anthropic(history: list[dict]) -> tuple[str, str, int]:
        args = {"model": model, "messages": history, "max_tokens": 8, "extra_body": {"temperature": 0}}
        whole = claude.messages.create(**args)
        with claude.messages.stream(**args) as stream:
            streamed = "".join(stream.text_stream)
        return whole.content[0].text, streamed, whole.usage.input_tokens + whole.usage.cache_read_input_tokens

    def ask_responses(history: list[dict]) -> tuple[str, str, int]:
        args = {"model": model, "input": history, "max_output_tokens": 8, "temperature": 0}
        whole = client.responses.create(**args)
        streamed = "".join(e.delta for e in client.responses.create(**args, stream=True)
                           if e.type == "response.output_text.delta")
        return whole.output_text, streamed, whole.usage.input_tokens

    question = [{"role": "user", "content": "Tell me about prefill."}]
    chat = client.chat.completions.create(model=model, messages=question, max_tokens=8, temperature=0)
    assert chat.choices[0].message.content
    for ask in (ask_ollama, ask_anthropic, ask_responses):
        first, first_streamed, first_prompt = ask(question)
        assert first == first_streamed == chat.choices[0].message.content, ask.__name__
        history = [*question, {"role": "assistant", "content": first}, {"role": "user", "content": "And decode?"}]
        second, second_streamed, second_prompt = ask(history)
        assert second and second == second_streamed, ask.__name__
        assert first_prompt == chat.usage.prompt_tokens < second_prompt, ask.__name__


async def _worker_stats(cluster: LocalCluster) -> list:
    import json

    from cluster.auth import load_cluster_key
    from workers.rpc.client import WorkerClient

    with urllib.request.urlopen(cluster.url + "/health", timeout=5) as resp:
        nodes = json.loads(resp.read())["nodes"]
    key = load_cluster_key(cluster.key_file)
    out = []
    for node in nodes:
        async with WorkerClient(node["address"], key) as worker:
            out.append(await worker.stats(timeout=5))
    return out


def _children(pid: int) -> set[int]:
    kids = set()
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[1]) == pid:
                kids.add(int(entry.name))
    return kids


@pytest.mark.skipif(sys.platform != "linux", reason="reads /proc to find child processes")
def test_pdc_up_stops_cleanly_on_sigterm_leaving_no_orphans(make_tiny_model, tmp_path: Path) -> None:
    port = free_port()
    up = subprocess.Popen(
        [sys.executable, "-m", "cluster.cli", "up", "--model", str(make_tiny_model("llama")), "--port", str(port),
         "--decode-engine", "torch", "--log-dir", str(tmp_path)],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    try:
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as resp:
                    if resp.status == 200:
                        break
            except OSError:
                pass
            assert up.poll() is None, up.stdout.read()
            time.sleep(0.5)
        children = _children(up.pid)
        assert len(children) == 3
        up.send_signal(signal.SIGTERM)
        assert up.wait(60) == 0  # launcher grace is 10 s per stage; generous for a loaded machine
        time.sleep(0.5)
        alive = [pid for pid in children if Path(f"/proc/{pid}").exists()]
        assert alive == [], f"orphans left: {alive}"
    finally:
        if up.poll() is None:
            up.kill()
