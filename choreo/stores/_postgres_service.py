"""A service's private state in the PostgreSQL store (see `choreo.stores.postgres`, which opens it).

Tables, as in the SQLite store: `svc_<name>_events` (aggregate events), `_tracking`,
`_dead_letters` (with `status` and, for a scheduled retry, `due_at`), `_handled` (ids of
handled events, only with `dedupe`) and `_deadlines`. `commit()` writes all of a handler's
effects in one transaction; the log's insert comes last, so the log's lock is held only for
it and the COMMIT.

Replicas (see docs/scaling.md): `svc_<name>_claims` (each segment's owner, token and lease
expiry) and `svc_<name>_replicas` (each replica's heartbeat). Lease times are seconds since
the epoch on the server's clock (`clock_timestamp()`), so replicas on hosts whose clocks
differ agree. `acquire()` and `leave()` take the service's claims lock (an advisory lock) and
then every claim row in segment order; a replica's `commit()` first share-locks the rows of
the segments it commits for and checks their tokens, so a segment cannot change hands while
a commit for it is under way, and a replica that lost one writes nothing (`ClaimLost`).
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from datetime import datetime
from itertools import groupby
from typing import TYPE_CHECKING, Any
from uuid import UUID

import psycopg
from eventsourcing.persistence import StoredEvent
from psycopg import errors

from choreo.deadlines import CANCELLED, RESCHEDULED, SAGA_ENDED, SCHEDULED, Deadline
from choreo.errors import ClaimLost, ConcurrencyConflict, EventIdTaken, StoreError, StoreNotFound
from choreo.events import Envelope
from choreo.store import (
    FENCE, LOG, Claim, ClaimState, DeadLetter, Held, ServiceStore, Tracking, claim_lost, segment_source,
    segments_mismatch,
)
from choreo.stores.postgres import _appended, insert_log

if TYPE_CHECKING:
    from choreo.stores.postgres import PostgresStore

_SCHEMA = """
CREATE TABLE IF NOT EXISTS svc_{name}_events (
    originator_id UUID NOT NULL, originator_version BIGINT NOT NULL, topic TEXT NOT NULL, state BYTEA NOT NULL,
    PRIMARY KEY (originator_id, originator_version));
CREATE TABLE IF NOT EXISTS svc_{name}_tracking (source TEXT PRIMARY KEY, position BIGINT NOT NULL);
CREATE TABLE IF NOT EXISTS svc_{name}_dead_letters (
    id BIGSERIAL PRIMARY KEY,
    position BIGINT NOT NULL, event_id TEXT, saga_id TEXT, type TEXT,
    reason TEXT NOT NULL, error TEXT NOT NULL, attempts INTEGER NOT NULL,
    first_failed_at TIMESTAMPTZ NOT NULL, last_failed_at TIMESTAMPTZ NOT NULL,
    envelope TEXT NOT NULL, status TEXT NOT NULL DEFAULT 'parked', due_at TIMESTAMPTZ);
CREATE INDEX IF NOT EXISTS svc_{name}_dead_letters_status ON svc_{name}_dead_letters (status, due_at);
CREATE TABLE IF NOT EXISTS svc_{name}_handled (event_id TEXT PRIMARY KEY);
CREATE TABLE IF NOT EXISTS svc_{name}_deadlines (
    id TEXT PRIMARY KEY, name TEXT NOT NULL, saga_id TEXT NOT NULL, due_at TIMESTAMPTZ NOT NULL,
    status TEXT NOT NULL, cause_event_id TEXT NOT NULL, cause_type TEXT NOT NULL,
    cause_version INTEGER NOT NULL, cause_payload TEXT NOT NULL);
CREATE INDEX IF NOT EXISTS svc_{name}_deadlines_due ON svc_{name}_deadlines (status, due_at);
CREATE INDEX IF NOT EXISTS svc_{name}_deadlines_saga ON svc_{name}_deadlines (saga_id);
CREATE TABLE IF NOT EXISTS svc_{name}_snapshots (
    originator_id UUID PRIMARY KEY, originator_version BIGINT NOT NULL, topic TEXT NOT NULL, state BYTEA NOT NULL);
CREATE TABLE IF NOT EXISTS svc_{name}_claims (
    segment INTEGER PRIMARY KEY, owner TEXT, token BIGINT NOT NULL, expires_at DOUBLE PRECISION NOT NULL);
CREATE TABLE IF NOT EXISTS svc_{name}_replicas (owner TEXT PRIMARY KEY, expires_at DOUBLE PRECISION NOT NULL)
"""
_TABLES = ("events", "tracking", "dead_letters", "handled", "deadlines", "snapshots")
#: what a store opened read-only must have (snapshots may be missing: nothing was snapshotted)
_REQUIRED = _TABLES[:-1]
#: the server's clock in seconds since the epoch (the clock of the replicas' leases)
_NOW = "extract(epoch FROM clock_timestamp())::double precision"
#: the advisory lock of a service's claims (key 1: "chor" in ASCII; key 2: the service's name hashed)
_CLAIMS_LOCK = "SELECT pg_advisory_xact_lock(1667788658, hashtext(%s))"
_LETTER_COLUMNS = ("id, position, event_id, saga_id, type, reason, error, attempts, first_failed_at, "
                   "last_failed_at, envelope, status, due_at")
_DEADLINE_COLUMNS = "id, name, saga_id, due_at, status, cause_event_id, cause_type, cause_version, cause_payload"


class PostgresServiceStore(ServiceStore):
    """One service's tables; created when the service is first opened by a store that may create."""

    supports_claims = True

    def __init__(self, store: PostgresStore, name: str) -> None:
        self.store = store
        self.name = name
        self._events = f"svc_{name}_events"
        self._tracking = f"svc_{name}_tracking"
        self._dead = f"svc_{name}_dead_letters"
        self._handled = f"svc_{name}_handled"
        self._deadlines = f"svc_{name}_deadlines"
        self._snapshots = f"svc_{name}_snapshots"
        self._has_snapshots = True
        self._claims = f"svc_{name}_claims"
        self._replicas = f"svc_{name}_replicas"
        wanted = [f"svc_{name}_{table}" for table in _TABLES]
        if store.read_only:
            self._has_snapshots = self._snapshots in store.tables([self._snapshots])
            wanted = [f"svc_{name}_{table}" for table in _REQUIRED]
            missing = sorted(set(wanted) - store.tables(wanted))
            if len(missing) == len(wanted):
                raise StoreNotFound(f"no service {name!r} in {store.where}")
            if missing:
                raise StoreNotFound(f"service {name!r} in {store.where} lacks table(s) {', '.join(missing)}")
        else:
            store.ensure_tables(wanted + [self._claims, self._replicas], _SCHEMA.format(name=name))

    # -- replicas ------------------------------------------------------------------------
    def segments(self) -> int | None:
        if self.store.read_only and not self.store.tables([self._claims]):
            return None  # a database written before replicas ran on PostgreSQL
        return self.store._query(f"SELECT COUNT(*) FROM {self._claims}")[0][0] or None

    def claims(self, segments: int) -> ClaimState:
        rows = self._claim_rows()
        if not rows:
            with self.store._write() as cur:
                cur.execute(_CLAIMS_LOCK, (self.name,))
                cur.execute(f"SELECT COUNT(*) FROM {self._claims}")
                if not cur.fetchone()[0]:  # type: ignore[index]  # the layout, each segment tracked from the whole
                    cur.executemany(f"INSERT INTO {self._claims} VALUES (%s, NULL, 0, 0)",
                                    [(s,) for s in range(segments)])
                    cur.execute(f"SELECT source, position FROM {self._tracking} FOR UPDATE")
                    whole = [r for r in cur.fetchall() if "#" not in r[0]] or [(LOG, 0)]
                    cur.executemany(f"INSERT INTO {self._tracking} VALUES (%s, %s)",
                                    [(segment_source(src, s), pos) for src, pos in whole for s in range(segments)])
                    cur.executemany(f"INSERT INTO {self._tracking} VALUES (%s, %s) ON CONFLICT (source) DO UPDATE "
                                    "SET position = EXCLUDED.position", [(src, FENCE) for src, _ in whole])
            rows = self._claim_rows()
        if len(rows) != segments:
            raise segments_mismatch(self.name, len(rows), segments)
        alive = self.store._query(f"SELECT owner FROM {self._replicas} WHERE expires_at >= {_NOW} ORDER BY owner")
        return ClaimState(tuple(Claim(r[0], r[1], r[2], r[3]) for r in rows), tuple(r[0] for r in alive),
                          rows[0][4])

    def _claim_rows(self) -> list[Any]:
        return self.store._query(f"SELECT segment, owner, token, expires_at, {_NOW} FROM {self._claims} "
                                 "ORDER BY segment")

    def _lock_claims(self, cur: psycopg.Cursor[Any]) -> None:
        """Serialise the claims' changes of this service, and lock its claim rows in segment order (no deadlock
        with a commit, which share-locks its segments' rows in that order)."""
        cur.execute(_CLAIMS_LOCK, (self.name,))
        cur.execute(f"SELECT segment FROM {self._claims} ORDER BY segment FOR UPDATE")

    def acquire(self, owner: str, segments: Sequence[int], lease: float, *,
                release: Sequence[int] = (), dead: Sequence[str] = ()) -> dict[int, int]:
        with self.store._write() as cur:
            self._lock_claims(cur)
            if dead:
                cur.execute(f"DELETE FROM {self._replicas} WHERE owner = ANY(%s)", (list(dead),))
            cur.execute(f"INSERT INTO {self._replicas} VALUES (%s, {_NOW} + %s) "
                        "ON CONFLICT (owner) DO UPDATE SET expires_at = EXCLUDED.expires_at", (owner, lease))
            if release:
                cur.execute(f"UPDATE {self._claims} SET owner = NULL, token = token + 1, expires_at = 0 "
                            "WHERE segment = ANY(%s) AND owner = %s", (list(release), owner))
            if segments:
                cur.execute(
                    f"UPDATE {self._claims} SET token = CASE WHEN owner IS NOT DISTINCT FROM %(o)s THEN token "
                    f"ELSE token + 1 END, owner = %(o)s, expires_at = {_NOW} + %(lease)s WHERE segment = ANY(%(s)s) "
                    f"AND (owner IS NULL OR owner = %(o)s OR expires_at < {_NOW} OR owner = ANY(%(dead)s))",
                    {"o": owner, "lease": lease, "s": list(segments), "dead": list(dead)})
            cur.execute(f"SELECT segment, token FROM {self._claims} WHERE owner = %s", (owner,))
            return dict(cur.fetchall())

    def leave(self, owner: str) -> None:
        with self.store._write() as cur:
            self._lock_claims(cur)
            cur.execute(f"DELETE FROM {self._replicas} WHERE owner = %s", (owner,))
            cur.execute(f"UPDATE {self._claims} SET owner = NULL, token = token + 1, expires_at = 0 "
                        "WHERE owner = %s", (owner,))

    def load(self, aggregate_id: UUID) -> list[StoredEvent]:
        rows = self.store._query(
            f"SELECT originator_version, topic, state FROM {self._events} WHERE originator_id = %s "
            "ORDER BY originator_version", (aggregate_id,))
        return [StoredEvent(aggregate_id, r[0], r[1], bytes(r[2])) for r in rows]

    def load_latest(self, aggregate_id: UUID) -> tuple[StoredEvent | None, list[StoredEvent]]:
        rows = self.store._query(
            f"SELECT originator_version, topic, state FROM {self._snapshots} WHERE originator_id = %s",
            (aggregate_id,)) if self._has_snapshots else []
        if not rows:
            return None, self.load(aggregate_id)
        version, topic, state = rows[0]
        events = self.store._query(
            f"SELECT originator_version, topic, state FROM {self._events} WHERE originator_id = %s "
            "AND originator_version > %s ORDER BY originator_version", (aggregate_id, version))
        return (StoredEvent(aggregate_id, version, topic, bytes(state)),
                [StoredEvent(aggregate_id, r[0], r[1], bytes(r[2])) for r in events])

    def load_many(self, aggregate_ids: Iterable[UUID]) -> dict[UUID, list[StoredEvent]]:
        found: dict[UUID, list[StoredEvent]] = {i: [] for i in aggregate_ids}
        if not found:
            return found
        rows = self.store._query(
            f"SELECT originator_id, originator_version, topic, state FROM {self._events} "
            "WHERE originator_id = ANY(%s) ORDER BY originator_id, originator_version", (list(found),))
        for r in rows:
            found[r[0]].append(StoredEvent(r[0], r[1], r[2], bytes(r[3])))
        return found

    def tracking(self) -> Tracking:
        return dict(self.store._query(f"SELECT source, position FROM {self._tracking}"))

    def set_tracking(self, tracking: Mapping[str, int]) -> None:
        with self.store._write() as cur:
            cur.executemany(
                f"INSERT INTO {self._tracking} VALUES (%s, %s) ON CONFLICT (source) "
                "DO UPDATE SET position = EXCLUDED.position", list(tracking.items()))

    def seen(self, event_ids: Sequence[str]) -> set[str]:
        if not self.store.dedupe or not event_ids:
            return set()
        rows = self.store._query(f"SELECT event_id FROM {self._handled} WHERE event_id = ANY(%s)", (list(event_ids),))
        return {r[0] for r in rows}

    def commit(
        self,
        *,
        events: Sequence[StoredEvent],
        emitted: Sequence[Envelope],
        tracking: Mapping[str, int],
        parked: Sequence[DeadLetter] = (),
        handled: Sequence[str] = (),
        updated: Sequence[DeadLetter] = (),
        deadlines: Sequence[Deadline] = (),
        claim: Held | None = None,
        snapshots: Sequence[StoredEvent] = (),
    ) -> None:
        """Write everything in one transaction (see `ServiceStore.commit`); the log's insert is its last step.

        The statements go to the server in one pipeline: one round trip for all of them (their
        results, checked before COMMIT: a tracking that did not move forward, a deadline not
        scheduled), one for the COMMIT.
        """
        store = self.store
        if store.read_only:
            raise StoreError(f"{store.where}: opened read-only (create=False); nothing can be written")
        conn = store._conn()
        head = 0
        try:
            with conn.pipeline() as pipe, conn.transaction():
                cur = conn.cursor()
                if claim is not None:  # first: a replica that lost a segment writes nothing
                    self._check_claim(cur, claim)
                if events:
                    cur.execute(
                        f"INSERT INTO {self._events} "
                        "SELECT * FROM unnest(%s::uuid[], %s::bigint[], %s::text[], %s::bytea[])",
                        ([e.originator_id for e in events], [e.originator_version for e in events],
                         [e.topic for e in events], [e.state for e in events]))
                if snapshots:  # in the events' transaction: a snapshot is never ahead of them
                    cur.executemany(
                        f"INSERT INTO {self._snapshots} AS s VALUES (%s, %s, %s, %s) ON CONFLICT (originator_id) "
                        "DO UPDATE SET originator_version = EXCLUDED.originator_version, topic = EXCLUDED.topic, "
                        "state = EXCLUDED.state WHERE s.originator_version < EXCLUDED.originator_version",
                        [(x.originator_id, x.originator_version, x.topic, x.state) for x in snapshots])
                self._letters_of(cur, parked, updated)
                checks = []
                for status, run in groupby(deadlines, key=lambda t: t.status):  # in order, alike ones together
                    checks += self._deadlines_of(conn, cur, status, list(run))
                if handled and store.dedupe:
                    cur.executemany(f"INSERT INTO {self._handled} VALUES (%s)", [(i,) for i in handled])
                for source, position in (() if claim is not None else tracking.items()):
                    track = conn.cursor()
                    track.execute(
                        f"INSERT INTO {self._tracking} AS t VALUES (%s, %s) ON CONFLICT (source) DO UPDATE SET "
                        "position = EXCLUDED.position WHERE t.position < EXCLUDED.position RETURNING position",
                        (source, position))
                    checks.append((track, f"{self.name} already processed {source} past position {position}", 1))
                if claim is not None:
                    checks += self._track_segments(conn, tracking)
                if emitted:
                    head = insert_log(conn.cursor(), emitted)[-1]  # fetching its positions sends the pipeline
                else:
                    pipe.sync()
                for check, conflict, rows in checks:
                    if len(check.fetchall()) < rows:
                        raise ConcurrencyConflict(conflict)
        except errors.UniqueViolation as e:
            store._unusable(conn)
            if e.diag.table_name == "choreo_log":
                raise self._id_taken(emitted) from None
            if e.diag.table_name == self._events:
                raise ConcurrencyConflict(f"{self.name}: an aggregate version was already recorded "
                                          f"({e.diag.message_detail or e})") from e
            raise store._translate(e) from e
        except psycopg.Error as e:
            store._unusable(conn)
            raise store._translate(e) from e
        except ClaimLost:
            store._unusable(conn)  # rolled back; replaced if the rollback left it unusable
            raise
        finally:
            _appended.head = 0
        store._rung(head)  # wake this process's readers (other processes' are woken by the notification)

    def _check_claim(self, cur: psycopg.Cursor[Any], claim: Held) -> None:
        """Share-lock the claims of the segments `claim` commits for (they cannot change hands until COMMIT) and
        raise `ClaimLost` if `claim.owner` no longer holds one with its token (one round trip, before any write)."""
        cur.execute(f"SELECT segment, owner, token FROM {self._claims} WHERE segment = ANY(%s) ORDER BY segment "
                    "FOR SHARE", (sorted(claim.tokens),))
        held = {r[0]: r[2] for r in cur.fetchall() if r[1] == claim.owner}
        lost = [s for s, token in claim.tokens.items() if held.get(s) != token]
        if lost:
            raise claim_lost(self.name, claim.owner, lost)

    def _track_segments(self, conn: psycopg.Connection[Any],
                        tracking: Mapping[str, int]) -> list[tuple[psycopg.Cursor[Any], str, int]]:
        """Queue a replica's tracking, which moves many segments to one position: one statement per position.

        Each check: the statement returns a row per segment moved, so fewer rows means one was past it."""
        at: dict[int, list[str]] = {}
        for source, position in tracking.items():
            at.setdefault(position, []).append(source)
        checks: list[tuple[psycopg.Cursor[Any], str, int]] = []
        for position, sources in at.items():
            track = conn.cursor()
            track.execute(
                f"INSERT INTO {self._tracking} AS t SELECT unnest(%s::text[]), %s ON CONFLICT (source) DO UPDATE "
                "SET position = EXCLUDED.position WHERE t.position < EXCLUDED.position RETURNING source",
                (sources, position))
            checks.append((track, f"{self.name} already processed a segment of the log past position {position}",
                           len(sources)))
        return checks

    def _id_taken(self, emitted: Sequence[Envelope]) -> EventIdTaken:
        """The error for a commit rolled back because emitted ids were taken: the ids found in the log now."""
        ids = [env.event_id for env in emitted]
        twice = {i for i, n in Counter(ids).items() if n > 1}
        in_log = {r[0] for r in self.store._query("SELECT event_id FROM choreo_log WHERE event_id = ANY(%s)", (ids,))}
        taken = sorted(twice | in_log) or ["(unknown)"]
        return EventIdTaken(f"{self.name}: emitted event id(s) {', '.join(map(repr, taken))} already in the log "
                            "for another event")

    def _letters_of(self, cur: psycopg.Cursor[Any], parked: Sequence[DeadLetter],
                    updated: Sequence[DeadLetter]) -> None:
        if parked:
            cur.executemany(
                f"INSERT INTO {self._dead} (position, event_id, saga_id, type, reason, error, attempts, "
                "first_failed_at, last_failed_at, envelope, status, due_at) "
                "VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s)",
                [(d.position, d.event_id, d.saga_id, d.type, d.reason, d.error, d.attempts, d.first_failed_at,
                  d.last_failed_at, json.dumps(d.envelope), d.status, d.due_at) for d in parked])
        if updated:
            cur.executemany(
                f"UPDATE {self._dead} SET status = %s, reason = %s, error = %s, attempts = %s, last_failed_at = %s, "
                "due_at = %s WHERE id = %s",
                [(d.status, d.reason, d.error, d.attempts, d.last_failed_at, d.due_at, d.id) for d in updated])

    def _deadlines_of(self, conn: psycopg.Connection[Any], cur: psycopg.Cursor[Any], status: str,
                      timers: list[Deadline]) -> list[tuple[psycopg.Cursor[Any], str, int]]:
        """Queue the deadline changes; return the checks (a cursor, the conflict if it returns fewer rows than the
        number given)."""
        table = self._deadlines
        rows = [(t.id, t.name, t.saga_id, t.due_at, t.status, t.cause_event_id, t.cause_type, t.cause_version,
                 t.cause_payload) for t in timers]
        values = "VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s)"
        if status == SCHEDULED:
            cur.executemany(f"INSERT INTO {table} {values} ON CONFLICT (id) DO NOTHING", rows)
        elif status == SAGA_ENDED:  # the saga ended: whatever of it is still scheduled is cancelled
            cur.executemany(f"UPDATE {table} SET status = 'cancelled' WHERE saga_id = %s AND status = 'scheduled'",
                            [(t.saga_id,) for t in timers])
        elif status == RESCHEDULED:
            cur.executemany(f"UPDATE {table} SET due_at = %s WHERE id = %s AND status = 'scheduled'",
                            [(t.due_at, t.id) for t in timers])
        elif status == CANCELLED:
            cur.executemany(f"INSERT INTO {table} AS d {values} ON CONFLICT (id) "
                            "DO UPDATE SET status = 'cancelled' WHERE d.status = 'scheduled'", rows)
        else:
            checks = []
            for t in timers:
                fired = conn.cursor()
                fired.execute(f"UPDATE {table} SET status = %s WHERE id = %s AND status = 'scheduled' RETURNING id",
                              (t.status, t.id))
                checks.append((fired, f"{self.name}: deadline {t.name} of saga {t.saga_id} is not scheduled", 1))
            return checks
        return []

    def due_deadlines(self, now: datetime, limit: int = 100) -> list[Deadline]:
        rows = self.store._query(
            f"SELECT {_DEADLINE_COLUMNS} FROM {self._deadlines} WHERE status = 'scheduled' AND due_at <= %s "
            "ORDER BY due_at, id LIMIT %s", (now, limit))
        return [
            Deadline(id=r[0], service=self.name, name=r[1], saga_id=r[2], due_at=r[3], status=r[4],
                     cause_event_id=r[5], cause_type=r[6], cause_version=r[7], cause_payload=r[8])
            for r in rows
        ]

    def dead_letters(self, status: str | None = "parked") -> list[DeadLetter]:
        if status is None:
            return self._letters("ORDER BY id", ())
        return self._letters("WHERE status = %s ORDER BY id", (status,))

    def due_retries(self, now: datetime, limit: int = 100) -> list[DeadLetter]:
        return self._letters("WHERE status = 'retrying' AND due_at <= %s ORDER BY due_at, id LIMIT %s", (now, limit))

    def _letters(self, where: str, params: tuple[Any, ...]) -> list[DeadLetter]:
        rows = self.store._query(f"SELECT {_LETTER_COLUMNS} FROM {self._dead} {where}", params)
        return [
            DeadLetter(
                id=r[0], position=r[1], event_id=r[2], saga_id=r[3], type=r[4], reason=r[5], error=r[6],
                attempts=r[7], first_failed_at=r[8], last_failed_at=r[9], envelope=json.loads(r[10]), status=r[11],
                service=self.name, due_at=r[12],
            )
            for r in rows
        ]
