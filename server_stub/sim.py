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
import dataclasses
import json
import logging
import os
import queue
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
    from edge.embedded_broker import EmbeddedBroker
    from edge.mosquitto import MosquittoBroker

logger = logging.getLogger("fedge.sim")

PROFILE_MIXES = ("uniform", "mixed", "harsh")
BROKER_KINDS = ("auto", "mosquitto", "embedded")


class SimError(RuntimeError):
    """The simulation could not run (bad option, broker or worker failure)."""


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


def _prepare_data(
    cfg: SimConfig, workdir: Path, rng: np.random.Generator
) -> tuple[list[Path], Any, Any]:
    """Split the dataset, partition the training part over the devices, write each partition."""
    from edge import data as edata

    if cfg.dataset in edata.BUILTIN_DATASETS:
        dataset = edata.load_builtin(cfg.dataset)
    else:
        path = Path(cfg.dataset)
        if not path.exists():
            raise SimError(
                f"--dataset {cfg.dataset!r} is neither a bundled dataset "
                f"({', '.join(edata.BUILTIN_DATASETS)}) nor an existing file"
            )
        probe = np.load(path, allow_pickle=False) if path.suffix == ".npz" else None
        num_classes = int(np.max(probe["y"])) + 1 if probe is not None else 10
        dataset = edata.load_local_data(path, num_classes=num_classes)
    train, test = dataset.split(cfg.test_fraction, rng)
    scheme = edata.parse_partition(cfg.partition)
    parts = edata.partition(
        train.y,
        cfg.clients,
        scheme,
        rng,
        min_size=min(10, max(1, train.num_examples // cfg.clients)),
    )
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
            f"{self.cfg.partition}, codec {self.cfg.codec}, {self.cfg.strategy}"
        )
        return report.round_table(self.rounds[-30:], title=title)

    def status(self, text: str) -> None:
        if self.enabled and self._live is None:
            print(text, flush=True)

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


def _start_workers(
    cfg: SimConfig,
    workdir: Path,
    broker_url: str,
    data_paths: Sequence[Path],
    profiles: Sequence[dict[str, Any]],
    model_spec: dict[str, Any],
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
            "fleet": "sim",
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


def _check_workers(procs: Sequence[tuple[subprocess.Popen[bytes], Path]]) -> None:
    for proc, log in procs:
        if proc.poll() is not None and proc.returncode != 0:
            tail = log.read_text(errors="replace")[-3000:]
            raise SimError(f"a device worker exited with code {proc.returncode}:\n{tail}")


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


def run_sim(
    cfg: SimConfig,
    *,
    show_progress: bool = True,
    on_round: Callable[[dict[str, Any]], None] | None = None,
) -> SimResult:
    """Run one simulated federation to completion and return its records."""
    from server_stub.simwiring import build_coordinator, model_spec_for

    _validate(cfg)
    _raise_fd_limit(2 * cfg.clients + 256)
    rng = np.random.default_rng(cfg.seed)
    result = SimResult(cfg)
    started = time.monotonic()
    records: queue.Queue[dict[str, Any]] = queue.Queue()
    with (
        tempfile.TemporaryDirectory(prefix="fedge-sim-") as tmp,
        _Progress(cfg, show_progress) as progress,
    ):
        workdir = Path(tmp)
        progress.status(f"preparing {cfg.dataset} for {cfg.clients} devices ({cfg.partition})")
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
                progress.status(f"{description} on {broker_url}")
            else:
                broker_url = cfg.broker
            coordinator = build_coordinator(
                cfg, broker_url, workdir, train, test, model_spec, on_round=records.put
            )

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
            procs = _start_workers(cfg, workdir, broker_url, data_paths, profiles, model_spec)
            progress.status(
                f"{cfg.clients} devices in {len(procs)} worker processes; "
                f"{cfg.rounds} rounds of {cfg.clients_per_round}"
            )
            while not stop.is_set() or not records.empty():
                try:
                    record = records.get(timeout=0.2)
                except queue.Empty:
                    _check_workers(procs)
                    continue
                result.rounds.append(record)
                progress.add(record)
                if on_round is not None:
                    on_round(record)
            if failure:
                raise SimError(f"the coordinator failed: {failure[0]!r}") from failure[0]
        finally:
            stop.set()
            if coordinator_thread is not None:
                coordinator_thread.join(timeout=15)
            _stop_workers(procs)
            if broker is not None:
                broker.stop()
    result.wall_s = time.monotonic() - started
    result.totals = report.totals(result.rounds, cfg.target_accuracy)
    result.totals["wall_s"] = result.wall_s
    return result


def _start_broker(kind: str, workdir: Path) -> tuple[MosquittoBroker | EmbeddedBroker, str]:
    """Start the private broker of ``kind`` (``auto``: mosquitto if installed, else amqtt).

    Returns the started broker and a description of it for the progress output.
    """
    from edge.embedded_broker import EmbeddedBroker, EmbeddedBrokerError
    from edge.mosquitto import BrokerError, MosquittoBroker, find_mosquitto

    description = "mosquitto"
    if kind == "auto":
        try:
            find_mosquitto()
            kind = "mosquitto"
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
    if cfg.clients < 1:
        raise SimError("--clients must be at least 1")
    if not 1 <= cfg.clients_per_round <= cfg.clients:
        raise SimError(f"--clients-per-round must be between 1 and --clients ({cfg.clients})")
    if cfg.rounds < 1:
        raise SimError("--rounds must be at least 1")
    if cfg.profiles not in PROFILE_MIXES:
        raise SimError(f"--profiles must be one of {', '.join(PROFILE_MIXES)}")
    if cfg.trainer not in ("numpy", "litert"):
        raise SimError("--trainer must be numpy or litert")
    if cfg.broker_kind not in BROKER_KINDS:
        raise SimError(f"--broker-kind must be one of {', '.join(BROKER_KINDS)}")
    if not 0 <= cfg.attackers <= cfg.clients:
        raise SimError(f"--attackers must be between 0 and --clients ({cfg.clients})")
    from edge.attacks import parse_attack

    try:
        parse_attack(cfg.attack)
    except ValueError as exc:
        raise SimError(f"--attack: {exc}") from None
    if not cfg.clip_norm > 0:
        raise SimError("--clip-norm must be > 0")
    if not 0 <= cfg.trim_beta < 0.5:
        raise SimError("--trim-beta must be in [0, 0.5)")
    if cfg.broker is not None and cfg.broker_kind != "auto":
        raise SimError("--broker URL uses an existing broker; drop --broker-kind or --broker")
    if cfg.model.endswith(".tflite") and cfg.trainer != "litert":
        raise SimError("a .tflite model needs --trainer litert")
    from kernels.codec import parse_codec
    from kernels.errors import CodecError

    try:
        parse_codec(cfg.codec)
    except CodecError as exc:
        raise SimError(f"--codec: {exc}") from None


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


def main(args: argparse.Namespace) -> int:
    from rich.console import Console

    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    cfg = config_from_args(args)
    console = Console()
    try:
        result = run_sim(cfg, show_progress=not args.quiet)
    except SimError as exc:
        console.print(f"[red]fedge sim: {exc}[/red]")
        return 1
    except KeyboardInterrupt:
        console.print("[yellow]fedge sim: interrupted; everything it started is stopped[/yellow]")
        return 130
    console.print(report.summary_table(result.totals, result.wall_s))
    if cfg.out:
        out = Path(cfg.out)
        out.mkdir(parents=True, exist_ok=True)
        report.write_metrics(out / "metrics.json", cfg.to_json(), result.rounds, result.totals)
        report.plot_curves(out / "curves.png", {f"{cfg.codec}": result.rounds})
        console.print(f"wrote {out / 'metrics.json'} and {out / 'curves.png'}")
    return 0
