"""Device telemetry: what the agent reports about itself, read from the host or a simulation.

This module owns

- :class:`TelemetrySnapshot`, one reading of battery, CPU, memory and link, and
  :func:`build_status`, which turns a snapshot plus the agent's own measurements (round-trip
  time, training speed, capabilities, state) into an :class:`edge.wire.Status`;
- the :class:`TelemetryProvider` protocol the agent reads through, with two implementations:
  :class:`HostTelemetry` (psutil, ``/proc`` and ``/sys`` on the device) and
  :class:`SimulatedTelemetry` (a :class:`DeviceProfile` the simulator and the tests drive:
  a battery that drains while training and charges on a schedule, a metered link, a
  temperature that rises while training, a slow CPU);
- :class:`TelemetryOverrides`: fixed values from the agent's config laid over a reading.

Rules: this is the only module of fedge that imports psutil. Unknown is never made up: a host
without a battery reports ``battery=None``, an unknown temperature is ``None``. Nothing here
reads the clock; ``now`` (Unix seconds) is an argument.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Final, Protocol

import psutil

from edge import __version__
from edge.wire import (
    BatteryInfo,
    Caps,
    CpuInfo,
    Declined,
    MemInfo,
    NetInfo,
    NetKind,
    Status,
    TrainInfo,
)

__all__ = [
    "AGENT_NAME",
    "DeviceProfile",
    "HostTelemetry",
    "SimulatedTelemetry",
    "TelemetryOverrides",
    "TelemetryProvider",
    "TelemetrySnapshot",
    "build_status",
    "default_route_interface",
    "net_kind_of",
    "process_cpu_seconds",
    "process_rss_mb",
]

log = logging.getLogger(__name__)

AGENT_NAME: Final = f"fedge/{__version__}"
"""What the agent reports in ``Status.agent``."""

_THERMAL_SENSORS: Final = ("cpu_thermal", "coretemp", "k10temp", "soc_thermal", "acpitz")
"""psutil sensor names tried in order; ``cpu_thermal`` is the Raspberry Pi's SoC sensor."""


@dataclass(frozen=True, slots=True)
class TelemetrySnapshot:
    """One reading of the device's resources."""

    battery: BatteryInfo | None
    """State of charge and charging; None on a host without a battery."""
    load1: float
    """One-minute load average."""
    cores: int
    """Number of CPU cores."""
    temp_c: float | None
    """SoC temperature in °C; None when the host has no readable sensor."""
    available_mb: float
    """Memory available to a new process, in MB (MiB)."""
    net_kind: NetKind
    """Kind of the link that carries the default route."""
    metered: bool
    """True on a link that costs per byte (from config or the simulation profile)."""


class TelemetryProvider(Protocol):
    """Where the agent reads its telemetry (the host, or a simulated device)."""

    def sample(self, now: float) -> TelemetrySnapshot:
        """Return the current reading; ``now`` is Unix time (simulations use it)."""
        ...

    def set_training(self, active: bool, now: float) -> None:
        """Tell the provider that local training started (True) or ended (False)."""
        ...

    @property
    def speed_factor(self) -> float:
        """Relative CPU speed: 1.0 is the host as it is, 0.25 trains four times slower."""
        ...

    @property
    def min_batch_s(self) -> float:
        """Shortest time one training batch takes (a simulated device's pace); 0: no floor."""
        ...


# --------------------------------------------------------------------------- host readings


def default_route_interface(proc_root: Path = Path("/proc")) -> str | None:
    """Return the interface of the IPv4 default route (``/proc/net/route``), or None.

    With several default routes the one with the lowest metric wins, as in the kernel.
    """
    try:
        lines = (proc_root / "net" / "route").read_text().splitlines()
    except OSError:
        return None
    best: tuple[int, str] | None = None
    for line in lines[1:]:
        cols = line.split()
        if len(cols) < 8 or cols[1] != "00000000" or cols[7] != "00000000":
            continue
        try:
            flags, metric = int(cols[3], 16), int(cols[6])
        except ValueError:
            continue
        if not flags & 0x1:  # RTF_UP
            continue
        if best is None or metric < best[0]:
            best = (metric, cols[0])
    return None if best is None else best[1]


def net_kind_of(interface: str | None, sys_root: Path = Path("/sys")) -> NetKind:
    """Classify an interface: ``wifi`` (has ``wireless``/``phy80211`` or is ``wl*``),
    ``cellular`` (``wwan*``, ``ppp*``, ``rmnet*``, ``usb*``/``wwp*`` modems), ``ethernet``
    (``eth*``, ``en*``), else ``unknown``."""
    if not interface:
        return NetKind.UNKNOWN
    dev = sys_root / "class" / "net" / interface
    if (dev / "wireless").exists() or (dev / "phy80211").exists() or interface.startswith("wl"):
        return NetKind.WIFI
    if interface.startswith(("wwan", "ppp", "rmnet", "wwp", "usb")):
        return NetKind.CELLULAR
    if interface.startswith(("eth", "en")):
        return NetKind.ETHERNET
    return NetKind.UNKNOWN


def _read_temp_c() -> float | None:
    reader = getattr(psutil, "sensors_temperatures", None)
    if reader is None:  # macOS, Windows
        return None
    try:
        sensors: Mapping[str, Sequence[object]] = reader()
    except (OSError, RuntimeError):
        return None
    for name in (*_THERMAL_SENSORS, *sorted(sensors)):
        entries = sensors.get(name)
        if entries:
            current = getattr(entries[0], "current", None)
            if isinstance(current, int | float) and -50.0 < current < 200.0:
                return float(current)
    return None


def _read_battery() -> BatteryInfo | None:
    reader = getattr(psutil, "sensors_battery", None)
    if reader is None:
        return None
    try:
        battery = reader()
    except (OSError, RuntimeError):
        return None
    if battery is None:
        return None
    percent = min(100.0, max(0.0, float(battery.percent)))
    return BatteryInfo(percent, bool(battery.power_plugged))


@dataclass(frozen=True, slots=True)
class TelemetryOverrides:
    """Fixed values laid over a reading (from ``[telemetry]`` in the agent config).

    None leaves the measured value. Use them on a device whose sensors lie, or to try the
    agent's rules on a laptop.
    """

    battery_percent: float | None = None
    """Report this state of charge (0..100) instead of the measured one."""
    charging: bool | None = None
    """Report this charging flag (needs a battery, measured or overridden)."""
    temp_c: float | None = None
    """Report this temperature in °C."""
    net_kind: NetKind | None = None
    """Report this link kind instead of the one of the default route."""

    def apply(self, snap: TelemetrySnapshot) -> TelemetrySnapshot:
        """Return ``snap`` with the overridden fields replaced."""
        battery = snap.battery
        if self.battery_percent is not None or self.charging is not None:
            battery = BatteryInfo(
                self.battery_percent
                if self.battery_percent is not None
                else (battery.percent if battery is not None else 100.0),
                self.charging
                if self.charging is not None
                else (battery.charging if battery is not None else False),
            )
        return replace(
            snap,
            battery=battery,
            temp_c=self.temp_c if self.temp_c is not None else snap.temp_c,
            net_kind=self.net_kind if self.net_kind is not None else snap.net_kind,
        )


@dataclass(slots=True)
class HostTelemetry:
    """Telemetry of the machine the agent runs on (psutil, ``/proc/net/route``, ``/sys``)."""

    metered: bool = False
    """Whether the link is metered (a host cannot tell; it comes from the config)."""
    overrides: TelemetryOverrides = field(default_factory=TelemetryOverrides)
    proc_root: Path = Path("/proc")
    sys_root: Path = Path("/sys")

    def sample(self, now: float) -> TelemetrySnapshot:
        """Read the host now (``now`` is not used: the host is the clock)."""
        try:
            load1 = float(os.getloadavg()[0])
        except OSError:
            load1 = 0.0
        snap = TelemetrySnapshot(
            battery=_read_battery(),
            load1=max(0.0, load1),
            cores=psutil.cpu_count(logical=True) or 1,
            temp_c=_read_temp_c(),
            available_mb=psutil.virtual_memory().available / 2**20,
            net_kind=net_kind_of(default_route_interface(self.proc_root), self.sys_root),
            metered=self.metered,
        )
        return self.overrides.apply(snap)

    def set_training(self, active: bool, now: float) -> None:
        """Nothing to do: the host's sensors see the training themselves."""

    @property
    def speed_factor(self) -> float:
        return 1.0

    @property
    def min_batch_s(self) -> float:
        return 0.0


# --------------------------------------------------------------------------- simulation


@dataclass(frozen=True, slots=True)
class DeviceProfile:
    """How a simulated device behaves (the simulator gives each device one).

    Battery model: the charge (percent) drains at ``drain_idle_pct_per_h`` and, while
    training, ``drain_train_pct_per_h``; during a charging window it rises at
    ``charge_pct_per_h`` instead. Charging windows repeat every ``charge_period_s`` seconds
    from ``epoch`` (e.g. ``((0, 3600),)`` with a 4 h period: one hour on the charger in four).
    """

    battery_percent: float | None = 100.0
    """Initial charge; None simulates a host on mains power (``battery: null``)."""
    drain_idle_pct_per_h: float = 1.0
    drain_train_pct_per_h: float = 30.0
    charge_pct_per_h: float = 60.0
    charging_windows: tuple[tuple[float, float], ...] = ()
    """``(start_s, end_s)`` offsets inside each period during which the device charges."""
    charge_period_s: float = 86_400.0
    always_charging: bool = False
    """On the charger the whole time."""
    epoch: float = 0.0
    """Unix time at which the charging schedule (and the battery model) starts."""
    metered: bool = False
    net_kind: NetKind = NetKind.WIFI
    temp_c: float | None = 45.0
    """Idle temperature; None simulates a host without a sensor."""
    train_heat_c: float = 10.0
    """Added to the temperature while training."""
    speed_factor: float = 1.0
    """Relative speed: 0.25 trains four times slower (the agent sleeps between batches)."""
    batch_time_s: float = 0.0
    """Time one batch takes on this device at speed 1.0 (a pace for simulations, where the
    host is far faster than a Pi); the agent waits until it has passed. 0: no floor."""
    cores: int = 4
    load1: float = 0.1
    available_mb: float = 512.0

    def __post_init__(self) -> None:
        if self.battery_percent is not None and not 0.0 <= self.battery_percent <= 100.0:
            raise ValueError(f"battery_percent must be in 0..100, got {self.battery_percent}")
        if not 0.0 < self.speed_factor <= 1000.0:
            raise ValueError(f"speed_factor must be > 0, got {self.speed_factor}")
        if self.charge_period_s <= 0:
            raise ValueError("charge_period_s must be > 0")
        for start, end in self.charging_windows:
            if not 0 <= start < end <= self.charge_period_s:
                raise ValueError(
                    f"charging window ({start}, {end}) must satisfy "
                    f"0 <= start < end <= charge_period_s={self.charge_period_s}"
                )

    def charging_at(self, now: float) -> bool:
        """True when the schedule has the device on its charger at ``now``."""
        if self.always_charging:
            return True
        offset = (now - self.epoch) % self.charge_period_s
        return any(start <= offset < end for start, end in self.charging_windows)


class SimulatedTelemetry:
    """A :class:`TelemetryProvider` that plays a :class:`DeviceProfile` on the caller's clock.

    Thread-safe: the simulator may change :attr:`profile` or call :meth:`set_battery`
    from another thread while the agent reads.
    """

    def __init__(self, profile: DeviceProfile, now: float | None = None) -> None:
        self.profile = profile
        self._lock = threading.Lock()
        self._battery = profile.battery_percent
        self._last = profile.epoch if now is None else now
        self._training = False

    def set_battery(self, percent: float | None) -> None:
        """Set the state of charge now (None: no battery)."""
        with self._lock:
            self._battery = percent

    def _advance(self, now: float) -> None:
        # Piecewise constant: the interval since the last reading takes the state at its start.
        dt_h = max(0.0, now - self._last) / 3600.0
        start = self._last
        self._last = max(self._last, now)
        if self._battery is None or dt_h == 0.0:
            return
        p = self.profile
        if p.charging_at(start):
            self._battery += p.charge_pct_per_h * dt_h
        else:
            rate = p.drain_train_pct_per_h if self._training else p.drain_idle_pct_per_h
            self._battery -= rate * dt_h
        self._battery = min(100.0, max(0.0, self._battery))

    def sample(self, now: float) -> TelemetrySnapshot:
        with self._lock:
            self._advance(now)
            p = self.profile
            battery = (
                None if self._battery is None else BatteryInfo(self._battery, p.charging_at(now))
            )
            temp = None if p.temp_c is None else p.temp_c + (p.train_heat_c * self._training)
            return TelemetrySnapshot(
                battery=battery,
                load1=p.load1 + (1.0 if self._training else 0.0),
                cores=p.cores,
                temp_c=temp,
                available_mb=p.available_mb,
                net_kind=p.net_kind,
                metered=p.metered,
            )

    def set_training(self, active: bool, now: float) -> None:
        with self._lock:
            self._advance(now)
            self._training = active

    @property
    def speed_factor(self) -> float:
        return self.profile.speed_factor

    @property
    def min_batch_s(self) -> float:
        return self.profile.batch_time_s / self.profile.speed_factor


# --------------------------------------------------------------------------- status


def build_status(
    snap: TelemetrySnapshot,
    *,
    now: float,
    num_examples: int,
    samples_per_s: float | None,
    rtt_ms: float | None,
    caps: Caps,
    state: str | None = None,
    task_id: str | None = None,
    declined: Declined | None = None,
) -> Status:
    """Assemble an online :class:`~edge.wire.Status` from a reading and the agent's figures."""
    return Status(
        online=True,
        ts=now,
        battery=snap.battery,
        cpu=CpuInfo(snap.load1, max(1, snap.cores), snap.temp_c),
        mem=MemInfo(max(0.0, snap.available_mb)),
        net=NetInfo(snap.net_kind, snap.metered, rtt_ms),
        train=TrainInfo(num_examples, samples_per_s),
        caps=caps,
        agent=AGENT_NAME,
        state=state,
        task_id=task_id,
        declined=declined,
    )


# --------------------------------------------------------------------------- process figures


def process_rss_mb(pid: int | None = None) -> float:
    """Resident set size of a process (default: this one), in MiB (for benchmarks)."""
    return float(psutil.Process(pid).memory_info().rss) / 2**20


def process_cpu_seconds(pid: int | None = None) -> float:
    """User + system CPU time a process has used so far, in seconds (for benchmarks)."""
    times = psutil.Process(pid).cpu_times()
    return float(times.user + times.system)
