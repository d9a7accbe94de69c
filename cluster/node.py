"""Who a node is: its identity and profile as one frozen dataclass, and its mDNS TXT form.

`NodeInfo` is what the rest of pdcluster sees of a node, whichever source found it
(mDNS, a static ``--peers`` entry, the Ray backend). It is pure Python: zeroconf
lives in ``cluster/discovery.py`` only.

TXT record (DNS-SD, RFC 6763): one ``key=value`` string per field, each at most
255 bytes. Keys are short because the whole record should fit one packet:

====== ======================= ======
key    field                   format
====== ======================= ======
txtvers (schema version)       ``1``
id     node_id                 ``[A-Za-z0-9._-]{1,63}``
roles  roles                   ``prefill,decode`` (comma list)
engine engine                  ``[a-z0-9][a-z0-9._-]{0,31}`` (``torch``, ``mlx``, ...)
model  model_id                text
wfp    weights_fingerprint     text
grpc   grpc_port               int 1..65535 (the SRV port must agree)
kv     kv_port                 int 1..65535
dev    device                  text
tflops tflops                  float >= 0
bw     mem_bw_gbps             float >= 0 (GB/s)
mem    free_mem_bytes          int >= 0
ver    version                 text
kfp    key_fingerprint         text (fingerprint of the cluster key, never the key)
hw     hardware                catalog name (``dgx-spark``, ...) when declared, else empty
psrc   profile_source          ``measured`` | ``declared`` | ``measured+declared``
pp     prefill_probe           ``tokens:seconds`` pairs, comma list (``128:0.112,512:0.95``); absent: none
====== ======================= ======

The host is not in the TXT record: it comes from the service's A/AAAA records.
``hw`` and ``psrc`` came after the first release, so a record without them is
still version 1 and reads as ``""`` and ``"measured"`` (what those nodes did);
``pp`` likewise (absent: the node timed no prefill, as every node before it).
"""
from __future__ import annotations

import ipaddress
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass

ROLES = ("prefill", "decode")
SOURCES = ("mdns", "static", "ray")
PROFILE_SOURCES = ("measured", "declared", "measured+declared")  # where tflops and mem_bw_gbps came from
TXT_VERSION = "1"
MAX_TXT_ITEM_BYTES = 255  # one DNS character-string: a length byte, then up to 255 bytes

_NODE_ID_RE = re.compile(r"[A-Za-z0-9._-]{1,63}")
# Any well-formed engine name: which engines exist is the workers' business
# (workers/engines/registry.py), and a scheduler must list nodes running an
# engine newer than itself.
_ENGINE_RE = re.compile(r"[a-z0-9][a-z0-9._-]{0,31}")
_REQUIRED_KEYS = ("id", "roles", "engine", "model", "wfp", "kv", "dev", "tflops", "bw", "mem", "ver", "kfp")


@dataclass(frozen=True)
class NodeInfo:
    """One worker node as the scheduler sees it. Validated on construction."""

    node_id: str
    roles: tuple[str, ...]
    engine: str
    model_id: str
    weights_fingerprint: str
    host: str
    grpc_port: int
    kv_port: int
    device: str
    tflops: float
    mem_bw_gbps: float
    free_mem_bytes: int
    version: str
    key_fingerprint: str
    hardware: str = ""  # catalog name the node declared (scheduler/catalog.py); "" when not declared
    profile_source: str = "measured"  # one of PROFILE_SOURCES
    source: str = "static"
    # (prompt tokens, seconds) of the served model's prefill timed at start-up
    # (workers/rpc/profile.py); () when not timed (declared TFLOPS, older workers)
    prefill_probe: tuple[tuple[int, float], ...] = ()

    def __post_init__(self) -> None:
        if not isinstance(self.node_id, str) or not _NODE_ID_RE.fullmatch(self.node_id):
            raise ValueError(f"node_id {self.node_id!r}: need 1-63 characters from [A-Za-z0-9._-]")
        roles = tuple(self.roles)
        if not roles or any(r not in ROLES for r in roles) or len(set(roles)) != len(roles):
            raise ValueError(
                f"node {self.node_id}: roles {roles!r} must be a non-empty, duplicate-free subset of {ROLES}"
            )
        object.__setattr__(self, "roles", roles)
        if not isinstance(self.engine, str) or not _ENGINE_RE.fullmatch(self.engine):
            raise ValueError(f"node {self.node_id}: engine {self.engine!r} is not an engine name "
                             f"(1-32 characters from [a-z0-9._-], starting with a letter or digit)")
        if not isinstance(self.host, str) or not self.host:
            raise ValueError(f"node {self.node_id}: host must be a non-empty string")
        for name in ("grpc_port", "kv_port"):
            port = getattr(self, name)
            if isinstance(port, bool) or not isinstance(port, int) or not 1 <= port <= 65535:
                raise ValueError(f"node {self.node_id}: {name} {port!r} is not a port number 1..65535")
        for name in ("tflops", "mem_bw_gbps"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
                raise ValueError(f"node {self.node_id}: {name} {value!r} must be a finite number >= 0")
            object.__setattr__(self, name, float(value))
        if isinstance(self.free_mem_bytes, bool) or not isinstance(self.free_mem_bytes, int) or self.free_mem_bytes < 0:
            raise ValueError(f"node {self.node_id}: free_mem_bytes {self.free_mem_bytes!r} must be an int >= 0")
        for name in ("model_id", "weights_fingerprint", "device", "version", "key_fingerprint", "hardware"):
            if not isinstance(getattr(self, name), str):
                raise ValueError(f"node {self.node_id}: {name} must be a string")
        if self.profile_source not in PROFILE_SOURCES:
            raise ValueError(
                f"node {self.node_id}: profile_source {self.profile_source!r} is not one of {PROFILE_SOURCES}"
            )
        if self.source not in SOURCES:
            raise ValueError(f"node {self.node_id}: source {self.source!r} is not one of {SOURCES}")
        object.__setattr__(self, "prefill_probe", _check_probe(self.node_id, self.prefill_probe))

    @property
    def grpc_address(self) -> str:
        """``host:port`` of the control plane, with IPv6 hosts in brackets."""
        return f"{_bracket(self.host)}:{self.grpc_port}"

    @property
    def kv_address(self) -> str:
        """``host:port`` of the KV data plane, with IPv6 hosts in brackets."""
        return f"{_bracket(self.host)}:{self.kv_port}"

    @property
    def can_prefill(self) -> bool:
        return "prefill" in self.roles

    @property
    def can_decode(self) -> bool:
        return "decode" in self.roles

    def to_txt(self) -> dict[str, str]:
        """The mDNS TXT properties. Raises ``ValueError`` when an item exceeds 255 bytes."""
        txt = {
            "txtvers": TXT_VERSION,
            "id": self.node_id,
            "roles": ",".join(self.roles),
            "engine": self.engine,
            "model": self.model_id,
            "wfp": self.weights_fingerprint,
            "grpc": str(self.grpc_port),
            "kv": str(self.kv_port),
            "dev": self.device,
            "tflops": repr(self.tflops),
            "bw": repr(self.mem_bw_gbps),
            "mem": str(self.free_mem_bytes),
            "ver": self.version,
            "kfp": self.key_fingerprint,
            "hw": self.hardware,
            "psrc": self.profile_source,
        }
        if self.prefill_probe:
            txt["pp"] = ",".join(f"{n}:{t:.6g}" for n, t in self.prefill_probe)
        for key, value in txt.items():
            size = len(key.encode()) + 1 + len(value.encode())
            if size > MAX_TXT_ITEM_BYTES:
                raise ValueError(
                    f"node {self.node_id}: TXT item {key!r} is {size} bytes, over the {MAX_TXT_ITEM_BYTES}-byte limit"
                )
        return txt

    @classmethod
    def from_txt(
        cls,
        props: Mapping[bytes | str, bytes | str | None],
        host: str,
        port: int | None = None,
        source: str = "mdns",
    ) -> NodeInfo:
        """Parse TXT properties (as zeroconf hands them over) into a ``NodeInfo``.

        ``port`` is the SRV port, which is the gRPC port; when given it must agree with
        the TXT ``grpc`` item if there is one. Missing, garbled or oversized items
        raise ``ValueError`` naming the item.
        """
        try:
            txt = _decode_props(props)
        except ValueError as err:
            raise ValueError(f"TXT from {host}: {err}") from None
        where = f"TXT from {host}" + (f" (node {txt['id']!r})" if "id" in txt else "")
        version = txt.get("txtvers", TXT_VERSION)
        if version != TXT_VERSION:
            raise ValueError(f"{where}: TXT version {version!r} is not supported (this build reads {TXT_VERSION!r})")
        missing = [key for key in _REQUIRED_KEYS if key not in txt]
        if port is None and "grpc" not in txt:
            missing.append("grpc")
        if missing:
            raise ValueError(f"{where}: missing TXT items {missing}")
        grpc_port = port if port is not None else _parse_int(txt, "grpc", where)
        if port is not None and "grpc" in txt and _parse_int(txt, "grpc", where) != port:
            raise ValueError(f"{where}: TXT grpc={txt['grpc']!r} disagrees with the SRV port {port}")
        try:
            return cls(
                node_id=txt["id"],
                roles=tuple(txt["roles"].split(",")) if txt["roles"] else (),
                engine=txt["engine"],
                model_id=txt["model"],
                weights_fingerprint=txt["wfp"],
                host=host,
                grpc_port=grpc_port,
                kv_port=_parse_int(txt, "kv", where),
                device=txt["dev"],
                tflops=_parse_float(txt, "tflops", where),
                mem_bw_gbps=_parse_float(txt, "bw", where),
                free_mem_bytes=_parse_int(txt, "mem", where),
                version=txt["ver"],
                key_fingerprint=txt["kfp"],
                hardware=txt.get("hw", ""),
                profile_source=txt.get("psrc", "measured"),
                source=source,
                prefill_probe=_parse_probe(txt.get("pp", ""), where),
            )
        except ValueError as err:
            if str(err).startswith(where):
                raise
            raise ValueError(f"{where}: {err}") from None


def _check_probe(node_id: str, probe: object) -> tuple[tuple[int, float], ...]:
    """``probe`` as a tuple of (tokens >= 1, finite seconds > 0) pairs; ``ValueError`` otherwise."""
    try:
        points = tuple((n, t) for n, t in probe)  # type: ignore[union-attr]
    except (TypeError, ValueError):
        raise ValueError(f"node {node_id}: prefill_probe {probe!r} must be (tokens, seconds) pairs") from None
    for n, t in points:
        if (isinstance(n, bool) or not isinstance(n, int) or n < 1 or isinstance(t, bool)
                or not isinstance(t, (int, float)) or not math.isfinite(t) or t <= 0):
            raise ValueError(f"node {node_id}: prefill_probe point {(n, t)!r}: need tokens >= 1 and seconds > 0")
    return tuple((n, float(t)) for n, t in points)


def _parse_probe(text: str, where: str) -> tuple[tuple[int, float], ...]:
    """TXT ``pp`` (``128:0.112,512:0.95``) -> pairs; checked by ``NodeInfo`` itself."""
    points = []
    for item in filter(None, text.split(",")):
        tokens, _, seconds = item.partition(":")
        try:
            points.append((int(tokens), float(seconds)))
        except ValueError:
            raise ValueError(f"{where}: TXT pp item {item!r} is not tokens:seconds") from None
    return tuple(points)


def _decode_props(props: Mapping[bytes | str, bytes | str | None]) -> dict[str, str]:
    """TXT properties as ``str -> str``; items with no value are left out (they count as missing)."""
    txt: dict[str, str] = {}
    for raw_key, raw_value in props.items():
        key = _to_str(raw_key, "key", raw_key)
        if raw_value is None:
            continue
        value = _to_str(raw_value, f"item {key!r}", raw_value)
        size = len(key.encode()) + 1 + len(value.encode())
        if size > MAX_TXT_ITEM_BYTES:
            raise ValueError(f"TXT item {key!r} is {size} bytes, over the {MAX_TXT_ITEM_BYTES}-byte limit")
        txt[key.lower()] = value
    return txt


def _to_str(raw: bytes | str, what: str, shown: object) -> str:
    if isinstance(raw, str):
        return raw
    if isinstance(raw, (bytes, bytearray)):
        try:
            return bytes(raw).decode("utf-8")
        except UnicodeDecodeError:
            raise ValueError(f"TXT {what} {shown!r} is not UTF-8") from None
    raise ValueError(f"TXT {what} {shown!r} is neither bytes nor str")


def _parse_int(txt: dict[str, str], key: str, where: str) -> int:
    value = txt[key]
    if not value.isascii() or not value.isdigit():
        raise ValueError(f"{where}: TXT {key}={value!r} is not a non-negative integer")
    return int(value)


def _parse_float(txt: dict[str, str], key: str, where: str) -> float:
    value = txt[key]
    try:
        number = float(value)
    except ValueError:
        raise ValueError(f"{where}: TXT {key}={value!r} is not a number") from None
    if not math.isfinite(number) or number < 0:
        raise ValueError(f"{where}: TXT {key}={value!r} must be a finite number >= 0")
    return number


def _bracket(host: str) -> str:
    try:
        return f"[{host}]" if ipaddress.ip_address(host).version == 6 else host
    except ValueError:
        return host
