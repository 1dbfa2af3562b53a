"""``fedge agent``: read the config, build the agent's parts, run it until SIGTERM/SIGINT.

This is the only place where the real agent's clock, RNG and signal handlers are set up
(the simulator injects its own through :func:`edge.agent.run_agent`). On SIGTERM the agent
publishes an offline status, disconnects cleanly and exits with status 0.
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from edge.config import AgentConfig, ConfigError, apply_overrides, load_agent_config, read_hmac_key

log = logging.getLogger("edge.agent")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The flags of ``fedge agent``; each overrides the matching config key."""
    parser.add_argument("--config", type=Path, required=True, help="agent.toml")
    parser.add_argument("--broker", dest="broker.url", help="mqtt[s]://host:port")
    parser.add_argument("--username", dest="broker.username")
    parser.add_argument("--password-file", dest="broker.password_file", type=Path)
    parser.add_argument("--ca-file", dest="broker.ca_file", type=Path)
    parser.add_argument("--fleet", dest="fleet")
    parser.add_argument("--device-id", dest="device_id")
    parser.add_argument("--data", dest="data.path", type=Path, help=".npz or .csv data file")
    parser.add_argument("--trainer", dest="model.trainer", choices=["numpy", "litert"])
    parser.add_argument("--tflite", dest="model.tflite")
    parser.add_argument("--state-dir", dest="agent.state_dir", type=Path)
    parser.add_argument("--heartbeat", dest="agent.heartbeat_s", type=float, metavar="SECONDS")
    parser.add_argument("--hmac-key-file", dest="agent.hmac_key_file", type=Path)
    parser.add_argument("--min-battery", dest="limits.min_battery_percent", type=float)
    parser.add_argument("--max-temp", dest="limits.max_temp_c", type=float)
    parser.add_argument("--min-free-mem", dest="limits.min_free_mem_mb", type=float)
    parser.add_argument(
        "--allow-metered", dest="limits.allow_metered", action="store_true", default=None
    )
    parser.add_argument("--metered", dest="telemetry.metered", action="store_true", default=None)
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")


def resolve_config(args: argparse.Namespace) -> AgentConfig:
    """Load the file named by ``--config`` and lay the flags over it."""
    config = load_agent_config(args.config)
    overrides = {k: v for k, v in vars(args).items() if "." in k or k in ("fleet", "device_id")}
    if overrides.get("data.path") is not None:
        config = apply_overrides(config, {"data.builtin": None})
        config = apply_overrides(
            config,
            {"data": type(config.data)(path=overrides.pop("data.path"),
                                        num_classes=config.data.num_classes,
                                        label_column=config.data.label_column)},
        )  # fmt: skip
    return apply_overrides(config, overrides)


def build_parts(config: AgentConfig) -> dict[str, Any]:
    """Load the data and the trainer named by ``config`` (raises with a clear message)."""
    from edge.data import load_builtin, load_local_data
    from edge.training import ModelSpec, NumpyTrainer, Trainer

    if config.data.path is not None:
        dataset = load_local_data(
            config.data.path,
            num_classes=config.data.num_classes,
            input_dim=config.model.input_dim,
            label_column=config.data.label_column,
        )
    else:
        assert config.data.builtin is not None
        dataset = load_builtin(config.data.builtin)
    trainer: Trainer
    if config.model.trainer == "litert":
        from edge.litert_training import LiteRTTrainer, bundled_model_path

        assert config.model.tflite is not None
        source = config.model.tflite
        path = Path(source) if Path(source).suffix == ".tflite" else bundled_model_path(source)
        trainer = LiteRTTrainer.from_file(path, num_threads=config.model.threads)
    else:
        spec = ModelSpec(
            config.model.kind,
            input_dim=config.model.input_dim or dataset.input_dim,
            num_classes=config.data.num_classes,
            hidden=config.model.hidden,
        )
        trainer = NumpyTrainer(spec)
    return {"dataset": dataset, "trainer": trainer}


def run(config: AgentConfig, stop: threading.Event | None = None) -> int:
    """Run the agent of ``config`` until ``stop`` is set (or SIGTERM/SIGINT on the main thread)."""
    from edge.agent import AgentOptions, connect_agent_transport, run_agent
    from edge.mqtt_transport import MqttSettings
    from edge.state import AgentStore
    from edge.telemetry import HostTelemetry
    from edge.transport import TransportError

    stop = stop if stop is not None else threading.Event()
    if threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda *_: stop.set())
    parts = build_parts(config)
    key = None if config.agent.hmac_key_file is None else read_hmac_key(config.agent.hmac_key_file)
    password = None
    if config.broker.password_file is not None:
        try:
            password = config.broker.password_file.read_text().splitlines()[0]
        except (OSError, IndexError) as exc:
            raise ConfigError(f"broker.password_file: cannot read a password: {exc}") from None
    settings = MqttSettings.from_url(
        config.broker.url,
        client_id=config.device_id,
        username=config.broker.username,
        password=password,
        ca_certs=None if config.broker.ca_file is None else str(config.broker.ca_file),
        certfile=None if config.broker.cert_file is None else str(config.broker.cert_file),
        keyfile=None if config.broker.key_file is None else str(config.broker.key_file),
        keepalive_s=config.broker.keepalive_s,
    )
    options = AgentOptions(
        fleet=config.fleet,
        cid=config.device_id,
        limits=config.limits,
        heartbeat_s=config.agent.heartbeat_s,
        hmac_key=key,
        chunk_size=config.agent.chunk_size,
        max_model_bytes=config.agent.max_model_bytes,
        trainer_name=config.model.trainer,
        stop_check_interval_s=0.5,
    )
    try:
        store = AgentStore(config.agent.state_dir)
    except OSError as exc:  # no permission, a file in the way, read-only file system
        raise ConfigError(
            f"agent.state_dir: cannot create {config.agent.state_dir} ({exc.strerror or exc}); "
            "point state_dir (--state-dir) at a writable folder"
        ) from None
    telemetry = HostTelemetry(metered=config.metered, overrides=config.telemetry)
    while not stop.is_set():
        try:
            transport, relay = connect_agent_transport(settings, config.fleet, config.device_id)
        except TransportError as exc:
            log.error("cannot connect to %s: %s; retrying in 10 s", settings.url, exc)
            stop.wait(10.0)
            continue
        log.info("agent %s connected to %s", config.device_id, settings.url)
        stats = run_agent(
            transport, options, trainer=parts["trainer"], dataset=parts["dataset"],
            telemetry=telemetry, store=store, stop=stop, clock=time.time,
            rng=np.random.default_rng(), relay=relay,
        )  # fmt: skip
        log.info("agent %s stopped: %s", config.device_id, stats)
        break
    return 0


def main(args: argparse.Namespace) -> int:
    """Handler of ``fedge agent`` (``args`` from :func:`add_arguments`)."""
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    try:
        config = resolve_config(args)
        return run(config)
    except (ConfigError, ValueError, ImportError) as exc:  # DataError, TrainingError too
        print(f"fedge agent: {exc}", file=sys.stderr)
        return 2


def cli(argv: Sequence[str] | None = None) -> int:
    """Stand-alone entry (``python -m edge.agent_main --config agent.toml``)."""
    parser = argparse.ArgumentParser(prog="fedge agent")
    add_arguments(parser)
    return main(parser.parse_args(argv))


if __name__ == "__main__":  # pragma: no cover
    sys.exit(cli())
