"""The Ollama API: ``/api/chat``, ``/api/generate``, ``/api/tags``, ``/api/show``, ``/api/version``.

Each body is translated into the chat-completions body (``options.num_predict``
becomes ``max_tokens``; ``temperature``, ``top_p``, ``top_k``, ``seed`` and
``stop`` keep their names), so the OpenAI routes' ``parse_body`` checks it and
``start_generation`` runs it: the same chat template, stop strings and token
counts. ``/api/generate`` renders ``system`` + ``prompt`` through the chat
template, or sends ``prompt`` as it is with ``"raw": true``.

Answers stream as NDJSON by default (one object a line, the last with
``"done": true``, ``done_reason`` and the token counts); ``"stream": false``
answers one object. An empty ``messages`` or ``prompt`` answers at once with
``done_reason: "load"``, as Ollama does (the model is always loaded here).
``tools`` go to the chat template as on the OpenAI route (Ollama has no
``tool_choice``: the model decides); history ``tool_calls`` carry arguments as
objects and ``tool`` messages name their function in ``tool_name``; a reply's
calls come in ``message.tool_calls`` (a stream sends them in a line of their
own after the text) and end as ``done_reason: "stop"``, as Ollama's do.
``format`` ("json" or a JSON schema) constrains decoding, as
``response_format`` does (scheduler/structured.py).
Errors are Ollama's ``{"error": "..."}``; a stream that fails after its first
line ends with one such line. Any field or option pdcluster does not honour is
a 400 naming it (docs/api.md lists them).
"""
from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from importlib import metadata

from aiohttp import web

from scheduler.api import BACKEND_KEY, ERROR_SHAPES_KEY, start_generation
from scheduler.api_stream import collect, stream_deltas
from scheduler.tools import NoToolSupport, ToolCall, detect_format
from scheduler.request import Backend, FinishEvent, ModelEntry
from scheduler.validation import APIError, parse_translated, refuse_unsupported, renamed

ROUTES = ("/api/chat", "/api/generate", "/api/tags", "/api/show", "/api/version")
OPTIONS = ("temperature", "top_p", "top_k", "seed", "stop", "num_predict", "presence_penalty", "frequency_penalty")
OPTION_NAMES = {name: f"options.{name}" for name in OPTIONS} | {"max_tokens": "options.num_predict"}
CHAT_FIELDS = ("model", "messages", "stream", "options", "pdcluster", "tools", "format")
GENERATE_FIELDS = ("model", "prompt", "system", "raw", "stream", "options", "pdcluster", "format")
MESSAGE_FIELDS = ("role", "content", "tool_calls", "tool_name")
REASONS = {
    "images": "images are not supported: the served models read text",
    "think": "thinking control is not supported",
    "keep_alive": "models stay loaded on their workers for as long as the workers run; keep_alive cannot change that",
    "suffix": "fill-in-the-middle is not supported",
    "template": "the model's own chat template applies (or send \"raw\": true)",
    "context": "send the conversation as /api/chat messages instead",
    "logprobs": "log probabilities are not returned",
    "top_logprobs": "log probabilities are not returned",
    "thinking": "thinking content is not supported",
    "num_ctx": "the context length is the model's, fixed by the cluster",
}
NS = 1_000_000_000


def add_routes(app: web.Application) -> None:
    """Register the Ollama routes and Ollama's error shape for everything under ``/api/``."""
    app[ERROR_SHAPES_KEY]["/api/"] = _error_response
    app.router.add_post("/api/chat", _chat)
    app.router.add_post("/api/generate", _generate)
    app.router.add_get("/api/tags", _tags)
    app.router.add_post("/api/show", _show)
    app.router.add_get("/api/version", _version)
    app.router.add_route("*", "/api/{name:.*}", _not_served)


def _error_response(error: APIError) -> web.Response:
    return web.json_response({"error": error.message}, status=error.status, headers=error.headers)


async def _chat(request: web.Request) -> web.StreamResponse:
    return await _run(request, chat=True)


async def _generate(request: web.Request) -> web.StreamResponse:
    return await _run(request, chat=False)


async def _run(request: web.Request, *, chat: bool) -> web.StreamResponse:
    arrived = time.monotonic()
    body = await _json_object(request)
    refuse_unsupported(body, CHAT_FIELDS if chat else GENERATE_FIELDS, REASONS)
    model = body.get("model")
    shape = _OllamaShape(model=model if isinstance(model, str) else "", chat=chat, arrived=arrived)
    openai_body = {**_sampling(body.get("options")), **_prompt(body, chat)}
    openai_body |= {k: body[k] for k in ("model", "pdcluster", "tools") if k in body}
    if body.get("format") not in (None, ""):
        if "prompt" in openai_body:  # a raw prompt: the chat route, which reads response_format, is not used
            raise APIError(400, "'format' cannot go with \"raw\": true: send the prompt through the chat "
                           "template (raw false)", param="format")
        openai_body["response_format"] = _response_format(body["format"])
    openai_body["stream"] = body.get("stream", True)  # Ollama streams unless told not to
    if not isinstance(openai_body["stream"], bool):
        raise APIError(400, "'stream' must be a boolean", param="stream")
    if not openai_body.get("messages") and not openai_body.get("prompt"):
        return _loaded(request, shape, openai_body)
    names = OPTION_NAMES | {"response_format": "format"}
    parsed = parse_translated(openai_body, names, chat="messages" in openai_body)
    try:
        gen, deltas = start_generation(request, parsed, arrived)
    except APIError as e:  # a schema that cannot constrain decoding, found against the tokenizer
        raise renamed(e, names) from None
    if parsed.stream:
        return await stream_deltas(request, deltas, shape, gen.request_id)
    text, calls, finish = await collect(deltas)
    return web.json_response(shape.final(text, finish, calls))


def _response_format(value: object) -> dict:
    """Ollama's ``format``: "json" (any JSON value: here, an object, as OpenAI's JSON mode) or a JSON schema."""
    if value == "json":
        return {"type": "json_object"}
    if isinstance(value, dict):
        return {"type": "json_schema", "json_schema": {"name": "format", "schema": value}}
    raise APIError(400, "'format' must be \"json\" or a JSON schema object", param="format")


async def _json_object(request: web.Request) -> dict:
    try:
        body = await request.json()
    except ValueError:  # json.JSONDecodeError and UnicodeDecodeError
        raise APIError(400, "request body is not valid JSON") from None
    if not isinstance(body, dict):
        raise APIError(400, "request body must be a JSON object")
    return body


def _sampling(options: object) -> dict:
    """``options`` as chat-completions fields; 400 for any option pdcluster does not honour."""
    if options is None:
        return {}
    if not isinstance(options, dict):
        raise APIError(400, "'options' must be an object", param="options")
    refuse_unsupported(options, OPTIONS, REASONS, where="options.")
    out = {name: options[name] for name in OPTIONS if name != "num_predict" and options.get(name) is not None}
    num_predict = options.get("num_predict")
    if num_predict is not None:
        if isinstance(num_predict, bool) or not isinstance(num_predict, int) or num_predict < 1:
            raise APIError(400, "'options.num_predict' must be an integer >= 1: pdcluster always bounds a "
                           "generation (omit it for up to 256 tokens)", param="options.num_predict")
        out["max_tokens"] = num_predict
    return out


def _prompt(body: dict, chat: bool) -> dict:
    """The chat-completions ``messages`` (or ``prompt`` for a raw generate) of an Ollama body."""
    if chat:
        messages = body.get("messages") or []
        if not isinstance(messages, list):
            raise APIError(400, "'messages' must be an array", param="messages")
        for i, message in enumerate(messages):
            if not isinstance(message, dict):
                raise APIError(400, f"messages[{i}] must be an object", param=f"messages[{i}]")
            refuse_unsupported(message, MESSAGE_FIELDS, REASONS, where=f"messages[{i}].")
        return {"messages": [_message(m, i) for i, m in enumerate(messages)]}
    prompt, system = body.get("prompt") or "", body.get("system")
    if not isinstance(prompt, str):
        raise APIError(400, "'prompt' must be a string", param="prompt")
    if body.get("raw", False) is True:
        if system:
            raise APIError(400, "'system' cannot apply to a raw prompt: put it in the prompt", param="system")
        return {"prompt": prompt}
    if body.get("raw", False) is not False:
        raise APIError(400, "'raw' must be a boolean", param="raw")
    if system is not None and not isinstance(system, str):
        raise APIError(400, "'system' must be a string", param="system")
    if not prompt:
        return {"messages": []}
    return {"messages": [*([{"role": "system", "content": system}] if system else []),
                         {"role": "user", "content": prompt}]}


def _message(message: dict, i: int) -> dict:
    """An Ollama chat message in OpenAI's shape: tool calls carry arguments as objects (OpenAI: JSON
    text) and no ids; a tool result names its function (``tool_name``), not a call id."""
    out = {"role": message.get("role"), "content": message.get("content")}
    calls = message.get("tool_calls")
    if calls:
        if not isinstance(calls, list) or not all(isinstance(c, dict) and isinstance(c.get("function"), dict)
                                                  for c in calls):
            raise APIError(400, f"'messages[{i}].tool_calls' must be an array of {{\"function\": {{\"name\", "
                           "\"arguments\"}}}}", param=f"messages[{i}].tool_calls")
        out["tool_calls"] = [{"id": f"call_{i}_{j}", "type": "function",
                              "function": {"name": c["function"].get("name"),
                                           "arguments": json.dumps(c["function"].get("arguments", {}))}}
                             for j, c in enumerate(calls)]
    if message.get("role") == "tool":
        name = message.get("tool_name")
        if name is not None and not isinstance(name, str):
            raise APIError(400, f"'messages[{i}].tool_name' must be a string", param=f"messages[{i}].tool_name")
        out["tool_call_id"] = name or ""
    elif message.get("tool_name") is not None:
        raise APIError(400, f"'messages[{i}].tool_name' belongs to a 'tool' message", param=f"messages[{i}].tool_name")
    return out


def _loaded(request: web.Request, shape: _OllamaShape, openai_body: dict) -> web.Response:
    """An empty conversation loads the model in Ollama; here it is loaded already, if it is served."""
    model = openai_body.get("model")
    if not isinstance(model, str) or not model:
        raise APIError(400, "'model' is required and must be a string", param="model")
    if request.app[BACKEND_KEY].codec_for(model) is None:
        raise APIError(404, f"model '{model}' not found: no node serves it", param="model")
    reply = shape.part("") | {"done": True, "done_reason": "load"}
    if openai_body["stream"]:
        return web.Response(body=_line(reply), content_type=shape.content_type)
    return web.json_response(reply)


@dataclass
class _OllamaShape:
    """Ollama's response objects for one request, as NDJSON lines when streamed."""

    model: str
    chat: bool
    arrived: float
    created_at: str = field(default_factory=lambda: _timestamp(time.time()))
    content_type = "application/x-ndjson"

    def part(self, text: str) -> dict:
        body = {"model": self.model, "created_at": self.created_at}
        if self.chat:
            return body | {"message": {"role": "assistant", "content": text}, "done": False}
        return body | {"response": text, "done": False}

    def final(self, text: str, finish: FinishEvent, calls: list[ToolCall] | None = None) -> dict:
        """The closing object: ``text`` (all of it, or the stream's last delta), ``calls`` and the counts.
        A reply with tool calls ends as "stop", as Ollama's does."""
        stats = finish.stats
        body = self.part(text)
        if calls:
            body["message"]["tool_calls"] = [_tool_call(c) for c in calls]
        return body | {
            "done": True, "done_reason": "stop" if finish.finish_reason == "tool_calls" else finish.finish_reason,
            "total_duration": int((time.monotonic() - self.arrived) * NS), "load_duration": 0,
            "prompt_eval_count": stats.prompt_tokens, "prompt_eval_duration": int(stats.prefill_s * NS),
            "eval_count": stats.completion_tokens, "eval_duration": int(max(0.0, stats.e2e_s - stats.ttft_s) * NS),
            "pdcluster": stats.to_json(),
        }

    def opening(self) -> bytes:
        return b""

    def delta(self, text: str) -> bytes:
        return _line(self.part(text))

    def tool_call(self, call: ToolCall) -> bytes:
        part = self.part("")
        part["message"]["tool_calls"] = [_tool_call(call)]
        return _line(part)

    def finished(self, text: str, finish: FinishEvent) -> bytes:
        return (_line(self.part(text)) if text else b"") + _line(self.final("", finish))

    def failure(self, error: APIError) -> bytes:
        return _line({"error": error.message})  # the ollama client raises it as ResponseError


def _tool_call(call: ToolCall) -> dict:
    """Ollama's tool call: arguments as an object."""
    return {"function": {"index": call.index, "name": call.name, "arguments": call.arguments_object}}


def _line(payload: dict) -> bytes:
    return json.dumps(payload).encode() + b"\n"


def _timestamp(seconds: float) -> str:
    """RFC 3339 in UTC, as Ollama writes ``created_at`` and ``modified_at``."""
    return datetime.fromtimestamp(seconds, timezone.utc).isoformat().replace("+00:00", "Z")


async def _tags(request: web.Request) -> web.Response:
    backend: Backend = request.app[BACKEND_KEY]
    return web.json_response({"models": [_tag(m) for m in backend.models()]})


def _tag(m: ModelEntry) -> dict:
    return {"name": m.model_id, "model": m.model_id, "modified_at": _timestamp(m.created), "details": {}}


async def _show(request: web.Request) -> web.Response:
    """What Ollama's ``show`` says that pdcluster knows: the chat template and the context length."""
    body = await _json_object(request)
    refuse_unsupported(body, ("model", "name", "verbose"), REASONS)
    if body.get("verbose", False) is not False:
        raise APIError(400, "'verbose' is not supported: pdcluster has no tokenizer dump to show", param="verbose")
    model = body.get("model") or body.get("name")
    backend: Backend = request.app[BACKEND_KEY]
    entry = next((m for m in backend.models() if m.model_id == model), None)
    codec = backend.codec_for(model) if isinstance(model, str) else None
    if entry is None or codec is None:
        raise APIError(404, f"model '{model}' not found: no node serves it", param="model")
    return web.json_response({
        "modelfile": "", "parameters": "", "template": codec.bundle.chat_template, "details": {},
        "model_info": {"pdcluster.context_length": entry.context_length},
        "capabilities": ["completion", *(["tools"] if _speaks_tools(codec.bundle.chat_template) else [])],
        "modified_at": _timestamp(entry.created),
    })


def _speaks_tools(chat_template: str) -> bool:
    try:
        detect_format(chat_template)
    except NoToolSupport:
        return False
    return True


async def _version(request: web.Request) -> web.Response:
    """pdcluster's own version: this is not Ollama, and says so."""
    try:
        version = metadata.version("pdcluster")
    except metadata.PackageNotFoundError:
        version = "0.0.0"
    return web.json_response({"version": version})


async def _not_served(request: web.Request) -> web.Response:
    if request.path in ROUTES:
        raise APIError(405, f"{request.method} {request.path} is not allowed", param=None)
    raise APIError(404, f"pdcluster does not serve {request.method} {request.path}; its Ollama API is "
                   f"{', '.join(ROUTES)}")
