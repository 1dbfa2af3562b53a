"""The coordinator's view of one device, and the rules that make a device eligible for a round.

This module owns :class:`DeviceView` (a frozen snapshot the registry fills from the
device's retained status telemetry plus the coordinator's own bookkeeping) and
:class:`EligibilityRules`. Rules:

- Everything here is pure: ``now`` is an argument, on the same clock as
  :attr:`DeviceView.last_seen` (the coordinator's monotonic clock, in seconds).
- Unknown is not made up. ``battery_percent is None`` means the host runs on mains power
  and has no battery (the status carries ``"battery": null``), which is always eligible as
  far as power goes. An unknown temperature passes the temperature rule; an unknown amount of
  free memory fails a memory rule that is switched on.
- :meth:`EligibilityRules.check` returns the *first* reason a device is not eligible as an
  :class:`Ineligible` code (a ``str``), so the registry can count and log reasons.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass, field
from enum import StrEnum


class DeviceViewError(ValueError):
    """A device view or a rule set was built from impossible values."""


class Ineligible(StrEnum):
    """Why a device cannot take part in a round; the value is the code that goes into logs."""

    OFFLINE = "offline"
    """The device's Last Will (or an explicit ``online: false``) marked it offline."""
    STALE_HEARTBEAT = "stale_heartbeat"
    """No status for longer than ``EligibilityRules.heartbeat_timeout_s``."""
    BUSY = "busy"
    """The device already holds a task."""
    LOW_BATTERY = "low_battery"
    """On battery, not charging, and below ``min_battery_percent``."""
    METERED = "metered"
    """On a metered link (cellular, hotspot) while ``allow_metered`` is false."""
    TOO_HOT = "too_hot"
    """CPU temperature above ``max_temp_c`` (a Pi throttles at 80-85 °C)."""
    LOW_MEMORY = "low_memory"
    """Less free memory than ``min_mem_mb``, or free memory unknown while that rule is on."""
    MISSING_TRAINER = "missing_trainer"
    """The device cannot run the trainer the task needs."""
    MISSING_CODEC = "missing_codec"
    """The device lacks a codec of the task's uplink pipeline."""


def _check_finite(name: str, value: float | None, *, lo: float | None = None) -> None:
    if value is None:
        return
    if not math.isfinite(value):
        raise DeviceViewError(f"{name} must be finite, got {value!r}")
    if lo is not None and value < lo:
        raise DeviceViewError(f"{name} must be >= {lo}, got {value!r}")


@dataclass(frozen=True, slots=True)
class DeviceCaps:
    """What a device can run, from the ``caps`` object of its status."""

    trainers: frozenset[str] = frozenset()
    """Trainer ids the device can run (e.g. ``"numpy_mlp"``, ``"litert"``)."""
    codecs: frozenset[str] = frozenset()
    """Codec ids the device can encode with (e.g. ``"topk"``, ``"block_i8"``, ``"zstd"``)."""
    max_payload: int | None = None
    """Largest MQTT payload the device accepts in bytes, or None when it did not say."""


@dataclass(frozen=True, slots=True)
class DeviceView:
    """One device as selection sees it: last telemetry plus participation bookkeeping."""

    cid: str
    """Device id (its MQTT username in production)."""
    online: bool = True
    """False once the Last Will or an ``online: false`` status arrived."""
    last_seen: float = 0.0
    """Coordinator clock (seconds) of the last status message."""
    battery_percent: float | None = None
    """Battery charge 0-100, or None for a mains-powered host with no battery."""
    charging: bool = False
    """True while on a charger; charging devices ignore ``min_battery_percent``."""
    metered: bool = False
    """True on a metered link (cellular, hotspot)."""
    cpu_temp_c: float | None = None
    """CPU temperature in °C, or None when the host has no sensor."""
    mem_available_mb: float | None = None
    """Free memory in MiB, or None when unknown."""
    rtt_ms: float | None = None
    """Round-trip time to the broker in milliseconds, or None when not measured yet."""
    samples_per_s: float | None = None
    """Training throughput measured on the device, or None before the first measurement."""
    num_examples: int = 0
    """Local training examples the device holds."""
    caps: DeviceCaps = field(default_factory=DeviceCaps)
    """Trainers and codecs the device supports."""
    busy: bool = False
    """True while the device holds an unfinished task."""
    participation_count: int = 0
    """Rounds this device was selected for so far."""
    last_selected_round: int | None = None
    """Round number of the last selection, or None if never selected."""
    recent_loss: float | None = None
    """Training loss the device reported with its last update, or None if it never reported."""

    def __post_init__(self) -> None:
        if not self.cid:
            raise DeviceViewError("cid must be a non-empty string")
        if self.battery_percent is not None and not 0.0 <= self.battery_percent <= 100.0:
            raise DeviceViewError(
                f"battery_percent must be within 0-100 or None (no battery), "
                f"got {self.battery_percent!r}"
            )
        _check_finite("last_seen", self.last_seen)
        _check_finite("cpu_temp_c", self.cpu_temp_c)
        _check_finite("mem_available_mb", self.mem_available_mb, lo=0.0)
        _check_finite("rtt_ms", self.rtt_ms, lo=0.0)
        _check_finite("samples_per_s", self.samples_per_s, lo=0.0)
        _check_finite("recent_loss", self.recent_loss, lo=0.0)
        if self.num_examples < 0:
            raise DeviceViewError(f"num_examples must be >= 0, got {self.num_examples}")
        if self.participation_count < 0:
            raise DeviceViewError(
                f"participation_count must be >= 0, got {self.participation_count}"
            )

    @property
    def has_battery(self) -> bool:
        """Whether the host runs on a battery (False for mains-powered hosts)."""
        return self.battery_percent is not None

    @property
    def ever_selected(self) -> bool:
        """Whether the coordinator ever selected this device."""
        return self.last_selected_round is not None or self.participation_count > 0


@dataclass(frozen=True, slots=True)
class EligibilityRules:
    """Which devices may be offered a task; see :meth:`check`."""

    min_battery_percent: float = 20.0
    """Devices on battery and not charging need at least this charge."""
    allow_metered: bool = False
    """Whether devices on a metered link may train."""
    max_temp_c: float | None = 80.0
    """Hotter devices are skipped; None switches the rule off."""
    min_mem_mb: float | None = None
    """Devices need this much free memory; None switches the rule off."""
    required_trainer: str | None = None
    """Trainer id the task needs, or None for any."""
    required_codecs: frozenset[str] = frozenset()
    """Codec ids of the task's uplink pipeline; the device must support all of them."""
    heartbeat_timeout_s: float = 90.0
    """A device whose last status is older than this is treated as gone (3 × 30 s heartbeat)."""

    def __post_init__(self) -> None:
        if not 0.0 <= self.min_battery_percent <= 100.0:
            raise DeviceViewError(
                f"min_battery_percent must be within 0-100, got {self.min_battery_percent!r}"
            )
        _check_finite("max_temp_c", self.max_temp_c)
        _check_finite("min_mem_mb", self.min_mem_mb, lo=0.0)
        if not (math.isfinite(self.heartbeat_timeout_s) and self.heartbeat_timeout_s > 0.0):
            raise DeviceViewError(
                f"heartbeat_timeout_s must be a positive number of seconds, "
                f"got {self.heartbeat_timeout_s!r}"
            )

    def check(self, view: DeviceView, now: float) -> Ineligible | None:
        """Return the first reason ``view`` is not eligible at ``now``, or None if it is.

        Parameters
        ----------
        view
            The device.
        now
            Coordinator clock in seconds, the same clock as ``view.last_seen``.

        Examples
        --------
        >>> rules = EligibilityRules()
        >>> rules.check(DeviceView("pi-1", last_seen=0.0, battery_percent=None), now=10.0) is None
        True
        >>> rules.check(DeviceView("pi-2", last_seen=0.0, battery_percent=5.0), now=10.0)
        <Ineligible.LOW_BATTERY: 'low_battery'>
        """
        if not view.online:
            return Ineligible.OFFLINE
        if now - view.last_seen > self.heartbeat_timeout_s:
            return Ineligible.STALE_HEARTBEAT
        if view.busy:
            return Ineligible.BUSY
        if (
            view.battery_percent is not None
            and not view.charging
            and view.battery_percent < self.min_battery_percent
        ):
            return Ineligible.LOW_BATTERY
        if view.metered and not self.allow_metered:
            return Ineligible.METERED
        if (
            self.max_temp_c is not None
            and view.cpu_temp_c is not None
            and view.cpu_temp_c > self.max_temp_c
        ):
            return Ineligible.TOO_HOT
        if self.min_mem_mb is not None and (
            view.mem_available_mb is None or view.mem_available_mb < self.min_mem_mb
        ):
            return Ineligible.LOW_MEMORY
        if self.required_trainer is not None and self.required_trainer not in view.caps.trainers:
            return Ineligible.MISSING_TRAINER
        if not self.required_codecs <= view.caps.codecs:
            return Ineligible.MISSING_CODEC
        return None

    def partition(
        self, views: Iterable[DeviceView], now: float
    ) -> tuple[list[DeviceView], dict[str, Ineligible]]:
        """Split ``views`` into the eligible ones and a ``cid -> reason`` map of the others."""
        eligible: list[DeviceView] = []
        rejected: dict[str, Ineligible] = {}
        for view in views:
            reason = self.check(view, now)
            if reason is None:
                eligible.append(view)
            else:
                rejected[view.cid] = reason
        return eligible, rejected


__all__ = [
    "DeviceCaps",
    "DeviceView",
    "DeviceViewError",
    "EligibilityRules",
    "Ineligible",
]
