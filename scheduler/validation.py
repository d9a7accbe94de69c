"""Validate OpenAI request bodies into ``ParsedRequest``; bad input -> ``APIError`` (400).

Accept only what we honour: every field of a body is either read here and
has its effect, or refused with a 400 naming it (``param``). Three lists say
which (docs/operations.md, "Request parameters"):

* the fields each route honours (``CHAT_FIELDS``, ``COMPLETION_FIELDS``);
* ``NOT_YET``: OpenAI fields the server cannot honour yet, each with the
  values that ask for nothing (``n: 1``, ``tools: []``, ``echo: false``...),
  which are accepted; any other value is refused. When the server learns one,
  delete its line there and read the field in ``parse_body``;
* anything else is an unknown field: refused, as OpenAI refuses it.

``null`` is the same as leaving a field out, as in OpenAI's API.
"""
from __future__ import annotations

import json
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass

from aiohttp import web

from scheduler.request import KV_CODEC_MODES, PLACEMENT_MODES
from scheduler.structured import GrammarError, response_format_grammar
from scheduler.tools import MAX_TOOLS, TOOL_NAME, Tool, ToolChoice

MAX_STOP_STRINGS = 4
# OpenAI's ranges; the decode engines check the same ones (workers/engines/sampling.py,
# which the scheduler may not import: tests/test_sampling_params.py holds the two equal).
MAX_PENALTY = 2.0
MAX_LOGIT_BIAS = 100.0
MAX_LOGIT_BIAS_TOKENS = 1024
MAX_TOP_LOGPROBS = 20  # chat's top_logprobs
MAX_COMPLETION_LOGPROBS = 5  # the legacy completions' logprobs

# The fields each route reads and honours (vLLM's top_k and ignore_eos included; ``user``
# is logged with the request; ``pdcluster`` is this server's extension object).
COMMON_FIELDS = frozenset({
    "model", "max_tokens", "temperature", "top_p", "top_k", "seed", "stop", "stream", "stream_options",
    "presence_penalty", "frequency_penalty", "logit_bias", "logprobs", "user", "pdcluster", "ignore_eos",
})
CHAT_FIELDS = COMMON_FIELDS | {"messages", "max_completion_tokens", "top_logprobs", "tools", "tool_choice",
                               "parallel_tool_calls", "response_format"}
COMPLETION_FIELDS = COMMON_FIELDS | {"prompt"}
STREAM_OPTIONS = frozenset({"include_usage"})
EXTENSION_FIELDS = frozenset({"placement", "kv_codec"})  # inside "pdcluster"


def _is(*values: object) -> Callable[[object], bool]:
    """A predicate: the value is None or equals one of ``values`` with the same type (``1`` is not ``True``)."""
    return lambda v: v is None or any(type(v) is type(x) and v == x for x in values)


# Not supported yet: field -> (what it asks for, whether a value asks for nothing).
# Such values are accepted (they change nothing); any other is a 400 naming the field.
NOT_YET: dict[str, tuple[str, Callable[[object], bool]]] = {
    "functions": ("the deprecated 'functions' is not supported: send 'tools'", _is([])),
    "function_call": ("the deprecated 'function_call' is not supported: send 'tool_choice'", _is("none")),
    "n": ("only one choice per request (n=1) is supported", _is(1)),
    "best_of": ("only best_of=1 is supported", _is(1)),
    "echo": ("echoing the prompt is not supported", _is(False)),
    "suffix": ("suffix (insertion) is not supported", _is("")),
    "audio": ("audio output is not supported", _is()),
    "modalities": ("only text output is supported", _is(["text"])),
    "prediction": ("predicted outputs are not supported", _is()),
    "reasoning_effort": ("this server has no reasoning-effort control", _is()),
    "verbosity": ("this server has no verbosity control", _is()),
    "web_search_options": ("web search is not supported", _is()),
    "store": ("completions are not stored", _is(False)),
    "metadata": ("completions are not stored, so they carry no metadata", _is({})),
    "service_tier": ("there is one service tier", _is("auto", "default")),
}
# In a chat message: field -> (what it asks for, whether a value asks for nothing).
MESSAGE_NOT_YET: dict[str, tuple[str, Callable[[object], bool]]] = {
    "function_call": ("the deprecated 'function_call' is not supported: send 'tool_calls'", _is()),
    "name": ("participant names are not passed to the chat template", _is()),
    "audio": ("audio is not supported", _is()),
    "refusal": ("refusals are not passed to the chat template", _is()),
    "annotations": ("annotations are not passed to the chat template", _is([])),
}
ROLES = ("system", "developer", "user", "assistant", "tool")  # "function" is the deprecated "tool"


class APIError(Exception):
    """An error returned to the client in OpenAI's shape."""

    def __init__(self, status: int, message: str, type_: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type_, param, code
        self.headers = dict(headers or {})

    def body(self) -> dict:
        """``{"error": {"message", "type", "param", "code"}}``: OpenAI's error shape."""
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def response(self) -> web.Response:
        """The error as an HTTP response (with ``headers``, e.g. ``Retry-After``)."""
        return web.json_response(self.body(), status=self.status, headers=self.headers)


@dataclass(frozen=True)
class ParsedRequest:
    """A chat or text completion request, checked field by field."""

    model: str
    messages: list[dict] | None  # chat
    prompt: str  # text completion
    max_tokens: int | None
    temperature: float
    top_p: float
    top_k: int
    seed: int | None
    stop: tuple[str, ...]
    stream: bool
    include_usage: bool
    placement: str | None
    ignore_eos: bool
    kv_codec: str | None = None  # pdcluster.kv_codec: the KV codec hint (None: the server's --kv-codec)
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: tuple[tuple[int, float], ...] = ()  # (token id, bias), ids not yet checked against a vocabulary
    # None: no logprobs; k >= 0: each token's logprob and its k most likely alternatives
    # (chat: logprobs=true with top_logprobs=k; completions: logprobs=k)
    logprobs: int | None = None
    user: str | None = None  # the client's end-user id, logged with the request
    # Tool calling (scheduler/tools.py): the functions offered, and whether/which must be called
    tools: tuple[Tool, ...] = ()
    tool_choice: ToolChoice = ToolChoice("none")
    parallel_tool_calls: bool = True
    # response_format's grammar (scheduler/structured.py): None for plain text
    response_grammar: str | None = None


def parse_body(body: object, *, chat: bool) -> ParsedRequest:
    """Check every field: each one we honour is read, anything else is a 400 naming it."""
    if not isinstance(body, dict):
        raise APIError(400, "request body must be a JSON object")
    body = {name: value for name, value in body.items() if value is not None}  # null: as if left out
    refuse_unhonoured(body, CHAT_FIELDS if chat else COMPLETION_FIELDS)
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise APIError(400, "'model' is required and must be a string", param="model")
    messages = _messages(body) if chat else None
    prompt = "" if chat else _prompt(body)
    stream_options = body.get("stream_options", {})
    if not isinstance(stream_options, dict):
        raise APIError(400, "'stream_options' must be an object", param="stream_options")
    stream_options = {name: value for name, value in stream_options.items() if value is not None}
    refuse_unhonoured(stream_options, STREAM_OPTIONS, where="stream_options.")
    tools, tool_choice = _tools(body)
    response_grammar = _response_format(body)
    if response_grammar is not None and tool_choice.mode != "none":
        raise APIError(400, "'response_format' and 'tools' cannot both shape one answer: send tool_choice "
                       "'none' to get the formatted answer, or leave response_format out", param="response_format")
    if _bool(body, "ignore_eos") and (response_grammar is not None or tool_choice.forces_call):
        raise APIError(400, "'ignore_eos' cannot go with constrained output (response_format or a forced "
                       "tool call), which ends where its grammar does", param="ignore_eos")
    return ParsedRequest(
        model=model, messages=messages, prompt=prompt,
        max_tokens=_max_tokens(body),
        temperature=_number(body, "temperature", 1.0, 0.0, 2.0),
        top_p=_number(body, "top_p", 1.0, 0.0, 1.0, open_low=True),
        top_k=int(_number(body, "top_k", 0, 0, 1 << 20, integer=True)),
        seed=_seed(body),
        stop=_stop(body),
        stream=_bool(body, "stream"),
        include_usage=_bool(stream_options, "include_usage", where="stream_options."),
        placement=_placement(body),
        ignore_eos=_bool(body, "ignore_eos"),
        kv_codec=_kv_codec(body),
        presence_penalty=float(_number(body, "presence_penalty", 0.0, -MAX_PENALTY, MAX_PENALTY)),
        frequency_penalty=float(_number(body, "frequency_penalty", 0.0, -MAX_PENALTY, MAX_PENALTY)),
        logit_bias=_logit_bias(body),
        logprobs=_chat_logprobs(body) if chat else _completion_logprobs(body),
        user=_user(body),
        tools=tools, tool_choice=tool_choice,
        parallel_tool_calls=_bool(body, "parallel_tool_calls", default=True),
        response_grammar=response_grammar,
    )


def refuse_unhonoured(body: dict, honoured: Collection[str], *, where: str = "",
                      not_yet: Mapping[str, tuple[str, Callable[[object], bool]]] = NOT_YET) -> None:
    """400 naming the first field of ``body`` that is neither in ``honoured`` nor
    a ``not_yet`` field set to a value that asks for nothing; ``where`` prefixes
    the name in the error (``"messages[0]."``)."""
    for name, value in body.items():
        if name in honoured:
            continue
        if name in not_yet:
            why, asks_nothing = not_yet[name]
            if asks_nothing(value):
                continue
            raise APIError(400, f"'{where}{name}' is not supported: {why}", param=f"{where}{name}",
                           code="unsupported_parameter")
        raise APIError(400, f"Unrecognized request argument supplied: {where}{name}", param=f"{where}{name}",
                       code="unknown_parameter")


def check_logit_bias(parsed: ParsedRequest, vocab_size: int) -> None:
    """400 unless every token id in ``parsed.logit_bias`` is below ``vocab_size`` (the tokenizer's)."""
    bad = [token for token, _ in parsed.logit_bias if token >= vocab_size]
    if bad:
        raise APIError(400, f"'logit_bias' names token id {bad[0]}, outside the model's vocabulary of "
                       f"{vocab_size} tokens", param="logit_bias")


def _messages(body: dict) -> list[dict]:
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise APIError(400, "'messages' must be a non-empty array", param="messages")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str):
            raise APIError(400, f"messages[{i}] must be an object with a 'role'", param=f"messages[{i}]")
        m = {name: value for name, value in m.items() if value is not None}
        fields = {"assistant": ("role", "content", "tool_calls"), "tool": ("role", "content", "tool_call_id")}
        refuse_unhonoured(m, fields.get(m["role"], ("role", "content")), where=f"messages[{i}].",
                          not_yet=MESSAGE_NOT_YET)
        if m["role"] not in ROLES:
            why = "send 'tool' messages instead" if m["role"] == "function" else f"expected one of {', '.join(ROLES)}"
            raise APIError(400, f"messages[{i}].role {m['role']!r} is not supported: {why}",
                           param=f"messages[{i}].role")
        message = {"role": m["role"], "content": _content(m.get("content"), i)}
        if m["role"] == "tool":
            if not isinstance(m.get("tool_call_id"), str):
                raise APIError(400, f"messages[{i}].tool_call_id is required for a 'tool' message",
                               param=f"messages[{i}].tool_call_id")
            message["tool_call_id"] = m["tool_call_id"]
        if m.get("tool_calls"):
            message["tool_calls"] = _history_tool_calls(m["tool_calls"], i)
        out.append(message)
    return out


def _history_tool_calls(calls: object, i: int) -> list[dict]:
    """An assistant turn's ``tool_calls`` for the chat template: arguments as objects (as
    transformers' templates expect them), each checked to be a JSON object."""
    where = f"messages[{i}].tool_calls"
    if not isinstance(calls, list):
        raise APIError(400, f"'{where}' must be an array", param=where)
    out = []
    for j, call in enumerate(calls):
        function = call.get("function") if isinstance(call, dict) else None
        if not isinstance(function, dict) or call.get("type", "function") != "function" \
                or not isinstance(function.get("name"), str) or not isinstance(function.get("arguments"), str):
            raise APIError(400, f"'{where}[{j}]' must be {{\"id\", \"type\": \"function\", \"function\": "
                           "{\"name\", \"arguments\": JSON text}}", param=f"{where}[{j}]")
        try:
            arguments = json.loads(function["arguments"])
        except json.JSONDecodeError:
            arguments = None
        if not isinstance(arguments, dict):
            raise APIError(400, f"'{where}[{j}].function.arguments' must be the JSON text of an object",
                           param=f"{where}[{j}].function.arguments")
        out.append({"id": str(call.get("id", "")), "type": "function",
                    "function": {"name": function["name"], "arguments": arguments}})
    return out


def _tools(body: dict) -> tuple[tuple[Tool, ...], ToolChoice]:
    """``tools`` and ``tool_choice`` (default ``auto`` with tools, ``none`` without), checked as OpenAI checks them."""
    raw = body.get("tools", [])
    if not isinstance(raw, list) or len(raw) > MAX_TOOLS:
        raise APIError(400, f"'tools' must be an array of at most {MAX_TOOLS} tools", param="tools")
    tools = tuple(_tool(t, i) for i, t in enumerate(raw))
    if len({t.name for t in tools}) != len(tools):
        raise APIError(400, "'tools' names one function twice", param="tools")
    choice = body.get("tool_choice", "auto" if tools else "none")
    if choice in ("none", "auto", "required"):
        mode, name = choice, None
    elif isinstance(choice, dict) and choice.get("type") == "function" and isinstance(choice.get("function"), dict) \
            and isinstance(choice["function"].get("name"), str) and set(choice) == {"type", "function"}:
        mode, name = "function", choice["function"]["name"]
    else:
        raise APIError(400, "'tool_choice' must be 'none', 'auto', 'required' or "
                       "{\"type\": \"function\", \"function\": {\"name\": ...}}", param="tool_choice")
    if not tools and mode != "none":
        raise APIError(400, "'tool_choice' is only allowed when 'tools' are given", param="tool_choice")
    if name is not None and name not in {t.name for t in tools}:
        raise APIError(400, f"'tool_choice' names function {name!r}, which is not among 'tools'", param="tool_choice")
    return tools, ToolChoice(mode, name)


def _tool(tool: object, i: int) -> Tool:
    where = f"tools[{i}]"
    if not isinstance(tool, dict) or tool.get("type") != "function" or not isinstance(tool.get("function"), dict):
        raise APIError(400, f"'{where}' must be {{\"type\": \"function\", \"function\": {{...}}}}", param=where)
    refuse_unhonoured({k: v for k, v in tool.items() if v is not None}, ("type", "function"), where=f"{where}.")
    function = {k: v for k, v in tool["function"].items() if v is not None}
    refuse_unhonoured(function, ("name", "description", "parameters", "strict"), where=f"{where}.function.")
    name, description = function.get("name"), function.get("description", "")
    if not isinstance(name, str) or not TOOL_NAME.match(name):
        raise APIError(400, f"'{where}.function.name' must be 1-64 letters, digits, '_' or '-'",
                       param=f"{where}.function.name")
    if not isinstance(description, str):
        raise APIError(400, f"'{where}.function.description' must be a string", param=f"{where}.function.description")
    parameters = function.get("parameters")
    if parameters is not None and not isinstance(parameters, dict):
        raise APIError(400, f"'{where}.function.parameters' must be a JSON schema object",
                       param=f"{where}.function.parameters")
    if "strict" in function and not isinstance(function["strict"], bool):
        raise APIError(400, f"'{where}.function.strict' must be a boolean", param=f"{where}.function.strict")
    return Tool(name, description, parameters, strict=function.get("strict", False))


def _response_format(body: dict) -> str | None:
    """``response_format`` as a grammar (None for text); 400 naming what is wrong."""
    value = body.get("response_format")
    if value is None:
        return None
    if not isinstance(value, dict):
        raise APIError(400, "'response_format' must be an object", param="response_format")
    try:
        return response_format_grammar(value)
    except GrammarError as e:
        raise APIError(400, f"'response_format': {e}", param="response_format") from None


def _content(content: object, i: int) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):  # [{"type": "text", "text": ...}, ...]
        parts = []
        for part in content:
            if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise APIError(400, f"messages[{i}].content: only text parts are supported", param=f"messages[{i}].content")
            parts.append(part["text"])
        return "".join(parts)
    if content is None:
        return ""
    raise APIError(400, f"messages[{i}].content must be a string or an array of text parts", param=f"messages[{i}].content")


def _prompt(body: dict) -> str:
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
        prompt = prompt[0]
    if not isinstance(prompt, str) or not prompt:
        raise APIError(400, "'prompt' must be a non-empty string", param="prompt")
    return prompt


def _max_tokens(body: dict) -> int | None:
    """``max_completion_tokens`` (chat), or its older name ``max_tokens``; both only when they agree."""
    values = {}
    for name in ("max_completion_tokens", "max_tokens"):
        value = body.get(name)
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise APIError(400, f"'{name}' must be an integer >= 1", param=name)
        values[name] = value
    if len(set(values.values())) > 1:
        raise APIError(400, "'max_completion_tokens' and 'max_tokens' disagree; send one of them",
                       param="max_completion_tokens")
    return next(iter(values.values()), None)


def _logit_bias(body: dict) -> tuple[tuple[int, float], ...]:
    """``{"token id": bias}`` -> ``((id, bias), ...)`` sorted by id; ids are checked
    against the model's vocabulary once it is known (``check_logit_bias``)."""
    bias = body.get("logit_bias", {})
    if not isinstance(bias, dict) or len(bias) > MAX_LOGIT_BIAS_TOKENS:
        raise APIError(400, f"'logit_bias' must map at most {MAX_LOGIT_BIAS_TOKENS} token ids to biases",
                       param="logit_bias")
    out = []
    for key, value in bias.items():
        if not (isinstance(key, str) and key.isascii() and key.isdigit()):
            raise APIError(400, f"'logit_bias' keys must be token ids (\"123\"), got {key!r}", param="logit_bias")
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not -MAX_LOGIT_BIAS <= value <= MAX_LOGIT_BIAS:
            raise APIError(400, f"'logit_bias' values must be numbers in [-{MAX_LOGIT_BIAS:g}, {MAX_LOGIT_BIAS:g}], "
                           f"got {value!r} for token {key}", param="logit_bias")
        out.append((int(key), float(value)))
    return tuple(sorted(out))


def _chat_logprobs(body: dict) -> int | None:
    """Chat: ``logprobs`` (bool) and ``top_logprobs`` (0..20, only with logprobs)."""
    top = body.get("top_logprobs")
    if top is not None and (isinstance(top, bool) or not isinstance(top, int) or not 0 <= top <= MAX_TOP_LOGPROBS):
        raise APIError(400, f"'top_logprobs' must be an integer in [0, {MAX_TOP_LOGPROBS}]", param="top_logprobs")
    if not _bool(body, "logprobs"):
        if top is not None:
            raise APIError(400, "'top_logprobs' needs 'logprobs': true", param="top_logprobs")
        return None
    return top or 0


def _completion_logprobs(body: dict) -> int | None:
    """Completions: ``logprobs`` is how many alternatives (0..5) besides the chosen token."""
    value = body.get("logprobs")
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= MAX_COMPLETION_LOGPROBS:
        raise APIError(400, f"'logprobs' must be an integer in [0, {MAX_COMPLETION_LOGPROBS}]", param="logprobs")
    return value


def _user(body: dict) -> str | None:
    user = body.get("user")
    if user is not None and not isinstance(user, str):
        raise APIError(400, "'user' must be a string", param="user")
    return user


def _number(body: dict, name: str, default: float, low: float, high: float,
            *, open_low: bool = False, integer: bool = False) -> float:
    value = body.get(name)
    if value is None:
        return default
    ok_type = isinstance(value, int) if integer else isinstance(value, (int, float))
    if isinstance(value, bool) or not ok_type or value > high or value < low or (open_low and value == low):
        bound = f"({low}, {high}]" if open_low else f"[{low}, {high}]"
        raise APIError(400, f"'{name}' must be a {'integer' if integer else 'number'} in {bound}", param=name)
    return value


def _seed(body: dict) -> int | None:
    seed = body.get("seed")
    if seed is None:
        return None
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise APIError(400, "'seed' must be an integer", param="seed")
    return seed % (1 << 63)


def _stop(body: dict) -> tuple[str, ...]:
    stop = body.get("stop")
    if stop is None:
        return ()
    if isinstance(stop, str):
        stop = [stop]
    if not isinstance(stop, list) or len(stop) > MAX_STOP_STRINGS or not all(isinstance(s, str) for s in stop):
        raise APIError(400, f"'stop' must be a string or up to {MAX_STOP_STRINGS} strings", param="stop")
    return tuple(stop)


def _bool(body: dict, name: str, *, where: str = "", default: bool = False) -> bool:
    value = body.get(name, default)
    if not isinstance(value, bool):
        raise APIError(400, f"'{where}{name}' must be a boolean", param=f"{where}{name}")
    return value


def _extension(body: dict) -> dict:
    """The body's ``pdcluster`` object ({} when absent)."""
    ext = body.get("pdcluster")
    if ext is None:
        return {}
    if not isinstance(ext, dict):
        raise APIError(400, "'pdcluster' must be an object", param="pdcluster")
    refuse_unhonoured({k: v for k, v in ext.items() if v is not None}, EXTENSION_FIELDS, where="pdcluster.")
    return ext


def _kv_codec(body: dict) -> str | None:
    """``pdcluster.kv_codec``: the codec of this request's KV transfer if it has one
    (auto, raw, int8, fp8); it overrides the server's ``--kv-codec``."""
    codec = _extension(body).get("kv_codec")
    if codec is not None and codec not in KV_CODEC_MODES:
        raise APIError(400, f"'pdcluster.kv_codec' must be one of {list(KV_CODEC_MODES)}", param="pdcluster.kv_codec")
    return codec


def _placement(body: dict) -> str | None:
    placement = _extension(body).get("placement")
    if placement is not None and placement not in PLACEMENT_MODES:
        raise APIError(400, f"'pdcluster.placement' must be one of {list(PLACEMENT_MODES)}", param="pdcluster.placement")
    return placement


# ---------------------------------------------------------------- other API dialects (docs/api.md)


def refuse_unsupported(body: dict, supported: Collection[str], reasons: Mapping[str, str], *,
                       where: str = "") -> None:
    """400 naming the first field of ``body`` outside ``supported`` that is set (not null, "", [] or {}).

    The Ollama, Anthropic and Responses routes accept only what they honour;
    ``reasons`` says why a known field is refused, ``where`` prefixes the name
    (``"options."``)."""
    for name, value in body.items():
        if name in supported or value is None or value in ("", [], {}):
            continue
        why = reasons.get(name, "pdcluster does not support it")
        raise APIError(400, f"'{where}{name}' is not supported: {why}", param=f"{where}{name}")


def parse_translated(body: dict, names: Mapping[str, str], *, chat: bool = True) -> ParsedRequest:
    """``parse_body`` for a body another dialect translated into the chat-completions shape;
    an error names the client's own field (``names``: chat-completions field -> the dialect's)."""
    try:
        return parse_body(body, chat=chat)
    except APIError as e:
        raise renamed(e, names) from None


def renamed(error: APIError, names: Mapping[str, str]) -> APIError:
    """``error`` naming the client's own field (``names``: chat-completions field -> the dialect's)."""
    name = names.get(error.param or "")
    if name is None:
        return error
    return APIError(error.status, error.message.replace(f"'{error.param}'", f"'{name}'"), error.type, name,
                    error.code, error.headers)
