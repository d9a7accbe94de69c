"""The client side of ``pdc bench link``: run inside the decode node's namespace.

The scheduler binds 127.0.0.1 inside that namespace, where the bench's own
process cannot reach, so the bench starts this module there
(``ip netns exec <ns> python -m workers.tools.link_client``) with a plan on
stdin and reads one JSON object per line from its stdout:

1. ``{"health": {...}}`` once ``/health`` lists both nodes and the probed
   prefill -> decode link (or ``{"error": ...}`` and exit 1 if it never does);
2. ``{"key": ..., "ok": true, "pdcluster": {...}}`` (or ``"ok": false`` with
   ``"error"``) per planned request, in order: non-streamed chat completions
   whose ``pdcluster`` object carries the placement and timings; a plan entry
   ``{"key": ..., "health": true}`` is answered with ``/health`` at that point
   instead (``{"key": ..., "ok": true, "health": {...}}``).

Every request has a timeout and the whole plan a deadline: a request past
it is reported as skipped, never sent. Only 127.0.0.1 is contacted.
"""
from __future__ import annotations

import json
import sys
import time
import urllib.error
import urllib.request
from typing import Any

HOST = "127.0.0.1"


def get_json(url: str, timeout: float) -> tuple[int | None, Any]:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as e:
        try:
            return e.code, json.loads(e.read() or b"null")
        except ValueError:
            return e.code, None
    except (OSError, ValueError):
        return None, None


def link_ready(body: Any) -> bool:
    """Both nodes known and the prefill -> decode link probed without error."""
    if not isinstance(body, dict) or len(body.get("nodes") or []) < 2:
        return False
    return any(link.get("error") is None and (link.get("gbps") or 0) > 0 for link in body.get("links") or [])


def wait_healthy(base: str, timeout_s: float) -> dict | None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        status, body = get_json(base + "/health", timeout=3)
        if status == 200 and link_ready(body):
            return body
        time.sleep(0.25)
    return None


def chat(base: str, model: str, item: dict[str, Any], timeout_s: float) -> dict[str, Any]:
    """One chat completion; its ``pdcluster`` object, or why it failed."""
    body = {"model": model, "messages": [{"role": "user", "content": item["prompt"]}],
            "max_tokens": item.get("max_tokens", 1), "temperature": 0, "stream": False,
            "pdcluster": item.get("pdcluster") or {}}
    request = urllib.request.Request(base + "/v1/chat/completions", data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"}, method="POST")
    try:
        with urllib.request.urlopen(request, timeout=timeout_s) as resp:
            reply = json.loads(resp.read())
    except urllib.error.HTTPError as e:
        return {"ok": False, "error": f"HTTP {e.code}: {e.read()[:300].decode(errors='replace')}"}
    except (OSError, ValueError) as e:
        return {"ok": False, "error": f"{type(e).__name__}: {e}"}
    stats = reply.get("pdcluster") if isinstance(reply, dict) else None
    if not isinstance(stats, dict):
        return {"ok": False, "error": f"no pdcluster object in the reply: {str(reply)[:300]}"}
    return {"ok": True, "pdcluster": stats, "usage": reply.get("usage")}


def run(plan: dict[str, Any], out: Any = sys.stdout) -> int:
    base = f"http://{HOST}:{int(plan['port'])}"
    health = wait_healthy(base, float(plan.get("ready_timeout_s", 120)))
    if health is None:
        print(json.dumps({"error": f"the scheduler at {base} did not list both nodes and a probed link in time"}),
              file=out, flush=True)
        return 1
    print(json.dumps({"health": health}), file=out, flush=True)
    model = health["models"][0]
    deadline = time.monotonic() + float(plan.get("deadline_s", 1800))
    for item in plan["requests"]:
        left = deadline - time.monotonic()
        if left <= 1:
            result = {"ok": False, "error": "skipped: the link's deadline passed"}
        elif item.get("health"):
            status, body = get_json(base + "/health", timeout=min(10.0, left))
            result = {"ok": True, "health": body} if status == 200 else {"ok": False, "error": f"/health: {status}"}
        else:
            result = chat(base, model, item, min(float(plan.get("request_timeout_s", 120)), left))
        print(json.dumps({"key": item["key"], **result}), file=out, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(run(json.loads(sys.stdin.read())))
