"""Static checks of a system's wiring: what `choreo check` reports, before anything runs.

What a handler emits is known from two declarations, never from running it:

- its return annotation (`-> ItemsReserved`, `-> A | B`, `-> list[A]`, `-> None` for nothing);
- `emits=[...]` on its registration (`Service.on`, `step`, `compensation`, `deadline`,
  `saga_completed`, `saga_failed`): what it emits besides, such as the failure event a
  step raises with `StepFailed`, or events passed to `ctx.emit()`.

Beyond the handlers, a service's `starts=[...]` events are emitted by whoever calls
`System.start()`, and choreo emits its own events (`choreo.*`: saga ends, skipped and
compensated steps, operator commands). An event is handled when a service handles its
type (`on`, a step's trigger, a deadline's start or cancel event), when it starts a saga
definition, or when the saga machinery reads it by its outcome: the completion,
failure and compensation events of a step that a saga definition lists, the events of
a deadline that fails its saga, and a saga definition's end events.
"""

from __future__ import annotations

import types
import typing
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass
from typing import Any

from choreo.events import Event, is_event_class
from choreo.saga import SagaCompleted, SagaFailed
from choreo.service import Handler, Service
from choreo.system import System

#: The kinds of finding, in the order they are reported.
KINDS = (
    "step-without-compensation",
    "unhandled-event",
    "unemitted-event",
    "unreachable-step",
    "uncancelled-deadline",
    "silent-compensation",
    "undeclared-emits",
)


@dataclass(frozen=True)
class Finding:
    """One warning about a system's wiring: its kind, the service (if any), what it is about, and why."""

    kind: str
    service: str | None
    subject: str
    message: str

    def to_dict(self) -> dict[str, Any]:
        """The finding as a JSON-ready dict."""
        return asdict(self)

    def __str__(self) -> str:
        where = f"{self.service}: " if self.service else ""
        return f"{self.kind}: {where}{self.message}"


@dataclass(frozen=True)
class _Emitter:
    service: str
    kind: str  # "on" | "step" | "compensation" | "completed" | "failed" | "deadline"
    name: str  # the function's or the deadline's name
    step: str | None
    trigger: str | None  # the event type that runs it (None: a compensation or a saga end)
    emits: frozenset[str] | None  # None: unknown (no return annotation, no emits=)
    fails_saga: bool = False


def declared_emits(fn: Callable[..., Any], extra: Iterable[type[Event]] = ()) -> frozenset[str] | None:
    """The event types `fn` declares it emits (return annotation and `extra`); None if it declares nothing."""
    found = {cls.event_type for cls in extra}
    try:
        hints = typing.get_type_hints(fn)
    except Exception:  # an annotation that cannot be resolved here: not a declaration
        hints = {}
    if "return" not in hints:
        return frozenset(found) if found else None
    return frozenset(found | _event_types(hints["return"]))


def _event_types(annotation: object) -> set[str]:
    if annotation is None or annotation is type(None):
        return set()
    if is_event_class(annotation):
        return {annotation.event_type}  # type: ignore[attr-defined]
    origin = typing.get_origin(annotation)
    if origin is typing.Union or origin is types.UnionType or origin is not None:
        return {t for arg in typing.get_args(annotation) if arg is not Ellipsis for t in _event_types(arg)}
    return set()


def _emitters(system: System) -> list[_Emitter]:
    out: list[_Emitter] = []

    def add(service: Service, h: Handler, kind: str) -> None:
        trigger = h.event_type.event_type if h.event_type is not None else None
        out.append(_Emitter(service.name, kind, h.name, h.step, trigger, declared_emits(h.fn, h.emits)))

    for s in system.services.values():
        for hs in s.handlers.values():
            for h in hs:
                add(s, h, h.kind)
        for h in s.compensations.values():
            add(s, h, "compensation")
        for h in s.ends.values():
            add(s, h, h.kind)
        for d in s.deadlines.values():
            out.append(_Emitter(s.name, "deadline", d.name, None, d.start_on.event_type,
                                declared_emits(d.fn, d.emits), d.fails_saga))
    return out


def check(system: System) -> list[Finding]:
    """Return the warnings about `system`'s wiring (an empty list: nothing to report).

    See the module's docstring for how emitted and handled events are known; the kinds
    of finding are listed in `KINDS`.
    """
    if not isinstance(system, System):
        raise TypeError(f"check() expects a choreo System, got {system!r}")
    emitters = _emitters(system)
    findings: list[Finding] = []
    saga_steps = {step for saga in system.sagas for step in saga.steps}
    tracked = {saga.name for s in system.services.values() for saga in s.sagas.values()}

    # who emits what
    emitted: dict[str, list[_Emitter]] = {}
    for e in emitters:
        for t in e.emits or ():
            emitted.setdefault(t, []).append(e)
    started = {cls.event_type for s in system.services.values() for cls in s.starts}
    produced = set(emitted) | started

    # who handles what
    handled_by_type = {t for s in system.services.values() for t in s.handlers}
    handled_by_type |= {cls.event_type for s in system.services.values() for d in s.deadlines.values()
                        for cls in (d.start_on, *d.cancel_on)}
    handled_by_type |= {saga.start.event_type for saga in system.sagas}
    ends = {t for saga in system.sagas for t in saga.end_types}

    for s in system.services.values():
        for step in s.steps:
            if step not in s.compensations:
                findings.append(Finding("step-without-compensation", s.name, step,
                                        f"step {step!r} has no compensation: a failed saga cannot undo it"))

    reported: set[str] = set()
    for e in emitters:
        for t in sorted(e.emits or ()):
            if t in reported or t.startswith("choreo.") or t in handled_by_type or t in ends:
                continue
            if (e.step in saga_steps and e.kind in ("step", "compensation")) or (e.kind == "deadline" and e.fails_saga):
                continue  # read by the saga machinery, by its outcome
            reported.add(t)
            by = ", ".join(sorted({f"{x.service} ({x.name})" for x in emitted[t]}))
            findings.append(Finding("unhandled-event", e.service, t,
                                    f"event {t!r} is emitted by {by} but nothing handles it"))
    for t in sorted(started - handled_by_type - reported):
        findings.append(Finding("unhandled-event", system.origins.get(t), t,
                                f"event {t!r} starts sagas but nothing handles it"))

    for s in system.services.values():
        needed = {h.event_type.event_type: f"{h.kind} {h.name}" for hs in s.handlers.values() for h in hs
                  if h.event_type is not None}
        needed |= {d.start_on.event_type: f"deadline {d.name!r}" for d in s.deadlines.values()}
        for t, who in sorted(needed.items()):
            if t not in produced and not t.startswith("choreo."):
                findings.append(Finding("unemitted-event", s.name, t,
                                        f"{who} handles {t!r}, which nothing emits"))

    for saga in system.sagas:
        reachable = _reachable(saga.start.event_type, emitters, saga.name in tracked)
        for step in saga.steps:
            owner = system.services[system.step_owners[step]]
            trigger = owner.steps[step].event_type
            assert trigger is not None
            if trigger.event_type not in reachable:
                findings.append(Finding(
                    "unreachable-step", owner.name, step,
                    f"saga {saga.name!r}: step {step!r} runs on {trigger.event_type!r}, which no handler "
                    f"emits on any path from the saga's start {saga.start.event_type!r}"))

    for s in system.services.values():
        for d in s.deadlines.values():
            cancels = [c.event_type for c in d.cancel_on if c.event_type in produced]
            ended = any(saga.name in tracked and d.start_on.event_type in _reachable(
                saga.start.event_type, emitters, True) for saga in system.sagas)
            if not cancels and not ended:
                why = ("it has no cancel_on events" if not d.cancel_on
                       else f"nothing emits its cancel_on events ({', '.join(c.event_type for c in d.cancel_on)})")
                findings.append(Finding(
                    "uncancelled-deadline", s.name, d.name,
                    f"deadline {d.name!r} is never cancelled: {why}, and no tracked saga definition's end "
                    f"cancels it; it fires for every {d.start_on.event_type!r}"))

    for e in emitters:
        if e.emits is None:
            findings.append(Finding(
                "undeclared-emits", e.service, e.name,
                f"{e.kind} {e.name} declares nothing it emits: give it a return annotation "
                f"(-> None if it emits nothing) or emits=[...], so that checks can follow it"))
        elif e.kind == "compensation" and not e.emits:
            findings.append(Finding(
                "silent-compensation", e.service, e.step or e.name,
                f"the compensation of step {e.step!r} ({e.name}) emits nothing: the saga's timeline "
                f"shows only choreo's StepCompensated"))
    return sorted(findings, key=lambda f: (KINDS.index(f.kind), f.service or "", f.subject))


def _reachable(start: str, emitters: list[_Emitter], tracked: bool) -> set[str]:
    """The event types that can follow `start` through handlers that a trigger runs."""
    seen, todo = {start}, [start]
    by_trigger: dict[str, list[_Emitter]] = {}
    for e in emitters:
        if e.trigger is not None:
            by_trigger.setdefault(e.trigger, []).append(e)
        elif e.kind in ("completed", "failed") and tracked:  # run by choreo's end of the saga
            by_trigger.setdefault(SagaCompleted.event_type if e.kind == "completed" else SagaFailed.event_type,
                                  []).append(e)
    if tracked:
        seen |= {SagaCompleted.event_type, SagaFailed.event_type}
        todo += [SagaCompleted.event_type, SagaFailed.event_type]
    while todo:
        t = todo.pop()
        for e in by_trigger.get(t, ()):
            for out in e.emits or ():
                if out not in seen:
                    seen.add(out)
                    todo.append(out)
    return seen
