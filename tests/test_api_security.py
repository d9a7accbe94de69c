"""API security: the bearer key (official openai client), CORS (raw HTTP), the exposure warning, the CLI flags."""
from __future__ import annotations

import json
import urllib.error
import urllib.request

import openai
import pytest
from conftest import MODEL, REPLY_TEXT, FakeBackend, ServerThread

from scheduler.api import build_app
from scheduler.service import SchedulerConfig, exposure_warning, is_loopback
from scheduler.tokenizer import PromptCodec

KEY = "sk-test-0123456789"
CHAT = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 100}


@pytest.fixture()
def keyed(codec: PromptCodec):
    srv = ServerThread(build_app(FakeBackend(codec), api_key=KEY, allowed_origins=("https://app.example",)))
    yield srv
    srv.stop()


def _http(srv: ServerThread, method: str, path: str, headers: dict[str, str] | None = None,
          body: dict | None = None) -> tuple[int, dict[str, str], bytes]:
    """One raw HTTP call (bounded by 10 s): (status, headers, body)."""
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(srv.url + path, data=data, method=method,
                                     headers={"Content-Type": "application/json", **(headers or {})})
    try:
        with urllib.request.urlopen(request, timeout=10) as reply:
            return reply.status, dict(reply.headers), reply.read()
    except urllib.error.HTTPError as e:
        return e.code, dict(e.headers), e.read()


def test_the_right_key_is_served(keyed: ServerThread) -> None:
    client = openai.OpenAI(base_url=keyed.url + "/v1", api_key=KEY, timeout=10, max_retries=0)
    assert client.chat.completions.create(**CHAT).choices[0].message.content == REPLY_TEXT
    assert [m.id for m in client.models.list()] == [MODEL]
    text = "".join(c.choices[0].delta.content or "" for c in client.chat.completions.create(**CHAT, stream=True)
                   if c.choices)
    assert text == REPLY_TEXT


@pytest.mark.parametrize("key", ["wrong", KEY + "x", KEY[:-1]])
def test_a_wrong_key_is_401_in_openais_shape(keyed: ServerThread, key: str) -> None:
    client = openai.OpenAI(base_url=keyed.url + "/v1", api_key=key, timeout=10, max_retries=0)
    with pytest.raises(openai.AuthenticationError) as err:
        client.chat.completions.create(**CHAT)
    assert err.value.status_code == 401 and err.value.code == "invalid_api_key"
    with pytest.raises(openai.AuthenticationError):
        client.models.list()


def test_a_missing_key_is_401_and_health_stays_open_without_details(keyed: ServerThread) -> None:
    status, headers, body = _http(keyed, "POST", "/v1/chat/completions", body=CHAT)
    error = json.loads(body)["error"]
    assert status == 401 and error["code"] == "invalid_api_key" and error["type"] == "invalid_request_error"
    assert set(error) == {"message", "type", "param", "code"} and headers["WWW-Authenticate"] == "Bearer"
    status, _, body = _http(keyed, "GET", "/health")
    assert status == 200 and json.loads(body) == {"status": "ok"}  # no node names or addresses
    status, _, body = _http(keyed, "GET", "/health", {"Authorization": f"Bearer {KEY}"})
    assert status == 200 and len(json.loads(body)["nodes"]) == 2


def test_without_a_key_the_api_is_open(codec: PromptCodec) -> None:
    srv = ServerThread(build_app(FakeBackend(codec)))
    try:
        client = openai.OpenAI(base_url=srv.url + "/v1", api_key="anything", timeout=10, max_retries=0)
        assert client.chat.completions.create(**CHAT).choices[0].message.content == REPLY_TEXT
        status, headers, _ = _http(srv, "OPTIONS", "/v1/chat/completions",
                                   {"Origin": "https://app.example", "Access-Control-Request-Method": "POST"})
        assert status >= 400 and "Access-Control-Allow-Origin" not in headers  # CORS off by default
        status, headers, _ = _http(srv, "GET", "/v1/models", {"Origin": "https://app.example"})
        assert status == 200 and "Access-Control-Allow-Origin" not in headers
    finally:
        srv.stop()


def test_cors_preflight_is_answered_for_a_listed_origin_only(keyed: ServerThread) -> None:
    preflight = {"Origin": "https://app.example", "Access-Control-Request-Method": "POST",
                 "Access-Control-Request-Headers": "authorization, content-type"}
    status, headers, _ = _http(keyed, "OPTIONS", "/v1/chat/completions", preflight)  # no key: preflight has none
    assert status == 204 and headers["Access-Control-Allow-Origin"] == "https://app.example"
    assert "POST" in headers["Access-Control-Allow-Methods"]
    assert headers["Access-Control-Allow-Headers"] == "authorization, content-type"
    status, headers, _ = _http(keyed, "OPTIONS", "/v1/chat/completions", {**preflight, "Origin": "https://evil.example"})
    assert status == 403 and "Access-Control-Allow-Origin" not in headers


def test_cors_headers_go_to_listed_origins_on_answers_streams_and_errors(keyed: ServerThread) -> None:
    auth = {"Authorization": f"Bearer {KEY}"}
    status, headers, _ = _http(keyed, "POST", "/v1/chat/completions", {**auth, "Origin": "https://app.example"}, CHAT)
    assert status == 200 and headers["Access-Control-Allow-Origin"] == "https://app.example"
    assert headers["Vary"] == "Origin"
    status, headers, body = _http(keyed, "POST", "/v1/chat/completions", {**auth, "Origin": "https://app.example"},
                                  {**CHAT, "stream": True})
    assert status == 200 and headers["Access-Control-Allow-Origin"] == "https://app.example"
    assert body.rstrip().endswith(b"data: [DONE]")
    status, headers, _ = _http(keyed, "POST", "/v1/chat/completions", {"Origin": "https://app.example"}, CHAT)
    assert status == 401 and headers["Access-Control-Allow-Origin"] == "https://app.example"  # the page can read why
    status, headers, _ = _http(keyed, "POST", "/v1/chat/completions", {**auth, "Origin": "https://evil.example"}, CHAT)
    assert status == 200 and "Access-Control-Allow-Origin" not in headers


def test_a_wildcard_origin_admits_any_page(codec: PromptCodec) -> None:
    srv = ServerThread(build_app(FakeBackend(codec), allowed_origins=("*",)))
    try:
        status, headers, _ = _http(srv, "GET", "/v1/models", {"Origin": "http://localhost:3000"})
        assert status == 200 and headers["Access-Control-Allow-Origin"] == "http://localhost:3000"
    finally:
        srv.stop()


@pytest.mark.parametrize(("host", "key", "warns"), [
    ("127.0.0.1", None, False), ("localhost", None, False), ("::1", None, False),
    ("0.0.0.0", None, True), ("192.168.1.20", None, True), ("", None, True), ("nas.local", None, True),
    ("0.0.0.0", KEY, False),
])
def test_serving_beyond_loopback_without_a_key_warns(host: str, key: str | None, warns: bool) -> None:
    warning = exposure_warning(SchedulerConfig(host=host, api_key=key))
    assert (warning is not None) == warns
    if warns:
        assert "without an API key" in warning and "--api-key" in warning
    assert is_loopback(host) == (host in ("127.0.0.1", "localhost", "::1"))


def test_the_key_never_shows_in_the_configs_repr() -> None:
    assert KEY not in repr(SchedulerConfig(api_key=KEY))


def test_pdc_serve_flags_reach_the_config(monkeypatch: pytest.MonkeyPatch) -> None:
    import cluster.cli as cli
    import scheduler.service as service

    seen: list[SchedulerConfig] = []

    async def fake_serve(config: SchedulerConfig, key: object) -> None:
        seen.append(config)

    monkeypatch.setattr(service, "serve", fake_serve)
    monkeypatch.setattr("cluster.auth.load_cluster_key", lambda path: None)
    monkeypatch.setenv("PDC_API_KEY", "from-env")
    parser = cli.build_parser()
    for argv, key, origins, lease in [
        (["serve"], "from-env", (), 0.0),
        (["serve", "--api-key", "flag", "--allowed-origins", "https://a.example, https://b.example",
          "--lease-s", "7"], "flag", ("https://a.example", "https://b.example"), 7.0),
    ]:
        args = parser.parse_args(argv)
        assert args.run(args) == 0
        assert (seen[-1].api_key, seen[-1].allowed_origins, seen[-1].lifecycle.lease_s) == (key, origins, lease)
    monkeypatch.delenv("PDC_API_KEY")
    args = parser.parse_args(["serve"])
    args.run(args)
    assert seen[-1].api_key is None
