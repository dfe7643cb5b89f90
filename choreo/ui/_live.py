"""What the console shows, read from the store without ever writing to it.

The saga projection stored in the store (kept by `choreo project`, a demo or a query) is
the base; the console folds the events of the log that came after it in memory, with the
projection's own rule (`choreo._saga_fold.apply`), so its pages are up to date while
nothing is written. A stored projection built with other saga definitions, or by another
version of the fold, is not used: the console then folds the whole log in memory. The
same read of the log indexes each saga's business keys (the text fields of its start
event) and which service emitted which event type (for the system graph).
"""

from __future__ import annotations

import threading
from collections.abc import Iterator, Mapping, Sequence
from datetime import timedelta
from typing import Any
from uuid import uuid4

import orjson

from choreo._dlq_cli import dead_letters_of
from choreo._saga_fold import Catalog, apply, entry_of, new_saga
from choreo.projection import SagaProjection, stored_timeline
from choreo.store import DeadLetter, DocumentStore, EventStore, Tracking
from choreo.system import System

#: Log rows read per refresh at most (a page never waits for a whole huge backlog).
REFRESH_ROWS = 200_000


class _Overlay(DocumentStore):
    """The stored documents with the console's in-memory fold on top; it refuses every write."""

    def __init__(self, stored: DocumentStore | None) -> None:
        self.stored = stored
        self.docs: dict[str, dict[str, Any]] = {}
        self.timelines: dict[str, list[Any]] = {}

    def get(self, key: str) -> dict[str, Any] | None:
        if key in self.docs:
            return self.docs[key]
        return self.stored.get(key) if self.stored is not None else None

    def entries(self, key: str) -> list[Any]:
        if key in self.timelines:
            return self.timelines[key]
        return stored_timeline(self.stored, key) if self.stored is not None else []

    def scan(self) -> Iterator[dict[str, Any]]:
        if self.stored is not None:
            for doc in self.stored.scan():
                if doc.get("saga_id") not in self.docs:
                    yield doc
        yield from self.docs.values()

    def tracking(self) -> Tracking:
        return self.stored.tracking() if self.stored is not None else {}

    def meta(self) -> dict[str, Any]:
        return self.stored.meta() if self.stored is not None else {}

    def put(self, docs: Mapping[str, dict[str, Any] | bytes], **_: Any) -> None:
        raise PermissionError("the console never writes the store")

    def clear(self, meta: Mapping[str, Any] | None = None) -> None:
        raise PermissionError("the console never writes the store")

    def fold(self, rows: Sequence[tuple[Any, ...]], catalog: Catalog) -> None:
        """Fold log rows into the in-memory documents (what `SagaProjection.update()` would store)."""
        for row in rows:
            if not row[4]:
                continue  # events without a saga id: counted by the stored projection only
            saga_id = str(row[4])
            saga = self.docs.get(saga_id)
            if saga is None:
                stored = self.stored.get(saga_id) if self.stored is not None else None
                saga = self.docs[saga_id] = stored if stored is not None else new_saga(saga_id)
                self.timelines[saga_id] = stored_timeline(self.stored, saga_id, stored) \
                    if stored is not None and self.stored is not None else []
            entry = entry_of(row)
            if apply(saga, entry, catalog):
                self.timelines[saga_id].append(entry)


class Console:
    """The console's read-only view of one store: sagas, dead letters, business keys, who emits what.

    Every method is safe to call from several threads (one lock); `refresh()` reads what the
    log gained since the last call.
    """

    def __init__(self, store: EventStore, system: System, *, stuck_after: timedelta | None = timedelta(minutes=5)):
        if not store.read_only:
            raise ValueError("the console reads a store opened read-only: open_store(url, create=False)")
        self.store = store
        self.system = system
        self.lock = threading.RLock()
        self.projection = SagaProjection(store, sagas=system.sagas, stuck_after=stuck_after, read_only=True)
        #: why the stored projection is not used (the console folds the whole log then), or None
        self.stale = self.projection.outdated()
        base = self.projection.documents if self.stale is None else None
        self.overlay = _Overlay(base)
        self.projection.documents = self.overlay
        #: where the stored projection stands: the log's events after it are folded in memory
        self._base: Tracking = dict(base.tracking()) if base is not None else {}
        # one reader of the whole log, from its start: it indexes every event and folds those after `_base`
        self._feed = store.feed(f"console-{uuid4()}", dict, group=False)
        #: saga id -> the text fields of its start event (order_id, customer_id, ...)
        self.keys: dict[str, dict[str, str]] = {}
        #: (service, event type) -> how many such events the log holds
        self.emitted: dict[tuple[str, str], int] = {}
        #: the last position read (of a log with one order; for Kafka the sum of the sources' positions)
        self.head: Tracking = {}

    def refresh(self) -> int:
        """Read what the log gained (up to `REFRESH_ROWS` rows); return how many rows were read."""
        with self.lock:
            read = 0
            while read < REFRESH_ROWS and (rows := self._feed.poll_rows(5000, self.store.idle_timeout if not read else 0)):
                self._index(rows)
                base = self._base
                self.overlay.fold([r for r in rows if r[0] > base.get(r[11], 0)] if base else rows,
                                  self.projection.catalog)
                read += len(rows)
            return read

    def _index(self, rows: Sequence[tuple[Any, ...]]) -> None:
        starts = self.projection.catalog.by_start
        for row in rows:
            kind, saga_id, causation, service = row[2], row[4], row[5], row[6]
            key = (str(service), str(kind))
            self.emitted[key] = self.emitted.get(key, 0) + 1
            self.head[str(row[11])] = row[0] or 0
            if causation is None and saga_id and kind in starts and saga_id not in self.keys:
                try:
                    payload = orjson.loads(row[10])
                except (TypeError, ValueError):
                    continue
                if isinstance(payload, dict):
                    self.keys[str(saga_id)] = {k: v for k, v in payload.items() if isinstance(v, str)}

    def position(self) -> int:
        """How far the console has read the log (the sum of the positions of its sources)."""
        with self.lock:
            return sum(self.head.values())

    # -- sagas ---------------------------------------------------------------------------------
    def business_key(self, saga_id: str) -> str | None:
        """The saga's business key as `name=value`: the first `*_id` text field of its start event."""
        keys = self.keys.get(saga_id, {})
        name = next((k for k in keys if k.endswith("_id")), next(iter(keys), None))
        return f"{name}={keys[name]}" if name else None

    def search(self, text: str) -> set[str]:
        """Saga ids that start with `text`, or whose start event has a text field containing it."""
        with self.lock:
            found = {s for s in self.keys if s.startswith(text)}
            found |= {s for s, keys in self.keys.items() if any(text in v for v in keys.values())}
            return found

    def dead_letters(self, status: str | None = "parked", saga_id: str | None = None) -> list[DeadLetter]:
        """The dead letters of every service of the system (a service that never ran has none)."""
        with self.lock:
            return dead_letters_of(self.store, sorted(self.system.services), status, saga_id)

    def close(self) -> None:
        """Leave the log."""
        with self.lock:
            self._feed.close()
            self.store.close()
