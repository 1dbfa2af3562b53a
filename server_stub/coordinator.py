"""The coordinator service: one loop that drains the transport and executes round commands.

This module owns :class:`Coordinator`, the only place where the pure pieces (registry,
round machine, validator, strategy) meet I/O (transport, store, clock). Rules:

- One thread runs :meth:`Coordinator.run`; it alone touches every object here.
- A message is handled completely before the next is read: status → registry (→ drop a
  device that said it will not report, or whose status no longer names the task it
  acknowledged: ``lost_task``); update chunks → reassembler → envelope and
  signature → task checks (round machine) → content checks (validator, scratch vector) →
  strategy ``accept``. Nothing rejected touches the model; every rejection is counted.
- The open round's snapshot (issued tasks, acknowledgements) is saved before tasks go out,
  before an update is folded when an acknowledgement is not yet saved, and at the next tick
  after one arrives; so every folded update's acknowledgement is on disk and a restarted
  coordinator can ask again the devices whose updates died with it.
- Every folded update's envelope is stored (``Store.save_folded``) before the round machine
  counts it; a restarted coordinator folds the stored ones into the reopened round (async:
  the buffer of the current version) again, in their order, instead of asking those devices
  to train again.
- With ``require_signature`` an update of the topic's device rejected ``bad_envelope``,
  ``bad_signature`` or ``wrong_cid`` fails that device's task at once (the production
  broker's ACL lets only the device publish on its update topic). Refused twice in a row for
  such a fault of its own (:data:`DEVICE_FAULTS`), a device is held back from selection.
- A round that closes at its target withdraws the tasks still out (``TaskCancel`` on the
  device's task topic), so stragglers stop training instead of uploading for nothing.
- A new model version is checkpointed (SQLite, one transaction) **before** it is published
  (retained manifest + chunks; the previous version's retained chunks are cleared).
- ``bytes_down`` of a round = bytes of every task published for it + the model envelope's
  chunk bytes (and manifest) once for each selected device whose last task named another
  model version (a device fetches each version once; see docs/COORDINATOR.md).
  ``bytes_up`` = update chunk bytes received while the round was open, rejected ones included.
- SCAFFOLD: the server control variate ``c`` rides in the global model envelope as the flat
  tensor ``aux/scaffold_c``; devices send Δc_i as ``aux/scaffold``; tasks carry
  ``strategy = {"id": "scaffold", "control_variate": "aux/scaffold_c", "control_delta":
  "aux/scaffold"}``.
"""

from __future__ import annotations

import hashlib
import logging
import math
import secrets
import threading
import time
from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from edge.chunking import Reassembler, new_transfer_id, split
from edge.modelio import AUX_PREFIX, F32, LayoutError, ModelLayout, pack_model, unpack_model
from edge.transport import Message, Transport, TransportClosed, TransportError
from edge.wire import (
    GlobalModel,
    JSONValue,
    ModelManifest,
    ModelUpdate,
    Status,
    TaskCancel,
    TopicKind,
    Topics,
    TrainParams,
    TrainTask,
    WireError,
)
from server_stub.config import CoordinatorConfig, _strategy_params
from server_stub.faults import crash_point
from server_stub.metrics import CoordinatorMetrics
from server_stub.registry import Registry
from server_stub.rounds import (
    AbandonRound,
    Aggregate,
    AggregationDone,
    AggregationFailed,
    Command,
    DeviceUnavailable,
    DropDevice,
    Event,
    FoldUpdate,
    RejectUpdate,
    RoundMachine,
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
from server_stub.selection import make_selector
from server_stub.store import FoldedUpdate, Store, StoredModel
from server_stub.strategies import AcceptedUpdate, Scaffold, Strategy, make_strategy
from server_stub.validation import (
    SCAFFOLD_C_AUX,
    SCAFFOLD_DELTA_AUX,
    Decoded,
    RejectCode,
    Rejected,
    UpdateValidator,
)

logger = logging.getLogger(__name__)

BAD_TOPIC = "bad_topic"
"""Rejection reason: a message on a topic with an invalid id (PROTOCOL.md §2, §7)."""
BAD_STATUS = "bad_status"
"""Rejection reason: a status that is not a valid v1 ``Status`` (the previous one is kept)."""
_LOG_DETAIL_CHARS = 300


def _clip(text: str) -> str:
    """Bound what one bad message can write to the log (an error may quote a huge value)."""
    if len(text) <= _LOG_DETAIL_CHARS:
        return text
    return f"{text[:_LOG_DETAIL_CHARS]}... ({len(text)} characters)"


Evaluate = Callable[[dict[str, F32]], Mapping[str, float]]
"""Model evaluation injected by the composition root: weights → at least accuracy and loss."""
OnRound = Callable[[dict[str, Any]], None]


class CheckpointMismatchError(LayoutError):
    """The store's newest checkpoint cannot be resumed with this model layout (it cannot be
    decoded, or it was made with another ``[model]``). Nothing was written."""


def checkpoint_weights(
    store: Store, layout: ModelLayout
) -> tuple[StoredModel, dict[str, np.ndarray]] | None:
    """The store's newest checkpoint and its model tensors, checked against ``layout``; None
    when the store holds none. The coordinator resumes from it; ``fedge coordinator`` also
    calls this before it connects, to refuse a checkpoint of another model early.

    Raises
    ------
    CheckpointMismatchError
        The checkpoint cannot be decoded, or its tensors do not match ``layout``.
    """
    stored = store.latest_model()
    if stored is None:
        return None
    try:
        weights = unpack_model(GlobalModel.from_bytes(stored.envelope))
    except WireError as exc:  # LayoutError included
        raise CheckpointMismatchError(
            f"the checkpoint (model version {stored.version}) in state db {store.path} cannot "
            f"be decoded ({exc}); move the file away or point [state] db elsewhere"
        ) from None
    model = {name: w for name, w in weights.items() if not name.startswith(AUX_PREFIX)}
    try:
        layout.check_weights(model)
    except LayoutError:
        raise CheckpointMismatchError(
            f"the checkpoint in {store.path} was made with a different model (it has "
            f"{_shapes(ModelLayout.of(model))}; [model] gives {_shapes(layout)}); restore "
            "[model] or use a new [state] db"
        ) from None
    return stored, weights


def _shapes(layout: ModelLayout) -> str:
    return ", ".join(f"{name} {'x'.join(map(str, shape))}" for name, shape in layout.entries)


@dataclass(slots=True)
class _RoundIO:
    """Per-round counters the machine does not keep."""

    started_at: float = 0.0
    bytes_up: int = 0
    bytes_down: int = 0
    accepted: list[tuple[str, str]] = field(default_factory=list)
    examples: int = 0
    cancelled: int = 0
    dropped_by_reason: Counter[str] = field(default_factory=Counter)
    """Why devices left their task this round (``declined:model_unavailable``, ``deadline``)."""
    waiting_logged: bool = False


DEVICE_FAULTS: frozenset[str] = frozenset(
    {"bad_envelope", "bad_signature", "wrong_cid", "layout_mismatch"}
)
"""Refusals of a device's update that only a change on the device fixes (its key, its agent,
its model config): repeated, they hold the device back (``Registry.record_refusal``)."""
REFUSAL_COOLDOWN_MAX_S = 3600.0
"""The longest a device is held back after repeated refusals."""


@dataclass(frozen=True, slots=True)
class _Received:
    """An update whose envelope passed its checks, with the bytes it came in."""

    update: ModelUpdate
    data: bytes


class Coordinator:
    """The coordinator service.

    Parameters
    ----------
    config
        Validated configuration (:func:`server_stub.config.load_config`).
    transport
        Connected transport (``MqttTransport`` or ``InMemoryTransport``); the coordinator
        subscribes itself and closes it in :meth:`close`.
    store
        State database; the coordinator resumes from its last checkpoint.
    layout, initial_weights
        The model; ``initial_weights`` is used only when the store holds no checkpoint.
    evaluate
        Optional held-out evaluation of a new model (returns ``accuracy`` and ``loss``).
    on_round
        Called with each round's record (see :meth:`_record`) after it is stored.
    clock
        Wall clock in seconds (task deadlines travel as Unix time); injectable for tests.
    rng
        Randomness of selection, task ids and nonces; default seeded from ``config.seed``.
    """

    def __init__(
        self,
        config: CoordinatorConfig,
        transport: Transport,
        store: Store,
        *,
        layout: ModelLayout,
        initial_weights: Mapping[str, np.ndarray],
        evaluate: Evaluate | None = None,
        on_round: OnRound | None = None,
        clock: Callable[[], float] = time.time,
        rng: np.random.Generator | None = None,
        metrics: CoordinatorMetrics | None = None,
    ) -> None:
        self.config = config
        self.transport = transport
        self.store = store
        self.layout = layout
        self.evaluate = evaluate
        self.on_round = on_round
        self.clock = clock
        self.topics = Topics(config.fleet)
        self.strategy: Strategy = make_strategy(config.strategy, _strategy_params(config))
        self.scaffold = isinstance(self.strategy, Scaffold)
        self.selector = make_selector(config.selection, dict(config.selection_params))
        self.registry = Registry(config.eligibility)
        self.metrics = (
            metrics if metrics is not None else CoordinatorMetrics(port=config.metrics_port)
        )
        keys = config.hmac_keys()
        self.validator = UpdateValidator(
            layout,
            keys=(lambda cid: keys.get(cid or "")) if keys else None,
            require_signature=config.validation.require_signature,
            max_update_norm=config.validation.max_update_norm,
            max_envelope_size=int(config.validation.max_envelope_mb * 1024 * 1024),
            aux={SCAFFOLD_DELTA_AUX: layout.size} if self.scaffold else None,
        )
        max_env = int(config.validation.max_envelope_mb * 1024 * 1024)
        # Bookkeeping is charged against the budgets (chunks come from untrusted devices);
        # a device may have a second transfer open when it retries after a failed upload.
        self.reassembler = Reassembler(
            max_bytes=max(4 * max_env, 256 * 1024 * 1024),
            timeout_s=max(30.0, config.rounds.deadline_s),
            max_bytes_per_source=2 * max_env,
            charge_overhead=True,
        )
        self._io = _RoundIO()
        self._device_version: dict[str, int] = {}
        self._published: tuple[int, int] | None = None
        self._model_bytes = 0
        self._last_eval: Mapping[str, float] = {}
        self._closed = False
        self.rounds_finished = 0
        self.last_record: dict[str, Any] | None = None

        self.model, self.model_version, round_no = self._resume(initial_weights)
        self._envelope = self._pack(self.model, self.model_version, round_no - 1)
        self.last_round_done = round_no - 1
        """The highest round number finished, by this process or (from the store) an earlier one."""
        # A fixed seed makes a fresh run reproducible; each later start on the same store
        # draws another stream, or every restart would repeat the same selections and task
        # ids (and the ids would collide with those of the round it reopens).
        starts = int(store.get_meta("starts") or 0)
        store.set_meta("starts", str(starts + 1))
        salt = store.get_meta("task_id_salt")
        if salt is None:  # one per state db: another deployment never repeats its task ids
            salt = secrets.token_hex(3)
            store.set_meta("task_id_salt", salt)
        seed: int | list[int] | None = config.seed
        if config.seed is not None and starts:
            seed = [config.seed, starts]
        self.machine = RoundMachine(
            config.rounds,
            self.selector,
            rng if rng is not None else np.random.default_rng(seed),
            round_no=round_no,
            model_version=self.model_version,
            accepted_task_ids=store.accepted_task_ids(),
            fail_task_on_bad_envelope=config.validation.require_signature,
            task_id_salt=salt,
        )
        self._acks_unsaved = False
        """An acknowledgement arrived that the stored snapshot does not hold yet."""
        self._sessions_lost = self._broker_sessions_lost()
        """The transport's count of reconnects without a session, as last seen."""
        self._restore_cmds: list[Command] = []
        self._refold: list[tuple[FoldedUpdate, ModelUpdate]] = []
        """Updates kept by the store that the reopened round folds in again."""
        snap = store.open_round()
        if snap is not None:
            self._refold = self._kept_updates(round_no)
            self._restore_cmds = self.machine.restore(
                snap,
                {kept.task_id: kept.meta.get("loss") for kept, _ in self._refold},
                now=self.clock(),
            )
            if self._restore_cmds:
                logger.info(
                    "resuming open round %d from the store (%d update(s) folded before the "
                    "restart are kept)",
                    round_no,
                    len(self._refold),
                )
            else:
                self._refold = []
        store.drop_folded(before_round=round_no)
        self._started = False

    # -- startup -----------------------------------------------------------------------------

    def _resume(self, initial: Mapping[str, np.ndarray]) -> tuple[F32, int, int]:
        found = checkpoint_weights(self.store, self.layout)
        if found is None:
            weights = {k: np.asarray(v, dtype=np.float32) for k, v in initial.items()}
            flat = self.layout.flatten(weights)
            envelope = self._pack(flat, 0, 0)
            self.store.checkpoint(
                version=0, round_no=0, envelope=envelope, state={}, record=None, accepted=()
            )
            logger.info("fresh start: model version 0 (%d parameters)", self.layout.size)
            return flat, 0, 1
        stored, weights = found
        flat = self.layout.flatten({n: weights[n] for n in self.layout.names})
        if stored.state:
            self.strategy.load_state_dict(stored.state)
        round_no = max(self.store.last_round_no(), stored.round_no) + 1
        logger.info(
            "resumed from checkpoint: model version %d, next round %d", stored.version, round_no
        )
        return flat, stored.version, round_no

    def _kept_updates(self, round_no: int) -> list[tuple[FoldedUpdate, ModelUpdate]]:
        """The updates the store kept for ``round_no`` that still pass the checks.

        One that fails them now (its device's key was changed, a bound was lowered) is
        dropped from the store and left out: the reopened round treats its task as lost and
        asks the device again.
        """
        usable: list[tuple[FoldedUpdate, ModelUpdate]] = []
        dropped: list[str] = []
        for kept in self.store.folded(round_no):
            parsed = self.validator.parse(kept.envelope, kept.cid)
            checked = parsed if isinstance(parsed, Rejected) else self.validator.decode(parsed)
            if isinstance(checked, Rejected):
                logger.warning(
                    "update %s from %s, kept from before the restart, is refused now: %s (%s)",
                    kept.task_id,
                    kept.cid,
                    checked.reason,
                    _clip(checked.detail),
                )
                dropped.append(kept.task_id)
                continue
            assert not isinstance(parsed, Rejected)
            usable.append((kept, parsed))
        if dropped:
            self.store.drop_folded(task_ids=dropped)
        return usable

    def _pack(self, flat: F32, version: int, round_no: int) -> bytes:
        weights: dict[str, np.ndarray] = dict(self.layout.unflatten(flat))
        if self.scaffold:
            c = self.strategy.state_dict().get("c")
            weights[SCAFFOLD_C_AUX] = np.zeros(self.layout.size, np.float32) if c is None else c
        metrics = {k: float(v) for k, v in self._last_eval.items() if math.isfinite(v)}
        return pack_model(
            weights, model_version=version, round_no=max(0, round_no), metrics=metrics
        ).to_bytes()

    def start(self) -> None:
        """Subscribe and (re)publish the current model. Called by :meth:`run`."""
        if self._started:
            return
        self._started = True
        self.transport.subscribe(self.topics.all_status())
        self.transport.subscribe(self.topics.all_updates())
        meta = self.store.get_meta("published")
        if meta:
            v, n = (int(x) for x in meta.split(":"))
            self._published = (v, n)
        self._publish_model(self._envelope, self.model_version)

    # -- main loop ---------------------------------------------------------------------------

    def run(self, stop: threading.Event, max_rounds: int | None = None) -> None:
        """Serve until ``stop`` is set, or ``max_rounds`` rounds finished in this run, or
        (without ``max_rounds``) round ``rounds_total`` finished, counting the rounds of
        earlier runs on the same store; then :meth:`close`."""
        total = self.config.rounds_total if max_rounds is None else None
        if total is not None and self.last_round_done >= total:
            logger.info(
                "rounds_total = %d is reached already (the store holds round %d); raise it "
                "to train further",
                total,
                self.last_round_done,
            )
        try:
            self.start()
            begin = self.clock()
            next_tick = begin
            for cmd in self._restore_cmds:
                self._execute([cmd], begin)
            self._restore_cmds = []
            while not stop.is_set():
                if max_rounds is not None and self.rounds_finished >= max_rounds:
                    break
                if total is not None and self.last_round_done >= total:
                    break
                now = self.clock()
                try:
                    msg = self.transport.receive(max(0.0, min(self.config.tick_s, next_tick - now)))
                except TransportClosed:
                    break
                now = self.clock()
                if msg is not None:
                    self.handle_message(msg, now)
                if stop.is_set():  # a stop that came meanwhile: no new round, no new tasks
                    break
                if now >= next_tick:
                    next_tick = now + self.config.tick_s
                    if now - begin >= self.config.startup_grace_s:
                        self.tick(now)
        finally:
            try:
                if self._acks_unsaved and self.machine.state is RoundState.COLLECTING:
                    # Stopping: keep the acknowledgements seen since the last tick, so after
                    # a restart their devices' lost tasks are asked again at once.
                    self._save_open_round()
            finally:
                self.close()

    def tick(self, now: float) -> None:
        """Deadlines, replacements and the start of the next round."""
        lost = self._broker_sessions_lost()
        if lost != self._sessions_lost:
            self._sessions_lost = lost
            # The broker forgot this client: it may have lost its retained messages as well
            # (restarted without its persistence file). Devices that start afresh would find
            # no model and decline every task, so the current version goes out again; devices
            # that hold it ignore the repeated manifest.
            logger.warning(
                "the broker had no session for the coordinator on reconnect; publishing "
                "model version %d again in case its retained messages are gone",
                self.model_version,
            )
            self._publish_model(self._envelope, self.model_version)
        eligible = self.registry.eligible(now)
        self.metrics.fleet(online=len(self.registry.online(now)), eligible=len(eligible))
        if self.scaffold:
            assert isinstance(self.strategy, Scaffold)
            self.strategy.set_num_clients(max(1, len(self.registry)))
        self._feed(Tick(now, tuple(eligible)), now)
        if self._acks_unsaved:
            if self.machine.state is RoundState.COLLECTING:
                self._save_open_round()
            else:  # the round closed meanwhile (its checkpoint cleared the open round)
                self._acks_unsaved = False

    def _broker_sessions_lost(self) -> int:
        # MqttTransport counts them; transports that cannot lose a session have no counter.
        return int(getattr(self.transport, "sessions_lost", 0))

    def handle_message(self, msg: Message, now: float) -> None:
        """Handle one received message (status or update chunk)."""
        try:
            kind, cid = self.topics.parse(msg.topic)
        except WireError as exc:
            logger.debug("ignoring message on %s: %s", _clip(msg.topic), _clip(str(exc)))
            self.metrics.reject(BAD_TOPIC)
            return
        if cid is None:
            return
        if kind is TopicKind.STATUS:
            self._on_status(cid, msg.payload, now)
        elif kind is TopicKind.UPDATE:
            self._on_update_chunk(cid, msg.payload, now)

    def close(self) -> None:
        """Stop the metrics server and close the transport (idempotent; the store stays open)."""
        if self._closed:
            return
        self._closed = True
        self.metrics.close()
        try:
            self.transport.close()
        except TransportError:  # pragma: no cover - closing a broken connection
            logger.debug("transport close failed", exc_info=True)

    # -- inputs ------------------------------------------------------------------------------

    def _on_status(self, cid: str, payload: bytes, now: float) -> None:
        if not payload:  # retained status cleared
            self.registry.forget(cid)
            return
        try:
            status = Status.from_bytes(payload)
        except WireError as exc:
            logger.warning("bad status from %s: %s", cid, _clip(str(exc)))
            self.metrics.reject(BAD_STATUS)
            return
        change = self.registry.observe(cid, status, now)
        event: DeviceUnavailable | None = None
        if change.declined_task is not None:
            event = DeviceUnavailable(
                cid,
                f"declined:{change.decline_reason}",
                now,
                declined=True,
                task_id=change.declined_task,
            )
        elif not change.online:
            event = DeviceUnavailable(cid, "offline", now)
        elif change.ineligible is not None:
            event = DeviceUnavailable(cid, change.ineligible.value, now)
        if cid not in self.machine.outstanding:
            return
        if event is not None:
            self._feed(event, now)
        else:
            # Acknowledges the outstanding task, or shows the device lost it (lost_task).
            task_event = TaskStatus(cid, status.task_id, now)
            before = self.machine.outstanding.get(cid)
            self._feed(task_event, now)
            if self.machine.outstanding.get(cid) == before:
                return
        if self.machine.state is RoundState.COLLECTING:
            self.tick(now)  # replace the device at once

    def _on_update_chunk(self, cid: str, chunk: bytes, now: float) -> None:
        self._io.bytes_up += len(chunk)
        self.metrics.add_bytes(inbound=len(chunk))
        try:
            data = self.reassembler.feed(cid, chunk, now)
        except WireError as exc:
            self._reject_outside(RejectCode.BAD_CHUNK, cid, str(exc), now)
            return
        if data is None:
            return
        parsed = self.validator.parse(data, cid)
        if isinstance(parsed, Rejected):
            self._reject_outside(parsed.reason, cid, parsed.detail, now)
            return
        self._feed(
            UpdateReceived(
                cid, parsed.task_id, parsed.round_no, parsed.model_version, parsed.nonce, now
            ),
            now,
            update=_Received(parsed, data),
        )

    def _reject_outside(self, reason: str, cid: str, detail: str, now: float) -> None:
        logger.info("rejected update from %s: %s (%s)", cid, reason, _clip(detail))
        self.metrics.reject(str(reason))
        held = cid in self.machine.outstanding
        self._feed(UpdateInvalid(str(reason), cid=cid), now)
        # With require_signature the bad envelope failed the device's task: replace it now.
        failed = held and cid not in self.machine.outstanding
        if failed and self.machine.state is RoundState.COLLECTING:
            self.tick(now)

    # -- command execution -------------------------------------------------------------------

    def _feed(self, event: Event, now: float, update: Any = None) -> None:
        self._execute(self.machine.handle(event), now, update)

    def _save_open_round(self) -> None:
        self.store.save_open_round(self.machine.round_no, self.machine.snapshot())
        self._acks_unsaved = False

    def _execute(self, commands: list[Command], now: float, update: Any = None) -> None:
        sends = any(isinstance(c, SendTask) for c in commands)
        if sends or (self._acks_unsaved and any(isinstance(c, FoldUpdate) for c in commands)):
            # Persist the issued tasks before they go out: a device never holds a task that
            # a restarted coordinator does not know. Persist acknowledgements before a fold:
            # a restarted coordinator then knows every device whose folded update it lost.
            self._save_open_round()
        for cmd in commands:
            if isinstance(cmd, StartRound):
                self._start_round(cmd, now)
            elif isinstance(cmd, SendTask):
                self._send_task(cmd)
            elif isinstance(cmd, FoldUpdate):
                self._fold(cmd, update, now)
            elif isinstance(cmd, RejectUpdate):
                logger.info("rejected update %s from %s: %s", cmd.task_id, cmd.cid, cmd.reason)
                self.metrics.reject(cmd.reason)
            elif isinstance(cmd, DropDevice):
                self._drop(cmd, now)
            elif isinstance(cmd, TaskAcknowledged):
                self._acks_unsaved = self.machine.state is RoundState.COLLECTING
            elif isinstance(cmd, Aggregate):
                self._aggregate(cmd, now)
            elif isinstance(cmd, AbandonRound):
                self._abandon(cmd, now)
            elif isinstance(cmd, WaitForDevices) and not self._io.waiting_logged:
                logger.info(
                    "round %d: %d eligible device(s), %d needed; waiting",
                    cmd.round_no,
                    cmd.eligible,
                    cmd.needed,
                )
                self._io.waiting_logged = True
        if sends:
            crash_point("after_send_tasks", self.machine.round_no)

    def _start_round(self, cmd: StartRound, now: float) -> None:
        # A reopened round started before the restart: its duration counts from then.
        started = self.machine.started_at
        self._io = _RoundIO(started_at=now if started is None else min(started, now))
        self.strategy.begin_round(self.model, round_no=cmd.round_no)
        reopened = bool(self._restore_cmds)  # the first StartRound of a resumed run
        logger.info(
            "round %d %s on model version %d",
            cmd.round_no,
            "reopened" if reopened else "started",
            cmd.model_version,
        )
        refold, self._refold = self._refold, []
        ready = False
        for kept, parsed in refold:
            decoded = self.validator.decode(parsed)
            assert not isinstance(decoded, Rejected)  # _kept_updates checked it
            meta = kept.meta
            accepted = self._accepted(
                decoded, kept.cid, int(meta.get("staleness", 0)), float(meta.get("capability", 1))
            )
            verdict = self.strategy.accept(accepted)
            ready = verdict.ready
            if not verdict.accepted:  # the strategy's settings changed across the restart
                logger.error(
                    "round %d: kept update %s from %s refused by the strategy now: %s",
                    cmd.round_no,
                    kept.task_id,
                    kept.cid,
                    verdict.reason,
                )
                continue
            self._io.accepted.append((kept.task_id, kept.cid))
            self._io.examples += decoded.update.num_examples
            self._io.bytes_up += len(kept.envelope)
        if ready:  # async: the kept updates alone fill the buffer
            self._execute(self.machine.buffer_full(), now)

    def _send_task(self, cmd: SendTask) -> None:
        t = cmd.task
        config = self.strategy.configure_round(t.round_no, [t.cid])
        params = config.train[t.cid]
        extra = {k: float(v) for k, v in params.extra.items() if isinstance(v, int | float)}
        if t.max_steps is not None:
            extra["max_steps"] = float(t.max_steps)
        strategy: dict[str, JSONValue] | None = {"id": self.strategy.strategy_id}
        if self.scaffold:
            strategy = {
                "id": "scaffold",
                "control_variate": SCAFFOLD_C_AUX,
                "control_delta": SCAFFOLD_DELTA_AUX,
            }
        task = TrainTask(
            task_id=t.task_id,
            round_no=t.round_no,
            model_version=t.model_version,
            deadline_ts=t.deadline,
            train=TrainParams(params.epochs, params.batch_size, params.lr, params.prox_mu, extra),
            uplink_codec=self.config.uplink.codec,
            nonce=t.nonce,
            error_feedback=self.config.uplink.error_feedback,
            strategy=strategy,
        )
        payload = task.to_bytes()
        try:
            self.transport.publish(self.topics.task(t.cid), payload, qos=1)
        except TransportError as exc:
            logger.warning("could not send task %s to %s: %s", t.task_id, t.cid, exc)
        out = len(payload)
        if self._device_version.get(t.cid) != t.model_version:
            out += self._model_bytes
            self._device_version[t.cid] = t.model_version
        self._io.bytes_down += out
        self.metrics.add_bytes(outbound=len(payload))
        self.registry.record_selected(t.cid, t.round_no)

    def _fold(self, cmd: FoldUpdate, received: _Received, now: float) -> None:
        view = self.registry.get(cmd.cid)
        decoded = self.validator.decode(
            received.update, max_examples=None if view is None else view.num_examples or None
        )
        if isinstance(decoded, Rejected):
            logger.info(
                "rejected update %s from %s: %s (%s)",
                cmd.task_id,
                cmd.cid,
                decoded.reason,
                decoded.detail,
            )
            self.metrics.reject(decoded.reason.value)
            self._feed(UpdateInvalid(decoded.reason.value, cmd.cid, cmd.task_id), now)
            return
        capability = self._capability(cmd.cid)
        accepted = self._accepted(decoded, cmd.cid, cmd.staleness, capability)
        verdict = self.strategy.accept(accepted)
        if not verdict.accepted:
            reason = "strategy_" + (verdict.reason.value if verdict.reason else "rejected")
            self.metrics.reject(reason)
            self._feed(UpdateInvalid(reason, cmd.cid, cmd.task_id), now)
            return
        self._io.accepted.append((cmd.task_id, cmd.cid))
        self._io.examples += decoded.update.num_examples
        loss = decoded.update.metrics.get("loss")
        # Kept until the round (async: the model version) closes: a restarted coordinator
        # folds it in again instead of asking the device to train once more.
        meta = {"staleness": cmd.staleness, "capability": capability, "loss": loss}
        self.store.save_folded(self.machine.round_no, cmd.task_id, cmd.cid, meta, received.data)
        self.registry.record_success(cmd.cid, loss)
        crash_point("after_fold", self.machine.round_no)
        self._feed(UpdateFolded(cmd.task_id, ready=verdict.ready, loss=loss), now)

    def _capability(self, cid: str) -> float:
        view = self.registry.get(cid)
        if view is not None and view.samples_per_s:
            return float(view.samples_per_s)
        return 1.0

    def _accepted(
        self, decoded: Decoded, cid: str, staleness: int, capability: float
    ) -> AcceptedUpdate:
        return AcceptedUpdate(
            cid=cid,
            num_examples=decoded.update.num_examples,
            delta=decoded.delta,
            capability=capability,
            staleness=staleness,
            control_delta=decoded.aux.get(SCAFFOLD_DELTA_AUX),
        )

    def _drop(self, cmd: DropDevice, now: float) -> None:
        self._io.dropped_by_reason[cmd.reason] += 1
        refused = cmd.reason.removeprefix("invalid_update:")
        if cmd.reason == "round_complete":
            self.registry.set_busy(cmd.cid, False)
            self._cancel(cmd.cid, cmd.task_id, cmd.reason)
        elif cmd.declined:
            self.registry.record_decline(cmd.cid)
        elif refused in DEVICE_FAULTS:
            self._refused(cmd.cid, refused, now)
        else:
            self.registry.record_failure(cmd.cid)
        logger.info("device %s out of its task %s: %s", cmd.cid, cmd.task_id, cmd.reason)

    def _refused(self, cid: str, reason: str, now: float) -> None:
        """Hold back a device whose updates keep being refused for its own fault: each task
        would cost it a training and an upload for nothing."""
        deadline = self.config.rounds.deadline_s
        held = self.registry.record_refusal(
            cid, now, base_s=deadline, max_s=max(deadline, REFUSAL_COOLDOWN_MAX_S)
        )
        if held:
            record = self.registry.record(cid)
            logger.warning(
                "device %s: %d updates in a row refused (%s); not asking it for %.0f s. Fix "
                "the device (its HMAC key, its [model]) or restart its agent to end this; if "
                "many devices show it, check this coordinator's [validation] settings",
                cid,
                0 if record is None else record.refusals,
                reason,
                held,
            )

    def _cancel(self, cid: str, task_id: str, reason: str) -> None:
        """Withdraw a task whose update is no longer wanted: the device stops training it and
        keeps its battery and uplink (devices that predate the message ignore it)."""
        payload = TaskCancel(task_id, reason).to_bytes()
        try:
            self.transport.publish(self.topics.task(cid), payload, qos=1)
        except TransportError as exc:
            logger.warning("could not cancel task %s of %s: %s", task_id, cid, exc)
            return
        self._io.bytes_down += len(payload)
        self._io.cancelled += 1
        self.metrics.add_bytes(outbound=len(payload))

    def _aggregate(self, cmd: Aggregate, now: float) -> None:
        new = self.strategy.finish()
        if new is None:
            self._feed(AggregationFailed("strategy kept the model", now), now)
            self._finish_round(cmd.round_no, "abandoned", now, reason="strategy kept the model")
            return
        version = self.model_version + 1
        if self.evaluate is not None:
            try:
                self._last_eval = dict(self.evaluate(self.layout.unflatten(new)))
            except Exception:  # an evaluation bug must not stop training
                logger.exception("evaluation of model version %d failed", version)
                self._last_eval = {}
        envelope = self._pack(new, version, cmd.round_no)
        record = self._record(cmd.round_no, version, "aggregated", now, cmd.reason)
        record["bytes_down"] = self._io.bytes_down
        # Checkpoint BEFORE publishing: a published version is always on disk.
        crash_point("before_checkpoint", cmd.round_no)
        self.store.checkpoint(
            version=version,
            round_no=cmd.round_no,
            envelope=envelope,
            state=self.strategy.state_dict(),
            record=record,
            accepted=self._io.accepted,
        )
        crash_point("after_checkpoint", cmd.round_no)
        self.model, self.model_version, self._envelope = new, version, envelope
        self._publish_model(envelope, version, round_no=cmd.round_no)
        self._feed(AggregationDone(version, now), now)
        self._emit(record)
        self._io = _RoundIO(started_at=now)
        if self.config.rounds.mode == "async":
            self.strategy.begin_round(self.model, round_no=self.machine.round_no)
            self._save_open_round()  # the tasks still out, now of the next version's window

    def _abandon(self, cmd: AbandonRound, now: float) -> None:
        self._finish_round(cmd.round_no, "abandoned", now, reason=cmd.reason)

    def _finish_round(self, round_no: int, outcome: str, now: float, reason: str) -> None:
        record = self._record(round_no, self.model_version, outcome, now, reason)
        self.store.record_round(round_no, outcome, record)
        why = ", ".join(f"{r} x{n}" for r, n in self._io.dropped_by_reason.most_common())
        logger.warning(
            "round %d abandoned (%s%s); keeping model version %d",
            round_no,
            reason,
            f": {why}" if why else "",
            self.model_version,
        )
        self._emit(record)
        self._io = _RoundIO(started_at=now)

    def _record(
        self, round_no: int, version: int, outcome: str, now: float, reason: str
    ) -> dict[str, Any]:
        stats = self.machine.stats
        ev = self._last_eval
        losses = stats.losses
        return {
            "round": round_no,
            "model_version": version,
            "outcome": outcome,
            "reason": reason,
            "accuracy": float(ev.get("accuracy", math.nan)),
            "loss": float(ev.get("loss", math.nan)),
            "train_loss": float(np.mean(losses)) if losses else math.nan,
            "participants": stats.participants,
            "selected": stats.selected,
            "declined": stats.declined,
            "dropped": stats.dropped,
            "lost": stats.lost,
            "timed_out": stats.timed_out,
            "replaced": stats.replaced,
            "cancelled": self._io.cancelled,
            "dropped_by_reason": {
                r: n for r, n in self._io.dropped_by_reason.items() if r != "round_complete"
            },
            "rejected": sum(stats.rejected.values()),
            "rejected_by_reason": dict(stats.rejected),
            "num_examples": self._io.examples,
            "bytes_up": self._io.bytes_up,
            "bytes_down": self._io.bytes_down,
            "duration_s": max(0.0, now - self._io.started_at),
            "eligible": len(self.registry.eligible(now)),
            "online": len(self.registry.online(now)),
        }

    def _emit(self, record: dict[str, Any]) -> None:
        self.rounds_finished += 1
        self.last_round_done = max(self.last_round_done, int(record["round"]))
        self.last_record = record
        self.metrics.round_done(record)
        if self.on_round is not None:
            try:
                self.on_round(dict(record))
            except Exception:
                logger.exception("on_round hook failed")

    # -- downlink ----------------------------------------------------------------------------

    def _publish_model(self, envelope: bytes, version: int, *, round_no: int = 0) -> None:
        """Publish ``version`` retained (chunks, then manifest); clear the previous chunks."""
        tid = new_transfer_id()
        chunks = split(envelope, self.config.chunk_size, tid)
        for index, chunk in enumerate(chunks):
            self.transport.publish(self.topics.model_chunk(version, index), chunk, retain=True)
        crash_point("mid_publish", round_no)
        manifest = ModelManifest(
            model_version=version,
            transfer_id=tid.hex(),
            chunk_count=len(chunks),
            total_len=len(envelope),
            sha256=hashlib.sha256(envelope).hexdigest(),
        ).to_bytes()
        self.transport.publish(self.topics.model_manifest(), manifest, retain=True)
        previous = self._published
        if previous is not None and previous[0] != version:
            for index in range(previous[1]):
                self.transport.publish(
                    self.topics.model_chunk(previous[0], index), b"", retain=True
                )
        self._published = (version, len(chunks))
        self.store.set_meta("published", f"{version}:{len(chunks)}")
        self._model_bytes = sum(len(c) for c in chunks) + len(manifest)
        self.metrics.add_bytes(outbound=self._model_bytes)


def mqtt_transport_for(config: CoordinatorConfig) -> Transport:
    """Connect to the configured broker with a persistent session (stable client id)."""
    from edge.mqtt_transport import MqttSettings, MqttTransport

    b = config.broker
    password = None
    if b.password_file is not None:
        with open(b.password_file) as fh:
            password = fh.readline().strip()
    overrides: dict[str, Any] = {
        "client_id": b.client_id,
        "clean_start": False,
        "session_expiry_s": b.session_expiry_s,
        "max_inflight": 100,
    }
    if b.username is not None:
        overrides["username"] = b.username
    if password is not None:
        overrides["password"] = password
    if b.ca_certs is not None:
        overrides["ca_certs"] = b.ca_certs
    if b.tls_insecure:
        overrides["tls_insecure"] = True
    return MqttTransport(MqttSettings.from_url(b.url, **overrides))


__all__ = [
    "CheckpointMismatchError",
    "Coordinator",
    "Evaluate",
    "OnRound",
    "checkpoint_weights",
    "mqtt_transport_for",
]
