"""One config file per machine (cluster/config_file.py): precedence, refusals, `pdc run`."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import ROOT, READY_S, SchedulerProcess, free_port, requires_torch_and_mlx

from cluster.cli import build_parser, commands, main
from cluster.config_file import effective, expand_argv, load

FILE = """\
[scheduler]
port = 8123
kv_codec = "int8"
no-mdns = true
peers = ["127.0.0.1:1", "127.0.0.1:2"]

[[worker]]
role = "prefill"
engine = "torch"

[[worker]]
role = "decode"
engine = "mlx"
chunk-size = 64
"""


@pytest.fixture
def parsers() -> dict:
    return commands(build_parser())


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "pdcluster.toml"
    path.write_text(text)
    return path


def test_flags_override_the_file_which_overrides_defaults(tmp_path: Path, parsers: dict) -> None:
    path = write(tmp_path, FILE)
    argv = expand_argv(["serve", "--config", str(path), "--port", "9000"], parsers)
    args = build_parser().parse_args(argv)
    assert (args.port, args.kv_codec, args.no_mdns, args.peers, args.policy) == \
        (9000, "int8", True, "127.0.0.1:1,127.0.0.1:2", "conditional")
    rows = {name: (value, source) for name, value, source in effective(parsers["serve"], load(path, parsers).scheduler,
                                                                       ["--port", "9000"])}
    assert rows["port"] == ("9000", "flag")
    assert rows["kv-codec"] == ("int8", "file")
    assert rows["policy"] == ("conditional", "default")


def test_worker_tables_are_picked_by_index(tmp_path: Path, parsers: dict) -> None:
    path = write(tmp_path, FILE)
    args = build_parser().parse_args(expand_argv(["worker", "--config", str(path), "--worker-index", "1"], parsers))
    assert (args.role, args.engine, args.chunk_size) == ("decode", "mlx", 64)
    with pytest.raises(ValueError, match="2 \\[\\[worker\\]\\] tables: choose one with --worker-index"):
        expand_argv(["worker", "--config", str(path)], parsers)
    with pytest.raises(ValueError, match="--worker-index 5"):
        expand_argv(["worker", "--config", str(path), "--worker-index", "5"], parsers)


@pytest.mark.parametrize("text, message", [
    ("[scheduler]\nport = 1\nbogus = 3\n", r":3: \[scheduler\] key 'bogus': not a flag of `pdc serve`"),
    ("[scheduler]\nport = 1\n\n[[worker]]\nrole = \"decode\"\nturbo = true\n",
     r":6: \[worker\] key 'turbo': not a flag of `pdc worker`"),
    ("[scheduler]\nkv-codec = \"zip\"\n", r"argument --kv-codec: invalid choice: 'zip'"),
    ("[scheduler]\nport = \"eighty\"\n", r"argument --port: invalid int value"),
    ("[scheduler]\nno-mdns = \"yes\"\n", r"key 'no-mdns': must be true or false"),
    ("[schedular]\nport = 1\n", r":1: unknown table 'schedular'"),
    ("[scheduler\nport = 1\n", r"config file .*pdcluster.toml: "),
    ("[scheduler]\nconfig = \"x\"\n", r"key 'config': not a flag"),
])
def test_bad_files_are_refused_naming_file_line_and_key(tmp_path: Path, parsers: dict, text: str,
                                                        message: str) -> None:
    path = write(tmp_path, text)
    with pytest.raises(ValueError, match=message) as refused:
        load(path, parsers)
    assert str(path) in str(refused.value)


def test_pdc_exits_2_with_the_reason(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    path = write(tmp_path, "[scheduler]\nbogus = 1\n")
    assert main(["serve", "--config", str(path)]) == 2
    assert "key 'bogus'" in capsys.readouterr().err
    assert main(["config", "show", "--config", str(path)]) == 2


def test_config_show_marks_each_source(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    path = write(tmp_path, FILE)
    assert main(["config", "show", "--config", str(path), "worker", "1", "--chunk-size", "32"]) == 0
    out = capsys.readouterr().out
    assert "[worker[1]]  (pdc worker" in out
    lines = {line.split()[0]: line.split()[1:] for line in out.splitlines()[3:] if line.strip()}
    assert lines["chunk-size"] == ["32", "flag"] and lines["role"] == ["decode", "file"]
    assert lines["lease-s"] == ["30.0", "default"]


@requires_torch_and_mlx
def test_pdc_run_starts_what_the_file_lists_serves_and_stops_on_sigterm(
        tmp_path: Path, make_tiny_model, key_file: Path) -> None:
    model = make_tiny_model("llama")
    ports = [free_port() for _ in range(5)]
    http, prefill, prefill_kv, decode, decode_kv = ports
    common = f'model = "{model}"\ncluster-key-file = "{key_file}"\nno-advertise = true\n'
    path = write(tmp_path, f"""\
[scheduler]
port = {http}
no-mdns = true
peers = ["127.0.0.1:{prefill}", "127.0.0.1:{decode}"]
cluster-key-file = "{key_file}"

[[worker]]
role = "prefill"
engine = "torch"
port = {prefill}
kv-port = {prefill_kv}
{common}
[[worker]]
role = "decode"
engine = "mlx"
port = {decode}
kv-port = {decode_kv}
{common}""")
    log = (tmp_path / "run.log").open("wb")
    proc = subprocess.Popen([sys.executable, "-m", "cluster.cli", "run", "--config", str(path)], cwd=ROOT,
                            stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"})
    scheduler = SchedulerProcess.__new__(SchedulerProcess)  # only its client half: pdc run owns the process
    scheduler.port, scheduler.proc, scheduler.log = http, proc, tmp_path / "run.log"
    try:
        health = scheduler.wait_ready(2, timeout=READY_S)
        assert {n["address"] for n in health["nodes"]} == {f"127.0.0.1:{prefill}", f"127.0.0.1:{decode}"}
        record = scheduler.chat(max_tokens=4).model_extra["pdcluster"]  # type: ignore[attr-defined]
        assert record["colocated"] is False
    finally:
        proc.send_signal(signal.SIGTERM)
        started = time.monotonic()
        code = proc.wait(60)
        log.close()
    assert code == 0, (tmp_path / "run.log").read_text(errors="replace")[-3000:]
    assert time.monotonic() - started < 60
    assert "pdc run: started scheduler" in (tmp_path / "run.log").read_text(errors="replace")


def test_an_abbreviated_config_flag_is_refused_not_ignored(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert main(["serve", "--conf", str(tmp_path / "nothing.toml")]) == 2
    assert "spell out --config" in capsys.readouterr().err


def test_config_show_reads_its_own_config_flag_after_the_section(tmp_path: Path,
                                                                 capsys: pytest.CaptureFixture) -> None:
    path = write(tmp_path, FILE)
    assert main(["config", "show", "worker", "1", "--config", str(path)]) == 0
    assert "[worker[1]]" in capsys.readouterr().out
    # a config file named after another command's words is not expanded
    assert expand_argv(["simulate", "--cluster", "serve", "--config", "x"], commands(build_parser())) == \
        ["simulate", "--cluster", "serve", "--config", "x"]
