"""SQLite store: bad files, locks, durability across kill -9, several processes at once."""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from choreo import StoreCorrupt, StoreError, StoreLocked, open_store
from tests.store_contract import envelope


def test_a_file_that_is_not_sqlite_is_refused_and_left_untouched(tmp_path: Path) -> None:
    path = tmp_path / "notes.txt"
    path.write_bytes(b"these are my notes, not a database\n" * 10)
    before = path.read_bytes()
    with pytest.raises(StoreCorrupt, match=str(path)):
        open_store(f"sqlite:///{path}")
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt"]


def test_a_damaged_database_is_reported_with_its_path(tmp_path: Path) -> None:
    path = tmp_path / "damaged.db"
    store = open_store(f"sqlite:///{path}")
    store.append([envelope() for _ in range(200)])
    store.close()
    data = bytearray(path.read_bytes())
    data[100:4096] = b"\xde\xad" * ((4096 - 100) // 2)  # smash the schema page
    path.write_bytes(bytes(data))
    with pytest.raises(StoreCorrupt, match=str(path)):
        s = open_store(f"sqlite:///{path}")
        s.read(0)


def test_a_missing_folder_is_named(tmp_path: Path) -> None:
    with pytest.raises(StoreError, match="does not exist"):
        open_store(f"sqlite:///{tmp_path}/no/such/folder/x.db")


def test_a_locked_database_waits_then_fails_clearly_with_nothing_written(db_path: Path) -> None:
    store = open_store(f"sqlite:///{db_path}?lock_timeout=0.2")
    svc = store.service("alpha")
    holder = sqlite3.connect(db_path, isolation_level=None)
    holder.execute("BEGIN IMMEDIATE")
    try:
        with pytest.raises(StoreLocked, match=r"locked \(waited 0.2s\)"):
            svc.commit(events=[], emitted=[envelope()], tracking={"log": 1})
    finally:
        holder.execute("ROLLBACK")
        holder.close()
    assert store.read(0) == [] and svc.position() == 0
    svc.commit(events=[], emitted=[envelope()], tracking={"log": 1})  # works once the lock is gone
    assert len(store.read(0)) == 1
    store.close()


def test_defaults_are_wal_and_full_fsync(sqlite_store) -> None:  # type: ignore[no-untyped-def]
    conn = sqlite_store._conn()
    assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert conn.execute("PRAGMA synchronous").fetchone()[0] == 2  # FULL
    fast = open_store(f"sqlite:///{sqlite_store.path}?durability=normal")
    assert fast._conn().execute("PRAGMA synchronous").fetchone()[0] == 1  # type: ignore[attr-defined]
    fast.close()


WRITER = textwrap.dedent(
    """
    import os, signal, sys
    from tests.store_contract import envelope
    from choreo import open_store
    store = open_store(sys.argv[1])
    svc = store.service("alpha")
    for i in range(1, 201):
        svc.commit(events=[], emitted=[envelope(saga=str(i))], tracking={"log": i})
        print(i, flush=True)
    signal.pause()
    """
)


def test_committed_events_survive_kill_9(db_path: Path) -> None:
    proc = subprocess.Popen(
        [sys.executable, "-c", WRITER, f"sqlite:///{db_path}"],
        stdout=subprocess.PIPE, text=True, cwd=Path(__file__).parent.parent,
    )
    acknowledged = 0
    assert proc.stdout is not None
    for line in proc.stdout:
        acknowledged = int(line)
        if acknowledged == 120:
            break
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    proc.stdout.close()
    store = open_store(f"sqlite:///{db_path}")
    saved = store.read(0, 1000)
    assert len(saved) >= acknowledged  # every acknowledged commit is there
    assert store.service("alpha").position() == len(saved)  # and its tracking with it
    store.close()


APPENDER = textwrap.dedent(
    """
    import sys
    from tests.store_contract import envelope
    from choreo import open_store
    store = open_store(sys.argv[1])
    for i in range(300):
        store.append([envelope(saga=sys.argv[2])])
    """
)


def test_several_processes_append_to_one_file_without_lock_errors(db_path: Path) -> None:
    open_store(f"sqlite:///{db_path}").close()
    procs = [
        subprocess.Popen([sys.executable, "-c", APPENDER, f"sqlite:///{db_path}", f"p{n}"],
                         cwd=Path(__file__).parent.parent, stderr=subprocess.PIPE, text=True)
        for n in range(4)
    ]
    for p in procs:
        _, err = p.communicate(timeout=120)
        assert p.returncode == 0, err
    store = open_store(f"sqlite:///{db_path}")
    events = store.read(0, 10_000)
    assert len(events) == 1200
    assert [e.position for e in events] == sorted(e.position for e in events)
    store.close()
