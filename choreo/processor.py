"""Runs one service against the log: batches of events in, one transaction out.

For each batch the processor runs the service's handlers, collects the new
aggregate events and emitted events in a unit of work, and commits them with
the new tracking position in one transaction (guarantee 1). It applies the
compensation rules (guarantee 3) using the service's own `Participation`
record of each saga, and the service that starts a saga ends it (guarantee 9,
`choreo._saga_end`). Parking, retries and operator commands live in
`choreo._parking`; deadlines in `choreo._timers`.

When anything fails mid-batch (a commit refused by a locked or full store, a
broken connection), nothing of the batch is kept: the processor says so in one
log line and resumes from its last committed position on the next poll.

Handlers may be plain or `async def` functions. The processor is written as
coroutines: a service whose handlers are all plain runs them without an event loop
(nothing ever suspends), and one with `async def` handlers, `concurrency` above 1 or
a thread pool runs each batch in a loop, handling up to `concurrency` sagas at once,
each saga's events one at a time in log order (see `choreo._unit_of_work.SagaView`
for how shared aggregates stay serializable). The batch stays the unit of commit.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Callable, Coroutine, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from datetime import datetime
from typing import Any, TypeVar

from choreo import clock, logs, metrics, tracing
from choreo._parking import Park, Parking, as_events, call, envelope_of
from choreo._replicated import Replicated
from choreo._participation import Participation, completion, participation_id
from choreo._saga_end import observe, verdict
from choreo._timers import Timers
from choreo._unit_of_work import AggregateCache, Busy, Claims, SagaView, UnitOfWork
from choreo.aggregates import create_with_id, new_mapper
from choreo.context import Context
from choreo.errors import ClaimLost, ConcurrencyConflict, EventError, EventIdTaken, StepFailed, WiringError
from choreo.events import Envelope, Event, Outcome, StepCompensated, StepSkipped, decode_payload, is_known_type, known_types
from choreo.operations import (
    OPERATOR_COMMANDS, CompensationForced, CompensationRefused, CompensationRequested, DeadLetterResolved,
)
from choreo.replicas import ReplicaSettings
from choreo.retry import RetryPolicy
from choreo.saga import SAGA_ENDS, SagaFailed
from choreo.service import Handler, Service, is_async
from choreo.snapshots import Snapshotting
from choreo.store import FENCE, HOLDING, LOG, RETRYING, DeadLetter, EventStore, Held, Interest, ServiceStore
from choreo.upcasting import upcasting_feed

log = logging.getLogger("choreo")
T = TypeVar("T")


def drive(coro: Coroutine[Any, Any, T]) -> T:
    """Run a coroutine that never suspends (every handler is plain) to its end, without an event loop."""
    try:
        coro.send(None)
    except StopIteration as done:
        return done.value
    coro.close()
    raise RuntimeError("a handler awaited something, but this processor runs without an event loop: "
                       "give the service an async def handler, concurrency > 1 or threads, or use apoll()")


class Processor(Replicated, Parking, Timers):
    """Processes the log for one service, in batches, exactly once."""

    def __init__(
        self,
        service: Service,
        store: EventStore,
        *,
        batch_size: int = 1000,
        cache_size: int = 20_000,
        retry: RetryPolicy | None = None,
        concurrency: int | None = None,
        threads: int | None = None,
        replica: ReplicaSettings | None = None,
    ) -> None:
        service.validate()
        self.service = service
        self.store = store
        self.own = store.service(service.name)
        #: this process's claims when the service's work is split among replicas (None: it does it all)
        self.replica = self._replica_of(replica)
        self.batch_size = batch_size
        self.retry = retry or RetryPolicy()
        self.mapper = new_mapper()
        self.cache = AggregateCache(cache_size)
        self.snapshotting = Snapshotting(service.snapshot_every)
        self.tracking: dict[str, int] = {}
        self.held: set[str] = set()
        #: when the earliest scheduled retry is due (None: none is)
        self.next_retry_at: datetime | None = None
        self.threads = service.threads if threads is None else threads
        self.concurrency = concurrency or service.effective_concurrency(self.threads)
        #: whether batches run in an event loop (async handlers, several sagas at once, or threads)
        self.needs_loop = service.has_async_handlers or self.concurrency > 1 or self.threads > 0
        #: whether store calls run in a worker thread, so that they never block the loop (embedded use)
        self.offload = False
        self._pool = ThreadPoolExecutor(self.threads, thread_name_prefix=f"choreo-{service.name}") \
            if self.threads else None
        self._io_pool: ThreadPoolExecutor | None = None
        self._types = service.subscribed_types
        self._has_steps = bool(service.steps)
        self._starts = dict(service.sagas)  # the sagas this service ends, by start event type
        self._sagas = {d.name: d for d in self._starts.values()}
        self._check_size = type(self.own).oversized is not ServiceStore.oversized
        self.deadline_failures: dict[str, int] = {}
        self._stale = True  # the first poll reads the committed state
        self._reload()
        self.feed = upcasting_feed(store.feed(service.name, self._feed_tracking, interest=Interest(
            types=self._types | OPERATOR_COMMANDS, failures=self._has_steps, known=known_types(),
            outcomes=bool(self._starts),
        )))
        self.last_poll: float | None = None  # time.monotonic() of the loop's last poll (for /healthz)
        metrics.watch(self)

    # -- the loop ----------------------------------------------------------------------
    def poll(self, timeout: float = 0.0) -> int:
        """Process the next batch of the log; return how many events were read (0 if idle).

        With `timeout`, wait up to that many seconds for new events when there are none.
        If anything fails, the error is raised after one log line, and the next poll
        resumes from the last committed position: no event is ever skipped.
        """
        if self.needs_loop:
            return asyncio.run(self.apoll(timeout))
        return drive(self.apoll(timeout))

    async def apoll(self, timeout: float = 0.0) -> int:
        """`poll()` as a coroutine, for a service run inside an event loop (see `AsyncRunner`)."""
        self.last_poll = time.monotonic()
        logs.bind(self.service.name)
        if self.replica is not None:
            try:
                if await self._io(self.replica.tick_if_due):
                    self._stale = True  # segments came or went: read from the committed state again
            except Exception as e:
                log.warning("%s: replica %s could not renew its claims: %s: %s", self.service.name,
                            self.replica.id, type(e).__name__, e)
                raise
            if not self.replica.tokens:  # none of the work is ours now: wait, renew, look again
                await self._io(time.sleep, timeout)
                return 0
            self._held = self.replica.held()  # what this poll's commits are checked against
        if self._stale:
            await self._io(self._reload)
        batch: list[Envelope] = []
        try:
            await self._io(self.own.flush)
            batch = await self._io(self.feed.poll, self.batch_size, timeout)
            if self.feed.reassigned():  # another replica may have changed this service's state: read it again
                self._stale = True
                return 0
            if batch:
                await self._take(batch)
            await self._run_due_retries()
            if len(batch) < self.batch_size:
                await self._fire_due_deadlines()
        except ClaimLost as e:
            log.warning("%s: %s; going on with the segments it still holds", self.service.name, e)
            self._stale = True
            self.replica.expire()  # type: ignore[union-attr]
        except ConcurrencyConflict as e:  # expected now and then when replicas write one aggregate
            log.log(logging.INFO if self.replica and self.replica.shared else logging.WARNING,
                    "%s: %s; reloading and retrying the batch", self.service.name, e)
            self._stale = True
        except Exception as e:
            self._stale = True
            log.warning("%s: %s: %s; nothing is skipped: resuming from the last committed position %s",
                        self.service.name, type(e).__name__, e, self._tracking_text())
            raise
        return len(batch)

    async def _io(self, fn: Callable[..., Any], *args: Any) -> Any:
        """Call the store: in this service's own worker thread when offloading, else right here."""
        if self.offload:
            if self._io_pool is None:
                self._io_pool = ThreadPoolExecutor(1, thread_name_prefix=f"choreo-{self.service.name}-io")
            return await asyncio.get_running_loop().run_in_executor(self._io_pool, lambda: fn(*args))
        return fn(*args)

    async def _call(self, fn: Callable[..., Any], *args: Any) -> Any:
        """Call a handler: a plain one in the thread pool if the service has one, an async one awaited."""
        if not is_async(fn):
            if self._pool is not None:
                return await asyncio.get_running_loop().run_in_executor(self._pool, fn, *args)
            if self.offload:  # it may read the store (ctx.load): not on the application's loop
                return await self._io(fn, *args)
        return await call(fn, *args)

    def _tracking_text(self) -> str:
        """The committed tracking as text for a log line (or why it cannot be read now)."""
        try:
            return str(self.own.tracking() or "(the start)")
        except Exception as e:  # the store that failed may still fail
            return f"(unreadable now: {type(e).__name__})"

    def _reload(self) -> None:
        """Forget what the failed batch did and continue after the committed tracking."""
        self.cache.clear()
        self.tracking = self.own.tracking()
        if self.replica is None and self.tracking.get(LOG) == FENCE:  # replicas split the service meanwhile
            log.warning("%s: replicas now split this service's work: this process joins them", self.service.name)
            self.replica = self._replica_of(None)
        letters = [d for d in self.own.dead_letters(None) if d.status in HOLDING and self._mine(d.saga_id)]
        self.held = {d.saga_id for d in letters}
        self.next_retry_at = min((d.due_at for d in letters if d.status == RETRYING and d.due_at), default=None)
        if hasattr(self, "feed"):
            self.feed.rewind()
        self._stale = False

    async def _take(self, batch: Sequence[Envelope]) -> None:
        if self.replica is not None and self.replica.shared:
            self.cache.clear()  # other replicas write shared aggregates: read them as they are now
        fresh = await self._fresh(batch)
        if not any(self._relevant(e) for e in fresh):
            self.tracking.update(self._reached(batch))
            return
        if self._has_steps or self._starts:
            await self._prefetch(fresh)
        try:
            if self.concurrency > 1:
                await self._process_concurrently(fresh)
            else:
                await self._process(fresh)
        finally:
            self.cache.prefetched = {}

    async def _prefetch(self, batch: Sequence[Envelope]) -> None:
        """Read the participation records of the batch's sagas that are not cached, in one query."""
        ids = {participation_id(self.service.name, e.saga_id) for e in batch if e.saga_id and self._relevant(e)}
        missing = [i for i in ids if self.cache.get(i) is None]
        self.cache.prefetched = await self._io(self.own.load_many, missing) if missing else {}

    async def _fresh(self, batch: Sequence[Envelope]) -> list[Envelope]:
        """Drop what this service already processed: redelivered positions and repeated event ids."""
        if self.replica is None:
            fresh = [e for e in batch if (e.position or 0) > self.tracking.get(e.source, 0)]
        else:  # each segment from its own position
            key = self.replica.key
            fresh = [e for e in batch if (e.position or 0) > self.tracking.get(key(e.source, e.saga_id), 0)]
        ids = [e.event_id for e in fresh if self._relevant(e)]
        skip = await self._io(self.own.seen, ids) if ids else set()
        out = []
        for env in fresh:
            if self._relevant(env):
                if env.event_id in skip:
                    continue  # a copy of an event handled before (Kafka, after a sender's crash)
                skip.add(env.event_id)
            out.append(env)
        return out

    def run_until_idle(self, *, retry_wait: float = 10.0) -> int:
        """Process until the log has nothing new for this service; return events read.

        Scheduled retries due within `retry_wait` seconds are waited for (see `wait_for_retries`).
        """
        total = 0
        while True:
            while n := self.poll():
                total += n
            if not wait_for_retries([self], retry_wait):
                return total

    def close(self) -> None:
        """Leave the log (and free this replica's segments) and stop the thread pool; the store stays open."""
        self.feed.close()
        if self.replica is not None:
            try:
                self.replica.leave()
            except Exception as e:  # the others take its segments when its lease runs out
                log.warning("%s: could not free the segments of replica %s: %s", self.service.name,
                            self.replica.id, e)
        for pool in (self._pool, self._io_pool):
            if pool is not None:
                pool.shutdown(wait=True)

    def _bypass(self, event_type: str) -> bool:
        """Whether a failure of this type goes ahead of a parked event of its saga: only to compensate.

        Not in the service that ends sagas (it reads every outcome in order), nor where a
        plain handler reacts to the failure (it would run ahead of the parked event).
        """
        return self._has_steps and not self._starts and all(
            h.kind == "step" for h in self.service.handlers.get(event_type, ()))

    def _is_command(self, env: Envelope) -> bool:
        return env.type in OPERATOR_COMMANDS and self._relevant(env)

    def _relevant(self, env: Envelope) -> bool:
        if self.replica is not None and not self.replica.owns(env.saga_id):
            return False  # another replica's saga
        if env.type in SAGA_ENDS and env.service == self.service.name:
            return False  # its own end of a saga: it cancelled its deadlines when it ended the saga
        if (
            env.type in self._types
            or (self._has_steps and env.outcome == Outcome.FAILED)
            or (self._starts and env.outcome)
        ):
            return True
        if env.type in OPERATOR_COMMANDS:
            target = self._command_target(env)
            return target is None or target == self.service.name  # a command naming no one is parked
        return env.malformed is not None or not is_known_type(env.type)  # parked, never dropped

    @staticmethod
    def _command_target(env: Envelope) -> str | None:
        try:
            target = json.loads(env.payload).get("service")
        except (ValueError, AttributeError):
            return None
        return target if isinstance(target, str) else None

    # -- a batch -----------------------------------------------------------------------
    async def _process(self, batch: Sequence[Envelope]) -> None:
        """Handle a batch one event at a time (the fast path, for one saga at a time)."""
        start = 0
        while start < len(batch):
            uow = self._new_uow()
            stop, error = None, None
            for i in range(start, len(batch)):
                if self._is_command(batch[i]):
                    stop = i
                    break
                try:
                    await self._handle(batch[i], uow)
                except Exception as e:
                    stop, error = i, e
                    break
            end = len(batch) if stop is None else _part_start(batch, start, stop)
            while error is not None:  # handle the good prefix again without the bad event
                uow.discard()
                uow = self._new_uow()
                for i in range(start, end):
                    try:
                        await self._handle(batch[i], uow)
                    except Exception as e:  # it failed this time (a flaky handler): it is the bad one now
                        stop, end, error = i, _part_start(batch, start, i), e
                        break
                else:
                    break
            if end > start:
                await self._commit_segment(uow, batch[start:end])
            if stop is None:
                return
            if (parts := _parts(batch, end)) > 1:  # an event an upcaster split: its parts go together
                await self._attempt_parts(batch[end:end + parts])
                start = end + parts
                continue
            if error is not None:
                await self._attempt(batch[stop], first_error=error)
            else:
                await self._operate(batch[stop])
            start = stop + 1

    async def _process_concurrently(self, batch: Sequence[Envelope]) -> None:
        """Handle a batch's sagas at once (up to `concurrency`), each saga's events in log order."""
        start = 0
        while start < len(batch):
            stop = next((i for i in range(start, len(batch)) if self._is_command(batch[i])), None)
            end = len(batch) if stop is None else stop
            if end > start:
                await self._run_segment(batch[start:end])
            if stop is None:
                return
            await self._operate(batch[stop])
            start = stop + 1

    async def _run_segment(self, segment: Sequence[Envelope]) -> None:
        uow, claims = self._new_uow(), Claims()
        chains: dict[str, list[Envelope]] = {}
        for env in segment:
            if self._relevant(env):
                chains.setdefault(env.saga_id, []).append(env)
        gate = asyncio.Semaphore(self.concurrency)

        async def run(chain: list[Envelope]) -> None:
            async with gate:
                for env in chain:
                    await self._handle_in_view(env, uow, claims)

        await asyncio.gather(*(run(chain) for chain in chains.values()))
        letters = [uow.skipped_new.get(d.event_id, d) for d in uow.letters]
        await self._commit_segment(uow, segment, parked=letters)

    async def _handle_in_view(self, env: Envelope, uow: UnitOfWork, claims: Claims) -> None:
        """Handle one event in its own view of the batch; a failure becomes a letter of the batch."""
        woken_for = None
        while True:
            view = SagaView(uow, claims, woken_for)
            try:
                await self._handle(env, view)
            except Busy as busy:  # another saga's handler holds an aggregate: run again after it
                view.discard()
                claims.release(view)
                await busy.done.wait()
                woken_for = busy.agg_id
                continue
            except Exception as e:
                view.discard()
                claims.release(view)
                uow.letters.append(self._letter(env, e, uow))
                uow.holds.add(env.saga_id)
                return
            view.merge()
            claims.release(view)
            return

    async def _commit_segment(self, uow: UnitOfWork, segment: Sequence[Envelope],
                              parked: Sequence[DeadLetter] = ()) -> None:
        """Commit a run of handled events; if one emitted a taken event id, find and park it."""
        try:
            await self._commit(uow, segment, parked=parked)
        except EventIdTaken as e:
            log.warning("%s: %s; handling the batch's events one by one to park the one that emits it",
                        self.service.name, e)
            i = 0
            while i < len(segment):
                if (parts := _parts(segment, i)) > 1:
                    await self._attempt_parts(segment[i:i + parts])
                else:
                    await self._attempt(segment[i])
                i += parts

    async def _attempt_parts(self, parts: Sequence[Envelope]) -> None:
        """Handle the events an upcaster split one stored event into, in one transaction (they share its
        position): those that fail become dead letters of that transaction, the others are handled."""
        errors: dict[int, Exception] = {}
        while True:
            uow = self._new_uow()
            for i, env in enumerate(parts):
                if i in errors:
                    continue
                try:
                    await self._handle(env, uow)
                except Exception as e:
                    errors[i] = e
                    uow.discard()
                    break
            else:
                break
        letters = [self._letter(parts[i], e, uow) for i, e in sorted(errors.items())]
        await self._commit(uow, parts, parked=letters)

    def _new_uow(self) -> UnitOfWork:
        return UnitOfWork(self.service.name, self.own, self.mapper, self.cache, self.snapshotting)

    async def _commit(
        self,
        uow: UnitOfWork,
        done: Sequence[Envelope],
        parked: Sequence[DeadLetter] = (),
        updated: Sequence[DeadLetter] = (),
    ) -> None:
        reached = self._reached(done)
        handled = [e.event_id for e in done if self._relevant(e)]
        events, letters = uow.stored_events(), [*uow.resolved, *updated]
        claim: Held | None = None
        if self.replica is not None:
            claim = self._held
            await self._keep_claims()
        try:
            await self._io(lambda: self.own.commit(
                events=events, emitted=uow.emitted, tracking=reached, parked=parked,
                handled=list(dict.fromkeys(handled)), updated=letters, deadlines=uow.deadlines, claim=claim,
                snapshots=uow.snapshots,
            ))
        except BaseException:
            uow.discard()
            raise
        uow.keep()
        metrics.handled(self.service.name, (e for e in done if self._relevant(e) and e.event_id not in
                                            {d.event_id for d in parked}))
        self.tracking.update(reached)
        for d in parked:
            if d.status in HOLDING and d.saga_id:
                self.held.add(d.saga_id)
        self.held -= uow.released

    # -- one event ---------------------------------------------------------------------
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


def _parts(batch: Sequence[Envelope], i: int) -> int:
    """How many envelopes from `batch[i]` on are parts of one stored event (an upcaster split it): 1 if none."""
    n = 1
    while i + n < len(batch) and batch[i + n].position == batch[i].position \
            and batch[i + n].source == batch[i].source:
        n += 1
    return n


def _part_start(batch: Sequence[Envelope], start: int, i: int) -> int:
    """The index of the first part of the stored event `batch[i]` belongs to (not before `start`)."""
    while i > start and batch[i - 1].position == batch[i].position and batch[i - 1].source == batch[i].source:
        i -= 1
    return i


def wait_for_retries(processors: Sequence[Processor], limit: float) -> bool:
    """Sleep until the processors' next scheduled retry if it is due within `limit` seconds.

    Returns whether one is due now. Time is choreo's clock: under a frozen clock, which
    sleeping does not move, it returns False rather than wait for ever.
    """
    due = min((p.next_retry_at for p in processors if p.next_retry_at is not None), default=None)
    if due is None:
        return False
    wait = (due - clock.now()).total_seconds()
    if wait > limit:
        return False
    if wait > 0:
        time.sleep(wait)
    return clock.now() >= due
