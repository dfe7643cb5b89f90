"""Adversarial tests of the fault fixes, on the real SQLite store (and real `choreo run` processes).

Each test attacks one of the fixes: garbage rows written around choreo, a failed commit in
the middle of an operator's command, deadlines that cannot fire, a starter whose start event
is parked, an operator's compensation of a saga that completed while its starter was down,
two writers of the projection, `kill -9` and a full disk under processes, corrupt files under
the read commands. A test marked `xfail(strict=True, reason="BUG: ...")` shows a bug that is
still there; the others are attacks that held.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import sqlite3
import subprocess
import sys
import time
from collections import Counter, defaultdict
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path
from typing import Any
from uuid import uuid4

import pytest

from choreo.errors import CommandRefused
from freezegun import freeze_time

from choreo import (
    Context, Envelope, Event, Processor, RetryPolicy, Runner, SagaProjection, Service, StoreError, System, clock,
    open_store,
)
from choreo.cli import main
from choreo.operations import find_dead_letter, force_compensation, list_dead_letters, request_retry
from choreo.projection import dumps, stored_timeline
from choreo.stores.sqlite import SQLiteStore
from choreo.store import DocumentStore
from services import TARGETS, orders, system
from services.checks import check_invariants, read_facts
from services.contracts import OrderPlaced
from services.demo import plan

REPO = Path(__file__).resolve().parent.parent
ENDS = ("choreo.SagaCompleted", "choreo.SagaFailed", "OrderConfirmed", "OrderCancelled")
COMPLETED = Counter({"choreo.SagaCompleted": 1, "OrderConfirmed": 1})
FAILED = Counter({"choreo.SagaFailed": 1, "OrderCancelled": 1})
LOG_COLUMNS = ("event_id", "type", "version", "saga_id", "causation_id", "service", "step", "outcome",
               "occurred_at", "payload")


# -- helpers ---------------------------------------------------------------------------------------

def order(i: int, **changes: object) -> OrderPlaced:
    fields: dict[str, object] = dict(order_id=f"adv-{i}", customer_id=f"customer-{i}", sku="widget", quantity=1,
                                     amount=100, address="1 Main St")
    return OrderPlaced(**{**fields, **changes})  # type: ignore[arg-type]


def new_store(tmp_path: Path, name: str = "adv.db") -> tuple[Path, str, SQLiteStore]:
    path = tmp_path / name
    url = f"sqlite:///{path}"
    store = open_store(url)
    assert isinstance(store, SQLiteStore)
    return path, url, store


def insert_row(path: Path, **columns: object) -> None:
    """Write a log row straight into the file, around choreo's checks (a foreign or damaged writer)."""
    row: dict[str, object] = dict(event_id=str(uuid4()), type="AdvThing", version=1, saga_id="garbage",
                                  causation_id=None, service="elsewhere", step=None, outcome=None,
                                  occurred_at="2026-01-01T00:00:00+00:00", payload="{}")
    row.update(columns)
    conn = sqlite3.connect(path, isolation_level=None)
    try:
        conn.execute(f"INSERT INTO choreo_log ({', '.join(LOG_COLUMNS)}) VALUES "
                     f"({', '.join(':' + c for c in LOG_COLUMNS)})", row)
    finally:
        conn.close()


def ends_per_saga(path: Path) -> dict[str, Counter[str]]:
    """How many of each end event every saga has in the log (read with plain sqlite3)."""
    conn = sqlite3.connect(path)
    try:
        per: dict[str, Counter[str]] = defaultdict(Counter)
        marks = ",".join("?" * len(ENDS))
        for saga_id, kind in conn.execute(f"SELECT saga_id, type FROM choreo_log WHERE type IN ({marks})", ENDS):
            per[saga_id][kind] += 1
        return dict(per)
    finally:
        conn.close()


def log_rows(path: Path) -> int:
    conn = sqlite3.connect(path)
    try:
        return int(conn.execute("SELECT COUNT(*) FROM choreo_log").fetchone()[0])
    finally:
        conn.close()


def snapshot(documents: DocumentStore) -> list[str]:
    """Every saga document with its timeline, canonically."""
    return sorted(dumps({**d, "timeline": stored_timeline(documents, d["saga_id"], d)}) for d in documents.scan())


def rebuilt(url: str) -> list[str]:
    """The projection of `url` built from position 0 in one go, in a read model of its own."""
    store = open_store(url)
    try:
        projection = SagaProjection(store, sagas=system.sagas)
        projection.documents = store.documents(f"check_{uuid4().hex[:8]}")
        projection.replay()
        return snapshot(projection.documents)
    finally:
        store.close()


def wait_until(done: Callable[[], bool], timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if done():
            return True
        time.sleep(0.05)
    return done()


# == 1. garbage rows written straight into choreo_log =================================================

@pytest.mark.parametrize("column", ["causation_id", "saga_id", "step", "outcome"])
def test_a_row_with_a_blob_column_is_parked_and_the_services_keep_running(tmp_path: Path, column: str) -> None:
    path, _, store = new_store(tmp_path)
    before = system.start(store, order(1))
    insert_row(path, **{column: b"\x00\xff"})
    after = system.start(store, order(2))
    try:
        Runner(system, store).run_until_idle(max_rounds=50)
        facts = read_facts(store, {before, after})
        assert facts[before].state == facts[after].state == "completed"
        assert any(d.type == "AdvThing" for d in list_dead_letters(store, TARGETS))
    finally:
        store.close()


@pytest.mark.parametrize("column", ["event_id", "type", "service", "causation_id", "step", "outcome"])
def test_a_row_with_a_blob_column_never_breaks_the_projection(tmp_path: Path, column: str) -> None:
    path, url, store = new_store(tmp_path)
    saga = system.start(store, order(1))
    Runner(system, store).run_until_idle()
    insert_row(path, saga_id="garbage", **{column: b"\x01\x02"})
    store.close()
    projection_store = open_store(url)
    try:
        projection = SagaProjection(projection_store, sagas=system.sagas)
        projection.update()
        assert projection.get(saga)["state"] == "completed"  # type: ignore[index]
        assert projection.get("garbage")["unknown_events"] >= 0  # type: ignore[index]
    finally:
        projection_store.close()


def test_a_row_that_is_not_utf8_is_parked_not_retried_forever(tmp_path: Path) -> None:
    path, _, store = new_store(tmp_path)
    conn = sqlite3.connect(path, isolation_level=None)
    conn.execute("INSERT INTO choreo_log (event_id, type, version, saga_id, causation_id, service, step, outcome, "
                 "occurred_at, payload) VALUES (?, 'AdvThing', 1, CAST(X'C3FF' AS TEXT), NULL, 'elsewhere', NULL, "
                 "NULL, '2026-01-01T00:00:00+00:00', '{}')", (str(uuid4()),))
    conn.close()
    saga = system.start(store, order(1))
    runner = Runner(system, store)
    errors = 0
    for _ in range(20):  # what `run_processor` does: try again after a StoreError
        try:
            if runner.run_until_idle(max_rounds=50) == 0:
                break
        except StoreError:
            errors += 1
    store.close()
    assert ends_per_saga(path).get(saga) == COMPLETED, f"the saga did not end ({errors} store errors)"


@pytest.mark.parametrize("columns", [
    {"event_id": b"\x01\x02"},
    {"type": b"OrderPlaced"},
    {"service": b"x"},
    {"type": "ItemsReserved", "payload": "not json"},
    {"type": "OrderPlaced", "payload": "[1, 2, 3]"},
    {"version": "one"},
    {"version": 1.5},
    {"version": 2**62},
    {"type": "OrderPlaced", "saga_id": None,
     "payload": order(9).model_dump_json()},
    {"payload": "x" * 5_000_000},
    {"occurred_at": "2026-02-30T00:00:00+00:00"},
    {"type": "choreo.RetryRequested", "payload": '{"service": "payment", "dead_letter_id": -1}'},
    {"type": "choreo.CompensationForced", "outcome": "failed", "payload": "{}"},
], ids=["blob-id", "blob-type", "blob-service", "not-json", "json-list", "text-version", "real-version",
        "huge-version", "no-saga-id", "5MB-payload", "bad-date", "retry-of-nothing", "bad-forced-failure"])
def test_other_garbage_rows_are_parked_and_every_other_saga_ends(tmp_path: Path, columns: dict[str, Any]) -> None:
    """Held: these rows are parked (or ignored) and the sagas around them end as planned."""
    path, _, store = new_store(tmp_path)
    before = system.start(store, order(1))
    insert_row(path, **columns)
    after = system.start(store, order(2, address="nowhere"))
    Runner(system, store).run_until_idle(max_rounds=50)
    ends = ends_per_saga(path)
    assert ends.get(before) == COMPLETED and ends.get(after) == FAILED
    assert all(check_invariants(store, read_facts(store, {before, after})).values())
    store.close()


def test_unicode_nul_and_huge_saga_ids_end_and_show(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Held: odd saga ids (unicode, NUL, SQL, 200 kB) run, end once, and show in the projection and the CLI."""
    path, url, store = new_store(tmp_path)
    ids = ["ü∂ 😀", "a\x00b", "a\x00", "x" * 200_000, " ", "'; DROP TABLE choreo_log; --", "%", "_", "\u202e"]
    for i, saga_id in enumerate(ids):
        system.start(store, order(i, address="nowhere" if i % 2 else "1 Main St"), saga_id=saga_id)
    Runner(system, store).run_until_idle()
    ends = ends_per_saga(path)
    assert {s: ends.get(s) for s in ids} == {s: FAILED if i % 2 else COMPLETED for i, s in enumerate(ids)}
    projection = SagaProjection(store, sagas=system.sagas)
    projection.update()
    assert {s["saga_id"] for s in projection.list()} == set(ids)
    store.close()
    capsys.readouterr()
    assert main(["sagas", "show", "ü∂ 😀", "--json", "--store", url, "--system", "services:system"]) == 0
    assert json.loads(capsys.readouterr().out)["state"] == "completed"


# == 2. the processor under faults (small systems of their own) =======================================

class AdvPing(Event):
    n: int


class AdvPong(Event):
    n: int


def test_a_transient_error_while_the_good_prefix_is_handled_again_does_not_stop_the_service(tmp_path: Path) -> None:
    pinger = Service("adv_pinger", starts=[AdvPing])
    ponger = Service("adv_ponger", retry=RetryPolicy(max_attempts=3, base_delay=0.001, retry_on=(TimeoutError,)))
    calls: Counter[int] = Counter()

    @ponger.on(AdvPing)
    def pong(ping: AdvPing, ctx: Context) -> AdvPong:
        calls[ping.n] += 1
        if ping.n == 1 and calls[1] == 2:
            raise TimeoutError("the network blipped once")  # transient: the next attempt works
        if ping.n == 2:
            raise ValueError("a bug")  # not transient: parked at once
        return AdvPong(n=ping.n)

    _, _, store = new_store(tmp_path)
    pinger_system = System([pinger, ponger])
    for n, saga in ((1, "a"), (2, "b"), (3, "c")):
        pinger_system.start(store, AdvPing(n=n), saga_id=saga)
    runner = Runner(pinger_system, store, services=["adv_ponger"])
    runner.start_threads()
    try:
        wait_until(lambda: bool(runner.errors) or len([e for e in store.read(0) if e.type == "AdvPong"]) == 2, 5)
        pongs = sorted(e.saga_id for e in store.read(0) if e.type == "AdvPong")
    finally:
        runner._stop.set()
        for t in runner._threads:
            t.join(5)
        errors, runner.errors = list(runner.errors), []
        runner.stop()
        store.close()
    assert errors == [] and pongs == ["a", "c"], (errors, pongs)


class AdvGo(Event):
    n: int


class AdvThen(Event):
    n: int


class AdvDone(Event):
    n: int


def test_a_failed_commit_in_the_middle_of_an_operator_retry_still_releases_what_waited(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    source = Service("adv_source", starts=[AdvGo, AdvThen])
    worker = Service("adv_worker", retry=RetryPolicy(max_attempts=1))
    broken = {"on": True}

    @worker.on(AdvGo)
    def go(event: AdvGo, ctx: Context) -> AdvDone:
        if broken["on"]:
            raise ValueError("a bug, fixed later")
        return AdvDone(n=event.n)

    @worker.on(AdvThen)
    def then(event: AdvThen, ctx: Context) -> AdvDone:
        return AdvDone(n=event.n)

    System([source, worker])
    _, _, store = new_store(tmp_path)

    def raw(event: Event) -> Envelope:
        return Envelope(event_id=str(uuid4()), type=event.event_type, version=1, saga_id="S", causation_id=None,
                        service="adv_source", step=None, outcome=None, occurred_at=clock.now(),
                        payload=event.model_dump_json())

    store.append([raw(AdvGo(n=1)), raw(AdvThen(n=2))])
    processor = Processor(worker, store)
    processor.run_until_idle()
    first, held = list_dead_letters(store, ["adv_worker"])
    assert held.reason.startswith("held behind")
    broken["on"] = False
    request_retry(store, first, "fixed")
    real = type(store.service("adv_worker")).commit
    failed: list[int] = []

    def commit(self: Any, **changes: Any) -> None:
        if not failed and any(d.id == held.id and d.status == "retried" for d in changes.get("updated", ())):
            failed.append(1)
            raise StoreError("database or disk is full (injected)")
        return real(self, **changes)

    monkeypatch.setattr(type(store.service("adv_worker")), "commit", commit)
    for _ in range(5):
        try:
            processor.poll()
        except StoreError:
            pass
    assert failed
    processor.run_until_idle()
    statuses = {d.id: d.status for d in list_dead_letters(store, ["adv_worker"], status=None)}
    store.close()
    assert statuses == {first.id: "retried", held.id: "retried"}


class AdvOpened(Event):
    key: str


class AdvExpired(Event):
    key: str


def expiring_system(fails: Callable[[str], bool]) -> tuple[System, Counter[str]]:
    desk = Service("adv_desk", starts=[AdvOpened])
    calls: Counter[str] = Counter()

    @desk.deadline("expiry", start_on=AdvOpened, after=timedelta(minutes=1))
    def expire(opened: AdvOpened, ctx: Context) -> AdvExpired:
        calls[opened.key] += 1
        if fails(opened.key):
            raise ValueError("the expiry handler has a bug")
        return AdvExpired(key=opened.key)

    return System([desk]), calls


def test_a_deadline_that_keeps_failing_is_parked_not_retried_on_every_poll(tmp_path: Path) -> None:
    desk_system, calls = expiring_system(lambda key: True)
    with freeze_time("2026-01-01 00:00:00") as frozen:
        _, _, store = new_store(tmp_path)
        desk_system.start(store, AdvOpened(key="k"), saga_id="S")
        processor = Processor(desk_system["adv_desk"], store)
        processor.run_until_idle()
        frozen.tick(timedelta(minutes=2))
        for _ in range(50):
            processor.poll()
        parked = list_dead_letters(store, ["adv_desk"])
        store.close()
    assert calls["k"] <= RetryPolicy().max_attempts or parked, f"tried {calls['k']} times, never parked"


def test_failing_deadlines_do_not_starve_the_ones_due_after_them(tmp_path: Path) -> None:
    desk_system, calls = expiring_system(lambda key: key.startswith("bad"))
    with freeze_time("2026-01-01 00:00:00") as frozen:
        _, _, store = new_store(tmp_path)
        for i in range(100):
            desk_system.start(store, AdvOpened(key=f"bad-{i}"), saga_id=f"bad-{i}")
        processor = Processor(desk_system["adv_desk"], store)
        processor.run_until_idle()
        frozen.tick(timedelta(seconds=1))
        desk_system.start(store, AdvOpened(key="good"), saga_id="good")
        processor.run_until_idle()
        frozen.tick(timedelta(minutes=5))
        for _ in range(5):
            processor.poll()
        expired = [e.saga_id for e in store.read(0, 10_000) if e.type == "AdvExpired"]
        store.close()
    assert expired == ["good"], f"the good deadline never fired (the bad ones were tried {sum(calls.values())} times)"


# == 3. ending sagas: the starter, the operator, deadlines ===============================================

def orders_cannot_open(monkeypatch: pytest.MonkeyPatch) -> dict[str, bool]:
    """Make the orders service's `open_order` fail (a bug in orders) until the returned flag is cleared."""
    broken = {"on": True}
    real = Context.create

    def create(self: Context, cls: Any, key: object, **kwargs: Any) -> Any:
        if cls is orders.Order and broken["on"]:
            raise RuntimeError("orders: a constraint of its database failed (a bug, fixed later)")
        return real(self, cls, key, **kwargs)

    monkeypatch.setattr(Context, "create", create)
    return broken


def test_a_failure_that_reaches_the_starter_while_its_start_event_is_parked_is_not_lost(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    broken = orders_cannot_open(monkeypatch)
    path, _, store = new_store(tmp_path)
    saga = system.start(store, order(1, customer_id="broke-1", amount=5000))  # payment declines it
    Runner(system, store).run_until_idle()
    parked = list_dead_letters(store, ["orders"])
    # the failure waits in the starter too, behind its start event, so that it is read in order
    assert [d.type for d in parked] == ["OrderPlaced", "ItemsReserved", "PaymentDeclined", "ItemsReleased"]
    broken["on"] = False
    request_retry(store, parked[0], "orders fixed")
    Runner(system, store).run_until_idle()
    store.close()
    assert ends_per_saga(path).get(saga) == FAILED


def test_a_forced_compensation_while_the_start_event_is_parked_never_confirms_an_undone_order(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    broken = orders_cannot_open(monkeypatch)
    path, _, store = new_store(tmp_path)
    saga = system.start(store, order(1))
    Runner(system, store).run_until_idle()
    assert ends_per_saga(path).get(saga) is None  # stuck: orders cannot end it
    # every step completed: with the definitions at hand the command sees it and refuses
    with pytest.raises(CommandRefused, match="completed"):
        force_compensation(store, saga, "the order is stuck; the customer cancelled", sagas=system.sagas)
    # without them the request goes to orders, which fails the saga before it reads the completions
    force_compensation(store, saga, "the order is stuck; the customer cancelled")
    Runner(system, store).run_until_idle()
    broken["on"] = False
    request_retry(store, list_dead_letters(store, ["orders"])[0], "orders fixed")
    Runner(system, store).run_until_idle()
    facts = read_facts(store, {saga})
    invariants = check_invariants(store, facts)
    store.close()
    assert ends_per_saga(path).get(saga) == FAILED
    assert all(invariants.values()), invariants


def test_compensating_a_saga_that_completed_while_its_starter_was_down_never_confirms_and_refunds(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path, url, store = new_store(tmp_path)
    saga = system.start(store, order(1))
    Runner(system, store, services=["inventory", "payment", "shipping", "notification"]).run_until_idle()
    code = main(["dlq", "compensate", saga, "--reason", "customer called", "--store", url,
                 "--system", "services:system"])
    Runner(system, store).run_until_idle()
    facts = read_facts(store, {saga})
    invariants = check_invariants(store, facts)
    store.close()
    ends = ends_per_saga(path).get(saga)
    # either the command is refused and the order confirmed, or it is accepted and the order cancelled
    assert (code, ends) in ((1, COMPLETED), (0, FAILED)), (code, ends)
    assert all(invariants.values()), invariants


def test_compensate_while_a_trigger_is_parked_and_another_saga_is_mid_flight(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """Held: the forced failure goes ahead of payment's parked trigger (resolved as skipped) and of a saga in
    flight at a service that is down; each saga fails once, fully compensated; compensating again is refused."""
    import services.payment as payment

    real = payment.call_provider

    def provider(order_id: str, customer_id: str) -> None:
        if order_id == "adv-1":
            raise ValueError("the provider rejects this request")  # not transient: parked at once
        real(order_id, customer_id)

    monkeypatch.setattr(payment, "call_provider", provider)
    path, url, store = new_store(tmp_path)
    parked_saga, in_flight = system.start(store, order(1)), system.start(store, order(2))
    Runner(system, store, services=["orders", "inventory", "payment"]).run_until_idle()  # shipping is down
    (letter,) = list_dead_letters(store, ["payment"])
    assert letter.saga_id == parked_saga
    for saga in (parked_saga, in_flight):
        assert main(["dlq", "compensate", saga, "--reason", "ops", "--store", url]) == 0
    Runner(system, store).run_until_idle()
    ends = ends_per_saga(path)
    assert ends.get(parked_saga) == FAILED and ends.get(in_flight) == FAILED
    assert find_dead_letter(store, f"payment:{letter.id}").status == "skipped"
    facts = read_facts(store, {parked_saga, in_flight})
    assert facts[parked_saga].compensated == {"reserve_inventory"}
    assert facts[in_flight].compensated == {"reserve_inventory", "process_payment", "create_shipment"}
    assert all(check_invariants(store, facts).values())
    store.close()
    capsys.readouterr()
    assert main(["dlq", "compensate", parked_saga, "--reason", "again", "--store", url]) == 1
    assert "already failed" in capsys.readouterr().err


def test_retrying_a_resolved_letter_of_an_ended_saga_is_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    import services.payment as payment

    real = payment.call_provider

    def provider(order_id: str, customer_id: str) -> None:
        if order_id == "adv-1":
            raise ValueError("the provider rejects this request")
        real(order_id, customer_id)

    monkeypatch.setattr(payment, "call_provider", provider)
    path, url, store = new_store(tmp_path)
    saga = system.start(store, order(1))
    Runner(system, store).run_until_idle()
    (letter,) = list_dead_letters(store, ["payment"])
    force_compensation(store, saga, "ops", sagas=system.sagas)
    Runner(system, store).run_until_idle()
    assert find_dead_letter(store, f"payment:{letter.id}").status == "skipped"
    assert ends_per_saga(path).get(saga) == FAILED
    store.close()
    before = log_rows(path)
    assert main(["dlq", "retry", f"payment:{letter.id}", "--store", url]) == 1
    assert log_rows(path) == before


@pytest.mark.parametrize("batch_size", [1, 1000])
@pytest.mark.parametrize("down", ["inventory", "payment", "shipping", "notification"])
def test_a_deadline_racing_the_steps_ends_each_saga_once(tmp_path: Path, down: str, batch_size: int) -> None:
    """Held: the fulfilment deadline fires while one service is down mid-saga; when it comes back it runs or
    skips its step and undoes it; each saga ends exactly once, never both, and the money adds up."""
    due = orders.FULFILMENT_DEADLINE
    up = [s for s in TARGETS if s != down]
    path, _, store = new_store(tmp_path)
    with freeze_time("2026-03-01 12:00:00") as frozen:
        sagas = [system.start(store, order(i, address="nowhere" if i == 2 else "1 Main St")) for i in range(4)]
        Runner(system, store, services=up, batch_size=batch_size).run_until_idle()
        frozen.tick(due + timedelta(seconds=1))
        Runner(system, store, services=up, batch_size=batch_size).run_until_idle()  # fires, up ones compensate
        Runner(system, store, batch_size=batch_size).run_until_idle()  # the service is back
        frozen.tick(due * 3)
        Runner(system, store, batch_size=batch_size).run_until_idle()
    ends = ends_per_saga(path)
    assert all(ends.get(s) in (COMPLETED, FAILED) for s in sagas), ends
    timed_out = Counter(e.saga_id for batch in store.scan() for e in batch if e.type == "OrderTimedOut")
    assert max(timed_out.values(), default=0) <= 1
    facts = read_facts(store, set(sagas))
    assert all(check_invariants(store, facts).values()), check_invariants(store, facts)
    assert all(f.completed <= f.compensated for f in facts.values() if f.state == "failed")
    store.close()


# == 4. the projection: two writers ===================================================================

def test_a_replay_during_an_update_never_leaves_a_wrong_projection(tmp_path: Path) -> None:
    _, url, store = new_store(tmp_path)
    for saga_id, order_, _, _ in plan(30, seed=17):
        system.start(store, order_, saga_id=saga_id)
    Runner(system, store).run_until_idle()  # 200+ events, each saga's spread through the log
    batch = 60
    project = SagaProjection(store, sagas=system.sagas, batch_size=batch)  # `choreo project`, catching up
    other = open_store(url)
    replay = SagaProjection(other, sagas=system.sagas, batch_size=batch)  # `choreo replay`, in another process

    class FirstBatchDone(Exception):
        pass

    def stop(done: int, size: int | None) -> None:
        raise FirstBatchDone

    real_get_many = project.documents.get_many
    reads: list[int] = []

    def get_many(keys: Any) -> dict[str, dict[str, Any]]:
        reads.append(1)
        if len(reads) != 2:
            return real_get_many(keys)
        replay.documents.clear(replay.meta)  # the replay drops the read model as `project` reads its 2nd batch
        found = real_get_many(keys)
        try:
            replay.update(stop)  # and commits its own first batch before `project` commits
        except FirstBatchDone:
            pass
        return found

    project.documents.get_many = get_many  # type: ignore[method-assign]
    project.update()
    replay.update()  # the replay goes on to the end
    project.documents.get_many = real_get_many  # type: ignore[method-assign]
    project.update()
    mine = snapshot(project.documents)
    other.close()
    store.close()
    assert mine == rebuilt(url)


# == 5. corrupt files under the read commands ============================================================

def _corrupt(kind: str, good: Path, into: Path) -> None:
    if kind == "truncated":
        shutil.copy(good, into)
        os.truncate(into, good.stat().st_size // 3)
    elif kind == "noise":
        data = bytearray(good.read_bytes())
        rng = random.Random(1)
        for i in range(200, len(data), 97):
            data[i] = rng.randrange(256)
        into.write_bytes(bytes(data))
    elif kind == "header-only":
        into.write_bytes(b"SQLite format 3\x00" + b"\x00" * 100)
    elif kind == "empty":
        into.write_bytes(b"")


@pytest.mark.parametrize("kind", ["truncated", "noise", "header-only", "empty"])
def test_read_and_operator_commands_on_a_corrupt_file_answer_one_line_and_change_nothing(
    tmp_path: Path, kind: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """Held: every command on a damaged file exits 1 or 3 with one line, and leaves the file as it was."""
    good, _, store = new_store(tmp_path, "good.db")
    for i in range(5):
        system.start(store, order(i))
    Runner(system, store).run_until_idle()
    store.close()
    bad = tmp_path / f"{kind}.db"
    _corrupt(kind, good, bad)
    before = bad.read_bytes()
    url = f"sqlite:///{bad}"
    system_option = ["--system", "services:system"]
    commands = [
        ["sagas", "list", "--no-update", *system_option], ["sagas", "list", *system_option],
        ["sagas", "show", "x", *system_option], ["replay", *system_option], ["dlq", "list", *system_option],
        ["dlq", "show", "payment:1"], ["dlq", "retry", "payment:1"], ["dlq", "skip", "payment:1", "--reason", "y"],
        ["dlq", "compensate", "x", "--reason", "y"],
    ]
    for command in commands:
        capsys.readouterr()
        code = main([*command, "--store", url])
        err = capsys.readouterr().err
        assert code in (1, 3), (command, code, err)
        assert err.count("\n") == 1 and "Traceback" not in err, (command, err)
        assert bad.read_bytes() == before, command


# == 6. processes: kill -9 and a full disk ==============================================================

def spawn(name: str, url: str, env: dict[str, str], batch_size: int = 1000) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [sys.executable, "-m", "choreo", "run", TARGETS[name], "--store", url, "--batch-size", str(batch_size),
         "--log-level", "CRITICAL"],
        cwd=REPO, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )


def process_env(deadline_s: float) -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH")) if p),
            "CHOREO_FULFILMENT_DEADLINE_S": str(deadline_s)}


def supervise(procs: dict[str, subprocess.Popen[bytes]], url: str, env: dict[str, str]) -> None:
    """Restart what exited, as systemd or docker would."""
    for name, p in procs.items():
        if p.poll() is not None:
            procs[name] = spawn(name, url, env)


def stop_all(procs: dict[str, subprocess.Popen[bytes]]) -> None:
    for p in procs.values():
        if p.poll() is None:
            p.send_signal(signal.SIGTERM)
    for p in procs.values():
        try:
            p.wait(20)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()


def assert_each_saga_ended_once(path: Path, store: SQLiteStore, saga_ids: set[str]) -> dict[str, Any]:
    ends = ends_per_saga(path)
    wrong = {s: dict(ends.get(s, {})) for s in saga_ids if ends.get(s) not in (COMPLETED, FAILED)}
    assert wrong == {}, f"{len(wrong)} saga(s) did not end exactly once: {list(wrong.items())[:5]}"
    facts = read_facts(store, saga_ids)
    invariants = check_invariants(store, facts)
    assert all(invariants.values()), invariants
    steps = set(orders.ORDER_SAGA.steps)
    assert all(f.completed == steps and not f.compensated for f in facts.values() if f.state == "completed")
    return facts


@pytest.mark.slow
def test_kill_9_storm_with_racing_deadlines_and_changing_batch_sizes(tmp_path: Path) -> None:
    """Held: services killed with SIGKILL at random, restarted with another batch size, while a 0.3 s
    fulfilment deadline races the steps and the projection is updated as the log grows: every saga ends once,
    never both, the money adds up, nothing is parked, and the incremental projection equals a replay."""
    path, url, store = new_store(tmp_path, "storm.db")
    env = process_env(0.3)
    rng = random.Random(20260301)
    procs = {name: spawn(name, url, env, rng.choice([1, 3, 50, 1000])) for name in TARGETS}
    planned = plan(240, seed=31)
    saga_ids = {s for s, *_ in planned}
    projection = SagaProjection(store, sagas=system.sagas, batch_size=37)
    kills = 0
    try:
        for i in range(0, len(planned), 10):
            system.start_many(store, [(o, s) for s, o, _, _ in planned[i : i + 10]])
            time.sleep(rng.uniform(0.05, 0.25))
            victim = rng.choice(sorted(procs))
            procs[victim].kill()
            procs[victim].wait()
            kills += 1
            if rng.random() < 0.6:  # else it stays down for a round
                procs[victim] = spawn(victim, url, env, rng.choice([1, 3, 50, 1000]))
            if rng.random() < 0.5:
                supervise(procs, url, env)
            projection.update()
        supervise(procs, url, env)

        def all_ended() -> bool:
            supervise(procs, url, env)
            projection.update()
            return len(ends_per_saga(path)) >= len(saga_ids)

        assert wait_until(all_ended, 60), "some sagas never ended"
        time.sleep(0.5)  # let the last end handlers' events land
    finally:
        stop_all(procs)
    assert kills >= 20
    assert_each_saga_ended_once(path, store, saga_ids)
    timed_out = Counter(e.saga_id for batch in store.scan() for e in batch if e.type == "OrderTimedOut")
    assert max(timed_out.values(), default=0) <= 1
    assert list_dead_letters(store, TARGETS) == []
    projection.update()
    assert snapshot(projection.documents) == rebuilt(url)
    states = {s["saga_id"]: s["state"] for s in projection.list()}
    facts = read_facts(store, saga_ids)
    assert all(states[s] == facts[s].state for s in saga_ids)
    store.close()


@pytest.mark.slow
def test_a_full_disk_under_service_processes_and_a_kill_9_skips_nothing(small_disk: Path) -> None:
    """Held: with the disk full, `choreo run` processes fail their commits (or their start, and are restarted);
    one is killed with SIGKILL meanwhile; once space is freed every saga ends exactly once and adds up."""
    path = small_disk / "choreo.db"
    url = f"sqlite:///{path}"
    store = open_store(url)
    assert isinstance(store, SQLiteStore)
    planned = plan(120, seed=8)
    saga_ids = {s for s, *_ in planned}
    system.start_many(store, [(o, s) for s, o, _, _ in planned])
    filler = small_disk / "filler"
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT)
    try:
        while os.write(fd, b"\0" * 65536):
            pass
    except OSError:
        pass
    finally:
        os.close(fd)
    os.truncate(filler, max(0, filler.stat().st_size - 64 * 1024))
    env = process_env(1.0)
    procs = {name: spawn(name, url, env, 7) for name in TARGETS}
    try:
        time.sleep(2.0)
        assert len(ends_per_saga(path)) < len(saga_ids)  # the disk did fill up
        procs["payment"].kill()
        procs["payment"].wait()
        filler.unlink()  # the operator frees space

        def all_ended() -> bool:
            supervise(procs, url, env)
            return len(ends_per_saga(path)) >= len(saga_ids)

        assert wait_until(all_ended, 60), "some sagas never ended after space was freed"
        time.sleep(0.3)
    finally:
        stop_all(procs)
    assert_each_saga_ended_once(path, store, saga_ids)
    store.close()
