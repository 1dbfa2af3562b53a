"""The ``fedge`` command line: one entry point, one subcommand per job.

Subcommands import their implementation lazily, so ``fedge --version`` and a
device's ``fedge agent`` never load the coordinator's or the simulator's code.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from edge import __version__

BENCHMARKS = {
    "kernels": "kernels.bench",
    "transport": "edge.bench_transport",
    "agent": "edge.bench_agent",
    "ingest": "server_stub.bench_ingest",
}
"""Benchmark name -> module with ``main(argv) -> int`` (imported only when asked for)."""


def _cmd_bench(args: argparse.Namespace) -> int:
    import importlib

    module = importlib.import_module(BENCHMARKS[args.what])
    result: int = module.main(args.rest)
    return result


def _cmd_sim(args: argparse.Namespace) -> int:
    from server_stub import sim

    return sim.main(args)


def _cmd_agent(args: argparse.Namespace) -> int:
    from edge import agent_main

    return agent_main.cli(args.rest)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fedge",
        description="Federated learning for fleets of Raspberry Pi and IoT devices.",
    )
    parser.add_argument("--version", action="version", version=f"fedge {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    bench = sub.add_parser("bench", help="run a benchmark and print its table")
    bench.add_argument("what", choices=sorted(BENCHMARKS), help="which benchmark")
    bench.add_argument("rest", nargs=argparse.REMAINDER, help="options of that benchmark")
    bench.set_defaults(func=_cmd_bench)

    agent = sub.add_parser(
        "agent", help="run the device agent", add_help=False, prefix_chars="+",
        usage="fedge agent --config agent.toml [options] (fedge agent --help for all)",
    )  # fmt: skip
    agent.add_argument("rest", nargs=argparse.REMAINDER, help="options of the agent")
    agent.set_defaults(func=_cmd_agent)

    sim = sub.add_parser(
        "sim",
        help="run a whole federation on this machine (broker, coordinator, devices)",
        description="Run a complete federation on this machine through a real MQTT broker.",
    )
    _add_sim_arguments(sim)
    sim.set_defaults(func=_cmd_sim)
    return parser


def _add_sim_arguments(parser: argparse.ArgumentParser) -> None:
    from server_stub.sim import add_arguments

    add_arguments(parser)


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
