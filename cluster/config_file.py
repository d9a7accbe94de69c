"""One config file per machine: ``pdcluster.toml`` with a ``[scheduler]`` table and ``[[worker]]`` tables.

Each key is a flag of ``pdc serve`` (``[scheduler]``) or ``pdc worker`` (``[[worker]]``)
without its dashes, e.g. ``kv-codec = "int8"`` for ``--kv-codec int8``
(``kv_codec`` is read the same way). A file becomes flags placed *before* the
command line's own, so argparse checks every value exactly as it checks a
flag, and a flag given on the command line overrides the file. A key that is
no flag of that command is refused, naming the file, the line and the key.

::

    [scheduler]
    port = 8000
    host = "0.0.0.0"
    policy = "conditional"

    [[worker]]
    role = "prefill"
    engine = "torch"
    model = "smollm2-135m-instruct"
    host = "0.0.0.0"
    port = 50051

``pdc run`` starts what the file lists; ``pdc serve --config FILE`` and
``pdc worker --config FILE [--worker-index N]`` read one table;
``pdc config show`` prints the effective settings with where each came from.
"""
from __future__ import annotations

import argparse
import re
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib

CONFIG_NAME = "pdcluster.toml"
SECTIONS = {"scheduler": "serve", "worker": "worker"}  # table -> pdc command
# Flags that make no sense in a service's config file (one-shot or self-referential).
NOT_IN_FILE = {"help", "config", "worker-index"}


def default_path() -> Path:
    """``pdcluster.toml`` beside the cluster key: ``$PDC_HOME``, else ``~/.config/pdcluster``."""
    from cluster.auth import default_config_path

    return default_config_path().with_name(CONFIG_NAME)


@dataclass(frozen=True)
class Section:
    """One table of the file: which command it configures and the flags it stands for."""

    table: str  # "scheduler" or "worker[N]"
    command: str  # "serve" or "worker"
    argv: tuple[str, ...]
    keys: tuple[str, ...]  # the file's keys, as flag names


@dataclass(frozen=True)
class ConfigFile:
    path: Path
    scheduler: Section | None
    workers: tuple[Section, ...]

    @property
    def sections(self) -> tuple[Section, ...]:
        return ((self.scheduler,) if self.scheduler else ()) + self.workers


def load(path: str | Path, commands: dict[str, argparse.ArgumentParser]) -> ConfigFile:
    """Read and check ``path`` against the ``serve`` and ``worker`` parsers; ``ValueError`` naming
    the file, line and key for anything wrong."""
    path = Path(path).expanduser()
    try:
        text = path.read_text()
    except OSError as e:
        raise ValueError(f"config file {path}: {e.strerror}") from None
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise ValueError(f"config file {path}: {e}") from None
    unknown = [k for k in data if k not in SECTIONS]
    if unknown:
        raise ValueError(f"{path}:{_line(text, unknown[0])}: unknown table {unknown[0]!r} "
                         f"(a config file has [scheduler] and [[worker]] tables)")
    scheduler = data.get("scheduler")
    if scheduler is not None and not isinstance(scheduler, dict):
        raise ValueError(f"{path}: 'scheduler' must be a table: [scheduler]")
    workers = data.get("worker", [])
    if not isinstance(workers, list) or not all(isinstance(w, dict) for w in workers):
        raise ValueError(f"{path}: 'worker' must be an array of tables: [[worker]]")
    return ConfigFile(
        path=path,
        scheduler=_section(path, text, "scheduler", "serve", scheduler, commands["serve"]) if scheduler else None,
        workers=tuple(_section(path, text, f"worker[{i}]", "worker", w, commands["worker"])
                      for i, w in enumerate(workers)),
    )


def _section(path: Path, text: str, table: str, command: str, values: dict[str, Any],
             parser: argparse.ArgumentParser) -> Section:
    options = {s[2:]: a for a in parser._actions for s in a.option_strings if s.startswith("--")}
    argv: list[str] = []
    keys = []
    for raw_key, value in values.items():
        key = raw_key.replace("_", "-")
        action = options.get(key)
        where = f"{path}:{_line(text, raw_key)}: [{table.split('[')[0]}] key {raw_key!r}"
        if action is None or key in NOT_IN_FILE:
            known = ", ".join(sorted(k for k in options if k not in NOT_IN_FILE))
            raise ValueError(f"{where}: not a flag of `pdc {command}` (known keys: {known})")
        argv += _flag_tokens(f"--{key}", action, value, where)
        keys.append(key)
    _check(parser, argv, f"{path} [{table}]")
    return Section(table, command, tuple(argv), tuple(keys))


def _flag_tokens(flag: str, action: argparse.Action, value: Any, where: str) -> list[str]:
    if isinstance(action, (argparse._StoreTrueAction, argparse._StoreFalseAction)):
        if not isinstance(value, bool):
            raise ValueError(f"{where}: must be true or false")
        return [flag] if value else []
    if isinstance(action, argparse._AppendAction):
        items = value if isinstance(value, list) else [value]
        return [token for item in items for token in (flag, _scalar(item, where))]
    if isinstance(value, list):  # comma-list flags (--peers, --policy)
        return [flag, ",".join(_scalar(item, where) for item in value)]
    return [flag, _scalar(value, where)]


def _scalar(value: Any, where: str) -> str:
    if isinstance(value, bool):
        raise ValueError(f"{where}: a true/false value where the flag takes a value")
    if isinstance(value, (str, int, float)):
        return str(value)
    raise ValueError(f"{where}: {type(value).__name__} is not a flag value (use a string, number or list)")


def _check(parser: argparse.ArgumentParser, argv: list[str], where: str) -> None:
    """Parse the file's flags alone so bad values fail here, naming the file (argparse exits otherwise)."""
    errors: list[str] = []
    original = parser.error
    parser.error = lambda message: (errors.append(message), (_ for _ in ()).throw(_ParseFailed()))  # type: ignore[method-assign]
    try:
        parser.parse_args(argv)
    except _ParseFailed:
        # required flags missing from the file may come on the command line; anything else is the file's fault
        if not errors[0].startswith("the following arguments are required"):
            raise ValueError(f"{where}: {errors[0]}") from None
    finally:
        parser.error = original  # type: ignore[method-assign]


class _ParseFailed(Exception):
    pass


def _line(text: str, key: str) -> int | str:
    """The first line setting ``key`` (or opening table ``key``), for error messages; '?' if not found."""
    pattern = re.compile(rf"^\s*(\[\[?\s*)?[\"']?{re.escape(key)}[\"']?\s*(=|\]\]?)")
    for number, line in enumerate(text.splitlines(), 1):
        if pattern.match(line):
            return number
    return "?"


# ---------------------------------------------------------------- command lines


def pick_worker(config: ConfigFile, index: int | None) -> Section:
    if not config.workers:
        raise ValueError(f"{config.path}: no [[worker]] table")
    if index is None:
        if len(config.workers) > 1:
            raise ValueError(f"{config.path} has {len(config.workers)} [[worker]] tables: "
                             "choose one with --worker-index N (0-based)")
        index = 0
    if not 0 <= index < len(config.workers):
        raise ValueError(f"--worker-index {index}: {config.path} has {len(config.workers)} [[worker]] tables")
    return config.workers[index]


def expand_argv(argv: Sequence[str], commands: dict[str, argparse.ArgumentParser]) -> list[str]:
    """``pdc serve|worker --config FILE [--worker-index N] FLAGS`` -> ``pdc serve|worker FILE-FLAGS FLAGS``.

    Anything else comes back unchanged. The file's flags go first, so the command line's win."""
    argv = list(argv)
    at = next((i for i, token in enumerate(argv) if not token.startswith("-")), None)  # the subcommand
    if at is None or argv[at] not in ("serve", "worker"):
        return argv
    command, rest = argv[at], argv[at + 1:]
    path, rest = _take(rest, "--config")
    index, rest = _take(rest, "--worker-index")
    if path is None:
        if index is not None:
            raise ValueError("--worker-index needs --config")
        return argv
    config = load(path, commands)
    if command == "serve":
        if config.scheduler is None:
            raise ValueError(f"{config.path}: no [scheduler] table")
        section = config.scheduler
    else:
        section = pick_worker(config, _index(index))
    return [*argv[:at + 1], *section.argv, *rest]


def _take(argv: list[str], flag: str) -> tuple[str | None, list[str]]:
    """Remove ``flag VALUE`` / ``flag=VALUE`` from ``argv``; (value, the rest)."""
    for i, token in enumerate(argv):
        if token == flag:
            if i + 1 >= len(argv):
                raise ValueError(f"{flag} needs a value")
            return argv[i + 1], argv[:i] + argv[i + 2:]
        if token.startswith(flag + "="):
            return token.split("=", 1)[1], argv[:i] + argv[i + 1:]
    return None, argv


def _index(text: str | None) -> int | None:
    if text is None:
        return None
    if not text.isdigit():
        raise ValueError(f"--worker-index {text!r}: need a whole number >= 0")
    return int(text)


# ---------------------------------------------------------------- pdc config show


def effective(parser: argparse.ArgumentParser, section: Section | None, flags: Sequence[str]) -> list[tuple[str, str, str]]:
    """(flag, value, source) for every option of the command: ``flag`` if the command line set it,
    else ``file`` if the config file did, else ``default``."""
    file_argv = list(section.argv) if section else []
    args = parser.parse_args([*file_argv, *flags])
    flag_names = {t[2:].split("=")[0] for t in flags if t.startswith("--")}
    rows = []
    for action in parser._actions:
        names = [s[2:] for s in action.option_strings if s.startswith("--")]
        if not names or names[0] in NOT_IN_FILE or action.dest in ("help", "run"):
            continue
        name = names[0]
        source = "flag" if name in flag_names else "file" if section and name in section.keys else "default"
        value = getattr(args, action.dest, None)
        if isinstance(action, argparse._StoreFalseAction):
            value = not value  # show the flag's own sense: no-mdns = true
        rows.append((name, _show(value), source))
    return rows


def _show(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (list, tuple)):
        return ",".join(map(str, value))
    return str(value)


def refuse_unexpanded(args: argparse.Namespace) -> None:
    """``--config`` reached argparse un-expanded (an abbreviation such as ``--conf``): refuse it rather
    than run on defaults."""
    if getattr(args, "config", None) is not None or getattr(args, "worker_index", None) is not None:
        raise ValueError("spell out --config FILE (and --worker-index N); abbreviations of them are not read")
