"""A read model's documents in the SQLite store (see `choreo.stores.sqlite`, which opens it).

Tables, created by the read model's first write (until then it reads as empty):

- `rm_<name>_documents`: one JSON document per key;
- `rm_<name>_entries`: JSON lists appended under a key (a saga's timeline), in order;
- `rm_<name>_tracking`: how far the read model has processed each source of the log;
- `rm_<name>_meta`: named JSON values that describe the whole read model (set by `clear()`).

`put()` writes documents, entries and tracking in one transaction and, given the
tracking its batch started from, commits only if that is still what is stored; given
metadata values too (the saga projection passes the generation that each of its
rebuilds stores anew), only if those are still stored as well.

The read model of a store's own log (`beside_log=True`) reads a saga's log rows by
the log's index on saga id (`log_rows()`), so the saga projection copies no timeline.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

import orjson

from choreo.store import DocumentStore, Row, Tracking, check_unchanged

if TYPE_CHECKING:
    from choreo.stores.sqlite import SQLiteStore, _Cursor

_SCHEMA = """
CREATE TABLE IF NOT EXISTS rm_{name}_documents (key TEXT PRIMARY KEY, doc TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS rm_{name}_entries (id INTEGER PRIMARY KEY, key TEXT NOT NULL, entries TEXT NOT NULL);
CREATE INDEX IF NOT EXISTS rm_{name}_entries_by_key ON rm_{name}_entries (key, id);
CREATE TABLE IF NOT EXISTS rm_{name}_tracking (source TEXT PRIMARY KEY, position INTEGER NOT NULL) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS rm_{name}_meta (name TEXT PRIMARY KEY, value TEXT NOT NULL) WITHOUT ROWID;
"""


class SQLiteDocumentStore(DocumentStore):
    """A read model's tables; created by its first write, read as empty until then."""

    def __init__(self, store: SQLiteStore, name: str, *, beside_log: bool = False) -> None:
        self.store = store
        self.name = name
        self.beside_log = beside_log
        self._docs = f"rm_{name}_documents"
        self._entries = f"rm_{name}_entries"
        self._tracking = f"rm_{name}_tracking"
        self._meta = f"rm_{name}_meta"
        self._existing: set[str] = set()

    def _has(self, table: str) -> bool:
        """Whether `table` exists (once it does, it always will: tables are never dropped)."""
        if table not in self._existing:
            self._existing |= self.store.tables([self._docs, self._entries, self._tracking, self._meta])
        return table in self._existing

    @contextmanager
    def _write(self) -> Iterator[_Cursor]:
        with self.store._write() as c:
            if len(self._existing) < 4:
                c.executescript_safe(_SCHEMA.format(name=self.name))
            yield c
        self._existing = {self._docs, self._entries, self._tracking, self._meta}

    def get(self, key: str) -> dict[str, Any] | None:
        if not self._has(self._docs):
            return None
        rows = self.store._query(f"SELECT doc FROM {self._docs} WHERE key = ?", (key,))
        return orjson.loads(rows[0][0]) if rows else None

    def entries(self, key: str) -> list[Any]:
        if not self._has(self._entries):
            return []
        rows = self.store._query(f"SELECT entries FROM {self._entries} WHERE key = ? ORDER BY id", (key,))
        return [entry for row in rows for entry in orjson.loads(row[0])]

    def log_rows(self, saga_id: str) -> list[Row] | None:
        return self.store.saga_rows(saga_id) if self.beside_log else None

    # -- a rebuild in several processes (`choreo._parallel_replay`); SQLite only, beside the log
    def partition_rows(self, after: int, upto: int, part: int, parts: int, limit: int) -> list[Row]:
        """The log rows after `after` up to `upto` of the sagas in partition `part` of `parts`, in log order.

        A saga's rows are all in one partition (by the last character of its id). Rows without
        a saga id, and those whose saga id is not text or could be confused with the text a
        projection names such a saga by (`b'...'`), are all in partition 0.
        """
        return self.store.partition_rows(after, upto, part, parts, limit)

    def reopened(self) -> SQLiteDocumentStore:
        """This read model on a new store object (its own connections): for a forked process."""
        from choreo.stores.sqlite import SQLiteStore

        store = SQLiteStore(self.store.path, durability=self.store.durability, lock_timeout=self.store.lock_timeout,
                            wakeup=False)
        return SQLiteDocumentStore(store, self.name, beside_log=self.beside_log)

    def get_many(self, keys: Iterable[str]) -> dict[str, dict[str, Any]]:
        wanted, found = list(keys), {}
        if not self._has(self._docs):
            return {}
        for i in range(0, len(wanted), 500):
            chunk = wanted[i : i + 500]
            marks = ",".join("?" * len(chunk))
            for key, doc in self.store._query(f"SELECT key, doc FROM {self._docs} WHERE key IN ({marks})", chunk):
                found[key] = orjson.loads(doc)
        return found

    def put(
        self,
        docs: Mapping[str, dict[str, Any] | bytes],
        *,
        tracking: Mapping[str, int],
        appended: Mapping[str, Sequence[Any]] | None = None,
        expected: Mapping[str, int] | None = None,
        expected_meta: Mapping[str, Any] | None = None,
    ) -> None:
        owner = f"read model {self.name}"
        with self._write() as c:
            check_unchanged(
                owner, expected, lambda: dict(c.c.execute(f"SELECT source, position FROM {self._tracking}").fetchall()),
                expected_meta, lambda: self._read_meta(c.c.execute(f"SELECT name, value FROM {self._meta}").fetchall()))
            c.c.executemany(
                f"INSERT OR REPLACE INTO {self._docs} VALUES (?, ?)",
                [(k, (v if type(v) is bytes else orjson.dumps(v)).decode()) for k, v in docs.items()],
            )
            if appended:
                c.c.executemany(
                    f"INSERT INTO {self._entries} (key, entries) VALUES (?, ?)",
                    [(k, orjson.dumps(v).decode()) for k, v in appended.items() if v],
                )
            c.track(self._tracking, tracking, owner)

    def scan(self) -> Iterator[dict[str, Any]]:
        if not self._has(self._docs):
            return
        # page by key; the first page starts at "" inclusive, which every key sorts at or after
        rows = self.store._query(f"SELECT key, doc FROM {self._docs} WHERE key >= '' ORDER BY key LIMIT 1000")
        while rows:
            for row in rows:
                yield orjson.loads(row[1])
            rows = self.store._query(
                f"SELECT key, doc FROM {self._docs} WHERE key > ? ORDER BY key LIMIT 1000", (rows[-1][0],)
            )

    def tracking(self) -> Tracking:
        return self.store._tracked(self._tracking) if self._has(self._tracking) else {}

    def meta(self) -> dict[str, Any]:
        if not self._has(self._meta):
            return {}
        return self._read_meta(self.store._query(f"SELECT name, value FROM {self._meta}"))

    @staticmethod
    def _read_meta(rows: Iterable[Sequence[Any]]) -> dict[str, Any]:
        return {name: orjson.loads(value) for name, value in rows}

    def clear(self, meta: Mapping[str, Any] | None = None) -> None:
        with self._write() as c:
            for table in (self._docs, self._entries, self._tracking, self._meta):
                c.c.execute(f"DELETE FROM {table}")
            c.c.executemany(f"INSERT INTO {self._meta} VALUES (?, ?)",
                            [(k, orjson.dumps(v).decode()) for k, v in (meta or {}).items()])
