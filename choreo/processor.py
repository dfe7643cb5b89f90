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

import logging
import random
import time
import traceback
from collections.abc import Sequence
from dataclasses import dataclass

from choreo import clock
from choreo._participation import Participation, participation_id
from choreo._unit_of_work import AggregateCache, UnitOfWork
from choreo.aggregates import create_with_id, new_mapper
from choreo.context import Context
from choreo.errors import ConcurrencyConflict, EventError, StepFailed, WiringError
from choreo.events import Envelope, Event, Outcome, StepSkipped, decode_payload, is_known_type
from choreo.service import Handler, Service
from choreo.store import DeadLetter, EventStore, advance

log = logging.getLogger("choreo")


@dataclass(frozen=True)
class RetryPolicy:
    """How often and how patiently a failing handler is retried before its event is parked."""

    max_attempts: int = 3
    base_delay: float = 0.05
    max_delay: float = 2.0

    def delay(self, attempt: int) -> float:
        """Seconds to wait before retry number `attempt` (exponential, with full jitter)."""
        return random.uniform(0, min(self.max_delay, self.base_delay * 2 ** (attempt - 1)))


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
        batch_size: int = 200,
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
        self.feed = store.feed(service.name, self.own.tracking)
        self._types = service.subscribed_types
        self._has_steps = bool(service.steps)

    # -- the loop ----------------------------------------------------------------------
    def poll(self, timeout: float = 0.0) -> int:
        """Process the next batch of the log; return how many events were read (0 if idle).

        With `timeout`, wait up to that many seconds for new events when there are none.
        """
        self.own.flush()
        batch = self.feed.poll(self.batch_size, timeout)
        if not batch:
            return 0
        fresh = self._fresh(batch)
        if not any(self._relevant(e) for e in fresh):
            self.tracking.update(advance(batch))
            return len(batch)
        try:
            self._process(fresh)
        except ConcurrencyConflict as e:
            log.warning("%s: %s; reloading and retrying the batch", self.service.name, e)
            self.cache.clear()
            self.tracking = self.own.tracking()
            self.held = {d.saga_id for d in self.own.dead_letters()}
            self.feed.rewind()
        return len(batch)

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
        return env.malformed is not None or not is_known_type(env.type)  # parked, never dropped

    def _process(self, batch: Sequence[Envelope]) -> None:
        start = 0
        while start < len(batch):
            uow = self._new_uow()
            failed_at = None
            for i in range(start, len(batch)):
                try:
                    self._handle(batch[i], uow)
                except Exception:
                    failed_at = i
                    break
            if failed_at is None:
                self._commit(uow, batch[start:])
                return
            uow.discard()
            if failed_at > start:  # commit the good prefix, then the bad event alone
                uow = self._new_uow()
                for env in batch[start:failed_at]:
                    self._handle(env, uow)
                self._commit(uow, batch[start:failed_at])
            self._handle_alone(batch[failed_at])
            start = failed_at + 1

    def _new_uow(self) -> UnitOfWork:
        return UnitOfWork(self.service.name, self.own, self.mapper, self.cache)

    def _commit(self, uow: UnitOfWork, done: Sequence[Envelope], parked: Sequence[DeadLetter] = ()) -> None:
        reached = advance(done)
        handled = [e.event_id for e in done if self._relevant(e)]
        try:
            self.own.commit(
                events=uow.stored_events(),
                emitted=uow.emitted,
                tracking=reached,
                parked=parked,
                handled=list(dict.fromkeys(handled)),
            )
        except BaseException:
            uow.discard()
            raise
        uow.keep()
        self.tracking.update(reached)
        for d in parked:
            self.held.add(d.saga_id)

    def _handle_alone(self, env: Envelope) -> None:
        """Handle one event with retries; park it if it still fails."""
        first_failed = clock.now()
        attempts = 0
        while True:
            attempts += 1
            uow = self._new_uow()
            try:
                self._handle(env, uow)
            except _Park as p:
                uow.discard()
                return self._park(env, p.reason, p.error, attempts, first_failed)
            except Exception as e:
                uow.discard()
                if attempts >= self.retry.max_attempts:
                    reason = f"handler failed {attempts} times: {type(e).__name__}: {e}"
                    return self._park(env, reason, traceback.format_exc(), attempts, first_failed)
                time.sleep(self.retry.delay(attempts))
                continue
            self._commit(uow, [env])
            return None

    def _park(self, env: Envelope, reason: str, error: str, attempts: int, first: object) -> None:
        log.error("%s: parked event %s at position %s: %s", self.service.name, env.event_id, env.position, reason)
        dead = DeadLetter(
            service=self.service.name,
            position=env.position or 0,
            event_id=env.event_id,
            saga_id=env.saga_id,
            type=env.type,
            reason=reason,
            error=error,
            attempts=attempts,
            first_failed_at=first,  # type: ignore[arg-type]
            last_failed_at=clock.now(),
            envelope=_raw(env),
        )
        self._commit(self._new_uow(), [env], parked=[dead])

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

    def _participation(self, uow: UnitOfWork, saga_id: str) -> Participation:
        pid = participation_id(self.service.name, saga_id)
        part = uow.get(pid)
        if part is None:
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
        part = self._participation(uow, env.saga_id)
        if part.has_handled(step):
            return  # a duplicate trigger: the step already ran for this saga
        if part.saga_failed:
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


def _as_events(handler: Handler, result: object) -> list[Event]:
    if result is None:
        return []
    items = list(result) if isinstance(result, (list, tuple)) else [result]
    for item in items:
        if not isinstance(item, Event):
            raise WiringError(f"{handler.name} returned {item!r}, which is not an Event")
    return items  # type: ignore[return-value]


def _raw(env: Envelope) -> dict[str, object]:
    raw = {k: getattr(env, k) for k in Envelope.__dataclass_fields__}
    raw["occurred_at"] = env.occurred_at.isoformat()
    return raw
