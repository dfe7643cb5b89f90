"""The changes of one batch: aggregates touched and events emitted, committed together.

When a service handles several sagas at once, each event is handled in a `SagaView`
of the batch's unit of work. The view claims each aggregate it touches for as long as
it runs, and works on the batch's own object of it (no copy: nobody else may touch it
while it is claimed). A view that touches an aggregate another view has claimed is
abandoned (`Busy`) and run again once that view is done; a view that fails or is
abandoned puts back every aggregate it changed (rebuilt from the store and the batch's
earlier events of it), and a view that succeeds leaves its changes and events in the
batch. So the batch's effects are those of handling its events one at a time, in some
order that keeps each saga's log order (conflict-serializable: every claim is held to
the end).
"""

from __future__ import annotations

import asyncio
import threading
from collections import OrderedDict, deque
from collections.abc import Sequence
from uuid import NAMESPACE_URL, UUID, uuid5

from eventsourcing.persistence import Mapper, StoredEvent

from choreo import clock, tracing
from choreo.aggregates import Aggregate
from choreo.deadlines import Deadline
from choreo.events import Envelope, Event, encode_payload
from choreo.snapshots import Snapshotting
from choreo.store import DeadLetter, ServiceStore

_EVENT_NAMESPACE = uuid5(NAMESPACE_URL, "https://choreo.dev/event")


class AggregateCache:
    """Committed aggregates kept between batches (bounded, least recently used first out)."""

    def __init__(self, size: int) -> None:
        self.size = size
        self._items: OrderedDict[UUID, Aggregate] = OrderedDict()
        #: stored events read ahead for the current batch (one query instead of one per aggregate)
        self.prefetched: dict[UUID, list[StoredEvent]] = {}

    def get(self, key: UUID) -> Aggregate | None:
        agg = self._items.get(key)
        if agg is not None:
            self._items.move_to_end(key)
        return agg

    def put(self, agg: Aggregate) -> None:
        self._items[agg.id] = agg
        self._items.move_to_end(agg.id)
        while len(self._items) > self.size:
            self._items.popitem(last=False)

    def evict(self, keys: Sequence[UUID]) -> None:
        for k in keys:
            self._items.pop(k, None)

    def clear(self) -> None:
        self._items.clear()
        self.prefetched.clear()


class UnitOfWork:
    """Collects what handlers did in a batch; nothing is written until `ServiceStore.commit()`."""

    def __init__(self, service_name: str, store: ServiceStore, mapper: Mapper[UUID], cache: AggregateCache,
                 snapshots: Snapshotting | None = None) -> None:
        self.service_name = service_name
        self.snapshotting = snapshots or Snapshotting()
        #: the snapshots `stored_events()` took, committed with the events
        self.snapshots: list[StoredEvent] = []
        self.store = store
        self.mapper = mapper
        self.cache = cache
        self.aggregates: dict[UUID, Aggregate | None] = {}
        self.emitted: list[Envelope] = []
        self.deadlines: list[Deadline] = []
        #: dead letters resolved by this batch (a failure went ahead of them), and the sagas they release
        self.resolved: list[DeadLetter] = []
        self.released: set[str] = set()
        #: sagas held by a failure in this batch (their later events in it wait behind)
        self.holds: set[str] = set()
        #: dead letters of this batch's failures (several sagas at once), written with its commit
        self.letters: list[DeadLetter] = []
        #: those of them resolved as skipped before the commit (a failure of their saga followed), by event id
        self.skipped_new: dict[str, DeadLetter] = {}
        self._emit_counts: dict[str, int] = {}

    def get(self, agg_id: UUID) -> Aggregate | None:
        if agg_id in self.aggregates:
            return self.aggregates[agg_id]
        agg = self.cache.get(agg_id)
        if agg is None:
            stored_events = self.cache.prefetched.pop(agg_id, None)
            if stored_events is None:
                agg = self.snapshotting.load(self.store, agg_id, self.mapper)
            for stored in stored_events or ():
                agg = self.mapper.to_domain_event(stored).mutate(agg)  # type: ignore[attr-defined]
        self.aggregates[agg_id] = agg
        return agg

    def add(self, agg: Aggregate) -> None:
        self.aggregates[agg.id] = agg

    def emit(
        self,
        event: Event,
        cause: Envelope,
        *,
        step: str | None = None,
        outcome: str | None = None,
        tag: str | None = None,
    ) -> Envelope:
        """Record an event emitted because of `cause`, with inherited saga and causation.

        Its id is derived from the cause and the service (and `tag`, for choreo's own
        events), so a handler that runs again emits the same ids.
        """
        if tag is None:
            n = self._emit_counts.get(cause.event_id, 0)
            self._emit_counts[cause.event_id] = n + 1
            tag = str(n)
        env = Envelope(
            event_id=str(uuid5(_EVENT_NAMESPACE, f"{cause.event_id}/{self.service_name}/{tag}")),
            type=event.event_type,
            version=event.schema_version,
            saga_id=cause.saga_id,
            causation_id=cause.event_id,
            service=self.service_name,
            step=step,
            outcome=outcome,
            occurred_at=clock.now(),
            payload=encode_payload(event),
            trace=tracing.carried(cause),
        )
        self.emitted.append(env)
        return env

    def batch_letters(self) -> list[DeadLetter]:
        """The dead letters this batch made so far and has not committed yet."""
        return self.letters

    def stored_events(self) -> list[StoredEvent]:
        """Take the pending events of every aggregate touched, as stored events."""
        stored: list[StoredEvent] = []
        for agg in self.aggregates.values():
            if agg is not None:
                new = agg.collect_events()
                stored.extend(self.mapper.to_stored_event(e) for e in new)
                if self.snapshotting.enabled:
                    if (snapshot := self.snapshotting.take(agg, new, self.mapper)) is not None:
                        self.snapshots.append(snapshot)
        return stored

    def touched(self) -> list[UUID]:
        return list(self.aggregates)

    def keep(self) -> None:
        """After a commit: keep the (now committed) aggregates in the cache."""
        for agg in self.aggregates.values():
            if agg is not None:
                self.cache.put(agg)

    def discard(self) -> None:
        """After a failure: forget every aggregate this batch touched."""
        self.cache.evict(self.touched())


class Busy(BaseException):
    """An aggregate is claimed by another saga's handler still running; try again when it is done.

    A `BaseException`, so that a handler's own `except Exception` does not swallow it.
    """

    def __init__(self, done: asyncio.Event, agg_id: UUID) -> None:
        self.done = done
        self.agg_id = agg_id
        super().__init__("aggregate claimed by another handler")


class Claims:
    """Which view holds each aggregate of the batch, and who waits for it (safe from handler threads).

    Those that found an aggregate claimed wait in line for it: its release wakes the first
    one only, so a hot aggregate is handed from one handler to the next, not fought over.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._holders: dict[UUID, SagaView] = {}
        self._waiting: dict[UUID, deque[asyncio.Event]] = {}

    def take(self, agg_id: UUID, view: SagaView) -> None:
        with self._lock:
            holder = self._holders.setdefault(agg_id, view)
            if holder is view:
                return
            turn = asyncio.Event()
            self._waiting.setdefault(agg_id, deque()).append(turn)
        raise Busy(turn, agg_id)

    def release(self, view: SagaView) -> None:
        """Release what `view` holds, waking the next in line for each; and if `view` was woken for an
        aggregate it did not take after all, pass its turn on (nobody is left waiting for a free one)."""
        with self._lock:
            for agg_id in view.aggregates:
                if self._holders.get(agg_id) is view:
                    del self._holders[agg_id]
                    self._wake(agg_id)
            if view.woken_for is not None and view.woken_for not in self._holders:
                self._wake(view.woken_for)

    def _wake(self, agg_id: UUID) -> None:
        line = self._waiting.get(agg_id)
        if line:
            line.popleft().set()
            if not line:
                del self._waiting[agg_id]


class SagaView(UnitOfWork):
    """One event's handling inside a batch: claims what it touches, and puts it back unless it succeeds."""

    def __init__(self, batch: UnitOfWork, claims: Claims, woken_for: UUID | None = None) -> None:
        super().__init__(batch.service_name, batch.store, batch.mapper, batch.cache, batch.snapshotting)
        self.batch = batch
        self.claims = claims
        #: the aggregate whose release woke this view (run again after a `Busy`), if any
        self.woken_for = woken_for
        #: for each aggregate it took from the batch, how many of its pending events came before
        self._marks: dict[UUID, int] = {}
        self.resolved = list(batch.resolved)
        self.released = set(batch.released)
        self.holds = batch.holds  # kept by the batch: sagas that failed earlier in it
        self.skipped_new = dict(batch.skipped_new)

    def get(self, agg_id: UUID) -> Aggregate | None:
        if agg_id in self.aggregates:
            return self.aggregates[agg_id]
        self.claims.take(agg_id, self)
        agg = self.aggregates[agg_id] = self.batch.get(agg_id)
        if agg is not None:
            self._marks[agg_id] = len(agg._pending_events)
        return agg

    def add(self, agg: Aggregate) -> None:
        self.claims.take(agg.id, self)
        self.aggregates[agg.id] = agg

    def batch_letters(self) -> list[DeadLetter]:
        return self.batch.letters

    def merge(self) -> None:
        """Make what this view did part of the batch (it succeeded)."""
        for agg_id, agg in self.aggregates.items():
            if agg is not None:
                before = self.batch.aggregates.get(agg_id)
                if before is not None and before is not agg:  # created anew: the batch's events come first
                    agg._pending_events[:0] = before._pending_events[: self._marks.get(agg_id, 0)]
                self.batch.aggregates[agg_id] = agg
        self.batch.emitted.extend(self.emitted)
        self.batch.deadlines.extend(self.deadlines)
        known = {d.id for d in self.batch.resolved}
        self.batch.resolved.extend(d for d in self.resolved if d.id not in known)
        self.batch.released |= self.released
        self.batch.skipped_new.update(self.skipped_new)

    def discard(self) -> None:
        """Put back every aggregate of the batch this view changed (call before releasing its claims).

        An aggregate changes only by its events, so one with no new pending events is as it
        was. One that has them is rebuilt from its committed events and the batch's earlier
        ones (rare: a handler that failed, or met a claimed aggregate, after it changed one).
        """
        for agg_id, mark in self._marks.items():
            agg = self.batch.aggregates.get(agg_id)
            if agg is not None and len(agg._pending_events) > mark:
                self.batch.aggregates[agg_id] = _rebuilt(agg, mark, self.store, self.mapper)
                self.cache.evict([agg_id])


def _rebuilt(agg: Aggregate, mark: int, store: ServiceStore, mapper: Mapper[UUID]) -> Aggregate:
    """`agg` as it was with only its first `mark` pending events: its committed events, then those."""
    earlier = agg._pending_events[:mark]
    fresh: Aggregate | None = None
    for stored in store.load(agg.id):
        fresh = mapper.to_domain_event(stored).mutate(fresh)  # type: ignore[attr-defined]
    for event in earlier:
        fresh = event.mutate(fresh)
    assert fresh is not None
    fresh._pending_events = list(earlier)
    return fresh
