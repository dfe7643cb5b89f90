"""Runs one service against the log: batches of events in, one transaction out.

For each batch the processor runs the service's handlers, collects the new
aggregate events and emitted events in a unit of work, and commits them with
the new tracking position in one transaction (guarantee 1). It applies the
compensation rules (guarantee 3) using the service's own `Participation`
record of each saga, and the service that starts a saga ends it (guarantee 9,
`choreo._saga_end`). One event's handling lives in `choreo._handling`; parking,
retries and operator commands in `choreo._parking`; deadlines in `choreo._timers`; a
replica's claims in `choreo._replicated`.

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
from datetime import datetime
from typing import Any, TypeVar

from choreo import clock, logs, metrics
from choreo._handling import Handling
from choreo._parking import Parking, call
from choreo._replicated import Replicated
from choreo._participation import participation_id
from choreo._timers import Timers
from choreo._unit_of_work import AggregateCache, Busy, Claims, SagaView, UnitOfWork
from choreo.aggregates import new_mapper
from choreo.errors import ClaimLost, ConcurrencyConflict, EventIdTaken
from choreo.events import Envelope, Outcome, is_known_type, known_types
from choreo.operations import OPERATOR_COMMANDS
from choreo.replicas import ReplicaSettings
from choreo.retry import RetryPolicy
from choreo.saga import SAGA_ENDS
from choreo.service import Service, is_async
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


class Processor(Replicated, Parking, Timers, Handling):
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
