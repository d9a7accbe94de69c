"""``pdc simulate --sweep``: a grid of simulations, run in local processes or as Ray tasks.

NOTE on the sweep. The grid is the cartesian product of the values of
``--cluster``, ``--model``, ``--policy``, ``--rate`` and ``--prompt-tokens``, in
that order: the last axis varies fastest, and a point's index is its place in
that order. Before anything runs, the driver reads every cluster file and every
config.json model once and checks every point (its ``SimConfig``, its policy,
its model on its cluster); a bad value fails the whole sweep, naming a point
that uses it. A point is then plain data (the parsed cluster, the model's
config dict), so a worker on another machine needs pdcluster installed but
none of the files. A custom policy is the exception: it is imported by name
where the point runs (a ``file.py:Class`` by its absolute path). Each point
is one simulation of one policy, seeded by ``--seed``, so its row depends on
the point alone: local processes and Ray give the same rows, and rows come
back in grid order whatever order the points finish in. Only ``_on_ray``
imports ray.
"""
from __future__ import annotations

import contextlib
import itertools
import json
import logging
import multiprocessing
import sys
import tempfile
import time
import traceback
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from tqdm import tqdm

from scheduler import catalog
from scheduler.policy import load_policy
from scheduler.sim import cluster_file
from scheduler.sim.cli import PolicyRun, SimConfig, resolve, run_policy, workload
from scheduler.sim.engine import build_cluster
from scheduler.sim.report import _format, _s

SHARED = frozenset(f.name for f in fields(SimConfig)) - {"cluster", "model", "policies", "rate", "prompt_tokens",
                                                          "trace"}
MAX_PROBLEMS = 8  # distinct problems listed when a grid is refused
BAD_VALUE = (ValueError, catalog.CatalogError)  # what a bad flag value raises while the driver checks points


class SweepError(ValueError):
    """A grid that cannot run (nothing ran), or Ray that cannot be used; the message says which point or flag."""


class PointError(RuntimeError):
    """A point that failed while it ran; the message names the point. One string argument, so it pickles
    back from a process pool or a Ray task whatever the original exception was."""


@dataclass(frozen=True)
class SweepConfig:
    """One ``pdc simulate --sweep``: the grid's axes, the settings every point shares, where points run."""

    clusters: tuple[str, ...]  # cluster files, as given
    models: tuple[str, ...]  # catalog names or config.json paths
    policies: tuple[str, ...]  # built-in names, module:Class or file.py:Class
    rates: tuple[float | None, ...] = (None,)  # None: one request at time 0
    prompt_tokens: tuple[int, ...] = (2048,)
    shared: Mapping[str, Any] = field(default_factory=dict)  # SimConfig's other fields (SHARED)
    jobs: int = 1  # local worker processes
    on_ray: bool = False
    ray_address: str | None = None  # ray.init's address; None: Ray's default (RAY_ADDRESS, a local cluster, a new one)
    stall_s: float = 600.0  # give up when no point has finished for this long

    def __post_init__(self) -> None:
        for flag, values in (("--cluster", self.clusters), ("--model", self.models), ("--policy", self.policies),
                             ("--rate", self.rates), ("--prompt-tokens", self.prompt_tokens)):
            if not values:
                raise SweepError(f"{flag} needs at least one value")
            repeated = [v for v, n in Counter(values).items() if n > 1]
            if repeated:
                raise SweepError(f"{flag} lists {repeated[0]!r} twice")
        unknown = sorted(set(self.shared) - SHARED)
        if unknown:
            raise SweepError(f"not a setting a sweep's points share: {unknown[0]!r}")
        if self.jobs < 1 or self.stall_s <= 0:
            raise SweepError("--jobs must be >= 1 and --point-timeout > 0")

    @property
    def num_points(self) -> int:
        return len(self.clusters) * len(self.models) * len(self.policies) * len(self.rates) * len(self.prompt_tokens)

    def grid(self) -> Iterator[tuple[str, str, str, float | None, int]]:
        """(cluster, model, policy, rate, prompt tokens) of every point, in grid order."""
        return itertools.product(self.clusters, self.models, self.policies, self.rates, self.prompt_tokens)


@dataclass(frozen=True)
class SweepPoint:
    """One point of the grid: its parameters as given, and all a worker needs to simulate it."""

    index: int
    cluster: str  # the cluster file, as given
    model: str  # as given
    policy: str  # as given
    config: SimConfig  # the cluster parsed; one policy (a file.py policy by its absolute path)
    model_config: dict | None = None  # a config.json model's contents, read on the driver; None for a catalog name

    def params(self) -> dict[str, Any]:
        """The point's row fields that name it."""
        return {"point": self.index, "cluster": self.cluster, "model": self.model, "policy": self.policy,
                "rate": self.config.rate, "prompt_tokens": self.config.prompt_tokens, "seed": self.config.seed}

    def describe(self) -> str:
        """``point 7 (cluster=..., model=..., policy=..., rate=..., prompt_tokens=...)``."""
        return _describe_point(self.index, self.cluster, self.model, self.policy, self.config.rate,
                               self.config.prompt_tokens)


def _describe_point(index: int, cluster: str, model: str, policy: str, rate: float | None, prompt_tokens: int) -> str:
    return (f"point {index} (cluster={cluster}, model={model}, policy={policy}, "
            f"rate={'-' if rate is None else f'{rate:g}'}, prompt_tokens={prompt_tokens})")


# ---------------------------------------------------------------- the grid, checked on the driver


def build_points(config: SweepConfig) -> list[SweepPoint]:
    """Every point of the grid in grid order, each checked; SweepError listing every distinct
    problem (with the first point it spoils and how many it spoils) if any point cannot run."""
    clusters = _each(config.clusters, cluster_file.load)
    models = _each(config.models, _model_data)
    policies = _each(config.policies, load_policy)
    resolved: dict[tuple[str, str], Exception | None] = {}  # (cluster, model) -> why it does not resolve
    points, problems = [], {}
    for index, (cluster, model, policy, rate, prompt_tokens) in enumerate(config.grid()):
        try:
            for loaded in (clusters[cluster], models[model], policies[policy]):
                if isinstance(loaded, BAD_VALUE):
                    raise loaded
            point_config = SimConfig(cluster=clusters[cluster], model=model, policies=(_absolute(policy),),
                                     rate=rate, prompt_tokens=prompt_tokens, **config.shared)
            if (cluster, model) not in resolved:
                resolved[cluster, model] = _attempt(lambda c=point_config: resolve(c))
            if resolved[cluster, model] is not None:
                raise resolved[cluster, model]
        except BAD_VALUE as e:
            problems.setdefault(str(e), []).append(
                _describe_point(index, cluster, model, policy, rate, prompt_tokens))
            continue
        points.append(SweepPoint(index, cluster, model, policy, point_config, models[model]))
    if problems:
        raise SweepError(_problem_report(problems, config.num_points))
    return points


def _each(values: Iterable[str], load: Callable[[str], Any]) -> dict[str, Any]:
    """value -> what ``load`` makes of it, or the BAD_VALUE error it raised."""
    return {value: _attempt(lambda v=value: load(v), keep_result=True) for value in values}


def _attempt(call: Callable[[], Any], *, keep_result: bool = False) -> Any:
    """``call()``'s BAD_VALUE error, else its result (``keep_result``) or None."""
    try:
        result = call()
    except BAD_VALUE as e:
        return e
    return result if keep_result else None


def _model_data(model: str) -> dict | None:
    """None for a catalog model (every worker has the catalog); a config.json model's checked contents."""
    return None if model in catalog.MODELS else catalog.model_config(model)


def _absolute(policy: str) -> str:
    """A ``file.py:Class`` policy by its absolute path (workers need not share the driver's directory)."""
    where, _, name = policy.rpartition(":")
    return f"{Path(where).resolve()}:{name}" if where.endswith(".py") else policy


def _problem_report(problems: dict[str, list[str]], num_points: int) -> str:
    num_bad = sum(len(points) for points in problems.values())
    lines = [f"{num_bad} of {num_points} sweep points cannot run (nothing was run):"]
    for why, points in itertools.islice(problems.items(), MAX_PROBLEMS):
        more = f" and {len(points) - 1} more" if len(points) > 1 else ""
        lines.append(f"  {points[0]}{more}: {why}")
    if len(problems) > MAX_PROBLEMS:
        lines.append(f"  ... and {len(problems) - MAX_PROBLEMS} more problems")
    return "\n".join(lines)


# ---------------------------------------------------------------- one point, wherever it runs


def run_point(point: SweepPoint) -> dict[str, Any]:
    """Simulate one point; its row. Raises PointError naming the point if anything fails."""
    config = point.config
    try:
        with _model_reference(point) as model:
            cluster = build_cluster(config.cluster, model, engine=config.engine, weight_format=config.weight_format)
        run = run_policy(cluster, config.policies[0], workload(config), config)
    except Exception as e:  # noqa: BLE001 - a user policy may raise anything: name the point, not a traceback
        raise PointError(f"{point.describe()}: {_explain(e)}") from None
    return to_row(point, run)


def _run_indexed(point: SweepPoint) -> tuple[int, dict[str, Any]]:
    return point.index, run_point(point)


@contextlib.contextmanager
def _model_reference(point: SweepPoint) -> Iterator[str]:
    """What ``build_cluster`` takes for the point's model: the catalog name, or a config.json
    written from the driver's copy (named as the driver would name it: its _name_or_path or path)."""
    if point.model_config is None:
        yield point.model
        return
    with tempfile.TemporaryDirectory(prefix="pdc-sweep-") as folder:
        path = Path(folder) / "config.json"
        named = {**point.model_config, "_name_or_path": point.model_config.get("_name_or_path") or point.model}
        path.write_text(json.dumps(named))
        yield str(path)


def _explain(error: Exception) -> str:
    if isinstance(error, ValueError):  # our own errors say what went wrong
        return str(error)
    frames = traceback.extract_tb(error.__traceback__)
    where = f" ({frames[-1].filename}:{frames[-1].lineno})" if frames else ""
    return f"{type(error).__name__}: {error}{where}"


def to_row(point: SweepPoint, run: PolicyRun) -> dict[str, Any]:
    """One JSON row: the point's parameters and seed, its summary flattened
    (``ttft_s.p50`` -> ``ttft_p50_s``), and where its requests were placed."""
    row = point.params()
    for key, value in run.summary.to_json().items():
        if isinstance(value, dict):  # percentiles
            row.update({f"{key.removesuffix('_s')}_{p}_s": v for p, v in value.items()})
        else:
            row[key] = value
    placed = Counter(r.decode_node if r.colocated else f"{r.prefill_node}->{r.decode_node}" for r in run.requests)
    row["num_remote"] = sum(not r.colocated for r in run.requests)
    row["placements"] = dict(sorted(placed.items()))
    return row


# ---------------------------------------------------------------- running the grid


def run(config: SweepConfig) -> list[dict[str, Any]]:
    """Check every point, run them (local processes or Ray tasks), and return their rows in
    grid order. SweepError before anything runs; PointError naming the first point that fails."""
    points = build_points(config)
    processes = f"{config.jobs} process" + ("es" if config.jobs > 1 else "")
    where = f"on Ray ({config.ray_address or 'default'})" if config.on_ray else f"in {processes}"
    finished = _on_ray(_connect_ray(config), points, config) if config.on_ray else _in_processes(points, config)
    rows: dict[int, dict[str, Any]] = {}
    start = time.monotonic()
    with contextlib.closing(finished), tqdm(total=len(points), unit="point", desc="sweep", file=sys.stderr) as bar:
        for index, row in finished:
            rows[index] = row
            bar.update()
    print(f"swept {len(points)} point{'s' if len(points) > 1 else ''} in {time.monotonic() - start:.1f} s {where}",
          file=sys.stderr)
    return [rows[point.index] for point in points]


def _in_processes(points: list[SweepPoint], config: SweepConfig) -> Iterator[tuple[int, dict[str, Any]]]:
    """(index, row) as points finish in a pool of spawned processes; the pool is killed on any failure."""
    context = multiprocessing.get_context("spawn")  # no fork: the driver may hold threads (tqdm, grpc)
    unfinished = {point.index: point for point in points}
    with context.Pool(min(config.jobs, len(points))) as pool:  # __exit__ terminates the workers
        finished = pool.imap_unordered(_run_indexed, points)
        while unfinished:
            try:
                index, row = finished.next(timeout=config.stall_s)
            except multiprocessing.TimeoutError:
                raise PointError(_stalled(config, list(unfinished.values()))) from None
            del unfinished[index]
            yield index, row


def _connect_ray(config: SweepConfig) -> Any:
    """The ray module, connected to the cluster ``config`` names; SweepError if it cannot be."""
    ray = _import_ray()
    _check_reachable(_dialled_address(ray, config.ray_address))
    try:
        ray.init(address=config.ray_address, logging_level=logging.WARNING)
    except (ConnectionError, RuntimeError) as e:
        raise SweepError(f"--ray: cannot join the Ray cluster at {config.ray_address or 'the default address'}: "
                         f"{e}. If it uses token authentication, set RAY_AUTH_MODE=token and RAY_AUTH_TOKEN "
                         "(or RAY_AUTH_TOKEN_PATH) here too") from None
    return ray


def _on_ray(ray: Any, points: list[SweepPoint], config: SweepConfig) -> Iterator[tuple[int, dict[str, Any]]]:
    """(index, row) as points finish, each point one Ray task (one CPU); ray.wait is bounded by stall_s.
    Disconnects from Ray (cancelling what is left) when done or failed."""
    pending: dict[Any, SweepPoint] = {}
    try:
        task = ray.remote(num_cpus=1)(run_point)
        pending = {task.remote(point): point for point in points}
        while pending:
            done, _ = ray.wait(list(pending), num_returns=1, timeout=config.stall_s)
            if not done:
                raise PointError(_stalled(config, list(pending.values())))
            point = pending.pop(done[0])
            yield point.index, _ray_result(ray, done[0], point)
    finally:
        for ref in pending:
            ray.cancel(ref, force=True)
        ray.shutdown()


def _import_ray() -> Any:
    try:
        import ray
    except ImportError:
        raise SweepError("--ray needs Ray, which is not installed: pip install 'pdcluster[ray]'") from None
    return ray


def _dialled_address(ray: Any, address: str | None) -> str | None:
    """The GCS HOST:PORT ``ray.init(address)`` will dial (cluster/ray_backend.py), as a SweepError."""
    from cluster.ray_backend import dialled_address

    try:
        return dialled_address(address)
    except ValueError as e:
        raise SweepError(f"--ray {address or ''}: {e}".replace(" :", ":")) from None


def _check_reachable(address: str | None) -> None:
    """Fail fast where ray.init would wait forever (cluster/ray_backend.py), as a SweepError."""
    from cluster.ray_backend import check_reachable

    try:
        check_reachable(address)
    except ValueError as e:
        raise SweepError(f"--ray: {e}") from None


def _ray_result(ray: Any, ref: Any, point: SweepPoint) -> dict[str, Any]:
    """The finished task's row; PointError naming the point if it raised or Ray lost it."""
    try:
        return ray.get(ref, timeout=60)
    except ray.exceptions.RayTaskError as e:
        if isinstance(e.cause, PointError):
            raise PointError(str(e.cause)) from None
        raise PointError(f"{point.describe()}: {e.cause or e}") from None
    except ray.exceptions.RayError as e:  # a worker or node died, the task was cancelled, ...
        raise PointError(f"{point.describe()}: Ray could not run it: {e}") from None


def _stalled(config: SweepConfig, unfinished: list[SweepPoint]) -> str:
    """Why the sweep stopped waiting, naming the first point still queued or running."""
    why = "a point runs that long or never returns (a policy's endless loop?)" + (
        ", or the Ray cluster has no free CPU for the tasks" if config.on_ray else "")
    more = f" and {len(unfinished) - 1} more" if len(unfinished) > 1 else ""
    return (f"no sweep point finished within --point-timeout {config.stall_s:g} s: {why}; stopped the sweep with "
            f"{unfinished[0].describe()}{more} unfinished")


# ---------------------------------------------------------------- output


def to_json(config: SweepConfig, rows: list[dict[str, Any]]) -> dict[str, Any]:
    """The sweep's JSON document: its axes, the settings every point shared, and a row per point in
    grid order. It holds nothing about where or how fast points ran, so local and Ray runs of one
    grid give the same document."""
    axes = {"cluster": list(config.clusters), "model": list(config.models), "policy": list(config.policies),
            "rate": list(config.rates), "prompt_tokens": list(config.prompt_tokens)}
    return {"axes": axes, "settings": dict(sorted(config.shared.items())), "num_points": len(rows), "rows": rows}


def table(rows: list[dict[str, Any]]) -> str:
    """The readable table: one line per point; goodput only when an SLO was set."""
    with_slo = any(row["slo_ttft_s"] is not None or row["slo_tpot_s"] is not None for row in rows)
    header = ("point", "cluster", "model", "policy", "rate", "prompt", "ttft p50/p99 s", "e2e p50 s", "tok/s",
              *(("goodput req/s",) if with_slo else ()), "remote")
    lines = [
        (str(row["point"]), Path(row["cluster"]).stem, row["model"], row["policy"],
         "-" if row["rate"] is None else f"{row['rate']:g}", str(row["prompt_tokens"]),
         f"{_s(row['ttft_p50_s'])}/{_s(row['ttft_p99_s'])}", _s(row["e2e_p50_s"]), f"{row['throughput_tok_s']:.1f}",
         *((f"{row['goodput_req_s']:.3f} ({row['num_within_slo']}/{row['num_requests']})",) if with_slo else ()),
         f"{row['num_remote']}/{row['num_requests']}")
        for row in rows
    ]
    return _format(header, lines)
