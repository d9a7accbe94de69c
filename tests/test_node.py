"""NodeInfo: validated on construction, and its mDNS TXT form round-trips or fails with a clear ValueError."""
from __future__ import annotations

import dataclasses

import pytest

from cluster.node import MAX_TXT_ITEM_BYTES, NodeInfo


def make_node(**overrides: object) -> NodeInfo:
    fields: dict[str, object] = dict(
        node_id="spark-1",
        roles=("prefill",),
        engine="torch",
        model_id="meta-llama/Llama-3.1-8B-Instruct",
        weights_fingerprint="sha256:0123abcd",
        host="192.168.1.20",
        grpc_port=50051,
        kv_port=50052,
        device="cuda",
        tflops=100.25,
        mem_bw_gbps=273.0,
        free_mem_bytes=96 * 2**30,
        version="0.1.0",
        key_fingerprint="kfp-5e1f",
        source="mdns",
    )
    fields.update(overrides)
    return NodeInfo(**fields)  # type: ignore[arg-type]


def as_zeroconf_props(txt: dict[str, str]) -> dict[bytes, bytes | None]:
    """TXT properties as zeroconf's ServiceInfo.properties hands them over."""
    return {k.encode(): v.encode() for k, v in txt.items()}


@pytest.mark.parametrize(
    "node",
    [
        make_node(),
        make_node(node_id="mac.studio", roles=("decode", "prefill"), engine="mlx", device="mlx:gpu", tflops=0.1 + 0.2),
        make_node(host="fe80::1%2", free_mem_bytes=0, model_id="", weights_fingerprint="", kv_port=65535),
        make_node(model_id="mödel/ünicode", tflops=1e-7, mem_bw_gbps=819),
        make_node(hardware="dgx-spark", profile_source="declared", tflops=125.0),
        make_node(hardware="", profile_source="measured+declared"),
    ],
)
def test_txt_round_trip_is_exact(node: NodeInfo) -> None:
    txt = node.to_txt()
    assert all(isinstance(k, str) and isinstance(v, str) for k, v in txt.items())
    assert all(len(f"{k}={v}".encode()) <= MAX_TXT_ITEM_BYTES for k, v in txt.items())
    assert NodeInfo.from_txt(as_zeroconf_props(txt), node.host, node.grpc_port) == node
    assert NodeInfo.from_txt(txt, node.host) == node  # str keys, grpc port from TXT


def test_from_txt_takes_the_source_it_is_given() -> None:
    node = make_node()
    assert NodeInfo.from_txt(node.to_txt(), node.host, source="static").source == "static"


def test_unknown_txt_items_are_ignored_for_forward_compatibility() -> None:
    node = make_node()
    props = as_zeroconf_props({**node.to_txt(), "future": "x"}) | {b"flag": None}
    assert NodeInfo.from_txt(props, node.host, node.grpc_port) == node


def test_record_without_profile_items_reads_as_measured_with_no_hardware() -> None:
    declared = make_node(hardware="mac-m4-max", profile_source="declared")
    old = {k: v for k, v in declared.to_txt().items() if k not in ("hw", "psrc")}  # a pre-"hw"/"psrc" worker
    node = NodeInfo.from_txt(as_zeroconf_props(old), declared.host, declared.grpc_port)
    assert (node.hardware, node.profile_source) == ("", "measured")
    assert node == make_node()


def test_declared_profile_travels_in_short_txt_items() -> None:
    txt = make_node(hardware="ryzen-ai-max-395", profile_source="measured+declared").to_txt()
    assert (txt["hw"], txt["psrc"]) == ("ryzen-ai-max-395", "measured+declared")
    assert txt["txtvers"] == "1"  # optional items: old readers ignore them, so the version stays


def garble(key: str, value: bytes | None) -> dict[bytes, bytes | None]:
    props: dict[bytes, bytes | None] = as_zeroconf_props(make_node().to_txt())
    props[key.encode()] = value
    return props


@pytest.mark.parametrize(
    ("props", "message"),
    [
        ({k: v for k, v in garble("x", None).items() if k != b"kfp"}, r"missing TXT items \['kfp'\]"),
        (garble("tflops", None), r"missing TXT items \['tflops'\]"),
        (garble("tflops", b"fast"), r"tflops='fast' is not a number"),
        (garble("tflops", b"nan"), r"tflops='nan' must be a finite number"),
        (garble("bw", b"-1"), r"bw='-1' must be a finite number >= 0"),
        (garble("kv", b"12ab"), r"kv='12ab' is not a non-negative integer"),
        (garble("kv", b"70000"), r"kv_port 70000 is not a port number"),
        (garble("mem", b"-5"), r"mem='-5' is not a non-negative integer"),
        (garble("roles", b"prefill,train"), r"roles .* must be a non-empty"),
        (garble("roles", b""), r"roles .* must be a non-empty"),
        (garble("engine", b"Onnx Runtime"), r"engine 'Onnx Runtime' is not an engine name"),
        (garble("engine", b""), r"engine '' is not an engine name"),
        (garble("id", b"bad id!"), r"node_id 'bad id!'"),
        (garble("model", b"\xff\xfe"), r"not UTF-8"),
        (garble("model", b"m" * 250), r"'model' is 256 bytes, over the 255-byte limit"),
        (garble("txtvers", b"2"), r"TXT version '2' is not supported"),
        (garble("grpc", b"50099"), r"grpc='50099' disagrees with the SRV port 50051"),
        (garble("psrc", b"guessed"), r"profile_source 'guessed' is not one of"),
    ],
    ids=lambda p: p if isinstance(p, str) else None,
)
def test_garbled_txt_record_is_rejected_with_a_clear_message(props: dict[bytes, bytes | None], message: str) -> None:
    with pytest.raises(ValueError, match=message) as caught:
        NodeInfo.from_txt(props, "192.168.1.20", 50051)
    assert "192.168.1.20" in str(caught.value)  # says where it came from


def test_to_txt_refuses_an_item_over_255_bytes() -> None:
    with pytest.raises(ValueError, match=r"TXT item 'model' is 256 bytes"):
        make_node(model_id="m" * 250).to_txt()
    make_node(model_id="m" * 249).to_txt()  # exactly 255 bytes with "model="


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("roles", (), "roles"),
        ("roles", ("decode", "decode"), "roles"),
        ("engine", "JAX", "engine"),
        ("engine", "-torch", "engine"),
        ("engine", "e" * 33, "engine"),
        ("engine", None, "engine"),
        ("grpc_port", 0, "grpc_port"),
        ("kv_port", True, "kv_port"),
        ("tflops", float("inf"), "tflops"),
        ("free_mem_bytes", -1, "free_mem_bytes"),
        ("host", "", "host"),
        ("source", "carrier-pigeon", "source"),
        ("profile_source", "", "profile_source"),
        ("hardware", None, "hardware"),
        ("node_id", "x" * 64, "node_id"),
    ],
)
def test_invalid_node_info_is_refused_on_construction(field: str, value: object, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        make_node(**{field: value})


@pytest.mark.parametrize("engine", ["onnx", "llama.cpp", "vllm-0.6", "e" * 32])
def test_any_well_formed_engine_name_is_accepted_and_round_trips(engine: str) -> None:
    # cluster/ does not know which engines the workers have: a newer worker's engine must still list
    node = make_node(engine=engine)
    assert NodeInfo.from_txt(node.to_txt(), node.host, node.grpc_port) == node


def test_roles_given_as_a_list_become_a_tuple_and_node_stays_hashable() -> None:
    node = make_node(roles=["prefill", "decode"], tflops=100)
    assert node.roles == ("prefill", "decode") and isinstance(node.tflops, float)
    assert hash(node) == hash(dataclasses.replace(node))


def test_roles_and_addresses() -> None:
    prefill, decode = make_node(roles=("prefill",)), make_node(roles=("decode",), host="::1", grpc_port=7000)
    assert (prefill.can_prefill, prefill.can_decode) == (True, False)
    assert (decode.can_prefill, decode.can_decode) == (False, True)
    assert prefill.grpc_address == "192.168.1.20:50051" and prefill.kv_address == "192.168.1.20:50052"
    assert decode.grpc_address == "[::1]:7000"
    assert make_node(host="spark.local").grpc_address == "spark.local:50051"
