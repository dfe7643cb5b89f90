"""OpenTelemetry traces: a span per handler run, every span of a saga in one trace.

choreo uses only the OpenTelemetry API (`pip install "choreo[otel]"`), and only once the
application has imported it and set a tracer provider (an SDK's, with its exporters):
until then each hook is a dictionary lookup that finds nothing, so choreo costs nothing
to run without tracing.

- `System.start()` opens a span `"<type> start"` (a child of the caller's current span,
  if any) and writes its W3C trace context into the start event's envelope (`trace`).
- A service that runs a handler for an event opens a span `"<type> process"` whose
  parent is the context in that event's envelope, with the attributes `choreo.service`,
  `choreo.event_type`, `choreo.event_id`, `choreo.saga_id`, `choreo.step`,
  `choreo.outcome` (completed, failed, compensated, skipped, handled, or error) and
  `choreo.attempt`, and OpenTelemetry's messaging attributes (`messaging.system` =
  choreo, `messaging.operation` = process, `messaging.destination.name`).
- Each event a handler emits carries that span's context, so the next service's span
  is its child: the spans follow the causation chain, across processes. Events emitted
  outside a handler span (choreo's own, such as the saga's end) carry their cause's.
- An end handler (`saga_completed`, `saga_failed`) has its span too; a deadline's
  handler runs in a span `"deadline <name> fire"`, the root of a trace of its own.

On SQLite the context is the log's `trace` column; on Kafka the record's `trace` field
and its `traceparent` header.

`choreo run` calls the function named by `$CHOREO_TRACING` (`MODULE:FUNCTION`) first,
so that it can set a tracer provider; `opentelemetry-instrument choreo run ...` works too.
"""

from __future__ import annotations

import contextlib
import contextvars
import importlib
import os
import sys
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from choreo._unit_of_work import UnitOfWork
    from choreo.events import Envelope

_TRACER: tuple[object, Any] | None = None  # (the provider, its tracer for choreo)
_attempt: contextvars.ContextVar[int] = contextvars.ContextVar("choreo_attempt", default=1)
_NOTHING = contextlib.nullcontext()


def _tracer() -> Any | None:
    """choreo's tracer if the application set a tracer provider, else None (cheap: no import)."""
    global _TRACER
    api = sys.modules.get("opentelemetry.trace")
    if api is None:
        return None
    provider = getattr(api, "_TRACER_PROVIDER", None)
    if provider is None:
        return None
    if _TRACER is None or _TRACER[0] is not provider:
        from choreo import __version__

        _TRACER = (provider, provider.get_tracer("choreo", __version__))
    return _TRACER[1]


def enabled() -> bool:
    """Whether choreo records spans now (a tracer provider is set)."""
    return _tracer() is not None


def _traceparent() -> str | None:
    """The W3C traceparent of the current span, if there is a valid one."""
    from opentelemetry import trace

    ctx = trace.get_current_span().get_span_context()
    if not ctx.is_valid:
        return None
    return f"00-{ctx.trace_id:032x}-{ctx.span_id:016x}-{int(ctx.trace_flags):02x}"


def _context(traceparent: str | None) -> Any:
    """The OpenTelemetry context whose parent is `traceparent` (None: no parent)."""
    if not traceparent:
        return None
    from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

    return TraceContextTextMapPropagator().extract({"traceparent": traceparent})


def carried(cause: Envelope | None) -> str | None:
    """The trace context for an event emitted now: the current span's, else its cause's."""
    if _tracer() is None:
        return cause.trace if cause is not None else None
    return _traceparent() or (cause.trace if cause is not None else None)


@contextlib.contextmanager
def starting(event_type: str, saga_id: str | None) -> Iterator[None]:
    """Around `System.start()`: a span whose context the start event carries (a child of the caller's)."""
    tracer = _tracer()
    if tracer is None:
        yield
        return
    from opentelemetry.trace import SpanKind

    attributes = {"messaging.system": "choreo", "messaging.operation": "publish", "choreo.event_type": event_type}
    if saga_id:
        attributes["choreo.saga_id"] = saga_id
    with tracer.start_as_current_span(f"{event_type} start", kind=SpanKind.PRODUCER, attributes=attributes):
        yield


def handling(service: str, env: Envelope, uow: UnitOfWork, runs: bool) -> contextlib.AbstractContextManager[Any]:
    """Around one event's handlers in a service: its span (nothing when not tracing or nothing `runs`)."""
    if not runs:
        return _NOTHING
    tracer = _tracer()
    if tracer is None:
        return _NOTHING
    return _span(tracer, service, env, uow)


@contextlib.contextmanager
def _span(tracer: Any, service: str, env: Envelope, uow: UnitOfWork) -> Iterator[None]:
    from opentelemetry.trace import SpanKind, Status, StatusCode

    mark = len(uow.emitted)
    attributes: dict[str, Any] = {
        "messaging.system": "choreo", "messaging.operation": "process",
        "messaging.destination.name": env.source, "messaging.message.id": env.event_id,
        "choreo.service": service, "choreo.event_type": env.type, "choreo.event_id": env.event_id,
        "choreo.saga_id": env.saga_id, "choreo.attempt": _attempt.get(),
    }
    with tracer.start_as_current_span(f"{env.type} process", context=_context(env.trace), kind=SpanKind.CONSUMER,
                                      attributes=attributes, record_exception=False,
                                      set_status_on_exception=False) as span:
        try:
            yield
        except Exception as e:
            span.record_exception(e)
            span.set_status(Status(StatusCode.ERROR, f"{type(e).__name__}: {e}"))
            span.set_attribute("choreo.outcome", "error")
            raise
        except BaseException:  # run again later (another saga's handler held an aggregate)
            span.set_attribute("choreo.outcome", "interrupted")
            raise
        out = next((e for e in uow.emitted[mark:] if e.outcome), None)
        span.set_attribute("choreo.outcome", out.outcome if out is not None and out.outcome else "handled")
        if out is not None and out.step:
            span.set_attribute("choreo.step", out.step)


def firing(service: str, name: str, saga_id: str) -> contextlib.AbstractContextManager[Any]:
    """Around a deadline's handler: a span `"deadline <name> fire"`, the root of a trace of its own.

    A stored deadline does not keep the trace context of the event that started it, so
    what its expiry causes (the saga's compensation, say) is traced from this span.
    """
    tracer = _tracer()
    if tracer is None:
        return _NOTHING
    from opentelemetry.context import Context
    from opentelemetry.trace import SpanKind

    return tracer.start_as_current_span(
        f"deadline {name} fire", kind=SpanKind.INTERNAL, context=Context(),
        attributes={"choreo.service": service, "choreo.deadline": name, "choreo.saga_id": saga_id})


@contextlib.contextmanager
def attempt(number: int) -> Iterator[None]:
    """Within: the handlers run for the `number`th time (a retry of a dead letter)."""
    token = _attempt.set(number)
    try:
        yield
    finally:
        _attempt.reset(token)


def configure_from_env() -> None:
    """Call `$CHOREO_TRACING` (`MODULE:FUNCTION`), which sets the tracer provider of a `choreo run` process."""
    target = os.environ.get("CHOREO_TRACING")
    if not target:
        return
    from choreo._cli_common import UsageError

    module, _, name = target.partition(":")
    try:
        fn = getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError, ValueError) as e:
        raise UsageError(f"$CHOREO_TRACING={target!r}: cannot load MODULE:FUNCTION: {e}") from e
    fn()
