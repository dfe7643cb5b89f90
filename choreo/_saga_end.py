"""How the service that starts a saga learns, exactly once, that the saga ended (guarantee 9).

The starter reads every step outcome of its sagas from the log and keeps what it saw
in its own `Participation` record of the saga. The saga **completed** when every step
of its definition completed and no failure was seen; it **failed** once a failure was
seen (a step's, a deadline's or an operator's), every step that completed has been
compensated, and the step after the furthest one that ran has failed or been skipped
(it may have been in flight when a deadline or an operator failed the saga). The verdict, the `SagaCompleted`/`SagaFailed` event and the user's end
handler's events are one transaction with the record's `SagaEnded` mark, so a saga
ends once and never both ways, whatever the order in which outcomes arrive.
"""

from __future__ import annotations

import json
from collections.abc import Mapping

from choreo._participation import Participation
from choreo.events import Envelope, Event, Outcome
from choreo.saga import SagaCompleted, SagaDefinition, SagaFailed


def observe(part: Participation, env: Envelope) -> None:
    """Record in the starter's record what a step outcome event says about the saga."""
    if env.outcome == Outcome.FAILED and part.saga_failure is None:
        part.observe_failure(env.event_id, env.type, env.step, _reason(env.payload))
    if env.step and env.outcome and env.step not in part.steps_with(env.outcome):
        part.observe(env.step, env.outcome)


def verdict(part: Participation, sagas: Mapping[str, SagaDefinition]) -> Event | None:
    """The event that ends the saga now, or None while it is still running or already ended."""
    definition = sagas.get(part.saga_type or "")
    if definition is None or part.ended is not None:
        return None
    completed = part.steps_with(Outcome.COMPLETED)
    failure = part.saga_failure
    if failure is None:
        if all(step in completed for step in definition.steps):
            return SagaCompleted(saga=definition.name, steps=list(definition.steps))
        return None
    compensated = part.steps_with(Outcome.COMPENSATED)
    if not completed <= compensated:
        return None  # some participant still has to undo its step
    if not _frontier_resolved(definition, part):
        return None  # the next step may still be running: it will complete (then undo) or be skipped
    order = {step: i for i, step in enumerate(definition.steps)}
    ordered = sorted(compensated, key=lambda s: (order.get(s, len(order)), s))
    return SagaFailed(
        saga=definition.name,
        failure_event_id=str(failure["event_id"]),
        failure_type=str(failure["type"]),
        failed_step=failure["step"],  # type: ignore[arg-type]
        reason=str(failure["reason"]),
        compensated=ordered,
        skipped=sorted(part.steps_with(Outcome.SKIPPED)),
    )


def _frontier_resolved(definition: SagaDefinition, part: Participation) -> bool:
    """Whether the step after the furthest one that ran has failed or been skipped (or there is none).

    Steps run in the definition's order, each triggered by the one before it, so the step
    after the furthest completed one may be in flight when the saga fails (a deadline, an
    operator); its service will either complete and then compensate it, or skip it.
    """
    ran = part.steps_with(Outcome.COMPLETED) | part.steps_with(Outcome.COMPENSATED)
    furthest = max((i for i, step in enumerate(definition.steps) if step in ran), default=-1)
    if furthest + 1 >= len(definition.steps):
        return True
    frontier = definition.steps[furthest + 1]
    return frontier in part.steps_with(Outcome.FAILED) or frontier in part.steps_with(Outcome.SKIPPED)


def _reason(payload: str) -> str:
    """The `reason` field of a failure event's payload, if it has one."""
    try:
        data = json.loads(payload)
    except ValueError:
        return ""
    reason = data.get("reason") if isinstance(data, dict) else None
    return reason if isinstance(reason, str) else ""
