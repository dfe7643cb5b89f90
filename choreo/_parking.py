"""Failures, retries, dead letters and operator commands: what a service does with an event it cannot handle.

A handler that fails with a transient error is tried again later, without blocking
the service: its event becomes a dead letter with status `retrying` and the due time
of the next attempt (`RetryPolicy`, on choreo's clock), in the service's own store, and
the saga's later events for this service wait behind it while other sagas flow. When
the attempts run out, or the error is not transient, or the event cannot be decoded,
the letter is `parked` with the reason (guarantee 6), until an operator retries or
skips it. Operator commands go through the log like any event; a command that is
itself invalid is parked, never fatal.
"""

from __future__ import annotations

import logging
import traceback
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import replace
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Any

from choreo import clock, logs, metrics, tracing
from choreo.errors import EventError, EventIdTaken, WiringError
from choreo.events import Envelope, Event, decode_payload
from choreo.operations import (
    CompensationRequested, DeadLetterResolved, EventParked, HandlerRetried, RetryRequested, SkipRequested,
)
from choreo.store import HOLDING, PARKED, RETRYING, DeadLetter
from choreo.upcasting import UPCAST_FAILED, upcast_envelope

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
    next_retry_at: datetime | None

    if TYPE_CHECKING:  # provided by the other parts of Processor (nothing at run time: no shadowing)
        def _new_uow(self) -> UnitOfWork: ...
        async def _handle(self, env: Envelope, uow: UnitOfWork) -> None: ...
        async def _commit(self, uow: UnitOfWork, done: Sequence[Envelope], parked: Sequence[DeadLetter] = (),
                          updated: Sequence[DeadLetter] = ()) -> None: ...
        async def _io(self, fn: Callable[..., Any], *args: Any) -> Any: ...
        async def _force_failure(self, env: Envelope, command: CompensationRequested) -> None: ...
        def _mine(self, saga_id: str) -> bool: ...

    # -- one attempt ----------------------------------------------------------------------
    async def _attempt(self, env: Envelope, letter: DeadLetter | None = None,
                       first_error: Exception | None = None) -> bool:
        """Handle one event in its own transaction; record a failure as a retry or a parked letter.

        `first_error` is how it already failed inside a batch. With `letter`, the event is a
        dead letter run again: success resolves it. Returns whether it was handled.
        """
        uow = self._new_uow()
        error: Exception
        try:
            if first_error is not None:
                raise first_error
            with tracing.attempt(letter.attempts + 1 if letter is not None else 1):
                await self._handle(env, uow)
        except Exception as e:
            error = e
        else:
            if letter is not None:
                self._resolved(uow, letter, env)
            try:  # a store error here is not the handler's: it propagates (the batch is read again)
                await self._commit(uow, [env] if letter is None else [],
                                   updated=[replace(letter, status="retried", due_at=None)] if letter else ())
                if letter is not None:
                    metrics.handled(self.service.name, [env])
                return True
            except EventIdTaken as e:  # not a conflict to retry: this event's handling is poison
                error = Park(f"emits an event whose id is taken: {e}", str(e))
        uow.discard()
        failed = self._new_uow()
        if letter is None:
            dead = self._letter(env, error, failed)
            await self._commit(failed, [env], parked=[dead])
        else:
            await self._commit(failed, [], updated=[self._again(letter, env, error, failed)])
        return False

    def _resolved(self, uow: UnitOfWork, letter: DeadLetter, env: Envelope) -> None:
        """Say, in `uow`, that a dead letter ran again successfully."""
        attempts = letter.attempts + 1
        if letter.status == RETRYING:  # choreo's own retry: as if the handler had succeeded late
            uow.emit(HandlerRetried(of_event_id=env.event_id, handled_type=env.type, attempts=attempts,
                                    last_error=letter.error.strip().splitlines()[-1] if letter.error else ""),
                     env, step=self._step_of(env.type), tag="retried")
        else:
            uow.emit(DeadLetterResolved(of_event_id=letter.event_id, dead_letter_id=letter.id or 0,
                                        status="retried", reason=""), env, tag=f"resolved-{letter.id}")

    def _letter(self, env: Envelope, error: Exception, uow: UnitOfWork, *, hold: bool = True) -> DeadLetter:
        """The dead letter of an event's first failure: retrying if the policy allows, else parked."""
        now = clock.now()
        dead = DeadLetter(
            service=self.service.name, position=env.position or 0, event_id=env.event_id,
            saga_id=env.saga_id if hold else "", type=env.type, reason="", error="", attempts=0,
            first_failed_at=now, last_failed_at=now, envelope=raw_envelope(env), status=RETRYING,
        )
        return self._again(dead, env, error, uow)

    def _again(self, letter: DeadLetter, env: Envelope, error: Exception, uow: UnitOfWork) -> DeadLetter:
        """`letter` after one more failed attempt: retried later, or parked (with `EventParked` in `uow`)."""
        policy = self.service.retry_policy(env.type) or self.retry
        attempts = letter.attempts + 1
        now = clock.now()
        if isinstance(error, Park):
            reason, text = error.reason, error.error
        else:
            text = "".join(traceback.format_exception(error))
            transient = policy.is_transient(error)
            if transient and attempts < policy.max_attempts and letter.status != PARKED:
                due = now + timedelta(seconds=policy.delay(attempts))
                log.info("%s: event %s (%s %s) failed (attempt %d of %d): %s: %s; next attempt at %s",
                            self.service.name, env.event_id, env.source, env.position, attempts,
                            policy.max_attempts, type(error).__name__, error, due.isoformat(),
                            extra=logs.fields(self.service.name, env))
                self.next_retry_at = min(self.next_retry_at or due, due)
                metrics.retried(self.service.name, env.type)
                return replace(letter, status=RETRYING, attempts=attempts, last_failed_at=now, due_at=due,
                               reason=f"attempt {attempts} of {policy.max_attempts} failed: "
                                      f"{type(error).__name__}: {error}", error=text)
            why = "failed" if transient else "failed with a non-transient error"
            reason = f"handler {why} {attempts} time(s): {type(error).__name__}: {error}"
        log.error("%s: parked event %s (%s %s): %s", self.service.name, env.event_id, env.source, env.position,
                  reason, extra=logs.fields(self.service.name, env))
        metrics.parked(self.service.name, env.type)
        if letter.status != PARKED:
            uow.emit(EventParked(of_event_id=env.event_id, handled_type=env.type, reason=reason, attempts=attempts),
                     env, step=self._step_of(env.type), tag="parked")
        return replace(letter, status=PARKED, attempts=attempts, last_failed_at=now, due_at=None, reason=reason,
                       error=text)

    def _step_of(self, event_type: str) -> str | None:
        return next((h.step for h in self.service.handlers.get(event_type, ()) if h.kind == "step"), None)

    # -- running dead letters again ----------------------------------------------------------
    async def _run_due_retries(self) -> None:
        """Run the attempts that are due, each saga's letters in order (what waited behind one follows it)."""
        if self.next_retry_at is None or self.next_retry_at > clock.now():
            return
        due = await self._io(self.own.due_retries, clock.now())
        for letter in due:
            if self._mine(letter.saga_id):
                await self._release(letter)
        pending = [d.due_at for d in await self._io(self.own.dead_letters, RETRYING)
                   if d.due_at and self._mine(d.saga_id)]
        self.next_retry_at = min(pending, default=None)

    async def _release(self, first: DeadLetter, skip_reason: str | None = None, cause: Envelope | None = None) -> None:
        """Run `first` again (or skip it), then the saga's letters behind it, in order, until one fails."""
        queue = [d for d in await self._letters_of(first.saga_id) if (d.id or 0) >= (first.id or 0)]
        self.held.discard(first.saga_id)
        if skip_reason is not None and queue:
            uow = self._new_uow()
            uow.emit(DeadLetterResolved(of_event_id=first.event_id, dead_letter_id=first.id or 0, status="skipped",
                                        reason=skip_reason), cause or envelope_of(first), tag=f"resolved-{first.id}")
            await self._commit(uow, [], updated=[replace(queue[0], status="skipped", due_at=None)])
            queue = queue[1:]
        for d in queue:
            if not await self._attempt(envelope_of(d), letter=d):
                break
        if await self._letters_of(first.saga_id):
            self.held.add(first.saga_id)

    async def _letters_of(self, saga_id: str) -> list[DeadLetter]:
        """The letters that hold `saga_id` in this service, oldest first."""
        letters = await self._io(self.own.dead_letters, None)
        return [d for d in letters if d.status in HOLDING and d.saga_id == saga_id]

    # -- operator commands ----------------------------------------------------------------
    async def _operate(self, env: Envelope) -> None:
        """Carry out an operator's retry or skip of a dead letter, then release what waited behind it.

        A command that cannot be decoded is parked (without holding its saga: the
        operator's typo must not stop the saga).
        """
        try:
            command = decode_payload(env.type, env.version, env.payload)
        except EventError as e:
            uow = self._new_uow()
            dead = self._letter(env, Park(f"invalid operator command: {e}", str(e)), uow, hold=False)
            await self._commit(uow, [env], parked=[dead])
            return
        if isinstance(command, CompensationRequested):
            await self._force_failure(env, command)
            return
        assert isinstance(command, (RetryRequested, SkipRequested))
        letters = await self._io(self.own.dead_letters, None)
        target = next((d for d in letters if d.id == command.dead_letter_id), None)
        if target is not None and target.status not in HOLDING:
            # resolved already (a command read again after a failed commit): release what still waits behind it
            target = next((d for d in letters if d.saga_id == target.saga_id and d.status in HOLDING
                           and (d.id or 0) > (target.id or 0)), None)
        if target is None:
            log.warning("%s: %s names dead letter %s, which is not waiting here", self.service.name,
                        env.type, command.dead_letter_id, extra=logs.fields(self.service.name, env))
        else:
            skip = command.reason if isinstance(command, SkipRequested) and target.id == command.dead_letter_id \
                else None
            await self._release(target, skip_reason=skip, cause=env)
        await self._commit(self._new_uow(), [env])


async def call(fn: Callable[..., Any], *args: Any) -> Any:
    """Call a handler, awaiting it if it is `async def`."""
    result = fn(*args)
    if isinstance(result, Awaitable):
        result = await result
    return result


def as_events(handler: object, result: object) -> list[Event]:
    """A handler's return value as a list of events; `WiringError` if it returned something else."""
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
    env = Envelope(**{k: v for k, v in raw.items() if k in Envelope.__dataclass_fields__})
    if env.malformed is not None and env.malformed.startswith(UPCAST_FAILED):
        env = replace(env, malformed=None)  # parked because its upcaster failed: try the upcasters again
    return upcast_envelope(env)[0]  # parked before an upgrade: read as the current schema


def raw_envelope(env: Envelope) -> dict[str, object]:
    """An envelope as the JSON-ready dict a dead letter keeps."""
    raw = {k: getattr(env, k) for k in Envelope.__dataclass_fields__}
    raw["occurred_at"] = env.occurred_at.isoformat()
    return raw
