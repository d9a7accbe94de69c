"""The OpenAI-compatible HTTP API (aiohttp).

Routes: ``POST /v1/chat/completions``, ``POST /v1/completions`` (streamed as SSE
ending in ``data: [DONE]``, or not), ``GET /v1/models``, ``GET /health``.
Errors use OpenAI's shape ``{"error": {"message", "type", "param", "code"}}``.
Every completion, and the last chunk of a stream, carries a ``pdcluster``
object with placement and timings (``kv_codec``: the codec its KV crossed the
link in, null when colocated); a body's ``"pdcluster": {"kv_codec": ...}``
picks that codec for this request (validation.py);
``usage.prompt_tokens_details.cached_tokens``
counts the prompt tokens whose KV came from a prefix cache, as OpenAI's does.

A client that disconnects closes the backend's iterator, which cancels the
request on every worker it touched.

Failures are never silent. Before the first byte of a response a
``SchedulerError`` becomes its own status (``api_error``): 429 with
``Retry-After`` when no node has room and the admission queue refused the
request (its error carries the queue's estimate, in whole seconds rounded up;
see scheduler/admission.py), 503 when no node can serve the model, 502
when a worker failed, 504 when one timed out. A stream sends its headers with
its first token, so a request refused while it waited is a real 429 too. Once a stream has started, the
failure ends it with one OpenAI-style error event, ``data: {"error": {...}}``
(the openai SDK raises it as ``openai.APIError``), and no ``[DONE]``: a stream
ends with ``[DONE]`` only when it completed. Client disconnects are told apart
by type (``_ClientGone``), never by catching ``RuntimeError``.

Security (``build_app(api_key=..., allowed_origins=...)``): with an API key,
every ``/v1/`` route wants ``Authorization: Bearer <key>`` (as vLLM and
OpenAI do) and answers 401 ``invalid_api_key`` in OpenAI's shape otherwise.
``/health`` stays open for load balancers and probes, but without the key it
says only ``{"status": ...}``: node names, addresses and load are for key
holders. ``/admin/policy`` keeps its own cluster-key signature. CORS is off
unless origins are listed: then only those origins (or any, for ``*``) get
``Access-Control-Allow-*`` headers, and a preflight ``OPTIONS`` from one of
them is answered 204 before any key check (browsers send no credentials on
preflight); one from any other origin gets 403.
"""
from __future__ import annotations

import hmac
import json
import logging
import math
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Protocol

from aiohttp import web

from scheduler.policy import POLICIES
from scheduler.request import (
    Backend,
    FinishEvent,
    GenerationRequest,
    RequestStats,
    SchedulerError,
    TokenEvent,
)
from scheduler.tokenizer import ChatTemplateError, PromptCodec
from scheduler.validation import APIError, ParsedRequest, parse_body

log = logging.getLogger(__name__)

BACKEND_KEY = web.AppKey("backend", object)
ADMIN_KEY = web.AppKey("admin", object)
SECURITY_KEY = web.AppKey("security", object)
METRICS_KEY = web.AppKey("metrics", object)  # () -> (Prometheus text, content type); None: no /metrics
ADMIN_AUTH_HEADER = "X-PDC-Auth"
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


class AdminBackend(Protocol):
    """Run-time policy switching behind ``/admin/policy``, authenticated with the cluster key."""

    def authorize(self, method: str, token: str | None) -> str | None:
        """None when ``token`` authenticates ``method`` (e.g. ``"PUT /admin/policy"``), else why not."""
        ...

    def current_policy(self) -> str: ...

    def switch_policy(self, spec: str) -> str:
        """Load and install ``spec`` (a name, module:Class or file.py:Class); ValueError if it cannot."""
        ...


@dataclass(frozen=True)
class Security:
    """Who may call the API: the bearer key (None: anyone) and the CORS origins (empty: CORS off)."""

    api_key: str | None = field(default=None, repr=False)
    allowed_origins: tuple[str, ...] = ()

    def authorized(self, request: web.Request) -> bool:
        """Whether ``request`` carries ``Authorization: Bearer <api_key>`` (always, without a key)."""
        if not self.api_key:
            return True
        scheme, _, token = request.headers.get("Authorization", "").partition(" ")
        # compare_digest: the time taken does not tell how much of a guess was right
        return scheme.lower() == "bearer" and hmac.compare_digest(token.strip().encode(), self.api_key.encode())

    def allows_origin(self, origin: str | None) -> bool:
        """Whether a browser page from ``origin`` may read our answers."""
        return bool(origin) and ("*" in self.allowed_origins or origin in self.allowed_origins)


CORS_METHODS = "GET, POST, PUT, OPTIONS"
CORS_HEADERS = "Authorization, Content-Type, X-PDC-Auth"


def build_app(backend: Backend, admin: AdminBackend | None = None, *, api_key: str | None = None,
              allowed_origins: tuple[str, ...] = (),
              metrics: Callable[[], tuple[bytes, str]] | None = None) -> web.Application:
    """The aiohttp application serving ``backend`` (and ``/admin/policy`` when ``admin`` is given).

    ``api_key``: required as a bearer token on ``/v1/`` routes (None or "": open).
    ``allowed_origins``: the origins CORS admits (``*`` for any; empty: CORS off)."""
    app = web.Application(middlewares=[_cors_preflight, _errors_as_openai, _api_key_required],
                          client_max_size=32 << 20)
    app[BACKEND_KEY] = backend
    app[ADMIN_KEY] = admin
    app[SECURITY_KEY] = Security(api_key or None, tuple(allowed_origins))
    app.on_response_prepare.append(_cors_headers)
    app.router.add_get("/admin/policy", _get_policy)
    app.router.add_put("/admin/policy", _put_policy)
    app.router.add_post("/v1/chat/completions", _chat_completions)
    app.router.add_post("/v1/completions", _completions)
    app.router.add_get("/v1/models", _models)
    app.router.add_get("/health", _health)
    app[METRICS_KEY] = metrics
    app.router.add_get("/metrics", _metrics)
    return app


@web.middleware
async def _cors_preflight(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Answer a CORS preflight (OPTIONS with an Origin) before routing and the key check."""
    security: Security = request.app[SECURITY_KEY]
    origin = request.headers.get("Origin")
    if request.method != "OPTIONS" or not origin or not security.allowed_origins:
        return await handler(request)
    if not security.allows_origin(origin):
        log.info("CORS preflight from %s refused (not in --allowed-origins)", origin)
        return APIError(403, f"origin {origin!r} is not allowed", "invalid_request_error").response()
    return web.Response(status=204, headers={
        "Access-Control-Allow-Methods": CORS_METHODS,
        "Access-Control-Allow-Headers": request.headers.get("Access-Control-Request-Headers", CORS_HEADERS),
        "Access-Control-Max-Age": "600",
    })


async def _cors_headers(request: web.Request, response: web.StreamResponse) -> None:
    """Every answer to an allowed origin (streams and errors included) carries the CORS headers."""
    security: Security = request.app[SECURITY_KEY]
    origin = request.headers.get("Origin")
    if security.allows_origin(origin):
        response.headers["Access-Control-Allow-Origin"] = origin
        response.headers["Vary"] = "Origin"


@web.middleware
async def _api_key_required(request: web.Request, handler: Handler) -> web.StreamResponse:
    """With an API key, every ``/v1/`` route wants it as a bearer token (401 in OpenAI's shape)."""
    security: Security = request.app[SECURITY_KEY]
    if request.path.startswith("/v1/") and not security.authorized(request):
        log.info("%s %s from %s refused: missing or wrong API key", request.method, request.path, request.remote)
        raise APIError(401, "Incorrect or missing API key: send it as 'Authorization: Bearer <key>'",
                       "invalid_request_error", code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})
    return await handler(request)


@web.middleware
async def _errors_as_openai(request: web.Request, handler: Handler) -> web.StreamResponse:
    try:
        return await handler(request)
    except APIError as e:
        return e.response()
    except SchedulerError as e:
        log.warning("%s %s failed before the first byte: %s %s", request.method, request.path, e.status, e)
        return api_error(e).response()
    except web.HTTPException as e:
        if e.status >= 400:
            return APIError(e.status, e.reason or "error", "invalid_request_error").response()
        raise


def api_error(error: SchedulerError) -> APIError:
    """``error`` as the OpenAI-shaped answer it maps to (status, code, ``Retry-After``)."""
    headers = {}
    if error.retry_after_s is not None:
        headers["Retry-After"] = str(max(1, math.ceil(error.retry_after_s)))  # whole seconds, never early
    return APIError(error.status, error.message, "server_error", code=error.code, headers=headers)


def _admin(request: web.Request) -> AdminBackend:
    admin: AdminBackend | None = request.app[ADMIN_KEY]
    if admin is None:
        raise APIError(404, "this scheduler has no admin endpoint", "invalid_request_error")
    why = admin.authorize(f"{request.method} {request.path}", request.headers.get(ADMIN_AUTH_HEADER))
    if why is not None:
        log.warning("admin %s %s refused: %s", request.method, request.path, why)
        raise APIError(401, f"admin call not authenticated: {why}", "authentication_error")
    return admin


async def _get_policy(request: web.Request) -> web.Response:
    admin = _admin(request)
    return web.json_response({"policy": admin.current_policy(), "builtin": sorted(POLICIES)})


async def _put_policy(request: web.Request) -> web.Response:
    admin = _admin(request)
    try:
        body = await request.json()
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise APIError(400, "request body is not valid JSON") from None
    spec = body.get("policy") if isinstance(body, dict) else None
    if not isinstance(spec, str) or not spec:
        raise APIError(400, "body must be {\"policy\": \"NAME|module:Class|file.py:Class\"}", param="policy")
    try:
        name = admin.switch_policy(spec)
    except Exception as e:  # a spec names user code: whatever it raises is the caller's error, never a 500
        message = str(e) if isinstance(e, ValueError) else f"policy {spec!r}: {type(e).__name__}: {e}"
        log.warning("admin policy switch to %r refused: %s", spec, message)
        raise APIError(400, message, param="policy") from None
    log.warning("placement policy switched to %s", name)
    return web.json_response({"policy": name})


async def _models(request: web.Request) -> web.Response:
    backend: Backend = request.app[BACKEND_KEY]
    data = [
        {"id": m.model_id, "object": "model", "created": m.created, "owned_by": "pdcluster",
         "context_length": m.context_length}
        for m in backend.models()
    ]
    return web.json_response({"object": "list", "data": data})


async def _health(request: web.Request) -> web.Response:
    """Open to anyone; the details (nodes, addresses, load) only with the API key, when there is one."""
    ready, details = request.app[BACKEND_KEY].health()
    if not request.app[SECURITY_KEY].authorized(request):
        details = {}
    return web.json_response({"status": "ok" if ready else "unavailable", **details}, status=200 if ready else 503)


async def _metrics(request: web.Request) -> web.Response:
    """Prometheus text (scheduler/metrics.py); with an API key, for key holders only, as /health's details."""
    render = request.app[METRICS_KEY]
    if render is None:
        raise APIError(404, "this server keeps no metrics", "invalid_request_error")
    if not request.app[SECURITY_KEY].authorized(request):
        raise APIError(401, "Incorrect or missing API key: send it as 'Authorization: Bearer <key>'",
                       "invalid_request_error", code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})
    body, content_type = render()  # from memory only: no I/O, quick on the event loop
    return web.Response(body=body, headers={"Content-Type": content_type})


async def _chat_completions(request: web.Request) -> web.StreamResponse:
    return await _complete(request, chat=True)


async def _completions(request: web.Request) -> web.StreamResponse:
    return await _complete(request, chat=False)


async def _complete(request: web.Request, *, chat: bool) -> web.StreamResponse:
    arrived = time.monotonic()
    backend: Backend = request.app[BACKEND_KEY]
    try:
        body = await request.json()
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise APIError(400, "request body is not valid JSON", "invalid_request_error") from None
    parsed = parse_body(body, chat=chat)
    codec = backend.codec_for(parsed.model)
    if codec is None:
        raise APIError(404, f"The model '{parsed.model}' does not exist or no node serves it", "invalid_request_error",
                       param="model", code="model_not_found")
    gen = _to_generation(parsed, codec, backend, arrived)
    reply = _Reply(chat=chat, model=parsed.model, request_id=gen.request_id, created=int(time.time()),
                   prompt_tokens=len(gen.prompt_token_ids))
    log.info("request %s: model=%s prompt=%d tokens max_tokens=%d stream=%s",
             gen.request_id, parsed.model, len(gen.prompt_token_ids), gen.max_tokens, parsed.stream)
    events = backend.generate(gen)
    if parsed.stream:
        return await _stream(request, events, reply, codec, parsed)
    return await _collect(events, reply, codec, parsed)


def _to_generation(parsed: ParsedRequest, codec: PromptCodec, backend: Backend, arrived: float) -> GenerationRequest:
    try:
        text = codec.render_chat(parsed.messages) if parsed.messages is not None else parsed.prompt
    except ChatTemplateError as e:
        raise APIError(400, str(e), "invalid_request_error", param="messages") from None
    token_ids = codec.encode(text)
    if not token_ids:
        raise APIError(400, "the prompt is empty", "invalid_request_error", param="prompt")
    entry = next((m for m in backend.models() if m.model_id == parsed.model), None)
    context = entry.context_length if entry else 0
    max_tokens = parsed.max_tokens or max(1, min(256, context - len(token_ids)))
    if context and len(token_ids) + max_tokens > context:
        raise APIError(
            400, f"This model's maximum context length is {context} tokens. However, you requested "
            f"{len(token_ids) + max_tokens} tokens ({len(token_ids)} in the prompt, {max_tokens} for the completion).",
            "invalid_request_error", param="messages" if parsed.messages is not None else "prompt",
            code="context_length_exceeded",
        )
    return GenerationRequest(
        request_id=f"{'chatcmpl' if parsed.messages is not None else 'cmpl'}-{uuid.uuid4().hex[:24]}",
        model=parsed.model, prompt_token_ids=tuple(token_ids), max_tokens=max_tokens,
        temperature=parsed.temperature, top_p=parsed.top_p, top_k=parsed.top_k, seed=parsed.seed,
        stop_token_ids=entry.eos_token_ids if entry and not parsed.ignore_eos else (),
        placement=parsed.placement, arrived_at=arrived, kv_codec=parsed.kv_codec,
    )


@dataclass
class _Reply:
    """Shapes response objects for one request."""

    chat: bool
    model: str
    request_id: str
    created: int
    prompt_tokens: int = 0

    @property
    def object(self) -> str:
        return "chat.completion" if self.chat else "text_completion"

    def choice(self, text: str, finish_reason: str | None, *, delta: bool, first: bool = False) -> dict:
        if not self.chat:
            return {"index": 0, "text": text, "logprobs": None, "finish_reason": finish_reason}
        if not delta:
            return {"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": finish_reason}
        content = {"role": "assistant", "content": text} if first else ({"content": text} if text else {})
        return {"index": 0, "delta": content, "logprobs": None, "finish_reason": finish_reason}

    def envelope(self, choices: list[dict], *, chunk: bool) -> dict:
        obj = self.object + (".chunk" if chunk and self.chat else "")
        return {"id": self.request_id, "object": obj, "created": self.created, "model": self.model, "choices": choices}


def _usage(stats: RequestStats) -> dict:
    """OpenAI's usage object; ``prompt_tokens_details.cached_tokens``: prompt tokens whose KV
    came from a prefix cache (``RequestStats.cached_prefix_tokens``), as OpenAI reports them."""
    return {"prompt_tokens": stats.prompt_tokens, "completion_tokens": stats.completion_tokens,
            "total_tokens": stats.prompt_tokens + stats.completion_tokens,
            "prompt_tokens_details": {"cached_tokens": stats.cached_prefix_tokens}}


async def _collect(events: AsyncIterator, reply: _Reply, codec: PromptCodec, parsed: ParsedRequest) -> web.Response:
    text, finish = "", None
    async for delta, finish in _text_deltas(events, codec, parsed, reply.prompt_tokens):
        text += delta
    if finish is None:
        raise APIError(502, "the request ended without a result", "server_error")
    body = reply.envelope([reply.choice(text, finish.finish_reason, delta=False)], chunk=False)
    body["usage"] = _usage(finish.stats)
    body["pdcluster"] = finish.stats.to_json()
    return web.json_response(body)


async def _stream(
    request: web.Request, events: AsyncIterator, reply: _Reply, codec: PromptCodec, parsed: ParsedRequest
) -> web.StreamResponse:
    deltas = _text_deltas(events, codec, parsed, reply.prompt_tokens)
    try:
        first = await anext(deltas, None)  # errors before the first token still get a proper HTTP status
    except BaseException:
        await deltas.aclose()
        raise
    response = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
    await response.prepare(request)
    closing = b"data: [DONE]\n\n"
    try:
        await _send(response, reply.envelope([reply.choice("", None, delta=True, first=True)], chunk=True))
        item = first
        while item is not None:
            delta, finish = item
            if finish is None:
                if delta:
                    await _send(response, reply.envelope([reply.choice(delta, None, delta=True)], chunk=True))
            else:
                await _send_final(response, reply, delta, finish, parsed.include_usage)
            item = await anext(deltas, None)
    except _ClientGone as e:
        log.info("request %s: client disconnected (%s); cancelling", reply.request_id, e.__cause__)
        closing = b""
    except SchedulerError as e:
        log.warning("request %s: failed mid-stream: %s", reply.request_id, e)
        closing = _event(api_error(e).body())
    except Exception as e:  # a bug, not a worker: still never a silent end
        log.exception("request %s: failed mid-stream", reply.request_id)
        closing = _event(APIError(500, f"internal error: {type(e).__name__}: {e}", "server_error",
                                  code="internal_error").body())
    finally:
        await deltas.aclose()
    if closing:
        await _write(response, closing)
    return response


class _ClientGone(Exception):
    """Writing to the client failed: it went away (the cause says how)."""


def _event(payload: dict) -> bytes:
    """One SSE ``data:`` event."""
    return b"data: " + json.dumps(payload).encode() + b"\n\n"


async def _send_final(response: web.StreamResponse, reply: _Reply, delta: str, finish: FinishEvent, usage: bool) -> None:
    chunk = reply.envelope([reply.choice(delta, finish.finish_reason, delta=True)], chunk=True)
    chunk["pdcluster"] = finish.stats.to_json()
    await _send(response, chunk)
    if usage:
        tail = reply.envelope([], chunk=True)
        tail["usage"] = _usage(finish.stats)
        tail["pdcluster"] = finish.stats.to_json()
        await _send(response, tail)


async def _send(response: web.StreamResponse, payload: dict) -> None:
    """Write one SSE event; raises ``_ClientGone`` once the client is gone,
    so the caller stops generating and cancels the request on the workers."""
    try:
        await response.write(_event(payload))
    except (ConnectionResetError, RuntimeError) as e:  # aiohttp: reset, or "cannot write to closing transport"
        raise _ClientGone() from e


async def _write(response: web.StreamResponse, data: bytes) -> None:
    """Best-effort write for the closing event (``[DONE]`` or the error), after the generator is closed."""
    try:
        await response.write(data)
    except (ConnectionResetError, RuntimeError):
        pass  # the client is gone; nothing is left to cancel


async def _text_deltas(
    events: AsyncIterator, codec: PromptCodec, parsed: ParsedRequest, prompt_tokens: int
) -> AsyncIterator[tuple[str, FinishEvent | None]]:
    """Backend events -> (text delta, None) ... then (last delta, FinishEvent).

    Applies stop strings: the text ends before the first stop string and the
    backend request is cancelled."""
    detok = codec.detokenizer()
    stop = [s for s in parsed.stop if s]
    num_tokens = 0
    held = ""  # text not yet emitted because it may be the start of a stop string
    try:
        async for event in events:
            if isinstance(event, TokenEvent):
                num_tokens += 1
                held += detok.push(event.token_id)
                cut = _find_stop(held, stop)
                if cut is not None:
                    # The backend's stats come only with its FinishEvent; report what is known here
                    # (the nodes stay "" for unknown, so the record does not claim to be colocated).
                    known = RequestStats(prompt_tokens=prompt_tokens, completion_tokens=num_tokens)
                    yield held[:cut], FinishEvent("stop", known)
                    return
                safe = len(held) - _longest_stop_prefix(held, stop)
                if safe > 0:
                    yield held[:safe], None
                    held = held[safe:]
            elif isinstance(event, FinishEvent):
                held += detok.flush()
                cut = _find_stop(held, stop)
                yield (held if cut is None else held[:cut]), event
                return
    finally:
        await events.aclose()


def _find_stop(text: str, stops: list[str]) -> int | None:
    hits = [text.find(s) for s in stops if s in text]
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
