"""The scheduler service's parts on their own, with fakes for the workers:
the model registry, the link prober, the policy admin, the composed backend's
view of nodes and models. No worker process, no gRPC channel."""
from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from pathlib import Path

import pytest

from cluster.auth import generate_key, sign_call
from cluster.node import NodeInfo
from proto import pdcluster_pb2 as pb
from scheduler.admin import PolicyAdmin
from scheduler.dispatch import Dispatcher
from scheduler.models import ModelRegistry, record_from_info
from scheduler.policy import FastestPair, LeastLoaded, load_policy
from scheduler.probing import LinkProber
from scheduler.request import GenerationRequest, NoCapacityError
from scheduler.service import ClusterBackend, SchedulerConfig


def _node(node_id: str, roles: tuple[str, ...], model_id: str = "tiny", port: int = 50051) -> NodeInfo:
    return NodeInfo(node_id=node_id, roles=roles, engine="torch", model_id=model_id, weights_fingerprint="w",
                    host="127.0.0.1", grpc_port=port, kv_port=port + 1, device="cpu", tflops=1.0,
                    mem_bw_gbps=10.0, free_mem_bytes=0, version="0", key_fingerprint="k")


@pytest.fixture(scope="module")
def tiny(make_tiny_model: Callable[..., Path]) -> Path:
    return make_tiny_model("llama")


def _info(folder: Path, model_id: str = "tiny", config_json: str | None = None) -> pb.InfoReply:
    tokenizer_config = json.loads((folder / "tokenizer_config.json").read_text())
    config = (folder / "config.json").read_text() if config_json is None else config_json
    return pb.InfoReply(model=pb.ModelInfo(
        model_id=model_id, max_position_embeddings=512, eos_token_ids=[2],
        tokenizer_json=(folder / "tokenizer.json").read_text(), chat_template=tokenizer_config["chat_template"],
        config_json=config))


# ---------------------------------------------------------------- ModelRegistry


def test_the_registry_learns_a_model_once_from_the_first_node(tiny: Path) -> None:
    asked: list[str] = []

    async def fetch(node: NodeInfo) -> pb.InfoReply:
        asked.append(node.node_id)
        return _info(tiny, config_json='{"hidden_size": 64}' if node.node_id == "b" else None)

    registry = ModelRegistry(fetch)

    async def body() -> None:
        registry.learn_soon(_node("a", ("prefill",)))
        await asyncio.sleep(0.01)
        registry.learn_soon(_node("b", ("decode",)))  # known by now: not fetched again
        await registry.stop()

    asyncio.run(body())
    assert asked == ["a"] and registry.knows("tiny")
    assert registry.config_for("tiny") == json.loads((tiny / "config.json").read_text())
    assert [e.model_id for e in registry.entries(["tiny", "other"])] == ["tiny"]
    assert registry.entries(["other"]) == [] and registry.config_for("other") is None
    assert registry.record("tiny").codec.encode("hello")


def test_an_unreadable_config_leaves_the_model_servable_without_cost_model(tiny: Path,
                                                                           caplog: pytest.LogCaptureFixture) -> None:
    record = record_from_info(_info(tiny, config_json="{not json").model, "node-a")
    assert record.config is None and record.entry.context_length == 512 and record.entry.eos_token_ids == (2,)
    assert "node-a sent an unreadable config.json" in caplog.text


def test_a_failed_fetch_teaches_nothing(caplog: pytest.LogCaptureFixture) -> None:
    async def fetch(node: NodeInfo) -> pb.InfoReply:
        raise ConnectionError("refused")

    registry = ModelRegistry(fetch)
    asyncio.run(registry.learn(_node("a", ("prefill",))))
    assert not registry.knows("tiny") and "could not fetch model info from a" in caplog.text


# ---------------------------------------------------------------- LinkProber


class FakeClient:
    def __init__(self, calls: list) -> None:
        self.calls = calls

    async def probe_link(self, kv_host: str, kv_port: int, *, payload_bytes: int, timeout: float) -> pb.ProbeLinkReply:
        self.calls.append((kv_host, kv_port, payload_bytes, timeout))
        return pb.ProbeLinkReply(gbps=9.4, latency_s=1e-4)


class FakePool:
    def __init__(self) -> None:
        self.calls: list = []

    def of(self, node: NodeInfo) -> FakeClient:
        return FakeClient(self.calls)


def test_the_prober_measures_each_prefill_to_decode_pair_through_the_prefill_node() -> None:
    pool = FakePool()
    prober = LinkProber(pool, interval_s=0.01, probe_bytes=1 << 20, probe_timeout_s=3.0)  # type: ignore[arg-type]
    nodes = [_node("spark", ("prefill",), port=50051), _node("mac", ("prefill", "decode"), port=50061)]

    async def body() -> None:
        prober.start(lambda: nodes, busy=lambda _: False)
        for _ in range(200):
            if prober.views():
                break
            await asyncio.sleep(0.01)
        await prober.stop()

    asyncio.run(body())
    assert set(prober.views()) == {("spark", "mac")} and prober.views()[("spark", "mac")].gbps == 9.4
    assert pool.calls[0] == ("127.0.0.1", 50062, 1 << 20, 3.0)  # the decode node's KV port
    prober.forget("mac")
    assert prober.views() == {} and prober.snapshot() == []


# ---------------------------------------------------------------- PolicyAdmin


def test_the_admin_switches_the_dispatchers_policy_and_refuses_replays() -> None:
    key = generate_key()
    dispatcher = Dispatcher(load_policy("fastest-pair"), "fastest-pair")
    admin = PolicyAdmin(key, dispatcher)
    token = sign_call(key, "PUT /admin/policy")
    assert admin.authorize("PUT /admin/policy", token) is None
    assert admin.authorize("PUT /admin/policy", token) is not None  # used once
    assert admin.authorize("GET /admin/policy", sign_call(generate_key(), "GET /admin/policy")) is not None
    assert admin.switch_policy("least-loaded") == "least-loaded" == admin.current_policy()
    assert isinstance(dispatcher.policy, LeastLoaded)
    with pytest.raises(ValueError, match="unknown policy"):
        admin.switch_policy("nope")
    assert isinstance(dispatcher.policy, LeastLoaded) and dispatcher.policy_name == "least-loaded"


# ---------------------------------------------------------------- the composed backend


def test_the_backend_wires_its_parts(tiny: Path) -> None:
    backend = ClusterBackend(SchedulerConfig(mdns=False, policy="fastest-pair"), generate_key())
    assert isinstance(backend.dispatcher.policy, FastestPair) and backend.admin.dispatcher is backend.dispatcher
    assert backend.ledger is backend.dispatcher.ledger
    backend.registry.add(record_from_info(_info(tiny).model, "a"))
    ready, health = backend.health()
    assert not ready and health["policy"] == "fastest-pair" and health["nodes"] == []
    assert backend.models() == []  # no live decode node serves it
    # ... but the model is known: its requests fail as 503 no_capacity, not 404 model_not_found
    assert backend.codec_for("tiny") is not None and backend.codec_for("nope") is None
    with pytest.raises(NoCapacityError, match="no node serves model 'tiny'"):
        asyncio.run(anext(aiter(backend.generate(GenerationRequest("r", "tiny", (1,), max_tokens=1)))))
    view = backend.cluster_view("tiny", [_node("a", ("prefill", "decode"))])
    assert view.model_config == json.loads((tiny / "config.json").read_text()) and view.links == {}
