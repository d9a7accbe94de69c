"""A placement sweep: which policy gives the lowest p50 TTFT at each rate and prompt length.

Runs ``pdc simulate --sweep`` over 3 policies x 2 rates x 3 prompt lengths
(18 seeded simulations) in local processes, or as Ray tasks with ``--ray
ADDR``, then prints the winner of each (rate, prompt length) cell.

    python examples/placement_sweep.py
    python examples/placement_sweep.py --ray HEAD:6379     # the same rows, on a Ray cluster
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
POLICIES = "colocated,fastest-pair,conditional"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ray", default=None, metavar="ADDR", help="run the points as Ray tasks on this cluster")
    parser.add_argument("--cluster", default=str(ROOT / "examples/clusters/spark-m4max-10gbe.toml"))
    parser.add_argument("--model", default="llama-3.1-8b")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "sweep.json"
        cmd = [sys.executable, "-m", "cluster.cli", "simulate", "--sweep", "--cluster", args.cluster,
               "--model", args.model, "--policy", POLICIES, "--rate", "0.5,2", "--num-requests", "100",
               "--prompt-tokens", "1024,8192,32768", "--out", str(out),
               *(["--ray", args.ray] if args.ray else [])]
        if subprocess.run(cmd, cwd=ROOT).returncode != 0:
            return 1
        rows = json.loads(out.read_text())["rows"]
    best: dict[tuple[float, int], dict] = {}
    for row in rows:
        cell = (row["rate"], row["prompt_tokens"])
        if cell not in best or row["ttft_p50_s"] < best[cell]["ttft_p50_s"]:
            best[cell] = row
    print("\nlowest p50 TTFT per cell:")
    for (rate, prompt), row in sorted(best.items()):
        print(f"  {rate:>4} req/s, {prompt:>6} tokens: {row['policy']:<13} {row['ttft_p50_s']:.3f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
