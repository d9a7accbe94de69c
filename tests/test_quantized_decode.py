"""A quantized decode node fed by a full-precision prefill node.

mlx-lm's own 4- and 8-bit copies of a checkpoint (``pdc make-model
--quantize``) load in the MLX engine and declare their base model id, so a
worker serves one under the base model's id with its own weights fingerprint
(prefix-cache hashes never shared). The scheduler pairs it with the
full-precision node and refuses a node whose architecture, layers, KV heads or
head dim differ, naming the field. ``check-handoff --quantized-decode``
measures the no-longer-identical handoff: agreement and KL.
"""
from __future__ import annotations

import asyncio
import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
from conftest import (
    SchedulerProcess,
    have,
    requires_torch_and_mlx,
    start_worker_process,
    stop_processes,
)

from cluster.auth import generate_key, write_config
from cluster.blocks import block_hashes
from cluster.cli import main
from cluster.node import NodeInfo
from proto import pdcluster_pb2 as pb
from scheduler import models
from scheduler.models import ModelRegistry
from workers.engines.model_config import read_model_spec
from workers.rpc import info
from workers.rpc.info import model_info, served_model_id
from workers.tools import quantize
from workers.tools.modelgen import PRESETS, WINDOWED_ARCHES
from workers.tools.handoff import (
    HandoffConfig,
    check_quantized_handoff,
    kl_divergence,
    leading_agreement,
)

pytestmark = pytest.mark.skipif(not have("mlx.core"), reason="needs the mlx extra (mlx-lm quantizes)")
N_TOKENS = 16
WINDOW = PRESETS["tiny"]["sliding_window"]


@pytest.fixture(scope="module")
def base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny llama checkpoint and its 4- and 8-bit copies, written by ``pdc make-model --quantize``."""
    folder = tmp_path_factory.mktemp("quantized") / "tiny-base"
    for bits in quantize.BITS:
        assert main(["make-model", str(folder), "--quantize", str(bits)]) == 0
    return folder


def _copy(base: Path, bits: int) -> Path:
    return base.with_name(f"{base.name}-q{bits}")


class _Engine:
    layout_dtype = "float32"


def _info(folder: Path) -> pb.ModelInfo:
    return model_info(folder, read_model_spec(folder), _Engine())  # type: ignore[arg-type]


def _node(node_id: str, model: pb.ModelInfo, roles: tuple[str, ...]) -> NodeInfo:
    return NodeInfo(node_id=node_id, roles=roles, engine="mlx", model_id=model.model_id,
                    weights_fingerprint=model.fingerprint, host="127.0.0.1", grpc_port=50051, kv_port=50052,
                    device="cpu", tflops=1.0, mem_bw_gbps=10.0, free_mem_bytes=0, version="0", key_fingerprint="k")


def _judge(*served: tuple[NodeInfo, pb.ModelInfo]) -> ModelRegistry:
    """A registry that learned ``served`` (node, its model) in order, as the scheduler does."""
    infos = {node.node_id: model for node, model in served}

    async def fetch(node: NodeInfo) -> pb.InfoReply:
        return pb.InfoReply(model=infos[node.node_id])

    registry = ModelRegistry(fetch)
    for node, _ in served:
        asyncio.run(registry.learn(node))
    return registry


# ---------------------------------------------------------------- the copies


@pytest.mark.parametrize("bits", quantize.BITS)
def test_make_model_quantize_writes_a_copy_mlx_lm_loads(base: Path, bits: int) -> None:
    from mlx import nn

    from workers.engines.registry import load_engine

    copy = _copy(base, bits)
    config = json.loads((copy / "config.json").read_text())
    assert config["quantization"] == {"group_size": 64, "bits": bits, "mode": "affine"}  # mlx-lm's own block
    engine = load_engine("mlx", copy, "float32")  # mlx-lm's loader, no help from us
    quantized = [m for _, m in engine.model.named_modules() if isinstance(m, nn.QuantizedLinear)]
    assert quantized and all(m.bits == bits for m in quantized)
    assert engine.kv_layout(8) == load_engine("mlx", base, "float32").kv_layout(8)
    assert quantize.declared_base(copy)["base_model_id"] == base.name
    for name in ("tokenizer.json", "tokenizer_config.json"):  # byte for byte: every node tokenizes alike
        assert (copy / name).read_bytes() == (base / name).read_bytes()


def test_make_model_replaces_its_own_copy_but_not_another_folder(tmp_path: Path) -> None:
    folder = tmp_path / "m"
    assert main(["make-model", str(folder), "--quantize", "8"]) == 0
    assert main(["make-model", str(folder), "--quantize", "8"]) == 0  # a second run rebuilds the copy
    shutil.rmtree(folder.with_name("m-q8"))
    folder.with_name("m-q8").mkdir()
    with pytest.raises(FileExistsError, match="not a quantized copy made by pdcluster"):
        quantize.make_quantized_sibling(folder, 8)


def test_quantizing_refuses_bits_mlx_lm_is_not_asked_for_and_quantized_input(base: Path, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="bits must be one of"):
        quantize.quantize_checkpoint(base, tmp_path / "q3", 3)
    with pytest.raises(ValueError, match="already quantized"):
        quantize.quantize_checkpoint(_copy(base, 4), tmp_path / "qq", 4)


@requires_torch_and_mlx
def test_the_torch_engine_refuses_mlx_quantized_weights(base: Path) -> None:
    from workers.engines.model_config import UnsupportedModelError
    from workers.engines.registry import load_engine

    with pytest.raises(UnsupportedModelError, match="torch engine cannot load mlx-lm-quantized weights"):
        load_engine("torch", _copy(base, 4))


# ---------------------------------------------------------------- the same model, and prefix hashes


def test_a_copy_is_served_under_its_base_id_with_its_own_fingerprint(base: Path) -> None:
    full, q4, q8 = _info(base), _info(_copy(base, 4)), _info(_copy(base, 8))
    assert full.model_id == q4.model_id == q8.model_id == base.name
    assert served_model_id(_copy(base, 4), "chosen") == "chosen"  # pdc worker --model-id wins
    assert len({full.fingerprint, q4.fingerprint, q8.fingerprint}) == 3
    prompt = list(range(3, 3 + 4 * 64))
    hashes = [set(block_hashes(m.fingerprint, prompt)) for m in (full, q4, q8)]
    assert not (hashes[0] & hashes[1]) and not (hashes[0] & hashes[2]) and not (hashes[1] & hashes[2])


def test_the_scheduler_accepts_a_quantized_decode_node_as_its_base_model(base: Path) -> None:
    full, q4 = _info(base), _info(_copy(base, 4))
    prefill, decode = _node("bf16-box", full, ("prefill",)), _node("mac-q4", q4, ("decode",))
    registry = _judge((prefill, full), (decode, q4))
    assert registry.accepts(prefill) and registry.accepts(decode) and registry.refused([prefill, decode]) == {}
    assert [e.model_id for e in registry.entries([decode.model_id])] == [base.name]
    assert registry.record(base.name).source == "bf16-box"  # the first node taught it


@pytest.mark.parametrize(("field", "value"), [("num_layers", 6), ("kv_heads", 4), ("head_dim", 32),
                                              ("model_type", "qwen3")])
def test_the_scheduler_refuses_a_pair_whose_model_differs_naming_the_field(base: Path, field: str,
                                                                           value: object) -> None:
    full, other = _info(base), _info(_copy(base, 4))
    setattr(other, field, value)
    other.fingerprint = "other-weights"
    prefill, decode = _node("bf16-box", full, ("prefill",)), _node("mac", other, ("decode",))
    registry = _judge((prefill, full), (decode, other))
    assert registry.accepts(prefill) and not registry.accepts(decode)
    why = registry.refused([prefill, decode])["mac"]
    assert why.startswith(f"{field} is {value!r} there") and "bf16-box" in why


def test_the_scheduler_refuses_a_pair_whose_sliding_windows_differ(base: Path) -> None:
    """Equal shapes but another window per layer: the KV layouts would not
    agree, so the pair is refused before any request, naming the windows."""
    full, other = _info(base), _info(_copy(base, 4))
    config = json.loads(other.config_json)
    config.update(layer_types=["sliding_attention", "full_attention"] * (other.num_layers // 2),
                  sliding_window=64)
    other.config_json, other.fingerprint = json.dumps(config), "windowed-weights"
    prefill, decode = _node("bf16-box", full, ("prefill",)), _node("mac", other, ("decode",))
    registry = _judge((prefill, full), (decode, other))
    assert not registry.accepts(decode)
    assert registry.refused([decode])["mac"].startswith("sliding windows per layer are [64, None")


def test_a_refused_node_is_not_fetched_again_and_the_teachers_copies_pass_unasked(base: Path) -> None:
    full = _info(base)
    asked: list[str] = []

    async def fetch(node: NodeInfo) -> pb.InfoReply:
        asked.append(node.node_id)
        return pb.InfoReply(model=full)

    async def body() -> ModelRegistry:
        registry = ModelRegistry(fetch)
        registry.learn_soon(_node("a", full, ("prefill",)))
        await asyncio.sleep(0.05)
        registry.learn_soon(_node("b", full, ("decode",)))  # same fingerprint: judged with the teacher
        await registry.stop()
        return registry

    registry = asyncio.run(body())
    assert asked == ["a"] and registry.accepts(_node("b", full, ("decode",)))


def test_the_tools_and_the_scheduler_check_the_same_fields_and_sidecar() -> None:
    assert quantize.SAME_MODEL_FIELDS == models.SAME_MODEL_FIELDS
    assert quantize.QUANTIZED_FILE == info.QUANTIZED_FILE


# ---------------------------------------------------------------- check-handoff --quantized-decode


def test_kl_and_agreement_are_zero_and_whole_for_identical_runs() -> None:
    logits = np.random.default_rng(0).standard_normal((4, 50)).astype(np.float32)
    assert np.all(kl_divergence(logits, logits) < 1e-12)
    assert np.all(kl_divergence(logits, logits[::-1]) > 0)
    assert leading_agreement([1, 2, 3], [1, 2, 3]) == 3 and leading_agreement([1, 5, 3], [1, 2, 3]) == 1


@requires_torch_and_mlx
def test_check_handoff_measures_a_quantized_decode_copy(base: Path) -> None:
    results = {}
    for bits in quantize.BITS:
        config = HandoffConfig(model=str(base), quantized_decode=str(_copy(base, bits)), max_tokens=N_TOKENS)
        r = results[bits] = check_quantized_handoff(config)
        assert r.tokens_compared == N_TOKENS and len(r.handoff_tokens) == len(r.reference_tokens) == N_TOKENS
        assert 0 <= r.greedy_agreement <= N_TOKENS and 0.0 <= r.greedy_agreement_rate <= 1.0
        for share in (r.top1_agreement, r.full_precision_top1_agreement):
            assert 0.0 <= share <= 1.0
        for kl in (r.mean_kl, r.max_kl, r.full_precision_mean_kl):
            assert math.isfinite(kl) and kl >= 0.0
        assert r.max_kl >= r.mean_kl and r.quantization["bits"] == bits and r.base_model_id == base.name
    # 8 bits sit closer to the full-precision KV than 4 do (tiny: about 1e-4 vs 1e-1 nats here)
    assert results[8].mean_kl < results[4].mean_kl
    assert results[8].top1_agreement >= results[4].top1_agreement


@requires_torch_and_mlx
def test_check_handoff_cli_reports_agreement_and_kl_in_text_and_json(base: Path,
                                                                     capsys: pytest.CaptureFixture) -> None:
    code = main(["check-handoff", "--model", str(base), "--quantized-decode", str(_copy(base, 8)),
                 "--max-tokens", str(N_TOKENS), "--prompt-tokens", "200", "--json"])
    out = capsys.readouterr().out
    assert code == 0
    assert "greedy agreement" in out and "top-1 agreement" in out and "mean KL" in out
    report = json.loads(out.strip().splitlines()[-1])
    assert report["tokens_compared"] == N_TOKENS and 0.0 <= report["greedy_agreement_rate"] <= 1.0
    assert 0.0 <= report["top1_agreement"] <= 1.0 and math.isfinite(report["mean_kl"]) and report["mean_kl"] >= 0


@requires_torch_and_mlx
def test_check_handoff_refuses_a_copy_of_another_model_naming_the_field(base: Path, tmp_path: Path,
                                                                        capsys: pytest.CaptureFixture) -> None:
    other = tmp_path / "qwen3"
    assert main(["make-model", str(other), "--arch", "qwen3", "--quantize", "4"]) == 0
    code = main(["check-handoff", "--model", str(base), "--quantized-decode", str(_copy(other, 4))])
    assert code != 0 and "model_type is 'qwen3' there but 'llama'" in capsys.readouterr().err
    code = main(["check-handoff", "--model", str(base), "--quantized-decode", str(base)])
    assert code != 0 and "holds full-precision weights" in capsys.readouterr().err


@pytest.mark.slow
@requires_torch_and_mlx
def test_8_bit_agrees_at_least_as_well_as_4_bit_on_the_small_preset(tmp_path: Path) -> None:
    folder = tmp_path / "small"
    for bits in quantize.BITS:
        assert main(["make-model", str(folder), "--preset", "small", "--quantize", str(bits)]) == 0
    results = {bits: check_quantized_handoff(HandoffConfig(model=str(folder), max_tokens=N_TOKENS,
                                                           quantized_decode=str(_copy(folder, bits))))
               for bits in quantize.BITS}
    assert results[8].mean_kl < results[4].mean_kl
    assert results[8].top1_agreement >= results[4].top1_agreement
    assert results[8].greedy_agreement >= results[4].greedy_agreement


# ---------------------------------------------------------------- through real worker processes


@pytest.mark.slow
@requires_torch_and_mlx
def test_a_bf16_style_prefill_node_hands_off_to_a_4_bit_decode_node(base: Path, tmp_path: Path) -> None:
    """A torch worker on the full-precision folder and an MLX worker on its
    4-bit copy serve one model id; a disaggregated chat runs across them."""
    import openai

    key_file = write_config(tmp_path / "cluster.json", generate_key())
    workers = [start_worker_process("prefill", "torch", base, key_file, tmp_path / "prefill.log"),
               start_worker_process("decode", "mlx", _copy(base, 4), key_file, tmp_path / "decode.log")]
    scheduler = None
    try:
        for worker in workers:
            assert worker.ready.wait(120), worker.tail()
        scheduler = SchedulerProcess(key_file, [w.grpc for w in workers], tmp_path / "serve.log")
        health = scheduler.wait_ready(2)
        assert health["models"] == [base.name] and health["refused"] == {}
        client = openai.OpenAI(base_url=scheduler.url + "/v1", api_key="x", timeout=120, max_retries=0)
        reply = client.chat.completions.create(model=base.name, messages=[{"role": "user", "content": "Hi"}],
                                               max_tokens=8, temperature=0,
                                               extra_body={"pdcluster": {"placement": "disaggregated"}})
        stats = reply.model_extra["pdcluster"]
        assert (stats["prefill_node"], stats["decode_node"]) == ("proc-prefill", "proc-decode")
        assert stats["kv_bytes"] > 0 and reply.usage.completion_tokens == 8
    finally:
        if scheduler is not None:
            scheduler.stop()
        stop_processes(workers)


def test_placement_never_pairs_a_node_the_registry_refused(base: Path) -> None:
    from conftest import FakeTable

    from cluster.auth import generate_key
    from scheduler.request import GenerationRequest, NoCapacityError
    from scheduler.service import ClusterBackend, SchedulerConfig

    full, other = _info(base), _info(_copy(base, 4))
    other.num_layers, other.fingerprint = 6, "other-weights"
    prefill, decode = _node("bf16-box", full, ("prefill",)), _node("mac", other, ("decode",))
    backend = ClusterBackend(SchedulerConfig(mdns=False), generate_key())
    backend.registry = _judge((prefill, full), (decode, other))
    backend.table = FakeTable([prefill, decode])
    assert backend.models() == []  # its only decode node serves another model under this id
    assert backend.health()[1]["refused"]["mac"].startswith("num_layers is 6 there")
    request = GenerationRequest("r", base.name, (1, 2, 3), max_tokens=1)
    with pytest.raises(NoCapacityError):
        asyncio.run(anext(aiter(backend.generate(request))))


# ---------------------------------------------------------------- sliding-window models (gpt-oss, gemma3)


@requires_torch_and_mlx
@pytest.mark.parametrize("arch", WINDOWED_ARCHES)
def test_teacher_forcing_over_a_window_reproduces_the_engines_own_greedy_tokens(arch: str, tmp_path: Path) -> None:
    """``forced_logits`` loads the prompt as a whole-length prefix and lets the model's own window
    mask do the rest: fed its own greedy tokens, each engine's forced argmax is exactly those tokens,
    on a prompt longer than the window (so the mask has tokens to hide)."""
    from workers.engines.registry import load_engine
    from workers.engines.sampling import SamplingParams
    from workers.tools.handoff import _alone_with_logits, forced_logits, prompt_token_ids

    folder = tmp_path / arch
    assert main(["make-model", str(folder), "--arch", arch]) == 0
    token_ids = prompt_token_ids(folder, WINDOW + 44)
    for engine_name in ("mlx", "torch"):
        engine = load_engine(engine_name, folder, "float32")
        tokens, logits, kv = _alone_with_logits(engine, token_ids, SamplingParams(max_tokens=8, temperature=0.0), 128)
        assert [int(t) for t in np.argmax(forced_logits(engine, token_ids, kv, logits, tokens), axis=-1)] == tokens


@requires_torch_and_mlx
@pytest.mark.parametrize("arch", WINDOWED_ARCHES)
def test_check_handoff_measures_a_quantized_decode_copy_of_a_sliding_window_model(arch: str, tmp_path: Path) -> None:
    """gpt-oss (its transformers-fused experts included) and gemma3 quantize with mlx-lm, and the
    measurement runs on a prompt longer than their window: figures in range, the copy's own bits."""
    folder = tmp_path / arch
    assert main(["make-model", str(folder), "--arch", arch, "--quantize", "8"]) == 0
    config = HandoffConfig(model=str(folder), quantized_decode=str(_copy(folder, 8)), max_tokens=8,
                           prompt_tokens=WINDOW + 44)
    r = check_quantized_handoff(config)
    assert r.tokens_compared == 8 and r.quantization["bits"] == 8 and r.prompt_tokens == WINDOW + 44
    assert 0 <= r.greedy_agreement <= 8 and 0.0 <= r.top1_agreement <= 1.0
    assert math.isfinite(r.mean_kl) and 0.0 <= r.mean_kl <= r.max_kl
