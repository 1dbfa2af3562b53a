"""Telemetry: host readings with and without a battery, link kind, simulated profiles."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest

from edge import telemetry
from edge.eligibility import DeclineReason, Limits, stop_reason
from edge.telemetry import (
    DeviceProfile,
    HostTelemetry,
    SimulatedTelemetry,
    TelemetryOverrides,
    build_status,
    default_route_interface,
    net_kind_of,
)
from edge.wire import BatteryInfo, Caps, NetKind, Status

ROUTE = """Iface\tDestination\tGateway \tFlags\tRefCnt\tUse\tMetric\tMask\t\tMTU\tWindow\tIRTT
eth0\t000200C0\t00000000\t0001\t0\t0\t0\t00FFFFFF\t0\t0\t0
wwan0\t00000000\t0102A8C0\t0003\t0\t0\t700\t00000000\t0\t0\t0
wlan0\t00000000\t0101A8C0\t0003\t0\t0\t600\t00000000\t0\t0\t0
"""


@pytest.fixture
def fake_psutil(monkeypatch: pytest.MonkeyPatch) -> SimpleNamespace:
    state = SimpleNamespace(battery=None, temps={})
    monkeypatch.setattr(telemetry.psutil, "sensors_battery", lambda: state.battery)
    monkeypatch.setattr(telemetry.psutil, "sensors_temperatures", lambda: state.temps)
    monkeypatch.setattr(telemetry.psutil, "cpu_count", lambda logical=True: 4)
    monkeypatch.setattr(
        telemetry.psutil, "virtual_memory", lambda: SimpleNamespace(available=512 * 2**20)
    )
    monkeypatch.setattr(telemetry.os, "getloadavg", lambda: (0.5, 0.4, 0.3))
    return state


def host(tmp_path: Path, **kw: object) -> HostTelemetry:
    (tmp_path / "net").mkdir(exist_ok=True)
    (tmp_path / "net" / "route").write_text(ROUTE)
    return HostTelemetry(proc_root=tmp_path, sys_root=tmp_path / "sys", **kw)  # type: ignore[arg-type]


def test_host_without_battery_reports_none(fake_psutil: SimpleNamespace, tmp_path: Path) -> None:
    snap = host(tmp_path).sample(0.0)
    assert snap.battery is None and snap.temp_c is None
    assert (snap.cores, snap.load1, snap.available_mb) == (4, 0.5, 512.0)
    status = build_status(
        snap, now=1.0, num_examples=10, samples_per_s=None, rtt_ms=None, caps=Caps()
    )
    assert Status.from_bytes(status.to_bytes()).battery is None
    assert b'"battery":null' in status.to_bytes()


def test_host_with_battery_and_pi_thermal(fake_psutil: SimpleNamespace, tmp_path: Path) -> None:
    fake_psutil.battery = SimpleNamespace(percent=42.5, power_plugged=True, secsleft=-2)
    fake_psutil.temps = {
        "acpitz": [SimpleNamespace(current=30.0)],
        "cpu_thermal": [SimpleNamespace(current=61.2)],
    }
    snap = host(tmp_path).sample(0.0)
    assert snap.battery == BatteryInfo(42.5, True)
    assert snap.temp_c == 61.2


def test_default_route_picks_lowest_metric(tmp_path: Path) -> None:
    (tmp_path / "net").mkdir()
    (tmp_path / "net" / "route").write_text(ROUTE)
    assert default_route_interface(tmp_path) == "wlan0"
    assert default_route_interface(tmp_path / "missing") is None


@pytest.mark.parametrize(
    ("iface", "kind"),
    [("eth0", NetKind.ETHERNET), ("enp3s0", NetKind.ETHERNET), ("wlan0", NetKind.WIFI),
     ("wwan0", NetKind.CELLULAR), ("ppp0", NetKind.CELLULAR), ("tun0", NetKind.UNKNOWN),
     (None, NetKind.UNKNOWN)],
)  # fmt: skip
def test_net_kind_by_name(iface: str | None, kind: NetKind, tmp_path: Path) -> None:
    assert net_kind_of(iface, tmp_path) is kind


def test_net_kind_by_sysfs_wireless(tmp_path: Path) -> None:
    (tmp_path / "class" / "net" / "mlan0" / "wireless").mkdir(parents=True)
    assert net_kind_of("mlan0", tmp_path) is NetKind.WIFI


def test_overrides_replace_readings(fake_psutil: SimpleNamespace, tmp_path: Path) -> None:
    over = TelemetryOverrides(battery_percent=15.0, temp_c=70.0, net_kind=NetKind.CELLULAR)
    snap = host(tmp_path, metered=True, overrides=over).sample(0.0)
    assert snap.battery == BatteryInfo(15.0, False)
    assert (snap.temp_c, snap.net_kind, snap.metered) == (70.0, NetKind.CELLULAR, True)


def test_simulated_battery_drains_while_training_and_charges_on_schedule() -> None:
    profile = DeviceProfile(
        battery_percent=50.0, drain_idle_pct_per_h=0.0, drain_train_pct_per_h=10.0,
        charge_pct_per_h=20.0, charging_windows=((3600.0, 7200.0),), charge_period_s=86400.0,
    )  # fmt: skip
    sim = SimulatedTelemetry(profile, now=0.0)
    sim.set_training(True, 0.0)
    assert sim.sample(1800.0).battery == BatteryInfo(45.0, False)
    sim.set_training(False, 1800.0)
    assert sim.sample(3600.0).battery == BatteryInfo(45.0, True)
    snap = sim.sample(5400.0)
    assert snap.battery == BatteryInfo(55.0, True)


def test_simulated_temperature_rises_while_training() -> None:
    sim = SimulatedTelemetry(DeviceProfile(temp_c=70.0, train_heat_c=15.0), now=0.0)
    sim.set_training(True, 0.0)
    snap = sim.sample(1.0)
    assert snap.temp_c == 85.0
    assert (
        stop_reason(snap, Limits(max_temp_c=80.0), now=1.0, deadline_ts=10.0)
        is DeclineReason.TOO_HOT
    )


def test_simulated_host_without_battery() -> None:
    assert SimulatedTelemetry(DeviceProfile(battery_percent=None)).sample(10.0).battery is None


def test_bad_profile_is_refused() -> None:
    with pytest.raises(ValueError, match="charging window"):
        DeviceProfile(charging_windows=((10.0, 5.0),))
