"""Tool calling and structured output on the scheduler's side: formats, parsers, grammars,
validation, and the OpenAI, Ollama and Anthropic shapes of tool calls (official clients,
fake backend). Live clusters with constrained decoding: tests/test_tools_live.py."""
from __future__ import annotations

import asyncio
import json
import urllib.error
import urllib.request

import anthropic
import jsonschema
import llguidance
import llguidance.numpy
import numpy as np
import ollama
import openai
import pytest
from conftest import MODEL, FakeBackend, ServerThread

from scheduler.request import FinishEvent, RequestStats
from scheduler.structured import GrammarError, check_grammar, json_schema_grammar, lark_grammar, \
    response_format_grammar
from scheduler.tokenizer import PromptCodec
from scheduler.tools import FORMATS, NoToolSupport, Tool, ToolCallSplitter, ToolChoice, call_grammar, \
    detect_format, split_tool_calls

# Bounded strings and numbers: a random-weight model ends a free string only when '"' happens to win
WEATHER = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 12},
                                            "days": {"type": "integer", "minimum": 1, "maximum": 14}},
           "required": ["city"], "additionalProperties": False}
CLOCK = {"type": "object", "properties": {"zone": {"enum": ["UTC", "CET", "JST"]}}, "required": ["zone"],
         "additionalProperties": False}
TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "Weather for a city",
                                           "parameters": WEATHER}},
         {"type": "function", "function": {"name": "get_time", "parameters": CLOCK}}]
CALL_TEXT = 'Let me check.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'
CHAT = [{"role": "user", "content": "Weather in Paris?"}]


# ---------------------------------------------------------------- parsing each format


@pytest.mark.parametrize("fmt, text, calls", [
    ("hermes", '<tool_call>\n{"name": "f", "arguments": {"a": 1}}\n</tool_call>', [("f", {"a": 1})]),
    ("hermes", '<tool_call>{"name": "f", "arguments": {}}</tool_call>\n<tool_call>{"name": "g", "arguments": '
               '"{\\"b\\": 2}"}</tool_call>', [("f", {}), ("g", {"b": 2})]),
    ("hermes", '<tool_call>\n{"name": "f", "arguments": {"a": 1}}', [("f", {"a": 1})]),  # unclosed at the end
    ("llama3", '{"name": "f", "parameters": {"a": 1}}', [("f", {"a": 1})]),
    ("llama3", '<|python_tag|>{"name": "f", "parameters": {}}; {"name": "g", "parameters": {"x": "y"}}',
     [("f", {}), ("g", {"x": "y"})]),
    ("mistral", '[TOOL_CALLS][{"name": "f", "arguments": {"a": 1}}, {"name": "g", "arguments": {}}]',
     [("f", {"a": 1}), ("g", {})]),
    ("mistral", '[TOOL_CALLS]f[ARGS]{"a": 1}[TOOL_CALLS]g[ARGS]{}', [("f", {"a": 1}), ("g", {})]),
])
def test_each_format_parses_its_calls(fmt: str, text: str, calls: list) -> None:
    assert FORMATS[fmt].parse(text) == calls


@pytest.mark.parametrize("fmt, text", [
    ("hermes", "<tool_call>\n{not json}\n</tool_call>"),
    ("hermes", '<tool_call>{"name": "f", "arguments": {}}</tool_call> and then some prose'),
    ("hermes", '<tool_call>{"arguments": {}}</tool_call>'),  # no name
    ("llama3", '{"answer": 42}'),
    ("llama3", '{"name": "f", "parameters": [1]}'),  # arguments must be an object
    ("mistral", "[TOOL_CALLS][{]"),
])
def test_malformed_sections_are_not_calls(fmt: str, text: str) -> None:
    assert FORMATS[fmt].parse(text) is None


def _split(fmt: str, pieces: list[str], names: tuple[str, ...] = ("f", "get_weather"), *,
           tools: tuple[Tool, ...] | None = None, parallel: bool = True) -> tuple[str, list, str]:
    """Run ``pieces`` through split_tool_calls: (content, calls, finish_reason)."""
    async def deltas():
        for piece in pieces[:-1]:
            yield piece, None
        yield pieces[-1], FinishEvent("stop", RequestStats())

    async def body():
        offered = tools if tools is not None else tuple(Tool(n) for n in names)
        out = [item async for item in split_tool_calls(deltas(), ToolCallSplitter(
            FORMATS[fmt], offered, parallel=parallel))]
        return out
    items = asyncio.run(body())
    content = "".join(d for d, f in items if isinstance(d, str))
    calls = [(d.name, d.arguments_object) for d, _ in items if not isinstance(d, str)]
    return content, calls, items[-1][1].finish_reason


def test_content_streams_before_a_call_and_the_call_comes_whole_at_the_end() -> None:
    pieces = ["Let me ", "check.\n<tool", '_call>\n{"name": "get_weather", ', '"arguments": {"city": "Paris"}}',
              "\n</tool_call>"]
    content, calls, reason = _split("hermes", pieces)
    assert content == "Let me check.\n" and calls == [("get_weather", {"city": "Paris"})] and reason == "tool_calls"


def test_a_marker_prefix_that_never_completes_is_content_after_all() -> None:
    content, calls, reason = _split("hermes", ["a <tool", " b", " c"])
    assert content == "a <tool b c" and calls == [] and reason == "stop"


def test_a_call_to_an_unknown_function_or_a_broken_call_is_given_back_as_content() -> None:
    text = '<tool_call>{"name": "rm_rf", "arguments": {}}</tool_call>'
    assert _split("hermes", [text]) == (text, [], "stop")
    broken = '<tool_call>{"name": "f", "argu'
    assert _split("hermes", ["ok ", broken]) == ("ok " + broken, [], "stop")


def test_llama3_holds_an_answer_that_opens_with_a_brace_and_returns_it_if_it_is_no_call() -> None:
    assert _split("llama3", ['  {"name": "f", ', '"parameters": {"a": 1}}']) == ("", [("f", {"a": 1})], "tool_calls")
    assert _split("llama3", ['{"answer": ', "42}"]) == ('{"answer": 42}', [], "stop")
    assert _split("llama3", ["Sure: ", '{"name": "f", "parameters": {}}'])[1] == []  # JSON after prose is prose


# ---------------------------------------------------------------- which format a model speaks


def test_the_format_comes_from_the_chat_template(codec: PromptCodec) -> None:
    assert detect_format(codec.bundle.chat_template).name == "hermes"  # the tiny model's template
    assert detect_format("{{ '[TOOL_CALLS]' }}{% if tools %}{% endif %}").name == "mistral"
    assert detect_format("{{ '<|python_tag|>' }}{% for t in tools %}{% endfor %}").name == "llama3"
    with pytest.raises(NoToolSupport, match="does not parse"):
        detect_format("{% for t in tools %}<function>{{ t }}</function>{% endfor %}")
    with pytest.raises(NoToolSupport, match="no tool support"):
        detect_format("{% for m in messages %}{{ m['content'] }}{% endfor %}")


def test_tools_and_their_history_render_through_the_template(codec: PromptCodec) -> None:
    history = [*CHAT, {"role": "assistant", "content": "", "tool_calls": [
        {"id": "c1", "type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris"}}}]},
        {"role": "tool", "tool_call_id": "c1", "content": "sunny, 21 C"}]
    text = codec.render_chat(history, [Tool("get_weather", "Weather", WEATHER).to_template()])
    assert '"name": "get_weather"' in text and "<tools>" in text  # transformers' tojson: no HTML escaping
    assert '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>' in text
    assert "<tool_response>\nsunny, 21 C\n</tool_response>" in text
    assert codec.render_chat(CHAT) == codec.render_chat(CHAT, [])  # no tools: the plain template


# ---------------------------------------------------------------- grammars that force a call


def _greedy_under(grammar: str, codec: PromptCodec, seed: int, max_tokens: int = 300) -> str:
    """Decode random logits under ``grammar`` with llguidance's own mask: the text it admits."""
    tokenizer = codec.grammar_tokenizer
    matcher = llguidance.LLMatcher(tokenizer, grammar)
    rng = np.random.default_rng(seed)
    mask = llguidance.numpy.allocate_token_bitmask(1, tokenizer.vocab_size)
    out = []
    while not matcher.is_stopped() and len(out) < max_tokens:
        llguidance.numpy.fill_next_token_bitmask(matcher, mask)
        logits = rng.standard_normal(tokenizer.vocab_size).astype(np.float32)
        llguidance.numpy.apply_token_bitmask_inplace(logits, mask[0])
        token = int(np.argmax(logits))
        assert matcher.consume_token(token), matcher.get_error()
        out.append(token)
    assert matcher.is_stopped(), "the grammar did not end"
    return tokenizer.decode_str([t for t in out if t not in tokenizer.eos_tokens])  # EOS ends, is no text


@pytest.mark.parametrize("fmt", sorted(FORMATS))
def test_a_forced_call_grammar_admits_only_valid_calls_to_the_offered_tools(fmt: str, codec: PromptCodec) -> None:
    tools = (Tool("get_weather", parameters=WEATHER), Tool("get_time", parameters=CLOCK))
    grammar = lark_grammar(call_grammar(FORMATS[fmt], tools, ToolChoice("required"), False, {}))
    check_grammar(grammar, codec.grammar_tokenizer)
    for seed in range(3):
        calls = FORMATS[fmt].parse(_greedy_under(grammar, codec, seed))
        assert calls is not None and len(calls) == 1
        name, arguments = calls[0]
        assert name in ("get_weather", "get_time")
        if name == "get_weather":
            jsonschema.validate(arguments, WEATHER)


def test_a_named_choice_admits_only_that_function(codec: PromptCodec) -> None:
    tools = (Tool("get_weather", parameters=WEATHER), Tool("get_time", parameters=CLOCK))
    grammar = lark_grammar(call_grammar(FORMATS["hermes"], tools, ToolChoice("function", "get_weather"), True, {}))
    for seed in range(3):
        calls = FORMATS["hermes"].parse(_greedy_under(grammar, codec, seed))
        assert calls and all(name == "get_weather" for name, _ in calls)
        for _, arguments in calls:
            jsonschema.validate(arguments, WEATHER)


def test_a_json_schema_grammar_admits_only_valid_instances(codec: PromptCodec) -> None:
    grammar = response_format_grammar({"type": "json_schema", "json_schema": {"name": "w", "schema": WEATHER}})
    for seed in range(3):
        jsonschema.validate(json.loads(_greedy_under(grammar, codec, seed)), WEATHER)


@pytest.mark.parametrize("schema, why", [
    ({"type": "nonsense"}, "Invalid type"),
    ({"type": "object", "properties": {"a": {"$ref": "#/missing"}}}, "does not exist"),
    ({"type": "string", "minLength": 5, "maxLength": 2}, "Unsatisfiable"),
])
def test_a_schema_that_cannot_constrain_is_refused_with_its_reason(schema: dict, why: str, codec: PromptCodec) -> None:
    with pytest.raises(GrammarError, match=why):
        check_grammar(json_schema_grammar(schema), codec.grammar_tokenizer)


# ---------------------------------------------------------------- the OpenAI route


@pytest.fixture(autouse=True)
def long_context(backend: FakeBackend) -> None:
    backend.context_length = 4096  # tool definitions make long prompts with the tiny tokenizer


@pytest.fixture()
def oai(server: ServerThread) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.url + "/v1", api_key="x", timeout=20, max_retries=0)


def test_a_reply_with_a_call_comes_back_as_tool_calls(oai: openai.OpenAI, backend: FakeBackend) -> None:
    backend.reply_text = CALL_TEXT
    reply = oai.chat.completions.create(model=MODEL, messages=CHAT, tools=TOOLS, max_tokens=200)
    choice = reply.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content == "Let me check.\n"
    (call,) = choice.message.tool_calls
    assert call.type == "function" and call.function.name == "get_weather" and call.id.startswith("call_")
    assert json.loads(call.function.arguments) == {"city": "Paris"}
    prompt = backend.codec.decode(list(backend.requests[0].prompt_token_ids))
    assert "<tools>" in prompt and "get_weather" in prompt  # the tools reached the template
    assert backend.requests[0].grammar == ""  # auto: the model decides, nothing is forced


def test_a_streamed_call_arrives_as_openai_streams_it(oai: openai.OpenAI, backend: FakeBackend) -> None:
    backend.reply_text = CALL_TEXT
    chunks = list(oai.chat.completions.create(model=MODEL, messages=CHAT, tools=TOOLS, max_tokens=200, stream=True))
    content = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    parts = [t for c in chunks if c.choices for t in (c.choices[0].delta.tool_calls or [])]
    assert content == "Let me check.\n"
    assert parts[0].id and parts[0].function.name == "get_weather" and parts[0].function.arguments == ""
    assert json.loads("".join(p.function.arguments or "" for p in parts)) == {"city": "Paris"}
    assert {p.index for p in parts} == {0}
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "tool_calls"


def test_a_conversation_continues_with_the_tool_result(oai: openai.OpenAI, backend: FakeBackend) -> None:
    history = [*CHAT, {"role": "assistant", "content": None, "tool_calls": [
        {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "sunny"}]
    reply = oai.chat.completions.create(model=MODEL, messages=history, tools=TOOLS, max_tokens=200)
    assert reply.choices[0].finish_reason == "stop" and reply.choices[0].message.tool_calls is None
    prompt = backend.codec.decode(list(backend.requests[0].prompt_token_ids))
    assert "<tool_response>\nsunny\n</tool_response>" in prompt


def test_forcing_a_call_or_a_format_sends_a_grammar(oai: openai.OpenAI, backend: FakeBackend) -> None:
    oai.chat.completions.create(model=MODEL, messages=CHAT, tools=TOOLS, tool_choice="required", max_tokens=50)
    oai.chat.completions.create(model=MODEL, messages=CHAT, tools=TOOLS, max_tokens=50,
                                tool_choice={"type": "function", "function": {"name": "get_time"}})
    oai.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=50, response_format={"type": "json_object"})
    oai.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=50, response_format={
        "type": "json_schema", "json_schema": {"name": "w", "schema": WEATHER, "strict": True}})
    grammars = [r.grammar for r in backend.requests]
    assert all(grammars) and len(set(grammars)) == 4
    assert "get_time" in grammars[1] and "get_weather" not in grammars[1]


@pytest.mark.parametrize("extra, param", [
    ({"tool_choice": "required"}, "tool_choice"),  # without tools
    ({"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "nope"}}}, "tool_choice"),
    ({"tools": [{"type": "function", "function": {"name": "bad name!"}}]}, "tools[0].function.name"),
    ({"tools": [{"type": "retrieval"}]}, "tools[0]"),
    ({"tools": [TOOLS[0], TOOLS[0]]}, "tools"),
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}, "x": 1}}]},
     "tools[0].function.x"),
    ({"response_format": {"type": "xml"}}, "response_format"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "w", "schema": {"type": "nonsense"}}}},
     "response_format"),
    ({"response_format": {"type": "json_object"}, "tools": TOOLS}, "response_format"),
    ({"response_format": {"type": "json_object"}, "extra_body": {"ignore_eos": True}}, "ignore_eos"),
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "nonsense"}}}],
      "tool_choice": "required"}, "tools"),
    ({"functions": [{"name": "f"}]}, "functions"),
])
def test_bad_tool_and_format_requests_are_400_naming_the_field(oai: openai.OpenAI, extra: dict, param: str) -> None:
    extra_body = extra.pop("extra_body", {})
    with pytest.raises(openai.BadRequestError) as e:
        oai.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=20, extra_body={**extra, **extra_body})
    assert e.value.body["param"] == param, e.value.body


@pytest.mark.parametrize("message, param", [
    ({"role": "tool", "content": "x"}, "messages[1].tool_call_id"),
    ({"role": "assistant", "tool_calls": [{"id": "c", "type": "function",
                                           "function": {"name": "f", "arguments": "[1]"}}]},
     "messages[1].tool_calls[0].function.arguments"),
    ({"role": "user", "content": "x", "tool_call_id": "c"}, "messages[1].tool_call_id"),
])
def test_bad_tool_history_is_400_naming_the_message(oai: openai.OpenAI, message: dict, param: str) -> None:
    with pytest.raises(openai.BadRequestError) as e:
        oai.chat.completions.create(model=MODEL, messages=[*CHAT, message], max_tokens=20)
    assert e.value.body["param"] == param, e.value.body


def test_a_model_without_tool_support_refuses_tools(server: ServerThread, backend: FakeBackend,
                                                    oai: openai.OpenAI) -> None:
    plain = "{% for m in messages %}{{ m['content'] }}{% endfor %}"
    backend.codec = PromptCodec(type(backend.codec.bundle)(backend.codec.bundle.tokenizer_json, plain))
    with pytest.raises(openai.BadRequestError, match="no tool support") as e:
        oai.chat.completions.create(model=MODEL, messages=CHAT, tools=TOOLS, max_tokens=20)
    assert e.value.body["param"] == "tools"


# ---------------------------------------------------------------- Ollama and Anthropic shapes


def test_ollama_returns_calls_with_object_arguments_streamed_and_not(server: ServerThread,
                                                                     backend: FakeBackend) -> None:
    backend.reply_text = CALL_TEXT
    client = ollama.Client(host=server.url, timeout=20)
    reply = client.chat(model=MODEL, messages=CHAT, tools=TOOLS, stream=False, options={"num_predict": 200})
    assert reply.done_reason == "stop" and reply.message.content == "Let me check.\n"
    (call,) = reply.message.tool_calls
    assert call.function.name == "get_weather" and call.function.arguments == {"city": "Paris"}
    parts = list(client.chat(model=MODEL, messages=CHAT, tools=TOOLS, stream=True, options={"num_predict": 200}))
    calls = [c for p in parts for c in (p.message.tool_calls or [])]
    assert [(c.function.name, c.function.arguments) for c in calls] == [("get_weather", {"city": "Paris"})]
    history = [*CHAT, {"role": "assistant", "content": "", "tool_calls": [
        {"function": {"name": "get_weather", "arguments": {"city": "Paris"}}}]},
        {"role": "tool", "content": "sunny", "tool_name": "get_weather"}]
    client.chat(model=MODEL, messages=history, tools=TOOLS, stream=False, options={"num_predict": 20})
    prompt = backend.codec.decode(list(backend.requests[-1].prompt_token_ids))
    assert '"arguments": {"city": "Paris"}' in prompt and "<tool_response>\nsunny" in prompt
    assert "tools" in client.show(MODEL).capabilities


def test_ollama_format_constrains_decoding(server: ServerThread, backend: FakeBackend) -> None:
    client = ollama.Client(host=server.url, timeout=20)
    client.chat(model=MODEL, messages=CHAT, format="json", stream=False, options={"num_predict": 20})
    client.chat(model=MODEL, messages=CHAT, format=WEATHER, stream=False, options={"num_predict": 20})
    assert all(r.grammar for r in backend.requests) and backend.requests[0].grammar != backend.requests[1].grammar
    request = urllib.request.Request(server.url + "/api/chat", method="POST", data=json.dumps(
        {"model": MODEL, "messages": CHAT, "format": "yaml", "stream": False}).encode())
    with pytest.raises(urllib.error.HTTPError) as e:  # the ollama client itself refuses "yaml"
        urllib.request.urlopen(request, timeout=20)
    assert e.value.code == 400 and "'format'" in json.loads(e.value.read())["error"]


ANTHROPIC_TOOLS = [{"name": "get_weather", "description": "Weather for a city", "input_schema": WEATHER}]


def test_anthropic_returns_tool_use_blocks_streamed_and_not(server: ServerThread, backend: FakeBackend) -> None:
    backend.reply_text = CALL_TEXT
    client = anthropic.Anthropic(base_url=server.url, api_key="x", timeout=20, max_retries=0)
    reply = client.messages.create(model=MODEL, max_tokens=200, messages=CHAT, tools=ANTHROPIC_TOOLS)
    assert reply.stop_reason == "tool_use" and [b.type for b in reply.content] == ["text", "tool_use"]
    assert reply.content[1].name == "get_weather" and reply.content[1].input == {"city": "Paris"}
    with client.messages.stream(model=MODEL, max_tokens=200, messages=CHAT, tools=ANTHROPIC_TOOLS) as stream:
        final = stream.get_final_message()
    assert final.stop_reason == "tool_use" and final.content[-1].input == {"city": "Paris"}
    assert final.content[0].text == "Let me check.\n"


def test_anthropic_tool_choice_and_history_translate(server: ServerThread, backend: FakeBackend) -> None:
    client = anthropic.Anthropic(base_url=server.url, api_key="x", timeout=20, max_retries=0)
    history = [*CHAT, {"role": "assistant", "content": [
        {"type": "tool_use", "id": "toolu_1", "name": "get_weather", "input": {"city": "Paris"}}]},
        {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "toolu_1", "content": "sunny"},
                                     {"type": "text", "text": "And tomorrow?"}]}]
    client.messages.create(model=MODEL, max_tokens=20, messages=history, tools=ANTHROPIC_TOOLS,
                           tool_choice={"type": "tool", "name": "get_weather", "disable_parallel_tool_use": True})
    request = backend.requests[-1]
    prompt = backend.codec.decode(list(request.prompt_token_ids))
    assert '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}' in prompt
    assert prompt.index("<tool_response>\nsunny") < prompt.index("And tomorrow?")
    assert request.grammar and "get_weather" in request.grammar
    with pytest.raises(anthropic.BadRequestError, match="tool_choice"):
        client.messages.create(model=MODEL, max_tokens=20, messages=CHAT, tools=ANTHROPIC_TOOLS,
                               tool_choice={"type": "sometimes"})


# ---------------------------------------------------------------- the Responses API


RESPONSES_TOOLS = [{"type": "function", "name": "get_weather", "description": "Weather for a city",
                    "parameters": WEATHER}]


def test_responses_returns_function_call_items_streamed_and_not(oai: openai.OpenAI, backend: FakeBackend) -> None:
    backend.reply_text = CALL_TEXT
    reply = oai.responses.create(model=MODEL, input="Weather in Paris?", tools=RESPONSES_TOOLS,
                                 max_output_tokens=200)
    assert reply.status == "completed" and [o.type for o in reply.output] == ["message", "function_call"]
    call = reply.output[1]
    assert call.name == "get_weather" and json.loads(call.arguments) == {"city": "Paris"} and call.call_id
    events = list(oai.responses.create(model=MODEL, input="Weather in Paris?", tools=RESPONSES_TOOLS,
                                       max_output_tokens=200, stream=True))
    kinds = [e.type for e in events]
    assert kinds.index("response.output_item.done") < kinds.index("response.function_call_arguments.done")
    final = events[-1].response
    assert final.status == "completed" and final.output[-1].type == "function_call"
    assert json.loads(final.output[-1].arguments) == {"city": "Paris"}
    assert "".join(e.delta for e in events if e.type == "response.output_text.delta") == "Let me check.\n"


def test_responses_history_tool_choice_and_text_format_translate(oai: openai.OpenAI, backend: FakeBackend) -> None:
    history = [{"role": "user", "content": "Weather in Paris?"},
               {"type": "function_call", "call_id": "call_1", "name": "get_weather", "arguments": '{"city": "Paris"}'},
               {"type": "function_call_output", "call_id": "call_1", "output": "sunny"}]
    oai.responses.create(model=MODEL, input=history, tools=RESPONSES_TOOLS, max_output_tokens=20,
                         tool_choice={"type": "function", "name": "get_weather"}, parallel_tool_calls=False)
    prompt = backend.codec.decode(list(backend.requests[-1].prompt_token_ids))
    assert '{"name": "get_weather", "arguments": {"city": "Paris"}}' in prompt and "<tool_response>\nsunny" in prompt
    assert backend.requests[-1].grammar
    oai.responses.create(model=MODEL, input="hi", max_output_tokens=20,
                         text={"format": {"type": "json_schema", "name": "w", "schema": WEATHER, "strict": True}})
    assert backend.requests[-1].grammar and backend.requests[-1].grammar != backend.requests[-2].grammar
    with pytest.raises(openai.BadRequestError) as e:
        oai.responses.create(model=MODEL, input="hi", max_output_tokens=20,
                             text={"format": {"type": "json_schema", "name": "w", "schema": {"type": "nonsense"}}})
    assert e.value.body["param"] == "text.format"


# ---------------------------------------------------------------- what a careful client relies on


def test_text_after_a_call_is_content_and_only_unknown_calls_become_text() -> None:
    call = '<tool_call>{"name": "f", "arguments": {"a": 1}}</tool_call>'
    unknown = '<tool_call>{"name": "nope", "arguments": {}}</tool_call>'
    assert _split("hermes", [call + "\nDone."]) == ("\nDone.", [("f", {"a": 1})], "tool_calls")
    content, calls, _ = _split("hermes", [call + "\n" + unknown])
    assert calls == [("f", {"a": 1})] and unknown in content


def test_without_parallel_calls_or_in_llama3_only_the_first_call_comes_back() -> None:
    two = '<tool_call>{"name": "f", "arguments": {}}</tool_call><tool_call>{"name": "get_weather", ' \
          '"arguments": {}}</tool_call>'
    assert [n for n, _ in _split("hermes", [two])[1]] == ["f", "get_weather"]
    assert [n for n, _ in _split("hermes", [two], parallel=False)[1]] == ["f"]
    llama = '{"name": "f", "parameters": {}}; {"name": "get_weather", "parameters": {}}'
    assert [n for n, _ in _split("llama3", [llama])[1]] == ["f"]  # its templates take one call a turn
    grammar = call_grammar(FORMATS["llama3"], (Tool("f"), Tool("g")), ToolChoice("required"), True, {})
    assert "; " not in grammar


def test_a_strict_tools_arguments_must_follow_its_schema_or_it_is_no_call() -> None:
    strict = (Tool("get_weather", parameters=WEATHER, strict=True),)
    good = '<tool_call>{"name": "get_weather", "arguments": {"city": "Paris"}}</tool_call>'
    bad = '<tool_call>{"name": "get_weather", "arguments": {"town": "Paris"}}</tool_call>'
    assert _split("hermes", [good], tools=strict)[1] == [("get_weather", {"city": "Paris"})]
    assert _split("hermes", [bad], tools=strict) == (bad, [], "stop")
    assert _split("hermes", [bad], tools=(Tool("get_weather", parameters=WEATHER),))[1]  # not strict: a call


def test_a_forced_call_to_a_schema_with_refs_resolves_them(codec: PromptCodec) -> None:
    params = {"type": "object", "$defs": {"Zone": {"enum": ["UTC", "CET"]}},
              "properties": {"zone": {"$ref": "#/$defs/Zone"}}, "required": ["zone"], "additionalProperties": False}
    for fmt in sorted(FORMATS):
        grammar = lark_grammar(call_grammar(FORMATS[fmt], (Tool("get_time", parameters=params),),
                                            ToolChoice("required"), False, {}))
        check_grammar(grammar, codec.grammar_tokenizer)
        (name, arguments), = FORMATS[fmt].parse(_greedy_under(grammar, codec, 0))
        jsonschema.validate(arguments, params)


def test_mistral_ids_are_nine_characters_and_history_ids_map_stably() -> None:
    fmt = FORMATS["mistral"]
    assert len(fmt.call_id()) == 9 and fmt.call_id().isalnum()
    assert fmt.history_id("call_abcdef0123456789") == fmt.history_id("call_abcdef0123456789")
    assert len(fmt.history_id("toolu_01XYZ")) == 9 and fmt.history_id("a1B2c3D4e") == "a1B2c3D4e"
    assert FORMATS["hermes"].history_id("call_x") == "call_x"


def test_mistral_v11_calls_with_a_call_id_parse_and_its_grammar_writes_that_form(codec: PromptCodec) -> None:
    assert FORMATS["mistral"].parse('[TOOL_CALLS]f[CALL_ID]a1b2c3d4e[ARGS]{"a": 1}') == [("f", {"a": 1})]
    grammar = call_grammar(FORMATS["mistral"], (Tool("get_time", parameters=CLOCK),), ToolChoice("required"),
                           False, {}, v11=True)
    text = _greedy_under(lark_grammar(grammar), codec, 1)
    assert text.startswith("[TOOL_CALLS]get_time[ARGS]{") and FORMATS["mistral"].parse(text)[0][0] == "get_time"


def test_an_xml_tool_format_is_not_taken_for_hermes_json() -> None:
    qwen3_coder = "{% for t in tools %}{{ t }}{% endfor %}<tool_call>\n<function={{ name }}>\n<parameter="
    with pytest.raises(NoToolSupport, match="does not parse"):
        detect_format(qwen3_coder)


def test_a_stop_string_never_cuts_a_call(oai: openai.OpenAI, backend: FakeBackend, server: ServerThread) -> None:
    backend.reply_text = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'
    reply = oai.chat.completions.create(model=MODEL, messages=CHAT, tools=TOOLS, max_tokens=200, stop=["\n"])
    assert reply.choices[0].finish_reason == "tool_calls" and reply.choices[0].message.tool_calls
    backend.reply_text = "Sure.\nLet me look." + backend.reply_text  # the stop cuts the content before any call
    cut = oai.chat.completions.create(model=MODEL, messages=CHAT, tools=TOOLS, max_tokens=200, stop=["\n"])
    assert (cut.choices[0].message.content, cut.choices[0].finish_reason) == ("Sure.", "stop")
    client = anthropic.Anthropic(base_url=server.url, api_key="x", timeout=20, max_retries=0)
    backend.reply_text = CALL_TEXT
    message = client.messages.create(model=MODEL, max_tokens=200, messages=CHAT, tools=ANTHROPIC_TOOLS,
                                     stop_sequences=["</tool_call>"])
    assert message.stop_reason == "tool_use"  # not stop_sequence: the call is whole


def test_a_json_schema_description_is_refused_as_it_would_not_reach_the_model(oai: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError, match="description"):
        oai.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=5, response_format={
            "type": "json_schema", "json_schema": {"name": "w", "schema": WEATHER, "description": "weather"}})


def test_ollama_format_with_a_raw_prompt_is_a_clear_400(server: ServerThread) -> None:
    request = urllib.request.Request(server.url + "/api/generate", method="POST", data=json.dumps(
        {"model": MODEL, "prompt": "hi", "raw": True, "format": "json", "stream": False}).encode())
    with pytest.raises(urllib.error.HTTPError) as e:
        urllib.request.urlopen(request, timeout=20)
    assert e.value.code == 400 and "raw" in json.loads(e.value.read())["error"]


def test_an_anthropic_stream_of_calls_alone_has_no_empty_text_block(server: ServerThread,
                                                                     backend: FakeBackend) -> None:
    backend.reply_text = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'
    client = anthropic.Anthropic(base_url=server.url, api_key="x", timeout=20, max_retries=0)
    events = list(client.messages.create(model=MODEL, max_tokens=200, messages=CHAT, tools=ANTHROPIC_TOOLS,
                                         stream=True))
    starts = [e.content_block for e in events if e.type == "content_block_start"]
    assert [(b.type, b.name) for b in starts] == [("tool_use", "get_weather")]
    assert [e.index for e in events if e.type == "content_block_stop"] == [0]
    with client.messages.stream(model=MODEL, max_tokens=200, messages=CHAT, tools=ANTHROPIC_TOOLS) as stream:
        final = stream.get_final_message()
    assert [b.type for b in final.content] == ["tool_use"] and final.stop_reason == "tool_use"


def test_tool_choice_none_biases_a_one_token_marker_away(server: ServerThread, backend: FakeBackend,
                                                         oai: openai.OpenAI) -> None:
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_str(backend.codec.bundle.tokenizer_json)
    tokenizer.add_tokens(["<tool_call>", "</tool_call>"])  # as in Qwen's vocabulary: one token each
    bundle = backend.codec.bundle
    backend.codec = PromptCodec(type(bundle)(tokenizer.to_str(), bundle.chat_template, bundle.bos_token,
                                             bundle.eos_token))
    marker = tokenizer.token_to_id("<tool_call>")
    oai.chat.completions.create(model=MODEL, messages=CHAT, tools=TOOLS, tool_choice="none", max_tokens=5)
    oai.chat.completions.create(model=MODEL, messages=CHAT, tools=TOOLS, max_tokens=5)
    oai.chat.completions.create(model=MODEL, messages=CHAT, tools=TOOLS, tool_choice="none", max_tokens=5,
                                logit_bias={str(marker): 5})
    none, auto, mine = backend.requests
    assert (marker, -100.0) in none.logit_bias and not auto.logit_bias
    assert mine.logit_bias == ((marker, 5.0),)  # the client's own bias on it wins
