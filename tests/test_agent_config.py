"""Agent config: TOML loading, validation messages, CLI overrides, key files."""

from __future__ import annotations

from pathlib import Path

import pytest

from edge.agent_main import add_arguments, resolve_config
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
