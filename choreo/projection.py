"""The saga projection: every saga's state, steps and timeline, built from the log alone.

The projection never reads a service's state. It folds each event of the log
into a per-saga document (state, steps, cause) and appends the event's timeline
entry to the saga's journal; documents, journal entries and its own tracking
position are committed together, so it processes each event exactly once and
resumes after a restart. A batch writes each touched document once and each
entry once (a saga's timeline is never rewritten). Where the documents are stored
beside the log (`DocumentStore.beside_log`: SQLite), a timeline is not copied: it is
read back from the log by saga id, keeping the events the saga's document has folded
(only an event whose saga id is not text, which the index cannot find, is copied).
`replay()` rebuilds from position 0 and gives exactly what incremental updates give:
both use `apply()`.

Several writers may update one projection at once (every `choreo sagas list` is
one): a batch commits only if the stored tracking, and the generation that every
rebuild stores anew in the read model's metadata, are still the ones it started
from, else it is discarded and read again (a rebuild moves the tracking back through
the same positions, so the tracking alone could match a batch folded before it).
What is stored never depends on which event classes the process loaded; it depends
on the saga definitions, so their fingerprint is stored with the projection, and a
writer with other definitions rebuilds it from position 0. A read-only projection
(`read_only=True`) never writes: it answers from what is stored.
"""

from __future__ import annotations

import gc
import heapq
import json
import logging
import uuid
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from functools import partial
from datetime import datetime, timedelta
from typing import Any

import orjson

from choreo import _parallel_replay, clock
from choreo._saga_fold import (
    Catalog, DOCUMENTS, FOLD_VERSION, GENERATION, NO_SAGA, NO_SAGA_COUNT, _AT, _FRESH_KEYS, _HIDDEN, _ID,
    _POSITION, _SEEN, apply, as_dict, effective_state, entry_of, new_saga, parse_time, text_of,
)
from choreo.errors import ConcurrencyConflict, StoreError
from choreo.events import is_known_type
from choreo.saga import SagaDefinition
from choreo import upcasting
from choreo.store import DocumentStore, EventStore, Feed, Row, Tracking, advance_rows
from choreo.upcasting import check_upcasters, upcasting_feed

log = logging.getLogger("choreo.projection")

@dataclass(frozen=True)
class SagaFilter:
    """Which sagas `SagaProjection.list()` returns."""

    state: str | None = None
    saga_type: str | None = None
    started_after: datetime | None = None
    started_before: datetime | None = None
    stuck_for: timedelta | None = None


class SagaProjection:
    """The read model of every saga, kept up to date from the log, queryable.

    `read_only=True` (the default on a store opened with `create=False`) never writes:
    `get()`, `list()` and `counts()` answer from what is stored, and `update()` and
    `replay()` raise `StoreError`.
    """

    def __init__(
        self,
        store: EventStore,
        *,
        sagas: Iterable[SagaDefinition] = (),
        stuck_after: timedelta | None = timedelta(minutes=5),
        batch_size: int = 10_000,
        read_only: bool | None = None,
        workers: int = 1,
    ) -> None:
        self.store = store
        self.catalog = Catalog.of(sagas)
        self.stuck_after = stuck_after
        self.batch_size = batch_size
        self.workers = workers  # processes that fold a rebuild (`replay()`) at once
        self.read_only = store.read_only if read_only is None else read_only
        self.documents = store.documents(DOCUMENTS)
        self._beside_log = self.documents.beside_log  # timelines are read from the log, not copied
        self._cache: dict[str, dict[str, Any]] = {}  # the last committed batch's documents, as stored
        # the keys written since the projection was empty (None: unknown); any other key is not stored
        self._fresh: set[str] | None = None
        self._pipeline = self._beside_log  # a database: a batch is written in a thread while the next is folded
        self._pool: ThreadPoolExecutor | None = None
        #: what the stored fold must have been built with: this fold and these definitions
        self.meta: dict[str, Any] = {"fold": FOLD_VERSION, "catalog": self.catalog.fingerprint()}
        if upcasters := upcasting.fingerprint():  # old events read through other upcasters fold otherwise
            check_upcasters()
            self.meta["upcasters"] = upcasters
        self._feed: Feed | None = None
        self._base: Tracking = {}  # the stored tracking the next batch starts from
        self._generation: str | None = None  # the stored rebuild that `_base` belongs to (None: none recorded)

    def update(self, progress: Callable[[int, int | None], None] | None = None) -> int:
        """Fold every new event of the log into the read model; return how many were read.

        `progress(read_so_far, size_hint)` is called after each batch. A projection stored
        with other saga definitions (or by another version of the fold) is first rebuilt
        from position 0. Raises `StoreError` if the projection is read-only, and
        `ConcurrencyConflict` if another writer with other definitions keeps rebuilding it.
        """
        try:
            return self._update(progress)
        finally:
            if self._pool is not None:  # no thread outlives an update
                self._pool.shutdown()
                self._pool = None

    def _update(self, progress: Callable[[int, int | None], None] | None) -> int:
        feed = self._writable_feed()
        self._cache = {}  # another writer may have moved on since the last update
        rebuilt = self._sync(feed, rebuilt=False, rewind=False)
        self._fresh = self._empty()
        total = 0
        size = self.store.size_hint()
        pending: tuple[Future[None], int] | None = None  # the batch being written, and its size
        meta = {**self.meta, GENERATION: self._generation}
        while True:
            batch = feed.poll_rows(self.batch_size, self.store.idle_timeout)
            if batch:
                collecting = gc.isenabled()
                gc.disable()  # a batch allocates many small acyclic objects: collecting them midway only costs
                try:
                    touched, timelines = self._fold(batch)
                finally:
                    if collecting:
                        gc.enable()
                reached = advance_rows(batch)
                # written as JSON now: the next batch's fold goes on changing the documents
                docs: dict[str, Any] = {k: orjson.dumps(v) for k, v in touched.items()} if self._pipeline else touched
            if pending is not None:  # the previous batch must be stored before this one is written
                try:
                    pending[0].result()
                except ConcurrencyConflict:  # another writer committed first: discard both batches, read again
                    pending = None
                    rebuilt = self._resync(feed, rebuilt)
                    meta = {**self.meta, GENERATION: self._generation}
                    continue
                total += pending[1]
                pending = None
                if progress:
                    progress(total, size)
            if not batch:
                return total
            write = partial(self.documents.put, docs, tracking=reached, appended=timelines, expected=dict(self._base),
                            expected_meta=meta)
            if self._pipeline:  # written in another thread while this one reads and folds the next batch
                pending = (self._writer().submit(write), len(batch))
            else:
                try:
                    write()
                except ConcurrencyConflict:  # another writer committed first: discard the batch, read again
                    rebuilt = self._resync(feed, rebuilt)
                    meta = {**self.meta, GENERATION: self._generation}
                    continue
                total += len(batch)
                if progress:
                    progress(total, size)
            self._cache = touched  # what is stored (or being stored): the next batch's sagas that continue are here
            self._base = {**self._base, **reached}
            if self._fresh is not None:
                self._fresh.update(touched)
                if len(self._fresh) > _FRESH_KEYS:
                    self._fresh = None

    def _resync(self, feed: Feed, rebuilt: bool) -> bool:
        """After a conflict: forget what this writer folded, rewind to what is stored; see `_sync()`."""
        self._cache = {}
        rebuilt = self._sync(feed, rebuilt, rewind=True)
        self._fresh = self._empty()
        return rebuilt

    def _empty(self) -> set[str] | None:
        """An empty set if nothing is stored (a rebuild: it will know every key it writes), else None.

        If another writer stores something first, this one's next batch is refused (its
        expected tracking is no longer the stored one) and it reads again.
        """
        return set() if not self._base and not self.documents.tracking() else None

    def _writer(self) -> ThreadPoolExecutor:
        """The thread that writes the batches (beside the log), started on first use in an update."""
        if self._pool is None:
            self._pool = ThreadPoolExecutor(1, thread_name_prefix="choreo-projection-writer")
        return self._pool

    def replay(self, progress: Callable[[int, int | None], None] | None = None) -> int:
        """Drop the read model and rebuild it from the start of the log.

        With `workers` above 1 and a SQLite store beside the log, the log up to its head is
        folded in that many forked processes at once, each taking the sagas of one partition
        (`choreo._parallel_replay`); what follows the head then as `update()`.
        """
        feed = self._writable_feed()
        self._clear()
        feed.rewind()
        size = self.store.size_hint()
        workers = _parallel_replay.workers_for(self, self.workers)
        folded = 0
        if size and workers > 1:
            folded = _parallel_replay.rebuild(self, size, workers, {**self.meta, GENERATION: self._generation})
            feed.rewind()
            if progress and folded:
                progress(folded, size)
        return folded + self.update(progress)

    def outdated(self) -> str | None:
        """Why the stored projection was not built by this one's fold and saga definitions, or None.

        A read-only projection answers from what is stored even then; a writer rebuilds it.
        """
        return self._why(self.documents.meta())

    def _why(self, stored: Mapping[str, Any]) -> str | None:
        """`outdated()` for the stored metadata `stored`."""
        if not stored and not self.documents.tracking():
            return None  # nothing stored yet
        if "fold" not in stored:
            return "it was stored by an older choreo, with no record of its fold and saga definitions"
        if stored.get("fold") != self.meta["fold"]:
            return f"it was stored by another version of the fold ({stored.get('fold')}, this is {FOLD_VERSION})"
        if stored.get("catalog") != self.meta["catalog"]:
            return (f"it was built with other saga definitions (fingerprint {str(stored.get('catalog'))[:12]}, "
                    f"these are {self.meta['catalog'][:12]})")
        if stored.get("upcasters") != self.meta.get("upcasters"):
            return "it was built with other upcasters (choreo.upcasting)"
        return None

    def close(self) -> None:
        """Leave the log."""
        if self._feed is not None:
            self._feed.close()
            self._feed = None

    def _writable_feed(self) -> Feed:
        if self.read_only:
            raise StoreError("the saga projection is read-only: it answers from what is stored and never "
                             "updates (open it without read_only=True to update it)")
        if self._feed is None:
            self._feed = upcasting_feed(self.store.feed(DOCUMENTS, self._tracked, group=False))
        return self._feed

    def _tracked(self) -> Tracking:
        """The stored tracking, which the feed starts after and the next batch expects to find.

        The generation is read first: if another writer rebuilds the projection in between,
        the tracking read belongs to a newer generation than the one expected, and the next
        batch is refused (a tracking read first could be matched, later, by a rebuild that had
        not yet reached it when this writer read its documents).
        """
        self._generation = self.documents.meta().get(GENERATION)
        self._base = self.documents.tracking()
        return dict(self._base)

    def _clear(self) -> None:
        """Drop the read model and store this fold's metadata with a new generation.

        Every rebuild gets a generation of its own, so a batch folded before it can never be
        committed on top of it, even where its tracking passes through the batch's positions.
        """
        self.documents.clear({**self.meta, GENERATION: uuid.uuid4().hex})

    def _sync(self, feed: Feed, rebuilt: bool, *, rewind: bool) -> bool:
        """Rebuild the projection if it was stored by another fold; rewind the feed to what is stored.

        Returns whether it rebuilt (now or before, per `rebuilt`); a second rebuild in one
        update means another writer with other definitions keeps rebuilding it.
        """
        stored = self.documents.meta()
        if {k: v for k, v in stored.items() if k != GENERATION} != self.meta:
            why = self._why(stored)
            if why is not None:  # else nothing is stored yet: only the fingerprint is written
                if rebuilt:
                    raise ConcurrencyConflict(f"saga projection: another writer keeps rebuilding it: {why}")
                log.warning("saga projection: rebuilding from position 0: %s", why)
                rebuilt = True
            self._clear()
            rewind = True
        if rewind:
            feed.rewind()
        return rebuilt

    def _fold(self, batch: Sequence[Row]) -> tuple[dict[str, dict[str, Any]], dict[str, list[list[Any]]]]:
        """Fold a batch into the documents it touches; return them and the new timeline entries by saga."""
        keys = {str(row[4]) if row[4] else NO_SAGA for row in batch}
        cache, fresh = self._cache, self._fresh
        touched = {key: cache[key] for key in keys if key in cache}
        if len(touched) < len(keys):
            wanted = keys.difference(touched)
            if fresh is not None:  # a rebuild: only the keys it wrote can be stored
                wanted &= fresh
            if wanted:
                touched.update(self.documents.get_many(wanted))
        timelines: dict[str, list[list[Any]]] = {}
        copy_all = not self._beside_log
        for row in batch:
            saga_id = str(row[4]) if row[4] else NO_SAGA
            saga = touched.get(saga_id)
            if saga_id == NO_SAGA:  # counted, not a saga
                saga = touched.setdefault(NO_SAGA, {"saga_id": NO_SAGA, _SEEN: []})
                event_id = row[1] if type(row[1]) is str else text_of(row[1])
                if event_id not in saga[_SEEN]:
                    saga[_SEEN].append(event_id)
                continue
            if saga is None:
                saga = touched[saga_id] = new_saga(saga_id)
            entry = entry_of(row)
            if apply(saga, entry, self.catalog) and (copy_all or type(row[4]) is not str):
                timelines.setdefault(saga_id, []).append(entry)  # else the log keeps it
        return touched, timelines

    def timeline(self, saga_id: str, saga: Mapping[str, Any] | None = None) -> list[list[Any]]:
        """One saga's timeline entries as stored (see `FIELDS`), in the order folded; see `stored_timeline()`."""
        return stored_timeline(self.documents, saga_id, saga)

    def get(self, saga_id: str, *, as_of: int | datetime | None = None) -> dict[str, Any] | None:
        """One saga's document (state, steps, timeline), optionally as it stood at a position or time.

        A timeline entry whose type no event class of this process has is marked `unknown`.
        """
        saga = self.documents.get(saga_id) if saga_id != NO_SAGA else None
        if saga is None:
            return None
        timeline = self.timeline(saga_id, saga)
        if as_of is not None:
            saga, upto = new_saga(saga_id), []
            for entry in timeline:
                if isinstance(as_of, int):
                    later = entry[_POSITION] > as_of
                else:
                    at = parse_time(entry[_AT])
                    later = at is not None and at > as_of
                if later:
                    break
                apply(saga, entry, self.catalog)
                upto.append(entry)
            timeline = upto
        saga = {k: v for k, v in saga.items() if k not in _HIDDEN}
        saga["timeline"] = [_shown(e) for e in timeline]
        saga["state"] = effective_state(saga, clock.now(), self.stuck_after)
        return saga

    def list(self, where: SagaFilter | None = None, *, limit: int | None = None,
             after: str | None = None) -> list[dict[str, Any]]:
        """Summaries (no timeline) of the sagas that match `where`, oldest first (by start, then saga id).

        A page: only the first `limit` of them, and only those listed after the saga `after`
        (the last saga id of the previous page). Raises `KeyError` if there is no saga `after`,
        and `ValueError` if `limit` is below 1.
        """
        if limit is not None and limit < 1:
            raise ValueError(f"limit must be at least 1, not {limit}")
        cursor: tuple[str, str] | None = None
        if after is not None:
            last = self.documents.get(after) if after != NO_SAGA else None
            if last is None:
                raise KeyError(after)
            cursor = (last["started_at"] or "", after)
        found = self._matching(where or SagaFilter(), cursor)
        if limit is not None:
            return heapq.nsmallest(limit, found, key=_order)
        return sorted(found, key=_order)

    def _matching(self, where: SagaFilter, cursor: tuple[str, str] | None) -> Iterator[dict[str, Any]]:
        """The summaries of the sagas that match `where`, listed after `cursor`, in no order."""
        now = clock.now()
        for saga in self.documents.scan():
            if saga["saga_id"] == NO_SAGA:
                continue
            state = effective_state(saga, now, where.stuck_for or self.stuck_after)
            started = parse_time(saga["started_at"])
            if where.stuck_for and state != "stuck":
                continue
            if where.state and state != where.state:
                continue
            if where.saga_type and saga["saga_type"] != where.saga_type:
                continue
            if where.started_after and (started is None or started < where.started_after):
                continue
            if where.started_before and (started is None or started >= where.started_before):
                continue
            if cursor is not None and _order(saga) <= cursor:
                continue
            summary = {k: v for k, v in saga.items() if k not in _HIDDEN}
            summary["state"] = state
            yield summary

    def counts(self) -> dict[str, int]:
        """How many sagas are in each state; and, under `NO_SAGA_COUNT`, how many events had no saga id."""
        counts: dict[str, int] = {}
        for s in self.list():
            counts[s["state"]] = counts.get(s["state"], 0) + 1
        orphans = self.documents.get(NO_SAGA)
        if orphans and orphans[_SEEN]:
            counts[NO_SAGA_COUNT] = len(orphans[_SEEN])
        return dict(sorted(counts.items()))


def stored_timeline(documents: DocumentStore, saga_id: str, saga: Mapping[str, Any] | None = None) -> list[list[Any]]:
    """A saga's timeline entries as the projection in `documents` stores them, in the order folded.

    Beside the log (`documents.beside_log`) they are the saga's log rows that its document
    (`saga`, else the stored one) has folded, each once, merged by position with the
    entries copied for events the log's index cannot find; elsewhere, the copied entries.
    """
    entries = documents.entries(saga_id)
    rows = documents.log_rows(saga_id) if documents.beside_log and saga_id != NO_SAGA else None
    if rows is None:
        return entries
    rows = upcasting.upcast_rows(rows)  # as the projection folded them (its feed upcasts)
    if saga is None:
        saga = documents.get(saga_id)
    seen = set(saga[_SEEN]) if saga else set()
    for row in rows:
        entry = entry_of(row)
        if entry[_ID] in seen:
            seen.discard(entry[_ID])  # each event once
            entries.append(entry)
    return sorted(entries, key=lambda e: e[_POSITION])


def _order(saga: Mapping[str, Any]) -> tuple[str, str]:
    """Where a saga is listed: by start time, then saga id."""
    return (saga["started_at"] or "", saga["saga_id"])


def _shown(entry: Sequence[Any]) -> dict[str, Any]:
    """A stored entry as `get()` shows it: an event type unknown to this process is marked then, not stored."""
    shown = as_dict(entry)
    if "unknown" not in shown and not is_known_type(shown["type"]):
        shown["unknown"] = f"event type {shown['type']!r} is not known to this process"
    return shown


def dumps(doc: dict[str, Any]) -> str:
    """Serialise a saga document canonically."""
    return json.dumps(doc, sort_keys=True, separators=(",", ":"))
