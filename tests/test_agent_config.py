"""Agent config: TOML loading, validation messages, CLI overrides, key files."""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest

from edge.agent_main import add_arguments, cli, resolve_config
from edge.config import ConfigError, load_agent_config, read_hmac_key

EXAMPLE = Path(__file__).resolve().parent.parent / "deploy" / "agent.toml"


def write(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "agent.toml"
    p.write_text(text)
    return p


def test_example_config_loads() -> None:
    config = load_agent_config(EXAMPLE)
    assert config.fleet and config.device_id
    assert config.agent.heartbeat_s == 30.0


def test_minimal_config_and_relative_paths(tmp_path: Path) -> None:
    p = write(
        tmp_path,
        'fleet = "lab"\ndevice_id = "pi-1"\n[data]\npath = "d.npz"\n'
        '[agent]\nstate_dir = "state"\n[telemetry]\nmetered = true\n',
    )
    c = load_agent_config(p)
    assert c.data.path == tmp_path / "d.npz" and c.agent.state_dir == tmp_path / "state"
    assert c.metered is True and c.limits.min_battery_percent == 20.0


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ('device_id = "pi"\n', "fleet: is required"),
        ('fleet = "a/b"\ndevice_id = "pi"\n', "fleet: fleet 'a/b' contains forbidden"),
        ('fleet = "f"\ndevice_id = "pi"\n[limits]\nmin_battery = 3\n', "unknown key"),
        (
            'fleet = "f"\ndevice_id = "pi"\n[limits]\nmin_battery_percent = "x"\n',
            "must be a number",
        ),
        ('fleet = "f"\ndevice_id = "pi"\n[broker]\nurl = "http://x"\n', "mqtt:// or mqtts://"),
        (
            'fleet = "f"\ndevice_id = "pi"\n[broker]\nurl = "mqtt://127.0.0.1:abc"\n',
            "broker.url: port 'abc' of 'mqtt://127.0.0.1:abc' is not an integer",
        ),
        (
            'fleet = "f"\ndevice_id = "pi"\n[broker]\nurl = "mqtt://u:p@x"\n',
            "must not carry credentials",
        ),
        ('fleet = "f"\ndevice_id = "pi"\n[model]\ntrainer = "litert"\n', "model.tflite"),
        ('fleet = "f"\ndevice_id = "pi"\n[agent]\nheartbeat_s = 0\n', "agent.heartbeat_s"),
        ('fleet = "f"\ndevice_id = "pi"\n[data]\npath = "a"\nbuiltin = "digits"\n', "exactly one"),
        ('fleet = "f"\ndevice_id = "pi"\nbogus = 1\n', "unknown top-level"),
        ("fleet = \n", "not valid TOML"),
    ],
)
def test_invalid_configs_name_the_problem(tmp_path: Path, text: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        load_agent_config(write(tmp_path, text))


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="no such config file"):
        load_agent_config(tmp_path / "nope.toml")


def test_flags_override_the_file(tmp_path: Path) -> None:
    import argparse

    p = write(tmp_path, 'fleet = "lab"\ndevice_id = "pi-1"\n')
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    args = parser.parse_args(
        [
            "--config",
            str(p),
            "--device-id",
            "pi-2",
            "--heartbeat",
            "5",
            "--allow-metered",
            "--data",
            str(tmp_path / "x.npz"),
        ]
    )
    c = resolve_config(args)
    assert (c.device_id, c.agent.heartbeat_s, c.limits.allow_metered) == ("pi-2", 5.0, True)
    assert c.data.path == tmp_path / "x.npz" and c.data.builtin is None


def test_hmac_key_file(tmp_path: Path) -> None:
    (tmp_path / "k").write_text("00" * 32 + "\n")
    assert read_hmac_key(tmp_path / "k") == bytes(32)
    (tmp_path / "bad").write_text("not hex")
    with pytest.raises(ConfigError, match="hex"):
        read_hmac_key(tmp_path / "bad")


def test_state_dir_that_is_a_file_is_a_config_error(tmp_path: Path) -> None:
    # Prepare
    (tmp_path / "state").write_text("not a folder")
    p = write(tmp_path, 'fleet = "f"\ndevice_id = "pi"\n[agent]\nstate_dir = "state"\n')
    # Execute / Assert
    with pytest.raises(ConfigError, match=r"agent\.state_dir: .*state exists and is not a folder"):
        load_agent_config(p)


@pytest.mark.parametrize(
    ("text", "flags", "message"),
    [
        ('[broker]\nurl = "mqtt://127.0.0.1:abc"\n', [], "broker.url: port 'abc'"),
        ('[agent]\nstate_dir = "state"\n', [], "agent.state_dir: "),
        ("", ["--state-dir", "{tmp}/state"], "agent.state_dir: "),
        ("", ["--broker", "mqtt://127.0.0.1:abc"], "broker.url: port 'abc'"),
    ],
    ids=["url", "state_dir", "state-dir-flag", "broker-flag"],
)
def test_fedge_agent_exits_2_with_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], text: str, flags: list[str], message: str
) -> None:
    # Prepare: a regular file where the state folder should be
    (tmp_path / "state").write_text("not a folder")
    p = write(tmp_path, 'fleet = "f"\ndevice_id = "pi"\n' + text)
    # Execute
    code = cli(["--config", str(p), *(f.format(tmp=tmp_path) for f in flags)])
    err = capsys.readouterr().err
    # Assert
    assert code == 2
    assert err.startswith("fedge agent: ") and err.count("\n") == 1, err
    assert message in err


def test_state_dir_that_cannot_be_created_exits_2_before_connecting(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # Prepare: the state folder would be inside a regular file; the broker port is closed
    (tmp_path / "state").write_text("not a folder")
    p = write(
        tmp_path,
        'fleet = "f"\ndevice_id = "pi"\n[broker]\nurl = "mqtt://127.0.0.1:1"\n'
        '[agent]\nstate_dir = "state/sub"\n',
    )
    # Execute
    code = cli(["--config", str(p)])
    err = capsys.readouterr().err
    # Assert
    assert code == 2
    assert err.startswith(f"fedge agent: agent.state_dir: cannot create {tmp_path}/state/sub")


TLS_CONFIG = (
    'fleet = "f"\ndevice_id = "pi"\n[broker]\nurl = "mqtts://127.0.0.1:1"\n'
    'ca_file = "ca.crt"\ncert_file = "client.crt"\nkey_file = "client.key"\n'
)
TLS_FILES = {"ca_file": "ca.crt", "cert_file": "client.crt", "key_file": "client.key"}


def _write_tls_files(tmp_path: Path) -> None:
    for name in TLS_FILES.values():
        (tmp_path / name).write_text("-----BEGIN CERTIFICATE-----\n")


def test_tls_files_that_exist_load(tmp_path: Path) -> None:
    # Prepare
    _write_tls_files(tmp_path)
    # Execute
    c = load_agent_config(write(tmp_path, TLS_CONFIG))
    # Assert
    assert (c.broker.ca_file, c.broker.key_file) == (tmp_path / "ca.crt", tmp_path / "client.key")


def _break(path: Path, problem: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Make ``path`` missing, a folder, or unreadable (for root too, who may read anything)."""
    path.unlink()
    if problem == "folder":
        path.mkdir()
    elif problem == "unreadable":
        path.write_text("secret")
        path.chmod(0)
        real_access = os.access
        monkeypatch.setattr(os, "access", lambda p, mode: Path(p) != path and real_access(p, mode))


@pytest.mark.parametrize("key", sorted(TLS_FILES))
@pytest.mark.parametrize(
    ("problem", "message"),
    [
        ("missing", "does not exist; put the .* there or fix the path"),
        ("folder", "is a folder, not the .*; fix the path"),
        ("unreadable", r"is not readable by this user; let the agent's user read it"),
    ],
)
def test_a_bad_tls_file_is_a_config_error_at_load_time(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, key: str, problem: str, message: str
) -> None:
    # Prepare
    _write_tls_files(tmp_path)
    bad = tmp_path / TLS_FILES[key]
    _break(bad, problem, monkeypatch)
    p = write(tmp_path, TLS_CONFIG)
    # Execute
    with pytest.raises(ConfigError) as info:
        load_agent_config(p)
    # Assert: one line naming the file, the key, the path and the fix
    text = str(info.value)
    assert re.fullmatch(f"{re.escape(f'{p}: broker.{key}: {bad} ')}{message}.*", text), text


@pytest.mark.timeout(30)  # without the load-time check the agent retries connecting forever
@pytest.mark.parametrize(
    ("text", "flags", "message"),
    [
        ('ca_file = "absent-ca.crt"\n', [], "broker.ca_file: {tmp}/absent-ca.crt does not exist"),
        ("", ["--ca-file", "{tmp}/absent-ca.crt"], "broker.ca_file: {tmp}/absent-ca.crt does not"),
        ('ca_file = "state"\n', [], "broker.ca_file: {tmp}/state is a folder"),
        (
            'cert_file = "client.crt"\nkey_file = "absent.key"\n',
            [],
            "broker.key_file: {tmp}/absent.key does not exist",
        ),
    ],
    ids=["ca_file", "ca-file-flag", "ca_file-folder", "key_file"],
)
def test_fedge_agent_refuses_a_bad_tls_file_with_exit_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], text: str, flags: list[str], message: str
) -> None:
    # Prepare: no broker listens on port 1, so only the config check can end the agent
    (tmp_path / "state").mkdir()
    (tmp_path / "client.crt").write_text("-----BEGIN CERTIFICATE-----\n")
    p = write(
        tmp_path,
        'fleet = "f"\ndevice_id = "pi"\n[agent]\nstate_dir = "state"\n'
        f'[broker]\nurl = "mqtts://127.0.0.1:1"\n{text}',
    )
    # Execute
    code = cli(["--config", str(p), *(f.format(tmp=tmp_path) for f in flags)])
    err = capsys.readouterr().err
    # Assert
    assert code == 2
    assert err.startswith("fedge agent: ") and err.count("\n") == 1, err
    assert message.format(tmp=tmp_path) in err
