"""Event-sourced aggregates, built on `eventsourcing`'s `Aggregate`.

choreo's `Aggregate` adds two things: its events take their timestamps from
choreo's clock, and `Context.create(Cls, key, ...)` gives it an id derived from
a business key, so `Context.load(Cls, key)` finds it again.
"""

from __future__ import annotations

from contextvars import ContextVar
from datetime import datetime
from functools import lru_cache
from typing import TYPE_CHECKING, Any, ClassVar, TypeVar
from uuid import NAMESPACE_URL, UUID, uuid4, uuid5

from eventsourcing.domain import Aggregate as _ESAggregate
from eventsourcing.domain import event
from eventsourcing.persistence import (
    DatetimeAsISO,
    DecimalAsStr,
    JSONTranscoder,
    Mapper,
    UUIDAsHex,
)

from choreo import clock

if TYPE_CHECKING:
    from choreo.store import ServiceStore

A = TypeVar("A", bound="Aggregate")

__all__ = ["Aggregate", "aggregate_id", "event", "load_aggregate", "new_mapper"]

_NAMESPACE = uuid5(NAMESPACE_URL, "https://choreo.dev/aggregate")
_next_id: ContextVar[UUID | None] = ContextVar("choreo_next_aggregate_id", default=None)


class Aggregate(_ESAggregate):
    """Base class for a service's event-sourced aggregates (use `@event` on its methods).

    `snapshot_every = N` on a subclass snapshots it every N events (`choreo.snapshots`).
    """

    snapshot_every: ClassVar[int | None] = None

    @staticmethod
    def create_id(*_: Any, **__: Any) -> UUID:
        """Return the id chosen by `Context.create()`, or a random one."""
        return _next_id.get() or uuid4()

    class Event(_ESAggregate.Event):
        """Base class of this aggregate's events; timestamps come from choreo's clock."""

        @staticmethod
        def create_timestamp() -> datetime:
            """Return the current time from choreo's clock."""
            return clock.now()


def aggregate_id(cls: type, key: object) -> UUID:
    """Return the id of the aggregate of class `cls` with the business key `key`."""
    return _id_of(f"{cls.__module__}.{cls.__qualname__}:{key}")


@lru_cache(maxsize=65_536)
def _id_of(name: str) -> UUID:
    return uuid5(_NAMESPACE, name)


def create_with_id(cls: type[A], agg_id: UUID, **kwargs: Any) -> A:
    """Create an aggregate of `cls` whose id is `agg_id`."""
    token = _next_id.set(agg_id)
    try:
        return cls(**kwargs)
    finally:
        _next_id.reset(token)


def new_mapper() -> Mapper[UUID]:
    """Return an `eventsourcing` mapper that stores aggregate events as JSON."""
    transcoder = JSONTranscoder()
    transcoder.register(UUIDAsHex())
    transcoder.register(DecimalAsStr())
    transcoder.register(DatetimeAsISO())
    return Mapper(transcoder=transcoder)


def load_aggregate(store: ServiceStore, cls: type[A], key: object) -> A | None:
    """Read a service's aggregate outside a handler: rebuilt from its stored events, or None.

    `store` is the service's own store, e.g. `open_store(url).service("payment")`. For
    audits, tests and read-only views; handlers use `ctx.load()`.
    """
    mapper = new_mapper()
    snapshot, stored_events = store.load_latest(aggregate_id(cls, key))
    agg = None if snapshot is None else mapper.to_domain_event(snapshot).mutate(None)  # type: ignore[attr-defined]
    for stored in stored_events:
        agg = mapper.to_domain_event(stored).mutate(agg)  # type: ignore[attr-defined]
    return agg
