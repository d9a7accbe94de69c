"""OpenAI's Responses API (POST /v1/responses) and GET /v1/models/{id}, driven by the official
``openai`` client against a fake backend: the same requests the chat route builds, the stream
events the SDK reads, and a 400 for what pdcluster does not honour (it stores nothing)."""
from __future__ import annotations

import json
import urllib.error
import urllib.request

import openai
import pytest
from conftest import MODEL, REPLY_TEXT, FakeBackend, ServerThread

from scheduler.request import RequestFailedError

EVENT_ORDER = ["response.created", "response.in_progress", "response.output_item.added",
               "response.content_part.added", "response.output_text.delta", "response.output_text.done",
               "response.content_part.done", "response.output_item.done", "response.completed"]


@pytest.fixture()
def client(server: ServerThread) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", timeout=20, max_retries=0)


def test_a_response_answers_the_text_with_the_same_prompt_and_counts_as_the_chat_route(
    client: openai.OpenAI, backend: FakeBackend
) -> None:
    reply = client.responses.create(model=MODEL, instructions="Be brief.", input="hi", max_output_tokens=100)
    assert reply.status == "completed" and reply.output_text == REPLY_TEXT and reply.id.startswith("resp_")
    chat = client.chat.completions.create(model=MODEL, max_tokens=100, messages=[
        {"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi"}])
    assert backend.requests[0].prompt_token_ids == backend.requests[1].prompt_token_ids  # one chat template
    assert (reply.usage.input_tokens, reply.usage.output_tokens) == (chat.usage.prompt_tokens,
                                                                     chat.usage.completion_tokens)
    assert reply.usage.total_tokens == reply.usage.input_tokens + reply.usage.output_tokens
    assert reply.model_extra["pdcluster"]["decode_node"] == "d0"


def test_a_message_list_carries_a_conversation_with_earlier_output_items(client: openai.OpenAI,
                                                                         backend: FakeBackend) -> None:
    first = client.responses.create(model=MODEL, input=[{"role": "user", "content": "hi"}], max_output_tokens=100)
    second = client.responses.create(model=MODEL, max_output_tokens=100, input=[
        {"role": "user", "content": [{"type": "input_text", "text": "hi"}]},
        *[item.model_dump() for item in first.output],  # sent back as they came, ids and statuses included
        {"role": "user", "content": "and then?"}])
    assert second.status == "completed"
    prompt = backend.codec.decode(list(backend.requests[1].prompt_token_ids))
    assert prompt.index("hi") < prompt.index(REPLY_TEXT) < prompt.index("and then?")


def test_a_stream_sends_the_events_the_sdk_reads_in_order(client: openai.OpenAI) -> None:
    events = list(client.responses.create(model=MODEL, input="hi", max_output_tokens=100, stream=True))
    kinds = [e.type for e in events]
    assert [k for i, k in enumerate(kinds) if i == 0 or k != kinds[i - 1]] == EVENT_ORDER  # deltas repeat
    assert [e.sequence_number for e in events] == list(range(1, len(events) + 1))
    deltas = "".join(e.delta for e in events if e.type == "response.output_text.delta")
    assert deltas == REPLY_TEXT == events[kinds.index("response.output_text.done")].text
    done = events[-1].response
    assert done.status == "completed" and done.output_text == REPLY_TEXT and done.usage.output_tokens > 1


def test_the_sdks_stream_helper_reassembles_the_response(client: openai.OpenAI) -> None:
    with client.responses.stream(model=MODEL, input="hi", max_output_tokens=100) as stream:
        text = "".join(e.delta for e in stream if e.type == "response.output_text.delta")
        final = stream.get_final_response()
    assert text == REPLY_TEXT == final.output_text


def test_hitting_max_output_tokens_is_incomplete_as_openai_reports_it(client: openai.OpenAI) -> None:
    reply = client.responses.create(model=MODEL, input="hi", max_output_tokens=3)
    assert reply.status == "incomplete" and reply.incomplete_details.reason == "max_output_tokens"
    assert reply.usage.output_tokens == 3 and REPLY_TEXT.startswith(reply.output_text)
    events = list(client.responses.create(model=MODEL, input="hi", max_output_tokens=3, stream=True))
    assert events[-1].type == "response.incomplete" and events[-1].response.status == "incomplete"


def test_sampling_fields_reach_the_generation_request(client: openai.OpenAI, backend: FakeBackend) -> None:
    client.responses.create(model=MODEL, input="hi", max_output_tokens=4, temperature=0.2, top_p=0.5, store=False)
    sent = backend.requests[0]
    assert (sent.temperature, sent.top_p, sent.max_tokens) == (0.2, 0.5, 4)


@pytest.mark.parametrize(("extra", "param"), [
    ({"previous_response_id": "resp_123"}, "previous_response_id"),
    ({"store": True}, "store"),
    ({"tools": [{"type": "web_search"}]}, "tools[0].type"),
    ({"reasoning": {"effort": "low"}}, "reasoning"),
    ({"text": {"format": {"type": "xml"}}}, "text.format"),
    ({"truncation": "auto"}, "truncation"),
    ({"max_output_tokens": 0}, "max_output_tokens"),
    ({"input": [{"role": "user", "content": [{"type": "input_image", "image_url": "data:,"}]}]},
     "input[0].content[0]"),
    ({"input": [{"type": "function_call_output", "call_id": "c"}]}, "input[0]"),
    ({"input": [{"type": "reasoning", "summary": []}]}, "input[0]"),
], ids=["previous_response_id", "store", "hosted-tool", "reasoning", "xml-output", "truncation-auto",
        "max_output_tokens-0", "image", "tool-output-without-output", "reasoning-item"])
def test_what_pdcluster_does_not_honour_is_a_400_naming_it(client: openai.OpenAI, backend: FakeBackend,
                                                           extra: dict, param: str) -> None:
    with pytest.raises(openai.BadRequestError) as err:
        client.responses.create(**{"model": MODEL, "input": "hi", **extra})
    assert err.value.param == param and param in err.value.message
    assert not backend.requests


def test_a_failure_mid_stream_ends_with_response_failed(client: openai.OpenAI, backend: FakeBackend) -> None:
    backend.fail_with, backend.fail_after = RequestFailedError("decode on d0 failed: the node went away"), 3
    events = list(client.responses.create(model=MODEL, input="hi", max_output_tokens=100, stream=True))
    assert events[-1].type == "response.failed" and events[-1].response.status == "failed"
    assert "decode on d0 failed" in events[-1].response.error.message
    assert "response.completed" not in [e.type for e in events]


def test_an_unknown_model_is_404_model_not_found(client: openai.OpenAI) -> None:
    with pytest.raises(openai.NotFoundError) as err:
        client.responses.create(model="nope", input="hi")
    assert err.value.code == "model_not_found"


def test_a_model_is_retrieved_by_id_and_an_unknown_id_is_404_in_openais_shape(client: openai.OpenAI,
                                                                              server: ServerThread) -> None:
    model = client.models.retrieve(MODEL)
    assert (model.id, model.object, model.owned_by) == (MODEL, "model", "pdcluster")
    for unknown in ("nope", "org/nope"):  # ids may hold a "/"
        with pytest.raises(openai.NotFoundError) as err:
            client.models.retrieve(unknown)
        assert err.value.code == "model_not_found" and unknown in err.value.message
    status, body = _get(server, "/v1/models/org/nope")
    assert status == 404 and set(body["error"]) == {"message", "type", "param", "code"}


def _get(server: ServerThread, path: str) -> tuple[int, dict]:
    try:
        with urllib.request.urlopen(server.url + path, timeout=10) as reply:
            return reply.status, json.loads(reply.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())
