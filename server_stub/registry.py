"""The device registry: what the coordinator knows about each device of the fleet.

This module owns :class:`Registry`, built from the retained ``clients/{cid}/status``
messages (one per device; the Last Will marks a device offline) plus the coordinator's own
bookkeeping: busy flag, participation history, declines, failures and measured speed.
Rules:

- Pure: every method that depends on time takes ``now`` (the coordinator's clock, the same
  clock as :attr:`~server_stub.devices.DeviceView.last_seen`). No I/O, no threads.
- A device is *online* when its latest status says so and it is fresh: no status for
  ``EligibilityRules.heartbeat_timeout_s`` (N heartbeat intervals) counts as offline.
- :meth:`Registry.observe` returns a :class:`StatusChange` that says what the new status
  means for a round in progress (went offline, became ineligible, declined a task), so the
  round machine can drop the device at once instead of waiting out the deadline.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterable
from dataclasses import dataclass

from edge.wire import Status
from server_stub.devices import DeviceCaps, DeviceView, EligibilityRules, Ineligible


@dataclass(slots=True)
class DeviceRecord:
    """Mutable per-device bookkeeping next to the device's latest :class:`DeviceView`."""

    view: DeviceView
    """Latest telemetry plus selection-relevant bookkeeping."""
    successes: int = 0
    """Accepted updates."""
    declines: int = 0
    """Tasks the device explicitly declined in its status."""
    failures: int = 0
    """Tasks that ended without a usable update (timeout, dropped, invalid update)."""
    refusals: int = 0
    """Updates refused in a row for a fault of the device (:meth:`Registry.record_refusal`)."""
    cooldown_until: float = 0.0
    """The device is not offered tasks before this time (after repeated refusals)."""
    state: str | None = None
    """Agent state from the status (``idle``, ``training``, ...), if reported."""
    agent: str | None = None
    """Agent name and version, ``fedge/x.y``."""
    seen_declines: set[str] = dataclasses.field(default_factory=set)
    """Task ids whose decline was already reported (a status repeats it on every heartbeat)."""


@dataclass(frozen=True, slots=True)
class StatusChange:
    """What one status message changed, as far as a running round is concerned."""

    cid: str
    online: bool
    """The device is online after this status."""
    ineligible: Ineligible | None
    """First reason the device cannot train (ignoring ``busy``), or None."""
    declined_task: str | None = None
    """Task id the device newly declined in this status, if any."""
    decline_reason: str | None = None


def view_from_status(cid: str, status: Status, now: float, old: DeviceView | None) -> DeviceView:
    """Merge a status into a device view; bookkeeping fields are kept from ``old``."""
    base = old if old is not None else DeviceView(cid=cid, last_seen=now)
    if not status.online:
        # The Last Will carries nothing but ``online: false``: keep the last telemetry.
        return dataclasses.replace(base, online=False, last_seen=now)
    assert status.net is not None and status.train is not None and status.caps is not None
    assert status.cpu is not None and status.mem is not None
    battery = status.battery
    return dataclasses.replace(
        base,
        online=True,
        last_seen=now,
        battery_percent=None if battery is None else battery.percent,
        charging=False if battery is None else battery.charging,
        metered=status.net.metered,
        cpu_temp_c=status.cpu.temp_c,
        mem_available_mb=status.mem.available_mb,
        rtt_ms=status.net.rtt_ms,
        samples_per_s=status.train.samples_per_s
        if status.train.samples_per_s is not None
        else base.samples_per_s,
        num_examples=status.train.num_examples,
        caps=DeviceCaps(
            trainers=frozenset(status.caps.trainers),
            codecs=frozenset(status.caps.codecs),
            max_payload=status.caps.max_payload or None,
        ),
    )


class Registry:
    """Every device the coordinator has heard of, keyed by cid."""

    def __init__(self, rules: EligibilityRules) -> None:
        self.rules = rules
        self._devices: dict[str, DeviceRecord] = {}

    # -- input -------------------------------------------------------------------------------

    def observe(self, cid: str, status: Status, now: float) -> StatusChange:
        """Record a status message of ``cid`` received at ``now``."""
        record = self._devices.get(cid)
        view = view_from_status(cid, status, now, None if record is None else record.view)
        if record is None:
            record = DeviceRecord(view=view)
            self._devices[cid] = record
        else:
            if view.online and not record.view.online:
                # Back from offline (often a restart after someone fixed it): a fresh chance.
                record.refusals, record.cooldown_until = 0, 0.0
            record.view = view
        if status.online:
            record.state = status.state
            record.agent = status.agent
        declined_task: str | None = None
        decline_reason: str | None = None
        if status.declined is not None and status.declined.task_id not in record.seen_declines:
            record.seen_declines.add(status.declined.task_id)
            declined_task = status.declined.task_id
            decline_reason = status.declined.reason
        return StatusChange(
            cid=cid,
            online=view.online,
            ineligible=self.rules.check(dataclasses.replace(view, busy=False), now),
            declined_task=declined_task,
            decline_reason=decline_reason,
        )

    def forget(self, cid: str) -> None:
        """Remove a device (its retained status was cleared)."""
        self._devices.pop(cid, None)

    # -- bookkeeping -------------------------------------------------------------------------

    def _update(self, cid: str, **changes: object) -> None:
        record = self._devices.get(cid)
        if record is not None:
            record.view = dataclasses.replace(record.view, **changes)  # type: ignore[arg-type]

    def set_busy(self, cid: str, busy: bool) -> None:
        """Mark a device as holding (or no longer holding) a task."""
        self._update(cid, busy=busy)

    def record_selected(self, cid: str, round_no: int) -> None:
        """A task for ``round_no`` went to ``cid``."""
        record = self._devices.get(cid)
        if record is not None:
            record.view = dataclasses.replace(
                record.view,
                busy=True,
                participation_count=record.view.participation_count + 1,
                last_selected_round=round_no,
            )

    def record_success(self, cid: str, loss: float | None = None) -> None:
        """``cid`` delivered an accepted update (``loss``: its reported training loss)."""
        record = self._devices.get(cid)
        if record is None:
            return
        record.successes += 1
        record.refusals, record.cooldown_until = 0, 0.0
        changes: dict[str, object] = {"busy": False}
        if loss is not None and loss >= 0.0 and math.isfinite(loss):
            changes["recent_loss"] = loss
        record.view = dataclasses.replace(record.view, **changes)  # type: ignore[arg-type]

    def record_decline(self, cid: str) -> None:
        """``cid`` explicitly declined its task."""
        record = self._devices.get(cid)
        if record is not None:
            record.declines += 1
            record.view = dataclasses.replace(record.view, busy=False)

    def record_failure(self, cid: str) -> None:
        """``cid`` did not deliver a usable update for its task."""
        record = self._devices.get(cid)
        if record is not None:
            record.failures += 1
            record.view = dataclasses.replace(record.view, busy=False)

    def record_refusal(self, cid: str, now: float, *, base_s: float, max_s: float) -> float:
        """``cid``'s update was refused for a fault of the device (its key, its envelope, its
        model layout), which sending it another task will not fix.

        From the second refusal in a row the device is not offered tasks for ``base_s``,
        doubling with each further refusal up to ``max_s``; an accepted update, or the device
        coming back online after being offline, ends that. Returns the cool-down started
        (0.0 for none).
        """
        record = self._devices.get(cid)
        if record is None:
            return 0.0
        record.failures += 1
        record.refusals += 1
        record.view = dataclasses.replace(record.view, busy=False)
        if record.refusals < 2:
            return 0.0
        delay = min(max_s, base_s * 2.0 ** (record.refusals - 2))
        record.cooldown_until = now + delay
        return delay

    # -- queries -----------------------------------------------------------------------------

    def __contains__(self, cid: object) -> bool:
        return cid in self._devices

    def __len__(self) -> int:
        return len(self._devices)

    def get(self, cid: str) -> DeviceView | None:
        """The device's current view, or None if unknown."""
        record = self._devices.get(cid)
        return None if record is None else record.view

    def record(self, cid: str) -> DeviceRecord | None:
        """The device's full record (views plus counters), or None if unknown."""
        return self._devices.get(cid)

    def views(self) -> list[DeviceView]:
        """Every device's view, ordered by cid."""
        return [self._devices[cid].view for cid in sorted(self._devices)]

    def records(self) -> list[tuple[str, DeviceRecord]]:
        """Every device's record, ordered by cid."""
        return sorted(self._devices.items())

    def is_online(self, cid: str, now: float) -> bool:
        """Online by its last status and not stale."""
        view = self.get(cid)
        return (
            view is not None
            and view.online
            and now - view.last_seen <= self.rules.heartbeat_timeout_s
        )

    def online(self, now: float) -> list[DeviceView]:
        """Devices online and fresh at ``now``."""
        return [v for v in self.views() if self.is_online(v.cid, now)]

    def eligible(self, now: float, exclude: Iterable[str] = ()) -> list[DeviceView]:
        """Devices that may be offered a task at ``now`` (not busy, fresh, rules pass)."""
        skip = set(exclude)
        return [
            r.view
            for _cid, r in self.records()
            if r.view.cid not in skip
            and r.cooldown_until <= now
            and self.rules.check(r.view, now) is None
        ]

    def cooling_down(self, now: float) -> dict[str, float]:
        """``cid -> until`` of the devices held back after repeated refusals."""
        return {cid: r.cooldown_until for cid, r in self.records() if r.cooldown_until > now}

    def ineligible_reasons(self, now: float) -> dict[str, Ineligible]:
        """``cid -> reason`` of every device that is not eligible at ``now``."""
        return self.rules.partition(self.views(), now)[1]


__all__ = ["DeviceRecord", "Registry", "StatusChange", "view_from_status"]
