"""``pdc check-handoff``: prove a cross-engine KV handoff is token-identical.

1. Prefill the prompt on the prefill engine, emitting each layer's K/V slice as
   that layer computes it.
2. Stream the slices through the wire codec over a real loopback TCP socket.
3. Load them into the decode engine and decode greedily.
4. Compare with the decode engine generating alone (its own prefill).

The same function backs the test suite's per-architecture, per-direction
token-identity tests.

With ``--quantized-decode`` (``check_quantized_handoff``) the decode engine
runs an mlx-lm 4- or 8-bit copy of the model while the prefill stays in full
precision, so the handoff is no longer bit-identical, and is measured instead.
The reference is the quantized model running the whole request alone; the
candidate is the full-precision prefill, its KV over TCP, the quantized model
decoding from it. Reported: greedy agreement (positions equal before the
first difference), teacher-forced top-1 agreement and the mean KL divergence
KL(reference || candidate) of the next-token distributions, both sides fed the
reference's tokens; and, for scale, the same two figures for the
full-precision model alone against the quantized one.
"""
from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from workers.engines.base import (
    Engine,
    KVLayout,
    KVSlice,
    PrefillResult,
    generate,
    join_layer,
)
from workers.engines.model_config import read_model_spec, resolve_model
from workers.engines.registry import (
    DEFAULT_DECODE_ENGINE,
    DEFAULT_PREFILL_ENGINE,
    check_engine,
    load_engine,
)
from workers.engines.sampling import SamplingParams, sample
from workers.kv.net import connect, serve_once
from workers.kv.transport import KVReceiver, KVSender, ReceivedKV
from workers.tools.quantize import (
    check_bits,
    check_same_model,
    declared_base,
    quantization_of,
    resolve_quantized,
)

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
    quantized_decode: str | None = None  # bits ("4", "8") or a quantized copy's folder: measure, not prove

    def __post_init__(self) -> None:
        for role in ("prefill_engine", "decode_engine"):
            check_engine(getattr(self, role), role)
        if self.prompt_tokens < 1 or self.max_tokens < 1 or self.chunk_size < 1:
            raise ValueError("prompt_tokens, max_tokens and chunk_size must all be >= 1")
        if self.quantized_decode is not None and self.quantized_decode.isdigit():
            check_bits(int(self.quantized_decode))


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
    kv, result, transfer_s = ship_kv(prefill, token_ids, params, chunk_size)
    decode.load_kv(rid, kv.layout, kv.slices)
    tokens = [kv.first_token, *generate(decode, rid, kv.first_token, params)]
    decode.release(rid)
    return tokens, kv, result.compute_s, transfer_s


def ship_kv(prefill: Engine, token_ids: list[int], params: SamplingParams, chunk_size: int,
            keep: list[KVSlice] | None = None) -> tuple[ReceivedKV, PrefillResult, float]:
    """Prefill on ``prefill``, each slice through ``KVSender`` over a real
    loopback TCP connection, the first token sampled from its logits. Returns
    what the receiver got, the prefill's result and the transfer seconds.
    ``keep``: also append every slice as the engine emitted it (before the
    sender cuts sliding layers to their windows)."""
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
        sink = sender.send_slice if keep is None else (lambda s: (keep.append(s), sender.send_slice(s)))
        result = prefill.prefill(rid, token_ids, sink, chunk_size=chunk_size)
        first = sample(result.logits, params, 0)
        sender.end(first)
    kv = server.result(TRANSFER_TIMEOUT_S)
    prefill.release(rid)
    return kv, result, kv.last_byte_at - sent_at


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
    """Largest |K or V difference| between the shipped cache and the decode
    engine's own, token by token (a sliding layer ships only its window)."""
    worst = 0.0
    for s in kv.slices:
        parts = sorted((r for r in reference if r.layer == s.layer), key=lambda r: r.start)
        if not parts:
            return float("nan")
        for pick in ("keys", "values"):
            ref = np.concatenate([getattr(r, pick) for r in parts], axis=1)  # [kv_heads, tokens, head_dim]
            want = ref[:, s.start : s.start + s.num_tokens]
            if want.shape != getattr(s, pick).shape:
                return float("nan")
            diff = np.abs(_as_float(getattr(s, pick), s.dtype) - _as_float(want, parts[0].dtype))
            worst = max(worst, float(np.max(diff)))
    return worst


def _as_float(array: np.ndarray, dtype: str) -> np.ndarray:
    if dtype == "bfloat16":
        return (array.astype(np.uint32) << 16).view(np.float32)
    return array.astype(np.float32)


def run_check_handoff(config: HandoffConfig, as_json: bool = False) -> int:
    """CLI body: run, print a readable report (and JSON), return the exit code
    (a ``quantized_decode`` measurement exits 0 once measured: it has no verdict)."""
    if config.quantized_decode is not None:
        return run_quantized_handoff(config, as_json)
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


# ---------------------------------------------------------------- a quantized decode copy, measured


@dataclass(frozen=True)
class QuantizedHandoffResult:
    """A full-precision prefill handed to a quantized decode copy, measured
    against that copy running the whole request alone (the reference).

    ``greedy_agreement``: leading tokens equal in both greedy runs.
    ``top1_agreement``: the share of positions whose most likely next token
    agrees, both sides fed the reference's tokens (teacher forcing).
    ``mean_kl``/``max_kl``: KL(reference || candidate) of those next-token
    distributions, in nats. ``full_precision_*``: the same two figures for the
    full-precision model alone against the copy alone: the quantization's own
    cost, the scale to read the handoff's figures against."""

    tokens_compared: int
    greedy_agreement: int
    top1_agreement: float
    mean_kl: float
    max_kl: float
    full_precision_top1_agreement: float
    full_precision_mean_kl: float
    handoff_tokens: list[int]
    reference_tokens: list[int]
    kv_bytes: int
    prefill_s: float
    transfer_s: float
    prompt_tokens: int
    prefill_engine: str
    decode_engine: str
    model: str
    quantized_model: str
    quantization: dict
    base_model_id: str

    @property
    def greedy_agreement_rate(self) -> float:
        """``greedy_agreement`` as a share of the tokens compared."""
        return self.greedy_agreement / self.tokens_compared if self.tokens_compared else 1.0


def check_quantized_handoff(config: HandoffConfig) -> QuantizedHandoffResult:
    """Measure ``config.prefill_engine`` in full precision on ``config.model``
    handing its KV to ``config.decode_engine`` on the quantized copy
    ``config.quantized_decode`` (bits: mlx-lm's copy, made once into the cache;
    or a folder), against that copy running the request alone."""
    model_dir = resolve_model(config.model)
    quant_dir = resolve_quantized(model_dir, config.quantized_decode or "")
    check_same_model(read_model_spec(model_dir), read_model_spec(quant_dir), str(quant_dir))
    prefill = load_engine(config.prefill_engine, model_dir, config.dtype, config.device)
    decode = load_engine(config.decode_engine, quant_dir, config.dtype, config.device)
    token_ids = prompt_token_ids(model_dir, config.prompt_tokens)
    params = SamplingParams(max_tokens=config.max_tokens, temperature=0.0)
    reference, reference_logits, reference_kv = _alone_with_logits(decode, token_ids, params, config.chunk_size)
    emitted: list[KVSlice] = []
    kv, prefill_result, transfer_s = ship_kv(prefill, token_ids, params, config.chunk_size, keep=emitted)
    decode.load_kv("handoff", kv.layout, kv.slices)  # as the cluster does: sliding layers hold their window
    tokens = [kv.first_token, *generate(decode, "handoff", kv.first_token, params)]
    decode.release("handoff")
    # Teacher forcing loads the prompt as a prefix, which covers every token of every layer: the
    # prefill's slices as it emitted them. A sliding layer's tokens before its window are ones the
    # shipped KV left out; the model's own window mask hides them from every later position, so
    # the candidate still sees exactly the shipped KV (the handoff above is the cluster's path).
    shipped = _prompt_kv(emitted, kv.layout.num_layers, kv.layout.num_tokens)
    forced = {  # [tokens, vocab] next-token logits, every side fed the reference's tokens
        "reference": forced_logits(decode, token_ids, reference_kv, reference_logits, reference),
        "candidate": forced_logits(decode, token_ids, shipped, prefill_result.logits, reference),
        "full_precision": forced_logits(prefill, token_ids, shipped, prefill_result.logits, reference),
    }
    kl = kl_divergence(forced["reference"], forced["candidate"])
    return QuantizedHandoffResult(
        tokens_compared=len(reference),
        greedy_agreement=leading_agreement(tokens, reference),
        top1_agreement=top1_agreement(forced["reference"], forced["candidate"]),
        mean_kl=float(kl.mean()),
        max_kl=float(kl.max()),
        full_precision_top1_agreement=top1_agreement(forced["reference"], forced["full_precision"]),
        full_precision_mean_kl=float(kl_divergence(forced["reference"], forced["full_precision"]).mean()),
        handoff_tokens=tokens,
        reference_tokens=reference,
        kv_bytes=kv.bytes_received,
        prefill_s=prefill_result.compute_s,
        transfer_s=transfer_s,
        prompt_tokens=len(token_ids),
        prefill_engine=config.prefill_engine,
        decode_engine=config.decode_engine,
        model=str(model_dir),
        quantized_model=str(quant_dir),
        quantization=quantization_of(quant_dir) or {},
        base_model_id=str((declared_base(quant_dir) or {}).get("base_model_id", "")),
    )


def forced_logits(engine: Engine, token_ids: list[int], prompt_kv: list[KVSlice], first_logits: np.ndarray,
                  forced: list[int]) -> np.ndarray:
    """Next-token logits ``[len(forced), vocab]`` float32 with ``engine`` fed
    ``forced`` (teacher forcing) over a cache that starts as ``prompt_kv``
    (one slice per layer, the whole prompt): row 0 is ``first_logits`` (the
    prompt's last position, whichever engine computed it), row ``i`` the
    logits after ``forced[:i]``. Each step is a one-token prefill over the
    cache so far, loaded as a prefix (the ``Engine`` protocol only); the new
    token's K/V, as the step emits it, extends that prefix for the next step,
    every layer whole (a sliding layer's window is the model's mask to apply)."""
    rid, rows = "forced", [np.asarray(first_logits, dtype=np.float32)]
    keys = [s.keys for s in prompt_kv]  # [kv_heads, tokens, head_dim] per layer
    values = [s.values for s in prompt_kv]
    dtype = prompt_kv[0].dtype
    try:
        for i in range(1, len(forced)):
            sequence = [*token_ids, *forced[:i]]
            prefix = [KVSlice(layer, 0, keys[layer], values[layer], dtype) for layer in range(len(prompt_kv))]
            new: list[KVSlice] = []
            result = engine.prefill(rid, sequence, new.append, prefix=prefix, emit_from=len(sequence) - 1)
            engine.release(rid)
            rows.append(result.logits)
            for s in new:  # the one new token, per layer, in the wire dtype
                if s.dtype != dtype:  # bf16 travels as uint16 bit patterns: never convert by value
                    raise ValueError(f"teacher forcing needs one wire dtype: the prompt's KV is {dtype}, "
                                     f"{type(engine).__name__} emits {s.dtype}")
                keys[s.layer] = np.concatenate([keys[s.layer], s.keys], axis=1)
                values[s.layer] = np.concatenate([values[s.layer], s.values], axis=1)
    finally:
        engine.release(rid)
    return np.stack(rows)  # [len(forced), vocab]


def kl_divergence(reference: np.ndarray, candidate: np.ndarray) -> np.ndarray:
    """KL(softmax(reference) || softmax(candidate)) per row of ``[rows, vocab]``
    logits, in nats, computed in float64 (>= 0)."""
    log_p, log_q = _log_softmax(reference), _log_softmax(candidate)
    return np.maximum(0.0, (np.exp(log_p) * (log_p - log_q)).sum(axis=-1))  # [rows]


def top1_agreement(reference: np.ndarray, candidate: np.ndarray) -> float:
    """The share of rows whose argmax agrees."""
    return float(np.mean(np.argmax(reference, axis=-1) == np.argmax(candidate, axis=-1)))


def leading_agreement(tokens: list[int], reference: list[int]) -> int:
    """How many leading tokens the two sequences share."""
    return next((i for i, (a, b) in enumerate(zip(tokens, reference)) if a != b), min(len(tokens), len(reference)))


def _log_softmax(logits: np.ndarray) -> np.ndarray:
    x = logits.astype(np.float64)  # [rows, vocab]
    x = x - x.max(axis=-1, keepdims=True)
    return x - np.log(np.exp(x).sum(axis=-1, keepdims=True))


def _alone_with_logits(engine: Engine, token_ids: list[int], params: SamplingParams, chunk_size: int
                       ) -> tuple[list[int], np.ndarray, list[KVSlice]]:
    """``generate_alone`` that also keeps the prompt's last logits and its KV, one slice per layer."""
    slices: list[KVSlice] = []
    result = engine.prefill("reference", token_ids, slices.append, chunk_size=chunk_size)
    first = sample(result.logits, params, 0)
    tokens = [first, *generate(engine, "reference", first, params)]
    engine.release("reference")
    return tokens, result.logits, _prompt_kv(slices, engine.kv_layout(len(token_ids)).num_layers, len(token_ids))


def _prompt_kv(slices: list[KVSlice], num_layers: int, num_tokens: int) -> list[KVSlice]:
    """Chunked slices joined into one slice per layer, tokens ``[0, num_tokens)``."""
    dtype, (kv_heads, _, head_dim) = slices[0].dtype, slices[0].keys.shape  # [kv_heads, tokens, head_dim]
    layout = KVLayout(num_layers, kv_heads, head_dim, dtype, num_tokens)
    return [KVSlice(layer, 0, *join_layer(slices, layer, layout), dtype) for layer in range(num_layers)]


def run_quantized_handoff(config: HandoffConfig, as_json: bool = False) -> int:
    """CLI body of ``--quantized-decode``: measure, print the report (and JSON); 0 once measured."""
    print(f"check-handoff: {config.prefill_engine} prefill (full precision) -> {config.decode_engine} decode "
          f"of a quantized copy ({config.quantized_decode}) on {config.model}")
    result = check_quantized_handoff(config)
    print(format_quantized_report(result))
    if as_json:
        print(json.dumps({**asdict(result), "greedy_agreement_rate": result.greedy_agreement_rate}))
    return 0


def format_quantized_report(r: QuantizedHandoffResult) -> str:
    """A short human-readable report of a quantized-decode measurement."""
    q = r.quantization
    return "\n".join([
        (f"  quantized copy    {r.quantized_model} ({q.get('bits', '?')}-bit, group {q.get('group_size', '?')}; "
        f"base model id {r.base_model_id or '(none declared)'})"),
        f"  prompt            {r.prompt_tokens} tokens",
        f"  prefill           {r.prefill_engine}, full precision, {r.prefill_s:.3f} s",
        f"  KV over TCP       {_human_bytes(r.kv_bytes)} in {r.transfer_s:.3f} s (127.0.0.1)",
        f"  decode            {r.decode_engine}, quantized, greedy, {r.tokens_compared} tokens",
        (f"  greedy agreement  {r.greedy_agreement}/{r.tokens_compared} tokens equal before the first difference "
        f"({r.greedy_agreement_rate:.3f})"),
        f"  top-1 agreement   {r.top1_agreement:.3f} of positions, teacher-forced on the reference's tokens",
        (f"  mean KL           {r.mean_kl:.3g} nats (max {r.max_kl:.3g}) of the next-token distributions, "
        f"reference || handoff"),
        (f"  for scale         full precision alone vs the quantized copy alone: top-1 "
        f"{r.full_precision_top1_agreement:.3f}, mean KL {r.full_precision_mean_kl:.3g} nats"),
        f"  reference         the quantized copy alone {r.reference_tokens[:12]}",
        f"  handoff           {r.prefill_engine} -> {r.decode_engine}  {r.handoff_tokens[:12]}",
    ])
