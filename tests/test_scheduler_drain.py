"""The scheduler's drain: SIGTERM (or SIGINT) lets the answers in flight finish and refuses new ones.

First against the HTTP API over a fake backend (every dialect's 503 with
``Retry-After``, ``/health``, a stream cut at the drain timeout), then with a
real ``pdc serve`` process over real workers (a torch prefill and an MLX
decode node, in-process): SIGTERM mid-stream, a second signal, the timeout.
"""
from __future__ import annotations

import asyncio
import json
import logging
import signal
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import openai
import pytest
from conftest import (
    MODEL,
    FakeBackend,
    SchedulerProcess,
    ServerThread,
    WorkersThread,
    config,
    have,
)

from cluster.auth import generate_key, write_config
from cluster.cli import main
from scheduler.api import build_app
from scheduler.drain import Drain
from scheduler.request_log import RequestLog
from scheduler.tokenizer import PromptCodec

ASK = [{"role": "user", "content": "Tell me about memory bandwidth."}]


def _raw(url: str, path: str, body: dict | None = None) -> tuple[int, dict, dict]:
    """(status, JSON body, headers) of a GET (or a POST of ``body``)."""
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(url + path, data=data, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=10) as reply:
            return reply.status, json.loads(reply.read()), dict(reply.headers)
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read() or b"{}"), dict(e.headers)


@pytest.fixture()
def draining(codec: PromptCodec) -> Iterator[tuple[ServerThread, Drain, RequestLog, FakeBackend]]:
    """The HTTP API over a fake backend, with a drain (30 s timeout) not yet begun."""
    requests, backend = RequestLog(), FakeBackend(codec)
    drain = Drain(requests, timeout_s=30.0)
    srv = ServerThread(build_app(backend, request_log=requests, drain=drain))
    yield srv, drain, requests, backend
    srv.stop()


# ---------------------------------------------------------------- the API while draining (fake backend)


def test_every_dialect_refuses_new_requests_with_503_and_retry_after_in_its_own_shape(draining) -> None:
    srv, drain, requests, _ = draining
    chat = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}
    assert _raw(srv.url, "/v1/chat/completions", chat)[0] == 200  # before the drain
    drain.begin()
    openai_shape = _raw(srv.url, "/v1/chat/completions", chat)
    completions = _raw(srv.url, "/v1/completions", {"model": MODEL, "prompt": "hi", "max_tokens": 4})
    responses = _raw(srv.url, "/v1/responses", {"model": MODEL, "input": "hi", "max_output_tokens": 4})
    anthropic = _raw(srv.url, "/v1/messages", {**chat, "max_tokens": 4})
    ollama = _raw(srv.url, "/api/chat", {"model": MODEL, "messages": chat["messages"]})
    models = _raw(srv.url, "/v1/models")
    for status, _, headers in (openai_shape, completions, responses, anthropic, ollama, models):
        assert status == 503 and 1 <= int(headers["Retry-After"]) <= 30
    for status, body, _ in (openai_shape, completions, responses, models):
        assert body["error"]["code"] == "draining"  # OpenAI's shape
    assert anthropic[1]["type"] == "error" and anthropic[1]["error"]["type"] == "overloaded_error"
    assert "shutting down" in ollama[1]["error"]  # Ollama's {"error": "..."}
    refused = [r for r in requests.recent(10) if r.outcome == "draining"]
    assert [r.route for r in refused] == ["/v1/chat/completions", "/v1/completions", "/v1/responses",
                                          "/v1/messages", "/api/chat"]  # one record per refused request
    assert all(r.status == 503 for r in refused)


def test_health_says_draining_with_503_and_the_admin_api_still_answers(draining) -> None:
    srv, drain, _, _ = draining
    assert _raw(srv.url, "/health")[:2][0] == 200
    drain.begin()
    status, body, _ = _raw(srv.url, "/health")
    assert status == 503 and body["status"] == "draining" and body["requests_in_flight"] == 0
    assert _raw(srv.url, "/admin/requests")[0] == 404  # no admin here: not refused as draining


def test_the_drain_timeout_cuts_a_stream_with_an_error_event_and_its_record_says_so(draining) -> None:
    srv, drain, requests, backend = draining
    drain.timeout_s = 0.3
    backend.token_delay_s = 0.3  # about 3 s for the whole reply
    client = openai.OpenAI(base_url=srv.url + "/v1", api_key="unused", timeout=20, max_retries=0)
    stream = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "x"}],
                                            max_tokens=100, stream=True)
    next(iter(stream))
    assert requests.num_open == 1
    ended = asyncio.run_coroutine_threadsafe(drain.run(asyncio.Event()), srv.loop)
    with pytest.raises(openai.APIError) as err:
        for _ in stream:
            pass
    assert "shut down" in err.value.message
    assert ended.result(10) == "timed_out" and requests.num_open == 0
    [record] = requests.recent(1)
    assert (record.outcome, record.status, record.stream) == ("draining", 503, True)
    for _ in range(50):  # bounded: the backend's generator is closed as the cut unwinds
        if backend.closed_early:
            break
        time.sleep(0.1)
    assert backend.closed_early == 1


def test_pdc_serve_refuses_a_negative_drain_timeout_and_an_empty_request_log(capsys) -> None:
    level = logging.getLogger().level  # pdc serve sets the root logger's level
    try:
        assert main(["serve", "--no-mdns", "--drain-timeout", "-1"]) == 2
        assert "drain_timeout_s must be a finite number >= 0" in capsys.readouterr().err
        assert main(["serve", "--no-mdns", "--request-log-size", "0"]) == 2
        assert "request_log_size must be >= 1" in capsys.readouterr().err
    finally:
        logging.getLogger().setLevel(level)


# ---------------------------------------------------------------- a real pdc serve over real workers


@pytest.fixture(scope="module")
def workers(model: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Path, list[str]]]:
    """(cluster key file, gRPC addresses) of a torch prefill node and an MLX decode node."""
    if not (have("torch") and have("mlx.core")):
        pytest.skip("needs the torch and mlx extras (prefill and decode engines)")
    key = generate_key()
    key_file = write_config(tmp_path_factory.mktemp("drain") / "cluster.json", key)
    running = WorkersThread(config(model, key, "prefill", engine="torch"), config(model, key, "decode"))
    yield key_file, running.addresses
    running.stop()


def _serve(workers: tuple[Path, list[str]], tmp_path: Path, *flags: str) -> tuple[SchedulerProcess, openai.OpenAI]:
    key_file, addresses = workers
    scheduler = SchedulerProcess(key_file, addresses, tmp_path / "scheduler.log", None, *flags)
    scheduler.wait_ready(2)
    return scheduler, openai.OpenAI(base_url=scheduler.url + "/v1", api_key="unused", timeout=60, max_retries=0)


def _stream(client: openai.OpenAI, max_tokens: int) -> openai.Stream:
    model = client.models.list().data[0].id
    return client.chat.completions.create(model=model, messages=ASK, max_tokens=max_tokens, temperature=0,
                                          stream=True, stream_options={"include_usage": True},
                                          extra_body={"ignore_eos": True})


def _until_draining(scheduler: SchedulerProcess, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while _raw(scheduler.url, "/health")[1].get("status") != "draining":  # a 503 while draining
        assert time.monotonic() < deadline, "the scheduler never said it was draining"
        time.sleep(0.05)


def _exit_code(scheduler: SchedulerProcess, timeout: float) -> int:
    try:
        return scheduler.proc.wait(timeout)
    except subprocess.TimeoutExpired:
        scheduler.kill()
        raise AssertionError(f"pdc serve did not exit within {timeout} s:\n{scheduler.log.read_text()[-3000:]}")


def test_sigterm_mid_stream_finishes_the_stream_refuses_new_requests_and_exits_0(workers, tmp_path: Path) -> None:
    scheduler, client = _serve(workers, tmp_path)
    try:
        chunks = iter(_stream(client, max_tokens=500))
        next(chunks)
        scheduler.proc.send_signal(signal.SIGTERM)
        _until_draining(scheduler)
        with pytest.raises(openai.APIStatusError) as refused:
            client.chat.completions.create(model="any", messages=ASK, max_tokens=4)
        usage = [c.usage for c in chunks if c.usage is not None]
        rc = _exit_code(scheduler, 20)
    finally:
        scheduler.stop()
    assert refused.value.status_code == 503 and refused.value.code == "draining"
    assert 1 <= int(refused.value.response.headers["retry-after"]) <= 30
    assert usage and usage[-1].completion_tokens == 500  # the stream ran to its end
    assert rc == 0
    log = scheduler.log.read_text()
    began, streamed, drained = (log.index(text) for text in ("draining: 1 requests in flight",
                                                             "outcome=length status=200", "drained"))
    assert began < streamed < drained and "drain timed out" not in log  # it waited for the stream


def test_a_second_signal_stops_at_once(workers, tmp_path: Path) -> None:
    scheduler, client = _serve(workers, tmp_path)
    try:
        chunks = iter(_stream(client, max_tokens=4000))  # about a minute of decoding
        next(chunks)
        scheduler.proc.send_signal(signal.SIGTERM)
        _until_draining(scheduler)
        scheduler.proc.send_signal(signal.SIGINT)
        began = time.monotonic()
        rc = _exit_code(scheduler, 10)
        took = time.monotonic() - began
        with pytest.raises((openai.APIError, openai.APIConnectionError)):
            for _ in chunks:
                pass
    finally:
        scheduler.stop()
    assert rc == 0 and took < 5
    assert "second signal: stopping now; cancelling 1 requests in flight" in scheduler.log.read_text()


def test_the_drain_timeout_cancels_a_long_stream_and_exits_0(workers, tmp_path: Path) -> None:
    scheduler, client = _serve(workers, tmp_path, "--drain-timeout", "1")
    try:
        chunks = iter(_stream(client, max_tokens=4000))
        next(chunks)
        scheduler.proc.send_signal(signal.SIGTERM)
        began = time.monotonic()
        with pytest.raises(openai.APIError) as cut:  # the stream's error event
            for _ in chunks:
                pass
        took = time.monotonic() - began
        rc = _exit_code(scheduler, 10)
    finally:
        scheduler.stop()
    assert "shut down before this request ended (its drain timed out)" in cut.value.message
    assert 0.9 < took < 5 and rc == 0
    log = scheduler.log.read_text()
    assert "drain timed out with 1 requests in flight" in log
    assert "outcome=draining status=503" in log  # the cut request's record
