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
``response.failed``. Errors are OpenAI's shape. Tools, reasoning, images and
files are 400 until they are supported (docs/api.md).
"""
from __future__ import annotations

import time
import uuid
from dataclasses import dataclass, field

from aiohttp import web

from scheduler.api import start_generation
from scheduler.api_stream import collect_text, sse, stream_deltas
from scheduler.request import FinishEvent, RequestStats
from scheduler.validation import APIError, ParsedRequest, parse_translated, refuse_unsupported

FIELDS = ("model", "input", "instructions", "max_output_tokens", "temperature", "top_p", "stream", "store", "text",
          "truncation", "pdcluster")
NAMES = {"max_tokens": "max_output_tokens", "messages": "input"}  # chat-completions field -> ours, in errors
REASONS = {
    "previous_response_id": "pdcluster stores no responses: send the whole conversation as input",
    "conversation": "pdcluster stores no conversations: send the whole conversation as input",
    "background": "background responses are not supported",
    "tools": "tool calling is not supported yet",
    "tool_choice": "tool calling is not supported yet",
    "parallel_tool_calls": "tool calling is not supported yet",
    "max_tool_calls": "tool calling is not supported yet",
    "reasoning": "reasoning options are not supported",
    "include": "extra outputs (log probabilities, reasoning) are not returned",
    "top_logprobs": "log probabilities are not returned",
    "metadata": "pdcluster stores no responses to keep metadata with",
    "prompt": "stored prompt templates are not supported",
    "service_tier": "pdcluster has one service tier",
}
ITEM_FIELDS = ("type", "role", "content", "id", "status")  # id, status: a previous output item sent back as history
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
    gen, deltas = start_generation(request, parsed, arrived)
    shape = _ResponsesShape(parsed=parsed, instructions=body.get("instructions"),
                            max_output_tokens=body.get("max_output_tokens"))
    if parsed.stream:
        return await stream_deltas(request, deltas, shape, gen.request_id)
    text, finish = await collect_text(deltas)
    return web.json_response(shape.response(text, finish))


def _translate(body: object) -> dict:
    """A Responses body as the chat-completions body; 400 for anything pdcluster does not honour."""
    if not isinstance(body, dict):
        raise APIError(400, "request body must be a JSON object")
    refuse_unsupported(body, FIELDS, REASONS)
    if body.get("store") not in (None, False):
        raise APIError(400, "'store' must be false: pdcluster stores no responses", param="store")
    if body.get("text") not in (None, {}, {"format": {"type": "text"}}):
        raise APIError(400, "'text' may only ask for plain text ({\"format\": {\"type\": \"text\"}}): structured "
                       "output is not supported", param="text")
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
    return out


def _input(value: object) -> list[dict]:
    if isinstance(value, str) and value:
        return [{"role": "user", "content": value}]
    if not isinstance(value, list) or not value:
        raise APIError(400, "'input' must be a non-empty string or a non-empty array of messages", param="input")
    messages = []
    for i, item in enumerate(value):
        where = f"input[{i}]"
        if not isinstance(item, dict) or item.get("type", "message") != "message":
            kind = item.get("type") if isinstance(item, dict) else type(item).__name__
            raise APIError(400, f"'{where}' is a {kind!r} item: only messages are supported", param=where)
        refuse_unsupported(item, ITEM_FIELDS, REASONS, where=f"{where}.")
        if item.get("role") not in ROLES:
            raise APIError(400, f"'{where}.role' must be one of {sorted(ROLES)}", param=f"{where}.role")
        messages.append({"role": ROLES[item["role"]], "content": _content(item.get("content"), f"{where}.content")})
    return messages


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
    response_id: str = field(default_factory=lambda: f"resp_{uuid.uuid4().hex[:24]}")
    item_id: str = field(default_factory=lambda: f"msg_{uuid.uuid4().hex[:24]}")
    created_at: int = field(default_factory=lambda: int(time.time()))
    text: str = ""  # streamed so far
    sequence_number: int = 0
    content_type = "text/event-stream"

    def response(self, text: str | None, finish: FinishEvent | None, error: APIError | None = None) -> dict:
        """The response object: in progress (no ``finish``), completed or incomplete, or failed (``error``)."""
        status = _status(finish, error)
        body = {
            "id": self.response_id, "object": "response", "created_at": self.created_at, "status": status,
            "error": {"code": error.code or "server_error", "message": error.message} if error else None,
            "incomplete_details": {"reason": "max_output_tokens"} if status == "incomplete" else None,
            "instructions": self.instructions, "max_output_tokens": self.max_output_tokens, "model": self.parsed.model,
            "output": [] if text is None else [self.item(text, "incomplete" if error else status)],
            "parallel_tool_calls": False, "previous_response_id": None, "store": False,
            "temperature": self.parsed.temperature, "top_p": self.parsed.top_p,
            "text": {"format": {"type": "text"}}, "tool_choice": "none", "tools": [], "truncation": "disabled",
            "usage": _usage(finish.stats) if finish else None, "metadata": {},
        }
        if finish:
            body["pdcluster"] = finish.stats.to_json()
        return body

    def item(self, text: str | None, status: str) -> dict:
        content = [] if text is None else [self.part(text)]
        return {"type": "message", "id": self.item_id, "status": status, "role": "assistant", "content": content}

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

    def finished(self, text: str, finish: FinishEvent) -> bytes:
        out = self.delta(text) if text else b""
        where = {"output_index": 0, "item_id": self.item_id, "content_index": 0}
        done = self.response(self.text, finish)
        return (out + self.event("response.output_text.done", **where, text=self.text, logprobs=[])
                + self.event("response.content_part.done", **where, part=self.part(self.text))
                + self.event("response.output_item.done", output_index=0, item=done["output"][0])
                + self.event(f"response.{'incomplete' if done['status'] == 'incomplete' else 'completed'}",
                             response=done))

    def failure(self, error: APIError) -> bytes:
        return self.event("response.failed", response=self.response(self.text, None, error))
