"""The device agent: a pure state machine (:class:`AgentMachine`) and the one loop that runs it.

Every transition of the agent lives in :data:`TRANSITIONS` (h11 style): for each state, the
events it accepts and the states each may lead to. :meth:`AgentMachine.handle` takes an event
and ``now`` (Unix seconds, the clock of task deadlines) and returns commands as data; an event
the table does not list for the current state raises :class:`AgentProtocolError`. The machine
knows nothing about MQTT, files, threads or training::

    IDLE --TaskReceived--> FETCHING_MODEL --ModelAvailable--> TRAINING --TrainingFinished-->
    UPLOADING --UploadDone--> IDLE
    (any check fails) --> DECLINED --DeclineSent--> IDLE
    UPLOADING --UploadFailed--> BACKOFF --Tick (retry time)--> UPLOADING
    FETCHING_MODEL / UPLOADING / BACKOFF --TaskCancelled--> IDLE   (training: aborted, declined)
    (any) --Shutdown--> STOPPED

:class:`AgentRunner` is the I/O side: it drains the transport, reassembles and verifies the
global model (``model/manifest`` + ``model/{version}/{index}`` chunks), feeds events to the
machine and executes its commands (publish a status, train, encode and upload an update,
refetch the model). :func:`run_agent` and :func:`start_agent_thread` run one agent with
everything injected (transport, trainer, data, telemetry, clock, rng), which is how the
simulator runs many agents in one process.

Protocol conventions implemented here (see ``docs/AGENT.md``):

- The update envelope carries ``new - global`` per tensor, encoded with the task's
  ``uplink_codec`` whose ``seed`` parameters are mixed with the task nonce
  (:func:`edge.eligibility.seeded_codec_config`), the task's ``nonce``, metrics
  (``loss``, ``num_steps``, ``samples_per_s``, ``duration_s``) and ``extra.local_steps``.
- SCAFFOLD (``task.strategy == {"id": "scaffold", ...}``): the global model envelope carries
  the server control variate ``c`` as the flat raw tensor ``aux/scaffold_c`` (length = model
  size, the model's tensor order; absent means zeros). The update carries
  ``aux/scaffold`` = Δc_i = c_i⁺ − c_i, flat and raw. ``c_i`` stays on disk.
- Error feedback (``task.error_feedback``): residuals per tensor, on disk, committed only
  once the update was acknowledged by the broker.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import Counter, OrderedDict, deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from enum import StrEnum
from typing import TYPE_CHECKING, Final, TypeAlias

import numpy as np

from edge.chunking import DEFAULT_CHUNK_SIZE, Reassembler
from edge.data import Dataset
from edge.eligibility import (
    DeclineReason,
    Limits,
    check_task,
    is_scaffold,
    seeded_codec_config,
    stop_reason,
)
from edge.modelio import (
    AUX_PREFIX,
    F32,
    RAW,
    LayoutError,
    ModelLayout,
    encode_update,
    unpack_model,
)
from edge.state import AgentStore
from edge.telemetry import TelemetryProvider, TelemetrySnapshot, build_status
from edge.training import FitResult, NumpyTrainer, ScaffoldControl, Trainer, shapes
from edge.transport import Message, Transport, TransportClosed, TransportError, publish_chunked
from edge.wire import (
    Caps,
    ChunkError,
    Declined,
    GlobalModel,
    ModelManifest,
    ModelUpdate,
    Status,
    TaskCancel,
    TensorSpec,
    TopicKind,
    Topics,
    TrainTask,
    WireError,
    parse_task_message,
)
from kernels.codec import ErrorFeedback, codec_ids, get_codec
from kernels.errors import CodecError

if TYPE_CHECKING:
    from edge.mqtt_transport import MqttSettings

__all__ = [
    "SCAFFOLD_C",
    "SCAFFOLD_DELTA",
    "TRANSITIONS",
    "AgentHandle",
    "AgentMachine",
    "AgentOptions",
    "AgentProtocolError",
    "AgentRunner",
    "AgentState",
    "AgentStats",
    "StatusRelay",
    "UpdateHook",
    "connect_agent_transport",
    "offline_will",
    "run_agent",
    "start_agent_thread",
]

log = logging.getLogger(__name__)

SCAFFOLD_C: Final = f"{AUX_PREFIX}scaffold_c"
"""Extra tensor of the global model envelope: the server control variate ``c`` (flat)."""
SCAFFOLD_DELTA: Final = f"{AUX_PREFIX}scaffold"
"""Extra tensor of an update envelope: Δc_i = c_i⁺ − c_i (flat)."""


class AgentProtocolError(RuntimeError):
    """An event arrived that the agent's current state does not accept."""


class ModelMismatchError(LayoutError):
    """The published model's tensors do not match this device's model config."""


class AgentState(StrEnum):
    """Where the agent is; the value is what ``Status.state`` reports."""

    IDLE = "idle"
    FETCHING_MODEL = "fetching_model"
    """Holds a task and waits for the model version it names (bounded by its deadline)."""
    TRAINING = "training"
    UPLOADING = "uploading"
    DECLINED = "declined"
    """Declined or abandoned a task; the status saying so is being published."""
    BACKOFF = "backoff"
    """An upload failed; it is retried until the task's deadline."""
    STOPPED = "stopped"
    """Shut down; accepts nothing but another Shutdown."""


# --------------------------------------------------------------------------- events


@dataclass(frozen=True, slots=True)
class Connected:
    """The agent (re)connected: publish the status."""


@dataclass(frozen=True, slots=True)
class Tick:
    """Time passed: heartbeat, deadlines, retries and model refetches are due by ``now``."""


@dataclass(frozen=True, slots=True)
class TaskReceived:
    """A train task arrived, with a fresh telemetry reading to check it against."""

    task: TrainTask
    telemetry: TelemetrySnapshot


@dataclass(frozen=True, slots=True)
class ModelAvailable:
    """A verified global model of ``model_version`` is loaded."""

    model_version: int
    telemetry: TelemetrySnapshot


@dataclass(frozen=True, slots=True)
class ModelCorrupt:
    """A downloaded model failed its checks (SHA-256, envelope, layout); fetch it again later."""

    model_version: int
    reason: str


@dataclass(frozen=True, slots=True)
class TrainingFinished:
    """Training ended normally and the update is encoded, ready to upload."""

    task_id: str


@dataclass(frozen=True, slots=True)
class TrainingAborted:
    """Training stopped early (battery, heat, deadline, error); nothing is uploaded."""

    task_id: str
    reason: str


@dataclass(frozen=True, slots=True)
class UploadDone:
    """The broker acknowledged every chunk of the update."""

    task_id: str


@dataclass(frozen=True, slots=True)
class UploadFailed:
    """Publishing the update failed."""

    task_id: str
    error: str


@dataclass(frozen=True, slots=True)
class TaskCancelled:
    """The coordinator withdrew a task (:class:`~edge.wire.TaskCancel`)."""

    task_id: str
    reason: str


@dataclass(frozen=True, slots=True)
class DeclineSent:
    """The status announcing a decline was published (or its publish failed)."""


@dataclass(frozen=True, slots=True)
class Shutdown:
    """Stop: publish the offline status and close the connection."""


Event: TypeAlias = (
    Connected
    | Tick
    | TaskReceived
    | ModelAvailable
    | ModelCorrupt
    | TrainingFinished
    | TrainingAborted
    | UploadDone
    | UploadFailed
    | TaskCancelled
    | DeclineSent
    | Shutdown
)


# --------------------------------------------------------------------------- commands


@dataclass(frozen=True, slots=True)
class PublishStatus:
    """Publish the retained status (telemetry added by the runner)."""

    state: AgentState
    task_id: str | None = None
    declined: Declined | None = None
    online: bool = True


@dataclass(frozen=True, slots=True)
class FetchModel:
    """Fetch the global model again (a download was corrupt)."""

    model_version: int


@dataclass(frozen=True, slots=True)
class Train:
    """Train on the loaded model for ``task`` and encode the update."""

    task: TrainTask


@dataclass(frozen=True, slots=True)
class Upload:
    """Publish the encoded update of ``task`` (chunked, on ``clients/{cid}/update``)."""

    task: TrainTask


@dataclass(frozen=True, slots=True)
class DropUpdate:
    """Forget the encoded update of ``task_id`` (its deadline passed before it went out)."""

    task_id: str
    reason: str


@dataclass(frozen=True, slots=True)
class Close:
    """Close the transport; the runner's loop ends."""


Command: TypeAlias = PublishStatus | FetchModel | Train | Upload | DropUpdate | Close


# --------------------------------------------------------------------------- the table

S = AgentState
TRANSITIONS: Final[dict[AgentState, dict[type[Event], frozenset[AgentState]]]] = {
    S.IDLE: {
        Connected: frozenset({S.IDLE}),
        Tick: frozenset({S.IDLE}),
        TaskReceived: frozenset({S.IDLE, S.FETCHING_MODEL, S.TRAINING, S.DECLINED}),
        ModelAvailable: frozenset({S.IDLE}),
        ModelCorrupt: frozenset({S.IDLE}),
        TaskCancelled: frozenset({S.IDLE}),
        Shutdown: frozenset({S.STOPPED}),
    },
    S.FETCHING_MODEL: {
        Connected: frozenset({S.FETCHING_MODEL}),
        Tick: frozenset({S.FETCHING_MODEL, S.DECLINED}),
        TaskReceived: frozenset({S.FETCHING_MODEL}),
        ModelAvailable: frozenset({S.FETCHING_MODEL, S.TRAINING, S.DECLINED}),
        ModelCorrupt: frozenset({S.FETCHING_MODEL}),
        TaskCancelled: frozenset({S.FETCHING_MODEL, S.IDLE}),
        Shutdown: frozenset({S.STOPPED}),
    },
    S.TRAINING: {
        Connected: frozenset({S.TRAINING}),
        Tick: frozenset({S.TRAINING}),
        TaskReceived: frozenset({S.TRAINING}),
        ModelAvailable: frozenset({S.TRAINING}),
        ModelCorrupt: frozenset({S.TRAINING}),
        TrainingFinished: frozenset({S.UPLOADING}),
        TrainingAborted: frozenset({S.DECLINED}),
        TaskCancelled: frozenset({S.TRAINING}),
        Shutdown: frozenset({S.STOPPED}),
    },
    S.UPLOADING: {
        Connected: frozenset({S.UPLOADING}),
        Tick: frozenset({S.UPLOADING}),
        TaskReceived: frozenset({S.UPLOADING}),
        ModelAvailable: frozenset({S.UPLOADING}),
        ModelCorrupt: frozenset({S.UPLOADING}),
        UploadDone: frozenset({S.IDLE}),
        UploadFailed: frozenset({S.BACKOFF, S.IDLE}),
        TaskCancelled: frozenset({S.UPLOADING, S.IDLE}),
        Shutdown: frozenset({S.STOPPED}),
    },
    S.DECLINED: {
        Connected: frozenset({S.DECLINED}),
        Tick: frozenset({S.DECLINED}),
        TaskReceived: frozenset({S.DECLINED}),
        ModelAvailable: frozenset({S.DECLINED}),
        ModelCorrupt: frozenset({S.DECLINED}),
        DeclineSent: frozenset({S.IDLE}),
        TaskCancelled: frozenset({S.DECLINED}),
        Shutdown: frozenset({S.STOPPED}),
    },
    S.BACKOFF: {
        Connected: frozenset({S.BACKOFF}),
        Tick: frozenset({S.BACKOFF, S.UPLOADING, S.IDLE}),
        TaskReceived: frozenset({S.BACKOFF}),
        ModelAvailable: frozenset({S.BACKOFF}),
        ModelCorrupt: frozenset({S.BACKOFF}),
        TaskCancelled: frozenset({S.BACKOFF, S.IDLE}),
        Shutdown: frozenset({S.STOPPED}),
    },
    S.STOPPED: {
        Shutdown: frozenset({S.STOPPED}),
    },
}
"""state → event type → the states that event may lead to. Anything missing is illegal."""
del S

_SEEN_TASKS: Final = 1024
"""Task ids remembered to ignore QoS-1 redeliveries and repeats."""
_HELD_MAX: Final = 1024
"""Messages taken off the transport while training (to find a cancel), at most."""


@dataclass(slots=True)
class AgentMachine:
    """The agent's decisions, as a pure function of events and ``now``.

    Parameters
    ----------
    limits
        The device's own eligibility rules.
    supports_scaffold
        Whether the trainer can run SCAFFOLD tasks.
    heartbeat_s
        Publish the status at least this often.
    """

    limits: Limits = field(default_factory=Limits)
    supports_scaffold: bool = True
    heartbeat_s: float = 30.0
    upload_retry_min_s: float = 1.0
    upload_retry_max_s: float = 30.0
    refetch_min_s: float = 1.0
    refetch_max_s: float = 60.0
    state: AgentState = AgentState.IDLE
    task: TrainTask | None = None
    """The task in progress (FETCHING_MODEL .. BACKOFF)."""
    model_version: int | None = None
    """The newest verified global model version."""
    next_heartbeat: float = 0.0
    refetch_at: float | None = None
    upload_retry_at: float | None = None
    _refetch_delay: float = 0.0
    _upload_attempts: int = 0
    _seen: OrderedDict[str, None] = field(default_factory=OrderedDict)

    def __post_init__(self) -> None:
        if self.heartbeat_s <= 0:
            raise ValueError(f"heartbeat_s must be > 0, got {self.heartbeat_s}")
        self._refetch_delay = self.refetch_min_s

    # ------------------------------------------------------------------ dispatch

    def handle(self, event: Event, now: float) -> list[Command]:
        """Apply ``event`` at ``now``; return the commands to run, in order."""
        allowed = TRANSITIONS[self.state].get(type(event))
        if allowed is None:
            raise AgentProtocolError(f"{type(event).__name__} in state {self.state.name}")
        before = self.state
        commands = self._dispatch(event, now)
        if self.state not in allowed:  # a bug in this class, not in the caller
            raise AgentProtocolError(
                f"{type(event).__name__} moved {before.name} to {self.state.name}, "
                f"the table allows {sorted(s.name for s in allowed)}"
            )
        if any(isinstance(c, PublishStatus) for c in commands):
            self.next_heartbeat = now + self.heartbeat_s
        return commands

    def _dispatch(self, event: Event, now: float) -> list[Command]:
        match event:
            case Connected():
                return [self._status()]
            case Tick():
                return self._on_tick(now)
            case TaskReceived(task=task, telemetry=snap):
                return self._on_task(task, snap, now)
            case ModelAvailable(model_version=version, telemetry=snap):
                return self._on_model(version, snap, now)
            case ModelCorrupt():
                self.refetch_at = now + self._refetch_delay
                self._refetch_delay = min(self.refetch_max_s, 2 * self._refetch_delay)
                return []
            case TrainingFinished(task_id=task_id):
                self._check_task_id(task_id, event)
                self.state = AgentState.UPLOADING
                assert self.task is not None
                return [Upload(self.task)]
            case TrainingAborted(task_id=task_id, reason=reason):
                task = self._check_task_id(task_id, event)
                return self._decline(task, reason)
            case UploadDone(task_id=task_id):
                self._check_task_id(task_id, event)
                self._finish()
                return [self._status()]
            case UploadFailed(task_id=task_id):
                task = self._check_task_id(task_id, event)
                if now >= task.deadline_ts:
                    self._finish()
                    return [DropUpdate(task_id, DeclineReason.DEADLINE_PASSED), self._status()]
                delay = min(
                    self.upload_retry_max_s, self.upload_retry_min_s * 2**self._upload_attempts
                )
                self._upload_attempts += 1
                self.upload_retry_at = now + delay
                self.state = AgentState.BACKOFF
                return []
            case TaskCancelled(task_id=task_id, reason=reason):
                return self._on_cancel(task_id, reason)
            case DeclineSent():
                self._finish()
                return []
            case Shutdown():
                if self.state is AgentState.STOPPED:
                    return []
                self.state = AgentState.STOPPED
                self.task = None
                return [PublishStatus(AgentState.STOPPED, online=False), Close()]
        raise AgentProtocolError(f"unknown event {event!r}")  # pragma: no cover

    # ------------------------------------------------------------------ handlers

    def _status(self, declined: Declined | None = None) -> PublishStatus:
        task_id = (
            None if self.task is None or self.state is AgentState.DECLINED else self.task.task_id
        )
        return PublishStatus(self.state, task_id, declined)

    def _decline(self, task: TrainTask, reason: str) -> list[Command]:
        self.state = AgentState.DECLINED
        self.task = task
        return [self._status(Declined(task.task_id, str(reason)))]

    def _finish(self) -> None:
        self.state = AgentState.IDLE
        self.task = None
        self.upload_retry_at = None
        self._upload_attempts = 0

    def _check_task_id(self, task_id: str, event: Event) -> TrainTask:
        if self.task is None or self.task.task_id != task_id:
            current = None if self.task is None else self.task.task_id
            raise AgentProtocolError(
                f"{type(event).__name__} for task {task_id!r}, the current task is {current!r}"
            )
        return self.task

    def _start(self, task: TrainTask, snap: TelemetrySnapshot, now: float) -> list[Command]:
        """Check the task against a fresh reading; train or decline."""
        reason = check_task(
            task, snap, self.limits, now=now, supports_scaffold=self.supports_scaffold
        )
        if reason is not None:
            return self._decline(task, reason)
        self.state = AgentState.TRAINING
        self.task = task
        return [self._status(), Train(task)]

    def _on_task(self, task: TrainTask, snap: TelemetrySnapshot, now: float) -> list[Command]:
        if task.task_id in self._seen:
            log.info("ignoring duplicate task %s", task.task_id)
            return []
        self._seen[task.task_id] = None
        while len(self._seen) > _SEEN_TASKS:
            self._seen.popitem(last=False)
        if self.state is not AgentState.IDLE:
            return [self._status(Declined(task.task_id, DeclineReason.BUSY))]
        if now >= task.deadline_ts:
            log.info("dropping task %s: its deadline has passed", task.task_id)
            return self._decline(task, DeclineReason.DEADLINE_PASSED)
        if self.model_version == task.model_version:
            return self._start(task, snap, now)
        if self.model_version is not None and self.model_version > task.model_version:
            return self._decline(task, DeclineReason.MODEL_UNAVAILABLE)
        # Check what can be checked now; the model may take a while.
        reason = check_task(
            task, snap, self.limits, now=now, supports_scaffold=self.supports_scaffold
        )
        if reason is not None:
            return self._decline(task, reason)
        self.state = AgentState.FETCHING_MODEL
        self.task = task
        return [self._status()]

    def _on_cancel(self, task_id: str, reason: str) -> list[Command]:
        """Drop the task ``task_id`` if it is still held; training is aborted by the runner."""
        task = self.task
        if task is None or task.task_id != task_id:
            # Not (or no longer) held: remember it, so the task itself arriving late (a QoS-1
            # redelivery after a reconnect) is ignored.
            self._seen.setdefault(task_id, None)
            return []
        if self.state is AgentState.FETCHING_MODEL:
            log.info("task %s cancelled (%s) while waiting for its model", task_id, reason)
            self._finish()
            return [self._status()]
        if self.state in (AgentState.UPLOADING, AgentState.BACKOFF):
            self._finish()
            return [DropUpdate(task_id, f"{DeclineReason.CANCELLED}: {reason}"), self._status()]
        return []  # TRAINING: the runner aborts it; DECLINED: already let go

    def _on_model(self, version: int, snap: TelemetrySnapshot, now: float) -> list[Command]:
        if self.model_version is None or version >= self.model_version:
            self.model_version = version
        self.refetch_at = None
        self._refetch_delay = self.refetch_min_s
        task = self.task
        if self.state is not AgentState.FETCHING_MODEL or task is None:
            return []
        if version == task.model_version:
            return self._start(task, snap, now)
        if version > task.model_version:
            return self._decline(task, DeclineReason.MODEL_UNAVAILABLE)
        return []

    def _on_tick(self, now: float) -> list[Command]:
        commands: list[Command] = []
        if self.refetch_at is not None and now >= self.refetch_at:
            self.refetch_at = None
            wanted = self.task.model_version if self.task is not None else -1
            commands.append(FetchModel(wanted))
        task = self.task
        if self.state is AgentState.FETCHING_MODEL and task is not None:
            if now >= task.deadline_ts:
                return commands + self._decline(task, DeclineReason.MODEL_UNAVAILABLE)
        elif self.state is AgentState.BACKOFF and task is not None:
            if now >= task.deadline_ts:
                self._finish()
                return [
                    *commands,
                    DropUpdate(task.task_id, DeclineReason.DEADLINE_PASSED),
                    self._status(),
                ]
            if self.upload_retry_at is not None and now >= self.upload_retry_at:
                self.state = AgentState.UPLOADING
                self.upload_retry_at = None
                commands.append(Upload(task))
        if now >= self.next_heartbeat:
            commands.append(self._status())
        return commands


# --------------------------------------------------------------------------- runner


def _encode_raw_unchecked(
    delta: Mapping[str, F32], aux: Mapping[str, F32] | None
) -> tuple[tuple[TensorSpec, ...], tuple[bytes, ...]]:
    """Encode tensors as ``raw`` little-endian float32 without the finiteness check.

    Only for :attr:`AgentOptions.update_hook` (simulated NaN attacks): a real agent never
    sends a non-finite update.
    """
    specs: list[TensorSpec] = []
    payloads: list[bytes] = []
    for name, arr in {**delta, **(aux or {})}.items():
        shape = tuple(arr.shape) if not name.startswith(AUX_PREFIX) else (int(arr.size),)
        specs.append(TensorSpec(name, shape, dict(RAW)))
        payloads.append(np.ascontiguousarray(arr, dtype="<f4").tobytes())
    return tuple(specs), tuple(payloads)


UpdateHook: TypeAlias = Callable[[Mapping[str, F32]], Mapping[str, F32]]
"""Maps an update (tensor name -> ``new - global``) to the one actually sent (testing only)."""


@dataclass(frozen=True, slots=True)
class AgentOptions:
    """What the runner needs besides its collaborators (built from ``AgentConfig`` or the sim)."""

    fleet: str
    """Deployment name, the ``{fleet}`` of the topics."""
    cid: str
    """This device's id (its MQTT client id and username in production)."""
    limits: Limits = field(default_factory=Limits)
    heartbeat_s: float = 30.0
    """Publish the status at least this often."""
    hmac_key: bytes | None = field(default=None, repr=False)
    """Sign updates with HMAC-SHA256 under this key; None sends them unsigned."""
    chunk_size: int = DEFAULT_CHUNK_SIZE
    """Largest MQTT payload of one update chunk, in bytes."""
    max_model_bytes: int = 64 * 2**20
    """Largest model envelope the agent downloads (memory bound of the reassembler)."""
    model_timeout_s: float = 120.0
    """Drop a model download that receives no chunk for this long."""
    trainer_name: str = "numpy"
    """Reported in ``caps.trainers``."""
    supports_scaffold: bool | None = None
    """None: true for ``NumpyTrainer`` only (LiteRT cannot apply the SCAFFOLD correction)."""
    poll_s: float = 1.0
    """Longest wait for a message before the loop checks its timers and the stop flag."""
    stop_check_interval_s: float = 0.0
    """Read telemetry at most this often during training (0: before every batch)."""
    cache_model: bool = True
    """Keep the verified model on disk so a restarted agent skips the download."""
    update_hook: UpdateHook | None = field(default=None, repr=False, compare=False)
    """Simulation and testing only: transform the update (``new - global``) before encoding.

    ``fedge sim`` sets it on malicious devices (``edge.attacks``); ``fedge agent`` never does.
    A hook that returns non-finite values makes the agent send the update raw, bypassing the
    codec's refusal, so the coordinator's ``non_finite`` rejection can be exercised."""

    def __post_init__(self) -> None:
        if self.heartbeat_s <= 0 or self.poll_s <= 0:
            raise ValueError("heartbeat_s and poll_s must be > 0")
        if self.hmac_key is not None and not self.hmac_key:
            raise ValueError("hmac_key must be non-empty bytes or None")


@dataclass(slots=True)
class AgentStats:
    """Counters of one agent (read them from any thread; only the agent writes them)."""

    tasks_received: int = 0
    trainings: int = 0
    updates_sent: int = 0
    upload_failures: int = 0
    statuses_sent: int = 0
    models_loaded: int = 0
    models_corrupt: int = 0
    models_mismatched: int = 0
    """Intact models whose tensors do not fit this device's model config (not refetched)."""
    tasks_cancelled: int = 0
    """Tasks the coordinator withdrew while this device still held them (training stopped or
    the update not sent)."""
    bad_messages: int = 0
    """Messages rejected (the sum of :attr:`rejected`)."""
    declined: Counter[str] = field(default_factory=Counter)
    """Declines by reason."""
    rejected: Counter[str] = field(default_factory=Counter)
    """Rejected messages by reason: ``bad_topic``, ``bad_task``, ``bad_manifest``,
    ``bad_chunk`` (malformed, inconsistent or over the model budget)."""


class StatusRelay:
    """Holds the last online status so the transport can republish it on every reconnect.

    Pass it as ``on_connect_publish`` of ``MqttTransport``; it is called on the network
    thread and only returns what the agent stored (it never blocks).
    """

    def __init__(self) -> None:
        self._messages: list[Message] = []

    def set(self, message: Message | None) -> None:
        self._messages = [] if message is None else [message]

    def __call__(self) -> list[Message]:
        return list(self._messages)


@dataclass(frozen=True, slots=True)
class _LoadedModel:
    manifest: ModelManifest
    weights: dict[str, F32]
    scaffold_c: F32 | None


@dataclass(frozen=True, slots=True)
class _PreparedUpdate:
    task_id: str
    envelope: bytes
    residuals: dict[str, F32] | None
    c_local: dict[str, F32] | None
    summary: str = ""
    """What the training did, for the log line of the upload."""


_MODEL_CACHE: OrderedDict[str, tuple[dict[str, F32], F32 | None]] = OrderedDict()
_MODEL_CACHE_LOCK = threading.Lock()
_MODEL_CACHE_SIZE: Final = 4
"""Decoded models shared (read-only) by the agents of one process, keyed by SHA-256."""


def offline_will(fleet: str, cid: str) -> Message:
    """The Last Will of device ``cid``: ``{"v":1,"online":false}`` retained on its status."""
    return Message(Topics(fleet).status(cid), Status.offline_will().to_bytes(), True, 1)


def _zeros(layout: ModelLayout) -> dict[str, F32]:
    return {name: np.zeros(shape, dtype=np.float32) for name, shape in layout.entries}


class AgentRunner:
    """Runs one agent: drains ``transport``, feeds the machine, executes its commands.

    Parameters
    ----------
    transport
        A connected transport (its Last Will should be :func:`offline_will`).
    options
        Ids, limits and knobs.
    trainer, dataset
        The local trainer (its ``spec`` defines the model layout) and the local data.
    telemetry
        Where readings come from (host or simulated).
    store
        The state directory (model cache, residuals, SCAFFOLD ``c_i``); None keeps nothing.
    stop
        Set it to stop the agent: it publishes an offline status and closes the transport.
    clock
        Unix time (task deadlines are Unix times); ``time.time`` in production.
    rng
        Source of batch order.
    relay
        Receives every online status, for republishing on reconnect.
    """

    def __init__(
        self,
        transport: Transport,
        options: AgentOptions,
        *,
        trainer: Trainer,
        dataset: Dataset,
        telemetry: TelemetryProvider,
        store: AgentStore | None,
        stop: threading.Event,
        clock: Callable[[], float] = time.time,
        perf: Callable[[], float] = time.perf_counter,
        rng: np.random.Generator | None = None,
        relay: StatusRelay | None = None,
    ) -> None:
        if dataset.input_dim != trainer.spec.input_dim:
            raise ValueError(
                f"the data has {dataset.input_dim} features but the model expects "
                f"{trainer.spec.input_dim}; check the data path and the model settings"
            )
        self.options = options
        self.transport = transport
        self.trainer = trainer
        self.dataset = dataset
        self.telemetry = telemetry
        self.store = store
        self.stop = stop
        self.clock = clock
        self.perf = perf
        self.rng = rng if rng is not None else np.random.default_rng()
        self.relay = relay
        self.topics = Topics(options.fleet)
        self.layout = ModelLayout(tuple(shapes(trainer.spec)))
        supports_scaffold = options.supports_scaffold
        if supports_scaffold is None:
            supports_scaffold = isinstance(trainer, NumpyTrainer)
        self.machine = AgentMachine(
            limits=options.limits, supports_scaffold=supports_scaffold,
            heartbeat_s=options.heartbeat_s,
        )  # fmt: skip
        self.caps = Caps(
            trainers=(options.trainer_name,),
            codecs=tuple(codec_ids()),
            max_payload=options.max_model_bytes,
        )
        self.stats = AgentStats()
        self.rtt_ms: float | None = None
        self.samples_per_s: float | None = None
        self.model: _LoadedModel | None = None
        self._manifest: ModelManifest | None = None
        self._envelopes: dict[int, bytes] = {}
        self._download_epoch = 0
        self._reassembler = Reassembler(
            options.max_model_bytes, options.model_timeout_s, charge_overhead=True
        )
        self._prepared: _PreparedUpdate | None = None
        self._residuals: dict[str, F32] | None = None
        self._abort_reason: str | None = None
        self._older_seen: set[int] = set()
        """Older model versions announced, each warned about once."""
        self._held: deque[Message] = deque()
        """Messages taken off the transport while training or before an upload."""
        self._last_batch: float | None = None
        self._last_stop_check = -float("inf")

    # ------------------------------------------------------------------ loop

    def run(self) -> AgentStats:
        """Run until :attr:`stop` is set or the transport closes; return the counters."""
        try:
            self._load_cached_model()
            self.transport.subscribe(self.topics.task(self.options.cid))
            self.transport.subscribe(self.topics.model_all())
            self._feed(Connected())
            if self.model is not None:
                self._feed(ModelAvailable(self.model.manifest.model_version, self._sample()))
            while not self.stop.is_set():
                if self._held:  # taken off the transport while training: handle them first
                    msg: Message | None = self._held.popleft()
                else:
                    msg = self.transport.receive(self.options.poll_s)
                if msg is not None:
                    self._on_message(msg)
                self._feed(Tick())
        except TransportClosed:
            log.info("agent %s: transport closed", self.options.cid)
        finally:
            if self.machine.state is not AgentState.STOPPED:
                self._feed(Shutdown())
        return self.stats

    def _sample(self) -> TelemetrySnapshot:
        return self.telemetry.sample(self.clock())

    def _feed(self, event: Event) -> None:
        pending: list[Event] = [event]
        while pending:
            ev = pending.pop(0)
            for command in self.machine.handle(ev, self.clock()):
                follow = self._execute(command)
                if follow is not None:
                    pending.append(follow)
            if self.machine.state is AgentState.DECLINED and not isinstance(ev, DeclineSent):
                pending.append(DeclineSent())

    def _execute(self, command: Command) -> Event | None:
        match command:
            case PublishStatus():
                self._publish_status(command)
            case FetchModel():
                self._refetch()
            case Train(task=task):
                return self._train(task)
            case Upload(task=task):
                return self._upload(task)
            case DropUpdate(task_id=task_id, reason=reason):
                routine = reason.startswith(DeclineReason.CANCELLED)  # logged when it came
                log.log(
                    logging.DEBUG if routine else logging.WARNING,
                    "dropping the update of task %s: %s",
                    task_id,
                    reason,
                )
                self._prepared = None
            case Close():
                self.transport.close()
        return None

    # ------------------------------------------------------------------ messages

    def _on_message(self, msg: Message) -> None:
        try:
            kind, _cid = self.topics.parse(msg.topic)
        except WireError:
            self._count_rejected("bad_topic")
            return
        if not msg.payload:  # a cleared retained message
            return
        try:
            if kind is TopicKind.TASK:
                parsed = parse_task_message(msg.payload)
                if isinstance(parsed, TaskCancel):
                    self._on_cancel(parsed)
                else:
                    self.stats.tasks_received += 1
                    self._feed(TaskReceived(parsed, self._sample()))
            elif kind is TopicKind.MODEL_MANIFEST:
                self._on_manifest(ModelManifest.from_bytes(msg.payload))
            elif kind is TopicKind.MODEL_CHUNK:
                self._on_chunk(msg.topic, msg.payload)
        except (WireError, ChunkError) as exc:
            reason = {
                TopicKind.TASK: "bad_task",
                TopicKind.MODEL_MANIFEST: "bad_manifest",
            }.get(kind, "bad_chunk")
            self._count_rejected(reason)
            text = str(exc)
            if len(text) > 300:  # one bad message must not flood the log
                text = f"{text[:300]}... ({len(text)} characters)"
            log.warning(
                "agent %s: ignoring a bad message on %s (%s): %s",
                self.options.cid, msg.topic, reason, text,
            )  # fmt: skip

    def _on_cancel(self, cancel: TaskCancel) -> None:
        task = self.machine.task
        held = (AgentState.FETCHING_MODEL, AgentState.UPLOADING, AgentState.BACKOFF)
        if task is not None and task.task_id == cancel.task_id and self.machine.state in held:
            self._count_cancel(cancel)
        self._feed(TaskCancelled(cancel.task_id, cancel.reason))

    def _count_cancel(self, cancel: TaskCancel) -> None:
        self.stats.tasks_cancelled += 1
        log.info(
            "agent %s: task %s cancelled by the coordinator (%s)",
            self.options.cid, cancel.task_id, cancel.reason,
        )  # fmt: skip

    def _cancel_waiting(self, task: TrainTask) -> TaskCancel | None:
        """The cancel of ``task`` if one is waiting on the transport.

        Called while training and before uploading, when the loop is not draining the
        transport: every message taken off is kept for the loop, but the cancel.
        """
        found: TaskCancel | None = None
        try:
            # Bounded, so that the transport's back-pressure still holds while training.
            while len(self._held) < _HELD_MAX and (msg := self.transport.receive(0.0)) is not None:
                if found is None and msg.topic == self.topics.task(self.options.cid):
                    try:
                        parsed = parse_task_message(msg.payload)
                    except WireError:
                        parsed = None  # the loop counts it as bad
                    if isinstance(parsed, TaskCancel) and parsed.task_id == task.task_id:
                        self._count_cancel(parsed)
                        found = parsed
                        continue
                self._held.append(msg)
        except TransportClosed:
            pass  # the loop sees it at its next receive
        return found

    def _count_rejected(self, reason: str) -> None:
        self.stats.rejected[reason] += 1
        self.stats.bad_messages += 1

    def _on_manifest(self, manifest: ModelManifest) -> None:
        have = self.model.manifest if self.model is not None else None
        if have is not None and manifest.model_version < have.model_version:
            if manifest.model_version not in self._older_seen:  # once per version
                self._older_seen.add(manifest.model_version)
                log.warning(
                    "agent %s: the coordinator announces model version %d, older than the "
                    "version %d this device holds; it loads only newer versions, so it will "
                    "decline tasks on older ones (a coordinator started from another or an "
                    "older state db? to follow it, delete model.bin and model.json in this "
                    "device's state_dir)",
                    self.options.cid, manifest.model_version, have.model_version,
                )  # fmt: skip
            return
        if have is not None and manifest.model_version == have.model_version:
            return  # cached
        self._manifest = manifest
        self._envelopes = {v: e for v, e in self._envelopes.items() if v == manifest.model_version}
        self._try_complete()

    def _on_chunk(self, topic: str, payload: bytes) -> None:
        version, _index = self.topics.parse_model_chunk(topic)
        if self.model is not None and version <= self.model.manifest.model_version:
            return
        if self._manifest is not None and version != self._manifest.model_version:
            return
        data = self._reassembler.feed(
            f"model/{version}/{self._download_epoch}", payload, self.perf()
        )
        if data is None:
            return
        if self._envelopes and max(self._envelopes) > version:
            return
        self._envelopes = {version: data}
        self._try_complete()

    def _try_complete(self) -> None:
        manifest = self._manifest
        if manifest is None:
            return
        envelope = self._envelopes.pop(manifest.model_version, None)
        if envelope is None:
            return
        try:
            manifest.verify(envelope)
            weights, scaffold_c = self._decode_model(manifest, envelope)
        except ModelMismatchError as exc:
            # Intact (its SHA-256 matched) but made for another model: fetching it again
            # cannot help, and on a metered link each fetch costs the whole model.
            self.stats.models_mismatched += 1
            self._manifest = None
            log.error(
                "agent %s: model version %d does not fit this device's model config: %s; make "
                "[model] in the agent config match the coordinator's. Not fetching it again; "
                "tasks are declined (model_unavailable) until a model that fits arrives",
                self.options.cid, manifest.model_version, exc,
            )  # fmt: skip
            return
        except WireError as exc:  # ChecksumError, EnvelopeError, LayoutError, ...
            self.stats.models_corrupt += 1
            log.warning(
                "agent %s: model %d is corrupt, fetching it again: %s",
                self.options.cid, manifest.model_version, exc,
            )  # fmt: skip
            self._feed(ModelCorrupt(manifest.model_version, str(exc)))
            return
        if self.store is not None and self.options.cache_model:
            try:
                self.store.save_model(manifest, envelope)
            except OSError as exc:
                log.warning("cannot cache the model in %s: %s", self.store.directory, exc)
        self.model = _LoadedModel(manifest, weights, scaffold_c)
        self._manifest = None
        self.stats.models_loaded += 1
        self._feed(ModelAvailable(manifest.model_version, self._sample()))

    def _decode_model(
        self, manifest: ModelManifest, envelope: bytes
    ) -> tuple[dict[str, F32], F32 | None]:
        with _MODEL_CACHE_LOCK:
            hit = _MODEL_CACHE.get(manifest.sha256)
            if hit is not None:
                _MODEL_CACHE.move_to_end(manifest.sha256)
                return hit
        model = GlobalModel.from_bytes(envelope)
        try:
            self.layout.check_specs(model.tensors, aux={SCAFFOLD_C: self.layout.size})
        except LayoutError as exc:
            raise ModelMismatchError(str(exc)) from None
        unpacked = unpack_model(model)
        scaffold_c = unpacked.pop(SCAFFOLD_C, None)
        weights = {name: unpacked[name] for name in self.layout.names}
        for name, arr in (*weights.items(), ("c", scaffold_c)):
            if arr is not None:
                if not np.isfinite(arr).all():
                    raise LayoutError(f"model tensor {name!r} holds NaN or infinity")
                arr.flags.writeable = False  # shared between the agents of a process
        result = (weights, scaffold_c)
        with _MODEL_CACHE_LOCK:
            _MODEL_CACHE[manifest.sha256] = result
            while len(_MODEL_CACHE) > _MODEL_CACHE_SIZE:
                _MODEL_CACHE.popitem(last=False)
        return result

    def _load_cached_model(self) -> None:
        if self.store is None or not self.options.cache_model:
            return
        cached = self.store.load_model()
        if cached is None:
            return
        manifest, envelope = cached
        try:
            weights, scaffold_c = self._decode_model(manifest, envelope)
        except WireError as exc:
            log.warning("ignoring the cached model: %s", exc)
            return
        self.model = _LoadedModel(manifest, weights, scaffold_c)
        log.info("agent %s: cached model version %d", self.options.cid, manifest.model_version)

    def _refetch(self) -> None:
        # A new reassembler source key: the reassembler remembers completed transfer ids
        # and would otherwise drop the redelivered chunks as duplicates.
        self._download_epoch += 1
        self._envelopes.clear()
        try:
            self.transport.subscribe(self.topics.model_all())  # the broker resends retained
        except TransportError as exc:
            log.warning("agent %s: cannot refetch the model: %s", self.options.cid, exc)
            self._feed_later_corrupt()

    def _feed_later_corrupt(self) -> None:
        version = self.machine.model_version if self.machine.model_version is not None else -1
        self._feed(ModelCorrupt(version, "refetch failed"))

    # ------------------------------------------------------------------ status

    def _publish_status(self, command: PublishStatus) -> None:
        topic = self.topics.status(self.options.cid)
        if command.online:
            status = build_status(
                self._sample(),
                now=self.clock(),
                num_examples=self.dataset.num_examples,
                samples_per_s=self.samples_per_s,
                rtt_ms=self.rtt_ms,
                caps=self.caps,
                state=command.state.value,
                task_id=command.task_id,
                declined=command.declined,
            )
            if self.relay is not None:
                plain = replace(status, declined=None)
                self.relay.set(Message(topic, plain.to_bytes(), True, 1))
        else:
            status = Status.offline_will()
            if self.relay is not None:
                self.relay.set(None)
        if command.declined is not None:
            self.stats.declined[command.declined.reason] += 1
            log.info(
                "agent %s declined task %s: %s",
                self.options.cid, command.declined.task_id, command.declined.reason,
            )  # fmt: skip
        start = self.perf()
        try:
            # QoS 1 waits for the PUBACK: its round trip is the RTT reported next time.
            self.transport.publish(topic, status.to_bytes(), qos=1, retain=True)
        except TransportError as exc:
            log.warning("agent %s: status not published: %s", self.options.cid, exc)
            return
        self.rtt_ms = max(0.0, (self.perf() - start) * 1000.0)
        self.stats.statuses_sent += 1

    # ------------------------------------------------------------------ training

    def _should_stop(self, task: TrainTask) -> bool:
        # Polled before every batch: play a slow CPU, keep the heartbeat, check the rules.
        factor = self.telemetry.speed_factor
        if self._last_batch is not None:
            took = self.perf() - self._last_batch
            wait = took * (1.0 / factor - 1.0) if factor < 1.0 else 0.0
            wait = max(wait, self.telemetry.min_batch_s - took)
            if wait > 0:
                self.stop.wait(wait)
        self._last_batch = self.perf()
        if self.stop.is_set():
            self._abort_reason = "shutting_down"
            return True
        t = self.perf()
        if t - self._last_stop_check < self.options.stop_check_interval_s:
            return False
        self._last_stop_check = t
        now = self.clock()
        if now >= self.machine.next_heartbeat:
            self._feed(Tick())
        reason = stop_reason(
            self._sample(), self.options.limits, now=now, deadline_ts=task.deadline_ts
        )
        if reason is None and self._cancel_waiting(task) is not None:
            reason = DeclineReason.CANCELLED
        if reason is not None:
            self._abort_reason = reason
            return True
        return False

    def _train(self, task: TrainTask) -> Event:
        model = self.model
        if model is None or model.manifest.model_version != task.model_version:
            return TrainingAborted(task.task_id, DeclineReason.MODEL_UNAVAILABLE)
        self._abort_reason = None
        self._last_batch = None
        self._last_stop_check = -float("inf")
        self.telemetry.set_training(True, self.clock())
        try:
            control = self._scaffold_control(model) if is_scaffold(task) else None
            self.trainer.set_weights(model.weights)
            extra = task.train.extra
            steps = extra.get("max_steps", extra.get("local_steps"))
            result = self.trainer.fit(
                self.dataset.x,
                self.dataset.y,
                epochs=task.train.epochs,
                batch_size=task.train.batch_size,
                lr=task.train.lr,
                rng=self.rng,
                prox_mu=task.train.prox_mu,
                control=control,
                max_steps=None if steps is None else max(0, int(steps)),
                should_stop=lambda: self._should_stop(task),
            )
            aborted = self._take_abort_reason()
            # A stopped run measured the device's speed too: a device that is often cancelled
            # (a straggler) still reports it, which speed-aware selection needs.
            if result.samples_per_s > 0:
                self.samples_per_s = result.samples_per_s
            if aborted is not None:
                return TrainingAborted(task.task_id, aborted)
            self.stats.trainings += 1
            self._prepared = self._encode(task, model, result, control)
        except (ValueError, RuntimeError, CodecError) as exc:  # TrainingError, LiteRT errors
            log.exception("agent %s: training task %s failed", self.options.cid, task.task_id)
            self._prepared = None
            return TrainingAborted(task.task_id, f"{DeclineReason.TRAINING_FAILED}: {exc}"[:200])
        finally:
            self.telemetry.set_training(False, self.clock())
        return TrainingFinished(task.task_id)

    def _take_abort_reason(self) -> str | None:
        # Set by _should_stop, which fit() calls; a method so the type checker sees it change.
        reason, self._abort_reason = self._abort_reason, None
        return reason

    def _scaffold_control(self, model: _LoadedModel) -> ScaffoldControl:
        c_global = (
            _zeros(self.layout) if model.scaffold_c is None
            else self.layout.unflatten(model.scaffold_c)
        )  # fmt: skip
        c_local = None if self.store is None else self.store.load_scaffold_control(self.layout)
        return ScaffoldControl(c_global, c_local if c_local is not None else _zeros(self.layout))

    def _encode(
        self,
        task: TrainTask,
        model: _LoadedModel,
        result: FitResult,
        control: ScaffoldControl | None,
    ) -> _PreparedUpdate:
        new = self.trainer.get_weights()
        delta = {name: new[name] - model.weights[name] for name in self.layout.names}
        hook = self.options.update_hook
        if hook is not None:  # simulation/testing only (AgentOptions.update_hook)
            delta = dict(hook(delta))
            self.layout.check_weights(delta)
        config = seeded_codec_config(task.uplink_codec, task.nonce)
        codec = get_codec(config)
        feedback: dict[str, ErrorFeedback] | None = None
        if task.error_feedback:
            saved = self._load_residuals()
            # ErrorFeedback only reads the residual it is given (the new one goes to a
            # buffer of its own), so the committed state needs no defensive copy.
            feedback = {
                name: ErrorFeedback(codec, int(t.size), t.ravel()) for name, t in saved.items()
            }
        aux: dict[str, F32] | None = None
        if control is not None:
            assert result.control_delta is not None
            aux = {SCAFFOLD_DELTA: self.layout.flatten(result.control_delta)}
        if hook is not None and not all(np.isfinite(t).all() for t in delta.values()):
            # A poisoned simulated device: send the non-finite values raw so they reach the
            # coordinator's non_finite check (every codec, raw included, refuses to encode them).
            specs, payloads = _encode_raw_unchecked(delta, aux)
            feedback = None
        else:
            specs, payloads = encode_update(delta, config, feedback=feedback, aux=aux)
        metrics = {
            "num_steps": float(result.num_steps),
            "samples_per_s": float(result.samples_per_s),
            "duration_s": float(result.duration_s),
        }
        if np.isfinite(result.loss):
            metrics["loss"] = float(result.loss)
        update = ModelUpdate(
            task_id=task.task_id,
            round_no=task.round_no,
            model_version=task.model_version,
            cid=self.options.cid,
            num_examples=result.num_examples,
            tensors=specs,
            payloads=payloads,
            metrics=metrics,
            nonce=task.nonce,
            extra={"local_steps": result.num_steps},
        )
        residuals = None
        if feedback is not None:
            residuals = {
                name: fb.residual.reshape(shape)
                for (name, shape), fb in zip(self.layout.entries, feedback.values(), strict=True)
            }
        return _PreparedUpdate(
            task.task_id,
            update.to_bytes(self.options.hmac_key),
            residuals,
            result.new_c_local,
            f"{result.num_examples} examples, {result.num_steps} steps in "
            f"{result.duration_s:.1f} s",
        )

    def _load_residuals(self) -> dict[str, F32]:
        if self._residuals is None and self.store is not None:
            self._residuals = self.store.load_residuals(self.layout)
        return self._residuals if self._residuals is not None else _zeros(self.layout)

    def _upload(self, task: TrainTask) -> Event:
        prepared = self._prepared
        if prepared is None or prepared.task_id != task.task_id:
            return UploadFailed(task.task_id, "no encoded update")
        cancel = self._cancel_waiting(task)
        if cancel is not None:  # the round closed while this device trained
            return TaskCancelled(task.task_id, cancel.reason)
        try:
            publish_chunked(
                self.transport,
                self.topics.update(self.options.cid),
                prepared.envelope,
                chunk_size=self.options.chunk_size,
            )
        except TransportError as exc:
            self.stats.upload_failures += 1
            log.warning(
                "agent %s: upload of task %s failed: %s", self.options.cid, task.task_id, exc
            )
            return UploadFailed(task.task_id, str(exc))
        # Commit device state only once the update is out: a lost update leaves it as it was.
        if prepared.residuals is not None:
            self._residuals = prepared.residuals
            if self.store is not None:
                self.store.save_residuals(self.layout, prepared.residuals)
        if prepared.c_local is not None and self.store is not None:
            self.store.save_scaffold_control(self.layout, prepared.c_local)
        self._prepared = None
        self.stats.updates_sent += 1
        # One line per task at INFO: an operator reading the journal sees the device work.
        log.info(
            "agent %s: round %d task %s done: %s, %d bytes uploaded",
            self.options.cid, task.round_no, task.task_id, prepared.summary,
            len(prepared.envelope),
        )  # fmt: skip
        return UploadDone(task.task_id)


# --------------------------------------------------------------------------- running agents


def run_agent(
    transport: Transport,
    options: AgentOptions,
    *,
    trainer: Trainer,
    dataset: Dataset,
    telemetry: TelemetryProvider,
    store: AgentStore | None,
    stop: threading.Event,
    clock: Callable[[], float] = time.time,
    rng: np.random.Generator | None = None,
    relay: StatusRelay | None = None,
) -> AgentStats:
    """Run one agent on the calling thread until ``stop`` is set; return its counters."""
    runner = AgentRunner(
        transport, options, trainer=trainer, dataset=dataset, telemetry=telemetry,
        store=store, stop=stop, clock=clock, rng=rng, relay=relay,
    )  # fmt: skip
    return runner.run()


@dataclass(slots=True)
class AgentHandle:
    """One agent running in its own thread."""

    runner: AgentRunner
    thread: threading.Thread
    stop: threading.Event

    def request_stop(self) -> None:
        """Ask the agent to stop (offline status, clean disconnect); returns at once."""
        self.stop.set()

    def join(self, timeout: float | None = None) -> bool:
        """Wait for the agent's thread; return True when it ended."""
        self.thread.join(timeout)
        return not self.thread.is_alive()


def start_agent_thread(
    transport: Transport,
    options: AgentOptions,
    *,
    trainer: Trainer,
    dataset: Dataset,
    telemetry: TelemetryProvider,
    store: AgentStore | None,
    stop: threading.Event | None = None,
    clock: Callable[[], float] = time.time,
    rng: np.random.Generator | None = None,
    relay: StatusRelay | None = None,
) -> AgentHandle:
    """Start one agent in a daemon thread named ``agent-{cid}``."""
    stop = stop if stop is not None else threading.Event()
    runner = AgentRunner(
        transport, options, trainer=trainer, dataset=dataset, telemetry=telemetry,
        store=store, stop=stop, clock=clock, rng=rng, relay=relay,
    )  # fmt: skip

    def main() -> None:
        try:
            runner.run()
        except Exception:
            log.exception("agent %s crashed", options.cid)

    thread = threading.Thread(target=main, name=f"agent-{options.cid}", daemon=True)
    thread.start()
    return AgentHandle(runner, thread, stop)


def connect_agent_transport(
    settings: MqttSettings, fleet: str, cid: str, *, client_id_prefix: str = ""
) -> tuple[Transport, StatusRelay]:
    """Connect one device over MQTT: client id ``cid`` (after ``client_id_prefix``, for
    simulated devices on a shared broker), Last Will :func:`offline_will`, and a
    :class:`StatusRelay` that republishes the status on every reconnect."""
    from edge.mqtt_transport import MqttTransport

    relay = StatusRelay()
    client_id = client_id_prefix + cid
    if settings.client_id != client_id:
        settings = replace(settings, client_id=client_id)
    transport = MqttTransport(settings, will=offline_will(fleet, cid), on_connect_publish=relay)
    return transport, relay
