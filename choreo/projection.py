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
import hashlib
import heapq
import json
import logging
import uuid
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from functools import partial
from datetime import datetime, timedelta, timezone
from typing import Any

import orjson

from choreo import _parallel_replay, clock
from choreo.errors import ConcurrencyConflict, StoreError
from choreo.events import Outcome, is_known_type
from choreo.operations import DeadLetterResolved, EventParked, HandlerRetried
from choreo.saga import SagaCompleted, SagaDefinition, SagaFailed
from choreo import upcasting
from choreo.store import DocumentStore, EventStore, Feed, Row, Tracking, advance_rows
from choreo.upcasting import check_upcasters, upcasting_feed

log = logging.getLogger("choreo.projection")

FINAL_STATES = frozenset({"completed", "failed"})
#: The key of the document that counts the events without a saga id (never a saga's id).
NO_SAGA = ""
#: The key under which `SagaProjection.counts()` reports the events without a saga id.
NO_SAGA_COUNT = "events_without_saga_id"
#: The version of `apply()` and `entry_of()`: a projection stored by another version is rebuilt.
FOLD_VERSION = 3
#: The metadata entry that each rebuild (`clear()`) of the projection sets to a new value.
GENERATION = "generation"
_NOTES = frozenset({HandlerRetried.event_type, EventParked.event_type, DeadLetterResolved.event_type})
_PARKED, _RESOLVED = EventParked.event_type, DeadLetterResolved.event_type
_COMPLETED, _FAILED = SagaCompleted.event_type, SagaFailed.event_type
_ENDS = (_COMPLETED, _FAILED)
_OUT_COMPLETED, _OUT_FAILED = str(Outcome.COMPLETED.value), str(Outcome.FAILED.value)
_SEEN = "event_ids"  # every event a saga document has folded in (redeliveries are ignored)
_HIDDEN = frozenset({_SEEN, "timeline"})
_FRESH_KEYS = 500_000  # how many keys a rebuild remembers having written (about 50 MB), at most
#: the name of the projection's documents in the store (`rm_sagas_*` tables on SQLite)
DOCUMENTS = "sagas"
STATES = ("started", "running", "compensating", "completed", "failed", "stuck")


#: A timeline entry is stored compactly as a list: these fields in this order, then a dict
#: of what only some events have (`unknown`, `cause`, `attempts`, `note`). `occurred_at`
#: is an ISO 8601 time with a UTC offset, or None if the log's was not one.
FIELDS = ("position", "event_id", "type", "service", "step", "outcome", "occurred_at", "causation_id")
_POSITION, _ID, _TYPE, _SERVICE, _STEP, _OUTCOME, _AT, _CAUSATION, _EXTRA = range(9)


def parse_time(text: Any) -> datetime | None:
    """An ISO 8601 time as an aware datetime (UTC if it has no offset), or None if it is not one."""
    try:
        t = datetime.fromisoformat(text)
    except (TypeError, ValueError):
        return None
    return t if t.tzinfo else t.replace(tzinfo=timezone.utc)


_fromisoformat = datetime.fromisoformat


def _stored_time(when: Any) -> str | None:
    """The log's time as kept in an entry: as written if it has a UTC offset, else with +00:00."""
    try:
        t = datetime.fromisoformat(when)
    except (TypeError, ValueError):
        return None
    return str(when) if t.tzinfo else t.replace(tzinfo=timezone.utc).isoformat()


def _end_cause(payload: Mapping[str, Any]) -> str:
    """The cause of a saga as `choreo.SagaFailed` tells it: the failed step, the failure's type and reason."""
    cause = str(payload.get("failure_type") or _FAILED)
    if payload.get("reason"):
        cause += f": {payload['reason']}"
    return f"{payload['failed_step']}: {cause}" if payload.get("failed_step") else cause


def entry_of(row: Row) -> list[Any]:
    """The timeline entry of a log row (see `choreo.store.ROW_FIELDS`): what the projection keeps.

    It depends on the row alone, never on which event classes this process loaded: a
    row whose time is not an ISO 8601 time, whose payload is not a JSON object, or one
    of whose text fields is not text (bytes: a BLOB, or text that is not valid UTF-8) is
    marked `unknown` with the reason, its fields made text.
    """
    position, event_id, kind, _, _, causation_id, service, step, outcome, when, text, _ = row
    if not (type(event_id) is str and type(kind) is str and type(service) is str  # the fast check
            and (causation_id is None or type(causation_id) is str) and (step is None or type(step) is str)
            and (outcome is None or type(outcome) is str)) and (problems := _not_text(row)):
        return _garbled(row, problems)
    extra: dict[str, Any] = {}
    try:  # `_stored_time()`, inline: this runs for every event of a rebuild
        at = when if _fromisoformat(when).tzinfo and type(when) is str else _stored_time(when)
    except (TypeError, ValueError):
        at = None
    entry = [position, event_id, kind, service, step, outcome, at, causation_id, extra]
    if at is None:
        extra["unknown"] = f"{kind}: occurred_at {when!r} is not an ISO 8601 time"
        return entry
    # The writer validated the event against its schema; a replay only needs to read the
    # payload's JSON (re-validating every event would cost most of it).
    try:
        if not isinstance(text, str):
            raise ValueError(f"stored as {type(text).__name__}")
        payload = orjson.loads(text)
        if not isinstance(payload, dict):
            raise ValueError("not a JSON object")
    except ValueError as e:
        extra["unknown"] = f"{kind}: payload is not a JSON object: {e}"
        return entry
    if kind == _FAILED:
        extra["cause"] = _end_cause(payload)
    elif outcome == _OUT_FAILED:
        reason = payload.get("reason")
        extra["cause"] = f"{kind}: {reason}" if reason else kind
    if kind in _NOTES:
        if "attempts" in payload:
            extra["attempts"] = payload["attempts"]
        if kind == _PARKED:
            extra["note"] = payload.get("reason", "")
        elif kind == _RESOLVED:
            extra["note"] = f"{payload.get('status')}: {payload.get('reason', '')}"
    return entry


# The text fields of a row that must be text (a saga id that is not is still read as a saga of its own,
# named by its repr, as it always was), and those that may also be None.
_TEXT_FIELDS = ((1, "event_id"), (2, "type"), (5, "causation_id"), (6, "service"), (7, "step"), (8, "outcome"))
_OPTIONAL = frozenset({"causation_id", "step", "outcome"})


def text_of(value: Any) -> str:
    """A field's value as text: text as it is, anything else (bytes) by its repr."""
    return value if isinstance(value, str) else repr(value)


def _not_text(row: Row) -> list[str]:
    """What is wrong with the text fields of a row: those that are not text (None is text where optional)."""
    return [f"{name} is {'bytes' if isinstance(row[i], bytes) else type(row[i]).__name__}, not UTF-8 text"
            for i, name in _TEXT_FIELDS if not isinstance(row[i], str) and not (row[i] is None and name in _OPTIONAL)]


def _garbled(row: Row, problems: Sequence[str]) -> list[Any]:
    """The `unknown` entry of a row with text fields that are not text, every field made text."""
    event_id, kind, causation_id, service, step, outcome = (
        None if row[i] is None and name in _OPTIONAL else text_of(row[i]) for i, name in _TEXT_FIELDS)
    extra = {"unknown": f"{kind}: {'; '.join(problems)}"}
    return [row[0], event_id, kind, service, step, outcome, _stored_time(row[9]), causation_id, extra]


def as_dict(entry: Sequence[Any]) -> dict[str, Any]:
    """A stored timeline entry as the dict `SagaProjection.get()` shows."""
    return {**dict(zip(FIELDS, entry)), **entry[_EXTRA]}


def new_saga(saga_id: str) -> dict[str, Any]:
    """An empty saga document (its timeline is kept apart, entry by entry)."""
    return {
        "saga_id": saga_id, "saga_type": None, "state": "started", "started_at": None,
        "ended_at": None, "updated_at": None, "cause": None, "steps": {}, "unknown_events": 0,
        _SEEN: [],
    }


@dataclass(frozen=True)
class Catalog:
    """The saga definitions a projection knows, looked up by start event and by name."""

    by_start: Mapping[str, SagaDefinition]
    by_name: Mapping[str, SagaDefinition]

    @classmethod
    def of(cls, definitions: Iterable[SagaDefinition]) -> Catalog:
        """Index `definitions`."""
        definitions = tuple(definitions)
        return cls({d.start.event_type: d for d in reversed(definitions)}, {d.name: d for d in reversed(definitions)})

    def fingerprint(self) -> str:
        """A digest of everything the fold reads from the definitions: names, start types, steps, end types."""
        sagas = sorted([d.name, d.start.event_type, list(d.steps), sorted(d.end_types)] for d in self.by_name.values())
        starts = sorted([start, d.name] for start, d in self.by_start.items())
        text = json.dumps([sagas, starts], separators=(",", ":"))
        return hashlib.sha256(text.encode()).hexdigest()


def apply(saga: dict[str, Any], entry: Sequence[Any], catalog: Catalog) -> bool:
    """Fold one timeline entry into a saga document (the one rule for updates and replays).

    Returns False, changing nothing, if the saga has this event already.
    """
    # Written for speed (a rebuild calls it for every event): locals, plain strings, no helpers on the common path.
    seen, event_id = saga[_SEEN], entry[_ID]
    if event_id in seen:
        return False  # the same event delivered again
    seen.append(event_id)
    when, kind, extra = entry[_AT], entry[_TYPE], entry[_EXTRA]
    if when is not None:
        saga["updated_at"] = when
    if extra and "unknown" in extra:
        saga["unknown_events"] += 1
        return True
    steps = saga["steps"]
    if saga["started_at"] is None:
        saga["started_at"] = when
        started = catalog.by_start.get(kind)
        saga["saga_type"] = started.name if started else kind
        if started:
            for name in started.steps:
                steps[name] = {"service": None, "status": "pending", "events": []}
    if kind in _ENDS:
        _end(saga, kind, extra, when)
        return True
    step, outcome = entry[_STEP], entry[_OUTCOME]
    if extra:  # parking, resolving and retries always have extras (a note, attempts)
        if kind == _PARKED:
            saga["parked"] = saga.get("parked", 0) + 1
        elif kind == _RESOLVED:
            saga["parked"] = max(0, saga.get("parked", 0) - 1)
        if step and "attempts" in extra:  # retries and parking, shown on the step they concern
            info = steps.get(step) or steps.setdefault(step, _step(entry[_SERVICE]))
            info["attempts"] = info.get("attempts", 1) + extra["attempts"] - 1
            if kind == _PARKED:
                info["parked"] = extra["note"]
    if outcome == _OUT_FAILED and not step and saga["cause"] is None:  # a deadline or an operator
        saga["cause"] = f"{entry[_SERVICE]}: {extra.get('cause', kind)}"
    if step and outcome:
        service = entry[_SERVICE]
        info = steps.get(step) or steps.setdefault(step, _step(service))
        info["service"] = service
        info["events"].append(event_id)
        info[f"{outcome}_at"] = when
        info["status"] = outcome
        if outcome == _OUT_FAILED and saga["cause"] is None:
            saga["cause"] = f"{step}: {extra.get('cause', kind)}"
    failed = saga["cause"] is not None
    if failed:
        for info in steps.values():
            if info["status"] == _OUT_COMPLETED:
                info["status"] = "compensating"
    if saga["ended_at"] is None:
        definition = catalog.by_name.get(saga["saga_type"])
        if definition and kind in definition.end_types:
            saga["ended_at"] = when
        if failed:
            pending = any(s["status"] == "compensating" for s in steps.values())
            saga["state"] = "compensating" if pending or (definition and not saga["ended_at"]) else "failed"
        elif saga["ended_at"]:
            saga["state"] = "completed"
        elif saga["state"] == "started" and any(s["status"] != "pending" for s in steps.values()):
            saga["state"] = "running"
    return True


def _end(saga: dict[str, Any], kind: str, extra: Mapping[str, Any], when: str) -> None:
    """Fold choreo's own end of a saga: it decides, whatever the definition's end types say.

    A saga that ended one way (choreo's end, or a definition's end event with that
    outcome) never shows the other.
    """
    completed = kind == _COMPLETED
    if saga["ended_at"] is not None and (saga["state"] == "completed") != completed:
        return  # it ended the other way
    if not completed and saga["cause"] is None:
        saga["cause"] = extra.get("cause", kind)
    saga["state"] = "completed" if completed else "failed"
    if saga["ended_at"] is None:
        saga["ended_at"] = when


def _step(service: str | None) -> dict[str, Any]:
    return {"service": service, "status": "pending", "events": []}


def effective_state(saga: dict[str, Any], now: datetime, stuck_after: timedelta | None) -> str:
    """The saga's state, or `stuck` if it is not final and made no progress for `stuck_after`."""
    if stuck_after is not None and saga["state"] not in FINAL_STATES:
        updated = parse_time(saga["updated_at"])
        if updated is not None and now - updated > stuck_after:
            return "stuck"
    return str(saga["state"])


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
