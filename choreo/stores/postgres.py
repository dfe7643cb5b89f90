"""The PostgreSQL event store: the log and every service's state in one database, shared by many hosts.

`open_store("postgresql://user@host:5432/db")` (or `postgres://`) opens it. This module and
its private helpers `_postgres_service`, `_postgres_documents` and `_postgres_wakeup` are the
only ones that import psycopg (psycopg 3: `pip install choreo[postgres]`). Tables, created by the first
store that writes (nothing is created by a store opened with `create=False`):

- `choreo_log`: the shared log; `position` is the global order, gap-free.
- `svc_<name>_events`, `_tracking`, `_dead_letters`, `_handled`, `_deadlines`: a service's
  aggregate events, tracking, dead letters (and scheduled retries), handled ids (only with
  `dedupe`) and deadlines, as in `choreo.stores.sqlite`.
- `rm_<name>_*`: a read model's documents, entries, tracking and metadata.

How positions stay gap-free for readers. Every transaction that appends to the log takes a
transaction-scoped advisory lock (`pg_advisory_xact_lock(LOG_LOCK)`) as its last step, then
numbers its events after the largest position it can see. The lock is released only once the
transaction is committed and visible, so the next appender numbers after it, and positions
are assigned in commit order: a reader that saw position N has seen every position below N,
and never skips an event committed later. A transaction does everything else first, so the
lock is held only for the insert and the COMMIT. A process that writes to the log without
choreo must take the same lock.

Wake-ups. A transaction that appends also notifies the channel `choreo_log` (delivered at
COMMIT) with the new end of the log; a reader that waits (`wait()`) has the store LISTEN on a
dedicated connection, whose thread wakes the readers of this process at once. See
`choreo.stores._postgres_wakeup`.

Settings, in the URL's query (the others go to libpq, e.g. `sslmode`, `connect_timeout`):
`durability=full|normal` (`synchronous_commit` on or off: off may lose the last commits if
the server crashes, never if a service does), `lock_timeout=SECONDS` (30; a commit that waits
longer for a lock fails with `StoreLocked`, and the service resumes), `poll_interval=SECONDS`.

Each thread has its own connection (autocommit for reads, one transaction per write); a
connection that broke (the server restarted) is replaced on the next call. A missing database
is created when the store may create (the user needs CREATEDB); with `create=False` it is
`StoreNotFound`, as is a database without choreo's log.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Collection, Iterator, Sequence
from contextlib import contextmanager
from typing import Any
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import psycopg
from psycopg import errors, pq, sql

from choreo.errors import ConcurrencyConflict, StoreError, StoreLocked, StoreNotFound, StoreURLError
from choreo.events import Envelope
from choreo.store import (
    DocumentStore, Feed, Interest, LogStore, Row, ServiceStore, Tracking, _LogFeed, check_service_name,
)
from choreo.stores._postgres_wakeup import Wakeups
from choreo.stores.sqlite import _envelope

#: The advisory lock every transaction that appends to the log holds until it commits ("choreolg").
LOG_LOCK = 0x63686F72656F6C67
#: The advisory lock that serialises creating tables (two processes creating one table would clash).
DDL_LOCK = 0x63686F72656F6464
#: The channel a commit that appended to the log notifies.
CHANNEL = "choreo_log"

_SETTINGS = {"durability", "lock_timeout", "poll_interval"}
_DURABILITY = {"full": "on", "normal": "off"}
_LOG_COLUMNS = ("position, event_id, type, version, saga_id, causation_id, service, step, outcome, "
                "occurred_at, payload")
_SCHEMA = """
CREATE TABLE IF NOT EXISTS choreo_log (
    position BIGINT PRIMARY KEY,
    event_id TEXT NOT NULL UNIQUE,
    type TEXT NOT NULL,
    version INTEGER NOT NULL,
    saga_id TEXT,
    causation_id TEXT,
    service TEXT NOT NULL,
    step TEXT,
    outcome TEXT,
    occurred_at TEXT NOT NULL,
    payload TEXT NOT NULL
)
"""
# numbered after the largest position visible once the lock is held (a new snapshot: READ COMMITTED); the
# notification (sent at COMMIT) carries the schema and the new head of the log
_INSERT_LOG = f"""
WITH ins AS (
    INSERT INTO choreo_log ({_LOG_COLUMNS})
    SELECT (SELECT COALESCE(MAX(position), 0) FROM choreo_log) + n, e, t, v, s, c, sv, st, o, oc, p
    FROM unnest(%s::text[], %s::text[], %s::int[], %s::text[], %s::text[], %s::text[], %s::text[], %s::text[],
                %s::text[], %s::text[]) WITH ORDINALITY AS x(e, t, v, s, c, sv, st, o, oc, p, n)
    RETURNING position),
note AS (SELECT pg_notify('{CHANNEL}', MIN(position) || ':' || MAX(position) || ':' || %s || ':'
                          || current_schema() || %s) FROM ins)
SELECT position FROM ins, note
"""


def parse_url(url: str) -> tuple[str, dict[str, Any]]:
    """Split a `postgresql://` URL into libpq's connection string and choreo's settings; `StoreURLError` if bad."""
    parts = urlsplit(url)
    if parts.scheme not in ("postgresql", "postgres"):
        raise StoreURLError(f"not a PostgreSQL store URL: {url!r}")
    query = parse_qsl(parts.query, keep_blank_values=True)
    settings: dict[str, Any] = {k: v for k, v in query if k in _SETTINGS}
    rest = [(k, v) for k, v in query if k not in _SETTINGS]
    for name in ("lock_timeout", "poll_interval"):
        if name in settings:
            try:
                settings[name] = float(settings[name])
                if settings[name] <= 0:
                    raise ValueError
            except ValueError:
                raise StoreURLError(f"{name} must be a positive number of seconds in {redact(url)!r}") from None
    if not parts.path.strip("/") and not any(k == "dbname" for k, _ in rest):
        raise StoreURLError(f"no database in store URL {redact(url)!r}: expected postgresql://USER@HOST:PORT/DATABASE")
    conninfo = urlunsplit(("postgresql", parts.netloc, parts.path, urlencode(rest), ""))
    return conninfo, settings


def redact(url: str) -> str:
    """`url` with its password (if any) replaced by `***`."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = parts.netloc.replace(f":{parts.password}@", ":***@", 1)
    return urlunsplit(parts._replace(netloc=netloc))


class PostgresStore(LogStore):
    """The event store in one PostgreSQL database, usable by many threads, processes and hosts at once.

    With `create=False` nothing is created (`StoreNotFound` if the database or its log is
    missing) and every write raises `StoreError`.
    """

    def __init__(
        self,
        url: str,
        *,
        durability: str = "full",
        lock_timeout: float = 30.0,
        poll_interval: float | None = None,
        dedupe: bool = False,
        create: bool = True,
        connect_timeout: float = 10.0,
    ) -> None:
        conninfo, settings = parse_url(url)
        durability = settings.get("durability", durability)
        if durability not in _DURABILITY:
            raise StoreURLError(f"unknown durability {durability!r}: expected one of {sorted(_DURABILITY)}")
        self.url = redact(url)
        self.durability = durability
        self.lock_timeout = float(settings.get("lock_timeout", lock_timeout))
        self.poll_interval = settings.get("poll_interval", poll_interval)
        self.dedupe = dedupe
        self.read_only = not create
        try:
            self.conninfo = psycopg.conninfo.make_conninfo(conninfo)
            params = psycopg.conninfo.conninfo_to_dict(self.conninfo)
        except psycopg.ProgrammingError as e:
            raise StoreURLError(f"bad PostgreSQL store URL {self.url!r}: {_first_line(e)}") from None
        if "connect_timeout" not in params:
            self.conninfo = psycopg.conninfo.make_conninfo(self.conninfo, connect_timeout=max(1, int(connect_timeout)))
        self.database = str(params.get("dbname") or "")
        host = params.get("host") or "localhost"
        self.where = f"PostgreSQL database {self.database!r} at {host}:{params.get('port') or 5432}"
        self._local = threading.local()
        self._connections: list[psycopg.Connection[Any]] = []
        self._guard = threading.Lock()
        self._wakeups = Wakeups(self, poll_interval=self.poll_interval, name=self.database)
        self._services: dict[str, ServiceStore] = {}
        self._tables: set[str] = set()  # tables known to exist (they are never dropped)
        self._closed = False
        try:
            if self.read_only:
                if not self.tables(["choreo_log"]):
                    raise StoreNotFound(f"{self.where}: not a choreo store (it has no log); nothing was created")
            else:
                self.ensure_tables(["choreo_log"], _SCHEMA)
        except BaseException:
            self.close()  # no connection left open behind a store that could not be opened
            raise

    # -- connections, errors and transactions ------------------------------------------
    def _connect(self, *, listen: bool = False) -> psycopg.Connection[Any]:
        try:
            conn = psycopg.connect(self.conninfo, autocommit=True)
        except psycopg.OperationalError as e:
            if "does not exist" in str(e) and f'database "{self.database}"' in str(e) and not self.read_only:
                self._create_database()
                return self._connect(listen=listen)
            raise self._translate(e) from e
        except psycopg.Error as e:
            raise self._translate(e) from e
        try:
            setup = (f"SET TimeZone = 'UTC'; SET client_min_messages = warning; "
                     f"SET lock_timeout = {int(self.lock_timeout * 1000)}; "
                     f"SET synchronous_commit = {_DURABILITY[self.durability]}")
            if self.read_only:
                setup += "; SET default_transaction_read_only = on"
            if listen:
                setup += f"; LISTEN {CHANNEL}"
            conn.execute(setup)
        except psycopg.Error as e:
            conn.close()
            raise self._translate(e) from e
        return conn

    def _create_database(self) -> None:
        """Create the missing database, through the `postgres` maintenance database."""
        maintenance = psycopg.conninfo.make_conninfo(self.conninfo, dbname="postgres")
        try:
            with psycopg.connect(maintenance, autocommit=True) as conn:
                conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(self.database)))
        except errors.DuplicateDatabase:
            pass  # another process just created it
        except psycopg.Error as e:
            raise StoreNotFound(
                f"{self.where}: the database does not exist, and creating it failed ({_first_line(e)}): "
                f"create it (createdb {self.database}) or name another"
            ) from e

    def _conn(self) -> psycopg.Connection[Any]:
        if self._closed:
            raise StoreError(f"{self.where}: the store is closed")
        conn: psycopg.Connection[Any] | None = getattr(self._local, "conn", None)
        if conn is None or conn.closed or conn.broken:
            if conn is not None:
                self._forget(conn)
            conn = self._connect()
            self._local.conn = conn
            with self._guard:
                self._connections.append(conn)
        return conn

    def _unusable(self, conn: psycopg.Connection[Any]) -> bool:
        """After an error: whether `conn` cannot serve again (broken, or left inside a transaction or
        pipeline); if so it is closed and forgotten, and the next call connects anew."""
        try:
            usable = (not conn.closed and not conn.broken and conn.pgconn.pipeline_status == pq.PipelineStatus.OFF
                      and conn.info.transaction_status == pq.TransactionStatus.IDLE)
        except psycopg.Error:
            usable = False
        if not usable:
            self._forget(conn)
        return not usable

    def _forget(self, conn: psycopg.Connection[Any]) -> None:
        with self._guard:
            if conn in self._connections:
                self._connections.remove(conn)
        conn.close()
        if getattr(self._local, "conn", None) is conn:
            self._local.conn = None

    def _translate(self, e: psycopg.Error) -> Exception:
        """The choreo error for a psycopg error: what went wrong, where, and what to do."""
        text = _first_line(e)
        where = self.where
        if isinstance(e, (errors.UniqueViolation, errors.SerializationFailure, errors.DeadlockDetected)):
            return ConcurrencyConflict(f"{where}: {text}")
        if isinstance(e, errors.LockNotAvailable):
            return StoreLocked(f"{where}: a lock stayed held past lock_timeout ({self.lock_timeout:g}s): {text}")
        if isinstance(e, errors.ReadOnlySqlTransaction):
            return StoreError(f"{where}: opened read-only (create=False); nothing can be written")
        if isinstance(e, errors.DiskFull):
            return StoreError(f"{where}: the server's disk is full: {text}")
        if isinstance(e, psycopg.ProgrammingError) and ("invalid connection option" in text or "invalid dsn" in text
                                                        or "invalid URI" in text):
            return StoreURLError(f"bad PostgreSQL store URL {self.url!r}: {text}")
        full = str(e)
        if f'database "{self.database}" does not exist' in full:
            return StoreNotFound(f"{where}: no such database; nothing was created")
        if "password authentication failed" in full or "no password supplied" in full or (
                'role "' in full and "does not exist" in full) or (
                "authentication failed" in full) or isinstance(e, errors.InvalidAuthorizationSpecification) or (
                isinstance(e, errors.InvalidPassword)):
            return StoreError(f"{where}: authentication failed: {text} (check the user and password in the URL, "
                              f"or PGPASSWORD / ~/.pgpass)")
        if isinstance(e, psycopg.OperationalError) and any(
                s in full for s in ("Connection refused", "could not connect", "No such file or directory",
                                    "timeout expired", "could not translate host name", "Network is unreachable",
                                    "connection failed")):
            return StoreError(f"{where} is not reachable: {text} (is the server running?)")
        if isinstance(e, (errors.AdminShutdown, errors.CrashShutdown, errors.CannotConnectNow)) or (
                isinstance(e, psycopg.OperationalError)):
            return StoreError(f"{where}: lost the connection to the server: {text}")
        return StoreError(f"{where}: {text}")

    def _query(self, query: str, params: Sequence[Any] = ()) -> list[Any]:
        """Run a query outside any transaction (autocommit); return its rows.

        A connection found broken (the server restarted since it was last used) is replaced
        and the query run once more: a read can always be repeated.
        """
        for attempt in (1, 2):
            conn = self._conn()
            try:
                cur = conn.execute(query, params)
                return cur.fetchall() if cur.description is not None else []
            except psycopg.Error as e:
                if self._unusable(conn) and attempt == 1 and isinstance(e, psycopg.OperationalError):
                    continue
                raise self._translate(e) from e
        raise AssertionError("unreachable")

    @contextmanager
    def _write(self) -> Iterator[psycopg.Cursor[Any]]:
        """One transaction: committed if the block ends normally, rolled back if it raises.

        A connection found broken at BEGIN (nothing of the transaction was sent) is replaced once.
        """
        if self.read_only:
            raise StoreError(f"{self.where}: opened read-only (create=False); nothing can be written")
        for attempt in (1, 2):
            conn = self._conn()
            transaction = conn.transaction()
            try:
                transaction.__enter__()
                break
            except psycopg.Error as e:
                if self._unusable(conn) and attempt == 1 and isinstance(e, psycopg.OperationalError):
                    continue
                raise self._translate(e) from e
        try:
            try:
                with conn.cursor() as cur:
                    yield cur
            except BaseException as e:
                transaction.__exit__(type(e), e, e.__traceback__)  # rolls back
                raise
            transaction.__exit__(None, None, None)  # commits
        except psycopg.Error as e:
            self._unusable(conn)
            raise self._translate(e) from e
        finally:
            head, _appended.head = getattr(_appended, "head", 0), 0
        # wake this process's readers (other processes' are woken by the notification)
        self._rung(head)

    def tables(self, names: Collection[str]) -> set[str]:
        """Return those of the tables `names` that exist (in the connection's search path)."""
        rows = self._query(
            "SELECT c.relname FROM pg_class c WHERE c.relname = ANY(%s) AND c.relkind IN ('r', 'p') "
            "AND pg_table_is_visible(c.oid)", (list(names),))
        return {r[0] for r in rows}

    def ensure_tables(self, names: Collection[str], ddl: str) -> None:
        """Create the tables `names` with the statements `ddl` unless they all exist (serialised across processes)."""
        if self._tables.issuperset(names):
            return
        if not self.tables(names) >= set(names):
            with self._write() as cur:
                cur.execute("SELECT pg_advisory_xact_lock(%s)", (DDL_LOCK,))
                for statement in ddl.split(";"):
                    if statement.strip():
                        cur.execute(statement)
        self._tables.update(names)

    # -- the log -----------------------------------------------------------------------
    def append(self, envelopes: Sequence[Envelope]) -> list[int]:
        with self._write() as cur:
            return insert_log(cur, envelopes)

    def read(self, after: int, limit: int = 500, *, upto: int | None = None,
             interest: Interest | None = None) -> list[Envelope]:
        where = "position > %s"
        params: list[object] = [after]
        if upto is not None:
            where += " AND position <= %s"
            params.append(upto)
        where += _wanted(interest, params)
        rows = self._query(f"SELECT {_LOG_COLUMNS} FROM choreo_log WHERE {where} ORDER BY position LIMIT %s",
                           (*params, limit))
        return [_envelope(r) for r in rows]

    def _read_upto(self, after: int, limit: int, interest: Interest) -> tuple[int, list[Envelope]]:
        """The head of the log and up to `limit` wanted events after `after` up to it, in one snapshot."""
        params: list[object] = [after]
        wanted = _wanted(interest, params)
        epoch = self._wakeups.epoch()
        rows = self._query(
            f"SELECT h.upto, l.* FROM (SELECT COALESCE(MAX(position), 0) AS upto FROM choreo_log) h "
            f"LEFT JOIN LATERAL (SELECT {_LOG_COLUMNS} FROM choreo_log WHERE position > %s AND position <= h.upto"
            f"{wanted} ORDER BY position LIMIT %s) l ON true", (*params, limit))
        upto = int(rows[0][0])
        self._wakeups.seen(upto, epoch)
        return upto, [_envelope(r[1:]) for r in rows if r[1] is not None]

    def read_rows(self, after: int, limit: int = 500) -> list[Row]:
        return self._query(
            f"SELECT {_LOG_COLUMNS}, 'log' FROM choreo_log WHERE position > %s ORDER BY position LIMIT %s",
            (after, limit))

    def last_position(self) -> int:
        epoch = self._wakeups.epoch()
        head = int(self._query("SELECT COALESCE(MAX(position), 0) FROM choreo_log")[0][0])
        self._wakeups.seen(head, epoch)
        return head

    # -- wake-ups (see choreo.stores._postgres_wakeup) ----------------------------------
    def wait(self, after: int, timeout: float) -> bool:
        return self._wakeups.wait(after, timeout)

    def _rung(self, head: int = 0) -> None:
        """Wake this process's waiting readers after a commit; `head`, if it appended, is where the log now ends."""
        self._wakeups.rung(head)

    def feed(self, reader: str, tracking: Callable[[], Tracking], *, group: bool = True,
             interest: Interest | None = None) -> Feed:
        return _PostgresFeed(self, tracking, interest)

    # -- services and read models --------------------------------------------------------
    def service(self, name: str) -> ServiceStore:
        from choreo.stores._postgres_service import PostgresServiceStore

        check_service_name(name)
        with self._guard:
            store = self._services.get(name)
        if store is None:
            store = PostgresServiceStore(self, name)
            with self._guard:
                self._services[name] = store
        return store

    def documents(self, name: str) -> DocumentStore:
        from choreo.stores._postgres_documents import PostgresDocumentStore

        check_service_name(name)
        return PostgresDocumentStore(self, name)

    def close(self) -> None:
        self._closed = True
        self._wakeups.close()
        with self._guard:
            conns, self._connections = self._connections, []
        for conn in conns:
            conn.close()
        self._local = threading.local()


def insert_log(cur: psycopg.Cursor[Any], envelopes: Sequence[Envelope]) -> list[int]:
    """Append to the log inside the caller's transaction, as its last step; return the positions.

    Takes the log's advisory lock (held until COMMIT) and queues the notification (sent at COMMIT).
    """
    if not envelopes:
        return []
    cur.execute(f"SELECT pg_advisory_xact_lock({LOG_LOCK})")
    cur.execute(_INSERT_LOG, (
        [e.event_id for e in envelopes], [e.type for e in envelopes], [e.version for e in envelopes],
        [e.saga_id for e in envelopes], [e.causation_id for e in envelopes], [e.service for e in envelopes],
        [e.step for e in envelopes], [e.outcome for e in envelopes],
        [e.occurred_at.isoformat() for e in envelopes], [e.payload for e in envelopes], *_note(envelopes),
    ))
    positions = sorted(r[0] for r in cur.fetchall())  # numbered in the envelopes' order
    _appended.head = positions[-1]  # the head once this transaction commits (see PostgresStore._write)
    return positions


_appended = threading.local()


def _note(envelopes: Sequence[Envelope]) -> tuple[str, str]:
    """What the notification of an append says besides its positions and schema (see `_postgres_wakeup`):
    its outcome flags ("f": a failure, "o": any outcome), and its types, one a line ("*" if too many)."""
    flags = ("f" if any(e.outcome == "failed" for e in envelopes) else "") + (
        "o" if any(e.outcome for e in envelopes) else "")
    types = "\n".join(sorted({e.type for e in envelopes}))
    return flags, "\n" + (types if len(types.encode()) < 6000 else "*")


class _PostgresFeed(_LogFeed):
    """The log's feed; a reader with an interest gets its batch and the head of the log in one query."""

    store: PostgresStore

    _epoch = 0  # the listening connection under which this reader last reached the end of the log

    def rewind(self) -> None:
        super().rewind()
        self._epoch = 0

    def _read(self, limit: int) -> list[Envelope]:
        if self.interest is None:
            return super()._read(limit)
        wakeups = self.store._wakeups
        if self._at_head and self._epoch and self._epoch == wakeups.epoch():
            # every commit since this reader's last look was notified: skip what they say it does not want
            skip = wakeups.unwanted_until(self.position, self.interest)
            if skip is not None:
                self.position = skip
                return []
        epoch = wakeups.epoch()
        upto, batch = self.store._read_upto(self.position, limit, self.interest)
        # a short batch means every event up to `upto` (the end of the log when read) was looked at
        self._at_head = len(batch) < limit
        self.position = upto if self._at_head else batch[-1].position or self.position
        self._epoch = epoch if self._at_head else 0
        return batch


def _wanted(interest: Interest | None, params: list[object]) -> str:
    """The SQL condition (` AND (...)`, empty without an interest) that leaves out what a reader does not want."""
    if interest is None:
        return ""
    wanted = ["type = ANY(%s)"]
    params.append(sorted(interest.types))
    if interest.failures:
        wanted.append("outcome = 'failed'")
    if interest.outcomes:
        wanted.append("outcome IS NOT NULL")
    if interest.known is not None:
        wanted.append("NOT (type = ANY(%s))")
        params.append(sorted(interest.known))
    return f" AND ({' OR '.join(wanted)})"


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__
