"""OpenAI's Responses API: ``POST /v1/responses``, text in, text out.

``input`` (a string, or a list of messages whose content is a string or
``input_text``/``output_text`` parts) and ``instructions`` (the first, system
message) are translated into the chat-completions body; ``max_output_tokens``
becomes ``max_tokens``. The OpenAI routes' ``parse_body`` checks it and
``start_generation`` runs it: the same chat template, stop handling and token
counts. A response that hit ``max_output_tokens`` is ``"incomplete"`` with
``incomplete_details.reason: "max_output_tokens"``, as OpenAI reports it.

pdcluster stores nothing: ``store`` may only be false (or left out, which
stores nothing here either), and ``previous_response_id`` is refused; send the
whole conversation as ``input`` (a previous response's ``output`` items may be
sent back as they are). A stream sends the events the openai SDK's
``responses.create(stream=True)`` reads: ``response.created``,
``response.in_progress``, ``response.output_item.added``,
``response.content_part.added``, ``response.output_text.delta`` ...,
``response.output_text.done``, ``response.content_part.done``,
``response.output_item.done``, then ``response.completed`` (or
``response.incomplete``); a failure after the first event ends it with
``response.failed``. Errors are OpenAI's shape.

Tools: ``tools`` (``function`` tools: ``name``, ``description``,
``parameters``), ``tool_choice`` and ``parallel_tool_calls`` become the chat
route's, so ``required`` and a named function are forced by constrained
decoding; ``text.format`` (``json_object``, ``json_schema``) becomes
``response_format``. In ``input``, ``function_call`` items join the assistant
turn before them as its tool calls and ``function_call_output`` items become
tool messages. A reply's calls are ``function_call`` output items after its
message (which is left out when it has no text); a stream closes the message
item, then sends ``response.output_item.added``,
``response.function_call_arguments.delta`` and ``.done``, and
``response.output_item.done`` for each call. Reasoning, images and files are
400 until they are supported (docs/api.md).
"""
from __future__ import annotations

import time
import uuid
from dataclasses import dataclass, field

from aiohttp import web

from scheduler.api import start_generation
from scheduler.api_stream import collect, sse, stream_deltas
from scheduler.request import FinishEvent, RequestStats
from scheduler.tools import ToolCall
from scheduler.validation import APIError, ParsedRequest, parse_translated, refuse_unsupported, renamed

FIELDS = ("model", "input", "instructions", "max_output_tokens", "temperature", "top_p", "stream", "store", "text",
          "truncation", "pdcluster", "tools", "tool_choice", "parallel_tool_calls")
# chat-completions field -> ours, in errors
NAMES = {"max_tokens": "max_output_tokens", "messages": "input", "response_format": "text.format"}
REASONS = {
    "previous_response_id": "pdcluster stores no responses: send the whole conversation as input",
    "conversation": "pdcluster stores no conversations: send the whole conversation as input",
    "background": "background responses are not supported",
    "max_tool_calls": "a bound on tool calls is not supported: use parallel_tool_calls false for one call",
    "reasoning": "reasoning options are not supported",
    "include": "extra outputs (log probabilities, reasoning) are not returned",
    "top_logprobs": "log probabilities are not returned",
    "metadata": "pdcluster stores no responses to keep metadata with",
    "prompt": "stored prompt templates are not supported",
    "service_tier": "pdcluster has one service tier",
}
ITEM_FIELDS = ("type", "role", "content", "id", "status")  # id, status: a previous output item sent back as history
CALL_FIELDS = ("type", "call_id", "name", "arguments", "id", "status")
OUTPUT_FIELDS = ("type", "call_id", "output", "id", "status")
TOOL_FIELDS = ("type", "name", "description", "parameters", "strict")
PART_FIELDS = ("type", "text", "annotations", "logprobs")  # annotations, logprobs: ditto
ROLES = {"user": "user", "assistant": "assistant", "system": "system", "developer": "system"}


def add_routes(app: web.Application) -> None:
    """Register ``POST /v1/responses`` (errors in OpenAI's shape, as on every other ``/v1/`` route)."""
    app.router.add_post("/v1/responses", _responses)


async def _responses(request: web.Request) -> web.StreamResponse:
    arrived = time.monotonic()
    try:
        body = await request.json()
    except ValueError:  # json.JSONDecodeError and UnicodeDecodeError
        raise APIError(400, "request body is not valid JSON") from None
    parsed = parse_translated(_translate(body), NAMES)
    try:
        gen, deltas = start_generation(request, parsed, arrived)
    except APIError as e:  # a schema that cannot constrain decoding, found against the tokenizer
        raise renamed(e, NAMES) from None
    shape = _ResponsesShape(parsed=parsed, instructions=body.get("instructions"),
                            max_output_tokens=body.get("max_output_tokens"), request_body=body)
    if parsed.stream:
        return await stream_deltas(request, deltas, shape, gen.request_id)
    text, calls, finish = await collect(deltas)
    return web.json_response(shape.response(text, finish, calls=calls))


def _translate(body: object) -> dict:
    """A Responses body as the chat-completions body; 400 for anything pdcluster does not honour."""
    if not isinstance(body, dict):
        raise APIError(400, "request body must be a JSON object")
    refuse_unsupported(body, FIELDS, REASONS)
    if body.get("store") not in (None, False):
        raise APIError(400, "'store' must be false: pdcluster stores no responses", param="store")
    if body.get("truncation") not in (None, "disabled"):
        raise APIError(400, "'truncation' must be \"disabled\": a prompt beyond the context is refused "
                       "(context_length_exceeded), never cut", param="truncation")
    instructions = body.get("instructions")
    if instructions is not None and not isinstance(instructions, str):
        raise APIError(400, "'instructions' must be a string", param="instructions")
    out = {k: body[k] for k in ("model", "temperature", "top_p", "stream", "pdcluster") if body.get(k) is not None}
    if body.get("max_output_tokens") is not None:
        out["max_tokens"] = body["max_output_tokens"]
    out["messages"] = ([{"role": "system", "content": instructions}] if instructions else []) + _input(body.get("input"))
    if body.get("tools"):
        out["tools"] = _tools(body["tools"])
    for name in ("tool_choice", "parallel_tool_calls"):
        if body.get(name) is not None:
            out[name] = _tool_choice(body[name]) if name == "tool_choice" else body[name]
    response_format = _text_format(body.get("text"))
    if response_format is not None:
        out["response_format"] = response_format
    return out


def _tools(tools: object) -> list[dict]:
    """Responses' function tools (flat: ``name``, ``parameters``...) as chat-completions tools."""
    if not isinstance(tools, list):
        raise APIError(400, "'tools' must be an array", param="tools")
    out = []
    for i, tool in enumerate(tools):
        if not isinstance(tool, dict) or tool.get("type") != "function":
            kind = tool.get("type") if isinstance(tool, dict) else None
            raise APIError(400, f"'tools[{i}].type' is {kind!r}: only function tools are supported (no hosted "
                           "tools such as web or file search)", param=f"tools[{i}].type")
        refuse_unsupported(tool, TOOL_FIELDS, REASONS, where=f"tools[{i}].")
        out.append({"type": "function", "function": {k: tool[k] for k in TOOL_FIELDS[1:] if tool.get(k) is not None}})
    return out


def _tool_choice(choice: object) -> object:
    """``{"type": "function", "name": N}`` as chat's ``{"type": "function", "function": {"name": N}}``."""
    if isinstance(choice, dict) and choice.get("type") == "function" and set(choice) == {"type", "name"}:
        return {"type": "function", "function": {"name": choice["name"]}}
    if choice in ("none", "auto", "required"):
        return choice
    raise APIError(400, "'tool_choice' must be 'none', 'auto', 'required' or {\"type\": \"function\", "
                   "\"name\": ...}", param="tool_choice")


def _text_format(text: object) -> dict | None:
    """``text.format`` as chat's ``response_format`` (the json_schema fields are flat here)."""
    if text is None or text == {}:
        return None
    if not isinstance(text, dict) or set(text) - {"format"} or not isinstance(text.get("format"), dict):
        raise APIError(400, "'text' must be {\"format\": {\"type\": \"text\"|\"json_object\"|\"json_schema\", "
                       "...}}", param="text")
    fmt = text["format"]
    if fmt.get("type") != "json_schema":
        return fmt
    return {"type": "json_schema", "json_schema": {k: v for k, v in fmt.items() if k != "type"}}


def _input(value: object) -> list[dict]:
    if isinstance(value, str) and value:
        return [{"role": "user", "content": value}]
    if not isinstance(value, list) or not value:
        raise APIError(400, "'input' must be a non-empty string or a non-empty array of messages", param="input")
    messages: list[dict] = []
    for i, item in enumerate(value):
        where = f"input[{i}]"
        kind = item.get("type", "message") if isinstance(item, dict) else type(item).__name__
        if kind == "function_call":
            _function_call(item, where, messages)
            continue
        if kind == "function_call_output":
            refuse_unsupported(item, OUTPUT_FIELDS, REASONS, where=f"{where}.")
            if not isinstance(item.get("call_id"), str) or not isinstance(item.get("output"), str):
                raise APIError(400, f"'{where}' needs a string 'call_id' and 'output'", param=where)
            messages.append({"role": "tool", "tool_call_id": item["call_id"], "content": item["output"]})
            continue
        if kind != "message":
            raise APIError(400, f"'{where}' is a {kind!r} item: only messages, function_call and "
                           "function_call_output are supported", param=where)
        refuse_unsupported(item, ITEM_FIELDS, REASONS, where=f"{where}.")
        if item.get("role") not in ROLES:
            raise APIError(400, f"'{where}.role' must be one of {sorted(ROLES)}", param=f"{where}.role")
        messages.append({"role": ROLES[item["role"]], "content": _content(item.get("content"), f"{where}.content")})
    return messages


def _function_call(item: dict, where: str, messages: list[dict]) -> None:
    """A previous call: one of the tool calls of the assistant turn right before it (a new turn if none)."""
    refuse_unsupported(item, CALL_FIELDS, REASONS, where=f"{where}.")
    if not all(isinstance(item.get(k), str) for k in ("call_id", "name", "arguments")):
        raise APIError(400, f"'{where}' needs string 'call_id', 'name' and 'arguments'", param=where)
    call = {"id": item["call_id"], "type": "function",
            "function": {"name": item["name"], "arguments": item["arguments"]}}
    if messages and messages[-1]["role"] == "assistant":
        messages[-1].setdefault("tool_calls", []).append(call)
    else:
        messages.append({"role": "assistant", "content": "", "tool_calls": [call]})


def _content(content: object, where: str) -> str:
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise APIError(400, f"'{where}' must be a string or an array of text parts", param=where)
    parts = []
    for j, part in enumerate(content):
        kind = part.get("type") if isinstance(part, dict) else None
        if kind not in ("input_text", "output_text") or not isinstance(part.get("text"), str):
            raise APIError(400, f"'{where}[{j}]' must be an input_text or output_text part: images, files and "
                           "audio are not supported", param=f"{where}[{j}]")
        refuse_unsupported(part, PART_FIELDS, REASONS, where=f"{where}[{j}].")
        parts.append(part["text"])
    return "".join(parts)


def _usage(stats: RequestStats) -> dict:
    """The Responses usage object; ``input_tokens`` counts cached prompt tokens too, as OpenAI's does."""
    return {"input_tokens": stats.prompt_tokens,
            "input_tokens_details": {"cached_tokens": stats.cached_prefix_tokens},
            "output_tokens": stats.completion_tokens, "output_tokens_details": {"reasoning_tokens": 0},
            "total_tokens": stats.prompt_tokens + stats.completion_tokens}


def _status(finish: FinishEvent | None, error: APIError | None) -> str:
    if error is not None:
        return "failed"
    if finish is None:
        return "in_progress"
    return "incomplete" if finish.finish_reason == "length" else "completed"


@dataclass
class _ResponsesShape:
    """The response object for one request, and its stream events (numbered, as OpenAI numbers them)."""

    parsed: ParsedRequest
    instructions: str | None
    max_output_tokens: int | None
    request_body: dict = field(default_factory=dict)
    response_id: str = field(default_factory=lambda: f"resp_{uuid.uuid4().hex[:24]}")
    item_id: str = field(default_factory=lambda: f"msg_{uuid.uuid4().hex[:24]}")
    created_at: int = field(default_factory=lambda: int(time.time()))
    text: str = ""  # streamed so far
    calls: list[ToolCall] = field(default_factory=list)  # streamed so far
    sequence_number: int = 0
    content_type = "text/event-stream"

    def response(self, text: str | None, finish: FinishEvent | None, error: APIError | None = None,
                 calls: list[ToolCall] | tuple[ToolCall, ...] = ()) -> dict:
        """The response object: in progress (no ``finish``), completed or incomplete, or failed (``error``);
        its output is the message (none when only calls were made) and the calls."""
        status = _status(finish, error)
        output = [] if text is None or (calls and not text) else [self.item(text, "incomplete" if error else status)]
        output += [self.call_item(c) for c in calls]
        body = {
            "id": self.response_id, "object": "response", "created_at": self.created_at, "status": status,
            "error": {"code": error.code or "server_error", "message": error.message} if error else None,
            "incomplete_details": {"reason": "max_output_tokens"} if status == "incomplete" else None,
            "instructions": self.instructions, "max_output_tokens": self.max_output_tokens, "model": self.parsed.model,
            "output": output,
            "parallel_tool_calls": self.parsed.parallel_tool_calls, "previous_response_id": None, "store": False,
            "temperature": self.parsed.temperature, "top_p": self.parsed.top_p,
            "text": self.request_body.get("text") or {"format": {"type": "text"}},
            "tool_choice": self.request_body.get("tool_choice", self.parsed.tool_choice.mode),
            "tools": self.request_body.get("tools") or [], "truncation": "disabled",
            "usage": _usage(finish.stats) if finish else None, "metadata": {},
        }
        if finish:
            body["pdcluster"] = finish.stats.to_json()
        return body

    def item(self, text: str | None, status: str) -> dict:
        content = [] if text is None else [self.part(text)]
        return {"type": "message", "id": self.item_id, "status": status, "role": "assistant", "content": content}

    @staticmethod
    def call_item(call: ToolCall, arguments: str | None = None) -> dict:
        return {"type": "function_call", "id": f"fc_{call.id.removeprefix('call_')}", "call_id": call.id,
                "name": call.name, "arguments": call.arguments if arguments is None else arguments,
                "status": "completed" if arguments is None else "in_progress"}

    @staticmethod
    def part(text: str) -> dict:
        return {"type": "output_text", "text": text, "annotations": [], "logprobs": []}

    def event(self, kind: str, **fields: object) -> bytes:
        self.sequence_number += 1
        return sse({"type": kind, "sequence_number": self.sequence_number, **fields}, kind)

    def opening(self) -> bytes:
        where = {"output_index": 0, "item_id": self.item_id, "content_index": 0}
        return (self.event("response.created", response=self.response(None, None))
                + self.event("response.in_progress", response=self.response(None, None))
                + self.event("response.output_item.added", output_index=0, item=self.item(None, "in_progress"))
                + self.event("response.content_part.added", **where, part=self.part("")))

    def delta(self, text: str) -> bytes:
        self.text += text
        return self.event("response.output_text.delta", output_index=0, item_id=self.item_id, content_index=0,
                          delta=text, logprobs=[])

    def close_message(self, status: str) -> bytes:
        where = {"output_index": 0, "item_id": self.item_id, "content_index": 0}
        return (self.event("response.output_text.done", **where, text=self.text, logprobs=[])
                + self.event("response.content_part.done", **where, part=self.part(self.text))
                + self.event("response.output_item.done", output_index=0, item=self.item(self.text, status)))

    def tool_call(self, call: ToolCall) -> bytes:
        """The message item (index 0) closes before the first call; each call is an item after it."""
        out = self.close_message("completed") if not self.calls else b""
        self.calls.append(call)
        index, item_id = len(self.calls), self.call_item(call)["id"]
        return (out + self.event("response.output_item.added", output_index=index, item=self.call_item(call, ""))
                + self.event("response.function_call_arguments.delta", output_index=index, item_id=item_id,
                             delta=call.arguments)
                + self.event("response.function_call_arguments.done", output_index=index, item_id=item_id,
                             arguments=call.arguments)
                + self.event("response.output_item.done", output_index=index, item=self.call_item(call)))

    def finished(self, text: str, finish: FinishEvent) -> bytes:
        out = self.delta(text) if text else b""
        done = self.response(self.text, finish)
        if self.calls:  # the streamed items: the message (even empty: it was announced) and the calls
            done["output"] = [self.item(self.text, "completed"), *(self.call_item(c) for c in self.calls)]
        else:
            out += self.close_message(done["status"])
        return out + self.event(f"response.{'incomplete' if done['status'] == 'incomplete' else 'completed'}",
                                response=done)

    def failure(self, error: APIError) -> bytes:
        return self.event("response.failed", response=self.response(self.text, None, error))
