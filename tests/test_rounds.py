"""The round state machine: every transition, deadlines, update checks, drops and replacement."""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pytest

from server_stub.devices import DeviceView
from server_stub.rounds import (
    RESTORE_DRAIN_S,
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
    TaskAcknowledged,
    TaskStatus,
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


def test_rounds_that_keep_failing_are_spaced_out_until_one_succeeds() -> None:
    m = machine()  # deadline_s = 10
    pool = views("a", "b")

    def fail_round(now: float) -> None:
        sent = tasks(m.handle(Tick(now, pool)))
        assert sent, f"no round started at {now}"
        for s in sent:
            m.handle(DeviceUnavailable(s.task.cid, "declined:model_unavailable", now, True,
                                       s.task.task_id))  # fmt: skip
        assert isinstance(m.handle(Tick(now, pool))[-1], AbandonRound)

    fail_round(0.0)
    assert m.handle(Tick(0.5, pool)) == []  # 1 s after the first failure
    fail_round(1.0)
    assert m.handle(Tick(2.9, pool)) == []  # then 2 s
    fail_round(3.0)
    gaps = []
    for _ in range(4):
        start = m._not_before
        fail_round(start)
        gaps.append(m._not_before - start)
    assert gaps == [8.0, 10.0, 10.0, 10.0]  # doubling, at most deadline_s
    # A round that makes a model ends the pauses.
    now = m._not_before
    for s in tasks(m.handle(Tick(now, pool))):
        fold(m, s, now=now)
    m.handle(AggregationDone(1, now))
    assert tasks(m.handle(Tick(now, pool)))


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


# ------------------------------------------------------------------ lost tasks (TaskStatus)


def acked(m: RoundMachine, send: SendTask, now: float = 0.5) -> None:
    t = send.task
    assert m.handle(TaskStatus(t.cid, t.task_id, now)) == [TaskAcknowledged(t.cid, t.task_id)]


@pytest.mark.parametrize(
    ("acknowledged", "reported", "lost"),
    [
        (False, None, False),  # a heartbeat from before the task arrived proves nothing
        (False, "older-task", False),
        (True, None, True),  # restarted agent: idle, no task
        (True, "other-task", True),  # it holds another task, not ours
        (True, "own", False),  # still working on it (a heartbeat)
    ],
)
def test_status_after_acknowledgement_decides_lost_task(
    acknowledged: bool, reported: str | None, lost: bool
) -> None:
    m = machine()
    sent = started(m, views("a", "b"))
    t = sent["a"].task
    if acknowledged:
        acked(m, sent["a"])
    out = m.handle(TaskStatus("a", t.task_id if reported == "own" else reported, 1.0))
    if lost:
        assert out == [DropDevice("a", t.task_id, "lost_task")]
        assert (m.stats.dropped, m.stats.lost, m.stats.declined) == (1, 1, 0)
        assert "a" not in m.outstanding
    else:
        assert out == []
        assert m.outstanding["a"] == t.task_id and m.stats.dropped == 0


def test_acknowledgement_is_reported_once() -> None:
    m = machine()
    sent = started(m, views("a", "b"))
    acked(m, sent["a"])
    assert m.handle(TaskStatus("a", sent["a"].task.task_id, 0.6)) == []
    assert m.snapshot()["acknowledged"] == [sent["a"].task.task_id]


def test_lost_task_device_is_asked_again_with_a_fresh_task_and_old_update_is_late() -> None:
    m = machine()
    sent = started(m, views("a", "b"))
    old = sent["a"]
    acked(m, old)
    m.handle(TaskStatus("a", None, 1.0))
    # The device is idle and eligible again: it may be picked as its own replacement.
    again = tasks(m.handle(Tick(1.0, views("a"))))
    assert [s.task.cid for s in again] == ["a"]
    fresh = again[0].task
    assert fresh.task_id != old.task.task_id
    assert (fresh.round_no, fresh.model_version) == (old.task.round_no, old.task.model_version)
    assert m.stats.replaced == 1 and m.stats.selected == 3
    # A pre-acknowledgement status of the fresh task is not a loss; the old update is late.
    assert m.handle(TaskStatus("a", None, 1.1)) == []
    assert receive(m, old)[0] == RejectUpdate("a", old.task.task_id, "late")
    fold(m, again[0])
    assert fold(m, sent["b"]) == [Aggregate(1, "target")]
    assert m.stats.participants == 2


def test_lost_task_ignored_outside_collecting_and_without_outstanding_task() -> None:
    m = machine()
    assert m.handle(TaskStatus("a", None, 0.0)) == []  # idle machine
    sent = started(m, views("a", "b"))
    assert m.handle(TaskStatus("zz", None, 0.5)) == []  # not selected
    for s in sent.values():
        acked(m, s)
        fold(m, s)
    assert m.state is RoundState.AGGREGATING
    assert m.handle(TaskStatus("a", None, 2.0)) == []


def test_lost_task_with_no_replacement_closes_exhausted() -> None:
    m = machine()
    sent = started(m, views("a", "b"))
    fold(m, sent["b"])
    acked(m, sent["a"])
    m.handle(TaskStatus("a", None, 9.0))  # too late to replace
    assert m.handle(Tick(9.0, views("a"))) == [Aggregate(1, "exhausted")]


def test_async_lost_task_is_refilled() -> None:
    m = machine(mode="async", concurrency=2)
    first, second = tasks(m.handle(Tick(0.0, views("a", "b"))))
    acked(m, first)
    assert m.handle(TaskStatus(first.task.cid, None, 1.0)) == [
        DropDevice(first.task.cid, first.task.task_id, "lost_task")
    ]
    assert first.task.task_id not in m.acknowledged
    refill = tasks(m.handle(Tick(1.0, views("a", "b"))))
    assert [s.task.cid for s in refill] == [first.task.cid]
    assert second.task.cid in m.outstanding


# ------------------------------------------------------------------ restart: tasks lost with it


def test_restore_keeps_acknowledgements_and_reissues_lost_folded_update() -> None:
    m = machine()
    sent = started(m, views("a", "b"))
    for s in sent.values():
        acked(m, s)
    fold(m, sent["a"])  # folded, then the coordinator dies before the checkpoint
    snap = m.snapshot()
    m2 = RoundMachine(
        RoundSettings(clients_per_round=2, over_selection=1.0, deadline_s=10.0),
        RandomSelector(),
        np.random.default_rng(1),
        accepted_task_ids=(),
    )
    assert m2.restore(snap) == [StartRound(1, 0, 10.0)]
    assert m2.acknowledged == {sent["a"].task.task_id, sent["b"].task.task_id}
    # "a" sent its update to the dead process and is idle now: its task is lost.
    assert m2.handle(TaskStatus("a", None, 2.0)) == [
        DropDevice("a", sent["a"].task.task_id, "lost_task")
    ]
    again = tasks(m2.handle(Tick(2.0, views("a", "b"))))
    assert [s.task.cid for s in again] == ["a"]
    assert again[0].task.task_id not in {s.task.task_id for s in sent.values()}
    assert again[0].task.round_no == 1 and again[0].task.model_version == 0
    # A redelivery of the old update cannot be counted as well: it is late now.
    assert receive(m2, sent["a"])[0] == RejectUpdate("a", sent["a"].task.task_id, "late")
    fold(m2, again[0])
    assert fold(m2, sent["b"]) == [Aggregate(1, "target")]
    assert m2.stats.participants == 2


def test_restore_counts_kept_updates_as_folded() -> None:
    m = machine()
    sent = started(m, views("a", "b"))
    for s in sent.values():
        acked(m, s)
    fold(m, sent["a"])  # folded and kept by the coordinator's store
    snap = m.snapshot()
    m2 = machine()
    kept = {sent["a"].task.task_id: 0.5}
    assert m2.restore(snap, kept) == [StartRound(1, 0, 10.0)]
    assert m2.stats.participants == 1 and m2.stats.losses == [0.5]
    assert m2.outstanding == {"b": sent["b"].task.task_id}
    # "a" is idle after its upload: its task is not lost, and a redelivery is a duplicate.
    assert m2.handle(TaskStatus("a", None, 2.0)) == []
    assert receive(m2, sent["a"])[0] == RejectUpdate("a", sent["a"].task.task_id, "duplicate")
    assert tasks(m2.handle(Tick(2.0, views("a", "b")))) == []  # nobody asked again
    assert fold(m2, sent["b"]) == [Aggregate(1, "target")]
    assert m2.stats.participants == 2


def test_restore_after_the_deadline_counts_updates_sent_in_time() -> None:
    # The coordinator was down across the deadline (10.0); the broker queued b's update.
    m = machine()
    sent = started(m, views("a", "b"))
    fold(m, sent["a"])
    snap = m.snapshot()
    m2 = machine()
    now = 25.0
    assert m2.restore(snap, {sent["a"].task.task_id: None}, now=now) == [
        StartRound(1, 0, now + RESTORE_DRAIN_S)
    ]
    assert fold(m2, sent["b"], now=now + 1.0) == [Aggregate(1, "target")]  # not "late"
    # A restart well before the deadline keeps it.
    long = machine(deadline_s=30.0)
    started(long, views("a", "b"))
    assert machine(deadline_s=30.0).restore(long.snapshot(), now=1.0) == [StartRound(1, 0, 30.0)]
    # After the drain window the round closes at its (new) deadline as usual.
    m4 = machine()
    m4.restore(snap, {sent["a"].task.task_id: None}, now=now)
    out = m4.handle(Tick(now + RESTORE_DRAIN_S, views("a", "b")))
    assert Aggregate(1, "deadline") in out


def test_async_restore_keeps_live_tasks_and_the_buffer() -> None:
    # Prepare: three tasks out; a's update is in the buffer (kept), b's was counted in a
    # checkpointed version, c is still training.
    m = machine(mode="async", concurrency=3, max_staleness=5)
    sent = {s.task.cid: s for s in tasks(m.handle(Tick(0.0, views("a", "b", "c"))))}
    snap = m.snapshot()
    m2 = RoundMachine(
        RoundSettings(
            clients_per_round=2, over_selection=1.0, deadline_s=10.0, mode="async",
            concurrency=3, max_staleness=5,
        ),
        RandomSelector(),
        np.random.default_rng(1),
        accepted_task_ids=(sent["b"].task.task_id,),
    )  # fmt: skip
    # Execute: "z" was folded before the snapshot was taken (it left the live tasks then)
    out = m2.restore(snap, {sent["a"].task.task_id: 0.3, "r1-z": 0.5}, now=2.0)
    # Assert
    assert out == [StartRound(1, 0, math.inf)]
    assert m2.outstanding == {"c": sent["c"].task.task_id}
    assert m2.stats.participants == 2 and m2.stats.losses == [0.3, 0.5]
    assert receive(m2, sent["a"], now=3.0)[0] == RejectUpdate(
        "a", sent["a"].task.task_id, "duplicate"
    )
    assert receive(m2, sent["b"], now=3.0)[0] == RejectUpdate(
        "b", sent["b"].task.task_id, "replayed"
    )
    assert fold(m2, sent["c"], now=3.0) == []  # c's update still counts after the restart
    assert m2.buffer_full() == [Aggregate(1, "buffer")]
    assert m2.state is RoundState.AGGREGATING
    with pytest.raises(RoundProtocolError, match="buffer_full"):
        machine().buffer_full()


def test_restore_with_every_update_kept_aggregates_at_once() -> None:
    m = machine()
    sent = started(m, views("a", "b"))
    snap = m.snapshot()  # the crash came after the last fold, before the checkpoint
    m2 = machine()
    kept: dict[str, float | None] = {s.task.task_id: None for s in sent.values()}
    assert m2.restore(snap, kept) == [StartRound(1, 0, 10.0), Aggregate(1, "target")]
    assert m2.state is RoundState.AGGREGATING and m2.stats.losses == []


def test_restore_ignores_kept_updates_of_other_or_counted_tasks() -> None:
    m = machine()
    sent = started(m, views("a", "b"))
    snap = m.snapshot()
    m2 = RoundMachine(
        RoundSettings(clients_per_round=2, over_selection=1.0, deadline_s=10.0),
        RandomSelector(),
        np.random.default_rng(1),
        accepted_task_ids=(sent["a"].task.task_id,),
    )
    kept = {sent["a"].task.task_id: 1.0, "r1-unknown": 1.0}
    assert m2.restore(snap, kept) == [StartRound(1, 0, 10.0)]
    assert m2.stats.participants == 0


def test_restore_of_a_snapshot_without_acknowledgements_waits() -> None:
    m = machine()
    sent = started(m, views("a", "b"))
    snap = m.snapshot()
    del snap["acknowledged"]  # written by an older version
    m2 = machine()
    m2.restore(snap)
    assert m2.handle(TaskStatus("a", None, 1.0)) == []
    assert m2.outstanding == {c: s.task.task_id for c, s in sent.items()}


# ------------------------------------------------------------------ bad envelope on own topic


@pytest.mark.parametrize(
    ("fail_flag", "reason", "cid", "dropped"),
    [
        (True, "bad_signature", "a", True),
        (True, "bad_envelope", "a", True),
        (True, "wrong_cid", "a", True),
        (True, "bad_chunk", "a", False),  # one bad chunk does not end a transfer
        (True, "bad_signature", "zz", False),  # no task outstanding for that topic
        (False, "bad_signature", "a", False),  # signatures not required: not attributable
    ],
)
def test_bad_envelope_on_own_topic_fails_task_when_attributable(
    fail_flag: bool, reason: str, cid: str, dropped: bool
) -> None:
    m = RoundMachine(
        RoundSettings(clients_per_round=2, over_selection=1.0, deadline_s=10.0),
        RandomSelector(),
        np.random.default_rng(0),
        fail_task_on_bad_envelope=fail_flag,
    )
    sent = started(m, views("a", "b"))
    out = m.handle(UpdateInvalid(reason, cid=cid))
    assert m.stats.rejected[reason] == 1
    if dropped:
        assert out == [DropDevice("a", sent["a"].task.task_id, f"invalid_update:{reason}")]
        assert "a" not in m.outstanding and m.stats.dropped == 1
        # Unlike a lost task, the sender is not asked again in this round.
        assert [s.task.cid for s in tasks(m.handle(Tick(1.0, views("a", "c"))))] == ["c"]
    else:
        assert out == [] and "a" in m.outstanding and m.stats.dropped == 0


def test_bad_envelope_between_rounds_is_only_counted() -> None:
    m = RoundMachine(
        RoundSettings(clients_per_round=2, over_selection=1.0, deadline_s=10.0),
        RandomSelector(),
        np.random.default_rng(0),
        fail_task_on_bad_envelope=True,
    )
    assert m.handle(UpdateInvalid("bad_signature", cid="a")) == []


def test_a_task_id_is_never_issued_twice() -> None:
    class Stuck(np.random.Generator):
        """Draws the same token twice, then carries on."""

        def __init__(self) -> None:
            super().__init__(np.random.PCG64(0))
            self.calls = 0

        def integers(self, *args: object, **kw: object) -> object:  # type: ignore[override]
            self.calls += 1
            return 7 if self.calls <= 4 else super().integers(*args, **kw)  # type: ignore[arg-type]

    m = RoundMachine(
        RoundSettings(clients_per_round=2, over_selection=1.0, deadline_s=10.0),
        RandomSelector(),
        Stuck(),
    )
    sent = [c for c in m.handle(Tick(0.0, views("a", "b"))) if isinstance(c, SendTask)]
    ids = [s.task.task_id for s in sent]
    assert len(ids) == 2 and len(set(ids)) == 2
