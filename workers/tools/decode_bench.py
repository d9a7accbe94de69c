"""``pdc bench decode``: our decode loop against each engine library's own generate.

One checkpoint, loaded once per engine; on that same model object, two paths
generate the same number of greedy tokens from the same prompt:

* ``ours``: ``Engine.prefill`` of the prompt, the first token sampled from its
  logits as the prefill node does, then the request alone in the engine's
  decode batch (``Engine.add`` and ``step``, through ``base.generate``): the
  path every request takes on a decode node, with a batch of one.
* ``native``: the library's own greedy generation, ``Engine.native_generate``:
  mlx-lm's ``generate_step`` on the MLX engine, transformers'
  ``model.generate(do_sample=False)`` on the torch engine.

Both paths are timed the same way: a timestamp as each new token comes out,
and the decode rate is ``(new_tokens - 1) / (last token's time - first
token's time)``, so prefill is excluded and every interval is one decode
step. Rounds alternate ours, native, ours, ... after an untimed warm-up of
each, and the report gives medians, their ratio (ours / native), and whether
the two greedy sequences are identical. docs/performance.md has the figures.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from workers.engines.base import DTYPES, Engine, generate
from workers.engines.model_config import read_model_spec
from workers.engines.registry import (
    DECODE_PREFERENCE,
    available_engines,
    engine_names,
    engine_spec,
    load_engine,
)
from workers.engines.sampling import SamplingParams, sample
from workers.tools.bench import (
    CONTENDED_CPU_WAIT,
    bench_main,
    contention_warning,
    cpu_wait_us,
)
from workers.tools.handoff import prompt_token_ids

PATHS = ("ours", "native")
MODEL_ARCH = "llama"
MODEL_SEED = 0
TIMING = "(new_tokens - 1) / (time of the last new token - time of the first); prefill excluded"
BENCH_REQUEST = "bench-decode"

Report = Callable[[str], None]


def bench_engines() -> tuple[str, ...]:
    """Every engine, the preferred decode engines first (``DECODE_PREFERENCE``):
    what ``--engine both`` measures, in this order."""
    preferred = tuple(name for name in DECODE_PREFERENCE if name in engine_names())
    return (*preferred, *(name for name in engine_names() if name not in preferred))


@dataclass(frozen=True)
class DecodeBenchConfig:
    """One ``pdc bench decode`` run. ``model=None`` uses the ``preset``
    checkpoint in the cache, built on first use."""

    model: str | None = None
    preset: str = "small"
    engines: tuple[str, ...] = field(default_factory=bench_engines)
    prompt_tokens: int = 256
    new_tokens: int = 128
    rounds: int = 5
    warmup: int = 1
    dtype: str | None = None  # None: each engine's default for the checkpoint
    device: str | None = None  # torch device; None: the best available

    def __post_init__(self) -> None:
        from workers.tools.modelgen import PRESETS

        if self.preset not in PRESETS:
            raise ValueError(f"bench decode: unknown preset {self.preset!r}; expected one of {sorted(PRESETS)}")
        if not self.engines or any(e not in engine_names() for e in self.engines):
            raise ValueError(f"bench decode: engines must be some of {list(engine_names())}, got {list(self.engines)}")
        if self.prompt_tokens < 1:
            raise ValueError(f"bench decode: prompt tokens must be >= 1, got {self.prompt_tokens}")
        if self.new_tokens < 2:
            raise ValueError(f"bench decode: new tokens must be >= 2 (one decode step), got {self.new_tokens}")
        if self.rounds < 1:
            raise ValueError(f"bench decode: rounds must be >= 1, got {self.rounds}")
        if self.warmup < 0:
            raise ValueError(f"bench decode: warmup must be >= 0, got {self.warmup}")


@dataclass(frozen=True)
class RoundResult:
    """One timed generation: its tokens and the time each came out."""

    engine: str
    path: str  # "ours" or "native"
    token_ids: tuple[int, ...]
    stamps: tuple[float, ...]  # perf_counter seconds, one per token
    cpu_wait: float | None = None  # share of the round some task waited for a CPU (Linux PSI)

    @property
    def tokens_per_s(self) -> float:
        """Decode rate: steps between the first and the last new token."""
        return (len(self.stamps) - 1) / (self.stamps[-1] - self.stamps[0])

    @property
    def contended(self) -> bool:
        return self.cpu_wait is not None and self.cpu_wait > CONTENDED_CPU_WAIT


@dataclass(frozen=True)
class EngineResult:
    """Every timed round of one engine; ``ratio`` is median ours over median native."""

    engine: str
    native: str  # what the native path ran, with its version
    rounds: list[RoundResult] = field(default_factory=list)

    def rates(self, path: str) -> list[float]:
        return [r.tokens_per_s for r in self.rounds if r.path == path]

    def median_rate(self, path: str) -> float:
        return statistics.median(self.rates(path))

    @property
    def ratio(self) -> float:
        return self.median_rate("ours") / self.median_rate("native")

    @property
    def first_divergence(self) -> int | None:
        """The first token index where some round's two paths differ; None if none does."""
        ours = [r.token_ids for r in self.rounds if r.path == "ours"]
        native = [r.token_ids for r in self.rounds if r.path == "native"]
        found = [first_difference(a, b) for a, b in zip(ours, native)]
        found = [i for i in found if i is not None]
        return min(found) if found else None

    @property
    def tokens_identical(self) -> bool:
        return self.first_divergence is None

    def summary(self) -> dict[str, Any]:
        return {
            "ours_tps": round(self.median_rate("ours"), 3),
            "native_tps": round(self.median_rate("native"), 3),
            "ratio": round(self.ratio, 4),
            "native": self.native,
            "tokens_identical": self.tokens_identical,
            "first_divergence": self.first_divergence,
            "ours_rounds_tps": [round(t, 3) for t in self.rates("ours")],
            "native_rounds_tps": [round(t, 3) for t in self.rates("native")],
            "cpu_wait": [None if r.cpu_wait is None else round(r.cpu_wait, 3) for r in self.rounds],
            "contended_rounds": sum(r.contended for r in self.rounds),
        }


@dataclass(frozen=True)
class DecodeBenchResult:
    config: DecodeBenchConfig
    model_dir: Path
    engines: list[EngineResult] = field(default_factory=list)

    def summary(self) -> dict[str, Any]:
        """The ``--json`` line: each engine's ratio first."""
        return {
            "ratios": {e.engine: round(e.ratio, 4) for e in self.engines},
            "engines": {e.engine: e.summary() for e in self.engines},
            "model": str(self.model_dir),
            "prompt_tokens": self.config.prompt_tokens,
            "new_tokens": self.config.new_tokens,
            "rounds": self.config.rounds,
            "warmup": self.config.warmup,
            "timing": TIMING,
            "cpus": os.cpu_count(),
        }


def first_difference(a: tuple[int, ...], b: tuple[int, ...]) -> int | None:
    """The first index where ``a`` and ``b`` differ (a length difference counts); None if equal."""
    for i, (x, y) in enumerate(zip(a, b)):
        if x != y:
            return i
    return None if len(a) == len(b) else min(len(a), len(b))


# ---------------------------------------------------------------- model and engines


def preset_model_dir(preset: str, report: Report = print) -> Path:
    """The ``preset`` llama checkpoint in the cache, built (with a message) on first use."""
    from cluster.paths import cache_dir
    from workers.tools.modelgen import make_model

    folder = cache_dir() / "models" / f"{preset}-{MODEL_ARCH}-seed{MODEL_SEED}"
    if not (folder / "model.safetensors").is_file():
        report(f"  building the {preset} {MODEL_ARCH} checkpoint in {folder} (once) ...")
        make_model(folder, MODEL_ARCH, seed=MODEL_SEED, preset=preset, progress=sys.stderr.isatty())
    return folder


def native_name(engine: str) -> str:
    """The native path's library, version and entry point, for the report."""
    from importlib.metadata import version

    spec = engine_spec(engine)
    return f"{spec.library} {version(spec.library)} {spec.native_entry}"


# ---------------------------------------------------------------- the two paths


def run_ours(engine: Engine, engine_name: str, token_ids: list[int], num_tokens: int) -> RoundResult:
    """Prefill, the first token from its logits, then the batch path alone (``base.generate``): ``num_tokens`` in all."""
    params = SamplingParams(max_tokens=num_tokens)  # greedy, no stop tokens
    result = engine.prefill(BENCH_REQUEST, token_ids, on_slice=lambda _: None)
    try:
        tokens = [sample(result.logits, params, 0)]
        stamps = [time.perf_counter()]
        for token in generate(engine, BENCH_REQUEST, tokens[0], params):
            stamps.append(time.perf_counter())
            tokens.append(token)
    finally:
        engine.release(BENCH_REQUEST)
    return RoundResult(engine_name, "ours", tuple(tokens), tuple(stamps))


def run_native(engine: Engine, engine_name: str, token_ids: list[int], num_tokens: int) -> RoundResult:
    """The library's own greedy generate for ``num_tokens`` tokens."""
    tokens: list[int] = []
    stamps: list[float] = []

    def on_token(token: int) -> None:
        stamps.append(time.perf_counter())
        tokens.append(token)

    engine.native_generate(token_ids, num_tokens, on_token)  # type: ignore[attr-defined]
    if len(tokens) != num_tokens:
        raise RuntimeError(f"bench decode: {native_name(engine_name)} gave {len(tokens)} of {num_tokens} tokens")
    return RoundResult(engine_name, "native", tuple(tokens), tuple(stamps))


PATH_RUNNERS = {"ours": run_ours, "native": run_native}


def run_round(engine: Engine, engine_name: str, path: str, token_ids: list[int], num_tokens: int) -> RoundResult:
    """One generation of ``path``, with the CPU wait (Linux PSI) over it."""
    wait0, t0 = cpu_wait_us(), time.monotonic()
    r = PATH_RUNNERS[path](engine, engine_name, token_ids, num_tokens)
    wait1, t1 = cpu_wait_us(), time.monotonic()
    cpu_wait = None if wait0 is None or wait1 is None else (wait1 - wait0) / 1e6 / (t1 - t0)
    return RoundResult(r.engine, r.path, r.token_ids, r.stamps, cpu_wait)


# ---------------------------------------------------------------- the run


def run_decode_bench(config: DecodeBenchConfig, report: Report = print) -> DecodeBenchResult:
    """Per engine: load it, warm up both paths, then alternate timed rounds.
    ``report`` gets a line before each phase and a table row per timed round."""
    engines = available_engines(config.engines)
    if not engines:
        raise ValueError(f"bench decode: none of {list(config.engines)} imports here; install the extra of one of them")
    for missing in sorted(set(config.engines) - set(engines)):
        report(f"  skipping {missing}: {engine_spec(missing).requires} does not import here")
    model_dir = Path(config.model) if config.model else preset_model_dir(config.preset, report)
    read_model_spec(model_dir)  # a clear error for a folder that is not a checkpoint
    token_ids = prompt_token_ids(model_dir, config.prompt_tokens)
    result = DecodeBenchResult(config, model_dir)
    for name in engines:
        report(f"  {name}: loading {model_dir} ...")
        engine = load_engine(name, model_dir, config.dtype, config.device)
        result.engines.append(_run_engine(config, engine, name, token_ids, report))
        del engine
    return result


def _run_engine(config: DecodeBenchConfig, engine: Engine, name: str, token_ids: list[int],
                report: Report) -> EngineResult:
    if config.warmup:
        report(f"  {name}: warming up, {config.warmup} untimed round(s) per path ...")
    for _ in range(config.warmup):
        for path in PATHS:
            run_round(engine, name, path, token_ids, config.new_tokens)
    result = EngineResult(name, native_name(name))
    report(ROW.format("engine", "round", "path", "tok/s", "ms/token", "cpu wait"))
    for i in range(config.rounds):
        for path in PATHS:
            r = run_round(engine, name, path, token_ids, config.new_tokens)
            result.rounds.append(r)
            report(format_round(i + 1, config.rounds, r))
    return result


# ---------------------------------------------------------------- report and CLI

ROW = "{:>6} {:>6} {:>13} {:>8} {:>9} {:>9}"


def path_label(engine: str, path: str) -> str:
    return "ours" if path == "ours" else engine_spec(engine).library


def format_round(i: int, n: int, r: RoundResult) -> str:
    wait = "n/a" if r.cpu_wait is None else f"{r.cpu_wait:.0%}{' !' if r.contended else ''}"
    return ROW.format(r.engine, f"{i}/{n}", path_label(r.engine, r.path), f"{r.tokens_per_s:.2f}",
                      f"{1e3 / r.tokens_per_s:.1f}", wait)


def format_header(config: DecodeBenchConfig) -> str:
    model = config.model or f"the {config.preset} {MODEL_ARCH} preset"
    return (
        f"bench decode: {model}, prompt {config.prompt_tokens} tokens, {config.new_tokens} new tokens greedy, "
        f"{config.rounds} timed rounds per path after {config.warmup} warm-up, {os.cpu_count()} CPUs\n"
        f"  ours = Engine.prefill then Engine.add/step (a batch of one); native = the library's own generate on the same model\n"
        f"  tok/s = {TIMING}"
    )


def format_summary(result: DecodeBenchResult) -> str:
    lines = []
    for e in result.engines:
        native = engine_spec(e.engine).library
        same = (f"identical ({result.config.new_tokens} of {result.config.new_tokens})" if e.tokens_identical
                else f"DIFFER from token {e.first_divergence}")
        lines += [
            f"  {e.engine:<6} median ours {e.median_rate('ours'):.2f} tok/s, {native} {e.median_rate('native'):.2f} "
            f"tok/s: ratio {e.ratio:.3f} ours/{native}",
            f"  {'':<6} greedy tokens {same}; native = {e.native}",
        ]
        warning = contention_warning([r.contended for r in e.rounds])
        if warning:
            lines.append(f"  {'':<6} warning: {warning}")
    return "\n".join(lines)


def add_decode_parser(sub: argparse._SubParsersAction) -> None:
    """Register ``decode`` on the ``bench`` subcommands."""
    d = DecodeBenchConfig()
    p = sub.add_parser(
        "decode", help="our decode loop vs each engine library's own generate",
        description=(
            "Prefill a prompt and decode greedily through the engines (Engine.prefill, then Engine.add/step: the "
            "decode batch with one request), "
            "alternating with the library's own generate on the same loaded model (mlx-lm generate_step, "
            "transformers generate). Reports per-round and median decode tokens/s, their ratio, and "
            "whether the greedy tokens are identical."
        ),
    )
    p.add_argument("--model", default=None, help="model folder (default: the --preset checkpoint, built once)")
    p.add_argument("--preset", choices=("tiny", "small"), default=d.preset,
                   help=f"built-in llama checkpoint when --model is not given (default: {d.preset})")
    p.add_argument("--engine", choices=(*engine_names(), "both"), default="both",
                   help="engine to measure (default: both, i.e. every engine whose library imports)")
    p.add_argument("--prompt-tokens", type=int, default=d.prompt_tokens,
                   help=f"prompt length (default: {d.prompt_tokens})")
    p.add_argument("--new-tokens", type=int, default=d.new_tokens, help=f"tokens to generate (default: {d.new_tokens})")
    p.add_argument("--rounds", type=int, default=d.rounds, help=f"timed rounds per path (default: {d.rounds})")
    p.add_argument("--warmup", type=int, default=d.warmup, help=f"untimed rounds per path first (default: {d.warmup})")
    p.add_argument("--dtype", choices=DTYPES, default=None,
                   help="compute dtype (default: each engine's for the checkpoint)")
    p.add_argument("--device", default=None, help="torch device: cuda, mps or cpu (default: best available)")
    p.add_argument("--json", action="store_true", help="end with one JSON line holding the result")
    p.set_defaults(run=run_bench_decode)


def run_bench_decode(args: argparse.Namespace) -> int:
    """CLI body of ``pdc bench decode``."""
    config = DecodeBenchConfig(
        model=args.model, preset=args.preset, engines=bench_engines() if args.engine == "both" else (args.engine,),
        prompt_tokens=args.prompt_tokens, new_tokens=args.new_tokens, rounds=args.rounds, warmup=args.warmup,
        dtype=args.dtype, device=args.device,
    )
    print(format_header(config), flush=True)
    result = run_decode_bench(config, report=lambda line: print(line, flush=True))
    print(format_summary(result))
    if args.json:
        print(json.dumps(result.summary()))
    return 0


def main(argv: list[str] | None = None) -> int:
    """``python -m workers.tools.decode_bench decode ...``: the same as ``pdc bench decode ...``."""
    return bench_main(add_decode_parser, argv)


if __name__ == "__main__":
    sys.exit(main())
