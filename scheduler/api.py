"""The OpenAI-compatible HTTP API (aiohttp).

Routes: ``POST /v1/chat/completions``, ``POST /v1/completions`` (streamed as SSE
ending in ``data: [DONE]``, or not), ``GET /v1/models``, ``GET /v1/models/{id}``,
``GET /health``, ``GET /metrics`` (Prometheus, scheduler/metrics.py; with an API key, for key
holders only). Errors use OpenAI's shape ``{"error": {"message", "type", "param", "code"}}``.
The other dialects build on this module and register their routes (and their
error shapes) in ``build_app``: the Ollama API (api_ollama.py), Anthropic's
Messages API (api_anthropic.py) and OpenAI's Responses API (api_responses.py).
Every dialect translates its body into the chat-completions body, so one
``parse_body`` checks it and one ``start_generation`` runs it (docs/api.md).
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
by type (``ClientGone``, api_stream.py), never by catching ``RuntimeError``.

Requests (``_traced``): every ``POST`` under ``/v1/`` and ``/api/`` is traced
from its arrival to its last byte and logs one line as it ends, its
``RequestRecord`` (scheduler/request_log.py), kept for ``GET /admin/requests``.
While the scheduler drains (scheduler/drain.py), every new request under
``/v1/`` and ``/api/`` gets 503 ``draining`` with ``Retry-After`` in its
dialect's shape and ``/health`` says ``"draining"`` (503).

Security (``build_app(api_key=..., allowed_origins=...)``): with an API key,
every ``/v1/`` and ``/api/`` route wants ``Authorization: Bearer <key>`` (as
vLLM and OpenAI do) or ``x-api-key: <key>`` (as Anthropic's clients send it) and
answers 401 ``invalid_api_key`` otherwise, in the shape of the API called.
``/health`` stays open for load balancers and probes, but without the key it
says only ``{"status": ...}``: node names, addresses and load are for key
holders. ``/admin/policy`` keeps its own cluster-key signature. CORS is off
unless origins are listed: then only those origins (or any, for ``*``) get
``Access-Control-Allow-*`` headers, and a preflight ``OPTIONS`` from one of
them is answered 204 before any key check (browsers send no credentials on
preflight); one from any other origin gets 403.
"""
from __future__ import annotations

import asyncio
import hmac
import json
import logging
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Protocol

from aiohttp import web

from scheduler.drain import Drain
from scheduler.policy import POLICIES
from scheduler.api_stream import Deltas, api_error, collect, sse, stream_deltas, text_deltas
from scheduler.request import (
    Backend,
    FinishEvent,
    GenerationRequest,
    ModelEntry,
    RequestStats,
    SchedulerError,
)
from scheduler.logprobs import LogprobTap
from scheduler.request_log import RequestLog, RequestTrace
from scheduler.structured import GrammarError, check_grammar, lark_grammar
from scheduler.tokenizer import ChatTemplateError, PromptCodec
from scheduler.tools import NoToolSupport, ToolCall, ToolCallSplitter, ToolFormat, call_grammar, detect_format, \
    mistral_v11, split_tool_calls
from scheduler.validation import APIError, ParsedRequest, check_logit_bias, parse_body

log = logging.getLogger(__name__)

BACKEND_KEY = web.AppKey("backend", object)
ADMIN_KEY = web.AppKey("admin", object)
SECURITY_KEY = web.AppKey("security", object)
# path prefix -> how errors on it are rendered (a dialect's shape; OpenAI's elsewhere)
ERROR_SHAPES_KEY = web.AppKey("error_shapes", dict)
METRICS_KEY = web.AppKey("metrics", object)  # () -> (Prometheus text, content type); None: no /metrics
REQUEST_LOG_KEY = web.AppKey("request_log", RequestLog)
DRAIN_KEY = web.AppKey("drain", object)  # Drain | None (None: this app never drains)
TRACE_KEY = web.RequestKey("trace", RequestTrace)  # on a traced request
KEYED_PREFIXES = ("/v1/", "/api/")  # the routes an API key guards
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

    async def drain_node(self, node_id: str, drain: bool, timeout_s: float) -> dict:
        """Drain (or undrain) ``node_id``; its state. LookupError: no such node; ValueError: it refused."""
        ...


@dataclass(frozen=True)
class Security:
    """Who may call the API: the bearer key (None: anyone) and the CORS origins (empty: CORS off)."""

    api_key: str | None = field(default=None, repr=False)
    allowed_origins: tuple[str, ...] = ()

    def authorized(self, request: web.Request) -> bool:
        """Whether ``request`` carries ``Authorization: Bearer <api_key>`` or ``x-api-key: <api_key>``
        (always, without a key)."""
        if not self.api_key:
            return True
        scheme, _, token = request.headers.get("Authorization", "").partition(" ")
        if scheme.lower() != "bearer":
            token = request.headers.get("x-api-key", "")
        # compare_digest: the time taken does not tell how much of a guess was right
        return bool(token) and hmac.compare_digest(token.strip().encode(), self.api_key.encode())

    def allows_origin(self, origin: str | None) -> bool:
        """Whether a browser page from ``origin`` may read our answers."""
        return bool(origin) and ("*" in self.allowed_origins or origin in self.allowed_origins)


CORS_METHODS = "GET, POST, PUT, OPTIONS"
CORS_HEADERS = "Authorization, Content-Type, X-PDC-Auth, X-Api-Key"


def build_app(backend: Backend, admin: AdminBackend | None = None, *, api_key: str | None = None,
              allowed_origins: tuple[str, ...] = (),
              metrics: Callable[[], tuple[bytes, str]] | None = None, request_log: RequestLog | None = None,
              drain: Drain | None = None) -> web.Application:
    """The aiohttp application serving ``backend`` (and ``/admin/...`` when ``admin`` is given).

    ``api_key``: required on ``/v1/`` and ``/api/`` routes (None or "": open).
    ``allowed_origins``: the origins CORS admits (``*`` for any; empty: CORS off).
    ``request_log``: where each request's record goes (the backend's, so its stats join; default: a new one).
    ``drain``: the scheduler's drain (None: never drains)."""
    from scheduler import api_anthropic, api_ollama, api_responses  # they build on this module

    app = web.Application(middlewares=[_cors_preflight, _errors_in_shape, _api_key_required, _traced],
                          client_max_size=32 << 20)
    app[REQUEST_LOG_KEY] = request_log if request_log is not None else RequestLog()
    app[DRAIN_KEY] = drain
    app[BACKEND_KEY] = backend
    app[ADMIN_KEY] = admin
    app[SECURITY_KEY] = Security(api_key or None, tuple(allowed_origins))
    app[ERROR_SHAPES_KEY] = {}
    app.on_response_prepare.append(_cors_headers)
    app.router.add_get("/admin/policy", _get_policy)
    app.router.add_put("/admin/policy", _put_policy)
    app.router.add_post("/admin/drain", _post_drain)
    app.router.add_get("/admin/requests", _get_requests)
    app.router.add_post("/v1/chat/completions", _chat_completions)
    app.router.add_post("/v1/completions", _completions)
    app.router.add_get("/v1/models", _models)
    app.router.add_get("/v1/models/{model_id:.+}", _model)  # ids may hold "/" (org/name)
    app.router.add_get("/health", _health)
    app[METRICS_KEY] = metrics
    app.router.add_get("/metrics", _metrics)
    for dialect in (api_ollama, api_anthropic, api_responses):
        dialect.add_routes(app)
    from scheduler import dashboard  # the web page at / (scheduler/dashboard.py)

    dashboard.add_routes(app)
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
    """With an API key, every ``/v1/`` and ``/api/`` route wants it (401 ``invalid_api_key``)."""
    security: Security = request.app[SECURITY_KEY]
    if request.path.startswith(KEYED_PREFIXES) and not security.authorized(request):
        log.info("%s %s from %s refused: missing or wrong API key", request.method, request.path, request.remote)
        raise APIError(401, "Incorrect or missing API key: send it as 'Authorization: Bearer <key>' "
                       "or 'x-api-key: <key>'", "invalid_request_error", code="invalid_api_key",
                       headers={"WWW-Authenticate": "Bearer"})
    return await handler(request)


@web.middleware
async def _errors_in_shape(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Every error before the first byte, in the error shape of the API that was called."""
    try:
        return await handler(request)
    except APIError as e:
        return _error_response(request, e)
    except SchedulerError as e:  # a traced request's record says it (_traced)
        log.debug("%s %s failed before the first byte: %s %s", request.method, request.path, e.status, e)
        return _error_response(request, api_error(e))
    except web.HTTPException as e:
        if e.status >= 400:
            return _error_response(request, APIError(e.status, e.reason or "error", "invalid_request_error"))
        raise


@web.middleware
async def _traced(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Refuse ``/v1/`` and ``/api/`` while draining (503 with ``Retry-After``); trace every ``POST``
    there from its arrival to its last byte and log its record as it ends (scheduler/request_log.py)."""
    if not request.path.startswith(KEYED_PREFIXES):
        return await handler(request)
    drain: Drain | None = request.app[DRAIN_KEY]
    if request.method != "POST":
        if drain is not None and drain.draining:
            raise drain.refusal()
        return await handler(request)
    requests: RequestLog = request.app[REQUEST_LOG_KEY]
    trace = request[TRACE_KEY] = requests.open(request.path, asyncio.current_task())
    try:
        if drain is not None and drain.draining:
            raise drain.refusal()
        response = await handler(request)
        trace.status = response.status
        return response
    except APIError as e:
        trace.failed(e.status, e.code or e.type, e.message)
        raise
    except SchedulerError as e:
        trace.failed(e.status, e.code, e.message)
        raise
    except web.HTTPException as e:
        trace.failed(e.status, "http_error", e.reason or "")
        raise
    except asyncio.CancelledError:
        if trace.cut is not None:  # the drain cut it while it wrote (else: the client went away)
            trace.failed(trace.cut.status, trace.cut.code, trace.cut.message)
        raise
    except Exception as e:
        trace.failed(500, "internal_error", f"{type(e).__name__}: {e}")
        raise
    finally:
        record = requests.close(trace)
        if record is not None:  # a server-side failure is a warning; the drain's refusals are expected
            failed = record.status >= 500 and record.outcome != "draining"
            log.log(logging.WARNING if failed else logging.INFO, "%s", record.line(),
                    extra={"request": record.to_json()})


def _error_response(request: web.Request, error: APIError) -> web.Response:
    """``error`` in the shape a dialect registered for ``request``'s path; OpenAI's otherwise."""
    shapes: dict[str, Callable[[APIError], web.Response]] = request.app[ERROR_SHAPES_KEY]
    shape = next((render for prefix, render in shapes.items() if request.path.startswith(prefix)), None)
    return shape(error) if shape else error.response()


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


async def _post_drain(request: web.Request) -> web.Response:
    """``{"node": ID, "drain": true|false, "timeout_s": S}``: take a node out of placement (its requests
    in flight finish, or fail over after ``timeout_s``) or put it back."""
    admin = _admin(request)
    try:
        body = await request.json()
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise APIError(400, "request body is not valid JSON") from None
    node, drain = (body.get("node"), body.get("drain", True)) if isinstance(body, dict) else (None, None)
    timeout_s = body.get("timeout_s", 0) if isinstance(body, dict) else 0
    if not isinstance(node, str) or not node or not isinstance(drain, bool) \
            or isinstance(timeout_s, bool) or not isinstance(timeout_s, (int, float)) or not 0 <= timeout_s < 86400:
        raise APIError(400, "body must be {\"node\": NODE_ID, \"drain\": true|false, \"timeout_s\": S >= 0}")
    try:
        state = await admin.drain_node(node, drain, float(timeout_s))
    except LookupError as e:
        raise APIError(404, str(e), param="node") from None
    except ValueError as e:
        raise APIError(502, str(e), "upstream_error") from None
    log.warning("node %s %s by an admin call", node, "draining" if drain else "undrained")
    return web.json_response(state)


async def _get_requests(request: web.Request) -> web.Response:
    """``?limit=N&after=SEQ``: the newest ``limit`` request records (default 100) with ``seq`` > ``after``,
    oldest first; with the requests in flight and whether the scheduler drains."""
    _admin(request)
    requests: RequestLog = request.app[REQUEST_LOG_KEY]
    unknown = sorted(set(request.query) - {"limit", "after"})
    if unknown:
        raise APIError(400, f"unknown query parameter {unknown[0]!r}: /admin/requests takes limit and after",
                       param=unknown[0])
    limit = _query_int(request, "limit", min(100, requests.size), 1, requests.size,
                       f"the scheduler keeps the last {requests.size} (pdc serve --request-log-size)")
    after = _query_int(request, "after", 0, 0, None, "")
    drain: Drain | None = request.app[DRAIN_KEY]
    return web.json_response({"requests": [r.to_json() for r in requests.recent(limit, after)],
                              "size": requests.size, "recorded": requests.num_recorded,
                              "in_flight": requests.num_open, "draining": bool(drain and drain.draining)})


def _query_int(request: web.Request, name: str, default: int, low: int, high: int | None, why: str) -> int:
    """Query parameter ``name`` as an integer in [low, high]; 400 naming it otherwise."""
    text = request.query.get(name)
    if text is None:
        return default
    value = int(text) if text.isdigit() else None
    if value is None or value < low or (high is not None and value > high):
        bound = f"an integer >= {low}" if high is None else f"an integer in [{low}, {high}]"
        raise APIError(400, f"'{name}' must be {bound}, got {text!r}" + (f": {why}" if why else ""), param=name)
    return value


async def _models(request: web.Request) -> web.Response:
    backend: Backend = request.app[BACKEND_KEY]
    return web.json_response({"object": "list", "data": [_model_json(m) for m in backend.models()]})


async def _model(request: web.Request) -> web.Response:
    """One served model in OpenAI's shape; 404 ``model_not_found`` for any other id."""
    model_id = request.match_info["model_id"]
    entry = next((m for m in request.app[BACKEND_KEY].models() if m.model_id == model_id), None)
    if entry is None:
        raise APIError(404, f"The model '{model_id}' does not exist or no node serves it", "invalid_request_error",
                       param="model", code="model_not_found")
    return web.json_response(_model_json(entry))


def _model_json(m: ModelEntry) -> dict:
    return {"id": m.model_id, "object": "model", "created": m.created, "owned_by": "pdcluster",
            "context_length": m.context_length}


async def _health(request: web.Request) -> web.Response:
    """Open to anyone; the details (nodes, addresses, load) only with the API key, when there is one."""
    ready, details = request.app[BACKEND_KEY].health()
    details["requests_in_flight"] = request.app[REQUEST_LOG_KEY].num_open
    if not request.app[SECURITY_KEY].authorized(request):
        details = {}
    drain: Drain | None = request.app[DRAIN_KEY]
    status = "draining" if drain is not None and drain.draining else "ok" if ready else "unavailable"
    return web.json_response({"status": status, **details}, status=200 if status == "ok" else 503)


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
    try:
        body = await request.json()
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise APIError(400, "request body is not valid JSON", "invalid_request_error") from None
    parsed = parse_body(body, chat=chat)
    tap = LogprobTap(chat=chat) if parsed.logprobs is not None else None
    gen, deltas = start_generation(request, parsed, arrived, tap)
    reply = _Reply(chat=chat, model=parsed.model, request_id=gen.request_id, created=int(time.time()),
                   prompt_tokens=len(gen.prompt_token_ids), logprobs=tap)
    if parsed.stream:
        return await stream_deltas(request, deltas, _OpenAIStream(reply, parsed.include_usage), gen.request_id)
    return await _collect(deltas, reply)


def start_generation(request: web.Request, parsed: ParsedRequest, arrived: float,
                     logprobs: LogprobTap | None = None) -> tuple[GenerationRequest, Deltas]:
    """Tokenize ``parsed`` and start it on the backend: its GenerationRequest and its text
    deltas (stop strings applied). 404 ``model_not_found`` when no node serves the model.
    Nothing runs until the deltas are iterated; closing them cancels the request.
    ``logprobs`` keeps every token for rendering its logprobs (``parsed.logprobs``)."""
    backend: Backend = request.app[BACKEND_KEY]
    trace = request.get(TRACE_KEY)
    if trace is not None:
        trace.model = parsed.model
    codec = backend.codec_for(parsed.model)
    if codec is None:
        raise APIError(404, f"The model '{parsed.model}' does not exist or no node serves it", "invalid_request_error",
                       param="model", code="model_not_found")
    tool_format = _tool_format(parsed, codec)
    gen = _to_generation(parsed, codec, backend, arrived, tool_format)
    # the request's one INFO line is its record, as it ends (_traced)
    log.debug("request %s: %s model=%s prompt=%d tokens max_tokens=%d stream=%s%s", gen.request_id, request.path,
              parsed.model, len(gen.prompt_token_ids), gen.max_tokens, parsed.stream,
              f" user={gen.user!r}" if gen.user is not None else "")
    events = backend.generate(gen)
    if logprobs is not None:
        events = logprobs.wrap(events, codec)
    if tool_format is not None and parsed.tool_choice.mode != "none":  # calls are read from the text
        keep = frozenset(filter(None, map(codec.special_token_id, tool_format.specials)))
        deltas = text_deltas(events, codec, parsed.stop, len(gen.prompt_token_ids), keep=keep,
                             section_at=lambda text: tool_format.find_section(text, True))
        deltas = split_tool_calls(deltas, ToolCallSplitter(tool_format, parsed.tools,
                                                           parallel=parsed.parallel_tool_calls))
    else:
        deltas = text_deltas(events, codec, parsed.stop, len(gen.prompt_token_ids))
    if trace is None:
        return gen, deltas
    request.app[REQUEST_LOG_KEY].started(trace, gen, parsed.stream)
    return gen, trace.watch(deltas)


def _tool_format(parsed: ParsedRequest, codec: PromptCodec) -> ToolFormat | None:
    """The tool-call format of the model's chat template when the request offers tools; 400 when it has none."""
    if not parsed.tools:
        return None
    try:
        return detect_format(codec.bundle.chat_template)
    except NoToolSupport as e:
        raise APIError(400, f"'tools' cannot be used with model {parsed.model!r}: {e}", param="tools") from None


def _grammar(parsed: ParsedRequest, codec: PromptCodec, tool_format: ToolFormat | None) -> str:
    """The request's grammar for constrained decoding ("" for none), checked against the model's tokenizer."""
    if parsed.response_grammar is not None:
        grammar, param = parsed.response_grammar, "response_format"
    elif tool_format is not None and parsed.tool_choice.forces_call:
        special = {m: i for m in tool_format.specials if (i := codec.special_token_id(m)) is not None}
        try:
            grammar = lark_grammar(call_grammar(tool_format, parsed.tools, parsed.tool_choice,
                                                parsed.parallel_tool_calls, special,
                                                v11=mistral_v11(codec.bundle.chat_template)))
        except GrammarError as e:
            raise APIError(400, f"'tools': a parameters schema cannot constrain decoding: {e}", param="tools") from None
        param = "tools"
    else:
        return ""
    try:
        tokenizer = codec.grammar_tokenizer
    except (ValueError, RuntimeError) as e:  # a tokenizer llguidance cannot read
        raise APIError(400, f"'{param}': constrained decoding is not available for model {parsed.model!r}: {e}",
                       param=param) from None
    try:
        check_grammar(grammar, tokenizer)
    except GrammarError as e:
        raise APIError(400, f"'{param}' cannot constrain decoding: {e}", param=param) from None
    return grammar


def _template_ids(message: dict, fmt: ToolFormat) -> dict:
    """``message`` with its call ids as the model's template takes them (Mistral's: nine characters)."""
    if "tool_calls" in message:
        message = {**message, "tool_calls": [{**c, "id": fmt.history_id(c["id"])} for c in message["tool_calls"]]}
    if "tool_call_id" in message:
        message = {**message, "tool_call_id": fmt.history_id(message["tool_call_id"])}
    return message


def _to_generation(parsed: ParsedRequest, codec: PromptCodec, backend: Backend, arrived: float,
                   tool_format: ToolFormat | None = None) -> GenerationRequest:
    try:
        tools = [t.to_template() for t in parsed.tools]
        messages = parsed.messages
        if messages is not None and tool_format is not None:
            messages = [_template_ids(m, tool_format) for m in messages]
        text = codec.render_chat(messages, tools) if messages is not None else parsed.prompt
    except ChatTemplateError as e:
        raise APIError(400, str(e), "invalid_request_error", param="messages") from None
    token_ids = codec.encode(text)
    if not token_ids:
        raise APIError(400, "the prompt is empty", "invalid_request_error", param="prompt")
    check_logit_bias(parsed, codec.tokenizer.get_vocab_size())
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
        presence_penalty=parsed.presence_penalty, frequency_penalty=parsed.frequency_penalty,
        logit_bias=_logit_bias(parsed, codec, tool_format), logprobs=parsed.logprobs is not None,
        top_logprobs=parsed.logprobs or 0, user=parsed.user, grammar=_grammar(parsed, codec, tool_format),
    )


def _logit_bias(parsed: ParsedRequest, codec: PromptCodec, tool_format: ToolFormat | None) -> tuple:
    """The request's ``logit_bias``; with ``tool_choice: "none"``, also -100 on each marker that opens a
    call where it is one token of the model's vocabulary, so the model writes no call (the client's own
    bias on that token wins)."""
    if tool_format is None or parsed.tool_choice.mode != "none":
        return parsed.logit_bias
    bias = dict(parsed.logit_bias)
    for marker in tool_format.markers:
        token = codec.tokenizer.token_to_id(marker)
        if token is not None:
            bias.setdefault(token, -100.0)
    return tuple(sorted(bias.items()))


@dataclass
class _Reply:
    """Shapes response objects for one request."""

    chat: bool
    model: str
    request_id: str
    created: int
    prompt_tokens: int = 0
    logprobs: LogprobTap | None = None  # when the request asked for logprobs

    @property
    def object(self) -> str:
        return "chat.completion" if self.chat else "text_completion"

    def choice(self, text: str, finish_reason: str | None, *, delta: bool, first: bool = False,
               calls: list[ToolCall] | tuple[ToolCall, ...] = ()) -> dict:
        """One choice; with logprobs, those of every token not rendered in an earlier choice;
        ``calls``: the tool calls of a whole message (content null when there is no text, as OpenAI's)."""
        logprobs = self.logprobs.take() if self.logprobs is not None and not first else None
        if not self.chat:
            return {"index": 0, "text": text, "logprobs": logprobs, "finish_reason": finish_reason}
        if not delta:
            message: dict = {"role": "assistant", "content": text or (None if calls else "")}
            if calls:
                message["tool_calls"] = [{"id": c.id, "type": "function",
                                          "function": {"name": c.name, "arguments": c.arguments}} for c in calls]
            return {"index": 0, "message": message, "logprobs": logprobs, "finish_reason": finish_reason}
        content = {"role": "assistant", "content": text} if first else ({"content": text} if text else {})
        return {"index": 0, "delta": content, "logprobs": logprobs, "finish_reason": finish_reason}

    def envelope(self, choices: list[dict], *, chunk: bool) -> dict:
        obj = self.object + (".chunk" if chunk and self.chat else "")
        return {"id": self.request_id, "object": obj, "created": self.created, "model": self.model, "choices": choices}


def _usage(stats: RequestStats) -> dict:
    """OpenAI's usage object; ``prompt_tokens_details.cached_tokens``: prompt tokens whose KV
    came from a prefix cache (``RequestStats.cached_prefix_tokens``), as OpenAI reports them."""
    return {"prompt_tokens": stats.prompt_tokens, "completion_tokens": stats.completion_tokens,
            "total_tokens": stats.prompt_tokens + stats.completion_tokens,
            "prompt_tokens_details": {"cached_tokens": stats.cached_prefix_tokens}}


async def _collect(deltas: Deltas, reply: _Reply) -> web.Response:
    text, calls, finish = await collect(deltas)
    body = reply.envelope([reply.choice(text, finish.finish_reason, delta=False, calls=calls)], chunk=False)
    body["usage"] = _usage(finish.stats)
    body["pdcluster"] = finish.stats.to_json()
    return web.json_response(body)


@dataclass
class _OpenAIStream:
    """OpenAI's SSE chunks: the role first, text deltas, the finish with its
    ``pdcluster`` record, the usage chunk when asked for, then ``data: [DONE]``."""

    reply: _Reply
    include_usage: bool
    content_type = "text/event-stream"

    def opening(self) -> bytes:
        return sse(self.reply.envelope([self.reply.choice("", None, delta=True, first=True)], chunk=True))

    def delta(self, text: str) -> bytes:
        return sse(self.reply.envelope([self.reply.choice(text, None, delta=True)], chunk=True))

    def tool_call(self, call: ToolCall) -> bytes:
        """As OpenAI streams a call: its id, type and name with empty arguments, then the arguments."""
        head = {"index": call.index, "id": call.id, "type": "function",
                "function": {"name": call.name, "arguments": ""}}
        tail = {"index": call.index, "function": {"arguments": call.arguments}}
        return b"".join(sse(self.reply.envelope([{"index": 0, "delta": {"tool_calls": [part]}, "logprobs": None,
                                                  "finish_reason": None}], chunk=True)) for part in (head, tail))

    def finished(self, text: str, finish: FinishEvent) -> bytes:
        chunk = self.reply.envelope([self.reply.choice(text, finish.finish_reason, delta=True)], chunk=True)
        chunk["pdcluster"] = finish.stats.to_json()
        out = sse(chunk)
        if self.include_usage:
            tail = self.reply.envelope([], chunk=True)
            tail["usage"] = _usage(finish.stats)
            tail["pdcluster"] = finish.stats.to_json()
            out += sse(tail)
        return out + b"data: [DONE]\n\n"

    def failure(self, error: APIError) -> bytes:
        return sse(error.body())  # the openai SDK raises it as openai.APIError
