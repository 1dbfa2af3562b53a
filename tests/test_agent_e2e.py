"""The agent against a real mosquitto: a thread plays the coordinator (retained model + task)."""

from __future__ import annotations

import hashlib
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from edge.agent import AgentOptions, AgentState, connect_agent_transport, start_agent_thread
from edge.chunking import Reassembler, split
from edge.data import load_builtin
from edge.modelio import ModelLayout, decode_update, pack_model
from edge.mqtt_transport import MqttSettings, connect_url
from edge.state import AgentStore
from edge.telemetry import DeviceProfile, SimulatedTelemetry
from edge.training import ModelSpec, NumpyTrainer, init_weights, shapes
from edge.wire import ModelManifest, ModelUpdate, Status, Topics, TrainParams, TrainTask
from tests.broker import MosquittoBroker

pytestmark = pytest.mark.broker

FLEET, CID = "e2e", "pi-07"
KEY = bytes(range(32))
SPEC = ModelSpec("mlp", input_dim=64, num_classes=10, hidden=(16,))
INT8 = {"id": "pipeline", "stages": [{"id": "block_i8"}, {"id": "zstd", "level": 1}]}


class Coordinator:
    def __init__(self, url: str) -> None:
        self.t = connect_url(url, client_id="coordinator")
        self.topics = Topics(FLEET)
        self.t.subscribe(self.topics.all_status())
        self.t.subscribe(self.topics.all_updates())

    def publish_model(self, version: int, *, corrupt: bool = False) -> None:
        weights = init_weights(SPEC, np.random.default_rng(version))
        envelope = pack_model(weights, model_version=version, round_no=version).to_bytes()
        sent = bytearray(envelope)
        if corrupt:
            sent[200] ^= 0x01  # a flipped bit the chunk CRCs cannot see (they were made after)
        tid = bytes([version]) * 16
        chunks = split(bytes(sent), chunk_size=2048, transfer_id=tid)
        digest = hashlib.sha256(envelope).hexdigest()
        manifest = ModelManifest(version, tid.hex(), len(chunks), len(envelope), digest)
        self.t.publish(self.topics.model_manifest(), manifest.to_bytes(), retain=True)
        for i, c in enumerate(chunks):
            self.t.publish(self.topics.model_chunk(version, i), c, retain=True)

    def wait_online(self, timeout: float = 10.0) -> None:
        self._next_status(lambda s: s.online, timeout)

    def send(self, task: TrainTask) -> None:
        self.t.publish(self.topics.task(CID), task.to_bytes())

    def _next_status(self, pred, timeout: float) -> Status:  # type: ignore[no-untyped-def]
        deadline = time.monotonic() + timeout
        while (left := deadline - time.monotonic()) > 0:
            msg = self.t.receive(left)
            if msg is not None and msg.topic.endswith("/status") and msg.payload:
                st = Status.from_bytes(msg.payload)
                if pred(st):
                    return st
        raise AssertionError("expected status did not arrive")

    def next_decline(self, timeout: float = 10.0) -> Status:
        return self._next_status(lambda s: s.declined is not None, timeout)

    def next_update(self, timeout: float = 20.0) -> ModelUpdate:
        r = Reassembler(1 << 24, 30.0)
        deadline = time.monotonic() + timeout
        while (left := deadline - time.monotonic()) > 0:
            msg = self.t.receive(left)
            if msg is not None and msg.topic == self.topics.update(CID):
                data = r.feed(CID, msg.payload, time.monotonic())
                if data is not None:
                    return ModelUpdate.from_bytes(data, key=KEY, require_signature=True)
        raise AssertionError("no update arrived")


def make_task(task_id: str, codec: dict, version: int = 1) -> TrainTask:
    return TrainTask(
        task_id=task_id, round_no=1, model_version=version, deadline_ts=time.time() + 60,
        train=TrainParams(epochs=1, batch_size=32, lr=0.05), uplink_codec=codec,
        nonce=f"nonce-{task_id}", error_feedback=True,
    )  # fmt: skip


@pytest.fixture
def setup(mosquitto: MosquittoBroker, tmp_path: Path):  # type: ignore[no-untyped-def]
    coord = Coordinator(mosquitto.url)
    data = load_builtin("digits").subset(np.arange(300))
    transport, relay = connect_agent_transport(MqttSettings.from_url(mosquitto.url), FLEET, CID)
    handles = []

    def start():  # type: ignore[no-untyped-def]
        h = start_agent_thread(
            transport, AgentOptions(FLEET, CID, hmac_key=KEY, poll_s=0.05, chunk_size=4096),
            trainer=NumpyTrainer(SPEC), dataset=data,
            telemetry=SimulatedTelemetry(DeviceProfile(battery_percent=None)),
            store=AgentStore(tmp_path / "state"), rng=np.random.default_rng(0), relay=relay,
        )  # fmt: skip
        handles.append(h)
        coord.wait_online()
        return h

    yield coord, start
    for h in handles:
        h.request_stop()
        assert h.join(10)
    coord.t.close()


def test_agent_trains_and_uploads_the_requested_codec(setup) -> None:  # type: ignore[no-untyped-def]
    coord, start = setup
    coord.publish_model(1)
    handle = start()
    coord.send(make_task("task-1", INT8))
    update = coord.next_update()
    layout = ModelLayout(tuple(shapes(SPEC)))
    out = np.empty(layout.size, np.float32)
    decode_update(update, layout, out)
    assert [(t.name, t.shape) for t in update.tensors] == list(layout.entries)
    assert all([s["id"] for s in t.codec["stages"]] == ["block_i8", "zstd"] for t in update.tensors)
    assert (
        update.num_examples == 300 and update.task_id == "task-1" and update.nonce == "nonce-task-1"
    )
    assert np.isfinite(out).all() and np.abs(out).max() > 0
    assert handle.runner.stats.trainings == 1


def test_unknown_codec_is_declined_with_a_reason(setup) -> None:  # type: ignore[no-untyped-def]
    coord, start = setup
    coord.publish_model(1)
    start()
    coord.send(make_task("task-2", {"id": "brotli", "level": 5}))
    status = coord.next_decline()
    assert status.declined is not None
    assert (status.declined.task_id, status.declined.reason) == ("task-2", "unsupported_codec")


def test_corrupt_model_is_refetched_not_trained_on(setup) -> None:  # type: ignore[no-untyped-def]
    coord, start = setup
    coord.publish_model(1, corrupt=True)
    handle = start()
    coord.send(make_task("task-3", INT8))
    stats = handle.runner.stats
    got = threading.Event()
    for _ in range(1000):  # wait for the condition, not for a fixed time
        if stats.models_corrupt >= 1 and handle.runner.machine.state is AgentState.FETCHING_MODEL:
            got.set()
            break
        got.wait(0.01)
    assert got.is_set() and stats.trainings == 0
    coord.publish_model(1)  # the retained chunks are fixed; the agent refetches after its backoff
    update = coord.next_update()
    assert update.task_id == "task-3" and stats.trainings == 1 and stats.models_corrupt >= 1


def test_stopping_publishes_offline_status(setup, mosquitto: MosquittoBroker) -> None:  # type: ignore[no-untyped-def]
    coord, start = setup
    handle = start()
    handle.request_stop()
    assert handle.join(10)
    status = coord._next_status(lambda s: not s.online, 10.0)
    assert status.online is False
