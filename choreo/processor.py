"""Runs one service against the log: batches of events in, one transaction out.

For each batch the processor runs the service's handlers, collects the new
aggregate events and emitted events in a unit of work, and commits them with
the new tracking position in one transaction (guarantee 1). It applies the
compensation rules (guarantee 3) using the service's own `Participation`
record of each saga. An event that cannot be decoded, or whose handler keeps
failing, is parked as a dead letter; later events of that saga for this
service are held behind it, while other sagas keep flowing (guarantee 6).
"""

from __future__ import annotations

import json
import logging
import time
import traceback
from collections.abc import Sequence
from dataclasses import replace
from datetime import datetime

from choreo import clock
from choreo._participation import Participation, completion, participation_id
from choreo._unit_of_work import AggregateCache, UnitOfWork
from choreo.aggregates import create_with_id, new_mapper
from choreo.context import Context
from choreo.errors import ConcurrencyConflict, EventError, StepFailed, WiringError
from choreo.events import Envelope, Event, Outcome, StepSkipped, decode_payload, is_known_type, known_types
from choreo.service import Handler, Service
from choreo.deadlines import CANCELLED, FIRED, SCHEDULED, Deadline, deadline_id
from choreo.operations import (
    OPERATOR_COMMANDS, DeadLetterResolved, EventParked, HandlerRetried, RetryRequested, SkipRequested,
)
from choreo.retry import RetryPolicy
from choreo.store import DeadLetter, EventStore, Interest, advance

log = logging.getLogger("choreo")


class _Park(Exception):
    """An event that must be parked at once (not retried)."""

    def __init__(self, reason: str, error: str) -> None:
        self.reason = reason
        self.error = error
        super().__init__(reason)


class Processor:
    """Processes the log for one service, in batches, exactly once."""

    def __init__(
        self,
        service: Service,
        store: EventStore,
        *,
        batch_size: int = 1000,
        cache_size: int = 20_000,
        retry: RetryPolicy | None = None,
    ) -> None:
        service.validate()
        self.service = service
        self.store = store
        self.own = store.service(service.name)
        self.batch_size = batch_size
        self.retry = retry or RetryPolicy()
        self.mapper = new_mapper()
        self.cache = AggregateCache(cache_size)
        self.tracking = self.own.tracking()
        self.held = {d.saga_id for d in self.own.dead_letters()}
        self.feed = store.feed(service.name, self.own.tracking, interest=Interest(
            types=service.subscribed_types | OPERATOR_COMMANDS, failures=bool(service.steps), known=known_types(),
        ))
        self._types = service.subscribed_types
        self._has_steps = bool(service.steps)

    # -- the loop ----------------------------------------------------------------------
    def poll(self, timeout: float = 0.0) -> int:
        """Process the next batch of the log; return how many events were read (0 if idle).

        With `timeout`, wait up to that many seconds for new events when there are none.
        """
        self.own.flush()
        self._fire_due_deadlines()
        batch = self.feed.poll(self.batch_size, timeout)
        if not batch:
            return 0
        fresh = self._fresh(batch)
        if not any(self._relevant(e) for e in fresh):
            self.tracking.update(advance(batch))
            return len(batch)
        if self._has_steps:
            self._prefetch(fresh)
        try:
            self._process(fresh)
        except ConcurrencyConflict as e:
            log.warning("%s: %s; reloading and retrying the batch", self.service.name, e)
            self.cache.clear()
            self.tracking = self.own.tracking()
            self.held = {d.saga_id for d in self.own.dead_letters()}
            self.feed.rewind()
        finally:
            self.cache.prefetched = {}
        return len(batch)

    def _prefetch(self, batch: Sequence[Envelope]) -> None:
        """Read the participation records of the batch's sagas that are not cached, in one query."""
        ids = {participation_id(self.service.name, e.saga_id) for e in batch if e.saga_id and self._relevant(e)}
        missing = [i for i in ids if self.cache.get(i) is None]
        self.cache.prefetched = self.own.load_many(missing) if missing else {}

    def _fresh(self, batch: Sequence[Envelope]) -> list[Envelope]:
        """Drop what this service already processed: redelivered positions and repeated event ids."""
        fresh = [e for e in batch if (e.position or 0) > self.tracking.get(e.source, 0)]
        ids = [e.event_id for e in fresh if self._relevant(e)]
        skip = self.own.seen(ids) if ids else set()
        out = []
        for env in fresh:
            if self._relevant(env):
                if env.event_id in skip:
                    continue  # a copy of an event handled before (Kafka, after a sender's crash)
                skip.add(env.event_id)
            out.append(env)
        return out

    def run_until_idle(self) -> int:
        """Process until the log has nothing new for this service; return events read."""
        total = 0
        while n := self.poll():
            total += n
        return total

    def close(self) -> None:
        """Leave the log; the service's own store stays open."""
        self.feed.close()

    def _relevant(self, env: Envelope) -> bool:
        if env.type in self._types or (self._has_steps and env.outcome == Outcome.FAILED):
            return True
        if env.type in OPERATOR_COMMANDS:
            return self._command_target(env) == self.service.name
        return env.malformed is not None or not is_known_type(env.type)  # parked, never dropped

    @staticmethod
    def _command_target(env: Envelope) -> str | None:
        try:
            return str(json.loads(env.payload).get("service"))
        except (ValueError, AttributeError):
            return None

    def _process(self, batch: Sequence[Envelope]) -> None:
        start = 0
        while start < len(batch):
            uow = self._new_uow()
            stop, failed, error = None, False, None
            for i in range(start, len(batch)):
                if batch[i].type in OPERATOR_COMMANDS and self._relevant(batch[i]):
                    stop = i
                    break
                try:
                    self._handle(batch[i], uow)
                except Exception as e:
                    stop, failed, error = i, True, e
                    break
            if stop is None:
                self._commit(uow, batch[start:])
                return
            if failed:  # commit the good prefix again without the bad event, then the bad event alone
                uow.discard()
                uow = self._new_uow()
                for env in batch[start:stop]:
                    self._handle(env, uow)
            if stop > start:
                self._commit(uow, batch[start:stop])
            if failed:
                self._handle_alone(batch[stop], first_error=error)
            else:
                self._operate(batch[stop])
            start = stop + 1

    def _new_uow(self) -> UnitOfWork:
        return UnitOfWork(self.service.name, self.own, self.mapper, self.cache)

    def _commit(
        self,
        uow: UnitOfWork,
        done: Sequence[Envelope],
        parked: Sequence[DeadLetter] = (),
        updated: Sequence[DeadLetter] = (),
    ) -> None:
        reached = advance(done)
        handled = [e.event_id for e in done if self._relevant(e)]
        try:
            self.own.commit(
                events=uow.stored_events(),
                emitted=uow.emitted,
                tracking=reached,
                parked=parked,
                handled=list(dict.fromkeys(handled)),
                updated=updated,
                deadlines=uow.deadlines,
            )
        except BaseException:
            uow.discard()
            raise
        uow.keep()
        self.tracking.update(reached)
        for d in parked:
            self.held.add(d.saga_id)

    def _handle_alone(
        self, env: Envelope, letter: DeadLetter | None = None, first_error: Exception | None = None
    ) -> bool:
        """Handle one event, retrying transient errors; park it if it still fails.

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
            except _Park as p:
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
                                        last_error=last_error), env, step=self._step_of(env), tag="retried")
            if letter is None:
                self._commit(uow, [env])
            else:
                self._resolve(uow, letter, env, "retried", "")
            return True

    def _resolve(self, uow: UnitOfWork, letter: DeadLetter, env: Envelope, status: str, reason: str) -> None:
        resolved = DeadLetterResolved(of_event_id=letter.event_id, dead_letter_id=letter.id or 0,
                                      status=status, reason=reason)
        uow.emit(resolved, env, tag=f"resolved-{letter.id}")
        self._commit(uow, [], updated=[replace(letter, status=status)])

    def _step_of(self, env: Envelope) -> str | None:
        return next((h.step for h in self.service.handlers.get(env.type, ()) if h.kind == "step"), None)

    def _park(
        self, env: Envelope, reason: str, error: str, attempts: int, first: datetime, letter: DeadLetter | None
    ) -> None:
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
            saga_id=env.saga_id,
            type=env.type,
            reason=reason,
            error=error,
            attempts=attempts,
            first_failed_at=first,
            last_failed_at=clock.now(),
            envelope=_raw(env),
        )
        parked = EventParked(of_event_id=env.event_id, handled_type=env.type, reason=reason, attempts=attempts)
        uow.emit(parked, env, step=self._step_of(env), tag="parked")
        self._commit(uow, [env], parked=[dead])

    # -- operator commands and deadlines --------------------------------------------------
    def _operate(self, env: Envelope) -> None:
        """Carry out an operator's retry or skip of a parked event, then release what waited behind it."""
        command = decode_payload(env.type, env.version, env.payload)
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
                if not self._handle_alone(_envelope_of(d), letter=d):
                    break
            if any(d.saga_id == target.saga_id for d in self.own.dead_letters("parked")):
                self.held.add(target.saga_id)
        self._commit(self._new_uow(), [env])

    def _schedule(self, env: Envelope, uow: UnitOfWork) -> None:
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
                uow.deadlines.append(Deadline(
                    id=deadline_id(service, env.saga_id, spec.name), service=service, name=spec.name,
                    saga_id=env.saga_id, due_at=clock.now(), status=CANCELLED, cause_event_id=env.event_id,
                ))

    def _fire_due_deadlines(self) -> None:
        """Emit the event of every deadline that is due, each in its own transaction with its `fired` mark."""
        if not self.service.deadlines:
            return
        for timer in self.own.due_deadlines(clock.now()):
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
                start_event = decode_payload(cause.type, cause.version, cause.payload)
                ctx = Context(uow, cause)
                outs = _as_events(spec.fn, spec.fn(start_event, ctx))
                for i, out in enumerate([*outs, *ctx.extra]):
                    fails = spec.fails_saga and i == 0
                    expired = uow.emit(out, cause, outcome=Outcome.FAILED if fails else None,
                                       tag=f"deadline-{timer.id}-{i}")
                    if fails and self._has_steps:
                        part = self._participation(uow, timer.saga_id)
                        if not part.saga_failed:
                            part.failure_seen(expired.event_id)
                            self._compensate(part, expired, uow)
                uow.deadlines.append(replace(timer, status=FIRED))
                self._commit(uow, [])
            except ConcurrencyConflict:
                uow.discard()  # another replica fired it
            except Exception:
                uow.discard()
                log.exception("%s: deadline %s of saga %s failed; will try again", self.service.name,
                              timer.name, timer.saga_id)

    # -- one event ---------------------------------------------------------------------
    def _handle(self, env: Envelope, uow: UnitOfWork) -> None:
        if not self._relevant(env):
            return
        if env.malformed is not None:
            raise _Park(f"malformed record: {env.malformed}", env.payload)
        if not env.saga_id:
            raise _Park("missing saga id", f"event {env.event_id} of type {env.type} has no saga_id")
        if env.saga_id in self.held:
            raise _Park("held behind an earlier parked event of this saga", "")
        try:
            event = decode_payload(env.type, env.version, env.payload)
        except EventError as e:
            raise _Park(f"undecodable: {e}", str(e)) from None
        if self._has_steps and env.outcome == Outcome.FAILED:
            part = self._participation(uow, env.saga_id)
            if not part.saga_failed:
                part.failure_seen(env.event_id)
                self._compensate(part, env, uow)
        for handler in self.service.handlers.get(env.type, ()):
            if handler.kind == "step":
                self._run_step(handler, event, env, uow)
            else:
                self._run_plain(handler, event, env, uow)
        if self.service.deadlines:
            self._schedule(env, uow)

    def _participation(self, uow: UnitOfWork, saga_id: str, create: bool = True) -> Participation:
        pid = participation_id(self.service.name, saga_id)
        part = uow.get(pid)
        if part is None and create:
            part = create_with_id(Participation, pid, service=self.service.name, saga_id=saga_id)
            uow.add(part)
        return part  # type: ignore[return-value]

    def _run_plain(self, handler: Handler, event: Event, env: Envelope, uow: UnitOfWork) -> None:
        ctx = Context(uow, env)
        for out in [*_as_events(handler, handler.fn(event, ctx)), *ctx.extra]:
            uow.emit(out, env)

    def _run_step(self, handler: Handler, event: Event, env: Envelope, uow: UnitOfWork) -> None:
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
            result = handler.fn(event, ctx)
        except StepFailed as failure:
            for out in ctx.extra:
                uow.emit(out, env)
            failed = uow.emit(failure.event, env, step=step, outcome=Outcome.FAILED)
            part = part or self._participation(uow, env.saga_id)
            part.step_failed(step)
            part.failure_seen(failed.event_id)
            self._compensate(part, failed, uow)
            return
        outs = _as_events(handler, result)
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

    def _compensate(self, part: Participation, cause: Envelope, uow: UnitOfWork) -> None:
        """Run the compensation of every step this service completed in the saga, once."""
        for step in part.to_compensate():
            handler = self.service.compensations.get(step)
            part.step_compensated(step)
            if handler is None:
                continue  # nothing to undo for this step
            done = part.completed[step]
            done_event = decode_payload(str(done["type"]), int(done["version"]), str(done["payload"]))  # type: ignore[call-overload]
            ctx = Context(uow, cause)
            outs = [*_as_events(handler, handler.fn(done_event, ctx)), *ctx.extra]
            for i, out in enumerate(outs):
                uow.emit(out, cause, step=step if i == 0 else None, outcome=Outcome.COMPENSATED if i == 0 else None)


def _as_events(handler: object, result: object) -> list[Event]:
    if result is None:
        return []
    items = list(result) if isinstance(result, (list, tuple)) else [result]
    for item in items:
        if not isinstance(item, Event):
            name = getattr(handler, "name", None) or getattr(handler, "__qualname__", repr(handler))
            raise WiringError(f"{name} returned {item!r}, which is not an Event")
    return items  # type: ignore[return-value]


def _envelope_of(letter: DeadLetter) -> Envelope:
    """The envelope a dead letter keeps (as `_raw` wrote it)."""
    raw = dict(letter.envelope)
    raw["occurred_at"] = datetime.fromisoformat(str(raw["occurred_at"]))
    return Envelope(**{k: v for k, v in raw.items() if k in Envelope.__dataclass_fields__})


def _raw(env: Envelope) -> dict[str, object]:
    raw = {k: getattr(env, k) for k in Envelope.__dataclass_fields__}
    raw["occurred_at"] = env.occurred_at.isoformat()
    return raw
