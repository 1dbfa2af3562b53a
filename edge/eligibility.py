"""The device's own rules: may it take this task now, and must it stop training?

The coordinator already filters devices on their last status (``server_stub.devices``), but
a status can be 30 s old: the device checks again, with a fresh reading, before it trains and
while it trains. Rules:

- Pure: the caller passes the reading and ``now`` (Unix seconds, the clock of
  ``TrainTask.deadline_ts``); nothing here reads a clock or a sensor.
- Each function returns the *first* reason that applies, as a :class:`DeclineReason`
  (a ``str``, the code that goes into ``Status.declined.reason``), or None.
- Unknown is not made up: no battery passes the battery rule, an unknown temperature
  passes the temperature rule.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

from edge.telemetry import TelemetrySnapshot
from edge.wire import JSONValue, TrainTask
from kernels.codec import get_codec
from kernels.errors import CodecError

__all__ = [
    "DeclineReason",
    "Limits",
    "check_task",
    "is_scaffold",
    "seeded_codec_config",
    "stop_reason",
]


class DeclineReason(StrEnum):
    """Why the device declined or abandoned a task (``Status.declined.reason``)."""

    LOW_BATTERY = "low_battery"
    """On battery, not charging, below ``Limits.min_battery_percent``."""
    METERED = "metered"
    """On a metered link and ``Limits.allow_metered`` is false."""
    TOO_HOT = "too_hot"
    """Temperature above ``Limits.max_temp_c``."""
    LOW_MEMORY = "low_memory"
    """Less available memory than ``Limits.min_free_mem_mb``."""
    UNSUPPORTED_CODEC = "unsupported_codec"
    """The task's uplink codec is unknown here or its config is invalid."""
    UNSUPPORTED_STRATEGY = "unsupported_strategy"
    """The task needs something the trainer cannot do (SCAFFOLD on LiteRT)."""
    DEADLINE_PASSED = "deadline_passed"
    """The task's deadline is over (on arrival, or while waiting or training)."""
    MODEL_UNAVAILABLE = "model_unavailable"
    """The model version the task names did not arrive (in time) or is already replaced."""
    BUSY = "busy"
    """Another task is in progress."""
    CANCELLED = "cancelled"
    """The coordinator withdrew the task (its round closed without this update)."""
    TRAINING_FAILED = "training_failed"
    """Training or encoding raised an error (logged on the device)."""


@dataclass(frozen=True, slots=True)
class Limits:
    """The device's own eligibility rules (``[limits]`` in the agent config)."""

    min_battery_percent: float = 20.0
    """Train on battery only above this charge (always when charging or without a battery)."""
    allow_metered: bool = False
    """Train (and upload) on a metered link."""
    max_temp_c: float = 80.0
    """Do not start, and stop, training above this temperature (a Pi throttles at 80-85 °C)."""
    min_free_mem_mb: float = 64.0
    """Do not start training with less available memory than this."""

    def __post_init__(self) -> None:
        if not 0.0 <= self.min_battery_percent <= 100.0:
            raise ValueError(
                f"min_battery_percent must be in 0..100, got {self.min_battery_percent}"
            )
        if self.min_free_mem_mb < 0:
            raise ValueError(f"min_free_mem_mb must be >= 0, got {self.min_free_mem_mb}")


def is_scaffold(task: TrainTask) -> bool:
    """True when the task's ``strategy`` object names SCAFFOLD (``{"id": "scaffold"}``)."""
    strategy = task.strategy or {}
    return strategy.get("id") == "scaffold" or strategy.get("name") == "scaffold"


def _codec_ok(config: Mapping[str, JSONValue]) -> bool:
    try:
        get_codec(config)
    except CodecError:
        return False
    return True


def _power_reason(snap: TelemetrySnapshot, limits: Limits) -> DeclineReason | None:
    b = snap.battery
    if b is not None and not b.charging and b.percent < limits.min_battery_percent:
        return DeclineReason.LOW_BATTERY
    if snap.temp_c is not None and snap.temp_c > limits.max_temp_c:
        return DeclineReason.TOO_HOT
    return None


def check_task(
    task: TrainTask,
    snap: TelemetrySnapshot,
    limits: Limits,
    *,
    now: float,
    supports_scaffold: bool,
) -> DeclineReason | None:
    """Return why the device must decline ``task`` now, or None when it may train.

    Order: deadline, codec, strategy, battery, temperature, metered link, memory.
    """
    if now >= task.deadline_ts:
        return DeclineReason.DEADLINE_PASSED
    if not _codec_ok(task.uplink_codec):
        return DeclineReason.UNSUPPORTED_CODEC
    if is_scaffold(task) and not supports_scaffold:
        return DeclineReason.UNSUPPORTED_STRATEGY
    power = _power_reason(snap, limits)
    if power is not None:
        return power
    if snap.metered and not limits.allow_metered:
        return DeclineReason.METERED
    if snap.available_mb < limits.min_free_mem_mb:
        return DeclineReason.LOW_MEMORY
    return None


def stop_reason(
    snap: TelemetrySnapshot, limits: Limits, *, now: float, deadline_ts: float
) -> DeclineReason | None:
    """Return why training must stop now (battery, heat, deadline), or None to go on."""
    if now >= deadline_ts:
        return DeclineReason.DEADLINE_PASSED
    return _power_reason(snap, limits)


def seeded_codec_config(config: Mapping[str, JSONValue], nonce: str) -> dict[str, JSONValue]:
    """Return the normalised codec config with every ``seed`` mixed with the task's nonce.

    Stochastic rounding and sampled top-k thresholds are reproducible from their seed; a
    fixed seed would repeat the same rounding noise every round, so each stage's seed
    becomes a hash of (nonce, stage index, configured seed). Decoding does not need seeds.
    """
    normal: dict[str, Any] = get_codec(config).get_config()

    def mix(stage: dict[str, Any], index: int) -> dict[str, Any]:
        if "seed" not in stage:
            return stage
        digest = hashlib.sha256(f"{nonce}|{index}|{stage['seed']}".encode()).digest()
        return {**stage, "seed": int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)}

    if isinstance(normal.get("stages"), list):
        normal["stages"] = [mix(dict(s), i) for i, s in enumerate(normal["stages"])]
        return normal
    return mix(normal, 0)
