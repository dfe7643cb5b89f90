"""A read model's documents in the PostgreSQL store (see `choreo.stores.postgres`, which opens it).

Tables, created by the read model's first write (until then it reads as empty), as in SQLite:
`rm_<name>_documents`, `rm_<name>_entries`, `rm_<name>_tracking` and `rm_<name>_meta`.

Writers of one read model take a transaction-scoped advisory lock on its name first, so the
compare-and-set of `put()` (the tracking, and the metadata, its batch started from) reads what
is stored while no other writer can change it, as SQLite's `BEGIN IMMEDIATE` does.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

import orjson
import psycopg

from choreo.errors import ConcurrencyConflict
from choreo.store import DocumentStore, Tracking, check_unchanged
from choreo.stores.postgres import DDL_LOCK

if TYPE_CHECKING:
    from choreo.stores.postgres import PostgresStore

_SCHEMA = """
CREATE TABLE IF NOT EXISTS rm_{name}_documents (key TEXT PRIMARY KEY, doc TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS rm_{name}_entries (id BIGSERIAL PRIMARY KEY, key TEXT NOT NULL, entries TEXT NOT NULL);
CREATE INDEX IF NOT EXISTS rm_{name}_entries_by_key ON rm_{name}_entries (key, id);
CREATE TABLE IF NOT EXISTS rm_{name}_tracking (source TEXT PRIMARY KEY, position BIGINT NOT NULL);
CREATE TABLE IF NOT EXISTS rm_{name}_meta (name TEXT PRIMARY KEY, value TEXT NOT NULL)
"""


class PostgresDocumentStore(DocumentStore):
    """A read model's tables; created by its first write, read as empty until then."""

    def __init__(self, store: PostgresStore, name: str) -> None:
        self.store = store
        self.name = name
        self._docs = f"rm_{name}_documents"
        self._entries = f"rm_{name}_entries"
        self._tracking = f"rm_{name}_tracking"
        self._meta = f"rm_{name}_meta"
        self._all = [self._docs, self._entries, self._tracking, self._meta]
        self._existing: set[str] = set()

    def _has(self, table: str) -> bool:
        """Whether `table` exists (once it does, it always will: tables are never dropped)."""
        if table not in self._existing:
            self._existing |= self.store.tables(self._all)
        return table in self._existing

    @contextmanager
    def _write(self) -> Iterator[psycopg.Cursor[Any]]:
        if len(self._existing) < 4 and not self.store.read_only:
            self.store.ensure_tables(self._all, _SCHEMA.format(name=self.name))
            self._existing = set(self._all)
        with self.store._write() as cur:
            cur.execute("SELECT pg_advisory_xact_lock(%s, hashtext(%s))", (DDL_LOCK >> 32, self._tracking))
            yield cur

    def get(self, key: str) -> dict[str, Any] | None:
        if not self._has(self._docs):
            return None
        rows = self.store._query(f"SELECT doc FROM {self._docs} WHERE key = %s", (key,))
        return orjson.loads(rows[0][0]) if rows else None

    def get_many(self, keys: Iterable[str]) -> dict[str, dict[str, Any]]:
        wanted = list(keys)
        if not wanted or not self._has(self._docs):
            return {}
        rows = self.store._query(f"SELECT key, doc FROM {self._docs} WHERE key = ANY(%s)", (wanted,))
        return {key: orjson.loads(doc) for key, doc in rows}

    def entries(self, key: str) -> list[Any]:
        if not self._has(self._entries):
            return []
        rows = self.store._query(f"SELECT entries FROM {self._entries} WHERE key = %s ORDER BY id", (key,))
        return [entry for row in rows for entry in orjson.loads(row[0])]

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
        with self._write() as cur:
            check_unchanged(
                owner, expected, lambda: dict(cur.execute(f"SELECT source, position FROM {self._tracking}").fetchall()),
                expected_meta, lambda: _meta(cur.execute(f"SELECT name, value FROM {self._meta}").fetchall()))
            if docs:
                cur.execute(
                    f"INSERT INTO {self._docs} SELECT * FROM unnest(%s::text[], %s::text[]) "
                    "ON CONFLICT (key) DO UPDATE SET doc = EXCLUDED.doc",
                    (list(docs), [(v if type(v) is bytes else orjson.dumps(v)).decode() for v in docs.values()]))
            rows = [(k, orjson.dumps(v).decode()) for k, v in (appended or {}).items() if v]
            if rows:
                cur.execute(
                    f"INSERT INTO {self._entries} (key, entries) SELECT k, e FROM unnest(%s::text[], %s::text[]) "
                    "WITH ORDINALITY AS x(k, e, n) ORDER BY n",
                    ([k for k, _ in rows], [e for _, e in rows]))
            for source, position in tracking.items():
                cur.execute(
                    f"INSERT INTO {self._tracking} AS t VALUES (%s, %s) ON CONFLICT (source) "
                    "DO UPDATE SET position = EXCLUDED.position WHERE t.position < EXCLUDED.position "
                    "RETURNING position", (source, position))
                if cur.fetchone() is None:
                    raise ConcurrencyConflict(f"{owner} already processed {source} past position {position}")

    def scan(self) -> Iterator[dict[str, Any]]:
        if not self._has(self._docs):
            return
        rows = self.store._query(f"SELECT key, doc FROM {self._docs} ORDER BY key LIMIT 1000")
        while rows:
            for row in rows:
                yield orjson.loads(row[1])
            rows = self.store._query(f"SELECT key, doc FROM {self._docs} WHERE key > %s ORDER BY key LIMIT 1000",
                                     (rows[-1][0],))

    def tracking(self) -> Tracking:
        if not self._has(self._tracking):
            return {}
        return dict(self.store._query(f"SELECT source, position FROM {self._tracking}"))

    def meta(self) -> dict[str, Any]:
        if not self._has(self._meta):
            return {}
        return _meta(self.store._query(f"SELECT name, value FROM {self._meta}"))

    def clear(self, meta: Mapping[str, Any] | None = None) -> None:
        with self._write() as cur:
            for table in self._all:
                cur.execute(f"DELETE FROM {table}")
            if meta:
                cur.executemany(f"INSERT INTO {self._meta} VALUES (%s, %s)",
                                [(k, orjson.dumps(v).decode()) for k, v in meta.items()])


def _meta(rows: Iterable[Sequence[Any]]) -> dict[str, Any]:
    return {name: orjson.loads(value) for name, value in rows}
