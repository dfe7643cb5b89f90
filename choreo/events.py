"""Events, their registry, and the envelope that every stored event carries.

An event is a frozen pydantic model. Its type name (the class name unless it
sets `event_type`) and `schema_version` identify it in the log; the registry
maps them back to the class when events are read.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, replace
from datetime import datetime
from enum import StrEnum
from typing import Any, ClassVar

from pydantic import BaseModel, ConfigDict, ValidationError

from choreo.errors import EventValidationError, UnknownEventType, WiringError


class Event(BaseModel):
    """Base class of domain events: an immutable, past-tense fact with a pydantic schema."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    event_type: ClassVar[str]
    schema_version: ClassVar[int] = 1

    @classmethod
    def __pydantic_init_subclass__(cls, **kwargs: Any) -> None:
        super().__pydantic_init_subclass__(**kwargs)
        if "event_type" not in cls.__dict__:
            cls.event_type = cls.__name__
        _register(cls)


class Outcome(StrEnum):
    """What an event says about the saga step it belongs to."""

    COMPLETED = "completed"
    FAILED = "failed"
    COMPENSATED = "compensated"
    SKIPPED = "skipped"


_registry: dict[tuple[str, int], type[Event]] = {}
_known_types: set[str] = set()
_current: dict[str, int] = {}
#: the upcasters by (type name, version they read), filled by `choreo.upcasting`
UPCASTERS: dict[tuple[str, int], Any] = {}


def _register(cls: type[Event]) -> None:
    key = (cls.event_type, cls.schema_version)
    known = _registry.get(key)
    if known is not None and _origin(known) != _origin(cls):
        raise WiringError(
            f"event type {cls.event_type!r} v{cls.schema_version} is defined twice: "
            f"by {_origin(known)} and by {_origin(cls)}; set a distinct `event_type`"
        )
    _registry[key] = cls
    _known_types.add(key[0])
    _current[key[0]] = max(_current.get(key[0], 0), key[1])


def _origin(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


def event_class(event_type: str, version: int = 1) -> type[Event]:
    """Return the registered event class for a type name and schema version."""
    try:
        return _registry[(event_type, version)]
    except KeyError:
        raise UnknownEventType(
            f"unknown event type {event_type!r} (schema version {version})"
        ) from None


def current_version(event_type: str) -> int | None:
    """The highest schema version registered for `event_type`, or None if it has no event class."""
    return _current.get(event_type)


def known_types() -> frozenset[str]:
    """The type names registered so far."""
    return frozenset(_known_types)


def is_known_type(event_type: str) -> bool:
    """Tell whether some schema version of `event_type` is registered."""
    return event_type in _known_types


def is_event_class(obj: object) -> bool:
    """Tell whether `obj` is a concrete event class."""
    return isinstance(obj, type) and issubclass(obj, Event) and obj is not Event


class StepSkipped(Event):
    """Recorded by choreo when a step's trigger arrives after its saga has failed."""

    event_type: ClassVar[str] = "choreo.StepSkipped"
    step: str
    reason: str


class StepCompensated(Event):
    """Recorded by choreo when a step is compensated without an event of its own to say so.

    The step has no compensation handler, or its handler emitted nothing; the saga's
    starter and the projection still learn that the step is undone.
    """

    event_type: ClassVar[str] = "choreo.StepCompensated"
    step: str
    reason: str


@dataclass(frozen=True, slots=True)
class Envelope:
    """A stored event with its metadata: identity, correlation, causation, step and position.

    `source` names where `position` counts: "log" for the SQLite log (one global
    order), "TOPIC:PARTITION" on Kafka (position = offset + 1). `malformed` says why
    a record could not be read as an envelope; such an envelope is parked, never run.
    `trace` is the W3C `traceparent` of the span that wrote it (None without tracing;
    see `choreo.tracing`).
    """

    event_id: str
    type: str
    version: int
    saga_id: str
    causation_id: str | None
    service: str
    step: str | None
    outcome: str | None
    occurred_at: datetime
    payload: str
    position: int | None = None
    source: str = "log"
    malformed: str | None = None
    trace: str | None = None

    def decode(self) -> Event:
        """Return the event, validated against its schema."""
        return decode_payload(self.type, self.version, self.payload)

    def at(self, position: int) -> Envelope:
        """Return this envelope with its log position set."""
        return replace(self, position=position)

    def to_dict(self) -> dict[str, Any]:
        """Return the envelope as a JSON-ready dict (the payload as an object)."""
        return {
            "event_id": self.event_id,
            "type": self.type,
            "version": self.version,
            "saga_id": self.saga_id,
            "causation_id": self.causation_id,
            "service": self.service,
            "step": self.step,
            "outcome": self.outcome,
            "occurred_at": self.occurred_at.isoformat(),
            "position": self.position,
            "source": self.source,
            "payload": json.loads(self.payload),
        }


def encode_payload(event: Event) -> str:
    """Return the event's JSON payload, checking that it is a registered event."""
    if not isinstance(event, Event):
        raise EventValidationError(type(event).__name__, "__root__", "is not a choreo Event")
    return event.model_dump_json()


def decode_payload(event_type: str, version: int, payload: str | bytes) -> Event:
    """Validate a JSON payload against the registered schema and return the event.

    A payload of an older version (or of a renamed type) is first upcast to the current
    schema (`choreo.upcasting`); of an event split in several, this is the first.
    """
    if UPCASTERS and (event_type, version) in UPCASTERS:
        from choreo.upcasting import upcast_payload

        event_type, version, data = upcast_payload(event_type, version, payload)[0]
        cls = event_class(event_type, version)
        try:
            return cls.model_validate_json(json.dumps(data))
        except ValidationError as e:
            first = e.errors()[0]
            field = ".".join(str(p) for p in first["loc"]) or "__root__"
            raise EventValidationError(event_type, field, f"{first['msg']} (after upcasting)") from None
    cls = event_class(event_type, version)
    try:
        return cls.model_validate_json(payload)
    except ValidationError as e:
        first = e.errors()[0]
        field = ".".join(str(p) for p in first["loc"]) or "__root__"
        raise EventValidationError(event_type, field, first["msg"]) from None
