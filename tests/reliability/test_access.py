"""Access control with the production broker setup: TLS only, a password per account, the ACL.

The broker mirrors ``deploy/mosquitto/prod.conf`` (TLS listener, ``allow_anonymous false``,
``password_file``, ``acl_file``, ``max_packet_size``) and loads the **shipped**
``deploy/mosquitto/acl`` file, so the ACL under test is the one operators install.
Certificates come from the ``test_pki`` fixture. Everything crosses a real mosquitto.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from edge.mqtt_transport import MqttSettings, MqttTransport
from edge.transport import (
    BadCredentialsError,
    ConnectError,
    Message,
    PublishNotAuthorizedError,
)
from edge.wire import Topics
from tests.broker import MosquittoBroker, TlsFiles
from tests.reliability.harness import (
    FLEET,
    AgentFleet,
    Coordinators,
    coordinator_config,
    digits_shards,
    wait_for,
)

pytestmark = [pytest.mark.broker, pytest.mark.timeout(120)]

REPO = Path(__file__).resolve().parents[2]
SHIPPED_ACL = (REPO / "deploy" / "mosquitto" / "acl").read_text()
PASSWORDS = {
    "coordinator": "coord-Zq8vL2pX9w",
    "pi-01": "dev1-Hk3nR7tY5m",
    "pi-02": "dev2-Wb6cJ4sQ1e",
}
"""Distinctive strings, so a leak into any log is found by a plain substring search."""
KEYS = {"pi-01": bytes.fromhex("5a" * 16 + "c3" * 16), "pi-02": bytes.fromhex("7e" * 32)}
"""The coordinator's per-device HMAC keys."""
WRONG_KEY = bytes.fromhex("0f" * 32)
T = Topics(FLEET)
FAST = {"reconnect_min_delay_s": 0.05, "reconnect_max_delay_s": 0.5, "connect_timeout_s": 5.0}


@pytest.fixture
def broker(
    mosquitto_factory: Callable[..., MosquittoBroker], test_pki: TlsFiles
) -> MosquittoBroker:
    """TLS + passwords + the shipped ACL, logging everything mosquitto can log."""
    return mosquitto_factory(
        users=PASSWORDS,
        acl=SHIPPED_ACL,
        tls=test_pki,
        extra_config=["max_packet_size 4000000", "log_type all"],
    )


@pytest.fixture
def connect(broker: MosquittoBroker, test_pki: TlsFiles) -> Iterator[Callable[..., MqttTransport]]:
    """Connect as one of the accounts over TLS; every client is closed at teardown."""
    clients: list[MqttTransport] = []

    def make(user: str | None, *, password: str | None = None, **over: Any) -> MqttTransport:
        settings: dict[str, Any] = {
            "host": broker.host, "port": broker.port, "client_id": user or "anonymous",
            "tls": True, "ca_certs": str(test_pki.ca_cert), **FAST, **over,
        }  # fmt: skip
        if user is not None:
            settings.update(username=user, password=password or PASSWORDS[user])
        client = MqttTransport(MqttSettings(**settings))
        clients.append(client)
        return client

    yield make
    for client in clients:
        client.close()


def drain(t: MqttTransport, until_topic: str, timeout: float = 5.0) -> list[Message]:
    """Every message up to and including the first one on ``until_topic`` (a barrier)."""
    got: list[Message] = []
    deadline = time.monotonic() + timeout
    while (left := deadline - time.monotonic()) > 0:
        msg = t.receive(left)
        if msg is None:
            continue
        got.append(msg)
        if msg.topic == until_topic:
            return got
    pytest.fail(f"no message on {until_topic} within {timeout} s; got {[m.topic for m in got]}")


# ------------------------------------------------------------------ connecting


def test_client_without_credentials_is_refused(connect: Callable[..., MqttTransport]) -> None:
    with pytest.raises(BadCredentialsError) as info:
        connect(None)
    assert info.value.rc in (0x86, 0x87)


def test_wrong_password_is_refused(connect: Callable[..., MqttTransport]) -> None:
    with pytest.raises(BadCredentialsError):
        connect("pi-01", password=PASSWORDS["pi-02"])


def test_plain_tcp_to_the_tls_listener_is_refused(broker: MosquittoBroker) -> None:
    # Valid credentials, but no TLS: the broker never completes an MQTT handshake.
    settings = MqttSettings(
        host=broker.host, port=broker.port, client_id="pi-01", username="pi-01",
        password=PASSWORDS["pi-01"], tls=False, **FAST,  # type: ignore[arg-type]
    )  # fmt: skip
    with pytest.raises(ConnectError):
        MqttTransport(settings)


# ------------------------------------------------------------------ the ACL


@pytest.mark.parametrize("leaf", ["update", "status"])
def test_device_cannot_publish_on_another_devices_topic(
    connect: Callable[..., MqttTransport], leaf: str
) -> None:
    # Prepare
    coord, dev1, _dev2 = connect("coordinator"), connect("pi-01"), connect("pi-02")
    coord.subscribe(f"fl/v1/{FLEET}/clients/+/{leaf}")
    theirs, mine = f"fl/v1/{FLEET}/clients/pi-02/{leaf}", f"fl/v1/{FLEET}/clients/pi-01/{leaf}"
    # Execute + Assert: MQTT 5 PUBACK 0x87 "not authorized" becomes an exception
    with pytest.raises(PublishNotAuthorizedError) as info:
        dev1.publish(theirs, b"forged")
    assert info.value.rc == 0x87
    # Its own topic works; up to that barrier, the coordinator saw nothing forged.
    dev1.publish(mine, b"genuine")
    assert [m.topic for m in drain(coord, mine)] == [mine]


def test_device_cannot_read_another_devices_tasks(connect: Callable[..., MqttTransport]) -> None:
    # Prepare: pi-01 tries both the exact topic of pi-02 and a wildcard over every task
    coord, dev1, dev2 = connect("coordinator"), connect("pi-01"), connect("pi-02")
    dev1.subscribe(T.task("pi-02"))  # Mosquitto 2 grants it, then delivers nothing
    dev1.subscribe(f"fl/v1/{FLEET}/clients/+/task")
    dev2.subscribe(T.task("pi-02"))
    # Execute
    coord.publish(T.task("pi-02"), b"task for pi-02")
    coord.publish(T.task("pi-01"), b"task for pi-01")
    # Assert: pi-02 gets its task; pi-01 gets only its own (which arrives after pi-02's)
    assert drain(dev2, T.task("pi-02"))[-1].payload == b"task for pi-02"
    assert [(m.topic, m.payload) for m in drain(dev1, T.task("pi-01"))] == [
        (T.task("pi-01"), b"task for pi-01")
    ]


def test_device_cannot_publish_tasks_or_models(connect: Callable[..., MqttTransport]) -> None:
    dev1 = connect("pi-01")
    for topic in (T.task("pi-01"), T.task("pi-02"), T.model_manifest(), T.model_chunk(9, 0)):
        with pytest.raises(PublishNotAuthorizedError):
            dev1.publish(topic, b"forged")


# ------------------------------------------------------------------ HMAC, with real processes


def _run_signed_round(
    broker: MosquittoBroker, test_pki: TlsFiles, tmp_path: Path, coordinators: Coordinators
) -> tuple[dict[str, Any], dict[str, int]]:
    """pi-01 signs with its key, pi-02 with a wrong one; return the round record and rejects."""
    keys_dir = tmp_path / "keys"
    keys_dir.mkdir()
    for cid, key in KEYS.items():
        (keys_dir / f"{cid}.key").write_text(key.hex() + "\n")
    pw_file = tmp_path / "coordinator.password"
    pw_file.write_text(PASSWORDS["coordinator"] + "\n")
    cfg = coordinator_config(
        broker.url,
        tmp_path / "coord.db",
        client_id="coordinator",
        broker={"username": "coordinator", "password_file": str(pw_file),
                "ca_certs": str(test_pki.ca_cert)},
        rounds={"clients_per_round": 2, "min_fraction": 0.5, "deadline_s": 300.0},
        validation={"hmac_keys_dir": str(keys_dir), "require_signature": True},
    )  # fmt: skip
    fleet = AgentFleet(broker.url, tmp_path / "agents")
    try:
        shards, _test = digits_shards(2)
        for cid, key, shard in zip(
            ("pi-01", "pi-02"), (KEYS["pi-01"], WRONG_KEY), shards, strict=True
        ):
            tls = {"username": cid, "password": PASSWORDS[cid], "ca_certs": str(test_pki.ca_cert)}
            fleet.start(cid, shard, mqtt=tls, hmac_key=key)
        coord = coordinators.thread(cfg)
        record = coord.wait_rounds(1, timeout=60)[0]
        wait_for(lambda: fleet.handle("pi-02").runner.stats.updates_sent >= 1, 10, "pi-02 sent")
        rejects = dict(coord.coordinator.metrics.rejects)
        coord.stop()
    finally:
        fleet.close()
    return record, rejects


def test_update_signed_with_the_wrong_key_is_rejected_and_counted(
    broker: MosquittoBroker, test_pki: TlsFiles, tmp_path: Path, coordinators: Coordinators
) -> None:
    record, rejects = _run_signed_round(broker, test_pki, tmp_path, coordinators)
    # pi-02's update (wrong key) never touched the model; pi-01's made the new version.
    assert record["outcome"] == "aggregated" and record["participants"] == 1
    assert record["rejected_by_reason"] == {"bad_signature": 1}
    assert rejects == {"bad_signature": 1}
    # The fleet requires signatures, so the rejection failed pi-02's task at once (not as a
    # lost task, not at the 300 s deadline): with nobody left to wait for, the round closed.
    assert record["reason"] == "exhausted"
    assert (record["dropped"], record["lost"], record["timed_out"]) == (1, 0, 0)


def test_secrets_never_appear_in_logs(
    broker: MosquittoBroker,
    test_pki: TlsFiles,
    tmp_path: Path,
    coordinators: Coordinators,
    caplog: pytest.LogCaptureFixture,
) -> None:
    # Prepare: every logger at DEBUG (agent, coordinator, transport, round log)
    caplog.set_level(logging.DEBUG)
    # Execute: connect, refuse a bad password, run a signed round with a rejection
    with pytest.raises(BadCredentialsError):
        MqttTransport(
            MqttSettings(
                host=broker.host, port=broker.port, client_id="pi-01", username="pi-01",
                password=PASSWORDS["pi-01"] + "-typo", tls=True, ca_certs=str(test_pki.ca_cert),
                **FAST,  # type: ignore[arg-type]
            )
        )  # fmt: skip
    _run_signed_round(broker, test_pki, tmp_path, coordinators)
    # Assert: neither passwords nor keys (raw, hex, repr) in our logs or mosquitto's
    logs = caplog.text + "\n".join(repr(r.args) for r in caplog.records)
    mosquitto_log = broker.log_text()
    assert "bad_signature" in logs and "pi-02" in mosquitto_log  # the logs did capture the run
    secrets = [*PASSWORDS.values(), PASSWORDS["pi-01"] + "-typo"]
    secrets += [k.hex() for k in (*KEYS.values(), WRONG_KEY)]
    secrets += [repr(k) for k in (*KEYS.values(), WRONG_KEY)]
    for secret in secrets:
        assert secret not in logs
        assert secret not in mosquitto_log
