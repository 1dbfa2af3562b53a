"""Reusable pieces for reliability tests: real agents and a real coordinator over a real broker.

Everything here runs the production code paths (``edge.agent.AgentRunner`` on
``MqttTransport``, ``server_stub.coordinator.Coordinator`` in a thread or
``python -m server_stub --config`` in a subprocess) against a private mosquitto from the
``mosquitto`` / ``mosquitto_factory`` fixtures of ``tests/conftest.py``. Typical use::

    def test_something(mosquitto, tmp_path, fleet, coordinators):   # fixtures: conftest.py
        shards, test = digits_shards(4)
        for i, shard in enumerate(shards):
            fleet.start(f"pi-{i:02d}", shard, seed=i)                # real agents
        cfg = coordinator_config(mosquitto.url, tmp_path / "coord.db", rounds={"deadline_s": 5})
        coord = coordinators.thread(cfg, evaluate=evaluator(test))   # real coordinator, in-process
        coord.wait_rounds(3, timeout=60)
        coord.stop()
        audit = audit_store(tmp_path / "coord.db")                   # invariants checked

    proc = coordinators.process(cfg, tmp_path, env={"FEDGE_CRASH_AT": "after_send_tasks"})
    proc.wait(timeout=60)                                             # subprocess; SIGKILL-able

Rules: every wait is on a condition with a timeout (:func:`wait_for`), never a fixed sleep;
every agent, coordinator and subprocess started through :class:`AgentFleet` and
:class:`Coordinators` is stopped by the fixtures, even when a test fails.

Contents
--------
FLEET, SPEC              fleet name and the model (digits logreg, 650 parameters)
wait_for(cond, timeout, what)         poll a predicate; AssertionError naming ``what``
digits_shards(n)         iid shards of the digits train split + the held-out test split
evaluator(test)          accuracy/loss of flat weights (for the in-process coordinator)
accuracy_of(envelope, test)           accuracy of a stored model envelope
coordinator_config(url, db, **overrides)  a config dict; nested tables deep-merged
write_config(cfg, path)  the same as TOML for ``python -m server_stub --config``
AgentFleet               start / stop / crash (no DISCONNECT) real agents, each with a state dir
TrainingGate             hold trainings until the test allows them (``fleet.start(.., gate=g)``)
CoordinatorThread        the coordinator in a thread; ``records``, ``wait_rounds``, ``stop``
CoordinatorProcess       ``python -m server_stub`` as a subprocess; ``wait``, ``kill``, ``log``
Coordinators             factory of both that cleans up (the ``coordinators`` fixture)
audit_store(db)          checks: task ids unique, participants counted once, versions monotonic
"""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from edge.agent import (
    AgentHandle,
    AgentOptions,
    StatusRelay,
    connect_agent_transport,
    start_agent_thread,
)
from edge.data import Dataset, load_builtin, partition
from edge.modelio import unpack_model
from edge.mqtt_transport import MqttSettings, MqttTransport
from edge.state import AgentStore
from edge.telemetry import DeviceProfile, SimulatedTelemetry
from edge.training import ModelSpec, NumpyTrainer
from edge.wire import GlobalModel
from server_stub.config import config_from_dict
from server_stub.coordinator import Coordinator, mqtt_transport_for
from server_stub.store import Store

log = logging.getLogger(__name__)

FLEET = "rel"
"""Fleet name of every reliability test (topics ``fl/v1/rel/...``)."""
SPEC = ModelSpec("logreg", input_dim=64, num_classes=10)
"""The model the agents train; :func:`coordinator_config` describes the same one."""
REPO = Path(__file__).resolve().parents[2]


# ------------------------------------------------------------------------------- waiting


def wait_for(cond: Callable[[], object], timeout: float, what: str, poll_s: float = 0.02) -> None:
    """Poll ``cond`` until it is truthy; raise ``AssertionError(what)`` after ``timeout`` s."""
    deadline = time.monotonic() + timeout
    pause = threading.Event()
    while True:
        if cond():
            return
        if time.monotonic() >= deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for: {what}")
        pause.wait(poll_s)


# ------------------------------------------------------------------------------- data, model


def digits_shards(n: int, *, seed: int = 0) -> tuple[list[Dataset], Dataset]:
    """``n`` iid shards of 75 % of the digits data set, and the other 25 % for testing."""
    ds = load_builtin("digits")
    train, test = ds.split(0.25, np.random.default_rng(seed))
    parts = partition(train.y, n, "iid", np.random.default_rng(seed + 1))
    return [train.subset(p) for p in parts], test


def _accuracy(weights: Mapping[str, np.ndarray], test: Dataset, spec: ModelSpec) -> float:
    trainer = NumpyTrainer(spec)
    trainer.set_weights({k: np.asarray(v, np.float32) for k, v in weights.items()})
    return float(trainer.evaluate(test.x, test.y).accuracy)


def evaluator(
    test: Dataset, spec: ModelSpec = SPEC
) -> Callable[[dict[str, np.ndarray]], dict[str, float]]:
    """The ``evaluate`` hook of an in-process coordinator (held-out accuracy and loss)."""
    trainer = NumpyTrainer(spec)

    def evaluate(weights: dict[str, np.ndarray]) -> dict[str, float]:
        trainer.set_weights({k: np.asarray(v, np.float32) for k, v in weights.items()})
        res = trainer.evaluate(test.x, test.y)
        return {"accuracy": float(res.accuracy), "loss": float(res.loss)}

    return evaluate


def accuracy_of(envelope: bytes, test: Dataset, spec: ModelSpec = SPEC) -> float:
    """Held-out accuracy of a model envelope (e.g. ``Store.latest_model().envelope``)."""
    weights = unpack_model(GlobalModel.from_bytes(envelope))
    return _accuracy({k: v for k, v in weights.items() if not k.startswith("aux/")}, test, spec)


# ------------------------------------------------------------------------------- config


def _merge(base: dict[str, Any], over: Mapping[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in over.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = value
    return out


def coordinator_config(
    url: str, db: str | os.PathLike[str], *, client_id: str = "coord-rel", **overrides: Any
) -> dict[str, Any]:
    """A coordinator config (the TOML document as a dict) for :data:`SPEC` on digits.

    Defaults: K = 3 of at least 3 devices, no over-selection, 10 s deadline, quorum 2,
    fedavg (1 epoch, batch 16, lr 0.1), int8 uplink, 0.05 s ticks. ``overrides`` are
    deep-merged, e.g. ``rounds={"deadline_s": 3}`` or ``rounds_total=4``.
    """
    cfg: dict[str, Any] = {
        "fleet": FLEET,
        "seed": 0,
        "tick_s": 0.05,
        "startup_grace_s": 0.3,
        "broker": {"url": url, "client_id": client_id, "session_expiry_s": 600},
        "model": {"kind": SPEC.kind, "input_dim": SPEC.input_dim, "hidden": list(SPEC.hidden),
                  "num_classes": SPEC.num_classes},
        "strategy": {"name": "fedavg", "epochs": 1, "batch_size": 16, "lr": 0.1},
        "rounds": {"clients_per_round": 3, "min_fraction": 0.5, "deadline_s": 10.0,
                   "over_selection": 1.0},
        "uplink": {"codec": "int8"},
        "validation": {"max_update_norm": 100.0},
        "eligibility": {"min_battery_percent": 20.0},
        "state": {"db": str(db)},
    }  # fmt: skip
    return _merge(cfg, overrides)


def _toml(obj: Mapping[str, Any], prefix: str = "") -> str:
    lines: list[str] = []
    tables: list[tuple[str, Mapping[str, Any]]] = []
    for key, value in obj.items():
        if isinstance(value, Mapping):
            tables.append((f"{prefix}{key}", value))
        elif value is not None:
            lines.append(f"{key} = {json.dumps(value)}")
    out = "\n".join(lines) + "\n"
    for name, table in tables:
        out += f"\n[{name}]\n" + _toml(table, f"{name}.")
    return out


def write_config(cfg: Mapping[str, Any], path: Path) -> Path:
    """Write ``cfg`` as TOML (scalars, lists, nested tables) and return ``path``."""
    path.write_text(_toml(cfg))
    return path


# ------------------------------------------------------------------------------- agents


class TrainingGate:
    """Hold an agent's training until the test allows it: deterministic "mid-training" moments.

    ``allow(n)`` lets ``n`` more trainings start; :attr:`waiting` counts agents blocked at the
    gate right now (wait for it to know a task arrived and training has begun). A stopped or
    crashed agent leaves the gate at once (its trainer then aborts as on SIGTERM).
    """

    def __init__(self, permits: int = 0) -> None:
        self._cond = threading.Condition()
        self._permits = permits
        self.waiting = 0
        self.passed = 0

    def allow(self, n: int = 1) -> None:
        with self._cond:
            self._permits += n
            self._cond.notify_all()

    def open(self) -> None:
        """Let every training through from now on."""
        self.allow(1 << 30)

    def enter(self, should_stop: Callable[[], bool] | None) -> None:
        with self._cond:
            self.waiting += 1
            try:
                while self._permits <= 0:
                    if should_stop is not None and should_stop():
                        return
                    self._cond.wait(0.05)
                self._permits -= 1
                self.passed += 1
            finally:
                self.waiting -= 1


class GatedTrainer(NumpyTrainer):
    """``NumpyTrainer`` that waits at a :class:`TrainingGate` before each ``fit``."""

    def __init__(self, spec: ModelSpec, gate: TrainingGate) -> None:
        super().__init__(spec)
        self.gate = gate

    def fit(self, *args: Any, **kwargs: Any) -> Any:
        self.gate.enter(kwargs.get("should_stop"))
        return super().fit(*args, **kwargs)


@dataclass(slots=True)
class _Agent:
    handle: AgentHandle
    transport: MqttTransport
    store: AgentStore


class AgentFleet:
    """Real agents (``edge.agent``), one MQTT connection and state directory each.

    Parameters
    ----------
    url
        Broker URL (``mosquitto.url``).
    workdir
        State directories go to ``workdir/{cid}`` and survive :meth:`crash`/:meth:`stop`,
        so a restarted agent finds its model cache and error-feedback residual.
    fleet, spec
        Topic fleet and model.
    persistent_session
        Agents connect with Clean Start 0 and a session expiry (PROTOCOL.md §1), so tasks
        sent while they are away are queued by the broker.
    """

    def __init__(
        self,
        url: str,
        workdir: Path,
        *,
        fleet: str = FLEET,
        spec: ModelSpec = SPEC,
        persistent_session: bool = True,
    ) -> None:
        self.url = url
        self.workdir = workdir
        self.fleet = fleet
        self.spec = spec
        self.persistent_session = persistent_session
        self.agents: dict[str, _Agent] = {}

    def settings(self, cid: str, **overrides: Any) -> MqttSettings:
        """The agent's MQTT settings: fast reconnects (0.1-1 s) and a short keepalive."""
        base: dict[str, Any] = {
            "client_id": cid,
            "keepalive_s": 5,
            "reconnect_min_delay_s": 0.1,
            "reconnect_max_delay_s": 1.0,
        }
        if self.persistent_session:
            base.update(clean_start=False, session_expiry_s=600)
        base.update(overrides)
        return MqttSettings.from_url(self.url, **base)

    def start(
        self,
        cid: str,
        data: Dataset,
        *,
        seed: int = 0,
        profile: DeviceProfile | None = None,
        mqtt: Mapping[str, Any] | None = None,
        gate: TrainingGate | None = None,
        last_will: bool = True,
        **options: Any,
    ) -> AgentHandle:
        """Start (or restart, after :meth:`stop`/:meth:`crash`) agent ``cid`` on ``data``.

        ``options`` go to :class:`edge.agent.AgentOptions` (default ``poll_s=0.05``);
        ``mqtt`` overrides :meth:`settings`; ``profile`` defaults to mains power; ``gate``
        holds each training until the test allows it. ``last_will=False`` connects without a
        Last Will: a :meth:`crash` then looks like a reboot the broker has not noticed yet
        (nothing says the device went offline before its next online status).
        """
        old = self.agents.get(cid)
        if old is not None and old.handle.thread.is_alive():
            raise RuntimeError(f"agent {cid} is running; stop or crash it first")
        settings = self.settings(cid, **(mqtt or {}))
        if last_will:
            transport, relay = connect_agent_transport(settings, self.fleet, cid)
        else:
            relay = StatusRelay()
            transport = MqttTransport(settings, on_connect_publish=relay)
        assert isinstance(transport, MqttTransport)
        store = AgentStore(self.workdir / cid, fsync=False)
        opts = AgentOptions(self.fleet, cid, **{"poll_s": 0.05, **options})
        handle = start_agent_thread(
            transport,
            opts,
            trainer=NumpyTrainer(self.spec) if gate is None else GatedTrainer(self.spec, gate),
            dataset=data,
            telemetry=SimulatedTelemetry(profile or DeviceProfile(battery_percent=None)),
            store=store,
            rng=np.random.default_rng(seed),
            relay=relay,
        )
        self.agents[cid] = _Agent(handle, transport, store)
        return handle

    def handle(self, cid: str) -> AgentHandle:
        return self.agents[cid].handle

    def transport(self, cid: str) -> MqttTransport:
        return self.agents[cid].transport

    def store(self, cid: str) -> AgentStore:
        return self.agents[cid].store

    def state_dir(self, cid: str) -> Path:
        return self.workdir / cid

    @property
    def cids(self) -> list[str]:
        return sorted(self.agents)

    def stop(self, cids: Iterable[str] | None = None, timeout: float = 10.0) -> None:
        """Clean stop: offline status, DISCONNECT. All are told first, then joined."""
        chosen = list(self.agents) if cids is None else list(cids)
        for cid in chosen:
            self.agents[cid].handle.request_stop()
        for cid in chosen:
            if not self.agents[cid].handle.join(timeout):
                raise AssertionError(f"agent {cid} did not stop within {timeout} s")

    def crash(self, cids: Iterable[str], timeout: float = 10.0) -> None:
        """Kill like a power cut: no DISCONNECT (Last Will fires), no offline status sent.

        The agent thread ends at its next batch or message; nothing it had not written
        to its state directory survives.
        """
        chosen = list(cids)
        for cid in chosen:
            agent = self.agents[cid]
            agent.transport.abort()
            agent.handle.request_stop()
        for cid in chosen:
            if not self.agents[cid].handle.join(timeout):
                raise AssertionError(f"crashed agent {cid} thread did not end within {timeout} s")

    def close(self) -> None:
        """Stop every agent still running (fixture teardown)."""
        alive = [c for c, a in self.agents.items() if a.handle.thread.is_alive()]
        for cid in alive:
            self.agents[cid].handle.request_stop()
        for cid in alive:
            self.agents[cid].handle.join(10.0)
        for agent in self.agents.values():
            agent.transport.close()


# ------------------------------------------------------------------------------- coordinator


class CoordinatorThread:
    """The real :class:`~server_stub.coordinator.Coordinator` running in a thread.

    Built from a config dict exactly as ``fedge coordinator`` builds it (persistent
    MQTT session via :func:`~server_stub.coordinator.mqtt_transport_for`, SQLite store).
    ``records`` collects the round records (``on_round``).
    """

    def __init__(
        self,
        cfg: Mapping[str, Any],
        *,
        evaluate: Callable[[dict[str, np.ndarray]], Mapping[str, float]] | None = None,
        max_rounds: int | None = None,
    ) -> None:
        self.config = config_from_dict(cfg)
        layout, weights = self.config.layout_and_weights()
        self.records: list[dict[str, Any]] = []
        self.store = Store(self.config.state_db)
        self.coordinator = Coordinator(
            self.config,
            mqtt_transport_for(self.config),
            self.store,
            layout=layout,
            initial_weights=weights,
            evaluate=evaluate,
            on_round=self.records.append,
        )
        self.stop_event = threading.Event()
        self.error: BaseException | None = None
        self.thread = threading.Thread(
            target=self._main, args=(max_rounds,), name="coordinator", daemon=True
        )
        self._store_closed = False

    def _main(self, max_rounds: int | None) -> None:
        try:
            self.coordinator.run(self.stop_event, max_rounds)
        except BaseException as exc:  # reported by wait_rounds/stop
            log.exception("coordinator crashed")
            self.error = exc

    def start(self) -> CoordinatorThread:
        self.thread.start()
        return self

    @property
    def transport(self) -> MqttTransport:
        t = self.coordinator.transport
        assert isinstance(t, MqttTransport)
        return t

    def wait_rounds(self, n: int, timeout: float) -> list[dict[str, Any]]:
        """Wait until ``n`` rounds finished (either outcome); return their records."""
        wait_for(
            lambda: len(self.records) >= n or self.error is not None or not self.thread.is_alive(),
            timeout,
            f"{n} round(s) to finish (have {len(self.records)})",
        )
        if self.error is not None:
            raise AssertionError(f"coordinator crashed: {self.error!r}") from self.error
        if len(self.records) < n:
            raise AssertionError(f"coordinator stopped after {len(self.records)} of {n} rounds")
        return list(self.records[:n])

    def wait_stopped(self, timeout: float) -> None:
        """Wait for the thread to end by itself (``max_rounds`` reached)."""
        self.thread.join(timeout)
        if self.thread.is_alive():
            raise AssertionError(f"coordinator still running after {timeout} s")
        if self.error is not None:
            raise AssertionError(f"coordinator crashed: {self.error!r}") from self.error

    def stop(self, timeout: float = 15.0) -> None:
        """Stop the loop (it closes its transport) and close the store; idempotent."""
        self.stop_event.set()
        if self.thread.is_alive():
            self.thread.join(timeout)
        if not self._store_closed and not self.thread.is_alive():
            self.store.close()
            self._store_closed = True


class CoordinatorProcess:
    """``python -m server_stub --config FILE`` as a subprocess (for SIGKILL tests).

    Its log (level INFO) goes to ``workdir/coordinator-{n}.log``; read it with :attr:`log`.
    ``env`` adds environment variables, e.g. ``{"FEDGE_CRASH_AT": "after_checkpoint"}``.
    """

    def __init__(
        self,
        config_path: Path,
        workdir: Path,
        *,
        env: Mapping[str, str] | None = None,
        index: int = 0,
    ) -> None:
        self.log_path = workdir / f"coordinator-{index}.log"
        full_env = {k: v for k, v in os.environ.items() if not k.startswith("FEDGE_CRASH")}
        full_env["PYTHONPATH"] = str(REPO)
        full_env.update(env or {})
        self._log = self.log_path.open("wb")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "server_stub", "--config", str(config_path)],
            env=full_env,
            cwd=str(workdir),
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=subprocess.STDOUT,
        )

    @property
    def log(self) -> str:
        self._log.flush()
        return self.log_path.read_text(errors="replace")

    @property
    def running(self) -> bool:
        return self.proc.poll() is None

    def wait(self, timeout: float) -> int:
        """Wait for the exit; return the code (``-9`` after SIGKILL)."""
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            raise AssertionError(
                f"coordinator process still running after {timeout} s:\n{self.log[-4000:]}"
            ) from None

    def kill(self) -> None:
        """SIGKILL now (no-op once it exited)."""
        if self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGKILL)
        self.proc.wait(10)

    def close(self) -> None:
        self.kill()
        self._log.close()


@dataclass(slots=True)
class Coordinators:
    """Starts coordinators and stops every one of them at teardown (``coordinators`` fixture)."""

    workdir: Path
    started: list[CoordinatorThread | CoordinatorProcess] = field(default_factory=list)

    def thread(
        self,
        cfg: Mapping[str, Any],
        *,
        evaluate: Callable[[dict[str, np.ndarray]], Mapping[str, float]] | None = None,
        max_rounds: int | None = None,
    ) -> CoordinatorThread:
        """Start an in-process coordinator."""
        c = CoordinatorThread(cfg, evaluate=evaluate, max_rounds=max_rounds)
        self.started.append(c)
        return c.start()

    def process(
        self, cfg: Mapping[str, Any], *, env: Mapping[str, str] | None = None
    ) -> CoordinatorProcess:
        """Start ``python -m server_stub`` on ``cfg`` (written to ``workdir/coordinator.toml``)."""
        path = write_config(cfg, self.workdir / "coordinator.toml")
        c = CoordinatorProcess(path, self.workdir, env=env, index=len(self.started))
        self.started.append(c)
        return c

    def close(self) -> None:
        for c in reversed(self.started):
            if isinstance(c, CoordinatorThread):
                c.stop()
            else:
                c.close()


# ------------------------------------------------------------------------------- store audit


@dataclass(frozen=True, slots=True)
class StoreAudit:
    """What a coordinator's SQLite store says after a run (see :func:`audit_store`)."""

    rounds: list[dict[str, Any]]
    """Round records (round 0, the initial version, excluded), oldest first."""
    accepted: list[tuple[str, int, str]]
    """``(task_id, round_no, cid)`` of every update counted."""
    model_version: int
    model_envelope: bytes

    @property
    def aggregated(self) -> list[dict[str, Any]]:
        return [r for r in self.rounds if r["outcome"] == "aggregated"]


def audit_store(db: str | os.PathLike[str]) -> StoreAudit:
    """Read the store and assert the invariants that must survive any fault.

    - every counted task id is unique (no update counted twice);
    - each aggregated round counted exactly its ``participants`` tasks, an abandoned round none,
      and every counted task belongs to the round it was counted in (ids are ``r{round}-..``);
    - model versions of the round log never go backwards and rise by one per aggregation;
    - the newest stored model's version equals the number of aggregated rounds.
    """
    with Store(Path(db), read_only=True) as store:
        rounds = [r for r in store.rounds() if r["round"] > 0]
        accepted = store.accepted_tasks()
        latest = store.latest_model()
    assert latest is not None, "the store holds no model"
    ids = [t for t, _r, _c in accepted]
    assert len(ids) == len(set(ids)), f"a task was counted twice: {sorted(ids)}"
    for task_id, round_no, _cid in accepted:
        assert task_id.startswith(f"r{round_no}-"), f"{task_id} counted in round {round_no}"
    for r in rounds:
        counted = sum(1 for _t, rn, _c in accepted if rn == r["round"])
        expected = r["participants"] if r["outcome"] == "aggregated" else 0
        assert counted == expected, f"round {r['round']}: {counted} counted, record says {r}"
    versions = [r["model_version"] for r in rounds]
    assert versions == sorted(versions), f"model version went backwards: {versions}"
    agg = [r["model_version"] for r in rounds if r["outcome"] == "aggregated"]
    assert agg == list(range(1, len(agg) + 1)), f"versions of aggregations: {agg}"
    assert latest.version == len(agg), f"latest model {latest.version}, {len(agg)} aggregations"
    return StoreAudit(rounds, accepted, latest.version, latest.envelope)


__all__ = [
    "FLEET",
    "SPEC",
    "AgentFleet",
    "CoordinatorProcess",
    "CoordinatorThread",
    "Coordinators",
    "GatedTrainer",
    "StoreAudit",
    "TrainingGate",
    "accuracy_of",
    "audit_store",
    "coordinator_config",
    "digits_shards",
    "evaluator",
    "wait_for",
    "write_config",
]
