"""``pdc dashboard``: sign a browser in to a running scheduler's dashboard.

The cluster key never reaches the browser. This command, run where the key
is, signs one call of ``GET /dashboard/login`` with it (``cluster/auth.py``
``sign_call``: a timestamp, a random nonce and an HMAC) and hands the browser
``SCHEDULER/dashboard/login?token=...``. The scheduler accepts that token
once, within ``AUTH_WINDOW_S`` of its timestamp, and answers with a session
cookie (scheduler/dashboard.py); the policy switch then needs that session.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import urllib.error
import urllib.parse
import urllib.request
import webbrowser

from cluster.auth import AUTH_WINDOW_S, ClusterKey, load_cluster_key, sign_call

LOGIN_PATH = "/dashboard/login"
LOGIN_CALL = f"GET {LOGIN_PATH}"  # what a login token signs: no other call accepts it, nor it another
STATE_PATH = "/dashboard/state"
DEFAULT_URL = "http://127.0.0.1:8000"
PROBE_TIMEOUT_S = 10.0


def login_url(url: str, key: ClusterKey) -> str:
    """A single-use sign-in link to the dashboard of the scheduler at ``url``."""
    token = sign_call(key, LOGIN_CALL)
    return f"{url.rstrip('/')}{LOGIN_PATH}?{urllib.parse.urlencode({'token': token})}"


def check_dashboard(url: str, timeout_s: float = PROBE_TIMEOUT_S) -> None:
    """ValueError unless a scheduler with a dashboard answers at ``url`` (an unsigned read of its state)."""
    try:
        with urllib.request.urlopen(url.rstrip("/") + STATE_PATH, timeout=timeout_s) as reply:
            body = json.loads(reply.read())
    except urllib.error.HTTPError as e:
        raise ValueError(f"{url} has no pdc dashboard (HTTP {e.code} on {STATE_PATH}); is it a pdc scheduler?") \
            from None
    except OSError as e:  # refused, unknown host, timeout
        raise ValueError(f"cannot reach the scheduler at {url}: {getattr(e, 'reason', e)}") from None
    except ValueError:
        raise ValueError(f"{url} did not answer {STATE_PATH} as a pdc scheduler") from None
    if not isinstance(body, dict) or "signed_in" not in body:
        raise ValueError(f"{url} did not answer {STATE_PATH} as a pdc scheduler")


def add_dashboard_parser(sub: argparse._SubParsersAction) -> None:
    """Register ``pdc dashboard``."""
    p = sub.add_parser(
        "dashboard",
        help="open a running scheduler's web dashboard, signed in",
        description=(
            "Open the web dashboard of a running `pdc serve` (nodes, links, requests with their timelines, "
            "the placement policy, a chat box) signed in, so that it may switch the policy. The cluster key "
            "stays here: this signs one login call with it and prints (and opens) a sign-in link that the "
            f"scheduler accepts once, within {AUTH_WINDOW_S:.0f} s. The browser gets a session cookie "
            "(HttpOnly, SameSite=Strict) in exchange. Without signing in, the dashboard at the scheduler's "
            "/ is read-only. docs/operations.md, \"Dashboard\"."
        ),
    )
    p.add_argument("--scheduler", "--url", dest="url", default=DEFAULT_URL, metavar="URL",
                   help=f"the scheduler's URL, as the browser reaches it (default: {DEFAULT_URL})")
    p.add_argument("--no-browser", action="store_true", help="print the sign-in link only; open no browser")
    p.add_argument("--no-check", action="store_true",
                   help="do not first check that the scheduler answers (e.g. the browser reaches it through "
                        "a tunnel this machine has not)")
    p.add_argument("--cluster-key-file", default=None,
                   help="cluster key (default: $PDC_CLUSTER_KEY, then `pdc init`'s file)")
    p.set_defaults(run=run_dashboard)


def run_dashboard(args: argparse.Namespace) -> int:
    if not args.no_check:
        check_dashboard(args.url)
    link = login_url(args.url, load_cluster_key(args.cluster_key_file))
    print(f"sign in to the dashboard (the link works once, within {AUTH_WINDOW_S:.0f} s):\n  {link}")
    if not args.no_browser and has_display() and webbrowser.open(link):
        print("opened in your browser")
    return 0


def has_display() -> bool:
    """Whether a graphical browser can open here (over SSH without X forwarding, Python's
    ``webbrowser`` would start a console browser in this terminal instead)."""
    if sys.platform in ("darwin", "win32"):
        return True
    return bool(os.environ.get("DISPLAY") or os.environ.get("WAYLAND_DISPLAY"))
