"""Grammar-constrained sampling (llguidance) on every node that draws a token.

* The mask (workers/engines/grammar.py): it allows exactly what the grammar
  allows next, padding ids never, and only EOS once the grammar is complete;
  logprobs are those of the masked distribution; a grammar needs the
  model's EOS among its stop tokens; a bad grammar or history says why.
* Both decode engines, per row of their batch, on a tiny random-weight model
  whose free text is random: a json_schema grammar makes greedy and seeded
  output parse and validate and end with EOS ("stop"); an unconstrained
  request beside a constrained one draws what it draws alone; a constrained
  stream continued elsewhere goes on as if never interrupted; a broken
  matcher fails its own request only; torch and mlx draw the same tokens.
* The scheduler's SamplingParams carry the grammar on every attempt and
  continuation.
* Real workers in this process: a torch prefill node drawing token 0 under
  the grammar and an mlx decode node drawing the rest give the mlx engine's
  own constrained tokens; a continued stream (first_step > 0) stays valid; a
  grammar that does not compile is INVALID_ARGUMENT; a complete grammar ends
  a stream that asked for no stop token with "stop".
"""
from __future__ import annotations

import asyncio
import dataclasses
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jsonschema
import llguidance
import numpy as np
import pytest
from conftest import WorkersThread, config, have, requires_mlx, requires_torch, requires_torch_and_mlx, run, status_code

from cluster.auth import ClusterKey, generate_key
from proto import pdcluster_pb2 as pb
from workers.engines import sampling
from workers.engines.base import Engine
from workers.engines.grammar import GrammarError, GrammarMatcher, GrammarTokenizer
from workers.engines.sampling import SamplingParams, TokenSampler
from workers.rpc.client import WorkerClient

KINDS = [pytest.param("torch", marks=requires_torch), pytest.param("mlx", marks=requires_mlx)]
SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 8},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "pet": {"enum": ["cat", "dog", "none"]},
        "tags": {"type": "array", "items": {"type": "string", "maxLength": 5}, "maxItems": 3},
    },
    "required": ["name", "age", "pet", "tags"],
    "additionalProperties": False,
}
GRAMMAR = llguidance.LLMatcher.grammar_from_json_schema(SCHEMA, defaults={"whitespace_flexible": False})
MAX_TOKENS = 160  # far more than the schema's longest document
MAX_STEPS = 400  # bound on every step loop here
PROMPT = np.random.default_rng(7).integers(5, 1000, size=24).tolist()
OTHER = np.random.default_rng(8).integers(5, 1000, size=30).tolist()
TIMEOUT_S = 60.0
EOS = 2  # the tiny checkpoints' (workers/tools/modelgen.py); test_the_tiny_models_eos_is_eos checks it


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread() -> Iterator[None]:
    """torch on one thread here (restored afterwards): with two, OpenMP's barriers make
    a tiny model's decode step far slower whenever another process competes for the cores."""
    if not have("torch"):
        yield
        return
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def tokenizer(model: Path) -> GrammarTokenizer:
    from workers.engines.model_config import read_model_spec

    return GrammarTokenizer(model / "tokenizer.json", read_model_spec(model).eos_token_ids)


def _constrained(tokenizer: GrammarTokenizer, **kwargs: Any) -> SamplingParams:
    """What a worker makes of a request with GRAMMAR: the model's EOS among its stop tokens."""
    return tokenizer.constrain(SamplingParams(**{"max_tokens": MAX_TOKENS, "grammar": GRAMMAR, **kwargs}))


def _document(tokenizer: GrammarTokenizer, tokens: list[int]) -> Any:
    """The JSON document ``tokens`` spell (a final EOS left out), validated against SCHEMA."""
    if tokens and tokens[-1] in tokenizer.eos_token_ids:
        tokens = tokens[:-1]
    value = json.loads(tokenizer.llg.decode_bytes(tokens).decode("utf-8"))
    jsonschema.validate(value, SCHEMA)
    return value


def _is_document(tokenizer: GrammarTokenizer, tokens: list[int]) -> bool:
    try:
        _document(tokenizer, tokens)
    except (ValueError, jsonschema.ValidationError):
        return False
    return True


# ---------------------------------------------------------------- the mask


def test_the_tiny_models_eos_is_eos(tokenizer: GrammarTokenizer) -> None:
    assert tokenizer.eos_token_ids == (EOS,)


def test_the_mask_allows_what_the_grammar_allows_and_then_only_eos(tokenizer: GrammarTokenizer) -> None:
    llg = tokenizer.llg
    text = '{"name":"ann","age":7,"pet":"cat","tags":[]}'
    tokens = llg.tokenize_str(text)
    matcher = tokenizer.matcher(GRAMMAR)
    vocab = 1152  # the model's logits rows: the tiny tokenizer has fewer tokens, the rest is padding
    assert llg.vocab_size < vocab
    for token in tokens:
        masked = matcher.mask(np.zeros(vocab, dtype=np.float32))
        allowed = np.flatnonzero(np.isfinite(masked))
        assert token in allowed and len(allowed) < llg.vocab_size  # the grammar narrows it
        assert not np.isfinite(masked[llg.vocab_size:]).any()  # padding ids never
        assert not matcher.is_stopped
        matcher.consume(token)
    assert matcher.is_stopped
    masked = matcher.mask(np.zeros(vocab, dtype=np.float32))
    assert set(np.flatnonzero(np.isfinite(masked)).tolist()) == set(tokenizer.eos_token_ids)
    with pytest.raises(GrammarError, match="refused token"):
        tokenizer.matcher(GRAMMAR).consume(llg.tokenize_str("x")[0])  # a document starts with {


def test_logprobs_with_a_grammar_are_those_of_the_masked_distribution(tokenizer: GrammarTokenizer) -> None:
    logits = np.random.default_rng(0).normal(size=1152).astype(np.float32)
    allowed = np.isfinite(tokenizer.matcher(GRAMMAR).mask(logits))
    params = _constrained(tokenizer, logprobs=True, top_logprobs=5, temperature=0.9, seed=1)
    token, lp = TokenSampler(params, -1, (), tokenizer).draw(logits)
    assert allowed[token]
    scores = np.where(allowed, logits.astype(np.float64), -np.inf)
    want = scores[token] - scores.max() - np.log(np.exp(scores[allowed] - scores.max()).sum())
    assert lp.token_id == token and lp.logprob == pytest.approx(want)  # over the allowed tokens only
    for alt, value in lp.top:  # alternatives the grammar forbids have probability 0
        assert allowed[alt] or value == sampling.MIN_LOGPROB
    # a complete document forces EOS: its logprob is then 0, whatever the model's logits say
    document = tokenizer.llg.tokenize_str('{"name":"a","age":1,"pet":"dog","tags":["x"]}')
    token, lp = TokenSampler(params, -1, document, tokenizer).draw(logits)
    assert token in tokenizer.eos_token_ids and lp.logprob == pytest.approx(0.0, abs=1e-12)
    assert logits[token] < logits.max()  # not the model's own choice


def test_a_grammar_needs_the_models_eos_among_its_stop_tokens(tokenizer: GrammarTokenizer) -> None:
    bare = SamplingParams(max_tokens=8, grammar=GRAMMAR)  # e.g. a client's ignore_eos: no stop token at all
    with pytest.raises(ValueError, match="EOS"):
        TokenSampler(bare, -1, (), tokenizer)
    with pytest.raises(ValueError, match="GrammarTokenizer"):
        TokenSampler(_constrained(tokenizer), -1)
    constrained = tokenizer.constrain(bare)
    assert set(tokenizer.eos_token_ids) <= set(constrained.stop_token_ids)
    assert tokenizer.constrain(constrained) is constrained
    unconstrained = SamplingParams(max_tokens=8)
    assert tokenizer.constrain(unconstrained) is unconstrained  # no grammar: untouched, no EOS added
    assert not constrained.is_plain_greedy and constrained.reads_history  # no on-device argmax shortcut
    with pytest.raises(ValueError, match="TokenSampler"):
        sampling.draw(np.zeros(1152, dtype=np.float32), constrained, 0)  # no matcher: refused, not ignored


def test_a_bad_grammar_or_history_is_refused_with_the_reason(tokenizer: GrammarTokenizer) -> None:
    assert tokenizer.check(GRAMMAR) == ""
    assert tokenizer.check("not a grammar")
    assert "unknown name" in tokenizer.check(llguidance.LLMatcher.grammar_from_lark("start: missing"))
    with pytest.raises(ValueError, match="grammar"):
        GrammarMatcher(tokenizer, "not a grammar")
    with pytest.raises(ValueError, match="do not match the grammar"):
        tokenizer.matcher(GRAMMAR, tokenizer.llg.tokenize_str("plain text"))
    assert "tokenizer.json" in GrammarTokenizer(Path("/nonexistent/tokenizer.json"), (2,)).check(GRAMMAR)


# ---------------------------------------------------------------- both engines' batch


@pytest.fixture(params=KINDS)
def engine(request: pytest.FixtureRequest, engines) -> Iterator[Engine]:
    engine = engines(request.param, "llama")
    assert engine.running() == [] and engine.cached_requests() == []
    yield engine
    for rid in engine.cached_requests():
        engine.release(rid)


def _run(engine: Engine, requests: dict[str, tuple[list[int], SamplingParams]]
         ) -> tuple[dict[str, list[int]], dict[str, Exception]]:
    """Prefill every request, draw its first token as a prefill node does, then
    decode them all in one batch: each request's tokens, first included, and
    the requests a step failed."""
    out: dict[str, list[int]] = {}
    for rid, (prompt, params) in requests.items():
        result = engine.prefill(rid, prompt, lambda s: None)
        out[rid] = [TokenSampler(params, -1, (), engine.grammar_tokenizer).draw(result.logits)[0]]
        engine.add(rid, out[rid][0], params)
    errors: dict[str, Exception] = {}
    for _ in range(MAX_STEPS):
        if not engine.running():
            break
        for rid, token in engine.step().items():
            out[rid].append(token)
        errors.update(engine.step_errors())
    assert not engine.running()
    for rid in requests:
        engine.release(rid)
    return out, errors


def _alone(engine: Engine, prompt: list[int], params: SamplingParams) -> list[int]:
    tokens, errors = _run(engine, {"alone": (prompt, params)})
    assert not errors
    return tokens["alone"]


def test_a_json_schema_grammar_makes_greedy_output_valid_and_end_with_eos(engine) -> None:
    tokenizer = engine.grammar_tokenizer
    tokens = _alone(engine, PROMPT, _constrained(tokenizer))
    assert len(tokens) < MAX_TOKENS and tokens[-1] in tokenizer.eos_token_ids  # ended by the grammar: "stop"
    assert set(_document(tokenizer, tokens)) == set(SCHEMA["required"])
    free = _alone(engine, PROMPT, SamplingParams(max_tokens=len(tokens)))
    assert not _is_document(tokenizer, free)  # negative control: the random model alone writes no JSON


def test_seeded_sampling_with_a_grammar_stays_valid(engine) -> None:
    tokenizer = engine.grammar_tokenizer
    documents = []
    for seed in range(4):
        tokens = _alone(engine, PROMPT, _constrained(tokenizer, temperature=1.0, top_p=0.95, top_k=200, seed=seed))
        assert tokens[-1] in tokenizer.eos_token_ids
        documents.append(json.dumps(_document(tokenizer, tokens)))
    assert len(set(documents)) > 1  # the seed matters: these are samples, not one greedy answer
    again = _alone(engine, PROMPT, _constrained(tokenizer, temperature=1.0, top_p=0.95, top_k=200, seed=3))
    assert json.dumps(_document(tokenizer, again)) == documents[3]  # (seed, step) decides


def test_an_unconstrained_request_beside_a_constrained_one_draws_what_it_draws_alone(engine) -> None:
    tokenizer = engine.grammar_tokenizer
    requests = {
        "plain": (OTHER, SamplingParams(max_tokens=40)),  # mlx: the shared on-device argmax
        "json": (PROMPT, _constrained(tokenizer)),
        "sampled": (OTHER, SamplingParams(max_tokens=30, temperature=0.8, seed=5)),
        "json-sampled": (OTHER, _constrained(tokenizer, temperature=1.0, seed=9)),
    }
    alone = {rid: _alone(engine, prompt, params) for rid, (prompt, params) in requests.items()}
    batched, errors = _run(engine, requests)
    assert not errors and batched == alone
    for rid in ("json", "json-sampled"):
        _document(tokenizer, batched[rid])


def test_a_constrained_stream_continued_elsewhere_goes_on_as_if_never_interrupted(engine) -> None:
    tokenizer = engine.grammar_tokenizer
    params = _constrained(tokenizer, temperature=0.9, seed=11)
    whole = _alone(engine, PROMPT, params)
    _document(tokenizer, whole)
    for sent in (1, 6, len(whole) - 2):  # what a migrated stream had sent: its prompt ends with them
        rest = dataclasses.replace(params, max_tokens=MAX_TOKENS - sent)
        result = engine.prefill("cont", PROMPT + whole[:sent], lambda s: None)
        first, _ = TokenSampler(rest, sent - 1, whole[:sent], engine.grammar_tokenizer).draw(result.logits)
        engine.add("cont", first, rest, first_step=sent, history=tuple(whole[:sent]))
        tokens = [first]
        for _ in range(MAX_STEPS):
            if not engine.running():
                break
            tokens.append(engine.step()["cont"])
        engine.release("cont")
        assert whole[:sent] + tokens == whole, f"continued after {sent} tokens"


class _BreaksAfter(GrammarTokenizer):
    """A tokenizer whose matchers fail on the draw after their first ``after`` ones."""

    def __init__(self, inner: GrammarTokenizer, after: int) -> None:
        super().__init__(inner.tokenizer_file, inner.eos_token_ids)
        self.after = after

    def matcher(self, grammar: str, history: Any = ()) -> GrammarMatcher:
        matcher = super().matcher(grammar, history)
        consume, draws = matcher.consume, [0]

        def breaking(token: int) -> None:
            draws[0] += 1
            if draws[0] > self.after:
                raise GrammarError("injected: the matcher broke")
            consume(token)

        matcher.consume = breaking  # type: ignore[method-assign]
        return matcher


def test_a_broken_matcher_fails_its_own_request_and_no_other(engine, monkeypatch: pytest.MonkeyPatch) -> None:
    tokenizer = engine.grammar_tokenizer
    requests = {"plain": (OTHER, SamplingParams(max_tokens=30)),
                "json": (PROMPT, _constrained(tokenizer, temperature=0.7, seed=2))}
    alone = {rid: _alone(engine, prompt, params) for rid, (prompt, params) in requests.items()}
    monkeypatch.setattr(engine, "grammar_tokenizer", _BreaksAfter(tokenizer, after=5))
    batched, errors = _run(engine, requests)  # its first draw (the prefill's) had its own matcher
    assert set(errors) == {"json"} and "injected" in str(errors["json"])
    assert batched["plain"] == alone["plain"]
    assert batched["json"] == alone["json"][: 1 + 5]  # the tokens drawn before the failure, none after


@requires_torch_and_mlx
def test_torch_and_mlx_draw_the_same_constrained_tokens(engines) -> None:
    for params in ({}, {"temperature": 1.0, "seed": 4}):
        got = {kind: _alone(engines(kind, "llama"), PROMPT, _constrained(engines(kind, "llama").grammar_tokenizer,
                                                                             **params))
               for kind in ("torch", "mlx")}
        assert got["torch"] == got["mlx"], params


# ---------------------------------------------------------------- the scheduler's side of the wire


def test_the_scheduler_sends_the_grammar_with_every_attempt_and_continuation() -> None:
    from scheduler.lifecycle import continuation, sampling_of
    from scheduler.request import GenerationRequest
    from workers.rpc.state import sampling_from_proto

    request = GenerationRequest("r", "tiny", tuple(PROMPT), max_tokens=40, temperature=0.0, grammar=GRAMMAR)
    assert sampling_of(request).grammar == GRAMMAR
    assert sampling_from_proto(sampling_of(request)).grammar == GRAMMAR  # what a worker reads back
    moved = continuation(request, (5, 6, 7), attempt=1)
    assert sampling_of(moved).grammar == GRAMMAR and moved.first_step == 3  # the matcher replays the 3 sent
    assert sampling_of(GenerationRequest("u", "tiny", (1,), max_tokens=4)).grammar == ""


# ---------------------------------------------------------------- real workers


@pytest.fixture(scope="module")
def workers(model: Path) -> Iterator[tuple[ClusterKey, str, str]]:
    """A torch prefill worker and an mlx worker with both roles, in this
    process on 127.0.0.1: the key and their gRPC addresses."""
    if not (have("torch") and have("mlx.core")):
        pytest.skip("needs the torch and mlx extras")
    key = generate_key()
    thread = WorkersThread(config(model, key, "prefill", engine="torch"), config(model, key, "both"))
    try:
        yield key, *thread.addresses
    finally:
        thread.stop()


def _sampling(**kwargs: Any) -> pb.SamplingParams:
    """A constrained request as the scheduler sends it, stopping at the tiny model's EOS (2)."""
    return pb.SamplingParams(**{"max_tokens": MAX_TOKENS, "grammar": GRAMMAR, "stop_token_ids": [EOS], **kwargs})


async def _events(call: Any) -> tuple[list[int], pb.Done | None]:
    tokens, done = [], None
    async for event in call:
        if event.HasField("token"):
            tokens.append(event.token.token_id)
        elif event.HasField("done"):
            done = event.done
    return tokens, done


async def _colocated(client: WorkerClient, rid: str, prompt: list[int], sampling: pb.SamplingParams,
                     first_step: int = 0) -> tuple[list[int], pb.Done | None]:
    return await _events(client.decode(pb.DecodeRequest(request_id=rid, prompt_token_ids=prompt, sampling=sampling,
                                                         local_prefill=True, first_step=first_step),
                                       timeout=TIMEOUT_S))


async def _disaggregated(prefiller: WorkerClient, decoder: WorkerClient, rid: str, prompt: list[int],
                         sampling: pb.SamplingParams) -> tuple[list[int], pb.Done | None, pb.PrefillReply]:
    call = decoder.decode(pb.DecodeRequest(request_id=rid, prompt_token_ids=prompt, sampling=sampling),
                          timeout=TIMEOUT_S)
    reserved = (await asyncio.wait_for(call.read(), 30)).reserved
    prefill = asyncio.ensure_future(prefiller.prefill(pb.PrefillRequest(
        request_id=rid, prompt_token_ids=prompt, sampling=sampling, kv_host=reserved.kv_host,
        kv_port=reserved.kv_port, transfer_token=reserved.transfer_token), timeout=TIMEOUT_S))
    tokens, done = await _events(call)
    return tokens, done, await prefill


@requires_torch_and_mlx
def test_torch_prefill_mlx_decode_with_a_grammar_is_valid_and_token_identical_to_mlx_alone(
        workers, engines, tokenizer: GrammarTokenizer) -> None:
    key, prefill_address, decode_address = workers
    mlx = engines("mlx", "llama")
    cases = [_sampling(), _sampling(temperature=1.0, seed=21)]

    async def body() -> list[tuple[list[int], pb.Done, pb.PrefillReply]]:
        async with WorkerClient(prefill_address, key) as p, WorkerClient(decode_address, key) as d:
            return [await _disaggregated(p, d, f"split-{i}", PROMPT, s) for i, s in enumerate(cases)]

    for (tokens, done, reply), sampling_pb in zip(run(body), cases, strict=True):
        assert reply.first_token == tokens[0]  # token 0 came from the torch prefill node, under the grammar
        assert done.finish_reason == "stop" and tokens[-1] == EOS
        _document(tokenizer, tokens)
        alone = _alone(mlx, PROMPT, _constrained(mlx.grammar_tokenizer, temperature=sampling_pb.temperature,
                                                 seed=sampling_pb.seed if sampling_pb.HasField("seed") else None))
        assert tokens == alone


@requires_torch_and_mlx
def test_a_continued_constrained_stream_through_a_worker_stays_valid(workers, tokenizer: GrammarTokenizer) -> None:
    key, _, address = workers

    async def body() -> None:
        async with WorkerClient(address, key) as client:
            for sampling_pb in (_sampling(), _sampling(temperature=1.1, seed=8)):
                whole, done = await _colocated(client, "whole", PROMPT, sampling_pb)
                assert done.finish_reason == "stop"
                _document(tokenizer, whole)
                for cut in (2, len(whole) - 3):
                    rest_pb = pb.SamplingParams()
                    rest_pb.CopyFrom(sampling_pb)
                    rest_pb.max_tokens = MAX_TOKENS - cut
                    rest, done = await _colocated(client, f"rest-{cut}", PROMPT + whole[:cut], rest_pb, first_step=cut)
                    assert done.finish_reason == "stop" and whole[:cut] + rest == whole, f"continued at {cut}"

    run(body)


@requires_torch_and_mlx
def test_a_grammar_that_does_not_compile_is_invalid_argument_on_both_roles(workers) -> None:
    key, prefill_address, decode_address = workers
    bad = _sampling(grammar=llguidance.LLMatcher.grammar_from_lark("start: missing"))

    async def body() -> None:
        async with WorkerClient(prefill_address, key) as p, WorkerClient(decode_address, key) as d:
            code, details = await status_code(d.decode(pb.DecodeRequest(
                request_id="bad", prompt_token_ids=PROMPT, sampling=bad, local_prefill=True), timeout=TIMEOUT_S).read())
            assert code.name == "INVALID_ARGUMENT" and "grammar" in details and "unknown name" in details
            code, details = await status_code(p.prefill(pb.PrefillRequest(
                request_id="bad", prompt_token_ids=PROMPT, sampling=_sampling(grammar="{not json"),
                kv_host="127.0.0.1", kv_port=1, transfer_token=b"t"), timeout=TIMEOUT_S))
            assert code.name == "INVALID_ARGUMENT" and "grammar" in details

    run(body)


@requires_torch_and_mlx
def test_a_complete_grammar_ends_a_stream_without_stop_tokens_as_stop(workers, tokenizer: GrammarTokenizer) -> None:
    key, _, address = workers

    async def body() -> tuple[list[int], pb.Done | None]:
        async with WorkerClient(address, key) as client:
            return await _colocated(client, "no-stops", PROMPT, _sampling(stop_token_ids=[]))  # as ignore_eos

    tokens, done = run(body)
    assert done.finish_reason == "stop" and tokens[-1] in tokenizer.eos_token_ids and len(tokens) < MAX_TOKENS
    _document(tokenizer, tokens)

