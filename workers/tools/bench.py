"""``pdc bench``: the benchmarks of pdcluster's own components, under one command.

Each benchmark module (``kv_bench``: the KV data plane, ``decode_bench``: the
decode loop, ``link_bench``: emulated home links) registers its subcommand with a
function taking the ``bench`` subparsers; ``add_bench_parser`` puts them all
under ``pdc bench``, and
``bench_main`` runs one module on its own (``python -m workers.tools.kv_bench
kv ...``), with the same flags and exit codes as through ``pdc``.
"""
from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence

PROG = "pdc bench"
DESCRIPTION = "Benchmarks of pdcluster's components."

# A round during which some task waited for a CPU more than this share of the
# time shared the machine with other work (or, unpinned, with itself).
CONTENDED_CPU_WAIT = 0.10

# Registers one benchmark's subcommand; its ``run`` default gets the parsed args.
Register = Callable[[argparse._SubParsersAction], None]


def benchmarks() -> list[Register]:
    """Every benchmark's ``add_*_parser``, in ``pdc bench --help`` order."""
    from workers.tools.decode_bench import add_decode_parser
    from workers.tools.kv_bench import add_kv_parser
    from workers.tools.link_bench import add_link_parser

    return [add_kv_parser, add_decode_parser, add_link_parser]


def add_bench_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Register ``bench`` with every benchmark on a ``pdc`` subparsers object.
    Bare ``pdc bench`` prints its help and exits 2."""
    bench = subparsers.add_parser("bench", help="measure pdcluster's own components",
                                  description="Benchmarks of pdcluster's components on this machine.")
    bench.set_defaults(run=lambda args: _print_help(bench))
    sub = bench.add_subparsers(title="benchmarks", metavar="BENCHMARK")
    for register in benchmarks():
        register(sub)
    return bench


def bench_main(register: Register, argv: Sequence[str] | None = None) -> int:
    """Run one benchmark module as a program: parse ``argv`` with only its
    subcommand; 2 for no subcommand or a ``ValueError`` (printed), else the run's code."""
    parser = argparse.ArgumentParser(prog=PROG, description=DESCRIPTION)
    register(parser.add_subparsers(title="benchmarks", metavar="BENCHMARK"))
    args = parser.parse_args(argv)
    if not hasattr(args, "run"):
        return _print_help(parser)
    try:
        return args.run(args)
    except ValueError as e:
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return 2


def _print_help(parser: argparse.ArgumentParser) -> int:
    parser.print_help()
    return 2


def cpu_wait_us() -> int | None:
    """Microseconds, since boot, that some task waited for a CPU (Linux PSI);
    None where the kernel does not report it."""
    try:
        with open("/proc/pressure/cpu") as f:
            for line in f:
                if line.startswith("some"):
                    return int(line.rsplit("total=", 1)[1])
    except (OSError, ValueError, IndexError):
        pass
    return None


def contention_warning(contended: list[bool], advice: str = "") -> str:
    """The report's warning when some rounds (``contended`` per round) ran on a
    shared machine; "" when none did."""
    num = sum(contended)
    if not num:
        return ""
    return (f"in {num} of {len(contended)} rounds (marked !) tasks waited for a CPU over "
            f"{CONTENDED_CPU_WAIT:.0%} of the time: other work shared the machine{advice}")
