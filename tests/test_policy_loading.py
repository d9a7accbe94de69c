"""User policies loaded from files and modules: what loads, and the one-line
error each kind of broken plug-in gets (from ``load_policy`` and through
``pdc simulate``); also the simulator's --model and --engine errors."""
from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from scheduler import catalog
from scheduler.placement import ClusterView, NodeView, Placement
from scheduler.policy import load_policy
from scheduler.request import GenerationRequest
from scheduler.sim.cli import main as simulate_main

ROOT = Path(__file__).parent.parent
CLUSTER = ROOT / "examples" / "clusters" / "spark-m4max-10gbe.toml"
LLAMA = "llama-3.1-8b"

DATACLASS_POLICY = '''\
from __future__ import annotations

from dataclasses import dataclass, field

from scheduler.placement import ClusterView, Placement
from scheduler.request import GenerationRequest


@dataclass
class Slowest:
    """Decode on the lowest-bandwidth node, prefill there too."""

    placed: list[str] = field(default_factory=list)

    def place(self, request: GenerationRequest, cluster: ClusterView) -> Placement:
        node = min(cluster.nodes, key=lambda n: n.mem_bw_gbps)
        self.placed.append(node.node_id)
        return Placement(None, node.node_id)
'''

# (file text, attribute, what the error must say after "policy '<spec>': ")
BROKEN = {
    "syntax_error": ("x = 1\ndef broken(:\n    pass\n", "X", r"{path} line 2: SyntaxError: "),
    "raises_at_import": ("import os\n\nraise RuntimeError('no GPU here')\n", "X",
                         r"{path} line 3: RuntimeError: no GPU here"),
    "imports_a_missing_package": ("import no_such_package_pdc\n", "X",
                                  r"{path} line 1: ModuleNotFoundError: No module named 'no_such_package_pdc'"),
    "constructor_needs_arguments": (
        "class X:\n    def __init__(self, gain):\n        self.gain = gain\n"
        "    def place(self, request, cluster):\n        return None\n",
        "X", r"X\(\) failed: TypeError: .*missing 1 required positional argument: 'gain'"),
    "constructor_raises": ("class X:\n    def __init__(self):\n        raise KeyError('threshold')\n", "X",
                           r"X\(\) failed: KeyError: 'threshold'"),
    "attribute_is_not_a_class": ("X = 3\n", "X", r"X is not a class \(got int\)"),
    "attribute_is_a_function": ("def X(request, cluster):\n    return None\n", "X",
                                r"X is not a class \(got function\)"),
    "attribute_is_missing": ("class Y:\n    pass\n", "X", r"{path} has no attribute 'X'"),
    "class_has_no_place": ("class X:\n    pass\n", "X", r"X has no place\(request, cluster\) method"),
}


def _node(node_id: str, mem_bw_gbps: float) -> NodeView:
    return NodeView(node_id, ("prefill", "decode"), "torch", "m", 100.0, mem_bw_gbps, 64 << 30, 0)


def _write(tmp_path: Path, case: str) -> tuple[str, str]:
    text, attr, expected = BROKEN[case]
    path = tmp_path / f"{case}.py"
    path.write_text(text)
    return f"{path}:{attr}", expected.format(path=re.escape(str(path)))


def test_a_dataclass_policy_with_postponed_annotations_loads_from_a_file_and_places(tmp_path: Path) -> None:
    plugin = tmp_path / "dc_policy.py"
    plugin.write_text(DATACLASS_POLICY)
    policy = load_policy(f"{plugin}:Slowest")
    cluster = ClusterView((_node("fast", 800.0), _node("slow", 100.0)))
    request = GenerationRequest(request_id="r", model="m", prompt_token_ids=(1, 2, 3), max_tokens=4)
    assert policy.place(request, cluster) == Placement(None, "slow")
    assert policy.placed == ["slow"] and repr(policy) == "Slowest(placed=['slow'])"


def test_the_same_file_loads_again_after_it_is_fixed(tmp_path: Path) -> None:
    plugin = tmp_path / "flaky.py"
    plugin.write_text("raise RuntimeError('half-written')\n")
    with pytest.raises(ValueError, match="half-written"):
        load_policy(f"{plugin}:Slowest")
    assert f"pdc_user_policy_{plugin.stem}" not in sys.modules  # a failed run leaves no half module behind
    plugin.write_text(DATACLASS_POLICY)
    assert type(load_policy(f"{plugin}:Slowest")).__name__ == "Slowest"


@pytest.mark.parametrize("case", sorted(BROKEN))
def test_a_broken_plugin_file_is_a_value_error_naming_the_spec_and_the_reason(tmp_path: Path, case: str) -> None:
    spec, expected = _write(tmp_path, case)
    with pytest.raises(ValueError) as err:
        load_policy(spec)
    message = str(err.value)
    assert message.startswith(f"policy {spec!r}: "), message
    assert re.search(expected, message), message
    assert "\n" not in message


def test_a_module_that_raises_at_import_names_its_file_and_line(tmp_path: Path,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    package = tmp_path / "pdc_broken_pkg"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "rules.py").write_text("LIMIT = 1\nLIMIT = LIMIT / 0\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(ValueError) as err:
        load_policy("pdc_broken_pkg.rules:Rule")
    assert str(err.value) == (f"policy 'pdc_broken_pkg.rules:Rule': module 'pdc_broken_pkg.rules' cannot be imported: "
                              f"{package / 'rules.py'} line 2: ZeroDivisionError: division by zero")


def test_a_missing_module_says_it_cannot_be_imported() -> None:
    with pytest.raises(ValueError) as err:
        load_policy("no_such_pdc_module.rules:X")
    assert str(err.value) == ("policy 'no_such_pdc_module.rules:X': module 'no_such_pdc_module.rules' cannot be "
                              "imported: ModuleNotFoundError: No module named 'no_such_pdc_module'")


@pytest.mark.parametrize("case", ["syntax_error", "raises_at_import", "constructor_needs_arguments",
                                  "attribute_is_not_a_class"])
def test_pdc_simulate_with_a_broken_plugin_exits_2_with_one_error_line(tmp_path: Path, case: str) -> None:
    spec, expected = _write(tmp_path, case)
    cmd = [sys.executable, "-m", "cluster.cli", "simulate", "--cluster", str(CLUSTER), "--model", LLAMA,
           "--policy", spec]
    done = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert done.returncode == 2, done.stderr
    assert "Traceback" not in done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"pdc: error: policy {spec!r}: "), done.stderr
    assert re.search(expected, lines[0]), lines[0]


# ---------------------------------------------------------------- --model and --engine


def _simulate_error(capsys: pytest.CaptureFixture[str], *argv: str) -> str:
    assert simulate_main(["--cluster", str(CLUSTER), *argv]) == 2
    return capsys.readouterr().err.strip()


def test_a_model_path_that_is_not_json_is_named(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bad = tmp_path / "two-objects.json"
    bad.write_text('{"model_type": "llama"}\n{"hidden_size": 64}\n')
    err = _simulate_error(capsys, "--model", str(bad))
    assert err.startswith(f"pdc simulate: error: model config {bad} is not readable JSON: Extra data: line 2"), err


def test_a_model_config_that_is_not_an_object_is_named(tmp_path: Path) -> None:
    bad = tmp_path / "config.json"
    bad.write_text("[1, 2]\n")
    with pytest.raises(catalog.CatalogError, match=re.escape(f"model config {bad} is not a JSON object")):
        catalog.model_config(tmp_path)


def test_a_model_config_missing_a_key_names_the_path_and_the_key(tmp_path: Path,
                                                                 capsys: pytest.CaptureFixture[str]) -> None:
    config = catalog.model_config(LLAMA)
    del config["num_hidden_layers"]
    (tmp_path / "config.json").write_text(json.dumps(config))
    err = _simulate_error(capsys, "--model", str(tmp_path))
    assert err == (f"pdc simulate: error: model config {tmp_path / 'config.json'}: "
                   "config.json lacks 'num_hidden_layers', which the cost model needs")


def test_an_unknown_engine_is_refused_listing_the_known_ones(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_:
        simulate_main(["--cluster", str(CLUSTER), "--model", LLAMA, "--engine", "llamcpp"])
    assert exit_.value.code == 2
    assert "argument --engine: invalid choice: 'llamcpp' (choose from 'llamacpp', 'mlx', 'torch')" in \
        capsys.readouterr().err
