"""The context a handler receives: correlation, the clock, aggregates, and emitting events."""

from __future__ import annotations

from datetime import datetime
from typing import TYPE_CHECKING, Any, TypeVar

from choreo import clock
from choreo.aggregates import Aggregate, aggregate_id, create_with_id
from choreo.errors import AggregateExists, AggregateNotFound, WiringError
from choreo.events import Envelope, Event

if TYPE_CHECKING:
    from choreo._unit_of_work import UnitOfWork

A = TypeVar("A", bound=Aggregate)


class Context:
    """Given to every handler: the event's envelope, aggregates to load or create, and `emit()`."""

    def __init__(self, uow: UnitOfWork, envelope: Envelope) -> None:
        self._uow = uow
        self.envelope = envelope
        self.extra: list[Event] = []

    @property
    def saga_id(self) -> str:
        """The saga this event belongs to."""
        return self.envelope.saga_id

    @property
    def service(self) -> str:
        """The name of the service handling the event."""
        return self._uow.service_name

    def now(self) -> datetime:
        """The current time from choreo's clock."""
        return clock.now()

    def find(self, cls: type[A], key: object) -> A | None:
        """Return the aggregate of `cls` with business key `key`, or None."""
        _check_aggregate_class(cls)
        agg = self._uow.get(aggregate_id(cls, key))
        if agg is not None and not isinstance(agg, cls):
            raise WiringError(f"aggregate {key!r} is a {type(agg).__name__}, not a {cls.__name__}")
        return agg

    def load(self, cls: type[A], key: object) -> A:
        """Return the aggregate of `cls` with business key `key`; raise `AggregateNotFound`."""
        agg = self.find(cls, key)
        if agg is None:
            raise AggregateNotFound(f"{self.service}: no {cls.__name__} with key {key!r}")
        return agg

    def create(self, cls: type[A], key: object, **kwargs: Any) -> A:
        """Create the aggregate of `cls` with business key `key` (its `__init__` gets `kwargs`).

        Raises `AggregateExists` if there is one already.
        """
        _check_aggregate_class(cls)
        agg_id = aggregate_id(cls, key)
        if self._uow.get(agg_id) is not None:
            raise AggregateExists(f"{self.service}: a {cls.__name__} with key {key!r} already exists")
        agg = create_with_id(cls, agg_id, **kwargs)
        self._uow.add(agg)
        return agg

    def emit(self, event: Event) -> None:
        """Emit an extra event (not a step outcome) with this event's saga and causation."""
        if not isinstance(event, Event):
            raise WiringError(f"{self.service}: emit() expects an Event, got {event!r}")
        self.extra.append(event)


def _check_aggregate_class(cls: object) -> None:
    if not (isinstance(cls, type) and issubclass(cls, Aggregate)):
        raise WiringError(f"{cls!r} is not a choreo Aggregate subclass")
