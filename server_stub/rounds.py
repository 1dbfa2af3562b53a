"""The round state machine: every transition of a federated round lives in this file.

Modelled on h11's ``_state.py``: events go in (:meth:`RoundMachine.handle`), commands come
out as data, and the machine knows nothing about MQTT, SQLite, threads or clocks. The
coordinator executes the commands and feeds the results back as events.

States (``TRANSITIONS`` is the whole table; anything else raises :class:`RoundProtocolError`)::

    IDLE --Tick(enough eligible)--> COLLECTING --target/deadline/exhausted--> AGGREGATING
    COLLECTING --deadline without quorum--> IDLE            (round abandoned, model kept)
    AGGREGATING --AggregationDone/AggregationFailed--> IDLE (sync) or COLLECTING (async)

Rules of a synchronous round (``mode="sync"``):

- Selection never blocks: too few eligible devices → :class:`WaitForDevices`, try again at
  the next :class:`Tick`. ``over_select(K)`` devices are asked. After a round that made no
  model the next waits :data:`RETRY_BASE_S`, doubling with each further failure, up to
  ``deadline_s``.
- The round closes when K updates were folded in, or at the deadline if at least
  ``ceil(min_fraction × K)`` were; otherwise it is abandoned and the model kept. It also
  closes early when nobody is left to wait for and no replacement can be found.
- A selected device that becomes unavailable (:class:`DeviceUnavailable`: offline by its Last
  Will, battery low, metered, explicit decline) is dropped at once and replaced from the
  eligible pool at the next :class:`Tick` while at least ``replace_min_remaining_s`` remain.
- Lost tasks (:class:`TaskStatus`): a device acknowledges its task when one of its statuses
  names it (the agent publishes one as soon as it takes a task). A later status that names no
  task or another one while the task is still outstanding means the device no longer holds
  it (it restarted, or its update went nowhere): the task is dropped as ``lost_task`` and the
  device is replaced like a decline, except that it may itself be asked again (it is idle).
  A status before the acknowledgement proves nothing: it may predate the task. The
  acknowledged task ids are part of the snapshot, so a restarted coordinator detects tasks
  whose updates died with the old process and asks again (:meth:`RoundMachine.restore`);
  updates the coordinator kept count as folded in the reopened round.
- An update rejected before its task is known (``bad_envelope``, ``bad_signature``,
  ``wrong_cid``: :data:`ENVELOPE_REJECTIONS`) fails the outstanding task of the topic's
  device at once only when the machine was built with ``fail_task_on_bad_envelope`` (the
  coordinator sets it when the fleet requires signatures, the production setting with the
  broker ACL, under which only the device itself can publish on its update topic).
- Update checks (:class:`UpdateReceived`), in order: ``unknown_task`` (never issued),
  ``wrong_cid`` (issued to another device), ``replayed`` (task accepted in an earlier round,
  or nonce mismatch), ``duplicate`` (task already accepted this round), ``late`` (the task's
  round is over, its deadline passed, or the device was dropped), ``wrong_model_version``.

Asynchronous mode (``mode="async"``, FedBuff): the machine keeps ``concurrency`` tasks out at
all times; every update of an outstanding task is folded with its staleness (model versions
since the task was issued); when the strategy's buffer is full (:class:`UpdateFolded` with
``ready``) it aggregates; updates staler than ``max_staleness`` are rejected ``too_stale``.
"""

from __future__ import annotations

import dataclasses
import math
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from enum import Enum
from typing import Any, Literal, TypeAlias

import numpy as np

from server_stub.devices import DeviceView
from server_stub.selection import DEFAULT_OVER_SELECTION, Selector, over_select, select_cohort


class RoundProtocolError(RuntimeError):
    """An event that is illegal in the machine's current state (a coordinator bug)."""


class RoundState(Enum):
    """Where the machine is."""

    IDLE = "idle"
    COLLECTING = "collecting"
    AGGREGATING = "aggregating"


# ----------------------------------------------------------------------------------- settings


@dataclass(frozen=True, slots=True)
class RoundSettings:
    """How rounds are run."""

    clients_per_round: int = 10
    """K: updates a synchronous round wants."""
    min_fraction: float = 0.5
    """At the deadline, aggregate if at least ``ceil(min_fraction × K)`` updates arrived."""
    over_selection: float = DEFAULT_OVER_SELECTION
    """Ask ``ceil(K × over_selection)`` devices."""
    min_devices: int | None = None
    """Fewest eligible devices to start a round with; default K."""
    deadline_s: float = 60.0
    """Seconds from the tasks going out to the round's deadline."""
    replace_min_remaining_s: float | None = None
    """Replace dropped devices only while this much time is left; default ``deadline_s / 4``."""
    mode: Literal["sync", "async"] = "sync"
    """``sync`` rounds, or ``async`` (FedBuff) continuous training."""
    concurrency: int = 10
    """Async: tasks kept out at the same time."""
    max_staleness: int = 10
    """Async: updates older than this many model versions are rejected ``too_stale``."""
    size_to_deadline: bool = False
    """Send ``max_steps`` sized from the device's samples/s so it finishes in time."""
    batch_size: int = 32
    """Local batch size (for ``max_steps``)."""
    work_fraction: float = 0.6
    """Share of the deadline a device may spend training when ``size_to_deadline``."""

    def __post_init__(self) -> None:
        if self.clients_per_round < 1:
            raise ValueError(f"clients_per_round must be >= 1, got {self.clients_per_round}")
        if not 0.0 < self.min_fraction <= 1.0:
            raise ValueError(f"min_fraction must be in (0, 1], got {self.min_fraction}")
        if not (math.isfinite(self.deadline_s) and self.deadline_s > 0):
            raise ValueError(f"deadline_s must be > 0, got {self.deadline_s}")
        if self.over_selection < 1.0:
            raise ValueError(f"over_selection must be >= 1, got {self.over_selection}")
        if self.mode not in ("sync", "async"):
            raise ValueError(f"mode must be 'sync' or 'async', got {self.mode!r}")
        if self.concurrency < 1 or self.max_staleness < 0 or self.batch_size < 1:
            raise ValueError("concurrency and batch_size must be >= 1, max_staleness >= 0")
        if not 0.0 < self.work_fraction <= 1.0:
            raise ValueError(f"work_fraction must be in (0, 1], got {self.work_fraction}")

    @property
    def quorum(self) -> int:
        """Updates needed to aggregate at the deadline."""
        return max(1, math.ceil(round(self.min_fraction * self.clients_per_round, 9)))

    @property
    def replace_window_s(self) -> float:
        return (
            self.deadline_s / 4
            if self.replace_min_remaining_s is None
            else self.replace_min_remaining_s
        )


# ----------------------------------------------------------------------------------- events


@dataclass(frozen=True, slots=True)
class Tick:
    """Time passed; ``eligible`` is the registry's eligible pool at ``now``."""

    now: float
    eligible: Sequence[DeviceView] = ()


@dataclass(frozen=True, slots=True)
class UpdateReceived:
    """A well-formed, correctly signed update envelope arrived from ``cid`` (topic cid)."""

    cid: str
    task_id: str
    round_no: int
    model_version: int
    nonce: str | None
    now: float


@dataclass(frozen=True, slots=True)
class UpdateFolded:
    """The update of the pending :class:`FoldUpdate` passed validation and the strategy."""

    task_id: str
    ready: bool = False
    """Async: the strategy's buffer is full; aggregate now."""
    loss: float | None = None


@dataclass(frozen=True, slots=True)
class UpdateInvalid:
    """An update was rejected outside the machine (envelope, content, strategy verdict).

    With the ``task_id`` of the pending :class:`FoldUpdate`, that task counts as failed.
    """

    reason: str
    cid: str | None = None
    task_id: str | None = None


@dataclass(frozen=True, slots=True)
class DeviceUnavailable:
    """A device's status says it will not report: offline, ineligible, or it declined."""

    cid: str
    reason: str
    now: float
    declined: bool = False
    task_id: str | None = None
    """For a decline: the declined task (a decline of another task is ignored)."""


@dataclass(frozen=True, slots=True)
class TaskStatus:
    """An online status of ``cid`` said which task it holds (``task_id``; None: no task).

    The coordinator feeds it for devices with an outstanding task whose status is neither a
    new decline nor unavailable (those are :class:`DeviceUnavailable`).
    """

    cid: str
    task_id: str | None
    now: float


@dataclass(frozen=True, slots=True)
class AggregationDone:
    """The coordinator aggregated, checkpointed and published ``model_version``."""

    model_version: int
    now: float


@dataclass(frozen=True, slots=True)
class AggregationFailed:
    """The strategy kept the old model (too few usable updates)."""

    reason: str
    now: float


Event: TypeAlias = (
    Tick
    | UpdateReceived
    | UpdateFolded
    | UpdateInvalid
    | DeviceUnavailable
    | TaskStatus
    | AggregationDone
    | AggregationFailed
)

LOST_TASK = "lost_task"
"""Drop reason: the device's status shows it no longer holds its acknowledged task."""
ENVELOPE_REJECTIONS: frozenset[str] = frozenset({"bad_envelope", "bad_signature", "wrong_cid"})
"""Rejections of a complete update envelope before its task is known; attributed to the
topic's device they fail its outstanding task (see ``fail_task_on_bad_envelope``)."""


# ----------------------------------------------------------------------------------- commands


@dataclass(frozen=True, slots=True)
class IssuedTask:
    """A task the machine handed out (persisted for the open round)."""

    task_id: str
    cid: str
    nonce: str
    round_no: int
    model_version: int
    issued_at: float
    deadline: float
    max_steps: int | None = None

    def to_json(self) -> dict[str, Any]:
        return {
            "task_id": self.task_id,
            "cid": self.cid,
            "nonce": self.nonce,
            "round_no": self.round_no,
            "model_version": self.model_version,
            "issued_at": self.issued_at,
            "deadline": self.deadline,
            "max_steps": self.max_steps,
        }

    @classmethod
    def from_json(cls, obj: Mapping[str, Any]) -> IssuedTask:
        return cls(
            task_id=str(obj["task_id"]),
            cid=str(obj["cid"]),
            nonce=str(obj["nonce"]),
            round_no=int(obj["round_no"]),
            model_version=int(obj["model_version"]),
            issued_at=float(obj["issued_at"]),
            deadline=float(obj["deadline"]),
            max_steps=None if obj.get("max_steps") is None else int(obj["max_steps"]),
        )


@dataclass(frozen=True, slots=True)
class StartRound:
    """A round begins: the coordinator calls ``strategy.begin_round``."""

    round_no: int
    model_version: int
    deadline: float


@dataclass(frozen=True, slots=True)
class SendTask:
    """Publish a train task."""

    task: IssuedTask


@dataclass(frozen=True, slots=True)
class FoldUpdate:
    """The update's task checks passed: validate its content and fold it into the strategy.

    Answer with :class:`UpdateFolded` or :class:`UpdateInvalid` (same ``task_id``) before
    any other event.
    """

    cid: str
    task_id: str
    staleness: int


@dataclass(frozen=True, slots=True)
class RejectUpdate:
    """The update is refused (counted by reason); nothing touches the model."""

    cid: str
    task_id: str
    reason: str


@dataclass(frozen=True, slots=True)
class DropDevice:
    """``cid`` is out of the round: its task no longer counts (``reason``)."""

    cid: str
    task_id: str
    reason: str
    declined: bool = False
    timed_out: bool = False


@dataclass(frozen=True, slots=True)
class TaskAcknowledged:
    """``cid``'s status named its task ``task_id``: persist the open round's snapshot soon.

    A restarted coordinator needs the acknowledgement to tell a lost task from one whose
    device simply has not received it yet; the coordinator saves the snapshot at the next tick
    and always before it folds an update.
    """

    cid: str
    task_id: str


@dataclass(frozen=True, slots=True)
class Aggregate:
    """Close the round: ``strategy.finish``, evaluate, checkpoint, publish.

    Answer with :class:`AggregationDone` or :class:`AggregationFailed`.
    """

    round_no: int
    reason: str
    """``target``, ``deadline``, ``exhausted`` or ``buffer`` (async)."""


@dataclass(frozen=True, slots=True)
class AbandonRound:
    """Too few updates by the deadline: keep the model; the round is over."""

    round_no: int
    reason: str


@dataclass(frozen=True, slots=True)
class WaitForDevices:
    """Not enough eligible devices to start round ``round_no``; try again at the next tick."""

    round_no: int
    eligible: int
    needed: int


Command: TypeAlias = (
    StartRound
    | SendTask
    | FoldUpdate
    | RejectUpdate
    | DropDevice
    | TaskAcknowledged
    | Aggregate
    | AbandonRound
    | WaitForDevices
)


# ----------------------------------------------------------------------------------- table

TRANSITIONS: dict[RoundState, dict[type[Any], tuple[RoundState, ...]]] = {
    RoundState.IDLE: {
        Tick: (RoundState.IDLE, RoundState.COLLECTING),
        UpdateReceived: (RoundState.IDLE,),
        UpdateInvalid: (RoundState.IDLE,),
        DeviceUnavailable: (RoundState.IDLE,),
        TaskStatus: (RoundState.IDLE,),
    },
    RoundState.COLLECTING: {
        Tick: (RoundState.COLLECTING, RoundState.AGGREGATING, RoundState.IDLE),
        UpdateReceived: (RoundState.COLLECTING,),
        UpdateFolded: (RoundState.COLLECTING, RoundState.AGGREGATING),
        UpdateInvalid: (RoundState.COLLECTING, RoundState.AGGREGATING, RoundState.IDLE),
        DeviceUnavailable: (RoundState.COLLECTING, RoundState.AGGREGATING, RoundState.IDLE),
        TaskStatus: (RoundState.COLLECTING,),
    },
    RoundState.AGGREGATING: {
        UpdateReceived: (RoundState.AGGREGATING,),
        UpdateInvalid: (RoundState.AGGREGATING,),
        DeviceUnavailable: (RoundState.AGGREGATING,),
        TaskStatus: (RoundState.AGGREGATING,),
        AggregationDone: (RoundState.IDLE, RoundState.COLLECTING),
        AggregationFailed: (RoundState.IDLE, RoundState.COLLECTING),
    },
}
"""``state -> event type -> states the machine may be in after handling it``."""


@dataclass(slots=True)
class RoundStats:
    """Counters of the open round (reset when the next round starts)."""

    participants: int = 0
    """Updates folded into the aggregate."""
    selected: int = 0
    """Tasks sent (including replacements)."""
    declined: int = 0
    """Devices that explicitly declined (also counted in ``dropped``)."""
    dropped: int = 0
    """Devices removed because they said they will not report (offline, ineligible, decline,
    lost task, an attributed bad envelope)."""
    lost: int = 0
    """Tasks dropped as ``lost_task`` (also counted in ``dropped``)."""
    timed_out: int = 0
    """Tasks still outstanding at the deadline."""
    replaced: int = 0
    rejected: Counter[str] = field(default_factory=Counter)
    """Rejected updates by reason (those that arrived between rounds count in the next one)."""
    examples: int = 0
    losses: list[float] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return {
            "participants": self.participants,
            "selected": self.selected,
            "declined": self.declined,
            "dropped": self.dropped,
            "lost": self.lost,
            "timed_out": self.timed_out,
            "replaced": self.replaced,
            "rejected": dict(self.rejected),
        }


# ----------------------------------------------------------------------------------- machine


RETRY_BASE_S = 1.0
"""The pause before the next round after a failed one; it doubles with each further failure
in a row, up to ``deadline_s``."""
RESTORE_DRAIN_S = 10.0
"""How long a restarted coordinator keeps a round open past its deadline for the updates the
broker queued while it was down (a persistent session delivers them at once)."""


def _token(rng: np.random.Generator) -> str:
    return f"{int(rng.integers(0, 2**63)):016x}"


class RoundMachine:
    """Pure state machine of rounds; see the module docstring for the rules.

    Parameters
    ----------
    settings
        Round parameters.
    selector, rng
        Selection policy and its random source (also used for task ids and nonces).
    round_no, model_version
        Where to start (from the last checkpoint).
    accepted_task_ids
        Task ids already counted in checkpointed rounds (replay protection across restarts).
    fail_task_on_bad_envelope
        An update of the topic's device rejected as one of :data:`ENVELOPE_REJECTIONS` fails
        that device's outstanding task at once (set when only the device can publish there).
    task_id_salt
        Text put into every task id, so that two state dbs never issue the same ids, whatever
        their seed (devices ignore a task id they have seen).
    """

    def __init__(
        self,
        settings: RoundSettings,
        selector: Selector,
        rng: np.random.Generator,
        *,
        round_no: int = 1,
        model_version: int = 0,
        accepted_task_ids: Iterable[str] = (),
        fail_task_on_bad_envelope: bool = False,
        task_id_salt: str = "",
    ) -> None:
        self.settings = settings
        self.task_id_salt = task_id_salt
        """Put in every task id after the round number (``r7-<salt><token>``)."""
        self.selector = selector
        self.rng = rng
        self.state = RoundState.IDLE
        self.round_no = round_no
        """The open round, or the next one to start when IDLE."""
        self.model_version = model_version
        self.deadline: float | None = None
        self.started_at: float | None = None
        self.stats = RoundStats()
        self.tasks: dict[str, IssuedTask] = {}
        """Tasks of the open round (sync) or all live tasks (async), by task id."""
        self.outstanding: dict[str, str] = {}
        """cid -> task id of tasks still expected to report."""
        self.accepted_now: set[str] = set()
        """Task ids folded into the open round."""
        self.accepted_before: set[str] = set(accepted_task_ids)
        self.fail_task_on_bad_envelope = fail_task_on_bad_envelope
        self.acknowledged: set[str] = set()
        """Task ids of the open round (sync) or live tasks (async) a status of their device
        named: a later status without them means the task is lost."""
        self.closed_tasks: dict[str, IssuedTask] = {}
        """Tasks of earlier rounds or dropped tasks (to tell late from unknown)."""
        self._in_round: set[str] = set()
        self._pending: FoldUpdate | None = None
        self._waiting_logged = False
        self._failed_in_a_row = 0
        """Rounds abandoned (or aggregated into no model) since the last new version."""
        self._not_before = -math.inf
        """No round starts before this time (after failed rounds)."""
        self._idle_rejected: Counter[str] = Counter()
        """Rejections while no round is open: the last record is out, so they go to the next."""

    # -- public API --------------------------------------------------------------------------

    def handle(self, event: Event) -> list[Command]:
        """Process one event; return the commands to execute, in order."""
        allowed = TRANSITIONS[self.state].get(type(event))
        if allowed is None:
            raise RoundProtocolError(f"{type(event).__name__} in state {self.state.name}")
        if self._pending is not None and not (
            isinstance(event, UpdateFolded | UpdateInvalid)
            and event.task_id == self._pending.task_id
        ):
            raise RoundProtocolError(
                f"{type(event).__name__} while the fold of task {self._pending.task_id} "
                "is unanswered"
            )
        before = self.state
        commands = self._dispatch(event)
        if self.state not in allowed:  # pragma: no cover - a bug in this file
            raise RoundProtocolError(
                f"{type(event).__name__} moved {before.name} to {self.state.name}"
            )
        return commands

    @property
    def quorum(self) -> int:
        return self.settings.quorum

    def snapshot(self) -> dict[str, Any]:
        """JSON-safe state of the open round, for the store (restored by :meth:`restore`)."""
        return {
            "state": self.state.value,
            "round_no": self.round_no,
            "model_version": self.model_version,
            "deadline": self.deadline,
            "started_at": self.started_at,
            "tasks": [t.to_json() for t in self.tasks.values()],
            "outstanding": dict(self.outstanding),
            "in_round": sorted(self._in_round),
            "acknowledged": sorted(self.acknowledged),
        }

    def restore(
        self,
        snap: Mapping[str, Any],
        folded: Mapping[str, float | None] | None = None,
        *,
        now: float | None = None,
    ) -> list[Command]:
        """Reopen a round saved by :meth:`snapshot` after a restart.

        ``folded`` maps the task ids of updates the coordinator kept (it folds them into the
        reopened aggregate again, in this order) to their reported loss: they count as
        folded, so a QoS-1 redelivery of one is a ``duplicate``. Any other update folded
        before the restart died with the old process (counted zero times, never twice); its
        task stays open so a redelivery can still be counted, and its acknowledgement is
        restored too: when the device's status then shows it is idle, the task is lost
        (:class:`TaskStatus`) and the device is asked again with a fresh task of the same
        round on the same model version, so the round can complete. Returns the
        :class:`StartRound` the coordinator must execute (empty if the snapshot had no open
        round), followed by the round's :class:`Aggregate` when the kept updates already
        reach the target.

        A coordinator back after the round's deadline, or less than :data:`RESTORE_DRAIN_S`
        before it (``now``), keeps the round open until ``now + RESTORE_DRAIN_S``: updates
        the devices sent in time were queued by the broker while it was down and arrive
        now; they are counted, not refused as ``late``.
        """
        if snap.get("state") not in (RoundState.COLLECTING.value, RoundState.AGGREGATING.value):
            return []
        if int(snap["round_no"]) != self.round_no:
            return []  # the round was checkpointed after the snapshot: nothing to reopen
        asynchronous = self.settings.mode == "async"
        # Async tasks live across model versions: one counted in a checkpointed version is done.
        tasks = [
            t
            for t in (IssuedTask.from_json(obj) for obj in snap.get("tasks", []))
            if t.task_id not in self.accepted_before
        ]
        self.tasks = {t.task_id: t for t in tasks}
        # Async: a task folded before the last snapshot had already left ``tasks`` (it is
        # closed at its fold), but its kept update still belongs to this version's buffer.
        kept = {
            task_id: loss
            for task_id, loss in (folded or {}).items()
            if task_id in self.tasks or (asynchronous and task_id not in self.accepted_before)
        }
        self.outstanding = {
            str(cid): str(task_id)
            for cid, task_id in dict(snap.get("outstanding", {})).items()
            if task_id in self.tasks and task_id not in kept
        }
        # Tasks folded before the crash and not kept are outstanding again: their device may
        # resend. Kept ones are folded again, whatever the snapshot said.
        for t in tasks:
            if t.task_id not in kept and t.cid not in self.outstanding:
                self.outstanding[t.cid] = t.task_id
        if asynchronous:  # a folded async task is closed (see _on_folded)
            for task_id in kept:
                if task_id in self.tasks:
                    self.closed_tasks[task_id] = self.tasks.pop(task_id)
        self._in_round = set(snap.get("in_round", []))
        self.acknowledged = {
            str(t) for t in snap.get("acknowledged", []) if t in self.tasks and t not in kept
        }
        self.deadline = snap.get("deadline")
        self.started_at = snap.get("started_at")
        if now is not None:
            floor = now + RESTORE_DRAIN_S
            if self.deadline is not None and self.deadline < floor:
                self.deadline = floor
            self.tasks = {
                task_id: dataclasses.replace(t, deadline=floor) if t.deadline < floor else t
                for task_id, t in self.tasks.items()
            }
        self.state = RoundState.COLLECTING
        self.stats = RoundStats(selected=len(tasks))
        self.accepted_now = set(kept)
        self.stats.participants = len(kept)
        self.stats.losses = [loss for loss in kept.values() if loss is not None]
        if asynchronous:
            return [StartRound(self.round_no, self.model_version, math.inf)]
        assert self.deadline is not None
        commands: list[Command] = [StartRound(self.round_no, self.model_version, self.deadline)]
        if self.stats.participants >= self.settings.clients_per_round:
            commands += self._close_at_target()
        return commands

    def buffer_full(self) -> list[Command]:
        """Async, after a restart: the strategy's buffer filled up with the kept updates
        alone (the process died between the last fold and the checkpoint); aggregate now."""
        if self.settings.mode != "async" or self.state is not RoundState.COLLECTING:
            raise RoundProtocolError(
                f"buffer_full() in {self.settings.mode} state {self.state.name}"
            )
        self.state = RoundState.AGGREGATING
        return [Aggregate(self.round_no, "buffer")]

    # -- dispatch ----------------------------------------------------------------------------

    def _dispatch(self, event: Event) -> list[Command]:
        if isinstance(event, Tick):
            return self._on_tick(event)
        if isinstance(event, UpdateReceived):
            return self._on_update(event)
        if isinstance(event, UpdateFolded):
            return self._on_folded(event)
        if isinstance(event, UpdateInvalid):
            return self._on_invalid(event)
        if isinstance(event, DeviceUnavailable):
            return self._on_unavailable(event)
        if isinstance(event, TaskStatus):
            return self._on_task_status(event)
        if isinstance(event, AggregationDone):
            return self._on_aggregated(event.model_version, event.now)
        return self._on_aggregated(None, event.now)

    # -- ticks -------------------------------------------------------------------------------

    def _on_tick(self, tick: Tick) -> list[Command]:
        if self.settings.mode == "async":
            return self._async_tick(tick)
        if self.state is RoundState.IDLE:
            return self._try_start(tick)
        assert self.deadline is not None
        if tick.now >= self.deadline:
            return self._close_at_deadline(tick.now)
        commands = self._replace(tick)
        if not self.outstanding:
            commands += self._close_exhausted(tick.now)
        return commands

    def _try_start(self, tick: Tick) -> list[Command]:
        if tick.now < self._not_before:
            return []  # after failed rounds (see _hold_after_failure)
        k = self.settings.clients_per_round
        need = self.settings.min_devices or k
        cohort = select_cohort(
            self.selector,
            tick.eligible,
            k,
            self.rng,
            self.round_no,
            over_selection=self.settings.over_selection,
            min_devices=need,
        )
        if cohort is None:
            return [WaitForDevices(self.round_no, len(tick.eligible), need)]
        self.state = RoundState.COLLECTING
        self.started_at = tick.now
        self.deadline = tick.now + self.settings.deadline_s
        self.stats = RoundStats()
        self.stats.rejected.update(self._idle_rejected)
        self._idle_rejected.clear()
        self.tasks = {}
        self.outstanding = {}
        self.accepted_now = set()
        self.acknowledged = set()
        self._in_round = set()
        views = {v.cid: v for v in tick.eligible}
        commands: list[Command] = [StartRound(self.round_no, self.model_version, self.deadline)]
        for cid in cohort:
            commands.append(self._issue(cid, views.get(cid), tick.now, self.deadline))
        return commands

    def _issue(self, cid: str, view: DeviceView | None, now: float, deadline: float) -> SendTask:
        task = IssuedTask(
            task_id=self._new_task_id(),
            cid=cid,
            nonce=_token(self.rng),
            round_no=self.round_no,
            model_version=self.model_version,
            issued_at=now,
            deadline=deadline,
            max_steps=self._max_steps(view, deadline - now),
        )
        self.tasks[task.task_id] = task
        self.outstanding[cid] = task.task_id
        self._in_round.add(cid)
        self.stats.selected += 1
        return SendTask(task)

    def _max_steps(self, view: DeviceView | None, budget_s: float) -> int | None:
        s = self.settings
        if not s.size_to_deadline or view is None or not view.samples_per_s:
            return None
        return max(1, int(view.samples_per_s * budget_s * s.work_fraction / s.batch_size))

    def _replace(self, tick: Tick) -> list[Command]:
        assert self.deadline is not None
        wanted = over_select(self.settings.clients_per_round, self.settings.over_selection)
        missing = wanted - len(self.outstanding) - len(self.accepted_now)
        if missing <= 0 or self.deadline - tick.now < self.settings.replace_window_s:
            return []
        pool = [v for v in tick.eligible if v.cid not in self._in_round]
        if not pool:
            return []
        picked = self.selector.select(pool, missing, self.rng, self.round_no)
        views = {v.cid: v for v in pool}
        self.stats.replaced += len(picked)
        return [self._issue(cid, views[cid], tick.now, self.deadline) for cid in picked]

    def _close_at_deadline(self, now: float) -> list[Command]:
        commands: list[Command] = []
        for cid, task_id in sorted(self.outstanding.items()):
            commands.append(DropDevice(cid, task_id, "deadline", timed_out=True))
            self.closed_tasks[task_id] = self.tasks[task_id]
            self.stats.timed_out += 1
        self.outstanding.clear()
        if self.stats.participants >= self.quorum:
            self.state = RoundState.AGGREGATING
            return [*commands, Aggregate(self.round_no, "deadline")]
        return [*commands, *self._abandon("no quorum at the deadline", now)]

    def _close_exhausted(self, now: float) -> list[Command]:
        """Nobody is left to wait for and no replacement was found."""
        if self.stats.participants >= self.quorum:
            self.state = RoundState.AGGREGATING
            return [Aggregate(self.round_no, "exhausted")]
        return self._abandon("every selected device dropped out before quorum", now)

    def _abandon(self, reason: str, now: float) -> list[Command]:
        round_no = self._end_round()
        self.state = RoundState.IDLE
        self._hold_after_failure(now)
        return [AbandonRound(round_no, reason)]

    def _hold_after_failure(self, now: float) -> None:
        """Space out rounds that keep failing: 1 s after the first, doubling, at most
        ``deadline_s``. Every device declining at once would otherwise start and abandon a
        round at every tick, each costing the devices a task and the log two warnings."""
        self._failed_in_a_row += 1
        delay = min(self.settings.deadline_s, RETRY_BASE_S * 2.0 ** (self._failed_in_a_row - 1))
        self._not_before = now + delay

    def _new_task_id(self) -> str:
        """``r<round>-<salt><token>``, never one issued or counted before."""
        while True:
            task_id = f"r{self.round_no}-{self.task_id_salt}{_token(self.rng)}"
            known = (self.tasks, self.closed_tasks, self.accepted_before, self.accepted_now)
            if not any(task_id in ids for ids in known):
                return task_id

    def _end_round(self) -> int:
        round_no = self.round_no
        for task_id, task in self.tasks.items():
            self.closed_tasks[task_id] = task
        self.accepted_before |= self.accepted_now
        self.tasks = {}
        self.outstanding = {}
        self.accepted_now = set()
        self.acknowledged = set()
        self.deadline = None
        self.round_no += 1
        if len(self.closed_tasks) > 100_000:  # bound memory: forget the oldest
            for task_id in list(self.closed_tasks)[:50_000]:
                del self.closed_tasks[task_id]
        return round_no

    # -- updates -----------------------------------------------------------------------------

    def classify(
        self, cid: str, task_id: str, model_version: int, nonce: str | None, now: float
    ) -> str | FoldUpdate:
        """Return the rejection reason of an update, or the :class:`FoldUpdate` for it.

        A pure query (no state changes), so the coordinator can refuse an update before it
        spends time decoding it.
        """
        task = self.tasks.get(task_id)
        if task is None:
            if task_id in self.accepted_before:
                return "replayed"
            if task_id in self.accepted_now:
                return "duplicate"
            old = self.closed_tasks.get(task_id)
            if old is None:
                return "unknown_task"
            return "wrong_cid" if old.cid != cid else "late"
        if task.cid != cid:
            return "wrong_cid"
        if task.nonce != nonce:
            return "replayed"
        if task_id in self.accepted_now:
            return "duplicate"
        if self.state is not RoundState.COLLECTING or self.outstanding.get(cid) != task_id:
            return "late"
        if now > task.deadline:
            return "late"
        if model_version != task.model_version:
            return "wrong_model_version"
        staleness = self.model_version - task.model_version
        if self.settings.mode == "async" and staleness > self.settings.max_staleness:
            return "too_stale"
        return FoldUpdate(cid, task_id, staleness)

    def _on_update(self, ev: UpdateReceived) -> list[Command]:
        verdict = self.classify(ev.cid, ev.task_id, ev.model_version, ev.nonce, ev.now)
        if isinstance(verdict, str):
            self._count_rejected(verdict)
            commands: list[Command] = [RejectUpdate(ev.cid, ev.task_id, verdict)]
            if verdict == "too_stale":
                commands += self._drop(ev.cid, ev.task_id, "too_stale")
            return commands
        self._pending = verdict
        return [verdict]

    def _on_folded(self, ev: UpdateFolded) -> list[Command]:
        pending = self._pending
        if pending is None or pending.task_id != ev.task_id:
            raise RoundProtocolError(f"UpdateFolded for task {ev.task_id} that was not pending")
        self._pending = None
        self.outstanding.pop(pending.cid, None)
        self.accepted_now.add(ev.task_id)
        self.stats.participants += 1
        if ev.loss is not None:
            self.stats.losses.append(ev.loss)
        if self.settings.mode == "async":
            task = self.tasks.pop(ev.task_id)
            self.closed_tasks[ev.task_id] = task
            self.acknowledged.discard(ev.task_id)
            if ev.ready:
                self.state = RoundState.AGGREGATING
                return [Aggregate(self.round_no, "buffer")]
            return []
        if self.stats.participants >= self.settings.clients_per_round:
            return self._close_at_target()
        return []

    def _close_at_target(self) -> list[Command]:
        self.state = RoundState.AGGREGATING
        commands: list[Command] = []
        for cid, task_id in sorted(self.outstanding.items()):
            commands.append(DropDevice(cid, task_id, "round_complete"))
        self.outstanding.clear()
        return [*commands, Aggregate(self.round_no, "target")]

    def _count_rejected(self, reason: str) -> None:
        if self.state is RoundState.IDLE and self.settings.mode == "sync":
            self._idle_rejected[reason] += 1
        else:
            self.stats.rejected[reason] += 1

    def _on_invalid(self, ev: UpdateInvalid) -> list[Command]:
        self._count_rejected(ev.reason)
        pending = self._pending
        if ev.task_id is None and pending is None:
            return self._fail_on_envelope(ev)
        if pending is None or ev.task_id is None or pending.task_id != ev.task_id:
            return []
        self._pending = None
        return self._drop(pending.cid, pending.task_id, f"invalid_update:{ev.reason}")

    def _fail_on_envelope(self, ev: UpdateInvalid) -> list[Command]:
        """A bad envelope on ``ev.cid``'s own topic fails its task (when attributable)."""
        if (
            not self.fail_task_on_bad_envelope
            or ev.cid is None
            or ev.reason not in ENVELOPE_REJECTIONS
            or self.state is not RoundState.COLLECTING
        ):
            return []
        task_id = self.outstanding.get(ev.cid)
        if task_id is None:
            return []
        return self._drop(ev.cid, task_id, f"invalid_update:{ev.reason}")

    # -- devices -----------------------------------------------------------------------------

    def _on_task_status(self, ev: TaskStatus) -> list[Command]:
        task_id = self.outstanding.get(ev.cid)
        if task_id is None or self.state is not RoundState.COLLECTING:
            return []
        if ev.task_id == task_id:
            if task_id in self.acknowledged:
                return []
            self.acknowledged.add(task_id)
            return [TaskAcknowledged(ev.cid, task_id)]
        if task_id not in self.acknowledged:
            return []  # a status from before the device took the task proves nothing
        # The device held the task and now holds none (or another): it will never report.
        # It is idle, so unlike a decliner it may be asked again (a fresh task) at the next tick.
        self._in_round.discard(ev.cid)
        self.stats.lost += 1
        return self._drop(ev.cid, task_id, LOST_TASK)

    def _on_unavailable(self, ev: DeviceUnavailable) -> list[Command]:
        task_id = self.outstanding.get(ev.cid)
        if task_id is None or self.state is not RoundState.COLLECTING:
            return []
        if ev.declined and ev.task_id is not None and ev.task_id != task_id:
            return []  # a stale decline of an older task
        commands = self._drop(ev.cid, task_id, ev.reason, declined=ev.declined)
        if self.settings.mode == "sync" and self.state is RoundState.COLLECTING:
            # Replacement happens at the next Tick (it carries the eligible pool).
            pass
        return commands

    def _drop(
        self, cid: str, task_id: str, reason: str, *, declined: bool = False
    ) -> list[Command]:
        if self.outstanding.get(cid) == task_id:
            del self.outstanding[cid]
        task = self.tasks.get(task_id)
        if task is not None:
            self.closed_tasks[task_id] = task
            if self.settings.mode == "async":
                del self.tasks[task_id]
                self.acknowledged.discard(task_id)
        self.stats.dropped += 1
        self.stats.declined += declined
        return [DropDevice(cid, task_id, reason, declined=declined)]

    # -- aggregation -------------------------------------------------------------------------

    def _on_aggregated(self, model_version: int | None, now: float) -> list[Command]:
        if model_version is not None:
            if model_version <= self.model_version:
                raise RoundProtocolError(
                    f"model version {model_version} does not advance {self.model_version}"
                )
            self.model_version = model_version
        if model_version is None:
            self._hold_after_failure(now)
        else:
            self._failed_in_a_row, self._not_before = 0, -math.inf
        if self.settings.mode == "async":
            self.accepted_before |= self.accepted_now
            self.accepted_now = set()
            self.round_no += 1
            self.stats = RoundStats()
            self.started_at = now
            self.state = RoundState.COLLECTING
            return []
        self._end_round()
        self.state = RoundState.IDLE
        return []

    # -- async -------------------------------------------------------------------------------

    def _async_tick(self, tick: Tick) -> list[Command]:
        commands: list[Command] = []
        if self.state is RoundState.IDLE:
            self.state = RoundState.COLLECTING
            self.started_at = tick.now
            self.stats = RoundStats()
            commands.append(StartRound(self.round_no, self.model_version, math.inf))
        if self.state is not RoundState.COLLECTING:
            return commands
        for cid, task_id in sorted(self.outstanding.items()):
            if tick.now > self.tasks[task_id].deadline:
                commands.append(DropDevice(cid, task_id, "deadline", timed_out=True))
                self.stats.timed_out += 1
                del self.outstanding[cid]
                self.closed_tasks[task_id] = self.tasks.pop(task_id)
                self.acknowledged.discard(task_id)
        free = self.settings.concurrency - len(self.outstanding)
        pool = [v for v in tick.eligible if v.cid not in self.outstanding]
        if free > 0 and pool:
            picked = self.selector.select(pool, free, self.rng, self.round_no)
            views = {v.cid: v for v in pool}
            deadline = tick.now + self.settings.deadline_s
            commands += [self._issue(cid, views[cid], tick.now, deadline) for cid in picked]
        return commands


__all__ = [
    "ENVELOPE_REJECTIONS",
    "LOST_TASK",
    "RESTORE_DRAIN_S",
    "RETRY_BASE_S",
    "TRANSITIONS",
    "AbandonRound",
    "Aggregate",
    "AggregationDone",
    "AggregationFailed",
    "Command",
    "DeviceUnavailable",
    "DropDevice",
    "Event",
    "FoldUpdate",
    "IssuedTask",
    "RejectUpdate",
    "RoundMachine",
    "RoundProtocolError",
    "RoundSettings",
    "RoundState",
    "RoundStats",
    "SendTask",
    "StartRound",
    "TaskAcknowledged",
    "TaskStatus",
    "Tick",
    "UpdateFolded",
    "UpdateInvalid",
    "UpdateReceived",
    "WaitForDevices",
]
