"""The OpenAI-compatible API, driven by the official ``openai`` client against a fake backend."""
from __future__ import annotations

import dataclasses
import json
import re
import threading
import urllib.error
import urllib.request
from pathlib import Path

import openai
import pytest
from aiohttp import web
from conftest import MODEL, REPLY_TEXT, FakeBackend, ServerThread

from scheduler.api import build_app
from scheduler.request import (
    CapacityExhaustedError,
    NoCapacityError,
    RequestFailedError,
    RequestStats,
    WorkerTimeoutError,
)
from scheduler.tokenizer import PromptCodec


@pytest.fixture()
def client(server: ServerThread) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", timeout=20, max_retries=0)


def test_chat_completion_returns_text_usage_and_pdcluster_object(client: openai.OpenAI, backend: FakeBackend) -> None:
    reply = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}], max_tokens=100)
    assert reply.choices[0].message.content == REPLY_TEXT
    assert reply.choices[0].finish_reason == "stop"
    assert reply.usage.prompt_tokens == len(backend.requests[0].prompt_token_ids)
    extra = reply.model_extra["pdcluster"]
    assert extra["prefill_node"] == "p0" and extra["decode_node"] == "d0" and extra["kv_bytes"] == 1234
    prompt_text = backend.codec.decode(list(backend.requests[0].prompt_token_ids))
    assert "hi" in prompt_text and "assistant" in prompt_text  # the chat template was applied


def test_streamed_chat_reassembles_the_text_and_ends_with_usage(client: openai.OpenAI) -> None:
    stream = client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "hi"}], max_tokens=100, stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == REPLY_TEXT
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "stop"
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens > 0
    assert chunks[-1].model_extra["pdcluster"]["decode_node"] == "d0"


def test_text_completion_honours_max_tokens(client: openai.OpenAI) -> None:
    reply = client.completions.create(model=MODEL, prompt="Once upon a time", max_tokens=3)
    assert reply.choices[0].finish_reason == "length"
    assert reply.usage.completion_tokens == 3
    assert REPLY_TEXT.startswith(reply.choices[0].text)


def test_stop_string_truncates_and_cancels(client: openai.OpenAI, backend: FakeBackend) -> None:
    reply = client.completions.create(model=MODEL, prompt="x", max_tokens=100, stop=["fox"])
    assert reply.choices[0].text == "The quick brown "
    assert reply.choices[0].finish_reason == "stop"
    assert backend.closed_early == 1


def test_the_pdcluster_object_is_the_request_record(client: openai.OpenAI) -> None:
    # The same record `pdc simulate --json` lists per request (scheduler/request.py).
    reply = client.completions.create(model=MODEL, prompt="x", max_tokens=3)
    extra = reply.model_extra["pdcluster"]
    assert set(extra) == {f.name for f in dataclasses.fields(RequestStats)} | {"colocated", "cached_tokens"}
    assert extra["request_id"] == reply.id and extra["colocated"] is False
    assert extra["completion_tokens"] == 3 and extra["tpot_s"] == pytest.approx(0.002)


def test_a_one_token_answer_has_no_tpot(client: openai.OpenAI) -> None:
    # TPOT is the mean time per token after the first: undefined (null) for one token.
    reply = client.completions.create(model=MODEL, prompt="x", max_tokens=1)
    extra = reply.model_extra["pdcluster"]
    assert extra["completion_tokens"] == 1 and extra["tpot_s"] is None


def test_a_stop_string_reports_an_unknown_placement_not_a_colocated_one(client: openai.OpenAI) -> None:
    # The backend's record never arrives (the request was cancelled at the stop string).
    reply = client.completions.create(model=MODEL, prompt="x", max_tokens=100, stop=["fox"])
    extra = reply.model_extra["pdcluster"]
    assert (extra["prefill_node"], extra["decode_node"], extra["colocated"]) == ("", "", False)
    assert extra["completion_tokens"] == reply.usage.completion_tokens > 0 and extra["tpot_s"] is None


def test_placement_extension_reaches_the_backend(client: openai.OpenAI, backend: FakeBackend) -> None:
    client.completions.create(model=MODEL, prompt="x", max_tokens=2, extra_body={"pdcluster": {"placement": "colocated"}})
    assert backend.requests[-1].placement == "colocated"


def test_models_lists_the_served_model(client: openai.OpenAI) -> None:
    assert [m.id for m in client.models.list()] == [MODEL]


def _raw(server: ServerThread, path: str, body: bytes | None = None) -> tuple[int, dict]:
    req = urllib.request.Request(server.url + path, data=body, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=10) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def _assert_openai_error(body: dict) -> None:
    assert set(body) == {"error"}
    assert set(body["error"]) == {"message", "type", "param", "code"} and body["error"]["message"]


@pytest.mark.parametrize(
    "body, param",
    [
        (b"{not json", None),
        (json.dumps({"model": MODEL}).encode(), "messages"),
        (json.dumps({"model": MODEL, "messages": [{"role": "user", "content": "x"}], "temperature": 7}).encode(), "temperature"),
        (json.dumps({"model": MODEL, "messages": [{"role": "user", "content": "x"}], "max_tokens": 0}).encode(), "max_tokens"),
        (json.dumps({"model": MODEL, "messages": [{"role": "user", "content": "x"}], "n": 2}).encode(), "n"),
        (json.dumps({"model": MODEL, "messages": [{"role": "user", "content": "x"}], "pdcluster": {"placement": "moon"}}).encode(), "pdcluster.placement"),
        (json.dumps({"model": MODEL, "messages": [{"role": "user", "content": "x " * 600}]}).encode(), "messages"),
    ],
    ids=["malformed-json", "no-messages", "bad-temperature", "bad-max-tokens", "n-2", "bad-placement", "too-long"],
)
def test_bad_requests_get_400_in_openai_shape(server: ServerThread, body: bytes, param: str | None) -> None:
    status, reply = _raw(server, "/v1/chat/completions", body)
    assert status == 400
    _assert_openai_error(reply)
    assert reply["error"]["param"] == param


def test_prompt_beyond_context_says_context_length_exceeded(client: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as err:
        client.completions.create(model=MODEL, prompt="word " * 600, max_tokens=10)
    assert err.value.code == "context_length_exceeded"


def test_unknown_model_is_404(client: openai.OpenAI) -> None:
    with pytest.raises(openai.NotFoundError) as err:
        client.chat.completions.create(model="nope", messages=[{"role": "user", "content": "x"}])
    assert err.value.code == "model_not_found"


def test_no_capacity_is_503(codec: PromptCodec) -> None:
    srv = ServerThread(build_app(FakeBackend(codec, ready=False, capacity=False)))
    try:
        client = openai.OpenAI(base_url=srv.url + "/v1", api_key="unused", timeout=10, max_retries=0)
        with pytest.raises(openai.InternalServerError) as err:
            client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "x"}])
        assert err.value.status_code == 503
        status, body = _raw(srv, "/health")
        assert status == 503 and body["status"] == "unavailable"
    finally:
        srv.stop()


def test_health_is_200_with_nodes_when_ready(server: ServerThread) -> None:
    status, body = _raw(server, "/health")
    assert status == 200 and len(body["nodes"]) == 2


def test_client_disconnect_mid_stream_cancels_the_request(client: openai.OpenAI, backend: FakeBackend) -> None:
    backend.token_delay_s = 0.2
    stream = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "x"}], max_tokens=100, stream=True)
    next(iter(stream))
    stream.close()
    for _ in range(50):  # bounded wait: up to 5 s
        if backend.closed_early:
            break
        threading.Event().wait(0.1)
    assert backend.closed_early == 1


@pytest.fixture()
def admin_server(codec: PromptCodec):
    from cluster.auth import generate_key
    from scheduler.service import ClusterBackend, SchedulerConfig

    key = generate_key()
    scheduler = ClusterBackend(SchedulerConfig(mdns=False, policy="fastest-pair"), key)
    srv = ServerThread(build_app(FakeBackend(codec), admin=scheduler.admin))
    yield srv, key, scheduler
    srv.stop()


def _admin_call(srv: ServerThread, method: str, token: str | None, body: dict | None = None) -> tuple[int, dict]:
    headers = {"Content-Type": "application/json", **({"X-PDC-Auth": token} if token else {})}
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(srv.url + "/admin/policy", data=data, method=method, headers=headers)
    try:
        with urllib.request.urlopen(req, timeout=10) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def test_admin_policy_refuses_unsigned_and_wrongly_signed_calls(admin_server) -> None:
    from cluster.auth import generate_key, sign_call

    srv, _, _ = admin_server
    status, body = _admin_call(srv, "GET", None)
    assert status == 401 and body["error"]["type"] == "authentication_error"
    status, _ = _admin_call(srv, "GET", sign_call(generate_key(), "GET /admin/policy"))
    assert status == 401


def test_admin_policy_switches_the_live_policy_and_refuses_replays(admin_server) -> None:
    from cluster.auth import sign_call
    from scheduler.policy import LeastLoaded

    srv, key, scheduler = admin_server
    status, body = _admin_call(srv, "GET", sign_call(key, "GET /admin/policy"))
    assert status == 200 and body["policy"] == "fastest-pair" and "conditional" in body["builtin"]
    token = sign_call(key, "PUT /admin/policy")
    status, body = _admin_call(srv, "PUT", token, {"policy": "least-loaded"})
    assert status == 200 and body["policy"] == "least-loaded"
    assert isinstance(scheduler.dispatcher.policy, LeastLoaded)
    status, _ = _admin_call(srv, "PUT", token, {"policy": "round-robin"})  # same token again
    assert status == 401
    status, body = _admin_call(srv, "PUT", sign_call(key, "PUT /admin/policy"), {"policy": "nope"})
    assert status == 400 and "unknown policy" in body["error"]["message"]
    assert isinstance(scheduler.dispatcher.policy, LeastLoaded)  # a bad spec changes nothing


@pytest.mark.parametrize("text, reason", [
    ("def broken(:\n    pass\n", r"line 1: SyntaxError: "),
    ("class Rule:\n    def __init__(self, gain):\n        pass\n", r"Rule\(\) failed: TypeError: .*'gain'"),
    ("raise RuntimeError('no GPU here')\n", r"line 1: RuntimeError: no GPU here"),
])
def test_admin_policy_refuses_a_broken_plugin_with_400_and_keeps_the_policy(
        admin_server, tmp_path: Path, text: str, reason: str) -> None:
    from cluster.auth import sign_call
    from scheduler.policy import FastestPair

    srv, key, scheduler = admin_server
    plugin = tmp_path / "broken_rule.py"
    plugin.write_text(text)
    spec = f"{plugin}:Rule"
    status, body = _admin_call(srv, "PUT", sign_call(key, "PUT /admin/policy"), {"policy": spec})
    assert status == 400 and body["error"]["type"] == "invalid_request_error" and body["error"]["param"] == "policy"
    assert body["error"]["message"].startswith(f"policy {spec!r}: ")
    assert re.search(reason, body["error"]["message"]), body["error"]["message"]
    assert isinstance(scheduler.dispatcher.policy, FastestPair) and scheduler.admin.current_policy() == "fastest-pair"


def test_admin_policy_answers_400_not_500_whatever_the_switch_raises(
        admin_server, monkeypatch: pytest.MonkeyPatch) -> None:
    from cluster.auth import sign_call

    srv, key, scheduler = admin_server

    def explode(spec: str) -> str:
        raise RuntimeError("disk on fire")

    monkeypatch.setattr(scheduler.admin, "switch_policy", explode)
    status, body = _admin_call(srv, "PUT", sign_call(key, "PUT /admin/policy"), {"policy": "x.py:Rule"})
    assert status == 400
    assert body["error"]["message"] == "policy 'x.py:Rule': RuntimeError: disk on fire"


def _pdc_policy(url: str, key, tmp_path: Path, *extra: str) -> int:
    from cluster.auth import write_config
    from cluster.cli import main as pdc_main

    key_file = write_config(tmp_path / "cluster.json", key, force=True)
    return pdc_main(["policy", "--url", url, "--cluster-key-file", str(key_file), *extra])


def test_pdc_policy_set_prints_the_servers_reason_and_exits_2(
        admin_server, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    srv, key, _ = admin_server
    plugin = tmp_path / "broken_rule.py"
    plugin.write_text("import os\nraise RuntimeError('no GPU here')\n")
    spec = f"{plugin}:Rule"
    assert _pdc_policy(srv.url, key, tmp_path, "--set", spec) == 2
    err = capsys.readouterr().err
    assert err == f"pdc: error: policy {spec!r}: {plugin} line 2: RuntimeError: no GPU here\n"
    assert _pdc_policy(srv.url, key, tmp_path, "--set", "nope") == 2
    assert capsys.readouterr().err.startswith("pdc: error: unknown policy 'nope'")
    assert _pdc_policy(srv.url, key, tmp_path, "--set", "least-loaded") == 0
    assert capsys.readouterr().out == "policy: least-loaded\n"


def test_pdc_policy_reports_a_non_json_error_by_status_and_first_line(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from cluster.auth import generate_key

    async def crash(request: web.Request) -> web.Response:
        return web.Response(status=500, text="500: Internal Server Error\n\nServer got itself in trouble")

    app = web.Application()
    app.router.add_put("/admin/policy", crash)
    srv = ServerThread(app)
    try:
        assert _pdc_policy(srv.url, generate_key(), tmp_path, "--set", "least-loaded") == 2
    finally:
        srv.stop()
    assert capsys.readouterr().err == "pdc: error: HTTP 500 Internal Server Error: 500: Internal Server Error\n"


def test_pdc_policy_against_nothing_says_it_cannot_reach_the_scheduler(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    import socket

    from cluster.auth import generate_key

    with socket.socket() as sock:  # a port nobody listens on once closed
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    assert _pdc_policy(f"http://127.0.0.1:{port}", generate_key(), tmp_path) == 2
    assert capsys.readouterr().err.startswith(f"pdc: error: cannot reach the scheduler at http://127.0.0.1:{port}: ")


# ---------------------------------------------------------------- failures are never silent


def _raw_stream(server: ServerThread, body: dict) -> tuple[int, dict, list[str]]:
    """POST a streamed chat; (status, headers, the SSE ``data:`` payloads in order). Bounded by 10 s."""
    request = urllib.request.Request(server.url + "/v1/chat/completions", data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"}, method="POST")
    try:
        with urllib.request.urlopen(request, timeout=10) as reply:
            text = reply.read().decode()
            return reply.status, dict(reply.headers), [line[6:] for line in text.splitlines()
                                                       if line.startswith("data: ")]
    except urllib.error.HTTPError as e:
        return e.code, dict(e.headers), [e.read().decode()]


STREAMED = {"model": MODEL, "messages": [{"role": "user", "content": "x"}], "max_tokens": 100, "stream": True}


def test_a_failure_mid_stream_ends_with_an_error_event_the_sdk_raises(
    client: openai.OpenAI, backend: FakeBackend
) -> None:
    backend.fail_with = RequestFailedError("decode on d0 failed: the node is unreachable or went away", node="d0")
    backend.fail_after = 3
    stream = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "x"}],
                                            max_tokens=100, stream=True)
    received = ""
    with pytest.raises(openai.APIError) as err:
        for chunk in stream:
            received += chunk.choices[0].delta.content or "" if chunk.choices else ""
    assert "decode on d0 failed" in err.value.message and "unreachable" in err.value.message
    assert err.value.body["code"] == "worker_failed"
    assert received and REPLY_TEXT.startswith(received) and received != REPLY_TEXT


def test_the_error_event_is_the_last_event_and_no_done_follows(server: ServerThread, backend: FakeBackend) -> None:
    backend.fail_with, backend.fail_after = WorkerTimeoutError("decode on d0 failed: the node did not answer in time",
                                                               node="d0"), 2
    status, _, events = _raw_stream(server, STREAMED)
    assert status == 200 and "[DONE]" not in events
    last = json.loads(events[-1])
    _assert_openai_error(last)
    assert last["error"]["code"] == "worker_timeout" and "d0" in last["error"]["message"]


def test_an_unexpected_backend_bug_mid_stream_is_not_silent_either(server: ServerThread, backend: FakeBackend) -> None:
    backend.fail_with, backend.fail_after = RuntimeError("boom"), 2  # RuntimeError once read as "client went away"
    status, _, events = _raw_stream(server, STREAMED)
    assert status == 200 and "[DONE]" not in events
    assert json.loads(events[-1])["error"]["code"] == "internal_error"


@pytest.mark.parametrize(("error", "status", "code"), [
    (CapacityExhaustedError("decode on d0 failed: the node is full: all 4 leases are in use", node="d0"), 429,
     "capacity_exhausted"),
    (NoCapacityError("no decode-capable node serves model 'tiny'"), 503, "no_capacity"),
    (RequestFailedError("prefill on p0 failed: the node is unreachable or went away", node="p0"), 502,
     "worker_failed"),
    (WorkerTimeoutError("decode on d0 failed: the node did not answer in time", node="d0"), 504, "worker_timeout"),
])
def test_a_failure_before_the_first_byte_gets_its_own_status(
    server: ServerThread, backend: FakeBackend, error: Exception, status: int, code: str
) -> None:
    backend.fail_with, backend.fail_after = error, 0
    for body in (STREAMED, {**STREAMED, "stream": False}):
        got, headers, payload = _raw_stream(server, body)
        assert got == status
        error_body = json.loads(payload[0])
        _assert_openai_error(error_body)
        assert error_body["error"]["code"] == code and error_body["error"]["message"] == str(error)
        assert ("Retry-After" in headers) == (status == 429)
        if status == 429:
            assert int(headers["Retry-After"]) >= 1


def test_the_openai_client_sees_429_as_a_rate_limit_error(client: openai.OpenAI, backend: FakeBackend) -> None:
    backend.fail_with = CapacityExhaustedError("decode on d0 failed: the node is full", node="d0")
    with pytest.raises(openai.RateLimitError) as err:
        client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "x"}], max_tokens=5)
    assert err.value.code == "capacity_exhausted" and err.value.response.headers["retry-after"]
