"""Durable deadlines: started by an event, cancelled by others, emitting an event when they expire.

A deadline is a row in the service's own store, written in the same transaction
as the event that started or cancelled it. A deadline whose handler fails is tried
again later (the service's retry policy), then marked `failed` with a dead letter. Each poll fires the deadlines that are
due by choreo's clock: the expiry event and the `fired` mark are one transaction,
so a deadline fires exactly once, and late (never not) after downtime.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta
from functools import cached_property
from typing import Any
from uuid import NAMESPACE_URL, uuid5

from choreo.events import Event

SCHEDULED, CANCELLED, FIRED, FAILED = "scheduled", "cancelled", "fired", "failed"
#: Changes that are not statuses of their own: move a scheduled deadline's due time, and
#: cancel every scheduled deadline of a saga (it ended).
RESCHEDULED, SAGA_ENDED = "rescheduled", "saga-ended"


@dataclass(frozen=True)
class DeadlineSpec:
    """A service's declared deadline (see `Service.deadline`)."""

    name: str
    start_on: type[Event]
    cancel_on: tuple[type[Event], ...]
    after: timedelta
    fn: Callable[..., Any]
    fails_saga: bool = True
    #: events it may emit besides its return annotation (for `choreo check`)
    emits: tuple[type[Event], ...] = ()

    @cached_property
    def cancel_types(self) -> frozenset[str]:
        """The event types that cancel this deadline."""
        return frozenset(e.event_type for e in self.cancel_on)


@dataclass(frozen=True)
class Deadline:
    """One deadline of one saga, as stored: when it is due and the event that started it."""

    id: str
    service: str
    name: str
    saga_id: str
    due_at: datetime
    status: str
    cause_event_id: str
    cause_type: str = ""
    cause_version: int = 1
    cause_payload: str = "{}"


def deadline_id(service: str, saga_id: str, name: str) -> str:
    """The id of a saga's deadline: the same for every replica and every redelivery."""
    return str(uuid5(NAMESPACE_URL, f"choreo-deadline/{service}/{saga_id}/{name}"))
