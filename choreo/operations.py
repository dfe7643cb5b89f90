"""choreo's own events: what retries and parking did, and what operators asked for.

They go into the log like any other event, with the saga's id, so the saga
projection shows them in the saga's timeline. Operator commands are events too:
the service they name carries them out when it reads them, on SQLite and on Kafka.
"""

from __future__ import annotations

from typing import ClassVar

from choreo.events import Event


class HandlerRetried(Event):
    """A handler succeeded after failing `attempts - 1` times with a transient error."""

    event_type: ClassVar[str] = "choreo.HandlerRetried"
    of_event_id: str
    handled_type: str
    attempts: int
    last_error: str


class EventParked(Event):
    """A service parked an event in its dead letters (the saga's later events wait behind it)."""

    event_type: ClassVar[str] = "choreo.EventParked"
    of_event_id: str
    handled_type: str
    reason: str
    attempts: int


class RetryRequested(Event):
    """An operator asked `service` to run a parked event again (and release what waits behind it)."""

    event_type: ClassVar[str] = "choreo.RetryRequested"
    service: str
    dead_letter_id: int
    reason: str = ""


class SkipRequested(Event):
    """An operator asked `service` to mark a parked event handled without running it."""

    event_type: ClassVar[str] = "choreo.SkipRequested"
    service: str
    dead_letter_id: int
    reason: str


class DeadLetterResolved(Event):
    """A service ran a parked event again successfully (`retried`) or skipped it (`skipped`)."""

    event_type: ClassVar[str] = "choreo.DeadLetterResolved"
    of_event_id: str
    dead_letter_id: int
    status: str
    reason: str = ""


class CompensationForced(Event):
    """An operator failed the saga: every participant compensates what it completed."""

    event_type: ClassVar[str] = "choreo.CompensationForced"
    reason: str


OPERATOR_COMMANDS = frozenset({RetryRequested.event_type, SkipRequested.event_type})
