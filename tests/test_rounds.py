"""The round state machine: every transition, deadlines, update checks, drops and replacement."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

from server_stub.devices import DeviceView
from server_stub.rounds import (
    AbandonRound,
    Aggregate,
    AggregationDone,
    AggregationFailed,
    Command,
    DeviceUnavailable,
    DropDevice,
    FoldUpdate,
    RejectUpdate,
    RoundMachine,
    RoundProtocolError,
    RoundSettings,
    RoundState,
    SendTask,
    StartRound,
    Tick,
    UpdateFolded,
    UpdateInvalid,
    UpdateReceived,
    WaitForDevices,
)
from server_stub.selection import RandomSelector


def views(*cids: str, sps: float | None = None) -> tuple[DeviceView, ...]:
    return tuple(DeviceView(cid, last_seen=0.0, samples_per_s=sps) for cid in cids)


def machine(**kw: Any) -> RoundMachine:
    args: dict[str, Any] = {
        "clients_per_round": 2,
        "over_selection": 1.0,
        "deadline_s": 10.0,
        "min_fraction": 0.5,
        **kw,
    }
    settings = RoundSettings(**args)
    return RoundMachine(settings, RandomSelector(), np.random.default_rng(0))


def tasks(commands: list[Command]) -> list[SendTask]:
    return [c for c in commands if isinstance(c, SendTask)]


def started(
    m: RoundMachine, pool: tuple[DeviceView, ...] = views("a", "b", "c")
) -> dict[str, SendTask]:
    out = m.handle(Tick(0.0, pool))
    return {t.task.cid: t for t in tasks(out)}


def fold(m: RoundMachine, send: SendTask, now: float = 1.0, ready: bool = False) -> list[Command]:
    t = send.task
    out = m.handle(UpdateReceived(t.cid, t.task_id, t.round_no, t.model_version, t.nonce, now))
    assert isinstance(out[0], FoldUpdate)
    return m.handle(UpdateFolded(t.task_id, ready=ready))


def receive(m: RoundMachine, send: SendTask, now: float = 1.0, **over: Any) -> list[Command]:
    t = send.task
    fields = {
        "cid": t.cid,
        "task_id": t.task_id,
        "round_no": t.round_no,
        "model_version": t.model_version,
        "nonce": t.nonce,
        "now": now,
        **over,
    }
    return m.handle(UpdateReceived(**fields))


def test_idle_tick_without_enough_devices_waits() -> None:
    m = machine()
    out = m.handle(Tick(0.0, views("a")))
    assert out == [WaitForDevices(1, 1, 2)]
    assert m.state is RoundState.IDLE


def test_idle_tick_starts_round_and_sends_tasks() -> None:
    m = machine()
    out = m.handle(Tick(0.0, views("a", "b", "c")))
    assert isinstance(out[0], StartRound) and out[0].deadline == 10.0
    assert len(tasks(out)) == 2
    assert m.state is RoundState.COLLECTING


def test_over_selection_asks_more_devices() -> None:
    m = machine(clients_per_round=2, over_selection=1.5)
    assert len(tasks(m.handle(Tick(0.0, views("a", "b", "c", "d"))))) == 3


def test_target_reached_aggregates_and_done_goes_idle() -> None:
    m = machine()
    sent = started(m)
    assert fold(m, next(iter(sent.values()))) == []
    out = fold(m, list(sent.values())[1])
    assert out == [Aggregate(1, "target")]
    assert m.state is RoundState.AGGREGATING
    assert m.handle(AggregationDone(1, 2.0)) == []
    assert (m.state, m.round_no, m.model_version) == (RoundState.IDLE, 2, 1)


def test_deadline_with_quorum_aggregates() -> None:
    m = machine()
    sent = list(started(m).values())
    fold(m, sent[0])
    out = m.handle(Tick(10.0, ()))
    assert isinstance(out[0], DropDevice) and out[0].timed_out
    assert out[-1] == Aggregate(1, "deadline")


def test_deadline_without_quorum_abandons_and_keeps_model() -> None:
    m = machine(min_fraction=1.0)
    sent = list(started(m).values())
    fold(m, sent[0])
    out = m.handle(Tick(10.0, ()))
    assert isinstance(out[-1], AbandonRound)
    assert (m.state, m.round_no, m.model_version) == (RoundState.IDLE, 2, 0)


def test_aggregation_failed_returns_to_idle() -> None:
    m = machine()
    for s in list(started(m).values()):
        fold(m, s)
    assert m.handle(AggregationFailed("kept", 2.0)) == []
    assert (m.state, m.model_version) == (RoundState.IDLE, 0)


@pytest.mark.parametrize(
    ("over", "reason"),
    [
        ({"task_id": "nope"}, "unknown_task"),
        ({"cid": "c"}, "wrong_cid"),
        ({"nonce": "forged"}, "replayed"),
        ({"model_version": 7}, "wrong_model_version"),
        ({"now": 11.0}, "late"),
    ],
)
def test_update_checks(over: dict[str, Any], reason: str) -> None:
    m = machine()
    send = next(iter(started(m).values()))
    out = receive(m, send, **over)
    assert out == [
        RejectUpdate(
            str(over.get("cid", send.task.cid)), str(over.get("task_id", send.task.task_id)), reason
        )
    ]
    assert m.stats.rejected[reason] == 1


def test_duplicate_update_is_rejected() -> None:
    m = machine(clients_per_round=2)
    send = next(iter(started(m).values()))
    fold(m, send)
    assert receive(m, send)[0] == RejectUpdate(send.task.cid, send.task.task_id, "duplicate")


def test_update_after_round_closed_is_late_and_next_round_replay_is_rejected() -> None:
    m = machine(over_selection=1.5)
    sent = list(started(m).values())
    fold(m, sent[0])
    fold(m, sent[1])
    assert receive(m, sent[2])[0].reason == "late"  # type: ignore[union-attr]
    assert receive(m, sent[0])[0].reason == "duplicate"  # type: ignore[union-attr]
    m.handle(AggregationDone(1, 2.0))
    assert receive(m, sent[0])[0].reason == "replayed"  # type: ignore[union-attr]
    out = m.handle(Tick(3.0, views("a", "b")))
    assert len(tasks(out)) == 2


def test_update_of_unfinished_task_from_closed_round_is_late() -> None:
    m = machine(min_fraction=1.0)
    sent = list(started(m).values())
    m.handle(Tick(10.0, ()))
    assert receive(m, sent[0], now=10.5)[0].reason == "late"  # type: ignore[union-attr]


def test_invalid_content_counts_and_drops_device() -> None:
    m = machine()
    send = next(iter(started(m).values()))
    t = send.task
    assert isinstance(receive(m, send)[0], FoldUpdate)
    out = m.handle(UpdateInvalid("non_finite", t.cid, t.task_id))
    assert isinstance(out[0], DropDevice)
    assert m.stats.rejected["non_finite"] == 1
    assert t.cid not in m.outstanding


def test_unanswered_fold_is_a_protocol_error() -> None:
    m = machine()
    send = next(iter(started(m).values()))
    receive(m, send)
    with pytest.raises(RoundProtocolError, match="unanswered"):
        m.handle(Tick(1.0, ()))


@pytest.mark.parametrize(
    ("state_setup", "event"),
    [
        ("idle", UpdateFolded("x")),
        ("idle", AggregationDone(1, 0.0)),
        ("collecting", AggregationDone(1, 0.0)),
        ("aggregating", Tick(0.0, ())),
    ],
)
def test_illegal_events_raise(state_setup: str, event: object) -> None:
    m = machine()
    if state_setup != "idle":
        sent = list(started(m).values())
        if state_setup == "aggregating":
            fold(m, sent[0])
            fold(m, sent[1])
    with pytest.raises(RoundProtocolError, match=f"{type(event).__name__} in state"):
        m.handle(event)  # type: ignore[arg-type]


def test_version_must_advance() -> None:
    m = machine()
    for s in list(started(m).values()):
        fold(m, s)
    with pytest.raises(RoundProtocolError, match="does not advance"):
        m.handle(AggregationDone(0, 1.0))


@pytest.mark.parametrize(
    ("reason", "declined"),
    [("offline", False), ("low_battery", False), ("metered", False), ("declined:busy", True)],
)
def test_ineligible_device_dropped_and_replaced(reason: str, declined: bool) -> None:
    m = machine()
    sent = started(m, views("a", "b"))
    victim = next(iter(sent))
    out = m.handle(
        DeviceUnavailable(victim, reason, 1.0, declined=declined, task_id=sent[victim].task.task_id)
    )
    assert out == [DropDevice(victim, sent[victim].task.task_id, reason, declined=declined)]
    assert (m.stats.dropped, m.stats.declined) == (1, int(declined))
    replacement = tasks(m.handle(Tick(1.5, views("c"))))
    assert [t.task.cid for t in replacement] == ["c"]
    assert m.stats.replaced == 1


def test_no_replacement_when_too_little_time_left() -> None:
    m = machine()
    sent = started(m, views("a", "b"))
    victim = next(iter(sent))
    m.handle(DeviceUnavailable(victim, "offline", 9.0))
    assert tasks(m.handle(Tick(9.0, views("c")))) == []


def test_everyone_dropped_closes_at_once_without_waiting_for_deadline() -> None:
    m = machine()
    sent = list(started(m, views("a", "b")).values())
    fold(m, sent[0])
    m.handle(DeviceUnavailable(sent[1].task.cid, "offline", 2.0))
    out = m.handle(Tick(2.0, ()))
    assert out == [Aggregate(1, "exhausted")]


def test_everyone_dropped_before_quorum_abandons_at_once() -> None:
    m = machine()
    for s in started(m, views("a", "b")).values():
        m.handle(DeviceUnavailable(s.task.cid, "offline", 1.0))
    out = m.handle(Tick(1.0, ()))
    assert isinstance(out[0], AbandonRound)


def test_decline_of_another_task_is_ignored() -> None:
    m = machine()
    sent = started(m, views("a", "b"))
    assert (
        m.handle(DeviceUnavailable("a", "declined:busy", 1.0, declined=True, task_id="old")) == []
    )
    assert "a" in m.outstanding and sent


def test_max_steps_sized_to_deadline() -> None:
    m = machine(size_to_deadline=True, batch_size=10, work_fraction=0.5)
    out = tasks(m.handle(Tick(0.0, views("a", "b", sps=100.0))))
    assert {t.task.max_steps for t in out} == {50}  # 100/s × 10 s × 0.5 / 10


def test_snapshot_restore_reopens_round() -> None:
    m = machine()
    sent = started(m)
    fold(m, next(iter(sent.values())))
    snap = m.snapshot()
    m2 = machine()
    out = m2.restore(snap)
    assert out == [StartRound(1, 0, 10.0)]
    assert set(m2.outstanding) == set(sent)  # the folded update was lost: may come again


def test_async_keeps_concurrency_and_aggregates_on_ready() -> None:
    m = machine(mode="async", concurrency=2, max_staleness=1)
    out = m.handle(Tick(0.0, views("a", "b", "c")))
    assert isinstance(out[0], StartRound) and len(tasks(out)) == 2
    first, second = tasks(out)
    assert fold(m, first) == []
    refill = tasks(m.handle(Tick(1.0, views("a", "b", "c"))))
    assert len(refill) == 1
    assert fold(m, second, ready=True) == [Aggregate(1, "buffer")]
    m.handle(AggregationDone(1, 2.0))
    assert m.state is RoundState.COLLECTING and m.round_no == 2
    # refill was issued on version 0; now version 1: staleness 1 is allowed
    t = refill[0].task
    out = m.handle(UpdateReceived(t.cid, t.task_id, t.round_no, t.model_version, t.nonce, 2.0))
    assert out == [FoldUpdate(t.cid, t.task_id, 1)]


def test_async_rejects_too_stale() -> None:
    m = machine(mode="async", concurrency=2, max_staleness=0)
    first, second = tasks(m.handle(Tick(0.0, views("a", "b"))))
    fold(m, first, ready=True)
    m.handle(AggregationDone(1, 1.0))
    t = second.task
    out = m.handle(UpdateReceived(t.cid, t.task_id, t.round_no, t.model_version, t.nonce, 1.0))
    assert out[0] == RejectUpdate(t.cid, t.task_id, "too_stale")
