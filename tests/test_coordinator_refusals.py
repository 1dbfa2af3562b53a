"""A device whose updates keep being refused for its own fault is held back (in-memory
broker; the coordinator's own code end to end)."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest

from edge.transport import InMemoryBroker, InMemoryTransport
from edge.wire import Status, Topics, TrainTask
from server_stub.config import config_from_dict
from server_stub.coordinator import Coordinator
from server_stub.store import Store
from tests.test_coordinator_e2e import FLEET, make_config, publish_update, status
from tests.test_coordinator_stop import deliver

NOW = 1_700_000_000.0
TOPICS = Topics(FLEET)
_CONFIG = config_from_dict(make_config("mqtt://127.0.0.1:1883", Path("c.db")))


def _upload_signed(device: InMemoryTransport, task: TrainTask, key: bytes) -> None:
    """pi-00's update for ``task``, signed with ``key``."""
    _layout, weights = _CONFIG.layout_and_weights()
    zeros = {k: np.zeros_like(v) for k, v in weights.items()}
    publish_update(device, "pi-00", task, zeros, num_examples=50, key=key)


def test_device_with_a_wrong_key_is_held_back_until_it_restarts(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # Prepare: signatures required; the coordinator knows pi-00's key, pi-00 signs with
    # another one (a device provisioned with the wrong key file).
    keys = tmp_path / "keys"
    keys.mkdir()
    (keys / "pi-00.key").write_text((b"\x01" * 32).hex())
    raw = make_config("mqtt://127.0.0.1:1883", tmp_path / "c.db", clients_per_round=1)
    raw["rounds"].update(min_devices=1, deadline_s=60.0)
    raw["validation"].update(require_signature=True, hmac_keys_dir=str(keys))
    raw.update(tick_s=60.0, startup_grace_s=0.0)
    config = config_from_dict(raw)
    layout, weights = config.layout_and_weights()
    broker = InMemoryBroker()
    device = broker.connect("pi-00")
    device.subscribe(TOPICS.task("pi-00"))
    device.publish(TOPICS.status("pi-00"), status(100).to_bytes(), retain=True)
    transport = broker.connect("coord")
    tasks: list[TrainTask] = []

    def next_task() -> TrainTask | None:
        msg = device.receive(0.0)
        return None if msg is None else TrainTask.from_bytes(msg.payload)

    with Store(tmp_path / "c.db") as store:
        coord = Coordinator(
            config, transport, store, layout=layout, initial_weights=weights, clock=lambda: NOW
        )
        coord.start()
        deliver(coord, transport, NOW)
        # Execute: two rounds, each refused bad_signature.
        for i in range(2):
            coord.tick(NOW + i)
            task = next_task()
            assert task is not None, f"no task in round {i + 1}"
            tasks.append(task)
            with caplog.at_level(logging.WARNING, logger="server_stub.coordinator"):
                _upload_signed(device, task, b"\x02" * 32)
                deliver(coord, transport, NOW + i)
        # Assert: held back after the second refusal, with a warning that names the fix.
        assert [r["outcome"] for r in store.rounds()] == ["abandoned", "abandoned"]
        assert store.rounds()[0]["dropped_by_reason"] == {"invalid_update:bad_signature": 1}
        warning = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
        assert (
            "round 1 abandoned (every selected device dropped out before quorum: "
            "invalid_update:bad_signature x1); keeping model version 0"
        ) in warning
        assert any(
            "device pi-00: 2 updates in a row refused (bad_signature); not asking it for 60 s" in m
            for m in warning
        ), warning
        coord.tick(NOW + 10)
        assert next_task() is None and coord.registry.eligible(NOW + 10) == []
        # ... until its agent restarts (Last Will, then online again), e.g. with a new key.
        device.publish(TOPICS.status("pi-00"), Status.offline_will().to_bytes(), retain=True)
        device.publish(TOPICS.status("pi-00"), status(100).to_bytes(), retain=True)
        deliver(coord, transport, NOW + 11)
        coord.tick(NOW + 11)
        again = next_task()
        coord.close()
    assert again is not None and again.task_id not in {t.task_id for t in tasks}
