"""What an operator runs next to the broker: fedge status, the example config, /metrics."""

from __future__ import annotations

import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest

from edge.mosquitto import MosquittoBroker, free_port
from edge.mqtt_transport import MqttSettings, MqttTransport
from edge.telemetry import TelemetrySnapshot, build_status
from edge.wire import Caps, NetKind, Status, Topics
from server_stub import status_cmd
from server_stub.config import ConfigError, load_config
from server_stub.metrics import CoordinatorMetrics

ROOT = Path(__file__).resolve().parent.parent


def _online_status(now: float) -> Status:
    snap = TelemetrySnapshot(
        battery=None, load1=0.2, cores=4, temp_c=48.0, available_mb=900.0,
        net_kind=NetKind.ETHERNET, metered=False,
    )  # fmt: skip
    caps = Caps(trainers=("numpy",), codecs=("raw",), max_payload=1 << 20)
    return build_status(snap, now=now, num_examples=120, samples_per_s=900.0, rtt_ms=2.0,
                        caps=caps)  # fmt: skip


@pytest.mark.broker
def test_fedge_status_prints_every_device(mosquitto: MosquittoBroker) -> None:
    # Prepare: two devices' retained statuses, one online, one offline by its Last Will
    topics = Topics("lab")
    t = MqttTransport(MqttSettings.from_url(mosquitto.url, client_id="seed"))
    try:
        t.publish(topics.status("pi-01"), _online_status(1.0).to_bytes(), retain=True)
        t.publish(topics.status("pi-02"), Status.offline_will().to_bytes(), retain=True)
    finally:
        t.close()
    # Execute
    out = subprocess.run(
        [sys.executable, "-m", "edge", "status", "--broker", mosquitto.url, "--fleet", "lab",
         "--wait", "1"],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    # Assert: piped, it prints tab-separated lines (no column cut to a terminal width).
    assert out.returncode == 0, out.stderr
    lines = [line.split("\t") for line in out.stdout.splitlines()]
    assert lines[0] == status_cmd.HEADERS
    assert sorted((row[0], row[1]) for row in lines[1:]) == [("pi-01", "yes"), ("pi-02", "no")]


def test_fedge_status_of_an_empty_fleet_says_where_it_looked(mosquitto: MosquittoBroker) -> None:
    # Execute
    out = subprocess.run(
        [sys.executable, "-m", "edge", "status", "--broker", mosquitto.url, "--fleet", "none",
         "--wait", "0.3"],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    # Assert
    assert out.returncode == 0, out.stderr
    assert out.stdout.splitlines() == ["\t".join(status_cmd.HEADERS)]
    assert f"no device in fleet none at {mosquitto.url}" in out.stderr


def test_example_coordinator_config_loads() -> None:
    config = load_config(ROOT / "deploy" / "coordinator.toml")
    assert config.rounds.clients_per_round >= 1


def test_bad_coordinator_config_names_the_problem(tmp_path: Path) -> None:
    bad = tmp_path / "coordinator.toml"
    bad.write_text('fleet = "lab"\nnot_a_setting = 3\n')
    with pytest.raises(ConfigError, match="not_a_setting"):
        load_config(bad)


def test_missing_coordinator_config_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError):
        load_config(tmp_path / "absent.toml")


def test_prometheus_endpoint_serves_the_counters() -> None:
    # Prepare
    port = free_port()
    metrics = CoordinatorMetrics(port=port)
    try:
        metrics.reject("bad_signature")
        metrics.add_bytes(inbound=1234, outbound=99)
        # Execute
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as resp:
            body = resp.read().decode()
    finally:
        metrics.close()
    # Assert
    assert 'reason="bad_signature"' in body
    assert "fedge_bytes_in_total 1234.0" in body


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--fleet", "q/a"], "argument --fleet: fleet 'q/a' contains forbidden characters"),
        (["--fleet", "+"], "argument --fleet: fleet '+' contains forbidden characters"),
        (["--fleet", ""], "argument --fleet: fleet is empty"),
        (["--wait", "-1"], "argument --wait: must be in (0, 3600] seconds"),
        (["--wait", "nan"], "argument --wait: must be in (0, 3600] seconds"),
        (["--wait", "soon"], "argument --wait: must be a number of seconds"),
        (["--broker", "tcp://127.0.0.1:1883"], "argument --broker: must start with mqtt://"),
        (["--broker", "mqtt://127.0.0.1:abc"], "argument --broker: port 'abc'"),
    ],
)
def test_fedge_status_refuses_bad_arguments(
    capsys: pytest.CaptureFixture[str], flags: list[str], message: str
) -> None:
    # Execute: argparse refuses them before anything connects
    with pytest.raises(SystemExit) as info:
        status_cmd.main(flags)
    # Assert
    assert info.value.code == 2
    assert message in capsys.readouterr().err
