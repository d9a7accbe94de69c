"""The cluster key: where it lives, and both planes refusing anyone without it.

Control-plane tests run a real grpc.aio server on 127.0.0.1 with the auth
interceptor; data-plane tests run the handshake over real loopback sockets.
"""
from __future__ import annotations

import argparse
import asyncio
import hashlib
import os
import socket
import stat
import threading
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import grpc
import pytest
from grpc import aio

from cluster.auth import (
    AUTH_METADATA,
    AuthError,
    AuthServerInterceptor,
    ClusterKey,
    ClusterKeyError,
    NonceCache,
    add_init_parser,
    auth_interceptors,
    client_handshake,
    generate_key,
    load_cluster_key,
    server_handshake,
    sign_call,
    verify_call,
    write_config,
)
from proto import pdcluster_pb2 as pb
from proto import pdcluster_pb2_grpc as pb_grpc

HEALTH = "/pdcluster.v1.Worker/Health"


# ---------------------------------------------------------------- the key


def test_fingerprint_is_sha256_prefix_and_repr_hides_the_secret() -> None:
    key = ClusterKey(bytes(range(32)))
    assert key.fingerprint == hashlib.sha256(b"pdcluster-key-fp:" + bytes(range(32))).hexdigest()[:16]
    assert repr(key) == f"ClusterKey(fingerprint={key.fingerprint!r})"  # never the secret
    assert generate_key().fingerprint != generate_key().fingerprint


def test_short_or_non_hex_keys_are_refused() -> None:
    with pytest.raises(ClusterKeyError):
        ClusterKey(b"short")
    with pytest.raises(ClusterKeyError, match="not a valid hex"):
        ClusterKey.from_hex("zz" * 32)


def test_init_writes_an_owner_only_file_and_refuses_to_overwrite(tmp_path: Path) -> None:
    path = tmp_path / "nested" / "cluster.json"
    key = generate_key()
    assert write_config(path, key) == path
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert load_cluster_key(str(path)) == key
    with pytest.raises(ClusterKeyError, match="--force"):
        write_config(path, generate_key())
    assert load_cluster_key(str(path)) == key  # untouched
    replacement = generate_key()
    write_config(path, replacement, force=True)
    assert load_cluster_key(str(path)) == replacement
    assert stat.S_IMODE(path.stat().st_mode) == 0o600


def test_pdc_init_command_writes_under_pdc_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                capsys: pytest.CaptureFixture) -> None:
    monkeypatch.setenv("PDC_HOME", str(tmp_path))
    monkeypatch.delenv("PDC_CLUSTER_KEY", raising=False)
    parser = argparse.ArgumentParser()
    add_init_parser(parser.add_subparsers())
    args = parser.parse_args(["init"])
    assert args.run(args) == 0
    key = load_cluster_key(None)
    assert key.fingerprint in capsys.readouterr().out
    assert (tmp_path / "cluster.json").is_file()
    with pytest.raises(ClusterKeyError, match="--force"):
        args.run(args)
    forced = parser.parse_args(["init", "--force"])
    assert forced.run(forced) == 0
    assert load_cluster_key(None) != key


def test_key_precedence_is_flag_then_env_then_config(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PDC_HOME", str(tmp_path / "home"))
    from_config, from_env, from_file = generate_key(), generate_key(), generate_key()
    write_config(None, from_config)
    monkeypatch.delenv("PDC_CLUSTER_KEY", raising=False)
    assert load_cluster_key(None) == from_config
    monkeypatch.setenv("PDC_CLUSTER_KEY", from_env.hex())
    assert load_cluster_key(None) == from_env
    bare = tmp_path / "key.hex"
    bare.write_text(from_file.hex() + "\n")
    bare.chmod(0o600)
    assert load_cluster_key(str(bare)) == from_file


def test_missing_key_tells_the_user_to_run_pdc_init(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PDC_HOME", str(tmp_path))
    monkeypatch.delenv("PDC_CLUSTER_KEY", raising=False)
    with pytest.raises(ClusterKeyError, match="run `pdc init`"):
        load_cluster_key(None)
    with pytest.raises(ClusterKeyError, match="cannot read"):
        load_cluster_key(str(tmp_path / "absent.json"))


# ---------------------------------------------------------------- control-plane tokens


def test_token_verifies_once_then_is_a_replay() -> None:
    key, nonces = generate_key(), NonceCache()
    token = sign_call(key, HEALTH)
    assert verify_call(key, HEALTH, token, nonces) is None
    assert verify_call(key, HEALTH, token, nonces) == "replayed nonce"


def test_token_is_bound_to_key_method_and_clock() -> None:
    key, nonces = generate_key(), NonceCache(window_s=60)
    now = time.time()
    assert "wrong cluster key" in verify_call(generate_key(), HEALTH, sign_call(key, HEALTH), nonces)
    assert "bad signature" in verify_call(key, "/pdcluster.v1.Worker/Decode", sign_call(key, HEALTH), nonces)
    assert "clock" in verify_call(key, HEALTH, sign_call(key, HEALTH, now=now - 61), nonces, now=now)
    assert "clock" in verify_call(key, HEALTH, sign_call(key, HEALTH, now=now + 61), nonces, now=now)
    assert verify_call(key, HEALTH, sign_call(key, HEALTH, now=now - 59), nonces, now=now) is None
    for garbage in (None, "", "a.b", "1.2.3", "x" * 300, sign_call(key, HEALTH)[:-2]):
        assert verify_call(key, HEALTH, garbage, nonces) is not None


def test_nonce_cache_forgets_only_expired_nonces_and_fails_closed_when_full() -> None:
    cache = NonceCache(window_s=1, max_entries=2)
    assert cache.check_and_add("a", now=100.0) is None
    assert cache.check_and_add("b", now=100.0) is None
    assert "full" in cache.check_and_add("c", now=100.5)
    assert cache.check_and_add("a", now=101.0) == "replayed nonce"
    assert cache.check_and_add("c", now=102.5) is None  # a and b are past any token's window now


class _EchoWorker(pb_grpc.WorkerServicer):
    async def Health(self, request: pb.HealthRequest, context: aio.ServicerContext) -> pb.HealthReply:
        return pb.HealthReply(ok=True, active_requests=7)

    async def Decode(self, request: pb.DecodeRequest, context: aio.ServicerContext) -> AsyncIterator[pb.DecodeEvent]:
        yield pb.DecodeEvent(token=pb.Token(token_id=1, index=0))


async def _with_server(key: ClusterKey, body: Callable[[str, AuthServerInterceptor], Any]) -> None:
    interceptor = AuthServerInterceptor(key)
    server = aio.server(interceptors=[interceptor])
    pb_grpc.add_WorkerServicer_to_server(_EchoWorker(), server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        await body(f"127.0.0.1:{port}", interceptor)
    finally:
        await server.stop(0)


def _channel(address: str, key: ClusterKey | None) -> aio.Channel:
    return aio.insecure_channel(address, interceptors=auth_interceptors(key) if key else None)


def test_right_key_passes_and_wrong_or_missing_key_is_unauthenticated() -> None:
    key = generate_key()

    async def body(address: str, interceptor: AuthServerInterceptor) -> None:
        async with _channel(address, key) as good:
            stub = pb_grpc.WorkerStub(good)
            assert (await stub.Health(pb.HealthRequest(), timeout=5)).active_requests == 7
            assert [e.token.token_id async for e in stub.Decode(pb.DecodeRequest(), timeout=5)] == [1]
        for other in (generate_key(), None):
            async with _channel(address, other) as bad:
                stub = pb_grpc.WorkerStub(bad)
                with pytest.raises(aio.AioRpcError) as unary:
                    await stub.Health(pb.HealthRequest(), timeout=5)
                assert unary.value.code() == grpc.StatusCode.UNAUTHENTICATED
                with pytest.raises(aio.AioRpcError) as stream:
                    [e async for e in stub.Decode(pb.DecodeRequest(), timeout=5)]
                assert stream.value.code() == grpc.StatusCode.UNAUTHENTICATED
                with pytest.raises(aio.AioRpcError) as unknown:  # no probing for methods either
                    await bad.unary_unary("/pdcluster.v1.Worker/Nope")(b"", timeout=5)
                assert unknown.value.code() == grpc.StatusCode.UNAUTHENTICATED
        assert interceptor.num_refused == 6

    asyncio.run(_with_server(key, body))


def test_replayed_auth_metadata_is_refused_by_the_server() -> None:
    key = generate_key()

    async def body(address: str, interceptor: AuthServerInterceptor) -> None:
        token = sign_call(key, HEALTH)
        async with _channel(address, None) as channel:  # sends our captured token verbatim
            stub = pb_grpc.WorkerStub(channel)
            first = await stub.Health(pb.HealthRequest(), metadata=((AUTH_METADATA, token),), timeout=5)
            assert first.ok
            with pytest.raises(aio.AioRpcError) as replay:
                await stub.Health(pb.HealthRequest(), metadata=((AUTH_METADATA, token),), timeout=5)
            assert replay.value.code() == grpc.StatusCode.UNAUTHENTICATED
            assert "replayed" in replay.value.details()

    asyncio.run(_with_server(key, body))


# ---------------------------------------------------------------- data-plane handshake


def _handshake_pair(server_key: ClusterKey, client_key: ClusterKey, token: bytes = b"transfer-1",
                    accept_token: Callable[[bytes], bool] | None = None,
                    client: Callable[[socket.socket], None] | None = None) -> tuple[Any, Any]:
    """Run both sides over a loopback connection; each outcome is a value or the exception."""
    listener = socket.create_server(("127.0.0.1", 0))
    outcome: dict[str, Any] = {}

    def serve() -> None:
        conn, _ = listener.accept()
        try:
            outcome["server"] = server_handshake(conn, server_key, 5.0, accept_token=accept_token)
        except Exception as e:
            outcome["server"] = e
        finally:
            conn.close()

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    sock = socket.create_connection(listener.getsockname(), timeout=5)
    try:
        (client or (lambda s: client_handshake(s, client_key, token, 5.0)))(sock)
        outcome["client"] = None
    except Exception as e:
        outcome["client"] = e
    finally:
        sock.close()
    thread.join(10)
    listener.close()
    return outcome["server"], outcome["client"]


def test_handshake_with_the_right_key_yields_the_transfer_token() -> None:
    key = generate_key()
    server, client = _handshake_pair(key, key, token=b"tok-42")
    assert server == b"tok-42" and client is None


def test_handshake_with_a_wrong_key_is_refused_on_both_sides() -> None:
    server, client = _handshake_pair(generate_key(), generate_key())
    assert isinstance(server, AuthError) and "wrong cluster key" in str(server)
    assert isinstance(client, AuthError)


def test_handshake_refuses_an_unknown_transfer_token_after_the_key_check() -> None:
    key = generate_key()
    seen: list[bytes] = []
    server, client = _handshake_pair(key, key, token=b"stale", accept_token=lambda t: seen.append(t) or False)
    assert seen == [b"stale"]
    assert isinstance(server, AuthError) and "transfer token" in str(server)
    assert isinstance(client, AuthError)
    seen.clear()
    _handshake_pair(key, generate_key(), accept_token=lambda t: seen.append(t) or True)
    assert seen == []  # a sender without the key never gets to present a token


def test_client_refuses_a_receiver_that_does_not_hold_the_key() -> None:
    """Mutual: a fake receiver that accepts anything still cannot prove the key."""
    key = generate_key()
    listener = socket.create_server(("127.0.0.1", 0))

    def fake_receiver() -> None:
        conn, _ = listener.accept()
        with conn:
            conn.sendall(b"PDAU\x01" + os.urandom(32))
            conn.recv(4096)
            conn.sendall(os.urandom(32))  # a made-up proof
            conn.recv(1)

    thread = threading.Thread(target=fake_receiver, daemon=True)
    thread.start()
    sock = socket.create_connection(listener.getsockname(), timeout=5)
    with pytest.raises(AuthError, match="receiver failed"):
        client_handshake(sock, key, b"tok", 5.0)
    assert sock.fileno() == -1  # closed on failure
    thread.join(5)
    listener.close()


def test_silent_sender_times_out_within_the_handshake_deadline() -> None:
    key = generate_key()
    listener = socket.create_server(("127.0.0.1", 0))
    sock = socket.create_connection(listener.getsockname(), timeout=5)
    conn, _ = listener.accept()
    started = time.monotonic()
    with pytest.raises(AuthError, match="timed out"):
        server_handshake(conn, key, 0.3)
    assert time.monotonic() - started < 3
    assert conn.fileno() == -1
    sock.close()
    listener.close()
