"""The SQLite event store: one database file in WAL mode, shared by every service.

This module and `choreo.stores._sqlite_documents` (a read model's tables, which this store
opens) are the only ones that speak SQL. Tables:

- `choreo_log`: the shared log of integration events; `position` is the global order. An index
  by saga id lets the saga projection read a saga's timeline from the log instead of copying it.
- `svc_<name>_events`: a service's aggregate events (the `eventsourcing` stored-event shape).
- `svc_<name>_tracking`: how far the service has processed each source of the log.
- `svc_<name>_handled`: ids of the events the service handled (only with `dedupe=True`,
  for logs that can deliver an event twice, such as Kafka).
- `svc_<name>_dead_letters`: events the service parked, with the reason.
- `svc_<name>_deadlines`: the service's deadlines (scheduled, cancelled, fired).
- `svc_<name>_claims`, `svc_<name>_replicas`: when the service's work is split among
  replicas, each segment's claim (owner, token, lease expiry) and each replica's
  heartbeat; lease times are on SQLite's clock (the machine's, shared by every process
  on the file, and untouched by a test's frozen clock). See docs/scaling.md, "Replicas".
- `rm_<name>_*`: a read model's documents, entries, tracking and metadata.

A reader waiting for the log is woken by a commit in any process: see `choreo.stores._wakeup`
(Unix datagram sockets in the folder `<database>-wake/`).

Every write is a `BEGIN IMMEDIATE` transaction, so a writer waits for the lock
(up to `lock_timeout`) instead of failing half-way. `durability="full"` (the
default) fsyncs every commit (`synchronous=FULL`): a committed event survives a
crash of the process and of the machine. `durability="normal"` is faster and
still survives `kill -9` of the process, but a power cut may lose the last
commits.

`create=False` opens an existing file read-only (SQLite's `mode=ro`): nothing is
created or written, not even the log's table. On a database in WAL mode SQLite may
still create the `-wal` and `-shm` files beside it, as any reader does; if the folder
does not let it, the store cannot be read and says so.

Each service's tables are read and written by `choreo.stores._sqlite_service`; the saga
projection's documents by `choreo.stores._sqlite_documents`.
"""

from __future__ import annotations

import functools
import os
import sqlite3
import threading
from collections.abc import Collection, Iterator, Mapping, Sequence
from contextlib import contextmanager
from datetime import datetime, timezone
from typing import Any
from urllib.parse import quote

from choreo.errors import ConcurrencyConflict, StoreCorrupt, StoreError, StoreLocked, StoreNotFound, StoreURLError
from choreo.events import Envelope
from choreo.store import DocumentStore, Interest, LogStore, Row, ServiceStore, Tracking, check_service_name
from choreo.stores._sqlite_documents import SQLiteDocumentStore
from choreo.stores._sqlite_service import _EPOCH, _SERVICE_SCHEMA, _SERVICE_TABLES, _SQLiteServiceStore
from choreo.stores._wakeup import Wakeup

_SYNCHRONOUS = {"full": "FULL", "normal": "NORMAL"}
_LOG_COLUMNS = (
    "position, event_id, type, version, saga_id, causation_id, service, step, outcome, "
    "occurred_at, payload"
)
_SCHEMA = """
CREATE TABLE IF NOT EXISTS choreo_log (
    position INTEGER PRIMARY KEY AUTOINCREMENT,
    event_id TEXT NOT NULL UNIQUE,
    type TEXT NOT NULL,
    version INTEGER NOT NULL,
    saga_id TEXT,
    causation_id TEXT,
    service TEXT NOT NULL,
    step TEXT,
    outcome TEXT,
    occurred_at TEXT NOT NULL,
    payload TEXT NOT NULL,
    trace TEXT
);
CREATE INDEX IF NOT EXISTS choreo_log_by_saga ON choreo_log (saga_id);
"""


class SQLiteStore(LogStore):
    """The event store in one SQLite file, usable by several threads and processes at once.

    With `create=False` an existing file is opened read-only (`StoreNotFound` if it is
    missing) and every write raises `StoreError`.
    """

    def __init__(
        self,
        path: str,
        *,
        durability: str = "full",
        lock_timeout: float = 30.0,
        poll_interval: float | None = None,
        dedupe: bool = False,
        create: bool = True,
        wakeup: bool = True,
    ) -> None:
        if durability not in _SYNCHRONOUS:
            raise StoreURLError(
                f"unknown durability {durability!r}: expected one of {sorted(_SYNCHRONOUS)}"
            )
        if not path or path == ":memory:":
            raise StoreURLError("a SQLite store needs a file path (use memory:// for tests)")
        self.path = os.path.abspath(path)
        self.url = f"sqlite:///{path}"
        self.durability = durability
        self.lock_timeout = float(lock_timeout)
        self.poll_interval = poll_interval
        self.dedupe = dedupe
        self.read_only = not create
        self._local = threading.local()
        self._connections: list[sqlite3.Connection] = []
        self._guard = threading.Lock()
        # a waiting reader is woken by commits in any process (see choreo.stores._wakeup): it looks at the log
        # every `poll_interval` seconds only as a fallback (default 1 s; 10 ms when it cannot be woken)
        self._wakeup = Wakeup(self.path, listen=create and wakeup, poll=poll_interval)
        self._log_made = False  # until the log's table exists (from then on, _write tells if it grew)
        self._services: dict[str, _SQLiteServiceStore] = {}
        self._check_file()
        if self.read_only:
            if not self.tables(["choreo_log"]):
                self.close()
                raise StoreNotFound(f"{self.path}: not a choreo store (it has no log); nothing was created")
        else:
            with self._write() as c:
                c.executescript_safe(_SCHEMA)
                if "trace" not in {r[1] for r in c.c.execute("PRAGMA table_info(choreo_log)")}:
                    c.c.execute("ALTER TABLE choreo_log ADD COLUMN trace TEXT")  # a log written before traces
            self._log_made = True

    # -- connections and transactions ------------------------------------------------
    def _check_file(self) -> None:
        folder = os.path.dirname(self.path)
        if self.read_only and not os.path.exists(self.path):
            raise StoreNotFound(f"{self.path}: no such choreo store; nothing was created")
        if not os.path.isdir(folder):
            raise StoreError(f"{self.path}: folder {folder} does not exist")
        if os.path.isdir(self.path):
            raise StoreCorrupt(f"{self.path}: is a folder, not a SQLite database")
        if os.path.exists(self.path) and os.path.getsize(self.path) > 0:
            with open(self.path, "rb") as f:
                header = f.read(16)
            if header != b"SQLite format 3\x00":
                raise StoreCorrupt(f"{self.path}: not a SQLite database (bad file header)")

    def _conn(self) -> sqlite3.Connection:
        conn: sqlite3.Connection | None = getattr(self._local, "conn", None)
        if conn is None:
            try:
                conn = sqlite3.connect(
                    f"file:{quote(self.path)}?mode=ro" if self.read_only else self.path,
                    timeout=self.lock_timeout,
                    isolation_level=None,
                    check_same_thread=False,
                    cached_statements=256,
                    uri=self.read_only,
                )
                if not self.read_only:
                    conn.execute("PRAGMA journal_mode=WAL")
                    conn.execute(f"PRAGMA synchronous={_SYNCHRONOUS[self.durability]}")
            except sqlite3.Error as e:
                raise self._translate(e) from e
            self._local.conn = conn
            with self._guard:
                self._connections.append(conn)
        return conn

    def _translate(self, e: sqlite3.Error) -> Exception:
        text = str(e)
        if isinstance(e, sqlite3.IntegrityError):
            return ConcurrencyConflict(f"{self.path}: {text}")
        if self.read_only and "unable to open" in text:
            return StoreError(
                f"{self.path}: cannot be read read-only: {text} (a database in WAL mode needs its "
                f"-shm file, which SQLite creates beside it: is the folder writable?)"
            )
        if "locked" in text or "busy" in text:
            return StoreLocked(
                f"{self.path}: database is locked (waited {self.lock_timeout:g}s): {text}"
            )
        if isinstance(e, sqlite3.DatabaseError) and (
            "not a database" in text or "malformed" in text or "corrupt" in text
        ):
            return StoreCorrupt(f"{self.path}: {text}")
        return StoreError(f"{self.path}: {text}")

    @contextmanager
    def _write(self) -> Iterator[_Cursor]:
        if self.read_only:
            raise StoreError(f"{self.path}: opened read-only (create=False); nothing can be written")
        conn = self._conn()
        try:
            conn.execute("BEGIN IMMEDIATE")
        except sqlite3.Error as e:
            raise self._translate(e) from e
        try:
            head_sql = "SELECT MAX(position) FROM choreo_log"  # did this transaction append to the log?
            before = conn.execute(head_sql).fetchone()[0] if self._log_made else None
            yield _Cursor(conn.cursor())
            grew = self._log_made and conn.execute(head_sql).fetchone()[0] != before
            conn.execute("COMMIT")
        except BaseException as e:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            if isinstance(e, sqlite3.Error):
                raise self._translate(e) from e
            raise
        # wake the readers waiting for the log: this process's, and other processes' if it grew
        self._wakeup.notify(appended=grew)

    def _query(self, sql: str, params: Sequence[Any] = (), *, lenient: bool = False) -> list[Any]:
        """Run a query; return its rows.

        With `lenient`, a TEXT value that is not valid UTF-8 (a foreign or damaged writer's) comes
        back as its bytes (`Undecodable`), as a BLOB does, for a caller that parks such rows (else
        sqlite3 fails the whole query, and every reader would retry it for ever).
        """
        try:
            return self._conn().execute(sql, params).fetchall()
        except sqlite3.OperationalError as e:
            if not (lenient and str(e).startswith(_UNDECODABLE)):
                raise self._translate(e) from e
        except UnicodeDecodeError as e:  # damaged text where sqlite3 did not expect it (a damaged page)
            if not lenient:
                raise StoreCorrupt(f"{self.path}: text that is not UTF-8: {e}") from e
        except sqlite3.Error as e:
            raise self._translate(e) from e
        return self._query_leniently(sql, params)

    def _query_leniently(self, sql: str, params: Sequence[Any]) -> list[Any]:
        """`_query()` again, with text that is not valid UTF-8 read as `Undecodable` bytes: only a query
        that failed on such text pays for decoding its text in Python."""
        conn = self._conn()
        conn.text_factory = _lenient_text
        try:
            return conn.execute(sql, params).fetchall()
        except sqlite3.Error as e:
            raise self._translate(e) from e
        finally:
            conn.text_factory = str

    def _tracked(self, table: str) -> Tracking:
        """Return the positions recorded in a tracking table, by source."""
        return dict(self._query(f"SELECT source, position FROM {table}"))

    def tables(self, names: Collection[str]) -> set[str]:
        """Return those of the tables `names` that exist in the file."""
        marks = ",".join("?" * len(names))
        rows = self._query(f"SELECT name FROM sqlite_master WHERE type = 'table' AND name IN ({marks})", list(names))
        return {r[0] for r in rows}

    # -- the log ---------------------------------------------------------------------
    def append(self, envelopes: Sequence[Envelope]) -> list[int]:
        with self._write() as c:
            return c.insert_log(envelopes)

    def read(self, after: int, limit: int = 500, *, upto: int | None = None,
             interest: Interest | None = None) -> list[Envelope]:
        where = "position > ?"
        params: list[object] = [after]
        if upto is not None:
            where += " AND position <= ?"
            params.append(upto)
        if interest is not None:  # leave out, in SQL, what the reader does not want
            wanted = [f"type IN ({','.join('?' * len(interest.types))})"]
            params += sorted(interest.types)
            if interest.failures:
                wanted.append("outcome = 'failed'")
            if interest.outcomes:
                wanted.append("outcome IS NOT NULL")
            if interest.known is not None:
                wanted.append(f"type NOT IN ({','.join('?' * len(interest.known))})")
                params += sorted(interest.known)
            where += f" AND ({' OR '.join(wanted)})"
        rows = self._query(
            f"SELECT {_LOG_COLUMNS}, {self._trace_column} FROM choreo_log WHERE {where} ORDER BY position LIMIT ?",
            (*params, limit),
            lenient=True,
        )
        return [_envelope(r) for r in rows]

    @functools.cached_property
    def _trace_column(self) -> str:
        """`trace`, or NULL in a log written before traces (opened read-only, so not migrated)."""
        has = any(r[1] == "trace" for r in self._query("PRAGMA table_info(choreo_log)"))
        return "trace" if has else "NULL"

    def read_rows(self, after: int, limit: int = 500) -> list[Row]:
        """`read()` as plain rows; a text column that is not valid UTF-8 comes back as `Undecodable` bytes."""
        return self._query(
            f"SELECT {_LOG_COLUMNS}, 'log' FROM choreo_log WHERE position > ? ORDER BY position LIMIT ?", (after, limit),
            lenient=True,
        )

    def partition_rows(self, after: int, upto: int, part: int, parts: int, limit: int) -> list[Row]:
        """`SQLiteDocumentStore.partition_rows()`: the rows of one partition of the sagas, in log order."""
        return self._query(
            f"SELECT {_LOG_COLUMNS}, 'log' FROM choreo_log WHERE position > ? AND position <= ? AND COALESCE("
            "CASE WHEN typeof(saga_id) = 'text' AND saga_id NOT LIKE 'b''%' AND saga_id NOT LIKE 'b\"%' "
            "THEN unicode(substr(saga_id, -1)) % ? END, 0) = ? ORDER BY position LIMIT ?",
            (after, upto, parts, part, limit), lenient=True)

    def last_position(self) -> int:
        return self._query("SELECT MAX(position) FROM choreo_log")[0][0] or 0

    def wait(self, after: int, timeout: float) -> bool:
        return self._wakeup.wait(lambda: self.last_position() > after, timeout)

    def service(self, name: str) -> ServiceStore:
        check_service_name(name)
        with self._guard:
            store = self._services.get(name)
        if store is None:
            if self.read_only:
                wanted = [f"svc_{name}_{table}" for table in _SERVICE_TABLES]
                missing = sorted(set(wanted) - self.tables(wanted))
                if len(missing) == len(wanted):
                    raise StoreNotFound(f"no service {name!r} in {self.path}")
                if missing:
                    raise StoreNotFound(f"service {name!r} in {self.path} lacks table(s) {', '.join(missing)}")
            else:
                with self._write() as c:
                    c.executescript_safe(_SERVICE_SCHEMA.format(name=name))
                    columns = {r[1] for r in c.c.execute(f"PRAGMA table_info(svc_{name}_dead_letters)")}
                    if "due_at" not in columns:  # a store written before retries were scheduled
                        c.c.execute(f"ALTER TABLE svc_{name}_dead_letters ADD COLUMN due_at TEXT")
            store = _SQLiteServiceStore(self, name)
            with self._guard:
                self._services[name] = store
        return store

    def documents(self, name: str) -> DocumentStore:
        check_service_name(name)
        return SQLiteDocumentStore(self, name, beside_log=True)

    def saga_rows(self, saga_id: str) -> list[Row]:
        """The log rows of one saga, in log order (by the index on saga id); text that is not UTF-8 as bytes."""
        return self._query(f"SELECT {_LOG_COLUMNS}, 'log' FROM choreo_log WHERE saga_id = ? ORDER BY position",
                           (saga_id,), lenient=True)

    def close(self) -> None:
        with self._guard:
            conns, self._connections = self._connections, []
        for conn in conns:
            conn.close()
        self._local = threading.local()


class _Cursor:
    """A cursor inside a write transaction, with choreo's inserts."""

    def __init__(self, cursor: sqlite3.Cursor) -> None:
        self.c = cursor

    def executescript_safe(self, script: str) -> None:
        for statement in script.split(";"):
            if statement.strip():
                self.c.execute(statement)

    def track(self, table: str, tracking: Mapping[str, int], owner: str) -> None:
        """Move tracking positions forward; raise `ConcurrencyConflict` if one would not move."""
        for source, position in tracking.items():
            self.c.execute(
                f"INSERT INTO {table} VALUES (:s, :p) ON CONFLICT (source) "
                f"DO UPDATE SET position = :p WHERE {table}.position < :p RETURNING position",
                {"s": source, "p": position},
            )
            if self.c.fetchone() is None:
                raise ConcurrencyConflict(f"{owner} already processed {source} past position {position}")

    def track_segments(self, table: str, tracking: Mapping[str, int], owner: str) -> None:
        """`track()` for a replica, which moves many segments' positions to one position: one UPDATE each."""
        at: dict[int, list[str]] = {}
        for source, position in tracking.items():
            at.setdefault(position, []).append(source)
        for position, sources in at.items():
            marks = ",".join("?" * len(sources))
            self.c.execute(f"UPDATE {table} SET position = ? WHERE source IN ({marks}) AND position < ?",
                           (position, *sources, position))
            moved = self.c.rowcount
            if moved == len(sources):
                continue
            present = {r[0] for r in self.c.execute(f"SELECT source FROM {table} WHERE source IN ({marks})", sources)}
            absent = [s for s in sources if s not in present]
            if moved + len(absent) != len(sources):
                raise ConcurrencyConflict(f"{owner} already processed a segment of the log past position {position}")
            self.c.executemany(f"INSERT INTO {table} VALUES (?, ?)", [(s, position) for s in absent])

    def insert_log(self, envelopes: Sequence[Envelope]) -> list[int]:
        """Append to the log; return the positions (consecutive: the transaction holds the write lock)."""
        if not envelopes:
            return []
        self.c.executemany(
            "INSERT INTO choreo_log (event_id, type, version, saga_id, causation_id, "
            "service, step, outcome, occurred_at, payload, trace) VALUES (?,?,?,?,?,?,?,?,?,?,?)",
            [
                (e.event_id, e.type, e.version, e.saga_id, e.causation_id, e.service,
                 e.step, e.outcome, e.occurred_at.isoformat(), e.payload, e.trace)
                for e in envelopes
            ],
        )
        last = int(self.c.execute("SELECT last_insert_rowid()").fetchone()[0])
        return list(range(last - len(envelopes) + 1, last + 1))


#: how sqlite3 says that a TEXT value is not valid UTF-8 (it then fails the whole query)
_UNDECODABLE = "Could not decode to UTF-8"


class Undecodable(bytes):
    """The bytes of a TEXT value that is not valid UTF-8 (read as bytes, as a BLOB is)."""


def _lenient_text(data: bytes) -> str | bytes:
    try:
        return data.decode()
    except UnicodeDecodeError:
        return Undecodable(data)


# the log's text columns (index in a row, name, whether NULL is allowed)
_TEXT_COLUMNS = ((1, "event_id", False), (2, "type", False), (4, "saga_id", True), (5, "causation_id", True),
                 (6, "service", False), (7, "step", True), (8, "outcome", True), (9, "occurred_at", False),
                 (10, "payload", False))


def _not_text(r: Sequence[Any]) -> tuple[list[Any], str]:
    """The fields of a row with a text column that is not text, made text; and what was wrong."""
    fields, problems = list(r), []
    for i, name, optional in _TEXT_COLUMNS:
        value = r[i]
        if type(value) is str or (optional and value is None):
            continue
        if isinstance(value, Undecodable):
            problems.append(f"{name} is not valid UTF-8")
            fields[i] = value.decode(errors="replace")
        else:
            problems.append(f"{name} is {'a BLOB' if isinstance(value, bytes) else type(value).__name__}, not text")
            fields[i] = repr(value)
    return fields, f"log position {r[0]}: {'; '.join(problems)}"


def _envelope(r: Sequence[Any]) -> Envelope:
    """Build an envelope from a log row; a malformed row still yields one, `malformed` if a text column
    is not text (a BLOB, or text that is not valid UTF-8: then made plain text) or its time is not an ISO
    8601 time (a bad payload or version fails when it is decoded)."""
    malformed = None
    if not (type(r[1]) is str and type(r[2]) is str and type(r[6]) is str and type(r[9]) is str
            and type(r[10]) is str and (r[4] is None or type(r[4]) is str) and (r[5] is None or type(r[5]) is str)
            and (r[7] is None or type(r[7]) is str) and (r[8] is None or type(r[8]) is str)):
        r, malformed = _not_text(r)
    try:
        occurred = datetime.fromisoformat(r[9])
        if occurred.tzinfo is None:
            occurred = occurred.replace(tzinfo=timezone.utc)
    except (TypeError, ValueError) as e:
        occurred = _EPOCH
        if malformed is None:
            malformed = f"log position {r[0]}: occurred_at {r[9]!r} is not an ISO 8601 time ({e})"
    return Envelope(
        position=r[0],
        event_id=r[1],
        type=r[2],
        version=r[3] if isinstance(r[3], int) else -1,
        saga_id=r[4] or "",
        causation_id=r[5],
        service=r[6],
        step=r[7],
        outcome=r[8],
        occurred_at=occurred,
        payload=r[10],
        malformed=malformed,
        trace=r[11] if len(r) > 11 and type(r[11]) is str else None,
    )
