"""Running services: all in this thread, a thread per service, or one service per process."""

from __future__ import annotations

import logging
import signal
import threading
import time
from collections.abc import Iterable
from types import FrameType

from choreo.errors import StoreError
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
    ) -> None:
        self.system = system
        self.store = store
        names = list(services) if services is not None else list(system.services)
        self.processors = [
            Processor(system[n], store, batch_size=batch_size, retry=retry) for n in names
        ]
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self.errors: list[BaseException] = []

    def start(self, event: Event, *, saga_id: str | None = None) -> str:
        """Start a saga with its initiating event; return the saga id."""
        return self.system.start(self.store, event, saga_id=saga_id)

    def run_until_idle(self, max_rounds: int = 1_000_000, *, retry_wait: float = 10.0) -> int:
        """Process in this thread, service by service, until no service has work; return events read.

        Scheduled retries due within `retry_wait` seconds are waited for (choreo's clock:
        under a frozen clock nothing is waited for); later ones are left scheduled.
        """
        total = 0
        for _ in range(max_rounds):
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


def run_processor(processor: Processor, stop: threading.Event, idle_wait: float = 0.2) -> None:
    """Process the log until `stop` is set; wait for new events when idle."""
    backoff = 0.05
    while not stop.is_set():
        try:
            processor.poll(timeout=idle_wait)
        except StoreError:  # a locked, full or unreachable store: the processor said so; wait, try again
            stop.wait(backoff)
            backoff = min(backoff * 2, 5.0)
            continue
        backoff = 0.05


def run_service(service: Service, store: EventStore, **options: object) -> None:
    """Run one service in this process until SIGINT or SIGTERM; the current batch completes first."""
    stop = threading.Event()

    def on_signal(signum: int, frame: FrameType | None) -> None:
        log.info("%s: received signal %s, stopping", service.name, signum)
        stop.set()

    previous = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        processor = Processor(service, store, **options)  # type: ignore[arg-type]
        log.info("%s: running from %s on %s", service.name, processor.tracking or "the start", store.url)
        started = time.monotonic()
        try:
            run_processor(processor, stop)
        finally:
            processor.close()
        log.info("%s: stopped at %s after %.1fs", service.name, processor.tracking, time.monotonic() - started)
    finally:
        for s, h in previous.items():
            signal.signal(s, h)
