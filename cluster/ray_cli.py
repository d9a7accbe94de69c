"""``pdc ray up | down | status``: pdcluster workers as Ray actors (cluster/ray_backend.py).

ray is imported only when one of these runs, never by ``pdc --help``.
"""
from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from cluster.status import columns

DOCS = "docs/ray.md"
READY_TIMEOUT_S = 300.0
STATE_COLUMNS = ("actor", "role", "engine", "state", "health", "node ip", "ray node", "resources", "grpc", "kv",
                 "device", "restarted")
HEALTH_TIMEOUT_S = 3.0


def add_ray_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "ray",
        help="run workers as actors on an existing Ray cluster (pdc ray up | status | down)",
        description=(
            "Start pdcluster workers as named, detached Ray actors in the namespace 'pdcluster' on a running "
            "Ray cluster, list them or remove them. Each actor runs the same worker service as `pdc worker`, "
            "bound to its Ray node's IP; the scheduler finds them with `pdc serve --ray ADDRESS`. "
            f"Needs the ray extra (pip install 'pdcluster[ray]'); see {DOCS}."
        ),
    )
    verbs = p.add_subparsers(title="ray commands", metavar="VERB")

    up = verbs.add_parser("up", help="start prefill and decode workers as Ray actors",
                          description="Start --prefill N prefill actors and --decode M decode actors, wait until "
                                      "each serves, print where they run, and leave them running (detached).")
    _add_address(up)
    up.add_argument("--model", default=None,
                    help="model folder or built-in model name, as seen on the actors' nodes (default: the built-in "
                         "default model, built on each node on first use)")
    up.add_argument("--prefill", type=int, default=1, metavar="N", help="prefill actors (default: 1)")
    up.add_argument("--decode", type=int, default=1, metavar="M", help="decode actors (default: 1)")
    up.add_argument("--prefill-resources", type=_resources, default=None, metavar="JSON",
                    help='Ray resources each prefill actor asks for (default: {"pdc_prefill": 1}); "CPU" and "GPU" '
                         'keys reserve CPUs and GPUs, e.g. {"pdc_prefill": 1, "GPU": 1} on an NVIDIA node')
    up.add_argument("--decode-resources", type=_resources, default=None, metavar="JSON",
                    help='Ray resources each decode actor asks for (default: {"pdc_decode": 1})')
    up.add_argument("--prefill-engine", default="torch", help="engine of the prefill actors (default: torch)")
    up.add_argument("--decode-engine", default="mlx", help="engine of the decode actors (default: mlx)")
    up.add_argument("--prefix", default="pdc",
                    help="actor names and node ids are PREFIX-prefill-0, PREFIX-decode-0, ... (default: pdc)")
    up.add_argument("--cluster-key-file", default=None,
                    help="cluster key file, as a path on the actors' nodes (default: each node's $PDC_CLUSTER_KEY, "
                         "else its `pdc init` file); the key itself never goes through Ray")
    up.add_argument("--model-id", default=None, help="model name clients send (default: the worker's)")
    up.add_argument("--dtype", default=None, help="compute dtype (default: the checkpoint's)")
    up.add_argument("--restart", action="store_true",
                    help="let Ray restart an actor that dies (max_restarts=-1); it serves again on new ports "
                         "and the scheduler re-admits it")
    up.add_argument("--timeout", type=float, default=READY_TIMEOUT_S,
                    help=f"seconds to wait for every actor to serve (default: {READY_TIMEOUT_S:g})")
    up.add_argument("--json", action="store_true", help="print the actors as JSON")
    up.set_defaults(run=_run_up)

    status = verbs.add_parser("status", help="list the worker actors: node, resources, health")
    _add_address(status)
    status.add_argument("--timeout", type=float, default=5.0, help="seconds each actor has to answer (default: 5)")
    status.add_argument("--json", action="store_true", help="print JSON")
    status.add_argument("--cluster-key-file", default=None,
                        help="cluster key for the health check over each worker's control plane (default: "
                             "$PDC_CLUSTER_KEY, else `pdc init`'s file; without a key, health shows 'no key here')")
    status.set_defaults(run=_run_status)

    down = verbs.add_parser("down", help="stop and remove the worker actors")
    _add_address(down)
    down.add_argument("names", nargs="*", help="actors to remove (default: every actor in the namespace)")
    down.set_defaults(run=_run_down)
    p.set_defaults(run=lambda args: (p.print_help(), 2)[1])


def _add_address(p: argparse.ArgumentParser) -> None:
    p.add_argument("--address", default=None,
                   help="Ray cluster address, host:port of its GCS (default: $RAY_ADDRESS, else the cluster "
                        "running on this machine)")


def _resources(text: str) -> dict[str, float]:
    try:
        value = json.loads(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not JSON: {text!r}") from None
    if (not isinstance(value, dict) or not value
            or not all(isinstance(k, str) and isinstance(v, (int, float)) and not isinstance(v, bool) and v >= 0
                       for k, v in value.items())):
        raise argparse.ArgumentTypeError(f"need a JSON object of resource name -> amount >= 0, got {text!r}")
    return {k: float(v) for k, v in value.items()}


def _run_up(args: argparse.Namespace) -> int:
    from cluster import ray_backend as rb
    from workers.engines.registry import check_engine

    for name in ("prefill", "decode"):
        if getattr(args, name) < 0:
            raise ValueError(f"--{name} must be >= 0")
    if args.prefill + args.decode == 0:
        raise ValueError("nothing to start: --prefill and --decode are both 0")
    check_engine(args.prefill_engine)
    check_engine(args.decode_engine)
    specs = []
    for role, count, engine, resources in (
            ("prefill", args.prefill, args.prefill_engine, args.prefill_resources),
            ("decode", args.decode, args.decode_engine, args.decode_resources)):
        for i in range(count):
            spec = rb.ActorSpec(name=f"{args.prefix}-{role}-{i}", role=role, engine=engine, model=args.model,
                                cluster_key_file=args.cluster_key_file, model_id=args.model_id, dtype=args.dtype)
            specs.append((spec, resources or rb.DEFAULT_RESOURCES[role]))
    rb.connect(args.address)
    print(f"starting {len(specs)} worker actors on Ray (waiting up to {args.timeout:g} s for each to serve)...",
          file=sys.stderr, flush=True)
    try:
        states = rb.start_workers(specs, restart=args.restart, timeout_s=args.timeout)
    except RuntimeError as e:
        print(f"pdc ray up: error: {e}", file=sys.stderr)
        return 1
    _print_states(states, args.json)
    if not args.json:
        print(f"\nserve them with: pdc serve --ray {args.address or '<address>'}   (remove: pdc ray down)")
    return 0


def _run_status(args: argparse.Namespace) -> int:
    from cluster import ray_backend as rb

    rb.connect(args.address)
    states = rb.describe_workers(args.timeout)
    for state, health in zip(states, _health(states, args.cluster_key_file)):
        state["health"] = health
    _print_states(states, args.json)
    if not states and not args.json:
        print(f"no worker actors in Ray namespace {rb.NAMESPACE!r} (start some with `pdc ray up`)")
    return 0 if states and all(s["health"] == "ok" for s in states) else 1


def _health(states: list[dict[str, Any]], key_file: str | None) -> list[str]:
    """Each ready actor's worker asked Health over its keyed control plane: ok, or why not."""
    import asyncio

    from cluster.auth import ClusterKeyError, load_cluster_key
    from workers.rpc.client import WorkerClient

    try:
        key = load_cluster_key(key_file)
    except ClusterKeyError:
        return ["no key here" if s["state"] == "ready" else "-" for s in states]

    async def check(address: str) -> str:
        client = WorkerClient(address, key)
        try:
            return "ok" if (await client.health(timeout=HEALTH_TIMEOUT_S)).ok else "not ok"
        except Exception as e:
            code = getattr(e, "code", None)
            return f"failing: {code().name if callable(code) else type(e).__name__}"
        finally:
            await client.close()

    async def check_all() -> list[str]:
        return list(await asyncio.gather(*(check(s["grpc_address"]) if s["state"] == "ready" else _dash()
                                           for s in states)))

    return asyncio.run(check_all())


async def _dash() -> str:
    return "-"


def _run_down(args: argparse.Namespace) -> int:
    from cluster import ray_backend as rb

    rb.connect(args.address)
    names = args.names or rb.worker_names()
    removed = rb.stop_workers(names)
    for name in names:
        print(f"{name}: {'removed' if name in removed else 'not found'}")
    if not names:
        print(f"no worker actors in Ray namespace {rb.NAMESPACE!r}")
    return 0 if set(removed) == set(names) else 1


def _print_states(states: list[dict[str, Any]], as_json: bool) -> None:
    if as_json:
        print(json.dumps({"actors": states}))
        return
    rows = [STATE_COLUMNS] + [
        (s["name"], s["role"] or "-", s["engine"] or "-", s["state"] + (f" ({s['error']})" if s["error"] else ""),
         s.get("health", "-"), s["node_ip"] or "-", (s["ray_node_id"] or "-")[:12],
         ",".join(f"{k}={v:g}" for k, v in sorted(s["resources"].items())) or "-",
         s["grpc_address"] or "-", s["kv_address"] or "-", s["device"] or "-", "yes" if s["restarted"] else "no")
        for s in states
    ]
    if states:
        print(columns(rows))
