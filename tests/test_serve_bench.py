"""`pdc bench serve`: its statistics are vLLM's (checked on synthetic records),
it loads a real `pdc up` cluster and reads pdcluster's placement back, and a
server that refuses, cuts or stalls requests gets them counted as failed with
their reasons, never a hang or a crash."""
from __future__ import annotations

import asyncio
import contextlib
import json
import math
import os
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator

import numpy as np
import pytest
from aiohttp import web
from conftest import ROOT, ServerThread, free_port, requires_torch

from workers.tools.serve_bench import (
    SKIPPED,
    PromptMaker,
    RequestRecord,
    ServeBenchConfig,
    arrival_times,
    build_workload,
    latency_stats,
    load_tokenizer,
    meets_slos,
    parse_goodput,
    run_serve_bench,
    summarize,
)

VLLM_KEYS = {"completed", "failed", "duration", "request_throughput", "output_throughput", "total_token_throughput",
             *(f"{stat}_{metric}_ms" for stat in ("mean", "median", "p90", "p99")
               for metric in ("ttft", "tpot", "itl", "e2el"))}
BENCH_S = 120  # bound on one bench subprocess


def record(turn: int = 1, ttft_ms: float = 100.0, e2el_ms: float = 500.0, tokens: int = 5, ok: bool = True,
           itl_ms: tuple[float, ...] = (), error: str = "") -> RequestRecord:
    return RequestRecord(0, turn, ok=ok, error=error, ttft_s=ttft_ms / 1000, e2el_s=e2el_ms / 1000,
                         itl_s=[ms / 1000 for ms in itl_ms], prompt_tokens=10, output_tokens=tokens)


def bench_config(**overrides: object) -> ServeBenchConfig:
    return ServeBenchConfig("http://127.0.0.1:1/v1", **overrides)


# ---------------------------------------------------------------- statistics on synthetic records

def test_latency_percentiles_are_numpys_linear_ones_in_ms() -> None:
    stats = latency_stats("ttft", [ms / 1000 for ms in range(1, 101)])
    assert stats["mean_ttft_ms"] == pytest.approx(50.5)
    assert stats["median_ttft_ms"] == pytest.approx(50.5)
    assert stats["p90_ttft_ms"] == pytest.approx(90.1)
    assert stats["p99_ttft_ms"] == pytest.approx(99.01)
    assert all(v is None for v in latency_stats("itl", []).values())  # no values: null, never a made-up 0


def test_tpot_is_undefined_for_one_token_outputs_and_they_meet_any_tpot_slo() -> None:
    one = record(ttft_ms=100, e2el_ms=100, tokens=1)
    five = record(ttft_ms=100, e2el_ms=500, tokens=5)
    assert one.tpot_s is None and five.tpot_s == pytest.approx(0.1)  # (500 - 100) / (5 - 1) ms
    summary = summarize([one, five], 2.0, bench_config())
    assert summary["mean_tpot_ms"] == pytest.approx(100.0)  # the one-token request is left out, not counted as 0
    assert summarize([one], 1.0, bench_config())["mean_tpot_ms"] is None
    assert meets_slos(one, [("tpot", 1.0)]) and not meets_slos(five, [("tpot", 99.0)])


def test_goodput_counts_requests_per_second_meeting_every_slo() -> None:
    records = [record(ttft_ms=100, e2el_ms=500, tokens=5),  # tpot 100 ms: good
               record(ttft_ms=900, e2el_ms=1300, tokens=5),  # ttft too slow
               record(ttft_ms=100, e2el_ms=2100, tokens=5),  # tpot 500 ms: too slow
               record(ok=False, error="timeout")]  # a failed request is never good
    config = bench_config(goodput=parse_goodput(["ttft:500", "tpot:200"]))
    summary = summarize(records, 2.0, config)
    assert summary["request_goodput"] == pytest.approx(0.5)  # 1 good request in 2 s
    assert summary["request_throughput"] == pytest.approx(1.5)  # 3 completed in 2 s
    assert "request_goodput" not in summarize(records, 2.0, bench_config())


def test_summary_has_vllms_keys_and_json_round_trips() -> None:
    records = [record(itl_ms=(50.0, 60.0)), record(turn=2, ttft_ms=300), record(ok=False, error="HTTP 429")]
    summary = json.loads(json.dumps(summarize(records, 4.0, bench_config(multi_turn=2))))
    assert VLLM_KEYS <= set(summary)
    assert (summary["completed"], summary["failed"], summary["failed_reasons"]) == (2, 1, {"HTTP 429": 1})
    assert summary["output_throughput"] == pytest.approx(10 / 4) and summary["total_token_throughput"] == 30 / 4
    assert [t["mean_ttft_ms"] for t in summary["per_turn"]] == pytest.approx([100.0, 300.0])
    assert summary["median_itl_ms"] == pytest.approx(55.0)
    assert "pdcluster" not in summary  # no response carried the object


def test_placement_shares_kv_bytes_and_cached_tokens_come_from_the_pdcluster_object() -> None:
    placements = [("p0", "d0", 1000), ("d0", "d0", 0), ("p0", "d1", 3000), ("d1", "d1", 0)]
    records = []
    for prefill, decode, kv in placements:
        r = record()
        r.pdcluster = {"prefill_node": prefill, "decode_node": decode, "kv_bytes": kv, "colocated": prefill == decode}
        r.cached_tokens = 4
        records.append(r)
    ext = summarize(records, 1.0, bench_config())["pdcluster"]
    assert ext["shares"] == {"colocated": 0.5, "disaggregated": 0.5}
    assert ext["decode_node_shares"] == {"d0": 0.5, "d1": 0.5}
    assert ext["total_kv_bytes"] == 4000
    assert summarize(records, 1.0, bench_config())["total_cached_tokens"] == 16


def test_arrivals_are_poisson_at_the_rate_and_all_at_once_for_inf() -> None:
    times = arrival_times(4000, 20.0, np.random.default_rng(0))
    gaps = np.diff(times)
    assert times[0] == 0.0 and (gaps >= 0).all()
    assert np.mean(gaps) == pytest.approx(1 / 20, rel=0.05)
    assert np.std(gaps) == pytest.approx(1 / 20, rel=0.1)  # exponential: std == mean
    assert arrival_times(5, math.inf, np.random.default_rng(0)) == [0.0] * 5


def test_workload_is_seeded_and_sizes_prompts_by_tokens_per_word() -> None:
    config = bench_config(num_prompts=3, multi_turn=2, input_len=40, turn_len=10, seed=7)
    first, again = build_workload(config, tokens_per_word=2.0), build_workload(config, tokens_per_word=2.0)
    assert first == again and len(first) == 3 and all(len(c.user_messages) == 2 for c in first)
    assert [len(m.split()) for m in first[0].user_messages] == [20, 5]
    assert len({c.user_messages[0] for c in first}) == 3  # distinct prompts: no accidental prefix-cache hits


def test_prompts_cut_with_a_tokenizer_have_exactly_the_asked_token_count(make_tiny_model) -> None:
    tokenizer = load_tokenizer(str(make_tiny_model("llama")))
    maker = PromptMaker(np.random.default_rng(0), tokenizer=tokenizer)
    for num_tokens in (1, 7, 32, 257):
        assert len(tokenizer.encode(maker.text(num_tokens), add_special_tokens=False).ids) == num_tokens


def test_bad_flags_are_refused_with_the_flag_named() -> None:
    for overrides, flag in (({"num_prompts": 0}, "--num-prompts"), ({"request_rate": 0.0}, "--request-rate"),
                            ({"max_concurrency": 0}, "--max-concurrency"),
                            ({"goodput": (("ttfb", 1.0),)}, "--goodput")):
        with pytest.raises(ValueError, match=flag):
            bench_config(**overrides)
    with pytest.raises(ValueError, match="METRIC:MS"):
        parse_goodput(["ttft=500"])


# ---------------------------------------------------------------- subprocess helpers

def run_bench(base_url: str, *flags: str, env: dict[str, str] | None = None) -> tuple[dict, str]:
    """`pdc bench serve --json` as users run it: (the last stdout line as JSON, all of stdout)."""
    done = subprocess.run([sys.executable, "-m", "cluster.cli", "bench", "serve", "--base-url", base_url, "--json",
                           "--disable-tqdm", *flags], cwd=ROOT, capture_output=True, text=True, timeout=BENCH_S,
                          stdin=subprocess.DEVNULL, env={**os.environ, **(env or {})}, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1]), done.stdout


# ---------------------------------------------------------------- a real `pdc up` cluster

@pytest.fixture(scope="module")
def cluster(make_tiny_model) -> Iterator[str]:
    """`pdc up` on a tiny random llama (torch prefill and decode) behind API key "sesame"; yields its /v1 URL."""
    port = free_port()
    up = subprocess.Popen(
        [sys.executable, "-m", "cluster.cli", "up", "--model", str(make_tiny_model("llama")), "--port", str(port),
         "--prefill-engine", "torch", "--decode-engine", "torch", "--api-key", "sesame"],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"})
    lines: list[str] = []
    ready = threading.Event()

    def read() -> None:
        for line in up.stdout:
            lines.append(line)
            if "pdcluster is up" in line:
                ready.set()

    threading.Thread(target=read, daemon=True).start()
    try:
        if not ready.wait(180):
            pytest.fail("pdc up did not start:\n" + "".join(lines)[-3000:])
        yield f"http://127.0.0.1:{port}/v1"
    finally:
        up.send_signal(signal.SIGTERM)
        try:
            up.wait(60)
        except subprocess.TimeoutExpired:
            up.kill()
            up.wait(10)


@requires_torch
def test_bench_against_pdc_up_completes_every_request_and_reports_placement(cluster: str) -> None:
    summary, table = run_bench(cluster, "--num-prompts", "8", "--max-concurrency", "4", "--input-len", "32",
                               "--output-len", "8", "--ignore-eos", "--goodput", "ttft:600000",
                               env={"OPENAI_API_KEY": "sesame"})
    assert (summary["completed"], summary["failed"]) == (8, 0), summary["failed_examples"]
    assert VLLM_KEYS | {"request_goodput"} <= set(summary)
    assert summary["total_output_tokens"] == 8 * 8  # the server's usage, with ignore_eos
    assert summary["total_input_tokens"] >= 8 * 32  # the server's count: prompt plus chat template
    assert summary["request_goodput"] == pytest.approx(summary["request_throughput"])  # a 10-minute TTFT bound
    ext = summary["pdcluster"]
    assert ext["requests"] == 8 and sum(ext["shares"].values()) == pytest.approx(1.0)
    assert all(node.startswith("local-decode-torch-") for node in ext["decode_node_shares"]), ext
    assert (ext["total_kv_bytes"] > 0) == ("disaggregated" in ext["shares"]), ext
    assert "Serving Benchmark Result" in table and "TTFT" in table


@requires_torch
def test_multi_turn_conversations_grow_their_history_turn_by_turn(cluster: str) -> None:
    summary, table = run_bench(cluster, "--num-prompts", "2", "--multi-turn", "3", "--input-len", "32",
                               "--turn-len", "16", "--output-len", "8", "--api-key", "sesame")
    assert (summary["completed"], summary["failed"]) == (6, 0), summary["failed_examples"]
    turns = summary["per_turn"]
    assert [t["turn"] for t in turns] == [1, 2, 3] and all(t["completed"] == 2 for t in turns)
    assert all(t["mean_ttft_ms"] is not None for t in turns)
    prompts = [t["mean_prompt_tokens"] for t in turns]
    assert prompts[0] < prompts[1] < prompts[2], prompts  # each turn resends the history and the last answer
    assert "Per turn" in table


@requires_torch
def test_a_wrong_api_key_fails_with_the_servers_status(cluster: str) -> None:
    done = subprocess.run([sys.executable, "-m", "cluster.cli", "bench", "serve", "--base-url", cluster,
                           "--api-key", "wrong", "--num-prompts", "1"], cwd=ROOT, capture_output=True, text=True,
                          timeout=BENCH_S, stdin=subprocess.DEVNULL, check=False)
    assert done.returncode == 2 and "HTTP 401" in done.stderr, done.stderr  # GET /models, before any load


# ---------------------------------------------------------------- a misbehaving server

MISBEHAVIOURS = ("ok", "429", "cut", "error_event", "no_done", "stall")


def misbehaving_app(kinds: tuple[str, ...] = MISBEHAVIOURS) -> web.Application:
    """Answers max_tokens=1 (calibration) requests properly, with one prompt token per word; every
    other request gets the next of ``kinds``, round robin."""
    served = [0]

    async def models(request: web.Request) -> web.Response:
        return web.json_response({"object": "list", "data": [{"id": "fake"}]})

    async def chat(request: web.Request) -> web.StreamResponse:
        body = await request.json()
        words = len(body["messages"][-1]["content"].split())
        kind = "ok" if body["max_tokens"] == 1 else kinds[served[0] % len(kinds)]
        served[0] += body["max_tokens"] != 1
        if kind == "429":
            return web.json_response({"error": {"message": "slow down", "type": "server_error",
                                                "code": "rate_limit_exceeded"}}, status=429)
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)

        async def send(payload: dict | str) -> None:
            await response.write(f"data: {payload if isinstance(payload, str) else json.dumps(payload)}\n\n".encode())

        for token in ("Hello", " there", " friend"):
            await send({"choices": [{"index": 0, "delta": {"content": token}, "finish_reason": None}]})
            if kind == "cut":
                request.transport.close()  # the connection drops mid-body
                return response
        if kind == "error_event":
            await send({"error": {"message": "decode node vanished", "type": "server_error", "code": "worker_failed"}})
            return response
        if kind == "stall":
            await asyncio.sleep(30)  # cancelled when the bench gives up and disconnects
        usage = {"prompt_tokens": words, "completion_tokens": 3, "total_tokens": words + 3}
        await send({"choices": [], "usage": usage})
        if kind != "no_done":
            await send("[DONE]")
        return response

    app = web.Application()
    app.router.add_get("/v1/models", models)
    app.router.add_post("/v1/chat/completions", chat)
    return app


@contextlib.contextmanager
def serving(app: web.Application) -> Iterator[str]:
    server = ServerThread(app)
    try:
        yield server.url + "/v1"
    finally:
        server.stop()


@pytest.fixture
def misbehaving_server() -> Iterator[str]:
    with serving(misbehaving_app()) as url:
        yield url


def test_refused_cut_errored_and_stalled_requests_count_as_failed_with_reasons(misbehaving_server: str) -> None:
    summary, table = run_bench(misbehaving_server, "--num-prompts", "12", "--max-concurrency", "3",
                               "--input-len", "20", "--output-len", "3", "--timeout-s", "2")
    assert (summary["completed"], summary["failed"]) == (2, 10)
    reasons = summary["failed_reasons"]
    cut = [r for r in reasons if r.startswith("connection: ")]
    assert len(cut) == 1 and reasons[cut[0]] == 2, reasons
    assert {k: v for k, v in reasons.items() if k not in cut} == {
        "HTTP 429 rate_limit_exceeded": 2, "stream error: worker_failed": 2, "stream ended without [DONE]": 2,
        "timeout": 2}
    assert summary["failed_examples"]["stream error: worker_failed"] == "decode node vanished"
    assert summary["total_output_tokens"] == 2 * 3 and summary["total_input_tokens"] == 2 * 20  # usage, calibrated
    assert "pdcluster" not in summary and "Failed requests" in table


def test_a_failed_turn_skips_the_rest_of_its_conversation_and_says_so() -> None:
    with serving(misbehaving_app(kinds=("429",))) as url:
        run = run_serve_bench(ServeBenchConfig(url, num_prompts=2, multi_turn=3, input_len=8, turn_len=4,
                                               output_len=3, timeout_s=10, progress=False))
    summary = run.summary()
    assert (summary["completed"], summary["failed"]) == (0, 6)
    assert summary["failed_reasons"] == {SKIPPED: 4, "HTTP 429 rate_limit_exceeded": 2}
    assert [(r.turn, r.error == SKIPPED) for r in run.records if r.conversation == 0] == [
        (1, False), (2, True), (3, True)]
