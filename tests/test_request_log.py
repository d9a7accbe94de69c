"""One record per request: its log line (text or JSON), the ring behind ``/admin/requests``, ``pdc logs``.

First the HTTP API over a fake backend (every way a request ends leaves one
record), the line and JSON formats, the ring and the keyed endpoint; then a
real ``pdc serve --log-format json`` over real workers (a torch prefill and an
MLX decode node, in-process), read back with ``pdc logs``.
"""
from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import openai
import pytest
from conftest import (
    MODEL,
    ROOT,
    FakeBackend,
    SchedulerProcess,
    ServerThread,
    WorkersThread,
    config,
    have,
)

from cluster.auth import generate_key, load_cluster_key, sign_call, write_config
from cluster.cli import build_parser, main
from cluster.launcher import LocalCluster, UpConfig
from cluster.logs_cmd import JsonFormatter, row, use_log_format
from scheduler.api import build_app
from scheduler.request import RequestFailedError, RequestStats
from scheduler.request_log import RequestLog, RequestRecord
from scheduler.tokenizer import PromptCodec

ASK = [{"role": "user", "content": "Tell me about memory bandwidth."}]


def _get(url: str, headers: dict[str, str] | None = None) -> tuple[int, dict]:
    request = urllib.request.Request(url, headers=headers or {})
    try:
        with urllib.request.urlopen(request, timeout=10) as reply:
            return reply.status, json.loads(reply.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read() or b"{}")


def _post(url: str, body: dict) -> int:
    request = urllib.request.Request(url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=10) as reply:
            reply.read()
            return reply.status
    except urllib.error.HTTPError as e:
        return e.code


def _until(predicate, what: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


# ---------------------------------------------------------------- every end leaves one record (fake backend)


@pytest.fixture()
def logged(codec: PromptCodec) -> Iterator[tuple[ServerThread, RequestLog, FakeBackend, openai.OpenAI]]:
    requests, backend = RequestLog(), FakeBackend(codec)
    srv = ServerThread(build_app(backend, request_log=requests))
    yield srv, requests, backend, openai.OpenAI(base_url=srv.url + "/v1", api_key="unused", timeout=20, max_retries=0)
    srv.stop()


def test_every_way_a_request_ends_leaves_exactly_one_record(logged) -> None:
    srv, requests, backend, client = logged
    hi = [{"role": "user", "content": "hi"}]
    done = client.chat.completions.create(model=MODEL, messages=hi, max_tokens=100, user="ann")
    list(client.completions.create(model=MODEL, prompt="Once", max_tokens=3, stream=True))
    stopped = client.chat.completions.create(model=MODEL, messages=hi, max_tokens=100, stop=["fox"])
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model=MODEL, messages=hi, temperature=9)
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="nope", messages=hi)
    backend.fail_with, backend.fail_after = RequestFailedError("node d0 failed", node="d0"), 2
    with pytest.raises(openai.APIError):
        list(client.chat.completions.create(model=MODEL, messages=hi, max_tokens=100, stream=True))
    backend.fail_with, backend.capacity = None, False
    with pytest.raises(openai.InternalServerError):
        client.chat.completions.create(model=MODEL, messages=hi)
    backend.capacity, backend.token_delay_s = True, 0.2
    stream = client.chat.completions.create(model=MODEL, messages=hi, max_tokens=100, stream=True)
    next(iter(stream))
    stream.close()  # the client goes away
    _until(lambda: requests.num_recorded == 8 and requests.num_open == 0, "the cancelled request's record")
    assert _post(srv.url + "/api/generate", {"model": MODEL}) == 200  # Ollama's load call: no generation, no record

    records = requests.recent(100)
    assert requests.num_recorded == len(records) == 8
    ends = [(r.route, r.outcome, r.status, r.stream) for r in records]
    assert ends == [("/v1/chat/completions", "stop", 200, False), ("/v1/completions", "length", 200, True),
                    ("/v1/chat/completions", "stop", 200, False),
                    ("/v1/chat/completions", "invalid_request_error", 400, False),
                    ("/v1/chat/completions", "model_not_found", 404, False),
                    ("/v1/chat/completions", "worker_failed", 502, True),
                    ("/v1/chat/completions", "no_capacity", 503, False),
                    ("/v1/chat/completions", "cancelled", 499, True)]
    first = records[0]
    assert (first.request_id, first.model, first.user, first.placement) == (done.id, MODEL, "ann", "disaggregated")
    assert (first.stats.prefill_node, first.stats.decode_node, first.stats.kv_bytes) == ("p0", "d0", 1234)
    assert first.stats.completion_tokens == done.usage.completion_tokens and first.stats.prompt_tokens > 0
    assert (records[2].request_id, records[2].stop) == (stopped.id, "fox")  # a stop string's finish
    assert "temperature" in records[3].error and records[4].model == "nope" and records[4].request_id == ""
    assert records[5].error == "node d0 failed" and "no decode-capable node" in records[6].error
    assert [r.seq for r in records] == list(range(1, 9))


def test_the_log_line_and_the_json_line_carry_the_same_fields() -> None:
    stats = RequestStats(request_id="chatcmpl-1", prefill_node="a", decode_node="b", kv_codec="int8", kv_bytes=99,
                         queue_s=0.01, prefill_s=0.2, transfer_s=0.05, exposed_transfer_s=0.004, ttft_s=0.25,
                         tpot_s=0.0125, e2e_s=1.5, prompt_tokens=40, cached_prefix_tokens=32, completion_tokens=101)
    record = RequestRecord(seq=7, ts=1.7e9, request_id="chatcmpl-1", route="/v1/chat/completions", model="m",
                           status=200, outcome="length", user="bob", stream=True, stats=stats)
    line = record.line()
    assert line.startswith("request chatcmpl-1 outcome=length status=200 model=m route=/v1/chat/completions")
    for pair in ("placement=disaggregated", "prefill_node=a", "decode_node=b", "kv_codec=int8", "kv_bytes=99",
                 "queue_s=0.010", "prefill_s=0.200", "transfer_s=0.050", "exposed_transfer_s=0.004",
                 "ttft_s=0.250", "tpot_s=0.0125", "e2e_s=1.500", "prompt_tokens=40", "cached_tokens=32",
                 "completion_tokens=101", "migrations=0", "user='bob'"):
        assert f" {pair}" in line
    refused = RequestRecord(seq=8, ts=1.7e9, request_id="", route="/api/chat", model="", status=503,
                            outcome="draining", error='shutting "down"')
    assert refused.line() == ('request - outcome=draining status=503 model=- route=/api/chat stream=false '
                              'error="shutting \\"down\\""')  # nothing placed, nothing tokenized

    logger = logging.getLogger("scheduler.api")
    entry = logger.makeRecord(logger.name, logging.INFO, __file__, 1, "%s", (line,), None,
                              extra={"request": record.to_json()})
    parsed = json.loads(JsonFormatter().format(entry))
    assert (parsed["level"], parsed["logger"], parsed["message"]) == ("INFO", "scheduler.api", line)
    assert parsed["ts"].endswith("Z") and parsed["request"] == json.loads(json.dumps(record.to_json()))
    fields = parsed["request"]
    assert (fields["request_id"], fields["placement"], fields["kv_codec"], fields["ttft_s"]) == \
        ("chatcmpl-1", "disaggregated", "int8", 0.25)
    assert "arrival_s" not in fields  # the scheduler's monotonic clock means nothing outside it
    try:
        raise ValueError("boom")
    except ValueError:
        failed = logger.makeRecord(logger.name, logging.ERROR, __file__, 1, "failed", (), sys.exc_info())
    assert "ValueError: boom" in json.loads(JsonFormatter().format(failed))["exc_info"]
    assert "request" not in json.loads(JsonFormatter().format(failed))
    assert "chatcmpl-1" in row(fields) and "a -> b int8" in row(fields)  # pdc logs' table row


def test_the_ring_keeps_the_last_n_records_and_pages_after_a_seq() -> None:
    requests = RequestLog(size=3, clock=lambda: 1.0)
    for i in range(5):
        trace = requests.open("/v1/completions")
        trace.failed(400, "invalid_request_error", f"bad {i}")
        assert requests.num_open == 1
        requests.close(trace)
    assert requests.num_open == 0 and requests.num_recorded == 5
    assert [r.seq for r in requests.recent(10)] == [3, 4, 5]
    assert [r.seq for r in requests.recent(2)] == [4, 5]
    assert [r.seq for r in requests.recent(10, after=4)] == [5]
    with pytest.raises(ValueError):
        RequestLog(size=0)


def test_admin_requests_wants_a_signed_call_and_refuses_what_it_cannot_honour(codec: PromptCodec) -> None:
    from scheduler.service import ClusterBackend, SchedulerConfig

    key = generate_key()
    scheduler = ClusterBackend(SchedulerConfig(mdns=False, request_log_size=4), key)
    srv = ServerThread(build_app(FakeBackend(codec), admin=scheduler.admin, request_log=scheduler.requests))
    try:
        def signed(query: str) -> tuple[int, dict]:
            return _get(srv.url + "/admin/requests" + query, {"X-PDC-Auth": sign_call(key, "GET /admin/requests")})

        _post(srv.url + "/v1/completions", {"model": MODEL, "prompt": "hi", "max_tokens": 2})
        assert _get(srv.url + "/admin/requests")[0] == 401
        assert _get(srv.url + "/admin/requests", {"X-PDC-Auth": sign_call(generate_key(), "GET /admin/requests")}
                    )[0] == 401  # another cluster's key
        status, reply = signed("?limit=4")
        assert status == 200 and [r["route"] for r in reply["requests"]] == ["/v1/completions"]
        assert (reply["size"], reply["recorded"], reply["in_flight"], reply["draining"]) == (4, 1, 0, False)
        assert signed("?limit=5")[0] == 400 and "--request-log-size" in signed("?limit=5")[1]["error"]["message"]
        assert signed("?limit=0")[0] == 400 and signed("?after=-1")[0] == 400
        assert signed("?lines=3")[0] == 400
        assert signed("?after=1")[1]["requests"] == []
    finally:
        srv.stop()


def test_log_format_reaches_every_service_process(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    parser = build_parser()
    for argv in (["serve"], ["worker", "--role", "decode", "--engine", "mlx"], ["up"]):
        assert parser.parse_args([*argv, "--log-format", "json"]).log_format == "json"
        assert parser.parse_args(argv).log_format == "text"
        with pytest.raises(SystemExit):
            parser.parse_args([*argv, "--log-format", "xml"])
    with pytest.raises(ValueError):
        UpConfig(model="m", log_format="xml")
    spawned: list[list[str]] = []
    monkeypatch.setattr(LocalCluster, "_spawn", lambda self, name, args, env=None: spawned.append(args))
    LocalCluster(UpConfig(model="m", log_format="json", log_dir=str(tmp_path))).start()
    assert [args[0] for args in spawned] == ["serve", "worker", "worker"]
    assert all(args[args.index("--log-format") + 1] == "json" for args in spawned)

    root = logging.getLogger()
    handler = logging.StreamHandler()
    root.addHandler(handler)
    try:
        use_log_format("json")
        assert isinstance(handler.formatter, JsonFormatter)
        use_log_format("text")
        assert not isinstance(handler.formatter, JsonFormatter)
    finally:
        root.removeHandler(handler)
        logging.captureWarnings(False)


def test_pdc_logs_refuses_flags_it_would_not_honour(capsys: pytest.CaptureFixture) -> None:
    assert main(["logs", "--interval", "2"]) == 2  # polls happen only with --follow
    assert "give --follow too" in capsys.readouterr().err
    assert main(["logs", "-n", "0"]) == 2
    assert main(["logs", "--follow", "--interval", "0"]) == 2
    assert "--interval must be in [0.1, 3600]" in capsys.readouterr().err


# ---------------------------------------------------------------- a real pdc serve, read with pdc logs


@pytest.fixture(scope="module")
def workers(model: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Path, list[str]]]:
    """(cluster key file, gRPC addresses) of a torch prefill node and an MLX decode node."""
    if not (have("torch") and have("mlx.core")):
        pytest.skip("needs the torch and mlx extras (prefill and decode engines)")
    key = generate_key()
    key_file = write_config(tmp_path_factory.mktemp("logs") / "cluster.json", key)
    running = WorkersThread(config(model, key, "prefill", engine="torch"), config(model, key, "decode"))
    yield key_file, running.addresses
    running.stop()


def _pdc_logs(url: str, key_file: Path, *flags: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "cluster.cli", "logs", "--url", url, "--cluster-key-file",
                           str(key_file), *flags], cwd=ROOT, capture_output=True, text=True, timeout=60, check=False)


def test_pdc_logs_shows_the_requests_just_made_and_the_json_log_is_one_object_per_line(workers, tmp_path: Path
                                                                                        ) -> None:
    key_file, addresses = workers
    scheduler = SchedulerProcess(key_file, addresses, tmp_path / "scheduler.log", None, "--log-format", "json",
                                 "--request-log-size", "5")
    try:
        scheduler.wait_ready(2)
        client = openai.OpenAI(base_url=scheduler.url + "/v1", api_key="unused", timeout=60, max_retries=0)
        model = client.models.list().data[0].id
        chat = client.chat.completions.create(model=model, messages=ASK, max_tokens=6, temperature=0)
        streamed = list(client.completions.create(model=model, prompt="Once upon", max_tokens=5, stream=True))
        with pytest.raises(openai.NotFoundError):
            client.chat.completions.create(model="nope", messages=ASK)

        table = _pdc_logs(scheduler.url, key_file, "-n", "3")
        assert table.returncode == 0, table.stderr
        header, *rows = table.stdout.splitlines()
        assert header.split()[:5] == ["TIME", "REQUEST", "ROUTE", "STATUS", "OUTCOME"] and len(rows) == 3
        assert chat.id in rows[0] and " length " in rows[0] and "test-prefill -> test-decode raw" in rows[0]
        assert streamed[0].id in rows[1] and "/v1/completions" in rows[1]
        assert " 404 " in rows[2] and "model_not_found" in rows[2]
        as_json = _pdc_logs(scheduler.url, key_file, "-n", "2", "--json")
        assert [json.loads(line)["request_id"] for line in as_json.stdout.splitlines()] == [streamed[0].id, ""]
        too_many = _pdc_logs(scheduler.url, key_file, "-n", "6")
        assert too_many.returncode == 2 and "--request-log-size" in too_many.stderr
        assert _get(scheduler.url + "/admin/requests")[0] == 401  # unsigned

        follow = subprocess.Popen([sys.executable, "-m", "cluster.cli", "logs", "--url", scheduler.url,
                                   "--cluster-key-file", str(key_file), "-n", "1", "--follow", "--interval", "0.2"],
                                  cwd=ROOT, stdout=subprocess.PIPE, text=True, env={**os.environ,
                                                                                     "PYTHONUNBUFFERED": "1"})
        lines: list[str] = []
        threading.Thread(target=lambda: lines.extend(follow.stdout), daemon=True).start()
        try:
            _until(lambda: len(lines) >= 2, "pdc logs --follow's first rows", timeout=30)
            later = client.chat.completions.create(model=model, messages=ASK, max_tokens=3, temperature=0)
            _until(lambda: any(later.id in line for line in lines), "the new request in pdc logs --follow")
            follow.send_signal(signal.SIGINT)
            assert follow.wait(10) == 0
        finally:
            if follow.poll() is None:
                follow.kill()
                follow.wait(5)
        scheduler.proc.send_signal(signal.SIGTERM)
        assert scheduler.proc.wait(20) == 0
    finally:
        scheduler.stop()

    entries = [json.loads(line) for line in scheduler.log.read_text().splitlines() if line.strip()]  # each parses
    assert all({"ts", "level", "logger", "message"} <= set(e) for e in entries)
    records = [e["request"] for e in entries if "request" in e]
    assert [r["request_id"] for r in records] == [chat.id, streamed[0].id, "", later.id]
    first = records[0]
    assert (first["outcome"], first["status"], first["model"], first["placement"]) == \
        ("length", 200, model, "disaggregated")
    assert (first["prefill_node"], first["decode_node"], first["completion_tokens"]) == \
        ("test-prefill", "test-decode", 6)
    assert first["ttft_s"] > 0 and first["e2e_s"] >= first["ttft_s"] and first["kv_bytes"] > 0
    assert (records[2]["outcome"], records[2]["status"], records[2]["model"]) == ("model_not_found", 404, "nope")
    assert any(e["message"] == "drained" and e["logger"] == "scheduler.drain" for e in entries)


def test_a_stop_string_end_is_a_stop_in_metrics_and_the_record_not_an_abort(workers, tmp_path: Path) -> None:
    from prometheus_client.parser import text_string_to_metric_families

    key_file, addresses = workers
    scheduler = SchedulerProcess(key_file, addresses, tmp_path / "scheduler.log", None)
    try:
        scheduler.wait_ready(2)
        client = openai.OpenAI(base_url=scheduler.url + "/v1", api_key="unused", timeout=60, max_retries=0)
        model = client.models.list().data[0].id
        free = client.chat.completions.create(model=model, messages=ASK, max_tokens=12, temperature=0)
        text = free.choices[0].message.content
        stop = text[len(text) // 2:len(text) // 2 + 3]  # greedy: the same text comes again, and stops there
        assert stop.strip(), text
        cut = client.chat.completions.create(model=model, messages=ASK, max_tokens=12, temperature=0, stop=[stop])
        streamed = list(client.chat.completions.create(model=model, messages=ASK, max_tokens=12, temperature=0,
                                                       stop=[stop], stream=True))
        expected = text[:text.index(stop)]
        assert cut.choices[0].finish_reason == "stop" and cut.choices[0].message.content == expected
        assert "".join(c.choices[0].delta.content or "" for c in streamed if c.choices) == expected

        def reasons() -> dict[str, float]:
            with urllib.request.urlopen(scheduler.url + "/metrics", timeout=10) as reply:
                families = text_string_to_metric_families(reply.read().decode())
            return {s.labels["finished_reason"]: s.value for f in families
                    if f.name == "pdcluster:request_success" for s in f.samples if s.name.endswith("_total")}

        _until(lambda: sum(reasons().values()) == 3, "three ended requests in /metrics")
        assert reasons() == {"length": 1.0, "stop": 2.0}  # no "abort": the stop string finished them
        signed = {"X-PDC-Auth": sign_call(load_cluster_key(key_file), "GET /admin/requests")}
        records = _get(scheduler.url + "/admin/requests", signed)[1]["requests"]
        assert [r["outcome"] for r in records] == ["length", "stop", "stop"]
    finally:
        scheduler.stop()
