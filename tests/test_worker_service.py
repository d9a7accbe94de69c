"""The worker service: tokens, leases, failure isolation, cancellation, auth.

Two real worker processes (torch prefill, MLX decode) on 127.0.0.1 prove the
disaggregated path end to end; the rest run workers in this process (MLX on
both sides, which loads in milliseconds) so that a test can wrap an engine or
read a worker's lease table directly.
"""
from __future__ import annotations

import asyncio
import contextlib
import json
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
from conftest import GatedEngine, PacedEngine, config, have, run, started, status_code
from grpc import aio

from cluster.auth import AuthError, ClusterKey, generate_key, write_config
from cluster.cli import build_parser
from proto import pdcluster_pb2 as pb
from workers.engines.base import KVSlice
from workers.engines.sampling import SamplingParams
from workers.kv.codec import encode_begin, encode_kv
from workers.kv.listener import open_kv_connection
from workers.kv.net import send_buffers
from workers.rpc.client import WorkerClient, node_from_info
from workers.rpc.info import model_fingerprint
from workers.rpc.server import Worker, WorkerConfig, config_from_args

pytestmark = pytest.mark.skipif(not have("mlx.core"), reason="needs the mlx extra (decode engine)")

ROOT = Path(__file__).resolve().parent.parent
PROMPT = [(7 * i + 3) % 1000 + 10 for i in range(300)]  # > 2 prefill chunks of 128
GREEDY = pb.SamplingParams(max_tokens=16)
STREAM_TIMEOUT_S = 60.0


# ---------------------------------------------------------------- helpers


async def collect(call: Any) -> tuple[list[int], pb.Done | None]:
    tokens, done = [], None
    async for event in call:
        if event.HasField("token"):
            assert event.token.index == len(tokens)
            tokens.append(event.token.token_id)
        elif event.HasField("done"):
            done = event.done
    return tokens, done


async def colocated(decoder: WorkerClient, rid: str, sampling: pb.SamplingParams = GREEDY) -> tuple[list[int], pb.Done]:
    request = pb.DecodeRequest(request_id=rid, prompt_token_ids=PROMPT, sampling=sampling, local_prefill=True)
    return await collect(decoder.decode(request, timeout=STREAM_TIMEOUT_S))


async def reserve(decoder: WorkerClient, rid: str, *, lease_s: float = 30.0,
                  sampling: pb.SamplingParams = GREEDY) -> tuple[Any, pb.Reserved]:
    """Open a disaggregated Decode; return the call and its ``reserved`` event."""
    call = decoder.decode(pb.DecodeRequest(request_id=rid, prompt_token_ids=PROMPT, sampling=sampling,
                                           lease_s=lease_s), timeout=STREAM_TIMEOUT_S)
    first = await asyncio.wait_for(call.read(), 30)
    assert first.HasField("reserved"), first
    return call, first.reserved


def prefill_request(rid: str, reserved: pb.Reserved, sampling: pb.SamplingParams = GREEDY) -> pb.PrefillRequest:
    return pb.PrefillRequest(request_id=rid, prompt_token_ids=PROMPT, sampling=sampling, kv_host=reserved.kv_host,
                             kv_port=reserved.kv_port, transfer_token=reserved.transfer_token,
                             skip_tokens=reserved.cached_tokens)


async def disaggregated(prefiller: WorkerClient, decoder: WorkerClient, rid: str,
                        sampling: pb.SamplingParams = GREEDY) -> tuple[list[int], pb.Done, pb.PrefillReply]:
    call, reserved = await reserve(decoder, rid, sampling=sampling)
    prefill = asyncio.ensure_future(prefiller.prefill(prefill_request(rid, reserved, sampling), timeout=30))
    tokens, done = await collect(call)
    return tokens, done, await prefill


async def settled(client: WorkerClient, timeout: float = 30.0) -> pb.HealthReply:
    """Health once the worker holds no request, lease or reserved byte (or the last seen)."""
    deadline = time.monotonic() + timeout
    while True:
        health = await client.health()
        idle = health.active_requests == health.active_leases == health.reserved_kv_bytes == 0
        if idle or time.monotonic() > deadline:
            return health
        await asyncio.sleep(0.05)


def held_caches(worker: Worker) -> list[str]:
    """The request caches the worker's engine holds (read from the test's thread: a snapshot)."""
    return worker.engines.engine.cached_requests()


def corrupt_slice_frames(rid: str, layout: Any) -> list[Any]:
    """A begin frame, then a kv frame whose payload no longer matches its checksum."""
    keys = np.ones((layout.kv_heads, 4, layout.head_dim), np.float32)
    frames = encode_begin(rid, layout) + encode_kv(rid, KVSlice(0, 0, keys, keys.copy(), layout.dtype))
    keys[0, 0, 0] = 2.0  # after the checksum was taken; the frame sends these very bytes
    return frames


def gated_worker(model: Path, key: ClusterKey, entered: threading.Event, gate: threading.Event) -> Worker:
    from workers.engines.mlx_engine import MLXEngine

    return Worker(config(model, key, "prefill"),
                  engine_factory=lambda: GatedEngine(MLXEngine(model, dtype="float32"), entered, gate))


async def wait_for(predicate: Callable[[], bool], timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition not reached in time"
        await asyncio.sleep(0.02)


# ---------------------------------------------------------------- config and info


def test_worker_config_rejects_bad_values_and_picks_a_node_id(model: Path) -> None:
    key = generate_key()
    cfg = WorkerConfig(role="both", engine="mlx", model=str(model), cluster_key=key)
    assert cfg.roles == ("prefill", "decode") and re.fullmatch(r"[A-Za-z0-9._-]{1,63}", cfg.node_id)
    for bad in ({"role": "router"}, {"engine": "jax"}, {"port": 70000}, {"lease_s": 0}, {"chunk_size": 0},
                {"send_mode": "udp"}, {"node_id": "has space"}, {"dtype": "int8"}, {"port": 5000, "kv_port": 5000}):
        with pytest.raises(ValueError):
            replace(cfg, **bad)
    with pytest.raises(ValueError, match="ClusterKey"):
        replace(cfg, cluster_key="00" * 32)


def test_info_carries_tokenizer_template_fingerprint_and_profile(model: Path) -> None:
    key = generate_key()
    worker = Worker(config(model, key, "decode", model_id="tiny", tflops=0.0, mem_bw_gbps=0.0))

    async def body() -> None:
        async with started(worker) as (client,):
            info = await client.info()
            tokenizer_config = json.loads((model / "tokenizer_config.json").read_text())
            assert info.model.tokenizer_json == (model / "tokenizer.json").read_text()
            assert info.model.chat_template == tokenizer_config["chat_template"]
            assert (info.model.eos_token, info.model.model_id) == ("<|im_end|>", "tiny")
            assert info.model.fingerprint == model_fingerprint(model)
            assert (info.model.num_layers, info.model.kv_heads, info.model.dtype) == (4, 2, "float32")
            node = node_from_info(info, worker.grpc_address)
            assert (node.node_id, node.roles, node.engine) == ("test-decode", ("decode",), "mlx")
            assert (node.kv_port, node.key_fingerprint) == (worker.kv_port, key.fingerprint)
            assert node.grpc_port == worker.port
            assert info.node.tflops > 0 and info.node.mem_bw_gbps > 0  # measured, since none was declared

    run(body)


def test_fingerprint_changes_with_the_weights(model: Path, tmp_path: Path) -> None:
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(model, copy)
    assert model_fingerprint(copy) == model_fingerprint(model)
    with open(copy / "model.safetensors", "ab") as f:
        f.write(b"\0")
    assert model_fingerprint(copy) != model_fingerprint(model)


# ---------------------------------------------------------------- tokens


def test_seeded_sampling_gives_the_same_tokens_disaggregated_and_colocated(model: Path) -> None:
    key = generate_key()
    sampling = pb.SamplingParams(max_tokens=12, temperature=0.9, top_k=50, seed=1234)

    async def body() -> None:
        async with started(Worker(config(model, key, "prefill")), Worker(config(model, key, "decode"))) as (p, d):
            split, done, _ = await disaggregated(p, d, "seeded", sampling)
            alone, _ = await colocated(d, "seeded-colocated", sampling)
            assert split == alone and len(split) == 12
            assert done.finish_reason == "length"
            other, _ = await colocated(d, "other-seed", pb.SamplingParams(max_tokens=12, temperature=0.9, top_k=50, seed=99))
            assert other != alone  # the seed matters, so equality above is not luck

    run(body)


# ---------------------------------------------------------------- leases


def test_lease_expires_when_kv_never_arrives_and_the_reservation_is_freed(model: Path) -> None:
    key = generate_key()
    # a waiting lease allows its sender's queue deadline, then the lease itself
    worker = Worker(config(model, key, "decode", queue_deadline_s=0.25))

    async def body() -> None:
        async with started(worker) as (d,):
            began = time.monotonic()  # before the lease exists: it cannot end sooner than lease_s after this
            call, reserved = await reserve(d, "never", lease_s=0.5)
            assert reserved.reserved_kv_bytes == worker.engines.engine.kv_layout(len(PROMPT)).total_bytes
            assert (await d.health()).active_leases == 1
            code, details = await status_code(collect(call))
            assert code == grpc.StatusCode.DEADLINE_EXCEEDED, details
            assert "no prefill node connected within 0.75s (its queue deadline 0.25s, then the 0.5s lease)" in details
            assert 0.75 <= time.monotonic() - began < 30  # exact timing: tests/test_leases.py, on a fake clock
            health, stats = await settled(d), await d.stats()
            assert (health.active_leases, health.reserved_kv_bytes, health.active_requests) == (0, 0, 0)
            assert (stats.leases_expired, stats.requests_failed) == (1, 1)
            with pytest.raises(AuthError):  # a late sender is turned away at the handshake
                await asyncio.to_thread(open_kv_connection, reserved.kv_host, reserved.kv_port, key,
                                        reserved.transfer_token, timeout=5)

    run(body)


def test_lease_bounds_the_wait_for_a_sender_not_a_long_steady_transfer(model: Path) -> None:
    from workers.engines.mlx_engine import MLXEngine

    key = generate_key()
    slow = Worker(config(model, key, "prefill"),
                  engine_factory=lambda: PacedEngine(MLXEngine(model, dtype="float32"), pause_s=0.4))

    async def body() -> None:
        async with started(slow, Worker(config(model, key, "decode"))) as (p, d):
            reference, _ = await colocated(d, "reference")
            # 12 slices x 0.4 s = 4.8 s, over twice the 2 s lease; each silence stays well
            # under it, even with connecting and the first chunk on a loaded 2-core machine.
            call, reserved = await reserve(d, "long", lease_s=2.0)
            began = time.monotonic()
            prefill = asyncio.ensure_future(p.prefill(prefill_request("long", reserved), timeout=60))
            tokens, done = await collect(call)
            assert time.monotonic() - began > 4.8  # the pauses alone: the transfer outlived the lease
            assert tokens == reference and (await prefill).first_token == reference[0]
            assert (await d.stats()).leases_expired == 0

    run(body)


def test_transfer_that_stalls_midway_fails_at_the_lease_deadline_and_is_cut(model: Path) -> None:
    key = generate_key()
    worker = Worker(config(model, key, "decode"))

    async def body() -> None:
        async with started(worker) as (d,):
            call, reserved = await reserve(d, "stalls", lease_s=1.0)
            sock = await asyncio.to_thread(open_kv_connection, reserved.kv_host, reserved.kv_port, key,
                                           reserved.transfer_token, timeout=5)
            with sock:
                layout = worker.engines.engine.kv_layout(len(PROMPT))
                keys = np.zeros((layout.kv_heads, 8, layout.head_dim), np.float32)
                send_buffers(sock, encode_begin("stalls", layout) + encode_kv("stalls", KVSlice(0, 0, keys, keys, "float32")))
                code, details = await status_code(collect(call))  # ... and then nothing more
                assert code == grpc.StatusCode.DEADLINE_EXCEEDED and "stalled: no bytes for 1s" in details, details
                sock.settimeout(5)
                assert await asyncio.to_thread(sock.recv, 1) == b""  # the decode side hung up
            assert (await settled(d)).active_leases == 0
            assert (await d.stats()).leases_expired == 1

    run(body)


def test_limits_and_bad_requests_fail_with_precise_codes(model: Path) -> None:
    key = generate_key()

    async def body() -> None:
        async with started(Worker(config(model, key, "decode", max_leases=1))) as (d,):
            call, _ = await reserve(d, "holder")
            duplicate = pb.DecodeRequest(request_id="holder", prompt_token_ids=PROMPT, sampling=GREEDY)
            assert (await status_code(collect(d.decode(duplicate, timeout=10))))[0] == grpc.StatusCode.ALREADY_EXISTS
            full = pb.DecodeRequest(request_id="second", prompt_token_ids=PROMPT, sampling=GREEDY)
            assert (await status_code(collect(d.decode(full, timeout=10))))[0] == grpc.StatusCode.RESOURCE_EXHAUSTED
            call.cancel()
            await settled(d)
            for bad in (pb.DecodeRequest(request_id="oov", prompt_token_ids=[10**6], sampling=GREEDY),
                        pb.DecodeRequest(request_id="empty", sampling=GREEDY),
                        pb.DecodeRequest(request_id="no-max", prompt_token_ids=PROMPT),
                        pb.DecodeRequest(request_id="codec", prompt_token_ids=PROMPT, sampling=GREEDY, codec="zstd")):
                code, details = await status_code(collect(d.decode(bad, timeout=10)))
                assert code == grpc.StatusCode.INVALID_ARGUMENT, (bad.request_id, details)
            reserved = pb.Reserved(kv_host="127.0.0.1", kv_port=1, transfer_token=b"t")
            code, _ = await status_code(d.prefill(prefill_request("p", reserved), timeout=10))
            assert code == grpc.StatusCode.FAILED_PRECONDITION  # a decode-only worker does not prefill
            assert (await settled(d)).active_requests == 0

    run(body)


KV_BYTES_PER_TOKEN = 2 * 4 * 2 * 16 * 4  # (K, V) x layers x kv_heads x head_dim x fp32 bytes of the tiny model


def worker_flags(key_file: Path, *flags: str) -> list[str]:
    return ["worker", "--role", "decode", "--engine", "mlx", "--model", "unused", "--cluster-key-file",
            str(key_file), *flags]


def test_kv_budget_flag_sets_the_reserved_byte_limit_and_is_explained_in_help(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    key_file = write_config(tmp_path / "key.json", generate_key())
    parser = build_parser()
    assert config_from_args(parser.parse_args(worker_flags(key_file))).max_reserved_bytes is None
    budget = config_from_args(parser.parse_args(worker_flags(key_file, "--kv-budget-gb", "48")))
    assert budget.max_reserved_bytes == 48 * 10**9
    tiny = config_from_args(parser.parse_args(worker_flags(key_file, "--kv-budget-gb", "1e-12")))
    assert tiny.max_reserved_bytes == 1  # rounded up to a whole byte, never to "no budget"
    for bad in ("0", "-1", "nan", "inf", "lots"):
        with pytest.raises(SystemExit) as exited:
            parser.parse_args(worker_flags(key_file, "--kv-budget-gb", bad))
        assert exited.value.code == 2
        assert "--kv-budget-gb" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        parser.parse_args(["worker", "--help"])
    help_text = " ".join(capsys.readouterr().out.split())
    assert "--kv-budget-gb GB KV budget: the most KV cache, in GB (1e9 bytes)" in help_text
    assert "RESOURCE_EXHAUSTED" in help_text


def test_kv_budget_refuses_a_reservation_past_it_naming_the_budget_and_admits_one_that_fits(
        model: Path, tmp_path: Path) -> None:
    key = generate_key()
    args = build_parser().parse_args(worker_flags(write_config(tmp_path / "key.json", key),
                                                  "--kv-budget-gb", "0.0002"))  # 200,000 bytes
    decoder = Worker(replace(config_from_args(args), model=str(model), advertise=False, node_id="test-decode",
                             tflops=1.0, mem_bw_gbps=100.0, grace_s=1.0))
    assert len(PROMPT) * KV_BYTES_PER_TOKEN > 200_000 > 150 * KV_BYTES_PER_TOKEN

    def request(rid: str, prompt: list[int]) -> pb.DecodeRequest:
        return pb.DecodeRequest(request_id=rid, prompt_token_ids=prompt, sampling=GREEDY)

    async def body() -> None:
        async with started(decoder) as (d,):
            code, details = await status_code(collect(d.decode(request("too-big", PROMPT), timeout=10)))
            assert code == grpc.StatusCode.RESOURCE_EXHAUSTED, details
            assert "KV budget of 200000 bytes (--kv-budget-gb 0.0002)" in details
            assert f"reserving {len(PROMPT) * KV_BYTES_PER_TOKEN} KV bytes" in details
            fits = d.decode(request("fits", PROMPT[:150]), timeout=STREAM_TIMEOUT_S)
            first = await asyncio.wait_for(fits.read(), 30)
            assert first.reserved.reserved_kv_bytes == 150 * KV_BYTES_PER_TOKEN
            code, details = await status_code(collect(d.decode(request("second", PROMPT[:150]), timeout=10)))
            assert code == grpc.StatusCode.RESOURCE_EXHAUSTED  # the first one's bytes count against the budget
            assert f"{150 * KV_BYTES_PER_TOKEN} bytes are already reserved" in details
            fits.cancel()
            assert (await settled(d)).reserved_kv_bytes == 0
            again = d.decode(request("fits-again", PROMPT[:150]), timeout=STREAM_TIMEOUT_S)
            assert (await asyncio.wait_for(again.read(), 30)).HasField("reserved")  # freed bytes are free again
            again.cancel()

    run(body)


# ---------------------------------------------------------------- failure isolation


def test_malformed_kv_frame_fails_only_its_own_request(model: Path) -> None:
    key = generate_key()
    decoder = Worker(config(model, key, "decode"))

    async def body() -> None:
        async with started(Worker(config(model, key, "prefill")), decoder) as (p, d):
            reference, _ = await colocated(d, "reference")
            bad_call, bad = await reserve(d, "bad")
            good_call, good = await reserve(d, "good")
            layout = decoder.engines.engine.kv_layout(len(PROMPT))

            def send_garbage() -> None:
                with open_kv_connection(bad.kv_host, bad.kv_port, key, bad.transfer_token, timeout=5) as sock:
                    send_buffers(sock, corrupt_slice_frames("bad", layout))
                    sock.settimeout(5)
                    sock.recv(1)  # until the decode side drops us

            good_prefill = asyncio.ensure_future(p.prefill(prefill_request("good", good), timeout=30))
            bad_outcome, good_outcome, _ = await asyncio.gather(
                status_code(collect(bad_call)), collect(good_call), asyncio.to_thread(send_garbage))
            assert bad_outcome[0] == grpc.StatusCode.DATA_LOSS and "checksum" in bad_outcome[1]
            assert good_outcome[0] == reference
            assert (await good_prefill).first_token == reference[0]
            stats = await d.stats()
            assert (stats.requests_failed, stats.requests_total) == (1, 3)
            assert (await settled(d)).active_leases == 0

    run(body)


# ---------------------------------------------------------------- cancellation


def test_cancel_frees_lease_and_cache_on_both_workers(model: Path) -> None:
    key = generate_key()
    entered, gate = threading.Event(), threading.Event()
    prefiller, decoder = gated_worker(model, key, entered, gate), Worker(config(model, key, "decode"))

    async def body() -> None:
        async with started(prefiller, decoder) as (p, d):
            call, reserved = await reserve(d, "cancel-me")
            prefill = asyncio.ensure_future(p.prefill(prefill_request("cancel-me", reserved), timeout=30))
            await wait_for(entered.is_set)  # the first slice has left; prefill is mid-way
            await wait_for(lambda: decoder.leases.find("cancel-me").state == "receiving")
            assert held_caches(prefiller) and (await p.health()).active_requests == 1
            assert await d.cancel("cancel-me") and await p.cancel("cancel-me")
            assert (await status_code(collect(call)))[0] == grpc.StatusCode.CANCELLED
            gate.set()
            assert (await status_code(prefill))[0] == grpc.StatusCode.CANCELLED
            for client in (p, d):
                health = await settled(client)
                assert (health.active_requests, health.active_leases, health.reserved_kv_bytes) == (0, 0, 0)
                assert (await client.stats()).requests_cancelled == 1
            assert held_caches(prefiller) == held_caches(decoder) == []
            assert not await d.cancel("cancel-me")  # nothing left to find

    run(body)


def test_decode_client_disconnect_frees_lease_and_cache_on_both_workers(model: Path) -> None:
    key = generate_key()
    entered, gate = threading.Event(), threading.Event()
    prefiller, decoder = gated_worker(model, key, entered, gate), Worker(config(model, key, "decode"))

    async def body() -> None:
        async with started(prefiller, decoder) as (p, d):
            call, reserved = await reserve(d, "walk-away")
            prefill = asyncio.ensure_future(p.prefill(prefill_request("walk-away", reserved), timeout=30))
            await wait_for(entered.is_set)
            call.cancel()  # the client goes away; nobody calls Cancel
            health = await settled(d)
            assert (health.active_requests, health.active_leases, health.reserved_kv_bytes) == (0, 0, 0)
            gate.set()  # the prefill node finds its KV stream cut and gives up
            code, details = await status_code(prefill)
            assert code == grpc.StatusCode.UNAVAILABLE, details
            assert (await settled(p)).active_requests == 0
            assert held_caches(prefiller) == held_caches(decoder) == []
            assert (await d.stats()).requests_cancelled == 1

    run(body)


def test_cancel_or_disconnect_during_generation_releases_the_decode_cache(model: Path) -> None:
    key = generate_key()
    decoder = Worker(config(model, key, "decode"))
    endless = pb.SamplingParams(max_tokens=4000)

    async def body() -> None:
        async with started(decoder) as (d,):
            for rid, stop in (("cancelled", lambda call: d.cancel("cancelled")),
                              ("abandoned", lambda call: asyncio.sleep(0, call.cancel()))):
                request = pb.DecodeRequest(request_id=rid, prompt_token_ids=PROMPT, sampling=endless,
                                           local_prefill=True)
                call = d.decode(request, timeout=STREAM_TIMEOUT_S)
                for _ in range(3):
                    assert (await call.read()).HasField("token")
                assert f"{rid}#decode" in held_caches(decoder)
                await stop(call)
                with contextlib.suppress(aio.AioRpcError, asyncio.CancelledError):
                    async for _ in call:  # drain what was in flight
                        pass
                health = await settled(d)
                assert (health.active_requests, health.active_leases) == (0, 0)
                assert held_caches(decoder) == []
            stats = await d.stats()
            assert stats.requests_cancelled == 2 and stats.tokens_generated < 1000

    run(body)


# ---------------------------------------------------------------- real processes


def test_torch_prefill_process_to_mlx_decode_process_matches_the_decode_engine_alone(model: Path, processes: Any) -> None:
    from workers.engines.registry import load_engine
    from workers.tools.handoff import generate_alone

    key, workers = processes
    reference, _ = generate_alone(load_engine("mlx", model, "float32"), PROMPT, SamplingParams(max_tokens=16), 128)

    async def body() -> None:
        async with WorkerClient(workers["prefill"].grpc, key) as p, WorkerClient(workers["decode"].grpc, key) as d:
            split, done, reply = await disaggregated(p, d, "split")
            alone, alone_done = await colocated(d, "colocated")
            assert split == alone == reference, (split, alone, reference)
            t = done.timings
            assert (t.prompt_tokens, t.completion_tokens, done.finish_reason) == (300, 16, "length")
            kv_bytes = 300 * 2 * 4 * 2 * 16 * 4  # tokens * (K, V) * layers * kv_heads * head_dim * fp32
            assert t.kv_bytes == reply.kv_bytes >= kv_bytes
            assert t.prefill_s > 0 and t.transfer_s > 0 and t.exposed_transfer_s >= 0 and t.decode_s > 0
            assert reply.first_token == split[0] and reply.send_s > 0
            assert alone_done.timings.kv_bytes == 0  # colocated: nothing crossed the network
            assert (await p.stats()).kv_bytes_sent == (await d.stats()).kv_bytes_received == t.kv_bytes

    run(body)


FAKE_PREFILL = """
import sys, time
import numpy as np
from cluster.auth import ClusterKey
from workers.kv.listener import open_kv_connection
from workers.engines.base import KVLayout, KVSlice
from workers.kv.transport import KVSender
host, port, token, rid, key = sys.argv[1:6]
sock = open_kv_connection(host, int(port), ClusterKey.from_hex(key), bytes.fromhex(token), timeout=10)
layout = KVLayout(4, 2, 16, "float32", 300)
sender = KVSender(sock)
sender.begin(rid, layout)
keys = np.zeros((2, 128, 16), np.float32)
for layer in range(2):
    sender.send_slice(KVSlice(layer, 0, keys, keys, "float32"))
print("half sent", flush=True)
time.sleep(60)
"""


def test_prefill_process_killed_mid_transfer_fails_the_decode_promptly(processes: Any) -> None:
    key, workers = processes

    async def body() -> None:
        async with WorkerClient(workers["decode"].grpc, key) as d:
            call, reserved = await reserve(d, "orphan", lease_s=60)
            fake = subprocess.Popen(
                [sys.executable, "-c", FAKE_PREFILL, reserved.kv_host, str(reserved.kv_port),
                 reserved.transfer_token.hex(), "orphan", key.hex()],
                cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            try:
                line = await asyncio.wait_for(asyncio.to_thread(fake.stdout.readline), 30)
                assert line.strip() == "half sent", fake.stderr.read() if fake.poll() is not None else line
                fake.kill()
                began = time.monotonic()
                code, details = await status_code(collect(call))
                assert code == grpc.StatusCode.DATA_LOSS and "connection closed" in details, details
                assert time.monotonic() - began < 30  # the disconnect ends it, not the 60 s lease
            finally:
                fake.kill()
                fake.wait(5)
            health = await settled(d)
            assert (health.active_leases, health.reserved_kv_bytes, health.active_requests) == (0, 0, 0)

    run(body)


def test_worker_process_refuses_a_wrong_key_on_both_planes(processes: Any) -> None:
    key, workers = processes
    stranger = generate_key()

    async def body() -> None:
        async with WorkerClient(workers["decode"].grpc, stranger) as intruder:
            assert (await status_code(intruder.info()))[0] == grpc.StatusCode.UNAUTHENTICATED
            request = pb.DecodeRequest(request_id="x", prompt_token_ids=PROMPT, sampling=GREEDY, local_prefill=True)
            assert (await status_code(collect(intruder.decode(request, timeout=10))))[0] == grpc.StatusCode.UNAUTHENTICATED
        async with WorkerClient(workers["decode"].grpc, key) as d:
            call, reserved = await reserve(d, "guarded")
            for wrong_key, token in ((stranger, reserved.transfer_token), (key, b"not-the-token")):
                with pytest.raises(AuthError):
                    await asyncio.to_thread(open_kv_connection, reserved.kv_host, reserved.kv_port, wrong_key,
                                            token, timeout=5)
            assert (await d.health()).active_leases == 1  # refused connections did not touch the lease
            call.cancel()
            assert (await settled(d)).active_leases == 0

    run(body)


def test_worker_processes_stop_cleanly_on_sigterm(processes: Any) -> None:
    _, workers = processes
    for worker in workers.values():
        worker.proc.send_signal(signal.SIGTERM)
    for role, worker in workers.items():
        assert worker.proc.wait(20) == 0, worker.tail()
        assert "shutting down" in worker.log.read_text(), role


def test_free_memory_reads_macos_vm_stat_output() -> None:
    from workers.engines.memory import parse_vm_stat

    sample = ("Mach Virtual Memory Statistics: (page size of 16384 bytes)\n"
              "Pages free:                               12000.\n"
              "Pages active:                             900000.\n"
              "Pages inactive:                           300000.\n"
              "Pages speculative:                          4000.\n")
    assert parse_vm_stat(sample) == (12000 + 300000 + 4000) * 16384
    assert parse_vm_stat("garbage") == 0


def test_free_memory_on_this_host_is_positive_and_cuda_falls_back_without_a_gpu() -> None:
    from workers.engines.memory import host_free_bytes

    assert host_free_bytes() > 0
    if not have("torch"):
        return
    import torch

    from workers.engines.torch_engine import device_free_bytes

    assert device_free_bytes("cpu") > 0  # the host figure
    if not torch.cuda.is_available():
        assert device_free_bytes("cuda:0") > 0  # no CUDA here: the host figure, not a crash
    else:  # the GPU's own free memory, not the host's
        assert 0 < device_free_bytes("cuda:0") <= torch.cuda.mem_get_info(0)[1]


# ---------------------------------------------------------------- queue time is not a stall


def gated_prefill_worker(model: Path, key: ClusterKey, entered: threading.Event, gate: threading.Event,
                         **overrides: Any) -> Worker:
    from workers.engines.mlx_engine import MLXEngine

    return Worker(config(model, key, "prefill", **overrides),
                  engine_factory=lambda: GatedEngine(MLXEngine(model, dtype="float32"), entered, gate))


def test_a_queued_prefill_opens_no_kv_connection_until_it_computes(model: Path) -> None:
    """The decode side sees no connection (its lease stays waiting) while the prefill queues behind another."""
    key = generate_key()
    entered, gate = threading.Event(), threading.Event()
    prefiller, decoder = gated_prefill_worker(model, key, entered, gate), Worker(config(model, key, "decode"))

    async def body() -> None:
        async with started(prefiller, decoder) as (p, d):
            first_call, first_reserved = await reserve(d, "first")
            second_call, second_reserved = await reserve(d, "second")
            first = asyncio.ensure_future(p.prefill(prefill_request("first", first_reserved), timeout=30))
            await wait_for(entered.is_set)  # the first prefill holds the engine
            second = asyncio.ensure_future(p.prefill(prefill_request("second", second_reserved), timeout=30))
            await wait_for(lambda: prefiller.loop.num_prefills_waiting == 2)  # the second is queued behind it
            assert decoder.leases.find("first").state == "receiving"
            assert decoder.leases.find("second").state == "waiting"  # no connection while queued
            assert decoder.listener.num_refused == 0
            gate.set()
            for call, prefill in ((first_call, first), (second_call, second)):
                tokens, done = await collect(call)
                assert len(tokens) == 16 and done.finish_reason == "length"
                assert (await prefill).kv_bytes > 0
            assert (await second).queue_s > 0

    run(body)


def test_a_prefill_past_its_queue_deadline_fails_clearly_and_never_connects(model: Path) -> None:
    key = generate_key()
    entered, gate = threading.Event(), threading.Event()
    prefiller = gated_prefill_worker(model, key, entered, gate, queue_deadline_s=0.3)
    decoder = Worker(config(model, key, "decode"))

    async def body() -> None:
        async with started(prefiller, decoder) as (p, d):
            first_call, first_reserved = await reserve(d, "holder")
            _, late_reserved = await reserve(d, "late")
            first = asyncio.ensure_future(p.prefill(prefill_request("holder", first_reserved), timeout=30))
            await wait_for(entered.is_set)
            try:
                code, details = await status_code(p.prefill(prefill_request("late", late_reserved), timeout=30))
            finally:
                gate.set()
            assert code == grpc.StatusCode.RESOURCE_EXHAUSTED, details
            assert "queue deadline of 0.3s" in details and "1 earlier request" in details, details
            assert decoder.leases.find("late").state == "waiting"  # it never connected
            tokens, _ = await collect(first_call)
            assert len(tokens) == 16 and (await first).kv_bytes > 0
            assert await d.cancel("late")

    run(body)
