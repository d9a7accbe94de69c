"""The cluster key: one shared secret that authenticates every plane, failing closed.

* **Where the key lives.** ``pdc init`` writes a random 32-byte key to
  ``$PDC_HOME/cluster.json`` (else ``~/.config/pdcluster/cluster.json``), mode
  0600. A process finds its key in this order: ``--cluster-key-file``, then
  ``$PDC_CLUSTER_KEY`` (hex), then that config file. Copy the same file (or
  value) to every node and to the scheduler. Only ``ClusterKey.fingerprint``
  is ever advertised or logged; it does not reveal the key.
* **Control plane (gRPC).** ``auth_interceptors(key)`` add metadata
  ``x-pdc-auth: <ts_ms>.<nonce>.<hmac>``, the HMAC-SHA256 under the key of
  ``method|ts_ms|nonce``. ``AuthServerInterceptor`` refuses any call whose
  token is missing, malformed, signed with another key or for another method,
  more than ``AUTH_WINDOW_S`` from the server's clock, or whose nonce it has
  already seen: the call ends ``UNAUTHENTICATED`` and the reason is logged.
* **Data plane (KV TCP).** Before any frame, ``server_handshake`` and
  ``client_handshake`` run a mutual challenge-response: the receiver sends a
  random challenge, the sender answers with its own challenge, the transfer
  token and an HMAC over both challenges and the token; the receiver answers
  with an HMAC proving it holds the key too. Either side closes the socket and
  raises ``AuthError`` on any failure.

The key authenticates; it does not encrypt. KV bytes and prompts cross the
network in the clear, so run a cluster on a network you trust (or a VPN).
"""
from __future__ import annotations

import contextlib
import hashlib
import hmac
import json
import logging
import os
import secrets
import socket
import stat
import struct
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
from grpc import aio

log = logging.getLogger(__name__)

KEY_BYTES = 32
MIN_KEY_BYTES = 16
KEY_ENV = "PDC_CLUSTER_KEY"
CONFIG_NAME = "cluster.json"

AUTH_METADATA = "x-pdc-auth"
AUTH_WINDOW_S = 60.0
MAX_REMEMBERED_NONCES = 200_000
_NONCE_HEX = 32

HANDSHAKE_MAGIC = b"PDAU"
HANDSHAKE_VERSION = 1
CHALLENGE_BYTES = 32
MAX_TOKEN_BYTES = 256
_MAC_BYTES = 32
_CLIENT_LABEL = b"pdc-kv-client\0"
_SERVER_LABEL = b"pdc-kv-server\0"


class AuthError(Exception):
    """A peer failed to prove it holds the cluster key (or the handshake broke)."""


class KVRefused(AuthError):
    """The KV receiver refused the connection and said why (``reason`` is one of ``REFUSALS``)."""

    def __init__(self, reason: str, detail: str = "") -> None:
        self.reason = reason
        super().__init__(f"the decode node's KV port refused the connection: {REFUSALS[reason]}"
                         + (f" ({detail})" if detail else ""))


# Why a KV receiver refuses a connection; the code byte travels in the refusal
# message, so both sides name the same cause.
REFUSALS = {
    "busy": "too many unauthenticated connections",
    "wrong-key": "wrong cluster key",
    "token": "unknown, used or expired transfer token",
    "full": "too many transfers in progress",
}
_REFUSAL_CODES = {reason: code for code, reason in enumerate(REFUSALS, start=1)}
REFUSE_MAGIC = b"PDNO"


class ClusterKeyError(ValueError):
    """No usable cluster key was configured."""


# ---------------------------------------------------------------- the key


@dataclass(frozen=True, repr=False)
class ClusterKey:
    """The shared secret. Its repr shows the fingerprint, never the secret."""

    secret: bytes

    def __repr__(self) -> str:
        return f"ClusterKey(fingerprint={self.fingerprint!r})"

    def __post_init__(self) -> None:
        if not isinstance(self.secret, bytes) or len(self.secret) < MIN_KEY_BYTES:
            raise ClusterKeyError(f"a cluster key needs at least {MIN_KEY_BYTES} bytes of secret")

    @property
    def fingerprint(self) -> str:
        """16 hex digits identifying the key; safe to advertise and log."""
        return hashlib.sha256(b"pdcluster-key-fp:" + self.secret).hexdigest()[:16]

    def hex(self) -> str:
        return self.secret.hex()

    @classmethod
    def from_hex(cls, text: str, *, source: str = "cluster key") -> ClusterKey:
        """Parse a hex key, naming ``source`` in the error."""
        try:
            return cls(bytes.fromhex(text.strip()))
        except ValueError as e:
            raise ClusterKeyError(f"{source}: not a valid hex cluster key ({e})") from None

    def mac(self, message: bytes) -> bytes:
        """HMAC-SHA256 of ``message`` under this key."""
        return hmac.new(self.secret, message, hashlib.sha256).digest()


def generate_key() -> ClusterKey:
    """A fresh random key."""
    return ClusterKey(secrets.token_bytes(KEY_BYTES))


def default_config_path() -> Path:
    """``$PDC_HOME/cluster.json``, else ``$XDG_CONFIG_HOME/pdcluster/cluster.json``
    or ``~/.config/pdcluster/cluster.json``."""
    if os.environ.get("PDC_HOME"):
        return Path(os.environ["PDC_HOME"]).expanduser() / CONFIG_NAME
    base = os.environ.get("XDG_CONFIG_HOME") or Path.home() / ".config"
    return Path(base) / "pdcluster" / CONFIG_NAME


def write_config(path: str | Path | None, key: ClusterKey, *, force: bool = False) -> Path:
    """Write ``key`` to a new config file readable only by its owner (0600).

    Refuses to replace an existing file unless ``force``."""
    target = Path(path).expanduser() if path else default_config_path()
    if target.exists() and not force:
        raise ClusterKeyError(f"{target} already exists; pass --force to replace its key "
                              "(every node and the scheduler must then get the new one)")
    target.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    body = json.dumps({"version": 1, "cluster_key": key.hex(), "fingerprint": key.fingerprint}, indent=2)
    tmp = target.with_name(f".{target.name}.{secrets.token_hex(4)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(body + "\n")
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)
    return target


def load_cluster_key(key_file: str | Path | None = None) -> ClusterKey:
    """The key from ``key_file``, else ``$PDC_CLUSTER_KEY``, else the config file.

    ``key_file`` may be a ``pdc init`` config (JSON) or a file holding just the
    hex key. Raises ``ClusterKeyError`` saying what to do when there is none."""
    if key_file:
        return _read_key_file(Path(key_file).expanduser())
    if os.environ.get(KEY_ENV):
        return ClusterKey.from_hex(os.environ[KEY_ENV], source=f"${KEY_ENV}")
    config = default_config_path()
    if config.is_file():
        return _read_key_file(config)
    raise ClusterKeyError(
        f"no cluster key: run `pdc init` to create {config}, then copy that file to every node and "
        f"the scheduler (or set ${KEY_ENV} to the same hex key, or pass --cluster-key-file)"
    )


def _read_key_file(path: Path) -> ClusterKey:
    try:
        text = path.read_text()
    except OSError as e:
        raise ClusterKeyError(f"cannot read cluster key file {path}: {e.strerror}") from None
    if path.stat().st_mode & (stat.S_IRWXG | stat.S_IRWXO):
        log.warning("cluster key file %s is readable by other users; run chmod 600 on it", path)
    if text.lstrip().startswith("{"):
        try:
            text = str(json.loads(text)["cluster_key"])
        except (ValueError, KeyError, TypeError):
            raise ClusterKeyError(f"{path}: expected a JSON object with a 'cluster_key' field") from None
    return ClusterKey.from_hex(text, source=str(path))


# ---------------------------------------------------------------- control plane


def _method_name(method: str | bytes) -> str:
    return method.decode() if isinstance(method, bytes) else method


def sign_call(key: ClusterKey, method: str | bytes, *, now: float | None = None) -> str:
    """The ``x-pdc-auth`` value for one call of ``method`` (``/pkg.Service/Method``)."""
    ts_ms = int((time.time() if now is None else now) * 1000)
    nonce = secrets.token_hex(_NONCE_HEX // 2)
    mac = key.mac(f"{_method_name(method)}|{ts_ms}|{nonce}".encode()).hex()
    return f"{ts_ms}.{nonce}.{mac}"


class NonceCache:
    """Nonces seen within the clock window; refuses each one a second time.

    Bounded: when full of unexpired nonces it refuses new calls (fails closed)
    rather than forgetting nonces that could then be replayed."""

    def __init__(self, window_s: float = AUTH_WINDOW_S, max_entries: int = MAX_REMEMBERED_NONCES) -> None:
        self.window_s = window_s
        self.max_entries = max_entries
        self._seen: OrderedDict[str, float] = OrderedDict()  # nonce -> forget-after (arrival order)
        self._lock = threading.Lock()

    def check_and_add(self, nonce: str, now: float) -> str | None:
        """None if ``nonce`` is fresh (and now remembered), else why it is refused."""
        with self._lock:
            while self._seen:
                oldest, forget_at = next(iter(self._seen.items()))
                if forget_at > now:
                    break
                del self._seen[oldest]
            if nonce in self._seen:
                return "replayed nonce"
            if len(self._seen) >= self.max_entries:
                return "too many calls within the auth window (nonce cache full)"
            # a token is valid for window_s either side of its timestamp
            self._seen[nonce] = now + 2 * self.window_s
            return None


def verify_call(
    key: ClusterKey, method: str | bytes, token: str | None, nonces: NonceCache,
    *, now: float | None = None,
) -> str | None:
    """None if ``token`` authenticates this call of ``method``, else why not."""
    if not token:
        return f"no {AUTH_METADATA} metadata (client has no cluster key configured?)"
    parts = token.split(".")
    if len(parts) != 3:
        return "malformed auth token"
    ts_text, nonce, mac_hex = parts
    if not ts_text.isdigit() or len(nonce) != _NONCE_HEX or len(mac_hex) != 2 * _MAC_BYTES:
        return "malformed auth token"
    try:
        mac = bytes.fromhex(mac_hex)
        bytes.fromhex(nonce)
    except ValueError:
        return "malformed auth token"
    expected = key.mac(f"{_method_name(method)}|{ts_text}|{nonce}".encode())
    if not hmac.compare_digest(mac, expected):
        return "bad signature (wrong cluster key?)"
    now = time.time() if now is None else now
    skew = abs(now - int(ts_text) / 1000)
    if skew > nonces.window_s:
        return f"token timestamp is {skew:.0f}s from this node's clock (limit {nonces.window_s:.0f}s; check NTP)"
    return nonces.check_and_add(nonce, now)


class _Signer:
    """Signs every outgoing call of one kind with the cluster key."""

    def __init__(self, key: ClusterKey) -> None:
        self.key = key

    def _signed(self, details: aio.ClientCallDetails) -> aio.ClientCallDetails:
        metadata = aio.Metadata(*(details.metadata or ()))
        metadata[AUTH_METADATA] = sign_call(self.key, details.method)
        return aio.ClientCallDetails(
            details.method, details.timeout, metadata, details.credentials, details.wait_for_ready
        )


class _SignUnaryUnary(_Signer, aio.UnaryUnaryClientInterceptor):
    async def intercept_unary_unary(self, continuation, client_call_details, request):
        return await continuation(self._signed(client_call_details), request)


class _SignUnaryStream(_Signer, aio.UnaryStreamClientInterceptor):
    async def intercept_unary_stream(self, continuation, client_call_details, request):
        return await continuation(self._signed(client_call_details), request)


class _SignStreamUnary(_Signer, aio.StreamUnaryClientInterceptor):
    async def intercept_stream_unary(self, continuation, client_call_details, request_iterator):
        return await continuation(self._signed(client_call_details), request_iterator)


class _SignStreamStream(_Signer, aio.StreamStreamClientInterceptor):
    async def intercept_stream_stream(self, continuation, client_call_details, request_iterator):
        return await continuation(self._signed(client_call_details), request_iterator)


def auth_interceptors(key: ClusterKey) -> list[aio.ClientInterceptor]:
    """Client interceptors that sign every call with ``key``, one per call kind
    (a grpc.aio channel files each interceptor under one kind only):
    ``aio.insecure_channel(target, interceptors=auth_interceptors(key))``."""
    return [_SignUnaryUnary(key), _SignUnaryStream(key), _SignStreamUnary(key), _SignStreamStream(key)]


class AuthServerInterceptor(aio.ServerInterceptor):
    """Refuses (UNAUTHENTICATED) every call not signed with the cluster key."""

    def __init__(
        self, key: ClusterKey, *, nonces: NonceCache | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.key = key
        self.nonces = nonces or NonceCache()
        self.clock = clock
        self.num_refused = 0

    async def intercept_service(self, continuation, handler_call_details):
        token = _metadata_value(handler_call_details.invocation_metadata, AUTH_METADATA)
        method = handler_call_details.method
        reason = verify_call(self.key, method, token, self.nonces, now=self.clock())
        handler = await continuation(handler_call_details)
        if reason is None:
            return handler
        self.num_refused += 1
        log.warning("refused %s: %s", method, reason)
        return _refusing_handler(handler, f"cluster key authentication failed: {reason}")


def _metadata_value(metadata: Sequence[tuple[str, Any]] | None, name: str) -> str | None:
    for key, value in metadata or ():
        if key == name:
            return value.decode() if isinstance(value, bytes) else str(value)
    return None


def _refusing_handler(handler: grpc.RpcMethodHandler | None, message: str) -> grpc.RpcMethodHandler:
    """A handler of the same streaming kind that aborts without reading the
    request. Unknown methods are refused too, so that an unauthenticated peer
    learns nothing about which methods exist."""

    async def refuse(request: Any, context: aio.ServicerContext) -> None:
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, message)

    async def refuse_stream(request: Any, context: aio.ServicerContext):
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, message)
        yield  # pragma: no cover - makes this an async generator

    if handler is None:
        return grpc.unary_unary_rpc_method_handler(refuse)
    serializer = handler.response_serializer
    if handler.request_streaming and handler.response_streaming:
        return grpc.stream_stream_rpc_method_handler(refuse_stream, response_serializer=serializer)
    if handler.request_streaming:
        return grpc.stream_unary_rpc_method_handler(refuse, response_serializer=serializer)
    if handler.response_streaming:
        return grpc.unary_stream_rpc_method_handler(refuse_stream, response_serializer=serializer)
    return grpc.unary_unary_rpc_method_handler(refuse, response_serializer=serializer)


# ---------------------------------------------------------------- data plane
#
#   receiver -> sender   "PDAU" | version | server challenge (32)
#   sender -> receiver   client challenge (32) | token length (u16) | token | client mac (32)
#   receiver -> sender   server mac (32)
#
#   Instead of any message of its own, the receiver may send a refusal,
#   "PDNO" | code (1 byte, see REFUSALS), and close. The sender recognises it
#   by the end of stream right after those 5 bytes: a real greeting or mac is
#   longer, and is sent whole.
#
#   client mac = HMAC(key, "pdc-kv-client\0" | server challenge | client challenge | token)
#   server mac = HMAC(key, "pdc-kv-server\0" | server challenge | client challenge | token)

_HELLO = struct.Struct(f">4sB{CHALLENGE_BYTES}s")
_ANSWER_HEAD = struct.Struct(f">{CHALLENGE_BYTES}sH")


def refusal_message(reason: str) -> bytes:
    """The bytes a KV receiver sends before closing a connection it refuses."""
    return REFUSE_MAGIC + bytes([_REFUSAL_CODES[reason]])


def send_refusal(sock: socket.socket, reason: str) -> None:
    """Best effort: tell the sender why, without blocking (the socket is closed next)."""
    with contextlib.suppress(OSError):
        sock.setblocking(False)
        sock.send(refusal_message(reason))


def server_handshake(
    sock: socket.socket, key: ClusterKey, timeout: float,
    accept_token: Callable[[bytes], bool] | None = None,
    refused: Callable[[], str | None] | None = None,
) -> bytes:
    """Authenticate the sender on a freshly accepted data-plane connection.

    Returns the transfer token it presented. ``accept_token`` (called only once
    the sender has proved the key) may refuse the token before this side
    answers; it may raise ``KVRefused`` to name another cause. ``refused`` is
    asked when the connection broke: a reason there (the listener evicted it)
    replaces the broken-connection error. On any failure, sends the sender the
    refusal when there is one, closes ``sock`` and raises ``AuthError``."""
    deadline = time.monotonic() + timeout
    try:
        return _server_handshake(sock, key, deadline, accept_token)
    except BaseException as e:
        reason = refused() if refused is not None else None
        error = KVRefused(reason) if reason is not None else e
        if isinstance(error, KVRefused):
            send_refusal(sock, error.reason)
        sock.close()
        if error is not e:
            raise error from None
        if isinstance(e, AuthError):
            raise
        if isinstance(e, (OSError, struct.error)):
            raise AuthError(f"KV handshake failed: {e}") from e
        raise


def _server_handshake(sock: socket.socket, key: ClusterKey, deadline: float,
                      accept_token: Callable[[bytes], bool] | None) -> bytes:
    """The handshake's steps; the caller turns every failure into ``AuthError``."""
    server_challenge = secrets.token_bytes(CHALLENGE_BYTES)
    _send_all(sock, _HELLO.pack(HANDSHAKE_MAGIC, HANDSHAKE_VERSION, server_challenge), deadline)
    client_challenge, token_len = _ANSWER_HEAD.unpack(_recv_exactly(sock, _ANSWER_HEAD.size, deadline))
    if not 0 < token_len <= MAX_TOKEN_BYTES:
        raise AuthError(f"transfer token length {token_len} outside 1..{MAX_TOKEN_BYTES}")
    token = _recv_exactly(sock, token_len, deadline)
    client_mac = _recv_exactly(sock, _MAC_BYTES, deadline)
    transcript = server_challenge + client_challenge + token
    if not hmac.compare_digest(client_mac, key.mac(_CLIENT_LABEL + transcript)):
        raise KVRefused("wrong-key", "the KV sender failed the cluster-key challenge")
    if accept_token is not None and not accept_token(token):
        raise KVRefused("token")
    _send_all(sock, key.mac(_SERVER_LABEL + transcript), deadline)
    return token


def client_handshake(sock: socket.socket, key: ClusterKey, transfer_token: bytes, timeout: float) -> None:
    """Prove the cluster key to a KV receiver, present ``transfer_token``, and
    check that the receiver holds the key too. On any failure, closes ``sock``
    and raises ``AuthError``."""
    deadline = time.monotonic() + timeout
    try:
        if not 0 < len(transfer_token) <= MAX_TOKEN_BYTES:
            raise AuthError(f"transfer token length {len(transfer_token)} outside 1..{MAX_TOKEN_BYTES}")
        magic, version, server_challenge = _HELLO.unpack(_recv_exactly(sock, _HELLO.size, deadline, sender=True))
        if magic != HANDSHAKE_MAGIC or version != HANDSHAKE_VERSION:
            raise AuthError(f"not a pdcluster KV port (greeting {magic!r} v{version})")
        client_challenge = secrets.token_bytes(CHALLENGE_BYTES)
        transcript = server_challenge + client_challenge + transfer_token
        answer = _ANSWER_HEAD.pack(client_challenge, len(transfer_token)) + transfer_token
        _send_all(sock, answer + key.mac(_CLIENT_LABEL + transcript), deadline)
        try:
            server_mac = _recv_exactly(sock, _MAC_BYTES, deadline, sender=True)
        except KVRefused:
            raise
        except AuthError as e:
            raise AuthError(f"the decode node's KV port closed the handshake without a reason ({e}); "
                            "an older pdcluster, or a wrong cluster key?") from None
        if not hmac.compare_digest(server_mac, key.mac(_SERVER_LABEL + transcript)):
            raise AuthError("KV receiver failed the cluster-key challenge (wrong cluster key?)")
    except BaseException as e:
        sock.close()
        if isinstance(e, AuthError):
            raise
        if isinstance(e, (OSError, struct.error)):
            raise AuthError(f"KV handshake failed: {e}") from e
        raise


def _recv_exactly(sock: socket.socket, num_bytes: int, deadline: float, *, sender: bool = False) -> bytes:
    """``num_bytes`` or ``AuthError``; on the sender's side a refusal raises ``KVRefused``."""
    buf = bytearray(num_bytes)
    view = memoryview(buf)
    got = 0
    while got < num_bytes:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise AuthError("KV handshake timed out")
        sock.settimeout(remaining)
        try:
            n = sock.recv_into(view[got:])
        except TimeoutError:
            raise AuthError("KV handshake timed out") from None
        except ConnectionResetError:  # the receiver closed after its refusal while our answer was in flight
            if sender:
                _raise_if_refusal(bytes(buf[:got]))
            raise
        if n == 0:
            if sender:
                _raise_if_refusal(bytes(buf[:got]))
            raise AuthError("peer closed the connection during the KV handshake")
        got += n
    return bytes(buf)


def _raise_if_refusal(received: bytes) -> None:
    """The stream ended after ``received``: a refusal message names its cause."""
    codes = {code: reason for reason, code in _REFUSAL_CODES.items()}
    if len(received) == len(REFUSE_MAGIC) + 1 and received.startswith(REFUSE_MAGIC) and received[-1] in codes:
        raise KVRefused(codes[received[-1]])


def _send_all(sock: socket.socket, data: bytes, deadline: float) -> None:
    remaining = deadline - time.monotonic()
    if remaining <= 0:
        raise AuthError("KV handshake timed out")
    sock.settimeout(remaining)
    try:
        sock.sendall(data)
    except TimeoutError:
        raise AuthError("KV handshake timed out") from None


# ---------------------------------------------------------------- pdc init


def add_init_parser(sub: Any) -> None:
    """``pdc init [--force] [--path P]``: create the cluster key."""
    p = sub.add_parser(
        "init",
        help="create this cluster's shared key",
        description=(
            "Generate a random cluster key and write it (mode 0600) to $PDC_HOME/cluster.json or "
            "~/.config/pdcluster/cluster.json. Copy that file to every node and the scheduler: "
            "workers refuse control-plane calls and KV connections that do not prove this key."
        ),
    )
    p.add_argument("--path", default=None, help=f"where to write it (default: {default_config_path()})")
    p.add_argument("--force", action="store_true", help="replace an existing key")
    p.set_defaults(run=_run_init)


def _run_init(args: Any) -> int:
    key = generate_key()
    path = write_config(args.path, key, force=args.force)
    print(f"wrote cluster key {key.fingerprint} (fingerprint) to {path}")
    print("copy this file to every node and the scheduler, or pass it with --cluster-key-file")
    return 0
