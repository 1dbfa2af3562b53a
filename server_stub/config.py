"""Coordinator configuration: frozen dataclasses read from TOML and validated once, at load time.

This module owns :class:`CoordinatorConfig` and :func:`load_config`. ``deploy/coordinator.toml``
is the annotated example; ``docs/COORDINATOR.md`` explains every table. Unknown keys are
errors that name the valid ones. Relative paths are resolved against the TOML file's folder.
"""

from __future__ import annotations

import dataclasses
import json
import math
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np

from edge.modelio import F32, ModelLayout
from edge.wire import JSONValue
from kernels.codec import parse_codec
from server_stub.devices import EligibilityRules
from server_stub.rounds import RoundSettings


class ConfigError(ValueError):
    """The configuration file is missing, malformed or has an out-of-range value."""


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

    # -- derived -------------------------------------------------------------------------------

    def layout_and_weights(self) -> tuple[ModelLayout, dict[str, F32]]:
        """The model layout and initial weights (from the ``.npz`` or drawn from the spec)."""
        m = self.model
        if m.weights is not None:
            with np.load(m.weights, allow_pickle=False) as npz:  # never unpickle
                weights = {k: np.asarray(npz[k], dtype=np.float32) for k in npz.files}
            return ModelLayout.of(weights), weights
        return _spec_weights(m)

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


def _take(table: Mapping[str, Any], cls: type[Any], where: str) -> dict[str, Any]:
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(table) - names)
    if unknown:
        raise ConfigError(f"[{where}] has unknown key(s) {unknown}; valid: {sorted(names)}")
    return dict(table)


def _build(cls: type[Any], table: Mapping[str, Any], where: str) -> Any:
    kwargs = _take(table, cls, where)
    for key in ("hidden", "required_codecs"):
        if key in kwargs and isinstance(kwargs[key], list):
            kwargs[key] = tuple(kwargs[key]) if key == "hidden" else frozenset(kwargs[key])
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"[{where}]: {exc}") from None


def _path(base: Path, value: Any) -> str | None:
    if value is None:
        return None
    p = Path(str(value)).expanduser()
    return str(p if p.is_absolute() else base / p)


def config_from_dict(data: Mapping[str, Any], base_dir: Path | None = None) -> CoordinatorConfig:
    """Build and validate a config from a parsed TOML document."""
    base = base_dir or Path.cwd()
    top = dict(data)
    tables = {
        "broker", "model", "strategy", "selection", "eligibility", "rounds", "uplink",
        "validation", "evaluation", "state", "metrics",
    }  # fmt: skip
    scalars = {"fleet", "rounds_total", "seed", "tick_s", "chunk_size", "startup_grace_s"}
    unknown = sorted(set(top) - tables - scalars)
    if unknown:
        raise ConfigError(f"unknown top-level key(s) {unknown}; valid: {sorted(tables | scalars)}")
    kwargs: dict[str, Any] = {k: top[k] for k in scalars if k in top}
    if kwargs.get("rounds_total") == 0:
        kwargs["rounds_total"] = None
    broker = dict(top.get("broker", {}))
    for key in ("password_file", "ca_certs"):
        broker[key] = _path(base, broker.get(key))
    kwargs["broker"] = _build(BrokerSettings, broker, "broker")
    model = dict(top.get("model", {}))
    model["weights"] = _path(base, model.get("weights"))
    kwargs["model"] = _build(ModelSettings, model, "model")
    strategy = dict(top.get("strategy", {}))
    kwargs["strategy"] = str(strategy.pop("name", "fedavg"))
    kwargs["strategy_params"] = strategy
    selection = dict(top.get("selection", {}))
    kwargs["selection"] = str(selection.pop("policy", "random"))
    kwargs["selection_params"] = selection
    kwargs["eligibility"] = _build(EligibilityRules, top.get("eligibility", {}), "eligibility")
    rounds = dict(top.get("rounds", {}))
    if "batch_size" not in rounds and "batch_size" in strategy:
        rounds["batch_size"] = strategy["batch_size"]
    kwargs["rounds"] = _build(RoundSettings, rounds, "rounds")
    uplink = dict(top.get("uplink", {}))
    codec = uplink.get("codec", "none")
    try:
        uplink["codec"] = parse_codec(codec if isinstance(codec, str) else json.dumps(codec))
    except ValueError as exc:
        raise ConfigError(f"[uplink] codec: {exc}") from None
    kwargs["uplink"] = _build(UplinkSettings, uplink, "uplink")
    validation = dict(top.get("validation", {}))
    validation["hmac_keys_dir"] = _path(base, validation.get("hmac_keys_dir"))
    kwargs["validation"] = _build(ValidationSettings, validation, "validation")
    evaluation = dict(top.get("evaluation", {}))
    _take(evaluation, _EvalTable, "evaluation")
    kwargs["eval_data"] = _path(base, evaluation.get("data"))
    state = dict(top.get("state", {}))
    _take(state, _StateTable, "state")
    kwargs["state_db"] = _path(base, state.get("db", "coordinator.db"))
    metrics = dict(top.get("metrics", {}))
    _take(metrics, _MetricsTable, "metrics")
    kwargs["metrics_port"] = metrics.get("port")
    try:
        config = CoordinatorConfig(**kwargs)
    except (TypeError, ValueError) as exc:
        raise ConfigError(str(exc)) from None
    _check_components(config)
    return config


def _check_components(config: CoordinatorConfig) -> None:
    """Build the strategy and selector once so a bad parameter fails at load time."""
    from server_stub.selection import SelectionError, make_selector
    from server_stub.strategies import StrategyConfigError, make_strategy

    try:
        make_strategy(config.strategy, _strategy_params(config))
    except StrategyConfigError as exc:
        raise ConfigError(f"[strategy]: {exc}") from None
    try:
        make_selector(config.selection, dict(config.selection_params))
    except SelectionError as exc:
        raise ConfigError(f"[selection]: {exc}") from None
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
    """Read and validate a coordinator TOML file."""
    p = Path(path)
    try:
        data = tomllib.loads(p.read_text())
    except FileNotFoundError:
        raise ConfigError(f"config file {p} not found") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{p}: {exc}") from None
    return config_from_dict(data, p.resolve().parent)


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
