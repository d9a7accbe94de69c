"""TTFT, disaggregated vs colocated, measured by the client in one run.

Starts the same local cluster as ``pdc up`` (scheduler + prefill worker +
decode worker, real processes), then sends ~N-token prompts one at a time,
alternately with ``placement: disaggregated`` and ``placement: colocated``,
through ``pdc bench serve``'s functions (workers/tools/serve_bench.py): the
same streamed chat request, the same client-side TTFT. Every request gets its
own random prompt, so no request reuses another's cached prefix. Prints each
round, the medians and their ratio; the last line is JSON.

    .venv/bin/python examples/bench_ttft.py                      # small model, torch -> torch
    .venv/bin/python examples/bench_ttft.py --prompt-tokens 2000 --rounds 5 --json

Against a cluster that is already running, the same comparison is two commands:

    pdc bench serve --num-prompts 5 --max-concurrency 1 --input-len 2000 --output-len 2 \\
        --extra-body '{"pdcluster": {"placement": "disaggregated"}}'     # then "colocated"
"""
from __future__ import annotations

import argparse
import json
import statistics
from dataclasses import replace
from pathlib import Path

from cluster.launcher import LocalCluster, UpConfig
from cluster.paths import cache_dir
from workers.tools.modelgen import make_model
from workers.tools.serve_bench import RequestRecord, ServeBenchConfig, resolve, run_serve_bench

PLACEMENTS = ("disaggregated", "colocated")


def small_model() -> Path:
    folder = cache_dir() / "models" / "small-llama-seed0"
    if not (folder / "model.safetensors").is_file():
        print(f"building the small model in {folder} (once)")
        make_model(folder, "llama", seed=0, preset="small", progress=True)
    return folder


def one_request(base: ServeBenchConfig, placement: str, seed: int) -> RequestRecord:
    """One streamed request with a fresh random prompt, placed as asked."""
    config = replace(base, seed=seed, extra_body={"pdcluster": {"placement": placement}})
    return run_serve_bench(config).records[0]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="model folder (default: the small preset, built once)")
    parser.add_argument("--prompt-tokens", type=int, default=2000)
    parser.add_argument("--rounds", type=int, default=5, help="pairs of alternating requests (default: 5)")
    parser.add_argument("--prefill-engine", default="torch")
    parser.add_argument("--decode-engine", default="torch")
    parser.add_argument("--port", type=int, default=8311)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    model_dir = args.model or str(small_model())
    config = UpConfig(model=model_dir, port=args.port, prefill_engine=args.prefill_engine,
                      decode_engine=args.decode_engine)
    results: dict[str, list[float]] = {p: [] for p in PLACEMENTS}
    last: dict[str, RequestRecord] = {}
    with LocalCluster(config) as cluster:
        cluster.wait_ready()
        base = resolve(ServeBenchConfig(cluster.url + "/v1", num_prompts=1, max_concurrency=1,
                                        input_len=args.prompt_tokens, output_len=2, timeout_s=600, progress=False))
        for placement in PLACEMENTS:  # warm-up both paths once
            one_request(base, placement, seed=1_000_000 + len(placement))
        print(f"{'round':>5}  {'placement':<14} {'TTFT s':>8}  {'prefill s':>9}  {'KV MB':>7}  {'exposed s':>9}")
        for i in range(args.rounds):
            order = PLACEMENTS if i % 2 == 0 else PLACEMENTS[::-1]
            for placement in order:
                record = one_request(base, placement, seed=2 * i + PLACEMENTS.index(placement))
                if not record.ok:
                    raise SystemExit(f"round {i} {placement}: {record.error}: {record.detail}")
                stats = record.pdcluster or {}
                results[placement].append(record.ttft_s or float("nan"))
                last[placement] = record
                print(f"{i:>5}  {placement:<14} {record.ttft_s:>8.3f}  {stats.get('prefill_s', 0):>9.3f}  "
                      f"{stats.get('kv_bytes', 0) / 1e6:>7.1f}  {stats.get('exposed_transfer_s', 0):>9.3f}")
    disagg, coloc = (statistics.median(results[p]) for p in PLACEMENTS)
    summary = {
        "ttft_disaggregated_s": disagg, "ttft_colocated_s": coloc, "ratio": disagg / coloc,
        "prompt_tokens": last["disaggregated"].prompt_tokens,
        "kv_bytes": (last["disaggregated"].pdcluster or {}).get("kv_bytes"),
        "rounds": args.rounds, "prefill_engine": args.prefill_engine, "decode_engine": args.decode_engine,
    }
    print(f"median TTFT: disaggregated {disagg:.3f} s, colocated {coloc:.3f} s, ratio {disagg / coloc:.3f}")
    if args.json:
        print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
