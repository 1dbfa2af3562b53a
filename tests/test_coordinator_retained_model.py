"""``fedge coordinator`` refuses a broker that holds a newer model of its fleet, retained.

Devices load only increasing model versions (replay protection), so a coordinator whose state
db is older than the fleet's retained model (an earlier deployment, another coordinator's db)
would publish a version no device that saw the newer one takes: the fleet would stall. The
check reads the retained manifest after connecting and before the coordinator republishes its
own. Each test starts its own mosquitto; a coordinator that starts stops at once, since its
state db already holds round ``rounds_total``.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import pytest

from edge.mqtt_transport import connect_url
from edge.transport import InMemoryBroker, Message
from edge.wire import ModelManifest, Topics
from server_stub import cli
from server_stub.config import load_config
from server_stub.store import Store
from tests.broker import MosquittoBroker
from tests.test_coordinator_config import EXAMPLE, checkpoint_example_model, edited, run_main

# Without the check, a coordinator on a fresh state db would wait for devices forever.
pytestmark = [pytest.mark.broker, pytest.mark.timeout(30)]

TOPICS = Topics("lab")  # the example config's fleet
MANIFEST = TOPICS.model_manifest()
OLD_TRANSFER = "ab" * 16


def manifest(version: int, chunk_count: int = 3) -> bytes:
    """The manifest an earlier deployment left retained (its chunks do not matter here)."""
    return ModelManifest(
        model_version=version, transfer_id=OLD_TRANSFER, chunk_count=chunk_count,
        total_len=1000, sha256="cd" * 32,
    ).to_bytes()  # fmt: skip


def retain(broker: MosquittoBroker, payload: bytes) -> None:
    with connect_url(broker.url, client_id="earlier-deployment") as transport:
        transport.publish(MANIFEST, payload, retain=True)


def retained_manifest(broker: MosquittoBroker) -> ModelManifest:
    with connect_url(broker.url, client_id="probe") as transport:
        transport.subscribe(MANIFEST)
        msg = transport.receive(5.0)
    assert msg is not None and msg.retain, "no retained manifest on the broker"
    return ModelManifest.from_bytes(msg.payload)


def config(tmp_path: Path, broker: MosquittoBroker, db_version: int | None) -> Path:
    """The example config on ``broker``; the state db holds version ``db_version`` (made by
    round ``db_version``, which ``rounds_total`` is set to), or nothing for None."""
    if db_version is not None:
        with Store(tmp_path / "coordinator.db") as store:
            checkpoint_example_model(store, db_version)
    return edited(
        tmp_path,
        'url = "mqtt://127.0.0.1:1883"',
        f'url = "{broker.url}"',
        ("rounds_total = 50", f"rounds_total = {db_version or 1}"),
    )


@pytest.mark.parametrize("db_version", [None, 2], ids=["fresh-db", "older-db"])
def test_a_newer_retained_model_exits_2_and_leaves_broker_and_db_alone(
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    mosquitto: MosquittoBroker,
    db_version: int | None,
) -> None:
    # Prepare: an earlier deployment of fleet lab left version 5 (3 chunks) on the broker
    retain(mosquitto, manifest(5, chunk_count=3))
    path = config(tmp_path, mosquitto, db_version)
    db = tmp_path / "coordinator.db"
    # Execute
    code, err = run_main(path, capsys)
    # Assert: one line naming the fleet, both versions, the db and the fixes
    assert code == 2
    assert err.count("\n") == 1
    fresh = " (new, no checkpoint)" if db_version is None else ""
    assert err.startswith(
        f"fedge coordinator: fleet 'lab': the broker at {mosquitto.url} holds model version 5 "
        f"(retained on {MANIFEST}), newer than version {db_version or 0} of state db {db}{fresh}; "
        "devices load only increasing versions, so those that saw version 5 would decline "
        "every task (model_unavailable). Start from the state db that published version 5, "
        "or use a new fleet id (`fleet`, here and in the agents' configs), or, if no device "
        "has loaded version 5 yet, clear the fleet's retained model: mosquitto_pub -r -n -t "
        f"{MANIFEST}, and the same for its chunks fl/v1/lab/model/5/0 to fl/v1/lab/model/5/2 ("
    )
    # ... and the evidence is kept: the broker still holds version 5, the db got no checkpoint
    assert retained_manifest(mosquitto) == ModelManifest.from_bytes(manifest(5, chunk_count=3))
    with Store(db, read_only=True) as store:
        latest = store.latest_model()
    assert (latest.version if latest is not None else None) == db_version


def test_the_same_retained_version_is_a_restart(
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    caplog: pytest.LogCaptureFixture,
    mosquitto: MosquittoBroker,
) -> None:
    # Prepare: the broker holds version 5, which this state db published
    retain(mosquitto, manifest(5))
    path = config(tmp_path, mosquitto, 5)
    caplog.set_level(logging.INFO)
    # Execute
    code, err = run_main(path, capsys)
    # Assert: no warning; the coordinator started and published version 5 again
    assert code == 0, err
    assert "the broker holds model version 5 of fleet lab; this state db publishes 5" in caplog.text
    assert [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING] == []
    again = retained_manifest(mosquitto)
    assert (again.model_version, again.transfer_id != OLD_TRANSFER) == (5, True)


def test_without_a_retained_model_it_starts_after_the_bound(
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    caplog: pytest.LogCaptureFixture,
    mosquitto: MosquittoBroker,
) -> None:
    # Prepare: a broker that lost its retained messages (or a first deployment)
    path = config(tmp_path, mosquitto, 5)
    caplog.set_level(logging.INFO)
    started = time.monotonic()
    # Execute
    code, err = run_main(path, capsys)
    # Assert: it waited no longer than the quiet bound (nothing else arrives here)
    elapsed = time.monotonic() - started
    assert code == 0, err
    assert "no retained model of fleet lab on the broker (waited 2." in caplog.text
    assert elapsed < cli.RETAINED_MODEL_QUIET_S + 3.0
    assert retained_manifest(mosquitto).model_version == 5


@pytest.mark.parametrize(
    "payload",
    [b"not json", b'{"v": 1, "model_version": 9}'],
    ids=["not-json", "missing-fields"],
)
def test_a_malformed_retained_manifest_is_a_warning_and_replaced(
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    caplog: pytest.LogCaptureFixture,
    mosquitto: MosquittoBroker,
    payload: bytes,
) -> None:
    # Prepare
    retain(mosquitto, payload)
    path = config(tmp_path, mosquitto, 5)
    # Execute
    code, err = run_main(path, capsys)
    # Assert
    assert code == 0, err
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1
    assert warnings[0].startswith(f"the retained model manifest on {MANIFEST} is not valid (")
    assert retained_manifest(mosquitto).model_version == 5


def test_messages_taken_off_while_waiting_reach_the_coordinator_first() -> None:
    # Prepare: the coordinator's persistent session holds a status sent while it was down,
    # ahead of the retained manifest the check subscribes to.
    broker = InMemoryBroker()
    broker.connect("earlier-deployment").publish(MANIFEST, manifest(5), retain=True)
    transport = broker.connect("fedge-coordinator")
    transport.subscribe(TOPICS.all_status())
    broker.connect("pi-01").publish(TOPICS.status("pi-01"), b"{}")
    # Execute
    handed = cli._check_retained_model(
        transport, load_config(EXAMPLE), "c.db", 5, fresh=False, url="memory"
    )
    # Assert: the status comes out first; the manifest the check consumed does not
    assert handed.receive(0.0) == Message(TOPICS.status("pi-01"), b"{}")
    assert handed.receive(0.0) is None
