"""The device agent's configuration: frozen dataclasses, read from TOML and validated once.

``load_agent_config(path)`` reads ``agent.toml`` (see ``deploy/agent.toml`` for every key,
commented) and raises :class:`ConfigError` naming the file, the key and the fix for anything
wrong; the objects it returns are valid by construction. Command-line flags override the
file through :func:`apply_overrides` (the same validation runs again). Nothing here connects,
reads data or imports paho (it only looks whether ``state_dir`` is a folder and whether the
TLS files can be read): ``edge.agent_main`` turns the config into running objects.
"""

from __future__ import annotations

import math
import os
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field, fields, is_dataclass, replace
from pathlib import Path
from typing import Any, Literal, cast

from edge.eligibility import Limits
from edge.telemetry import TelemetryOverrides
from edge.transport import check_broker_url
from edge.wire import BadTopicError, NetKind, validate_id

__all__ = [
    "AgentConfig",
    "AgentSettings",
    "BrokerSettings",
    "ConfigError",
    "DataSettings",
    "ModelSettings",
    "apply_overrides",
    "load_agent_config",
    "read_hmac_key",
]

TrainerKind = Literal["numpy", "litert"]


class ConfigError(ValueError):
    """The agent configuration is invalid; the message names the key and the fix."""


def _fail(key: str, message: str) -> ConfigError:
    return ConfigError(f"{key}: {message}")


def _need_readable_file(key: str, path: Path | None, what: str) -> None:
    """Refuse a file the agent reads later (None: not configured).

    Checked at load time because later, at connect time, a missing CA or key file is only a
    vague TLS error in a reconnect loop that never ends.
    """
    if path is None:
        return
    if path.is_dir():
        raise _fail(key, f"{path} is a folder, not {what}; fix the path")
    if not path.exists():
        raise _fail(key, f"{path} does not exist; put {what} there or fix the path")
    if not os.access(path, os.R_OK):
        raise _fail(
            key,
            f"{path} is not readable by this user; let the agent's user read it "
            "(chown/chmod) or fix the path",
        )


@dataclass(frozen=True, slots=True)
class BrokerSettings:
    """How to reach the MQTT broker (``[broker]``)."""

    url: str = "mqtt://127.0.0.1:1883"
    """``mqtt://host:port`` or ``mqtts://host:port`` (TLS). No password in the URL: use
    ``password_file``."""
    username: str | None = None
    """MQTT username; in production the device id (the ACL uses ``%u``)."""
    password_file: Path | None = None
    """File whose first line is the MQTT password (mode 0600, owned by the agent's user)."""
    ca_file: Path | None = None
    """CA bundle that signed the broker's certificate (TLS); None uses the system store."""
    cert_file: Path | None = None
    """Client certificate for mutual TLS (with ``key_file``)."""
    key_file: Path | None = None
    """Private key of ``cert_file``."""
    keepalive_s: int = 30
    """MQTT keepalive; the broker publishes the Last Will after 1.5 × this without traffic."""

    def __post_init__(self) -> None:
        try:
            check_broker_url(self.url)
        except ValueError as exc:
            raise _fail("broker.url", str(exc)) from None
        if "@" in self.url.split("//", 1)[1].split("/", 1)[0]:
            raise _fail("broker.url", "must not carry credentials; use username and password_file")
        if (self.cert_file is None) != (self.key_file is None):
            raise _fail("broker.cert_file", "cert_file and key_file go together (mutual TLS)")
        _need_readable_file("broker.ca_file", self.ca_file, "the CA certificate of the broker")
        _need_readable_file("broker.cert_file", self.cert_file, "the client certificate")
        _need_readable_file("broker.key_file", self.key_file, "the client certificate's key")
        if self.password_file is not None and self.username is None:
            raise _fail("broker.password_file", "a password needs broker.username")
        if not 5 <= self.keepalive_s <= 3600:
            raise _fail("broker.keepalive_s", f"must be in 5..3600, got {self.keepalive_s}")


@dataclass(frozen=True, slots=True)
class DataSettings:
    """The device's local training data (``[data]``)."""

    path: Path | None = None
    """``.npz`` (arrays x, y) or ``.csv`` (header, label column); see docs/DATA.md."""
    builtin: str | None = None
    """Instead of ``path``: a bundled data set (``digits``, ``mnist5k``) for trying the agent."""
    num_classes: int = 10
    """Labels are in ``0..num_classes-1``."""
    label_column: str = "label"
    """Label column of a ``.csv`` file."""

    def __post_init__(self) -> None:
        if (self.path is None) == (self.builtin is None):
            raise _fail("data", "set exactly one of data.path and data.builtin")
        if self.num_classes < 2:
            raise _fail("data.num_classes", f"must be >= 2, got {self.num_classes}")


@dataclass(frozen=True, slots=True)
class ModelSettings:
    """The model and trainer (``[model]``); it must match the coordinator's model."""

    trainer: TrainerKind = "numpy"
    """``numpy`` (any MLP, SCAFFOLD too) or ``litert`` (a trainable ``.tflite``)."""
    kind: Literal["logreg", "mlp"] = "mlp"
    """NumPy trainer: ``logreg`` or ``mlp``."""
    input_dim: int | None = None
    """NumPy trainer: number of input features; None takes it from the data."""
    hidden: tuple[int, ...] = (32,)
    """NumPy trainer: hidden layer widths (empty for ``logreg``)."""
    tflite: str | None = None
    """LiteRT trainer: path of the ``.tflite`` file, or a bundled name (``digits_mlp``)."""
    threads: int | None = None
    """LiteRT trainer: interpreter threads; None lets LiteRT choose."""

    def __post_init__(self) -> None:
        if self.trainer not in ("numpy", "litert"):
            raise _fail("model.trainer", f"must be 'numpy' or 'litert', got {self.trainer!r}")
        if self.trainer == "litert" and not self.tflite:
            raise _fail("model.tflite", "the litert trainer needs a .tflite path or bundled name")
        if self.kind not in ("logreg", "mlp"):
            raise _fail("model.kind", f"must be 'logreg' or 'mlp', got {self.kind!r}")
        if self.kind == "logreg" and self.hidden:
            object.__setattr__(self, "hidden", ())
        if self.kind == "mlp" and (not self.hidden or any(h < 1 for h in self.hidden)):
            raise _fail("model.hidden", f"an mlp needs positive widths, got {list(self.hidden)}")


@dataclass(frozen=True, slots=True)
class AgentSettings:
    """Timing, state and signing (``[agent]``)."""

    heartbeat_s: float = 30.0
    """Publish the status at least this often (seconds)."""
    state_dir: Path = Path("/var/lib/fedge")
    """Model cache, error-feedback residuals and SCAFFOLD state (systemd StateDirectory)."""
    hmac_key_file: Path | None = None
    """File holding this device's update-signing key as hex text
    (``openssl rand -hex 32``); None sends unsigned updates."""
    chunk_size: int = 256 * 1024
    """Largest MQTT payload of one update chunk (bytes)."""
    max_model_bytes: int = 64 * 2**20
    """Largest global model the agent downloads (bytes)."""

    def __post_init__(self) -> None:
        if not (math.isfinite(self.heartbeat_s) and 1.0 <= self.heartbeat_s <= 3600.0):
            raise _fail("agent.heartbeat_s", f"must be in 1..3600, got {self.heartbeat_s}")
        if not 1024 <= self.chunk_size <= 2_000_000:
            raise _fail(
                "agent.chunk_size",
                f"must be in 1024..2000000 (broker limit), got {self.chunk_size}",
            )
        if self.max_model_bytes < 1024:
            raise _fail("agent.max_model_bytes", f"must be >= 1024, got {self.max_model_bytes}")
        # Checked here, not when the agent first writes a model: a file in the way would only
        # show up as a traceback after connecting.
        if self.state_dir.exists() and not self.state_dir.is_dir():
            raise _fail(
                "agent.state_dir",
                f"{self.state_dir} exists and is not a folder; move it away or point "
                "state_dir (--state-dir) at a folder",
            )


@dataclass(frozen=True, slots=True)
class AgentConfig:
    """Everything ``fedge agent`` needs."""

    fleet: str
    """Deployment name: topics are ``fl/v1/{fleet}/...``."""
    device_id: str
    """This device's id (MQTT client id; also its username in production)."""
    broker: BrokerSettings = field(default_factory=BrokerSettings)
    data: DataSettings = field(default_factory=lambda: DataSettings(builtin="digits"))
    model: ModelSettings = field(default_factory=ModelSettings)
    limits: Limits = field(default_factory=Limits)
    """The device's own eligibility rules (``[limits]``)."""
    telemetry: TelemetryOverrides = field(default_factory=TelemetryOverrides)
    """Fixed telemetry values (``[telemetry]``), e.g. for a sensor that lies."""
    metered: bool = False
    """``[telemetry] metered``: the link costs per byte (cellular plan)."""
    agent: AgentSettings = field(default_factory=AgentSettings)

    def __post_init__(self) -> None:
        for key, value in (("fleet", self.fleet), ("device_id", self.device_id)):
            try:
                validate_id(value, key)
            except BadTopicError as exc:
                raise _fail(key, str(exc)) from None


# --------------------------------------------------------------------------- loading

_SECTIONS: dict[str, type[Any]] = {
    "broker": BrokerSettings,
    "data": DataSettings,
    "model": ModelSettings,
    "limits": Limits,
    "telemetry": TelemetryOverrides,
    "agent": AgentSettings,
}
_PATH_KEYS = {"password_file", "ca_file", "cert_file", "key_file", "path", "state_dir"}
_PATH_KEYS |= {"hmac_key_file"}


def _coerce(section: str, key: str, value: Any, base: Path) -> Any:
    if key in _PATH_KEYS and value is not None:
        if not isinstance(value, str | os.PathLike):
            raise _fail(f"{section}.{key}", f"must be a path string, got {value!r}")
        path = Path(value).expanduser()
        return path if path.is_absolute() else base / path
    if key == "hidden":
        if not isinstance(value, list) or not all(type(v) is int for v in value):
            raise _fail(f"{section}.{key}", f"must be a list of integers, got {value!r}")
        return tuple(value)
    if key == "net_kind" and value is not None:
        try:
            return NetKind(value)
        except ValueError:
            raise _fail(
                f"{section}.{key}", f"must be one of {[k.value for k in NetKind]}, got {value!r}"
            ) from None
    return value


def _build(cls: type[Any], section: str, raw: Mapping[str, Any], base: Path) -> Any:
    if not isinstance(raw, Mapping):
        raise _fail(section, f"must be a table, got {raw!r}")
    known = {f.name: f for f in fields(cls)}
    unknown = sorted(set(raw) - set(known))
    if unknown:
        raise _fail(section, f"unknown key(s) {unknown}; known: {sorted(known)}")
    kwargs = {k: _coerce(section, k, v, base) for k, v in raw.items()}
    for k, v in kwargs.items():
        _check_type(section, k, v, known[k].type)
    try:
        return cls(**kwargs)
    except ConfigError:
        raise
    except (TypeError, ValueError) as exc:
        raise _fail(section, str(exc)) from None


def _check_type(section: str, key: str, value: Any, annotation: Any) -> None:
    text = str(annotation)
    if value is None:
        if "None" not in text:
            raise _fail(f"{section}.{key}", "must not be empty")
        return
    if text.startswith("float") and (type(value) not in (int, float)):
        raise _fail(f"{section}.{key}", f"must be a number, got {value!r}")
    if text.startswith("int") and type(value) is not int:
        raise _fail(f"{section}.{key}", f"must be an integer, got {value!r}")
    if text.startswith("bool") and type(value) is not bool:
        raise _fail(f"{section}.{key}", f"must be true or false, got {value!r}")
    if text.startswith("str") and not isinstance(value, str):
        raise _fail(f"{section}.{key}", f"must be a string, got {value!r}")


def config_from_mapping(raw: Mapping[str, Any], base: Path = Path()) -> AgentConfig:
    """Build and validate an :class:`AgentConfig` from a parsed TOML document."""
    top_known = {"fleet", "device_id", *_SECTIONS}
    unknown = sorted(set(raw) - top_known)
    if unknown:
        raise ConfigError(f"unknown top-level key(s) {unknown}; known: {sorted(top_known)}")
    for key in ("fleet", "device_id"):
        if not isinstance(raw.get(key), str):
            raise _fail(key, f"is required and must be a string, got {raw.get(key)!r}")
    kwargs: dict[str, Any] = {"fleet": raw["fleet"], "device_id": raw["device_id"]}
    for section, cls in _SECTIONS.items():
        table = dict(raw.get(section, {}))
        if section == "telemetry" and "metered" in table:
            metered = table.pop("metered")
            if type(metered) is not bool:
                raise _fail("telemetry.metered", f"must be true or false, got {metered!r}")
            kwargs["metered"] = metered
        if section in raw or section != "data":
            kwargs[section] = _build(cls, section, table, base)
    return AgentConfig(**kwargs)


def load_agent_config(path: str | os.PathLike[str]) -> AgentConfig:
    """Read and validate ``agent.toml``; relative paths in it are relative to its directory."""
    p = Path(path)
    try:
        raw = tomllib.loads(p.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"{p}: no such config file (example: deploy/agent.toml)") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{p}: cannot read: {exc}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{p}: not valid TOML: {exc}") from None
    try:
        return config_from_mapping(raw, p.resolve().parent)
    except ConfigError as exc:
        raise ConfigError(f"{p}: {exc}") from None


def apply_overrides(config: AgentConfig, overrides: Mapping[str, Any]) -> AgentConfig:
    """Return ``config`` with dotted keys replaced (``{"broker.url": ..., "fleet": ...}``).

    None values are skipped (a flag that was not given). Validation runs again.
    """
    result = config
    for dotted, value in overrides.items():
        if value is None:
            continue
        section, _, key = dotted.partition(".")
        try:
            if not key:
                result = replace(result, **{section: value})
            elif section == "telemetry" and key == "metered":
                result = replace(result, metered=value)
            else:
                sub = getattr(result, section)
                if not is_dataclass(sub) or key not in {f.name for f in fields(sub)}:
                    raise ConfigError(f"unknown setting {dotted!r}")
                result = replace(result, **{section: replace(cast(Any, sub), **{key: value})})
        except ConfigError:
            raise
        except (TypeError, ValueError) as exc:
            raise _fail(dotted, str(exc)) from None
    return result


def read_hmac_key(path: Path) -> bytes:
    """Read a device key file: hex text (``openssl rand -hex 32``), at least 16 bytes."""
    try:
        text = path.read_text(encoding="ascii").strip()
    except (OSError, UnicodeDecodeError) as exc:
        raise _fail("agent.hmac_key_file", f"cannot read {path}: {exc}") from None
    try:
        key = bytes.fromhex(text)
    except ValueError:
        raise _fail(
            "agent.hmac_key_file", f"{path} must hold the key as hex (openssl rand -hex 32)"
        ) from None
    if len(key) < 16:
        raise _fail("agent.hmac_key_file", f"{path} holds {len(key)} bytes; use at least 16")
    return key
