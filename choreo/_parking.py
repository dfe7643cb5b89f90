"""Parking and operator commands: what a service does with an event its handlers cannot handle.

An event whose handler keeps failing, or that cannot be decoded, is parked as a
dead letter with the reason (guarantee 6); later events of its saga wait behind
it in this service. Transient errors are retried with backoff first. Operators
retry or skip parked events with commands that go through the log like any
event; a command that is itself invalid is parked, never fatal.
"""

from __future__ import annotations

import logging
import time
import traceback
from collections.abc import Sequence
from dataclasses import replace
from datetime import datetime
from typing import TYPE_CHECKING

from choreo import clock
from choreo.errors import EventError, EventIdTaken
from choreo.events import Envelope, Event, decode_payload
from choreo.operations import DeadLetterResolved, EventParked, HandlerRetried, RetryRequested, SkipRequested
from choreo.store import DeadLetter

if TYPE_CHECKING:
    from choreo._unit_of_work import UnitOfWork
    from choreo.retry import RetryPolicy
    from choreo.service import Service
    from choreo.store import ServiceStore

log = logging.getLogger("choreo")


class Park(Exception):
    """An event that must be parked at once (not retried)."""

    def __init__(self, reason: str, error: str) -> None:
        self.reason = reason
        self.error = error
        super().__init__(reason)


class Parking:
    """The processor's retries, dead letters and operator commands (a part of `Processor`)."""

    service: Service
    own: ServiceStore
    retry: RetryPolicy
    held: set[str]

    def _new_uow(self) -> UnitOfWork:  # provided by Processor
        raise NotImplementedError

    def _handle(self, env: Envelope, uow: UnitOfWork) -> None:
        raise NotImplementedError

    def _commit(self, uow: UnitOfWork, done: Sequence[Envelope], parked: Sequence[DeadLetter] = (),
                updated: Sequence[DeadLetter] = ()) -> None:
        raise NotImplementedError

    def _handle_alone(
        self, env: Envelope, letter: DeadLetter | None = None, first_error: Exception | None = None
    ) -> bool:
        """Handle one event in its own transaction, retrying transient errors; park it if it still fails.

        `first_error` is how its first attempt (inside a batch) failed. With `letter`, the
        event is a parked one run again: success resolves the letter, failure leaves it
        parked with its attempts counted. Returns whether it was handled.
        """
        policy = self.service.retry_policy(env.type) or self.retry
        first_failed = letter.first_failed_at if letter else clock.now()
        attempts, last_error = 0, ""
        while True:
            attempts += 1
            uow = self._new_uow()
            try:
                if first_error is not None:  # attempt 1 already failed inside the batch
                    error, first_error = first_error, None
                    raise error
                self._handle(env, uow)
            except Park as p:
                uow.discard()
                self._park(env, p.reason, p.error, attempts, first_failed, letter)
                return False
            except Exception as e:
                uow.discard()
                if attempts >= policy.max_attempts or not policy.is_transient(e):
                    why = "failed" if policy.is_transient(e) else "failed with a non-transient error"
                    reason = f"handler {why} {attempts} time(s): {type(e).__name__}: {e}"
                    self._park(env, reason, traceback.format_exc(), attempts, first_failed, letter)
                    return False
                last_error = f"{type(e).__name__}: {e}"
                time.sleep(policy.delay(attempts))
                continue
            if attempts > 1:
                uow.emit(HandlerRetried(of_event_id=env.event_id, handled_type=env.type, attempts=attempts,
                                        last_error=last_error), env, step=self._step_of(env.type), tag="retried")
            try:
                if letter is None:
                    self._commit(uow, [env])
                else:
                    self._resolve(uow, letter, env, "retried", "")
            except EventIdTaken as e:  # not a conflict to retry: this event's handling is poison
                self._park(env, f"emits an event whose id is taken: {e}", str(e), attempts, first_failed, letter)
                return False
            return True

    def _resolve(self, uow: UnitOfWork, letter: DeadLetter, env: Envelope, status: str, reason: str) -> None:
        resolved = DeadLetterResolved(of_event_id=letter.event_id, dead_letter_id=letter.id or 0,
                                      status=status, reason=reason)
        uow.emit(resolved, env, tag=f"resolved-{letter.id}")
        self._commit(uow, [], updated=[replace(letter, status=status)])

    def _step_of(self, event_type: str) -> str | None:
        return next((h.step for h in self.service.handlers.get(event_type, ()) if h.kind == "step"), None)

    def _park(
        self, env: Envelope, reason: str, error: str, attempts: int, first: datetime, letter: DeadLetter | None,
        *, hold: bool = True,
    ) -> None:
        """Park `env` (or count another failure of the parked `letter`); with `hold`, its saga waits behind it."""
        log.error("%s: parked event %s (%s %s): %s", self.service.name, env.event_id, env.source, env.position, reason)
        uow = self._new_uow()
        if letter is not None:  # still failing: count the attempts, keep it parked
            again = replace(letter, attempts=letter.attempts + attempts, reason=reason, error=error,
                            last_failed_at=clock.now())
            self._commit(uow, [], updated=[again])
            self.held.add(env.saga_id)
            return
        dead = DeadLetter(
            service=self.service.name,
            position=env.position or 0,
            event_id=env.event_id,
            saga_id=env.saga_id if hold else "",
            type=env.type,
            reason=reason,
            error=error,
            attempts=attempts,
            first_failed_at=first,
            last_failed_at=clock.now(),
            envelope=raw_envelope(env),
        )
        parked = EventParked(of_event_id=env.event_id, handled_type=env.type, reason=reason, attempts=attempts)
        uow.emit(parked, env, step=self._step_of(env.type), tag="parked")
        self._commit(uow, [env], parked=[dead])

    # -- operator commands ----------------------------------------------------------------
    def _operate(self, env: Envelope) -> None:
        """Carry out an operator's retry or skip of a parked event, then release what waited behind it.

        A command that cannot be decoded is parked (without holding its saga: the
        operator's typo must not stop the saga).
        """
        try:
            command = decode_payload(env.type, env.version, env.payload)
        except EventError as e:
            self._park(env, f"invalid operator command: {e}", str(e), 1, clock.now(), None, hold=False)
            return
        assert isinstance(command, (RetryRequested, SkipRequested))
        letters = self.own.dead_letters("parked")
        target = next((d for d in letters if d.id == command.dead_letter_id), None)
        if target is None:
            log.warning("%s: %s names dead letter %s, which is not parked here", self.service.name,
                        env.type, command.dead_letter_id)
        else:
            queue = [d for d in letters if d.saga_id == target.saga_id and (d.id or 0) >= (target.id or 0)]
            self.held.discard(target.saga_id)
            if isinstance(command, SkipRequested):
                self._resolve(self._new_uow(), target, env, "skipped", command.reason)
                queue = queue[1:]
            for d in queue:
                if not self._handle_alone(envelope_of(d), letter=d):
                    break
            if any(d.saga_id == target.saga_id for d in self.own.dead_letters("parked")):
                self.held.add(target.saga_id)
        self._commit(self._new_uow(), [env])


def as_events(handler: object, result: object) -> list[Event]:
    """A handler's return value as a list of events; `WiringError` if it returned something else."""
    from choreo.errors import WiringError

    if result is None:
        return []
    items = list(result) if isinstance(result, (list, tuple)) else [result]
    for item in items:
        if not isinstance(item, Event):
            name = getattr(handler, "name", None) or getattr(handler, "__qualname__", repr(handler))
            raise WiringError(f"{name} returned {item!r}, which is not an Event")
    return items  # type: ignore[return-value]


def envelope_of(letter: DeadLetter) -> Envelope:
    """The envelope a dead letter keeps (as `raw_envelope` wrote it)."""
    raw = dict(letter.envelope)
    raw["occurred_at"] = datetime.fromisoformat(str(raw["occurred_at"]))
    return Envelope(**{k: v for k, v in raw.items() if k in Envelope.__dataclass_fields__})


def raw_envelope(env: Envelope) -> dict[str, object]:
    """An envelope as the JSON-ready dict a dead letter keeps."""
    raw = {k: getattr(env, k) for k in Envelope.__dataclass_fields__}
    raw["occurred_at"] = env.occurred_at.isoformat()
    return raw
