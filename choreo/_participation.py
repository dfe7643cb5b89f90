"""A service's own event-sourced record of its part in one saga (guarantees 3 and 9)."""

from __future__ import annotations

from functools import lru_cache
from uuid import UUID

from choreo.aggregates import Aggregate, aggregate_id, event


class Participation(Aggregate):
    """What one service did in one saga: steps completed, compensated, skipped; failure seen.

    The service that starts the saga also keeps here what it observed of every step
    (`observed`), the saga's first failure, and how the saga ended, so it ends the saga
    exactly once (see `choreo._saga_end`).
    """

    @event("Joined")
    def __init__(
        self,
        service: str,
        saga_id: str,
        completed: dict[str, dict[str, object]] | None = None,
        saga_type: str | None = None,
    ) -> None:
        self.service = service
        self.saga_id = saga_id
        self.completed: dict[str, dict[str, object]] = dict(completed or {})
        self.compensated: list[str] = []
        self.skipped: list[str] = []
        self.failed_steps: list[str] = []
        self.failure_event_id: str | None = None
        # kept by the service that starts the saga
        self.saga_type = saga_type
        self.observed: dict[str, set[str]] = {}
        self.saga_failure: dict[str, object] | None = None
        self.ended: str | None = None

    @property
    def saga_failed(self) -> bool:
        """Whether this service has seen a failure of the saga."""
        return self.failure_event_id is not None

    def has_handled(self, step: str) -> bool:
        """Whether the step was already completed, failed or skipped here."""
        return step in self.completed or step in self.failed_steps or step in self.skipped

    @event("StepCompleted")
    def step_completed(self, step: str, event_id: str, event_type: str, version: int, payload: str) -> None:
        """Record that this service completed `step`, with its completion event (to compensate it later)."""
        self.completed[step] = completion(event_id, event_type, version, payload)

    @event("StepFailed")
    def step_failed(self, step: str) -> None:
        """Record that this service's `step` failed."""
        self.failed_steps.append(step)

    @event("FailureSeen")
    def failure_seen(self, event_id: str) -> None:
        """Record that this service saw the saga fail (event `event_id`)."""
        self.failure_event_id = event_id

    @event("StepCompensated")
    def step_compensated(self, step: str) -> None:
        """Record that this service compensated `step`."""
        self.compensated.append(step)

    @event("StepSkipped")
    def step_skipped(self, step: str) -> None:
        """Record that `step` was skipped: its trigger came after the saga failed."""
        self.skipped.append(step)

    def to_compensate(self) -> list[str]:
        """Completed steps not compensated yet, most recent first."""
        return [s for s in reversed(self.completed) if s not in self.compensated]

    # -- the starter's view of the whole saga ---------------------------------------------
    @event("SagaTracked")
    def track(self, saga_type: str) -> None:
        """Record which saga definition this saga follows (its start event was read)."""
        self.saga_type = saga_type

    @event("OutcomeObserved")
    def observe(self, step: str, outcome: str) -> None:
        """Record that `step` was seen with `outcome`."""
        self.observed.setdefault(outcome, set()).add(step)

    @event("SagaFailureObserved")
    def observe_failure(self, event_id: str, event_type: str, step: str | None, reason: str) -> None:
        """Record the saga's first failure: the event, its type, the step that failed (if any), the reason."""
        self.saga_failure = {"event_id": event_id, "type": event_type, "step": step, "reason": reason}

    @event("SagaEnded")
    def end(self, outcome: str) -> None:
        """Record that the saga ended (`completed` or `failed`)."""
        self.ended = outcome

    def steps_with(self, outcome: str) -> set[str]:
        """The steps observed with `outcome` (completed, failed, compensated, skipped)."""
        return self.observed.get(outcome, set())


def completion(event_id: str, event_type: str, version: int, payload: str) -> dict[str, object]:
    """What a participation keeps of a step's completion event (to compensate it later)."""
    return {"event_id": event_id, "type": event_type, "version": version, "payload": payload}


@lru_cache(maxsize=65_536)
def participation_id(service: str, saga_id: str) -> UUID:
    """Return the id of `service`'s participation record for `saga_id`."""
    return aggregate_id(Participation, f"{service}/{saga_id}")
