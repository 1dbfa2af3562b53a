"""The embedded amqtt broker (``edge.embedded_broker``) carries what fedge relies on.

QoS 1, retained delivery to a late subscriber, the Last Will on an abrupt
disconnect, large chunked payloads, a clean stop, and a whole ``fedge sim``
run on it. Every client connects through ``broker.url`` and so with MQTT 3.1.1.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from edge.chunking import Reassembler
from edge.embedded_broker import EmbeddedBroker, EmbeddedBrokerError
from edge.mqtt_transport import MqttTransport, connect_url
from edge.transport import ConnectError, Message, publish_chunked

# amqtt is a dev dependency: without it these tests fail (naming the fix), never skip.
pytestmark = pytest.mark.broker

RECEIVE_S = 5.0


@pytest.fixture
def broker(tmp_path: Path) -> Iterator[EmbeddedBroker]:
    with EmbeddedBroker(tmp_path / "amqtt") as b:
        yield b


@pytest.fixture
def clients(broker: EmbeddedBroker) -> Iterator[dict[str, MqttTransport]]:
    """Connected transports by client id, created on first use and closed afterwards."""
    made: dict[str, MqttTransport] = {}
    yield made
    for transport in made.values():
        transport.close()


def _client(
    clients: dict[str, MqttTransport], broker: EmbeddedBroker, cid: str, will: Message | None = None
) -> MqttTransport:
    clients[cid] = connect_url(broker.url, client_id=cid, will=will)
    return clients[cid]


def test_url_asks_for_mqtt_311(broker: EmbeddedBroker, clients: dict[str, MqttTransport]) -> None:
    # Execute
    transport = _client(clients, broker, "probe")
    # Assert
    assert broker.url.endswith("?protocol=3.1.1")
    assert transport.settings.protocol == "3.1.1"


def test_qos1_publish_is_received(
    broker: EmbeddedBroker, clients: dict[str, MqttTransport]
) -> None:
    # Prepare
    sub = _client(clients, broker, "sub")
    sub.subscribe("fl/v1/t/#", qos=1)
    pub = _client(clients, broker, "pub")
    # Execute
    pub.publish("fl/v1/t/a", b"hello", qos=1)
    # Assert
    msg = sub.receive(RECEIVE_S)
    assert msg is not None
    assert (msg.topic, msg.payload, msg.qos) == ("fl/v1/t/a", b"hello", 1)


def test_retained_message_reaches_a_late_subscriber(
    broker: EmbeddedBroker, clients: dict[str, MqttTransport]
) -> None:
    # Prepare
    pub = _client(clients, broker, "pub")
    pub.publish("fl/v1/model/manifest", b"v7", qos=1, retain=True)
    late = _client(clients, broker, "late")
    # Execute
    late.subscribe("fl/v1/model/#", qos=1)
    # Assert
    msg = late.receive(RECEIVE_S)
    assert msg == Message("fl/v1/model/manifest", b"v7", retain=True, qos=1)


def test_retained_message_goes_only_to_subscribers(
    broker: EmbeddedBroker, clients: dict[str, MqttTransport]
) -> None:
    # Prepare: amqtt 0.12 itself would send this to every client that connects
    # while anyone holds a matching subscription (see edge.embedded_broker._broker_class).
    watcher = _client(clients, broker, "watcher")
    watcher.subscribe("fl/v1/clients/#")
    _client(clients, broker, "pub").publish("fl/v1/clients/d1/status", b"online", retain=True)
    assert watcher.receive(RECEIVE_S) is not None
    # Execute
    bystander = _client(clients, broker, "bystander")
    # Assert
    assert bystander.receive(0.5) is None


def test_last_will_is_published_and_retained_on_abrupt_disconnect(
    broker: EmbeddedBroker, clients: dict[str, MqttTransport]
) -> None:
    # Prepare
    watcher = _client(clients, broker, "watcher")
    watcher.subscribe("fl/v1/sim/clients/+/status")
    will = Message("fl/v1/sim/clients/dev-1/status", b"offline", retain=True, qos=1)
    device = _client(clients, broker, "dev-1", will=will)
    # Execute
    device.simulate_connection_loss()
    # Assert
    msg = watcher.receive(RECEIVE_S)
    assert msg is not None
    assert (msg.topic, msg.payload) == (will.topic, b"offline")
    late = _client(clients, broker, "late")
    late.subscribe("fl/v1/sim/clients/+/status")
    assert late.receive(RECEIVE_S) == will


def test_clean_disconnect_discards_the_will(
    broker: EmbeddedBroker, clients: dict[str, MqttTransport]
) -> None:
    # Prepare
    watcher = _client(clients, broker, "watcher")
    watcher.subscribe("fl/v1/sim/clients/+/status")
    will = Message("fl/v1/sim/clients/dev-2/status", b"offline", retain=True, qos=1)
    device = _client(clients, broker, "dev-2", will=will)
    # Execute
    device.close()
    # Assert
    assert watcher.receive(0.5) is None


def test_one_megabyte_chunked_payload_reassembles(
    broker: EmbeddedBroker, clients: dict[str, MqttTransport]
) -> None:
    # Prepare
    payload = np.random.default_rng(0).bytes(1 << 20)
    sub = _client(clients, broker, "coordinator")
    sub.subscribe("fl/v1/sim/clients/dev-3/update")
    pub = _client(clients, broker, "dev-3")
    reassembler = Reassembler(max_bytes=4 << 20, timeout_s=60.0)
    # Execute
    count = publish_chunked(pub, "fl/v1/sim/clients/dev-3/update", payload, chunk_size=256 << 10)
    whole = None
    for _ in range(count):
        msg = sub.receive(RECEIVE_S)
        assert msg is not None
        whole = reassembler.feed("dev-3", msg.payload, now=0.0) or whole
    # Assert
    assert count >= 4  # 256 KiB messages, each with a chunk header
    assert whole == payload


def test_stop_releases_the_port_and_is_idempotent(tmp_path: Path) -> None:
    # Prepare
    broker = EmbeddedBroker(tmp_path).start()
    port = broker.port
    # Execute
    broker.stop()
    broker.stop()
    # Assert
    assert not broker.running
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", port), timeout=1.0).close()
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind(("127.0.0.1", port))  # free again


def test_port_in_use_is_an_error_that_names_the_port(tmp_path: Path) -> None:
    # Prepare
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        # Execute / Assert
        with pytest.raises(EmbeddedBrokerError, match=str(port)):
            EmbeddedBroker(tmp_path, port=port).start()


def test_missing_amqtt_names_the_fix(tmp_path: Path) -> None:
    # Prepare: a child interpreter where "import amqtt" fails
    code = (
        "import sys; sys.modules['amqtt'] = None\n"
        "from pathlib import Path\n"
        "from edge.embedded_broker import EmbeddedBroker, EmbeddedBrokerError\n"
        "try:\n"
        f"    EmbeddedBroker(Path({str(tmp_path)!r})).start()\n"
        "except EmbeddedBrokerError as exc:\n"
        "    print(exc)\n"
    )
    # Execute
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=30, check=True
    ).stdout
    # Assert
    assert "pip install 'fedge[sim]'" in out
    assert "apt-get install mosquitto" in out


def test_fedge_sim_runs_a_federation_on_the_embedded_broker(tmp_path: Path) -> None:
    # Execute
    result = subprocess.run(
        [sys.executable, "-m", "edge", "sim", "--broker-kind", "embedded", "--clients", "4",
         "--clients-per-round", "2", "--rounds", "3", "--seed", "0", "--quiet",
         "--out", str(tmp_path)],
        capture_output=True, text=True, timeout=120, check=False,
        env={**os.environ, "COLUMNS": "120"},
    )  # fmt: skip
    # Assert
    assert result.returncode == 0, result.stdout + result.stderr
    doc = json.loads((tmp_path / "metrics.json").read_text())
    assert doc["config"]["broker_kind"] == "embedded"
    accuracy = [r["accuracy"] for r in doc["rounds"]]
    assert len(accuracy) == 3
    assert accuracy[-1] > accuracy[0]


def test_mqtt5_client_is_refused_with_a_clear_error(broker: EmbeddedBroker) -> None:
    # Prepare: amqtt speaks MQTT 3.1.1 only, which is why broker.url says so
    url_without_protocol = broker.url.split("?", 1)[0]
    # Execute / Assert
    with pytest.raises(ConnectError, match="Unsupported protocol version"):
        connect_url(url_without_protocol, client_id="v5", connect_timeout_s=5.0)


def test_sim_falls_back_to_the_embedded_broker_without_mosquitto(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Prepare
    from edge import mosquitto
    from server_stub import sim

    def missing() -> str:
        raise mosquitto.BrokerError("mosquitto not found")

    monkeypatch.setattr(mosquitto, "find_mosquitto", missing)
    # Execute
    broker, description = sim._start_broker("auto", tmp_path)
    broker.stop()
    # Assert
    assert isinstance(broker, EmbeddedBroker)
    assert "embedded amqtt broker" in description


def test_sim_refuses_a_broker_url_with_a_broker_kind() -> None:
    from server_stub import sim

    cfg = sim.SimConfig(broker="mqtt://127.0.0.1:1", broker_kind="embedded")
    with pytest.raises(sim.SimError, match="--broker-kind"):
        sim._validate(cfg)


def test_fedge_sim_notices_its_embedded_broker_stopping(tmp_path: Path) -> None:
    from server_stub.sim import SimError, _check_broker

    # Prepare
    broker = EmbeddedBroker(tmp_path / "amqtt").start()
    _check_broker(broker)  # running: nothing to report
    # Execute: the broker's thread ends, as it would if amqtt crashed
    broker.stop()
    # Assert
    with pytest.raises(SimError, match=r"the private broker \(embedded amqtt broker\) stopped"):
        _check_broker(broker)
