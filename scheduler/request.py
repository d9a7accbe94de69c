"""The scheduler's request types: plain dataclasses in, plain dataclasses out."""
from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Protocol

from scheduler.tokenizer import PromptCodec

PLACEMENT_MODES = ("disaggregated", "colocated")


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

    def __post_init__(self) -> None:
        if self.placement is not None and self.placement not in PLACEMENT_MODES:
            raise ValueError(f"placement must be one of {PLACEMENT_MODES}, got {self.placement!r}")
        if not self.prompt_token_ids:
            raise ValueError("the prompt is empty")


@dataclass(frozen=True)
class RequestStats:
    """What one request cost, reported as the ``pdcluster`` response object."""

    prefill_node: str
    decode_node: str
    codec: str = "raw"
    kv_bytes: int = 0
    queue_s: float = 0.0
    prefill_s: float = 0.0
    transfer_s: float = 0.0
    exposed_transfer_s: float = 0.0
    ttft_s: float = 0.0
    tpot_s: float = 0.0
    prompt_tokens: int = 0
    completion_tokens: int = 0

    def to_json(self) -> dict:
        return {k: (round(v, 6) if isinstance(v, float) else v) for k, v in self.__dict__.items()}


@dataclass(frozen=True)
class TokenEvent:
    token_id: int


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


class NoCapacityError(RuntimeError):
    """No node can serve this request now (HTTP 503)."""


class RequestFailedError(RuntimeError):
    """A worker failed this request (HTTP 502 before streaming, an error event after)."""


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
