"""The agent's state machine (pure) and its runner on the in-memory broker."""

from __future__ import annotations

import hashlib
import logging
import threading
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from edge.agent import (
    SCAFFOLD_C,
    SCAFFOLD_DELTA,
    TRANSITIONS,
    AgentMachine,
    AgentOptions,
    AgentProtocolError,
    AgentRunner,
    AgentState,
    Close,
    Connected,
    DeclineSent,
    DropUpdate,
    FetchModel,
    ModelAvailable,
    ModelCorrupt,
    PublishStatus,
    Shutdown,
    TaskCancelled,
    TaskReceived,
    Tick,
    Train,
    TrainingAborted,
    TrainingFinished,
    Upload,
    UploadDone,
    UploadFailed,
)
from edge.chunking import split
from edge.data import Dataset
from edge.eligibility import Limits
from edge.modelio import ModelLayout, decode_update, pack_model
from edge.state import AgentStore
from edge.telemetry import DeviceProfile, SimulatedTelemetry, TelemetrySnapshot
from edge.training import ModelSpec, NumpyTrainer, init_weights, shapes
from edge.transport import InMemoryBroker
from edge.wire import (
    BatteryInfo,
    ModelManifest,
    ModelUpdate,
    NetKind,
    Status,
    TaskCancel,
    Topics,
    TrainParams,
    TrainTask,
)

NOW = 1_700_000_000.0
FLEET, CID = "lab", "pi-01"
SPEC = ModelSpec("mlp", input_dim=8, num_classes=3, hidden=(6,))
INT8 = {"id": "pipeline", "stages": [{"id": "block_i8"}, {"id": "zstd", "level": 1}]}


def snap(**kw: object) -> TelemetrySnapshot:
    base: dict[str, object] = {
        "battery": BatteryInfo(90.0, False), "load1": 0.1, "cores": 4, "temp_c": 40.0,
        "available_mb": 1000.0, "net_kind": NetKind.WIFI, "metered": False,
    }  # fmt: skip
    base.update(kw)
    return TelemetrySnapshot(**base)  # type: ignore[arg-type]


def task(
    task_id: str = "t1", *, version: int = 1, deadline: float = NOW + 60, **kw: object
) -> TrainTask:
    args: dict[str, object] = {
        "task_id": task_id, "round_no": 1, "model_version": version, "deadline_ts": deadline,
        "train": TrainParams(epochs=1, batch_size=8, lr=0.1), "uplink_codec": INT8,
        "nonce": f"n-{task_id}",
    }  # fmt: skip
    args.update(kw)
    return TrainTask(**args)  # type: ignore[arg-type]


# --------------------------------------------------------------------------- pure machine


def machine_in(state: AgentState) -> AgentMachine:
    """A machine driven into ``state`` through legal events only."""
    m = AgentMachine(heartbeat_s=30.0)
    m.handle(ModelAvailable(1, snap()), NOW)
    if state is AgentState.IDLE:
        return m
    if state is AgentState.FETCHING_MODEL:
        m.handle(TaskReceived(task(version=2), snap()), NOW)
    elif state is AgentState.DECLINED:
        m.handle(TaskReceived(task(), snap(metered=True)), NOW)
    elif state is AgentState.STOPPED:
        m.handle(Shutdown(), NOW)
    else:
        m.handle(TaskReceived(task(), snap()), NOW)
        if state in (AgentState.UPLOADING, AgentState.BACKOFF):
            m.handle(TrainingFinished("t1"), NOW)
        if state is AgentState.BACKOFF:
            m.handle(UploadFailed("t1", "boom"), NOW)
    assert m.state is state
    return m


EVENTS: dict[type, Callable[[], object]] = {
    Connected: Connected, Tick: Tick,
    TaskReceived: lambda: TaskReceived(task("other"), snap()),
    ModelAvailable: lambda: ModelAvailable(1, snap()),
    ModelCorrupt: lambda: ModelCorrupt(2, "sha"),
    TrainingFinished: lambda: TrainingFinished("t1"),
    TrainingAborted: lambda: TrainingAborted("t1", "low_battery"),
    UploadDone: lambda: UploadDone("t1"), UploadFailed: lambda: UploadFailed("t1", "x"),
    DeclineSent: DeclineSent, Shutdown: Shutdown,
    TaskCancelled: lambda: TaskCancelled("t1", "round_complete"),
}  # fmt: skip

LEGAL = [(s, e) for s, table in TRANSITIONS.items() for e in table]
ILLEGAL = [(s, e) for s in AgentState for e in EVENTS if e not in TRANSITIONS[s]]


@pytest.mark.parametrize(("state", "event_type"), LEGAL, ids=lambda x: getattr(x, "__name__", x))
def test_every_legal_event_lands_in_an_allowed_state(state: AgentState, event_type: type) -> None:
    m = machine_in(state)
    m.handle(EVENTS[event_type](), NOW + 1)  # type: ignore[arg-type]
    assert m.state in TRANSITIONS[state][event_type]


@pytest.mark.parametrize(("state", "event_type"), ILLEGAL, ids=lambda x: getattr(x, "__name__", x))
def test_illegal_events_raise(state: AgentState, event_type: type) -> None:
    m = machine_in(state)
    with pytest.raises(AgentProtocolError, match=f"{event_type.__name__} in state {state.name}"):
        m.handle(EVENTS[event_type](), NOW)  # type: ignore[arg-type]


def test_happy_path_publishes_trains_uploads() -> None:
    m = AgentMachine()
    assert m.handle(Connected(), NOW) == [PublishStatus(AgentState.IDLE)]
    m.handle(ModelAvailable(1, snap()), NOW)
    t = task()
    assert m.handle(TaskReceived(t, snap()), NOW) == [
        PublishStatus(AgentState.TRAINING, "t1"),
        Train(t),
    ]
    assert m.handle(TrainingFinished("t1"), NOW) == [Upload(t)]
    assert m.handle(UploadDone("t1"), NOW) == [PublishStatus(AgentState.IDLE)]
    assert m.state is AgentState.IDLE and m.task is None


def test_task_before_model_waits_then_trains() -> None:
    m = AgentMachine()
    t = task(version=3)
    assert m.handle(TaskReceived(t, snap()), NOW) == [
        PublishStatus(AgentState.FETCHING_MODEL, "t1")
    ]
    assert m.handle(ModelAvailable(2, snap()), NOW) == []
    assert m.handle(ModelAvailable(3, snap()), NOW)[-1] == Train(t)


def test_waiting_for_the_model_ends_at_the_deadline() -> None:
    m = AgentMachine()
    m.handle(TaskReceived(task(version=3, deadline=NOW + 5), snap()), NOW)
    (cmd,) = m.handle(Tick(), NOW + 5)
    assert isinstance(cmd, PublishStatus) and cmd.declined is not None
    assert cmd.declined.reason == "model_unavailable"


@pytest.mark.parametrize(
    ("reading", "reason"),
    [
        (snap(battery=BatteryInfo(10.0, False)), "low_battery"),
        (snap(metered=True), "metered"),
        (snap(temp_c=90.0), "too_hot"),
        (snap(available_mb=10.0), "low_memory"),
    ],
)
def test_ineligible_device_declines(reading: TelemetrySnapshot, reason: str) -> None:
    m = machine_in(AgentState.IDLE)
    (cmd,) = m.handle(TaskReceived(task(), reading), NOW)
    assert isinstance(cmd, PublishStatus) and cmd.declined is not None
    assert (cmd.declined.task_id, cmd.declined.reason) == ("t1", reason)
    assert m.state is AgentState.DECLINED
    m.handle(DeclineSent(), NOW)
    assert m.state is AgentState.IDLE


@pytest.mark.parametrize(
    "reading",
    [snap(battery=None), snap(battery=BatteryInfo(5.0, True)), snap(temp_c=None)],
    ids=["no-battery", "charging", "no-sensor"],
)
def test_unknown_or_charging_is_eligible(reading: TelemetrySnapshot) -> None:
    m = machine_in(AgentState.IDLE)
    assert isinstance(m.handle(TaskReceived(task(), reading), NOW)[-1], Train)


def test_metered_allowed_by_limits() -> None:
    m = AgentMachine(limits=Limits(allow_metered=True))
    m.handle(ModelAvailable(1, snap()), NOW)
    assert isinstance(m.handle(TaskReceived(task(), snap(metered=True)), NOW)[-1], Train)


def test_unknown_codec_is_declined() -> None:
    m = machine_in(AgentState.IDLE)
    (cmd,) = m.handle(TaskReceived(task(uplink_codec={"id": "nope"}), snap()), NOW)
    assert isinstance(cmd, PublishStatus) and cmd.declined is not None
    assert cmd.declined.reason == "unsupported_codec"


def test_scaffold_needs_support() -> None:
    m = AgentMachine(supports_scaffold=False)
    m.handle(ModelAvailable(1, snap()), NOW)
    (cmd,) = m.handle(TaskReceived(task(strategy={"id": "scaffold"}), snap()), NOW)
    assert isinstance(cmd, PublishStatus) and cmd.declined is not None
    assert cmd.declined.reason == "unsupported_strategy"


def test_expired_task_is_dropped_with_a_decline() -> None:
    m = machine_in(AgentState.IDLE)
    (cmd,) = m.handle(TaskReceived(task(deadline=NOW - 1), snap()), NOW)
    assert isinstance(cmd, PublishStatus) and cmd.declined is not None
    assert cmd.declined.reason == "deadline_passed"


def test_duplicate_task_is_ignored() -> None:
    m = machine_in(AgentState.IDLE)
    m.handle(TaskReceived(task(), snap()), NOW)
    assert m.handle(TaskReceived(task(), snap()), NOW) == []
    assert m.state is AgentState.TRAINING


def test_second_task_while_busy_is_declined_busy() -> None:
    m = machine_in(AgentState.TRAINING)
    (cmd,) = m.handle(TaskReceived(task("t2"), snap()), NOW)
    assert isinstance(cmd, PublishStatus) and cmd.declined is not None
    assert (cmd.declined.task_id, cmd.declined.reason, cmd.task_id) == ("t2", "busy", "t1")
    assert m.state is AgentState.TRAINING


def test_training_aborted_declines_with_reason() -> None:
    m = machine_in(AgentState.TRAINING)
    (cmd,) = m.handle(TrainingAborted("t1", "low_battery"), NOW)
    assert isinstance(cmd, PublishStatus) and cmd.declined is not None
    assert cmd.declined.reason == "low_battery"


def test_events_for_another_task_raise() -> None:
    m = machine_in(AgentState.TRAINING)
    with pytest.raises(AgentProtocolError, match="current task is 't1'"):
        m.handle(TrainingFinished("zzz"), NOW)


def test_cancel_while_waiting_for_the_model_lets_the_task_go() -> None:
    m = machine_in(AgentState.FETCHING_MODEL)
    out = m.handle(TaskCancelled("t1", "round_complete"), NOW + 1)
    assert out == [PublishStatus(AgentState.IDLE, None, None)]
    assert m.state is AgentState.IDLE and m.task is None
    # The model arriving afterwards starts nothing.
    assert m.handle(ModelAvailable(2, snap()), NOW + 2) == []


@pytest.mark.parametrize("state", [AgentState.UPLOADING, AgentState.BACKOFF])
def test_cancel_before_the_update_went_out_drops_it(state: AgentState) -> None:
    m = machine_in(state)
    out = m.handle(TaskCancelled("t1", "round_complete"), NOW + 1)
    assert out == [
        DropUpdate("t1", "cancelled: round_complete"),
        PublishStatus(AgentState.IDLE, None, None),
    ]
    assert m.state is AgentState.IDLE and m.upload_retry_at is None
    assert m.handle(Tick(), NOW + 20) == []  # no retry of the dropped upload


def test_cancel_of_another_task_changes_nothing_and_bars_that_task() -> None:
    m = machine_in(AgentState.TRAINING)
    assert m.handle(TaskCancelled("t9", "round_complete"), NOW) == []
    assert m.state is AgentState.TRAINING  # training is stopped by the runner, not here
    assert m.handle(TaskCancelled("t1", "round_complete"), NOW) == []
    idle = machine_in(AgentState.IDLE)
    assert idle.handle(TaskCancelled("t5", "round_complete"), NOW) == []
    # The task itself arriving after its cancel (redelivered after a reconnect) is ignored.
    assert idle.handle(TaskReceived(task("t5"), snap()), NOW) == []
    assert idle.state is AgentState.IDLE


def test_heartbeat_is_periodic() -> None:
    m = AgentMachine(heartbeat_s=30.0)
    m.handle(Connected(), NOW)
    assert m.handle(Tick(), NOW + 29) == []
    assert m.handle(Tick(), NOW + 30) == [PublishStatus(AgentState.IDLE)]


def test_upload_failure_backs_off_and_retries_until_deadline() -> None:
    m = machine_in(AgentState.UPLOADING)
    m.handle(UploadFailed("t1", "x"), NOW)
    assert m.state is AgentState.BACKOFF
    assert [c for c in m.handle(Tick(), NOW + 0.5) if not isinstance(c, PublishStatus)] == []
    assert Upload(task()) in m.handle(Tick(), NOW + 1.0)
    m.handle(UploadFailed("t1", "x"), NOW + 1.0)
    cmds = m.handle(Tick(), NOW + 61)
    assert DropUpdate("t1", "deadline_passed") in cmds and m.state is AgentState.IDLE


def test_corrupt_model_is_refetched_with_backoff() -> None:
    m = AgentMachine()
    m.handle(Connected(), NOW)
    m.handle(ModelCorrupt(1, "sha"), NOW)
    assert m.handle(Tick(), NOW + 0.5) == []
    assert m.handle(Tick(), NOW + 1.0) == [FetchModel(-1)]
    m.handle(ModelCorrupt(1, "sha"), NOW + 1.0)
    assert m.handle(Tick(), NOW + 2.5) == []
    assert m.handle(Tick(), NOW + 3.0) == [FetchModel(-1)]


def test_shutdown_publishes_offline_then_closes() -> None:
    m = machine_in(AgentState.TRAINING)
    assert m.handle(Shutdown(), NOW) == [PublishStatus(AgentState.STOPPED, online=False), Close()]
    assert m.handle(Shutdown(), NOW) == []


# --------------------------------------------------------------------------- runner (in memory)


class Coordinator:
    """Plays the coordinator's side on an in-memory broker."""

    def __init__(self, broker: InMemoryBroker) -> None:
        self.t = broker.connect("coordinator")
        self.topics = Topics(FLEET)
        self.t.subscribe(self.topics.all_status())
        self.t.subscribe(self.topics.all_updates())

    def publish_model(
        self,
        weights: dict[str, np.ndarray],
        version: int,
        *,
        corrupt: bool = False,
        extra_tensors: dict[str, np.ndarray] | None = None,
    ) -> bytes:
        envelope = pack_model(
            {**weights, **(extra_tensors or {})}, model_version=version, round_no=version
        ).to_bytes()
        sent = bytearray(envelope)
        if corrupt:
            sent[-40] ^= 0xFF
        tid = bytes(16) if not corrupt else bytes([1] * 16)
        chunks = split(bytes(sent), chunk_size=1024, transfer_id=tid)
        manifest = ModelManifest(
            version, tid.hex(), len(chunks), len(envelope), hashlib.sha256(envelope).hexdigest()
        )
        self.t.publish(self.topics.model_manifest(), manifest.to_bytes(), retain=True)
        for i, c in enumerate(chunks):
            self.t.publish(self.topics.model_chunk(version, i), c, retain=True)
        return envelope

    def send(self, t: TrainTask) -> None:
        self.t.publish(self.topics.task(CID), t.to_bytes())

    def next_update(self, timeout: float = 10.0) -> ModelUpdate:
        from edge.chunking import Reassembler

        r = Reassembler(1 << 24, 30.0)
        while True:
            msg = self.t.receive(timeout)
            assert msg is not None, "no update arrived"
            if msg.topic.endswith("/update"):
                data = r.feed("x", msg.payload, 0.0)
                if data is not None:
                    return ModelUpdate.from_bytes(data)

    def next_decline(self, timeout: float = 10.0) -> Status:
        while True:
            msg = self.t.receive(timeout)
            assert msg is not None, "no decline arrived"
            if msg.topic.endswith("/status"):
                st = Status.from_bytes(msg.payload)
                if st.declined is not None:
                    return st


def dataset(n: int = 64) -> Dataset:
    rng = np.random.default_rng(0)
    return Dataset(rng.normal(size=(n, 8)).astype(np.float32), rng.integers(0, 3, n), 3)


def start_runner(
    broker: InMemoryBroker,
    state_dir: Path,
    telemetry: SimulatedTelemetry | None = None,
    clock: Callable[[], float] = lambda: NOW,
) -> tuple[AgentRunner, threading.Thread]:
    transport = broker.connect(CID)
    runner = AgentRunner(
        transport, AgentOptions(FLEET, CID, poll_s=0.02, hmac_key=b"k" * 32),
        trainer=NumpyTrainer(SPEC), dataset=dataset(),
        telemetry=telemetry or SimulatedTelemetry(DeviceProfile(), now=NOW),
        store=AgentStore(state_dir, fsync=False), stop=threading.Event(), clock=clock,
        rng=np.random.default_rng(1),
    )  # fmt: skip
    thread = threading.Thread(target=runner.run, daemon=True)
    thread.start()
    wait_for(lambda: runner.stats.statuses_sent >= 1)  # subscribed and online
    return runner, thread


def stop_runner(runner: AgentRunner, thread: threading.Thread) -> None:
    runner.stop.set()
    thread.join(10)
    assert not thread.is_alive()


def wait_for(cond: Callable[[], bool], timeout: float = 10.0) -> None:
    done = threading.Event()
    for _ in range(int(timeout / 0.01)):
        if cond():
            return
        done.wait(0.01)
    raise AssertionError("condition not met in time")


@pytest.fixture
def weights() -> dict[str, np.ndarray]:
    return init_weights(SPEC, np.random.default_rng(0))


def test_runner_trains_and_uploads_a_signed_compressed_update(
    tmp_path: Path, weights: dict
) -> None:
    broker = InMemoryBroker()
    coord = Coordinator(broker)
    coord.publish_model(weights, 1)
    runner, thread = start_runner(broker, tmp_path)
    try:
        coord.send(task())
        update = coord.next_update()
    finally:
        stop_runner(runner, thread)
    assert ModelUpdate.from_bytes(update.to_bytes(b"k" * 32), key=b"k" * 32) == update
    layout = ModelLayout(tuple(shapes(SPEC)))
    out = np.empty(layout.size, np.float32)
    decode_update(update, layout, out)
    assert np.isfinite(out).all() and np.abs(out).max() > 0
    assert update.num_examples == 64 and update.nonce == "n-t1"
    assert [s["id"] for s in update.tensors[0].codec["stages"]] == ["block_i8", "zstd"]
    assert runner.stats.updates_sent == 1
    offline = Status.from_bytes(broker.retained[Topics(FLEET).status(CID)].payload)
    assert offline.online is False


def test_runner_refetches_a_corrupt_model_and_never_trains_on_it(
    tmp_path: Path, weights: dict
) -> None:
    broker = InMemoryBroker()
    coord = Coordinator(broker)
    coord.publish_model(weights, 1, corrupt=True)
    clock = [NOW]
    runner, thread = start_runner(broker, tmp_path, clock=lambda: clock[0])
    try:
        coord.send(task(deadline=NOW + 600))
        wait_for(lambda: runner.stats.models_corrupt >= 1 and runner.stats.tasks_received == 1)
        assert runner.stats.trainings == 0 and runner.machine.state is AgentState.FETCHING_MODEL
        coord.publish_model(weights, 1)  # fixed retained chunks; the agent refetches after 1 s
        clock[0] = NOW + 2
        update = coord.next_update()
    finally:
        stop_runner(runner, thread)
    assert update.model_version == 1 and runner.stats.trainings == 1


def test_runner_does_not_refetch_a_model_made_for_another_config(
    tmp_path: Path, weights: dict
) -> None:
    # Regression: an intact model of another shape (the coordinator's [model] differs from
    # the device's) was taken for corrupt and downloaded again and again.
    broker = InMemoryBroker()
    coord = Coordinator(broker)
    other = init_weights(
        ModelSpec("mlp", input_dim=8, num_classes=3, hidden=(5,)), np.random.default_rng(1)
    )
    coord.publish_model(other, 1)
    clock = [NOW]
    runner, thread = start_runner(broker, tmp_path, clock=lambda: clock[0])
    try:
        wait_for(lambda: runner.stats.models_mismatched == 1)
        clock[0] = NOW + 3600  # long past any refetch backoff
        coord.send(task(deadline=NOW + 7200))
        wait_for(lambda: runner.stats.tasks_received == 1)
        assert runner.stats.models_mismatched == 1 and runner.stats.models_corrupt == 0
        assert runner.stats.trainings == 0
        coord.publish_model(weights, 2)  # a model that fits is taken as usual
        wait_for(lambda: runner.stats.models_loaded == 1)
    finally:
        stop_runner(runner, thread)
    assert runner.model is not None and runner.model.manifest.model_version == 2


def test_runner_declines_an_unknown_codec(tmp_path: Path, weights: dict) -> None:
    broker = InMemoryBroker()
    coord = Coordinator(broker)
    coord.publish_model(weights, 1)
    runner, thread = start_runner(broker, tmp_path)
    try:
        coord.send(task(uplink_codec={"id": "lz77"}))
        status = coord.next_decline()
    finally:
        stop_runner(runner, thread)
    assert status.declined is not None and status.declined.reason == "unsupported_codec"


def test_battery_draining_during_training_stops_it_and_uploads_nothing(
    tmp_path: Path, weights: dict
) -> None:
    broker = InMemoryBroker()
    coord = Coordinator(broker)
    coord.publish_model(weights, 1)
    profile = DeviceProfile(battery_percent=25.0, drain_train_pct_per_h=3600.0, epoch=NOW)
    telemetry = SimulatedTelemetry(profile, now=NOW)
    ticks = iter(range(10**9))
    runner, thread = start_runner(
        broker, tmp_path, telemetry, clock=lambda: NOW + next(ticks) * 0.01
    )
    try:
        coord.send(task(train=TrainParams(epochs=50, batch_size=4, lr=0.1), deadline=NOW + 10**8))
        status = coord.next_decline()
    finally:
        stop_runner(runner, thread)
    assert status.declined is not None and status.declined.reason == "low_battery"
    assert runner.stats.updates_sent == 0


def test_cancel_during_training_stops_it_and_uploads_nothing(tmp_path: Path, weights: dict) -> None:
    # Prepare: 10 ms per batch and 800 batches: training would take 8 s.
    broker = InMemoryBroker()
    coord = Coordinator(broker)
    coord.publish_model(weights, 1)
    telemetry = SimulatedTelemetry(DeviceProfile(batch_time_s=0.01), now=NOW)
    runner, thread = start_runner(broker, tmp_path, telemetry)
    try:
        coord.send(task(train=TrainParams(epochs=100, batch_size=8, lr=0.1)))
        wait_for(lambda: runner.machine.state is AgentState.TRAINING)
        # Execute
        coord.t.publish(coord.topics.task(CID), TaskCancel("t1", "round_complete").to_bytes())
        status = coord.next_decline(5.0)
        # Assert: stopped within a stop check, nothing sent, and the device works on.
        assert status.declined is not None and status.declined.reason == "cancelled"
        assert runner.stats.tasks_cancelled == 1 and runner.stats.trainings == 0
        assert runner.samples_per_s  # measured by the stopped run
        coord.send(task("t2"))
        update = coord.next_update()
    finally:
        stop_runner(runner, thread)
    assert update.task_id == "t2" and runner.stats.updates_sent == 1


def test_an_older_model_announced_is_refused_with_one_warning(
    tmp_path: Path, weights: dict, caplog: pytest.LogCaptureFixture
) -> None:
    broker = InMemoryBroker()
    coord = Coordinator(broker)
    coord.publish_model(weights, 5)
    runner, thread = start_runner(broker, tmp_path)
    try:
        wait_for(lambda: runner.stats.models_loaded == 1)
        with caplog.at_level(logging.WARNING, logger="edge.agent"):
            coord.publish_model(weights, 2)  # a coordinator started from an older state db
            coord.publish_model(weights, 2)
            coord.send(task("t9", version=2))
            status = coord.next_decline()
    finally:
        stop_runner(runner, thread)
    warnings = [
        r.getMessage() for r in caplog.records if "older than the version" in r.getMessage()
    ]
    assert len(warnings) == 1, warnings
    assert "announces model version 2, older than the version 5 this device holds" in warnings[0]
    assert "delete model.bin and model.json" in warnings[0]
    assert status.declined is not None and status.declined.reason == "model_unavailable"
    assert runner.model is not None and runner.model.manifest.model_version == 5


def test_error_feedback_residual_survives_a_restart(tmp_path: Path, weights: dict) -> None:
    broker = InMemoryBroker()
    coord = Coordinator(broker)
    coord.publish_model(weights, 1)
    topk = {"id": "pipeline", "stages": [{"id": "topk", "fraction": 0.1}, {"id": "block_i8"}]}
    runner, thread = start_runner(broker, tmp_path)
    try:
        coord.send(task(uplink_codec=topk, error_feedback=True))
        coord.next_update()
    finally:
        stop_runner(runner, thread)
    layout = ModelLayout(tuple(shapes(SPEC)))
    saved = AgentStore(tmp_path).load_residuals(layout)
    assert saved is not None and any(np.abs(r).max() > 0 for r in saved.values())
    # A new agent process on the same state dir starts from the saved residual.
    runner2, thread2 = start_runner(broker, tmp_path)
    try:
        assert runner2._load_residuals()["w0"].tolist() == saved["w0"].tolist()
    finally:
        stop_runner(runner2, thread2)


def test_stale_residual_layout_is_discarded(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    store = AgentStore(tmp_path)
    old = ModelLayout((("w0", (2, 2)),))
    store.save_residuals(old, {"w0": np.ones((2, 2), np.float32)})
    assert store.load_residuals(ModelLayout((("w0", (3, 2)),))) is None
    assert "discarding" in caplog.text
    assert store.load_residuals(old) is None  # the file is gone


def test_scaffold_update_carries_control_delta_and_keeps_c_i(tmp_path: Path, weights: dict) -> None:
    broker = InMemoryBroker()
    coord = Coordinator(broker)
    layout = ModelLayout(tuple(shapes(SPEC)))
    c = np.full(layout.size, 0.01, np.float32)
    coord.publish_model(weights, 1, extra_tensors={SCAFFOLD_C: c})
    runner, thread = start_runner(broker, tmp_path)
    try:
        coord.send(task(strategy={"id": "scaffold"}))
        update = coord.next_update()
    finally:
        stop_runner(runner, thread)
    aux = decode_update(
        update, layout, np.empty(layout.size, np.float32), aux={SCAFFOLD_DELTA: layout.size}
    )
    assert aux[SCAFFOLD_DELTA].shape == (layout.size,) and np.isfinite(aux[SCAFFOLD_DELTA]).all()
    assert AgentStore(tmp_path).load_scaffold_control(layout) is not None


def test_cached_model_skips_the_download_after_restart(tmp_path: Path, weights: dict) -> None:
    broker = InMemoryBroker()
    coord = Coordinator(broker)
    coord.publish_model(weights, 1)
    runner, thread = start_runner(broker, tmp_path)
    wait_for(lambda: runner.stats.models_loaded == 1)
    stop_runner(runner, thread)
    runner2, thread2 = start_runner(broker, tmp_path)
    try:
        coord.send(task("t9"))
        coord.next_update()
    finally:
        stop_runner(runner2, thread2)
    assert runner2.stats.models_loaded == 0 and runner2.stats.trainings == 1
