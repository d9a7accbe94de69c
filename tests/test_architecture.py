"""Imports run one way: cluster/ (who is out there) <- scheduler/ (where a
request goes) and workers/ (what computes it); heavy engines stay in their corner.

Every module's imports are read with ``ast`` (function-level imports included)
and checked against the rules below. A failure names the file, the line and
the rule it breaks. ``test_the_checker_catches_each_kind_of_violation`` is the
negative control: a tree that breaks every rule must be reported line by line.
"""
from __future__ import annotations

import ast
import re
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("cluster", "scheduler", "workers", "proto")
FIRST_PARTY = frozenset(PACKAGES)

# third-party packages that only the engine modules may import
TORCH_STACK = ("workers/engines/torch_engine.py",
               "workers/tools/gguf_convert.py")  # transformers' GGUF reader, run once to convert the built-in model
HEAVY: dict[str, tuple[str, ...]] = {
    "torch": TORCH_STACK,
    "transformers": TORCH_STACK,
    "mlx": ("workers/engines/mlx_engine.py",),
    "mlx_lm": ("workers/engines/mlx_engine.py",),
}


@dataclass(frozen=True)
class Rule:
    """Which first-party modules the files under ``prefix`` may import.

    ``allowed`` holds module prefixes: "cluster" admits every cluster module,
    "cluster.auth" that one module only."""

    prefix: str
    allowed: tuple[str, ...]
    why: str


# The most specific prefix wins. cluster/cli.py is the composition root.
RULES: tuple[Rule, ...] = (
    Rule("proto/", ("proto",), "the generated control-plane contract depends on nothing of ours"),
    Rule("cluster/cli.py", PACKAGES, "the composition root wires everything"),
    Rule("cluster/", ("cluster", "proto"), "cluster/ knows who is out there, not what they compute"),
    Rule("cluster/launcher.py", ("cluster", "proto", "workers.engines.registry"),
         "the local launcher starts workers by engine name"),
    Rule("cluster/status.py", ("cluster", "proto", "workers.rpc.client"),
         "pdc status asks each worker for its profile and links"),
    Rule("cluster/ray_backend.py", ("cluster", "proto", "workers.rpc.server", "workers.tools.builtin"),
         "a Ray actor runs the worker service, as pdc worker does"),
    Rule("cluster/ray_cli.py", ("cluster", "proto", "workers.rpc.client", "workers.engines.registry"),
         "pdc ray checks engine names and asks each actor's worker for its health"),
    Rule("scheduler/", ("scheduler", "cluster", "proto", "workers.rpc.client"),
         "the scheduler reaches workers through their gRPC client only"),
    Rule("workers/__init__.py", (), "a package marker"),
    Rule("workers/engines/", ("workers.engines", "cluster.hardware", "cluster.blocks"),
         "engines compute; they know nothing of the wire or the service"),
    Rule("workers/kv/", ("workers.kv", "workers.engines.base", "cluster.auth"),
         "the data plane moves KV slices of the engine contract, behind the cluster key"),
    Rule("workers/rpc/", ("workers.rpc", "workers.engines", "workers.kv", "proto",
                          "cluster.auth", "cluster.node", "cluster.hardware", "cluster.blocks"),
         "the worker service composes engines and the data plane"),
    Rule("workers/tools/", ("workers.tools", "workers.engines", "workers.kv", "cluster.paths"),
         "the tools drive engines and the data plane directly, never the service"),
)

FORBIDDEN_FOR_SCHEDULER = ("cluster.cli",)


def rule_for(path: str, rules: tuple[Rule, ...] = RULES) -> Rule:
    """The most specific rule whose prefix ``path`` starts with."""
    matching = [r for r in rules if path == r.prefix or (r.prefix.endswith("/") and path.startswith(r.prefix))]
    if not matching:
        raise LookupError(f"{path}: no import rule covers this file; add one to tests/test_architecture.py")
    return max(matching, key=lambda r: len(r.prefix))


def imported_modules(tree: ast.AST, module: str) -> list[tuple[int, str]]:
    """(line, absolute module name) of every import in ``tree``, wherever it sits."""
    found: list[tuple[int, str]] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.extend((node.lineno, alias.name) for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = _resolve(node, module)
            if node.module is None or node.level:
                # `from . import x` / `from .m import x`: each name may be a module
                found.extend((node.lineno, f"{base}.{alias.name}" if base else alias.name) for alias in node.names)
            else:
                found.extend((node.lineno, f"{base}.{alias.name}") for alias in node.names)
                found.append((node.lineno, base))
    return found


def _resolve(node: ast.ImportFrom, module: str) -> str:
    if not node.level:
        return node.module or ""
    parent = module.split(".")[: -node.level]
    return ".".join([*parent, node.module] if node.module else parent)


def _admits(allowed: tuple[str, ...], name: str) -> bool:
    return any(name == a or name.startswith(a + ".") for a in allowed)


def violations(root: Path, rules: tuple[Rule, ...] = RULES) -> list[str]:
    """Every import under ``root``'s packages that breaks a rule, as "file:line: why"."""
    problems: list[str] = []
    for package in PACKAGES:
        for file in sorted((root / package).rglob("*.py")):
            path = file.relative_to(root).as_posix()
            if path.startswith("proto/pdcluster_pb2"):
                continue  # generated by grpc_tools
            module = path[: -len(".py")].replace("/", ".")  # a package's __init__ keeps its name: relative imports resolve from it
            rule = rule_for(path, rules)
            tree = ast.parse(file.read_text(encoding="utf-8"), filename=path)
            problems.extend(_check_file(path, module, rule, tree))
    return problems


def _check_file(path: str, module: str, rule: Rule, tree: ast.AST) -> list[str]:
    """One problem per offending line (``from a.b import c`` lists both a.b and a.b.c)."""
    problems: dict[int, str] = {}
    for line, name in imported_modules(tree, module):
        top = name.split(".")[0]
        if line in problems:
            continue
        if top in HEAVY and path not in HEAVY[top]:
            problems[line] = f"{path}:{line}: imports {name}; only {' and '.join(HEAVY[top])} may import {top}"
        elif top not in FIRST_PARTY:
            continue
        elif path.startswith("scheduler/") and _admits(FORBIDDEN_FOR_SCHEDULER, name):
            problems[line] = f"{path}:{line}: imports {name}; the scheduler may not import the CLI"
        elif not _admits(rule.allowed, name) and not _is_submodule_probe(name, rule.allowed):
            problems[line] = (f"{path}:{line}: imports {name}; files under {rule.prefix} may import only "
                              f"{', '.join(rule.allowed) or 'nothing of ours'} ({rule.why})")
    return [problems[line] for line in sorted(problems)]


def _is_submodule_probe(name: str, allowed: tuple[str, ...]) -> bool:
    """`from workers.engines import base` lists both "workers.engines" and
    "workers.engines.base"; the package itself is fine when a module under it is."""
    return any(a.startswith(name + ".") for a in allowed)


# ---------------------------------------------------------------- the rules hold


def test_imports_follow_the_layering() -> None:
    problems = violations(ROOT)
    assert not problems, "imports that break the layering:\n" + "\n".join(problems)


def test_every_module_is_covered_by_a_rule() -> None:
    for package in PACKAGES:
        for file in (ROOT / package).rglob("*.py"):
            rule_for(file.relative_to(ROOT).as_posix())  # raises naming the file


def test_heavy_engines_are_not_imported_by_the_scheduler_at_runtime() -> None:
    """The static rule, checked once more the way a NAS would feel it: importing
    the scheduler's modules pulls in neither torch nor mlx."""
    import subprocess
    import sys

    code = ("import sys, scheduler.service, scheduler.sim.cli, scheduler.api; "
            "print(sorted(m for m in ('torch', 'transformers', 'mlx', 'mlx_lm') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


# ---------------------------------------------------------------- negative control


BAD_TREE = {
    "cluster/node.py": "from __future__ import annotations\nfrom scheduler.policy import POLICIES\n",
    "scheduler/policy.py": "import json\nfrom workers.engines.base import KVLayout\nfrom cluster.cli import main\n",
    "scheduler/load.py": "def f():\n    import torch\n    return torch\n",
    "workers/kv/codec.py": "from workers.rpc.server import Worker\n",
    "workers/rpc/profile.py": "import mlx.core as mx\nfrom scheduler import catalog\n",
    "workers/engines/base.py": "from . import sampling\nfrom ..kv import codec\n",
    "workers/engines/sampling.py": "import numpy\n",
    "workers/engines/torch_engine.py": "import torch\nimport transformers\n",
    "proto/__init__.py": "from cluster import auth\n",
}


@pytest.fixture
def bad_tree(tmp_path: Path) -> Path:
    for path, text in BAD_TREE.items():
        file = tmp_path / path
        file.parent.mkdir(parents=True, exist_ok=True)
        file.write_text(text)
    return tmp_path


def test_the_checker_catches_each_kind_of_violation(bad_tree: Path) -> None:
    problems = violations(bad_tree)
    where = sorted(p.split(": ")[0] for p in problems)
    assert where == sorted([
        "cluster/node.py:2",  # cluster importing the scheduler
        "scheduler/policy.py:2",  # the scheduler importing engine internals
        "scheduler/policy.py:3",  # the scheduler importing the CLI
        "scheduler/load.py:2",  # torch, even inside a function
        "workers/kv/codec.py:1",  # the data plane importing the service
        "workers/rpc/profile.py:1",  # mlx outside its engine
        "workers/rpc/profile.py:2",  # workers importing the scheduler
        "workers/engines/base.py:2",  # a relative import, resolved, into the data plane
        "proto/__init__.py:1",  # the contract depending on cluster/
    ]), "\n".join(problems)
    text = "\n".join(problems)
    assert "only workers/engines/torch_engine.py and workers/tools/gguf_convert.py may import torch" in text
    assert "files under workers/kv/ may import only" in text


def test_a_file_no_rule_covers_is_reported(tmp_path: Path) -> None:
    with pytest.raises(LookupError, match="notes.py: no import rule covers"):
        rule_for("notes.py")


# ---------------------------------------------------------------- the documented layout is the tree


def documented_layout(text: str) -> dict[str, set[str]]:
    """Folder -> the modules its table in docs/architecture.md lists
    (a "### `folder/`: ..." heading, then rows starting "| `file.py` |")."""
    layout: dict[str, set[str]] = {}
    folder = None
    for line in text.splitlines():
        heading = re.match(r"### `([\w/]+)/`", line)
        if heading:
            folder = heading.group(1)
            layout[folder] = set()
        elif line.startswith("## "):
            folder = None
        elif folder is not None:
            row = re.match(r"\| `([\w]+\.py)` \|", line)
            if row:
                layout[folder].add(row.group(1))
    return layout


def test_the_layout_tables_in_docs_list_every_module_of_the_tree() -> None:
    layout = documented_layout((ROOT / "docs" / "architecture.md").read_text(encoding="utf-8"))
    folders = ("cluster", "scheduler", "scheduler/sim", "workers/engines", "workers/kv", "workers/rpc",
               "workers/tools")
    assert set(layout) == set(folders)
    for folder in folders:
        modules = {p.name for p in (ROOT / folder).glob("*.py") if p.name != "__init__.py"}
        assert layout[folder] == modules, (f"docs/architecture.md's {folder}/ table: missing "
                                           f"{sorted(modules - layout[folder])}, stale {sorted(layout[folder] - modules)}")
    assert not [p for p in (ROOT / "workers").glob("*.py") if p.name != "__init__.py"], \
        "workers/ holds only its four sub-packages"


def test_test_modules_import_helpers_from_conftest_never_from_each_other() -> None:
    tests = ROOT / "tests"
    names = {p.stem for p in tests.rglob("test_*.py")}
    offenders = []
    for file in sorted(tests.rglob("*.py")):
        tree = ast.parse(file.read_text(encoding="utf-8"))
        for line, name in imported_modules(tree, file.stem):
            if name.split(".")[0] in names:
                offenders.append(f"{file.relative_to(ROOT)}:{line}: imports {name}")
    assert not offenders, "move shared test helpers to tests/conftest.py:\n" + "\n".join(sorted(set(offenders)))
