"""The saga projection under faults, on the real SQLite store: two writers at once, bad rows,
other saga definitions, choreo's own saga ends, and read-only use."""

from __future__ import annotations

import logging
import sqlite3
import threading
import time
from collections.abc import Iterator
from dataclasses import replace
from datetime import datetime, timedelta, timezone
from pathlib import Path
from uuid import uuid4

import pytest

import services
from choreo import Envelope, SagaFilter, SagaProjection, open_store
from choreo.errors import StoreError
from choreo._saga_fold import DOCUMENTS, FIELDS, GENERATION, NO_SAGA_COUNT
from choreo.projection import dumps, stored_timeline
from choreo.saga import SagaCompleted, SagaDefinition, SagaFailed
from choreo.stores.sqlite import SQLiteStore
from choreo.store import DocumentStore
from choreo.testing import TestSystem
from services.contracts import OrderConfirmed, OrderPlaced
from services.demo import plan

T0 = datetime(2026, 1, 1, tzinfo=timezone.utc)
SAGAS = services.system.sagas


def finished_log(orders: int, seed: int) -> list[Envelope]:
    """The log of the example system after `orders` sagas ran to their end."""
    harness = TestSystem(services.system)
    for saga_id, order, _, _ in plan(orders, seed):
        harness.start(order, saga_id=saga_id)
    harness.run()
    return [replace(e, position=None) for e in harness.envelopes()]


def snapshot(documents: DocumentStore) -> list[str]:
    """Every document with its timeline, canonically."""
    return sorted(dumps({**d, "timeline": stored_timeline(documents, d["saga_id"], d)}) for d in documents.scan())


def rebuilt(url: str, **options: object) -> list[str]:
    """What a projection of `url` holds when built from position 0 in one go (in a fresh read model)."""
    store = open_store(url)
    assert isinstance(store, SQLiteStore)
    projection = SagaProjection(store, sagas=options.get("sagas", SAGAS))  # type: ignore[arg-type]
    projection.documents = store.documents(f"check_{uuid4().hex[:8]}")
    projection.replay()
    try:
        return snapshot(projection.documents)
    finally:
        store.close()


def envelope(saga: str, type_: str, payload: str = "{}", **fields: object) -> Envelope:
    base: dict[str, object] = dict(event_id=str(uuid4()), type=type_, version=1, saga_id=saga, causation_id=None,
                                   service="orders", step=None, outcome=None, occurred_at=T0, payload=payload)
    return Envelope(**{**base, **fields})  # type: ignore[arg-type]


def insert_raw(path: Path, saga_id: str | None, type_: str, occurred_at: object, payload: str = "{}") -> None:
    """Write a log row as a foreign or damaged writer might have, around choreo's checks."""
    conn = sqlite3.connect(path, isolation_level=None)
    conn.execute(
        "INSERT INTO choreo_log (event_id, type, version, saga_id, causation_id, service, step, outcome, "
        "occurred_at, payload) VALUES (?, ?, 1, ?, NULL, 'orders', NULL, NULL, ?, ?)",
        (str(uuid4()), type_, saga_id, occurred_at, payload),
    )
    conn.close()


@pytest.fixture
def url(db_path: Path) -> Iterator[str]:
    yield f"sqlite:///{db_path}?durability=normal"


# -- 1. two writers ------------------------------------------------------------------------

def test_two_projections_updating_one_file_at_once_never_duplicate_entries(url: str) -> None:
    log = finished_log(40, seed=11)
    appender = open_store(url)
    appender.append(log[: len(log) // 4])
    stores = [open_store(url) for _ in range(2)]
    projections = [SagaProjection(s, sagas=SAGAS, batch_size=n) for s, n in zip(stores, (3, 5))]
    stop, errors = threading.Event(), []

    def keep_updating(projection: SagaProjection) -> None:
        try:
            while not stop.is_set():
                projection.update()
            projection.update()
        except BaseException as e:  # reported below
            errors.append(e)

    threads = [threading.Thread(target=keep_updating, args=(p,)) for p in projections]
    for t in threads:
        t.start()
    rest = log[len(log) // 4 :]
    for i in range(0, len(rest), 7):  # the log grows while both fold it
        appender.append(rest[i : i + 7])
        time.sleep(0.002)
    stop.set()
    for t in threads:
        t.join(60)
    assert errors == []
    documents = stores[0].documents(DOCUMENTS)
    assert documents.position() == appender.last_position()  # type: ignore[attr-defined]
    order = {e.event_id: i for i, e in enumerate(log)}
    for saga_id in {e.saga_id for e in log}:
        ids = [entry[1] for entry in stored_timeline(documents, saga_id)]
        assert ids == sorted(set(ids), key=order.__getitem__), saga_id  # each event once, in log order
        assert ids == [e.event_id for e in log if e.saga_id == saga_id]
    assert snapshot(documents) == rebuilt(url)
    for s in (*stores, appender):
        s.close()


def test_a_batch_folded_before_a_rebuild_is_never_committed_on_top_of_it(any_store: object) -> None:
    """A rebuild moves the tracking back through the positions a writer's batch expects (ABA): the
    generation that every rebuild stores makes that writer's compare-and-set fail all the same."""
    store: SQLiteStore = any_store  # type: ignore[assignment]
    store.append(finished_log(12, seed=21))
    writer = SagaProjection(store, sagas=SAGAS, batch_size=20)
    rebuilder = SagaProjection(store, sagas=SAGAS, batch_size=20)
    real_get_many = writer.documents.get_many
    reads: list[int] = []

    class Stop(Exception):
        pass

    def stop(done: int, size: int | None) -> None:
        raise Stop

    def get_many(keys: object) -> dict[str, dict[str, object]]:
        reads.append(1)
        if len(reads) != 2:
            return real_get_many(keys)  # type: ignore[arg-type]
        rebuilder.documents.clear(rebuilder.meta)  # a rebuild starts as the writer reads for its 2nd batch,
        found = real_get_many(keys)  # type: ignore[arg-type]  # so the writer folds onto nothing
        with pytest.raises(Stop):
            rebuilder.update(stop)  # and commits its 1st batch before the writer commits
        assert rebuilder.documents.tracking() == {"log": 20}  # what the writer's batch expects to find
        return found

    writer.documents.get_many = get_many  # type: ignore[method-assign]
    generation = writer.documents.meta()
    writer.update()
    assert len(reads) > 2 and writer.documents.meta() != generation
    rebuilder.update()
    fresh = SagaProjection(store, sagas=SAGAS)
    fresh.documents = store.documents(f"check_{uuid4().hex[:8]}")
    fresh.replay()
    assert snapshot(writer.documents) == snapshot(fresh.documents)


def test_every_rebuild_stores_a_new_generation_and_an_old_projection_needs_none(url: str) -> None:
    store = open_store(url)
    store.append(finished_log(3, seed=6))
    projection = SagaProjection(store, sagas=SAGAS)
    projection.update()
    first = projection.documents.meta()
    projection.replay()
    second = projection.documents.meta()
    assert first[GENERATION] != second[GENERATION] and {**first, GENERATION: None} == {**second, GENERATION: None}
    assert projection.outdated() is None
    before = snapshot(projection.documents)
    projection.documents.clear(projection.meta)  # as a choreo that stored no generation would rebuild it
    older = SagaProjection(store, sagas=SAGAS)
    assert older.outdated() is None and older.update() > 0  # not rebuilt again for want of a generation
    assert older.documents.meta() == older.meta and snapshot(older.documents) == before
    store.append(finished_log(1, seed=7))
    assert older.update() > 0 and older.documents.meta() == older.meta
    store.close()


# -- 3. bad rows ---------------------------------------------------------------------------

def test_a_row_with_a_bad_time_is_an_unknown_entry_and_never_breaks_readers(url: str, db_path: Path) -> None:
    store = open_store(url)
    store.append([envelope("s", OrderPlaced.event_type, OrderPlaced(
        order_id="o", customer_id="c", sku="widget", quantity=1, amount=1, address="x").model_dump_json())])
    insert_raw(db_path, "s", "OrderPlaced", "yesterday-ish")
    insert_raw(db_path, "t", "OrderPlaced", "not a time either")  # a saga whose only event has a bad time
    insert_raw(db_path, "u", "OrderPlaced", 1234)  # not even text
    insert_raw(db_path, "v", "OrderPlaced", "2026-01-01T00:00:00")  # no offset: read as UTC
    projection = SagaProjection(store, sagas=SAGAS)
    assert projection.update() == 5
    sagas = {s["saga_id"]: s for s in projection.list()}  # used to raise "Invalid isoformat string"
    assert sorted(sagas) == ["s", "t", "u", "v"]
    assert sagas["s"]["unknown_events"] == 1 and sagas["s"]["started_at"] == T0.isoformat()
    assert sagas["t"]["started_at"] is None and sagas["t"]["updated_at"] is None
    assert sagas["v"]["started_at"] == "2026-01-01T00:00:00+00:00"
    saga = projection.get("s")
    assert saga is not None and "'yesterday-ish' is not an ISO 8601 time" in saga["timeline"][1]["unknown"]
    assert saga["timeline"][1]["occurred_at"] is None
    assert projection.get("s", as_of=T0) is not None and projection.counts()
    assert projection.list(SagaFilter(started_after=T0 - timedelta(days=1)))
    store.close()


def test_rows_without_a_saga_id_are_counted_not_listed(url: str, db_path: Path) -> None:
    store = open_store(url)
    store.append([envelope("s", OrderPlaced.event_type)])
    insert_raw(db_path, None, "OrderPlaced", T0.isoformat())
    insert_raw(db_path, "", "Whatever", T0.isoformat())
    projection = SagaProjection(store, sagas=SAGAS, batch_size=1, stuck_after=None)
    projection.update()
    assert [s["saga_id"] for s in projection.list()] == ["s"]
    assert projection.counts() == {"started": 1, NO_SAGA_COUNT: 2}
    assert projection.get("") is None and projection.get("(no saga id)") is None
    before = snapshot(projection.documents)
    projection.replay()
    assert snapshot(projection.documents) == before
    store.close()


@pytest.mark.parametrize("column", ["event_id", "type", "causation_id", "service", "step", "outcome"])
@pytest.mark.parametrize("value_sql", ["X'0102'", "CAST(X'C3FF' AS TEXT)"], ids=["blob", "not-utf8"])
def test_a_row_whose_text_is_not_text_is_an_unknown_entry(
    url: str, db_path: Path, column: str, value_sql: str, capsys: pytest.CaptureFixture[str]
) -> None:
    from choreo.cli import main

    store = open_store(url)
    store.append([order_placed("s")])
    row = {"event_id": f"'{uuid4()}'", "type": "'OrderPlaced'", "causation_id": "NULL", "service": "'orders'",
           "step": "NULL", "outcome": "NULL", column: value_sql}
    conn = sqlite3.connect(db_path, isolation_level=None)
    conn.execute(f"INSERT INTO choreo_log (version, saga_id, occurred_at, payload, {', '.join(row)}) "
                 f"VALUES (1, 's', '2026-01-01T00:01:00+00:00', '{{}}', {', '.join(row.values())})")
    conn.close()
    store.append([order_placed("t")])
    projection = SagaProjection(store, sagas=SAGAS, batch_size=2, stuck_after=None)
    assert projection.update() == 3
    saga = projection.get("s")
    assert saga is not None and saga["unknown_events"] == 1 and saga["state"] == "started"
    assert saga["updated_at"] == "2026-01-01T00:01:00+00:00"
    unknown = saga["timeline"][1]
    assert f"{column} is bytes, not UTF-8 text" in unknown["unknown"]
    assert all(v is None or isinstance(v, (str, int)) for k, v in unknown.items() if k in FIELDS)
    assert projection.get("t") is not None
    incremental = snapshot(projection.documents)
    projection.replay()
    assert snapshot(projection.documents) == incremental
    store.close()
    capsys.readouterr()
    assert main(["sagas", "list", "--json", "--store", url, "--system", "services:system"]) == 0
    assert main(["sagas", "show", "s", "--json", "--store", url, "--system", "services:system"]) == 0


def test_rows_without_a_saga_id_whose_event_id_is_not_text_are_counted(url: str, db_path: Path) -> None:
    store = open_store(url)
    store.append([order_placed("s")])
    conn = sqlite3.connect(db_path, isolation_level=None)
    for event_id in ("X'0102'", "CAST(X'C3FF' AS TEXT)"):
        conn.execute("INSERT INTO choreo_log (event_id, type, version, saga_id, service, occurred_at, payload) "
                     f"VALUES ({event_id}, 'Whatever', 1, NULL, 'x', '2026-01-01T00:00:00+00:00', '{{}}')")
    conn.close()
    projection = SagaProjection(store, sagas=SAGAS, stuck_after=None)
    assert projection.update() == 3
    assert projection.counts() == {"started": 1, NO_SAGA_COUNT: 2}
    store.close()


# -- 4. the fold never depends on what the process loaded ------------------------------------

def test_a_projection_stored_with_other_saga_definitions_is_rebuilt(
    url: str, caplog: pytest.LogCaptureFixture
) -> None:
    store = open_store(url)
    store.append(finished_log(8, seed=4))
    bare = SagaProjection(store, sagas=())  # e.g. `choreo sagas list` without the right --system
    bare.update()
    assert {s["saga_type"] for s in bare.list()} == {"OrderPlaced"}
    with caplog.at_level(logging.WARNING, logger="choreo.projection"):
        right = SagaProjection(store, sagas=SAGAS)
        assert right.outdated() is not None
        right.update()
    (said,) = [r.getMessage() for r in caplog.records if r.name == "choreo.projection"]  # one line, saying why
    assert "rebuilding from position 0" in said and "other saga definitions" in said
    assert right.outdated() is None
    assert {s["saga_type"] for s in right.list()} == {"order_fulfilment"}
    assert snapshot(right.documents) == rebuilt(url)
    bare.update()  # and back: never a mix of the two
    assert snapshot(bare.documents) == rebuilt(url, sagas=())
    store.close()


def test_a_projection_stored_without_a_fingerprint_is_rebuilt(url: str, db_path: Path) -> None:
    store = open_store(url)
    store.append(finished_log(3, seed=1))
    SagaProjection(store, sagas=SAGAS).update()
    conn = sqlite3.connect(db_path, isolation_level=None)  # as an older choreo left it
    conn.execute("DROP TABLE rm_sagas_meta")
    conn.execute("UPDATE rm_sagas_documents SET doc = json_set(doc, '$.state', 'started')")
    conn.close()
    projection = SagaProjection(open_store(url), sagas=SAGAS)
    assert projection.outdated() is not None
    projection.update()
    assert snapshot(projection.documents) == rebuilt(url)
    store.close()


def test_the_stored_fold_is_the_same_whichever_event_classes_are_loaded(
    url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = open_store(url)
    store.append(finished_log(6, seed=2))
    loaded = SagaProjection(store, sagas=())
    loaded.update()
    with_classes = snapshot(loaded.documents)
    from choreo import events

    monkeypatch.setattr(events, "_known_types", set())  # a process that imported none of them
    projection = SagaProjection(store, sagas=())
    projection.replay()
    assert snapshot(projection.documents) == with_classes
    saga = projection.get(store.read(0, 1)[0].saga_id)  # type: ignore[attr-defined]
    assert saga is not None and "not known to this process" in saga["timeline"][0]["unknown"]
    store.close()


def test_read_only_with_other_definitions_answers_from_what_is_stored(url: str, db_path: Path) -> None:
    store = open_store(url)
    store.append(finished_log(4, seed=3))
    SagaProjection(store, sagas=SAGAS).update()
    stored = snapshot(store.documents(DOCUMENTS))
    reader = SagaProjection(open_store(url, create=False), sagas=())
    assert reader.read_only and reader.outdated() is not None
    assert {s["saga_type"] for s in reader.list()} == {"order_fulfilment"}
    with pytest.raises(StoreError, match="read-only"):
        reader.update()
    assert snapshot(store.documents(DOCUMENTS)) == stored
    store.close()


# -- 5. choreo ends sagas ---------------------------------------------------------------------

def order_placed(saga: str) -> Envelope:
    return envelope(saga, OrderPlaced.event_type, OrderPlaced(
        order_id=saga, customer_id="c", sku="widget", quantity=1, amount=1, address="x").model_dump_json())


def ended(saga: str, event: SagaCompleted | SagaFailed, minutes: int = 1) -> Envelope:
    return envelope(saga, event.event_type, event.model_dump_json(), occurred_at=T0 + timedelta(minutes=minutes))


def step(saga: str, name: str, outcome: str, type_: str = "StepDone", payload: str = "{}",
         minutes: int = 0) -> Envelope:
    return envelope(saga, type_, payload, step=name, outcome=outcome, service="svc",
                    occurred_at=T0 + timedelta(seconds=30, minutes=minutes))


def test_choreo_end_events_end_the_saga_whatever_the_definition_says(url: str) -> None:
    bare = SagaDefinition("bare", start=OrderPlaced, steps=("a", "b"))  # no end events at all
    failed = SagaFailed(saga="bare", failure_event_id="f", failure_type="Declined", failed_step="b",
                        reason="card declined", compensated=["a"])
    store = open_store(url)
    store.append([
        order_placed("ok"), step("ok", "a", "completed"), step("ok", "b", "completed"),
        ended("ok", SagaCompleted(saga="bare", steps=["a", "b"])),
        order_placed("ko"), step("ko", "a", "completed"),
        ended("ko", failed),  # the projection saw no failure event: the cause comes from choreo's end
        order_placed("late"), step("late", "a", "completed"),
        step("late", "b", "failed", "Declined", '{"reason": "no"}'), step("late", "a", "compensated", minutes=1),
        ended("late", failed, minutes=2),
    ])
    projection = SagaProjection(store, sagas=[bare])
    projection.update()
    sagas = {s["saga_id"]: s for s in projection.list()}
    assert sagas["ok"]["state"] == "completed" and sagas["ok"]["ended_at"] == (T0 + timedelta(minutes=1)).isoformat()
    assert sagas["ko"]["state"] == "failed" and sagas["ko"]["cause"] == "b: Declined: card declined"
    assert sagas["ko"]["ended_at"] == (T0 + timedelta(minutes=1)).isoformat()
    assert sagas["late"]["state"] == "failed" and sagas["late"]["cause"] == "b: Declined: no"  # its own cause stays
    assert sagas["late"]["ended_at"] == (T0 + timedelta(minutes=2)).isoformat()
    store.close()


def test_a_saga_that_ended_never_shows_both_ends(url: str) -> None:
    failed = SagaFailed(saga="order_fulfilment", failure_event_id="f", failure_type="X", reason="r")
    store = open_store(url)
    store.append([
        order_placed("a"), ended("a", SagaCompleted(saga="order_fulfilment", steps=[])), ended("a", failed, 2),
        order_placed("b"), ended("b", failed), ended("b", SagaCompleted(saga="order_fulfilment", steps=[]), 2),
        # the definition's own end event said completed first
        order_placed("c"), envelope("c", OrderConfirmed.event_type, occurred_at=T0 + timedelta(minutes=1)),
        ended("c", failed, 2),
    ])
    projection = SagaProjection(store, sagas=SAGAS)
    projection.update()
    states = {s["saga_id"]: (s["state"], s["ended_at"], s["cause"]) for s in projection.list()}
    one = (T0 + timedelta(minutes=1)).isoformat()
    assert states == {"a": ("completed", one, None), "b": ("failed", one, "X: r"), "c": ("completed", one, None)}
    store.close()


# -- 2. read-only ------------------------------------------------------------------------------

def test_a_read_only_projection_never_writes_or_creates_tables(url: str, db_path: Path) -> None:
    store = open_store(url)
    store.append(finished_log(3, seed=5))
    projection = SagaProjection(store, sagas=SAGAS, read_only=True)
    assert projection.list() == [] and projection.counts() == {} and projection.get("x") is None
    with pytest.raises(StoreError, match="read-only"):
        projection.update()
    with pytest.raises(StoreError, match="read-only"):
        projection.replay()
    conn = sqlite3.connect(db_path)
    assert conn.execute("SELECT name FROM sqlite_master WHERE name LIKE 'rm_%'").fetchall() == []
    SagaProjection(store, sagas=SAGAS).update()
    assert len(projection.list()) == 3 and sum(projection.counts().values()) == 3
    conn.close()
    store.close()


UPDATER = """
import sys
import services
from choreo import SagaProjection, open_store
store = open_store(sys.argv[1])
projection = SagaProjection(store, sagas=services.system.sagas, batch_size=int(sys.argv[2]))
while projection.documents.position() < int(sys.argv[3]):
    projection.update()
"""


@pytest.mark.slow
def test_two_projection_processes_at_once_never_duplicate_entries(url: str) -> None:
    import subprocess
    import sys

    log = finished_log(60, seed=12)
    appender = open_store(url)
    appender.append(log[:10])
    procs = [subprocess.Popen([sys.executable, "-c", UPDATER, url, str(n), str(len(log))],
                              cwd=Path(__file__).parent.parent, stderr=subprocess.PIPE, text=True)
             for n in (2, 3)]
    for i in range(10, len(log), 5):
        appender.append(log[i : i + 5])
        time.sleep(0.005)
    for p in procs:
        _, err = p.communicate(timeout=120)
        assert p.returncode == 0, err
    documents = appender.documents(DOCUMENTS)
    for saga_id in {e.saga_id for e in log}:
        assert [entry[1] for entry in stored_timeline(documents, saga_id)] == [e.event_id for e in log if e.saga_id == saga_id]
    assert snapshot(documents) == rebuilt(url)
    appender.close()
