"""TTFT, disaggregated vs colocated, measured by the client in one run.

Starts the same local cluster as ``pdc up`` (scheduler + prefill worker +
decode worker, real processes), then sends the same ~N-token prompt
alternately with ``placement: disaggregated`` and ``placement: colocated`` and
measures time to the first streamed content token at the client. Prints each
round, the medians and their ratio; the last line is JSON.

    .venv/bin/python examples/bench_ttft.py                      # small model, torch -> torch
    .venv/bin/python examples/bench_ttft.py --prompt-tokens 2000 --rounds 5 --json
"""
from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import openai

from cluster.launcher import LocalCluster, UpConfig
from cluster.paths import cache_dir
from workers.tools.modelgen import make_model

FILLER = ("The prefill node reads the whole prompt at once and is limited by arithmetic, while the decode "
          "node writes one token at a time and is limited by memory bandwidth. ")


def small_model() -> Path:
    folder = cache_dir() / "models" / "small-llama-seed0"
    if not (folder / "model.safetensors").is_file():
        print(f"building the small model in {folder} (once)")
        make_model(folder, "llama", seed=0, preset="small", progress=True)
    return folder


def prompt_of(client: openai.OpenAI, model: str, num_tokens: int) -> str:
    """A completion prompt of about ``num_tokens`` tokens (checked through the API's usage)."""
    text = FILLER * max(1, num_tokens // 25)
    usage = client.completions.create(model=model, prompt=text, max_tokens=1, temperature=0).usage
    words = text.split(" ")
    keep = int(len(words) * num_tokens / max(usage.prompt_tokens, 1))
    return " ".join(words[:keep])


def ttft(client: openai.OpenAI, model: str, prompt: str, placement: str) -> tuple[float, dict]:
    sent = time.perf_counter()
    first, stats = None, {}
    stream = client.completions.create(model=model, prompt=prompt, max_tokens=2, temperature=0, stream=True,
                                       extra_body={"pdcluster": {"placement": placement}})
    for chunk in stream:
        if first is None and chunk.choices:
            first = time.perf_counter() - sent
        stats = (chunk.model_extra or {}).get("pdcluster", stats)
    return first if first is not None else float("nan"), stats


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
    results: dict[str, list[float]] = {"disaggregated": [], "colocated": []}
    last: dict[str, dict] = {}
    with LocalCluster(config) as cluster:
        cluster.wait_ready()
        client = openai.OpenAI(base_url=cluster.url + "/v1", api_key="x", timeout=600, max_retries=0)
        model = client.models.list().data[0].id
        prompt = prompt_of(client, model, args.prompt_tokens)
        ttft(client, model, prompt, "disaggregated")  # warm-up both paths once
        ttft(client, model, prompt, "colocated")
        print(f"{'round':>5}  {'placement':<14} {'TTFT s':>8}  {'prefill s':>9}  {'KV MB':>7}  {'exposed s':>9}")
        for i in range(args.rounds):
            order = ("disaggregated", "colocated") if i % 2 == 0 else ("colocated", "disaggregated")
            for placement in order:
                seconds, stats = ttft(client, model, prompt, placement)
                results[placement].append(seconds)
                last[placement] = stats
                print(f"{i:>5}  {placement:<14} {seconds:>8.3f}  {stats.get('prefill_s', 0):>9.3f}  "
                      f"{stats.get('kv_bytes', 0) / 1e6:>7.1f}  {stats.get('exposed_transfer_s', 0):>9.3f}")
    disagg, coloc = statistics.median(results["disaggregated"]), statistics.median(results["colocated"])
    summary = {
        "ttft_disaggregated_s": disagg, "ttft_colocated_s": coloc, "ratio": disagg / coloc,
        "prompt_tokens": last["disaggregated"].get("prompt_tokens"), "kv_bytes": last["disaggregated"].get("kv_bytes"),
        "rounds": args.rounds, "prefill_engine": args.prefill_engine, "decode_engine": args.decode_engine,
    }
    print(f"median TTFT: disaggregated {disagg:.3f} s, colocated {coloc:.3f} s, ratio {disagg / coloc:.3f}")
    if args.json:
        print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
