"""choreo's own events: what retries and parking did, and what operators asked for.

They go into the log like any other event, with the saga's id, so the saga
projection shows them in the saga's timeline. Operator commands are events too:
the service they name carries them out when it reads them, on SQLite and on Kafka.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import ClassVar
from uuid import uuid4

from choreo import clock
from choreo.errors import CommandRefused, DeadLetterNotFound, SagaNotFound
from choreo.events import Envelope, Event, Outcome, encode_payload
from choreo.saga import SagaCompleted, SagaDefinition, SagaFailed
from choreo.store import HOLDING, DeadLetter, EventStore
from choreo.upcasting import upcasting_feed


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


class CompensationRequested(Event):
    """An operator asked the service that started the saga to fail it, unless it already ended.

    That service decides, in log order: if its record of the saga has not ended, it emits
    `CompensationForced` (so every participant compensates); if it has, it refuses with
    `CompensationRefused`. So a saga never both completes and compensates.
    """

    event_type: ClassVar[str] = "choreo.CompensationRequested"
    service: str
    reason: str


class CompensationRefused(Event):
    """The service that started the saga refused an operator's compensation: the saga had ended."""

    event_type: ClassVar[str] = "choreo.CompensationRefused"
    reason: str
    state: str


OPERATOR_COMMANDS = frozenset({RetryRequested.event_type, SkipRequested.event_type,
                               CompensationRequested.event_type})


@dataclass(frozen=True)
class SagaStatus:
    """What the log says of one saga: its number of events, its state, and the event that ended it."""

    saga_id: str
    events: int
    #: "running", "compensating" (a failure seen, not ended yet), "completed" or "failed".
    state: str
    ended_by: str | None = None
    #: the service that appended the saga's start event (it decides the saga's end)
    starter: str | None = None


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
        raise CommandRefused(f"not a dead letter reference: {ref!r} (expected SERVICE:ID, e.g. payment:3)")
    for d in store.service(service).dead_letters(None):
        if d.id == int(number):
            return d
    raise DeadLetterNotFound(f"no dead letter {ref!r}")


def request_retry(store: EventStore, letter: DeadLetter, reason: str = "") -> str:
    """Ask the letter's service to run it again, then what waits behind it; return the request's event id.

    Refused (`CommandRefused`, nothing written) for a letter that is not waiting any more.
    """
    _waiting(letter)
    return _request(store, letter.saga_id, RetryRequested(service=letter.service, dead_letter_id=letter.id or 0,
                                                          reason=reason))


def request_skip(store: EventStore, letter: DeadLetter, reason: str) -> str:
    """Ask the letter's service to mark it handled without running it; return the request's event id."""
    if not reason:
        raise CommandRefused("skipping a parked event needs a reason")
    _waiting(letter)
    return _request(store, letter.saga_id, SkipRequested(service=letter.service, dead_letter_id=letter.id or 0,
                                                         reason=reason))


def force_compensation(
    store: EventStore, saga_id: str, reason: str, *, sagas: Iterable[SagaDefinition] = ()
) -> str:
    """Fail a running saga so that every participant compensates what it completed; return the event id.

    Refused, writing nothing, for a saga with no event in the log (`SagaNotFound`) and for
    one that already ended (`CommandRefused`, with its state): undoing a completed saga is
    a new business process, not a compensation. A saga ended when choreo's
    `SagaCompleted`/`SagaFailed`, or an end event of its definition among `sagas`, is in
    the log, or every step of its definition completed (see `saga_status()`, which reads the
    whole log once). The request goes to the service that started the saga, which fails it
    only if its own record of the saga has not ended by the time it reads the request; so
    a saga that ends between this check and the request is refused there, not undone.
    """
    if not reason:
        raise CommandRefused("forcing compensation needs a reason")
    status = saga_status(store, saga_id, sagas)
    if status is None:
        raise SagaNotFound(f"no saga {saga_id!r} in the log of {store.url}: nothing was written")
    if status.ended_by is not None:
        raise CommandRefused(
            f"saga {saga_id} already {status.state} ({status.ended_by} is in the log): nothing was written; "
            "undoing a finished saga is a new business process, not a compensation",
            state=status.state,
        )
    if status.starter:  # the starter decides, in log order, so that the saga never ends both ways
        return _request(store, saga_id, CompensationRequested(service=status.starter, reason=reason))
    return _request(store, saga_id, CompensationForced(reason=reason), outcome=Outcome.FAILED)


def saga_status(store: EventStore, saga_id: str, sagas: Iterable[SagaDefinition] = ()) -> SagaStatus | None:
    """Read the whole log once and say what it holds of one saga; None if it has no event of it.

    It ended with choreo's `SagaCompleted` or `SagaFailed`, or with an end event of the
    definition (among `sagas`) whose start event it has: then it failed if a failure
    outcome came before, else completed. This needs neither the saga projection nor a
    system, only the log.
    """
    # (type, step, outcome, causation, service) of each of the saga's events, in log order
    events: list[tuple[str, str | None, str | None, str | None, str]] = []
    feed = upcasting_feed(store.feed(f"operator-{uuid4()}", dict, group=False))
    try:
        while rows := feed.poll_rows(5000, store.idle_timeout):
            events += [(row[2], row[7], row[8], row[5], row[6]) for row in rows if row[4] == saga_id]
    finally:
        feed.close()
    if not events:
        return None
    starter = next((service for _, _, _, cause, service in events if cause is None and service != "operator"), None)
    types = {kind for kind, *_ in events}
    started = [d for d in sagas if d.start.event_type in types]
    end_types = {t for d in started for t in d.end_types}
    count = len(events)
    failing, completed = False, set()
    for kind, step, outcome, _, _ in events:
        if kind == SagaCompleted.event_type:
            return SagaStatus(saga_id, count, "completed", kind, starter)
        if kind == SagaFailed.event_type:
            return SagaStatus(saga_id, count, "failed", kind, starter)
        if kind in end_types:
            return SagaStatus(saga_id, count, "failed" if failing else "completed", kind, starter)
        failing = failing or outcome == Outcome.FAILED
        if step and outcome == Outcome.COMPLETED:
            completed.add(step)
        if not failing and any(d.steps and set(d.steps) <= completed for d in started):
            return SagaStatus(saga_id, count, "completed", f"{kind} (every step completed)", starter)
    return SagaStatus(saga_id, count, "compensating" if failing else "running", None, starter)


def _waiting(letter: DeadLetter) -> None:
    """Refuse a command on a dead letter that no longer waits (it was retried or skipped already)."""
    if letter.status not in HOLDING:
        raise CommandRefused(
            f"dead letter {letter.service}:{letter.id} is {letter.status}, not waiting: nothing was written",
            state=letter.status,
        )


def _request(store: EventStore, saga_id: str, event: Event, outcome: str | None = None) -> str:
    env = Envelope(
        event_id=str(uuid4()), type=event.event_type, version=event.schema_version, saga_id=saga_id,
        causation_id=None, service="operator", step=None, outcome=outcome, occurred_at=clock.now(),
        payload=encode_payload(event),
    )
    store.append([env])
    return env.event_id
