"""``pdc check-handoff``: prove a cross-engine KV handoff is token-identical.

1. Prefill the prompt on the prefill engine, emitting each layer's K/V slice as
   that layer computes it.
2. Stream the slices through the wire codec over a real loopback TCP socket.
3. Load them into the decode engine and decode greedily.
4. Compare with the decode engine generating alone (its own prefill).

The same function backs the test suite's per-architecture, per-direction
token-identity tests.
"""
from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from workers.engines.base import Engine, KVSlice, generate
from workers.kv.net import connect, serve_once
from workers.kv.transport import KVReceiver, KVSender, ReceivedKV
from workers.engines.model_config import read_model_spec, resolve_model
from workers.engines.registry import DEFAULT_DECODE_ENGINE, DEFAULT_PREFILL_ENGINE, check_engine, load_engine
from workers.engines.sampling import SamplingParams, sample

TRANSFER_TIMEOUT_S = 120.0

_PROMPT_TEXT = (
    "The prefill node reads the whole prompt at once and is limited by arithmetic, "
    "while the decode node writes one token at a time and is limited by memory bandwidth. "
    "Splitting the two lets each machine do the work it is best at: a box full of tensor "
    "cores chews through long prompts, and a machine with wide unified memory streams the "
    "weights for every new token. def fib(n):\n    return n if n < 2 else fib(n - 1) + fib(n - 2)\n"
)


@dataclass(frozen=True)
class HandoffConfig:
    """One check-handoff run."""

    model: str
    prefill_engine: str = DEFAULT_PREFILL_ENGINE
    decode_engine: str = DEFAULT_DECODE_ENGINE
    prompt_tokens: int = 300
    max_tokens: int = 24
    chunk_size: int = 128
    dtype: str = "float32"
    device: str | None = None

    def __post_init__(self) -> None:
        for role in ("prefill_engine", "decode_engine"):
            check_engine(getattr(self, role), role)
        if self.prompt_tokens < 1 or self.max_tokens < 1 or self.chunk_size < 1:
            raise ValueError("prompt_tokens, max_tokens and chunk_size must all be >= 1")


@dataclass(frozen=True)
class HandoffResult:
    """What a check found; ``identical`` is the verdict."""

    identical: bool
    tokens_compared: int
    kv_bytes: int
    first_mismatch: int | None
    handoff_tokens: list[int]
    reference_tokens: list[int]
    kv_max_abs_diff: float
    num_slices: int
    prefill_s: float
    transfer_s: float
    prompt_tokens: int
    prefill_engine: str
    decode_engine: str
    model: str


def prompt_token_ids(model_dir: Path, num_tokens: int) -> list[int]:
    """A deterministic natural-text prompt of exactly ``num_tokens`` tokens."""
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(model_dir / "tokenizer.json"))
    ids: list[int] = []
    while len(ids) < num_tokens:
        ids.extend(tokenizer.encode(_PROMPT_TEXT, add_special_tokens=False).ids)
    return ids[:num_tokens]


def generate_alone(engine: Engine, token_ids: list[int], params: SamplingParams, chunk_size: int) -> tuple[list[int], list[KVSlice]]:
    """The engine's own prefill and decode; returns tokens and its KV slices."""
    slices: list[KVSlice] = []
    result = engine.prefill("reference", token_ids, slices.append, chunk_size=chunk_size)
    first = sample(result.logits, params, 0)
    tokens = [first, *generate(engine, "reference", first, params)]
    engine.release("reference")
    return tokens, slices


def generate_handoff(
    prefill: Engine, decode: Engine, token_ids: list[int], params: SamplingParams, chunk_size: int
) -> tuple[list[int], ReceivedKV, float, float]:
    """Prefill on one engine, ship KV over loopback TCP, decode on the other.

    Returns tokens, what the receiver got, prefill seconds and transfer seconds
    (first byte sent to last byte received)."""
    rid = "handoff"
    layout = prefill.kv_layout(len(token_ids))
    receiver = KVReceiver()
    server = serve_once(
        lambda sock: receiver.receive(sock, expect_rid=rid, timeout=TRANSFER_TIMEOUT_S),
        accept_timeout=TRANSFER_TIMEOUT_S,
    )
    with connect(server.host, server.port, timeout=TRANSFER_TIMEOUT_S) as sock, KVSender(sock) as sender:
        sent_at = time.monotonic()
        sender.begin(rid, layout)
        result = prefill.prefill(rid, token_ids, sender.send_slice, chunk_size=chunk_size)
        first = sample(result.logits, params, 0)
        sender.end(first)
    kv = server.result(TRANSFER_TIMEOUT_S)
    prefill.release(rid)
    decode.load_kv(rid, kv.layout, kv.slices)
    tokens = [kv.first_token, *generate(decode, rid, kv.first_token, params)]
    decode.release(rid)
    return tokens, kv, result.compute_s, kv.last_byte_at - sent_at


def check_handoff(config: HandoffConfig) -> HandoffResult:
    """Run one handoff check and compare against the decode engine alone."""
    model_dir = resolve_model(config.model)
    read_model_spec(model_dir)  # refuse unsupported architectures before loading weights
    prefill = load_engine(config.prefill_engine, model_dir, config.dtype, config.device)
    decode = prefill if config.prefill_engine == config.decode_engine else load_engine(
        config.decode_engine, model_dir, config.dtype, config.device
    )
    token_ids = prompt_token_ids(model_dir, config.prompt_tokens)
    params = SamplingParams(max_tokens=config.max_tokens, temperature=0.0)
    reference, reference_slices = generate_alone(decode, token_ids, params, config.chunk_size)
    tokens, kv, prefill_s, transfer_s = generate_handoff(prefill, decode, token_ids, params, config.chunk_size)
    mismatch = next((i for i, (a, b) in enumerate(zip(tokens, reference)) if a != b), None)
    if mismatch is None and len(tokens) != len(reference):
        mismatch = min(len(tokens), len(reference))
    return HandoffResult(
        identical=mismatch is None,
        tokens_compared=max(len(tokens), len(reference)),
        kv_bytes=kv.bytes_received,
        first_mismatch=mismatch,
        handoff_tokens=tokens,
        reference_tokens=reference,
        kv_max_abs_diff=_kv_max_abs_diff(kv, reference_slices),
        num_slices=len(kv.slices),
        prefill_s=prefill_s,
        transfer_s=transfer_s,
        prompt_tokens=len(token_ids),
        prefill_engine=config.prefill_engine,
        decode_engine=config.decode_engine,
        model=str(model_dir),
    )


def _kv_max_abs_diff(kv: ReceivedKV, reference: list[KVSlice]) -> float:
    """Largest |K or V difference| between the shipped cache and the decode engine's own."""
    by_key = {(s.layer, s.start): s for s in reference}
    worst = 0.0
    for s in kv.slices:
        ref = by_key.get((s.layer, s.start))
        if ref is None or ref.keys.shape != s.keys.shape:
            return float("nan")
        for got, want in ((s.keys, ref.keys), (s.values, ref.values)):
            worst = max(worst, float(np.max(np.abs(_as_float(got, s.dtype) - _as_float(want, ref.dtype)))))
    return worst


def _as_float(array: np.ndarray, dtype: str) -> np.ndarray:
    if dtype == "bfloat16":
        return (array.astype(np.uint32) << 16).view(np.float32)
    return array.astype(np.float32)


def run_check_handoff(config: HandoffConfig, as_json: bool = False) -> int:
    """CLI body: run, print a readable report (and JSON), return the exit code."""
    print(f"check-handoff: {config.prefill_engine} prefill -> {config.decode_engine} decode on {config.model}")
    result = check_handoff(config)
    print(format_report(result))
    print(f"  generated text    {_detokenize(Path(result.model), result.handoff_tokens)!r}")
    if as_json:
        summary = asdict(result)
        print(json.dumps(summary))
    return 0 if result.identical else 1


def format_report(r: HandoffResult) -> str:
    """A short human-readable report of a check."""
    lines = [
        f"  prompt            {r.prompt_tokens} tokens",
        f"  prefill           {r.prefill_engine}, {r.prefill_s:.3f} s, {r.num_slices} layer slices",
        f"  KV over TCP       {_human_bytes(r.kv_bytes)} in {r.transfer_s:.3f} s (127.0.0.1)",
        f"  KV max |diff|     {r.kv_max_abs_diff:.2e} vs {r.decode_engine}'s own prefill",
        f"  decode            {r.decode_engine}, greedy, {r.tokens_compared} tokens",
    ]
    if r.identical:
        lines.append(f"  result            IDENTICAL: {r.tokens_compared}/{r.tokens_compared} tokens match "
                     f"{r.decode_engine} generating alone")
    else:
        i = r.first_mismatch or 0
        lines += [
            f"  result            MISMATCH at token {i}",
            f"    handoff         {r.handoff_tokens[max(0, i - 3): i + 5]}",
            f"    {r.decode_engine} alone{' ' * (10 - len(r.decode_engine))}{r.reference_tokens[max(0, i - 3): i + 5]}",
        ]
    return "\n".join(lines)


def _detokenize(model_dir: Path, token_ids: list[int]) -> str:
    from tokenizers import Tokenizer

    return Tokenizer.from_file(str(model_dir / "tokenizer.json")).decode(token_ids)


def _human_bytes(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{n} B"
        n /= 1024
    return f"{n} B"
