"""Structured output overhead: per-token decode time with and without a json_schema grammar.

One process, one model, each engine loaded once. Per engine and batch size,
rounds alternate three modes over the same prompts:

* ``json_schema``: every request carries an llguidance grammar compiled from
  a JSON schema (an object with strings, numbers, a boolean, an array and a
  nested object), drawn through the request's ``TokenSampler``: the mask
  after penalties and bias, the draw, the matcher consuming the token
  (``workers/engines/grammar.py``). A request ends at EOS once its document
  is complete, or at ``--max-tokens``.
* ``unconstrained``: the same prompts, each request generating exactly as
  many tokens as its constrained twin did in the same round (no stop token),
  so every mode pays the same joins and leaves of the batch; greedy takes
  each engine's fast path (the mlx engine's on-device argmax).
* ``row sampler``: the same as ``unconstrained``, but each request drawn
  through its own numpy ``TokenSampler`` as a constrained one is, without a
  grammar (a ``logit_bias`` of 0 on token 0 sends it there and changes no
  token). It splits the overhead into leaving the fast path (row sampler -
  unconstrained) and the grammar itself (json_schema - row sampler).

The decode engine's ``step`` calls alone are timed (prefill and the first
token, drawn as a prefill node draws it, are not), and the batch is kept at
``--batch`` running requests: a finished request is replaced before the
next step. ms/token is step time over tokens stepped; the report gives each
mode's median over the rounds, the overhead per token (json_schema minus
unconstrained) in ms and as a ratio, and ``mask alone``: the matcher's own
mask + consume time per token, replayed over the round's constrained tokens.
docs/performance.md ("Structured output overhead") has the figures.

    .venv/bin/python examples/bench_structured.py [--model smollm2-135m-instruct] \\
        [--engines mlx,torch] [--batch 1,4] [--tokens 96] [--rounds 5] [--json]
"""
from __future__ import annotations

import argparse
import itertools
import json
import os
import statistics
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import llguidance
import numpy as np

from workers.engines.base import Engine, is_last
from workers.engines.model_config import read_model_spec
from workers.engines.registry import DECODE_PREFERENCE, available_engines, engine_names, load_engine
from workers.engines.sampling import SamplingParams, TokenSampler

SCHEMA = {
    "type": "object",
    "properties": {
        "title": {"type": "string"},
        "year": {"type": "integer"},
        "rating": {"type": "number"},
        "in_print": {"type": "boolean"},
        "tags": {"type": "array", "items": {"type": "string"}},
        "author": {"type": "object", "properties": {"name": {"type": "string"}, "born": {"type": "integer"}},
                   "required": ["name", "born"], "additionalProperties": False},
    },
    "required": ["title", "year", "rating", "in_print", "tags", "author"],
    "additionalProperties": False,
}
PROMPTS = [
    "Describe a famous novel as a JSON object:\n",
    "Here is a book record in JSON.\n",
    "A library catalogue entry, as JSON:\n",
    "Book: The Old Man and the Sea. JSON:\n",
]
MODES = ("unconstrained", "row_sampler", "json_schema")
NO_OP_BIAS = ((0, 0.0),)  # adds nothing, but takes a request off the mlx engine's shared on-device argmax
# the decode engines first (the mask matters most where tokens 1.. are drawn), then the rest
DEFAULT_ENGINES = (*DECODE_PREFERENCE, *(name for name in engine_names() if name not in DECODE_PREFERENCE))


@dataclass
class Round:
    """One timed round of one mode: tokens stepped and the seconds its steps took."""

    tokens: int = 0
    step_s: float = 0.0
    lengths: list[int] = field(default_factory=list)  # tokens per request, first included, in start order
    streams: list[list[int]] = field(default_factory=list)  # each request's tokens (json_schema rounds)

    @property
    def ms_per_token(self) -> float:
        return 1e3 * self.step_s / self.tokens


@dataclass
class Result:
    """Every round of one engine at one batch size."""

    engine: str
    batch: int
    rounds: dict[str, list[Round]] = field(default_factory=lambda: {mode: [] for mode in MODES})
    mask_ms: list[float] = field(default_factory=list)  # mask + consume per token, per round

    def median(self, mode: str) -> float:
        return statistics.median(r.ms_per_token for r in self.rounds[mode])

    @property
    def overhead_ms(self) -> float:
        return self.median("json_schema") - self.median("unconstrained")

    @property
    def ratio(self) -> float:
        return self.median("json_schema") / self.median("unconstrained")

    def summary(self) -> dict:
        return {"engine": self.engine, "batch": self.batch,
                "unconstrained_ms_per_token": round(self.median("unconstrained"), 4),
                "row_sampler_ms_per_token": round(self.median("row_sampler"), 4),
                "json_schema_ms_per_token": round(self.median("json_schema"), 4),
                "overhead_ms_per_token": round(self.overhead_ms, 4), "ratio": round(self.ratio, 4),
                "mask_alone_ms_per_token": round(statistics.median(self.mask_ms), 4),
                "tokens_per_round": [r.tokens for r in self.rounds["json_schema"]]}


def prompt_ids(engine: Engine) -> Iterator[list[int]]:
    """The prompts, tokenized with the model's own tokenizer, round and round."""
    llg = engine.grammar_tokenizer.llg
    return itertools.cycle([llg.tokenize_str(text) for text in PROMPTS])


def run_round(engine: Engine, batch: int, num_tokens: int, max_tokens: int, grammar: str,
              lengths: list[int] | None, bias: tuple[tuple[int, float], ...] = ()) -> Round:
    """Decode at least ``num_tokens`` tokens with ``batch`` requests running.
    ``lengths`` None: the json_schema mode; else an unconstrained mode with
    ``bias`` as its ``logit_bias``, request ``i`` generating ``lengths[i]``
    tokens (its constrained twin's)."""
    tokenizer = engine.grammar_tokenizer
    prompts, counter, out = prompt_ids(engine), itertools.count(), Round()
    live: dict[str, list[int]] = {}

    def start() -> bool:
        i = next(counter)
        if lengths is not None and i >= len(lengths):
            return False
        if lengths is None:
            params = tokenizer.constrain(SamplingParams(max_tokens=max_tokens, grammar=grammar))
        else:
            params = SamplingParams(max_tokens=lengths[i], logit_bias=bias)
        rid = f"bench-{i}"
        result = engine.prefill(rid, next(prompts), lambda _: None)
        first, _ = TokenSampler(params, -1, (), tokenizer).draw(result.logits)
        out.streams.append([first])
        if is_last(first, 0, params):
            engine.release(rid)
            return True
        engine.add(rid, first, params)
        live[rid] = out.streams[-1]
        return True

    while out.tokens < num_tokens or live:
        while len(engine.running()) < batch and (out.tokens < num_tokens or lengths is not None):
            if not start():
                break
        if not engine.running():
            break
        started = time.perf_counter()
        tokens = engine.step()
        out.step_s += time.perf_counter() - started
        out.tokens += len(tokens)
        for rid, token in tokens.items():
            live[rid].append(token)
        for rid in [rid for rid in live if rid not in engine.running()]:
            engine.release(rid)
            del live[rid]
    out.lengths = [len(s) for s in out.streams]
    return out


def mask_alone_ms(engine: Engine, grammar: str, streams: list[list[int]], vocab_size: int) -> float:
    """ms per token of the matcher's own work (mask + consume) over ``streams``' tokens,
    on a row of ``vocab_size`` logits."""
    tokenizer = engine.grammar_tokenizer
    scores = np.zeros(vocab_size, dtype=np.float32)
    seconds, count = 0.0, 0
    for stream in streams:
        matcher = tokenizer.matcher(grammar)
        started = time.perf_counter()
        for token in stream:
            matcher.mask(scores)
            matcher.consume(token)
        seconds += time.perf_counter() - started
        count += len(stream)
    return 1e3 * seconds / count


def bench_engine(engine: Engine, name: str, batch: int, args: argparse.Namespace, grammar: str) -> Result:
    result = Result(name, batch)
    run_round(engine, batch, min(16, args.tokens), args.max_tokens, grammar, None)  # warm-up, untimed
    for i in range(args.rounds):
        constrained = run_round(engine, batch, args.tokens, args.max_tokens, grammar, None)
        free = run_round(engine, batch, args.tokens, args.max_tokens, grammar, constrained.lengths)
        row = run_round(engine, batch, args.tokens, args.max_tokens, grammar, constrained.lengths, NO_OP_BIAS)
        if not free.tokens == row.tokens == constrained.tokens or free.streams != row.streams:
            raise RuntimeError(f"the modes stepped {free.tokens}, {row.tokens} and {constrained.tokens} tokens, "
                               f"or the no-op bias changed some")
        result.rounds["json_schema"].append(constrained)
        result.rounds["unconstrained"].append(free)
        result.rounds["row_sampler"].append(row)
        result.mask_ms.append(mask_alone_ms(engine, grammar, constrained.streams, args.vocab_size))
        print(ROUND.format(name, batch, f"{i + 1}/{args.rounds}", constrained.tokens, free.ms_per_token,
                           row.ms_per_token, constrained.ms_per_token, result.mask_ms[-1]), flush=True)
    return result


ROUND = "{:>6} {:>5} {:>6} {:>7} {:>14.3f} {:>12.3f} {:>12.3f} {:>11.4f}"
ROUND_HEAD = "{:>6} {:>5} {:>6} {:>7} {:>14} {:>12} {:>12} {:>11}".format(
    "engine", "batch", "round", "tokens", "unconstrained", "row sampler", "json_schema", "mask alone")
TABLE = "{:>6} {:>5} {:>14} {:>12} {:>12} {:>10} {:>7} {:>11}"


def format_table(results: list[Result]) -> str:
    lines = [TABLE.format("engine", "batch", "unconstrained", "row sampler", "json_schema", "overhead", "ratio",
                          "mask alone"),
             TABLE.format("", "", "ms/token", "ms/token", "ms/token", "ms/token", "", "ms/token")]
    for r in results:
        lines.append(TABLE.format(r.engine, r.batch, f"{r.median('unconstrained'):.3f}",
                                  f"{r.median('row_sampler'):.3f}", f"{r.median('json_schema'):.3f}",
                                  f"{r.overhead_ms:+.3f}", f"{r.ratio:.3f}", f"{statistics.median(r.mask_ms):.4f}"))
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Per-token decode time of each engine with and without a json_schema grammar "
                    "(llguidance), measured in one run: rounds alternate the modes over the same prompts, "
                    "the unconstrained requests generating as many tokens as their constrained twins. Prints "
                    "each round, then the medians, the overhead per token (ms and ratio) and the matcher's own "
                    "mask + consume time per token.")
    parser.add_argument("--model", default="smollm2-135m-instruct",
                        help="model folder or built-in name (pdc models; default: smollm2-135m-instruct, a real "
                             "49k-token vocabulary; tiny-llama / small-llama are random 1.1k-token ones)")
    parser.add_argument("--engines", default=",".join(DEFAULT_ENGINES),
                        help="comma-separated engines to measure, those that import here (default: %(default)s)")
    parser.add_argument("--batch", default="1,4", help="comma-separated running-batch sizes (default: 1,4)")
    parser.add_argument("--tokens", type=int, default=96, help="tokens stepped per round and mode (default: 96)")
    parser.add_argument("--max-tokens", type=int, default=160,
                        help="a constrained request's max_tokens, if its document has not ended (default: 160)")
    parser.add_argument("--rounds", type=int, default=5, help="timed rounds per mode (default: 5)")
    parser.add_argument("--dtype", default="float32", help="compute dtype (default: float32)")
    parser.add_argument("--json", action="store_true", help="print one JSON summary line at the end too")
    args = parser.parse_args(argv)
    args.engines = [e.strip() for e in args.engines.split(",") if e.strip()]
    args.batch = [int(b) for b in args.batch.split(",")]
    if args.tokens < 1 or args.rounds < 1 or args.max_tokens < 2 or min(args.batch) < 1:
        parser.error("--tokens, --rounds and --batch must be >= 1, --max-tokens >= 2")
    return args


def main(argv: list[str] | None = None) -> int:
    from workers.tools.builtin import resolve_model

    args = parse_args(argv)
    engines = available_engines(tuple(args.engines))
    if not engines:
        print(f"none of {args.engines} imports here; install the torch or mlx extra", file=sys.stderr)
        return 2
    model_dir = Path(resolve_model(args.model))
    args.vocab_size = read_model_spec(model_dir).vocab_size
    grammar = llguidance.LLMatcher.grammar_from_json_schema(SCHEMA, defaults={"whitespace_flexible": False})
    print(f"bench structured: {model_dir.name}, engines {', '.join(engines)}, batch {args.batch}, "
          f"{args.tokens} tokens per round and mode, {args.rounds} rounds, {args.dtype}, {os.cpu_count()} CPUs")
    print("  ms/token = decode-step time / tokens stepped (prefill and each request's first token excluded)")
    print(ROUND_HEAD)
    results = []
    for name in engines:
        engine = load_engine(name, model_dir, args.dtype)
        problem = engine.grammar_tokenizer.check(grammar)
        if problem:
            print(f"  {name}: the grammar does not compile against {model_dir.name}'s tokenizer: {problem}")
            return 1
        for batch in args.batch:
            results.append(bench_engine(engine, name, batch, args, grammar))
        del engine
    print()
    print(f"medians over {args.rounds} rounds ({model_dir.name}, {args.vocab_size} logits per token):")
    print(format_table(results))
    if args.json:
        print(json.dumps({"model": model_dir.name, "rounds": args.rounds, "tokens": args.tokens,
                          "results": [r.summary() for r in results]}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
