"""Running services: all in this thread, a thread per service, one service per process,
or as tasks in an application's own event loop (`AsyncRunner`)."""

from __future__ import annotations

import asyncio
import logging
import signal
import threading
import time
from collections.abc import Iterable
from datetime import datetime
from types import FrameType
from typing import Any, Protocol

from choreo import clock, logs
from choreo.errors import LogRewound, StoreError, WiringError
from choreo.events import Event
from choreo.processor import Processor, wait_for_retries
from choreo.retry import RetryPolicy
from choreo.service import Service
from choreo.store import EventStore
from choreo.system import System

log = logging.getLogger("choreo")


class Runner:
    """Runs services of a system against one store (in-process)."""

    def __init__(
        self,
        system: System,
        store: EventStore,
        *,
        services: Iterable[str] | None = None,
        batch_size: int = 1000,
        retry: RetryPolicy | None = None,
        concurrency: int | None = None,
        threads: int | None = None,
    ) -> None:
        self.system = system
        self.store = store
        names = list(services) if services is not None else list(system.services)
        self.processors = [
            Processor(system[n], store, batch_size=batch_size, retry=retry, concurrency=concurrency, threads=threads)
            for n in names
        ]
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self.errors: list[BaseException] = []

    def start(self, event: Event, *, saga_id: str | None = None) -> str:
        """Start a saga with its initiating event; return the saga id."""
        return self.system.start(self.store, event, saga_id=saga_id)

    def run_until_idle(self, max_rounds: int = 1_000_000, *, retry_wait: float = 10.0) -> int:
        """Process in this thread until no service has work; return events read.

        Services with plain handlers only run one after another. When one needs an event
        loop (async handlers, concurrency, threads), all run as tasks of one loop, so one
        service's handlers run while another's wait. Scheduled retries due within
        `retry_wait` seconds are waited for (choreo's clock: under a frozen clock nothing
        is waited for); later ones are left scheduled.
        """
        together = any(p.needs_loop for p in self.processors)
        total = 0
        for _ in range(max_rounds):
            if together:
                n = asyncio.run(_drain_together(self.processors))
            else:
                n = sum(p.run_until_idle(retry_wait=0) for p in self.processors)
            total += n
            if n == 0 and not wait_for_retries(self.processors, retry_wait):
                return total
        raise RuntimeError("run_until_idle: the system did not go idle")

    def start_threads(self) -> None:
        """Run each service in its own thread until `stop()`."""
        self._stop.clear()
        for p in self.processors:
            t = threading.Thread(
                target=self._guarded, args=(p,), name=f"choreo-{p.service.name}", daemon=True
            )
            self._threads.append(t)
            t.start()

    def _guarded(self, processor: Processor) -> None:
        try:
            run_processor(processor, self._stop)
        except BaseException as e:  # surfaced by stop()
            self.errors.append(e)
            log.exception("%s stopped", processor.service.name)

    def stop(self) -> None:
        """Ask the service threads to stop after their current batch, and wait for them."""
        self._stop.set()
        for t in self._threads:
            t.join()
        self._threads.clear()
        for p in self.processors:
            p.close()
        if self.errors:
            raise self.errors[0]

    def __enter__(self) -> Runner:
        self.start_threads()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


async def _drain_together(processors: Iterable[Processor]) -> int:
    """Each processor polls until it has nothing new, all at once in this loop; return events read."""

    async def drain(p: Processor) -> int:
        total = 0
        while n := await p.apoll():
            total += n
        return total

    return sum(await asyncio.gather(*(drain(p) for p in processors)))


class _Stop(Protocol):
    def is_set(self) -> bool: ...


def run_processor(processor: Processor, stop: threading.Event, idle_wait: float = 0.2) -> None:
    """Process the log until `stop` is set; wait for new events when idle.

    A service that needs an event loop (async handlers, concurrency, threads) gets one
    loop for the whole run.
    """
    if processor.needs_loop:
        asyncio.run(arun_processor(processor, stop, idle_wait))
        return
    backoff = _Backoff(processor)
    while not stop.is_set():
        try:
            processor.poll(timeout=_idle(processor, idle_wait))
        except Exception as e:
            stop.wait(backoff.after(e))
            continue
        backoff.reset()


async def arun_processor(processor: Processor, stop: _Stop, idle_wait: float = 0.2) -> None:
    """`run_processor()` as a coroutine: process until `stop` (a threading or asyncio event) is set."""
    backoff = _Backoff(processor)
    while not stop.is_set():
        try:
            await processor.apoll(timeout=_idle(processor, idle_wait))
        except Exception as e:
            await asyncio.sleep(backoff.after(e))
            continue
        backoff.reset()


def _idle(processor: Processor, idle_wait: float) -> float:
    """How long a poll may wait for new events: not past the next scheduled retry."""
    due: datetime | None = processor.next_retry_at
    if due is None:
        return idle_wait
    return max(0.0, min(idle_wait, (due - clock.now()).total_seconds()))


class _Backoff:
    """What a running service does after a failed poll: how long to wait, or stop."""

    def __init__(self, processor: Processor) -> None:
        self.processor = processor
        self.reset()

    def reset(self) -> None:
        self.delay = 0.05

    def after(self, error: Exception) -> float:
        """The seconds to wait before the next poll; raise `error` if an operator must act."""
        if isinstance(error, (LogRewound, WiringError)):
            raise error
        if not isinstance(error, StoreError):  # a bug, in choreo or in the service: never a crash loop
            log.exception("%s: unexpected error; resuming from the last committed position",
                          self.processor.service.name, exc_info=error)
        delay, self.delay = self.delay, min(self.delay * 2, 5.0)
        return delay


class AsyncRunner:
    """Runs a system's services as tasks in the running event loop (an ASGI app's lifespan, say).

    ```python
    async with AsyncRunner(system, open_store(url)) as running:
        saga_id = await running.start(OrderPlaced(...))
    ```

    Store calls run in a worker thread per service, so they never block the loop;
    `async def` handlers are awaited in it.
    """

    def __init__(self, system: System, store: EventStore, *, services: Iterable[str] | None = None,
                 **options: Any) -> None:
        self.system = system
        self.store = store
        self.names = list(services) if services is not None else list(system.services)
        self.options = options
        self.processors: list[Processor] = []
        self._stop = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []

    async def start(self, event: Event, *, saga_id: str | None = None) -> str:
        """Start a saga (append its initiating event, off the loop); return the saga id."""
        return await asyncio.to_thread(self.system.start, self.store, event, saga_id=saga_id)

    async def __aenter__(self) -> AsyncRunner:
        try:
            for name in self.names:
                processor = await asyncio.to_thread(Processor, self.system[name], self.store, **self.options)
                processor.offload = True
                self.processors.append(processor)
        except BaseException:
            await self._close()
            raise
        self._stop.clear()
        for p in self.processors:
            task = asyncio.create_task(arun_processor(p, self._stop), name=f"choreo-{p.service.name}")
            task.add_done_callback(_report_stopped)
            self._tasks.append(task)
        return self

    async def __aexit__(self, *exc: object) -> None:
        self._stop.set()
        results = await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks.clear()
        await self._close()
        errors = [r for r in results if isinstance(r, BaseException) and not isinstance(r, asyncio.CancelledError)]
        if errors:
            raise errors[0]

    async def _close(self) -> None:
        for p in self.processors:
            await asyncio.to_thread(p.close)
        self.processors.clear()


def _report_stopped(task: asyncio.Task[None]) -> None:
    """Say at once when a service's task stopped for good (an operator must act), not only at shutdown."""
    if not task.cancelled() and task.exception() is not None:
        log.error("%s stopped: %s", task.get_name(), task.exception(), exc_info=task.exception())


def _start(service: Service, store: EventStore, stop: threading.Event, options: dict[str, Any]) -> Processor | None:
    """The service's processor, waiting (with backoff) while the store is locked or unreachable."""
    delay = 0.05
    while not stop.is_set():
        try:
            return Processor(service, store, **options)
        except StoreError as e:
            log.warning("%s: cannot start yet: %s; trying again in %.2fs", service.name, e, delay)
            stop.wait(delay)
            delay = min(delay * 2, 5.0)
    return None


def run_service(service: Service, store: EventStore, **options: object) -> None:
    """Run one service in this process until SIGINT or SIGTERM; the current batch completes first."""
    stop = threading.Event()
    logs.bind(service.name)

    def on_signal(signum: int, frame: FrameType | None) -> None:
        log.info("%s: received signal %s, stopping", service.name, signum)
        stop.set()

    previous = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        processor = _start(service, store, stop, options)
        if processor is None:
            return
        if processor.replica is None:
            log.info("%s: running from %s on %s", service.name, processor.tracking or "the start", store.url)
        else:
            r = processor.replica
            log.info("%s: running from its segments' positions on %s as replica %s, holding %d of %d segments",
                     service.name, store.url, r.id, len(r.tokens), r.segments)
        started = time.monotonic()
        try:
            run_processor(processor, stop)
        finally:
            processor.close()
        log.info("%s: stopped at %s after %.1fs", service.name, processor.tracking, time.monotonic() - started)
    finally:
        for s, h in previous.items():
            signal.signal(s, h)
