"""``pdc simulate``: run placement policies over a simulated cluster and workload.

The policies are the live scheduler's own classes (``scheduler/policy.py``, or
a user's ``module:Class`` / ``file.py:Class``); the cluster comes from a TOML
cluster file (``scheduler/sim/cluster_file.py``); time comes from the cost model.
``sim_workload`` makes the arrivals, ``sim_engine`` runs them, ``sim_report``
summarises. ``--sweep`` runs a grid of such simulations, one policy each, in
local processes or as Ray tasks (``scheduler/sim/sweep.py``). Usable as
``python -m scheduler.sim.cli`` too.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from scheduler import costmodel
from scheduler.policy import POLICIES, load_policy
from scheduler.request import KV_CODEC_MODES, RequestStats, check_kv_codec
from scheduler.sim import cluster_file
from scheduler.sim.cluster_file import ClusterSpec
from scheduler.sim.engine import SimCluster, Simulation, build_cluster
from scheduler.sim.report import Point, Summary, plot, summarize, text_report
from scheduler.sim.workload import (
    WorkItem,
    conversations,
    mean_rate,
    poisson,
    read_trace,
    scaled,
    single,
)

PROMPT_SWEEP = (512, 1024, 2048, 4096, 8192, 16384, 32768)
RATE_SWEEP = (0.25, 0.5, 0.75, 1.0, 1.25, 1.5, 2.0)  # x the workload's rate


@dataclass(frozen=True)
class SimConfig:
    """One ``pdc simulate`` invocation, validated."""

    cluster: ClusterSpec
    model: str
    policies: tuple[str, ...]
    prompt_tokens: int = 2048
    cached_prefix_tokens: int = 0
    output_tokens: int = 256
    weight_format: str | None = None
    engine: str | None = None
    rate: float | None = None
    num_requests: int | None = None
    trace: Path | None = None
    seed: int = 0
    slo_ttft_s: float | None = None
    slo_tpot_s: float | None = None
    turns: int = 1  # >1: every request opens a conversation of this many turns
    turn_tokens: int = 256  # new user tokens in each later turn
    think_s: float = 60.0  # a later turn arrives this long after the previous turn arrived
    kv_codec: str = "auto"  # the codec mode, as pdc serve --kv-codec

    def __post_init__(self) -> None:
        check_kv_codec(self.kv_codec, "--kv-codec")
        if not self.policies or len(set(self.policies)) != len(self.policies):
            raise ValueError(f"--policy needs one or more distinct policies, got {','.join(self.policies)!r}")
        if self.prompt_tokens < 1 or self.output_tokens < 1:
            raise ValueError("--prompt-tokens and --output-tokens must be >= 1")
        if not 0 <= self.cached_prefix_tokens < self.prompt_tokens:
            raise ValueError(f"--cached-prefix-tokens must be in [0, --prompt-tokens), got "
                             f"{self.cached_prefix_tokens} of {self.prompt_tokens}")
        if self.weight_format is not None and self.weight_format not in costmodel.WEIGHT_BITS:
            raise ValueError(f"--weight-dtype {self.weight_format!r}: use one of {', '.join(costmodel.WEIGHT_BITS)}")
        if (self.rate is None) != (self.num_requests is None):
            raise ValueError("--rate and --num-requests go together")
        if self.rate is not None and self.trace is not None:
            raise ValueError("use either --rate/--num-requests or --trace, not both")
        if self.rate is not None and (self.rate <= 0 or self.num_requests < 1):
            raise ValueError("--rate must be > 0 and --num-requests >= 1")
        if self.turns < 1 or self.turn_tokens < 1 or self.think_s <= 0:
            raise ValueError("--turns and --turn-tokens must be >= 1 and --think-s > 0")
        if self.turns > 1 and self.trace is not None:
            raise ValueError("--turns makes conversations of --rate or single requests; a trace names its "
                             "own with a session column")
        for name, slo in (("--slo-ttft", self.slo_ttft_s), ("--slo-tpot", self.slo_tpot_s)):
            if slo is not None and slo <= 0:
                raise ValueError(f"{name} must be > 0 seconds")


@dataclass(frozen=True)
class PolicyRun:
    """Every request of one policy's run, and their summary."""

    requests: list[RequestStats]
    summary: Summary

    def to_json(self) -> dict:
        return {"requests": [r.to_json() for r in self.requests], "summary": self.summary.to_json()}


def workload(config: SimConfig) -> list[WorkItem]:
    """The requests ``config`` asks for: a trace, Poisson arrivals, or one
    request; with ``turns`` > 1, each of the latter opens a conversation."""
    if config.trace is not None:
        return read_trace(config.trace)
    if config.rate is not None:
        items = poisson(config.rate, config.num_requests, config.seed, config.prompt_tokens,
                        config.output_tokens, config.cached_prefix_tokens)
    else:
        items = single(config.prompt_tokens, config.output_tokens, config.cached_prefix_tokens)
    return _as_conversations(config, items)


def _as_conversations(config: SimConfig, items: list[WorkItem]) -> list[WorkItem]:
    """``items`` as the openers of ``config.turns``-turn conversations (unchanged for one turn)."""
    return items if config.turns == 1 else conversations(items, config.turns, config.turn_tokens, config.think_s)


def resolve(config: SimConfig) -> SimCluster:
    return build_cluster(config.cluster, config.model, engine=config.engine, weight_format=config.weight_format)


def run_policy(cluster: SimCluster, spec: str, items: list[WorkItem], config: SimConfig) -> PolicyRun:
    """A fresh instance of policy ``spec`` over ``items``."""
    results = Simulation(cluster, load_policy(spec), spec, kv_codec=config.kv_codec).run(items)
    return PolicyRun(results, summarize(results, config.slo_ttft_s, config.slo_tpot_s))


def simulate(config: SimConfig) -> dict[str, PolicyRun]:
    """Run every policy of ``config`` over the same workload; keyed by policy spec."""
    cluster, items = resolve(config), workload(config)
    return {spec: run_policy(cluster, spec, items, config) for spec in config.policies}


def to_json(config: SimConfig, runs: dict[str, PolicyRun], source: str = "") -> dict:
    """The ``--json`` object. ``policies`` maps every policy spec to its
    ``{requests, summary}``; with a single policy, its ``requests`` and
    ``summary`` are also at the top level (as the issue's interface has them),
    so a consumer may always read ``policies``."""
    cluster = resolve(config)
    nodes = {name: {"hardware": n.spec.hardware, "roles": list(n.spec.roles), "engine": n.engine,
                    "tflops": n.machine.tflops, "mem_bw_gbps": n.machine.mem_bw_gbps,
                    "efficiency": n.efficiency.source}
             for name, n in cluster.nodes.items()}
    head = {"cluster": source or config.cluster.name, "model": config.model,
            "weight_format": cluster.weight_format, "kv_codec": config.kv_codec, "nodes": nodes}
    out = {**head, "policies": {spec: run.to_json() for spec, run in runs.items()}}
    if len(runs) == 1:
        (spec, run), = runs.items()
        out.update(policy=spec, **run.to_json())
    return out


# ---------------------------------------------------------------- plot sweeps


def sweep(config: SimConfig) -> tuple[dict[str, list[Point]], str, bool]:
    """p50 TTFT and E2E per policy against prompt length (a single request) or
    request rate (--rate or --trace, arrivals scaled); (series, x label, log x)."""
    cluster = resolve(config)
    if config.rate is None and config.trace is None:
        limit = int(cluster.model_config.get("max_position_embeddings") or 1 << 62) - config.output_tokens
        lengths = sorted({n for n in (*PROMPT_SWEEP, config.prompt_tokens)
                          if config.cached_prefix_tokens < n <= limit})
        points = {n: _as_conversations(config, single(n, config.output_tokens, config.cached_prefix_tokens))
                  for n in lengths}
        label, log_x = "prompt tokens" + (f" ({config.cached_prefix_tokens} cached)"
                                          if config.cached_prefix_tokens else ""), True
    else:
        base = workload(config)
        base_rate = config.rate or mean_rate(base)
        if base_rate <= 0:
            raise ValueError("--plot over a trace needs at least two arrivals at different times")
        points = {base_rate * f: scaled(base, f) for f in RATE_SWEEP}
        label, log_x = "request rate (req/s)", False
    series = {}
    for spec in config.policies:
        series[spec] = []
        for x, items in points.items():
            summary = run_policy(cluster, spec, items, config).summary
            series[spec].append(Point(x, summary.ttft_s.p50, summary.e2e_s.p50))
    return series, label, log_x


def plot_title(config: SimConfig, source: str) -> str:
    name = config.cluster.name or Path(source).stem
    return (f"{config.model} on {name}: {config.output_tokens} output tokens"
            + (f", {config.prompt_tokens}-token prompts" if config.rate or config.trace else ""))


# ---------------------------------------------------------------- command line


def add_simulate_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Add ``simulate`` to ``pdc``'s subcommands."""
    p = subparsers.add_parser(
        "simulate",
        help="simulate placement policies on a described cluster and workload (no machines needed)",
        description=(
            "Discrete-event simulation of a cluster file under a workload, running the live "
            "scheduler's placement policies; times come from the cost model (docs/placement.md)."
        ),
    )
    _add_arguments(p)
    p.set_defaults(run=run_simulate)
    return p


def _add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--cluster", required=True,
                   help="cluster file (TOML), e.g. examples/clusters/spark-m4max-10gbe.toml; with --sweep, "
                        "several separated by commas")
    p.add_argument("--model", required=True,
                   help="catalog model name (e.g. llama-3.1-8b) or a config.json path; with --sweep, several "
                        "separated by commas")
    p.add_argument("--policy", default="conditional",
                   help=f"a built-in ({', '.join(POLICIES)}), package.module:Class or path/to/file.py:Class; "
                        "several separated by commas, compared on the same workload (default: conditional)")
    p.add_argument("--prompt-tokens", type=_numbers(int), default=(2048,),
                   help="prompt length (default: 2048); with --sweep, several separated by commas")
    p.add_argument("--cached-prefix-tokens", type=int, default=0,
                   help="prompt tokens already cached on the chosen nodes, as in a multi-turn chat: prefill "
                        "computes and ships only the rest (default: 0)")
    p.add_argument("--output-tokens", type=int, default=256, help="tokens to generate (default: 256)")
    p.add_argument("--weight-dtype", choices=list(costmodel.WEIGHT_BITS), default=None,
                   help="weight format (default: the checkpoint's own)")
    p.add_argument("--kv-codec", choices=KV_CODEC_MODES, default="auto",
                   help="KV codec of every remote prefill's transfer, as pdc serve --kv-codec: auto (default: "
                        "the cost model picks per transfer, docs/placement.md), raw, int8 or fp8")
    p.add_argument("--engine", default=None,
                   choices=costmodel.known_engines(),
                   help="engine of nodes whose cluster entry names none (default: mlx on Macs, torch elsewhere; "
                        "llamacpp selects the calibrated factors)")
    p.add_argument("--rate", type=_numbers(float), default=None,
                   help="Poisson arrival rate, requests/s (with --num-requests); with --sweep, several separated "
                        "by commas")
    p.add_argument("--num-requests", type=int, default=None, help="number of Poisson arrivals (with --rate)")
    p.add_argument("--trace", type=Path, default=None,
                   help="JSONL or CSV of arrival_s, prompt_tokens, output_tokens[, cached_prefix_tokens, session]")
    p.add_argument("--turns", type=int, default=1,
                   help="turns per conversation: each request opens a chat whose later turns carry its whole "
                        "history, cached wherever earlier turns left it (default: 1, no conversations)")
    p.add_argument("--turn-tokens", type=int, default=256,
                   help="new user tokens in each later turn (default: 256)")
    p.add_argument("--think-s", type=float, default=60.0,
                   help="seconds from one turn's arrival to the next (default: 60)")
    p.add_argument("--seed", type=int, default=0, help="seed of the Poisson arrivals (default: 0)")
    p.add_argument("--slo-ttft", type=float, default=None, help="TTFT SLO in seconds, for goodput")
    p.add_argument("--slo-tpot", type=float, default=None, help="TPOT SLO in seconds, for goodput")
    p.add_argument("--json", action="store_true", help="print one JSON object (with --sweep: the sweep's)")
    p.add_argument("--out", type=Path, default=None, metavar="PATH.json",
                   help="also write the JSON object to this file (with --sweep: axes, settings and a row per point)")
    p.add_argument("--plot", type=Path, default=None,
                   help="write a PNG of p50 TTFT and E2E against prompt length or request rate (needs matplotlib)")
    group = p.add_argument_group(
        "sweeps", "--sweep runs every combination of the comma-separated values of --cluster, --model, --policy, "
        "--rate and --prompt-tokens (the last varies fastest), one seeded simulation of one policy per point, "
        "and prints a row per point (docs/ray.md). Cluster files and config.json models are read here and "
        "shipped as data; a module:Class or file.py:Class policy must be importable where points run (on Ray: "
        "installed on every node, or the .py file at the same absolute path).")
    group.add_argument("--sweep", action="store_true", help="run the grid of the comma-separated values")
    group.add_argument("--jobs", type=int, default=None,
                       help=f"local worker processes (default: the CPU count, {os.cpu_count()} here)")
    group.add_argument("--ray", nargs="?", const="", default=None, metavar="ADDR",
                       help="run each point as a Ray task (pip install 'pdcluster[ray]'): ADDR is ray.init's "
                            "address (HOST:PORT, ray://HOST:PORT, auto or local); without ADDR, Ray's default "
                            "(RAY_ADDRESS, else a running local cluster, else a new local one)")
    group.add_argument("--point-timeout", type=float, default=None, metavar="S",
                       help="stop the sweep with an error when no point has finished for S seconds (default: 600)")


def _numbers(kind: type) -> Callable[[str], tuple]:
    """An argparse type: one number, or several separated by commas (for --sweep), as a tuple."""
    def parse(text: str) -> tuple:
        try:
            values = tuple(kind(v) for v in text.split(",") if v.strip())
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r}: expected {kind.__name__}s separated by commas") from None
        if not values:
            raise argparse.ArgumentTypeError(f"{text!r}: expected at least one {kind.__name__}")
        return values
    parse.__name__ = kind.__name__
    return parse


def _split(text: str) -> tuple[str, ...]:
    return tuple(v.strip() for v in text.split(",") if v.strip())


def _one(values: tuple | None, flag: str) -> Any:
    """The single value (or None) of a flag that takes several only with --sweep."""
    if values is None:
        return None
    if len(values) > 1:
        raise ValueError(f"{flag} takes one value; several ({', '.join(map(str, values))}) need --sweep")
    return values[0]


def _settings(args: argparse.Namespace) -> dict[str, Any]:
    """SimConfig's fields from the flags, but for the sweep axes (cluster, model, policies, rate,
    prompt tokens) and the trace: what every point of a sweep shares."""
    return {
        "cached_prefix_tokens": args.cached_prefix_tokens, "output_tokens": args.output_tokens,
        "weight_format": args.weight_dtype, "engine": args.engine, "num_requests": args.num_requests,
        "seed": args.seed, "slo_ttft_s": args.slo_ttft, "slo_tpot_s": args.slo_tpot, "turns": args.turns,
        "turn_tokens": args.turn_tokens, "think_s": args.think_s, "kv_codec": args.kv_codec,
    }


def config_from_args(args: argparse.Namespace) -> SimConfig:
    for flag, text in (("--cluster", args.cluster), ("--model", args.model)):
        _one(_split(text) or (text,), flag)
    return SimConfig(
        cluster=cluster_file.load(args.cluster), model=args.model, policies=_split(args.policy),
        prompt_tokens=_one(args.prompt_tokens, "--prompt-tokens"), rate=_one(args.rate, "--rate"),
        trace=args.trace, **_settings(args),
    )


def _check_flags(args: argparse.Namespace) -> None:
    """Refuse flags that mean nothing in this mode, rather than ignore them."""
    if args.out is not None and not args.out.parent.is_dir():
        raise ValueError(f"--out {args.out}: no folder {args.out.parent}")
    if not args.sweep:
        for flag, value in (("--jobs", args.jobs), ("--ray", args.ray), ("--point-timeout", args.point_timeout)):
            if value is not None:
                raise ValueError(f"{flag} goes with --sweep")
        return
    if args.plot is not None:
        raise ValueError("--plot does not go with --sweep: it draws one workload's policies; a sweep's rows are "
                         "in --out or --json")
    if args.trace is not None:
        raise ValueError("--trace does not go with --sweep: a sweep's points are --rate/--num-requests Poisson "
                         "arrivals, or one request each")
    if args.ray is not None and args.jobs is not None:
        raise ValueError("--jobs sets local processes; with --ray, the Ray cluster's CPUs set how many points run "
                         "at once")


def run_simulate(args: argparse.Namespace) -> int:
    """What ``pdc simulate`` does: simulate, print the table or JSON, maybe write it and plot."""
    _check_flags(args)
    if args.sweep:
        return run_sweep(args)
    config = config_from_args(args)
    runs = simulate(config)
    document = to_json(config, runs, str(args.cluster)) if args.json or args.out else None
    if args.json:
        print(json.dumps(document, indent=2))
    else:
        print(text_report({spec: (run.requests, run.summary) for spec, run in runs.items()}))
    if args.out is not None:
        _write_json(args.out, document)
    if args.plot is not None:
        series, label, log_x = sweep(config)
        out = plot(series, label, plot_title(config, str(args.cluster)), args.plot, log_x=log_x)
        print(f"wrote {out}", file=sys.stderr)
    return 0


def run_sweep(args: argparse.Namespace) -> int:
    """What ``pdc simulate --sweep`` does: check and run every point, print the table or JSON, maybe
    write it. A grid that cannot run raises (exit 2); a point that fails while running exits 1."""
    from scheduler.sim import sweep as grid  # sweep.py builds on this module

    config = grid.SweepConfig(
        clusters=_split(args.cluster), models=_split(args.model), policies=_split(args.policy),
        rates=args.rate or (None,), prompt_tokens=args.prompt_tokens, shared=_settings(args),
        jobs=(os.cpu_count() or 1) if args.jobs is None else args.jobs,
        on_ray=args.ray is not None, ray_address=args.ray or None,
        stall_s=600.0 if args.point_timeout is None else args.point_timeout,
    )
    try:
        rows = grid.run(config)
    except grid.PointError as e:
        print(f"pdc simulate: error: {e}", file=sys.stderr)
        return 1
    document = grid.to_json(config, rows)
    print(json.dumps(document, indent=2) if args.json else grid.table(rows))
    if args.out is not None:
        _write_json(args.out, document)
    return 0


def _write_json(path: Path, document: dict) -> None:
    try:
        path.write_text(json.dumps(document, indent=2) + "\n")
    except OSError as e:
        raise ValueError(f"--out {path}: cannot write it ({e.strerror or e})") from None
    print(f"wrote {path}", file=sys.stderr)


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m scheduler.sim.cli ...``: the same flags as ``pdc simulate``."""
    parser = argparse.ArgumentParser(prog="python -m scheduler.sim.cli", description=__doc__.splitlines()[0])
    _add_arguments(parser)
    args = parser.parse_args(argv)
    try:
        return run_simulate(args)
    except ValueError as e:  # cluster files, traces, policies, placements, flags
        print(f"pdc simulate: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
