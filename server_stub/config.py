"""Coordinator configuration: frozen dataclasses read from TOML and validated once, at load time.

This module owns :class:`CoordinatorConfig` and :func:`load_config`. ``deploy/coordinator.toml``
is the annotated example; ``docs/COORDINATOR.md`` explains every table. Relative paths are
resolved against the TOML file's folder.

Every mistake is a :class:`ConfigError` whose message names the file, the table and key, and
the fix (``coordinator.toml: [model] hidden: must be a list of integers such as [32], got 32``):
unknown keys (the message lists the valid ones), values of the wrong type (a bool is not a
number), values out of range, and files the config names that do not exist. All of it is
checked here, before the coordinator connects to the broker or opens its state database.
"""

from __future__ import annotations

import json
import math
import tomllib
import types
import typing
import zipfile
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np

from edge.modelio import F32, ModelLayout
from edge.transport import check_broker_url
from edge.wire import BadTopicError, JSONValue, validate_id
from kernels.codec import parse_codec
from server_stub.devices import EligibilityRules
from server_stub.rounds import RoundSettings


class ConfigError(ValueError):
    """The configuration file is missing, malformed or has an out-of-range value.

    The message names the table and key (``[broker] url: ...``) and the fix;
    :func:`load_config` puts the file name in front.
    """


def _fail(where: str, key: str, message: str) -> ConfigError:
    """``[where] key: message`` (``key: message`` for a top-level key)."""
    return ConfigError(f"[{where}] {key}: {message}" if where else f"{key}: {message}")


def _check_range(where: str, key: str, value: float, lo: int, hi: float = math.inf) -> None:
    if not lo <= value <= hi:
        bound = f">= {lo}" if hi == math.inf else f"in {lo}..{hi}"
        raise _fail(where, key, f"must be {bound}, got {value!r}")


MAX_CHUNK_SIZE = 2_000_000
"""Largest downlink chunk: Mosquitto's default ``max_packet_size`` (deploy/mosquitto/dev.conf)."""


@dataclass(frozen=True, slots=True)
class BrokerSettings:
    """How the coordinator reaches the broker."""

    url: str = "mqtt://127.0.0.1:1883"
    """``mqtt://`` or ``mqtts://`` URL (``user:password@`` allowed, prefer ``password_file``)."""
    client_id: str = "fedge-coordinator"
    """MQTT client id; keep it stable so the persistent session survives restarts."""
    username: str | None = None
    password_file: str | None = None
    """File holding the broker password (first line)."""
    ca_certs: str | None = None
    """CA bundle for ``mqtts://``."""
    tls_insecure: bool = False
    """Skip the broker host-name check (tests only)."""
    session_expiry_s: int = 3600
    """MQTT 5 session expiry: updates sent while the coordinator restarts are kept this long."""

    def __post_init__(self) -> None:
        try:
            check_broker_url(self.url)
        except ValueError as exc:
            raise _fail("broker", "url", str(exc)) from None
        if not self.client_id:
            raise _fail("broker", "client_id", "must not be empty (the session is kept by id)")
        _check_range("broker", "session_expiry_s", self.session_expiry_s, 0, 2**32 - 1)
        if self.password_file is not None and self.username is None and "@" not in self.url:
            raise _fail("broker", "password_file", "a password needs [broker] username")


@dataclass(frozen=True, slots=True)
class ModelSettings:
    """The model: a weights file, or a spec from which fresh weights are drawn."""

    weights: str | None = None
    """``.npz`` of the initial weights (its array order is the layout's order)."""
    kind: Literal["logreg", "mlp"] = "mlp"
    input_dim: int = 64
    hidden: tuple[int, ...] = (32,)
    num_classes: int = 10
    init_seed: int = 0
    """Seed of the initial weights drawn from the spec."""

    def __post_init__(self) -> None:
        if self.kind not in ("logreg", "mlp"):
            raise _fail("model", "kind", f"must be 'logreg' or 'mlp', got {self.kind!r}")
        _check_range("model", "input_dim", self.input_dim, 1)
        _check_range("model", "num_classes", self.num_classes, 2)
        _check_range("model", "init_seed", self.init_seed, 0)
        if self.kind == "mlp" and (not self.hidden or any(h < 1 for h in self.hidden)):
            raise _fail(
                "model", "hidden", f"an mlp needs positive widths (hidden = [32]), got "
                f"{list(self.hidden)}"
            )  # fmt: skip


@dataclass(frozen=True, slots=True)
class UplinkSettings:
    """How devices encode their updates."""

    codec: dict[str, JSONValue] = field(default_factory=lambda: {"id": "raw"})
    """Codec config (from a preset name such as ``int8`` or a JSON config)."""
    error_feedback: bool = False
    """Devices keep the compression residual between rounds."""


@dataclass(frozen=True, slots=True)
class ValidationSettings:
    """Update checks."""

    max_update_norm: float | None = None
    """Reject updates whose L2 norm exceeds this; None: no bound."""
    hmac_keys_dir: str | None = None
    """Folder of per-device HMAC keys, one file ``{cid}.key`` each (raw bytes or hex)."""
    require_signature: bool = False
    """Reject unsigned updates even from devices with no key."""
    max_envelope_mb: float = 64.0
    """Largest update envelope accepted."""

    def __post_init__(self) -> None:
        if self.max_update_norm is not None and not self.max_update_norm > 0:
            raise _fail("validation", "max_update_norm", f"must be > 0, got {self.max_update_norm}")
        if not 0 < self.max_envelope_mb <= 2048:
            raise _fail(
                "validation", "max_envelope_mb", f"must be in (0, 2048], got {self.max_envelope_mb}"
            )


@dataclass(frozen=True, slots=True)
class CoordinatorConfig:
    """Everything ``fedge coordinator`` needs."""

    fleet: str = "default"
    """Fleet name: topics are ``fl/v1/{fleet}/...``."""
    rounds_total: int | None = None
    """Rounds to run, then exit; None runs forever."""
    seed: int | None = None
    """Seed of selection and task ids; None draws one from the OS."""
    tick_s: float = 0.2
    """How often the loop wakes up without messages (deadlines, replacements)."""
    strategy: str = "fedavg"
    strategy_params: Mapping[str, Any] = field(default_factory=dict)
    selection: str = "random"
    selection_params: Mapping[str, Any] = field(default_factory=dict)
    eligibility: EligibilityRules = field(default_factory=EligibilityRules)
    rounds: RoundSettings = field(default_factory=RoundSettings)
    model: ModelSettings = field(default_factory=ModelSettings)
    uplink: UplinkSettings = field(default_factory=UplinkSettings)
    validation: ValidationSettings = field(default_factory=ValidationSettings)
    broker: BrokerSettings = field(default_factory=BrokerSettings)
    eval_data: str | None = None
    """Held-out ``.npz`` (``x``, ``y``) the composition root evaluates each new model on."""
    state_db: str = "coordinator.db"
    metrics_port: int | None = None
    """Serve Prometheus metrics on this port (127.0.0.1); None: no HTTP server."""
    chunk_size: int = 256 * 1024
    """Chunk size of the downlink model."""
    startup_grace_s: float = 1.0
    """Wait this long after start for retained statuses before the first selection."""

    def __post_init__(self) -> None:
        try:
            validate_id(self.fleet, "fleet")
        except BadTopicError as exc:
            raise _fail("", "fleet", f"{exc} (it is one MQTT topic level)") from None
        if self.rounds_total is not None and self.rounds_total < 1:
            raise _fail(
                "", "rounds_total", f"must be >= 1 (0 runs forever), got {self.rounds_total}"
            )
        if self.seed is not None:
            _check_range("", "seed", self.seed, 0)
        if not (math.isfinite(self.tick_s) and 0 < self.tick_s <= 60):
            raise _fail("", "tick_s", f"must be in (0, 60] seconds, got {self.tick_s!r}")
        if not (math.isfinite(self.startup_grace_s) and 0 <= self.startup_grace_s <= 3600):
            raise _fail(
                "", "startup_grace_s", f"must be in 0..3600 seconds, got {self.startup_grace_s!r}"
            )
        _check_range("", "chunk_size", self.chunk_size, 1024, MAX_CHUNK_SIZE)
        if self.metrics_port is not None:
            _check_range("metrics", "port", self.metrics_port, 1, 65535)
        if not self.state_db:
            raise _fail("state", "db", "must name a file")

    # -- derived -------------------------------------------------------------------------------

    def layout_and_weights(self) -> tuple[ModelLayout, dict[str, F32]]:
        """The model layout and initial weights (from the ``.npz`` or drawn from the spec)."""
        m = self.model
        if m.weights is not None:
            try:
                with np.load(m.weights, allow_pickle=False) as npz:  # never unpickle
                    weights = {k: np.asarray(npz[k], dtype=np.float32) for k in npz.files}
            except (OSError, ValueError, EOFError, zipfile.BadZipFile) as exc:
                raise _fail(
                    "model", "weights", f"{m.weights} is not a readable .npz of numeric arrays "
                    f"({exc}); write it with np.savez(path, w0=..., b0=...)"
                ) from None  # fmt: skip
            if not weights:
                raise _fail("model", "weights", f"{m.weights} holds no arrays")
            return ModelLayout.of(weights), weights
        try:
            return _spec_weights(m)
        except MemoryError:
            raise _fail(
                "model", "hidden", f"a model of input_dim {m.input_dim}, hidden {list(m.hidden)} "
                f"and {m.num_classes} classes does not fit in memory; make it smaller"
            ) from None  # fmt: skip

    def hmac_keys(self) -> dict[str, bytes]:
        """Per-device HMAC keys from ``hmac_keys_dir`` (``{cid}.key``; hex text or raw)."""
        d = self.validation.hmac_keys_dir
        if d is None:
            return {}
        keys: dict[str, bytes] = {}
        for path in sorted(Path(d).glob("*.key")):
            raw = path.read_bytes()
            text = raw.strip()
            try:
                keys[path.stem] = bytes.fromhex(text.decode("ascii"))
            except (UnicodeDecodeError, ValueError):
                keys[path.stem] = raw
        return keys


def _spec_weights(m: ModelSettings) -> tuple[ModelLayout, dict[str, F32]]:
    """Layout ``w0, b0, w1, b1, ...`` (the convention of ``edge.training``) and weights.

    Initialisation matches ``edge.training.init_weights`` in kind (He uniform before a ReLU,
    Glorot uniform before the softmax, zero biases); the composition root may pass weights
    from ``edge.training`` instead.
    """
    dims = [m.input_dim, *(m.hidden if m.kind == "mlp" else ()), m.num_classes]
    rng = np.random.default_rng(m.init_seed)
    weights: dict[str, F32] = {}
    last = len(dims) - 2
    for layer in range(len(dims) - 1):
        fan_in, fan_out = dims[layer], dims[layer + 1]
        limit = math.sqrt(6.0 / fan_in) if layer < last else math.sqrt(6.0 / (fan_in + fan_out))
        weights[f"w{layer}"] = rng.uniform(-limit, limit, (fan_in, fan_out)).astype(np.float32)
        weights[f"b{layer}"] = np.zeros(fan_out, dtype=np.float32)
    return ModelLayout.of(weights), weights


# ----------------------------------------------------------------------------------- loading


_TABLES = (
    "broker", "model", "strategy", "selection", "eligibility", "rounds", "uplink",
    "validation", "evaluation", "state", "metrics",
)  # fmt: skip
_SCALARS = ("fleet", "rounds_total", "seed", "tick_s", "chunk_size", "startup_grace_s")


def _describe(value: Any) -> str:
    """``'x'`` for a str, ``true`` for a bool, the repr otherwise (as the TOML would say it)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    return repr(value)


def _check_value(where: str, key: str, value: Any, hint: Any) -> Any:
    """Return ``value`` if it has the annotated type (lists become tuples or frozensets).

    A bool is not a number, an int is a float; every non-finite float is refused.
    """
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (types.UnionType, typing.Union):
        if value is None and type(None) in args:
            return None
        (hint,) = (a for a in args if a is not type(None))
        origin, args = typing.get_origin(hint), typing.get_args(hint)
    got = _describe(value)
    if origin is Literal:
        if not isinstance(value, str) or value not in args:
            raise _fail(where, key, f"must be one of {list(args)}, got {got}")
        return value
    if hint is bool:
        if type(value) is not bool:
            raise _fail(where, key, f"must be true or false, got {got}")
    elif hint is int:
        if type(value) is not int:
            raise _fail(where, key, f"must be an integer, got {got}")
    elif hint is float:
        if type(value) not in (int, float) or not math.isfinite(value):
            raise _fail(where, key, f"must be a finite number, got {got}")
        return float(value)
    elif hint is str:
        if not isinstance(value, str):
            raise _fail(where, key, f"must be a string, got {got}")
    elif origin is tuple:  # tuple[int, ...]: layer widths
        if not isinstance(value, list | tuple) or not all(type(v) is int for v in value):
            raise _fail(where, key, f"must be a list of integers such as [32], got {got}")
        return tuple(value)
    elif origin is frozenset:  # frozenset[str]: codec ids
        if not isinstance(value, list | tuple | frozenset | set) or not all(
            isinstance(v, str) for v in value
        ):
            raise _fail(where, key, f"must be a list of strings, got {got}")
        return frozenset(value)
    return value


def _table(top: Mapping[str, Any], name: str) -> dict[str, Any]:
    value = top.get(name, {})
    if not isinstance(value, Mapping):
        raise ConfigError(f"[{name}] must be a table, got {name} = {_describe(value)}")
    return dict(value)


def _build(cls: type[Any], table: Mapping[str, Any], where: str) -> Any:
    """Type-check every key of ``table`` against ``cls``'s annotations, then build it."""
    hints = typing.get_type_hints(cls)
    unknown = sorted(set(table) - set(hints))
    if unknown:
        raise ConfigError(f"[{where}] has unknown key(s) {unknown}; valid: {sorted(hints)}")
    kwargs = {k: _check_value(where, k, v, hints[k]) for k, v in table.items()}
    try:
        return cls(**kwargs)
    except ConfigError:
        raise
    except (TypeError, ValueError) as exc:  # the range checks of RoundSettings & co name the key
        raise ConfigError(f"[{where}] {exc}") from None


def _path(base: Path, where: str, key: str, value: Any) -> str | None:
    if value is None:
        return None
    if not isinstance(value, str) or not value or "\x00" in value:
        raise _fail(where, key, f"must be a path string, got {_describe(value)}")
    try:
        p = Path(value).expanduser()
    except RuntimeError as exc:  # "~user" of an unknown user
        raise _fail(where, key, f"cannot expand {value!r} ({exc})") from None
    return str(p if p.is_absolute() else base / p)


def _need_file(where: str, key: str, path: str | None, what: str) -> None:
    if path is None:
        return
    p = Path(path)
    if p.is_dir():
        raise _fail(where, key, f"{p} is a folder, not {what}; fix the path")
    if not p.is_file():
        raise _fail(where, key, f"{p} does not exist; create {what} there or fix the path")


def config_from_dict(data: Mapping[str, Any], base_dir: Path | None = None) -> CoordinatorConfig:
    """Build and validate a config from a parsed TOML document.

    Raises
    ------
    ConfigError
        Naming the table and key of the first problem, and the fix.
    """
    base = base_dir or Path.cwd()
    top = dict(data)
    unknown = sorted(set(top) - set(_TABLES) - set(_SCALARS))
    if unknown:
        raise ConfigError(
            f"unknown top-level key(s) {unknown}; valid: {sorted((*_TABLES, *_SCALARS))}"
        )
    hints = typing.get_type_hints(CoordinatorConfig)
    kwargs: dict[str, Any] = {
        k: _check_value("", k, top[k], hints[k]) for k in _SCALARS if k in top
    }
    if kwargs.get("rounds_total") == 0:  # documented: 0 runs forever
        kwargs["rounds_total"] = None
    broker = _table(top, "broker")
    for key in ("password_file", "ca_certs"):
        broker[key] = _path(base, "broker", key, broker.get(key))
    kwargs["broker"] = _build(BrokerSettings, broker, "broker")
    model = _table(top, "model")
    model["weights"] = _path(base, "model", "weights", model.get("weights"))
    kwargs["model"] = _build(ModelSettings, model, "model")
    strategy = _table(top, "strategy")
    kwargs["strategy"] = _check_value("strategy", "name", strategy.pop("name", "fedavg"), str)
    kwargs["strategy_params"] = strategy
    selection = _table(top, "selection")
    kwargs["selection"] = _check_value(
        "selection", "policy", selection.pop("policy", "random"), str
    )
    kwargs["selection_params"] = selection
    kwargs["eligibility"] = _build(EligibilityRules, _table(top, "eligibility"), "eligibility")
    rounds = _table(top, "rounds")
    if "batch_size" not in rounds and type(strategy.get("batch_size")) is int:
        rounds["batch_size"] = strategy["batch_size"]
    kwargs["rounds"] = _build(RoundSettings, rounds, "rounds")
    _check_rounds(kwargs["rounds"])
    uplink = _table(top, "uplink")
    codec = uplink.get("codec", "none")
    if not isinstance(codec, str | Mapping):
        raise _fail(
            "uplink", "codec", f"must be a preset name (int8) or a codec table, got "
            f"{_describe(codec)}"
        )  # fmt: skip
    try:
        uplink["codec"] = parse_codec(codec if isinstance(codec, str) else json.dumps(codec))
    except (TypeError, ValueError) as exc:  # TypeError: a TOML date inside the table
        raise _fail("uplink", "codec", str(exc)) from None
    kwargs["uplink"] = _build(UplinkSettings, uplink, "uplink")
    validation = _table(top, "validation")
    validation["hmac_keys_dir"] = _path(
        base, "validation", "hmac_keys_dir", validation.get("hmac_keys_dir")
    )
    kwargs["validation"] = _build(ValidationSettings, validation, "validation")
    evaluation = _table(top, "evaluation")
    _build(_EvalTable, evaluation, "evaluation")
    kwargs["eval_data"] = _path(base, "evaluation", "data", evaluation.get("data"))
    state = _table(top, "state")
    _build(_StateTable, state, "state")
    kwargs["state_db"] = _path(base, "state", "db", state.get("db", "coordinator.db"))
    metrics = _table(top, "metrics")
    kwargs["metrics_port"] = _build(_MetricsTable, metrics, "metrics").port
    config = CoordinatorConfig(**kwargs)
    _check_files(config)
    _check_components(config)
    return config


def _check_rounds(rounds: RoundSettings) -> None:
    """Ranges ``RoundSettings`` itself leaves open."""
    if rounds.min_devices is not None:
        _check_range("rounds", "min_devices", rounds.min_devices, 1)
    if rounds.replace_min_remaining_s is not None:
        _check_range("rounds", "replace_min_remaining_s", rounds.replace_min_remaining_s, 0)


def _check_files(config: CoordinatorConfig) -> None:
    """Every file or folder the config names exists (the state db is created if missing)."""
    b = config.broker
    _need_file("broker", "password_file", b.password_file, "the password file")
    _need_file("broker", "ca_certs", b.ca_certs, "the CA bundle")
    _need_file("model", "weights", config.model.weights, "the .npz of initial weights")
    _need_file("evaluation", "data", config.eval_data, "the held-out .npz (x, y)")
    keys = config.validation.hmac_keys_dir
    if keys is not None and not Path(keys).is_dir():
        raise _fail(
            "validation", "hmac_keys_dir", f"{keys} is not a folder; create it with one "
            "{cid}.key per device or fix the path"
        )  # fmt: skip


def _check_components(config: CoordinatorConfig) -> None:
    """Build the strategy and selector once so a bad parameter fails at load time."""
    from server_stub.selection import SelectionError, make_selector
    from server_stub.strategies import StrategyConfigError, make_strategy

    try:
        make_strategy(config.strategy, _strategy_params(config))
    except StrategyConfigError as exc:
        raise ConfigError(f"[strategy] {exc}") from None
    try:
        make_selector(config.selection, dict(config.selection_params))
    except SelectionError as exc:
        raise ConfigError(f"[selection] {exc}") from None
    if config.rounds.mode == "async" and config.strategy != "fedbuff":
        raise ConfigError("[rounds] mode = 'async' needs [strategy] name = 'fedbuff'")


def _strategy_params(config: CoordinatorConfig) -> dict[str, Any]:
    params = dict(config.strategy_params)
    if config.strategy == "scaffold":
        params.setdefault("num_clients", max(1, config.rounds.clients_per_round))
    return params


@dataclass(frozen=True, slots=True)
class _EvalTable:
    data: str | None = None


@dataclass(frozen=True, slots=True)
class _StateTable:
    db: str = "coordinator.db"


@dataclass(frozen=True, slots=True)
class _MetricsTable:
    port: int | None = None


def load_config(path: str | Path) -> CoordinatorConfig:
    """Read and validate a coordinator TOML file.

    Raises
    ------
    ConfigError
        ``{path}: [table] key: what is wrong and how to fix it``.
    """
    p = Path(path)
    try:
        data = tomllib.loads(p.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(
            f"config file {p} not found (example: deploy/coordinator.toml)"
        ) from None  # fmt: skip
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{p}: cannot read: {exc}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{p}: not valid TOML: {exc}") from None
    try:
        return config_from_dict(data, p.resolve().parent)
    except ConfigError as exc:
        raise ConfigError(f"{p}: {exc}") from None


__all__ = [
    "BrokerSettings",
    "ConfigError",
    "CoordinatorConfig",
    "ModelSettings",
    "UplinkSettings",
    "ValidationSettings",
    "config_from_dict",
    "load_config",
]
