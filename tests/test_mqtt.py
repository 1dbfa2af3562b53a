"""MqttTransport against a real Mosquitto (started by the ``mosquitto`` fixtures).

Covers each message type end to end, retained status, the Last Will of a
SIGKILLed client, reconnect across a broker restart without losing a QoS-1
update, the warning for two clients with one client id, a 50 MB model through
chunking, TLS, password auth and the ACL.
"""

from __future__ import annotations

import logging
import os
import random
import signal
import socket
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from edge import mqtt_transport
from edge.chunking import Reassembler
from edge.mqtt_transport import MqttSettings, MqttTransport, connect_url
from edge.transport import (
    BadCredentialsError,
    ConnectError,
    Message,
    NotAuthorizedError,
    PublishNotAuthorizedError,
    Transport,
    publish_chunked,
    publish_model,
)
from edge.wire import (
    GlobalModel,
    ModelManifest,
    ModelUpdate,
    Status,
    TensorSpec,
    TopicKind,
    Topics,
    TrainTask,
)
from tests import regen_fixtures as golden
from tests.broker import DEVICE_ACL, MosquittoBroker, TlsFiles
from tests.test_agent import wait_for

pytestmark = [pytest.mark.broker, pytest.mark.timeout(60)]

T = Topics("lab")
REPO = Path(__file__).resolve().parent.parent
FAST = {"reconnect_min_delay_s": 0.05, "reconnect_max_delay_s": 0.5, "connect_timeout_s": 5.0}
USERS = {"coordinator": "coord-pw", "pi-01": "pw-01", "pi-02": "pw-02"}


@pytest.fixture
def connect(mosquitto: MosquittoBroker) -> Iterator[Callable[..., MqttTransport]]:
    """Connect clients to the default broker; all are closed at teardown."""
    clients: list[MqttTransport] = []

    def make(client_id: str, **kwargs: object) -> MqttTransport:
        will = kwargs.pop("will", None)
        on_connect_publish = kwargs.pop("on_connect_publish", None)
        settings = MqttSettings(port=mosquitto.port, client_id=client_id, **{**FAST, **kwargs})  # type: ignore[arg-type]
        t = MqttTransport(settings, will, on_connect_publish)  # type: ignore[arg-type]
        clients.append(t)
        return t

    yield make
    for t in clients:
        t.close()


def receive_on(t: Transport, topic: str, timeout: float = 5.0) -> Message:
    """The next message on ``topic`` (others are skipped), or fail."""
    import time

    deadline = time.monotonic() + timeout
    while (left := deadline - time.monotonic()) > 0:
        msg = t.receive(left)
        if msg is not None and msg.topic == topic:
            return msg
    pytest.fail(f"no message on {topic} within {timeout} s")


def online_status() -> Status:
    return golden.golden_status()


# --------------------------------------------------------------------------- messages


@pytest.mark.parametrize("protocol", ["5", "3.1.1"])
def test_each_message_end_to_end(connect: Callable[..., MqttTransport], protocol: str) -> None:
    # Prepare
    coord = connect("coordinator", protocol=protocol)
    dev = connect("pi-01", protocol=protocol)
    coord.subscribe(T.all_status())
    coord.subscribe(T.all_updates())
    dev.subscribe(T.task("pi-01"))
    # Execute + Assert: status (retained)
    dev.publish(T.status("pi-01"), online_status().to_bytes(), retain=True)
    msg = receive_on(coord, T.status("pi-01"))
    assert T.parse(msg.topic) == (TopicKind.STATUS, "pi-01")
    assert Status.from_bytes(msg.payload) == online_status()
    # task
    coord.publish(T.task("pi-01"), golden.golden_task().to_bytes())
    assert TrainTask.from_bytes(receive_on(dev, T.task("pi-01")).payload) == golden.golden_task()
    # update (chunked, signed)
    publish_chunked(dev, T.update("pi-01"), golden.golden_update().to_bytes(b"k"), chunk_size=100)
    r = Reassembler(1 << 20, 10.0)
    out = None
    while out is None:
        out = r.feed("pi-01", receive_on(coord, T.update("pi-01")).payload, now=0.0)
    assert ModelUpdate.from_bytes(out, b"k") == golden.golden_update()


def test_retained_status_seen_by_late_subscriber(connect: Callable[..., MqttTransport]) -> None:
    dev = connect("pi-01")
    dev.publish(T.status("pi-01"), online_status().to_bytes(), retain=True)
    late = connect("coordinator")
    late.subscribe(T.all_status())
    msg = receive_on(late, T.status("pi-01"))
    assert msg.retain
    assert Status.from_bytes(msg.payload) == online_status()


def test_tcp_nodelay_is_set(connect: Callable[..., MqttTransport]) -> None:
    t = connect("pi-01")
    sock = t._client.socket()
    assert isinstance(sock, socket.socket)
    assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) != 0


# --------------------------------------------------------------------------- last will

_DEVICE_SCRIPT = """
import sys, time
from edge.mqtt_transport import MqttSettings, MqttTransport
from edge.transport import Message
from edge.wire import Status, Topics
from tests import regen_fixtures as golden
t = Topics("lab")
will = Message(t.status("pi-01"), Status.offline_will().to_bytes(), retain=True)
client = MqttTransport(MqttSettings(port=int(sys.argv[1]), client_id="pi-01", keepalive_s=60),
                       will, lambda: [Message(t.status("pi-01"), golden.golden_status().to_bytes(),
                                              retain=True)])
print("ready", flush=True)
time.sleep(60)
"""


def test_last_will_fires_when_client_is_killed(
    mosquitto: MosquittoBroker, connect: Callable[..., MqttTransport]
) -> None:
    # Prepare: a device in its own process publishes "online" on connect
    coord = connect("coordinator")
    coord.subscribe(T.all_status())
    proc = subprocess.Popen(
        [sys.executable, "-c", _DEVICE_SCRIPT, str(mosquitto.port)],
        cwd=REPO,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None
        assert proc.stdout.readline().strip() == "ready"
        assert Status.from_bytes(receive_on(coord, T.status("pi-01")).payload).online
        # Execute: the device dies without a DISCONNECT
        os.kill(proc.pid, signal.SIGKILL)
        # Assert: the broker publishes the will, and keeps it retained
        assert Status.from_bytes(receive_on(coord, T.status("pi-01")).payload).online is False
    finally:
        proc.kill()
        proc.wait(10)
        if proc.stdout is not None:
            proc.stdout.close()
    late = connect("late")
    late.subscribe(T.status("pi-01"))
    assert receive_on(late, T.status("pi-01")).payload == Status.offline_will().to_bytes()


def test_status_republished_after_connection_loss(connect: Callable[..., MqttTransport]) -> None:
    coord = connect("coordinator")
    coord.subscribe(T.all_status())
    will = Message(T.status("pi-01"), Status.offline_will().to_bytes(), retain=True)
    status = Message(T.status("pi-01"), online_status().to_bytes(), retain=True)
    dev = connect("pi-01", will=will, on_connect_publish=lambda: [status])
    assert Status.from_bytes(receive_on(coord, T.status("pi-01")).payload).online
    dev.simulate_connection_loss()
    assert not Status.from_bytes(receive_on(coord, T.status("pi-01")).payload).online
    assert Status.from_bytes(receive_on(coord, T.status("pi-01")).payload).online
    assert dev.reconnects == 1


# --------------------------------------------------------------------------- reconnect


def test_broker_restart_loses_no_qos1_update(
    mosquitto: MosquittoBroker, connect: Callable[..., MqttTransport]
) -> None:
    # Prepare: persistent sessions on both sides
    persistent = {"clean_start": False, "session_expiry_s": 300}
    coord = connect("coordinator", **persistent)
    coord.subscribe(T.all_updates())
    dev = connect("pi-01", **persistent)
    dev.publish(T.status("pi-01"), online_status().to_bytes(), retain=True)
    update = golden.golden_update().to_bytes()
    # Execute: the broker goes down; the device publishes while it is down
    mosquitto.stop()
    errors: list[BaseException] = []

    def send() -> None:
        try:
            publish_chunked(dev, T.update("pi-01"), update)
        except BaseException as exc:
            errors.append(exc)

    sender = threading.Thread(target=send)
    sender.start()
    mosquitto.start()
    sender.join(30)
    # Assert: acknowledged after the reconnect, delivered to the coordinator
    assert not sender.is_alive() and errors == []
    r = Reassembler(1 << 20, 10.0)
    assert r.feed("pi-01", receive_on(coord, T.update("pi-01"), 15).payload, 0.0) == update
    assert dev.reconnects >= 1 and coord.reconnects >= 1
    late = connect("late")
    late.subscribe(T.status("pi-01"))
    assert receive_on(late, T.status("pi-01")).retain


# --------------------------------------------------------------------------- client id clash


def clash_warnings(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [
        r.getMessage()
        for r in caplog.records
        if r.levelno == logging.WARNING and "uses the same client id" in r.getMessage()
    ]


def test_two_clients_with_one_client_id_warn_once_each(
    connect: Callable[..., MqttTransport], caplog: pytest.LogCaptureFixture
) -> None:
    # Prepare: a second coordinator started with the example config's client id
    with caplog.at_level(logging.INFO, logger="edge.mqtt_transport"):
        first = connect("fedge-coordinator")
        second = connect("fedge-coordinator")
        # Execute: they take the session from each other, again and again
        wait_for(lambda: first.client_id_clash_warnings + second.client_id_clash_warnings == 2, 15)
        flaps = first.reconnects + second.reconnects
        wait_for(lambda: first.reconnects + second.reconnects >= flaps + 6, 15)
        first.close()
        assert second.wait_connected(5)
    # Assert: one warning per client naming the id and the fix, then the drops go to INFO
    assert first.client_id_clash_warnings == second.client_id_clash_warnings == 1
    warnings = clash_warnings(caplog)
    assert len(warnings) == 2
    assert all("'fedge-coordinator'" in w and "its own client_id" in w for w in warnings)
    drops = [r for r in caplog.records if r.getMessage().startswith("disconnected from")]
    loud = [r for r in drops if r.levelno == logging.WARNING]
    assert len(loud) <= 2 * mqtt_transport.SHORT_CONNECTIONS_TO_WARN < len(drops)


def test_only_a_run_of_short_connections_warns(
    connect: Callable[..., MqttTransport],
    caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Prepare: connections count as long-lived after 1 s instead of 5 s
    monkeypatch.setattr(mqtt_transport, "SHORT_CONNECTION_S", 1.0)
    dev = connect("pi-01")
    pause = threading.Event()

    def drops(pattern: str) -> int:
        """Cut the connection once per letter: S right after connecting, L after 1.2 s."""
        for kind in pattern:
            if kind == "L":
                pause.wait(1.2)
            after = dev.reconnects + 1
            dev.simulate_connection_loss()
            wait_for(lambda after=after: dev.reconnects >= after)
        return dev.client_id_clash_warnings

    with caplog.at_level(logging.INFO, logger="edge.mqtt_transport"):
        # Execute / Assert: a connection that lasted ends the run; the third short one in a
        # row warns once; a new run after a lasting connection warns again
        assert drops("SSLSS") == 0
        assert drops("L") == 0
        assert drops("S") == 0
        assert drops("SS") == 1
        assert drops("SS") == 1
        assert drops("LSSS") == 2
    warnings = clash_warnings(caplog)
    assert len(warnings) == 2 and "'pi-01' 3 times in a row within 1 s" in warnings[0]


# --------------------------------------------------------------------------- 50 MB model


@pytest.mark.slow
def test_50mb_model_through_chunking(connect: Callable[..., MqttTransport]) -> None:
    # Prepare
    size = 50 * 1024 * 1024
    blob = random.Random(0).randbytes(size)
    model = GlobalModel(8, 8, (TensorSpec("w", (size // 4,), {"id": "raw"}),), (blob,))
    envelope = model.to_bytes()
    coord = connect("coordinator")
    dev = connect("pi-01")
    dev.subscribe(T.model_all())
    # Execute
    manifest = publish_model(coord, T, envelope, 8)
    r = Reassembler(max_bytes=64 * 1024 * 1024, timeout_s=30.0)
    got_manifest: ModelManifest | None = None
    out: bytes | None = None
    while out is None or got_manifest is None:
        msg = dev.receive(20.0)
        assert msg is not None, "model download stalled"
        kind, _ = T.parse(msg.topic)
        if kind is TopicKind.MODEL_MANIFEST:
            got_manifest = ModelManifest.from_bytes(msg.payload)
        else:
            version, _index = T.parse_model_chunk(msg.topic)
            out = r.feed(f"model/{version}", msg.payload, 0.0) or out
    # Assert
    assert got_manifest == manifest and manifest.chunk_count > 100
    got_manifest.verify(out)
    assert GlobalModel.from_bytes(out) == model


def test_old_model_chunks_are_cleared(connect: Callable[..., MqttTransport]) -> None:
    coord = connect("coordinator")
    first = publish_model(coord, T, b"a" * 1000, 1, chunk_size=300)
    publish_model(coord, T, b"b" * 500, 2, chunk_size=300, previous=first)
    dev = connect("pi-01")
    dev.subscribe(T.model_all())
    topics = set()
    while (msg := dev.receive(0.5)) is not None:
        topics.add(msg.topic)
    assert topics == {T.model_manifest(), T.model_chunk(2, 0), T.model_chunk(2, 1)}


# --------------------------------------------------------------------------- security


def test_tls_connection(
    mosquitto_factory: Callable[..., MosquittoBroker], test_pki: TlsFiles
) -> None:
    broker = mosquitto_factory(tls=test_pki)
    assert broker.url.startswith("mqtts://")
    with connect_url(f"{broker.url}?client_id=pi-01&ca={test_pki.ca_cert}", **FAST) as t:
        t.subscribe(T.task("pi-01"))
        t.publish(T.task("pi-01"), b"{}")
        assert receive_on(t, T.task("pi-01")).payload == b"{}"


def test_tls_rejects_unknown_ca(
    mosquitto_factory: Callable[..., MosquittoBroker], test_pki: TlsFiles, tmp_path: Path
) -> None:
    broker = mosquitto_factory(tls=test_pki)
    with pytest.raises(ConnectError, match="certificate"):
        MqttTransport(MqttSettings(port=broker.port, client_id="x", tls=True, **FAST))  # type: ignore[arg-type]


@pytest.mark.parametrize("protocol", ["5", "3.1.1"])
@pytest.mark.parametrize("password", [None, "wrong"])
def test_device_refused_without_valid_password(
    mosquitto_factory: Callable[..., MosquittoBroker], protocol: str, password: str | None
) -> None:
    broker = mosquitto_factory(users=USERS)
    creds = {} if password is None else {"username": "pi-01", "password": password}
    with pytest.raises(BadCredentialsError) as info:
        MqttTransport(
            MqttSettings(port=broker.port, client_id="pi-01", protocol=protocol, **creds, **FAST)
        )  # type: ignore[arg-type]
    assert isinstance(info.value, NotAuthorizedError) and info.value.rc in (0x86, 0x87)


def _auth_client(broker: MosquittoBroker, user: str, protocol: str = "5") -> MqttTransport:
    settings = MqttSettings(
        port=broker.port,
        client_id=user,
        username=user,
        password=USERS[user],
        protocol=protocol,
        **FAST,  # type: ignore[arg-type]
    )
    return MqttTransport(settings)


def test_acl_refuses_writing_another_devices_update(
    mosquitto_factory: Callable[..., MosquittoBroker],
) -> None:
    # Prepare
    broker = mosquitto_factory(users=USERS, acl=DEVICE_ACL)
    coord, dev1, dev2 = (_auth_client(broker, u) for u in ("coordinator", "pi-01", "pi-02"))
    try:
        coord.subscribe(T.all_updates())
        dev2.subscribe(T.task("pi-02"))
        # Execute + Assert: MQTT 5 PUBACK "not authorized" becomes an exception
        with pytest.raises(PublishNotAuthorizedError) as info:
            dev1.publish(T.update("pi-02"), b"forged")
        assert info.value.rc == 0x87
        with pytest.raises(PublishNotAuthorizedError):
            dev1.publish(T.task("pi-02"), b"forged task")
        # its own topics work, and nobody ever saw the forged messages
        dev1.publish(T.update("pi-01"), b"genuine")
        assert receive_on(coord, T.update("pi-01")).payload == b"genuine"
        assert coord.receive(0.3) is None
        assert dev2.receive(0.1) is None
    finally:
        for t in (coord, dev1, dev2):
            t.close()


def test_acl_with_mqtt311_drops_silently(
    mosquitto_factory: Callable[..., MosquittoBroker],
) -> None:
    broker = mosquitto_factory(users=USERS, acl=DEVICE_ACL)
    coord = _auth_client(broker, "coordinator")
    dev1 = _auth_client(broker, "pi-01", protocol="3.1.1")
    try:
        coord.subscribe(T.all_updates())
        dev1.publish(T.update("pi-02"), b"forged")  # MQTT 3.1.1 has no reason codes
        dev1.publish(T.update("pi-01"), b"genuine")
        assert receive_on(coord, T.update("pi-01")).payload == b"genuine"
        assert coord.receive(0.3) is None
    finally:
        coord.close()
        dev1.close()


def test_device_reads_only_its_task_and_the_model(
    mosquitto_factory: Callable[..., MosquittoBroker],
) -> None:
    broker = mosquitto_factory(users=USERS, acl=DEVICE_ACL)
    coord, dev1 = _auth_client(broker, "coordinator"), _auth_client(broker, "pi-01")
    try:
        dev1.subscribe("fl/v1/lab/clients/+/task")  # Mosquitto 2.0 grants it, then filters
        dev1.subscribe(T.model_all())
        coord.publish(T.task("pi-02"), b"not for you")
        coord.publish(T.task("pi-01"), b"yours")
        coord.publish(T.model_manifest(), b"m", retain=True)
        got = {m.topic for m in iter(lambda: dev1.receive(0.3), None)}
        assert got == {T.task("pi-01"), T.model_manifest()}
    finally:
        coord.close()
        dev1.close()


# --------------------------------------------------------------------------- settings


def test_settings_from_url() -> None:
    s = MqttSettings.from_url(
        "mqtts://pi%2D01:p%40ss@broker.lan:9883?client_id=pi-01&protocol=3.1.1"
        "&ca=/etc/ca.crt&session_expiry=600&clean_start=false"
    )
    assert (s.host, s.port, s.tls, s.username, s.password) == (
        "broker.lan",
        9883,
        True,
        "pi-01",
        "p@ss",
    )
    assert (s.protocol, s.ca_certs, s.session_expiry_s, s.clean_start) == (
        "3.1.1",
        "/etc/ca.crt",
        600,
        False,
    )
    assert "p@ss" not in repr(s) and "p@ss" not in s.url


@pytest.mark.parametrize(
    "url", ["http://x", "mqtt://x?bogus=1", "tcp://x:1883", "ssl://x:8883", "mqtt://x:abc"]
)
def test_settings_from_bad_url(url: str) -> None:
    with pytest.raises(ValueError):
        MqttSettings.from_url(url)


def test_connect_refused_port_is_connect_error() -> None:
    from tests.broker import free_port

    with pytest.raises(ConnectError):
        MqttTransport(MqttSettings(port=free_port(), client_id="x", **FAST))  # type: ignore[arg-type]
