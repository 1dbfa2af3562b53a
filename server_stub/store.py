"""Persistence of the coordinator in one SQLite file (stdlib ``sqlite3``, WAL mode).

This module owns the schema and the only two writes that matter for recovery:

- :meth:`Store.checkpoint` writes, in **one transaction**, a new model version (its envelope
  bytes), the strategy's server state, the round's log record and the task ids folded into
  it, and clears the open round. The coordinator calls it *before* it publishes the version,
  so a published version is always on disk and the version number never goes backwards.
- :meth:`Store.save_open_round` records the issued tasks of the round in progress, so a
  restarted coordinator reopens the same round with the same task ids and deadline.
- :meth:`Store.save_folded` keeps each update folded into the open round (its envelope as
  received), so a restarted coordinator folds them in again instead of asking their devices
  to train once more. Closing the round (checkpoint or abandon) deletes them.

After ``kill -9`` at any point, :meth:`Store.latest_model` and :meth:`Store.open_round` give
the state to resume from; a task id in ``accepted_tasks`` is never counted again.
Server state vectors are stored as raw little-endian float32 bytes (never pickled).
"""

from __future__ import annotations

import fcntl
import json
import os
import sqlite3
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
import numpy.typing as npt

_SCHEMA = """
CREATE TABLE IF NOT EXISTS models (
    version   INTEGER PRIMARY KEY,
    round_no  INTEGER NOT NULL,
    envelope  BLOB NOT NULL,
    created   REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS server_state (
    version   INTEGER NOT NULL,
    name      TEXT NOT NULL,
    data      BLOB NOT NULL,
    PRIMARY KEY (version, name)
);
CREATE TABLE IF NOT EXISTS rounds (
    round_no  INTEGER PRIMARY KEY,
    outcome   TEXT NOT NULL,
    record    TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS accepted_tasks (
    task_id   TEXT PRIMARY KEY,
    round_no  INTEGER NOT NULL,
    cid       TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS open_round (
    id        INTEGER PRIMARY KEY CHECK (id = 1),
    round_no  INTEGER NOT NULL,
    snapshot  TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS folded_updates (
    seq       INTEGER PRIMARY KEY AUTOINCREMENT,
    task_id   TEXT NOT NULL UNIQUE,
    round_no  INTEGER NOT NULL,
    cid       TEXT NOT NULL,
    meta      TEXT NOT NULL,
    envelope  BLOB NOT NULL
);
CREATE TABLE IF NOT EXISTS meta (
    key       TEXT PRIMARY KEY,
    value     TEXT NOT NULL
);
"""


class StoreError(RuntimeError):
    """The state database is unusable or inconsistent with the request."""


class StoreInUseError(StoreError):
    """Another process (a second coordinator) has the state db open."""


class NotAStateDatabaseError(StoreError):
    """The file at the store's path is not a fedge state database (garbage, truncated, a
    folder, another program's database). Nothing was written to it."""

    def __init__(self, path: str, reason: str) -> None:
        super().__init__(f"state db {path} is not a fedge state database ({reason})")
        self.path = path
        self.reason = reason


@dataclass(frozen=True, slots=True)
class StoredModel:
    """One checkpointed model version."""

    version: int
    round_no: int
    envelope: bytes
    state: dict[str, npt.NDArray[np.float32]]


@dataclass(frozen=True, slots=True)
class FoldedUpdate:
    """An update folded into the open round, as :meth:`Store.save_folded` kept it."""

    task_id: str
    cid: str
    meta: dict[str, Any]
    envelope: bytes


class Store:
    """The coordinator's SQLite state. One writer (the coordinator loop); not thread-safe."""

    def __init__(self, path: str | Path, *, keep_models: int = 5, read_only: bool = False) -> None:
        """Open (or create) the database at ``path``.

        ``read_only`` opens an existing database for reading only, without its lock, so a
        running coordinator's state can be inspected; every write then fails.

        Raises
        ------
        NotAStateDatabaseError
            The file is not an SQLite database, is damaged, is a folder, or holds another
            program's tables. It is checked before anything is written, so it is left as it was.
        StoreInUseError
            Another process has the database open (two coordinators on one state db would
            overwrite each other's rounds).
        StoreError
            The database cannot be opened or written (permissions, locked, disk full).
        """
        self.path = str(path)
        self.keep_models = keep_models
        self._lock: BinaryIO | None = None
        self._lock_path = ""
        lock_is_new = False
        if read_only:
            try:
                uri = Path(self.path).absolute().as_uri() + "?mode=ro"
                self._db = sqlite3.connect(uri, uri=True, check_same_thread=False)
                self._check_existing()
            except sqlite3.Error as exc:
                raise StoreError(f"state db {self.path} cannot be read ({exc})") from None
            return
        if self.path != ":memory:":
            if Path(self.path).is_dir():
                raise NotAStateDatabaseError(self.path, "it is a folder")
            try:
                Path(self.path).parent.mkdir(parents=True, exist_ok=True)
            except OSError as exc:
                raise StoreError(f"state db {self.path} cannot be created ({exc})") from None
            self._lock_path = _lock_path(self.path)
            lock_is_new = not Path(self._lock_path).exists()
            self._lock = _lock(self._lock_path, self.path)
        try:
            self._db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        except sqlite3.Error as exc:
            self._release(lock_is_new)
            raise StoreError(f"state db {self.path} cannot be opened ({exc})") from None
        try:
            self._check_existing()
            self._db.execute("PRAGMA journal_mode=WAL")
            # FULL: a checkpoint that returned is on disk even after a power cut.
            self._db.execute("PRAGMA synchronous=FULL")
            self._db.executescript(_SCHEMA)
        except StoreError:
            self._db.close()
            self._release(lock_is_new)
            raise
        except sqlite3.OperationalError as exc:  # locked, read-only, I/O: the file may be fine
            self._db.close()
            self._release(lock_is_new)
            raise StoreError(f"state db {self.path} cannot be opened ({exc})") from None
        except sqlite3.DatabaseError as exc:  # "file is not a database", "malformed"
            self._db.close()
            self._release(lock_is_new)
            raise NotAStateDatabaseError(self.path, str(exc)) from None

    def _release(self, lock_is_new: bool) -> None:
        """Unlock after a failed open, leaving the folder as it was (no new lock file)."""
        if lock_is_new:
            Path(self._lock_path).unlink(missing_ok=True)
        self._unlock()

    def _check_existing(self) -> None:
        """Refuse a database that is not ours or is damaged, before writing anything to it."""
        tables = {
            str(row[0])
            for row in self._db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")
        }
        if not tables:
            return  # new (or empty) file: the schema is created next
        if "models" not in tables:
            shown = ", ".join(sorted(tables)[:5])
            raise NotAStateDatabaseError(self.path, f"an SQLite database with tables {shown}")
        problems = [str(row[0]) for row in self._db.execute("PRAGMA quick_check(3)")]
        if problems != ["ok"]:
            raise NotAStateDatabaseError(self.path, f"damaged: {'; '.join(problems)}")

    def close(self) -> None:
        self._db.close()
        self._unlock()

    def _unlock(self) -> None:
        if self._lock is not None:
            self._lock.close()  # closing the file releases the lock
            self._lock = None

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- writes ------------------------------------------------------------------------------

    def checkpoint(
        self,
        *,
        version: int,
        round_no: int,
        envelope: bytes,
        state: Mapping[str, np.ndarray],
        record: Mapping[str, Any] | None,
        accepted: Iterable[tuple[str, str]],
        outcome: str = "aggregated",
    ) -> None:
        """Atomically store a new model version and close its round.

        ``accepted`` holds ``(task_id, cid)`` of the updates folded into it; ``record`` is the
        round's log record (None for the initial version). Raises
        :class:`StoreError` if ``version`` does not advance the latest stored version or a
        task id was already counted.
        """
        db = self._db
        db.execute("BEGIN IMMEDIATE")
        try:
            latest = db.execute("SELECT MAX(version) FROM models").fetchone()[0]
            if latest is not None and version <= latest:
                raise StoreError(f"model version {version} does not advance {latest}")
            db.execute(
                "INSERT INTO models (version, round_no, envelope, created) VALUES (?, ?, ?, ?)",
                (version, round_no, envelope, time.time()),
            )
            for name, vec in state.items():
                arr = np.ascontiguousarray(vec, dtype="<f4").ravel()
                db.execute(
                    "INSERT INTO server_state (version, name, data) VALUES (?, ?, ?)",
                    (version, name, arr.tobytes()),
                )
            db.executemany(
                "INSERT INTO accepted_tasks (task_id, round_no, cid) VALUES (?, ?, ?)",
                [(task_id, round_no, cid) for task_id, cid in accepted],
            )
            if record is not None:
                db.execute(
                    "INSERT OR REPLACE INTO rounds (round_no, outcome, record) VALUES (?, ?, ?)",
                    (round_no, outcome, json.dumps(dict(record), default=_json_default)),
                )
            self._close_open_round(round_no)
            if self.keep_models > 0:
                cutoff = version - self.keep_models
                db.execute("DELETE FROM models WHERE version <= ?", (cutoff,))
                db.execute("DELETE FROM server_state WHERE version <= ?", (cutoff,))
            db.execute("COMMIT")
        except sqlite3.IntegrityError as exc:
            db.execute("ROLLBACK")
            raise StoreError(f"checkpoint of version {version} refused: {exc}") from None
        except BaseException:
            db.execute("ROLLBACK")
            raise

    def record_round(self, round_no: int, outcome: str, record: Mapping[str, Any]) -> None:
        """Log a round that did not produce a model (abandoned) and clear the open round."""
        db = self._db
        db.execute("BEGIN IMMEDIATE")
        db.execute(
            "INSERT OR REPLACE INTO rounds (round_no, outcome, record) VALUES (?, ?, ?)",
            (round_no, outcome, json.dumps(dict(record), default=_json_default)),
        )
        self._close_open_round(round_no)
        db.execute("COMMIT")

    def _close_open_round(self, round_no: int) -> None:
        """Within a transaction: round ``round_no`` is closed, its open state goes."""
        self._db.execute("DELETE FROM open_round")
        self._db.execute("DELETE FROM folded_updates WHERE round_no <= ?", (round_no,))

    def save_open_round(self, round_no: int, snapshot: Mapping[str, Any]) -> None:
        """Remember the issued tasks of the round in progress."""
        self._db.execute(
            "INSERT OR REPLACE INTO open_round (id, round_no, snapshot) VALUES (1, ?, ?)",
            (round_no, json.dumps(dict(snapshot), default=_json_default)),
        )

    def save_folded(
        self, round_no: int, task_id: str, cid: str, meta: Mapping[str, Any], envelope: bytes
    ) -> None:
        """Keep an update folded into the open round: its envelope as received and ``meta``
        (what the fold took from outside the envelope). Raises :class:`StoreError` when the
        task id is stored already."""
        try:
            self._db.execute(
                "INSERT INTO folded_updates (task_id, round_no, cid, meta, envelope) "
                "VALUES (?, ?, ?, ?, ?)",
                (task_id, round_no, cid, json.dumps(dict(meta), default=_json_default), envelope),
            )
        except sqlite3.IntegrityError as exc:
            raise StoreError(f"update of task {task_id} is stored already: {exc}") from None

    def drop_folded(self, before_round: int | None = None, task_ids: Iterable[str] = ()) -> None:
        """Forget kept updates of rounds before ``before_round`` and those of ``task_ids``."""
        db = self._db
        db.execute("BEGIN IMMEDIATE")
        if before_round is not None:
            db.execute("DELETE FROM folded_updates WHERE round_no < ?", (before_round,))
        db.executemany("DELETE FROM folded_updates WHERE task_id = ?", [(t,) for t in task_ids])
        db.execute("COMMIT")

    def set_meta(self, key: str, value: str) -> None:
        self._db.execute("INSERT OR REPLACE INTO meta (key, value) VALUES (?, ?)", (key, value))

    # -- reads -------------------------------------------------------------------------------

    def get_meta(self, key: str) -> str | None:
        row = self._db.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        return None if row is None else str(row[0])

    def latest_model(self) -> StoredModel | None:
        """The newest checkpointed model version with its server state, or None."""
        row = self._db.execute(
            "SELECT version, round_no, envelope FROM models ORDER BY version DESC LIMIT 1"
        ).fetchone()
        if row is None:
            return None
        version = int(row[0])
        state = {
            str(name): np.frombuffer(data, dtype="<f4").astype(np.float32)
            for name, data in self._db.execute(
                "SELECT name, data FROM server_state WHERE version = ?", (version,)
            )
        }
        return StoredModel(version, int(row[1]), bytes(row[2]), state)

    def open_round(self) -> dict[str, Any] | None:
        row = self._db.execute("SELECT snapshot FROM open_round WHERE id = 1").fetchone()
        return None if row is None else dict(json.loads(row[0]))

    def folded(self, round_no: int) -> list[FoldedUpdate]:
        """The updates kept for round ``round_no``, in the order they were folded."""
        return [
            FoldedUpdate(str(t), str(c), dict(json.loads(m)), bytes(e))
            for t, c, m, e in self._db.execute(
                "SELECT task_id, cid, meta, envelope FROM folded_updates WHERE round_no = ? "
                "ORDER BY seq",
                (round_no,),
            )
        ]

    def accepted_task_ids(self, since_round: int = 0) -> set[str]:
        return {
            str(r[0])
            for r in self._db.execute(
                "SELECT task_id FROM accepted_tasks WHERE round_no >= ?", (since_round,)
            )
        }

    def accepted_tasks(self) -> list[tuple[str, int, str]]:
        """Every ``(task_id, round_no, cid)`` counted so far."""
        return [
            (str(t), int(r), str(c))
            for t, r, c in self._db.execute(
                "SELECT task_id, round_no, cid FROM accepted_tasks ORDER BY round_no, task_id"
            )
        ]

    def last_round_no(self) -> int:
        """The highest round number logged (0 when none)."""
        row = self._db.execute("SELECT MAX(round_no) FROM rounds").fetchone()
        return 0 if row[0] is None else int(row[0])

    def rounds(self) -> list[dict[str, Any]]:
        """Every logged round record, oldest first (each with its ``outcome``)."""
        out = []
        for round_no, outcome, record in self._db.execute(
            "SELECT round_no, outcome, record FROM rounds ORDER BY round_no"
        ):
            rec = dict(json.loads(record))
            rec.setdefault("round", int(round_no))
            rec["outcome"] = str(outcome)
            out.append(rec)
        return out


def in_use_by(path: str | Path) -> str | None:
    """The process id (as text) holding the state db ``path``, or None; creates nothing."""
    try:
        lock = open(_lock_path(path), "rb")  # noqa: SIM115 - closed below, which drops the probe lock
    except OSError:
        return None  # no lock file: nobody has opened it
    with lock:
        try:
            fcntl.flock(lock.fileno(), fcntl.LOCK_SH | fcntl.LOCK_NB)
        except OSError:
            return _owner(lock)
    return None


def _lock_path(path: str | Path) -> str:
    """The lock of the db ``path``: beside the real file, so a symlink to it finds it too."""
    return f"{os.path.realpath(path)}.lock"


def _owner(lock: BinaryIO) -> str:
    """The process id a lock file holds, as text."""
    return lock.read(32).decode("ascii", "replace").strip() or "unknown"


def _lock(lock_path: str, path: str) -> BinaryIO:
    """Take the exclusive lock ``lock_path`` of the db ``path`` for this process, or raise
    StoreInUseError.

    An advisory ``flock``: the kernel releases it when the process ends, however it ends, so
    a coordinator killed with ``kill -9`` leaves no stale lock behind. The file holds the
    owner's process id for the message.
    """
    try:
        lock = open(lock_path, "a+b")  # noqa: SIM115 - kept open as the lock
    except OSError as exc:
        raise StoreError(f"state db lock {lock_path} cannot be created ({exc})") from None
    try:
        fcntl.flock(lock.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        lock.seek(0)
        owner = _owner(lock)
        lock.close()
        raise StoreInUseError(
            f"state db {path} is in use by another process (pid {owner}, lock {lock_path}): "
            "two coordinators on one state db would overwrite each other's rounds; stop the "
            "other one, or give this one its own [state] db"
        ) from None
    lock.truncate(0)
    lock.write(f"{os.getpid()}\n".encode())
    lock.flush()
    return lock


def _json_default(obj: object) -> Any:
    if isinstance(obj, np.generic):
        return obj.item()
    raise TypeError(f"{type(obj).__name__} is not JSON serialisable")


__all__ = [
    "FoldedUpdate",
    "NotAStateDatabaseError",
    "Store",
    "StoreError",
    "StoreInUseError",
    "StoredModel",
    "in_use_by",
]
