"""Faults, each against a real mosquitto with the real agent and the real coordinator.

Every test waits on conditions (never on fixed sleeps) and ends with the store audit of
:func:`tests.reliability.harness.audit_store`: no task counted twice, each round counted its
participants exactly once, model versions never go backwards. The moment of a fault is
picked deterministically: a :class:`TrainingGate` holds trainings, and the coordinator
subprocess kills itself at a named stage (``FEDGE_CRASH_AT``, ``server_stub/faults.py``).
"""

from __future__ import annotations

import hashlib
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from edge.chunking import Reassembler
from edge.mqtt_transport import MqttSettings, MqttTransport
from edge.training import init_weights
from edge.transport import publish_chunked
from edge.wire import ModelUpdate, Topics, TrainParams, TrainTask
from server_stub.faults import STAGES
from tests.broker import MosquittoBroker
from tests.reliability.harness import (
    FLEET,
    SPEC,
    AgentFleet,
    Coordinators,
    TrainingGate,
    accuracy_of,
    audit_store,
    coordinator_config,
    digits_shards,
    evaluator,
    wait_for,
)
from tests.test_coordinator_e2e import publish_update

pytestmark = pytest.mark.broker

TOPICS = Topics(FLEET)


def _client(broker: MosquittoBroker, client_id: str, **kw: Any) -> MqttTransport:
    return MqttTransport(MqttSettings.from_url(broker.url, client_id=client_id, **kw))


def _publish_update(transport: MqttTransport, cid: str, task: TrainTask) -> None:
    """Publish a well-formed (zero) update of ``task`` on ``cid``'s topic."""
    zeros = {k: np.zeros_like(v) for k, v in init_weights(SPEC, np.random.default_rng(0)).items()}
    publish_update(transport, cid, task, zeros, num_examples=10, fleet=FLEET)


# ------------------------------------------------------------------ transport back-pressure


def test_full_receive_queue_never_blocks_publish_acks(mosquitto: MosquittoBroker) -> None:
    # Regression: with a full bounded receive queue, paho's network thread used to block in
    # on_message, stopped reading PUBACKs, and publish() waiting for its PUBACK deadlocked.
    # Prepare: a receiver with a 4-message queue that does not drain it, flooded with QoS 1.
    receiver = _client(mosquitto, "slow-reader", max_queue=4, publish_timeout_s=5.0)
    sender = _client(mosquitto, "flooder")
    try:
        receiver.subscribe("flood/#")
        for i in range(60):
            sender.publish(f"flood/{i}", i.to_bytes(2, "little"), qos=1)
        wait_for(lambda: receiver.acks_held > 0, 10, "the receiver to hold back a PUBACK")
        # Execute: the receiver publishes while its queue is over the bound.
        for _ in range(30):
            receiver.publish("out/x", b"x", qos=1)  # each waits for its PUBACK
        # Assert: bounded (queue + the broker's in-flight window of 20), then nothing lost.
        assert len(receiver._inbox) <= 4 + 20
        got = []
        while len(got) < 60:
            msg = receiver.receive(5.0)
            assert msg is not None, f"only {len(got)} of 60 messages arrived"
            got.append(int.from_bytes(msg.payload, "little"))
        assert got == list(range(60))
        assert receiver.dropped_qos0 == 0
    finally:
        receiver.close()
        sender.close()


def test_full_receive_queue_drops_and_counts_qos0_only(mosquitto: MosquittoBroker) -> None:
    # Prepare
    receiver = _client(mosquitto, "qos0-reader", max_queue=10, max_queue_bytes=64)
    sender = _client(mosquitto, "qos0-sender")
    try:
        receiver.subscribe("q0/#", qos=0)
        # Execute: 40-byte payloads, so the byte bound (64) is the one that fills.
        for i in range(20):
            sender.publish(f"q0/{i}", bytes(40), qos=0)
        sender.publish("q0/end", b"end", qos=1)  # delivered at QoS 0: the subscription's
        wait_for(lambda: receiver.dropped_qos0 + len(receiver._inbox) >= 21, 10, "21 deliveries")
        # Assert
        assert len(receiver._inbox) == 2  # the first two fill 64 bytes; the rest are dropped
        assert receiver.dropped_qos0 == 19
    finally:
        receiver.close()
        sender.close()


# ------------------------------------------------------------------ broker restart


def test_broker_restart_mid_round_loses_no_update(
    mosquitto: MosquittoBroker, tmp_path: Path, fleet: AgentFleet, coordinators: Coordinators
) -> None:
    # Prepare: three agents hold their round-1 training at the gate.
    shards, test = digits_shards(3)
    gate = TrainingGate()
    for i, shard in enumerate(shards):
        fleet.start(f"pi-{i:02d}", shard, seed=i, gate=gate)
    cfg = coordinator_config(mosquitto.url, tmp_path / "c.db", rounds={"deadline_s": 30.0})
    coord = coordinators.thread(cfg, evaluate=evaluator(test), max_rounds=3)
    wait_for(lambda: gate.waiting == 3, 20, "all three agents to be training round 1")
    # Execute: restart the broker while every selected device is mid-training, then let them
    # finish; their uploads wait for the reconnect.
    mosquitto.restart()
    gate.open()
    records = coord.wait_rounds(3, 60)
    coord.wait_stopped(15)
    # Assert: the restart fires every device's Last Will, so round 1 either completes or is
    # abandoned cleanly (model kept, its late updates rejected and counted, none folded).
    first = records[0]
    late = _rejected(coord, "late")
    if first["outcome"] == "aggregated":
        assert first["participants"] == 3 and late == 0
    else:
        assert first["model_version"] == 0 and first["participants"] == 0
    assert all(r["outcome"] == "aggregated" and r["participants"] == 3 for r in records[1:])
    assert coord.transport.reconnects >= 1
    assert all(fleet.transport(c).reconnects >= 1 for c in fleet.cids)
    sent = sum(fleet.handle(c).runner.stats.updates_sent for c in fleet.cids)
    audit = audit_store(tmp_path / "c.db")
    # Every update the broker acknowledged was either counted once or rejected and counted.
    assert len(audit.accepted) + late == sent
    assert audit.model_version == len(audit.aggregated)


def test_broker_that_lost_its_state_gets_the_model_again(
    mosquitto: MosquittoBroker, tmp_path: Path, fleet: AgentFleet, coordinators: Coordinators
) -> None:
    # Regression: after a broker restart without its persistence file, the coordinator
    # reconnected without a session but did not publish the model again. Devices starting
    # afresh found no retained model and declined every task ("model_unavailable"), and
    # every round was abandoned until the coordinator itself was restarted.
    # Prepare: one round with three devices, then they stop.
    shards, test = digits_shards(6)
    for i in range(3):
        fleet.start(f"pi-{i:02d}", shards[i], seed=i)
    cfg = coordinator_config(mosquitto.url, tmp_path / "c.db", rounds={"deadline_s": 30.0})
    coord = coordinators.thread(cfg, evaluate=evaluator(test), max_rounds=20)
    assert coord.wait_rounds(1, 60)[0]["outcome"] == "aggregated"
    fleet.stop()
    # Execute: the broker restarts with its state gone; three new devices with empty state
    # directories join.
    mosquitto.stop()
    shutil.rmtree(mosquitto.workdir / "data")
    mosquitto.start()
    wait_for(lambda: coord.transport.sessions_lost >= 1, 30, "the coordinator to reconnect")
    for i in range(3, 6):
        fleet.start(f"pi-{i:02d}", shards[i], seed=i)
    # Assert: they get the model from the broker and train rounds on it (only they can).
    new = [f"pi-{i:02d}" for i in range(3, 6)]
    wait_for(
        lambda: all(fleet.handle(c).runner.stats.models_loaded >= 1 for c in new),
        30,
        "the new devices to load the model",
    )
    wait_for(
        lambda: any(r["outcome"] == "aggregated" for r in coord.records[1:]),
        60,
        "a round aggregated after the broker lost its state",
    )
    coord.stop()
    audit = audit_store(tmp_path / "c.db")
    assert audit.model_version == len(audit.aggregated) >= 2


def _rejected(coord: Any, reason: str) -> int:
    """Rejections by ``reason`` from the coordinator's Prometheus counter (all rounds)."""
    value = coord.coordinator.metrics.registry.get_sample_value(
        "fedge_rejected_updates_total", {"reason": reason}
    )
    return int(value or 0)


# ------------------------------------------------------------------ coordinator SIGKILL


@pytest.mark.parametrize("stage", sorted(STAGES))
def test_coordinator_sigkill_at_each_stage_resumes(
    stage: str,
    mosquitto: MosquittoBroker,
    tmp_path: Path,
    fleet: AgentFleet,
    coordinators: Coordinators,
) -> None:
    # Prepare: the deadline (300 s) is far beyond every wait below, so each round must finish
    # on its own. The gate makes the order deterministic: in round 2 every device has
    # acknowledged its task (status "training") before any of them uploads.
    shards, test = digits_shards(3)
    gate = TrainingGate()
    for i, shard in enumerate(shards):
        fleet.start(f"pi-{i:02d}", shard, seed=i, gate=gate)
    cfg = coordinator_config(
        mosquitto.url, tmp_path / "c.db", rounds_total=3, rounds={"deadline_s": 300.0}
    )
    # Execute: the first run kills itself at `stage` of round 2; the second finishes round 3.
    first = coordinators.process(cfg, env={"FEDGE_CRASH_AT": f"{stage}@2"})
    wait_for(lambda: gate.waiting == 3, 30, "round 1 training")
    gate.allow(3)
    wait_for(lambda: gate.passed == 3 and gate.waiting == 3, 30, "round 2 training")
    gate.open()
    assert first.wait(60) == -9, first.log[-3000:]
    assert f"SIGKILL at {stage} of round 2" in first.log
    before = audit_store(tmp_path / "c.db")
    second = coordinators.process(cfg)
    assert second.wait(90) == 0, second.log[-3000:]
    # Assert
    after = audit_store(tmp_path / "c.db")
    assert after.model_version >= before.model_version
    if stage in ("after_checkpoint", "mid_publish"):
        assert before.model_version == 2  # stored before the crash, republished after
    else:
        assert before.model_version == 1
    if stage in ("after_send_tasks", "after_fold", "before_checkpoint"):
        assert "resuming open round 2" in second.log
    # Every round is logged exactly once and aggregated with all three devices, round 2
    # included. Updates folded before the crash were kept in the store and are folded in
    # again. A device whose update died with the first process (taken off the broker but not
    # yet folded) shows it is idle after the restart, so its acknowledged task is lost and
    # it gets a fresh task of round 2 (new id, same model version) instead of the round
    # waiting out its deadline. Nothing is counted twice (the audit above).
    # rounds_total counts the rounds of both runs: the second stops once round 3 is done.
    assert [r["round"] for r in after.rounds] == [1, 2, 3]
    assert all(r["outcome"] == "aggregated" and r["participants"] == 3 for r in after.rounds)
    round2 = after.rounds[1]
    assert round2["reason"] == "target"
    # How many updates died with the first process depends on whether their PUBACK left
    # before the SIGKILL (an unacknowledged one is redelivered and counted on its own task);
    # each lost one was asked again exactly once.
    assert round2["replaced"] == round2["lost"] <= 3
    if stage == "after_fold":  # the first update was kept: at most the other two are lost
        assert "1 update(s) folded before the restart are kept" in second.log
        assert round2["lost"] <= 2
    if stage == "before_checkpoint":  # all three were kept: the round closes at once
        assert "3 update(s) folded before the restart are kept" in second.log
        assert round2["lost"] == 0
    assert round2["timed_out"] == 0
    assert after.model_version == len(after.rounds)
    assert accuracy_of(after.model_envelope, test) > 0.6
    # Devices only ever loaded increasing versions, ending with the newest.
    for cid in fleet.cids:
        runner = fleet.handle(cid).runner
        wait_for(
            lambda r=runner: (
                r.model is not None  # type: ignore[misc]
                and r.model.manifest.model_version == after.model_version
            ),
            10,
            f"{cid} to load version {after.model_version}",
        )


# ------------------------------------------------------------------ devices vanish


def test_thirty_percent_of_selected_devices_vanish(
    mosquitto: MosquittoBroker, tmp_path: Path, fleet: AgentFleet, coordinators: Coordinators
) -> None:
    # Prepare: K = 8, over-selection 10/8 -> all 10 devices are asked. In round 1, three of
    # them vanish mid-training: one loses power (Last Will), two go silent and never answer.
    shards, test = digits_shards(10)
    gate = TrainingGate()
    silent = TrainingGate()
    cids = [f"pi-{i:02d}" for i in range(10)]
    for i, (cid, shard) in enumerate(zip(cids, shards, strict=True)):
        fleet.start(cid, shard, seed=i, gate=silent if i in (1, 2) else gate)
    cfg = coordinator_config(
        mosquitto.url,
        tmp_path / "c.db",
        rounds={"clients_per_round": 8, "over_selection": 10 / 8, "min_devices": 5,
                "deadline_s": 6.0, "min_fraction": 0.5},
    )  # fmt: skip
    coord = coordinators.thread(cfg, evaluate=evaluator(test), max_rounds=3)
    wait_for(lambda: gate.waiting == 8 and silent.waiting == 2, 20, "10 agents training")
    # Execute
    fleet.crash(["pi-00"])
    gate.open()
    records = coord.wait_rounds(3, 60)
    coord.wait_stopped(15)
    # Assert: round 1 closed at its deadline with the 7 that answered.
    first = records[0]
    assert first["outcome"] == "aggregated" and first["reason"] == "deadline"
    assert first["selected"] == 10 and first["participants"] == 7
    assert first["dropped"] + first["timed_out"] >= 3
    assert all(r["outcome"] == "aggregated" for r in records)
    accuracies = [r["accuracy"] for r in records]
    assert accuracies[-1] > accuracies[0]
    audit = audit_store(tmp_path / "c.db")
    assert not {c for _t, _r, c in audit.accepted} & {"pi-00", "pi-01", "pi-02"}


# ------------------------------------------------------------------ long sleep


def test_device_back_from_long_sleep_gets_current_model_and_task_only(
    mosquitto: MosquittoBroker, tmp_path: Path, fleet: AgentFleet, coordinators: Coordinators
) -> None:
    # Prepare: three devices; pi-00 takes part in round 1, then its power goes. Its gate lets
    # exactly one training through, so should round 2 start before the crash lands, pi-00
    # holds that round's task untrained and the crash (Last Will) drops it: no race.
    shards, test = digits_shards(3)
    for i, shard in enumerate(shards):
        gate = TrainingGate(permits=1) if i == 0 else None
        fleet.start(f"pi-{i:02d}", shard, seed=i, gate=gate)
    deadline_s = 3.0
    cfg = coordinator_config(
        mosquitto.url, tmp_path / "c.db", rounds={"min_devices": 2, "deadline_s": deadline_s}
    )
    coord = coordinators.thread(cfg, evaluate=evaluator(test))
    coord.wait_rounds(1, 30)
    fleet.crash(["pi-00"])
    crashed_at = time.time()
    # While it sleeps: a task meant for it is queued in its persistent session and expires,
    # and the fleet trains on without it.
    stale = TrainTask(
        task_id="r1-stale", round_no=1, model_version=0, deadline_ts=time.time() + 0.5,
        train=TrainParams(epochs=1, batch_size=16, lr=0.1), uplink_codec={"id": "raw"},
        nonce="stale-nonce",
    )  # fmt: skip
    coord.transport.publish(TOPICS.task("pi-00"), stale.to_bytes(), qos=1)
    wait_for(
        lambda: len(coord.records) >= 3 and time.time() > stale.deadline_ts,
        60,
        "two rounds without pi-00",
    )
    assert all(r["participants"] == 2 for r in coord.records[1:3])
    # A round-2 task published before the Last Will landed may also wait in the session; a
    # long sleep outlasts its deadline too, so the device must decline it like the stale one.
    time.sleep(max(0.0, crashed_at + deadline_s + 0.5 - time.time()))
    # Execute: it wakes up with its state directory and session.
    handle = fleet.start("pi-00", shards[0], seed=0)
    stats = handle.runner.stats
    n = len(coord.records)
    wait_for(
        lambda: any(r["participants"] == 3 for r in coord.records[n:]),
        60,
        "a round with pi-00 back",
    )
    coord.stop()
    fleet.stop(["pi-00"])  # an upload in flight finishes first: the counters are final
    # Assert: the stale task was declined, never trained; one fresh update on the new model.
    assert stats.declined["deadline_passed"] >= 1
    assert stats.trainings == stats.updates_sent >= 1
    audit = audit_store(tmp_path / "c.db")
    mine = [(t, r) for t, r, c in audit.accepted if c == "pi-00"]
    assert mine[0][1] == 1 and all(r > 3 for _t, r in mine[1:]) and len(mine) >= 2
    assert all(
        not set(r["rejected_by_reason"]) & {"late", "wrong_model_version", "unknown_task"}
        for r in audit.rounds
    )
    model = handle.runner.model
    assert model is not None and model.manifest.model_version >= 3


# ------------------------------------------------------------------ late, duplicate, replayed


def test_late_duplicate_and_replayed_updates_are_rejected_and_counted(
    mosquitto: MosquittoBroker, tmp_path: Path, fleet: AgentFleet, coordinators: Coordinators
) -> None:
    # Prepare: K = 2 of 3 selected; each agent trains only when the test allows it.
    shards, test = digits_shards(3)
    gates = {f"pi-{i:02d}": TrainingGate() for i in range(3)}
    for i, (cid, gate) in enumerate(gates.items()):
        fleet.start(cid, shards[i], seed=i, gate=gate)
    sniffer = _client(mosquitto, "sniffer")
    sniffer.subscribe(TOPICS.all_updates())
    snooper = _client(mosquitto, "snooper")  # reads pi-02's tasks, to play an old agent
    snooper.subscribe(TOPICS.task("pi-02"))
    cfg = coordinator_config(
        mosquitto.url,
        tmp_path / "c.db",
        rounds={"clients_per_round": 2, "over_selection": 1.5, "deadline_s": 30.0},
    )
    coord = coordinators.thread(cfg, evaluate=evaluator(test))
    machine = coord.coordinator.machine
    wait_for(lambda: all(g.waiting == 1 for g in gates.values()), 20, "3 agents training")
    try:
        # pi-00 uploads; keep its chunks as an eavesdropper would.
        gates["pi-00"].allow()
        chunks: list[bytes] = []
        reasm = Reassembler(1 << 24, 60.0)
        envelope = None
        while envelope is None:
            msg = sniffer.receive(10.0)
            assert msg is not None, "pi-00's update never appeared"
            chunks.append(msg.payload)
            envelope = reasm.feed("pi-00", msg.payload, 0.0)
        wait_for(lambda: machine.stats.participants == 1, 10, "pi-00's update counted")
        topic = TOPICS.update("pi-00")

        def resend_new_transfer() -> None:
            publish_chunked(sniffer, topic, envelope, chunk_size=len(chunks[0]))

        # Execute 1: a QoS-1 style redelivery of the same chunks, then a re-chunked copy.
        for c in chunks:
            sniffer.publish(topic, c, qos=1)
        resend_new_transfer()
        wait_for(lambda: machine.stats.rejected["duplicate"] == 1, 10, "duplicate counted")
        assert coord.coordinator.reassembler.stats.duplicates >= len(chunks)
        # Execute 2: pi-01 completes the round; pi-02 (over-selected) is told to stop. An
        # agent that predates the cancel would upload anyway: its update comes too late.
        gates["pi-01"].allow()
        coord.wait_rounds(1, 20)
        straggler = fleet.handle("pi-02").runner
        wait_for(lambda: straggler.stats.tasks_cancelled == 1, 10, "pi-02's task cancelled")
        msg = snooper.receive(10.0)
        assert msg is not None, "pi-02's task never appeared"
        old_task = TrainTask.from_bytes(msg.payload)
        assert old_task.round_no == 1
        _publish_update(sniffer, "pi-02", old_task)
        wait_for(lambda: machine.stats.rejected["late"] == 1, 10, "late counted")
        assert straggler.stats.updates_sent == 0  # its gate never opened
        # Execute 3: replay pi-00's counted round-1 update in round 2.
        resend_new_transfer()
        wait_for(lambda: machine.stats.rejected["replayed"] == 1, 10, "replay counted")
    finally:
        for g in gates.values():
            g.open()
        sniffer.close()
        snooper.close()
    coord.stop()
    # Assert: round 1 counted pi-00 once; nothing rejected was folded.
    audit = audit_store(tmp_path / "c.db")
    assert audit.rounds[0]["participants"] == 2
    assert audit.rounds[0]["rejected_by_reason"] == {"duplicate": 1}
    assert sorted(c for _t, r, c in audit.accepted if r == 1) == ["pi-00", "pi-01"]
    assert ModelUpdate.from_bytes(envelope).round_no == 1


# ------------------------------------------------------------------ agent restart


def test_agent_restarted_without_last_will_loses_its_task_and_is_asked_again(
    mosquitto: MosquittoBroker, tmp_path: Path, fleet: AgentFleet, coordinators: Coordinators
) -> None:
    # Prepare: K = 3 of 3 devices and a 300 s deadline. pi-00 has no Last Will, so its reboot
    # is not announced: the coordinator sees "training <task>" and then, from the new
    # process, "idle" with no task.
    shards, test = digits_shards(3)
    gate = TrainingGate()
    for i, shard in enumerate(shards):
        fleet.start(f"pi-{i:02d}", shard, seed=i, gate=gate, last_will=(i != 0))
    cfg = coordinator_config(mosquitto.url, tmp_path / "c.db", rounds={"deadline_s": 300.0})
    coord = coordinators.thread(cfg, evaluate=evaluator(test), max_rounds=1)
    machine = coord.coordinator.machine
    wait_for(lambda: gate.waiting == 3, 20, "three agents training round 1")
    held = fleet.handle("pi-00").runner.machine.task
    assert held is not None
    wait_for(lambda: held.task_id in machine.acknowledged, 10, "pi-00's task acknowledged")
    # Execute: pi-00 reboots mid-training; then everybody may train.
    fleet.crash(["pi-00"])
    fleet.start("pi-00", shards[0], seed=0, gate=gate, last_will=False)
    gate.open()
    record = coord.wait_rounds(1, 60)[0]  # far below the deadline: the round did not wait
    coord.wait_stopped(15)
    # Assert: the lost task was dropped and pi-00 itself got a fresh task of round 1.
    assert record["outcome"] == "aggregated" and record["reason"] == "target"
    assert (record["participants"], record["selected"]) == (3, 4)
    assert (record["dropped"], record["lost"], record["replaced"]) == (1, 1, 1)
    assert record["declined"] == 0 and record["timed_out"] == 0
    audit = audit_store(tmp_path / "c.db")
    counted = {c: t for t, _r, c in audit.accepted}
    assert sorted(counted) == ["pi-00", "pi-01", "pi-02"]
    assert counted["pi-00"] != held.task_id
    assert not audit.rounds[0]["rejected_by_reason"]


def test_agent_restarted_mid_training_keeps_residual_and_cache(
    mosquitto: MosquittoBroker, tmp_path: Path, fleet: AgentFleet, coordinators: Coordinators
) -> None:
    # Prepare: error feedback on; round 1 leaves a residual on every device.
    shards, test = digits_shards(3)
    gate = TrainingGate()
    for i, shard in enumerate(shards):
        fleet.start(f"pi-{i:02d}", shard, seed=i, gate=gate)
    cfg = coordinator_config(
        mosquitto.url,
        tmp_path / "c.db",
        rounds={"deadline_s": 4.0},
        uplink={"codec": "int8", "error_feedback": True},
    )
    coord = coordinators.thread(cfg, evaluate=evaluator(test))
    gate.allow(3)
    coord.wait_rounds(1, 20)
    residual = fleet.state_dir("pi-00") / "residual.npz"
    saved = hashlib.sha256(residual.read_bytes()).hexdigest()
    # Execute: round 2 starts; pi-00 is killed mid-training and started again.
    wait_for(lambda: gate.waiting == 3, 20, "round 2 training")
    fleet.crash(["pi-00"])
    assert hashlib.sha256(residual.read_bytes()).hexdigest() == saved
    handle = fleet.start("pi-00", shards[0], seed=0, gate=gate)
    runner = handle.runner
    wait_for(lambda: runner.model is not None, 10, "the restarted agent to load its cache")
    assert runner.model is not None and runner.model.manifest.model_version == 1
    gate.open()
    wait_for(lambda: len(coord.records) >= 3, 40, "rounds 2 and 3")
    coord.stop()
    fleet.stop(["pi-00"])  # its residual is written after the PUBACK: let that finish
    # Assert: the cache was used (no download of version 1), no update for the killed task,
    # and its next real update advanced the residual.
    assert runner.stats.models_loaded >= 1  # only versions after 1 were downloaded
    round2 = coord.records[1]
    assert round2["participants"] == 2 and round2["outcome"] == "aggregated"
    audit = audit_store(tmp_path / "c.db")
    mine = sorted(r for _t, r, c in audit.accepted if c == "pi-00")
    assert 2 not in mine and mine[0] == 1 and max(mine) >= 3
    assert hashlib.sha256(residual.read_bytes()).hexdigest() != saved
    assert all(not r["rejected_by_reason"] for r in audit.rounds)
