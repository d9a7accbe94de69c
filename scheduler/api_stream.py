"""What every HTTP API dialect shares once a request is running: its text, and how a stream is written.

``text_deltas`` turns a backend's events into text deltas with the client's
stop strings applied; ``collect`` gathers them (text and tool calls) for a non-streamed answer;
``stream_deltas`` writes them as a streamed response in a dialect's
``StreamShape`` (OpenAI's SSE chunks, Anthropic's events, the Responses API's
events, Ollama's NDJSON). The dialects differ only in shapes, never in how
tokens become text, where stop strings cut, or how failures end a stream.

Failures are never silent. An error before the first token propagates, so the
route answers with a real status. After the headers are sent, the shape's
``failure`` event ends the stream instead of its normal close. A client that
goes away is told apart by type (``ClientGone``): the deltas are closed, which
closes the backend's iterator and cancels the request on every worker it touched.
"""
from __future__ import annotations

import json
import logging
import math
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Protocol

from aiohttp import web

from scheduler.request import FinishEvent, RequestStats, SchedulerError, TokenEvent, end_at_stop_string
from scheduler.tokenizer import PromptCodec
from scheduler.tools import ToolCall
from scheduler.validation import APIError

log = logging.getLogger(__name__)

# (text, None) ... (text, FinishEvent); with tools (scheduler/tools.py) some items are (ToolCall, None)
Deltas = AsyncIterator[tuple["str | ToolCall", FinishEvent | None]]


@dataclass(frozen=True)
class StopStringHit(FinishEvent):
    """The text ended before ``stop``, one of the client's stop strings (``finish_reason`` "stop")."""

    stop: str


def api_error(error: SchedulerError) -> APIError:
    """``error`` as the answer it maps to (status, code, ``Retry-After``)."""
    headers = {}
    if error.retry_after_s is not None:
        headers["Retry-After"] = str(max(1, math.ceil(error.retry_after_s)))  # whole seconds, never early
    return APIError(error.status, error.message, "server_error", code=error.code, headers=headers)


async def text_deltas(
    events: AsyncIterator, codec: PromptCodec, stops: tuple[str, ...], prompt_tokens: int,
    keep: frozenset[int] = frozenset(), section_at: Callable[[str], int | None] | None = None,
) -> Deltas:
    """Backend events -> (text delta, None) ... then (last delta, FinishEvent).

    Applies stop strings: the text ends before the first stop string, the
    finish is a ``StopStringHit`` naming it, and the backend request is cancelled.
    Special tokens in ``keep`` are spelled out in the text (a tool-call marker).
    ``section_at(text)``: where a tool-call section opens in the text so far
    (scheduler/tools.py); stop strings apply to the content before it, never
    inside a call."""
    detok = codec.detokenizer(keep)
    stop = [s for s in stops if s]
    num_tokens = 0
    sent = 0  # characters emitted so far
    held = ""  # text not yet emitted because it may be the start of a stop string
    try:
        async for event in events:
            if isinstance(event, TokenEvent):
                num_tokens += 1
                held += detok.push(event.token_id)
                hit = _find_stop(held, stop)
                if hit is not None and section_at is not None:
                    opened = section_at(detok.text[:sent] + held)
                    if opened is not None and sent + hit[0] >= opened:  # in a call: stops apply no more
                        stop, hit = [], None
                if hit is not None:
                    # The backend's stats come only with its FinishEvent; report what is known here
                    # (the nodes stay "" for unknown, so the record does not claim to be colocated).
                    known = RequestStats(prompt_tokens=prompt_tokens, completion_tokens=num_tokens)
                    await end_at_stop_string(events)
                    yield held[:hit[0]], StopStringHit("stop", known, hit[1])
                    return
                safe = len(held) - _longest_stop_prefix(held, stop)
                if safe > 0:
                    yield held[:safe], None
                    sent += safe
                    held = held[safe:]
            elif isinstance(event, FinishEvent):
                held += detok.flush()
                hit = _find_stop(held, stop)
                if hit is not None and section_at is not None:
                    opened = section_at(detok.text[:sent] + held)
                    if opened is not None and sent + hit[0] >= opened:
                        hit = None
                yield (held, event) if hit is None else (held[:hit[0]], StopStringHit("stop", event.stats, hit[1]))
                return
    finally:
        await events.aclose()


def _find_stop(text: str, stops: list[str]) -> tuple[int, str] | None:
    """(index, stop string) of the earliest stop string in ``text``; None if there is none."""
    hits = [(text.find(s), s) for s in stops if s in text]
    return min(hits) if hits else None


def _longest_stop_prefix(text: str, stops: list[str]) -> int:
    """Length of the longest suffix of ``text`` that is a proper prefix of a stop string."""
    best = 0
    for s in stops:
        for n in range(min(len(s) - 1, len(text)), 0, -1):
            if text.endswith(s[:n]):
                best = max(best, n)
                break
    return best


async def collect(deltas: Deltas) -> tuple[str, list[ToolCall], FinishEvent]:
    """The whole text of a non-streamed answer, its tool calls, and how it finished (502 if it never did)."""
    text, calls, finish = "", [], None
    async for delta, finish in deltas:
        if isinstance(delta, ToolCall):
            calls.append(delta)
        else:
            text += delta
    if finish is None:
        raise APIError(502, "the request ended without a result", "server_error")
    return text, calls, finish


class StreamShape(Protocol):
    """How one API dialect writes a stream: its content type and the bytes of each event."""

    content_type: str

    def opening(self) -> bytes:
        """Everything sent before the first text delta (may be empty)."""
        ...

    def delta(self, text: str) -> bytes:
        """One non-empty text delta."""
        ...

    def tool_call(self, call: ToolCall) -> bytes:
        """One whole tool call (they come after the text, once the generation ends)."""
        ...

    def finished(self, text: str, finish: FinishEvent) -> bytes:
        """The last text delta (may be empty) and every event that closes a completed stream."""
        ...

    def failure(self, error: APIError) -> bytes:
        """The event that ends a stream which failed after its headers were sent."""
        ...


class ClientGone(Exception):
    """Writing to the client failed: it went away (the cause says how)."""


def sse(payload: dict, event: str | None = None) -> bytes:
    """One server-sent event: ``data:`` with ``payload`` as JSON, after ``event:`` when named."""
    head = f"event: {event}\n".encode() if event else b""
    return head + b"data: " + json.dumps(payload).encode() + b"\n\n"


async def stream_deltas(request: web.Request, deltas: Deltas, shape: StreamShape, request_id: str) -> web.StreamResponse:
    """Write ``deltas`` to the client in ``shape``; the headers go with the first delta,
    so a request refused before it (a 429 from the admission queue) keeps its status."""
    try:
        first = await anext(deltas, None)
    except BaseException:
        await deltas.aclose()
        raise
    response = web.StreamResponse(headers={"Content-Type": shape.content_type, "Cache-Control": "no-cache"})
    await response.prepare(request)
    closing = b""
    try:
        await _send(response, shape.opening())
        item = first
        while item is not None:
            delta, finish = item
            if finish is not None:
                await _send(response, shape.finished(delta, finish))
                break
            if isinstance(delta, ToolCall):
                await _send(response, shape.tool_call(delta))
            elif delta:
                await _send(response, shape.delta(delta))
            item = await anext(deltas, None)
    except ClientGone as e:  # the request's record (api.py, _traced) says how it ended
        log.debug("request %s: client disconnected (%s); cancelling", request_id, e.__cause__)
    except SchedulerError as e:
        log.debug("request %s: failed mid-stream: %s", request_id, e)
        closing = shape.failure(api_error(e))
    except Exception as e:  # a bug, not a worker: still never a silent end
        log.exception("request %s: failed mid-stream", request_id)
        closing = shape.failure(APIError(500, f"internal error: {type(e).__name__}: {e}", "server_error",
                                         code="internal_error"))
    finally:
        await deltas.aclose()
    if closing:
        await _write(response, closing)
    return response


async def _send(response: web.StreamResponse, data: bytes) -> None:
    """Write ``data``; raises ``ClientGone`` once the client is gone,
    so the caller stops generating and cancels the request on the workers."""
    if not data:
        return
    try:
        await response.write(data)
    except (ConnectionResetError, RuntimeError) as e:  # aiohttp: reset, or "cannot write to closing transport"
        raise ClientGone() from e


async def _write(response: web.StreamResponse, data: bytes) -> None:
    """Best-effort write for the failure event, after the deltas are closed."""
    try:
        await response.write(data)
    except (ConnectionResetError, RuntimeError):
        pass  # the client is gone; nothing is left to cancel
