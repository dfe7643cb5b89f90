"""Deadlines as the processor runs them: scheduled and cancelled with events, fired when due.

A deadline is scheduled and cancelled in the same transaction as the event that
does it. A deadline whose handler fails is tried again later, by the service's retry
policy, then marked `failed`, with a dead letter of that status and `EventParked` in the
saga's timeline; it never blocks the deadlines due after it. A due deadline fires only once the service has read the log to its end
(so an end that is already in the log, after downtime say, cancels it first), and
never for a saga that ended: the end cancels every deadline of the saga. Firing
is one transaction: the expiry event and the `fired` mark.
"""

from __future__ import annotations

import logging
import traceback
from collections.abc import Callable, Sequence
from datetime import timedelta
from dataclasses import replace
from typing import TYPE_CHECKING, Any

from choreo import clock, logs, tracing
from choreo._parking import as_events, raw_envelope
from choreo._saga_end import observe
from choreo.context import Context
from choreo.deadlines import CANCELLED, FAILED, FIRED, RESCHEDULED, SAGA_ENDED, SCHEDULED, Deadline, deadline_id
from choreo.errors import ConcurrencyConflict, StoreError
from choreo.operations import EventParked
from choreo.store import DeadLetter
from choreo.events import Envelope, Outcome, decode_payload
from choreo.saga import SAGA_ENDS

if TYPE_CHECKING:
    from choreo._participation import Participation
    from choreo._unit_of_work import UnitOfWork
    from choreo.service import Service
    from choreo.retry import RetryPolicy
    from choreo.store import Feed, ServiceStore

log = logging.getLogger("choreo")


class Timers:
    """The processor's deadlines (a part of `Processor`)."""

    service: Service
    own: ServiceStore
    feed: Feed
    retry: RetryPolicy
    _has_steps: bool
    #: failed attempts of each deadline, in this process (a restart gives it a full round again)
    deadline_failures: dict[str, int]

    if TYPE_CHECKING:  # provided by the other parts of Processor (nothing at run time: no shadowing)
        def _new_uow(self) -> UnitOfWork: ...
        def _participation(self, uow: UnitOfWork, saga_id: str, create: bool = True) -> Participation: ...
        async def _failed(self, uow: UnitOfWork, failure: Envelope) -> Participation: ...
        async def _commit(self, uow: UnitOfWork, done: Sequence[Envelope], parked: Sequence[DeadLetter] = (),
                          updated: Sequence[DeadLetter] = ()) -> None: ...
        async def _call(self, fn: Callable[..., Any], *args: Any) -> Any: ...
        async def _io(self, fn: Callable[..., Any], *args: Any) -> Any: ...
        def _mine(self, saga_id: str) -> bool: ...

    def _schedule(self, env: Envelope, uow: UnitOfWork) -> None:
        """Schedule or cancel this service's deadlines that `env` starts or cancels."""
        if env.type in SAGA_ENDS:
            self._cancel_deadlines(env, uow)
            return
        service = self.service.name
        for spec in self.service.deadlines.values():
            if env.type == spec.start_on.event_type:
                uow.deadlines.append(Deadline(
                    id=deadline_id(service, env.saga_id, spec.name), service=service, name=spec.name,
                    saga_id=env.saga_id, due_at=clock.now() + spec.after, status=SCHEDULED,
                    cause_event_id=env.event_id, cause_type=env.type, cause_version=env.version,
                    cause_payload=env.payload,
                ))
            elif env.type in spec.cancel_types:
                uow.deadlines.append(self._cancelled(spec.name, env))

    def _cancel_deadlines(self, cause: Envelope, uow: UnitOfWork) -> None:
        """Cancel whatever of this service's deadlines for the saga is still scheduled (it ended)."""
        if self.service.deadlines:
            uow.deadlines.append(Deadline(id="", service=self.service.name, name="*", saga_id=cause.saga_id,
                                          due_at=clock.now(), status=SAGA_ENDED, cause_event_id=cause.event_id))

    def _cancelled(self, name: str, cause: Envelope) -> Deadline:
        return Deadline(
            id=deadline_id(self.service.name, cause.saga_id, name), service=self.service.name, name=name,
            saga_id=cause.saga_id, due_at=clock.now(), status=CANCELLED, cause_event_id=cause.event_id,
        )

    async def _fire_due_deadlines(self) -> None:
        """Fire every due deadline, each in its own transaction with its `fired` mark.

        Only once the feed has read the log to its end; a deadline of a saga this service
        saw end is cancelled instead.
        """
        if not self.service.deadlines:
            return
        due = [d for d in await self._io(self.own.due_deadlines, clock.now()) if self._mine(d.saga_id)]
        if not due or not self.feed.caught_up():
            return
        for timer in due:
            spec = self.service.deadlines.get(timer.name)
            if spec is None:
                continue  # a deadline this version of the service no longer declares
            cause = Envelope(
                event_id=timer.cause_event_id, type=timer.cause_type, version=timer.cause_version,
                saga_id=timer.saga_id, causation_id=None, service=self.service.name, step=None, outcome=None,
                occurred_at=clock.now(), payload=timer.cause_payload,
            )
            uow = self._new_uow()
            try:
                mine = self._participation(uow, timer.saga_id, create=False)
                if mine is not None and mine.ended is not None:
                    uow.deadlines.append(replace(timer, status=CANCELLED))
                    await self._commit(uow, [])
                    continue
                start_event = decode_payload(cause.type, cause.version, cause.payload)
                ctx = Context(uow, cause)
                with tracing.firing(self.service.name, timer.name, timer.saga_id):
                    outs = as_events(spec.fn, await self._call(spec.fn, start_event, ctx))
                    for i, out in enumerate([*outs, *ctx.extra]):
                        fails = spec.fails_saga and i == 0
                        expired = uow.emit(out, cause, outcome=Outcome.FAILED if fails else None,
                                           tag=f"deadline-{timer.id}-{i}")
                        if not fails:
                            continue
                        if self._has_steps:
                            await self._failed(uow, expired)
                        if mine is not None and mine.saga_type is not None:
                            observe(mine, expired)  # the starter knows at once: the saga can no longer complete
                uow.deadlines.append(replace(timer, status=FIRED))
                await self._commit(uow, [])
            except ConcurrencyConflict:
                uow.discard()  # another replica fired it
            except StoreError:
                uow.discard()
                raise  # the poll fails and resumes from what is committed
            except Exception as e:
                uow.discard()
                await self._deadline_failed(timer, cause, e)

    async def _deadline_failed(self, timer: Deadline, cause: Envelope, error: Exception) -> None:
        """Try a failed deadline again later (the retry policy), else mark it failed with a dead letter."""
        policy = self.service.retry or self.retry
        attempts = self.deadline_failures[timer.id] = self.deadline_failures.get(timer.id, 0) + 1
        uow, letters = self._new_uow(), []
        why = f"{type(error).__name__}: {error}"
        if attempts < policy.max_attempts and policy.is_transient(error):
            due = clock.now() + timedelta(seconds=policy.delay(attempts))
            log.warning("%s: deadline %s of saga %s failed (attempt %d of %d): %s; next attempt at %s",
                        self.service.name, timer.name, timer.saga_id, attempts, policy.max_attempts, why,
                        due.isoformat(), extra=logs.fields(self.service.name, saga_id=timer.saga_id))
            uow.deadlines.append(replace(timer, status=RESCHEDULED, due_at=due))
        else:
            reason = f"deadline {timer.name} failed {attempts} time(s): {why}"
            log.error("%s: %s (saga %s); marked failed", self.service.name, reason, timer.saga_id,
                      extra=logs.fields(self.service.name, saga_id=timer.saga_id))
            uow.deadlines.append(replace(timer, status=FAILED))
            uow.emit(EventParked(of_event_id=cause.event_id, handled_type=f"deadline:{timer.name}", reason=reason,
                                 attempts=attempts), cause, tag=f"deadline-failed-{timer.id}")
            now = clock.now()
            letters.append(DeadLetter(
                service=self.service.name, position=0, event_id=cause.event_id, saga_id=timer.saga_id,
                type=f"deadline:{timer.name}", reason=reason, error="".join(traceback.format_exception(error)),
                attempts=attempts, first_failed_at=now, last_failed_at=now, envelope=raw_envelope(cause),
                status=FAILED,
            ))
            self.deadline_failures.pop(timer.id, None)
        await self._commit(uow, [], parked=letters)
