"""The system's flow, derived from its registered handlers: who reacts to what, who emits what.

What a handler emits is what it declares, as `choreo check` reads it: its return
annotation (`-> PaymentCaptured`, a union, a list of events) and `emits=[...]` on its
registration; what it emits undeclared shows once the log holds such an event (`observed`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from choreo.checks import declared_emits
from choreo.events import Event
from choreo.system import System


def emitted_types(fn: Callable[..., Any], extra: Iterable[type[Event]] = ()) -> list[str]:
    """The event types `fn` declares it emits (return annotation and `emits=`), sorted (as `choreo check` reads them)."""
    return sorted(declared_emits(fn, extra) or ())


@dataclass
class Flow:
    """The graph: services, event types, and the edges between them, with each service's parts."""

    services: list[str]
    events: list[str] = field(default_factory=list)
    #: (from, to, label, kind): kind is handles, step, compensation, emits or observed
    edges: list[tuple[str, str, str, str]] = field(default_factory=list)
    #: service -> rows (kind, name, trigger, emits) for the service's table
    parts: dict[str, list[tuple[str, str, str, str]]] = field(default_factory=dict)


def flow_of(system: System, observed: Mapping[tuple[str, str], int] = {}) -> Flow:
    """Derive the flow of `system`; `observed` counts (service, event type) pairs seen in the log."""
    flow = Flow(services=list(system.services))
    events: dict[str, None] = {}
    edges: dict[tuple[str, str, str], str] = {}

    def edge(a: str, b: str, label: str, kind: str) -> None:
        edges.setdefault((a, b, kind), label)

    for name, service in system.services.items():
        rows = flow.parts.setdefault(name, [])
        for cls in service.starts:
            events[cls.event_type] = None
            edge(f"s:{name}", f"e:{cls.event_type}", "starts", "emits")
            rows.append(("starts", cls.event_type, "-", cls.event_type))
        for event_type, handlers in service.handlers.items():
            events[event_type] = None
            for h in handlers:
                kind = "step" if h.kind == "step" else "handles"
                edge(f"e:{event_type}", f"s:{name}", h.step or h.fn.__name__, kind)
                emits = emitted_types(h.fn, h.emits)
                for t in emits:
                    events[t] = None
                    edge(f"s:{name}", f"e:{t}", h.step or h.fn.__name__, "emits")
                rows.append((h.kind, h.step or h.fn.__name__, event_type, ", ".join(emits) or "-"))
        for step, h in service.compensations.items():
            emits = emitted_types(h.fn, h.emits)
            for t in emits:
                events[t] = None
                edge(f"s:{name}", f"e:{t}", f"undo {step}", "compensation")
            rows.append(("compensation", step, f"failure after {step}", ", ".join(emits) or "-"))
        for deadline in service.deadlines.values():
            events[deadline.start_on.event_type] = None
            edge(f"e:{deadline.start_on.event_type}", f"s:{name}", f"deadline {deadline.name}", "handles")
            emits = emitted_types(deadline.fn, deadline.emits)
            for t in emits:
                events[t] = None
                edge(f"s:{name}", f"e:{t}", f"deadline {deadline.name}", "emits")
            cancel = ", ".join(c.event_type for c in deadline.cancel_on)
            cancel = f"cancelled by {cancel} or the saga's end" if cancel else "cancelled by the saga's end"
            rows.append(("deadline", f"{deadline.name} (after {deadline.after}; {cancel})",
                         deadline.start_on.event_type, ", ".join(emits) or "-"))
        for (saga, outcome), h in service.ends.items():
            emits = emitted_types(h.fn, h.emits)
            end_type = "choreo.SagaCompleted" if outcome == "completed" else "choreo.SagaFailed"
            for t in emits:
                events[t] = None
                edge(f"s:{name}", f"e:{t}", f"{saga} {outcome}", "emits")
            rows.append((f"saga {outcome}", saga, end_type, ", ".join(emits) or "-"))
    for (emitter, event_type), _ in sorted(observed.items()):
        # what the annotations do not say (a failure raised with StepFailed(...)), once the log holds it
        if emitter not in system.services or event_type.startswith("choreo."):
            continue
        if not any((f"s:{emitter}", f"e:{event_type}", kind) in edges for kind in ("emits", "compensation")):
            events[event_type] = None
            edge(f"s:{emitter}", f"e:{event_type}", "seen in the log", "observed")
    flow.events = list(events)
    flow.edges = [(a, b, label, kind) for (a, b, kind), label in edges.items()]
    return flow


def layers(flow: Flow, starts: list[str]) -> list[list[tuple[str, str, str]]]:
    """Columns for `graph_svg`: each node one column right of the first node that leads to it.

    The walk begins at the saga definitions' start events (`starts`), then at anything left.
    """
    nodes = {f"s:{s}": (s, "service") for s in flow.services} | {f"e:{e}": (e, "event") for e in flow.events}
    out: dict[str, list[str]] = {}
    for a, b, _, kind in flow.edges:
        out.setdefault(a, []).append(b)
    rank: dict[str, int] = {}
    seeds = [f"e:{s}" for s in starts] + [n for n in nodes if n.startswith("s:")] + list(nodes)
    for seed in seeds:
        if seed in rank or seed not in nodes:
            continue
        rank[seed] = 0 if not rank else (0 if seed.startswith("e:") else 1)
        queue = [seed]
        while queue:
            node = queue.pop(0)
            for nxt in out.get(node, []):
                if nxt not in rank:
                    rank[nxt] = rank[node] + 1
                    queue.append(nxt)
    columns: list[list[tuple[str, str, str]]] = [[] for _ in range(max(rank.values(), default=0) + 1)]
    for node, r in rank.items():
        label, kind = nodes[node]
        columns[r].append((node, label, kind))
    return [c for c in columns if c]
