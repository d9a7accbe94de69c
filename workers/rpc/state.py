"""Run-time state of one worker, shared by its RPCs: requests in flight, counters.

The config is frozen and built once (``workers.rpc.server.WorkerConfig``); what
changes while the worker runs lives here. Everything in this module is used
on the event loop, except ``ActiveRequest.cancelled``, which the engine
thread polls between slices.
"""
from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
from dataclasses import dataclass, field
from typing import Any

import grpc

from cluster.auth import ClusterKey
from proto import pdcluster_pb2 as pb
from workers.engines.base import KVSlice, SliceSink
from workers.engines.model_config import ModelSpec
from workers.engines.prefix_cache import PrefixCache, PrefixHit
from workers.engines.sampling import SamplingParams
from workers.engines.thread import EngineThread
from workers.kv import kvcodecs
from workers.kv.leases import Lease, LeaseTable
from workers.kv.listener import KVPusher
from workers.rpc.loop import DecodeStream, PrefillTask, StepLoop

log = logging.getLogger(__name__)

CODECS = ("", *kvcodecs.CODECS)  # "" (proto default) is raw


class RPCFailure(Exception):
    """Ends one RPC with ``code`` and ``message``."""

    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


class Cancelled(Exception):
    """Raised on the engine thread when a request is cancelled mid-compute."""


@dataclass(frozen=True)
class ServiceSettings:
    """What the RPCs need from the worker's config."""

    can_prefill: bool
    can_decode: bool
    kv_host: str  # advertised in ``reserved``
    kv_port: int
    chunk_size: int
    lease_s: float
    connect_timeout_s: float
    send_timeout_s: float
    threaded_send: bool
    max_queued_bytes: int


@dataclass
class Counters:
    """Monotonic counters behind ``Stats``."""

    requests_total: int = 0
    requests_failed: int = 0
    requests_cancelled: int = 0
    kv_bytes_sent: int = 0
    kv_bytes_received: int = 0
    tokens_generated: int = 0


@dataclass(eq=False)
class ActiveRequest:
    """One Prefill or Decode in progress on this worker."""

    request_id: str
    kind: str  # "prefill" | "decode"
    cancelled: threading.Event = field(default_factory=threading.Event)  # polled on the engine thread
    lease: Lease | None = None
    stream: DecodeStream | None = None  # its place in the decode batch, once it joined
    prefill: PrefillTask | None = None  # its prefill in the step loop, once queued
    pusher: KVPusher | None = None  # a prefill's KV stream, once connected
    failure: RPCFailure | None = None  # why it was cancelled, when not the caller's own cancel (a drain)

    @property
    def cache_key(self) -> str:
        """The engine cache key: prefill and decode of one request may share a worker."""
        return f"{self.request_id}#{self.kind}"

    def cancel(self, failure: RPCFailure | None = None) -> None:
        """Stop this request wherever it is: between slices, between tokens,
        blocked on a stalled KV stream, or waiting for its KV. Its RPC fails with
        ``failure`` (default: CANCELLED, "request cancelled")."""
        self.failure = self.failure or failure
        self.cancelled.set()
        if self.stream is not None:
            self.stream.cancel()
        if self.prefill is not None:
            self.prefill.cancel()
        if self.pusher is not None:
            self.pusher.close()
        if self.lease is not None and self.lease.token is not None and not self.lease.kv.done():
            self.lease.kv.set_exception(self.cancelled_failure)

    @property
    def cancelled_failure(self) -> RPCFailure:
        """What its RPC fails with once cancelled."""
        return self.failure or RPCFailure(grpc.StatusCode.CANCELLED, "request cancelled")


class WorkerState:
    """What the RPCs of one worker share."""

    def __init__(self, settings: ServiceSettings, engines: EngineThread, leases: LeaseTable,
                 spec: ModelSpec, key: ClusterKey, *, loop: StepLoop | None = None,
                 prefix_cache: PrefixCache | None = None) -> None:
        self.settings = settings
        self.engines = engines
        self.leases = leases
        self.spec = spec
        self.key = key
        self.loop = loop or StepLoop(engines)
        self.prefix_cache = prefix_cache  # None: no prefix reuse on this worker
        self.counters = Counters()
        self.active: dict[tuple[str, str], ActiveRequest] = {}
        self.draining = ""  # why this worker takes no new request ("" when it does); see workers/rpc/drain.py

    async def prefix_lookup(self, prompt: list[int]) -> PrefixHit | None:
        """The longest cached whole-block prefix of ``prompt`` (never all of it),
        or None. Joining its blocks copies them, so it runs off the event loop."""
        if self.prefix_cache is None or self.prefix_cache.capacity_bytes == 0:
            return None
        return await asyncio.to_thread(self.prefix_cache.lookup, prompt)

    @property
    def kv_in_host_memory(self) -> bool:
        """Whether the engine keeps its KV where the prefix cache lives (host or
        unified memory): only then do the two share the KV budget."""
        return not self.engines.engine.device.startswith("cuda")

    def fit_prefix_cache(self, reserving: int = 0) -> None:
        """The prefix cache yields to live requests: with a KV budget over the
        memory both use, it keeps at most what the leases (plus ``reserving``
        bytes about to be reserved, minus any about to be freed) leave of it."""
        budget = self.leases.max_reserved_bytes
        if self.prefix_cache is not None and budget is not None and self.kv_in_host_memory:
            self.prefix_cache.shrink_to(max(0, budget - self.leases.reserved_bytes - reserving))

    def store_prefix(self, cache_key: str, token_ids: list[int], releasing: int = 0) -> list[int]:
        """On the engine thread: keep ``cache_key``'s KV (the first tokens of
        ``token_ids`` that its cache holds) in the prefix cache; the block
        hashes held for it afterwards ([] without a prefix cache).
        ``releasing``: bytes of this request's own lease, about to be freed.
        Keeping a prefix is advice for later requests: a failure here is
        logged and never fails the request that just finished."""
        if self.prefix_cache is None or self.prefix_cache.capacity_bytes == 0 or self.prefix_cache.sliding:
            return []  # (sliding: the cache would drop the layers, so do not copy them out)
        try:
            engine = self.engines.engine
            held = min(engine.cached_tokens(cache_key), len(token_ids))
            if held < self.prefix_cache.block_tokens:
                return []
            layers = [engine.cached_layer(cache_key, layer) for layer in range(self.spec.num_layers)]
            self.prefix_cache.insert(token_ids[:held], layers)
            del layers
            self.fit_prefix_cache(reserving=-releasing)
            return self.prefix_cache.blocks_of(token_ids[:held])  # what survived the fit
        except Exception:
            log.exception("keeping the prefix of %s failed; the request itself is unaffected", cache_key)
            return []

    def open(self, rid: str, kind: str) -> ActiveRequest:
        """Register a new request; one Prefill and one Decode per id at most; none while draining."""
        if self.draining:
            raise RPCFailure(grpc.StatusCode.UNAVAILABLE, f"this worker is draining ({self.draining}): "
                                                          "it takes no new request")
        if (rid, kind) in self.active:
            raise RPCFailure(grpc.StatusCode.ALREADY_EXISTS, f"request {rid!r} already has a {kind} on this worker")
        active = ActiveRequest(rid, kind)
        self.active[(rid, kind)] = active
        return active

    def find(self, rid: str) -> list[ActiveRequest]:
        return [active for (request_id, _), active in self.active.items() if request_id == rid]

    def retire(self, active: ActiveRequest, after: Any) -> None:
        """Forget ``active`` once ``after`` (an engine-thread future, whose job
        releases the request's cache) is done; at once if there is none."""
        def forget() -> None:
            if self.active.get((active.request_id, active.kind)) is active:
                del self.active[(active.request_id, active.kind)]

        if after is None or after.done():
            forget()
            return
        loop = asyncio.get_running_loop()

        def on_done(_: Any) -> None:
            with contextlib.suppress(RuntimeError):  # loop closed at shutdown
                loop.call_soon_threadsafe(forget)

        after.add_done_callback(on_done)

    def count_failure(self, code: grpc.StatusCode) -> None:
        if code == grpc.StatusCode.CANCELLED:
            self.counters.requests_cancelled += 1
        else:
            self.counters.requests_failed += 1

    def check_prompt(self, rid: str, token_ids: Any) -> list[int]:
        """The prompt as a list, or INVALID_ARGUMENT."""
        if not rid:
            raise RPCFailure(grpc.StatusCode.INVALID_ARGUMENT, "request_id is required")
        prompt = list(token_ids)
        if not prompt:
            raise RPCFailure(grpc.StatusCode.INVALID_ARGUMENT, "prompt_token_ids is empty")
        bad = next((t for t in prompt if t >= self.spec.vocab_size), None)
        if bad is not None:
            raise RPCFailure(grpc.StatusCode.INVALID_ARGUMENT,
                             f"token id {bad} is outside the model's vocabulary of {self.spec.vocab_size}")
        return prompt

    def check_sampling(self, params: pb.SamplingParams) -> SamplingParams:
        """``sampling_from_proto``, whose logit bias names only tokens of this
        model and whose grammar compiles against its tokenizer, or
        INVALID_ARGUMENT. A grammar's params get the model's EOS among their
        stop tokens (``GrammarTokenizer.constrain``: a complete grammar ends the
        request with "stop", even one that asked for no stop token)."""
        sampling = sampling_from_proto(params)
        if sampling.max_token_id() >= self.spec.vocab_size:
            raise RPCFailure(grpc.StatusCode.INVALID_ARGUMENT, f"sampling: logit_bias names token id "
                             f"{sampling.max_token_id()}, outside the model's vocabulary of {self.spec.vocab_size}")
        if not sampling.grammar:
            return sampling
        tokenizer = self.engines.engine.grammar_tokenizer
        reason = tokenizer.check(sampling.grammar)
        if reason:
            raise RPCFailure(grpc.StatusCode.INVALID_ARGUMENT, f"sampling: the grammar does not compile against "
                             f"this model's tokenizer: {reason}")
        return tokenizer.constrain(sampling)

    def check_codec(self, codec: str) -> None:
        if codec not in CODECS:
            raise RPCFailure(grpc.StatusCode.INVALID_ARGUMENT, f"unsupported KV codec {codec!r}; this worker "
                             f"speaks {'/'.join(c for c in CODECS if c)}")


def sampling_from_proto(params: pb.SamplingParams) -> SamplingParams:
    """Proto sampling -> engine sampling; proto's unset ``top_p`` (0) means 1."""
    try:
        return SamplingParams(
            max_tokens=params.max_tokens, temperature=params.temperature, top_p=params.top_p or 1.0,
            top_k=params.top_k, seed=params.seed if params.HasField("seed") else None,
            stop_token_ids=tuple(params.stop_token_ids),
            presence_penalty=params.presence_penalty, frequency_penalty=params.frequency_penalty,
            logit_bias=tuple(sorted(params.logit_bias.items())),
            logprobs=params.logprobs, top_logprobs=params.top_logprobs, grammar=params.grammar,
        )
    except ValueError as e:
        raise RPCFailure(grpc.StatusCode.INVALID_ARGUMENT, f"sampling: {e}") from None


def cancellable(active: ActiveRequest, sink: SliceSink | None) -> SliceSink:
    """A slice sink that stops the engine (by raising) once ``active`` is cancelled."""
    def on_slice(kv_slice: KVSlice) -> None:
        if active.cancelled.is_set():
            raise Cancelled(active.request_id)
        if sink is not None:
            sink(kv_slice)

    return on_slice
