"""``fedge coordinator`` refuses bad configuration and state with one clear line, exit 2.

Each case changes one line of a copy of ``deploy/coordinator.toml`` (the QA pass that found
them did the same). Nothing here needs a broker: every check runs before the coordinator
connects, and the broker URL points at a loopback port nobody listens on.
"""

from __future__ import annotations

import math
import re
import socket
import tomllib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from edge import cli as fedge_cli
from edge.modelio import pack_model
from edge.mosquitto import free_port
from edge.transport import InMemoryBroker
from server_stub import cli
from server_stub.config import (
    BrokerSettings,
    ConfigError,
    CoordinatorConfig,
    ModelSettings,
    ValidationSettings,
    config_from_dict,
    load_config,
)
from server_stub.coordinator import CheckpointMismatchError, Coordinator
from server_stub.devices import EligibilityRules
from server_stub.rounds import RoundSettings
from server_stub.store import Store

EXAMPLE = Path(__file__).resolve().parent.parent / "deploy" / "coordinator.toml"


@pytest.fixture
def dead_broker() -> str:
    """``url = "mqtt://127.0.0.1:PORT"`` of a port nobody listens on."""
    return f'url = "mqtt://127.0.0.1:{free_port()}"'


def edited(tmp_path: Path, old: str, new: str, *more: tuple[str, str]) -> Path:
    """A copy of the example config with ``old`` replaced by ``new`` (once each)."""
    text = EXAMPLE.read_text()
    for before, after in ((old, new), *more):
        assert before in text, before
        text = text.replace(before, after, 1)
    path = tmp_path / "coordinator.toml"
    path.write_text(text)
    return path


def run_main(path: Path, capsys: pytest.CaptureFixture[str], *extra: str) -> tuple[int, str]:
    code = cli.main(["--config", str(path), *extra])
    return code, capsys.readouterr().err


# ---------------------------------------------------------------------------- the loader

BAD_LINES = [
    ("hidden = [32]", "hidden = 32", "[model] hidden: must be a list of integers"),
    ("hidden = [32]", "hidden = [0]", "[model] hidden: an mlp needs positive widths"),
    ('kind = "mlp"', 'kind = "cnn"', "[model] kind: must be one of ['logreg', 'mlp'], got 'cnn'"),
    ("input_dim = 64", "input_dim = 0", "[model] input_dim: must be >= 1"),
    ("tick_s = 0.2", 'tick_s = "x"', "tick_s: must be a finite number, got 'x'"),
    ("tick_s = 0.2", "tick_s = true", "tick_s: must be a finite number, got true"),
    ("tick_s = 0.2", "tick_s = 0", "tick_s: must be in (0, 60]"),
    ("startup_grace_s = 1.0", "startup_grace_s = nan", "startup_grace_s: must be a finite"),
    ("chunk_size = 262144", "chunk_size = 10", "chunk_size: must be in 1024..2000000"),
    (
        "clients_per_round = 10",
        'clients_per_round = "two"',
        "[rounds] clients_per_round: must be an integer, got 'two'",
    ),
    ("clients_per_round = 10", "clients_per_round = 0", "[rounds] clients_per_round must be >= 1"),
    ("over_selection = 1.3", "over_selection = inf", "[rounds] over_selection: must be a finite"),
    ('mode = "sync"', "mode = 1", "[rounds] mode: must be one of ['sync', 'async']"),
    (
        "heartbeat_timeout_s = 90.0",
        'heartbeat_timeout_s = "90"',
        "[eligibility] heartbeat_timeout_s: must be a finite number, got '90'",
    ),
    (
        "min_battery_percent = 20.0",
        "min_battery_percent = true",
        "[eligibility] min_battery_percent: must be a finite number, got true",
    ),
    ("allow_metered = false", "allow_metered = 0", "[eligibility] allow_metered: must be true"),
    ('fleet = "lab"', "fleet = 5", "fleet: must be a string, got 5"),
    ('fleet = "lab"', 'fleet = "q/a"', "fleet: fleet 'q/a' contains forbidden characters"),
    ('fleet = "lab"', 'fleet = "+"', "fleet: fleet '+' contains forbidden characters"),
    ("rounds_total = 50", "rounds_total = -3", "rounds_total: must be >= 1 (0 runs forever)"),
    ("# seed = 0 ", "seed = -1 ", "seed: must be >= 0"),
    (
        'url = "mqtt://127.0.0.1:1883"',
        'url = "foo://127.0.0.1:1883"',
        "[broker] url: must start with mqtt:// or mqtts://",
    ),
    (
        'url = "mqtt://127.0.0.1:1883"',
        'url = "tcp://127.0.0.1:1883"',
        "[broker] url: must start with mqtt:// or mqtts://",
    ),
    (
        'url = "mqtt://127.0.0.1:1883"',
        'url = "mqtt://127.0.0.1:abc"',
        "[broker] url: port 'abc' of 'mqtt://127.0.0.1:abc' is not an integer",
    ),
    ('url = "mqtt://127.0.0.1:1883"', "url = 1883", "[broker] url: must be a string"),
    ('client_id = "fedge-coordinator"', 'client_id = ""', "[broker] client_id: must not be"),
    ("session_expiry_s = 3600", "session_expiry_s = -1", "[broker] session_expiry_s: must be in"),
    (
        '# password_file = "/etc/fedge/coordinator.password"',
        'username = "coordinator"\npassword_file = "missing.password"',
        "[broker] password_file: {dir}/missing.password does not exist",
    ),
    (
        '# password_file = "/etc/fedge/coordinator.password"',
        'password_file = "coordinator.toml"',
        "[broker] password_file: a password needs [broker] username",
    ),
    (
        '# ca_certs = "/etc/fedge/ca.crt"',
        'ca_certs = "missing-ca.crt"',
        "[broker] ca_certs: {dir}/missing-ca.crt does not exist",
    ),
    (
        '# weights = "init.npz"',
        'weights = "missing.npz"',
        "[model] weights: {dir}/missing.npz does not exist",
    ),
    (
        '# hmac_keys_dir = "/etc/fedge/keys"',
        'hmac_keys_dir = "no-keys"',
        "[validation] hmac_keys_dir: {dir}/no-keys is not a folder",
    ),
    ("max_update_norm = 100.0", "max_update_norm = 0", "[validation] max_update_norm: must be >"),
    (
        '# data = "heldout.npz"',
        'data = "heldout.npz"',
        "[evaluation] data: {dir}/heldout.npz does not exist",
    ),
    ('db = "coordinator.db"', "db = 3", "[state] db: must be a string, got 3"),
    ("# port = 9100", "port = 0", "[metrics] port: must be in 1..65535, got 0"),
    ("# port = 9100", 'port = "9100"', "[metrics] port: must be an integer, got '9100'"),
    ('codec = "int8"', "codec = 1979-05-27", "[uplink] codec: must be a preset name"),
    ('codec = "int8"', 'codec = "int9"', "[uplink] codec: codec 'int9' is neither a preset"),
    ("lr = 0.05", 'lr = "fast"', "[strategy] lr must be a number, got 'fast'"),
    ('name = "fedavg"', "name = 3", "[strategy] name: must be a string, got 3"),
    ('policy = "random"', 'policy = "best"', "[selection] unknown selection policy 'best'"),
    ("epochs = 1", "epochs = 1\n[extra_table]", "unknown top-level key(s) ['extra_table']"),
]


@pytest.mark.parametrize(("old", "new", "message"), BAD_LINES)
def test_bad_line_is_a_config_error_naming_file_and_key(
    tmp_path: Path, old: str, new: str, message: str
) -> None:
    # Prepare
    path = edited(tmp_path, old, new)
    # Execute / Assert
    with pytest.raises(ConfigError) as info:
        load_config(path)
    text = str(info.value)
    assert text.startswith(f"{path}: ")
    assert message.format(dir=tmp_path) in text


@pytest.mark.parametrize(("old", "new", "message"), BAD_LINES)
def test_bad_line_exits_2_with_one_line_before_connecting(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], old: str, new: str, message: str
) -> None:
    # Prepare
    path = edited(tmp_path, old, new)
    # Execute
    code, err = run_main(path, capsys)
    # Assert: one line, no traceback, the state db was never created
    assert code == 2
    assert err.startswith("fedge coordinator: ") and err.count("\n") == 1, err
    assert message.format(dir=tmp_path) in err
    assert not (tmp_path / "coordinator.db").exists()


def test_rounds_total_zero_still_runs_forever(tmp_path: Path) -> None:
    config = load_config(edited(tmp_path, "rounds_total = 50", "rounds_total = 0"))
    assert config.rounds_total is None


def test_logreg_ignores_the_default_hidden_widths(tmp_path: Path) -> None:
    config = load_config(edited(tmp_path, 'kind = "mlp"', 'kind = "logreg"'))
    layout, _weights = config.layout_and_weights()
    assert layout.names == ("w0", "b0")


def test_a_table_given_as_a_value_names_the_table() -> None:
    with pytest.raises(ConfigError, match=re.escape("[broker] must be a table, got broker = 5")):
        config_from_dict({"broker": 5})


def test_unreadable_weights_file_exits_2_naming_the_key(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], dead_broker: str
) -> None:
    # Prepare
    (tmp_path / "init.npz").write_bytes(b"not an npz")
    path = edited(
        tmp_path,
        '# weights = "init.npz"',
        'weights = "init.npz"',
        ('url = "mqtt://127.0.0.1:1883"', dead_broker),
    )
    # Execute
    code, err = run_main(path, capsys)
    # Assert
    assert code == 2
    assert f"{path}: [model] weights: {tmp_path}/init.npz is not a readable .npz" in err


def test_evaluation_data_names_the_coordinators_key_not_the_agents(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], dead_broker: str
) -> None:
    # Prepare: the file exists when the config is loaded but holds the wrong arrays
    np.savez(tmp_path / "heldout.npz", a=np.zeros(3))
    path = edited(
        tmp_path,
        '# data = "heldout.npz"',
        'data = "heldout.npz"',
        ('url = "mqtt://127.0.0.1:1883"', dead_broker),
    )
    # Execute: through `fedge coordinator`, which builds the evaluation
    code = fedge_cli.main(["coordinator", "--config", str(path)])
    err = capsys.readouterr().err
    # Assert
    assert code == 2
    assert f"{path}: [evaluation] data: " in err and "missing array" in err
    assert "agent" not in err


# ---------------------------------------------------------------------- state database


def _truncated_db(path: Path) -> None:
    with Store(path) as store:
        for version in range(3):
            store.checkpoint(
                version=version, round_no=version, envelope=bytes(100_000), state={},
                record=None, accepted=(),
            )  # fmt: skip
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


@pytest.mark.parametrize(
    "make",
    [
        pytest.param(lambda p: p.write_bytes(b"\x00garbage" * 100), id="garbage"),
        pytest.param(lambda p: p.mkdir(), id="folder"),
        pytest.param(_truncated_db, id="truncated"),
    ],
)
def test_unusable_state_db_exits_2_and_is_left_alone(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], dead_broker: str, make: Any
) -> None:
    # Prepare
    db = tmp_path / "coordinator.db"
    make(db)
    before = db.read_bytes() if db.is_file() else None
    path = edited(tmp_path, 'url = "mqtt://127.0.0.1:1883"', dead_broker)
    # Execute
    code, err = run_main(path, capsys)
    # Assert
    assert code == 2
    assert err.startswith(f"fedge coordinator: state db {db} is not a fedge state database (")
    assert err.rstrip().endswith("; move it away or point [state] db elsewhere")
    assert err.count("\n") == 1
    assert (db.read_bytes() if db.is_file() else None) == before


def test_state_db_in_use_by_another_coordinator_exits_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], dead_broker: str
) -> None:
    # Prepare: another coordinator (here: this process) has the state db open
    db = tmp_path / "coordinator.db"
    path = edited(tmp_path, 'url = "mqtt://127.0.0.1:1883"', dead_broker)
    with Store(db):
        before = db.read_bytes()
        # Execute
        code, err = run_main(path, capsys)
        # Assert
        assert code == 2
        assert err.startswith(f"fedge coordinator: state db {db} is in use by another process")
        assert err.rstrip().endswith("stop the other one, or give this one its own [state] db")
        assert err.count("\n") == 1
        assert db.read_bytes() == before


def checkpoint_example_model(store: Store, version: int = 0) -> None:
    """Store the example config's model (hidden = [32]) as the checkpoint of ``version``
    (made by round ``version``)."""
    _layout, weights = load_config(EXAMPLE).layout_and_weights()
    envelope = pack_model(weights, model_version=version, round_no=version).to_bytes()
    store.checkpoint(
        version=version, round_no=version, envelope=envelope, state={}, record=None, accepted=()
    )


def test_checkpoint_of_another_model_exits_2_and_keeps_the_checkpoint(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], dead_broker: str
) -> None:
    # Prepare: a checkpoint made with hidden = [32], then the config says [128]
    db = tmp_path / "coordinator.db"
    with Store(db) as store:
        checkpoint_example_model(store)
    before = db.read_bytes()
    path = edited(
        tmp_path, "hidden = [32]", "hidden = [128]", ('url = "mqtt://127.0.0.1:1883"', dead_broker)
    )
    # Execute
    code, err = run_main(path, capsys)
    # Assert
    assert code == 2
    assert f"the checkpoint in {db} was made with a different model (it has w0 64x32" in err
    assert "[model] gives w0 64x128" in err
    assert err.rstrip().endswith("restore [model] or use a new [state] db")
    assert db.read_bytes() == before


def test_embedded_coordinator_refuses_a_checkpoint_of_another_model(tmp_path: Path) -> None:
    # The check lives in the coordinator itself, so the simulator and other embedders get the
    # same message as the command line (before, a KeyError or LayoutError from unpacking).
    with Store(tmp_path / "coordinator.db") as store:
        checkpoint_example_model(store)
        other = load_config(edited(tmp_path, "hidden = [32]", "hidden = [128]"))
        layout, other_weights = other.layout_and_weights()
        with pytest.raises(CheckpointMismatchError, match="was made with a different model"):
            Coordinator(
                other, InMemoryBroker().connect("coord"), store, layout=layout,
                initial_weights=other_weights,
            )  # fmt: skip


# ------------------------------------------------------------------- ports and broker


@pytest.fixture
def busy_port() -> Iterator[int]:
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen()
    try:
        yield int(sock.getsockname()[1])
    finally:
        sock.close()


def _with_metrics_port(tmp_path: Path, port: int, broker: str) -> Path:
    """The example config with ``[metrics] port`` and ``[broker] url`` set."""
    return edited(
        tmp_path, "# port = 9100", f"port = {port}", ('url = "mqtt://127.0.0.1:1883"', broker)
    )


def test_metrics_port_in_use_exits_2_naming_the_key(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], dead_broker: str, busy_port: int
) -> None:
    # Prepare
    path = _with_metrics_port(tmp_path, busy_port, dead_broker)
    # Execute
    code, err = run_main(path, capsys)
    # Assert: refused before the state db is opened
    assert code == 2
    assert f"fedge coordinator: [metrics] port {busy_port}: cannot serve metrics" in err
    assert err.count("\n") == 1
    assert not (tmp_path / "coordinator.db").exists()


def test_second_coordinator_on_one_config_is_told_it_runs_already(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], dead_broker: str, busy_port: int
) -> None:
    # Prepare: the same config running already holds the metrics port and the state db
    path = _with_metrics_port(tmp_path, busy_port, dead_broker)
    db = tmp_path / "coordinator.db"
    with Store(db):
        # Execute
        code, err = run_main(path, capsys)
    # Assert: the state db in use is named, not only the port
    assert code == 2
    assert f"[metrics] port {busy_port} is taken and state db {db} is in use by another" in err
    assert err.rstrip().endswith("give this one its own [state] db and [metrics] port")
    assert err.count("\n") == 1


def test_unreachable_broker_exits_1_with_one_line_naming_the_url(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # Prepare
    port = free_port()
    path = edited(
        tmp_path, 'url = "mqtt://127.0.0.1:1883"', f'url = "mqtt://coord:s3cret@127.0.0.1:{port}"'
    )
    # Execute
    code, err = run_main(path, capsys)
    # Assert: no retry, no traceback, no password
    assert code == 1
    assert err.startswith(
        f"fedge coordinator: cannot connect to the broker at mqtt://coord:***@127.0.0.1:{port} "
        "([broker] url): "
    )
    assert err.count("\n") == 1 and "s3cret" not in err


# -------------------------------------------------------------------------- arguments


def test_help_describes_the_command_not_the_module(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        fedge_cli.main(["coordinator", "--help"])
    out = capsys.readouterr().out
    assert info.value.code == 0
    assert "Run the federated-learning coordinator of one fleet" in out
    assert "composition root" not in out


@pytest.mark.parametrize("rounds", ["0", "-1", "x"])
def test_rounds_flag_must_be_positive(tmp_path: Path, rounds: str) -> None:
    with pytest.raises(SystemExit) as info:
        cli.main(["--config", str(EXAMPLE), "--rounds", rounds])
    assert info.value.code == 2


# --------------------------------------------------------------------- property test

# Every key the coordinator reads, with the table it lives in ("" = top level).
KEYS: list[tuple[str, str]] = [
    *(("", k) for k in ("fleet", "rounds_total", "seed", "tick_s", "chunk_size")),
    ("", "startup_grace_s"),
    *(("broker", f) for f in BrokerSettings.__dataclass_fields__),
    *(("model", f) for f in ModelSettings.__dataclass_fields__),
    *(("eligibility", f) for f in EligibilityRules.__dataclass_fields__),
    *(("rounds", f) for f in RoundSettings.__dataclass_fields__),
    *(("validation", f) for f in ValidationSettings.__dataclass_fields__),
    ("uplink", "codec"),
    ("uplink", "error_feedback"),
    *(("strategy", k) for k in ("name", "epochs", "batch_size", "lr", "mu", "extra")),
    *(("selection", k) for k in ("policy", "epsilon")),
    ("evaluation", "data"),
    ("state", "db"),
    ("metrics", "port"),
]

TOML_SCALARS = st.one_of(
    st.booleans(),
    st.integers(min_value=-(2**63), max_value=2**63 - 1),
    st.sampled_from([0, 1, 2, 3, 1024, 65535, 65536]),
    st.floats(),
    st.text(max_size=12),
    st.sampled_from(["", "mlp", "logreg", "sync", "async", "int8", "mqtt://h:1", "fedbuff"]),
    st.dates(),
    st.datetimes(),
    st.times(),
    st.lists(st.integers(min_value=-3, max_value=64), max_size=3),
    st.lists(st.text(max_size=4), max_size=2),
)


@settings(max_examples=400)
@given(where=st.sampled_from(KEYS), value=TOML_SCALARS)
def test_any_toml_value_for_any_key_gives_a_config_or_a_config_error(
    where: tuple[str, str], value: Any
) -> None:
    # Prepare: the example config with one key set to an arbitrary TOML value
    data: dict[str, Any] = tomllib.loads(EXAMPLE.read_text())
    table, key = where
    (data.setdefault(table, {}) if table else data)[key] = value
    # Execute
    try:
        config = config_from_dict(data, base_dir=EXAMPLE.parent)
    except ConfigError as exc:
        # Assert: the message names the key (or, for strategy/selection parameters, its table)
        assert key in str(exc) or f"[{table}]" in str(exc), str(exc)
        return
    # Assert: what was accepted is usable as it is
    assert isinstance(config, CoordinatorConfig)
    assert math.isfinite(config.tick_s) and config.tick_s > 0
    assert all(type(h) is int and h >= 1 for h in config.model.hidden) or (
        config.model.kind == "logreg"
    )
