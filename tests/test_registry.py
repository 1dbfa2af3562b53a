"""The device registry: statuses, Last Will, staleness, bookkeeping, status changes."""

from __future__ import annotations

import pytest

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
from server_stub.devices import EligibilityRules, Ineligible
from server_stub.registry import Registry


def status(
    *,
    battery: float | None = 80.0,
    charging: bool = False,
    metered: bool = False,
    declined: Declined | None = None,
    sps: float | None = 100.0,
) -> Status:
    return Status(
        online=True,
        ts=1.0,
        battery=None if battery is None else BatteryInfo(battery, charging),
        cpu=CpuInfo(0.5, 4, 50.0),
        mem=MemInfo(300.0),
        net=NetInfo(NetKind.WIFI, metered, 12.0),
        train=TrainInfo(120, sps),
        caps=Caps(("numpy",), ("block_i8",), 0),
        agent="fedge/0.1",
        state="idle",
        declined=declined,
    )


def registry() -> Registry:
    return Registry(EligibilityRules(min_battery_percent=20.0, heartbeat_timeout_s=90.0))


def test_status_fills_the_view() -> None:
    reg = registry()
    change = reg.observe("pi-1", status(), now=5.0)
    view = reg.get("pi-1")
    assert change.online and change.ineligible is None
    assert view is not None
    assert (view.battery_percent, view.num_examples, view.samples_per_s, view.rtt_ms) == (
        80.0,
        120,
        100.0,
        12.0,
    )
    assert view.caps.codecs == frozenset({"block_i8"})


def test_no_battery_is_none_not_made_up() -> None:
    reg = registry()
    reg.observe("pi-1", status(battery=None), now=0.0)
    view = reg.get("pi-1")
    assert view is not None and view.battery_percent is None
    assert [v.cid for v in reg.eligible(1.0)] == ["pi-1"]


def test_last_will_marks_offline_and_keeps_telemetry() -> None:
    reg = registry()
    reg.observe("pi-1", status(), now=0.0)
    change = reg.observe("pi-1", Status.offline_will(), now=1.0)
    view = reg.get("pi-1")
    assert not change.online
    assert view is not None and not view.online and view.num_examples == 120
    assert reg.eligible(1.0) == [] and reg.online(1.0) == []


def test_stale_device_counts_as_offline() -> None:
    reg = registry()
    reg.observe("pi-1", status(), now=0.0)
    assert reg.is_online("pi-1", 90.0)
    assert not reg.is_online("pi-1", 90.1)
    assert reg.ineligible_reasons(91.0) == {"pi-1": Ineligible.STALE_HEARTBEAT}


def test_low_battery_and_metered_are_reported_as_ineligible() -> None:
    reg = registry()
    assert reg.observe("a", status(battery=5.0), 0.0).ineligible is Ineligible.LOW_BATTERY
    assert reg.observe("b", status(battery=5.0, charging=True), 0.0).ineligible is None
    assert reg.observe("c", status(metered=True), 0.0).ineligible is Ineligible.METERED


def test_decline_reported_once() -> None:
    reg = registry()
    first = reg.observe("a", status(declined=Declined("t1", "battery_low")), 0.0)
    again = reg.observe("a", status(declined=Declined("t1", "battery_low")), 30.0)
    assert (first.declined_task, first.decline_reason) == ("t1", "battery_low")
    assert again.declined_task is None


def test_busy_and_history() -> None:
    reg = registry()
    reg.observe("a", status(), 0.0)
    reg.record_selected("a", 3)
    assert reg.eligible(1.0) == []
    reg.record_success("a", loss=0.7)
    reg.record_selected("a", 4)
    reg.record_decline("a")
    reg.record_selected("a", 5)
    reg.record_failure("a")
    rec = reg.record("a")
    assert rec is not None
    assert (rec.successes, rec.declines, rec.failures) == (1, 1, 1)
    assert rec.view.participation_count == 3 and rec.view.last_selected_round == 5
    assert rec.view.recent_loss == 0.7 and not rec.view.busy


def test_speed_is_kept_when_a_status_has_none() -> None:
    reg = registry()
    reg.observe("a", status(sps=250.0), 0.0)
    reg.observe("a", status(sps=None), 1.0)
    view = reg.get("a")
    assert view is not None and view.samples_per_s == 250.0


def test_forget_removes_device() -> None:
    reg = registry()
    reg.observe("a", status(), 0.0)
    reg.forget("a")
    assert "a" not in reg and len(reg) == 0


def test_repeated_refusals_hold_a_device_back_with_a_growing_cool_down() -> None:
    reg = registry()
    reg.observe("a", status(), 0.0)
    reg.observe("b", status(), 0.0)

    def refuse(now: float) -> float:
        reg.record_selected("a", 1)
        return reg.record_refusal("a", now, base_s=10.0, max_s=25.0)

    assert refuse(1.0) == 0.0  # one refusal may be a fluke
    assert [v.cid for v in reg.eligible(1.0)] == ["a", "b"]
    assert refuse(2.0) == 10.0
    assert [v.cid for v in reg.eligible(2.0)] == ["b"]
    assert reg.cooling_down(2.0) == {"a": 12.0}
    assert [v.cid for v in reg.eligible(12.0)] == ["a", "b"]  # the cool-down is over
    assert (refuse(12.0), refuse(12.0)) == (20.0, 25.0)  # doubles, up to max_s
    rec = reg.record("a")
    assert rec is not None and (rec.refusals, rec.failures) == (4, 4)


@pytest.mark.parametrize("how", ["success", "restart"])
def test_an_accepted_update_or_a_restart_ends_the_cool_down(how: str) -> None:
    reg = registry()
    reg.observe("a", status(), 0.0)
    reg.record_refusal("a", 1.0, base_s=10.0, max_s=100.0)
    assert reg.record_refusal("a", 2.0, base_s=10.0, max_s=100.0) == 10.0
    if how == "success":
        reg.record_success("a")
    else:  # the agent went offline (Last Will) and came back, e.g. after a fix
        reg.observe("a", Status.offline_will(), 3.0)
        reg.observe("a", status(), 4.0)
    assert [v.cid for v in reg.eligible(5.0)] == ["a"] and reg.cooling_down(5.0) == {}
    # and the count starts again: the next refusal alone does not hold it back
    assert reg.record_refusal("a", 6.0, base_s=10.0, max_s=100.0) == 0.0


def test_a_heartbeat_does_not_end_the_cool_down() -> None:
    reg = registry()
    reg.observe("a", status(), 0.0)
    reg.record_refusal("a", 1.0, base_s=10.0, max_s=100.0)
    reg.record_refusal("a", 2.0, base_s=10.0, max_s=100.0)
    reg.observe("a", status(), 3.0)  # still online: only a status
    assert reg.eligible(3.0) == []
