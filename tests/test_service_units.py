"""pdc service: the generated systemd unit and launchd plist (systemd itself is not run in tests)."""
from __future__ import annotations

import argparse
import configparser
import plistlib
import shlex
import sys
from pathlib import Path

import pytest

from cluster.cli import main
from cluster.service_units import ServiceConfig, launchd_plist, run_service, systemd_unit


def config(platform: str, user: bool, tmp_path: Path) -> ServiceConfig:
    return ServiceConfig(platform=platform, user=user, config_file=tmp_path / "pdcluster.toml",
                         executable=(sys.executable, "-m", "cluster.cli"), home=tmp_path / "home")


@pytest.mark.parametrize("user, wanted_by, path", [(True, "default.target", "home/.config/systemd/user"),
                                                   (False, "multi-user.target", "/etc/systemd/system")])
def test_systemd_unit_restarts_on_failure_logs_to_the_journal_and_runs_pdc_run(
        tmp_path: Path, user: bool, wanted_by: str, path: str) -> None:
    service = config("linux", user, tmp_path)
    unit = configparser.ConfigParser(strict=False, interpolation=None)
    unit.read_string(systemd_unit(service))
    assert shlex.split(unit["Service"]["ExecStart"]) == \
        [sys.executable, "-m", "cluster.cli", "run", "--config", str(tmp_path / "pdcluster.toml")]
    assert unit["Service"]["Restart"] == "on-failure"
    assert unit["Service"]["StandardOutput"] == unit["Service"]["StandardError"] == "journal"
    assert unit["Service"]["KillSignal"] == "SIGTERM" and int(unit["Service"]["TimeoutStopSec"]) >= 40
    assert unit["Install"]["WantedBy"] == wanted_by
    assert "network-online.target" in unit["Unit"]["After"]
    assert str(service.unit_path).endswith(f"{path.split('/')[-1]}/pdcluster.service")


def test_launchd_plist_keeps_alive_and_logs_under_library_logs(tmp_path: Path) -> None:
    service = config("macos", True, tmp_path)
    plist = plistlib.loads(launchd_plist(service).encode())
    assert plist["ProgramArguments"][-3:] == ["run", "--config", str(tmp_path / "pdcluster.toml")]
    assert plist["KeepAlive"] is True and plist["RunAtLoad"] is True
    assert plist["StandardOutPath"] == str(tmp_path / "home/Library/Logs/pdcluster/pdcluster.log")
    assert service.unit_path == tmp_path / "home/Library/LaunchAgents/io.pdcluster.node.plist"


def test_the_unit_never_carries_the_cluster_key(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PDC_CLUSTER_KEY", "ab" * 32)
    monkeypatch.setenv("PDC_HOME", str(tmp_path / "pdc"))
    text = systemd_unit(config("linux", True, tmp_path)) + launchd_plist(config("macos", True, tmp_path))
    assert "ab" * 32 not in text and str(tmp_path / "pdc") in text


def test_dry_run_prints_unit_and_commands_and_changes_nothing(tmp_path: Path, capsys: pytest.CaptureFixture,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HOME", str(tmp_path))
    assert main(["service", "install", "--user", "--dry-run", "--platform", "linux",
                 "--config", str(tmp_path / "x.toml")]) == 0
    out = capsys.readouterr().out
    assert "Restart=on-failure" in out and "$ systemctl --user enable --now pdcluster.service" in out
    assert not (tmp_path / ".config/systemd").exists()


def test_install_writes_the_unit_and_says_when_systemctl_is_missing(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture) -> None:
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))  # no systemctl, whatever this machine has
    (tmp_path / "pdcluster.toml").write_text("[scheduler]\nport = 8000\n")
    args = argparse.Namespace(user=True, config=tmp_path / "pdcluster.toml", platform="linux", dry_run=False)
    assert run_service("install", args) == 1
    assert "systemctl is not available here" in capsys.readouterr().err
    assert (tmp_path / ".config/systemd/user/pdcluster.service").is_file()
    assert run_service("uninstall", args) == 1  # not disabled (no systemctl): the unit stays
    assert (tmp_path / ".config/systemd/user/pdcluster.service").is_file()
    args.config = tmp_path / "missing.toml"
    with pytest.raises(ValueError, match="no config file"):
        run_service("install", args)


def test_systemd_sends_sigterm_to_pdc_run_alone(tmp_path: Path) -> None:
    """KillMode=mixed: a second SIGTERM to the children would skip their drain."""
    unit = configparser.ConfigParser(strict=False, interpolation=None)
    unit.read_string(systemd_unit(config("linux", True, tmp_path)))
    assert unit["Service"]["KillMode"] == "mixed"


def test_only_install_takes_a_config_file() -> None:
    with pytest.raises(SystemExit) as refused:  # argparse: unrecognized arguments
        main(["service", "status", "--config", "x.toml", "--dry-run"])
    assert refused.value.code == 2
