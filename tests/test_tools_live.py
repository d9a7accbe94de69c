"""Tools and structured output against a real `pdc up` cluster (torch prefill, mlx decode, the tiny
random-weight model, whose free text is random): the openai, anthropic and ollama clients each hold
a streamed and a non-streamed conversation with tools, and a forced call or a json_schema answer
is valid only because decoding is constrained (token 0 drawn on the prefill node under the grammar,
the rest on the decode node)."""
from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import anthropic
import jsonschema
import ollama
import openai
import pytest
from conftest import PdcUp, requires_torch_and_mlx

pytestmark = requires_torch_and_mlx

# Bounded strings and numbers: a random-weight model ends a free string only when '"' happens to win
WEATHER = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 12},
                                            "days": {"type": "integer", "minimum": 1, "maximum": 14}},
           "required": ["city"], "additionalProperties": False}
CLOCK = {"type": "object", "properties": {"zone": {"enum": ["UTC", "CET", "JST"]}}, "required": ["zone"],
         "additionalProperties": False}
SCHEMAS = {"get_weather": WEATHER, "get_time": CLOCK}
TOOLS = [{"type": "function", "function": {"name": name, "description": f"{name} for a place", "parameters": schema}}
         for name, schema in SCHEMAS.items()]
ASK = [{"role": "user", "content": "What is the weather in Paris?"}]
SPLIT = {"pdcluster": {"placement": "disaggregated"}}  # token 0 on the torch prefill node, the rest on mlx


@pytest.fixture(scope="module")
def up(make_tiny_model) -> Iterator[PdcUp]:
    cluster = PdcUp(make_tiny_model("llama"), "--prefill-engine", "torch", "--decode-engine", "mlx")
    yield cluster
    assert cluster.stop() == 0


@pytest.fixture(scope="module")
def model_id(up: PdcUp) -> str:
    return openai.OpenAI(base_url=up.url + "/v1", api_key="x", timeout=60, max_retries=0).models.list().data[0].id


@pytest.fixture(scope="module")
def oai(up: PdcUp) -> openai.OpenAI:
    return openai.OpenAI(base_url=up.url + "/v1", api_key="x", timeout=120, max_retries=0)


def _valid_call(name: str, arguments: Any) -> dict:
    arguments = json.loads(arguments) if isinstance(arguments, str) else arguments
    jsonschema.validate(arguments, SCHEMAS[name])
    return arguments


def _openai_turn_two(call_id: str, name: str, arguments: str) -> list[dict]:
    return [*ASK, {"role": "assistant", "content": None, "tool_calls": [
        {"id": call_id, "type": "function", "function": {"name": name, "arguments": arguments}}]},
        {"role": "tool", "tool_call_id": call_id, "content": "Sunny, 21 C."}]


def test_openai_conversation_with_a_forced_call_then_the_result(oai: openai.OpenAI, model_id: str) -> None:
    reply = oai.chat.completions.create(model=model_id, messages=ASK, tools=TOOLS, tool_choice="required",
                                        parallel_tool_calls=False, max_tokens=200, extra_body=SPLIT)
    choice = reply.choices[0]
    assert choice.finish_reason == "tool_calls", choice
    (call,) = choice.message.tool_calls
    _valid_call(call.function.name, call.function.arguments)
    assert reply.pdcluster["prefill_node"] != reply.pdcluster["decode_node"]  # split across the two workers
    again = oai.chat.completions.create(model=model_id, tools=TOOLS, max_tokens=12, extra_body=SPLIT,
                                        messages=_openai_turn_two(call.id, call.function.name, call.function.arguments))
    assert again.choices[0].finish_reason in ("stop", "length", "tool_calls")
    assert again.usage.prompt_tokens > reply.usage.prompt_tokens  # the call and its result are in the prompt


def test_openai_streamed_conversation_with_a_named_call(oai: openai.OpenAI, model_id: str) -> None:
    stream = oai.chat.completions.create(model=model_id, messages=ASK, tools=TOOLS, max_tokens=200, stream=True,
                                         tool_choice={"type": "function", "function": {"name": "get_time"}},
                                         extra_body=SPLIT)
    chunks = list(stream)
    parts = [t for c in chunks if c.choices for t in (c.choices[0].delta.tool_calls or [])]
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "tool_calls"
    assert {p.function.name for p in parts if p.function.name} == {"get_time"}
    arguments = "".join(p.function.arguments or "" for p in parts)
    _valid_call("get_time", arguments)
    follow = oai.chat.completions.create(model=model_id, tools=TOOLS, max_tokens=12, stream=True,
                                         messages=_openai_turn_two(parts[0].id, "get_time", arguments))
    assert [c.choices[0].finish_reason for c in follow if c.choices][-1] in ("stop", "length", "tool_calls")


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "streamed"])
def test_a_json_schema_answer_is_valid_only_by_constrained_decoding(oai: openai.OpenAI, model_id: str,
                                                                    stream: bool) -> None:
    response_format = {"type": "json_schema", "json_schema": {"name": "weather", "schema": WEATHER, "strict": True}}
    free = oai.chat.completions.create(model=model_id, messages=ASK, max_tokens=40, extra_body=SPLIT)
    with pytest.raises((ValueError, jsonschema.ValidationError)):  # unconstrained, the random model writes no JSON
        jsonschema.validate(json.loads(free.choices[0].message.content), WEATHER)
    kwargs = dict(model=model_id, messages=ASK, max_tokens=200, response_format=response_format, extra_body=SPLIT)
    if stream:
        chunks = list(oai.chat.completions.create(stream=True, **kwargs))
        text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        finish = [c.choices[0].finish_reason for c in chunks if c.choices][-1]
    else:
        reply = oai.chat.completions.create(**kwargs)
        text, finish = reply.choices[0].message.content, reply.choices[0].finish_reason
    assert finish == "stop"
    jsonschema.validate(json.loads(text), WEATHER)


ANTHROPIC_TOOLS = [{"name": name, "description": f"{name} for a place", "input_schema": schema}
                   for name, schema in SCHEMAS.items()]


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "streamed"])
def test_anthropic_conversation_with_tools(up: PdcUp, model_id: str, stream: bool) -> None:
    client = anthropic.Anthropic(base_url=up.url, api_key="x", timeout=120, max_retries=0)
    kwargs = dict(model=model_id, max_tokens=200, messages=ASK, tools=ANTHROPIC_TOOLS, extra_body=SPLIT,
                  tool_choice={"type": "any", "disable_parallel_tool_use": True})
    if stream:
        with client.messages.stream(**kwargs) as events:
            message = events.get_final_message()
    else:
        message = client.messages.create(**kwargs)
    assert message.stop_reason == "tool_use"
    use = next(b for b in message.content if b.type == "tool_use")
    _valid_call(use.name, use.input)
    history = [*ASK, {"role": "assistant", "content": [{"type": "tool_use", "id": use.id, "name": use.name,
                                                        "input": use.input}]},
               {"role": "user", "content": [{"type": "tool_result", "tool_use_id": use.id, "content": "Sunny."}]}]
    follow = client.messages.create(model=model_id, max_tokens=12, messages=history, tools=ANTHROPIC_TOOLS)
    assert follow.stop_reason in ("end_turn", "max_tokens", "tool_use")
    assert follow.usage.input_tokens + follow.usage.cache_read_input_tokens > message.usage.input_tokens


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "streamed"])
def test_ollama_conversation_with_tools(up: PdcUp, model_id: str, stream: bool) -> None:
    """Ollama has no tool_choice: the model decides, so this conversation carries a call and its
    result in the history (the tiny model's answer is random text or a call) and a ``format``."""
    client = ollama.Client(host=up.url, timeout=120)
    history = [*ASK, {"role": "assistant", "content": "", "tool_calls": [
        {"function": {"name": "get_weather", "arguments": {"city": "Paris"}}}]},
        {"role": "tool", "content": "Sunny, 21 C.", "tool_name": "get_weather"}]
    first = client.chat(model=model_id, messages=ASK, tools=TOOLS, stream=False, options={"num_predict": 12})
    if stream:
        parts = list(client.chat(model=model_id, messages=history, tools=TOOLS, stream=True,
                                 options={"num_predict": 12}))
        last = parts[-1]
    else:
        last = client.chat(model=model_id, messages=history, tools=TOOLS, stream=False, options={"num_predict": 12})
    assert last.done and last.done_reason in ("stop", "length")
    assert last.prompt_eval_count > first.prompt_eval_count  # the call and its result reached the template
    shaped = client.chat(model=model_id, messages=history, format=WEATHER, stream=stream,
                         options={"num_predict": 200})
    text = "".join(p.message.content for p in shaped) if stream else shaped.message.content
    jsonschema.validate(json.loads(text), WEATHER)


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "streamed"])
def test_responses_conversation_with_a_forced_call(oai: openai.OpenAI, model_id: str, stream: bool) -> None:
    tools = [{"type": "function", "name": t["function"]["name"], "parameters": t["function"]["parameters"]}
             for t in TOOLS]
    kwargs = dict(model=model_id, input=ASK, tools=tools, tool_choice="required", parallel_tool_calls=False,
                  max_output_tokens=200, extra_body=SPLIT)
    if stream:
        response = list(oai.responses.create(stream=True, **kwargs))[-1].response
    else:
        response = oai.responses.create(**kwargs)
    assert response.status == "completed"
    (call,) = [o for o in response.output if o.type == "function_call"]
    _valid_call(call.name, call.arguments)
    follow = oai.responses.create(model=model_id, tools=tools, max_output_tokens=12, input=[
        *ASK, {"type": "function_call", "call_id": call.call_id, "name": call.name, "arguments": call.arguments},
        {"type": "function_call_output", "call_id": call.call_id, "output": "Sunny, 21 C."}])
    assert follow.status in ("completed", "incomplete")
    assert follow.usage.input_tokens > response.usage.input_tokens
