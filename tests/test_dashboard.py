"""The web dashboard at the scheduler's ``/`` (scheduler/dashboard.py, scheduler/static/).

Unit tests drive the real HTTP API over a fake backend on 127.0.0.1: the page and
its headers, the state endpoint and who sees its details, the sign-in (a login
token works once, within its window, for its own path only), the session
cookie's flags and expiry, the CSRF refusals, and that no answer ever carries
the cluster key. The browser test loads the page from a real ``pdc up`` cluster
in headless Debian chromium (selenium): it chats from the page's chat box, sees
the request with its nodes and timeline, signs in with ``pdc dashboard``'s link,
switches the policy from the page, and finds a browser without a session refused.
"""
from __future__ import annotations

import http.client
import json
import re
import shutil
import subprocess
import sys
import threading
import time
import urllib.parse
from pathlib import Path
from types import SimpleNamespace

import pytest
from conftest import MODEL, ROOT, FakeBackend, PdcUp, ServerThread, free_port, have

from cluster.auth import generate_key, load_cluster_key, sign_call, write_config
from cluster.cli import admin_call
from cluster.dashboard_cli import LOGIN_CALL, login_url
from cluster.node import NodeInfo
from scheduler.admin import PolicyAdmin
from scheduler.api import build_app
from scheduler.dashboard import CSRF_HEADER, SESSION_COOKIE, SESSIONS_KEY, Sessions
from scheduler.dispatch import Dispatcher
from scheduler.policy import load_policy
from scheduler.request import RequestStats
from scheduler.request_log import RequestLog, phases_of
from scheduler.service import ClusterBackend, SchedulerConfig, dashboard_state
from scheduler.tokenizer import PromptCodec

API_KEY = "sk-dashboard-test-123"
CHAT = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 8}


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class Dashboard:
    """The real API over a fake backend, with a real PolicyAdmin and a session clock the test moves."""

    def __init__(self, codec: PromptCodec, api_key: str | None = None) -> None:
        self.key = generate_key()
        self.dispatcher = Dispatcher(load_policy("conditional"), "conditional")
        self.admin = PolicyAdmin(self.key, self.dispatcher)
        self.clock = Clock()
        self.backend = FakeBackend(codec)
        app = build_app(self.backend, admin=self.admin, api_key=api_key)
        self.sessions = app[SESSIONS_KEY] = Sessions(ttl_s=600.0, clock=self.clock)
        self.server = ServerThread(app)
        self.seen: list[bytes] = []  # every answer's headers and body, to search for the cluster key

    def call(self, method: str, path: str, headers: dict[str, str] | None = None,
             body: dict | None = None) -> tuple[int, http.client.HTTPMessage, bytes]:
        """One HTTP call, redirects not followed (bounded by 10 s)."""
        conn = http.client.HTTPConnection("127.0.0.1", self.server.port, timeout=10)
        try:
            data = json.dumps(body).encode() if body is not None else None
            conn.request(method, path, body=data, headers={"Content-Type": "application/json", **(headers or {})})
            reply = conn.getresponse()
            payload = reply.read()
        finally:
            conn.close()
        self.seen.append(str(reply.headers).encode() + payload)
        return reply.status, reply.headers, payload

    def state(self, headers: dict[str, str] | None = None) -> dict:
        status, _, body = self.call("GET", "/dashboard/state", headers)
        assert status == 200, body
        return json.loads(body)

    def sign_in(self) -> tuple[str, str]:
        """(cookie header value, CSRF token) of a fresh session."""
        link = urllib.parse.urlsplit(login_url(self.server.url, self.key))
        status, headers, body = self.call("GET", f"{link.path}?{link.query}")
        assert status == 303 and headers["Location"] == "/", body
        cookie = headers["Set-Cookie"].split(";")[0]
        return cookie, self.state({"Cookie": cookie})["csrf"]

    def switch(self, policy: str, headers: dict[str, str]) -> tuple[int, dict]:
        status, _, body = self.call("POST", "/dashboard/policy", headers, {"policy": policy})
        return status, json.loads(body)


@pytest.fixture()
def open_dashboard(codec: PromptCodec):
    dash = Dashboard(codec)
    yield dash
    dash.server.stop()


@pytest.fixture()
def keyed_dashboard(codec: PromptCodec):
    dash = Dashboard(codec, api_key=API_KEY)
    yield dash
    dash.server.stop()


def test_the_page_and_its_files_are_served_with_a_strict_content_security_policy(open_dashboard: Dashboard) -> None:
    status, headers, body = open_dashboard.call("GET", "/")
    assert status == 200 and headers["Content-Type"].startswith("text/html")
    assert b'src="/dashboard/app.js"' in body and b'href="/dashboard/style.css"' in body
    assert "script-src 'self'" in headers["Content-Security-Policy"]
    assert "frame-ancestors 'none'" in headers["Content-Security-Policy"] and headers["X-Frame-Options"] == "DENY"
    assert headers["Referrer-Policy"] == "no-referrer"
    for path, kind in (("/dashboard/app.js", "text/javascript"), ("/dashboard/style.css", "text/css")):
        status, headers, body = open_dashboard.call("GET", path)
        assert status == 200 and headers["Content-Type"].startswith(kind) and body
    _, _, script = open_dashboard.call("GET", "/dashboard/app.js")
    assert b"innerHTML" not in script  # server values are set as text only


def test_without_an_api_key_the_state_shows_nodes_policy_and_each_request_with_its_nodes(
        open_dashboard: Dashboard) -> None:
    before = open_dashboard.state()
    assert before["details"] and not before["signed_in"] and not before["api_key_required"] and before["can_switch"]
    assert "csrf" not in before  # only a session gets one
    assert [n["node_id"] for n in before["nodes"]] == ["p0", "d0"] and before["policy"] == "conditional"
    assert "conditional" in before["builtin_policies"] and before["requests"]["recent"] == []
    status, _, body = open_dashboard.call("POST", "/v1/chat/completions", body=CHAT)
    assert status == 200, body
    request_id = json.loads(body)["id"]
    (record,) = open_dashboard.state()["requests"]["recent"]
    assert record["request_id"] == request_id and record["outcome"] in ("stop", "length") and not record["live"]
    assert (record["prefill_node"], record["decode_node"], record["placement"]) == ("p0", "d0", "disaggregated")
    assert [p["phase"] for p in record["phases"]] == ["prefill", "decode"]
    assert record["arrived_ts"] > 0 and "user" not in record


def test_a_request_in_flight_is_listed_live_then_moves_to_the_recent_ones(open_dashboard: Dashboard) -> None:
    open_dashboard.backend.token_delay_s = 0.25  # 8 tokens: about 2 s in flight
    reply: list = []
    chat = threading.Thread(target=lambda: reply.append(open_dashboard.call("POST", "/v1/chat/completions",
                                                                            body=CHAT)))
    chat.start()
    live: list = []
    for _ in range(40):  # at most ~4 s
        live = open_dashboard.state()["requests"]["live"]
        if live:
            break
        time.sleep(0.1)
    chat.join(20)
    assert len(live) == 1 and live[0]["live"] and live[0]["request_id"].startswith("chatcmpl-"), live
    assert live[0]["phases"] and live[0]["elapsed_s"] >= 0 and live[0]["prompt_tokens"] > 0
    assert reply and reply[0][0] == 200
    after = open_dashboard.state()["requests"]
    assert after["live"] == [] and [r["request_id"] for r in after["recent"]] == [live[0]["request_id"]]


def test_with_an_api_key_only_a_key_holder_or_a_session_sees_nodes_links_and_requests(
        keyed_dashboard: Dashboard) -> None:
    status, _, body = keyed_dashboard.call("POST", "/v1/chat/completions", {"Authorization": f"Bearer {API_KEY}"},
                                           CHAT)
    assert status == 200, body
    anonymous = keyed_dashboard.state()
    assert anonymous["api_key_required"] and not anonymous["details"] and anonymous["status"] == "ok"
    assert not {"nodes", "links", "policy", "requests"} & set(anonymous)
    assert b"p0" not in keyed_dashboard.seen[-1] and b"d0" not in keyed_dashboard.seen[-1]
    assert not keyed_dashboard.state({"Authorization": "Bearer wrong"})["details"]
    holder = keyed_dashboard.state({"Authorization": f"Bearer {API_KEY}"})
    assert holder["details"] and len(holder["requests"]["recent"]) == 1 and not holder["signed_in"]
    cookie, _ = keyed_dashboard.sign_in()
    session = keyed_dashboard.state({"Cookie": cookie})
    assert session["details"] and session["signed_in"] and [n["node_id"] for n in session["nodes"]] == ["p0", "d0"]


def test_a_login_token_signs_in_once_with_an_httponly_samesite_strict_cookie(open_dashboard: Dashboard) -> None:
    link = urllib.parse.urlsplit(login_url(open_dashboard.server.url, open_dashboard.key))
    status, headers, _ = open_dashboard.call("GET", f"{link.path}?{link.query}")
    assert status == 303 and headers["Location"] == "/"
    cookie = headers["Set-Cookie"]
    flags = {part.strip().split("=")[0].lower(): part.strip() for part in cookie.split(";")}
    assert cookie.startswith(f"{SESSION_COOKIE}=") and "httponly" in flags and "secure" not in flags  # plain http
    assert flags["samesite"].lower() == "samesite=strict" and flags["path"] == "Path=/"
    assert flags["max-age"] == "Max-Age=600"
    assert headers["Cache-Control"] == "no-store" and headers["Referrer-Policy"] == "no-referrer"
    assert len(open_dashboard.sessions) == 1
    again, _, body = open_dashboard.call("GET", f"{link.path}?{link.query}")
    assert again == 403 and b"replayed" in body  # single use
    assert len(open_dashboard.sessions) == 1


@pytest.mark.parametrize("why", ["stale", "future", "other-call", "other-key", "garbled", "missing"])
def test_a_login_token_that_is_stale_or_not_for_this_login_starts_no_session(open_dashboard: Dashboard,
                                                                             why: str) -> None:
    key = open_dashboard.key
    token = {"stale": lambda: sign_call(key, LOGIN_CALL, now=time.time() - 120),
             "future": lambda: sign_call(key, LOGIN_CALL, now=time.time() + 120),
             "other-call": lambda: sign_call(key, "PUT /admin/policy"),
             "other-key": lambda: sign_call(generate_key(), LOGIN_CALL),
             "garbled": lambda: sign_call(key, LOGIN_CALL)[:-2] + "zz",
             "missing": lambda: ""}[why]()
    status, headers, body = open_dashboard.call("GET", "/dashboard/login?" + urllib.parse.urlencode({"token": token}))
    assert status == 403 and "Set-Cookie" not in headers and b"pdc dashboard" in body
    assert len(open_dashboard.sessions) == 0


def test_a_session_ends_at_its_expiry_and_at_sign_out(open_dashboard: Dashboard) -> None:
    cookie, csrf = open_dashboard.sign_in()
    assert open_dashboard.state({"Cookie": cookie})["session_expires_in_s"] == 600
    open_dashboard.clock.now += 601
    assert not open_dashboard.state({"Cookie": cookie})["signed_in"]
    assert open_dashboard.switch("least-loaded", {"Cookie": cookie, CSRF_HEADER: csrf})[0] == 403
    cookie, csrf = open_dashboard.sign_in()
    assert open_dashboard.call("POST", "/dashboard/logout", {"Cookie": cookie})[0] == 403  # no CSRF: kept
    status, headers, _ = open_dashboard.call("POST", "/dashboard/logout", {"Cookie": cookie, CSRF_HEADER: csrf})
    assert status == 200 and f"{SESSION_COOKIE}=\"\"" in headers["Set-Cookie"]
    assert not open_dashboard.state({"Cookie": cookie})["signed_in"] and len(open_dashboard.sessions) == 0


def test_the_policy_switch_needs_a_session_its_csrf_token_and_this_origin(open_dashboard: Dashboard) -> None:
    cookie, csrf = open_dashboard.sign_in()
    other_cookie, _ = open_dashboard.sign_in()
    refused = [
        {},  # no session
        {CSRF_HEADER: csrf},  # a token without its session
        {"Cookie": cookie},  # no CSRF header
        {"Cookie": cookie, CSRF_HEADER: "forged"},
        {"Cookie": other_cookie, CSRF_HEADER: csrf},  # another session's token
        {"Cookie": cookie, CSRF_HEADER: csrf, "Origin": "https://evil.example"},
        {"Cookie": f"{SESSION_COOKIE}=guessed", CSRF_HEADER: csrf},
    ]
    for headers in refused:
        status, body = open_dashboard.switch("least-loaded", headers)
        assert status == 403 and body["error"]["type"] == "permission_error", (headers, body)
    assert open_dashboard.admin.current_policy() == "conditional"
    assert open_dashboard.switch("pkg.mod:Class", {"Cookie": cookie, CSRF_HEADER: csrf})[0] == 400  # built-ins only
    origin = f"http://127.0.0.1:{open_dashboard.server.port}"
    status, body = open_dashboard.switch("least-loaded", {"Cookie": cookie, CSRF_HEADER: csrf, "Origin": origin})
    assert status == 200 and body == {"policy": "least-loaded"}
    assert open_dashboard.dispatcher.policy_name == "least-loaded"  # the admin's own switch took it
    reply = open_dashboard.call("GET", "/admin/policy", {"X-PDC-Auth": sign_call(open_dashboard.key,
                                                                                 "GET /admin/policy")})
    assert json.loads(reply[2])["policy"] == "least-loaded"
    assert open_dashboard.state()["policy"] == "least-loaded"


def test_no_dashboard_answer_and_no_pdc_dashboard_output_carries_the_cluster_key(open_dashboard: Dashboard,
                                                                                  tmp_path: Path) -> None:
    key_file = write_config(tmp_path / "cluster.json", open_dashboard.key)
    cli = subprocess.run([sys.executable, "-m", "cluster.cli", "dashboard", "--scheduler", open_dashboard.server.url,
                          "--cluster-key-file", str(key_file), "--no-browser"],
                         cwd=ROOT, capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL)
    assert cli.returncode == 0, cli.stderr
    link = urllib.parse.urlsplit(re.search(r"(http://\S+/dashboard/login\?token=\S+)", cli.stdout).group(1))
    status, headers, _ = open_dashboard.call("GET", f"{link.path}?{link.query}")
    assert status == 303  # the printed link signs in
    cookie = headers["Set-Cookie"].split(";")[0]
    csrf = open_dashboard.state({"Cookie": cookie})["csrf"]
    open_dashboard.switch("round-robin", {"Cookie": cookie, CSRF_HEADER: csrf})
    open_dashboard.call("POST", "/v1/chat/completions", body=CHAT)
    for path in ("/", "/dashboard/app.js", "/dashboard/style.css", "/dashboard/state", "/health"):
        open_dashboard.call("GET", path, {"Cookie": cookie})
    secret = open_dashboard.key.hex().encode()
    assert len(open_dashboard.seen) >= 9
    assert not any(secret in answer or secret.upper() in answer for answer in open_dashboard.seen)
    assert secret.decode() not in cli.stdout + cli.stderr


def test_pdc_dashboard_says_when_no_scheduler_answers(tmp_path: Path) -> None:
    key_file = write_config(tmp_path / "cluster.json", generate_key())
    cli = subprocess.run([sys.executable, "-m", "cluster.cli", "dashboard", "--scheduler",
                          f"http://127.0.0.1:{free_port()}", "--cluster-key-file", str(key_file), "--no-browser"],
                         cwd=ROOT, capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL)
    assert cli.returncode == 2 and "cannot reach the scheduler" in cli.stderr and "token=" not in cli.stdout


def test_a_records_timeline_is_queue_prefill_transfer_then_decode_on_its_nodes() -> None:
    stats = RequestStats(prefill_node="spark", decode_node="mac", queue_s=0.1, prefill_s=0.5, transfer_s=0.4,
                         exposed_transfer_s=0.05, ttft_s=0.7, e2e_s=2.0)
    got = [(p.name, p.node, round(p.start_s, 3), round(p.end_s, 3)) for p in phases_of(stats)]
    assert got == [("queue", "", 0.0, 0.1), ("prefill", "spark", 0.1, 0.6), ("transfer", "spark -> mac", 0.25, 0.65),
                   ("decode", "mac", 0.65, 2.0)]
    colocated = RequestStats(prefill_node="mac", decode_node="mac", prefill_s=0.3, e2e_s=1.0)
    assert [(p.name, p.node) for p in phases_of(colocated)] == [("prefill", "mac"), ("decode", "mac")]
    assert phases_of(RequestStats()) == []  # never placed


def test_a_live_requests_timeline_grows_with_its_marks() -> None:
    clock = Clock()
    requests = RequestLog(clock=clock)
    trace = requests.open("/v1/chat/completions")
    trace.request_id = "r1"
    requests._by_id["r1"] = trace  # as ``started`` does with a GenerationRequest
    clock.now += 0.2
    assert [(p.name, p.end_s) for p in trace.phases(clock.now)] == [("queue", pytest.approx(0.2))]
    requests.placed("r1", "spark", "mac")
    clock.now += 0.5
    requests.marked("r1", "prefill_done")
    clock.now += 0.1
    requests.marked("r1", "first_token")
    clock.now += 1.0
    got = [(p.name, p.node, round(p.start_s, 3), round(p.end_s, 3)) for p in trace.phases(clock.now)]
    assert got == [("queue", "", 0.0, 0.2), ("prefill", "spark", 0.2, 0.7), ("decode", "mac", 0.8, 1.8)]
    assert requests.in_flight() == [trace]


class _Table:
    """The node table's read side the dashboard uses: a placeable, a draining and a failing node."""

    def __init__(self) -> None:
        self.nodes = {n: _node_info(n) for n in ("a", "b", "c")}
        self.draining = {"b": "draining"}
        self.down = {"b": "draining", "c": "failed 3 health checks in a row"}

    def known_ids(self) -> list[str]:
        return sorted(self.nodes)

    def node(self, node_id: str) -> NodeInfo | None:
        return self.nodes.get(node_id)


def _node_info(node_id: str) -> NodeInfo:
    return NodeInfo(node_id=node_id, roles=("prefill", "decode"), engine="torch", model_id="tiny",
                    weights_fingerprint="w", host="127.0.0.1", grpc_port=50051, kv_port=50052, device="cpu",
                    tflops=1.0, mem_bw_gbps=10.0, free_mem_bytes=8 << 30, version="0", key_fingerprint="k")


def test_the_clusters_state_lists_every_known_node_with_its_health_load_and_kv_memory() -> None:
    backend = ClusterBackend(SchedulerConfig(mdns=False, policy="round-robin"), generate_key())
    backend.table = _Table()
    backend.ledger.admit("r1", "a", "a", 0.1)
    backend.metrics.record_stats("a", SimpleNamespace(reserved_kv_bytes=3 << 20, prefix_cache_bytes=1 << 20,
                                                      prefix_cache_capacity_bytes=4 << 20, running_requests=1,
                                                      active_leases=1))
    state = dashboard_state(backend)
    rows = {n["node_id"]: n for n in state["nodes"]}
    assert [(n, rows[n]["health"]) for n in "abc"] == [("a", "up"), ("b", "draining"), ("c", "down")]
    assert rows["c"]["health_reason"] == "failed 3 health checks in a row"
    a = rows["a"]
    assert (a["active_requests"], a["running_requests"], a["active_leases"]) == (1, 1, 1)
    assert (a["kv_used_bytes"], a["kv_total_bytes"], a["prefix_cache_capacity_bytes"]) == (4 << 20, 8 << 30, 4 << 20)
    assert rows["b"]["kv_used_bytes"] == 0 and a["address"] == "127.0.0.1:50051" and a["engine"] == "torch"
    assert state["policy"] == "round-robin" and state["links"] == [] and state["kv_codec"] == "auto"


# ---------------------------------------------------------------- the page in a real browser, on a real cluster

READY_S = 240.0  # pdc up's start-up on a loaded 2-core machine
WAIT_S = 60.0  # one condition on the page


def _browser_missing() -> str | None:
    """Why the browser test cannot run here, or None."""
    if not have("selenium"):
        return "needs selenium (pyproject's dev extra)"
    missing = [name for name in ("chromium", "chromedriver") if shutil.which(name) is None]
    if missing:
        return (f"needs Debian's chromium and chromium-driver ({', '.join(missing)} not on PATH; `make test` "
                "installs them as root with apt-get)")
    if not have("torch"):
        return "needs the torch extra (pdc up's workers)"
    return None


@pytest.fixture()
def browser(tmp_path: Path):
    """Headless Debian chromium driven by selenium (no driver download: both paths given)."""
    why = _browser_missing()
    if why:
        print(f"SKIPPED: {why}")
        pytest.skip(why)
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = shutil.which("chromium")
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu", "--no-first-run",
                "--window-size=1400,1800", f"--user-data-dir={tmp_path / 'chromium-profile'}"):
        options.add_argument(arg)
    service = Service(executable_path=shutil.which("chromedriver"), log_output=str(tmp_path / "chromedriver.log"))
    driver = webdriver.Chrome(service=service, options=options)
    driver.set_page_load_timeout(WAIT_S)
    driver.set_script_timeout(WAIT_S)
    yield driver
    driver.quit()


@pytest.fixture()
def pdc_up(make_tiny_model, key_file: Path, tmp_path: Path):
    """A real `pdc up` (scheduler + torch prefill worker + decode worker, mDNS on 127.0.0.1) with an API
    key, placing with fastest-pair (disaggregated): its URL."""
    if _browser_missing():
        pytest.skip(_browser_missing())
    decode_engine = "mlx" if have("mlx.core") else "torch"
    up = PdcUp(make_tiny_model("llama"), "--decode-engine", decode_engine, "--api-key", API_KEY,
               "--cluster-key-file", str(key_file), "--policy", "fastest-pair", "--log-dir", str(tmp_path / "logs"),
               ready_s=READY_S)
    try:
        yield up.url
    finally:
        up.stop()


def _wait(driver, condition, what: str, timeout: float = WAIT_S):
    """``condition(driver)``'s first truthy value within ``timeout`` (the page re-renders every second:
    a stale element is retried)."""
    from selenium.common.exceptions import NoSuchElementException, StaleElementReferenceException
    from selenium.webdriver.support.ui import WebDriverWait

    return WebDriverWait(driver, timeout, poll_frequency=0.25,
                         ignored_exceptions=(StaleElementReferenceException, NoSuchElementException)).until(
        condition, message=f"the page did not show {what} within {timeout} s")


def _texts(driver, selector: str) -> list[str]:
    from selenium.webdriver.common.by import By

    return [e.text for e in driver.find_elements(By.CSS_SELECTOR, selector)]


def _request_row(driver, request_id: str) -> dict | None:
    """The requests table's row for ``request_id``: its nodes cell and timeline phases, once shown."""
    from selenium.webdriver.common.by import By

    rows = driver.find_elements(By.CSS_SELECTOR, f'#requests tr[data-request-id="{request_id}"]')
    if not rows:
        return None
    phases = [(p.get_attribute("data-phase"), p.get_attribute("data-node"))
              for p in rows[0].find_elements(By.CSS_SELECTOR, ".bar > span")]
    return {"nodes": rows[0].find_element(By.CSS_SELECTOR, "td.nodes").text, "phases": phases,
            "live": "live" in (rows[0].get_attribute("class") or "")}


def _chat(driver, text: str) -> str:
    """Send ``text`` from the page's chat box; the request id the streamed answer reported."""
    from selenium.webdriver.common.by import By

    before = driver.find_element(By.ID, "chat-stats").text
    _wait(driver, lambda d: d.find_elements(By.CSS_SELECTOR, "#chat-model option"), "a model to chat with")
    driver.find_element(By.ID, "chat-input").send_keys(text)
    driver.find_element(By.ID, "chat-send").click()
    stats = _wait(driver, lambda d: (t := d.find_element(By.ID, "chat-stats").text) != before and "chatcmpl-" in t
                  and t, "the chat's answer and its record", timeout=120)
    answers = _texts(driver, "#chat-log .msg.assistant .text")
    assert answers and answers[-1], "the streamed answer stayed empty"
    assert not driver.find_elements(By.CSS_SELECTOR, "#chat-log .msg.error"), _texts(driver, "#chat-log .msg")
    return re.search(r"(chatcmpl-\w+)", stats).group(1)


@pytest.mark.slow
def test_the_dashboard_in_a_browser_chats_shows_each_request_on_its_nodes_and_switches_policy_signed_in_only(
        browser, pdc_up: str, key_file: Path, tmp_path: Path) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support.ui import Select

    url, driver = pdc_up, browser
    driver.get(url + "/")
    _wait(driver, lambda d: "API key" in d.find_element(By.ID, "notice").text, "that its details need the API key")
    assert _texts(driver, "#nodes tbody td") == ["hidden: API key or sign-in needed"]
    key_box = driver.find_element(By.ID, "api-key")
    key_box.send_keys(API_KEY, Keys.TAB)  # kept in this tab's sessionStorage, sent as a bearer key

    nodes = _wait(driver, lambda d: len(ids := [r.get_attribute("data-node") for r in
                                                d.find_elements(By.CSS_SELECTOR, "#nodes tr[data-node]")]) == 2
                  and ids, "both workers in the nodes table", timeout=120)
    prefill = next(n for n in nodes if n.startswith("local-prefill-"))
    decode = next(n for n in nodes if n.startswith("local-decode-"))
    node_rows = " ".join(_texts(driver, "#nodes tbody tr"))
    assert "torch" in node_rows and "up" in node_rows and "active" in node_rows and "/" in node_rows, node_rows
    _wait(driver, lambda d: d.find_elements(By.CSS_SELECTOR, f'#links tr[data-link="{prefill}->{decode}"]'),
          "the measured prefill -> decode link", timeout=120)
    link_row = _texts(driver, f'#links tr[data-link="{prefill}->{decode}"] td')
    assert float(link_row[1]) > 0 and link_row[2].endswith(" ms"), link_row

    request_id = _chat(driver, "Hello from the dashboard")
    row = _wait(driver, lambda d: (r := _request_row(d, request_id)) and not r["live"] and r,
                f"request {request_id} in the requests list")
    assert row["nodes"].startswith(f"{prefill} → {decode}"), row
    names = [name for name, _ in row["phases"]]
    assert "prefill" in names and "decode" in names, row
    assert (("prefill", prefill) in row["phases"]) and (("decode", decode) in row["phases"]), row
    driver.save_screenshot(str(tmp_path / "dashboard-read-only.png"))

    # sign in with pdc dashboard's link: a session cookie the page's script cannot read
    cli = subprocess.run([sys.executable, "-m", "cluster.cli", "dashboard", "--scheduler", url, "--cluster-key-file",
                          str(key_file), "--no-browser"], cwd=ROOT, capture_output=True, text=True, timeout=60,
                         stdin=subprocess.DEVNULL)
    assert cli.returncode == 0, cli.stderr
    driver.get(re.search(r"(http://\S+/dashboard/login\?token=\S+)", cli.stdout).group(1))
    _wait(driver, lambda d: d.find_element(By.ID, "signin-state").text.startswith("signed in"), "the sign-in")
    assert driver.current_url == url + "/"  # the token left the address bar
    cookie = driver.get_cookie(SESSION_COOKIE)
    assert cookie["httpOnly"] and cookie["sameSite"] == "Strict", cookie
    assert SESSION_COOKIE not in driver.execute_script("return document.cookie")
    csrf = driver.execute_script("return state.csrf")

    _wait(driver, lambda d: d.find_element(By.ID, "policy-switch").is_enabled(), "the policy switch enabled")
    assert driver.find_element(By.ID, "policy-current").text == "fastest-pair"
    Select(driver.find_element(By.ID, "policy-select")).select_by_value("colocated")
    driver.find_element(By.ID, "policy-switch").click()
    _wait(driver, lambda d: d.find_element(By.ID, "policy-current").text == "colocated", "the new policy")
    assert "switched to colocated" in driver.find_element(By.ID, "policy-message").text
    assert admin_call(url, str(key_file), "GET", "/admin/policy", None, expect="policy")["policy"] == "colocated"
    second = _chat(driver, "And once more")
    row = _wait(driver, lambda d: (r := _request_row(d, second)) and not r["live"] and r, f"request {second}")
    assert row["nodes"].startswith(f"{decode} (colocated)"), row  # the switched policy placed it
    driver.save_screenshot(str(tmp_path / "dashboard.png"))
    assert (tmp_path / "dashboard.png").stat().st_size > 10_000

    # a browser without the session: read-only, and the switch refused even with the old CSRF token
    driver.delete_all_cookies()
    driver.refresh()
    _wait(driver, lambda d: d.find_element(By.ID, "signin-state").text == "read-only", "the read-only state")
    assert not driver.find_element(By.ID, "policy-switch").is_enabled()
    status = driver.execute_async_script(
        "const done = arguments[arguments.length - 1];"
        "fetch('/dashboard/policy', {method: 'POST', credentials: 'same-origin', headers: "
        "{'Content-Type': 'application/json', 'X-PDC-CSRF': arguments[0]}, body: JSON.stringify({policy: "
        "'round-robin'})}).then((r) => done(r.status), (e) => done(String(e)));", csrf)
    assert status == 403
    assert admin_call(url, str(key_file), "GET", "/admin/policy", None, expect="policy")["policy"] == "colocated"
    secret = load_cluster_key(str(key_file)).hex()
    assert secret not in driver.page_source and secret not in cli.stdout
