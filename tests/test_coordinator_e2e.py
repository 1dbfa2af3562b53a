"""End-to-end: the coordinator against a real mosquitto, devices played by threads.

The devices here speak the wire protocol directly (status with Last Will, tasks, retained
model chunks, chunked update envelopes) and train with ``edge.training``; they are the
simplest honest device, not the production agent.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from edge.chunking import Reassembler
from edge.data import Dataset, load_builtin, partition
from edge.modelio import ModelLayout, encode_update, unpack_model
from edge.mqtt_transport import MqttSettings, MqttTransport
from edge.training import ModelSpec, NumpyTrainer, init_weights
from edge.transport import Message, Transport, TransportClosed, publish_chunked
from edge.wire import (
    BatteryInfo,
    Caps,
    CpuInfo,
    GlobalModel,
    MemInfo,
    ModelManifest,
    ModelUpdate,
    NetInfo,
    NetKind,
    Status,
    TopicKind,
    Topics,
    TrainInfo,
    TrainTask,
)
from server_stub.config import config_from_dict
from server_stub.coordinator import Coordinator
from server_stub.store import Store
from tests.broker import MosquittoBroker

pytestmark = [pytest.mark.broker]

FLEET = "e2e"
SPEC = ModelSpec("mlp", input_dim=64, num_classes=10, hidden=(32,))


def status(num_examples: int, *, battery: float | None = None) -> Status:
    return Status(
        online=True,
        ts=0.0,
        battery=None if battery is None else BatteryInfo(battery, False),
        cpu=CpuInfo(0.1, 2, None),
        mem=MemInfo(512.0),
        net=NetInfo(NetKind.ETHERNET, False, 1.0),
        train=TrainInfo(num_examples, 2000.0),
        caps=Caps(("numpy",), ("raw", "block_i8", "zstd", "pipeline"), 0),
        agent="fedge-test/0",
        state="idle",
    )


class Device(threading.Thread):
    """A device that trains on its shard whenever it gets a task.

    ``hang`` makes it take tasks and never answer (killed mid-round): it is then killed with
    :meth:`kill_connection`, which makes the broker publish its Last Will.
    """

    def __init__(
        self,
        url: str,
        cid: str,
        data: Dataset,
        *,
        seed: int,
        hang: bool = False,
        on_task: Callable[[Device], None] | None = None,
    ) -> None:
        super().__init__(name=f"device-{cid}", daemon=True)
        self.cid = cid
        self.data = data
        self.topics = Topics(FLEET)
        self.hang = hang
        self.on_task = on_task
        self.rng = np.random.default_rng(seed)
        self.stop = threading.Event()
        self.tasks: list[TrainTask] = []
        self.sent = 0
        host, port = url.removeprefix("mqtt://").split(":")
        will = Message(self.topics.status(cid), Status.offline_will().to_bytes(), True, 1)
        self.transport: Transport = MqttTransport(
            MqttSettings(host=host, port=int(port), client_id=cid, keepalive_s=2), will
        )
        self.transport.subscribe(self.topics.task(cid))
        self.transport.subscribe(self.topics.model_all())
        self.transport.publish(
            self.topics.status(cid), status(data.num_examples).to_bytes(), retain=True
        )
        self.models: dict[int, GlobalModel] = {}
        self._manifest: ModelManifest | None = None
        self._chunks = Reassembler(64 << 20, 60.0)
        self._waiting: list[TrainTask] = []

    def kill_connection(self) -> None:
        """Die without a DISCONNECT: the broker publishes the Last Will."""
        assert isinstance(self.transport, MqttTransport)
        self.stop.set()
        self.transport.simulate_connection_loss()
        self.transport._client.loop_stop()  # keep it from reconnecting
        self.transport._closing.set()

    def run(self) -> None:
        while not self.stop.is_set():
            try:
                msg = self.transport.receive(0.1)
            except TransportClosed:
                return
            if msg is None:
                continue
            kind, _ = self.topics.parse(msg.topic)
            if kind is TopicKind.MODEL_MANIFEST:
                self._manifest = ModelManifest.from_bytes(msg.payload)
            elif kind is TopicKind.MODEL_CHUNK and msg.payload:
                data = self._chunks.feed("model", msg.payload, 0.0)
                if data is not None:
                    model = GlobalModel.from_bytes(data)
                    self.models[model.model_version] = model
            elif kind is TopicKind.TASK:
                task = TrainTask.from_bytes(msg.payload)
                self.tasks.append(task)
                if self.on_task is not None:
                    self.on_task(self)
                if not self.hang:
                    self._waiting.append(task)
            for task in list(self._waiting):
                if task.model_version in self.models:
                    self._waiting.remove(task)
                    self._train(task)

    def _train(self, task: TrainTask) -> None:
        weights = unpack_model(self.models[task.model_version])
        trainer = NumpyTrainer(SPEC)
        trainer.set_weights(weights)
        max_steps = task.train.extra.get("max_steps")
        fit = trainer.fit(
            self.data.x,
            self.data.y,
            epochs=task.train.epochs,
            batch_size=task.train.batch_size,
            lr=task.train.lr,
            rng=self.rng,
            max_steps=None if max_steps is None else int(max_steps),
        )
        new = trainer.get_weights()
        delta = {k: new[k] - weights[k] for k in new}
        publish_update(
            self.transport, self.cid, task, delta, num_examples=fit.num_examples, loss=fit.loss
        )
        self.sent += 1

    def close(self) -> None:
        self.stop.set()
        self.join(5.0)
        self.transport.close()


def publish_update(
    transport: Transport,
    cid: str,
    task: TrainTask,
    delta: Mapping[str, np.ndarray],
    *,
    num_examples: int,
    loss: float | None = None,
    key: bytes | None = None,
    fleet: str = FLEET,
) -> None:
    """Publish ``cid``'s update of ``task``, as a device does: ``delta`` encoded with the
    task's codec, chunked on the device's update topic (signed when ``key`` is given)."""
    specs, payloads = encode_update(delta, task.uplink_codec)
    update = ModelUpdate(
        task_id=task.task_id,
        round_no=task.round_no,
        model_version=task.model_version,
        cid=cid,
        num_examples=num_examples,
        tensors=specs,
        payloads=payloads,
        metrics={} if loss is None else {"loss": loss},
        nonce=task.nonce,
    )
    publish_chunked(transport, Topics(fleet).update(cid), update.to_bytes(key), chunk_size=16384)


def shards(n: int) -> tuple[list[Dataset], Dataset]:
    ds = load_builtin("digits")
    train, test = ds.split(0.25, np.random.default_rng(0))
    parts = partition(train.y, n, "iid", np.random.default_rng(1))
    return [train.subset(p) for p in parts], test


def make_config(url: str, db: Path, **rounds: Any) -> dict[str, Any]:
    return {
        "fleet": FLEET,
        "seed": 0,
        "tick_s": 0.05,
        "startup_grace_s": 0.3,
        "broker": {"url": url, "client_id": "coord-e2e"},
        "model": {"kind": "mlp", "input_dim": 64, "hidden": [32], "num_classes": 10},
        "strategy": {"name": "fedavg", "epochs": 2, "batch_size": 16, "lr": 0.1},
        "rounds": {
            "clients_per_round": 3,
            "min_fraction": 0.5,
            "deadline_s": 30.0,
            "over_selection": 1.0,
            **rounds,
        },
        "uplink": {"codec": "int8"},
        "validation": {"max_update_norm": 100.0},
        "eligibility": {"min_battery_percent": 20.0},
        "state": {"db": str(db)},
    }


def evaluator(test: Dataset) -> Callable[[dict[str, np.ndarray]], dict[str, float]]:
    def evaluate(weights: dict[str, np.ndarray]) -> dict[str, float]:
        trainer = NumpyTrainer(SPEC)
        trainer.set_weights(weights)
        res = trainer.evaluate(test.x, test.y)
        return {"accuracy": res.accuracy, "loss": res.loss}

    return evaluate


@pytest.fixture
def devices() -> Iterator[list[Device]]:
    started: list[Device] = []
    yield started
    for d in started:
        d.close()


def start_devices(url: str, data: list[Dataset], started: list[Device], **kw: Any) -> list[Device]:
    out = []
    for i, part in enumerate(data):
        d = Device(url, f"pi-{i:02d}", part, seed=i, **kw)
        d.start()
        started.append(d)
        out.append(d)
    return out


def run_coordinator(
    url: str, tmp_path: Path, rounds: int, test: Dataset, **round_settings: Any
) -> tuple[list[dict[str, Any]], Store]:
    # Prepare
    config = config_from_dict(make_config(url, tmp_path / "state.db", **round_settings))
    layout = ModelLayout.of(init_weights(SPEC, np.random.default_rng(0)))
    host, port = url.removeprefix("mqtt://").split(":")
    transport = MqttTransport(MqttSettings(host=host, port=int(port), client_id="coord-e2e"))
    store = Store(tmp_path / "state.db")
    records: list[dict[str, Any]] = []
    coordinator = Coordinator(
        config,
        transport,
        store,
        layout=layout,
        initial_weights=init_weights(SPEC, np.random.default_rng(0)),
        evaluate=evaluator(test),
        on_round=records.append,
    )
    # Execute
    coordinator.run(threading.Event(), max_rounds=rounds)
    return records, store


def test_rounds_complete_and_accuracy_rises(
    mosquitto: MosquittoBroker, tmp_path: Path, devices: list[Device]
) -> None:
    # Prepare
    data, test = shards(4)
    start_devices(mosquitto.url, data, devices)
    # Execute
    records, store = run_coordinator(mosquitto.url, tmp_path, 5, test)
    # Assert
    assert [r["outcome"] for r in records] == ["aggregated"] * 5
    assert [r["model_version"] for r in records] == [1, 2, 3, 4, 5]
    assert all(r["participants"] == 3 for r in records)
    assert records[-1]["accuracy"] > records[0]["accuracy"]
    assert records[-1]["accuracy"] > 0.6
    assert all(r["bytes_up"] > 0 and r["bytes_down"] > 0 for r in records)
    ids = [t for t, _r, _c in store.accepted_tasks()]
    assert len(ids) == len(set(ids)) == 15
    store.close()


def test_device_killed_mid_round_is_replaced(
    mosquitto: MosquittoBroker, tmp_path: Path, devices: list[Device]
) -> None:
    # Prepare: three devices, K=3, so all are selected. The victim takes its task, a spare
    # device comes online, and the victim dies without a DISCONNECT. The deadline is 300 s,
    # so the round can finish only if the Last Will drops the victim and the spare replaces it.
    data, test = shards(4)

    def spare_then_die(device: Device) -> None:
        def act() -> None:
            spare = Device(mosquitto.url, "pi-spare", data[3], seed=3)
            spare.start()
            devices.append(spare)
            device.kill_connection()

        threading.Thread(target=act, daemon=True).start()

    victim = Device(mosquitto.url, "pi-00", data[0], seed=0, hang=True, on_task=spare_then_die)
    victim.start()
    devices.append(victim)
    for i in (1, 2):
        d = Device(mosquitto.url, f"pi-{i:02d}", data[i], seed=i)
        d.start()
        devices.append(d)
    # Execute
    records, store = run_coordinator(
        mosquitto.url, tmp_path, 1, test, deadline_s=300.0, clients_per_round=3
    )
    # Assert
    assert records[0]["outcome"] == "aggregated"
    assert records[0]["participants"] == 3
    assert records[0]["dropped"] == 1
    assert records[0]["replaced"] == 1
    assert {c for _t, _r, c in store.accepted_tasks()} == {"pi-01", "pi-02", "pi-spare"}
    store.close()


def test_sigkill_mid_round_resumes_and_counts_each_update_once(
    mosquitto: MosquittoBroker, tmp_path: Path, devices: list[Device]
) -> None:
    # Prepare
    data, _test = shards(4)
    start_devices(mosquitto.url, data, devices)
    cfg = make_config(mosquitto.url, tmp_path / "state.db", deadline_s=4.0)
    cfg["rounds_total"] = 4
    cfg_path = tmp_path / "coordinator.toml"
    cfg_path.write_text(_toml(cfg))
    killed = threading.Event()
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[1]))
    cmd = [sys.executable, "-m", "server_stub", "--config", str(cfg_path)]

    def kill_once(device: Device) -> None:
        # Runs in the device thread before it trains: when the second task of round 2
        # arrives, round 2 is open (its tasks are in the store) and cannot have finished.
        if sum(len(d.tasks) for d in devices) >= 5 and not killed.is_set():
            killed.set()
            os.kill(proc.pid, signal.SIGKILL)

    for d in devices:
        d.on_task = kill_once
    # Execute
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        proc.wait(60)
        assert killed.is_set(), proc.stderr.read().decode() if proc.stderr else ""
        proc2 = subprocess.run(cmd, env=env, capture_output=True, timeout=90, check=False)
        assert proc2.returncode == 0, proc2.stderr.decode()[-3000:]
        assert b"resuming open round 2" in proc2.stderr
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait()
        if proc.stderr:
            proc.stderr.close()
    # Assert
    with Store(tmp_path / "state.db") as store:
        rounds = [r for r in store.rounds() if r["round"] > 0]
        accepted = store.accepted_tasks()
        model = store.latest_model()
    assert len(rounds) >= 4
    ids = [t for t, _r, _c in accepted]
    assert len(ids) == len(set(ids))
    for r in rounds:
        counted = sum(1 for _t, rn, _c in accepted if rn == r["round"])
        assert counted == (r["participants"] if r["outcome"] == "aggregated" else 0)
    versions = [r["model_version"] for r in rounds]
    assert versions == sorted(versions)
    assert model is not None and model.version == sum(
        1 for r in rounds if r["outcome"] == "aggregated"
    )


def _toml(obj: dict[str, Any], prefix: str = "") -> str:
    """A tiny TOML writer for the test's config (scalars, lists, nested tables)."""
    lines: list[str] = []
    tables: list[tuple[str, dict[str, Any]]] = []
    for key, value in obj.items():
        if isinstance(value, dict):
            tables.append((f"{prefix}{key}", value))
        else:
            lines.append(f"{key} = {json.dumps(value)}")
    out = "\n".join(lines) + "\n"
    for name, table in tables:
        out += f"\n[{name}]\n" + _toml(table, f"{name}.")
    return out
