"""Anthropic's Messages API (POST /v1/messages), driven by the official ``anthropic`` client against a
fake backend: the same requests the OpenAI routes build, Anthropic's stream events in Anthropic's
order, its stop reasons and usage split, and a 400 in Anthropic's shape for what is not honoured."""
from __future__ import annotations

import json
import logging
import urllib.error
import urllib.request

import anthropic
import openai
import pytest
from conftest import MODEL, REPLY_TEXT, FakeBackend, ServerThread

from scheduler.api import build_app
from scheduler.request import CapacityExhaustedError, RequestFailedError
from scheduler.tokenizer import PromptCodec

MESSAGES = [{"role": "user", "content": "hi"}]
KEY = "sk-anthropic-test"
EVENT_ORDER = ["message_start", "content_block_start", "content_block_delta", "content_block_stop",
               "message_delta", "message_stop"]


@pytest.fixture()
def client(server: ServerThread) -> anthropic.Anthropic:
    return anthropic.Anthropic(base_url=server.url, api_key="unused", timeout=20, max_retries=0)


def test_a_message_answers_the_text_with_the_same_prompt_and_counts_as_openais_route(
    client: anthropic.Anthropic, server: ServerThread, backend: FakeBackend
) -> None:
    reply = client.messages.create(model=MODEL, max_tokens=100, system="Be brief.", messages=MESSAGES)
    assert reply.role == "assistant" and [b.type for b in reply.content] == ["text"]
    assert reply.content[0].text == REPLY_TEXT and reply.id.startswith("msg_")
    assert reply.stop_reason == "end_turn" and reply.stop_sequence is None
    openai_reply = openai.OpenAI(base_url=server.url + "/v1", api_key="x", timeout=20, max_retries=0) \
        .chat.completions.create(model=MODEL, max_tokens=100,
                                 messages=[{"role": "system", "content": "Be brief."}, *MESSAGES])
    assert backend.requests[0].prompt_token_ids == backend.requests[1].prompt_token_ids  # one chat template
    usage = reply.usage
    assert usage.input_tokens + usage.cache_read_input_tokens == openai_reply.usage.prompt_tokens
    assert usage.output_tokens == openai_reply.usage.completion_tokens


def test_system_text_blocks_are_the_same_system_prompt(client: anthropic.Anthropic, backend: FakeBackend) -> None:
    client.messages.create(model=MODEL, max_tokens=5, system="Be brief.", messages=MESSAGES)
    client.messages.create(model=MODEL, max_tokens=5, messages=MESSAGES,
                           system=[{"type": "text", "text": "Be "}, {"type": "text", "text": "brief."}])
    assert backend.requests[0].prompt_token_ids == backend.requests[1].prompt_token_ids
    assert "Be brief." in backend.codec.decode(list(backend.requests[0].prompt_token_ids))


def test_a_stream_sends_anthropics_events_in_anthropics_order(client: anthropic.Anthropic) -> None:
    events = list(client.messages.create(model=MODEL, max_tokens=100, messages=MESSAGES, stream=True))
    kinds = [e.type for e in events]
    assert [k for i, k in enumerate(kinds) if i == 0 or k != kinds[i - 1]] == EVENT_ORDER  # deltas repeat
    assert kinds.count("content_block_delta") > 1
    assert "".join(e.delta.text for e in events if e.type == "content_block_delta") == REPLY_TEXT
    final = events[kinds.index("message_delta")]
    assert final.delta.stop_reason == "end_turn" and final.usage.output_tokens > 1
    assert events[0].message.usage.input_tokens > 0 and events[0].message.content == []


def test_the_sdks_stream_helper_reassembles_the_message(client: anthropic.Anthropic) -> None:
    with client.messages.stream(model=MODEL, max_tokens=100, messages=MESSAGES) as stream:
        text = "".join(stream.text_stream)
        message = stream.get_final_message()
    assert text == REPLY_TEXT and message.content[0].text == REPLY_TEXT
    assert message.stop_reason == "end_turn" and message.usage.output_tokens > 1


def test_max_tokens_stops_with_stop_reason_max_tokens(client: anthropic.Anthropic, backend: FakeBackend) -> None:
    reply = client.messages.create(model=MODEL, max_tokens=3, messages=MESSAGES)
    assert reply.stop_reason == "max_tokens" and reply.usage.output_tokens == 3 == backend.requests[0].max_tokens
    assert REPLY_TEXT.startswith(reply.content[0].text)


def test_a_stop_sequence_cuts_the_text_and_is_named(client: anthropic.Anthropic, backend: FakeBackend) -> None:
    reply = client.messages.create(model=MODEL, max_tokens=100, messages=MESSAGES, stop_sequences=["lazy", "fox"])
    assert reply.content[0].text == "The quick brown "
    assert (reply.stop_reason, reply.stop_sequence) == ("stop_sequence", "fox")
    assert backend.closed_early == 1
    with client.messages.stream(model=MODEL, max_tokens=100, messages=MESSAGES, stop_sequences=["fox"]) as stream:
        message = stream.get_final_message()
    assert (message.stop_reason, message.stop_sequence, message.content[0].text) == \
        ("stop_sequence", "fox", "The quick brown ")


def test_sampling_fields_reach_the_generation_request(client: anthropic.Anthropic, backend: FakeBackend) -> None:
    # this SDK's create() no longer names them; the API still takes them, as extra_body sends them
    client.messages.create(model=MODEL, max_tokens=4, messages=MESSAGES,
                           extra_body={"temperature": 0.2, "top_p": 0.5, "top_k": 9})
    sent = backend.requests[0]
    assert (sent.temperature, sent.top_p, sent.top_k, sent.max_tokens) == (0.2, 0.5, 9, 4)


def test_metadata_user_id_is_the_requests_user_in_its_record(client: anthropic.Anthropic, backend: FakeBackend,
                                                             caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO, logger="scheduler.api"):
        client.messages.create(model=MODEL, max_tokens=2, messages=MESSAGES, metadata={"user_id": "user-42"})
    assert backend.requests[0].user == "user-42"
    assert any("user='user-42'" in r.getMessage() or "user=user-42" in r.getMessage() for r in caplog.records)


@pytest.mark.parametrize(("extra", "named"), [
    ({"tools": [{"name": "f", "type": "web_search_20250305"}]}, "tools[0].type"),
    ({"tool_choice": {"type": "sometimes"}}, "tool_choice"),
    ({"thinking": {"type": "enabled", "budget_tokens": 1024}}, "thinking"),
    ({"temperature": 1.5}, "temperature"),
    ({"top_p": 0}, "top_p"),
    ({"metadata": {"user_id": "u", "team": "t"}}, "metadata.team"),
    ({"messages": [{"role": "user", "content": [{"type": "image", "source": {"type": "base64",
                                                  "media_type": "image/png", "data": "aGk="}}]}]},
     "messages[0].content[0].type"),
    ({"messages": [{"role": "user", "content": [{"type": "text", "text": "hi",
                                                  "cache_control": {"type": "ephemeral"}}]}]},
     "messages[0].content[0].cache_control"),
    ({"messages": [*MESSAGES, {"role": "assistant", "content": "The"}]}, "messages[1].role"),
    ({"stop_sequences": "fox"}, "stop_sequences"),
], ids=["tools", "tool_choice", "thinking", "temperature-above-1", "top_p-0", "metadata-other-key", "image",
        "cache_control", "assistant-prefill", "stop_sequences-not-a-list"])
def test_what_pdcluster_does_not_honour_is_a_400_in_anthropics_shape(server: ServerThread, backend: FakeBackend,
                                                                     extra: dict, named: str) -> None:
    status, body = _post(server, {"model": MODEL, "max_tokens": 10, "messages": MESSAGES, **extra})
    assert status == 400, body
    assert body["type"] == "error" and body["error"]["type"] == "invalid_request_error"
    assert named in body["error"]["message"]
    assert not backend.requests


def test_max_tokens_is_required_as_anthropic_requires_it(client: anthropic.Anthropic) -> None:
    with pytest.raises(anthropic.BadRequestError) as err:
        client.messages.create(model=MODEL, messages=MESSAGES, max_tokens=anthropic.omit)
    assert "max_tokens" in err.value.message


def test_an_unknown_model_is_404_not_found_error(client: anthropic.Anthropic) -> None:
    with pytest.raises(anthropic.NotFoundError) as err:
        client.messages.create(model="nope", max_tokens=5, messages=MESSAGES)
    assert err.value.body["error"]["type"] == "not_found_error"


def test_a_full_cluster_is_429_rate_limit_error_with_retry_after(client: anthropic.Anthropic,
                                                                 backend: FakeBackend) -> None:
    backend.fail_with = CapacityExhaustedError("decode on d0 failed: the node is full", node="d0")
    with pytest.raises(anthropic.RateLimitError) as err:
        client.messages.create(model=MODEL, max_tokens=5, messages=MESSAGES, stream=True)
    assert err.value.body["error"]["type"] == "rate_limit_error"
    assert int(err.value.response.headers["retry-after"]) >= 1


def test_a_failure_mid_stream_ends_with_an_error_event_the_sdk_raises(client: anthropic.Anthropic,
                                                                      backend: FakeBackend) -> None:
    backend.fail_with, backend.fail_after = RequestFailedError("decode on d0 failed: the node went away"), 3
    received = ""
    with pytest.raises(anthropic.APIStatusError) as err, \
            client.messages.stream(model=MODEL, max_tokens=100, messages=MESSAGES) as stream:
        for text in stream.text_stream:
            received += text
    assert "decode on d0 failed" in str(err.value)
    assert received and REPLY_TEXT.startswith(received) and received != REPLY_TEXT


def test_the_api_key_is_accepted_as_x_api_key(codec: PromptCodec) -> None:
    srv = ServerThread(build_app(FakeBackend(codec), api_key=KEY))
    try:
        keyed = anthropic.Anthropic(base_url=srv.url, api_key=KEY, timeout=20, max_retries=0)
        assert keyed.messages.create(model=MODEL, max_tokens=100, messages=MESSAGES).content[0].text == REPLY_TEXT
        wrong = anthropic.Anthropic(base_url=srv.url, api_key="wrong", timeout=20, max_retries=0)
        with pytest.raises(anthropic.AuthenticationError) as err:
            wrong.messages.create(model=MODEL, max_tokens=5, messages=MESSAGES)
        assert err.value.body["error"]["type"] == "authentication_error"
        bearer = openai.OpenAI(base_url=srv.url + "/v1", api_key=KEY, timeout=20, max_retries=0)
        assert [m.id for m in bearer.models.list()] == [MODEL]  # the OpenAI routes keep the bearer key
    finally:
        srv.stop()


def _post(server: ServerThread, body: dict) -> tuple[int, dict]:
    """One raw ``POST /v1/messages`` bounded by 10 s: (status, JSON body)."""
    request = urllib.request.Request(server.url + "/v1/messages", data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=10) as reply:
            return reply.status, json.loads(reply.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())
