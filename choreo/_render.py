"""Rendering saga documents for people: summary, step table, causation tree, Mermaid."""

from __future__ import annotations

from typing import Any


def render_saga(saga: dict[str, Any]) -> str:
    """A saga as text: summary, steps, and the timeline as a causation tree."""
    lines = [
        f"saga {saga['saga_id']} ({saga['saga_type']}): {saga['state']}",
        f"  started {saga['started_at']}" + (f", ended {saga['ended_at']}" if saga["ended_at"] else ""),
    ]
    if saga["cause"]:
        lines.append(f"  failed at {saga['cause']}")
    if saga["unknown_events"]:
        lines.append(f"  unknown events: {saga['unknown_events']}")
    lines.append("")
    lines.append(f"  {'step':<22} {'service':<14} {'status':<13} events")
    for name, step in saga["steps"].items():
        events = ", ".join(_type_of(saga, e) for e in step["events"]) or "-"
        lines.append(f"  {name:<22} {step['service'] or '-':<14} {step['status']:<13} {events}")
    lines.append("")
    lines.append("  timeline (indented under the event that caused it):")
    children: dict[str | None, list[dict[str, Any]]] = {}
    ids = {e["event_id"] for e in saga["timeline"]}
    for e in saga["timeline"]:
        parent = e["causation_id"] if e["causation_id"] in ids else None
        children.setdefault(parent, []).append(e)

    def walk(parent: str | None, depth: int) -> None:
        for e in children.get(parent, []):
            outcome = f" [{e['step']} {e['outcome']}]" if e["outcome"] else ""
            unknown = f" UNKNOWN: {e['unknown']}" if "unknown" in e else ""
            lines.append(f"  {'  ' * depth}#{e['position']} {e['occurred_at']} {e['service']}: {e['type']}{outcome}{unknown}")
            walk(e["event_id"], depth + 1)

    walk(None, 0)
    return "\n".join(lines)


def render_mermaid(saga: dict[str, Any]) -> str:
    """A saga as a Mermaid sequence diagram: each event an arrow from its cause's service."""
    by_id = {e["event_id"]: e for e in saga["timeline"]}
    services = list(dict.fromkeys(e["service"] for e in saga["timeline"]))
    lines = ["sequenceDiagram"] + [f"    participant {s}" for s in services]
    for e in saga["timeline"]:
        label = e["type"] + (f" ({e['step']} {e['outcome']})" if e["outcome"] else "")
        cause = by_id.get(e["causation_id"] or "")
        if cause is None:
            lines.append(f"    Note over {e['service']}: {label}")
        else:
            arrow = "--x" if e["outcome"] == "failed" else "->>"
            lines.append(f"    {cause['service']}{arrow}{e['service']}: {label}")
    return "\n".join(lines)


def _type_of(saga: dict[str, Any], event_id: str) -> str:
    for e in saga["timeline"]:
        if e["event_id"] == event_id:
            return f"{e['type']}#{e['position']}"
    return event_id
