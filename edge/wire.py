"""Wire protocol v1: topic names, JSON messages and the binary envelope.

This module owns every byte that crosses MQTT between a device and the
coordinator; ``docs/PROTOCOL.md`` is its normative description. Rules:

- Pure: no sockets, threads, clocks or random numbers (callers pass ids and
  timestamps in). ``edge.transport`` moves the bytes this module makes.
- Messages are frozen dataclasses validated on construction, so an instance
  that exists is valid. ``to_bytes()`` / ``from_bytes()`` are exact inverses.
- JSON messages carry ``"v": 1``; unknown fields are ignored (forward
  compatibility), missing required fields and a different ``v`` are errors.
- Binary is explicit little-endian. Nothing is ever unpickled.
- Every malformed input raises a subclass of :class:`WireError` whose message
  names what is wrong; nothing else escapes ``from_bytes``/``decode_envelope``.

Chunking of large payloads lives in :mod:`edge.chunking`.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import math
import re
import struct
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any, ClassVar, Final, Self, TypeAlias

import google_crc32c

PROTOCOL_VERSION: Final = 1
"""The ``v`` of every JSON message and the envelope's version byte."""

TOPIC_ROOT: Final = "fl/v1"
MAX_ID_LEN: Final = 64
"""Longest fleet or client id, in characters."""

DEFAULT_MAX_ENVELOPE_SIZE: Final = 256 * 1024 * 1024
"""Largest envelope :func:`decode_envelope` accepts unless told otherwise (bytes)."""
DEFAULT_MAX_HEADER_SIZE: Final = 1024 * 1024
"""Largest JSON header :func:`decode_envelope` accepts unless told otherwise (bytes)."""

JSONValue: TypeAlias = bool | int | float | str | list["JSONValue"] | dict[str, "JSONValue"] | None
JSONObject: TypeAlias = dict[str, JSONValue]


# --------------------------------------------------------------------------- errors


class WireError(ValueError):
    """Base of every protocol error: bad topic, bad message, bad envelope or chunk."""


class BadTopicError(WireError):
    """A topic or an id in it is not valid for protocol v1."""


class MessageError(WireError):
    """A JSON message or an envelope header is malformed or misses a field."""


class EnvelopeError(WireError):
    """A binary envelope is malformed."""


class TruncatedError(EnvelopeError):
    """Fewer bytes than the envelope declares."""


class BadMagicError(EnvelopeError):
    """The bytes do not start with the envelope magic ``FEDG``."""


class ChecksumError(EnvelopeError):
    """The CRC-32C trailer does not match: the bytes were damaged."""


class SignatureError(EnvelopeError):
    """The HMAC is missing, unexpected or wrong."""


class VersionError(EnvelopeError):
    """The envelope or a message is of a protocol version this code does not speak."""


class OversizeError(EnvelopeError):
    """The envelope or its header is larger than the configured limit."""


class ChunkError(WireError):
    """A chunk is malformed or cannot be accepted by the reassembler."""


# --------------------------------------------------------------------------- topics

_ID_RE = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.:@-]*")


def validate_id(value: str, what: str = "cid") -> str:
    """Return ``value`` if it is a valid fleet or client id, else raise :class:`BadTopicError`.

    Ids are 1 to 64 characters of ``A-Z a-z 0-9 _ . : @ -`` and do not start with
    ``.``, ``:``, ``@`` or ``-``. That excludes the MQTT wildcards ``+`` and ``#``,
    the level separator ``/``, ``$`` (broker-internal topics), spaces and NUL, so
    an id is always exactly one topic level and safe in a Mosquitto ACL ``%u``.
    """
    if not isinstance(value, str):
        raise BadTopicError(f"{what} must be a str, got {type(value).__name__}")
    if not value:
        raise BadTopicError(f"{what} is empty")
    if len(value) > MAX_ID_LEN:
        raise BadTopicError(f"{what} is {len(value)} characters long, the limit is {MAX_ID_LEN}")
    if _ID_RE.fullmatch(value) is None:
        bad = sorted({c for c in value if not re.fullmatch(r"[A-Za-z0-9_.:@-]", c)})
        if bad:
            raise BadTopicError(f"{what} {value!r} contains forbidden characters {bad!r}")
        raise BadTopicError(f"{what} {value!r} must start with a letter, digit or '_'")
    return value


class TopicKind(StrEnum):
    """What a v1 topic carries."""

    STATUS = "status"
    TASK = "task"
    UPDATE = "update"
    MODEL_MANIFEST = "model_manifest"
    MODEL_CHUNK = "model_chunk"


@dataclass(frozen=True, slots=True)
class Topics:
    """Topic names of one fleet: ``fl/v1/{fleet}/...``.

    Examples
    --------
    >>> t = Topics("lab")
    >>> t.status("pi-01")
    'fl/v1/lab/clients/pi-01/status'
    >>> t.parse("fl/v1/lab/clients/pi-01/update")
    (<TopicKind.UPDATE: 'update'>, 'pi-01')
    """

    fleet: str

    def __post_init__(self) -> None:
        validate_id(self.fleet, "fleet")

    @property
    def prefix(self) -> str:
        """``fl/v1/{fleet}``."""
        return f"{TOPIC_ROOT}/{self.fleet}"

    def _client(self, cid: str, leaf: str) -> str:
        validate_id(cid, "cid")
        return f"{self.prefix}/clients/{cid}/{leaf}"

    def status(self, cid: str) -> str:
        """Retained JSON telemetry of one device (device → coordinator)."""
        return self._client(cid, "status")

    def task(self, cid: str) -> str:
        """JSON train tasks for one device (coordinator → device)."""
        return self._client(cid, "task")

    def update(self, cid: str) -> str:
        """Chunked binary update envelopes of one device (device → coordinator)."""
        return self._client(cid, "update")

    def model_manifest(self) -> str:
        """Retained JSON manifest of the current global model."""
        return f"{self.prefix}/model/manifest"

    def model_chunk(self, model_version: int, index: int) -> str:
        """Retained chunk ``index`` of global model ``model_version``."""
        if model_version < 0 or index < 0:
            raise BadTopicError(f"model_version {model_version} and index {index} must be >= 0")
        return f"{self.prefix}/model/{model_version}/{index}"

    def model_all(self) -> str:
        """Filter for every model topic (manifest and chunks): what a device subscribes."""
        return f"{self.prefix}/model/#"

    def all_status(self) -> str:
        """Filter for the status of every device of the fleet."""
        return f"{self.prefix}/clients/+/status"

    def all_updates(self) -> str:
        """Filter for the updates of every device of the fleet."""
        return f"{self.prefix}/clients/+/update"

    def shared_updates(self, group: str = "aggregators") -> str:
        """Shared-subscription filter that spreads updates over several aggregator workers."""
        validate_id(group, "group")
        return f"$share/{group}/{self.all_updates()}"

    def parse(self, topic: str) -> tuple[TopicKind, str | None]:
        """Return ``(kind, cid)`` of a topic of this fleet; ``cid`` is None for model topics.

        Raises :class:`BadTopicError` for a topic outside this fleet or of an unknown shape.
        """
        kind, cid, _version, _index = self._parse(topic)
        return kind, cid

    def parse_model_chunk(self, topic: str) -> tuple[int, int]:
        """Return ``(model_version, index)`` of a model chunk topic."""
        kind, _cid, version, index = self._parse(topic)
        if kind is not TopicKind.MODEL_CHUNK:
            raise BadTopicError(f"{topic!r} is a {kind.value} topic, not a model chunk")
        assert version is not None and index is not None
        return version, index

    def _parse(self, topic: str) -> tuple[TopicKind, str | None, int | None, int | None]:
        if not isinstance(topic, str):
            raise BadTopicError(f"topic must be a str, got {type(topic).__name__}")
        head = self.prefix + "/"
        if not topic.startswith(head):
            raise BadTopicError(f"topic {topic!r} is not under {head!r}")
        parts = topic[len(head) :].split("/")
        if len(parts) == 3 and parts[0] == "clients":
            cid = validate_id(parts[1], "cid")
            try:
                kind = TopicKind(parts[2])
            except ValueError:
                raise BadTopicError(
                    f"unknown client topic leaf {parts[2]!r} in {topic!r}"
                ) from None
            if kind in (TopicKind.STATUS, TopicKind.TASK, TopicKind.UPDATE):
                return kind, cid, None, None
        elif parts == ["model", "manifest"]:
            return TopicKind.MODEL_MANIFEST, None, None, None
        elif len(parts) == 3 and parts[0] == "model":
            if (
                parts[1].isdigit()
                and parts[2].isdigit()
                and parts[1].isascii()
                and parts[2].isascii()
            ):
                return TopicKind.MODEL_CHUNK, None, int(parts[1]), int(parts[2])
            raise BadTopicError(f"model chunk topic {topic!r} needs numeric version and index")
        raise BadTopicError(f"unknown topic shape {topic!r}")


# --------------------------------------------------------------------------- JSON helpers


def _reject_constant(name: str) -> Any:
    raise ValueError(f"non-finite number {name} is not allowed")


def _loads_object(data: bytes | bytearray | memoryview, what: str) -> dict[str, Any]:
    """Parse UTF-8 JSON that must be an object; every failure is a MessageError."""
    try:
        text = bytes(data).decode("utf-8")
        obj = json.loads(text, parse_constant=_reject_constant)
    except (ValueError, RecursionError) as exc:
        raise MessageError(f"{what} is not valid UTF-8 JSON: {exc}") from None
    if not isinstance(obj, dict):
        raise MessageError(f"{what} must be a JSON object, got {type(obj).__name__}")
    return obj


def _dumps(obj: Mapping[str, Any]) -> bytes:
    return json.dumps(obj, separators=(",", ":"), allow_nan=False, sort_keys=False).encode()


def _check_version(obj: Mapping[str, Any], what: str) -> None:
    if "v" not in obj:
        raise MessageError(f"{what} misses required field 'v'")
    v = obj["v"]
    if type(v) is not int:
        raise MessageError(f"{what} field 'v' must be an int, got {v!r}")
    if v != PROTOCOL_VERSION:
        raise VersionError(f"{what} has v={v}, this code speaks v={PROTOCOL_VERSION}")


def _require(obj: Mapping[str, Any], key: str, what: str) -> Any:
    if key not in obj:
        raise MessageError(f"{what} misses required field {key!r}")
    return obj[key]


def _as_int(value: Any, what: str, minimum: int | None = 0) -> int:
    if type(value) is not int:
        raise MessageError(f"{what} must be an int, got {value!r}")
    if minimum is not None and value < minimum:
        raise MessageError(f"{what} must be >= {minimum}, got {value}")
    return value


def _as_float(value: Any, what: str, minimum: float | None = None) -> float:
    if type(value) not in (int, float):
        raise MessageError(f"{what} must be a number, got {value!r}")
    out = float(value)
    if not math.isfinite(out):
        raise MessageError(f"{what} must be finite, got {value!r}")
    if minimum is not None and out < minimum:
        raise MessageError(f"{what} must be >= {minimum}, got {value!r}")
    return out


def _opt_float(value: Any, what: str, minimum: float | None = None) -> float | None:
    return None if value is None else _as_float(value, what, minimum)


def _as_bool(value: Any, what: str) -> bool:
    if type(value) is not bool:
        raise MessageError(f"{what} must be true or false, got {value!r}")
    return value


def _as_str(value: Any, what: str, max_len: int = 256, allow_empty: bool = False) -> str:
    if not isinstance(value, str):
        raise MessageError(f"{what} must be a string, got {value!r}")
    if not value and not allow_empty:
        raise MessageError(f"{what} is empty")
    if len(value) > max_len:
        raise MessageError(f"{what} is {len(value)} characters long, the limit is {max_len}")
    return value


def _as_json_object(value: Any, what: str) -> JSONObject:
    if not isinstance(value, Mapping):
        raise MessageError(f"{what} must be a JSON object, got {value!r}")
    try:
        out = json.loads(json.dumps(dict(value), allow_nan=False))
    except (TypeError, ValueError, RecursionError) as exc:
        raise MessageError(f"{what} is not JSON-serialisable: {exc}") from None
    if not isinstance(out, dict) or not all(isinstance(k, str) for k in value):
        raise MessageError(f"{what} must have string keys")
    return out


def _as_metrics(value: Any, what: str) -> dict[str, float]:
    if not isinstance(value, Mapping):
        raise MessageError(f"{what} must be an object of numbers, got {value!r}")
    out: dict[str, float] = {}
    for k, v in value.items():
        _as_str(k, f"{what} key")
        out[k] = _as_float(v, f"{what}[{k!r}]")
    return out


def _as_id_field(value: Any, what: str) -> str:
    """An id carried inside a message (task id, nonce): printable, 1..128 chars."""
    s = _as_str(value, what, max_len=128)
    if not s.isprintable():
        raise MessageError(f"{what} {s!r} contains non-printable characters")
    return s


# --------------------------------------------------------------------------- Status


class NetKind(StrEnum):
    """Link kind reported in a status."""

    WIFI = "wifi"
    ETHERNET = "ethernet"
    CELLULAR = "cellular"
    UNKNOWN = "unknown"


@dataclass(frozen=True, slots=True)
class BatteryInfo:
    """Battery state; a host with no battery reports ``battery: null`` instead."""

    percent: float
    """State of charge, 0..100."""
    charging: bool
    """True while on external power."""

    def __post_init__(self) -> None:
        _as_float(self.percent, "battery.percent", 0.0)
        if self.percent > 100:
            raise MessageError(f"battery.percent must be <= 100, got {self.percent}")
        _as_bool(self.charging, "battery.charging")


@dataclass(frozen=True, slots=True)
class CpuInfo:
    """CPU load and temperature."""

    load1: float
    """One-minute load average."""
    cores: int
    """Number of CPU cores (>= 1)."""
    temp_c: float | None = None
    """SoC temperature in °C, None when unknown."""

    def __post_init__(self) -> None:
        _as_float(self.load1, "cpu.load1", 0.0)
        _as_int(self.cores, "cpu.cores", 1)
        _opt_float(self.temp_c, "cpu.temp_c")


@dataclass(frozen=True, slots=True)
class MemInfo:
    """Memory available for training."""

    available_mb: float

    def __post_init__(self) -> None:
        _as_float(self.available_mb, "mem.available_mb", 0.0)


@dataclass(frozen=True, slots=True)
class NetInfo:
    """Network link of the device."""

    kind: NetKind = NetKind.UNKNOWN
    metered: bool = False
    """True on a link that costs per byte (cellular data plan)."""
    rtt_ms: float | None = None
    """Round-trip time to the broker in ms, None when not measured."""

    def __post_init__(self) -> None:
        try:
            object.__setattr__(self, "kind", NetKind(self.kind))
        except ValueError:
            raise MessageError(
                f"net.kind must be one of {[k.value for k in NetKind]}, got {self.kind!r}"
            ) from None
        _as_bool(self.metered, "net.metered")
        _opt_float(self.rtt_ms, "net.rtt_ms", 0.0)


@dataclass(frozen=True, slots=True)
class TrainInfo:
    """Local data and measured training speed."""

    num_examples: int
    samples_per_s: float | None = None
    """Measured training throughput, None before the first measurement."""

    def __post_init__(self) -> None:
        _as_int(self.num_examples, "train.num_examples")
        _opt_float(self.samples_per_s, "train.samples_per_s", 0.0)


@dataclass(frozen=True, slots=True)
class Caps:
    """What a device can do."""

    trainers: tuple[str, ...] = ()
    codecs: tuple[str, ...] = ()
    max_payload: int = 0
    """Largest logical payload (bytes) the device accepts; 0 means no stated limit."""

    def __post_init__(self) -> None:
        for name in ("trainers", "codecs"):
            items = getattr(self, name)
            if isinstance(items, str) or not isinstance(items, Sequence):
                raise MessageError(f"caps.{name} must be a list of strings, got {items!r}")
            object.__setattr__(
                self, name, tuple(_as_str(x, f"caps.{name} item", 64) for x in items)
            )
        _as_int(self.max_payload, "caps.max_payload")


@dataclass(frozen=True, slots=True)
class Declined:
    """A device's refusal of a task, sent in its status."""

    task_id: str
    reason: str
    """Short machine-readable reason, e.g. ``battery_low``, ``metered``, ``busy``."""

    def __post_init__(self) -> None:
        _as_id_field(self.task_id, "declined.task_id")
        _as_str(self.reason, "declined.reason", 256)


_STATE_RE = re.compile(r"[a-z][a-z0-9_]{0,31}")


@dataclass(frozen=True, slots=True)
class Status:
    """Device telemetry on ``clients/{cid}/status`` (retained, QoS 1).

    An online status must carry every telemetry field (``battery`` may be None:
    no battery). An offline status (the Last Will) carries only ``online: false``.
    """

    TYPE: ClassVar[str] = "status"
    v: ClassVar[int] = PROTOCOL_VERSION

    online: bool
    ts: float | None = None
    """Device wall-clock time of the reading (Unix seconds)."""
    battery: BatteryInfo | None = None
    cpu: CpuInfo | None = None
    mem: MemInfo | None = None
    net: NetInfo | None = None
    train: TrainInfo | None = None
    caps: Caps | None = None
    agent: str | None = None
    """Agent name and version, ``fedge/x.y``."""
    state: str | None = None
    """Agent state: ``idle``, ``training``, ``uploading``, ``backoff`` (lowercase identifier)."""
    task_id: str | None = None
    """The task being worked on, if any."""
    declined: Declined | None = None

    def __post_init__(self) -> None:
        _as_bool(self.online, "online")
        if self.online:
            for name in ("ts", "cpu", "mem", "net", "train", "caps", "agent"):
                if getattr(self, name) is None:
                    raise MessageError(f"an online status misses required field {name!r}")
        _opt_float(self.ts, "ts")
        for name, typ in (
            ("battery", BatteryInfo),
            ("cpu", CpuInfo),
            ("mem", MemInfo),
            ("net", NetInfo),
            ("train", TrainInfo),
            ("caps", Caps),
            ("declined", Declined),
        ):
            value = getattr(self, name)
            if value is not None and not isinstance(value, typ):
                raise MessageError(f"{name} must be a {typ.__name__}, got {value!r}")
        if self.agent is not None:
            _as_str(self.agent, "agent", 64)
        if self.state is not None and (
            not isinstance(self.state, str) or _STATE_RE.fullmatch(self.state) is None
        ):
            raise MessageError(f"state must be a lowercase identifier, got {self.state!r}")
        if self.task_id is not None:
            _as_id_field(self.task_id, "task_id")

    @classmethod
    def offline_will(cls) -> Self:
        """The Last Will status: ``{"v":1,"online":false}``."""
        return cls(online=False)

    def to_json(self) -> JSONObject:
        """The JSON object of this status (fields that are None are left out,
        except ``battery``, which an online status always carries)."""
        out: JSONObject = {"v": PROTOCOL_VERSION, "online": self.online}
        if self.ts is not None:
            out["ts"] = self.ts
        if self.online or self.battery is not None:
            b = self.battery
            out["battery"] = None if b is None else {"percent": b.percent, "charging": b.charging}
        if self.cpu is not None:
            out["cpu"] = {
                "load1": self.cpu.load1,
                "cores": self.cpu.cores,
                "temp_c": self.cpu.temp_c,
            }
        if self.mem is not None:
            out["mem"] = {"available_mb": self.mem.available_mb}
        if self.net is not None:
            out["net"] = {
                "kind": self.net.kind.value,
                "metered": self.net.metered,
                "rtt_ms": self.net.rtt_ms,
            }
        if self.train is not None:
            out["train"] = {
                "num_examples": self.train.num_examples,
                "samples_per_s": self.train.samples_per_s,
            }
        if self.caps is not None:
            out["caps"] = {
                "trainers": list(self.caps.trainers),
                "codecs": list(self.caps.codecs),
                "max_payload": self.caps.max_payload,
            }
        if self.agent is not None:
            out["agent"] = self.agent
        if self.state is not None:
            out["state"] = self.state
        if self.task_id is not None:
            out["task_id"] = self.task_id
        if self.declined is not None:
            out["declined"] = {"task_id": self.declined.task_id, "reason": self.declined.reason}
        return out

    def to_bytes(self) -> bytes:
        """Compact UTF-8 JSON."""
        return _dumps(self.to_json())

    @classmethod
    def from_bytes(cls, data: bytes | bytearray | memoryview) -> Self:
        """Parse a status; raises :class:`MessageError`/:class:`VersionError` when malformed."""
        return cls.from_json(_loads_object(data, "status"))

    @classmethod
    def from_json(cls, obj: Mapping[str, Any]) -> Self:
        """Build from a parsed JSON object (unknown fields are ignored)."""
        _check_version(obj, "status")
        online = _as_bool(_require(obj, "online", "status"), "online")

        def sub(name: str) -> Mapping[str, Any] | None:
            if online and name != "battery":
                _require(obj, name, "status")
            elif online:
                _require(obj, "battery", "status")
            value = obj.get(name)
            if value is None:
                return None
            if not isinstance(value, Mapping):
                raise MessageError(f"status field {name!r} must be an object, got {value!r}")
            return value

        try:
            b, c, m, n, t, k = (sub(x) for x in ("battery", "cpu", "mem", "net", "train", "caps"))
            d = obj.get("declined")
            if d is not None and not isinstance(d, Mapping):
                raise MessageError(f"status field 'declined' must be an object, got {d!r}")
            return cls(
                online=online,
                ts=_opt_float(_require(obj, "ts", "status") if online else obj.get("ts"), "ts"),
                battery=None
                if b is None
                else BatteryInfo(
                    _as_float(_require(b, "percent", "battery"), "battery.percent"),
                    _as_bool(_require(b, "charging", "battery"), "battery.charging"),
                ),
                cpu=None
                if c is None
                else CpuInfo(
                    _as_float(_require(c, "load1", "cpu"), "cpu.load1"),
                    _as_int(_require(c, "cores", "cpu"), "cpu.cores", 1),
                    _opt_float(c.get("temp_c"), "cpu.temp_c"),
                ),
                mem=None
                if m is None
                else MemInfo(_as_float(_require(m, "available_mb", "mem"), "mem.available_mb")),
                net=None
                if n is None
                else NetInfo(
                    _as_str(_require(n, "kind", "net"), "net.kind", 32),  # type: ignore[arg-type]
                    _as_bool(_require(n, "metered", "net"), "net.metered"),
                    _opt_float(n.get("rtt_ms"), "net.rtt_ms"),
                ),
                train=None
                if t is None
                else TrainInfo(
                    _as_int(_require(t, "num_examples", "train"), "train.num_examples"),
                    _opt_float(t.get("samples_per_s"), "train.samples_per_s"),
                ),
                caps=None
                if k is None
                else Caps(
                    _as_str_list(k.get("trainers", []), "caps.trainers"),
                    _as_str_list(k.get("codecs", []), "caps.codecs"),
                    _as_int(k.get("max_payload", 0), "caps.max_payload"),
                ),
                agent=None if obj.get("agent") is None else _as_str(obj["agent"], "agent", 64),
                state=None if obj.get("state") is None else _as_str(obj["state"], "state", 32),
                task_id=None if obj.get("task_id") is None else obj["task_id"],
                declined=None
                if d is None
                else Declined(
                    _as_id_field(_require(d, "task_id", "declined"), "declined.task_id"),
                    _as_str(_require(d, "reason", "declined"), "declined.reason"),
                ),
            )
        except TypeError as exc:  # a wrongly typed value reached a constructor
            raise MessageError(f"status is malformed: {exc}") from None


def _as_str_list(value: Any, what: str) -> tuple[str, ...]:
    if not isinstance(value, list):
        raise MessageError(f"{what} must be a list of strings, got {value!r}")
    return tuple(_as_str(x, f"{what} item", 64) for x in value)


# --------------------------------------------------------------------------- TrainTask


@dataclass(frozen=True, slots=True)
class TrainParams:
    """Local training hyper-parameters of a task."""

    epochs: int
    batch_size: int
    lr: float
    prox_mu: float = 0.0
    """FedProx proximal coefficient; 0 is plain FedAvg."""
    extra: Mapping[str, float] = field(default_factory=dict)
    """Further numeric parameters (e.g. ``local_steps``), travelled as top-level keys."""

    _KNOWN: ClassVar[frozenset[str]] = frozenset({"epochs", "batch_size", "lr", "prox_mu"})

    def __post_init__(self) -> None:
        _as_int(self.epochs, "train.epochs", 1)
        _as_int(self.batch_size, "train.batch_size", 1)
        _as_float(self.lr, "train.lr", 0.0)
        _as_float(self.prox_mu, "train.prox_mu", 0.0)
        extra = _as_metrics(self.extra, "train extra")
        clash = self._KNOWN & set(extra)
        if clash:
            raise MessageError(f"train extra repeats named parameters {sorted(clash)}")
        object.__setattr__(self, "extra", extra)

    def to_json(self) -> JSONObject:
        out: JSONObject = {
            "epochs": self.epochs,
            "batch_size": self.batch_size,
            "lr": self.lr,
            "prox_mu": self.prox_mu,
        }
        out.update(self.extra)
        return out

    @classmethod
    def from_json(cls, obj: Any) -> TrainParams:
        if not isinstance(obj, Mapping):
            raise MessageError(f"task field 'train' must be an object, got {obj!r}")
        extra = {k: v for k, v in obj.items() if k not in cls._KNOWN}
        return cls(
            epochs=_as_int(_require(obj, "epochs", "train"), "train.epochs", 1),
            batch_size=_as_int(_require(obj, "batch_size", "train"), "train.batch_size", 1),
            lr=_as_float(_require(obj, "lr", "train"), "train.lr", 0.0),
            prox_mu=_as_float(obj.get("prox_mu", 0.0), "train.prox_mu", 0.0),
            extra=_as_metrics(extra, "train extra"),
        )


@dataclass(frozen=True, slots=True)
class TrainTask:
    """A train task on ``clients/{cid}/task`` (QoS 1, not retained).

    ``round_no`` travels as JSON ``"round"``; :attr:`round` is an alias.
    """

    TYPE: ClassVar[str] = "task"
    v: ClassVar[int] = PROTOCOL_VERSION

    task_id: str
    round_no: int
    model_version: int
    deadline_ts: float
    """Unix time by which the update must have been published."""
    train: TrainParams
    uplink_codec: Mapping[str, JSONValue]
    """Codec config for the update (``kernels.codec.get_codec(config)``); opaque here."""
    nonce: str
    """Random string echoed in the update header (replay protection)."""
    error_feedback: bool = False
    """Keep the compression residual between rounds on the device."""
    strategy: Mapping[str, JSONValue] | None = None
    """Strategy-specific instructions (opaque JSON object), or None."""

    def __post_init__(self) -> None:
        _as_id_field(self.task_id, "task_id")
        _as_int(self.round_no, "round")
        _as_int(self.model_version, "model_version")
        _as_float(self.deadline_ts, "deadline_ts")
        if not isinstance(self.train, TrainParams):
            raise MessageError(f"train must be a TrainParams, got {self.train!r}")
        object.__setattr__(self, "uplink_codec", _as_json_object(self.uplink_codec, "uplink_codec"))
        _as_id_field(self.nonce, "nonce")
        _as_bool(self.error_feedback, "error_feedback")
        if self.strategy is not None:
            object.__setattr__(self, "strategy", _as_json_object(self.strategy, "strategy"))

    @property
    def round(self) -> int:
        """Alias of :attr:`round_no` (the JSON field name)."""
        return self.round_no

    def to_json(self) -> JSONObject:
        out: JSONObject = {
            "v": PROTOCOL_VERSION,
            "task_id": self.task_id,
            "round": self.round_no,
            "model_version": self.model_version,
            "deadline_ts": self.deadline_ts,
            "train": self.train.to_json(),
            "uplink_codec": dict(self.uplink_codec),
            "error_feedback": self.error_feedback,
            "nonce": self.nonce,
        }
        if self.strategy is not None:
            out["strategy"] = dict(self.strategy)
        return out

    def to_bytes(self) -> bytes:
        return _dumps(self.to_json())

    @classmethod
    def from_bytes(cls, data: bytes | bytearray | memoryview) -> Self:
        return cls.from_json(_loads_object(data, "task"))

    @classmethod
    def from_json(cls, obj: Mapping[str, Any]) -> Self:
        _check_version(obj, "task")
        strategy = obj.get("strategy")
        return cls(
            task_id=_as_id_field(_require(obj, "task_id", "task"), "task_id"),
            round_no=_as_int(_require(obj, "round", "task"), "round"),
            model_version=_as_int(_require(obj, "model_version", "task"), "model_version"),
            deadline_ts=_as_float(_require(obj, "deadline_ts", "task"), "deadline_ts"),
            train=TrainParams.from_json(_require(obj, "train", "task")),
            uplink_codec=_as_json_object(_require(obj, "uplink_codec", "task"), "uplink_codec"),
            nonce=_as_id_field(_require(obj, "nonce", "task"), "nonce"),
            error_feedback=_as_bool(obj.get("error_feedback", False), "error_feedback"),
            strategy=None if strategy is None else _as_json_object(strategy, "strategy"),
        )


@dataclass(frozen=True, slots=True)
class TaskCancel:
    """Withdraws a task, on ``clients/{cid}/task`` like the task (QoS 1, not retained).

    The coordinator sends it when the device's update is no longer wanted (its round closed
    with enough updates); the device stops training that task and does not upload it.
    Devices that predate it log the message as a bad task and ignore it.
    """

    TYPE: ClassVar[str] = "cancel"

    task_id: str
    reason: str
    """Why, for the device's log: ``round_complete``."""

    def __post_init__(self) -> None:
        _as_id_field(self.task_id, "cancel")
        _as_id_field(_as_str(self.reason, "cancel reason", max_len=64), "cancel reason")

    def to_json(self) -> JSONObject:
        return {"v": PROTOCOL_VERSION, "cancel": self.task_id, "reason": self.reason}

    def to_bytes(self) -> bytes:
        return _dumps(self.to_json())

    @classmethod
    def from_json(cls, obj: Mapping[str, Any]) -> Self:
        _check_version(obj, "cancel")
        return cls(
            task_id=_as_id_field(_require(obj, "cancel", "cancel"), "cancel"),
            reason=_as_str(obj.get("reason", "unspecified"), "cancel reason", max_len=64),
        )


def parse_task_message(data: bytes | bytearray | memoryview) -> TrainTask | TaskCancel:
    """Parse a message of ``clients/{cid}/task``: a :class:`TaskCancel` when it has a
    ``cancel`` field, else a :class:`TrainTask`. Raises :class:`MessageError`."""
    obj = _loads_object(data, "task")
    if "cancel" in obj:
        return TaskCancel.from_json(obj)
    return TrainTask.from_json(obj)


# --------------------------------------------------------------------------- envelope

MAGIC: Final = b"FEDG"
FLAG_HMAC: Final = 0x01
_FIXED = struct.Struct("<4sBBHIIQ")
"""magic, version, flags, reserved, header_len, payload_count, total_len."""
FIXED_HEADER_SIZE: Final = _FIXED.size  # 24
CRC_SIZE: Final = 4
HMAC_SIZE: Final = 32
MAX_TENSORS: Final = 65536
MAX_NDIM: Final = 32


class EnvelopeKind(StrEnum):
    """What an envelope carries."""

    UPDATE = "update"
    """A device's update, or a partial aggregate from an aggregator worker."""
    MODEL = "model"
    """A global model."""


@dataclass(frozen=True, slots=True)
class TensorSpec:
    """One tensor in an envelope: its name, logical shape and codec config."""

    name: str
    shape: tuple[int, ...]
    codec: Mapping[str, JSONValue]
    """Codec config (``{"id": ..., **params}``), opaque to the wire layer."""

    def __post_init__(self) -> None:
        _as_str(self.name, "tensor name", 256)
        shape_in: Any = self.shape
        if isinstance(shape_in, str) or not isinstance(shape_in, Sequence):
            raise MessageError(f"tensor {self.name!r} shape must be a list of ints")
        if len(self.shape) > MAX_NDIM:
            raise MessageError(f"tensor {self.name!r} has {len(self.shape)} dims (max {MAX_NDIM})")
        shape = tuple(_as_int(d, f"tensor {self.name!r} dimension") for d in self.shape)
        object.__setattr__(self, "shape", shape)
        object.__setattr__(
            self, "codec", _as_json_object(self.codec, f"tensor {self.name!r} codec")
        )

    @property
    def size(self) -> int:
        """Number of elements."""
        return math.prod(self.shape)

    def to_json(self) -> JSONObject:
        return {"name": self.name, "shape": list(self.shape), "codec": dict(self.codec)}

    @classmethod
    def from_json(cls, obj: Any) -> TensorSpec:
        if not isinstance(obj, Mapping):
            raise MessageError(f"tensor entry must be an object, got {obj!r}")
        shape = _require(obj, "shape", "tensor")
        if not isinstance(shape, list):
            raise MessageError(f"tensor shape must be a list, got {shape!r}")
        return cls(
            name=_as_str(_require(obj, "name", "tensor"), "tensor name"),
            shape=tuple(shape),
            codec=_as_json_object(_require(obj, "codec", "tensor"), "tensor codec"),
        )


@dataclass(frozen=True, slots=True)
class EnvelopeHeader:
    """The JSON header of an envelope.

    For ``kind="update"``, ``task_id`` and ``cid`` are required; a model has
    neither (``cid`` may name the publishing coordinator).
    """

    kind: EnvelopeKind
    round_no: int
    model_version: int
    tensors: tuple[TensorSpec, ...]
    task_id: str | None = None
    cid: str | None = None
    num_examples: int = 0
    metrics: Mapping[str, float] = field(default_factory=dict)
    nonce: str | None = None
    extra: Mapping[str, JSONValue] = field(default_factory=dict)
    """Further JSON fields a strategy needs (e.g. ``local_steps``, ``staleness``)."""

    _KNOWN: ClassVar[frozenset[str]] = frozenset(
        {"v", "kind", "round", "model_version", "tensors", "task_id", "cid", "num_examples"}
        | {"metrics", "nonce", "extra"}
    )

    def __post_init__(self) -> None:
        try:
            object.__setattr__(self, "kind", EnvelopeKind(self.kind))
        except ValueError:
            raise MessageError(
                f"envelope kind must be 'update' or 'model', got {self.kind!r}"
            ) from None
        _as_int(self.round_no, "round")
        _as_int(self.model_version, "model_version")
        if not isinstance(self.tensors, Sequence) or not all(
            isinstance(t, TensorSpec) for t in self.tensors
        ):
            raise MessageError("tensors must be a sequence of TensorSpec")
        object.__setattr__(self, "tensors", tuple(self.tensors))
        if len(self.tensors) > MAX_TENSORS:
            raise MessageError(f"{len(self.tensors)} tensors, the limit is {MAX_TENSORS}")
        names = [t.name for t in self.tensors]
        if len(set(names)) != len(names):
            raise MessageError(f"tensor names repeat: {names}")
        if self.task_id is not None:
            _as_id_field(self.task_id, "task_id")
        if self.cid is not None:
            try:
                validate_id(self.cid, "cid")
            except BadTopicError as exc:
                raise MessageError(str(exc)) from None
        if self.kind is EnvelopeKind.UPDATE and (self.task_id is None or self.cid is None):
            raise MessageError("an update envelope needs task_id and cid")
        _as_int(self.num_examples, "num_examples")
        object.__setattr__(self, "metrics", _as_metrics(self.metrics, "metrics"))
        if self.nonce is not None:
            _as_id_field(self.nonce, "nonce")
        object.__setattr__(self, "extra", _as_json_object(self.extra, "extra"))

    def to_json(self) -> JSONObject:
        out: JSONObject = {
            "v": PROTOCOL_VERSION,
            "kind": self.kind.value,
            "round": self.round_no,
            "model_version": self.model_version,
        }
        if self.task_id is not None:
            out["task_id"] = self.task_id
        if self.cid is not None:
            out["cid"] = self.cid
        out["num_examples"] = self.num_examples
        out["metrics"] = dict(self.metrics)
        if self.nonce is not None:
            out["nonce"] = self.nonce
        if self.extra:
            out["extra"] = dict(self.extra)
        out["tensors"] = [t.to_json() for t in self.tensors]
        return out

    @classmethod
    def from_json(cls, obj: Mapping[str, Any]) -> EnvelopeHeader:
        _check_version(obj, "envelope header")
        tensors = _require(obj, "tensors", "envelope header")
        if not isinstance(tensors, list):
            raise MessageError(f"envelope header 'tensors' must be a list, got {tensors!r}")
        if len(tensors) > MAX_TENSORS:
            raise MessageError(f"{len(tensors)} tensors, the limit is {MAX_TENSORS}")
        return cls(
            kind=_as_str(_require(obj, "kind", "envelope header"), "kind", 16),  # type: ignore[arg-type]
            round_no=_as_int(_require(obj, "round", "envelope header"), "round"),
            model_version=_as_int(
                _require(obj, "model_version", "envelope header"), "model_version"
            ),
            tensors=tuple(TensorSpec.from_json(t) for t in tensors),
            task_id=None if obj.get("task_id") is None else _as_id_field(obj["task_id"], "task_id"),
            cid=None if obj.get("cid") is None else _as_str(obj["cid"], "cid", MAX_ID_LEN),
            num_examples=_as_int(obj.get("num_examples", 0), "num_examples"),
            metrics=_as_metrics(obj.get("metrics", {}), "metrics"),
            nonce=None if obj.get("nonce") is None else _as_id_field(obj["nonce"], "nonce"),
            extra=_as_json_object(obj.get("extra", {}), "extra"),
        )


KeyLookup: TypeAlias = Callable[[str | None], bytes | None]
"""Returns the HMAC key of a device id (the header's ``cid``), or None if it has none."""


def encode_envelope(
    header: EnvelopeHeader,
    payloads: Sequence[bytes | bytearray | memoryview],
    key: bytes | None = None,
) -> bytes:
    """Serialise an envelope; sign it with HMAC-SHA256 when ``key`` is given.

    Layout (little-endian; see docs/PROTOCOL.md)::

        0   4  magic "FEDG"          4  1  version (1)
        5   1  flags (bit 0: HMAC)   6  2  reserved (0)
        8   4  header_len H          12 4  payload_count N
        16  8  total_len (whole envelope, trailer included)
        24  H  JSON header (UTF-8)
        ..  8N payload lengths (u64 each)
        ..     payloads, concatenated
        ..  4  CRC-32C of every byte before it
        ..  32 HMAC-SHA256 of every byte before it (only with flag bit 0)
    """
    if len(payloads) != len(header.tensors):
        raise MessageError(
            f"{len(header.tensors)} tensors in the header but {len(payloads)} payloads"
        )
    if key is not None and (not isinstance(key, bytes | bytearray) or not key):
        raise SignatureError("the HMAC key must be non-empty bytes")
    header_bytes = _dumps(header.to_json())
    lengths = [len(memoryview(p).cast("B")) for p in payloads]
    trailer = CRC_SIZE + (HMAC_SIZE if key is not None else 0)
    total = FIXED_HEADER_SIZE + len(header_bytes) + 8 * len(lengths) + sum(lengths) + trailer
    flags = FLAG_HMAC if key is not None else 0
    buf = bytearray(
        _FIXED.pack(MAGIC, PROTOCOL_VERSION, flags, 0, len(header_bytes), len(lengths), total)
    )
    buf += header_bytes
    buf += struct.pack(f"<{len(lengths)}Q", *lengths)
    for p in payloads:
        buf += p
    buf += struct.pack("<I", google_crc32c.value(bytes(buf)))
    if key is not None:
        buf += hmac.new(bytes(key), buf, hashlib.sha256).digest()
    assert len(buf) == total
    return bytes(buf)


def decode_envelope(
    data: bytes | bytearray | memoryview,
    key: bytes | KeyLookup | None = None,
    *,
    max_size: int = DEFAULT_MAX_ENVELOPE_SIZE,
    max_header_size: int = DEFAULT_MAX_HEADER_SIZE,
    require_signature: bool = False,
) -> tuple[EnvelopeHeader, list[bytes]]:
    """Check and parse an envelope into its header and one payload per tensor.

    ``key`` is the HMAC key, or a function from the header's ``cid`` to the key
    (None: that device has no key). With a key, the envelope must carry a
    matching HMAC. Without one, a present HMAC cannot be checked and only the CRC
    protects the bytes, unless ``require_signature`` makes that an error.

    Checks run in this order, each raising its own :class:`EnvelopeError`:
    size and magic, version, flags, declared length (truncation), CRC, header
    size, JSON header, HMAC, payload table.
    """
    mv = memoryview(data).cast("B")
    n = len(mv)
    if n > max_size:
        raise OversizeError(f"envelope is {n} bytes, the limit is {max_size}")
    if n < FIXED_HEADER_SIZE:
        raise TruncatedError(
            f"envelope is {n} bytes, shorter than the {FIXED_HEADER_SIZE}-byte prefix"
        )
    magic, version, flags, reserved, header_len, count, total = _FIXED.unpack_from(mv, 0)
    if magic != MAGIC:
        raise BadMagicError(f"envelope starts with {bytes(magic)!r}, expected {MAGIC!r}")
    if version != PROTOCOL_VERSION:
        raise VersionError(f"envelope version {version}, this code speaks {PROTOCOL_VERSION}")
    if flags & ~FLAG_HMAC:
        raise EnvelopeError(f"unknown envelope flags 0x{flags:02x}")
    if reserved != 0:
        raise EnvelopeError(f"reserved envelope field is {reserved}, must be 0")
    if total > max_size:
        raise OversizeError(f"envelope declares {total} bytes, the limit is {max_size}")
    if n < total:
        raise TruncatedError(f"envelope has {n} of its {total} bytes")
    if n > total:
        raise EnvelopeError(f"envelope has {n - total} bytes after its declared end")
    signed = bool(flags & FLAG_HMAC)
    trailer = CRC_SIZE + (HMAC_SIZE if signed else 0)
    body_end = total - trailer
    if body_end < FIXED_HEADER_SIZE:
        raise TruncatedError(f"envelope of {total} bytes has no room for its trailer")
    (crc,) = struct.unpack_from("<I", mv, body_end)
    actual = google_crc32c.value(bytes(mv[:body_end]))
    if crc != actual:
        raise ChecksumError(f"CRC-32C is 0x{actual:08x}, the trailer says 0x{crc:08x}")
    if header_len > max_header_size:
        raise OversizeError(
            f"envelope header is {header_len} bytes, the limit is {max_header_size}"
        )
    table_start = FIXED_HEADER_SIZE + header_len
    payload_start = table_start + 8 * count
    if payload_start > body_end:
        raise EnvelopeError(
            f"header ({header_len} bytes) and {count} payload lengths overrun the envelope"
        )
    header = EnvelopeHeader.from_json(
        _loads_object(mv[FIXED_HEADER_SIZE:table_start], "envelope header")
    )
    resolved = key(header.cid) if callable(key) else key
    if resolved is not None:
        if not signed:
            raise SignatureError(
                f"envelope from cid={header.cid!r} is not signed, a key is configured"
            )
        expected = hmac.new(bytes(resolved), mv[: total - HMAC_SIZE], hashlib.sha256).digest()
        if not hmac.compare_digest(expected, bytes(mv[total - HMAC_SIZE : total])):
            raise SignatureError(f"HMAC of envelope from cid={header.cid!r} does not match")
    elif require_signature:
        raise SignatureError(f"no HMAC key for cid={header.cid!r} and a signature is required")
    if count != len(header.tensors):
        raise EnvelopeError(f"{count} payloads but {len(header.tensors)} tensors in the header")
    lengths = struct.unpack_from(f"<{count}Q", mv, table_start)
    if sum(lengths) != body_end - payload_start:
        raise EnvelopeError(
            f"payload lengths add up to {sum(lengths)}, the envelope holds "
            f"{body_end - payload_start}"
        )
    payloads: list[bytes] = []
    offset = payload_start
    for length in lengths:
        payloads.append(bytes(mv[offset : offset + length]))
        offset += length
    return header, payloads


_KIND_PHRASE: Final[Mapping[EnvelopeKind, str]] = {
    EnvelopeKind.UPDATE: "an update",
    EnvelopeKind.MODEL: "a model",
}


def _decode_envelope_of_kind(
    data: bytes | bytearray | memoryview,
    key: bytes | KeyLookup | None,
    kind: EnvelopeKind,
    *,
    max_size: int,
    require_signature: bool,
) -> tuple[EnvelopeHeader, list[bytes]]:
    """`decode_envelope`, then raise `MessageError` unless the envelope carries ``kind``."""
    header, payloads = decode_envelope(
        data, key, max_size=max_size, require_signature=require_signature
    )
    if header.kind is not kind:
        raise MessageError(
            f"expected {_KIND_PHRASE[kind]} envelope, got kind={header.kind.value!r}"
        )
    return header, payloads


def _freeze_and_check_payloads(message: ModelUpdate | GlobalModel) -> None:
    """Make ``tensors``/``payloads`` tuples of one payload per tensor and validate the header.

    The ``__post_init__`` of both envelope messages (frozen dataclasses, hence
    ``object.__setattr__``).
    """
    object.__setattr__(message, "tensors", tuple(message.tensors))
    object.__setattr__(message, "payloads", tuple(bytes(p) for p in message.payloads))
    if len(message.payloads) != len(message.tensors):
        raise MessageError(f"{len(message.tensors)} tensors but {len(message.payloads)} payloads")
    message.header  # noqa: B018 - validates every header field


@dataclass(frozen=True, slots=True)
class ModelUpdate:
    """A device's update (or a partial aggregate): header fields plus one payload per tensor."""

    task_id: str
    round_no: int
    model_version: int
    cid: str
    num_examples: int
    tensors: tuple[TensorSpec, ...]
    payloads: tuple[bytes, ...]
    """Encoded bytes of each tensor, in the order of :attr:`tensors`."""
    metrics: Mapping[str, float] = field(default_factory=dict)
    nonce: str | None = None
    extra: Mapping[str, JSONValue] = field(default_factory=dict)

    def __post_init__(self) -> None:
        _freeze_and_check_payloads(self)

    @property
    def round(self) -> int:
        """Alias of :attr:`round_no`."""
        return self.round_no

    @property
    def header(self) -> EnvelopeHeader:
        return EnvelopeHeader(
            kind=EnvelopeKind.UPDATE,
            round_no=self.round_no,
            model_version=self.model_version,
            tensors=self.tensors,
            task_id=self.task_id,
            cid=self.cid,
            num_examples=self.num_examples,
            metrics=self.metrics,
            nonce=self.nonce,
            extra=self.extra,
        )

    def to_bytes(self, key: bytes | None = None) -> bytes:
        """The envelope, signed when ``key`` is given."""
        return encode_envelope(self.header, self.payloads, key)

    @classmethod
    def from_bytes(
        cls,
        data: bytes | bytearray | memoryview,
        key: bytes | KeyLookup | None = None,
        *,
        max_size: int = DEFAULT_MAX_ENVELOPE_SIZE,
        require_signature: bool = False,
    ) -> Self:
        header, payloads = _decode_envelope_of_kind(
            data,
            key,
            EnvelopeKind.UPDATE,
            max_size=max_size,
            require_signature=require_signature,
        )
        assert header.task_id is not None and header.cid is not None
        return cls(
            task_id=header.task_id,
            round_no=header.round_no,
            model_version=header.model_version,
            cid=header.cid,
            num_examples=header.num_examples,
            tensors=header.tensors,
            payloads=tuple(payloads),
            metrics=header.metrics,
            nonce=header.nonce,
            extra=header.extra,
        )


@dataclass(frozen=True, slots=True)
class GlobalModel:
    """A global model version: tensors plus one payload per tensor."""

    model_version: int
    round_no: int
    tensors: tuple[TensorSpec, ...]
    payloads: tuple[bytes, ...]
    metrics: Mapping[str, float] = field(default_factory=dict)
    extra: Mapping[str, JSONValue] = field(default_factory=dict)

    def __post_init__(self) -> None:
        _freeze_and_check_payloads(self)

    @property
    def header(self) -> EnvelopeHeader:
        return EnvelopeHeader(
            kind=EnvelopeKind.MODEL,
            round_no=self.round_no,
            model_version=self.model_version,
            tensors=self.tensors,
            metrics=self.metrics,
            extra=self.extra,
        )

    def to_bytes(self, key: bytes | None = None) -> bytes:
        return encode_envelope(self.header, self.payloads, key)

    @classmethod
    def from_bytes(
        cls,
        data: bytes | bytearray | memoryview,
        key: bytes | KeyLookup | None = None,
        *,
        max_size: int = DEFAULT_MAX_ENVELOPE_SIZE,
        require_signature: bool = False,
    ) -> Self:
        header, payloads = _decode_envelope_of_kind(
            data,
            key,
            EnvelopeKind.MODEL,
            max_size=max_size,
            require_signature=require_signature,
        )
        return cls(
            model_version=header.model_version,
            round_no=header.round_no,
            tensors=header.tensors,
            payloads=tuple(payloads),
            metrics=header.metrics,
            extra=header.extra,
        )


# --------------------------------------------------------------------------- model manifest

_HEX32 = re.compile(r"[0-9a-f]{32}")
_HEX64 = re.compile(r"[0-9a-f]{64}")


@dataclass(frozen=True, slots=True)
class ModelManifest:
    """Retained JSON on ``model/manifest``: which global model is current and how to fetch it.

    The model's envelope is split into ``chunk_count`` chunks (``edge.chunking``)
    published retained on ``model/{model_version}/{index}``.
    """

    TYPE: ClassVar[str] = "model_manifest"
    v: ClassVar[int] = PROTOCOL_VERSION

    model_version: int
    transfer_id: str
    """Hex of the 16-byte chunk transfer id."""
    chunk_count: int
    total_len: int
    """Length of the model envelope in bytes."""
    sha256: str
    """Hex SHA-256 of the model envelope."""

    def __post_init__(self) -> None:
        _as_int(self.model_version, "model_version")
        if not isinstance(self.transfer_id, str) or _HEX32.fullmatch(self.transfer_id) is None:
            raise MessageError(
                f"transfer_id must be 32 lowercase hex digits, got {self.transfer_id!r}"
            )
        _as_int(self.chunk_count, "chunk_count", 1)
        _as_int(self.total_len, "total_len")
        if not isinstance(self.sha256, str) or _HEX64.fullmatch(self.sha256) is None:
            raise MessageError(f"sha256 must be 64 lowercase hex digits, got {self.sha256!r}")

    def to_json(self) -> JSONObject:
        return {
            "v": PROTOCOL_VERSION,
            "model_version": self.model_version,
            "transfer_id": self.transfer_id,
            "chunk_count": self.chunk_count,
            "total_len": self.total_len,
            "sha256": self.sha256,
        }

    def to_bytes(self) -> bytes:
        return _dumps(self.to_json())

    @classmethod
    def from_bytes(cls, data: bytes | bytearray | memoryview) -> Self:
        obj = _loads_object(data, "model manifest")
        _check_version(obj, "model manifest")
        return cls(
            model_version=_as_int(_require(obj, "model_version", "manifest"), "model_version"),
            transfer_id=_as_str(_require(obj, "transfer_id", "manifest"), "transfer_id", 32),
            chunk_count=_as_int(_require(obj, "chunk_count", "manifest"), "chunk_count", 1),
            total_len=_as_int(_require(obj, "total_len", "manifest"), "total_len"),
            sha256=_as_str(_require(obj, "sha256", "manifest"), "sha256", 64),
        )

    def verify(self, envelope: bytes) -> None:
        """Raise :class:`ChecksumError` unless ``envelope`` is the model this manifest names."""
        if len(envelope) != self.total_len:
            raise ChecksumError(
                f"model is {len(envelope)} bytes, the manifest says {self.total_len}"
            )
        digest = hashlib.sha256(envelope).hexdigest()
        if digest != self.sha256:
            raise ChecksumError(
                f"model SHA-256 {digest} does not match the manifest's {self.sha256}"
            )
