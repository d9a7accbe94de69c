"""The scheduler's request types: plain dataclasses in, plain dataclasses out."""
from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any, Protocol

from scheduler.tokenizer import PromptCodec

PLACEMENT_MODES = ("disaggregated", "colocated")
# The KV codec of a disaggregated transfer: "auto" lets the scheduler choose per
# transfer (docs/placement.md, "KV codecs"); the others are honoured as given.
KV_CODEC_MODES = ("auto", "raw", "int8", "fp8")


def check_kv_codec(value: str, what: str = "kv_codec") -> str:
    """``value`` if it is one of ``KV_CODEC_MODES``; ValueError naming ``what`` otherwise."""
    if value not in KV_CODEC_MODES:
        raise ValueError(f"{what} must be one of {', '.join(KV_CODEC_MODES)}, got {value!r}")
    return value


@dataclass(frozen=True)
class GenerationRequest:
    """One validated completion request, already tokenized."""

    request_id: str
    model: str
    prompt_token_ids: tuple[int, ...]
    max_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    stop_token_ids: tuple[int, ...] = ()
    placement: str | None = None  # force "disaggregated" | "colocated"; None lets the policy decide
    arrived_at: float = 0.0  # time.monotonic() when the HTTP request arrived
    cached_prefix_tokens: int = 0  # prompt tokens already cached on the chosen nodes (simulator)
    # Sampling step of the first token to produce: 0 for a new request; when a
    # stream is continued on another node, the tokens already sent (they end
    # ``prompt_token_ids``, and ``max_tokens`` counts only what is left).
    first_step: int = 0
    prefix_hashes: tuple[int, ...] = ()  # chained block hashes of the prompt (cluster/blocks.py), for the prefix index
    kv_codec: str | None = None  # the client's codec hint (KV_CODEC_MODES); None: the server's --kv-codec
    # Applied by the decode engines before sampling (workers/engines/sampling.py, ``draw``):
    presence_penalty: float = 0.0  # OpenAI's, over the tokens generated so far, in [-2, 2]
    frequency_penalty: float = 0.0
    logit_bias: tuple[tuple[int, float], ...] = ()  # (token id, bias in [-100, 100]) pairs
    logprobs: bool = False  # each TokenEvent carries its logprob ...
    top_logprobs: int = 0  # ... and this many most likely alternatives (0..20)
    user: str | None = None  # the client's end-user id (OpenAI's ``user``): logged with the request
    # An llguidance grammar (TopLevelGrammar JSON, from ``response_format`` or
    # ``tool_choice``); "" is unconstrained. Every node that draws a token masks
    # the logits with it (workers/engines/grammar.py), a migrated stream too.
    grammar: str = ""

    def __post_init__(self) -> None:
        if self.placement is not None and self.placement not in PLACEMENT_MODES:
            raise ValueError(f"placement must be one of {PLACEMENT_MODES}, got {self.placement!r}")
        if self.kv_codec is not None:
            check_kv_codec(self.kv_codec)
        if not self.prompt_token_ids:
            raise ValueError("the prompt is empty")


@dataclass(frozen=True, kw_only=True)
class RequestStats:
    """One request's record, live or simulated: where it ran and where its time went.

    The live scheduler reports it as the ``pdcluster`` response object; the
    simulator returns one per request (``pdc simulate --json``). Every time is
    in seconds and counts from the request's arrival, except ``arrival_s``,
    which is on the clock that placed the request: seconds from the start of
    the run in the simulator, the scheduler's monotonic clock live.
    """

    request_id: str = ""
    prefill_node: str = ""  # the node that ran prefill: the decode node itself when colocated ("" unknown)
    decode_node: str = ""
    # The codec the KV crossed the link in ("raw", "int8", "fp8"); None when no KV
    # crossed (colocated: a codec hint has no effect there) or the placement is unknown.
    kv_codec: str | None = None
    kv_bytes: int = 0  # KV bytes that crossed the network, as encoded (0 when colocated)
    arrival_s: float = 0.0
    queue_s: float = 0.0  # arrival -> prefill start
    prefill_s: float = 0.0  # prefill compute
    transfer_s: float = 0.0  # first KV byte sent -> last byte landed (0 when colocated)
    exposed_transfer_s: float = 0.0  # prefill end -> last byte landed (0 when colocated)
    ttft_s: float = 0.0
    tpot_s: float | None = None  # mean seconds per token after the first; None (undefined) below two tokens
    e2e_s: float = 0.0  # arrival -> last token
    prompt_tokens: int = 0
    cached_prefix_tokens: int = 0  # prompt tokens not prefilled: their KV came from a prefix cache
    decode_cached_tokens: int = 0  # prompt tokens the decode node held already: their KV was not sent
    completion_tokens: int = 0
    migrations: int = 0  # times the live scheduler moved the stream to another node after its first token

    @property
    def colocated(self) -> bool:
        """One node prefilled and decoded (no KV crossed the network). An
        unknown placement (both nodes "") is not colocated."""
        return bool(self.decode_node) and self.prefill_node == self.decode_node

    def to_json(self) -> dict:
        """Every field (floats rounded to the microsecond, None as null), ``colocated``, and
        ``cached_tokens``: ``cached_prefix_tokens`` under the name OpenAI's usage uses."""
        out = {k: (round(v, 6) if isinstance(v, float) else v) for k, v in self.__dict__.items()}
        out["colocated"] = self.colocated
        out["cached_tokens"] = self.cached_prefix_tokens
        return out


def mean_tpot_s(first_token_s: float, last_token_s: float, num_tokens: int) -> float | None:
    """Mean seconds per output token after the first; None with fewer than two tokens."""
    return (last_token_s - first_token_s) / (num_tokens - 1) if num_tokens > 1 else None


@dataclass(frozen=True)
class TokenEvent:
    """One generated token; with its logprob and the most likely alternatives
    (``(token_id, logprob)``, most likely first) when the request asked for logprobs."""

    token_id: int
    logprob: float | None = None
    top_logprobs: tuple[tuple[int, float], ...] = ()


@dataclass(frozen=True)
class FinishEvent:
    finish_reason: str  # "stop" | "length"
    stats: RequestStats


@dataclass(frozen=True)
class ModelEntry:
    model_id: str
    context_length: int
    eos_token_ids: tuple[int, ...] = ()
    created: int = 0
    nodes: tuple[str, ...] = field(default_factory=tuple)


class StopStringReached(Exception):
    """Thrown into a backend's event iterator when the client's stop string ended the text: the
    request finished ("stop"), so it is counted as finished, not as an abort (its workers are
    cancelled as on any close)."""


async def end_at_stop_string(events: Any, reached: StopStringReached | None = None) -> None:
    """End a backend's event iterator as finished by a stop string (its metrics and record say "stop")."""
    try:
        await events.athrow(reached or StopStringReached())
    except (StopStringReached, StopAsyncIteration):
        pass


class SchedulerError(Exception):
    """A request the scheduler could not serve, with the HTTP answer it maps to.

    Deliberately not a ``RuntimeError``: the HTTP layer tells a failed request
    from a client that went away by type, never by guessing. ``message`` is
    plain words naming the node and the cause (never raw gRPC text); ``node``
    is the node at fault ("" when none is), ``grpc_code`` the worker's status
    name when a worker RPC failed ("UNAVAILABLE", ...)."""

    status = 502
    code = "worker_failed"
    retry_after_s: float | None = None

    def __init__(self, message: str, *, node: str = "", grpc_code: str = "") -> None:
        super().__init__(message)
        self.message, self.node, self.grpc_code = message, node, grpc_code


class NoCapacityError(SchedulerError):
    """No node can serve this request now (HTTP 503 ``no_capacity``)."""

    status = 503
    code = "no_capacity"


class CapacityExhaustedError(SchedulerError):
    """The chosen node is full (all leases in use, or its KV budget): HTTP 429
    ``capacity_exhausted`` with ``Retry-After``."""

    status = 429
    code = "capacity_exhausted"
    retry_after_s = 1.0


class RequestFailedError(SchedulerError):
    """A worker failed this request (HTTP 502 ``worker_failed`` before streaming, an error event after)."""


class WorkerTimeoutError(RequestFailedError):
    """A worker did not answer within its deadline (HTTP 504 ``worker_timeout``)."""

    status = 504
    code = "worker_timeout"


class Backend(Protocol):
    """What the HTTP API needs from the rest of the scheduler."""

    def models(self) -> list[ModelEntry]:
        """Models servable now (at least one prefill- and one decode-capable node)."""
        ...

    def codec_for(self, model: str) -> PromptCodec | None:
        """Tokenizer and chat template for ``model``; None if unknown."""
        ...

    def health(self) -> tuple[bool, dict]:
        """(ready, details): ready once a prefill- and a decode-capable node are known."""
        ...

    def generate(self, request: GenerationRequest) -> AsyncIterator[TokenEvent | FinishEvent]:
        """Run the request; yields tokens then one FinishEvent. Closing the
        iterator early cancels the request on every worker it touched."""
        ...
