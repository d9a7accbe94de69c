"""Measure the compressed KV codecs (``workers/kv/kvcodecs.py``): size, speed, accuracy.

1. Speed and size on random normal data, one ``[8, 2048, 128]`` slice of keys
   and values per wire dtype: bytes against raw, encode and decode ms per GB
   of raw KV (best of ``--repeats``, one process, this machine), and the
   relative RMS error.
2. Accuracy on models: a torch prefill (float32) of a natural-text prompt,
   every emitted slice round-tripped through each codec's wire bytes, loaded
   into the MLX engine and decoded greedily for ``--steps`` tokens. Against
   the raw handoff it reports the free-running greedy tokens that match, the
   teacher-forced top-1 agreement (and, where it differs, how close raw's own
   top two were: a log-prob gap), the mean / max KL(raw || codec) of the
   next-token distributions along the raw handoff's tokens (each computed by
   an MLX prefill over the generated tokens with the handed-off prompt KV as
   its prefix), and the relative RMS error of K and V.

   With ``--prompts P`` it does this for P prompts (the same text, each
   starting ``61 * p`` tokens further in) and pools every position: greedy
   matches are summed, top-1 agreement and KL are over all P x steps
   teacher-forced positions. A model is ``tiny``, ``small``, ``smollm2``,
   ``ARCH:PRESET`` (``pdc make-model --arch ARCH --preset PRESET``, e.g.
   ``gemma3:tiny``) or a model folder.

    .venv/bin/python examples/kv_codec_accuracy.py [--models tiny,small,smollm2] \\
        [--prompt-tokens 300] [--steps 32] [--prompts 1] [--dtype float32] [--json]
"""
from __future__ import annotations

import argparse
import concurrent.futures
import json
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from workers.engines.base import Engine, KVLayout, KVSlice, generate, join_layer, join_window
from workers.engines.registry import load_engine
from workers.engines.sampling import SamplingParams, sample
from workers.kv.kvcodecs import (
    CODECS,
    EncodedSlice,
    decode,
    encode,
    encode_slice,
    to_float32,
)
from workers.tools.handoff import prompt_token_ids

BENCH_SHAPE = (8, 2048, 128)  # [kv_heads, tokens, head_dim]: 8 MiB of fp32 keys


@dataclass(frozen=True)
class SpeedRow:
    dtype: str
    codec: str
    wire_ratio: float  # encoded bytes / raw bytes
    encode_ms_per_gb: float  # per GB of raw KV
    decode_ms_per_gb: float
    rel_rms_error: float


@dataclass(frozen=True)
class AccuracyRow:
    model: str
    codec: str
    greedy_match: int  # free-running tokens equal to the raw handoff's, position by position (all prompts)
    first_divergence: int | None  # the earliest over the prompts
    top1_agreement: float  # teacher-forced, along the raw tokens
    raw_margin_where_top1_differs: float | None  # raw log-prob gap between the two tokens, at worst
    mean_kl: float
    max_kl: float
    key_rel_rms: float
    value_rel_rms: float
    wire_ratio: float
    prompts: int = 1
    positions: int = 0  # teacher-forced positions pooled


def as_wire(x32: np.ndarray, dtype: str) -> np.ndarray:
    if dtype == "bfloat16":
        bits = x32.view(np.uint32)
        return ((bits + ((bits >> 16) & 1) + np.uint32(0x7FFF)) >> 16).astype(np.uint16)
    return x32.astype(dtype)


def rel_rms(got: np.ndarray, want: np.ndarray, dtype: str) -> float:
    a, b = to_float32(got, dtype).astype(np.float64), to_float32(want, dtype).astype(np.float64)
    return float(np.sqrt(np.mean((a - b) ** 2) / max(np.mean(b**2), 1e-300)))


def best_of(repeats: int, run: object) -> float:
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        run()  # type: ignore[operator]
        times.append(time.perf_counter() - started)
    return min(times)


def bench_speed(repeats: int) -> list[SpeedRow]:
    rng = np.random.default_rng(0)
    rows = []
    for dtype in ("float32", "float16", "bfloat16"):
        keys = as_wire(rng.standard_normal(BENCH_SHAPE, dtype=np.float32), dtype)
        values = as_wire(rng.standard_normal(BENCH_SHAPE, dtype=np.float32), dtype)
        raw_gb = (keys.nbytes + values.nbytes) / 1e9
        for codec in CODECS:
            encoded = encode(codec, keys, values, dtype)
            enc_s = best_of(repeats, lambda c=codec, k=keys, v=values, d=dtype: encode(c, k, v, d))
            dec_s = best_of(repeats, lambda e=encoded: decode(e))
            got_keys, _ = decode(encoded)
            rows.append(SpeedRow(dtype, codec, encoded.nbytes / (raw_gb * 1e9), 1e3 * enc_s / raw_gb,
                                 1e3 * dec_s / raw_gb, rel_rms(got_keys, keys, dtype)))
    return rows


def round_trip(codec: str, kv_slice: KVSlice) -> tuple[KVSlice, int]:
    """The slice as the receiver would see it after ``codec``'s wire bytes, and their size."""
    encoded = encode_slice(codec, kv_slice)
    payload = b"".join(bytes(b) for b in encoded.buffers())
    keys, values = decode(EncodedSlice.from_buffer(codec, kv_slice.dtype, encoded.shape, payload))
    return KVSlice(kv_slice.layer, kv_slice.start, keys, values, kv_slice.dtype), len(payload)


def next_token_logprobs(engine: Engine, prompt: list[int], prefix: list[KVSlice], generated: list[int]) -> np.ndarray:
    """Log-probabilities ``[len(generated) - 1, vocab]`` of each generated token
    after the first, given ``prefix`` as the prompt's KV and the tokens before it."""
    rows = []
    for i in range(1, len(generated)):
        result = engine.prefill("kl", prompt + generated[:i], lambda _s: None, prefix=prefix)
        logits = result.logits.astype(np.float64)
        rows.append(logits - np.logaddexp.reduce(logits))
        engine.release("kl")
    return np.stack(rows)


def accuracy(name: str, model_dir: Path, prompt_tokens: int, steps: int, dtype: str,
             prompts: int = 1) -> list[AccuracyRow]:
    prefill = load_engine("torch", model_dir, dtype)
    decoder = load_engine("mlx", model_dir, dtype)
    pooled: dict[str, list[dict]] = {codec: [] for codec in CODECS}
    for p in range(prompts):
        prompt = prompt_token_ids(model_dir, prompt_tokens + 61 * p)[61 * p:]
        for codec, figures in one_prompt(prefill, decoder, prompt, steps).items():
            pooled[codec].append(figures)
    prefill.close()
    decoder.close()
    rows = []
    for codec, runs in pooled.items():
        top1 = np.concatenate([r["top1"] for r in runs])
        kl = np.concatenate([r["kl"] for r in runs])
        gaps = np.concatenate([r["gaps"] for r in runs])
        divergences = [r["first_divergence"] for r in runs if r["first_divergence"] is not None]
        rows.append(AccuracyRow(
            model=name, codec=codec, greedy_match=sum(r["greedy_match"] for r in runs),
            first_divergence=min(divergences) if divergences else None,
            top1_agreement=float(np.mean(top1)),
            raw_margin_where_top1_differs=float(gaps.max()) if gaps.size else None,
            mean_kl=float(np.mean(kl)), max_kl=float(np.max(kl)),
            key_rel_rms=float(np.mean([r["key_rel_rms"] for r in runs])),
            value_rel_rms=float(np.mean([r["value_rel_rms"] for r in runs])),
            wire_ratio=float(np.mean([r["wire_ratio"] for r in runs])), prompts=prompts, positions=int(top1.size),
        ))
    return rows


def one_prompt(prefill: Engine, decoder: Engine, prompt: list[int], steps: int) -> dict[str, dict]:
    """Each codec's figures for one prompt, against the raw handoff."""
    slices: list[KVSlice] = []
    result = prefill.prefill("prompt", prompt, slices.append)
    prefill.release("prompt")
    first = sample(result.logits, SamplingParams(temperature=0.0), 0)
    params = SamplingParams(max_tokens=steps + 1, temperature=0.0)
    layout: KVLayout = prefill.kv_layout(len(prompt))
    emitted = slices  # every token of every layer, as the engine produced them
    slices = [c for c in (layout.clip(s) for s in slices) if c is not None]  # what travels
    raw_bytes = sum(s.nbytes for s in slices)
    figures, reference, reference_lp = {}, None, None
    for codec in CODECS:
        shipped = [round_trip(codec, s) for s in slices]
        received = [s for s, _ in shipped]
        decoder.load_kv(codec, layout, received)
        tokens = [first, *generate(decoder, codec, first, params)]
        decoder.release(codec)
        prefix = whole_prefix(emitted, received, layout)
        if reference is None:  # raw comes first: the reference
            reference = tokens
            reference_lp = next_token_logprobs(decoder, prompt, prefix, reference)
            # the method's own check: teacher-forced on its own greedy tokens, raw gives them back
            if [int(t) for t in np.argmax(reference_lp, -1)] != reference[1:]:
                raise RuntimeError("teacher forcing over the received KV does not reproduce the raw handoff's "
                                   "own greedy tokens: the measurement is broken for this model")
        lp = next_token_logprobs(decoder, prompt, prefix, reference)
        kl = np.sum(np.exp(reference_lp) * (reference_lp - lp), axis=-1)
        matches = [a == b for a, b in zip(tokens, reference, strict=False)]
        top1, raw_top1 = np.argmax(lp, -1), np.argmax(reference_lp, -1)
        rows_ = np.arange(len(top1))
        figures[codec] = {
            "greedy_match": sum(matches[1:]),
            "first_divergence": next((i for i, m in enumerate(matches) if not m), None),
            "top1": top1 == raw_top1, "kl": kl,
            "gaps": (reference_lp[rows_, raw_top1] - reference_lp[rows_, top1])[top1 != raw_top1],
            "key_rel_rms": _mean_rel_rms(received, slices, "keys"),
            "value_rel_rms": _mean_rel_rms(received, slices, "values"),
            "wire_ratio": sum(n for _, n in shipped) / raw_bytes,
        }
    return figures


def whole_prefix(emitted: list[KVSlice], received: list[KVSlice], layout: KVLayout) -> list[KVSlice]:
    """The prompt's KV as a prefill prefix: one slice per layer covering every token, as a prefix
    must. A full-attention layer is what was received. A sliding layer received only its window:
    the tokens before it come from the prefill as emitted, and the model's own window mask hides
    them from every later position, so the decoder still attends to exactly what was received."""
    whole = KVLayout(layout.num_layers, layout.kv_heads, layout.head_dim, layout.dtype, layout.num_tokens)
    prefix = []
    for layer in range(layout.num_layers):
        keys, values = (np.array(a) for a in join_layer(emitted, layer, whole))
        start, got_keys, got_values = join_window(received, layer, layout)
        keys[:, start:], values[:, start:] = got_keys, got_values
        prefix.append(KVSlice(layer, 0, keys, values, layout.dtype))
    return prefix


def _mean_rel_rms(got: list[KVSlice], want: list[KVSlice], part: str) -> float:
    pairs = zip(got, want, strict=True)
    return float(np.mean([rel_rms(getattr(g, part), getattr(w, part), w.dtype) for g, w in pairs]))


def model_folder(name: str, tmp: Path) -> Path:
    if name in ("tiny", "small") or ":" in name:
        from workers.tools.modelgen import make_model

        arch, _, preset = name.rpartition(":")
        return make_model(tmp / name.replace(":", "-"), arch or "llama", seed=0, preset=preset)
    from workers.tools.builtin import resolve_model

    return Path(resolve_model({"smollm2": "smollm2-135m-instruct"}.get(name, name)))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="tiny,small,smollm2", help="tiny, small, smollm2 or a model folder")
    parser.add_argument("--prompt-tokens", type=int, default=300)
    parser.add_argument("--steps", type=int, default=32)
    parser.add_argument("--prompts", type=int, default=1, help="prompts per model, pooled (default: 1)")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--json", action="store_true", help="end with one JSON line of every row")
    args = parser.parse_args()

    speed = bench_speed(args.repeats)
    print(f"{'dtype':<9} {'codec':<5} {'bytes vs raw':>12} {'encode ms/GB':>13} {'decode ms/GB':>13} "
          f"{'rel RMS err':>11}")
    for r in speed:
        print(f"{r.dtype:<9} {r.codec:<5} {r.wire_ratio:>12.4f} {r.encode_ms_per_gb:>13.0f} "
              f"{r.decode_ms_per_gb:>13.0f} {r.rel_rms_error:>11.2e}")

    rows: list[AccuracyRow] = []
    print(f"\n{'model':<8} {'codec':<5} {'greedy =raw':>11} {'1st diff':>8} {'top-1 TF':>8} {'mean KL':>9} "
          f"{'max KL':>9} {'K rel RMS':>9} {'V rel RMS':>9} {'bytes':>6} {'raw margin':>10}")
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.models.split(","):
            folder = model_folder(name, Path(tmp))
            # each model's engines live and close on a thread of their own (close frees that thread's MLX state)
            with concurrent.futures.ThreadPoolExecutor(1) as thread:
                model_rows = thread.submit(accuracy, name, folder, args.prompt_tokens, args.steps, args.dtype,
                                           args.prompts).result()
            for r in model_rows:
                rows.append(r)
                margin = r.raw_margin_where_top1_differs
                print(f"{r.model:<8} {r.codec:<5} {f'{r.greedy_match}/{args.steps * args.prompts}':>11} "
                      f"{r.first_divergence!s:>8} {r.top1_agreement:>8.3f} {r.mean_kl:>9.2e} {r.max_kl:>9.2e} "
                      f"{r.key_rel_rms:>9.2e} {r.value_rel_rms:>9.2e} {r.wire_ratio:>6.3f} "
                      f"{'-' if margin is None else f'{margin:.1e}':>10}")
    if args.json:
        print(json.dumps({"speed": [asdict(r) for r in speed], "accuracy": [asdict(r) for r in rows]}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
