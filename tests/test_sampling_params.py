"""Every request parameter the OpenAI routes accept has its effect; every other one is a 400 naming it.

* The sampling math (workers/engines/sampling.py): penalties as OpenAI
  defines them, ``logit_bias`` added per token, logprobs after both and
  before temperature.
* Both decode engines, per row of their batch: a bias of +100 forces its
  token, a big frequency penalty breaks a repetitive greedy loop, two requests
  with different penalties in one batch each draw what they draw alone, the
  same penalties and bias give torch and mlx the same greedy tokens and
  logprobs, and a penalized stream continued on another node (``history``)
  goes on as if never interrupted.
* Through the official openai client against a real cluster in this process
  (a torch prefill worker, an mlx worker with both roles, the scheduler and
  its HTTP API): chat and completions, streamed and not, disaggregated and
  colocated.
* Refusals, against the HTTP API over a fake backend: each parameter the
  server cannot honour yet is a 400 whose ``param`` names it; the values that
  ask for nothing (``n: 1``, ``tools: []``, null) pass.
"""
from __future__ import annotations

import asyncio
import json
import logging
import time
import urllib.error
import urllib.request
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import openai
import pytest
from conftest import (
    MODEL,
    ServerThread,
    config,
    free_port,
    have,
    requires_mlx,
    requires_torch,
    requires_torch_and_mlx,
)

from scheduler import validation
from workers.engines import sampling
from workers.engines.base import Engine
from workers.engines.sampling import SamplingParams, TokenLogprobs, TokenSampler, draw

KINDS = [pytest.param("torch", marks=requires_torch), pytest.param("mlx", marks=requires_mlx)]
MAX_STEPS = 100  # bound on every step loop here
REPETITIVE = np.random.default_rng(0).integers(5, 1000, size=12).tolist()  # greedy loops on two tokens
OTHER = np.random.default_rng(1).integers(5, 1000, size=20).tolist()


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread() -> Iterator[None]:
    """torch on one thread here (restored afterwards): with two, OpenMP's barriers make
    a tiny model's decode step ~30x slower whenever another process competes for the cores."""
    if not have("torch"):
        yield
        return
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# ---------------------------------------------------------------- the math


def _logits(seed: int = 0, vocab: int = 64) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=vocab).astype(np.float32)


def test_penalties_subtract_openais_terms_and_bias_adds_per_token() -> None:
    logits = _logits()
    params = SamplingParams(presence_penalty=0.5, frequency_penalty=0.25, logit_bias=((7, 3.0), (9, -1.5)))
    got = sampling.adjust(logits, params, Counter({3: 2, 7: 1}))
    want = logits.astype(np.float64)
    want[3] -= 2 * 0.25 + 0.5
    want[7] -= 1 * 0.25 + 0.5
    want[7] += 3.0
    want[9] -= 1.5
    np.testing.assert_allclose(got, want)
    assert sampling.adjust(logits, SamplingParams(), Counter({3: 2})) is logits  # nothing asked: untouched


def test_a_bias_of_100_forces_a_token_and_minus_100_forbids_one() -> None:
    logits = _logits(1)
    best = int(np.argmax(logits))
    assert sampling.sample(logits, SamplingParams(logit_bias=((5, 100.0),)), 0) == 5
    assert sampling.sample(logits, SamplingParams(logit_bias=((best, -100.0),)), 0) != best
    seeded = SamplingParams(temperature=1.0, seed=3, logit_bias=((5, 100.0),))
    assert {sampling.sample(logits, seeded, step) for step in range(20)} == {5}


def test_logprobs_are_after_bias_and_before_temperature() -> None:
    logits = _logits(2)
    params = SamplingParams(logprobs=True, top_logprobs=5, logit_bias=((11, 4.0),))
    token, lp = draw(logits, params, 0)
    scores = logits.astype(np.float64)
    scores[11] += 4.0
    want = scores - np.log(np.exp(scores - scores.max()).sum()) - scores.max()
    assert lp.token_id == token == int(np.argmax(scores)) == lp.top[0][0]
    assert lp.logprob == pytest.approx(want[token]) and lp.logprob <= 0
    assert [lp for _, lp in lp.top] == sorted((lp for _, lp in lp.top), reverse=True)
    np.testing.assert_allclose([v for _, v in lp.top], np.sort(want)[::-1][:5])
    hot = SamplingParams(temperature=1.7, seed=4, logprobs=True, top_logprobs=5, logit_bias=((11, 4.0),))
    assert draw(logits, hot, 0)[1].top == lp.top  # temperature does not change them


def test_logprobs_of_non_finite_logits_stay_finite_and_never_positive() -> None:
    logits = np.array([0.0, -np.inf, np.nan, 3.0], dtype=np.float32)
    token, lp = draw(logits, SamplingParams(logprobs=True, top_logprobs=4), 0)
    values = [lp.logprob, *(v for _, v in lp.top)]
    assert token == 2 and all(np.isfinite(values)) and max(values) <= 0  # numpy's argmax takes NaN
    assert min(values) == sampling.MIN_LOGPROB


def test_the_sampler_counts_its_history_and_each_draw() -> None:
    # history: what the request generated before (engines pass the first token in it too)
    sampler = TokenSampler(SamplingParams(frequency_penalty=1.0), step=4, history=(1, 1, 2, 5))
    logits = np.zeros(8, dtype=np.float32)
    logits[[1, 2, 5, 6]] = [2.5, 1.5, 0.5, 0.4]
    assert sampler.draw(logits) == (1, None) and sampler.step == 5  # 1 and 2 tie at 0.5: the lower id
    assert sampler.draw(logits)[0] == 2  # 1 fell to -0.5; 2 (0.5) beats 6 (0.4) and 5 (-0.5)
    assert dict(sampler.counts) == {1: 3, 2: 2, 5: 1}
    assert TokenSampler(SamplingParams(), step=0, history=(1, 2)).counts == Counter()  # no penalty: no counting


@pytest.mark.parametrize("kwargs", [
    dict(presence_penalty=2.5), dict(frequency_penalty=-2.1), dict(logit_bias=((3, 101.0),)),
    dict(logit_bias=((-1, 1.0),)), dict(logit_bias=((3, 1.0), (3, 2.0))), dict(top_logprobs=21, logprobs=True),
    dict(top_logprobs=2),
])
def test_bad_new_sampling_params_are_rejected(kwargs: dict) -> None:
    with pytest.raises(ValueError):
        SamplingParams(**kwargs)


def test_token_logprobs_survive_the_kv_end_frames_json() -> None:
    lp = TokenLogprobs(7, -0.25, ((7, -0.25), (3, -1.5)))
    assert TokenLogprobs.from_json(json.loads(json.dumps(lp.to_json()))) == lp
    with pytest.raises(ValueError):
        TokenLogprobs.from_json({"token": 7})


def test_the_http_limits_are_the_engines_limits() -> None:
    # the scheduler may not import the engines' module: the two copies of OpenAI's ranges must agree
    assert validation.MAX_PENALTY == sampling.MAX_PENALTY
    assert validation.MAX_LOGIT_BIAS == sampling.MAX_LOGIT_BIAS
    assert validation.MAX_TOP_LOGPROBS == sampling.MAX_TOP_LOGPROBS >= validation.MAX_COMPLETION_LOGPROBS


# ---------------------------------------------------------------- the engines' batch


@pytest.fixture(params=KINDS)
def engine(request: pytest.FixtureRequest, engines) -> Iterator[Engine]:
    engine = engines(request.param, "llama")
    assert engine.running() == [] and engine.cached_requests() == []
    yield engine
    for rid in engine.cached_requests():
        engine.release(rid)


def _run(engine: Engine, requests: dict[str, tuple[list[int], SamplingParams]]
         ) -> dict[str, list[tuple[int, TokenLogprobs | None]]]:
    """Prefill every request, draw its first token as a prefill node does, then
    decode them all in one batch: each request's (token, logprobs), first included."""
    out: dict[str, list[tuple[int, TokenLogprobs | None]]] = {}
    for rid, (prompt, params) in requests.items():
        result = engine.prefill(rid, prompt, lambda s: None)
        out[rid] = [draw(result.logits, params, 0)]
        engine.add(rid, out[rid][0][0], params)
    for _ in range(MAX_STEPS):
        if not engine.running():
            break
        tokens = engine.step()
        logprobs = engine.step_logprobs()
        for rid, token in tokens.items():
            out[rid].append((token, logprobs.get(rid)))
    assert not engine.running()
    for rid in requests:
        engine.release(rid)
    return out


def _alone(engine: Engine, prompt: list[int], params: SamplingParams) -> list[tuple[int, TokenLogprobs | None]]:
    return _run(engine, {"alone": (prompt, params)})["alone"]


def _tokens(drawn: list[tuple[int, TokenLogprobs | None]]) -> list[int]:
    return [token for token, _ in drawn]


def test_a_logit_bias_of_100_forces_its_token_at_every_step(engine) -> None:
    forced = 321
    drawn = _alone(engine, OTHER, SamplingParams(max_tokens=6, logit_bias=((forced, 100.0),)))
    assert _tokens(drawn) == [forced] * 6
    plain = _tokens(_alone(engine, OTHER, SamplingParams(max_tokens=6)))
    assert forced not in plain


def test_a_big_frequency_penalty_breaks_a_repetitive_greedy_loop(engine) -> None:
    plain = _tokens(_alone(engine, REPETITIVE, SamplingParams(max_tokens=24)))
    assert len(set(plain)) <= len(plain) // 2  # the tiny model loops on a pair of tokens
    for params in (SamplingParams(max_tokens=24, frequency_penalty=2.0),
                   SamplingParams(max_tokens=24, presence_penalty=2.0)):
        penalized = _tokens(_alone(engine, REPETITIVE, params))
        assert penalized != plain and len(set(penalized)) > len(set(plain)) + 5


def test_greedy_logprobs_are_consistent_at_every_step(engine) -> None:
    drawn = _alone(engine, OTHER, SamplingParams(max_tokens=8, logprobs=True, top_logprobs=5,
                                                 presence_penalty=0.5, logit_bias=((40, 2.0),)))
    assert len(drawn) == 8
    for token, lp in drawn:
        assert lp is not None and lp.token_id == token and lp.logprob <= 0
        assert len(lp.top) == 5 and lp.top[0] == (token, lp.logprob)  # greedy picks the top-1
        assert [v for _, v in lp.top] == sorted((v for _, v in lp.top), reverse=True)


def test_requests_with_different_penalties_in_one_batch_each_draw_what_they_draw_alone(engine) -> None:
    requests = {
        "freq": (REPETITIVE, SamplingParams(max_tokens=20, frequency_penalty=1.5, logprobs=True, top_logprobs=2)),
        "pres": (REPETITIVE, SamplingParams(max_tokens=16, presence_penalty=-1.0)),
        "plain": (REPETITIVE, SamplingParams(max_tokens=12)),  # mlx: shares the on-device argmax
        "bias": (OTHER, SamplingParams(max_tokens=14, temperature=0.8, seed=5, logit_bias=((99, 3.0),),
                                       logprobs=True)),
    }
    alone = {rid: _alone(engine, prompt, params) for rid, (prompt, params) in requests.items()}
    assert len({tuple(_tokens(alone[rid])) for rid in ("freq", "pres", "plain")}) == 3  # they differ
    batched = _run(engine, requests)
    assert {rid: _tokens(d) for rid, d in batched.items()} == {rid: _tokens(d) for rid, d in alone.items()}
    for rid in ("freq", "bias"):
        for (_, got), (_, want) in zip(batched[rid], alone[rid], strict=True):
            assert got.token_id == want.token_id and got.logprob == pytest.approx(want.logprob, abs=1e-5)
    assert all(lp is None for _, lp in batched["plain"] + batched["pres"])


def test_a_request_with_logprobs_joining_a_running_batch_gets_its_own_tokens_logprobs(engine) -> None:
    # mlx samples one step ahead of the token it hands out: the logprobs must still belong to that token
    asks = SamplingParams(max_tokens=10, frequency_penalty=1.0, logprobs=True, top_logprobs=3)
    want = _alone(engine, REPETITIVE, asks)
    result = engine.prefill("running", OTHER, lambda s: None)
    engine.add("running", draw(result.logits, SamplingParams(), 0)[0], SamplingParams(max_tokens=6))
    got: list[tuple[int, TokenLogprobs | None]] = []
    for step in range(MAX_STEPS):
        if step == 3:  # joins while "running" decodes, which leaves before it ends
            result = engine.prefill("joiner", REPETITIVE, lambda s: None)
            got.append(draw(result.logits, asks, 0))
            engine.add("joiner", got[0][0], asks)
        if not engine.running():
            break
        tokens, logprobs = engine.step(), engine.step_logprobs()
        assert "running" not in logprobs  # it did not ask
        if "joiner" in tokens:
            got.append((tokens["joiner"], logprobs["joiner"]))
    for rid in ("running", "joiner"):
        engine.release(rid)
    assert _tokens(got) == _tokens(want)
    for (_, a), (_, b) in zip(got, want, strict=True):
        assert [i for i, _ in a.top] == [i for i, _ in b.top] and a.logprob == pytest.approx(b.logprob, abs=1e-5)


def test_a_penalized_stream_continued_elsewhere_goes_on_as_if_never_interrupted(engine) -> None:
    params = SamplingParams(max_tokens=18, frequency_penalty=1.0, presence_penalty=0.5)
    whole = _tokens(_alone(engine, REPETITIVE, params))
    sent = 7  # what a migrated stream had sent: its new prompt ends with them, sampling resumes at step 7
    rest = SamplingParams(max_tokens=18 - sent, frequency_penalty=1.0, presence_penalty=0.5)
    result = engine.prefill("cont", REPETITIVE + whole[:sent], lambda s: None)
    first, _ = TokenSampler(rest, sent - 1, whole[:sent]).draw(result.logits)  # as decode._prefill_here
    engine.add("cont", first, rest, first_step=sent, history=tuple(whole[:sent]))
    tokens = [first]
    for _ in range(MAX_STEPS):
        if not engine.running():
            break
        tokens.append(engine.step()["cont"])
    engine.release("cont")
    assert tokens == whole[sent:]


@requires_torch_and_mlx
def test_the_same_penalties_and_bias_give_torch_and_mlx_the_same_greedy_tokens(engines) -> None:
    params = SamplingParams(max_tokens=20, frequency_penalty=0.7, presence_penalty=0.3,
                            logit_bias=((126, -5.0), (922, 4.0)), logprobs=True, top_logprobs=3)
    got = {kind: _alone(engines(kind, "llama"), REPETITIVE, params) for kind in ("torch", "mlx")}
    assert _tokens(got["torch"]) == _tokens(got["mlx"])
    for (_, a), (_, b) in zip(got["torch"], got["mlx"], strict=True):
        assert [i for i, _ in a.top] == [i for i, _ in b.top]
        np.testing.assert_allclose([a.logprob, *(v for _, v in a.top)], [b.logprob, *(v for _, v in b.top)],
                                   atol=1e-4)


# ---------------------------------------------------------------- refusals, over a fake backend


CHAT = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3}
TEXT = {"model": MODEL, "prompt": "hi", "max_tokens": 3}
TOOL = {"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}

REFUSED = [  # (route, fields added to the body, the param the 400 names)
    ("chat", {"tools": [{"type": "function", "function": {"name": "f g"}}]}, "tools[0].function.name"),
    ("chat", {"tool_choice": "auto"}, "tool_choice"),  # without tools
    ("chat", {"tools": [TOOL], "parallel_tool_calls": "yes"}, "parallel_tool_calls"),
    ("chat", {"functions": [TOOL["function"]]}, "functions"),
    ("chat", {"function_call": "auto"}, "function_call"),
    ("chat", {"response_format": {"type": "yaml"}}, "response_format"),
    ("chat", {"n": 2}, "n"),
    ("chat", {"audio": {"voice": "alloy", "format": "wav"}}, "audio"),
    ("chat", {"modalities": ["text", "audio"]}, "modalities"),
    ("chat", {"prediction": {"type": "content", "content": "x"}}, "prediction"),
    ("chat", {"reasoning_effort": "low"}, "reasoning_effort"),
    ("chat", {"store": True}, "store"),
    ("chat", {"metadata": {"k": "v"}}, "metadata"),
    ("chat", {"service_tier": "flex"}, "service_tier"),
    ("chat", {"web_search_options": {}}, "web_search_options"),
    ("chat", {"min_p": 0.1}, "min_p"),  # unknown: refused as OpenAI refuses it
    ("chat", {"repetition_penalty": 1.1}, "repetition_penalty"),
    ("chat", {"echo": True}, "echo"),  # a completions field, unknown on chat
    ("chat", {"stream_options": {"include_usage": True, "continuous_usage_stats": True}},
     "stream_options.continuous_usage_stats"),
    ("chat", {"pdcluster": {"priority": 1}}, "pdcluster.priority"),
    ("chat", {"messages": [{"role": "user", "content": "hi", "name": "ann"}]}, "messages[0].name"),
    ("chat", {"messages": [{"role": "assistant", "content": None, "tool_calls": [
        {"id": "c1", "type": "function", "function": {"name": "f", "arguments": "{"}}]}]},
     "messages[0].tool_calls[0].function.arguments"),
    ("chat", {"messages": [{"role": "tool", "content": "42"}]}, "messages[0].tool_call_id"),
    ("chat", {"messages": [{"role": "function", "content": "42"}]}, "messages[0].role"),
    ("chat", {"messages": [{"role": "assistant", "content": "x", "function_call": {"name": "f"}}]},
     "messages[0].function_call"),
    ("chat", {"logprobs": True, "top_logprobs": 21}, "top_logprobs"),
    ("chat", {"top_logprobs": 2}, "top_logprobs"),  # without logprobs: true
    ("chat", {"logprobs": 3}, "logprobs"),  # chat's is a boolean
    ("chat", {"presence_penalty": 2.5}, "presence_penalty"),
    ("chat", {"frequency_penalty": -3}, "frequency_penalty"),
    ("chat", {"logit_bias": {"5": 101}}, "logit_bias"),
    ("chat", {"logit_bias": {"hello": 1}}, "logit_bias"),
    ("chat", {"logit_bias": {"999999": 1}}, "logit_bias"),  # past the vocabulary
    ("chat", {"max_completion_tokens": 5, "max_tokens": 3}, "max_completion_tokens"),
    ("chat", {"user": 7}, "user"),
    ("text", {"best_of": 3}, "best_of"),
    ("text", {"echo": True}, "echo"),
    ("text", {"suffix": " the end"}, "suffix"),
    ("text", {"n": 2}, "n"),
    ("text", {"logprobs": 6}, "logprobs"),
    ("text", {"logprobs": True}, "logprobs"),
    ("text", {"top_logprobs": 2}, "top_logprobs"),  # a chat field, unknown on completions
    ("text", {"tools": [TOOL]}, "tools"),
    ("text", {"response_format": {"type": "json_object"}}, "response_format"),
]


def _post(server: ServerThread, route: str, body: dict) -> tuple[int, dict]:
    path = "/v1/chat/completions" if route == "chat" else "/v1/completions"
    req = urllib.request.Request(server.url + path, data=json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=10) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


@pytest.mark.parametrize("route, extra, param", REFUSED, ids=[p for _, _, p in REFUSED])
def test_a_parameter_the_server_cannot_honour_is_a_400_naming_it(server: ServerThread, route: str, extra: dict,
                                                                  param: str) -> None:
    status, reply = _post(server, route, {**(CHAT if route == "chat" else TEXT), **extra})
    assert status == 400, reply
    assert set(reply) == {"error"} and reply["error"]["param"] == param
    assert reply["error"]["type"] == "invalid_request_error" and param.split(".")[-1].split("[")[0] in \
        reply["error"]["message"]


ASKS_FOR_NOTHING = [  # values of refused fields that change nothing, and nulls: accepted
    ("chat", {"n": 1, "tools": [], "tool_choice": "none", "functions": [], "response_format": {"type": "text"},
              "modalities": ["text"], "store": False, "metadata": {}, "service_tier": "auto", "audio": None,
              "parallel_tool_calls": None, "logit_bias": {}, "user": None, "seed": None, "stop": None}),
    ("chat", {"messages": [{"role": "system", "content": "be brief", "name": None},
                           {"role": "user", "content": "hi"},
                           {"role": "assistant", "content": "yo", "tool_calls": [], "refusal": None, "audio": None,
                            "function_call": None, "annotations": []},
                           {"role": "developer", "content": [{"type": "text", "text": "again"}]}],
              "stream_options": {"include_usage": None}}),
    ("text", {"n": 1, "best_of": 1, "echo": False, "suffix": None, "logprobs": None, "user": "u-1"}),
]


@pytest.mark.parametrize("route, extra", ASKS_FOR_NOTHING, ids=["chat", "chat-history", "text"])
def test_values_that_ask_for_nothing_are_accepted(server: ServerThread, route: str, extra: dict) -> None:
    status, reply = _post(server, route, {**(CHAT if route == "chat" else TEXT), **extra})
    assert status == 200, reply
    assert reply["choices"][0]["logprobs"] is None


def test_the_new_parameters_reach_the_backend(server: ServerThread, backend) -> None:
    backend.context_length = 4096  # room for the tool definitions
    status, _ = _post(server, "chat", {**CHAT, "max_tokens": None, "max_completion_tokens": 2,
                                       "presence_penalty": 0.5, "frequency_penalty": -1, "logit_bias": {"12": -7.5},
                                       "logprobs": True, "top_logprobs": 4, "user": "ann"})
    assert status == 200
    status, _ = _post(server, "text", {**TEXT, "logprobs": 0})
    assert status == 200
    for extra in ({"response_format": {"type": "json_object"}}, {"tools": [TOOL], "tool_choice": "required"},
                  {"tools": [TOOL], "tool_choice": "required", "parallel_tool_calls": False}):
        assert _post(server, "chat", {**CHAT, **extra})[0] == 200
    assert _post(server, "chat", {**CHAT, "tools": [TOOL]})[0] == 200
    chat, text, json_mode, parallel, single, offered = backend.requests
    assert json_mode.grammar and parallel.grammar and single.grammar and parallel.grammar != single.grammar
    assert not offered.grammar and "<tools>" in backend.codec.decode(list(offered.prompt_token_ids))
    assert "<tools>" not in backend.codec.decode(list(chat.prompt_token_ids))  # tools and tool_choice: the tests of
    # their effect on the output are in tests/test_tools.py and tests/test_tools_live.py
    assert (chat.max_tokens, chat.presence_penalty, chat.frequency_penalty, chat.logit_bias) == (2, 0.5, -1.0,
                                                                                              ((12, -7.5),))
    assert (chat.logprobs, chat.top_logprobs, chat.user) == (True, 4, "ann")
    assert (text.logprobs, text.top_logprobs, text.user) == (True, 0, None)


# ---------------------------------------------------------------- a real cluster, through the openai client


@pytest.fixture(scope="module")
def cluster(make_tiny_model: Callable[..., Path]) -> Iterator[tuple[openai.OpenAI, Any]]:
    """A torch prefill worker and an mlx worker with both roles (in-process, 127.0.0.1),
    a ``ClusterBackend`` over them and its HTTP API; the openai client and the backend."""
    if not (have("torch") and have("mlx.core")):
        pytest.skip("needs the torch and mlx extras")
    from cluster.auth import generate_key
    from scheduler.api import build_app
    from scheduler.service import ClusterBackend, SchedulerConfig
    from workers.rpc.server import Worker

    model, key = make_tiny_model("llama"), generate_key()
    workers = [Worker(config(model, key, "prefill", engine="torch", port=free_port())),
               Worker(config(model, key, "both", port=free_port()))]
    backend = ClusterBackend(SchedulerConfig(mdns=False, health_interval_s=0.2,
                                             peers=tuple(f"127.0.0.1:{w.config.port}" for w in workers)), key)
    srv = ServerThread(build_app(backend))
    started: list[Any] = []
    try:
        for worker in workers:  # one after another: engine imports are not thread-safe
            asyncio.run_coroutine_threadsafe(worker.start(), srv.loop).result(120)
            started.append(worker)
        asyncio.run_coroutine_threadsafe(backend.start(), srv.loop).result(30)
        started.append(backend)
        deadline = time.monotonic() + 60
        while not (backend.models() and len(backend.table.snapshot()) == 2):
            assert time.monotonic() < deadline, "the scheduler did not see both workers and the model"
            time.sleep(0.1)
        yield openai.OpenAI(base_url=srv.url + "/v1", api_key="unused", timeout=60, max_retries=0), backend
    finally:
        for part in reversed(started):
            asyncio.run_coroutine_threadsafe(part.stop(), srv.loop).result(60)
        srv.stop()


def _model(client: openai.OpenAI) -> str:
    return client.models.list().data[0].id


MESSAGES = [{"role": "user", "content": "Tell me about prefill and decode."}]
PLACEMENTS = ["disaggregated", "colocated"]


def _spelled(backend: Any, model: str, token_id: int) -> str:
    from scheduler.logprobs import _speller

    return _speller(backend.codec_for(model))(token_id)[0]


@pytest.mark.parametrize("placement", PLACEMENTS)
def test_chat_honours_bias_logprobs_max_completion_tokens_and_user(cluster, placement: str, caplog) -> None:
    client, backend = cluster
    model = _model(client)
    forced = 321
    with caplog.at_level(logging.INFO, logger="scheduler.api"):
        reply = client.chat.completions.create(
            model=model, messages=MESSAGES, max_completion_tokens=5, temperature=0, logit_bias={str(forced): 100},
            logprobs=True, top_logprobs=3, user="alice", presence_penalty=0.1, frequency_penalty=0.1,
            extra_body={"pdcluster": {"placement": placement}, "ignore_eos": True})
    stats = reply.model_extra["pdcluster"]
    assert (stats["prefill_node"] == stats["decode_node"]) == (placement == "colocated")
    assert reply.usage.completion_tokens == 5  # max_completion_tokens
    content = reply.choices[0].logprobs.content
    assert [c.token for c in content] == [_spelled(backend, model, forced)] * 5  # the bias forced every token
    for c in content:  # the first token's came from the prefill node when disaggregated
        assert c.logprob == pytest.approx(0.0, abs=1e-3) and bytes(c.bytes).decode(errors="backslashreplace") == c.token
        assert len(c.top_logprobs) == 3 and c.top_logprobs[0].token == c.token
        assert [t.logprob for t in c.top_logprobs] == sorted((t.logprob for t in c.top_logprobs), reverse=True)
    assert any("user='alice'" in r.getMessage() and reply.id in r.getMessage() for r in caplog.records)


def test_greedy_logprobs_through_the_api_are_consistent_and_streamed_alike(cluster) -> None:
    client, _ = cluster
    ask = dict(model=_model(client), messages=MESSAGES, max_tokens=8, temperature=0, logprobs=True, top_logprobs=4,
               extra_body={"ignore_eos": True})
    whole = client.chat.completions.create(**ask)
    content = whole.choices[0].logprobs.content
    assert len(content) == 8
    for c in content:
        assert c.logprob <= 0 and c.top_logprobs[0].token == c.token  # greedy: the chosen one is the top-1
        assert c.top_logprobs[0].logprob == pytest.approx(c.logprob)
    streamed = [entry for chunk in client.chat.completions.create(**ask, stream=True)
                if chunk.choices and chunk.choices[0].logprobs for entry in chunk.choices[0].logprobs.content]
    assert [(c.token, round(c.logprob, 5)) for c in streamed] == [(c.token, round(c.logprob, 5)) for c in content]


def test_completions_logprobs_and_a_frequency_penalty(cluster) -> None:
    client, _ = cluster
    ask = dict(model=_model(client), prompt="The cache", max_tokens=16, temperature=0, logprobs=2,
               extra_body={"ignore_eos": True, "pdcluster": {"placement": "disaggregated"}})
    plain = client.completions.create(**ask)
    lp = plain.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == len(lp.text_offset) == 16
    assert lp.text_offset == [sum(len(t) for t in lp.tokens[:i]) for i in range(16)]
    for token, logprob, top in zip(lp.tokens, lp.token_logprobs, lp.top_logprobs, strict=True):
        assert logprob <= 0 and max(top.values()) == pytest.approx(logprob) and token in top and len(top) <= 3
    assert len(set(lp.tokens)) < 16  # greedy repeats itself on this prompt
    penalized = client.completions.create(**ask, frequency_penalty=2.0)
    assert penalized.choices[0].text != plain.choices[0].text
    assert len(set(penalized.choices[0].logprobs.tokens)) > len(set(lp.tokens))
    chunks = list(client.completions.create(**ask, frequency_penalty=2.0, stream=True))
    tokens = [t for c in chunks if c.choices and c.choices[0].logprobs for t in c.choices[0].logprobs.tokens]
    assert tokens == penalized.choices[0].logprobs.tokens


def test_torch_prefill_and_mlx_decode_agree_with_a_colocated_run_on_penalties_and_logprobs(cluster) -> None:
    client, _ = cluster
    ask = dict(model=_model(client), messages=MESSAGES, max_tokens=12, temperature=0, logprobs=True, top_logprobs=2,
               presence_penalty=1.0, frequency_penalty=0.5)
    runs = {p: client.chat.completions.create(**ask, extra_body={"pdcluster": {"placement": p}, "ignore_eos": True})
            for p in PLACEMENTS}
    a, b = (runs[p].choices[0].logprobs.content for p in PLACEMENTS)
    assert [c.token for c in a] == [c.token for c in b]
    np.testing.assert_allclose([c.logprob for c in a], [c.logprob for c in b], atol=1e-4)


def test_a_bias_on_a_token_outside_the_vocabulary_is_a_400(cluster) -> None:
    client, _ = cluster
    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(model=_model(client), messages=MESSAGES, max_tokens=2,
                                       logit_bias={"1000000": 5})
    assert err.value.body["param"] == "logit_bias"
