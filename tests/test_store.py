"""SQLite persistence: checkpoints, open rounds, resume, no double counting."""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from server_stub.store import NotAStateDatabaseError, Store, StoreError, StoreInUseError


def checkpoint(store: Store, version: int, accepted: list[tuple[str, str]]) -> None:
    store.checkpoint(
        version=version,
        round_no=version,
        envelope=b"model%d" % version,
        state={"m": np.full(3, version, np.float32)},
        record={"round": version, "participants": len(accepted)},
        accepted=accepted,
    )


def test_checkpoint_and_resume(tmp_path: Path) -> None:
    with Store(tmp_path / "s.db") as store:
        checkpoint(store, 1, [("t1", "a"), ("t2", "b")])
        checkpoint(store, 2, [("t3", "a")])
    with Store(tmp_path / "s.db") as store:
        latest = store.latest_model()
        assert latest is not None
        assert (latest.version, latest.envelope) == (2, b"model2")
        np.testing.assert_array_equal(latest.state["m"], np.full(3, 2, np.float32))
        assert store.accepted_task_ids() == {"t1", "t2", "t3"}
        assert [r["round"] for r in store.rounds()] == [1, 2]
        assert store.last_round_no() == 2


def test_folded_updates_are_kept_in_order_until_their_round_closes(tmp_path: Path) -> None:
    with Store(tmp_path / "s.db") as store:
        store.save_folded(1, "t2", "b", {"loss": 0.5}, b"env-b")
        store.save_folded(1, "t1", "a", {"loss": None}, b"env-a")
        store.save_folded(2, "t3", "c", {}, b"env-c")
        with pytest.raises(StoreError, match="stored already"):
            store.save_folded(1, "t1", "a", {}, b"again")
    with Store(tmp_path / "s.db") as store:  # they survive a restart, in fold order
        kept = store.folded(1)
        assert [(k.task_id, k.cid, k.meta, k.envelope) for k in kept] == [
            ("t2", "b", {"loss": 0.5}, b"env-b"),
            ("t1", "a", {"loss": None}, b"env-a"),
        ]
        store.drop_folded(task_ids=["t2"])
        assert [k.task_id for k in store.folded(1)] == ["t1"]
        checkpoint(store, 1, [("t1", "a")])  # round 1 closes: its kept updates go
        assert store.folded(1) == [] and [k.task_id for k in store.folded(2)] == ["t3"]
        store.record_round(2, "abandoned", {"round": 2})
        assert store.folded(2) == []
        store.save_folded(3, "t4", "a", {}, b"env")
        store.drop_folded(before_round=4)
        assert store.folded(3) == []


def test_a_second_store_on_one_db_is_refused_until_the_first_closes(tmp_path: Path) -> None:
    db = tmp_path / "s.db"
    with Store(db) as store:
        checkpoint(store, 1, [("t1", "a")])
        with pytest.raises(
            StoreInUseError, match=rf"in use by another process \(pid {os.getpid()},"
        ):
            Store(db)
        assert store.latest_model() is not None  # the first one is unaffected
    with Store(db) as store:
        assert store.accepted_task_ids() == {"t1"}


def test_the_lock_holds_through_a_symlink_to_the_db(tmp_path: Path) -> None:
    db = tmp_path / "s.db"
    (tmp_path / "other").mkdir()
    link = tmp_path / "other" / "link.db"
    link.symlink_to(db)
    with Store(db), pytest.raises(StoreInUseError, match="in use by another process"):
        Store(link)
    with Store(link), pytest.raises(StoreInUseError, match="in use by another process"):
        Store(db)
    assert not (tmp_path / "other" / "link.db.lock").exists()


def test_read_only_store_reads_while_the_coordinator_holds_the_lock(tmp_path: Path) -> None:
    db = tmp_path / "s.db"
    with Store(db) as store:
        checkpoint(store, 1, [("t1", "a")])
        with Store(db, read_only=True) as reader:
            assert reader.accepted_task_ids() == {"t1"}
            with pytest.raises(sqlite3.OperationalError, match="readonly"):
                reader.set_meta("k", "v")
    with pytest.raises(StoreError, match="cannot be read"):
        Store(tmp_path / "missing.db", read_only=True)
    assert not (tmp_path / "missing.db").exists()


def test_the_lock_of_a_killed_process_is_released(tmp_path: Path) -> None:
    db = tmp_path / "s.db"
    code = (
        "import sys, time; from server_stub.store import Store; "
        f"s = Store({str(db)!r}); print('open', flush=True); time.sleep(60)"
    )
    root = Path(__file__).resolve().parents[1]
    proc = subprocess.Popen([sys.executable, "-c", code], cwd=root, stdout=subprocess.PIPE)
    try:
        assert proc.stdout is not None and proc.stdout.readline() == b"open\n"
        with pytest.raises(StoreInUseError, match=f"pid {proc.pid},"):
            Store(db)
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
        with Store(db) as store:  # kill -9 leaves no stale lock
            assert store.latest_model() is None
    finally:
        proc.kill()
        proc.wait()
        if proc.stdout:
            proc.stdout.close()


def test_wal_mode(tmp_path: Path) -> None:
    with Store(tmp_path / "s.db") as store:
        assert store._db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"


def test_version_never_goes_backwards(tmp_path: Path) -> None:
    with Store(tmp_path / "s.db") as store:
        checkpoint(store, 3, [])
        with pytest.raises(StoreError, match="does not advance"):
            checkpoint(store, 3, [])


def test_task_counted_once_and_failed_checkpoint_leaves_nothing(tmp_path: Path) -> None:
    with Store(tmp_path / "s.db") as store:
        checkpoint(store, 1, [("t1", "a")])
        with pytest.raises(StoreError, match="refused"):
            checkpoint(store, 2, [("t1", "a")])
        latest = store.latest_model()
        assert latest is not None and latest.version == 1
        assert store.accepted_tasks() == [("t1", 1, "a")]


def test_open_round_saved_and_cleared_by_checkpoint(tmp_path: Path) -> None:
    with Store(tmp_path / "s.db") as store:
        store.save_open_round(1, {"round_no": 1, "tasks": []})
        assert store.open_round() == {"round_no": 1, "tasks": []}
        checkpoint(store, 1, [])
        assert store.open_round() is None
        store.save_open_round(2, {"round_no": 2})
        store.record_round(2, "abandoned", {"round": 2})
        assert store.open_round() is None
        assert store.rounds()[-1]["outcome"] == "abandoned"


def test_old_models_pruned(tmp_path: Path) -> None:
    with Store(tmp_path / "s.db", keep_models=2) as store:
        for v in range(1, 5):
            checkpoint(store, v, [])
        assert [r[0] for r in store._db.execute("SELECT version FROM models")] == [3, 4]


def test_meta_roundtrip(tmp_path: Path) -> None:
    with Store(tmp_path / "s.db") as store:
        assert store.get_meta("published") is None
        store.set_meta("published", "3:2")
        assert store.get_meta("published") == "3:2"


def _foreign_db(path: Path) -> None:
    conn = sqlite3.connect(path)
    conn.execute("CREATE TABLE invoices (id INTEGER)")
    conn.commit()
    conn.close()


def _truncated_db(path: Path) -> None:
    with Store(path) as store:
        for v in range(1, 4):
            store.checkpoint(
                version=v, round_no=v, envelope=bytes(100_000), state={}, record=None,
                accepted=(),
            )  # fmt: skip
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


@pytest.mark.parametrize(
    ("make", "reason"),
    [
        (lambda p: p.write_bytes(b"\x00garbage" * 100), "file is not a database"),
        (lambda p: p.write_text("hello"), "file is not a database"),
        (lambda p: p.mkdir(), "it is a folder"),
        (_foreign_db, "an SQLite database with tables invoices"),
        (_truncated_db, "malformed"),
    ],
    ids=["garbage", "text", "folder", "foreign", "truncated"],
)
def test_not_a_state_database_is_refused_and_left_alone(
    tmp_path: Path, make: Callable[[Path], None], reason: str
) -> None:
    # Prepare
    db = tmp_path / "s.db"
    make(db)
    before = sorted((p.name, p.read_bytes() if p.is_file() else b"") for p in tmp_path.iterdir())
    # Execute
    with pytest.raises(NotAStateDatabaseError, match=reason) as info:
        Store(db)
    # Assert: typed, names the path, nothing written (no WAL or schema either)
    assert isinstance(info.value, StoreError) and info.value.path == str(db)
    assert str(info.value).startswith(f"state db {db} is not a fedge state database (")
    after = sorted((p.name, p.read_bytes() if p.is_file() else b"") for p in tmp_path.iterdir())
    assert after == before


def test_empty_file_becomes_a_new_store(tmp_path: Path) -> None:
    (tmp_path / "s.db").write_bytes(b"")
    with Store(tmp_path / "s.db") as store:
        assert store.latest_model() is None
