"""Deadlines as the processor runs them: scheduled and cancelled with events, fired when due.

A deadline is scheduled and cancelled in the same transaction as the event that
does it. A due deadline fires only once the service has read the log to its end
(so an end that is already in the log, after downtime say, cancels it first), and
never for a saga that ended: the end cancels every deadline of the saga. Firing
is one transaction: the expiry event and the `fired` mark.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import replace
from typing import TYPE_CHECKING, Any

from choreo import clock
from choreo._parking import as_events
from choreo._saga_end import observe
from choreo.context import Context
from choreo.deadlines import CANCELLED, FIRED, SCHEDULED, Deadline, deadline_id
from choreo.errors import ConcurrencyConflict
from choreo.events import Envelope, Outcome, decode_payload
from choreo.saga import SAGA_ENDS

if TYPE_CHECKING:
    from choreo._participation import Participation
    from choreo._unit_of_work import UnitOfWork
    from choreo.service import Service
    from choreo.store import DeadLetter, Feed, ServiceStore

log = logging.getLogger("choreo")


class Timers:
    """The processor's deadlines (a part of `Processor`)."""

    service: Service
    own: ServiceStore
    feed: Feed
    _has_steps: bool

    def _new_uow(self) -> UnitOfWork:  # provided by Processor
        raise NotImplementedError

    def _participation(self, uow: UnitOfWork, saga_id: str, create: bool = True) -> Participation:
        raise NotImplementedError

    async def _compensate(self, part: Participation, cause: Envelope, uow: UnitOfWork) -> None:
        raise NotImplementedError

    async def _commit(self, uow: UnitOfWork, done: Sequence[Envelope], parked: Sequence[DeadLetter] = (),
                      updated: Sequence[DeadLetter] = ()) -> None:
        raise NotImplementedError

    async def _call(self, fn: Callable[..., Any], *args: Any) -> Any:
        raise NotImplementedError

    async def _io(self, fn: Callable[..., Any], *args: Any) -> Any:
        raise NotImplementedError

    def _schedule(self, env: Envelope, uow: UnitOfWork) -> None:
        """Schedule or cancel this service's deadlines that `env` starts or cancels."""
        if env.type in SAGA_ENDS:
            self._cancel_deadlines(env.saga_id, env, uow)
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

    def _cancel_deadlines(self, saga_id: str, cause: Envelope, uow: UnitOfWork) -> None:
        """Cancel every deadline of this service for the saga (it ended)."""
        for name in self.service.deadlines:
            uow.deadlines.append(self._cancelled(name, cause))

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
        due = await self._io(self.own.due_deadlines, clock.now())
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
                outs = as_events(spec.fn, await self._call(spec.fn, start_event, ctx))
                for i, out in enumerate([*outs, *ctx.extra]):
                    fails = spec.fails_saga and i == 0
                    expired = uow.emit(out, cause, outcome=Outcome.FAILED if fails else None,
                                       tag=f"deadline-{timer.id}-{i}")
                    if not fails:
                        continue
                    if self._has_steps:
                        part = self._participation(uow, timer.saga_id)
                        if not part.saga_failed:
                            part.failure_seen(expired.event_id)
                            await self._compensate(part, expired, uow)
                    if mine is not None and mine.saga_type is not None:
                        observe(mine, expired)  # the starter knows at once: the saga can no longer complete
                uow.deadlines.append(replace(timer, status=FIRED))
                await self._commit(uow, [])
            except ConcurrencyConflict:
                uow.discard()  # another replica fired it
            except Exception:
                uow.discard()
                log.exception("%s: deadline %s of saga %s failed; will try again", self.service.name,
                              timer.name, timer.saga_id)
