"""Wake-ups on SQLite (choreo.stores._wakeup): a waiting reader is woken by a commit in any process.

Unless a test is about the fallback to polling, every reader here looks at the log only
every 60 s by itself (`poll_interval=60`), and the tests give up after 30 s: a reader that
returns in time was woken, not polling.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from choreo.stores import _wakeup
from choreo.stores.sqlite import SQLiteStore
from tests.store_contract import envelope

FALLBACK = 60.0  # a reader's own poll: far beyond the tests' patience
PATIENCE = 30.0

needs_sockets = pytest.mark.skipif(not _wakeup._SUPPORTED, reason="no Unix datagram sockets here: readers poll")

READER = textwrap.dedent(
    """
    import sys, time
    from choreo.stores.sqlite import SQLiteStore

    store = SQLiteStore(sys.argv[1], poll_interval=float(sys.argv[2]))
    started = time.monotonic()
    woken = store.wait(int(sys.argv[3]), float(sys.argv[2]))
    print(woken, time.monotonic() - started, flush=True)
    """
)


@pytest.fixture
def reader(db_path: Path) -> Iterator[Callable[..., subprocess.Popen[str]]]:
    """Start a process that waits for the log to grow past `after`, then prints whether it did."""
    procs: list[subprocess.Popen[str]] = []

    def start(after: int = 0) -> subprocess.Popen[str]:
        procs.append(subprocess.Popen(
            [sys.executable, "-c", READER, str(db_path), str(FALLBACK), str(after)],
            stdout=subprocess.PIPE, text=True, cwd=Path(__file__).parent.parent,
        ))
        return procs[-1]

    yield start
    for proc in procs:  # those a failed test left waiting
        if proc.poll() is None:
            proc.kill()
        proc.communicate()


def sockets(db: Path) -> list[str]:
    try:
        return sorted(os.listdir(f"{db}{_wakeup.SUFFIX}"))
    except FileNotFoundError:
        return []


def eventually(condition: Callable[[], bool], what: str) -> None:
    deadline = time.monotonic() + PATIENCE
    while not condition():
        assert time.monotonic() < deadline, what
        time.sleep(0.01)


def waiting(db: Path, pid: int) -> Callable[[], bool]:
    return lambda: any(name.startswith(f"{pid}-") for name in sockets(db))


def woken(proc: subprocess.Popen[str]) -> float:
    """Wait for a reader process; return how long it waited (it must have been woken)."""
    try:
        out, _ = proc.communicate(timeout=PATIENCE)
    except subprocess.TimeoutExpired:
        pytest.fail(f"the reader was not woken within {PATIENCE:g}s")
    result, elapsed = out.split()
    assert result == "True"
    return float(elapsed)


class Waiter(threading.Thread):
    """A thread that waits on `store` for the log to grow past `after`."""

    def __init__(self, store: SQLiteStore, after: int = 0, timeout: float = FALLBACK) -> None:
        super().__init__(daemon=True)
        self.store, self.after, self.timeout = store, after, timeout
        self.result: bool | None = None

    def run(self) -> None:
        self.result = self.store.wait(self.after, self.timeout)

    def woken(self) -> bool:
        self.join(PATIENCE)
        return not self.is_alive() and self.result is True


@pytest.fixture
def writer(db_path: Path) -> Iterator[SQLiteStore]:
    store = SQLiteStore(str(db_path))
    yield store
    store.close()


@needs_sockets
@pytest.mark.slow
def test_a_reader_in_another_process_is_woken_long_before_its_own_poll(
    db_path: Path, writer: SQLiteStore, reader: Callable[..., subprocess.Popen[str]]
) -> None:
    proc = reader()
    eventually(waiting(db_path, proc.pid), "the reader never waited")
    writer.append([envelope()])
    assert woken(proc) < FALLBACK / 2
    assert sockets(db_path) == []  # a reader's socket exists only while it waits


@needs_sockets
@pytest.mark.slow
def test_many_readers_in_other_processes_are_all_woken_by_one_commit(
    db_path: Path, writer: SQLiteStore, reader: Callable[..., subprocess.Popen[str]]
) -> None:
    procs = [reader() for _ in range(3)]
    for proc in procs:
        eventually(waiting(db_path, proc.pid), "a reader never waited")
    writer.service("alpha").commit(events=[], emitted=[envelope()], tracking={"log": 0})
    for proc in procs:
        assert woken(proc) < FALLBACK / 2


@needs_sockets
@pytest.mark.slow
def test_a_killed_reader_leaves_a_socket_that_writers_step_over_then_remove(
    db_path: Path, writer: SQLiteStore, reader: Callable[..., subprocess.Popen[str]]
) -> None:
    doomed = reader()
    eventually(waiting(db_path, doomed.pid), "the reader never waited")
    os.kill(doomed.pid, signal.SIGKILL)
    doomed.wait()
    (leftover,) = sockets(db_path)

    alive = reader(after=1)
    eventually(waiting(db_path, alive.pid), "the second reader never waited")
    writer.append([envelope()])  # the dead reader's socket refuses: the commit goes on
    writer.append([envelope()])
    assert woken(alive) < FALLBACK / 2
    assert sockets(db_path) == [leftover]  # young: it could be a reader in the middle of bind()

    old = time.time() - 2 * _wakeup.STALE_AFTER
    os.utime(f"{db_path}{_wakeup.SUFFIX}/{leftover}", (old, old))
    writer.append([envelope()])
    assert sockets(db_path) == []


def test_a_read_only_store_creates_nothing_and_still_sees_commits(tmp_path: Path, db_path: Path) -> None:
    SQLiteStore(str(db_path)).close()
    before = sorted(p.name for p in tmp_path.iterdir())
    with_log = SQLiteStore(str(db_path))
    try:
        ro = SQLiteStore(str(db_path), create=False)
        assert ro._wakeup.unavailable is not None
        waiter = Waiter(ro, timeout=PATIENCE)
        waiter.start()
        time.sleep(0.05)
        with_log.append([envelope()])
        assert waiter.woken()  # by polling, every 10 ms
        assert not os.path.exists(f"{db_path}{_wakeup.SUFFIX}")
        ro.close()
    finally:
        with_log.close()
    assert sorted(p.name for p in tmp_path.iterdir()) == before


@needs_sockets
def test_another_store_in_the_same_process_is_woken(db_path: Path, writer: SQLiteStore) -> None:
    other = SQLiteStore(str(db_path), poll_interval=FALLBACK)
    waiter = Waiter(other)
    waiter.start()
    eventually(lambda: len(sockets(db_path)) == 1, "the reader never waited")
    writer.append([envelope()])
    assert waiter.woken()
    other.close()


@needs_sockets
def test_threads_waiting_on_one_store_share_one_socket_and_are_all_woken(db_path: Path, writer: SQLiteStore) -> None:
    store = SQLiteStore(str(db_path), poll_interval=FALLBACK)
    waiters = [Waiter(store) for _ in range(4)]
    for w in waiters:
        w.start()
    eventually(lambda: len(sockets(db_path)) == 1 and store._wakeup._waiting == 4, "the threads never waited")
    writer.append([envelope()])  # another store: it rings the socket, whose thread wakes them all
    assert all(w.woken() for w in waiters)
    store.close()


@needs_sockets
def test_a_socket_outlives_the_waits_briefly_then_goes_and_comes_back(
    db_path: Path, writer: SQLiteStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(_wakeup, "LINGER", 0.2)
    store = SQLiteStore(str(db_path), poll_interval=FALLBACK)
    assert store.wait(0, 0.05) is False
    eventually(lambda: sockets(db_path) == [], "the socket stayed after its readers stopped waiting")
    waiter = Waiter(store)
    waiter.start()
    eventually(lambda: len(sockets(db_path)) == 1, "the reader never waited")
    writer.append([envelope()])
    assert waiter.woken()
    store.close()


def test_a_commit_wakes_the_threads_of_its_own_store(db_path: Path) -> None:
    store = SQLiteStore(str(db_path), poll_interval=FALLBACK)
    waiters = [Waiter(store) for _ in range(3)]
    for w in waiters:
        w.start()
    eventually(lambda: store._wakeup._waiting == 3, "the threads never waited")
    store.append([envelope()])  # its own readers are notified directly, not through the socket
    assert all(w.woken() for w in waiters)
    store.close()


def test_only_a_commit_that_appended_to_the_log_rings_other_processes(
    db_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = SQLiteStore(str(db_path))
    rings: list[bool] = []
    monkeypatch.setattr(store._wakeup, "notify", lambda appended=True: rings.append(appended))
    svc = store.service("alpha")  # creates tables
    svc.set_tracking({"log": 0})
    svc.commit(events=[], emitted=[], tracking={"log": 1})
    assert rings and not any(rings)
    rings.clear()
    svc.commit(events=[], emitted=[envelope()], tracking={"log": 2})
    store.append([envelope(), envelope()])
    assert rings == [True, True]
    store.close()


@needs_sockets
def test_a_folder_in_the_way_means_polling_and_commits_still_work(db_path: Path, writer: SQLiteStore) -> None:
    Path(f"{db_path}{_wakeup.SUFFIX}").write_text("not a folder")
    store = SQLiteStore(str(db_path))
    waiter = Waiter(store, timeout=PATIENCE)
    waiter.start()
    eventually(lambda: store._wakeup.unavailable is not None, "the reader never tried to bind")
    assert str(db_path) in (store._wakeup.unavailable or "")
    writer.append([envelope()])  # no folder to ring: the commit does not mind
    assert waiter.woken()  # by polling, every 10 ms
    store.close()


@needs_sockets
@pytest.mark.skipif(hasattr(os, "geteuid") and os.geteuid() == 0, reason="root writes anywhere")
def test_a_folder_that_is_not_writable_means_polling(db_path: Path, writer: SQLiteStore) -> None:
    folder = Path(f"{db_path}{_wakeup.SUFFIX}")
    folder.mkdir(mode=0o500)
    try:
        store = SQLiteStore(str(db_path))
        waiter = Waiter(store, timeout=PATIENCE)
        waiter.start()
        eventually(lambda: store._wakeup.unavailable is not None, "the reader never tried to bind")
        writer.append([envelope()])
        assert waiter.woken()
        store.close()
    finally:
        folder.chmod(0o700)


def test_without_unix_sockets_readers_poll(db_path: Path, writer: SQLiteStore, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(_wakeup, "_SUPPORTED", False)
    store = SQLiteStore(str(db_path))
    assert "no Unix datagram sockets" in (store._wakeup.unavailable or "")
    waiter = Waiter(store, timeout=PATIENCE)
    waiter.start()
    time.sleep(0.05)
    writer.append([envelope()])
    assert waiter.woken()
    assert sockets(db_path) == []
    store.close()


@pytest.mark.skipif(not _wakeup._PROC_FD, reason="a path this long is reached through /proc/self/fd")
def test_a_path_too_long_for_a_socket_address_still_wakes(tmp_path: Path) -> None:
    folder = tmp_path / ("deep" * 30)
    folder.mkdir()
    db = folder / "choreo.db"
    assert len(str(db)) > 110
    writer = SQLiteStore(str(db))
    store = SQLiteStore(str(db), poll_interval=FALLBACK)
    waiter = Waiter(store)
    waiter.start()
    eventually(lambda: len(sockets(db)) == 1, "the reader never waited")
    writer.append([envelope()])
    assert waiter.woken()
    assert store._wakeup.unavailable is None
    store.close()
    writer.close()
