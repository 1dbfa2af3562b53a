"""The ``fedge`` command line: one entry point, one subcommand per job.

Subcommands import their implementation lazily, so ``fedge --version`` and a
device's ``fedge agent`` never load the coordinator's or the simulator's code.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from edge import __version__


def _cmd_bench(args: argparse.Namespace) -> int:
    if args.what == "kernels":
        from kernels import bench

        return bench.main(args.rest)
    print(f"fedge bench: unknown benchmark {args.what!r}", file=sys.stderr)
    return 2


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fedge",
        description="Federated learning for fleets of Raspberry Pi and IoT devices.",
    )
    parser.add_argument("--version", action="version", version=f"fedge {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    bench = sub.add_parser("bench", help="run a benchmark and print its table")
    bench.add_argument("what", choices=["kernels"], help="which benchmark")
    bench.add_argument("rest", nargs=argparse.REMAINDER, help="options of that benchmark")
    bench.set_defaults(func=_cmd_bench)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    result: int = args.func(args)
    return result


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
