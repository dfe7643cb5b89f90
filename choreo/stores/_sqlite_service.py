"""One service's state in the SQLite store: its aggregates, tracking, dead letters, deadlines,
snapshots and replica claims, in tables `svc_<name>_*` of the store's file.

`ServiceStore.commit()` writes all of a batch in one transaction, with the events the
service emitted appended to the log last (guarantee 1). Times are stored as UTC ISO 8601
text, which sorts in time order; a replica's lease is measured on SQLite's clock.
"""

from __future__ import annotations

import json
import sqlite3
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from datetime import datetime, timezone
from itertools import groupby
from typing import TYPE_CHECKING, Any
from uuid import UUID

from eventsourcing.persistence import StoredEvent

from choreo.deadlines import CANCELLED, RESCHEDULED, SAGA_ENDED, SCHEDULED, Deadline
from choreo.errors import ConcurrencyConflict, EventIdTaken
from choreo.events import Envelope
from choreo.store import (
    FENCE, LOG, Claim, ClaimState, DeadLetter, Held, ServiceStore, Tracking, claim_lost, segment_source,
    segments_mismatch,
)

if TYPE_CHECKING:
    from choreo.stores.sqlite import SQLiteStore, _Cursor

_SERVICE_SCHEMA = """
CREATE TABLE IF NOT EXISTS svc_{name}_events (
    originator_id TEXT, originator_version INTEGER, topic TEXT, state BLOB,
    PRIMARY KEY (originator_id, originator_version)) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS svc_{name}_tracking (
    source TEXT PRIMARY KEY, position INTEGER NOT NULL) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS svc_{name}_dead_letters (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    position INTEGER NOT NULL, event_id TEXT, saga_id TEXT, type TEXT,
    reason TEXT NOT NULL, error TEXT NOT NULL, attempts INTEGER NOT NULL,
    first_failed_at TEXT NOT NULL, last_failed_at TEXT NOT NULL,
    envelope TEXT NOT NULL, status TEXT NOT NULL DEFAULT 'parked', due_at TEXT);
CREATE TABLE IF NOT EXISTS svc_{name}_handled (event_id TEXT PRIMARY KEY) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS svc_{name}_deadlines (
    id TEXT PRIMARY KEY, name TEXT NOT NULL, saga_id TEXT NOT NULL, due_at TEXT NOT NULL,
    status TEXT NOT NULL, cause_event_id TEXT NOT NULL, cause_type TEXT NOT NULL,
    cause_version INTEGER NOT NULL, cause_payload TEXT NOT NULL) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS svc_{name}_deadlines_due ON svc_{name}_deadlines (status, due_at);
CREATE INDEX IF NOT EXISTS svc_{name}_deadlines_saga ON svc_{name}_deadlines (saga_id);
CREATE TABLE IF NOT EXISTS svc_{name}_claims (
    segment INTEGER PRIMARY KEY, owner TEXT, token INTEGER NOT NULL, expires_at REAL NOT NULL);
CREATE TABLE IF NOT EXISTS svc_{name}_replicas (owner TEXT PRIMARY KEY, expires_at REAL NOT NULL) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS svc_{name}_snapshots (
    originator_id TEXT PRIMARY KEY, originator_version INTEGER NOT NULL, topic TEXT, state BLOB) WITHOUT ROWID;
"""
#: SQLite's clock in seconds since the epoch (the store's clock of the replicas' leases)
_NOW = "((julianday('now') - 2440587.5) * 86400.0)"
_SERVICE_TABLES = ("events", "tracking", "dead_letters", "handled", "deadlines")
_EPOCH = datetime(1970, 1, 1, tzinfo=timezone.utc)


class _SQLiteServiceStore(ServiceStore):
    supports_claims = True

    def __init__(self, store: SQLiteStore, name: str) -> None:
        self.store = store
        self.name = name
        self._events = f"svc_{name}_events"
        self._tracking = f"svc_{name}_tracking"
        self._dead = f"svc_{name}_dead_letters"
        self._handled = f"svc_{name}_handled"
        self._deadlines = f"svc_{name}_deadlines"
        self._claims = f"svc_{name}_claims"
        self._replicas = f"svc_{name}_replicas"
        self._snapshots = f"svc_{name}_snapshots"

    # -- replicas ------------------------------------------------------------------------
    def segments(self) -> int | None:
        if self.store.read_only and not self.store.tables([self._claims]):
            return None  # a file written before replicas existed
        return self.store._query(f"SELECT COUNT(*) FROM {self._claims}")[0][0] or None

    def claims(self, segments: int) -> ClaimState:
        rows = self._claim_rows()
        if not rows:
            with self.store._write() as c:
                have = c.c.execute(f"SELECT COUNT(*) FROM {self._claims}").fetchone()[0]
                if not have:  # the layout, and each segment's tracking from the whole service's
                    c.c.executemany(f"INSERT INTO {self._claims} VALUES (?, NULL, 0, 0)",
                                    [(s,) for s in range(segments)])
                    whole = [r for r in c.c.execute(f"SELECT source, position FROM {self._tracking}")
                             if "#" not in r[0]] or [(LOG, 0)]
                    c.c.executemany(f"INSERT INTO {self._tracking} VALUES (?, ?)",
                                    [(segment_source(src, s), pos) for src, pos in whole for s in range(segments)])
                    c.c.executemany(f"INSERT INTO {self._tracking} VALUES (?, ?) ON CONFLICT (source) DO UPDATE "
                                    "SET position = excluded.position", [(src, FENCE) for src, _ in whole])
            rows = self._claim_rows()
        if len(rows) != segments:
            raise segments_mismatch(self.name, len(rows), segments)
        alive = self.store._query(f"SELECT owner FROM {self._replicas} WHERE expires_at >= {_NOW} ORDER BY owner")
        return ClaimState(tuple(Claim(r[0], r[1], r[2], r[3]) for r in rows), tuple(r[0] for r in alive),
                          rows[0][4])

    def _claim_rows(self) -> list[Any]:
        return self.store._query(f"SELECT segment, owner, token, expires_at, {_NOW} FROM {self._claims} "
                                 "ORDER BY segment")

    def acquire(self, owner: str, segments: Sequence[int], lease: float, *,
                release: Sequence[int] = (), dead: Sequence[str] = ()) -> dict[int, int]:
        with self.store._write() as c:
            if dead:
                c.c.executemany(f"DELETE FROM {self._replicas} WHERE owner = ?", [(o,) for o in dead])
            c.c.execute(f"INSERT INTO {self._replicas} VALUES (?, {_NOW} + ?) "
                        "ON CONFLICT (owner) DO UPDATE SET expires_at = excluded.expires_at", (owner, lease))
            c.c.executemany(f"UPDATE {self._claims} SET owner = NULL, token = token + 1, expires_at = 0 "
                            "WHERE segment = ? AND owner = ?", [(s, owner) for s in release])
            c.c.executemany(
                f"UPDATE {self._claims} SET token = CASE WHEN owner IS ?1 THEN token ELSE token + 1 END, "
                f"owner = ?1, expires_at = {_NOW} + ?2 WHERE segment = ?3 AND (owner IS NULL OR owner = ?1 "
                f"OR expires_at < {_NOW} OR owner IN (SELECT value FROM json_each(?4)))",
                [(owner, lease, s, json.dumps(list(dead))) for s in segments],
            )
            return dict(c.c.execute(f"SELECT segment, token FROM {self._claims} WHERE owner = ?", (owner,)))

    def leave(self, owner: str) -> None:
        with self.store._write() as c:
            c.c.execute(f"DELETE FROM {self._replicas} WHERE owner = ?", (owner,))
            c.c.execute(f"UPDATE {self._claims} SET owner = NULL, token = token + 1, expires_at = 0 "
                        "WHERE owner = ?", (owner,))

    def load(self, aggregate_id: UUID) -> list[StoredEvent]:
        rows = self.store._query(
            f"SELECT originator_id, originator_version, topic, state FROM {self._events} "
            "WHERE originator_id = ? ORDER BY originator_version",
            (aggregate_id.hex,),
        )
        return [StoredEvent(UUID(r[0]), r[1], r[2], r[3]) for r in rows]

    def load_latest(self, aggregate_id: UUID) -> tuple[StoredEvent | None, list[StoredEvent]]:
        try:
            rows = self.store._query(
                f"SELECT originator_version, topic, state FROM {self._snapshots} WHERE originator_id = ?",
                (aggregate_id.hex,),
            )
        except sqlite3.OperationalError as e:  # a read-only store written before snapshots
            if "no such table" not in str(e):
                raise
            rows = []
        if not rows:
            return None, self.load(aggregate_id)
        version, topic, state = rows[0]
        events = self.store._query(
            f"SELECT originator_id, originator_version, topic, state FROM {self._events} "
            "WHERE originator_id = ? AND originator_version > ? ORDER BY originator_version",
            (aggregate_id.hex, version),
        )
        return (StoredEvent(aggregate_id, version, topic, state),
                [StoredEvent(UUID(r[0]), r[1], r[2], r[3]) for r in events])

    def load_many(self, aggregate_ids: Iterable[UUID]) -> dict[UUID, list[StoredEvent]]:
        found: dict[UUID, list[StoredEvent]] = {i: [] for i in aggregate_ids}
        ids = [i.hex for i in found]
        for start in range(0, len(ids), 500):
            chunk = ids[start : start + 500]
            rows = self.store._query(
                f"SELECT originator_id, originator_version, topic, state FROM {self._events} "
                f"WHERE originator_id IN ({','.join('?' * len(chunk))}) ORDER BY originator_id, originator_version",
                chunk,
            )
            for r in rows:
                agg_id = UUID(r[0])
                found[agg_id].append(StoredEvent(agg_id, r[1], r[2], r[3]))
        return found

    def tracking(self) -> Tracking:
        return self.store._tracked(self._tracking)

    def set_tracking(self, tracking: Mapping[str, int]) -> None:
        with self.store._write() as c:
            c.c.executemany(
                f"INSERT INTO {self._tracking} VALUES (?, ?) ON CONFLICT (source) DO UPDATE SET position = excluded.position",
                list(tracking.items()),
            )

    def seen(self, event_ids: Sequence[str]) -> set[str]:
        if not self.store.dedupe or not event_ids:
            return set()
        marks = ",".join("?" * len(event_ids))
        rows = self.store._query(f"SELECT event_id FROM {self._handled} WHERE event_id IN ({marks})", event_ids)
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
        try:
            self._commit(events, emitted, tracking, parked, handled, updated, deadlines, claim, snapshots)
        except _IdTaken:  # rolled back: the ids found in the log now are those taken before
            ids = [env.event_id for env in emitted]
            twice = {i for i, n in Counter(ids).items() if n > 1}
            taken = sorted(twice | self._in_log(ids)) or ["(unknown)"]
            raise EventIdTaken(
                f"{self.name}: emitted event id(s) {', '.join(map(repr, taken))} already in the log "
                "for another event"
            ) from None

    def _in_log(self, event_ids: Sequence[str]) -> set[str]:
        found: set[str] = set()
        for start in range(0, len(event_ids), 500):
            chunk = event_ids[start : start + 500]
            marks = ",".join("?" * len(chunk))
            found.update(r[0] for r in self.store._query(
                f"SELECT event_id FROM choreo_log WHERE event_id IN ({marks})", chunk))
        return found

    def _commit(
        self,
        events: Sequence[StoredEvent],
        emitted: Sequence[Envelope],
        tracking: Mapping[str, int],
        parked: Sequence[DeadLetter],
        handled: Sequence[str],
        updated: Sequence[DeadLetter],
        deadlines: Sequence[Deadline],
        claim: Held | None = None,
        snapshots: Sequence[StoredEvent] = (),
    ) -> None:
        with self.store._write() as c:
            if claim is not None:  # first: a replica that lost a segment writes nothing
                held = dict(c.c.execute(f"SELECT segment, token FROM {self._claims} WHERE owner = ?", (claim.owner,)))
                lost = [s for s, token in claim.tokens.items() if held.get(s) != token]
                if lost:
                    raise claim_lost(self.name, claim.owner, lost)
            if events:
                c.c.executemany(
                    f"INSERT INTO {self._events} VALUES (?,?,?,?)",
                    [
                        (e.originator_id.hex, e.originator_version, e.topic, e.state)  # type: ignore[union-attr]
                        for e in events
                    ],
                )
            if snapshots:  # in the events' transaction: a snapshot is never ahead of them
                c.c.executemany(
                    f"INSERT INTO {self._snapshots} VALUES (?,?,?,?) ON CONFLICT (originator_id) DO UPDATE SET "
                    "originator_version = excluded.originator_version, topic = excluded.topic, "
                    "state = excluded.state WHERE excluded.originator_version > originator_version",
                    [(s.originator_id.hex, s.originator_version, s.topic, s.state)  # type: ignore[union-attr]
                     for s in snapshots],
                )
            if emitted:
                try:
                    c.insert_log(emitted)
                except sqlite3.IntegrityError as e:
                    if "choreo_log.event_id" in str(e):
                        raise _IdTaken from e
                    raise
            for d in parked:
                c.c.execute(
                    f"INSERT INTO {self._dead} (position, event_id, saga_id, type, reason, error, "
                    "attempts, first_failed_at, last_failed_at, envelope, status, due_at) "
                    "VALUES (?,?,?,?,?,?,?,?,?,?,?,?)",
                    (
                        d.position, d.event_id, d.saga_id, d.type, d.reason, d.error, d.attempts,
                        d.first_failed_at.isoformat(), d.last_failed_at.isoformat(),
                        json.dumps(d.envelope), d.status, _utc(d.due_at),
                    ),
                )
            for d in updated:
                c.c.execute(
                    f"UPDATE {self._dead} SET status = ?, reason = ?, error = ?, attempts = ?, "
                    "last_failed_at = ?, due_at = ? WHERE id = ?",
                    (d.status, d.reason, d.error, d.attempts, d.last_failed_at.isoformat(), _utc(d.due_at), d.id),
                )
            for status, run in groupby(deadlines, key=lambda t: t.status):  # in order, alike ones together
                self._deadlines_of(c, status, list(run))
            if handled and self.store.dedupe:
                c.c.executemany(f"INSERT INTO {self._handled} VALUES (?)", [(i,) for i in handled])
            if claim is not None:
                c.track_segments(self._tracking, tracking, self.name)
            else:
                c.track(self._tracking, tracking, self.name)

    def _deadlines_of(self, c: _Cursor, status: str, timers: list[Deadline]) -> None:
        rows = [(t.id, t.name, t.saga_id, t.due_at.astimezone(timezone.utc).isoformat(), t.status, t.cause_event_id,
                 t.cause_type, t.cause_version, t.cause_payload) for t in timers]
        if status == SCHEDULED:
            c.c.executemany(f"INSERT OR IGNORE INTO {self._deadlines} VALUES (?,?,?,?,?,?,?,?,?)", rows)
        elif status == SAGA_ENDED:  # the saga ended: whatever of it is still scheduled is cancelled
            c.c.executemany(f"UPDATE {self._deadlines} SET status = 'cancelled' WHERE saga_id = ? "
                            "AND status = 'scheduled'", [(t.saga_id,) for t in timers])
        elif status == RESCHEDULED:
            c.c.executemany(f"UPDATE {self._deadlines} SET due_at = ? WHERE id = ? AND status = 'scheduled'",
                            [(t.due_at.astimezone(timezone.utc).isoformat(), t.id) for t in timers])
        elif status == CANCELLED:
            c.c.executemany(
                f"INSERT INTO {self._deadlines} VALUES (?,?,?,?,?,?,?,?,?) ON CONFLICT (id) "
                f"DO UPDATE SET status = 'cancelled' WHERE {self._deadlines}.status = 'scheduled'", rows,
            )
        else:
            for t in timers:
                c.c.execute(
                    f"UPDATE {self._deadlines} SET status = ? WHERE id = ? AND status = 'scheduled'", (t.status, t.id)
                )
                if c.c.rowcount != 1:
                    raise ConcurrencyConflict(f"{self.name}: deadline {t.name} of saga {t.saga_id} is not scheduled")

    def due_deadlines(self, now: datetime, limit: int = 100) -> list[Deadline]:
        rows = self.store._query(
            f"SELECT id, name, saga_id, due_at, status, cause_event_id, cause_type, cause_version, "
            f"cause_payload FROM {self._deadlines} WHERE status = 'scheduled' AND due_at <= ? "
            "ORDER BY due_at, id LIMIT ?",
            (now.astimezone(timezone.utc).isoformat(), limit),
        )
        return [
            Deadline(id=r[0], service=self.name, name=r[1], saga_id=r[2], due_at=_time(r[3]), status=r[4],
                     cause_event_id=r[5], cause_type=r[6], cause_version=r[7], cause_payload=r[8])
            for r in rows
        ]

    def dead_letters(self, status: str | None = "parked") -> list[DeadLetter]:
        if status is None:
            return self._letters("", ())
        return self._letters("WHERE status = ?", (status,))

    def due_retries(self, now: datetime, limit: int = 100) -> list[DeadLetter]:
        return self._letters("WHERE status = 'retrying' AND due_at <= ? ORDER BY due_at, id LIMIT ?",
                             (_utc(now), limit))

    def _letters(self, where: str, params: tuple[Any, ...]) -> list[DeadLetter]:
        order = "" if "ORDER BY" in where else " ORDER BY id"
        rows = self.store._query(
            "SELECT id, position, event_id, saga_id, type, reason, error, attempts, first_failed_at, "
            f"last_failed_at, envelope, status, due_at FROM {self._dead} {where}{order}", params,
        )
        return [
            DeadLetter(
                id=r[0], position=r[1], event_id=r[2], saga_id=r[3], type=r[4], reason=r[5],
                error=r[6], attempts=r[7], first_failed_at=_time(r[8]),
                last_failed_at=_time(r[9]), envelope=json.loads(r[10]), status=r[11],
                service=self.name, due_at=_time(r[12]) if r[12] else None,
            )
            for r in rows
        ]


class _IdTaken(Exception):
    """An emitted event's id is already in the log (raised inside a transaction, which rolls back)."""


def _utc(when: datetime | None) -> str | None:
    """A time as UTC ISO 8601 text, which sorts in time order (None stays None)."""
    return when.astimezone(timezone.utc).isoformat() if when is not None else None


def _time(text: str | None) -> datetime:
    try:
        return datetime.fromisoformat(text) if text else _EPOCH
    except (TypeError, ValueError):
        return _EPOCH
