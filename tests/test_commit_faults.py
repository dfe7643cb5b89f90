"""Guarantee 6 under store faults: a commit that fails skips nothing, and no input stops a service.

Each test goes through the real SQLite store (the lock tests also through PostgreSQL): a write
lock held past the lock timeout,
a full disk (a 16 MB tmpfs where the test may mount one, else an injected
`database or disk is full`), an event id that a service will derive already taken in
the log, and an operator command that breaks its schema.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any
from uuid import uuid5

import pytest

from choreo import Envelope, EventStore, Runner, StoreError, clock, open_store
from choreo.operations import list_dead_letters
from choreo.stores.sqlite import SQLiteStore
from services import TARGETS, system
from services.checks import check_invariants, read_facts
from services.demo import plan

REPO = Path(__file__).resolve().parent.parent


def start_planned(store: EventStore, orders: int, seed: int) -> list[tuple[str, object, str, str | None]]:
    planned = plan(orders, seed)
    system.start_many(store, [(order, saga_id) for saga_id, order, _, _ in planned])
    return planned  # type: ignore[return-value]


def assert_as_planned(store: EventStore, planned: list[tuple[str, object, str, str | None]]) -> None:
    facts = read_facts(store, {saga_id for saga_id, *_ in planned})
    wrong = {s: (facts[s].state if s in facts else None, state) for s, _, state, _ in planned
             if s not in facts or facts[s].state != state}
    assert wrong == {}, f"{len(wrong)} saga(s) did not end as planned: {list(wrong.items())[:5]}"
    assert all(check_invariants(store, facts).values()), check_invariants(store, facts)


def wait_until(done: Callable[[], bool], timeout: float = 60.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if done():
            return True
        time.sleep(0.05)
    return done()


def all_ended(store: EventStore, planned: list[tuple[str, object, str, str | None]]) -> bool:
    facts = read_facts(store, {saga_id for saga_id, *_ in planned})
    return len(facts) == len(planned) and all(f.state != "running" for f in facts.values())


# -- a commit that fails --------------------------------------------------------------------
class LockHolder:
    """Another session that takes and gives back the store's write lock at will: SQLite's
    (`BEGIN IMMEDIATE`), or the PostgreSQL log's advisory lock, which every append takes."""

    def __init__(self, url: str) -> None:
        if url.startswith("sqlite:///"):
            self.conn: Any = sqlite3.connect(url[len("sqlite:///"):], isolation_level=None)
            self.take_sql = ["BEGIN IMMEDIATE"]
        else:
            import psycopg

            from choreo.stores.postgres import LOG_LOCK

            self.conn = psycopg.connect(url, autocommit=True)
            self.take_sql = ["BEGIN", f"SELECT pg_advisory_xact_lock({LOG_LOCK})"]

    def take(self) -> None:
        for sql in self.take_sql:
            self.conn.execute(sql)

    def give(self) -> None:
        self.conn.execute("ROLLBACK")

    def close(self) -> None:
        self.conn.close()


def test_a_lock_held_past_the_timeout_skips_nothing_with_threads(
    durable_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    store = open_store(f"{durable_url}?lock_timeout=0.1")
    planned = start_planned(store, 60, seed=3)
    runner = Runner(system, store, batch_size=7)
    blocker = LockHolder(durable_url)
    blocker.take()  # another process holds the write lock
    caplog.set_level(logging.WARNING, logger="choreo")
    runner.start_threads()
    try:
        time.sleep(1.5)  # every service reads its batch, handles it, and fails to commit it
        assert not all_ended(store, planned)
        assert "StoreLocked" in caplog.text and "0.1s)" in caplog.text  # said, with the timeout
        blocker.give()
        assert wait_until(lambda: all_ended(store, planned)), "some sagas never ended after the lock was released"
    finally:
        blocker.close()
        runner.stop()
    assert_as_planned(store, planned)
    store.close()


def test_a_failed_commit_resumes_from_the_last_committed_position_when_run_by_hand(durable_url: str) -> None:
    store = open_store(f"{durable_url}?lock_timeout=0.05")
    planned = start_planned(store, 30, seed=5)
    runner = Runner(system, store, batch_size=5)
    blocker = LockHolder(durable_url)
    failures = 0
    for round_ in range(400):
        hold = round_ % 3 == 0  # a third of the attempts meet a held lock
        if hold:
            blocker.take()
        try:
            if runner.run_until_idle() == 0 and not hold:
                break
        except StoreError:
            failures += 1
        finally:
            if hold:
                blocker.give()
    blocker.close()
    assert failures > 0
    assert_as_planned(store, planned)
    store.close()


def test_an_injected_full_disk_at_commit_skips_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    store = open_store(f"sqlite:///{tmp_path}/full.db")
    assert isinstance(store, SQLiteStore)
    planned = start_planned(store, 41, seed=9)
    real = type(store.service("payment")).commit
    full = {"on": True, "refused": 0}

    def commit(self, **changes):  # type: ignore[no-untyped-def]
        if full["on"] and changes.get("emitted"):
            full["refused"] += 1
            try:
                raise sqlite3.OperationalError("database or disk is full")
            except sqlite3.Error as e:
                raise store._translate(e) from e
        return real(self, **changes)

    monkeypatch.setattr(type(store.service("payment")), "commit", commit)
    runner = Runner(system, store, batch_size=4)
    runner.start_threads()
    try:
        assert wait_until(lambda: full["refused"] >= 3, 20)
        full["on"] = False  # the operator frees space
        assert wait_until(lambda: all_ended(store, planned)), "some sagas never ended after space was freed"
    finally:
        runner.stop()
    assert_as_planned(store, planned)
    store.close()


def test_a_real_full_disk_skips_nothing(small_disk: Path) -> None:
    path = small_disk / "choreo.db"
    store = open_store(f"sqlite:///{path}")
    assert isinstance(store, SQLiteStore)
    planned = start_planned(store, 41, seed=13)
    runner = Runner(system, store, batch_size=4)
    filler = small_disk / "filler"
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT)  # fill what is left, but for a little
    try:
        while os.write(fd, b"\0" * 4096):
            pass
    except OSError:
        pass
    finally:
        os.close(fd)
    os.truncate(filler, max(0, os.path.getsize(filler) - 48 * 1024))
    runner.start_threads()
    try:
        time.sleep(2.0)
        assert not all_ended(store, planned)  # the disk filled up mid-way
        filler.unlink()  # the operator frees space
        assert wait_until(lambda: all_ended(store, planned)), "some sagas never ended after space was freed"
    finally:
        runner.stop()
    assert_as_planned(store, planned)
    store.close()


# -- inputs that used to stop a service ---------------------------------------------------
def _emitted_id(cause_event_id: str, service: str, n: int = 0) -> str:
    from choreo._unit_of_work import _EVENT_NAMESPACE

    return str(uuid5(_EVENT_NAMESPACE, f"{cause_event_id}/{service}/{n}"))


def _start_id(saga_id: str) -> str:
    from choreo.system import _START_NAMESPACE

    return str(uuid5(_START_NAMESPACE, saga_id))


def test_an_emitted_id_already_taken_parks_the_trigger_and_the_rest_flows(tmp_path: Path) -> None:
    store = open_store(f"sqlite:///{tmp_path}/squat.db")
    assert isinstance(store, SQLiteStore)
    planned = plan(100, seed=21)
    victim = next(s for s, _, state, _ in planned if state == "completed")
    squatter = Envelope(  # a row whose id equals what inventory will derive for the victim's reservation
        event_id=_emitted_id(_start_id(victim), "inventory"), type="choreo.HandlerRetried", version=1,
        saga_id="someone-else", causation_id=None, service="elsewhere", step=None, outcome=None,
        occurred_at=clock.now(), payload=json.dumps(
            {"of_event_id": "x", "handled_type": "x", "attempts": 2, "last_error": "x"}),
    )
    store.append([squatter])
    system.start_many(store, [(order, saga_id) for saga_id, order, _, _ in planned])
    runner = Runner(system, store)
    finished = threading.Event()

    def run() -> None:
        runner.run_until_idle(max_rounds=200)
        finished.set()

    threading.Thread(target=run, daemon=True).start()
    assert finished.wait(60), "the services did not go idle (a conflict retried forever?)"
    (letter,) = list_dead_letters(store, ["inventory"])
    assert letter.saga_id == victim and letter.type == "OrderPlaced"
    assert "id is taken" in letter.reason and squatter.event_id in letter.reason
    facts = read_facts(store, {s for s, *_ in planned})
    others = [(s, state) for s, _, state, _ in planned if s != victim]
    assert all(facts[s].state == state for s, state in others)
    store.close()


def test_a_malformed_operator_command_is_parked_and_the_service_keeps_running(tmp_path: Path) -> None:
    store = open_store(f"sqlite:///{tmp_path}/cmd.db")
    assert isinstance(store, SQLiteStore)
    bad = [
        {"service": "shipping"},  # no dead_letter_id
        {"service": "shipping", "dead_letter_id": "seven"},
        {"dead_letter_id": 1},  # names no service: every service parks it
    ]
    store.append([
        Envelope(event_id=f"cmd-{i}", type="choreo.RetryRequested", version=1, saga_id="s-1", causation_id=None,
                 service="operator", step=None, outcome=None, occurred_at=clock.now(), payload=json.dumps(p))
        for i, p in enumerate(bad)
    ])
    planned = start_planned(store, 10, seed=2)
    Runner(system, store).run_until_idle()
    shipping = list_dead_letters(store, ["shipping"])
    assert {d.event_id for d in shipping} == {"cmd-0", "cmd-1", "cmd-2"}
    assert all(d.reason.startswith("invalid operator command") for d in shipping)
    assert "dead_letter_id" in shipping[0].reason
    assert {d.event_id for d in list_dead_letters(store, ["payment"])} == {"cmd-2"}
    assert_as_planned(store, planned)  # the commands held nothing: every saga ended
    store.close()


@pytest.mark.slow
def test_choreo_run_parks_a_malformed_command_instead_of_exiting(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path}/run.db"
    store = open_store(url)
    store.append([Envelope(
        event_id="cmd-0", type="choreo.RetryRequested", version=1, saga_id="s-1", causation_id=None,
        service="operator", step=None, outcome=None, occurred_at=clock.now(), payload='{"service": "shipping"}',
    )])
    proc = subprocess.Popen([sys.executable, "-m", "choreo", "run", TARGETS["shipping"], "--store", url],
                            cwd=REPO, stdin=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        assert wait_until(lambda: bool(list_dead_letters(store, ["shipping"])) or proc.poll() is not None, 30)
        time.sleep(0.5)
        assert proc.poll() is None, "choreo run exited"
    finally:
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=30)
    assert proc.returncode == 0, err.decode()
    (letter,) = list_dead_letters(store, ["shipping"])
    assert letter.event_id == "cmd-0" and "invalid operator command" in letter.reason
    store.close()
