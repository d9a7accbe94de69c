"""The web dashboard at the scheduler's ``/``: one static page, the JSON it polls, its sign-in.

Routes (``add_routes``, called by api.py's ``build_app``):

* ``GET /``: the page (scheduler/static/index.html), ``GET /dashboard/app.js`` and
  ``/dashboard/style.css``: plain files, no build step;
* ``GET /dashboard/state``: what the page polls every second: nodes, links, the policy,
  the requests in flight and the recent ones, each with its timeline;
* ``GET /dashboard/login?token=T``: T signs ``GET /dashboard/login`` with the cluster
  key (``pdc dashboard`` mints it, cluster/dashboard_cli.py); a valid, unused, fresh T
  starts a session (cookie) and redirects to ``/``;
* ``POST /dashboard/policy`` ``{"policy": NAME}``: switch to a built-in policy;
* ``POST /dashboard/logout``: end the session.

Security (docs/operations.md, "Dashboard"). The cluster key never reaches a
browser: only ``pdc dashboard`` holds it, and what it hands over is one login
token, checked by the same ``PolicyAdmin.authorize`` as ``/admin/*`` (single
use, within ``AUTH_WINDOW_S``) and good for that one path only. The session is
a random id kept here, expiring after ``SESSION_TTL_S``, in an ``HttpOnly;
SameSite=Strict`` cookie (``Secure`` over https). The policy switch needs that
session, the session's CSRF token in ``X-PDC-CSRF`` (which only a same-origin
page can read, from ``/dashboard/state``) and no foreign ``Origin``; it then
takes the admin's ``switch_policy``, the code path of ``PUT /admin/policy``, for
built-in policies only (loading code by path stays with ``pdc policy --set``).
``/dashboard/state`` shows nodes, links and requests to a session, to an API
key holder, or to anyone when the scheduler has no API key: ``/health``'s rule.
"""
from __future__ import annotations

import hmac
import html
import json
import logging
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

from aiohttp import web

from cluster.dashboard_cli import LOGIN_CALL, LOGIN_PATH
from scheduler.api import ADMIN_KEY, BACKEND_KEY, DRAIN_KEY, REQUEST_LOG_KEY, SECURITY_KEY, AdminBackend, Security
from scheduler.policy import POLICIES
from scheduler.request_log import RequestLog, RequestRecord, RequestTrace
from scheduler.validation import APIError

log = logging.getLogger(__name__)

STATIC = Path(__file__).resolve().parent / "static"
FILES = {"/": ("index.html", "text/html"), "/dashboard/app.js": ("app.js", "text/javascript"),
         "/dashboard/style.css": ("style.css", "text/css")}
SESSION_COOKIE = "pdc_session"
CSRF_HEADER = "X-PDC-CSRF"
SESSION_TTL_S = 8 * 3600.0
MAX_SESSIONS = 64  # the oldest session ends when one more starts
NUM_RECENT = 50  # recent request records the state carries
SIGN_IN_HINT = "run `pdc dashboard --scheduler URL` where the cluster key is, and open the link it prints"
# Every dashboard answer: nothing but this origin's own files runs, it is never framed, nor cached
PAGE_HEADERS = {
    "Content-Security-Policy": "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
                               "connect-src 'self'; frame-ancestors 'none'; base-uri 'none'; form-action 'self'",
    "X-Frame-Options": "DENY",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-store",
}

StateSource = Callable[[], dict]  # {"nodes": [...], "links": [...], "policy": str, "kv_codec": str}


@dataclass(frozen=True)
class Session:
    """One signed-in browser."""

    session_id: str = field(repr=False)
    csrf: str = field(repr=False)  # sent back in X-PDC-CSRF on every change
    expires_at: float  # on ``Sessions.clock``


class Sessions:
    """The signed-in browsers, kept in memory only (a restarted scheduler signs everyone out)."""

    def __init__(self, ttl_s: float = SESSION_TTL_S, max_sessions: int = MAX_SESSIONS,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.ttl_s, self.max_sessions, self.clock = ttl_s, max_sessions, clock
        self._sessions: dict[str, Session] = {}  # insertion order: oldest first

    def __len__(self) -> int:
        return len(self._sessions)

    def create(self) -> Session:
        """A new session with fresh random id and CSRF token."""
        self._expire()
        while len(self._sessions) >= self.max_sessions:
            del self._sessions[next(iter(self._sessions))]
        session = Session(secrets.token_urlsafe(32), secrets.token_urlsafe(32), self.clock() + self.ttl_s)
        self._sessions[session.session_id] = session
        return session

    def get(self, session_id: str | None) -> Session | None:
        """The live session ``session_id``; None when unknown or expired."""
        self._expire()
        return self._sessions.get(session_id) if session_id else None

    def end(self, session_id: str) -> None:
        self._sessions.pop(session_id, None)

    def _expire(self) -> None:
        now = self.clock()
        for session_id in [s for s, session in self._sessions.items() if session.expires_at <= now]:
            del self._sessions[session_id]


STATE_KEY = web.AppKey("dashboard_state", object)  # StateSource | None (None: the backend's /health details)
SESSIONS_KEY = web.AppKey("dashboard_sessions", Sessions)


def add_routes(app: web.Application, sessions: Sessions | None = None) -> None:
    """Serve the dashboard from ``app`` (an api.py app). ``app[STATE_KEY]`` may name a richer
    state source than the backend's ``/health`` details (service.py sets the cluster's)."""
    app[SESSIONS_KEY] = sessions if sessions is not None else Sessions()
    app[STATE_KEY] = None
    for path in FILES:
        app.router.add_get(path, _file)
    app.router.add_get("/dashboard/state", _state)
    app.router.add_get(LOGIN_PATH, _login)
    app.router.add_post("/dashboard/policy", _switch_policy)
    app.router.add_post("/dashboard/logout", _logout)


async def _file(request: web.Request) -> web.Response:
    name, content_type = FILES[request.path]
    return web.Response(body=(STATIC / name).read_bytes(), content_type=content_type, charset="utf-8",
                        headers=PAGE_HEADERS)


# ---------------------------------------------------------------- state


async def _state(request: web.Request) -> web.Response:
    """The page's state: always whether it is signed in and may see details; the details
    (nodes, links, policy, requests) for a session, an API key holder, or anyone without a key."""
    session = _session(request)
    security: Security = request.app[SECURITY_KEY]
    shown = session is not None or security.authorized(request)
    ready, details = request.app[BACKEND_KEY].health()
    drain = request.app[DRAIN_KEY]
    draining = drain is not None and drain.draining
    body: dict = {"status": "draining" if draining else "ok" if ready else "unavailable",
                  "signed_in": session is not None, "details": shown, "api_key_required": bool(security.api_key),
                  "can_switch": request.app[ADMIN_KEY] is not None, "sign_in": SIGN_IN_HINT}
    if session is not None:
        body["csrf"] = session.csrf
        body["session_expires_in_s"] = round(session.expires_at - request.app[SESSIONS_KEY].clock())
    if shown:
        source: StateSource | None = request.app[STATE_KEY]
        body.update(source() if source is not None else health_state(details))
        admin: AdminBackend | None = request.app[ADMIN_KEY]
        if admin is not None:
            body["policy"] = admin.current_policy()
        body["builtin_policies"] = sorted(POLICIES)
        body["requests"] = requests_state(request.app[REQUEST_LOG_KEY])
    return web.json_response(body, headers=PAGE_HEADERS)


def health_state(details: dict) -> dict:
    """The state of a backend that offers only ``/health``'s details."""
    draining = details.get("draining", {})
    nodes = [{**n, "health": "draining" if n.get("node_id") in draining else "up",
              "health_reason": draining.get(n.get("node_id"), "")} for n in details.get("nodes", [])]
    return {"nodes": nodes, "links": details.get("links", []), "policy": details.get("policy", ""),
            "kv_codec": details.get("kv_codec", "")}


def requests_state(requests: RequestLog, num_recent: int = NUM_RECENT) -> dict:
    """The requests in flight and the last ``num_recent`` that ended, newest first, with their timelines."""
    now = requests.clock()
    live = [trace_json(t, now) for t in reversed(requests.in_flight()) if t.request_id]
    recent = [record_json(r) for r in reversed(requests.recent(num_recent))]
    return {"now": now, "in_flight": requests.num_open, "recorded": requests.num_recorded, "live": live,
            "recent": recent}


def trace_json(trace: RequestTrace, now: float) -> dict:
    """A request in flight: what the scheduler knows of it so far."""
    return {"request_id": trace.request_id, "live": True, "route": trace.route, "model": trace.model,
            "stream": trace.stream, "arrived_ts": trace.arrived_ts, "prefill_node": trace.prefill_node,
            "decode_node": trace.decode_node, "prompt_tokens": trace.prompt_tokens,
            "elapsed_s": round(max(0.0, now - trace.arrived_ts), 6),
            "phases": [p.to_json() for p in trace.phases(now)]}


def record_json(record: RequestRecord) -> dict:
    """A request that ended: its record's placement, timings and timeline (not its ``user``)."""
    s = record.stats
    return {"request_id": record.request_id, "live": False, "route": record.route, "model": record.model,
            "stream": record.stream, "status": record.status, "outcome": record.outcome, "error": record.error,
            "arrived_ts": record.arrived_ts, "ended_ts": record.ts, "placement": record.placement,
            "prefill_node": s.prefill_node, "decode_node": s.decode_node, "kv_codec": s.kv_codec,
            "kv_bytes": s.kv_bytes, "ttft_s": round(s.ttft_s, 6), "e2e_s": round(s.e2e_s, 6),
            "tpot_s": None if s.tpot_s is None else round(s.tpot_s, 6), "prompt_tokens": s.prompt_tokens,
            "cached_tokens": s.cached_prefix_tokens, "completion_tokens": s.completion_tokens,
            "migrations": s.migrations, "phases": [p.to_json() for p in record.phases()]}


# ---------------------------------------------------------------- sign-in and changes


def _session(request: web.Request) -> Session | None:
    return request.app[SESSIONS_KEY].get(request.cookies.get(SESSION_COOKIE))


async def _login(request: web.Request) -> web.Response:
    """Trade a login token (``pdc dashboard``) for a session cookie, then go to the page."""
    admin: AdminBackend | None = request.app[ADMIN_KEY]
    if admin is None:
        return _page(404, "This scheduler has no admin endpoint: nobody can sign in here.")
    token = request.query.get("token")
    why = admin.authorize(LOGIN_CALL, token) if token else "the link carries no token"
    if why is not None:
        log.warning("dashboard sign-in from %s refused: %s", request.remote, why)
        return _page(403, f"Sign-in refused: {why}. Each link works once, for a minute: {SIGN_IN_HINT}.")
    sessions: Sessions = request.app[SESSIONS_KEY]
    session = sessions.create()
    log.warning("dashboard sign-in from %s (%d sessions)", request.remote, len(sessions))
    response = web.Response(status=303, headers={**PAGE_HEADERS, "Location": "/"})
    response.set_cookie(SESSION_COOKIE, session.session_id, max_age=int(sessions.ttl_s), path="/",
                        httponly=True, samesite="Strict", secure=request.secure)
    return response


def _page(status: int, text: str) -> web.Response:
    body = (f"<!doctype html><meta charset=utf-8><title>pdcluster dashboard</title>"
            f"<p>{html.escape(text)}</p><p><a href=\"/\">the dashboard (read-only)</a></p>")
    return web.Response(status=status, text=body, content_type="text/html", headers=PAGE_HEADERS)


def _signed_in(request: web.Request) -> Session:
    """The request's session, with its CSRF token and from this origin; 403 otherwise."""
    session = _session(request)
    if session is None:
        raise APIError(403, f"not signed in to the dashboard: {SIGN_IN_HINT}", "permission_error")
    if not hmac.compare_digest(request.headers.get(CSRF_HEADER, "").encode(), session.csrf.encode()):
        raise APIError(403, f"missing or wrong {CSRF_HEADER} header", "permission_error")
    origin = request.headers.get("Origin")
    if origin and urlsplit(origin).netloc != request.host:
        raise APIError(403, f"origin {origin!r} is not this dashboard's", "permission_error")
    return session


async def _switch_policy(request: web.Request) -> web.Response:
    """``{"policy": NAME}``: place with the built-in policy NAME from the next request on."""
    admin: AdminBackend | None = request.app[ADMIN_KEY]
    if admin is None:
        raise APIError(404, "this scheduler has no admin endpoint")
    _signed_in(request)
    try:
        body = await request.json()
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise APIError(400, "request body is not valid JSON") from None
    spec = body.get("policy") if isinstance(body, dict) else None
    if spec not in POLICIES:
        raise APIError(400, f"the dashboard switches to a built-in policy ({', '.join(sorted(POLICIES))}); "
                       "load others with `pdc policy --set SPEC`", param="policy")
    try:
        name = admin.switch_policy(spec)
    except ValueError as e:
        raise APIError(400, str(e), param="policy") from None
    log.warning("placement policy switched to %s from the dashboard (%s)", name, request.remote)
    return web.json_response({"policy": name}, headers=PAGE_HEADERS)


async def _logout(request: web.Request) -> web.Response:
    session = _signed_in(request)
    request.app[SESSIONS_KEY].end(session.session_id)
    response = web.json_response({"signed_in": False}, headers=PAGE_HEADERS)
    response.del_cookie(SESSION_COOKIE, path="/")
    return response
