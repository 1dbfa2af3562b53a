"""Stragglers: a device still training when its round closes is told to stop (real mosquitto,
real agents, real coordinator)."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.broker import MosquittoBroker
from tests.reliability.harness import (
    AgentFleet,
    Coordinators,
    TrainingGate,
    audit_store,
    coordinator_config,
    digits_shards,
    wait_for,
)

pytestmark = pytest.mark.broker


def test_straggler_of_a_closed_round_stops_training_and_uploads_nothing(
    mosquitto: MosquittoBroker, tmp_path: Path, fleet: AgentFleet, coordinators: Coordinators
) -> None:
    # Prepare: K = 2 of 3 asked (over-selection 1.5). Two devices train at once; the third is
    # held at its gate, mid-task, until the round has closed without it.
    shards, _test = digits_shards(3)
    fast = TrainingGate()
    fast.open()
    slow = TrainingGate()
    for i, shard in enumerate(shards):
        fleet.start(f"pi-{i:02d}", shard, seed=i, gate=slow if i == 2 else fast)
    cfg = coordinator_config(
        mosquitto.url,
        tmp_path / "c.db",
        rounds={"clients_per_round": 2, "over_selection": 1.5, "min_devices": 3,
                "deadline_s": 60.0},
    )  # fmt: skip
    coord = coordinators.thread(cfg, max_rounds=1)
    # Execute: round 1 closes with the two fast updates while pi-02 waits at its gate.
    wait_for(lambda: slow.waiting == 1, 20, "pi-02 to start training")
    records = coord.wait_rounds(1, 30)
    coord.wait_stopped(15)
    # Assert: the coordinator withdrew pi-02's task; pi-02 stopped at once (its gate polls the
    # same stop check as every batch), declined it as cancelled and sent nothing.
    straggler = fleet.handle("pi-02").runner
    wait_for(lambda: straggler.stats.tasks_cancelled == 1, 10, "pi-02 to see the cancel")
    wait_for(lambda: slow.waiting == 0, 10, "pi-02 to leave its gate")
    assert records[0]["participants"] == 2 and records[0]["cancelled"] == 1
    assert straggler.stats.updates_sent == 0 and straggler.stats.trainings == 0
    wait_for(lambda: straggler.stats.declined["cancelled"] == 1, 10, "pi-02's decline")
    audit_store(tmp_path / "c.db")
