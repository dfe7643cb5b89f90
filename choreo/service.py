"""Services: named units that register handlers, saga steps and compensations."""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import timedelta
from typing import TYPE_CHECKING, Any, TypeVar

from choreo.deadlines import DeadlineSpec
from choreo.errors import WiringError
from choreo.events import Event, is_event_class
from choreo.retry import RetryPolicy
from choreo.saga import SAGA_ENDS, SagaDefinition
from choreo.store import check_service_name
from choreo.snapshots import check_intervals
from choreo.upcasting import check_upcasters

if TYPE_CHECKING:
    from choreo.aggregates import Aggregate

F = TypeVar("F", bound=Callable[..., Any])
#: what `emits=` accepts: event classes
Emits = tuple[type[Event], ...] | list[type[Event]]


@dataclass(frozen=True)
class Handler:
    """One registered function: a plain handler, a saga step, or a compensation."""

    kind: str  # "on" | "step" | "compensation" | "completed" | "failed"
    fn: Callable[..., Any]
    event_type: type[Event] | None
    step: str | None = None
    retry: RetryPolicy | None = None
    #: events it may emit besides its return annotation (e.g. a step's failure event), for `choreo check`
    emits: tuple[type[Event], ...] = ()

    @property
    def name(self) -> str:
        """The function's qualified name, for messages."""
        return f"{self.fn.__module__}.{self.fn.__qualname__}"


class Service:
    """A named service: its handlers, the saga steps it owns and their compensations."""

    def __init__(
        self,
        name: str,
        *,
        starts: tuple[type[Event], ...] | list[type[Event]] = (),
        retry: RetryPolicy | None = None,
        concurrency: int | None = None,
        threads: int = 0,
        segments: int | None = None,
        snapshot_every: Mapping[type[Aggregate], int] | None = None,
    ) -> None:
        self.name = check_service_name(name)
        #: snapshot intervals by aggregate class (`choreo.snapshots`), over the classes' own `snapshot_every`
        self.snapshot_every = check_intervals(self.name, snapshot_every)
        self.handlers: dict[str, list[Handler]] = {}
        self.steps: dict[str, Handler] = {}
        self.compensations: dict[str, Handler] = {}
        self.deadlines: dict[str, DeadlineSpec] = {}
        #: the saga definitions whose end this service tracks, by start event type
        self.sagas: dict[str, SagaDefinition] = {}
        #: end handlers by (saga name, "completed" | "failed")
        self.ends: dict[tuple[str, str], Handler] = {}
        self.starts: tuple[type[Event], ...] = tuple(_event_class(self.name, e, "starts") for e in starts)
        self.retry = retry
        if concurrency is not None and (not isinstance(concurrency, int) or concurrency < 1):
            raise WiringError(f"service {self.name!r}: concurrency must be a whole number >= 1, got {concurrency!r}")
        if not isinstance(threads, int) or threads < 0:
            raise WiringError(f"service {self.name!r}: threads must be a whole number >= 0, got {threads!r}")
        #: how many sagas this service handles at once (None: see `effective_concurrency`)
        self.concurrency = concurrency
        #: sync handlers run in a pool of this many threads (0: in the service's loop, one at a time)
        self.threads = threads
        if segments is not None and (not isinstance(segments, int) or not 1 <= segments <= 4096):
            raise WiringError(f"service {self.name!r}: segments must be a whole number from 1 to 4096, got {segments!r}")
        #: into how many segments its replicas split its work (None: `choreo run` runs it whole, as one process)
        self.segments = segments

    def __repr__(self) -> str:
        return f"Service({self.name!r})"

    def on(self, event_type: type[Event], *, retry: RetryPolicy | None = None, emits: Emits = ()) -> Callable[[F], F]:
        """Register `fn(event, ctx)` to run on every `event_type`; it may return events to emit.

        `emits` names events it emits that its return annotation does not (see `choreo.check`).
        """
        cls = _event_class(self.name, event_type, "on")
        out = _emits(self.name, emits, "on")

        def register(fn: F) -> F:
            self._add(Handler("on", _callable(self.name, fn), cls, retry=retry, emits=out))
            return fn

        return register

    def step(
        self, name: str, *, on: type[Event], retry: RetryPolicy | None = None, emits: Emits = ()
    ) -> Callable[[F], F]:
        """Register the saga step `name`, run on `on`; it returns the step's completion event.

        It raises `StepFailed(event)` to fail the step, which starts compensation. `emits`
        names the failure events (and any other) that the return annotation does not.
        """
        cls = _event_class(self.name, on, f"step {name!r}")
        out = _emits(self.name, emits, f"step {name!r}")
        if not isinstance(name, str) or not name:
            raise WiringError(f"service {self.name!r}: a step needs a non-empty name")

        def register(fn: F) -> F:
            if name in self.steps:
                raise WiringError(
                    f"service {self.name!r}: step {name!r} is registered twice "
                    f"({self.steps[name].name} and {fn.__module__}.{fn.__qualname__})"
                )
            handler = Handler("step", _callable(self.name, fn), cls, name, retry, out)
            self.steps[name] = handler
            self._add(handler)
            return fn

        return register

    def compensation(self, step: str, *, emits: Emits = ()) -> Callable[[F], F]:
        """Register `fn(done_event, ctx)` that undoes step `step` of this service."""
        out = _emits(self.name, emits, f"compensation {step!r}")

        def register(fn: F) -> F:
            if step in self.compensations:
                raise WiringError(
                    f"service {self.name!r}: step {step!r} has two compensations "
                    f"({self.compensations[step].name} and {fn.__module__}.{fn.__qualname__})"
                )
            self.compensations[step] = Handler("compensation", _callable(self.name, fn), None, step, emits=out)
            return fn

        return register

    def deadline(
        self,
        name: str,
        *,
        start_on: type[Event],
        cancel_on: tuple[type[Event], ...] | list[type[Event]] = (),
        after: timedelta,
        fails_saga: bool = True,
        emits: Emits = (),
    ) -> Callable[[F], F]:
        """Register `fn(start_event, ctx)`, run once if `after` passes between `start_on` and any `cancel_on`.

        It returns the event to emit; with `fails_saga` (the default) that event fails the
        saga, so every participant compensates. Deadlines are stored, so they survive
        restarts, and they follow choreo's clock.
        """
        start = _event_class(self.name, start_on, f"deadline {name!r}")
        cancel = tuple(_event_class(self.name, e, f"deadline {name!r}") for e in cancel_on)
        out = _emits(self.name, emits, f"deadline {name!r}")
        if name in self.deadlines:
            raise WiringError(f"service {self.name!r}: deadline {name!r} is declared twice")

        def register(fn: F) -> F:
            self.deadlines[name] = DeadlineSpec(name, start, cancel, after, _callable(self.name, fn), fails_saga, out)
            return fn

        return register

    def saga_completed(self, saga: SagaDefinition, *, emits: Emits = ()) -> Callable[[F], F]:
        """Register `fn(done: SagaCompleted, ctx)`, called once per saga of `saga` when every step completed.

        Only the service that starts the saga (`starts=[saga.start]`) can register it. The
        function may return events to emit (the saga's end events, such as `OrderConfirmed`).
        """
        return self._end(saga, "completed", emits)

    def saga_failed(self, saga: SagaDefinition, *, emits: Emits = ()) -> Callable[[F], F]:
        """Register `fn(failed: SagaFailed, ctx)`, called once per failed saga of `saga`.

        It runs when a failure was seen and every step that completed was compensated or
        skipped; `failed` names the cause, the failed step and the compensated steps.
        """
        return self._end(saga, "failed", emits)

    def track(self, saga: SagaDefinition) -> None:
        """End sagas of `saga` (emit `SagaCompleted`/`SagaFailed`) even without end handlers."""
        if not isinstance(saga, SagaDefinition):
            raise WiringError(f"service {self.name!r}: expected a SagaDefinition, got {saga!r}")
        if saga.start not in self.starts:
            raise WiringError(
                f"service {self.name!r} does not start saga {saga.name!r}: only the service that "
                f"declares starts=[{saga.start.__name__}] can end it"
            )
        known = self.sagas.get(saga.start.event_type)
        if known is not None and known != saga:
            raise WiringError(
                f"service {self.name!r}: sagas {known.name!r} and {saga.name!r} both start with "
                f"{saga.start.__name__}"
            )
        self.sagas[saga.start.event_type] = saga

    def _end(self, saga: SagaDefinition, outcome: str, emits: Emits) -> Callable[[F], F]:
        self.track(saga)
        out = _emits(self.name, emits, f"saga_{outcome}")

        def register(fn: F) -> F:
            known = self.ends.get((saga.name, outcome))
            if known is not None:
                raise WiringError(
                    f"service {self.name!r}: saga {saga.name!r} has two {outcome} handlers "
                    f"({known.name} and {fn.__module__}.{fn.__qualname__})"
                )
            self.ends[saga.name, outcome] = Handler(outcome, _callable(self.name, fn), None, emits=out)
            return fn

        return register

    @property
    def has_async_handlers(self) -> bool:
        """Whether any of this service's handlers is an `async def` function."""
        handlers = [*self.steps.values(), *self.compensations.values(), *self.ends.values(),
                    *(h for hs in self.handlers.values() for h in hs)]
        return any(is_async(h.fn) for h in handlers) or any(is_async(d.fn) for d in self.deadlines.values())

    def effective_concurrency(self, threads: int | None = None) -> int:
        """How many sagas the service handles at once: `concurrency` if set, else 256 when a
        handler is `async def`, the thread count when sync handlers run in threads (this
        service's, or `threads`), else 1."""
        if self.concurrency is not None:
            return self.concurrency
        if self.has_async_handlers:
            return 256
        return max(1, self.threads if threads is None else threads)

    def retry_policy(self, event_type: str) -> RetryPolicy | None:
        """The retry policy for events of `event_type`: the handler's, else the service's."""
        for handler in self.handlers.get(event_type, ()):
            if handler.retry is not None:
                return handler.retry
        return self.retry

    def _add(self, handler: Handler) -> None:
        assert handler.event_type is not None
        self.handlers.setdefault(handler.event_type.event_type, []).append(handler)

    def validate(self) -> None:
        """Raise `WiringError` if a compensation names a step this service does not own, or if the
        upcasters cannot bring every old event to a current class (`check_upcasters`)."""
        check_upcasters()
        for step, handler in self.compensations.items():
            if step not in self.steps:
                raise WiringError(
                    f"service {self.name!r}: compensation {handler.name} is for step {step!r}, "
                    f"which {self.name!r} does not own (its steps: {sorted(self.steps) or 'none'})"
                )

    @property
    def subscribed_types(self) -> frozenset[str]:
        """Type names of the events this service handles, that start or cancel its deadlines
        (and the saga ends, which cancel them too), or that start the sagas it ends."""
        timers = {e.event_type for d in self.deadlines.values() for e in (d.start_on, *d.cancel_on)}
        if self.deadlines:
            timers |= SAGA_ENDS
        return frozenset(self.handlers) | timers | frozenset(self.sagas)


def _callable(service: str, fn: F) -> F:
    """Return `fn` if it can be a handler (a plain or an `async def` function)."""
    if not callable(fn):
        raise WiringError(f"service {service!r}: a handler must be a function, got {fn!r}")
    return fn


def is_async(fn: Callable[..., Any]) -> bool:
    """Whether `fn` is an `async def` function (or an object whose `__call__` is one)."""
    return inspect.iscoroutinefunction(fn) or inspect.iscoroutinefunction(getattr(fn, "__call__", None))


def _event_class(service: str, obj: object, where: str) -> type[Event]:
    if not is_event_class(obj):
        raise WiringError(
            f"service {service!r}: {where} expects an Event subclass, got {obj!r}"
        )
    return obj  # type: ignore[return-value]


def _emits(service: str, emits: object, where: str) -> tuple[type[Event], ...]:
    if not isinstance(emits, (tuple, list)):
        raise WiringError(f"service {service!r}: {where}: emits= expects a list of Event subclasses, got {emits!r}")
    return tuple(_event_class(service, e, f"{where} emits=") for e in emits)
