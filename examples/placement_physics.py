"""Spark + Mac placement physics, as docs/placement.md tabulates it.

For Llama-3.1-8B bf16 and one 8,192-token prompt (128 output tokens), over each
catalog link: the Mac prefilling alone, the Spark prefilling and streaming the
KV layer by layer, what ``conditional`` picks, and its end-to-end speed-up
over the Mac alone. Every figure comes from one run of the simulator (the same
policy code as ``pdc serve``). The KV crosses the link raw unless
``--kv-codec`` says otherwise (``auto``: the codec the scheduler would pick,
shown in the last column).

    .venv/bin/python examples/placement_physics.py [--prompt-tokens 8192] [--output-tokens 128] [--kv-codec raw]
"""
from __future__ import annotations

import argparse

from scheduler.sim import cluster_file
from scheduler.sim.cli import SimConfig, simulate

MACS = {"mac-m4-max": "M4 Max", "mac-m3-ultra": "M3 Ultra"}
LINKS = ("200gbe", "10gbe", "2.5gbe", "1gbe", "wifi6")


def pair(mac: str, link: str) -> cluster_file.ClusterSpec:
    text = (f'[[nodes]]\nname = "spark"\nhardware = "dgx-spark"\n[[nodes]]\nname = "mac"\nhardware = "{mac}"\n'
            f'[[links]]\nnodes = ["spark", "mac"]\nkind = "{link}"\n')
    return cluster_file.loads(text, source=f"spark+{mac} over {link}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--prompt-tokens", type=int, default=8192)
    parser.add_argument("--output-tokens", type=int, default=128)
    parser.add_argument("--kv-codec", choices=("raw", "int8", "fp8", "auto"), default="raw",
                        help="codec of the Spark -> Mac KV (default: raw; auto: what pdc serve would pick)")
    args = parser.parse_args()
    print("| Mac | link | Mac alone TTFT s | Spark -> Mac TTFT s | remote gain | `conditional` | speed-up | codec |")
    print("|---|---|---|---|---|---|---|---|")
    for mac, label in MACS.items():
        for link in LINKS:
            config = SimConfig(pair(mac, link), "llama-3.1-8b", ("colocated", "fastest-pair", "conditional"),
                               prompt_tokens=args.prompt_tokens, output_tokens=args.output_tokens,
                               kv_codec=args.kv_codec)
            runs = simulate(config)
            local, remote, chosen = (runs[p].requests[0] for p in ("colocated", "fastest-pair", "conditional"))
            picked = "Mac alone" if chosen.colocated else "Spark -> Mac"
            gain = (local.ttft_s - remote.ttft_s) / local.ttft_s
            print(f"| {label} | {link} | {local.ttft_s:.2f} | {remote.prefill_s:.2f} + "
                  f"{remote.exposed_transfer_s:.2f} = {remote.ttft_s:.2f} | {gain:+.0%} | {picked} | "
                  f"{local.e2e_s / chosen.e2e_s:.2f}x | {remote.kv_codec} |")


if __name__ == "__main__":
    main()
