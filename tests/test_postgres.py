"""The PostgreSQL store through a real server (a throwaway cluster: `postgres_server`): the log contract,
its own settings and errors, and gap-free positions under concurrent appenders."""

from __future__ import annotations

import subprocess
import sys
import threading
import time
from pathlib import Path
from uuid import uuid4

import pytest

from choreo import EventStore, StoreError, StoreURLError, open_store
from choreo.errors import StoreLocked, StoreNotFound
from choreo.pgcluster import PostgresCluster
from choreo.tansu import free_port
from tests.store_contract import LogStoreContract, envelope

psycopg = pytest.importorskip("psycopg")
from choreo.stores.postgres import LOG_LOCK  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent


class TestPostgresStore(LogStoreContract):
    __test__ = True

    @pytest.fixture(autouse=True)
    def _url(self, postgres_url: str) -> None:
        self.url = postgres_url

    def make_store(self) -> EventStore:
        return open_store(self.url)


# -- settings and errors ------------------------------------------------------------------
@pytest.mark.parametrize(
    "url, match",
    [
        ("postgresql://localhost/", "no database"),
        ("postgresql://localhost/db?lock_timeout=soon", "lock_timeout must be a positive number"),
        ("postgresql://localhost/db?durability=reckless", "unknown durability"),
        ("postgresql://localhost/db?speed=max", "speed"),
    ],
)
def test_bad_postgres_urls_say_what_is_wrong(url: str, match: str) -> None:
    with pytest.raises(StoreURLError, match=match):
        open_store(url)


def test_an_unreachable_server_is_named_with_its_address() -> None:
    port = free_port()
    with pytest.raises(StoreError, match=rf"database 'db' at 127.0.0.1:{port} is not reachable"):
        open_store(f"postgresql://postgres@127.0.0.1:{port}/db?connect_timeout=2")


def test_an_unknown_user_fails_authentication_clearly(postgres_server: PostgresCluster) -> None:
    url = postgres_server.url("postgres").replace("postgres@", "nobody@", 1)
    with pytest.raises(StoreError, match="authentication failed.*nobody"):
        open_store(url)


def test_a_password_in_the_url_is_never_shown() -> None:
    port = free_port()
    with pytest.raises(StoreError) as raised:
        open_store(f"postgresql://u:s3cret@127.0.0.1:{port}/db?connect_timeout=2&speed=max")
    assert "s3cret" not in str(raised.value) and "***" in str(raised.value)


def test_a_missing_database_is_not_found_read_only_and_created_otherwise(postgres_server: PostgresCluster) -> None:
    url = postgres_server.url(f"fresh_{uuid4().hex[:8]}")
    with pytest.raises(StoreNotFound, match="no such database; nothing was created"):
        open_store(url, create=False)
    with pytest.raises(StoreNotFound):  # ... still missing: nothing was created
        open_store(url, create=False)
    with open_store(url) as store:  # a store that may create makes the database and its log
        store.append([envelope()])
    with open_store(url, create=False) as store:
        assert store.last_position() == 1  # type: ignore[attr-defined]


def test_read_only_creates_nothing_and_writes_nothing(postgres_url: str) -> None:
    with pytest.raises(StoreNotFound, match="not a choreo store"):
        open_store(postgres_url, create=False)  # a database without choreo's log
    with open_store(postgres_url) as store:
        store.append([envelope()])
    with open_store(postgres_url, create=False) as ro:
        with pytest.raises(StoreNotFound, match="no service 'payment'"):
            ro.service("payment")
        with pytest.raises(StoreError, match="read-only"):
            ro.append([envelope()])
        with pytest.raises(StoreError, match="read-only"):
            ro.documents("sagas").put({"k": {}}, tracking={"log": 1})
        assert ro.documents("sagas").get("k") is None and ro.documents("sagas").tracking() == {}
        assert ro.tables(["svc_payment_events", "rm_sagas_documents"]) == set()  # type: ignore[attr-defined]


def test_durability_sets_synchronous_commit(postgres_url: str) -> None:
    for durability, expected in (("full", "on"), ("normal", "off")):
        with open_store(f"{postgres_url}?durability={durability}") as store:
            assert store._query("SHOW synchronous_commit") == [(expected,)]  # type: ignore[attr-defined]


def test_a_held_log_lock_fails_the_append_clearly_and_writes_nothing(postgres_url: str) -> None:
    store = open_store(f"{postgres_url}?lock_timeout=0.2")
    other = psycopg.connect(postgres_url, autocommit=True)
    try:
        other.execute("BEGIN")
        other.execute("SELECT pg_advisory_xact_lock(%s)", (LOG_LOCK,))  # another appender in its transaction
        t0 = time.monotonic()
        with pytest.raises(StoreLocked, match=r"lock_timeout \(0.2s\)"):
            store.append([envelope()])
        assert time.monotonic() - t0 < 5
        assert store.last_position() == 0  # type: ignore[attr-defined]
        other.execute("ROLLBACK")
        assert store.append([envelope()]) == [1]
    finally:
        other.close()
        store.close()


# -- positions and wake-ups ---------------------------------------------------------------
def test_positions_are_gap_free_in_commit_order_under_concurrent_appenders(postgres_url: str) -> None:
    """Readers never skip: whatever they read, positions run 1, 2, 3... with no hole that fills later."""
    writers, commits = 4, 40
    stores = [open_store(postgres_url) for _ in range(writers + 1)]
    reader = stores[-1]
    errors: list[BaseException] = []
    seen: list[int] = []

    def write(store: EventStore) -> None:
        try:
            for i in range(commits):
                svc = store.service("alpha")
                # a service commit, its log insert the last step, and a plain append, alternately
                if i % 2:
                    store.append([envelope(), envelope()])
                else:
                    svc.commit(events=[], emitted=[envelope()], tracking={f"w{id(store)}": i + 1})
        except BaseException as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=write, args=(s,)) for s in stores[:writers]]
    for t in threads:
        t.start()
    while any(t.is_alive() for t in threads):
        seen += [e.position for e in reader.read(seen[-1] if seen else 0, 1000)]  # type: ignore[attr-defined,misc]
    seen += [e.position for e in reader.read(seen[-1] if seen else 0, 1000)]  # type: ignore[attr-defined,misc]
    for s in stores:
        s.close()
    assert errors == []
    total = writers * (commits // 2) * 3
    assert seen == list(range(1, total + 1))


def test_a_waiting_reader_wakes_at_once_when_another_store_appends(postgres_url: str) -> None:
    """NOTIFY wakes the reader: with a 30 s poll interval it would otherwise wait 30 s."""
    waiter = open_store(f"{postgres_url}?poll_interval=30")
    writer = open_store(postgres_url)  # another store: its commits reach the waiter only by NOTIFY
    woke: list[float] = []

    def wait() -> None:
        waiter.wait(0, 10)  # type: ignore[attr-defined]
        woke.append(time.monotonic())

    try:
        thread = threading.Thread(target=wait)
        thread.start()
        time.sleep(0.5)  # the reader is waiting (and listening)
        assert not woke
        committed = time.monotonic()
        writer.service("alpha").commit(events=[], emitted=[envelope()], tracking={"log": 1})
        thread.join(5)
        assert woke and woke[0] - committed < 0.5, "the reader was not woken by the commit"
    finally:
        waiter.close()
        writer.close()


@pytest.mark.slow
def test_a_waiting_reader_in_another_process_wakes_at_once(postgres_url: str) -> None:
    """`wait()` in another process (a `choreo run` service's) returns within 0.5 s of the commit."""
    script = (
        "import sys, time; from choreo import open_store\n"
        "s = open_store(sys.argv[1] + '?poll_interval=30'); s.last_position()\n"
        "print('ready', flush=True); ok = s.wait(0, 20); print(time.time(), ok, flush=True)\n"
    )
    proc = subprocess.Popen([sys.executable, "-c", script, postgres_url], stdout=subprocess.PIPE, text=True,
                            cwd=ROOT)
    try:
        assert proc.stdout is not None and proc.stdout.readline().strip() == "ready"
        time.sleep(0.5)  # it waits, listening
        with open_store(postgres_url) as writer:
            committed = time.time()
            writer.append([envelope()])
        woke, ok = proc.stdout.readline().split()
        assert ok == "True" and float(woke) - committed < 0.5
    finally:
        proc.kill()
        proc.communicate()


def test_without_the_server_binaries_the_cluster_and_the_benchmark_say_why(monkeypatch: pytest.MonkeyPatch) -> None:
    import choreo.pgcluster as pgcluster
    from benchmarks import postgres as bench

    monkeypatch.delenv("PG_BIN", raising=False)
    monkeypatch.setattr(pgcluster.shutil, "which", lambda name: None)
    monkeypatch.setattr(pgcluster.glob, "glob", lambda pattern: [])
    with pytest.raises(pgcluster.PostgresUnavailable, match="apt-get install postgresql"):
        pgcluster.PostgresCluster()
    result = bench.measure(10, 2, sqlite={"sagas_per_s": 1.0, "p50_ms": 1.0, "p99_ms": 1.0})
    assert "initdb" in result["skipped"]
    assert bench.rows(result)[0][1] == "skipped"


def test_a_reader_skips_what_the_notifications_say_it_does_not_want_without_asking(
    postgres_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    from choreo.store import Interest

    reader, writer = open_store(f"{postgres_url}?poll_interval=0.3"), open_store(postgres_url)
    asked: list[int] = []
    read_upto = reader._read_upto  # type: ignore[attr-defined]
    monkeypatch.setattr(reader, "_read_upto", lambda after, *a: asked.append(after) or read_upto(after, *a))
    feed = reader.feed("r", dict, interest=Interest(frozenset({"A"})))
    try:
        assert feed.poll(10, 0.2) == [] and feed.poll(10, 0.2) == []  # the second look is made while listening
        asked.clear()
        writer.append([envelope(type_="B"), envelope(type_="C")])
        assert feed.poll(10, 2.0) == [] and asked == []  # told by the notification: nothing it wants
        assert feed.position == 2 and feed.caught_up()  # type: ignore[attr-defined]
        writer.append([envelope(type_="A")])
        assert [e.type for e in feed.poll(10, 2.0)] == ["A"] and asked == [2]
        # an append nobody notified (a foreign writer) leaves a gap in what the notifications say: it asks
        with psycopg.connect(postgres_url, autocommit=True) as foreign, foreign.transaction():
            foreign.execute("SELECT pg_advisory_xact_lock(%s)", (LOG_LOCK,))
            foreign.execute("INSERT INTO choreo_log (position, event_id, type, version, service, occurred_at, payload) "
                            "VALUES (4, 'foreign', 'A', 1, 'x', '2026-01-01T00:00:00+00:00', '{}')")
        assert [e.event_id for e in feed.poll(10, 3.0)] == ["foreign"]
    finally:
        feed.close()
        reader.close()
        writer.close()


def test_a_segment_cannot_change_hands_while_a_commit_for_it_is_under_way(
    postgres_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Writers run concurrently on PostgreSQL: a replica taking a segment waits for the old owner's commit
    (which share-locked the segment's claim), so it reads the segment's position after that commit."""
    from choreo.store import Held
    from choreo.stores._postgres_service import PostgresServiceStore

    a_store, b_store = open_store(postgres_url), open_store(postgres_url)
    a, b = a_store.service("svc"), b_store.service("svc")
    a.claims(2)
    held = Held("a", a.acquire("a", [0, 1], 30))
    a_store.append([envelope()])
    paused, resume = threading.Event(), threading.Event()
    letters_of = PostgresServiceStore._letters_of

    def pause(self: PostgresServiceStore, *args: object) -> None:  # after the claim check, inside the commit
        if threading.current_thread().name == "a-commit":
            paused.set()
            resume.wait(10)
        letters_of(self, *args)  # type: ignore[arg-type]

    monkeypatch.setattr(PostgresServiceStore, "_letters_of", pause)
    commit = threading.Thread(name="a-commit", target=lambda: a.commit(
        events=[], emitted=[], tracking={"log#0": 1, "log#1": 1}, claim=held))
    commit.start()
    took: dict[int, int] = {}
    try:
        assert paused.wait(10)
        taker = threading.Thread(target=lambda: took.update(b.acquire("b", [0, 1], 30, dead=["a"])))
        taker.start()
        taker.join(0.5)
        assert taker.is_alive() and not took  # waits for a's commit
    finally:
        resume.set()
        commit.join(10)
    taker.join(10)
    assert sorted(took) == [0, 1]
    assert b.tracking()["log#0"] == 1  # what b reads now includes a's commit
    a_store.close()
    b_store.close()
