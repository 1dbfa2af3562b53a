"""A clean stop of the coordinator keeps what it learnt since its last tick (in-memory broker)."""

from __future__ import annotations

import threading
from dataclasses import replace
from pathlib import Path

from edge.transport import InMemoryBroker, InMemoryTransport
from edge.wire import Status, Topics, TrainTask
from server_stub.config import config_from_dict
from server_stub.coordinator import Coordinator
from server_stub.store import Store
from tests.test_coordinator_e2e import FLEET, make_config, status

NOW = 1_700_000_000.0


def _deliver(coord: Coordinator, transport: InMemoryTransport) -> None:
    """Hand every message queued for the coordinator to it, as its run loop would."""
    while (msg := transport.receive(0.0)) is not None:
        coord.handle_message(msg, NOW)


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
        _deliver(coord, transport)
        coord.tick(NOW)  # starts round 1 and sends the task
        msg = device.receive(1.0)
        assert msg is not None
        task = TrainTask.from_bytes(msg.payload)
        training = replace(idle, state="training", task_id=task.task_id)
        device.publish(topics.status("pi-00"), training.to_bytes(), retain=True)
        _deliver(coord, transport)
        saved = store.open_round()
        assert saved is not None and saved["acknowledged"] == []  # stored at the next tick
        # Execute: stop before that tick.
        stop = threading.Event()
        stop.set()
        coord.run(stop)
        # Assert
        saved = store.open_round()
    assert saved is not None and saved["acknowledged"] == [task.task_id]
