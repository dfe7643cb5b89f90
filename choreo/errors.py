"""Every error choreo raises, rooted at one base class.

    ChoreoError
    ├── WiringError (ValueError)            a service or system is wired wrongly
    │   └── SegmentsMismatch                a replica's number of segments is not its service's
    ├── EventError (ValueError)             an event cannot be used as it is
    │   ├── UnknownEventType (LookupError)  no event class has this type name
    │   ├── EventValidationError            the payload breaks the event's schema
    │   └── UpcastError                     an upcaster failed on an old event's payload
    ├── AggregateNotFound (LookupError)     ctx.load() of an aggregate that does not exist
    ├── CommandRefused (ValueError)         an operator command that could do harm; nothing written
    │   └── SagaNotFound (LookupError)      no event of the named saga is in the log
    ├── DeadLetterNotFound (LookupError)    a service has no dead letter with that id
    ├── StoreError (OSError)                the event store cannot be used
    │   ├── StoreURLError (ValueError)      the store URL is not one choreo understands
    │   ├── StoreCorrupt                    the file is not a usable choreo database
    │   ├── StoreLocked (TimeoutError)      the database stayed locked past the timeout
    │   ├── StoreNotFound (LookupError)     a read asked for a store (or service) that does not exist
    │   └── ClaimLost                       a replica no longer holds a segment it commits for; nothing written
    ├── LogRewound                          the log ends before a reader's saved position (lost broker data)
    ├── EventIdTaken                        an emitted event's id is already in the log for another event
    ├── EventTooLarge (ValueError)          an emitted event is larger than the log accepts
    └── ConcurrencyConflict                 another writer got there first; the batch is retried
        └── PartitionLost                   a replica's commit for a Kafka partition it no longer owns

`StepFailed` is not an error of choreo: handlers raise it to say that a saga step
failed for a business reason, which starts compensation.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from choreo.events import Event


class ChoreoError(Exception):
    """Base class of every error raised by choreo."""


class WiringError(ChoreoError, ValueError):
    """A service, handler, step or system is wired wrongly (raised at import or startup)."""


class EventError(ChoreoError, ValueError):
    """An event cannot be encoded, decoded or validated."""


class UnknownEventType(EventError, LookupError):
    """No registered event class has the given type name (or schema version)."""


class EventValidationError(EventError):
    """An event's payload violates its schema; the message names the type and field."""

    def __init__(self, event_type: str, field: str, message: str) -> None:
        self.event_type = event_type
        self.field = field
        super().__init__(f"{event_type}.{field}: {message}")


class UpcastError(EventError):
    """An upcaster raised, or returned something other than the payload(s) it declares."""


class AggregateNotFound(ChoreoError, LookupError):
    """`Context.load()` found no aggregate of that class with that key."""


class AggregateExists(ChoreoError):
    """`ctx.create()` was asked for an aggregate whose business key is taken."""


class CommandRefused(ChoreoError, ValueError):
    """An operator command was refused, writing nothing: it is malformed or could do harm.

    `state` is the saga's state when the saga's state is the reason (e.g. "completed").
    """

    def __init__(self, message: str, *, state: str | None = None) -> None:
        self.state = state
        super().__init__(message)


class SagaNotFound(CommandRefused, LookupError):
    """No event of the named saga is in the log."""



class DeadLetterNotFound(ChoreoError, LookupError):
    """The named service has no dead letter with that id."""


class StoreError(ChoreoError, OSError):
    """The event store cannot be opened or used."""


class StoreURLError(StoreError, ValueError):
    """The store URL is not one that choreo understands."""


class StoreCorrupt(StoreError):
    """The database file is not a SQLite database, or is damaged."""


class StoreLocked(StoreError, TimeoutError):
    """The database stayed locked by another writer for longer than the lock timeout."""


class StoreNotFound(StoreError, LookupError):
    """A read-only command named a store, service or read model that does not exist (nothing was created)."""


class ClaimLost(StoreError):
    """A replica's commit was refused, writing nothing: it no longer holds a segment of its batch.

    Another replica took the segment after this one's lease expired; this replica drops the
    segment and goes on with the others (see docs/scaling.md, "Replicas").
    """


class SegmentsMismatch(WiringError):
    """A replica was started with another number of segments than its service's work is split into."""


class LogRewound(ChoreoError):
    """A source of the log ends before the position a reader saved: the log lost data.

    Raised instead of silently waiting for offsets that will never come; an operator
    restores the log or resets the reader's positions (`choreo run --reset-positions`).
    """


class EventIdTaken(ChoreoError):
    """An event a handler emitted has an id that another event in the log already has."""


class EventTooLarge(ChoreoError, ValueError):
    """An event a handler emitted is larger than the log accepts."""


class ConcurrencyConflict(ChoreoError):
    """Another writer changed the same aggregate or tracking position first."""


class PartitionLost(ConcurrencyConflict):
    """A replica tried to commit for a Kafka partition that another replica of its service now owns.

    The commit is refused and nothing is written; the replica goes on with the partitions it owns.
    """


class StepFailed(Exception):
    """Raised by a step handler to fail the step with a failure event, which starts compensation."""

    def __init__(self, event: Event) -> None:
        self.event = event
        super().__init__(f"step failed: {type(event).__name__}")
