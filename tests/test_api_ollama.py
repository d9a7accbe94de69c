"""The Ollama API (/api/chat, /api/generate, /api/tags, /api/show, /api/version), driven by the
official ``ollama`` client against a fake backend: the same requests the OpenAI routes build,
NDJSON streams, and a 400 for every field or option pdcluster does not honour."""
from __future__ import annotations

import json
import urllib.error
import urllib.request

import ollama
import openai
import pytest
from conftest import MODEL, REPLY_TEXT, FakeBackend, ServerThread

from scheduler.api import build_app
from scheduler.request import RequestFailedError
from scheduler.tokenizer import PromptCodec

CHAT = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi"}]
KEY = "sk-ollama-test"


@pytest.fixture()
def client(server: ServerThread) -> ollama.Client:
    return ollama.Client(host=server.url, timeout=20)


def test_a_chat_answers_the_text_with_the_same_prompt_and_counts_as_openais_route(
    client: ollama.Client, server: ServerThread, backend: FakeBackend
) -> None:
    reply = client.chat(model=MODEL, messages=CHAT, stream=False, options={"num_predict": 100})
    assert reply.message.role == "assistant" and reply.message.content == REPLY_TEXT
    assert reply.done and reply.done_reason == "stop"
    assert reply.prompt_eval_count == len(backend.requests[0].prompt_token_ids) and reply.eval_count > 0
    openai_reply = openai.OpenAI(base_url=server.url + "/v1", api_key="x", timeout=20, max_retries=0) \
        .chat.completions.create(model=MODEL, messages=CHAT, max_tokens=100)
    assert backend.requests[1].prompt_token_ids == backend.requests[0].prompt_token_ids  # one chat template
    assert (reply.prompt_eval_count, reply.eval_count) == (openai_reply.usage.prompt_tokens,
                                                           openai_reply.usage.completion_tokens)


def test_a_chat_streams_ndjson_parts_that_reassemble_the_text(client: ollama.Client) -> None:
    parts = list(client.chat(model=MODEL, messages=CHAT, stream=True))
    assert "".join(p.message.content for p in parts) == REPLY_TEXT
    assert [p.done for p in parts].count(True) == 1 and parts[-1].done
    assert parts[-1].done_reason == "stop" and parts[-1].eval_count == len(parts) - 1 > 1


def test_streaming_is_the_default_as_in_ollama_and_the_last_line_carries_the_record(server: ServerThread) -> None:
    status, content_type, lines = _post(server, "/api/chat", {"model": MODEL, "messages": CHAT})
    assert status == 200 and content_type.startswith("application/x-ndjson")
    last = json.loads(lines[-1])
    assert len(lines) > 2 and last["done"] is True and last["pdcluster"]["decode_node"] == "d0"  # the record


def test_generate_renders_system_and_prompt_through_the_chat_template(client: ollama.Client,
                                                                      backend: FakeBackend) -> None:
    reply = client.generate(model=MODEL, prompt="hi there", system="Be brief.", options={"num_predict": 100})
    assert reply.response == REPLY_TEXT and reply.done_reason == "stop"
    prompt = backend.codec.decode(list(backend.requests[0].prompt_token_ids))
    assert "Be brief." in prompt and "hi there" in prompt and "assistant" in prompt
    streamed = list(client.generate(model=MODEL, prompt="hi there", system="Be brief.", stream=True))
    assert "".join(p.response for p in streamed) == REPLY_TEXT and streamed[-1].done


def test_a_raw_generate_sends_the_prompt_as_it_is(client: ollama.Client, backend: FakeBackend) -> None:
    client.generate(model=MODEL, prompt="Once upon a time", raw=True, options={"num_predict": 2})
    assert list(backend.requests[0].prompt_token_ids) == backend.codec.encode("Once upon a time")


def test_options_reach_the_generation_request(client: ollama.Client, backend: FakeBackend) -> None:
    reply = client.chat(model=MODEL, messages=CHAT, options={"temperature": 0.3, "top_p": 0.5, "top_k": 7,
                                                             "seed": 11, "num_predict": 3,
                                                             "presence_penalty": 0.5, "frequency_penalty": -1})
    sent = backend.requests[0]
    assert (sent.temperature, sent.top_p, sent.top_k, sent.seed, sent.max_tokens) == (0.3, 0.5, 7, 11, 3)
    assert (sent.presence_penalty, sent.frequency_penalty) == (0.5, -1.0)
    assert reply.done_reason == "length" and reply.eval_count == 3 and REPLY_TEXT.startswith(reply.message.content)


def test_a_stop_option_cuts_the_text_and_cancels_the_request(client: ollama.Client, backend: FakeBackend) -> None:
    reply = client.chat(model=MODEL, messages=CHAT, options={"stop": ["fox"], "num_predict": 100})
    assert reply.message.content == "The quick brown " and reply.done_reason == "stop"
    assert backend.closed_early == 1
    streamed = list(client.chat(model=MODEL, messages=CHAT, options={"stop": ["fox"]}, stream=True))
    assert "".join(p.message.content for p in streamed) == "The quick brown "


@pytest.mark.parametrize(("kwargs", "named"), [
    ({"options": {"num_ctx": 4096}}, "options.num_ctx"),
    ({"options": {"repeat_penalty": 1.1}}, "options.repeat_penalty"),
    ({"options": {"mirostat": 1}}, "options.mirostat"),
    ({"options": {"num_predict": -1}}, "options.num_predict"),
    ({"options": {"temperature": 9}}, "options.temperature"),
    ({"options": {"presence_penalty": 3}}, "options.presence_penalty"),
    ({"format": {"type": "nonsense"}}, "format"),
    ({"tools": [{"type": "function", "function": {"name": "f g", "description": "d", "parameters": {}}}]},
     "tools[0].function.name"),
    ({"keep_alive": "5m"}, "keep_alive"),
    ({"think": True}, "think"),
    ({"logprobs": True}, "logprobs"),
], ids=["num_ctx", "repeat_penalty", "mirostat", "unbounded-num_predict", "bad-temperature", "bad-presence_penalty", "format", "tools",
        "keep_alive", "think", "logprobs"])
def test_what_pdcluster_does_not_honour_is_a_400_naming_it(client: ollama.Client, backend: FakeBackend,
                                                           kwargs: dict, named: str) -> None:
    with pytest.raises(ollama.ResponseError) as err:
        client.chat(model=MODEL, messages=CHAT, **kwargs)
    assert err.value.status_code == 400 and f"'{named}'" in err.value.error
    assert not backend.requests


def test_images_are_refused(server: ServerThread) -> None:
    for message in ({"role": "user", "content": "what is this?", "images": ["aGk="]},):
        status, _, lines = _post(server, "/api/chat", {"model": MODEL, "messages": [message], "stream": False})
        assert status == 400 and set(json.loads(lines[0])) == {"error"}
    status, _, lines = _post(server, "/api/generate", {"model": MODEL, "prompt": "x", "suffix": "y"})
    assert status == 400 and "'suffix'" in json.loads(lines[0])["error"]


def test_an_unknown_model_is_404_in_ollamas_shape(client: ollama.Client) -> None:
    with pytest.raises(ollama.ResponseError) as err:
        client.chat(model="nope", messages=CHAT)
    assert err.value.status_code == 404 and "nope" in err.value.error


def test_an_empty_conversation_answers_loaded_without_generating(client: ollama.Client, backend: FakeBackend) -> None:
    assert client.chat(model=MODEL, messages=[]).done_reason == "load"
    assert client.generate(model=MODEL).done_reason == "load"
    assert not backend.requests
    with pytest.raises(ollama.ResponseError) as err:
        client.generate(model="nope")
    assert err.value.status_code == 404


def test_tags_show_and_version_describe_the_served_model(client: ollama.Client, server: ServerThread,
                                                         backend: FakeBackend) -> None:
    assert [m.model for m in client.list().models] == [MODEL]
    shown = client.show(MODEL)
    assert shown.template == backend.codec.bundle.chat_template
    assert shown.modelinfo["pdcluster.context_length"] == 512 and shown.capabilities == ["completion", "tools"]  # the tiny template speaks hermes
    with pytest.raises(ollama.ResponseError) as err:
        client.ps()
    assert err.value.status_code == 404 and "/api/chat" in err.value.error
    with pytest.raises(ollama.ResponseError) as err:
        client.show("nope")
    assert err.value.status_code == 404
    status, _, lines = _post(server, "/api/version")
    assert status == 200 and json.loads(lines[0])["version"]


def test_a_failure_mid_stream_ends_with_an_error_line_the_client_raises(client: ollama.Client,
                                                                        backend: FakeBackend) -> None:
    backend.fail_with, backend.fail_after = RequestFailedError("decode on d0 failed: the node went away"), 3
    received = ""
    with pytest.raises(ollama.ResponseError) as err:
        for part in client.chat(model=MODEL, messages=CHAT, stream=True):
            received += part.message.content
    assert "decode on d0 failed" in err.value.error
    assert received and REPLY_TEXT.startswith(received) and received != REPLY_TEXT


def test_a_failure_before_the_first_token_keeps_its_status(client: ollama.Client, backend: FakeBackend) -> None:
    backend.fail_with, backend.fail_after = RequestFailedError("prefill on p0 failed: the node went away"), 0
    with pytest.raises(ollama.ResponseError) as streamed:
        list(client.chat(model=MODEL, messages=CHAT, stream=True))
    with pytest.raises(ollama.ResponseError) as whole:
        client.chat(model=MODEL, messages=CHAT)
    for err in (streamed, whole):
        assert err.value.status_code == 502 and "prefill on p0" in err.value.error


def test_with_an_api_key_the_ollama_routes_want_it(codec: PromptCodec) -> None:
    srv = ServerThread(build_app(FakeBackend(codec), api_key=KEY))
    try:
        keyed = ollama.Client(host=srv.url, timeout=20, headers={"Authorization": f"Bearer {KEY}"})
        assert keyed.chat(model=MODEL, messages=CHAT).message.content == REPLY_TEXT
        for client in (ollama.Client(host=srv.url, timeout=20),
                       ollama.Client(host=srv.url, timeout=20, headers={"Authorization": "Bearer wrong"})):
            with pytest.raises(ollama.ResponseError) as err:
                client.list()
            assert err.value.status_code == 401 and "API key" in err.value.error
    finally:
        srv.stop()


def _post(server: ServerThread, path: str, body: dict | None = None) -> tuple[int, str, list[str]]:
    """One raw call (POST with ``body``, else GET), bounded by 10 s: (status, content type, lines)."""
    url = server.url + path
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=10) as reply:
            return reply.status, reply.headers["Content-Type"], reply.read().decode().splitlines()
    except urllib.error.HTTPError as e:
        return e.code, e.headers["Content-Type"], e.read().decode().splitlines()
