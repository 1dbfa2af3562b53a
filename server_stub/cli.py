"""Command-line entry of the coordinator (``fedge coordinator``, ``python -m server_stub``).

``run_coordinator`` is what both call; the ``fedge`` handler in ``edge.cli`` (the composition
root) passes an ``evaluate`` built from ``edge.training`` when the config names held-out data.
Only this module (with ``__main__``) reads the clock for the service, installs signal
handlers and configures logging.

Start-up checks everything that can be checked before it touches the network, in this order:
the config (:func:`server_stub.config.load_config`: types, ranges, files), the initial
weights and the evaluation data, the metrics port, the state database (a file that is not a
fedge database, or whose checkpoint was made with another model, is refused and left as it
was), and only then the broker. Once connected, and before the coordinator publishes its model
(retained, which would overwrite the evidence), it reads the fleet's retained model manifest:
a newer version than the state db's is refused (:func:`_check_retained_model`). Each failure
is one line on stderr: exit status 2 for a configuration or state problem the operator must
fix, 1 when the broker cannot be reached (no retry: a supervisor such as systemd restarts the
service).
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import signal
import sys
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from types import FrameType
from typing import Any

from edge.benchargs import int_at_least
from edge.modelio import F32, LayoutError, ModelLayout
from edge.transport import Message, SubscribeError, Transport, TransportError, redact_url
from edge.wire import ModelManifest, Topics, WireError
from server_stub.config import ConfigError, CoordinatorConfig, load_config
from server_stub.coordinator import (
    CheckpointMismatchError,
    Coordinator,
    Evaluate,
    checkpoint_weights,
    mqtt_transport_for,
)
from server_stub.metrics import CoordinatorMetrics
from server_stub.store import (
    NotAStateDatabaseError,
    Store,
    StoreError,
    StoreInUseError,
    in_use_by,
)
from server_stub.strategies import StrategyError

logger = logging.getLogger("server_stub")

RETAINED_MODEL_QUIET_S = 2.0
"""Start-up gives up waiting for the fleet's retained model manifest after this many seconds
without any message. The broker sends a retained message right after the SUBACK that
``subscribe`` waits for, so on an idle session it is there at once; but it queues behind the
messages the persistent session kept while the coordinator was down (updates, statuses), and
those flow at the broker's in-flight window per round trip. Every message taken off the
transport meanwhile therefore restarts the wait, up to :data:`RETAINED_MODEL_MAX_S`."""
RETAINED_MODEL_MAX_S = 10.0
"""The longest start-up waits for the retained model manifest (a busy fleet never goes quiet)."""

DESCRIPTION = """\
Run the federated-learning coordinator of one fleet: it selects devices, sends them training
tasks over MQTT, aggregates their updates and publishes each new model. The TOML file holds
every setting (example: deploy/coordinator.toml; reference: docs/COORDINATOR.md).
Exit status: 0 done, 1 the broker cannot be reached, 2 bad configuration or state db."""


class StartupError(Exception):
    """The coordinator cannot start; the message is one line for the operator.

    ``exit_code`` is 2 for something to fix in the config or the state db, 1 for the broker.
    """

    def __init__(self, message: str, exit_code: int = 2) -> None:
        super().__init__(message)
        self.exit_code = exit_code


def run_coordinator(
    config: CoordinatorConfig,
    *,
    evaluate: Evaluate | None = None,
    max_rounds: int | None = None,
) -> int:
    """Connect, run until the configured rounds are done or SIGINT/SIGTERM; return 0.

    Raises
    ------
    ConfigError
        The ``[model] weights`` file is unreadable.
    StartupError
        Before anything is written: the metrics port, state db or its checkpoint is unusable,
        or the broker holds a newer model of the fleet (``exit_code`` 2), or the broker cannot
        be reached (1).
    """
    layout, weights = config.layout_and_weights()
    try:
        metrics = CoordinatorMetrics(port=config.metrics_port)
    except OSError as exc:
        owner = in_use_by(config.state_db)
        if owner is not None:  # most likely the same config running already: say so
            raise StartupError(
                f"[metrics] port {config.metrics_port} is taken and state db "
                f"{config.state_db} is in use by another process (pid {owner}): this "
                "coordinator probably runs already; stop it, or give this one its own "
                "[state] db and [metrics] port"
            ) from None
        raise StartupError(
            f"[metrics] port {config.metrics_port}: cannot serve metrics on 127.0.0.1 "
            f"({exc.strerror or exc}); choose a free port or stop what listens there"
        ) from None
    try:
        _run(config, layout, weights, metrics, evaluate=evaluate, max_rounds=max_rounds)
    finally:
        metrics.close()  # idempotent: the coordinator closes it too
    return 0


def _run(
    config: CoordinatorConfig,
    layout: ModelLayout,
    weights: dict[str, F32],
    metrics: CoordinatorMetrics,
    *,
    evaluate: Evaluate | None,
    max_rounds: int | None,
) -> None:
    try:
        store = Store(config.state_db)
    except NotAStateDatabaseError as exc:
        raise StartupError(f"{exc}; move it away or point [state] db elsewhere") from None
    except StoreInUseError as exc:
        raise StartupError(str(exc)) from None
    except StoreError as exc:
        raise StartupError(f"{exc}; fix its permissions or point [state] db elsewhere") from None
    with store:
        try:
            # Refuse another model's checkpoint before connecting.
            found = checkpoint_weights(store, layout)
        except CheckpointMismatchError as exc:
            raise StartupError(str(exc)) from None
        version = found[0].version if found is not None else 0  # what the coordinator publishes
        url = redact_url(config.broker.url)
        try:
            transport = mqtt_transport_for(config)
        except TransportError as exc:
            raise StartupError(
                f"cannot connect to the broker at {url} ([broker] url): {exc}", exit_code=1
            ) from None
        except OSError as exc:  # the password file became unreadable since the config check
            raise StartupError(f"[broker] password_file: cannot read it ({exc})") from None
        logger.info("connected to %s", url)
        try:
            transport = _check_retained_model(
                transport, config, store.path, version, fresh=found is None, url=url
            )
        except StartupError:
            transport.close()
            raise
        try:
            coordinator = Coordinator(
                config, transport, store, layout=layout, initial_weights=weights,
                evaluate=evaluate, metrics=metrics,
            )  # fmt: skip
        except (LayoutError, StrategyError) as exc:
            transport.close()
            raise StartupError(
                f"the checkpoint in {store.path} does not fit this configuration ({exc}); "
                "restore [model] and [strategy] or use a new [state] db"
            ) from None
        stop = threading.Event()
        with _stop_on_signals(stop):
            coordinator.run(stop, max_rounds=max_rounds)


def _check_retained_model(
    transport: Transport,
    config: CoordinatorConfig,
    db: str,
    version: int,
    *,
    fresh: bool,
    url: str,
) -> Transport:
    """Refuse to start when the broker holds a newer model of the fleet than ``version``.

    Devices load only increasing model versions, so they would never take this coordinator's
    model: they would decline every task. An equal or older retained version is a restart
    (the coordinator checkpoints a version before it publishes it). Returns the transport for
    the coordinator: ``transport`` itself, or, when messages other than the manifest were
    taken off it while waiting, a wrapper that hands those back first, in order.

    The manifest subscription stays (the transport has no unsubscribe, and the persistent
    session keeps it across restarts): the coordinator then receives its own manifest, one
    small message per published version, and ignores it (a model topic names no device).

    Raises
    ------
    StartupError
        The retained manifest names a newer version (``exit_code`` 2).
    """
    topics = Topics(config.fleet)
    topic = topics.model_manifest()
    started = time.monotonic()
    try:
        retained, held = _retained_message(transport, topic)
    except SubscribeError as exc:  # e.g. an ACL without read access to the model topics
        logger.warning("cannot read the fleet's retained model (%s); not checked", exc)
        return transport
    if retained is None:
        logger.info(
            "no retained model of fleet %s on the broker (waited %.1f s); publishing version %d",
            config.fleet, time.monotonic() - started, version,
        )  # fmt: skip
    else:
        try:
            manifest = ModelManifest.from_bytes(retained.payload)
        except WireError as exc:
            logger.warning(
                "the retained model manifest on %s is not valid (%s); not compared with state "
                "db %s, this coordinator's version %d replaces it",
                topic, exc, db, version,
            )  # fmt: skip
        else:
            theirs = manifest.model_version
            if theirs > version:
                first = topics.model_chunk(theirs, 0)
                last = topics.model_chunk(theirs, manifest.chunk_count - 1)
                chunks = first if manifest.chunk_count == 1 else f"{first} to {last}"
                raise StartupError(
                    f"fleet {config.fleet!r}: the broker at {url} holds model version {theirs} "
                    f"(retained on {topic}), newer than version {version} of state db {db}"
                    f"{' (new, no checkpoint)' if fresh else ''}; devices load only increasing "
                    f"versions, so those that saw version {theirs} would decline every task "
                    f"(model_unavailable). Start from the state db that published version "
                    f"{theirs}, or use a new fleet id (`fleet`, here and in the agents' "
                    f"configs), or, if no device has loaded version {theirs} yet, clear the "
                    f"fleet's retained model: mosquitto_pub -r -n -t {topic}, and the same for "
                    f"its chunks {chunks} (a device that has loaded it keeps it in its "
                    f"state_dir, model.bin and model.json, and declines older versions until "
                    f"those are deleted)"
                )
            logger.info(
                "the broker holds model version %d of fleet %s; this state db publishes %d",
                theirs, config.fleet, version,
            )  # fmt: skip
    return _Replay(transport, held) if held else transport


def _retained_message(transport: Transport, topic: str) -> tuple[Message | None, list[Message]]:
    """Subscribe to ``topic`` and wait for its retained message (see
    :data:`RETAINED_MODEL_QUIET_S`); return it, or None when none came, and every other
    message taken off the transport meanwhile, in order."""
    transport.subscribe(topic)
    held: list[Message] = []
    give_up = time.monotonic() + RETAINED_MODEL_MAX_S
    quiet_until = time.monotonic() + RETAINED_MODEL_QUIET_S
    while (left := min(give_up, quiet_until) - time.monotonic()) > 0:
        msg = transport.receive(left)
        if msg is None:
            break
        # Only the retained copy counts: a non-retained one was queued by the persistent
        # session or forwarded live, and the coordinator ignores it like any model topic.
        if msg.retain and msg.topic == topic:
            return msg, held
        held.append(msg)
        quiet_until = time.monotonic() + RETAINED_MODEL_QUIET_S
    return None, held


class _Replay:
    """A transport that hands back the messages taken off ``inner`` before its own.

    Anything else (``sessions_lost``, ...) is ``inner``'s.
    """

    def __init__(self, inner: Transport, held: list[Message]) -> None:
        self.inner = inner
        self._held = deque(held)

    def publish(self, topic: str, payload: bytes, *, qos: int = 1, retain: bool = False) -> None:
        self.inner.publish(topic, payload, qos=qos, retain=retain)

    def subscribe(self, topic_filter: str, qos: int = 1) -> None:
        self.inner.subscribe(topic_filter, qos)

    def receive(self, timeout: float) -> Message | None:
        if self._held:
            return self._held.popleft()
        return self.inner.receive(timeout)

    def close(self) -> None:
        self.inner.close()

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)


@contextlib.contextmanager
def _stop_on_signals(stop: threading.Event) -> Iterator[None]:
    """Set ``stop`` on SIGINT/SIGTERM (main thread only); the old handlers come back after."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def on_signal(signum: int, frame: FrameType | None) -> None:
        logger.info("signal %d: stopping after the current message", signum)
        stop.set()

    previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fedge coordinator",
        description=DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--config", required=True, help="coordinator TOML file")
    parser.add_argument(
        "--rounds", type=int_at_least(1), default=None, metavar="N",
        help="run N rounds in this run, then exit (instead of rounds_total)",
    )  # fmt: skip
    parser.add_argument(
        "--log-level", default="INFO", type=str.upper,
        choices=["DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"], help="default INFO",
    )  # fmt: skip
    return parser


def main(
    argv: Sequence[str] | None = None,
    evaluate_factory: Callable[[CoordinatorConfig], Evaluate | None] | None = None,
) -> int:
    """``fedge coordinator --config FILE``; returns the exit status (see :data:`DESCRIPTION`).

    ``evaluate_factory`` may raise :class:`ConfigError` (e.g. unreadable ``[evaluation] data``).
    """
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=args.log_level,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    try:
        config = load_config(args.config)
    except ConfigError as exc:
        print(f"fedge coordinator: {exc}", file=sys.stderr)
        return 2
    evaluate = None
    try:
        if evaluate_factory is not None:
            evaluate = evaluate_factory(config)
        elif config.eval_data is not None:
            logger.warning(
                "[evaluation] data is set but this entry point has no trainer; use `fedge "
                "coordinator` to evaluate models"
            )
        return run_coordinator(config, evaluate=evaluate, max_rounds=args.rounds)
    except ConfigError as exc:
        print(f"fedge coordinator: {args.config}: {exc}", file=sys.stderr)
        return 2
    except StartupError as exc:
        print(f"fedge coordinator: {exc}", file=sys.stderr)
        return exc.exit_code
