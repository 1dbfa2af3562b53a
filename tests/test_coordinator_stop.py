"""A stopped coordinator keeps what it learnt: acknowledgements since its last tick and the
updates folded into the open round (in-memory broker)."""

from __future__ import annotations

import threading
from collections.abc import Mapping
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from edge.modelio import unpack_model
from edge.transport import InMemoryBroker, InMemoryTransport
from edge.wire import GlobalModel, Status, Topics, TrainTask
from server_stub.config import config_from_dict
from server_stub.coordinator import Coordinator
from server_stub.rounds import RoundState
from server_stub.store import Store
from tests.test_coordinator_e2e import FLEET, make_config, publish_update, status

NOW = 1_700_000_000.0


def deliver(coord: Coordinator, transport: InMemoryTransport, now: float = NOW) -> None:
    """Hand every message queued for the coordinator to it, as its run loop would."""
    while (msg := transport.receive(0.0)) is not None:
        coord.handle_message(msg, now)


def test_clean_stop_stores_the_acknowledgements_seen_since_the_last_tick(tmp_path: Path) -> None:
    # Prepare: one device, a round of one; the device takes its task and says so.
    broker = InMemoryBroker()
    raw = make_config("mqtt://127.0.0.1:1883", tmp_path / "c.db", clients_per_round=1)
    raw.update(tick_s=60.0, startup_grace_s=0.0)
    config = config_from_dict(raw)
    layout, weights = config.layout_and_weights()
    topics = Topics(FLEET)
    device = broker.connect("pi-00")
    device.subscribe(topics.task("pi-00"))
    idle: Status = status(100)
    device.publish(topics.status("pi-00"), idle.to_bytes(), retain=True)
    transport = broker.connect("coord")
    with Store(tmp_path / "c.db") as store:
        coord = Coordinator(
            config, transport, store, layout=layout, initial_weights=weights, clock=lambda: NOW
        )
        coord.start()
        deliver(coord, transport)
        coord.tick(NOW)  # starts round 1 and sends the task
        msg = device.receive(1.0)
        assert msg is not None
        task = TrainTask.from_bytes(msg.payload)
        training = replace(idle, state="training", task_id=task.task_id)
        device.publish(topics.status("pi-00"), training.to_bytes(), retain=True)
        deliver(coord, transport)
        saved = store.open_round()
        assert saved is not None and saved["acknowledged"] == []  # stored at the next tick
        # Execute: stop before that tick.
        stop = threading.Event()
        stop.set()
        coord.run(stop)
        # Assert
        saved = store.open_round()
    assert saved is not None and saved["acknowledged"] == [task.task_id]


def _upload(
    device: InMemoryTransport,
    cid: str,
    task: TrainTask,
    weights: Mapping[str, np.ndarray],
    seed: int,
) -> None:
    """Publish ``cid``'s update for ``task``: a pseudo-random delta fixed by ``seed``."""
    rng = np.random.default_rng(seed)
    delta = {k: rng.normal(0.0, 0.01, v.shape).astype(np.float32) for k, v in weights.items()}
    publish_update(device, cid, task, delta, num_examples=90 + seed, loss=1.0 + seed)


def _round_of_two(
    tmp_path: Path, *, restart: bool, mode: str = "sync"
) -> tuple[dict[str, np.ndarray], list[str]]:
    """Round 1 of two devices (async: a FedBuff buffer of two); pi-00 uploads first, then
    (``restart``) the coordinator stops and a new one opens the same store, then pi-01
    uploads. Returns the new model and the task ids each device was sent."""
    broker = InMemoryBroker()
    raw = make_config("mqtt://127.0.0.1:1883", tmp_path / "c.db", clients_per_round=2)
    raw["rounds"].update(deadline_s=300.0, mode=mode, concurrency=2)
    if mode == "async":
        raw["strategy"].update(name="fedbuff", buffer_size=2)
    raw.update(tick_s=60.0, startup_grace_s=0.0)
    config = config_from_dict(raw)
    layout, weights = config.layout_and_weights()
    topics = Topics(FLEET)
    devices = {cid: broker.connect(cid) for cid in ("pi-00", "pi-01")}
    for cid, dev in devices.items():
        dev.subscribe(topics.task(cid))
        dev.publish(topics.status(cid), status(100).to_bytes(), retain=True)
    store = Store(tmp_path / "c.db")

    def coordinator() -> tuple[Coordinator, InMemoryTransport]:
        transport = broker.connect("coord")
        coord = Coordinator(
            config, transport, store, layout=layout, initial_weights=weights, clock=lambda: NOW
        )
        return coord, transport

    coord, transport = coordinator()
    coord.start()
    deliver(coord, transport)
    coord.tick(NOW)  # round 1 starts: one task each
    tasks: dict[str, TrainTask] = {}
    for cid, dev in devices.items():
        msg = dev.receive(1.0)
        assert msg is not None
        tasks[cid] = TrainTask.from_bytes(msg.payload)
    # pi-00 takes its task (status names it), uploads, and is idle again, as the agent does.
    dev0 = devices["pi-00"]
    training = replace(status(100), state="training", task_id=tasks["pi-00"].task_id)
    dev0.publish(topics.status("pi-00"), training.to_bytes(), retain=True)
    _upload(dev0, "pi-00", tasks["pi-00"], weights, seed=0)
    dev0.publish(topics.status("pi-00"), status(100).to_bytes(), retain=True)
    deliver(coord, transport)
    assert coord.machine.stats.participants == 1
    done = threading.Event()
    if restart:
        stopped = threading.Event()
        stopped.set()
        coord.run(stopped)  # a clean stop (closes the transport; the store stays open)
        coord, transport = coordinator()
        assert coord.machine.state is RoundState.COLLECTING
        assert coord.machine.stats.participants == 1  # pi-00's update is kept
    runner = threading.Thread(target=coord.run, args=(done,), kwargs={"max_rounds": 1})
    runner.start()
    _upload(devices["pi-01"], "pi-01", tasks["pi-01"], weights, seed=1)
    runner.join(30.0)
    done.set()
    runner.join(5.0)
    assert not runner.is_alive()
    sent = [t.task_id for t in tasks.values()]
    for cid, dev in devices.items():
        while (msg := dev.receive(0.0)) is not None:
            sent.append(f"{cid}:{TrainTask.from_bytes(msg.payload).task_id}")
    rounds = store.rounds()
    stored = store.latest_model()
    accepted = store.accepted_tasks()
    store.close()
    assert [(r["round"], r["outcome"], r["participants"]) for r in rounds] == [(1, "aggregated", 2)]
    assert sorted(t for t, _r, _c in accepted) == sorted(t.task_id for t in tasks.values())
    assert stored is not None and stored.version == 1
    return unpack_model(GlobalModel.from_bytes(stored.envelope)), sent


@pytest.mark.parametrize("mode", ["sync", "async"])
def test_updates_folded_before_a_restart_are_folded_again_not_asked_again(
    tmp_path: Path, mode: str
) -> None:
    # Execute: the same round, once straight through and once with a coordinator restart
    # between the two uploads.
    straight, sent_straight = _round_of_two(tmp_path / "straight", restart=False, mode=mode)
    resumed, sent_resumed = _round_of_two(tmp_path / "resumed", restart=True, mode=mode)
    # Assert: nobody was asked to train again (pi-00's idle status after its upload does not
    # make its task lost: the update is kept), and the model is the same, bit for bit (the
    # kept update is folded in again first, in the order it arrived).
    assert len(sent_resumed) == len(sent_straight)
    assert len(sent_straight) == (2 if mode == "sync" else 3)  # async refills pi-00's slot
    assert straight.keys() == resumed.keys()
    for name in straight:
        np.testing.assert_array_equal(straight[name], resumed[name])


def test_each_start_on_a_store_draws_its_own_stream_a_fresh_one_the_seeds(tmp_path: Path) -> None:
    # A fixed seed (0 here) makes a fresh run reproducible; a restart must not repeat the
    # selections and task ids of the first start (they would collide in a reopened round).
    raw = make_config("mqtt://127.0.0.1:1883", tmp_path / "c.db")
    config = config_from_dict(raw)
    layout, weights = config.layout_and_weights()
    broker = InMemoryBroker()
    draws = []
    with Store(tmp_path / "c.db") as store:
        for _ in range(3):
            coord = Coordinator(
                config, broker.connect("coord"), store, layout=layout, initial_weights=weights
            )
            draws.append(int(coord.machine.rng.integers(0, 2**63)))
            coord.close()
    assert draws[0] == int(np.random.default_rng(0).integers(0, 2**63))
    assert len(set(draws)) == 3


def test_two_state_dbs_never_issue_the_same_task_ids(tmp_path: Path) -> None:
    # Same seed, two fresh state dbs (a redeployment): devices that served the first would
    # ignore a repeated task id as a redelivery, so the ids must differ.
    ids = []
    for name in ("first", "second"):
        config = config_from_dict(make_config("mqtt://127.0.0.1:1883", tmp_path / name / "c.db"))
        layout, weights = config.layout_and_weights()
        with Store(tmp_path / name / "c.db") as store:
            coord = Coordinator(
                config, InMemoryBroker().connect("coord"), store, layout=layout,
                initial_weights=weights,
            )  # fmt: skip
            coord.close()
        ids.append(coord.machine.task_id_salt)
    assert all(len(salt) == 6 for salt in ids) and ids[0] != ids[1]
