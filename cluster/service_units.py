"""``pdc service install | uninstall | status``: run ``pdc run --config FILE`` at boot.

Linux gets a systemd unit (``Restart=on-failure``, output to the journal), macOS a
launchd plist (``KeepAlive``, logs in ``~/Library/Logs/pdcluster/``). ``--user``
installs for the current user (``~/.config/systemd/user``, ``~/Library/LaunchAgents``);
without it, system-wide (``/etc/systemd/system``, ``/Library/LaunchDaemons``; needs
root). ``--dry-run`` prints the file and the commands instead of running them.
"""
from __future__ import annotations

import argparse
import os
import plistlib
import shlex
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from cluster.config_file import default_path

NAME = "pdcluster"
LABEL = "io.pdcluster.node"  # launchd label
STOP_TIMEOUT_S = 60  # systemd TimeoutStopSec: pdc run gives its children 40 s after SIGTERM
PLATFORMS = ("linux", "macos")


@dataclass(frozen=True)
class ServiceConfig:
    platform: str  # linux | macos
    user: bool
    config_file: Path
    executable: tuple[str, ...]  # how to run pdc: the venv's python -m cluster.cli
    home: Path

    def __post_init__(self) -> None:
        if self.platform not in PLATFORMS:
            raise ValueError(f"platform {self.platform!r}: one of {PLATFORMS}")

    @property
    def command(self) -> list[str]:
        return [*self.executable, "run", "--config", str(self.config_file)]

    @property
    def unit_path(self) -> Path:
        if self.platform == "linux":
            base = self.home / ".config/systemd/user" if self.user else Path("/etc/systemd/system")
            return base / f"{NAME}.service"
        base = self.home / "Library/LaunchAgents" if self.user else Path("/Library/LaunchDaemons")
        return base / f"{LABEL}.plist"

    @property
    def log_dir(self) -> Path:
        return self.home / "Library/Logs/pdcluster" if self.user else Path("/Library/Logs/pdcluster")


def systemd_unit(config: ServiceConfig) -> str:
    env = "".join(f"Environment={key}={shlex.quote(os.environ[key])}\n"
                  for key in ("PDC_HOME",) if os.environ.get(key))  # never the key itself
    return f"""\
[Unit]
Description=pdcluster node: what {config.config_file} lists (scheduler and/or workers)
After=network-online.target
Wants=network-online.target

[Service]
Type=simple
ExecStart={shlex.join(config.command)}
Restart=on-failure
RestartSec=5
# SIGTERM to pdc run alone (KillMode=mixed): it passes one SIGTERM to each process it started, which
# drains; a second one would stop them at once. What is left at TimeoutStopSec gets SIGKILL.
KillMode=mixed
KillSignal=SIGTERM
TimeoutStopSec={STOP_TIMEOUT_S}
Environment=PYTHONUNBUFFERED=1
{env}StandardOutput=journal
StandardError=journal
SyslogIdentifier={NAME}

[Install]
WantedBy={"default.target" if config.user else "multi-user.target"}
"""


def launchd_plist(config: ServiceConfig) -> str:
    env = {"PYTHONUNBUFFERED": "1", **{k: os.environ[k] for k in ("PDC_HOME",) if os.environ.get(k)}}
    body = {
        "Label": LABEL,
        "ProgramArguments": config.command,
        "RunAtLoad": True,
        "KeepAlive": True,
        "ExitTimeOut": STOP_TIMEOUT_S,
        "EnvironmentVariables": env,
        "StandardOutPath": str(config.log_dir / "pdcluster.log"),
        "StandardErrorPath": str(config.log_dir / "pdcluster.err.log"),
    }
    return plistlib.dumps(body, sort_keys=False).decode()


def unit_text(config: ServiceConfig) -> str:
    return systemd_unit(config) if config.platform == "linux" else launchd_plist(config)


def install_commands(config: ServiceConfig) -> list[list[str]]:
    if config.platform == "linux":
        ctl = ["systemctl", *(["--user"] if config.user else [])]
        return [[*ctl, "daemon-reload"], [*ctl, "enable", "--now", f"{NAME}.service"]]
    domain = f"gui/{os.getuid()}" if config.user else "system"
    return [["launchctl", "bootstrap", domain, str(config.unit_path)]]


def uninstall_commands(config: ServiceConfig) -> list[list[str]]:
    if config.platform == "linux":
        ctl = ["systemctl", *(["--user"] if config.user else [])]
        return [[*ctl, "disable", "--now", f"{NAME}.service"]]
    domain = f"gui/{os.getuid()}" if config.user else "system"
    return [["launchctl", "bootout", f"{domain}/{LABEL}"]]


def status_command(config: ServiceConfig) -> list[str]:
    if config.platform == "linux":
        return ["systemctl", *(["--user"] if config.user else []), "status", "--no-pager", f"{NAME}.service"]
    domain = f"gui/{os.getuid()}" if config.user else "system"
    return ["launchctl", "print", f"{domain}/{LABEL}"]


# ---------------------------------------------------------------- command line


def add_service_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "service", help="install pdcluster as a service started at boot (systemd on Linux, launchd on macOS)",
        description=__doc__.split("\n\n")[1].replace("\n", " "))
    verbs = p.add_subparsers(title="service commands", metavar="VERB")
    for verb, helptext in (("install", "write the unit (plist) for `pdc run --config FILE` and enable it"),
                           ("uninstall", "disable the service and remove its unit (plist)"),
                           ("status", "the service manager's view of the service")):
        v = verbs.add_parser(verb, help=helptext, description=helptext)
        v.add_argument("--user", action="store_true",
                       help="for this user only (systemd --user / a LaunchAgent; default: system-wide, needs root)")
        if verb == "install":
            v.add_argument("--config", type=Path, default=None,
                           help=f"the config file the service runs (default: {default_path()})")
        v.add_argument("--platform", choices=PLATFORMS, default=None,
                       help="which service manager (default: this machine's); with --dry-run, to see the other's")
        v.add_argument("--dry-run", action="store_true", help="print the unit and the commands; change nothing")
        v.set_defaults(run=lambda args, verb=verb: run_service(verb, args))
    p.set_defaults(run=lambda args: (p.print_help(), 2)[1])


def service_config(args: argparse.Namespace) -> ServiceConfig:
    platform = args.platform or ("macos" if sys.platform == "darwin" else "linux")
    if sys.platform not in ("darwin", "linux") and not args.dry_run:
        raise ValueError(f"no service manager support on {sys.platform}; --dry-run shows the units")
    config_file = (getattr(args, "config", None) or default_path()).expanduser().resolve()
    return ServiceConfig(platform=platform, user=args.user, config_file=config_file,
                         executable=(sys.executable, "-m", "cluster.cli"), home=Path.home())


def run_service(verb: str, args: argparse.Namespace) -> int:
    config = service_config(args)
    if verb == "install":
        if not config.config_file.is_file() and not args.dry_run:
            raise ValueError(f"{config.config_file}: no config file; write one first (docs/operations.md) "
                             "and check it with `pdc config show`")
        if config.platform == "macos" and not args.dry_run:
            config.log_dir.mkdir(parents=True, exist_ok=True)
        return _apply(config, args.dry_run, write=unit_text(config), commands=install_commands(config))
    if verb == "uninstall":
        code = _apply(config, args.dry_run, write=None, commands=uninstall_commands(config))
        if not args.dry_run and code == 0 and config.unit_path.exists():  # kept while the service may run
            config.unit_path.unlink()
            print(f"removed {config.unit_path}")
        return code
    if not config.unit_path.exists():
        print(f"not installed: no {config.unit_path}")
        return 3
    return _apply(config, args.dry_run, write=None, commands=[status_command(config)])


def _apply(config: ServiceConfig, dry_run: bool, *, write: str | None, commands: list[list[str]]) -> int:
    if dry_run:
        if write is not None:
            print(f"# {config.unit_path}\n{write}")
        for cmd in commands:
            print(f"$ {shlex.join(cmd)}")
        return 0
    if write is not None:
        config.unit_path.parent.mkdir(parents=True, exist_ok=True)
        config.unit_path.write_text(write)
        print(f"wrote {config.unit_path}")
    for cmd in commands:
        if shutil.which(cmd[0]) is None:
            print(f"pdc service: {cmd[0]} is not available here; run `{shlex.join(cmd)}` where it is",
                  file=sys.stderr)
            return 1
        done = subprocess.run(cmd, timeout=60)
        if done.returncode != 0:
            print(f"pdc service: `{shlex.join(cmd)}` exited {done.returncode}", file=sys.stderr)
            return done.returncode
    return 0
