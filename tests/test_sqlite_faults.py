"""The SQLite store read-only (`create=False`), with rows a foreign writer left, and with taken event ids."""

from __future__ import annotations

import hashlib
import json
import sqlite3
from pathlib import Path
from uuid import uuid4

import pytest

from choreo import open_store
from choreo.errors import ConcurrencyConflict, EventIdTaken, StoreError, StoreNotFound
from choreo.store import ROW_FIELDS, Interest
from tests.store_contract import envelope


def tables(path: Path) -> list[str]:
    conn = sqlite3.connect(path)
    try:
        return sorted(r[0] for r in conn.execute("SELECT name FROM sqlite_master"))
    finally:
        conn.close()


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def written(path: Path) -> None:
    """A choreo store with a log, one service and nothing else, closed (WAL checkpointed)."""
    store = open_store(f"sqlite:///{path}")
    store.service("alpha").commit(events=[], emitted=[envelope(), envelope()], tracking={"log": 1})
    store.close()


@pytest.mark.parametrize("where", ["missing.db", "no/such/folder/missing.db"])
def test_read_only_on_a_missing_file_creates_nothing(tmp_path: Path, where: str) -> None:
    path = tmp_path / where
    with pytest.raises(StoreNotFound, match=str(path)):
        open_store(f"sqlite:///{path}", create=False)
    assert list(tmp_path.iterdir()) == []  # no file, no -wal, no -shm, no folder


def test_read_only_reads_an_existing_store_and_creates_or_writes_nothing(db_path: Path) -> None:
    written(db_path)
    before, schema = digest(db_path), tables(db_path)
    store = open_store(f"sqlite:///{db_path}", create=False)
    assert store.read_only and len(store.read(0)) == 2  # type: ignore[attr-defined]
    assert store.service("alpha").tracking() == {"log": 1} and store.service("alpha").dead_letters() == []
    with pytest.raises(StoreNotFound, match=f"no service 'beta' in {db_path}"):
        store.service("beta")
    docs = store.documents("sagas")  # a read model that does not exist reads as empty
    assert docs.get("x") is None and list(docs.scan()) == [] and docs.tracking() == {} and docs.meta() == {}
    for write in (lambda: store.append([envelope()]),
                  lambda: store.service("alpha").commit(events=[], emitted=[], tracking={"log": 2}),
                  lambda: docs.put({"a": {}}, tracking={"log": 1}),
                  lambda: docs.clear()):
        with pytest.raises(StoreError, match="read-only"):
            write()
    store.close()
    assert tables(db_path) == schema and digest(db_path) == before


def test_read_only_sees_what_a_writer_commits_while_it_reads(db_path: Path) -> None:
    writer = open_store(f"sqlite:///{db_path}")
    writer.append([envelope()])
    reader = open_store(f"sqlite:///{db_path}", create=False)
    assert len(reader.read(0)) == 1  # type: ignore[attr-defined]
    writer.append([envelope()])  # in the WAL, not yet checkpointed
    assert len(reader.read(0)) == 2  # type: ignore[attr-defined]
    reader.close()
    writer.close()


def test_read_only_reads_a_database_never_opened_in_wal(db_path: Path) -> None:
    written(db_path)
    conn = sqlite3.connect(db_path, isolation_level=None)
    conn.execute("PRAGMA journal_mode=DELETE")  # as if copied or written by another tool
    conn.close()
    before = digest(db_path)
    store = open_store(f"sqlite:///{db_path}", create=False)
    assert len(store.read(0)) == 2  # type: ignore[attr-defined]
    store.close()
    assert digest(db_path) == before and sorted(p.name for p in db_path.parent.iterdir()) == [db_path.name]
    conn = sqlite3.connect(db_path)
    assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "delete"  # read-only did not switch it to WAL
    conn.close()


def test_read_only_on_a_sqlite_file_that_is_not_a_choreo_store(db_path: Path) -> None:
    conn = sqlite3.connect(db_path)
    conn.execute("CREATE TABLE notes (text TEXT)")
    conn.close()
    with pytest.raises(StoreNotFound, match="not a choreo store"):
        open_store(f"sqlite:///{db_path}", create=False)
    assert tables(db_path) == ["notes"]


def test_a_log_row_with_a_bad_time_is_read_as_malformed(db_path: Path) -> None:
    store = open_store(f"sqlite:///{db_path}")
    store.append([envelope()])
    conn = sqlite3.connect(db_path, isolation_level=None)
    for when in ("soon", None, "2026-01-01T10:00:00"):
        conn.execute(
            "INSERT INTO choreo_log (event_id, type, version, saga_id, causation_id, service, step, outcome, "
            "occurred_at, payload) VALUES (?, 'Thing', 1, 's', NULL, 'svc', NULL, NULL, ?, '{}')",
            (str(uuid4()), when if when is not None else 42),
        )
    conn.close()
    good, bad, worse, naive = store.read(0)  # type: ignore[attr-defined]
    assert good.malformed is None
    assert bad.malformed is not None and "'soon' is not an ISO 8601 time" in bad.malformed
    assert worse.malformed is not None and "42" in worse.malformed
    assert naive.malformed is None and naive.occurred_at.utcoffset() is not None  # no offset: UTC
    store.close()


def test_a_service_parks_a_log_row_with_a_bad_time(db_path: Path) -> None:
    import services
    from choreo import Runner
    from services.contracts import OrderPlaced

    store = open_store(f"sqlite:///{db_path}")
    runner = Runner(services.system, store)
    runner.start(OrderPlaced(order_id="o", customer_id="c", sku="widget", quantity=1, amount=1, address="x"))
    conn = sqlite3.connect(db_path, isolation_level=None)
    conn.execute(
        "INSERT INTO choreo_log (event_id, type, version, saga_id, causation_id, service, step, outcome, "
        "occurred_at, payload) SELECT ?, type, version, 'other', NULL, service, step, outcome, 'garbage', "
        "payload FROM choreo_log WHERE position = 1",
        (str(uuid4()),),
    )
    conn.close()
    runner.run_until_idle()
    parked = store.service("inventory").dead_letters()
    assert [(d.saga_id, "garbage" in d.reason or "garbage" in d.error) for d in parked] == [("other", True)]
    store.close()


def test_emitted_ids_taken_by_a_service_commit_are_not_conflicts(sqlite_store) -> None:  # type: ignore[no-untyped-def]
    e = envelope()
    sqlite_store.service("alpha").commit(events=[], emitted=[e], tracking={"log": 1})
    with pytest.raises(EventIdTaken, match=e.event_id) as caught:
        sqlite_store.service("beta").commit(events=[], emitted=[e], tracking={"log": 1})
    assert not isinstance(caught.value, ConcurrencyConflict)
    assert sqlite_store.service("beta").tracking() == {} and len(sqlite_store.read(0)) == 1


# -- log rows whose text is not text ---------------------------------------------------------------

LOG_TEXT_COLUMNS = ("event_id", "type", "saga_id", "causation_id", "service", "step", "outcome", "occurred_at",
                    "payload")


def insert_bad(path: Path, column: str, value_sql: str) -> None:
    """A log row with `value_sql` (SQL) in `column`, as a foreign or damaged writer might leave it."""
    row = {"event_id": f"'{uuid4()}'", "type": "'Thing'", "saga_id": "'s'", "causation_id": "NULL",
           "service": "'svc'", "step": "NULL", "outcome": "NULL", "occurred_at": "'2026-01-01T00:00:00+00:00'",
           "payload": "'{}'", column: value_sql}
    conn = sqlite3.connect(path, isolation_level=None)
    conn.execute(f"INSERT INTO choreo_log (version, {', '.join(row)}) VALUES (1, {', '.join(row.values())})")
    conn.close()


@pytest.mark.parametrize("column", LOG_TEXT_COLUMNS)
@pytest.mark.parametrize("kind, value_sql, why", [
    ("blob", "X'00FF'", "is a BLOB, not text"),
    ("not-utf8", "CAST(X'C3FF' AS TEXT)", "is not valid UTF-8"),
])
def test_a_log_row_whose_text_is_not_text_is_read_as_malformed_with_text_fields(
    db_path: Path, column: str, kind: str, value_sql: str, why: str
) -> None:
    store = open_store(f"sqlite:///{db_path}")
    store.append([envelope()])
    insert_bad(db_path, column, value_sql)
    store.append([envelope()])
    good, bad, after = store.read(0)  # type: ignore[attr-defined]
    assert good.malformed is None and after.malformed is None
    assert bad.malformed is not None and f"log position 2: {column} {why}" in bad.malformed
    fields = [bad.event_id, bad.type, bad.saga_id, bad.causation_id, bad.service, bad.step, bad.outcome,
              bad.payload]
    assert all(f is None or type(f) is str for f in fields), fields
    json.dumps(fields)  # as a dead letter stores them: it used to raise TypeError on bytes
    rows = store.read_rows(0)  # type: ignore[attr-defined]
    assert [r[0] for r in rows] == [1, 2, 3] and isinstance(rows[1][ROW_FIELDS.index(column)], bytes)
    store.close()


def test_a_row_that_is_not_utf8_costs_nothing_to_the_reads_that_do_not_meet_it(db_path: Path) -> None:
    store = open_store(f"sqlite:///{db_path}")
    store.append([envelope(), envelope()])
    insert_bad(db_path, "saga_id", "CAST(X'C3FF' AS TEXT)")
    assert len(store.read(0)) == 3  # type: ignore[attr-defined]
    conn = store._conn()  # type: ignore[attr-defined]
    assert conn.text_factory is str  # the lenient decoding was for that query only
    assert [e.malformed is None for e in store.read(0, 2)] == [True, True]  # type: ignore[attr-defined]
    assert [e.position for e in store.read(0, interest=Interest(frozenset({"Thing"})))] == [1, 2, 3]  # type: ignore[attr-defined]
    store.close()
