"""``pdc``: the pdcluster command line.

Each subcommand parses its flags into a small config and calls one function.
Heavy imports (torch, mlx) happen inside the subcommand that needs them, so
``pdc --help`` and the scheduler's commands work on a base install.
"""
from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence

DESCRIPTION = """\
pdcluster pools mismatched machines for LLM inference: prefill runs where
FLOPS are cheap (torch), the KV cache streams layer by layer to a node where
memory bandwidth is cheap, and decode runs there (MLX).
"""

EPILOG = """\
examples:
  pdc make-model ~/.cache/pdcluster/tiny-llama --arch llama
  pdc check-handoff --model ~/.cache/pdcluster/tiny-llama --prefill torch --decode mlx
"""


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.WARNING,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    if not hasattr(args, "run"):
        parser.print_help()
        return 2
    try:
        return int(args.run(args) or 0)
    except ValueError as e:  # bad model folders, unsupported architectures, bad flags
        print(f"pdc: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("pdc: interrupted", file=sys.stderr)
        return 130


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="pdc", description=DESCRIPTION, epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log debug detail to stderr")
    sub = parser.add_subparsers(title="commands", metavar="COMMAND")
    _add_make_model(sub)
    _add_check_handoff(sub)
    _add_demo(sub)
    return parser


def _add_make_model(sub: argparse._SubParsersAction) -> None:
    from workers.modelgen import ARCHES, PRESETS

    p = sub.add_parser(
        "make-model",
        help="write a small Hugging Face checkpoint from seeded random weights",
        description=(
            "Write config.json, model.safetensors, tokenizer.json and tokenizer_config.json "
            "(with a chat template) for a randomly initialised model. Both transformers and "
            "mlx-lm load the result offline. 'tiny' is a few MB for tests and the demo; "
            "'small' (~75M parameters) makes a 2,000-token prefill take seconds on a CPU, for benchmarks."
        ),
    )
    p.add_argument("dir", help="output folder (created if missing)")
    p.add_argument("--arch", choices=ARCHES, default="llama", help="architecture (default: llama)")
    p.add_argument("--seed", type=int, default=0, help="weight seed (default: 0)")
    p.add_argument("--preset", choices=sorted(PRESETS), default="tiny", help="size (default: tiny)")
    p.set_defaults(run=_run_make_model)


def _run_make_model(args: argparse.Namespace) -> int:
    from workers.modelgen import make_model

    path = make_model(args.dir, args.arch, seed=args.seed, preset=args.preset, progress=sys.stderr.isatty())
    print(f"wrote {args.preset} {args.arch} checkpoint (seed {args.seed}) to {path}")
    return 0


def _add_check_handoff(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "check-handoff",
        help="prove a KV handoff between two engines is token-identical",
        description=(
            "Prefill a prompt on one engine, stream its KV cache through the wire codec over a "
            "real loopback TCP socket, decode greedily on the other engine, and compare with the "
            "decode engine generating alone. Run it on your own model before deploying a "
            "prefill/decode split. Exits 1 on any mismatch."
        ),
    )
    p.add_argument("--model", required=True, help="model folder (or hub id when online)")
    p.add_argument("--prefill", choices=("torch", "mlx"), default="torch", help="prefill engine (default: torch)")
    p.add_argument("--decode", choices=("torch", "mlx"), default="mlx", help="decode engine (default: mlx)")
    p.add_argument("--prompt-tokens", type=int, default=300, help="prompt length in tokens (default: 300)")
    p.add_argument("--max-tokens", type=int, default=24, help="tokens to generate (default: 24)")
    p.add_argument("--chunk-size", type=int, default=128, help="prefill chunk in tokens (default: 128)")
    p.add_argument("--dtype", choices=("float32", "float16", "bfloat16"), default="float32",
                   help="compute dtype on both engines (default: float32, where greedy decoding is exact)")
    p.add_argument("--device", default=None, help="torch device: cuda, mps or cpu (default: best available)")
    p.add_argument("--json", action="store_true", help="end with one JSON line holding the result")
    p.set_defaults(run=_run_check_handoff)


def _run_check_handoff(args: argparse.Namespace) -> int:
    from workers.handoff import HandoffConfig, run_check_handoff

    config = HandoffConfig(
        model=args.model, prefill_engine=args.prefill, decode_engine=args.decode,
        prompt_tokens=args.prompt_tokens, max_tokens=args.max_tokens, chunk_size=args.chunk_size,
        dtype=args.dtype, device=args.device,
    )
    return run_check_handoff(config, as_json=args.json)


def _add_demo(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "demo",
        help="run the built-in demo on the tiny model",
        description=(
            "Build the tiny model on first use (cached under ~/.cache/pdcluster), prefill a prompt "
            "on torch, stream its KV over loopback TCP to MLX (torch when MLX is missing), decode "
            "there and check the tokens against a single-engine run."
        ),
    )
    p.set_defaults(run=_run_demo)


def _run_demo(args: argparse.Namespace) -> int:
    from cluster.paths import tiny_model_dir
    from workers.handoff import HandoffConfig, run_check_handoff

    decode = "mlx" if _importable("mlx.core") else "torch"
    config = HandoffConfig(model=str(tiny_model_dir()), prefill_engine="torch", decode_engine=decode)
    return run_check_handoff(config)


def _importable(module: str) -> bool:
    try:
        __import__(module)
    except ImportError:
        return False
    return True


if __name__ == "__main__":
    sys.exit(main())
