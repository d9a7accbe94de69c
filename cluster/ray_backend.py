"""pdcluster on a Ray cluster: workers as named, detached Ray actors, and Ray as a node source.

Ray does what it is good at here, and nothing more:

* **placement**: each worker is an actor asking for a custom resource
  (``{"pdc_prefill": 1}``, ``{"pdc_decode": 1}`` by default) that a machine
  offers with ``ray start --resources=...``; Ray picks the node;
* **naming**: actors are detached and named in the namespace ``pdcluster``
  (``pdc-prefill-0``, ...), so any driver finds them and they outlive ``pdc ray up``;
* **restarts**: with ``--restart`` an actor has ``max_restarts=-1``; Ray reruns its
  constructor, which starts the worker service again (new ports, same node id).

Each actor runs the same worker service as ``pdc worker`` (gRPC control plane,
KV data plane, cluster key, leases) on a thread of its process, bound to its
Ray node's IP. KV streams go worker to worker over that data plane; Ray's
object store carries no KV. The cluster key never travels through Ray: an
actor reads it on its own node (``--cluster-key-file`` names a path there, by
default the node's ``$PDC_CLUSTER_KEY`` or ``pdc init`` file), so every call
between scheduler and workers stays keyed whatever Ray's own security.

Only ``pdc ray ...``, ``pdc serve --ray`` and ``pdc status --ray`` import this
module; it is the only one that imports ray.
"""
from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import threading
import time
from dataclasses import asdict, dataclass, field
from typing import Any

import ray

log = logging.getLogger(__name__)

NAMESPACE = "pdcluster"
DEFAULT_RESOURCES = {"prefill": {"pdc_prefill": 1.0}, "decode": {"pdc_decode": 1.0}}
DEFAULT_ENGINES = {"prefill": "torch", "decode": "mlx"}
ACTOR_CONCURRENCY = 4  # describe() must answer while ready() waits on a loading model
STOP_GRACE_S = 10.0
CONNECT_TIMEOUT_S = 5.0  # the TCP probe of the GCS before ray.init, which would wait forever


@dataclass(frozen=True)
class ActorSpec:
    """What one worker actor runs. Paths are read on the node Ray places the actor on."""

    name: str  # the actor's name in NAMESPACE, and the worker's node id
    role: str  # prefill | decode | both
    engine: str
    model: str | None = None  # folder, hub id or built-in model name (None: the built-in default)
    cluster_key_file: str | None = None  # None: the node's $PDC_CLUSTER_KEY, else its `pdc init` file
    model_id: str | None = None
    dtype: str | None = None
    device: str | None = None


@dataclass(frozen=True)
class ActorState:
    """One actor as ``describe`` reports it (also what ``pdc ray status`` prints)."""

    name: str
    role: str
    engine: str
    state: str  # starting | ready | failed | stopped
    error: str = ""
    grpc_address: str = ""
    kv_address: str = ""
    ray_node_id: str = ""
    node_ip: str = ""
    resources: dict[str, float] = field(default_factory=dict)
    key_fingerprint: str = ""
    model_id: str = ""
    device: str = ""
    restarted: bool = False  # Ray reconstructed this actor after a failure
    pid: int = 0


class WorkerActor:
    """The body of one Ray actor: a pdc worker service on a thread of the actor process.

    The constructor starts it (so a restarted actor serves again without being
    asked); ``ready`` waits for it; ``stop`` ends it with the worker's grace period.
    """

    def __init__(self, spec: ActorSpec) -> None:
        context = ray.get_runtime_context()
        self.spec = spec
        self._base = dict(name=spec.name, role=spec.role, engine=spec.engine, ray_node_id=context.get_node_id(),
                          node_ip=ray.util.get_node_ip_address(), resources=context.get_assigned_resources(),
                          restarted=context.was_current_actor_reconstructed, pid=os.getpid())
        self._state, self._error, self._node = "starting", "", None
        self._ready = threading.Event()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stopping: asyncio.Event | None = None
        self._thread = threading.Thread(target=lambda: asyncio.run(self._serve()), name=f"pdc-{spec.name}",
                                        daemon=True)
        self._thread.start()

    async def _serve(self) -> None:
        from cluster.auth import load_cluster_key
        from workers.rpc.server import Worker, WorkerConfig
        from workers.tools.builtin import DEFAULT_MODEL, resolve_model

        spec = self.spec
        try:
            config = WorkerConfig(
                role=spec.role, engine=spec.engine, model=resolve_model(spec.model or DEFAULT_MODEL),
                cluster_key=load_cluster_key(spec.cluster_key_file), host=self._base["node_ip"],
                node_id=spec.name, model_id=spec.model_id, dtype=spec.dtype, device=spec.device, advertise=False,
            )
            worker = Worker(config)
            await worker.start()
        except Exception as e:  # reported by ready() and describe(); the actor stays up to say so
            log.exception("worker actor %s failed to start", spec.name)
            self._state, self._error = "failed", f"{type(e).__name__}: {e}"
            self._ready.set()
            return
        self._loop, self._stopping = asyncio.get_running_loop(), asyncio.Event()
        self._node, self._state = worker.node_info(), "ready"
        log.info("worker actor %s serving: grpc %s", spec.name, worker.grpc_address)
        self._ready.set()
        try:
            await self._stopping.wait()
        finally:
            await worker.stop()
            self._state = "stopped"

    def ready(self, timeout_s: float) -> dict[str, Any]:
        """Wait up to ``timeout_s`` for the worker to serve; its ``describe()``. Raises when it failed."""
        if not self._ready.wait(timeout_s):
            raise TimeoutError(f"worker actor {self.spec.name} did not start within {timeout_s:g} s")
        if self._state == "failed":
            raise RuntimeError(f"worker actor {self.spec.name} failed to start: {self._error}")
        return self.describe()

    def describe(self) -> dict[str, Any]:
        """This actor's ``ActorState`` as a dict (plain data crosses Ray without pickling our classes)."""
        node = self._node or {}
        host = node.get("host", "")
        bracketed = f"[{host}]" if ":" in host else host
        return asdict(ActorState(
            **self._base, state=self._state, error=self._error,
            grpc_address=f"{bracketed}:{node['grpc_port']}" if node else "",
            kv_address=f"{bracketed}:{node['kv_port']}" if node else "",
            key_fingerprint=node.get("key_fingerprint", ""), model_id=node.get("model_id", ""),
            device=node.get("device", ""),
        ))

    def stop(self) -> bool:
        """Stop serving (in-flight calls get the worker's grace period); True once stopped."""
        if self._loop is not None and self._stopping is not None:
            self._loop.call_soon_threadsafe(self._stopping.set)
        self._thread.join(STOP_GRACE_S)
        return not self._thread.is_alive()


# ---------------------------------------------------------------- driver side


def dialled_address(address: str | None) -> str | None:
    """The GCS HOST:PORT that ``ray.init(address)`` will dial: the one given, RAY_ADDRESS, or the cluster
    of the last ``ray start`` here; None when Ray would start a cluster of its own or use a ray:// client.
    Ray's own resolver (private: the function ray.init calls), the one version-specific call here.
    ValueError for ``auto`` with no cluster running here, or a malformed address."""
    if address and "://" in address:
        return None
    resolve = getattr(getattr(getattr(ray, "_private", None), "services", None),
                      "canonicalize_bootstrap_address", None)
    if resolve is None:  # another Ray: probe what was given
        return address or os.environ.get("RAY_ADDRESS") or None
    try:
        return resolve(address)
    except (ConnectionError, ValueError) as e:
        raise ValueError(str(e)) from None


def check_reachable(address: str | None) -> None:
    """Fail fast where ray.init would wait forever: ValueError when nothing listens at HOST:PORT."""
    host, _, port = (address or "").rpartition(":")
    if not host or not port.isdigit():
        return
    try:
        with socket.create_connection((host.strip("[]"), int(port)), timeout=CONNECT_TIMEOUT_S):
            pass
    except OSError as e:
        raise ValueError(f"no Ray cluster answers at {address} ({e.strerror or e}); start one there "
                         "(ray start --head) or give the address of one") from None


def connect(address: str | None) -> None:
    """Join the Ray cluster at ``address`` (None: ``$RAY_ADDRESS``, else the one running on this
    machine) in the ``pdcluster`` namespace. Never starts a cluster, never waits on an address where
    nothing listens: ``ValueError`` saying what to do."""
    if ray.is_initialized():
        return
    target = address or os.environ.get("RAY_ADDRESS") or "auto"
    try:
        check_reachable(dialled_address(target))
    except ValueError as e:
        raise ValueError(f"cannot join the Ray cluster at {target}: {e}") from None
    try:
        ray.init(address=target, namespace=NAMESPACE, log_to_driver=False, logging_level=logging.WARNING)
    except (ConnectionError, RuntimeError, ValueError) as e:
        raise ValueError(
            f"cannot join the Ray cluster at {target}: {e}. Start one with `ray start --head` (see docs/ray.md); "
            "if it uses token authentication, set RAY_AUTH_MODE=token and RAY_AUTH_TOKEN (or RAY_AUTH_TOKEN_PATH) "
            "here too") from None


def actor_class(spec: ActorSpec, resources: dict[str, float], *, restart: bool) -> Any:
    """The Ray actor class for ``spec``: named and detached in NAMESPACE, asking for ``resources``
    (``CPU`` and ``GPU`` keys become num_cpus / num_gpus, the rest custom resources)."""
    custom = {k: float(v) for k, v in resources.items() if k not in ("CPU", "GPU")}
    return ray.remote(WorkerActor).options(
        name=spec.name, namespace=NAMESPACE, lifetime="detached", get_if_exists=False,
        num_cpus=float(resources.get("CPU", 0)), num_gpus=float(resources.get("GPU", 0)), resources=custom,
        max_restarts=-1 if restart else 0, max_concurrency=ACTOR_CONCURRENCY,
    )


def worker_names() -> list[str]:
    """Names of the actors in NAMESPACE, sorted."""
    return sorted(a["name"] for a in ray.util.list_named_actors(all_namespaces=True) if a["namespace"] == NAMESPACE)


def start_workers(specs: list[tuple[ActorSpec, dict[str, float]]], *, restart: bool,
                  timeout_s: float) -> list[dict[str, Any]]:
    """Create every actor, then wait (at most ``timeout_s`` in all) until each serves.

    Refuses names already taken. When any fails or times out, removes every actor it
    created and raises ``RuntimeError`` naming each failure."""
    taken = set(worker_names()) & {spec.name for spec, _ in specs}
    if taken:
        raise ValueError(f"Ray actors {sorted(taken)} already exist in namespace {NAMESPACE!r}: "
                         "`pdc ray down` first, or choose another --prefix")
    handles = [actor_class(spec, resources, restart=restart).remote(spec) for spec, resources in specs]
    refs = [handle.ready.remote(timeout_s) for handle in handles]
    ready, _ = ray.wait(refs, num_returns=len(refs), timeout=timeout_s + 5.0)
    states, problems = [], []
    for (spec, resources), ref in zip(specs, refs):
        if ref not in ready:
            problems.append(f"{spec.name}: not running within {timeout_s:g} s (does a node offer {resources}? "
                            "`ray status` lists what the nodes offer)")
            continue
        try:
            states.append(ray.get(ref))
        except Exception as e:
            problems.append(f"{spec.name}: {_ray_error(e)}")
    if problems:
        for handle in handles:
            with contextlib.suppress(Exception):
                ray.kill(handle, no_restart=True)
        raise RuntimeError("could not start every worker actor; removed the ones started:\n  "
                           + "\n  ".join(problems))
    return states


def describe_workers(timeout_s: float) -> list[dict[str, Any]]:
    """Every actor in NAMESPACE as ``describe`` reports it; an actor that is dead, restarting
    or silent for ``timeout_s`` reports state ``unreachable`` with the reason."""
    names = worker_names()
    refs, states = {}, {}
    for name in names:
        try:
            refs[name] = ray.get_actor(name, namespace=NAMESPACE).describe.remote()
        except Exception as e:  # gone between the listing and now
            states[name] = _unreachable(name, _ray_error(e))
    done, _ = ray.wait(list(refs.values()), num_returns=len(refs), timeout=timeout_s) if refs else ([], [])
    for name, ref in refs.items():
        if ref not in done:
            states[name] = _unreachable(name, f"no answer within {timeout_s:g} s (restarting or busy)")
            continue
        try:
            states[name] = ray.get(ref)
        except Exception as e:
            states[name] = _unreachable(name, _ray_error(e))
    return [states[name] for name in names]


def stop_workers(names: list[str], timeout_s: float = STOP_GRACE_S + 5.0) -> list[str]:
    """Stop each named actor's worker (its grace period), then remove the actor for good; the names removed."""
    handles = {}
    for name in names:
        with contextlib.suppress(ValueError):  # already gone
            handles[name] = ray.get_actor(name, namespace=NAMESPACE)
    refs = [handle.stop.remote() for handle in handles.values()]
    if refs:
        ray.wait(refs, num_returns=len(refs), timeout=timeout_s)
    for handle in handles.values():
        with contextlib.suppress(Exception):
            ray.kill(handle, no_restart=True)
    return sorted(handles)


class RaySource:
    """The scheduler's third node source: the grpc addresses of the ready worker actors.

    ``addresses()`` lists NAMESPACE on a thread of its own (Ray's calls block);
    the node table probes each address over the keyed control plane exactly as
    it probes a ``--peers`` entry, so the cluster key is checked the same way.
    """

    def __init__(self, address: str | None, timeout_s: float = 3.0) -> None:
        self.address, self.timeout_s = address, timeout_s
        self._connected = False
        self._lock = threading.Lock()  # one listing (and one connect attempt) at a time

    def describe(self) -> str:
        return f"Ray cluster {self.address or os.environ.get('RAY_ADDRESS') or 'auto'}, namespace {NAMESPACE}"

    async def addresses(self) -> dict[str, str]:
        """grpc address -> actor name, for every actor that reports itself ready."""
        return await asyncio.to_thread(self._addresses)

    def _addresses(self) -> dict[str, str]:
        if not self._lock.acquire(timeout=self.timeout_s):
            raise TimeoutError("the previous Ray listing has not finished")
        try:
            return self._list()
        finally:
            self._lock.release()

    def _list(self) -> dict[str, str]:
        if not self._connected:
            connect(self.address)  # fails fast where nothing listens
            self._connected = True
        started = time.monotonic()
        states = describe_workers(self.timeout_s)
        log.debug("listed %d Ray worker actors in %.3f s", len(states), time.monotonic() - started)
        return {s["grpc_address"]: s["name"] for s in states if s["state"] == "ready" and s["grpc_address"]}


def _unreachable(name: str, reason: str) -> dict[str, Any]:
    return asdict(ActorState(name=name, role="", engine="", state="unreachable", error=reason))


def _ray_error(error: BaseException) -> str:
    """One line for a Ray exception (their str() carries the remote traceback)."""
    cause = getattr(error, "cause", None)
    if cause is not None:
        return f"{type(cause).__name__}: {cause}"
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[-1] if text else ''}".rstrip(": ")
