"""The ``fedge`` command line: one entry point, one subcommand per job.

Subcommands import their implementation lazily, so ``fedge --version`` and a
device's ``fedge agent`` never load the coordinator's or the simulator's code.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from typing import Any

from edge import __version__

BENCHMARKS = {
    "kernels": "kernels.bench",
    "transport": "edge.bench_transport",
    "agent": "edge.bench_agent",
    "ingest": "server_stub.bench_ingest",
    "fl": "server_stub.bench_fl",
    "fuzz": "server_stub.bench_fuzz",
    "scale": "server_stub.bench_scale",
    "poison": "server_stub.bench_poison",
    "soak": "server_stub.bench_soak",
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


def _cmd_coordinator(args: argparse.Namespace) -> int:
    from server_stub import cli as coordinator_cli

    return coordinator_cli.main(args.rest, evaluate_factory=_coordinator_evaluate)


def _coordinator_evaluate(config: Any) -> Any:
    """Build the coordinator's ``evaluate`` hook from ``edge.training`` (this is the
    composition root: server_stub never imports edge.training)."""
    if config.eval_data is None:
        return None
    from edge.data import DataError, DataFileNotFoundError, load_local_data
    from edge.training import ModelSpec, NumpyTrainer, TrainingError
    from server_stub.config import ConfigError

    layout, _weights = config.layout_and_weights()
    shapes = dict(layout.entries)
    try:
        widths = [shapes[f"w{i}"][1] for i in range(len(shapes) // 2)]
        spec = ModelSpec(
            "mlp" if len(widths) > 1 else "logreg",
            input_dim=shapes["w0"][0],
            num_classes=widths[-1],
            hidden=tuple(widths[:-1]),
        )
    except (KeyError, IndexError, TrainingError):
        raise ConfigError(
            f"[evaluation] data: the model's tensors {list(shapes)} are not an mlp of w0, b0, "
            "w1, b1, ...; evaluation needs one (or remove [evaluation] data)"
        ) from None
    try:
        data = load_local_data(
            config.eval_data, num_classes=spec.num_classes, input_dim=spec.input_dim
        )
    except DataFileNotFoundError:  # its message points at the agent's config, not ours
        raise ConfigError(
            f"[evaluation] data: {config.eval_data} does not exist; create the held-out .npz "
            "(x, y) there (docs/DATA.md) or fix the path"
        ) from None
    except DataError as exc:
        raise ConfigError(f"[evaluation] data: {exc}") from None

    def evaluate(weights: dict[str, Any]) -> dict[str, float]:
        trainer = NumpyTrainer(spec)
        trainer.set_weights(weights)
        result = trainer.evaluate(data.x, data.y)
        return {"accuracy": result.accuracy, "loss": result.loss}

    return evaluate


def _cmd_status(args: argparse.Namespace) -> int:
    from server_stub import status_cmd

    return status_cmd.main(args.rest)


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

    coordinator = sub.add_parser(
        "coordinator", help="run the coordinator", add_help=False, prefix_chars="+",
        usage="fedge coordinator --config coordinator.toml [--rounds N] [--log-level L]",
    )  # fmt: skip
    coordinator.add_argument("rest", nargs=argparse.REMAINDER, help="coordinator options")
    coordinator.set_defaults(func=_cmd_coordinator)

    status = sub.add_parser(
        "status", help="print the fleet's devices from their retained status", add_help=False,
        prefix_chars="+", usage="fedge status --broker mqtt://host:1883 --fleet NAME",
    )  # fmt: skip
    status.add_argument("rest", nargs=argparse.REMAINDER, help="status options")
    status.set_defaults(func=_cmd_status)

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
    try:
        result: int = args.func(args)
    except BrokenPipeError:
        # Whoever read stdout has gone (`fedge bench kernels | head`): stop quietly, as
        # other command-line tools do. stdout now points at /dev/null so that the
        # interpreter's last flush does not fail again.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 1
    return result


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
