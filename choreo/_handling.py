"""One event in a service: run its handler, a step and its outcome, compensation, and ending sagas.

`Handling` is a part of `Processor` (as `Parking` and `Timers` are): given an event of a
batch and the batch's unit of work, it decodes the event, runs the service's handlers
for it, records the step's outcome in the service's participation in the saga, runs
the compensations a failure calls for (guarantee 3) and, in the service that starts a
saga, follows its outcomes to end it (`choreo.SagaCompleted` / `choreo.SagaFailed`).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import replace
from typing import TYPE_CHECKING, Any

from choreo import logs, metrics, tracing
from choreo._parking import Park, as_events, envelope_of
from choreo._participation import Participation, completion, participation_id
from choreo._saga_end import observe, verdict
from choreo.aggregates import create_with_id
from choreo.context import Context
from choreo.errors import EventError, StepFailed, WiringError
from choreo.events import Envelope, Event, Outcome, StepCompensated, StepSkipped, decode_payload, is_known_type
from choreo.operations import (
    CompensationForced, CompensationRefused, CompensationRequested, DeadLetterResolved,
)
from choreo.saga import SagaDefinition, SagaFailed
from choreo.store import HOLDING, DeadLetter, ServiceStore

if TYPE_CHECKING:
    from choreo._unit_of_work import UnitOfWork
    from choreo.replicas import Replica
    from choreo.service import Handler, Service

log = logging.getLogger("choreo")


class Handling:
    """The processor's handling of one event (a part of `Processor`)."""

    service: Service
    own: ServiceStore
    held: set[str]
    replica: Replica | None
    _has_steps: bool
    _starts: dict[str, SagaDefinition]
    _sagas: dict[str, SagaDefinition]
    _check_size: bool

    if TYPE_CHECKING:  # provided by the other parts of Processor (nothing at run time: no shadowing)
        def _relevant(self, env: Envelope) -> bool: ...
        def _bypass(self, event_type: str) -> bool: ...
        def _step_of(self, event_type: str) -> str | None: ...
        def _new_uow(self) -> UnitOfWork: ...
        async def _io(self, fn: Callable[..., Any], *args: Any) -> Any: ...
        async def _call(self, fn: Callable[..., Any], *args: Any) -> Any: ...
        async def _keep_claims(self) -> None: ...
        async def _commit(self, uow: UnitOfWork, done: Sequence[Envelope], parked: Sequence[DeadLetter] = (),
                          updated: Sequence[DeadLetter] = ()) -> None: ...
        def _schedule(self, env: Envelope, uow: UnitOfWork) -> None: ...
        def _cancel_deadlines(self, cause: Envelope, uow: UnitOfWork) -> None: ...

    async def _handle(self, env: Envelope, uow: UnitOfWork) -> None:
        if not self._relevant(env):
            return
        if self.replica is not None:
            await self._keep_claims()  # a batch may outlast the lease: its handlers take time
        if env.malformed is not None:
            raise Park(f"malformed record: {env.malformed}", env.payload)
        if not env.saga_id:
            raise Park("missing saga id", f"event {env.event_id} of type {env.type} has no saga_id")
        failure = env.outcome == Outcome.FAILED
        held = (env.saga_id in self.held or env.saga_id in uow.holds) and env.saga_id not in uow.released
        # A failure goes ahead of a parked event in a participant: compensation must not wait. The
        # service that ends the saga reads every outcome in order, so for it the failure waits too.
        if held and not (failure and self._bypass(env.type)):
            raise Park("held behind an earlier parked event of this saga", "")
        mark = len(uow.emitted)
        event: Event | None = None
        if env.type in self.service.handlers or (failure and self._has_steps) or not is_known_type(env.type):
            try:
                event = decode_payload(env.type, env.version, env.payload)
            except EventError as e:
                raise Park(f"undecodable: {e}", str(e)) from None
        runs = (failure and self._has_steps) or (event is not None and env.type in self.service.handlers)
        with tracing.handling(self.service.name, env, uow, runs), metrics.handling(self.service.name, env, runs):
            if failure and self._has_steps:
                part = await self._failed(uow, env)
                if held:
                    await self._skip_parked_steps(part, env, uow)
            if event is not None:
                for handler in self.service.handlers.get(env.type, ()):
                    if handler.kind == "step":
                        await self._run_step(handler, event, env, uow)
                    else:
                        await self._run_plain(handler, event, env, uow)
        if self.service.deadlines:
            self._schedule(env, uow)
        if self._starts:
            await self._follow(env, uow)
        if self._check_size:
            for out in uow.emitted[mark:]:
                if why := self.own.oversized(out):
                    raise Park(f"a handler emitted an event too large for the log: {why}", why)

    def _participation(self, uow: UnitOfWork, saga_id: str, create: bool = True) -> Participation:
        pid = participation_id(self.service.name, saga_id)
        part = uow.get(pid)
        if part is None and create:
            part = create_with_id(Participation, pid, service=self.service.name, saga_id=saga_id)
            uow.add(part)
        return part  # type: ignore[return-value]

    async def _run_plain(self, handler: Handler, event: Event, env: Envelope, uow: UnitOfWork) -> None:
        ctx = Context(uow, env)
        for out in [*as_events(handler, await self._call(handler.fn, event, ctx)), *ctx.extra]:
            uow.emit(out, env)

    async def _run_step(self, handler: Handler, event: Event, env: Envelope, uow: UnitOfWork) -> None:
        step = handler.step
        assert step is not None
        part: Participation | None = self._participation(uow, env.saga_id, create=False)
        if part is not None and part.has_handled(step):
            return  # a duplicate trigger: the step already ran for this saga
        if part is not None and part.saga_failed:
            part.step_skipped(step)
            reason = f"saga failed (event {part.failure_event_id}) before the step started"
            uow.emit(StepSkipped(step=step, reason=reason), env, step=step, outcome=Outcome.SKIPPED)
            return
        ctx = Context(uow, env)
        try:
            result = await self._call(handler.fn, event, ctx)
        except StepFailed as failure:
            for out in ctx.extra:
                uow.emit(out, env)
            failed = uow.emit(failure.event, env, step=step, outcome=Outcome.FAILED)
            (part or self._participation(uow, env.saga_id)).step_failed(step)
            await self._failed(uow, failed)
            return
        outs = as_events(handler, result)
        if len(outs) != 1:
            raise WiringError(
                f"step {step!r} ({handler.name}) must return exactly one completion event, "
                f"got {result!r}; emit extra events with ctx.emit()"
            )
        done = uow.emit(outs[0], env, step=step, outcome=Outcome.COMPLETED)
        if part is None:  # the service's first part in this saga: one event records both
            completed = {step: completion(done.event_id, done.type, done.version, done.payload)}
            uow.add(create_with_id(Participation, participation_id(self.service.name, env.saga_id),
                                   service=self.service.name, saga_id=env.saga_id, completed=completed))
        else:
            part.step_completed(step, done.event_id, done.type, done.version, done.payload)
        for out in ctx.extra:
            uow.emit(out, env)

    async def _failed(self, uow: UnitOfWork, failure: Envelope) -> Participation:
        """The saga failed (`failure`): the first time, record it and compensate every completed step."""
        part = self._participation(uow, failure.saga_id)
        if not part.saga_failed:
            part.failure_seen(failure.event_id)
            await self._compensate(part, failure, uow)
        return part

    async def _compensate(self, part: Participation, cause: Envelope, uow: UnitOfWork) -> None:
        """Run the compensation of every step this service completed in the saga, once."""
        for step in part.to_compensate():
            handler = self.service.compensations.get(step)
            part.step_compensated(step)
            outs: list[Event] = []
            if handler is not None:
                done = part.completed[step]
                done_event = decode_payload(str(done["type"]), int(done["version"]), str(done["payload"]))  # type: ignore[call-overload]
                ctx = Context(uow, cause)
                outs = [*as_events(handler, await self._call(handler.fn, done_event, ctx)), *ctx.extra]
            if not outs:  # still say that the step is undone: the saga's starter waits for it
                why = "it has no compensation handler" if handler is None else "its compensation emitted nothing"
                outs = [StepCompensated(step=step, reason=f"nothing to undo: {why}")]
            for i, out in enumerate(outs):
                uow.emit(out, cause, step=step if i == 0 else None, outcome=Outcome.COMPENSATED if i == 0 else None)

    async def _skip_parked_steps(self, part: Participation, failure: Envelope, uow: UnitOfWork) -> None:
        """Resolve as skipped the parked triggers of this saga's steps: the saga failed before they ran.

        Other parked events of the saga stay parked (and hold the saga) for an operator.
        """
        done = {d.id for d in uow.resolved} | {d.event_id for d in uow.skipped_new.values()}
        remaining = False
        stored = await self._io(self.own.dead_letters, None)
        for letter in [*stored, *uow.batch_letters()]:  # and what failed earlier in this batch
            if letter.status not in HOLDING or letter.saga_id != failure.saga_id \
                    or (letter.id if letter.id is not None else letter.event_id) in done:
                continue
            step = self._step_of(letter.type)
            if step is None:
                remaining = True
                continue
            trigger = envelope_of(letter)
            reason = f"saga failed ({failure.type}, event {failure.event_id}) before the parked step ran"
            if not part.has_handled(step):
                part.step_skipped(step)
                uow.emit(StepSkipped(step=step, reason=reason), trigger, step=step, outcome=Outcome.SKIPPED,
                         tag="skipped")
            uow.emit(DeadLetterResolved(of_event_id=letter.event_id, dead_letter_id=letter.id or 0,
                                        status="skipped", reason=reason), trigger, tag=f"resolved-{letter.id}")
            skipped = replace(letter, status="skipped", reason=reason, due_at=None)
            if letter.id is None:  # not committed yet: it is written skipped
                uow.skipped_new[letter.event_id] = skipped
            else:
                uow.resolved.append(skipped)
        if not remaining:
            uow.released.add(failure.saga_id)

    async def _force_failure(self, env: Envelope, command: CompensationRequested) -> None:
        """An operator's request to fail the saga: refused if this service saw it end, else carried out.

        The request is read in log order with the saga's outcomes, so the saga either ended
        before it (refused, `CompensationRefused` in its timeline) or fails now: never both.
        """
        uow = self._new_uow()
        part = self._participation(uow, env.saga_id, create=False)
        if part is not None and part.ended is not None:
            log.warning("%s: refused to compensate saga %s: it already %s", self.service.name, env.saga_id,
                        part.ended, extra=logs.fields(self.service.name, env))
            uow.emit(CompensationRefused(reason=command.reason, state=part.ended), env, tag="refused")
        else:
            forced = uow.emit(CompensationForced(reason=command.reason), env, outcome=Outcome.FAILED, tag="forced")
            if self._has_steps:
                await self._failed(uow, forced)
            if self._starts:  # remember the failure now: a completion read later cannot end the saga
                record = part or self._participation(uow, env.saga_id)
                observe(record, forced)
        await self._commit(uow, [env])

    # -- ending sagas (this service starts them) ------------------------------------------
    async def _follow(self, env: Envelope, uow: UnitOfWork) -> None:
        """Keep the starter's record of the saga up to date; end the saga when its verdict is in."""
        definition = self._starts.get(env.type)
        found: Participation | None = self._participation(uow, env.saga_id, create=False)
        if definition is not None:
            if found is None:
                part = create_with_id(Participation, participation_id(self.service.name, env.saga_id),
                                      service=self.service.name, saga_id=env.saga_id,
                                      saga_type=definition.name)
                uow.add(part)
            else:
                part = found
                if part.saga_type is None:
                    part.track(definition.name)
        elif found is None or found.saga_type is None or found.ended is not None or not env.outcome:
            return  # not a saga this service started (or it ended already)
        else:
            part = found
            observe(part, env)
        end = verdict(part, self._sagas)
        if end is None:
            return
        outcome = Outcome.FAILED if isinstance(end, SagaFailed) else Outcome.COMPLETED
        part.end(str(outcome))
        end_env = uow.emit(end, env, tag="saga-end")
        handler = self.service.ends.get((part.saga_type or "", str(outcome)))
        if handler is not None:
            ctx = Context(uow, end_env)
            with tracing.handling(self.service.name, end_env, uow, True):
                for out in [*as_events(handler, await self._call(handler.fn, end, ctx)), *ctx.extra]:
                    uow.emit(out, end_env)
        self._cancel_deadlines(env, uow)
