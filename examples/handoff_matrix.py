"""Prove the KV handoff token-identical for every architecture and direction.

Builds a tiny checkpoint per architecture (seeded, no download), then runs the
same check as ``pdc check-handoff`` in all four directions and prints a table.
For the sliding-window architectures (gpt_oss, gemma3) the ``windows`` column
gives each layer's window (``-`` a full layer) and ``KV/full`` the bytes that
travelled over what a cache of every token in every layer would be.

    .venv/bin/python examples/handoff_matrix.py [--prompt-tokens 300] [--max-tokens 24]
"""
from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

from workers.engines.model_config import read_model_spec
from workers.tools.handoff import HandoffConfig, check_handoff
from workers.tools.modelgen import ARCHES, make_model

DIRECTIONS = [("torch", "mlx"), ("mlx", "torch"), ("torch", "torch"), ("mlx", "mlx")]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--prompt-tokens", type=int, default=300)
    parser.add_argument("--max-tokens", type=int, default=24)
    args = parser.parse_args()
    failures = 0
    print(f"{'arch':<10} {'direction':<14} {'identical':<10} {'tokens':>6} {'KV bytes':>10} {'KV/full':>8} "
          f"{'max |dK|,|dV|':>14}  windows")
    with tempfile.TemporaryDirectory() as tmp:
        for arch in ARCHES:
            folder = make_model(Path(tmp) / arch, arch)
            spec = read_model_spec(folder)
            full_bytes = spec.kv_bytes_per_token("float32") * args.prompt_tokens
            windows = ",".join(str(w) if w else "-" for w in spec.windows) or "all full"
            for prefill, decode in DIRECTIONS:
                result = check_handoff(HandoffConfig(
                    model=str(folder), prefill_engine=prefill, decode_engine=decode,
                    prompt_tokens=args.prompt_tokens, max_tokens=args.max_tokens,
                ))
                failures += not result.identical
                print(f"{arch:<10} {prefill + '->' + decode:<14} {result.identical!s:<10} "
                      f"{result.tokens_compared:>6} {result.kv_bytes:>10} {result.kv_bytes / full_bytes:>8.2f} "
                      f"{result.kv_max_abs_diff:>14.1e}  {windows}")
    return 1 if failures else 0


if __name__ == "__main__":
    raise SystemExit(main())
