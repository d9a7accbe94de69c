"""``pdc run`` and ``pdc config show``: a machine's processes from its config file (cluster/config_file.py)."""
from __future__ import annotations

import argparse
import signal
import subprocess
import sys
import time
from pathlib import Path

from cluster.config_file import ConfigFile, Section, _take, default_path, effective, load, pick_worker
from cluster.status import columns

STOP_GRACE_S = 40.0  # children get this long after SIGTERM (a worker's drain and grace), then SIGKILL


def add_run_parsers(sub: argparse._SubParsersAction, commands: dict[str, argparse.ArgumentParser]) -> None:
    run = sub.add_parser(
        "run", help="start what this machine's config file lists (scheduler, workers or both)",
        description=("Start the scheduler ([scheduler]) and every worker ([[worker]]) of the config file, each "
                     "as its own process, and stay in the foreground: SIGTERM or Ctrl-C passes one SIGTERM to "
                     "each (they drain; a second signal kills). When one exits on its own, the others are "
                     "stopped and pdc run exits with its status (1 if it was 0), so a service manager "
                     "restarts the set. The file's keys are the flags of `pdc serve` and `pdc worker`."))
    run.add_argument("--config", type=Path, default=None, help=f"config file (default: {default_path()})")
    run.set_defaults(run=lambda args: run_config(_load(args.config, commands)))

    config = sub.add_parser("config", help="inspect the config file (pdc config show)")
    verbs = config.add_subparsers(title="config commands", metavar="VERB")
    show = verbs.add_parser(
        "show", help="print the effective settings and where each came from (default, file or flag)",
        description=("Print every setting of the scheduler and of each worker as this machine would run them, "
                     "each marked default, file or flag. After `scheduler` or `worker N`, give flags of that "
                     "command to see how they override the file, e.g. `pdc config show scheduler --port 9000`."))
    show.add_argument("--config", type=Path, default=None, help=f"config file (default: {default_path()})")
    show.add_argument("section", nargs="?", default=None, help="scheduler, or worker N (default: every table)")
    show.add_argument("rest", nargs=argparse.REMAINDER, help="worker index, then flags of that command")
    show.set_defaults(run=lambda args: _show(args, commands))
    config.set_defaults(run=lambda args: (config.print_help(), 2)[1])


def _show(args: argparse.Namespace, commands: dict[str, argparse.ArgumentParser]) -> int:
    """``--config`` after the section (``pdc config show worker 0 --config F``) is show's own, not a flag to show."""
    path, rest = _take(list(args.rest), "--config")
    return show_config(_load(Path(path) if path else args.config, commands), commands, args.section, rest)


def _load(path: Path | None, commands: dict[str, argparse.ArgumentParser]) -> ConfigFile:
    return load(path or default_path(), commands)


def show_config(config: ConfigFile, commands: dict[str, argparse.ArgumentParser], section: str | None,
                rest: list[str]) -> int:
    if section is None:
        picked = list(config.sections)
        flags: list[str] = []
    elif section == "scheduler":
        if config.scheduler is None:
            raise ValueError(f"{config.path}: no [scheduler] table")
        picked, flags = [config.scheduler], rest
    elif section == "worker":
        index = int(rest[0]) if rest and rest[0].isdigit() else None
        picked, flags = [pick_worker(config, index)], rest[1:] if index is not None else rest
    else:
        raise ValueError(f"section {section!r}: scheduler or worker")
    if not picked:
        print(f"{config.path} lists no [scheduler] or [[worker]] table")
        return 1
    for i, part in enumerate(picked):
        print(("\n" if i else "") + f"[{part.table}]  (pdc {part.command}, from {config.path})")
        print(columns([("setting", "value", "from"), *effective(commands[part.command], part, flags)]))
    return 0


def run_config(config: ConfigFile) -> int:
    """Start one process per table; return when the first exits (after stopping the rest) or on a signal."""
    if not config.sections:
        raise ValueError(f"{config.path} lists no [scheduler] or [[worker]] table: nothing to run")
    procs: list[tuple[Section, subprocess.Popen]] = []
    stopping = False

    def stop(signum: int, _frame: object) -> None:
        nonlocal stopping
        if stopping:  # a second signal: stop at once
            for _, proc in procs:
                proc.kill()
        stopping = True
        for _, proc in procs:
            proc.send_signal(signal.SIGTERM)  # each drains: the children get this one signal, never two

    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, stop)
    for part in config.sections:
        if stopping:
            break
        procs.append((part, _spawn(config, part)))
    print(f"pdc run: started {', '.join(f'{p.table} (pid {proc.pid})' for p, proc in procs)} from {config.path}",
          flush=True)
    while not stopping and all(proc.poll() is None for _, proc in procs):
        time.sleep(0.2)
    first = None if stopping else next(((part, proc) for part, proc in procs if proc.poll() is not None), None)
    if first is not None:
        print(f"pdc run: {first[0].table} exited with status {first[1].returncode}; stopping the others",
              file=sys.stderr, flush=True)
        stopping = True
        for _, proc in procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + STOP_GRACE_S
    for _, proc in procs:
        try:
            proc.wait(max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)
    if first is not None:  # a child ended on its own: a failure, even with 0, so the service manager restarts
        return first[1].returncode or 1
    return 0


def _spawn(config: ConfigFile, part: Section) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "cluster.cli", part.command, "--config", str(config.path)]
    if part.command == "worker":
        cmd += ["--worker-index", part.table.split("[")[1].rstrip("]")]
    # its own session: a terminal's Ctrl-C reaches pdc run only, which passes on one SIGTERM
    return subprocess.Popen(cmd, stdin=subprocess.DEVNULL, start_new_session=True)
