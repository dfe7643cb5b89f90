"""choreo's own events: what retries and parking did, and what operators asked for.

They go into the log like any other event, with the saga's id, so the saga
projection shows them in the saga's timeline. Operator commands are events too:
the service they name carries them out when it reads them, on SQLite and on Kafka.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import ClassVar
from uuid import uuid4

from choreo import clock
from choreo.errors import ChoreoError
from choreo.events import Envelope, Event, Outcome, encode_payload
from choreo.store import DeadLetter, EventStore


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


# -- the operator's API (the `choreo dlq` commands call these) -------------------------------

def list_dead_letters(
    store: EventStore, services: Iterable[str], *, status: str | None = "parked", saga_id: str | None = None
) -> list[DeadLetter]:
    """Every dead letter of the named services (only `status`, and only one saga, if given)."""
    out = [d for name in services for d in store.service(name).dead_letters(status)]
    return [d for d in out if saga_id is None or d.saga_id == saga_id]


def find_dead_letter(store: EventStore, ref: str) -> DeadLetter:
    """The dead letter named `SERVICE:ID` (as `choreo dlq list` prints it)."""
    service, _, number = ref.partition(":")
    if not number.isdigit():
        raise ChoreoError(f"not a dead letter reference: {ref!r} (expected SERVICE:ID, e.g. payment:3)")
    for d in store.service(service).dead_letters(None):
        if d.id == int(number):
            return d
    raise ChoreoError(f"no dead letter {ref!r}")


def request_retry(store: EventStore, letter: DeadLetter, reason: str = "") -> str:
    """Ask the letter's service to run it again, then what waits behind it; return the request's event id."""
    return _request(store, letter.saga_id, RetryRequested(service=letter.service, dead_letter_id=letter.id or 0,
                                                          reason=reason))


def request_skip(store: EventStore, letter: DeadLetter, reason: str) -> str:
    """Ask the letter's service to mark it handled without running it; return the request's event id."""
    if not reason:
        raise ChoreoError("skipping a parked event needs a reason")
    return _request(store, letter.saga_id, SkipRequested(service=letter.service, dead_letter_id=letter.id or 0,
                                                         reason=reason))


def force_compensation(store: EventStore, saga_id: str, reason: str) -> str:
    """Fail the saga so that every participant compensates what it completed; return the event id."""
    if not reason:
        raise ChoreoError("forcing compensation needs a reason")
    return _request(store, saga_id, CompensationForced(reason=reason), outcome=Outcome.FAILED)


def _request(store: EventStore, saga_id: str, event: Event, outcome: str | None = None) -> str:
    env = Envelope(
        event_id=str(uuid4()), type=event.event_type, version=event.schema_version, saga_id=saga_id,
        causation_id=None, service="operator", step=None, outcome=outcome, occurred_at=clock.now(),
        payload=encode_payload(event),
    )
    store.append([env])
    return env.event_id
