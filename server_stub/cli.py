"""Command-line entry of the coordinator (``fedge coordinator``, ``python -m server_stub``).

``run_coordinator`` is what both call; the ``fedge`` handler in ``edge.cli`` (the composition
root) passes an ``evaluate`` built from ``edge.training`` when the config names held-out data.
Only this module (with ``__main__``) reads the clock for the service, installs signal
handlers and configures logging.
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys
import threading
from collections.abc import Callable, Sequence
from types import FrameType

from server_stub.config import ConfigError, CoordinatorConfig, load_config
from server_stub.coordinator import Coordinator, Evaluate, mqtt_transport_for
from server_stub.store import Store

logger = logging.getLogger("server_stub")


def run_coordinator(
    config: CoordinatorConfig,
    *,
    evaluate: Evaluate | None = None,
    max_rounds: int | None = None,
) -> int:
    """Connect, run until the configured rounds are done or SIGINT/SIGTERM; return 0."""
    layout, weights = config.layout_and_weights()
    stop = threading.Event()

    def on_signal(signum: int, frame: FrameType | None) -> None:
        logger.info("signal %d: stopping after the current message", signum)
        stop.set()

    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGINT, on_signal)
        signal.signal(signal.SIGTERM, on_signal)
    transport = mqtt_transport_for(config)
    with Store(config.state_db) as store:
        coordinator = Coordinator(
            config, transport, store, layout=layout, initial_weights=weights, evaluate=evaluate
        )
        coordinator.run(stop, max_rounds=max_rounds)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fedge coordinator", description=__doc__)
    parser.add_argument("--config", required=True, help="coordinator TOML file")
    parser.add_argument("--rounds", type=int, default=None, help="override the round count")
    parser.add_argument("--log-level", default="INFO", help="DEBUG, INFO, WARNING, ...")
    return parser


def main(
    argv: Sequence[str] | None = None,
    evaluate_factory: Callable[[CoordinatorConfig], Evaluate | None] | None = None,
) -> int:
    """``fedge coordinator --config FILE``."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=args.log_level.upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    try:
        config = load_config(args.config)
    except ConfigError as exc:
        print(f"fedge coordinator: {exc}", file=sys.stderr)
        return 2
    evaluate = None
    if evaluate_factory is not None:
        evaluate = evaluate_factory(config)
    elif config.eval_data is not None:
        logger.warning(
            "[evaluation] data is set but this entry point has no trainer; use `fedge "
            "coordinator` to evaluate models"
        )
    return run_coordinator(config, evaluate=evaluate, max_rounds=args.rounds)
