"""Aggregate snapshots: a hot aggregate loads from its latest snapshot plus the events after it.

A snapshot is `eventsourcing`'s `Snapshot` of an aggregate (its state at a version),
stored in the service's own store in the same transaction as the events that reach
that version, so a snapshot is never ahead of the committed events. Like
`eventsourcing`'s `snapshotting_intervals`, a snapshot is taken when a commit takes an
aggregate across a multiple of its interval, so loading costs at most that many events
(plus those of one batch). Configure the interval per service,
`Service("inventory", snapshot_every={StockItem: 1000})`, or per class with the class
attribute `snapshot_every = 1000`; the service's setting wins. See docs/evolution.md.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from datetime import datetime
from typing import TYPE_CHECKING, Any
from uuid import UUID

from eventsourcing.domain import Snapshot
from eventsourcing.persistence import Mapper, StoredEvent

from choreo import clock
from choreo.errors import WiringError

if TYPE_CHECKING:
    from choreo.aggregates import Aggregate
    from choreo.store import ServiceStore


class AggregateSnapshot(Snapshot):
    """An aggregate's state at a version (`eventsourcing`'s `Snapshot`, timed by choreo's clock)."""

    @staticmethod
    def create_timestamp() -> datetime:
        """Return the current time from choreo's clock."""
        return clock.now()


def check_intervals(service: str, every: Mapping[Any, Any] | None) -> dict[type, int]:
    """Return `every` if it maps aggregate classes to whole numbers >= 1, else raise `WiringError`."""
    from choreo.aggregates import Aggregate

    if every is None:
        return {}
    if not isinstance(every, Mapping):
        raise WiringError(f"service {service!r}: snapshot_every must map aggregate classes to intervals, "
                          f"got {every!r}")
    for cls, n in every.items():
        if not (isinstance(cls, type) and issubclass(cls, Aggregate)):
            raise WiringError(f"service {service!r}: snapshot_every key {cls!r} is not an Aggregate class")
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise WiringError(
                f"service {service!r}: snapshot_every[{cls.__name__}] must be a whole number >= 1, got {n!r}"
            )
    return dict(every)


def _classes_with_interval() -> bool:
    from choreo.aggregates import Aggregate

    todo: list[type] = [Aggregate]
    while todo:
        cls = todo.pop()
        if cls.__dict__.get("snapshot_every"):
            return True
        todo.extend(cls.__subclasses__())
    return False


class Snapshotting:
    """When one service snapshots its aggregates, and how it loads them."""

    def __init__(self, every: Mapping[type, int] | None = None) -> None:
        self.every = dict(every or {})
        #: whether loads look for a snapshot first (some class has an interval)
        self.enabled = bool(self.every) or _classes_with_interval()

    def interval(self, agg: Aggregate) -> int | None:
        """The snapshot interval of `agg`'s class: the service's setting, else the class attribute."""
        cls = type(agg)
        n = self.every.get(cls)
        return n if n is not None else getattr(cls, "snapshot_every", None)

    def take(self, agg: Aggregate, events: Sequence[Any], mapper: Mapper[UUID]) -> StoredEvent | None:
        """A snapshot of `agg` if its new `events` (about to be committed) cross a multiple of its interval."""
        if not events:
            return None
        n = self.interval(agg)
        if not n or events[-1].originator_version // n == (events[0].originator_version - 1) // n:
            return None
        return mapper.to_stored_event(AggregateSnapshot.take(agg))

    def load(self, store: ServiceStore, agg_id: UUID, mapper: Mapper[UUID]) -> Aggregate | None:
        """Rebuild an aggregate: from its latest snapshot and the events after it, if snapshots are on."""
        snapshot, stored_events = store.load_latest(agg_id) if self.enabled else (None, store.load(agg_id))
        agg = None if snapshot is None else mapper.to_domain_event(snapshot).mutate(None)  # type: ignore[attr-defined]
        for stored in stored_events:
            agg = mapper.to_domain_event(stored).mutate(agg)  # type: ignore[attr-defined]
        return agg
