"""The in-memory store: the log and every service's state in dicts, for unit tests.

It meets the same contract as the SQLite and Kafka stores (tests/store_contract.py),
including the read models' compare-and-set. `open_store("memory://", create=False)`
gives a new, empty store like any other memory store.
"""

from __future__ import annotations

import json
import threading
import time
from collections import Counter
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import replace
from datetime import datetime
from typing import Any
from uuid import UUID

from eventsourcing.persistence import StoredEvent

from choreo.deadlines import CANCELLED, RESCHEDULED, SAGA_ENDED, SCHEDULED, Deadline
from choreo.errors import ConcurrencyConflict, EventIdTaken
from choreo.events import Envelope
from choreo.store import (
    Claim, ClaimState, DeadLetter, DocumentStore, Held, Interest, LogStore, ServiceStore, Tracking, check_service_name,
    FENCE, LOG, check_unchanged, claim_lost, segment_source, segments_mismatch,
)


class InMemoryStore(LogStore):
    """A store held in memory, for unit tests; it behaves like the SQLite store."""

    def __init__(self) -> None:
        self.url = "memory://"
        self._log: list[Envelope] = []
        self._event_ids: set[str] = set()
        self._services: dict[str, _InMemoryServiceStore] = {}
        self._documents: dict[str, _InMemoryDocumentStore] = {}
        self._changed = threading.Condition()

    def append(self, envelopes: Sequence[Envelope]) -> list[int]:
        with self._changed:
            return self._append(envelopes)

    def _append(self, envelopes: Sequence[Envelope]) -> list[int]:
        ids = [e.event_id for e in envelopes]
        if len(set(ids)) != len(ids) or self._event_ids.intersection(ids):
            raise ConcurrencyConflict("event id already in the log")
        positions = []
        for env in envelopes:
            self._log.append(env.at(len(self._log) + 1))
            self._event_ids.add(env.event_id)
            positions.append(len(self._log))
        self._changed.notify_all()
        return positions

    def read(self, after: int, limit: int = 500, *, upto: int | None = None,
             interest: Interest | None = None) -> list[Envelope]:
        with self._changed:
            window = self._log[after:upto]
        if interest is not None:
            window = [e for e in window if interest.wants(e)]
        return window[:limit]

    def last_position(self) -> int:
        return len(self._log)

    def wait(self, after: int, timeout: float) -> bool:
        with self._changed:
            return self._changed.wait_for(lambda: len(self._log) > after, timeout)

    def service(self, name: str) -> ServiceStore:
        check_service_name(name)
        with self._changed:
            if name not in self._services:
                self._services[name] = _InMemoryServiceStore(self, name)
            return self._services[name]

    def documents(self, name: str) -> DocumentStore:
        check_service_name(name)
        return self._documents.setdefault(name, _InMemoryDocumentStore())


def forward(have: Tracking, to: Mapping[str, int], owner: str) -> Tracking:
    """Return `have` moved to `to`; raise `ConcurrencyConflict` unless every source moves forward."""
    for source, position in to.items():
        if position <= have.get(source, 0):
            raise ConcurrencyConflict(f"{owner} already processed {source} past position {position}")
    return {**have, **to}


class _InMemoryDocumentStore(DocumentStore):
    def __init__(self) -> None:
        self._docs: dict[str, str] = {}
        self._entries: dict[str, list[str]] = {}
        self._tracking: Tracking = {}
        self._meta: dict[str, str] = {}
        self._lock = threading.Lock()

    def get(self, key: str) -> dict[str, Any] | None:
        text = self._docs.get(key)
        return None if text is None else json.loads(text)

    def put(
        self,
        docs: Mapping[str, dict[str, Any] | bytes],
        *,
        tracking: Mapping[str, int],
        appended: Mapping[str, Sequence[Any]] | None = None,
        expected: Mapping[str, int] | None = None,
        expected_meta: Mapping[str, Any] | None = None,
    ) -> None:
        with self._lock:
            check_unchanged("read model", expected, lambda: self._tracking, expected_meta, self.meta)
            self._tracking = forward(self._tracking, tracking, "read model")
            self._docs.update({k: v.decode() if isinstance(v, bytes) else json.dumps(v) for k, v in docs.items()})
            for key, entries in (appended or {}).items():
                self._entries.setdefault(key, []).extend(json.dumps(e) for e in entries)

    def entries(self, key: str) -> list[Any]:
        return [json.loads(e) for e in self._entries.get(key, ())]

    def scan(self) -> Iterator[dict[str, Any]]:
        for text in list(self._docs.values()):
            yield json.loads(text)

    def tracking(self) -> Tracking:
        return dict(self._tracking)

    def meta(self) -> dict[str, Any]:
        return {k: json.loads(v) for k, v in self._meta.items()}

    def clear(self, meta: Mapping[str, Any] | None = None) -> None:
        with self._lock:
            self._docs.clear()
            self._entries.clear()
            self._tracking = {}
            self._meta = {k: json.dumps(v) for k, v in (meta or {}).items()}


class _InMemoryServiceStore(ServiceStore):
    supports_claims = True

    def __init__(self, store: InMemoryStore, name: str) -> None:
        self.store = store
        self.name = name
        self._events: dict[UUID, list[StoredEvent]] = {}
        self._tracking: Tracking = {}
        self._deadlines: dict[str, Deadline] = {}
        self._dead: list[DeadLetter] = []
        self._claims: dict[int, Claim] = {}  # by segment; empty: the service is not split
        self._alive: dict[str, float] = {}  # replicas' heartbeats: when each expires
        self._snapshots: dict[UUID, StoredEvent] = {}

    # -- replicas (the store's clock is this process's monotonic clock) ----------------------
    def segments(self) -> int | None:
        return len(self._claims) or None

    def claims(self, segments: int) -> ClaimState:
        with self.store._changed:
            if not self._claims:
                self._claims = {s: Claim(s, None, 0, 0.0) for s in range(segments)}
                whole = {k: v for k, v in self._tracking.items() if "#" not in k} or {LOG: 0}
                for source, position in whole.items():
                    self._tracking.update({segment_source(source, s): position for s in range(segments)})
                    self._tracking[source] = FENCE
            elif len(self._claims) != segments:
                raise segments_mismatch(self.name, len(self._claims), segments)
            now = time.monotonic()
            alive = tuple(sorted(o for o, t in self._alive.items() if t >= now))
            return ClaimState(tuple(self._claims.values()), alive, now)

    def acquire(self, owner: str, segments: Sequence[int], lease: float, *,
                release: Sequence[int] = (), dead: Sequence[str] = ()) -> dict[int, int]:
        with self.store._changed:
            now = time.monotonic()
            for o in dead:
                self._alive.pop(o, None)
            self._alive[owner] = now + lease
            for s in release:
                c = self._claims.get(s)
                if c is not None and c.owner == owner:
                    self._claims[s] = Claim(s, None, c.token + 1, 0.0)
            for s in segments:
                c = self._claims.get(s)
                if c is None:
                    continue
                if c.owner == owner:
                    self._claims[s] = replace(c, expires_at=now + lease)
                elif c.owner is None or c.expires_at < now or c.owner in dead:
                    self._claims[s] = Claim(s, owner, c.token + 1, now + lease)
            return {s: c.token for s, c in self._claims.items() if c.owner == owner}

    def leave(self, owner: str) -> None:
        with self.store._changed:
            self._alive.pop(owner, None)
            for s, c in self._claims.items():
                if c.owner == owner:
                    self._claims[s] = Claim(s, None, c.token + 1, 0.0)

    def _check(self, claim: Held) -> None:
        lost = sorted(s for s, token in claim.tokens.items()
                      if (c := self._claims.get(s)) is None or c.owner != claim.owner or c.token != token)
        if lost:
            raise claim_lost(self.name, claim.owner, lost)

    def load(self, aggregate_id: UUID) -> list[StoredEvent]:
        with self.store._changed:
            return list(self._events.get(aggregate_id, ()))

    def load_latest(self, aggregate_id: UUID) -> tuple[StoredEvent | None, list[StoredEvent]]:
        with self.store._changed:
            snapshot = self._snapshots.get(aggregate_id)
            after = snapshot.originator_version if snapshot is not None else 0
            return snapshot, [e for e in self._events.get(aggregate_id, ()) if e.originator_version > after]

    def tracking(self) -> Tracking:
        return dict(self._tracking)

    def set_tracking(self, tracking: Mapping[str, int]) -> None:
        with self.store._changed:
            self._tracking = {**self._tracking, **tracking}

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
        with self.store._changed:
            if claim is not None:
                self._check(claim)
            reached = forward(self._tracking, tracking, self.name)
            timers = merge_deadlines(self._deadlines, deadlines, self.name)
            latest: dict[UUID, int] = {}
            for e in events:
                agg_id = e.originator_id
                assert isinstance(agg_id, UUID)
                have = self._events.get(agg_id, [])
                last = latest.get(agg_id, have[-1].originator_version if have else 0)
                if e.originator_version != last + 1:
                    raise ConcurrencyConflict(
                        f"{self.name}: aggregate {e.originator_id} version "
                        f"{e.originator_version} already recorded"
                    )
                latest[agg_id] = e.originator_version
            ids = [env.event_id for env in emitted]
            taken = {i for i, n in Counter(ids).items() if n > 1} | self.store._event_ids.intersection(ids)
            if taken:
                raise EventIdTaken(
                    f"{self.name}: emitted event id(s) {', '.join(map(repr, sorted(taken)))} already in the log "
                    "for another event"
                )
            for e in events:
                self._events.setdefault(e.originator_id, []).append(e)  # type: ignore[arg-type]
            for s in snapshots:
                known = self._snapshots.get(s.originator_id)  # type: ignore[arg-type]
                if known is None or s.originator_version > known.originator_version:
                    self._snapshots[s.originator_id] = s  # type: ignore[index]
            for i, d in enumerate(parked, start=len(self._dead) + 1):
                self._dead.append(_with_id(d, i))
            for d in updated:
                assert d.id is not None
                self._dead[d.id - 1] = d
            self._deadlines = timers
            self._tracking = reached
            if emitted:
                self.store._append(emitted)
            else:
                self.store._changed.notify_all()

    def dead_letters(self, status: str | None = "parked") -> list[DeadLetter]:
        return [d for d in self._dead if status is None or d.status == status]

    def due_deadlines(self, now: datetime, limit: int = 100) -> list[Deadline]:
        with self.store._changed:
            due = [d for d in self._deadlines.values() if d.status == SCHEDULED and d.due_at <= now]
        return sorted(due, key=lambda d: (d.due_at, d.id))[:limit]


def merge_deadlines(have: dict[str, Deadline], changes: Sequence[Deadline], owner: str) -> dict[str, Deadline]:
    """Return `have` with `changes` applied by the rules of `ServiceStore.commit()`."""
    out = dict(have)
    for d in changes:
        old = out.get(d.id)
        if d.status == SAGA_ENDED:
            for key, t in out.items():
                if t.saga_id == d.saga_id and t.status == SCHEDULED:
                    out[key] = replace(t, status=CANCELLED)
        elif d.status == RESCHEDULED:
            if old is not None and old.status == SCHEDULED:
                out[d.id] = replace(old, due_at=d.due_at)
        elif d.status == SCHEDULED:
            out.setdefault(d.id, d)
        elif d.status == CANCELLED:
            if old is None or old.status == SCHEDULED:
                out[d.id] = d
        elif old is None or old.status != SCHEDULED:
            raise ConcurrencyConflict(f"{owner}: deadline {d.name} of saga {d.saga_id} is not scheduled")
        else:
            out[d.id] = d
    return out


def _with_id(d: DeadLetter, i: int) -> DeadLetter:
    return replace(d, id=i)
