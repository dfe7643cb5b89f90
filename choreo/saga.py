"""Saga definitions: an optional, declarative description of a saga type (not an orchestrator)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

from choreo.errors import WiringError
from choreo.events import Event, is_event_class


@dataclass(frozen=True)
class SagaDefinition:
    """A saga type: the event that starts it, its steps in order, and the events that end it.

    The steps run one after another, each triggered by an event of the one before (or by
    the start event): that is how the service that starts the saga knows, after a failure,
    that no further step can still be running. `System` refuses two steps with one trigger.
    """

    name: str
    start: type[Event]
    steps: tuple[str, ...]
    end: tuple[type[Event], ...] = field(default=())

    def __post_init__(self) -> None:
        for cls in (self.start, *self.end):
            if not is_event_class(cls):
                raise WiringError(f"saga {self.name!r}: {cls!r} is not an Event subclass")
        if len(set(self.steps)) != len(self.steps):
            raise WiringError(f"saga {self.name!r}: a step is listed twice in {self.steps}")
        object.__setattr__(self, "steps", tuple(self.steps))
        object.__setattr__(self, "end", tuple(self.end))
        object.__setattr__(self, "end_types", frozenset(cls.event_type for cls in self.end))

    #: Type names of the events that end this saga.
    end_types: frozenset[str] = field(init=False, repr=False, compare=False)


class SagaCompleted(Event):
    """Emitted by choreo, once, by the service that starts a saga: every step of its definition completed."""

    event_type: ClassVar[str] = "choreo.SagaCompleted"
    saga: str
    steps: list[str]


class SagaFailed(Event):
    """Emitted by choreo, once, by the service that starts a saga: it failed and every completed step is undone.

    `failed_step` is None when the failure was not a step's (a deadline, an operator).
    `compensated` and `skipped` list the steps undone and the steps that never ran.
    """

    event_type: ClassVar[str] = "choreo.SagaFailed"
    saga: str
    failure_event_id: str
    failure_type: str
    failed_step: str | None = None
    reason: str = ""
    compensated: list[str] = []
    skipped: list[str] = []


#: The type names of the events by which choreo ends a saga.
SAGA_ENDS = frozenset({SagaCompleted.event_type, SagaFailed.event_type})
