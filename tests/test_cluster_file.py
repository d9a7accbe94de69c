"""Cluster files: the examples load, overrides apply, and every bad entry is named."""
from __future__ import annotations

from pathlib import Path

import pytest

from scheduler import catalog
from scheduler.sim import cluster_file
from scheduler.sim.cluster_file import ClusterFileError

EXAMPLES = Path(__file__).parent.parent / "examples" / "clusters"

PAIR = """
[[nodes]]
name = "spark"
hardware = "dgx-spark"

[[nodes]]
name = "mac"
hardware = "mac-m4-max"
roles = ["decode"]

[[links]]
nodes = ["spark", "mac"]
kind = "10gbe"
"""


@pytest.mark.parametrize("path", sorted(EXAMPLES.glob("*.toml")), ids=lambda p: p.name)
def test_every_example_cluster_loads_with_catalog_hardware(path: Path) -> None:
    spec = cluster_file.load(path)
    assert spec.nodes and spec.name
    assert all(n.hardware in catalog.HARDWARE for n in spec.nodes)
    names = {n.name for n in spec.nodes}
    assert all(set(l.nodes) <= names for l in spec.links)


def test_the_examples_the_docs_promise_exist() -> None:
    pairs = {p.name: cluster_file.load(p) for p in EXAMPLES.glob("*.toml")}
    hardware = {name: sorted(n.hardware for n in spec.nodes) for name, spec in pairs.items()}
    assert hardware["spark-m4max-10gbe.toml"] == ["dgx-spark", "mac-m4-max"]
    assert hardware["spark-2x-m4max.toml"] == ["dgx-spark", "mac-m4-max", "mac-m4-max"]
    assert hardware["ai-max-395-m4max-2.5gbe.toml"] == ["mac-m4-max", "ryzen-ai-max-395"]
    assert hardware["mac-m4max.toml"] == ["mac-m4-max"]


def test_roles_default_to_both_and_links_join_either_order() -> None:
    spec = cluster_file.loads(PAIR)
    assert spec.node("spark").roles == ("prefill", "decode")
    assert spec.node("mac").roles == ("decode",)
    assert spec.link_between("mac", "spark") is spec.link_between("spark", "mac") is not None
    # 10GbE: 10 Gb/s line rate x 0.94 TCP payload share
    assert spec.link_between("spark", "mac").payload_gbit_s == pytest.approx(9.4)


def test_node_and_link_overrides_replace_catalog_figures() -> None:
    text = PAIR.replace('hardware = "dgx-spark"', 'hardware = "dgx-spark"\ntflops = 100\nmem_gb = 96')
    text = text.replace('kind = "10gbe"', 'kind = "10gbe"\ngbit_s = 5\nlatency_s = 0.001')
    spec = cluster_file.loads(text)
    spark = spec.node("spark").machine()
    assert (spark.tflops, spark.mem_bw_gbps, spark.mem_gb) == (100.0, 273.0, 96.0)
    link = spec.link_between("spark", "mac").network()
    assert (link.gbit_s, link.latency_s, link.payload_efficiency) == (5.0, 0.001, 0.94)


def test_a_link_without_a_kind_is_a_measured_payload_rate() -> None:
    spec = cluster_file.loads(PAIR.replace('kind = "10gbe"', "gbit_s = 7.5"))
    assert spec.link_between("spark", "mac").payload_gbit_s == pytest.approx(7.5)


_BAD = [
    ("unknown hardware", PAIR.replace('"mac-m4-max"', '"mac-m9"'),
     r"nodes\[1\] \('mac'\): unknown hardware 'mac-m9'; known hardware: dgx-spark"),
    ("link to a missing node", PAIR.replace('nodes = ["spark", "mac"]', 'nodes = ["spark", "mini"]'),
     r"links\[0\] \('spark' <-> 'mini'\): no node named 'mini'"),
    ("unknown link kind", PAIR.replace('"10gbe"', '"25gbe"'),
     r"links\[0\] \('spark' <-> 'mac'\): unknown link kind '25gbe'; known links: .*10gbe"),
    ("duplicate node names", PAIR.replace('name = "mac"', 'name = "spark"'),
     r"nodes\[1\]: duplicate node name 'spark'"),
    ("unknown role", PAIR.replace('roles = ["decode"]', 'roles = ["decode", "train"]'),
     r"nodes\[1\] \('mac'\): bad role 'train'"),
    ("empty roles", PAIR.replace('roles = ["decode"]', "roles = []"),
     r"nodes\[1\] \('mac'\): 'roles' must be a non-empty list"),
    ("a role twice", PAIR.replace('roles = ["decode"]', 'roles = ["decode", "decode"]'),
     r"nodes\[1\] \('mac'\): 'roles' lists a role twice"),
    ("roles as a string", PAIR.replace('roles = ["decode"]', 'roles = "decode"'),
     r"nodes\[1\] \('mac'\): 'roles' must be a non-empty list"),
    ("no decoder", PAIR.replace('roles = ["decode"]', 'roles = ["prefill"]').replace(
        'hardware = "dgx-spark"', 'hardware = "dgx-spark"\nroles = ["prefill"]'), r"no node has the 'decode' role"),
    ("misspelt key", PAIR.replace('name = "mac"', 'name = "mac"\ntflop = 30'),
     r"nodes\[1\] \('mac'\): unknown key 'tflop'"),
    ("negative override", PAIR.replace('name = "mac"', 'name = "mac"\nmem_bw_gbps = -5'),
     r"nodes\[1\] \('mac'\): 'mem_bw_gbps' must be a number > 0"),
    ("node without a name", PAIR.replace('name = "mac"\n', ""), r"nodes\[1\]: needs a non-empty string 'name'"),
    ("link to itself", PAIR.replace('nodes = ["spark", "mac"]', 'nodes = ["mac", "mac"]'),
     r"links\[0\] \('mac' <-> 'mac'\): a link joins two different nodes"),
    ("link with three ends", PAIR.replace('nodes = ["spark", "mac"]', 'nodes = ["spark", "mac", "x"]'),
     r"links\[0\]: 'nodes' must name exactly two nodes"),
    ("link with neither kind nor rate", PAIR.replace('kind = "10gbe"', ""), r"links\[0\] .*needs 'kind'"),
    ("two links for one pair", PAIR + '\n[[links]]\nnodes = ["mac", "spark"]\nkind = "1gbe"\n',
     r"links\[1\]: a second link between 'mac' and 'spark'"),
    ("payload share above one", PAIR.replace('kind = "10gbe"', 'kind = "10gbe"\npayload_efficiency = 1.5'),
     r"'payload_efficiency' must be in \(0, 1\]"),
    ("unknown engine", PAIR.replace('name = "mac"', 'name = "mac"\nengine = "llamcpp"'),
     r"nodes\[1\] \('mac'\): unknown engine 'llamcpp'; known engines: llamacpp, mlx, torch"),
    ("no nodes", "name = 'empty'\n", r"no \[\[nodes\]\]"),
    ("not TOML", "[[nodes]\nname = 'x'", r"not valid TOML"),
]


@pytest.mark.parametrize("text, message", [(t, m) for _, t, m in _BAD], ids=[n for n, _, _ in _BAD])
def test_bad_cluster_files_are_refused_naming_the_entry(text: str, message: str) -> None:
    with pytest.raises(ClusterFileError, match=message) as error:
        cluster_file.loads(text, source="home.toml")
    assert str(error.value).startswith("home.toml: ")
    assert isinstance(error.value, ValueError)  # pdc's CLI turns these into exit code 2


def test_a_missing_file_is_named(tmp_path: Path) -> None:
    with pytest.raises(ClusterFileError, match=r"nope\.toml: cannot read it"):
        cluster_file.load(tmp_path / "nope.toml")
