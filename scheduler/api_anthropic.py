"""Anthropic's Messages API: ``POST /v1/messages``.

The body is translated into the chat-completions body (``system`` becomes the
first message, ``stop_sequences`` the ``stop`` strings), so the OpenAI routes'
``parse_body`` checks it and ``start_generation`` runs it: the same chat
template, stop strings and token counts. ``max_tokens`` is required, as
Anthropic requires it; ``temperature`` is in [0, 1], as Anthropic's is.

``stop_reason`` is ``end_turn`` (the model's end of sequence), ``max_tokens``,
or ``stop_sequence`` with the matched ``stop_sequence``. ``usage.input_tokens``
counts the prompt tokens that were prefilled and ``cache_read_input_tokens``
those whose KV came from a prefix cache, as Anthropic splits them (their sum
is the OpenAI routes' ``prompt_tokens``). ``metadata.user_id`` becomes the
request's ``user``: it is in the request's record and log line (``user=...``),
which is what it is for: attributing requests.

A stream sends Anthropic's events: ``message_start``, ``ping``,
``content_block_start`` (with the first text), ``content_block_delta`` (``text_delta``) ..., ``content_block_stop``,
``message_delta`` (``stop_reason``, final usage), ``message_stop``; a failure
after the first event ends it with an ``error`` event (the anthropic SDK raises
it). Errors are Anthropic's ``{"type": "error", "error": {"type", "message"}}``.
Tools: ``tools`` (``input_schema``) and ``tool_choice`` (``auto``, ``any``,
``tool`` with its ``name``, ``none``; ``disable_parallel_tool_use``) become the
OpenAI route's tools, so ``any`` and ``tool`` are forced by constrained
decoding; history ``tool_use`` blocks become assistant tool calls and
``tool_result`` blocks tool messages. A reply's calls are ``tool_use`` blocks
after its text, with ``stop_reason: "tool_use"``; a stream opens a block for
each call and sends its input as one ``input_json_delta``.
Thinking, images and documents, prompt-cache hints and assistant prefill
are 400 until they are supported (docs/api.md).
"""
from __future__ import annotations

import json
import logging
import time
import uuid
from dataclasses import dataclass, field

from aiohttp import web

from scheduler.api import ERROR_SHAPES_KEY, start_generation
from scheduler.api_stream import StopStringHit, collect, sse, stream_deltas
from scheduler.request import FinishEvent, RequestStats
from scheduler.tools import ToolCall
from scheduler.validation import APIError, parse_translated, refuse_unsupported

log = logging.getLogger(__name__)

FIELDS = ("model", "messages", "max_tokens", "system", "temperature", "top_p", "top_k", "stop_sequences",
          "stream", "metadata", "pdcluster", "tools", "tool_choice")
NAMES = {"stop": "stop_sequences"}  # chat-completions field -> ours, in errors
REASONS = {
    "thinking": "extended thinking is not supported",
    "cache_control": "pdcluster reuses prompt prefixes on its own (--prefix-cache-gb); it takes no cache hints",
    "citations": "citations are not supported",
    "service_tier": "pdcluster has one service tier",
    "container": "code execution containers are not supported",
    "mcp_servers": "MCP servers are not supported",
}
BLOCK_REASONS = {
    "image": "images are not supported: the served models read text",
    "document": "documents are not supported: send their text",
    "thinking": "thinking blocks are not supported",
    "redacted_thinking": "thinking blocks are not supported",
}
ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
               404: "not_found_error", 413: "request_too_large", 429: "rate_limit_error", 503: "overloaded_error"}
STOP_REASONS = {"stop": "end_turn", "length": "max_tokens", "tool_calls": "tool_use"}
TOOL_FIELDS = ("name", "description", "input_schema", "type")
CHOICES = {"auto": "auto", "any": "required", "none": "none"}  # Anthropic's tool_choice type -> OpenAI's


def add_routes(app: web.Application) -> None:
    """Register ``POST /v1/messages`` and Anthropic's error shape for it."""
    app[ERROR_SHAPES_KEY]["/v1/messages"] = _error_response
    app.router.add_post("/v1/messages", _messages)


def _error_body(error: APIError) -> dict:
    return {"type": "error", "error": {"type": ERROR_TYPES.get(error.status, "api_error"), "message": error.message}}


def _error_response(error: APIError) -> web.Response:
    return web.json_response(_error_body(error), status=error.status, headers=error.headers)


async def _messages(request: web.Request) -> web.StreamResponse:
    arrived = time.monotonic()
    try:
        body = await request.json()
    except ValueError:  # json.JSONDecodeError and UnicodeDecodeError
        raise APIError(400, "request body is not valid JSON") from None
    parsed = parse_translated(_translate(body), NAMES)
    gen, deltas = start_generation(request, parsed, arrived)
    shape = _AnthropicShape(model=parsed.model, prompt_tokens=len(gen.prompt_token_ids))
    if parsed.stream:
        return await stream_deltas(request, deltas, shape, gen.request_id)
    text, calls, finish = await collect(deltas)
    return web.json_response(shape.message(text, finish, calls))


def _translate(body: object) -> dict:
    """An Anthropic body as the chat-completions body; 400 for anything pdcluster does not honour."""
    if not isinstance(body, dict):
        raise APIError(400, "request body must be a JSON object")
    refuse_unsupported(body, FIELDS, REASONS)
    max_tokens = body.get("max_tokens")
    if isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or max_tokens < 1:
        raise APIError(400, "'max_tokens' is required and must be an integer >= 1", param="max_tokens")
    temperature = body.get("temperature")
    if temperature is not None and (isinstance(temperature, bool) or not isinstance(temperature, (int, float))
                                    or not 0 <= temperature <= 1):
        raise APIError(400, "'temperature' must be a number in [0, 1]", param="temperature")
    stops = body.get("stop_sequences")
    if stops is not None and not (isinstance(stops, list) and all(isinstance(s, str) for s in stops)):
        raise APIError(400, "'stop_sequences' must be an array of strings", param="stop_sequences")
    _check_metadata(body.get("metadata"))
    out = {k: body[k] for k in ("model", "max_tokens", "temperature", "top_p", "top_k", "stream", "pdcluster")
           if body.get(k) is not None}
    out["messages"] = _system(body.get("system")) + _conversation(body.get("messages"))
    if (body.get("metadata") or {}).get("user_id"):
        out["user"] = body["metadata"]["user_id"]  # the request's record carries it
    if stops:
        out["stop"] = stops
    if body.get("tools"):
        out["tools"] = _tools(body["tools"])
    if body.get("tool_choice") is not None:
        out |= _tool_choice(body["tool_choice"])
    return out


def _tools(tools: object) -> list[dict]:
    """Anthropic's tools (``name``, ``description``, ``input_schema``) as OpenAI's."""
    if not isinstance(tools, list):
        raise APIError(400, "'tools' must be an array", param="tools")
    out = []
    for i, tool in enumerate(tools):
        if not isinstance(tool, dict):
            raise APIError(400, f"'tools[{i}]' must be an object", param=f"tools[{i}]")
        refuse_unsupported(tool, TOOL_FIELDS, REASONS, where=f"tools[{i}].")
        if tool.get("type", "custom") != "custom":
            raise APIError(400, f"'tools[{i}].type' {tool['type']!r}: Anthropic's server tools are not supported",
                           param=f"tools[{i}].type")
        function = {"name": tool.get("name"), "parameters": tool.get("input_schema")}
        if tool.get("description") is not None:
            function["description"] = tool["description"]
        out.append({"type": "function", "function": function})
    return out


def _tool_choice(choice: object) -> dict:
    """Anthropic's ``tool_choice`` as OpenAI's ``tool_choice`` and ``parallel_tool_calls``."""
    if not isinstance(choice, dict) or choice.get("type") not in (*CHOICES, "tool"):
        raise APIError(400, "'tool_choice' must be {\"type\": \"auto\"|\"any\"|\"none\"} or "
                       "{\"type\": \"tool\", \"name\": ...}", param="tool_choice")
    refuse_unsupported(choice, ("type", "name", "disable_parallel_tool_use"), REASONS, where="tool_choice.")
    if choice["type"] == "tool":
        out: dict = {"tool_choice": {"type": "function", "function": {"name": choice.get("name")}}}
    else:
        out = {"tool_choice": CHOICES[choice["type"]]}
    disable = choice.get("disable_parallel_tool_use", False)
    if not isinstance(disable, bool):
        raise APIError(400, "'tool_choice.disable_parallel_tool_use' must be a boolean",
                       param="tool_choice.disable_parallel_tool_use")
    if choice["type"] != "none":
        out["parallel_tool_calls"] = not disable
    return out


def _check_metadata(metadata: object) -> None:
    if metadata is None:
        return
    if not isinstance(metadata, dict):
        raise APIError(400, "'metadata' must be an object", param="metadata")
    refuse_unsupported(metadata, ("user_id",), {}, where="metadata.")
    if not isinstance(metadata.get("user_id") or "", str):
        raise APIError(400, "'metadata.user_id' must be a string", param="metadata.user_id")


def _system(system: object) -> list[dict]:
    if system is None or system == "":
        return []
    return [{"role": "system", "content": _text(system, "system")}]


def _conversation(messages: object) -> list[dict]:
    if not isinstance(messages, list) or not messages:
        raise APIError(400, "'messages' must be a non-empty array", param="messages")
    out = []
    for i, message in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(message, dict) or message.get("role") not in ("user", "assistant"):
            raise APIError(400, f"{where} must be an object whose role is 'user' or 'assistant'", param=where)
        refuse_unsupported(message, ("role", "content"), REASONS, where=f"{where}.")
        out += _turn(message["role"], message.get("content"), f"{where}.content")
    if messages[-1]["role"] != "user":
        where = f"messages[{len(messages) - 1}].role"
        raise APIError(400, f"'{where}': the last message must be the user's: continuing an assistant turn "
                       "(prefill) is not supported", param=where)
    return out


def _turn(role: str, content: object, where: str) -> list[dict]:
    """One Anthropic message as chat messages: a user turn's ``tool_result`` blocks become ``tool``
    messages (before its text), an assistant turn's ``tool_use`` blocks its ``tool_calls``."""
    if not isinstance(content, list):
        return [{"role": role, "content": _text(content, where)}]
    kinds = ("tool_result",) if role == "user" else ("tool_use",)
    blocks = [b for b in content if not (isinstance(b, dict) and b.get("type") in kinds)]
    special = [(j, b) for j, b in enumerate(content) if isinstance(b, dict) and b.get("type") in kinds]
    if role == "user":
        results = [_tool_result(b, f"{where}[{j}]") for j, b in special]
        text = _text(blocks, where) if blocks else None
        return results + ([{"role": "user", "content": text}] if text is not None else [])
    message: dict = {"role": "assistant", "content": _text(blocks, where)}
    if special:
        message["tool_calls"] = [_tool_use(b, f"{where}[{j}]") for j, b in special]
    return [message]


def _tool_use(block: dict, where: str) -> dict:
    refuse_unsupported(block, ("type", "id", "name", "input"), REASONS, where=f"{where}.")
    if not isinstance(block.get("id"), str) or not isinstance(block.get("name"), str) \
            or not isinstance(block.get("input", {}), dict):
        raise APIError(400, f"'{where}' must be {{\"type\": \"tool_use\", \"id\", \"name\", \"input\": {{...}}}}",
                       param=where)
    return {"id": block["id"], "type": "function",
            "function": {"name": block["name"], "arguments": json.dumps(block.get("input", {}))}}


def _tool_result(block: dict, where: str) -> dict:
    refuse_unsupported(block, ("type", "tool_use_id", "content", "is_error"), REASONS, where=f"{where}.")
    if not isinstance(block.get("tool_use_id"), str):
        raise APIError(400, f"'{where}.tool_use_id' must be a string", param=f"{where}.tool_use_id")
    content = block.get("content", "")
    text = _text(content, f"{where}.content") if content else ""
    if block.get("is_error") is True:  # the model sees that the call failed, as Anthropic's does
        text = f"Error: {text}"
    return {"role": "tool", "tool_call_id": block["tool_use_id"], "content": text}


def _text(content: object, where: str) -> str:
    """A string, or text blocks joined; 400 naming any other block."""
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise APIError(400, f"'{where}' must be a string or an array of content blocks", param=where)
    parts = []
    for j, block in enumerate(content):
        if not isinstance(block, dict):
            raise APIError(400, f"'{where}[{j}]' must be a content block", param=f"{where}[{j}]")
        kind = block.get("type")
        if kind != "text":
            why = BLOCK_REASONS.get(kind, "only text blocks are supported")
            raise APIError(400, f"'{where}[{j}].type' is {kind!r}: {why}", param=f"{where}[{j}].type")
        refuse_unsupported(block, ("type", "text"), REASONS, where=f"{where}[{j}].")
        if not isinstance(block.get("text"), str):
            raise APIError(400, f"'{where}[{j}].text' must be a string", param=f"{where}[{j}].text")
        parts.append(block["text"])
    return "".join(parts)


def _stop(finish: FinishEvent) -> tuple[str, str | None]:
    """(stop_reason, stop_sequence) of a finished request."""
    if isinstance(finish, StopStringHit):
        return "stop_sequence", finish.stop
    return STOP_REASONS.get(finish.finish_reason, "end_turn"), None


def _usage(stats: RequestStats) -> dict:
    cached = stats.cached_prefix_tokens
    return {"input_tokens": stats.prompt_tokens - cached, "cache_read_input_tokens": cached,
            "cache_creation_input_tokens": 0, "output_tokens": stats.completion_tokens}


@dataclass
class _AnthropicShape:
    """Anthropic's message object for one request, and its stream events."""

    model: str
    prompt_tokens: int
    message_id: str = field(default_factory=lambda: f"msg_{uuid.uuid4().hex[:24]}")
    num_blocks: int = 0  # content blocks opened so far: the text block (if any text) first, then tool_use blocks
    text_open: bool = False  # the text block (index 0) is open: text deltas go there
    content_type = "text/event-stream"

    def message(self, text: str | None, finish: FinishEvent | None, calls: list[ToolCall] | None = None) -> dict:
        reason, sequence = _stop(finish) if finish else (None, None)
        usage = _usage(finish.stats) if finish else {"input_tokens": self.prompt_tokens, "output_tokens": 0}
        content = [] if text is None or (calls and not text) else [{"type": "text", "text": text}]
        content += [{"type": "tool_use", "id": c.id, "name": c.name, "input": c.arguments_object}
                    for c in calls or ()]
        body = {"id": self.message_id, "type": "message", "role": "assistant", "model": self.model,
                "content": content,
                "stop_reason": reason, "stop_sequence": sequence, "usage": usage}
        if finish:
            body["pdcluster"] = finish.stats.to_json()
        return body

    def opening(self) -> bytes:
        return (sse({"type": "message_start", "message": self.message(None, None)}, "message_start")
                + sse({"type": "ping"}, "ping"))

    def delta(self, text: str) -> bytes:
        """A text delta; the first opens the text block (a reply of calls alone has none, as Anthropic's)."""
        opening = b""
        if not self.text_open:
            opening = sse({"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}},
                          "content_block_start")
            self.text_open, self.num_blocks = True, 1
        return opening + sse({"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta",
                                                                                   "text": text}},
                             "content_block_delta")

    def _close_text(self) -> bytes:
        if not self.text_open:
            return b""
        self.text_open = False
        return sse({"type": "content_block_stop", "index": 0}, "content_block_stop")

    def tool_call(self, call: ToolCall) -> bytes:
        """Closes the text block (if any) before the first call; then a ``tool_use`` block per call."""
        index, self.num_blocks = self.num_blocks, self.num_blocks + 1
        return (self._close_text()
                + sse({"type": "content_block_start", "index": index, "content_block": {
                    "type": "tool_use", "id": call.id, "name": call.name, "input": {}}}, "content_block_start")
                + sse({"type": "content_block_delta", "index": index, "delta": {
                    "type": "input_json_delta", "partial_json": call.arguments}}, "content_block_delta")
                + sse({"type": "content_block_stop", "index": index}, "content_block_stop"))

    def finished(self, text: str, finish: FinishEvent) -> bytes:
        reason, sequence = _stop(finish)
        out = self.delta(text) if text else b""
        if not self.num_blocks:  # nothing was said: one empty text block, so the message is not blank
            out += self.delta("")
        return (out + self._close_text()
                + sse({"type": "message_delta", "delta": {"stop_reason": reason, "stop_sequence": sequence},
                       "usage": _usage(finish.stats), "pdcluster": finish.stats.to_json()}, "message_delta")
                + sse({"type": "message_stop"}, "message_stop"))

    def failure(self, error: APIError) -> bytes:
        return sse(_error_body(error), "error")  # the anthropic SDK raises it
