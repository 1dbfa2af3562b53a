"""``fedge sim``: the whole system on one machine, through the real wire.

A composition root: it wires both sides together, so unlike the library
modules of ``server_stub`` it may import ``edge`` (lazily). What it runs:

1. a private ``mosquitto`` on a free loopback port, or, when the binary is not
   installed, an embedded amqtt broker (``edge.embedded_broker``), or ``--broker URL``;
2. the real coordinator, in this process, on its own MQTT connection;
3. N real device agents in a few worker processes (``python -m edge.sim_worker``),
   each agent with its own MQTT connection, its own data partition written to
   disk in the user data format, its own state directory, and a heterogeneity
   profile that it plays through its telemetry and behaviour.

Nothing shortcuts the wire: the coordinator sees the devices only through
their status, their declines and their updates. Everything started is stopped
on exit, including on Ctrl-C, and the temporary directory is removed.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import logging
import math
import os
import queue
import secrets
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from server_stub import report

if TYPE_CHECKING:
    from rich.console import Console

    from edge.embedded_broker import EmbeddedBroker
    from edge.mosquitto import MosquittoBroker

logger = logging.getLogger("fedge.sim")

PROFILE_MIXES = ("uniform", "mixed", "harsh")
BROKER_KINDS = ("auto", "mosquitto", "embedded")


class SimError(RuntimeError):
    """The simulation could not run (bad option, broker or worker failure)."""

    exit_code = 1
    result: SimResult | None = None
    """What the failed run did (rounds completed so far); set by :func:`run_sim`."""


class SimUsageError(SimError):
    """A bad option or input file (``fedge sim`` exits with 2, as argparse does)."""

    exit_code = 2


class SimInterrupted(KeyboardInterrupt):
    """SIGINT, SIGTERM or SIGHUP arrived: the run was unwound, everything it started stopped."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum
        self.result: SimResult | None = None
        """What the interrupted run did (rounds completed so far); set by :func:`run_sim`."""


MAX_CLASSES = 1000
"""Most classes ``fedge sim`` accepts in a user dataset (labels 0..999)."""

PRIVATE_FLEET = "sim"
"""Fleet id on the simulator's own broker; on ``--broker URL`` each run gets ``sim-<6 hex>``."""


@dataclass(frozen=True, slots=True)
class SimConfig:
    """Everything ``fedge sim`` was asked to do (written to ``metrics.json`` as ``config``)."""

    clients: int = 20
    """Number of simulated devices."""
    clients_per_round: int = 10
    """Updates the coordinator waits for in each round (it over-selects by 1.3x)."""
    rounds: int = 40
    dataset: str = "digits"
    """``digits``, ``mnist5k`` or a path to an ``.npz``/``.csv`` in the user data format."""
    partition: str = "dirichlet:0.5"
    """``iid``, ``dirichlet:ALPHA`` (label skew) or ``shards:N``."""
    model: str = "mlp"
    """``logreg``, ``mlp`` or a path to a ``.tflite`` training model."""
    hidden: int = 64
    trainer: str = "numpy"
    codec: str = "int8"
    """A preset (``none``, ``int8``, ``int4``, ``topk``) or a JSON codec config."""
    error_feedback: bool | None = None
    """Keep a residual on each device; default: on for int4 and topk, off otherwise."""
    strategy: str = "fedavg"
    clip_norm: float = 1.0
    """L2 bound of each update under ``--strategy clipped`` (honest digits MLP: ~0.5-1.5)."""
    trim_beta: float = 0.2
    """Fraction trimmed from each end of every coordinate under ``--strategy trimmed_mean``."""
    selection: str = "random"
    async_mode: bool = False
    """FedBuff instead of synchronous rounds."""
    profiles: str = "uniform"
    attackers: int = 0
    """Malicious devices (evenly spaced ids), each poisoning its updates with ``attack``."""
    attack: str = "scale:10"
    """``scale:FACTOR``, ``signflip`` or ``nan`` (``edge.attacks``)."""
    seed: int = 0
    epochs: int = 2
    batch_size: int = 16
    lr: float = 0.1
    deadline_s: float = 20.0
    min_fraction: float = 0.5
    test_fraction: float = 0.25
    target_accuracy: float = 0.9
    broker: str | None = None
    """URL of an existing broker; None starts a private one (see ``broker_kind``)."""
    broker_kind: str = "auto"
    """Private broker: ``mosquitto``, ``embedded`` (amqtt) or ``auto`` (mosquitto if installed)."""
    workers: int = 0
    """Worker processes hosting the agents; 0: one per core, or one per 250 devices if more."""
    heartbeat_s: float = 2.0
    out: str | None = None

    def resolved_error_feedback(self) -> bool:
        if self.error_feedback is not None:
            return self.error_feedback
        return self.codec in ("int4", "topk")

    def to_json(self) -> dict[str, Any]:
        doc = dataclasses.asdict(self)
        doc["error_feedback"] = self.resolved_error_feedback()
        return doc


@dataclass(slots=True)
class SimResult:
    """The outcome of one simulated federation."""

    config: SimConfig
    rounds: list[dict[str, Any]] = field(default_factory=list)
    totals: dict[str, Any] = field(default_factory=dict)
    wall_s: float = 0.0
    fleet: str = PRIVATE_FLEET
    """The fleet id the run used (the topic prefix ``fl/v1/{fleet}``)."""


# ---------------------------------------------------------------------------- profiles


def make_profiles(
    mix: str,
    n: int,
    rng: np.random.Generator,
    *,
    attackers: int = 0,
    attack: str | None = None,
) -> list[dict[str, Any]]:
    """Heterogeneity profiles for ``n`` devices (JSON-safe; the worker plays them).

    ``attackers`` devices, spread evenly over the ids (``i * n // attackers``) and chosen
    without ``rng`` so a poisoned run gets the same fleet as its clean twin, carry
    ``"attack": attack`` (``edge.attacks``): they poison every update they send.

    ``uniform``: every device on mains power, fast, unmetered ethernet.
    ``mixed``: a realistic fleet: a third slow CPUs (2x or 4x), a third on batteries
    that drain while training and charge on a schedule (some start below the 20 %
    minimum), some Wi-Fi links with tens of milliseconds of latency that drop and
    come back, a few metered cellular devices, a few that go offline for seconds at
    a time (mid-round, when a round is running).
    ``harsh``: the same kinds, more of each.

    Rates are compressed to the simulation's time scale (rounds of seconds, not
    hours): batteries drain by percent per second of training, charging windows
    repeat every 10-30 s, flaky links drop every 5-20 s.
    """
    if mix not in PROFILE_MIXES:
        raise SimError(f"unknown profile mix {mix!r}; choose one of {', '.join(PROFILE_MIXES)}")
    profiles = []
    share = {"uniform": 0.0, "mixed": 1.0, "harsh": 1.8}[mix]
    for _ in range(n):
        p: dict[str, Any] = {
            "speed_factor": 1.0,
            "net_kind": "ethernet",
            "metered": False,
            "rtt_ms": float(rng.uniform(1, 5)),
            "battery": None,
            "flaky_every_s": None,
            "offline_per_min": 0.0,
        }
        if share:
            # A Pi-class pace, so that rounds take seconds and the fleet's events
            # (batteries, drop-outs, flaky links) land while rounds are running.
            p["batch_time_s"] = float(rng.uniform(0.01, 0.03))
            if rng.random() < 0.33 * share:
                p["speed_factor"] = float(rng.choice([2.0, 4.0]))  # times slower
            if rng.random() < 0.33 * share:
                p["battery"] = {
                    "percent": float(rng.uniform(10, 100)),
                    "train_drain_per_s": float(rng.uniform(5, 25)),
                    "idle_drain_per_s": 0.05,
                    "charge_per_s": float(rng.uniform(2, 6)),
                    "charging_period_s": float(rng.uniform(10, 30)),
                    "charging_duty": 0.5,
                }
            if rng.random() < 0.15 * share:
                p["net_kind"], p["rtt_ms"] = "wifi", float(rng.uniform(10, 60))
                p["flaky_every_s"] = float(rng.uniform(5, 20))
            if rng.random() < 0.08 * share:
                p["net_kind"], p["metered"], p["rtt_ms"] = (
                    "cellular",
                    True,
                    float(rng.uniform(60, 200)),
                )
            if rng.random() < 0.1 * share:
                p["offline_per_min"] = 3.0
        profiles.append(p)
    for i in range(attackers):
        profiles[i * n // attackers]["attack"] = attack
    return profiles


# ---------------------------------------------------------------------------- data


def _load_dataset(name: str) -> Any:
    """The bundled dataset ``name``, or a user file whose classes are its labels 0..max.

    Every problem with the file is an :class:`edge.data.DataError` (turned into a
    :class:`SimUsageError` by the caller). The number of classes of a user file, ``.npz`` or
    ``.csv`` alike, is its largest label + 1 (at least 2, at most :data:`MAX_CLASSES`).
    """
    from edge import data as edata

    if name in edata.BUILTIN_DATASETS:
        return edata.load_builtin(name)
    path = Path(name)
    if not path.exists():
        raise SimUsageError(
            f"--dataset {name!r} is neither a bundled dataset "
            f"({', '.join(edata.BUILTIN_DATASETS)}) nor an existing file"
        )
    if path.is_dir():
        raise SimUsageError(f"--dataset {name!r} is a directory, not a .npz or .csv data file")
    try:
        probe = edata.load_local_data(path, num_classes=MAX_CLASSES)
    except edata.LabelRangeError as exc:
        where = str(exc).split(";")[0].removeprefix("y: ")  # "label -1 at row 4 is outside ..."
        raise SimUsageError(
            f"--dataset {name}: {where}; labels must be whole numbers 0..{MAX_CLASSES - 1} "
            "(fedge sim takes the number of classes from the largest label + 1)"
        ) from None
    num_classes = max(2, int(probe.y.max()) + 1)
    return edata.Dataset(probe.x, probe.y, num_classes)


def _prepare_data(
    cfg: SimConfig, workdir: Path, rng: np.random.Generator
) -> tuple[list[Path], Any, Any]:
    """Split the dataset, partition the training part over the devices, write each partition."""
    from edge import data as edata

    try:
        dataset = _load_dataset(cfg.dataset)
    except edata.DataError as exc:
        raise SimUsageError(f"--dataset: {exc}") from None
    try:
        train, test = dataset.split(cfg.test_fraction, rng)
    except edata.DataError:
        raise SimUsageError(
            f"--dataset {cfg.dataset}: {dataset.num_examples} examples are too few to hold "
            f"out {cfg.test_fraction:.0%} of them for testing and train on the rest"
        ) from None
    try:
        parts = edata.partition(
            train.y,
            cfg.clients,
            edata.parse_partition(cfg.partition),
            rng,
            min_size=min(10, max(1, train.num_examples // cfg.clients)),
        )
    except edata.DataError as exc:
        raise SimUsageError(
            f"--partition {cfg.partition}: {exc} ({train.num_examples} training examples "
            f"for --clients {cfg.clients})"
        ) from None
    data_dir = workdir / "data"
    data_dir.mkdir()
    paths = []
    for i, idx in enumerate(parts):
        path = data_dir / f"dev-{i:04d}.npz"
        edata.save_dataset(path, train.subset(np.asarray(idx)))
        paths.append(path)
    return paths, train, test


# ---------------------------------------------------------------------------- run


class _Progress:
    """A live table of rounds (rich) or plain lines when stdout is not a terminal."""

    def __init__(self, cfg: SimConfig, enabled: bool) -> None:
        self.cfg = cfg
        self.enabled = enabled
        self.rounds: list[dict[str, Any]] = []
        self.fleet = PRIVATE_FLEET
        self._live: Any = None

    def __enter__(self) -> _Progress:
        if self.enabled and sys.stdout.isatty():
            from rich.live import Live

            self._live = Live(self._render(), refresh_per_second=4, transient=False)
            self._live.__enter__()
        return self

    def _render(self) -> Any:
        title = (
            f"fedge sim: {self.cfg.clients} devices, {self.cfg.dataset}, "
            f"{self.cfg.partition}, codec {self.cfg.codec}, {self.cfg.strategy}, "
            f"fleet {self.fleet}"
        )
        return report.round_table(self.rounds[-30:], title=title)

    def status(self, text: str) -> None:
        if self.enabled and self._live is None:
            print(text, flush=True)

    def set_fleet(self, fleet: str) -> None:
        self.fleet = fleet
        if self._live is not None:
            self._live.update(self._render())

    def add(self, record: dict[str, Any]) -> None:
        self.rounds.append(record)
        if not self.enabled:
            return
        if self._live is not None:
            self._live.update(self._render())
        else:
            acc = record.get("accuracy")
            print(
                f"round {record['round']:3d}  v{record['model_version']}  "
                f"acc {'-' if acc is None else f'{100 * acc:5.1f}%'}  "
                f"participants {record['participants']:3d}  declined {record['declined']}  "
                f"dropped {record['dropped']}  rejected {report.rejected_text(record)}  "
                f"up {report.human_bytes(record['bytes_up'])}  "
                f"down {report.human_bytes(record['bytes_down'])}  "
                f"{record['duration_s']:.2f}s",
                flush=True,
            )

    def __exit__(self, *exc: object) -> None:
        if self._live is not None:
            self._live.__exit__(None, None, None)


def _plural(n: int, one: str, many: str | None = None) -> str:
    """``1 round``, ``2 rounds``."""
    return f"{n} {one if n == 1 else (many or one + 's')}"


def _start_workers(
    cfg: SimConfig,
    workdir: Path,
    broker_url: str,
    data_paths: Sequence[Path],
    profiles: Sequence[dict[str, Any]],
    model_spec: dict[str, Any],
    fleet: str = PRIVATE_FLEET,
) -> list[tuple[subprocess.Popen[bytes], Path]]:
    n_workers = cfg.workers or max(os.cpu_count() or 1, -(-cfg.clients // 250))
    n_workers = max(1, min(n_workers, cfg.clients))
    devices = [
        {
            "cid": f"dev-{i:04d}",
            "data": str(path),
            "profile": profiles[i],
            "state_dir": str(workdir / "state" / f"dev-{i:04d}"),
        }
        for i, path in enumerate(data_paths)
    ]
    procs = []
    for w in range(n_workers):
        spec = {
            "broker": broker_url,
            "fleet": fleet,
            # On a shared broker, MQTT client ids that cannot clash with real devices
            # or another run (the cid in the topics stays dev-NNNN).
            "client_id_prefix": "" if fleet == PRIVATE_FLEET else f"{fleet}-",
            "model": model_spec,
            "trainer": cfg.trainer,
            "heartbeat_s": cfg.heartbeat_s,
            "seed": cfg.seed * 1000 + w,
            "devices": devices[w::n_workers],
        }
        spec_path = workdir / f"worker-{w}.json"
        spec_path.write_text(json.dumps(spec))
        log_path = workdir / f"worker-{w}.log"
        with open(log_path, "wb") as log:
            proc = subprocess.Popen(
                [sys.executable, "-m", "edge.sim_worker", str(spec_path)],
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
            )
        procs.append((proc, log_path))
    return procs


def _stop_workers(
    procs: Sequence[tuple[subprocess.Popen[bytes], Path]], timeout: float = 10.0
) -> None:
    for proc, _ in procs:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + timeout
    for proc, _ in procs:
        try:
            proc.wait(max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _how_it_ended(code: int) -> str:
    """``exited with code 3`` or ``was killed by SIGKILL`` for a process's return code."""
    if code >= 0:
        return f"exited with code {code}"
    try:
        return f"was killed by {signal.Signals(-code).name}"
    except ValueError:
        return f"was killed by signal {-code}"


def _log_ends(text: str) -> str:
    """``; its log ends:`` and the last lines of ``text``, or nothing for an empty log."""
    tail = text[-3000:].strip()
    return f"; its log ends:\n{tail}" if tail else ""


def _check_workers(procs: Sequence[tuple[subprocess.Popen[bytes], Path]]) -> None:
    """Fail the run if a worker exited: they run until the simulator stops them."""
    for w, (proc, log) in enumerate(procs):
        code = proc.poll()
        if code is None:
            continue
        try:
            text = log.read_text(errors="replace")
        except OSError:
            text = ""
        raise SimError(
            f"device worker {w} (pid {proc.pid}) {_how_it_ended(code)} before the run ended; "
            f"its devices are gone" + _log_ends(text)
        )


def _check_broker(broker: MosquittoBroker | EmbeddedBroker | None) -> None:
    """Fail the run if the private broker stopped: without it no round can finish.

    The coordinator and the agents would only see a lost connection and keep trying to
    reconnect, so the run would otherwise wait for ever.
    """
    if broker is None or broker.running:
        return
    from edge.mosquitto import MosquittoBroker

    if isinstance(broker, MosquittoBroker):
        code = broker.returncode
        how = "stopped" if code is None else _how_it_ended(code)
        what = f"mosquitto, pid {broker.pid}"
    else:
        how, what = "stopped", "embedded amqtt broker"
    raise SimError(
        f"the private broker ({what}) {how} during the run; the coordinator and the devices "
        "lost their connection" + _log_ends(broker.log_text())
    )


def _raise_fd_limit(needed: int) -> None:
    """Raise the soft open-files limit towards ``needed`` (inherited by mosquitto and workers).

    A thousand devices are a thousand sockets on the broker; Debian's default soft
    limit of 1,024 would refuse connections long before that.
    """
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = needed if hard == resource.RLIM_INFINITY else min(needed, hard)
    if soft != resource.RLIM_INFINITY and soft < target:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    if target < needed:
        logger.warning(
            "open-files limit is %d; %d devices need about %d: raise it with ulimit -n",
            hard,
            (needed - 256) // 2,
            needed,
        )


class _InterruptOnSignals:
    """While active, SIGINT, SIGTERM and SIGHUP unwind the run as :class:`SimInterrupted`.

    Ctrl-C, ``kill`` and a closed terminal all stop a run the same way. Once
    :meth:`defer` was called (the cleanup has begun) a signal no longer raises at once:
    it is raised when the block ends, so it cannot cut the cleanup short. Only the first
    signal counts. Installed only in the main thread (Python delivers signals there);
    the previous handlers come back on exit.
    """

    SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)

    def __init__(self) -> None:
        self._previous: dict[int, Any] = {}
        self._pending: int | None = None
        self._raised = False
        self._deferring = False

    def _handle(self, signum: int, _frame: object) -> None:
        if self._pending is not None:
            logger.warning("%s again: still stopping", signal.Signals(signum).name)
            return
        self._pending = signum
        if not self._deferring:
            self._raised = True
            raise SimInterrupted(signum)

    def defer(self) -> None:
        """From now on, hold a signal back until the block ends."""
        self._deferring = True

    def __enter__(self) -> _InterruptOnSignals:
        if threading.current_thread() is threading.main_thread():
            for sig in self.SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, exc_type: object, *exc: object) -> None:
        for sig, previous in self._previous.items():
            signal.signal(sig, previous)
        if exc_type is None and self._pending is not None and not self._raised:
            raise SimInterrupted(self._pending)


def _probe_broker(url: str) -> None:
    """Connect to ``--broker`` once, so that a wrong address fails before anything starts."""
    from edge.mqtt_transport import connect_url
    from edge.transport import TransportError

    try:
        transport = connect_url(
            url, client_id=f"fedge-sim-probe-{secrets.token_hex(4)}", connect_timeout_s=5.0
        )
    except TransportError as exc:
        cause = exc.__cause__
        detail = cause.strerror if isinstance(cause, OSError) and cause.strerror else None
        raise SimError(f"cannot connect to {url} (--broker): {detail or exc}") from None
    transport.close()


def _clear_retained(url: str, fleet: str, quiet_s: float = 0.5, max_s: float = 10.0) -> int:
    """Clear every retained message under the run's fleet on ``url``; return how many.

    Collects the retained messages the broker sends on subscribing to ``fl/v1/{fleet}/#``
    until ``quiet_s`` pass without one, then publishes an empty retained message on each.
    """
    from edge.mqtt_transport import connect_url
    from edge.wire import Topics

    transport = connect_url(
        url, client_id=f"fedge-sim-cleanup-{fleet}-{secrets.token_hex(2)}", connect_timeout_s=5.0
    )
    try:
        transport.subscribe(f"{Topics(fleet).prefix}/#")
        topics: set[str] = set()
        give_up = time.monotonic() + max_s
        while time.monotonic() < give_up:
            msg = transport.receive(quiet_s)
            if msg is None:
                break
            if msg.retain and msg.payload:
                topics.add(msg.topic)
        for topic in sorted(topics):
            transport.publish(topic, b"", retain=True)
        return len(topics)
    finally:
        transport.close()


def run_sim(
    cfg: SimConfig,
    *,
    show_progress: bool = True,
    on_round: Callable[[dict[str, Any]], None] | None = None,
) -> SimResult:
    """Run one simulated federation to completion and return its records.

    On a private broker the fleet id is ``sim``; on ``--broker URL`` it is ``sim-<6 hex>``,
    new for every run, and the run's retained messages are cleared when it ends (also on
    an error, Ctrl-C, SIGTERM or SIGHUP), so runs on one broker never see each other's.
    Ctrl-C, SIGTERM and SIGHUP raise :class:`SimInterrupted` (a ``KeyboardInterrupt``)
    once everything is stopped (signal handlers are installed only in the main thread).
    """
    from server_stub.config import ConfigError
    from server_stub.simwiring import build_coordinator, model_spec_for

    result = SimResult(cfg)
    try:
        with _InterruptOnSignals() as signals:
            _validate(cfg)
            fleet = PRIVATE_FLEET
            if cfg.broker is not None:
                fleet = f"{PRIVATE_FLEET}-{secrets.token_hex(3)}"
                _probe_broker(cfg.broker)
            _raise_fd_limit(2 * cfg.clients + 256)
            rng = np.random.default_rng(cfg.seed)
            result.fleet = fleet
            started = time.monotonic()
            records: queue.Queue[dict[str, Any]] = queue.Queue()
            with (
                tempfile.TemporaryDirectory(prefix="fedge-sim-") as tmp,
                _Progress(cfg, show_progress) as progress,
            ):
                workdir = Path(tmp)
                progress.set_fleet(fleet)
                devices = _plural(cfg.clients, "device")
                progress.status(f"preparing {cfg.dataset} for {devices} ({cfg.partition})")
                data_paths, train, test = _prepare_data(cfg, workdir, rng)
                model_spec = model_spec_for(cfg, train)
                profiles = make_profiles(
                    cfg.profiles, cfg.clients, rng, attackers=cfg.attackers, attack=cfg.attack
                )
                broker: MosquittoBroker | EmbeddedBroker | None = None
                procs: list[tuple[subprocess.Popen[bytes], Path]] = []
                stop = threading.Event()
                coordinator_thread: threading.Thread | None = None
                failure: list[BaseException] = []
                try:
                    if cfg.broker is None:
                        broker, description = _start_broker(cfg.broker_kind, workdir / "broker")
                        broker_url = broker.url
                        logger.info("%s on %s", description, broker_url)
                        progress.status(f"{description} on {broker_url}, fleet {fleet}")
                    else:
                        broker_url = cfg.broker
                        progress.status(
                            f"broker {cfg.broker}, fleet {fleet} "
                            f"(fedge status --broker {cfg.broker} --fleet {fleet})"
                        )
                    try:
                        coordinator = build_coordinator(
                            cfg,
                            broker_url,
                            workdir,
                            train,
                            test,
                            model_spec,
                            on_round=records.put,
                            fleet=fleet,
                        )
                    except ConfigError as exc:
                        raise SimUsageError(str(exc)) from None

                    def run_coordinator() -> None:
                        try:
                            coordinator.run(stop, max_rounds=cfg.rounds)
                        except BaseException as exc:  # reported by the main thread
                            failure.append(exc)
                        finally:
                            stop.set()

                    coordinator_thread = threading.Thread(
                        target=run_coordinator, name="coordinator", daemon=True
                    )
                    coordinator_thread.start()
                    procs = _start_workers(
                        cfg, workdir, broker_url, data_paths, profiles, model_spec, fleet
                    )
                    progress.status(
                        f"{_plural(cfg.clients, 'device')} in "
                        f"{_plural(len(procs), 'worker process', 'worker processes')}; "
                        f"{_plural(cfg.rounds, 'round')} of {cfg.clients_per_round}"
                    )
                    while not stop.is_set() or not records.empty():
                        if not stop.is_set():
                            # The broker first: its loss can make a worker exit too.
                            _check_broker(broker)
                            _check_workers(procs)
                        try:
                            record = records.get(timeout=0.2)
                        except queue.Empty:
                            continue
                        result.rounds.append(record)
                        progress.add(record)
                        if on_round is not None:
                            on_round(record)
                    if failure:
                        _check_broker(broker)  # the cause, when the coordinator lost it
                        raise SimError(f"the coordinator failed: {failure[0]!r}") from failure[0]
                finally:
                    signals.defer()
                    stop.set()
                    # Without the private broker, publishes wait for acknowledgements that
                    # cannot come: the coordinator's connection is closed to end its wait,
                    # and the workers, whose agents cannot say goodbye, get a short grace.
                    broker_lost = broker is not None and not broker.running
                    if coordinator_thread is not None:
                        if broker_lost:
                            coordinator.transport.close()
                        coordinator_thread.join(timeout=15)
                    _stop_workers(procs, timeout=2.0 if broker_lost else 10.0)
                    if broker is not None:
                        broker.stop()
                    elif cfg.broker is not None and (coordinator_thread is not None or procs):
                        try:
                            cleared = _clear_retained(cfg.broker, fleet)
                            logger.info("cleared %d retained messages of fleet %s", cleared, fleet)
                        except Exception as exc:  # never hide the run's own outcome
                            logger.warning(
                                "could not clear the retained messages of fleet %s on %s: %s",
                                fleet,
                                cfg.broker,
                                exc,
                            )
            result.wall_s = time.monotonic() - started
            result.totals = report.totals(result.rounds, cfg.target_accuracy)
            result.totals["wall_s"] = result.wall_s
            return result
    except (SimInterrupted, SimError) as exc:
        exc.result = result
        raise


def _start_broker(kind: str, workdir: Path) -> tuple[MosquittoBroker | EmbeddedBroker, str]:
    """Start the private broker of ``kind`` (``auto``: mosquitto if installed, else amqtt).

    Returns the started broker and a description of it for the progress output.
    """
    from edge.embedded_broker import EmbeddedBroker, EmbeddedBrokerError
    from edge.mosquitto import BrokerError, MosquittoBroker, MosquittoPathError, find_mosquitto

    description = "mosquitto"
    if kind == "auto":
        try:
            find_mosquitto()
            kind = "mosquitto"
        except MosquittoPathError as exc:  # asked for that binary: say it is wrong
            raise SimError(str(exc)) from None
        except BrokerError:
            kind = "embedded"
            description = "embedded amqtt broker (mosquitto not found)"
    elif kind == "embedded":
        description = "embedded amqtt broker"
    try:
        if kind == "mosquitto":
            return MosquittoBroker(workdir, persistence=False).start(), description
        return EmbeddedBroker(workdir).start(), description
    except (BrokerError, EmbeddedBrokerError) as exc:
        raise SimError(str(exc)) from exc


def _validate(cfg: SimConfig) -> None:
    """Check every option before anything is prepared or started; :class:`SimUsageError`."""
    bad = SimUsageError
    if cfg.clients < 1:
        raise bad("--clients must be at least 1")
    if not 1 <= cfg.clients_per_round <= cfg.clients:
        raise bad(f"--clients-per-round must be between 1 and --clients ({cfg.clients})")
    if cfg.rounds < 1:
        raise bad("--rounds must be at least 1")
    if cfg.seed < 0:
        raise bad("--seed must be >= 0")
    if cfg.workers < 0:
        raise bad("--workers must be >= 0 (0: one per core)")
    if cfg.epochs < 1:
        raise bad("--epochs must be at least 1")
    if cfg.batch_size < 1:
        raise bad("--batch-size must be at least 1")
    if not (math.isfinite(cfg.lr) and cfg.lr > 0):
        raise bad(f"--lr must be a positive number, got {cfg.lr}")
    if not (math.isfinite(cfg.deadline_s) and cfg.deadline_s > 0):
        raise bad(f"--deadline-s must be a positive number of seconds, got {cfg.deadline_s}")
    if cfg.hidden < 1:
        raise bad("--hidden must be at least 1")
    if not (math.isfinite(cfg.target_accuracy) and 0 < cfg.target_accuracy <= 1):
        raise bad(f"--target-accuracy must be in (0, 1], e.g. 0.9, got {cfg.target_accuracy}")
    if cfg.profiles not in PROFILE_MIXES:
        raise bad(f"--profiles must be one of {', '.join(PROFILE_MIXES)}")
    if cfg.trainer not in ("numpy", "litert"):
        raise bad("--trainer must be numpy or litert")
    if cfg.broker_kind not in BROKER_KINDS:
        raise bad(f"--broker-kind must be one of {', '.join(BROKER_KINDS)}")
    if not 0 <= cfg.attackers <= cfg.clients:
        raise bad(f"--attackers must be between 0 and --clients ({cfg.clients})")
    from edge.attacks import parse_attack

    try:
        parse_attack(cfg.attack)
    except ValueError as exc:
        raise bad(f"--attack: {exc}") from None
    if not (math.isfinite(cfg.clip_norm) and cfg.clip_norm > 0):
        raise bad("--clip-norm must be > 0")
    if not 0 <= cfg.trim_beta < 0.5:
        raise bad("--trim-beta must be in [0, 0.5)")
    from edge.data import DataError, parse_partition

    try:
        parse_partition(cfg.partition)
    except DataError as exc:
        raise bad(f"--partition: {exc}") from None
    _validate_strategy(cfg)
    _validate_broker(cfg)
    _validate_model(cfg)
    from kernels.codec import parse_codec
    from kernels.errors import CodecError

    try:
        parse_codec(cfg.codec)
    except CodecError as exc:
        raise bad(f"--codec: {exc}") from None


def _validate_strategy(cfg: SimConfig) -> None:
    from server_stub.selection import SELECTORS, make_selector
    from server_stub.simwiring import strategy_for
    from server_stub.strategies import STRATEGIES, make_strategy

    if cfg.strategy not in STRATEGIES:
        raise SimUsageError(
            f"--strategy must be one of {', '.join(STRATEGIES)}, got {cfg.strategy!r}"
        )
    if cfg.async_mode and cfg.strategy not in ("fedavg", "fedbuff"):
        raise SimUsageError(
            f"--async runs FedBuff, which cannot be combined with --strategy {cfg.strategy}; "
            "drop one of them"
        )
    name, params = strategy_for(cfg)
    try:
        make_strategy(name, params)
    except ValueError as exc:
        raise SimUsageError(f"--strategy {cfg.strategy}: {exc}") from None
    if cfg.selection not in SELECTORS:
        raise SimUsageError(
            f"--selection must be one of {', '.join(SELECTORS)}, got {cfg.selection!r}"
        )
    try:
        make_selector(cfg.selection)
    except ValueError as exc:
        raise SimUsageError(f"--selection {cfg.selection}: {exc}") from None


def _validate_broker(cfg: SimConfig) -> None:
    if cfg.broker is None:
        return
    if cfg.broker_kind != "auto":
        raise SimUsageError("--broker URL uses an existing broker; drop --broker-kind or --broker")
    from edge.mqtt_transport import MqttSettings

    try:
        MqttSettings.from_url(cfg.broker)
    except ValueError as exc:
        raise SimUsageError(
            f"--broker {cfg.broker!r} is not a broker URL such as mqtt://127.0.0.1:1883 ({exc})"
        ) from None


def _validate_model(cfg: SimConfig) -> None:
    if cfg.model in ("logreg", "mlp"):
        return
    if not cfg.model.endswith(".tflite"):
        raise SimUsageError(f"--model must be logreg, mlp or a .tflite file, got {cfg.model!r}")
    if cfg.trainer != "litert":
        raise SimUsageError("a .tflite model needs --trainer litert")
    from edge.litert_training import LiteRTTrainer
    from edge.training import TrainingError

    try:
        LiteRTTrainer.from_file(cfg.model)
    except (TrainingError, OSError) as exc:
        raise SimUsageError(f"--model: {exc}") from None


# ---------------------------------------------------------------------------- CLI


def add_arguments(p: argparse.ArgumentParser) -> None:
    d = SimConfig()
    p.add_argument("--clients", type=int, default=d.clients, help="simulated devices")
    p.add_argument(
        "--clients-per-round",
        type=int,
        default=d.clients_per_round,
        help="updates per round (the coordinator over-selects by 1.3x)",
    )
    p.add_argument("--rounds", type=int, default=d.rounds)
    p.add_argument(
        "--dataset",
        default=d.dataset,
        help="digits, mnist5k, or a path to user data (.npz with x, y or .csv)",
    )
    p.add_argument("--partition", default=d.partition, help="iid, dirichlet:ALPHA or shards:N")
    p.add_argument("--model", default=d.model, help="logreg, mlp or PATH.tflite")
    p.add_argument("--hidden", type=int, default=d.hidden, help="hidden units of the MLP")
    p.add_argument("--trainer", default=d.trainer, choices=["numpy", "litert"])
    p.add_argument(
        "--codec",
        default=d.codec,
        help="uplink codec: none, int8, int4, topk, or a JSON codec config",
    )
    p.add_argument(
        "--error-feedback",
        dest="error_feedback",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="keep a residual on the devices (default: on for int4/topk)",
    )
    p.add_argument(
        "--strategy",
        default=d.strategy,
        help="fedavg, fedprox, fedavgm, fedadam, fedyogi, scaffold, clipped, median, "
        "trimmed_mean (fedbuff with --async)",
    )
    p.add_argument(
        "--clip-norm",
        type=float,
        default=d.clip_norm,
        help="L2 bound of each update for --strategy clipped",
    )
    p.add_argument(
        "--trim-beta",
        type=float,
        default=d.trim_beta,
        help="fraction trimmed from each end for --strategy trimmed_mean",
    )
    p.add_argument("--selection", default=d.selection, help="random, resource or utility")
    p.add_argument(
        "--async", dest="async_mode", action="store_true", help="asynchronous FedBuff rounds"
    )
    p.add_argument(
        "--profiles", default=d.profiles, choices=PROFILE_MIXES, help="device heterogeneity mix"
    )
    p.add_argument(
        "--attackers", type=int, default=d.attackers, help="malicious devices (poisoning)"
    )
    p.add_argument(
        "--attack",
        default=d.attack,
        help="what the attackers do to their updates: scale:FACTOR, signflip or nan",
    )
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--epochs", type=int, default=d.epochs, help="local epochs per task")
    p.add_argument("--batch-size", type=int, default=d.batch_size)
    p.add_argument("--lr", type=float, default=d.lr)
    p.add_argument("--deadline-s", type=float, default=d.deadline_s, help="round deadline")
    p.add_argument("--target-accuracy", type=float, default=d.target_accuracy)
    p.add_argument(
        "--broker", default=None, help="use this broker (mqtt://host:port) instead of starting one"
    )
    p.add_argument(
        "--broker-kind",
        default=d.broker_kind,
        choices=BROKER_KINDS,
        help="private broker to start: mosquitto, embedded (amqtt, MQTT 3.1.1) or auto "
        "(mosquitto if installed, else embedded)",
    )
    p.add_argument("--workers", type=int, default=d.workers, help="device worker processes")
    p.add_argument(
        "--out", default=None, metavar="DIR", help="write metrics.json and curves.png to DIR"
    )
    p.add_argument("--quiet", action="store_true", help="no live progress, only the summary")


def config_from_args(args: argparse.Namespace) -> SimConfig:
    names = {f.name for f in dataclasses.fields(SimConfig)}
    return SimConfig(**{k: v for k, v in vars(args).items() if k in names})


def _prepare_out(out: str) -> bool:
    """Create ``--out DIR`` (or check it is a writable directory) before the run.

    Returns True when this call created it (so that a failed run can remove it again).
    """
    path = Path(out)
    if path.exists() and not path.is_dir():
        raise SimUsageError(f"--out {out}: exists and is not a directory")
    created = not path.exists()
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise SimUsageError(f"--out {out}: cannot create the directory ({exc.strerror})") from None
    if not os.access(path, os.W_OK | os.X_OK):
        raise SimUsageError(f"--out {out}: the directory is not writable")
    return created


def _write_outputs(
    out: Path, cfg: SimConfig, fleet: str, rounds: list[dict[str, Any]], totals: dict[str, Any]
) -> list[Path]:
    report.write_metrics(out / "metrics.json", {**cfg.to_json(), "fleet": fleet}, rounds, totals)
    written = [out / "metrics.json"]
    if rounds:
        report.plot_curves(out / "curves.png", {f"{cfg.codec}": rounds})
        written.append(out / "curves.png")
    return written


def main(args: argparse.Namespace) -> int:
    """``fedge sim``: 0 done, 1 the run failed, 2 a bad option or input, 128+N on signal N
    (130 Ctrl-C, 143 SIGTERM, 129 SIGHUP)."""
    from rich.console import Console

    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    cfg = config_from_args(args)
    console = Console()
    created_out = False
    try:
        with _InterruptOnSignals():  # a signal before run_sim is an interruption too
            _validate(cfg)
            if cfg.out:
                created_out = _prepare_out(cfg.out)
        result = run_sim(cfg, show_progress=not args.quiet)
    except SimError as exc:
        # One line (no wrapping at the terminal's width), on stderr as argparse's errors.
        Console(stderr=True).print(f"fedge sim: {exc}", style="red", soft_wrap=True, markup=False)
        error = str(exc).splitlines()[0]  # without the log tail that may follow
        _write_partial_outputs(console, cfg, exc.result, created_out, error=error)
        return exc.exit_code
    except KeyboardInterrupt as exc:
        signum = int(signal.SIGINT)
        partial: SimResult | None = None
        if isinstance(exc, SimInterrupted):
            signum, partial = exc.signum, exc.result
        what = (
            "interrupted"
            if signum == signal.SIGINT
            else f"stopped by {signal.Signals(signum).name}"
        )
        console.print(f"[yellow]fedge sim: {what}; everything it started is stopped[/yellow]")
        _write_partial_outputs(console, cfg, partial, created_out)
        return 128 + signum
    console.print(report.summary_table(result.totals, result.wall_s))
    if cfg.out:
        written = _write_outputs(Path(cfg.out), cfg, result.fleet, result.rounds, result.totals)
        console.print(f"wrote {' and '.join(map(str, written))}")
    return 0


def _write_partial_outputs(
    console: Console,
    cfg: SimConfig,
    partial: SimResult | None,
    created_out: bool,
    *,
    error: str | None = None,
) -> None:
    """After a run that stopped early, write ``--out`` for the rounds it completed.

    ``totals`` says ``"interrupted": true``, and for a failure also ``"error"`` (its first line).
    Without a completed round, a ``--out`` directory this run created is removed again.
    """
    if not cfg.out:
        return
    rounds = partial.rounds if partial is not None else []
    if partial is None or not rounds:
        if created_out:
            _remove_if_empty(Path(cfg.out))
        return
    totals = report.totals(rounds, cfg.target_accuracy)
    totals["interrupted"] = True
    if error is not None:
        totals["error"] = error
    written = _write_outputs(Path(cfg.out), cfg, partial.fleet, rounds, totals)
    console.print(
        f"wrote {' and '.join(map(str, written))} ({_plural(len(rounds), 'completed round')})"
    )


def _remove_if_empty(path: Path) -> None:
    with contextlib.suppress(OSError):
        path.rmdir()
