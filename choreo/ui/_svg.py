"""SVG drawn by the server: a saga's sequence diagram across services, and the system graph."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from html import escape
from typing import Any

_MARK = {"completed": " ✓", "failed": " ✗", "compensated": " ↺", "skipped": " –"}
_OUTCOME_CLASS = {"failed": "failed", "compensated": "compensated", "completed": "completed", "skipped": "skipped"}


def _text(x: float, y: float, text: str, cls: str = "", anchor: str = "middle") -> str:
    return f'<text x="{x:.0f}" y="{y:.0f}" text-anchor="{anchor}" class="{cls}">{escape(text)}</text>'


def _short(text: str, width: int) -> str:
    return text if len(text) <= width else text[: width - 1] + "…"


def sequence_svg(timeline: Sequence[Mapping[str, Any]]) -> str:
    """A saga's timeline as a sequence diagram: a lifeline per service, each event an arrow from its cause's service.

    An event without a cause in the saga (the start, an operator's command) is a box on its
    service's lifeline; an event that its own service caused loops back to that lifeline.
    """
    services = list(dict.fromkeys(str(e["service"]) for e in timeline))
    col, left, top, row = 190, 60, 50, 30
    x = {s: left + col // 2 + i * col for i, s in enumerate(services)}
    width = left + col * max(1, len(services)) + 10
    height = top + row * (len(timeline) + 1)
    by_id = {e["event_id"]: e for e in timeline}
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" class="sequence" width="{width}" height="{height}" '
           f'viewBox="0 0 {width} {height}" role="img" aria-label="sequence diagram">',
           '<defs><marker id="arrow" viewBox="0 0 10 10" refX="9" refY="5" markerWidth="7" markerHeight="7" '
           'orient="auto-start-reverse"><path d="M0,0 L10,5 L0,10 z" class="head"/></marker></defs>']
    for s, sx in x.items():
        out.append(f'<rect x="{sx - 70}" y="8" width="140" height="24" rx="4" class="participant"/>')
        out.append(_text(sx, 25, _short(s, 20), "participant"))
        out.append(f'<line x1="{sx}" y1="32" x2="{sx}" y2="{height - 5}" class="lifeline"/>')
    for i, e in enumerate(timeline):
        y = top + row * i + row // 2
        cls = "unknown" if "unknown" in e else _OUTCOME_CLASS.get(e.get("outcome") or "", "plain")
        title = str(e["type"]) + (f" ({e['step']} {e['outcome']})" if e.get("outcome") else "")
        label = str(e["type"]) + _MARK.get(e.get("outcome") or "", "")
        out.append(f'<g class="event {cls}" data-position="{e["position"]}"><title>{escape(title)}</title>')
        out.append(_text(8, y + 4, f"#{e['position']}", "position", "start"))
        target = x[str(e["service"])]
        cause = by_id.get(e.get("causation_id") or "")
        if cause is None:
            out.append(f'<rect x="{target - 78}" y="{y - 11}" width="156" height="20" rx="3" class="note"/>')
            out.append(_text(target, y + 4, _short(label, 26), "label"))
        elif cause["service"] == e["service"]:
            out.append(f'<path d="M{target},{y - 8} h24 v14 h-22" class="arrow" marker-end="url(#arrow)" fill="none"/>')
            out.append(_text(target + 30, y + 3, _short(label, 34), "label", "start"))
        else:
            source = x[str(cause["service"])]
            out.append(f'<line x1="{source}" y1="{y + 6}" x2="{target}" y2="{y + 6}" class="arrow" '
                       'marker-end="url(#arrow)"/>')
            out.append(_text((source + target) / 2, y + 1, _short(label, max(20, abs(target - source) // 7)), "label"))
        out.append("</g>")
    out.append("</svg>")
    return "\n".join(out)


def graph_svg(columns: Sequence[Sequence[tuple[str, str, str]]], edges: Sequence[tuple[str, str, str, str]]) -> str:
    """A layered graph: `columns` of nodes (id, label, kind), left to right; `edges` (from, to, label, kind).

    Services are boxes, event types rounded pills; an edge's kind is its CSS class
    (`handles`, `step`, `compensation`, `emits`, `observed`).
    """
    col, row, left, top = 230, 46, 20, 20
    pos: dict[str, tuple[float, float]] = {}
    height = top * 2 + row * max((len(c) for c in columns), default=1)
    width = left * 2 + col * max(1, len(columns))
    for i, column in enumerate(columns):
        offset = (height - row * len(column)) / 2
        for j, (node, _, _) in enumerate(column):
            pos[node] = (left + i * col, offset + j * row)
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" class="graph" width="{width}" height="{height}" '
           f'viewBox="0 0 {width} {height}" role="img" aria-label="system graph">',
           '<defs><marker id="garrow" viewBox="0 0 10 10" refX="9" refY="5" markerWidth="6" markerHeight="6" '
           'orient="auto-start-reverse"><path d="M0,0 L10,5 L0,10 z" class="head"/></marker></defs>']
    box_w, box_h = 170, 28
    for a, b, label, kind in edges:
        if a not in pos or b not in pos:
            continue
        (ax, ay), (bx, by) = pos[a], pos[b]
        x1, y1 = ax + box_w, ay + box_h / 2
        x2, y2 = bx, by + box_h / 2
        if bx <= ax:  # a backward edge goes round below
            x1, x2 = ax + box_w / 2, bx + box_w / 2
            y1, y2 = ay + box_h, by + box_h
            d = f"M{x1:.0f},{y1:.0f} C{x1:.0f},{y1 + 60:.0f} {x2:.0f},{y2 + 60:.0f} {x2:.0f},{y2:.0f}"
        else:
            mid = (x1 + x2) / 2
            d = f"M{x1:.0f},{y1:.0f} C{mid:.0f},{y1:.0f} {mid:.0f},{y2:.0f} {x2:.0f},{y2:.0f}"
        title = escape(f"{a} → {b}" + (f" ({label})" if label else ""))
        out.append(f'<path d="{d}" class="edge {kind}" marker-end="url(#garrow)" fill="none"><title>{title}</title></path>')
    for column in columns:
        for node, label, kind in column:
            nx, ny = pos[node]
            rx = 4 if kind == "service" else 14
            out.append(f'<g class="node {kind}"><title>{escape(label)}</title>'
                       f'<rect x="{nx:.0f}" y="{ny:.0f}" width="{box_w}" height="{box_h}" rx="{rx}"/>')
            out.append(_text(nx + box_w / 2, ny + 18, _short(label, 24), "label") + "</g>")
    out.append("</svg>")
    return "\n".join(out)
