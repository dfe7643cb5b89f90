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


def graph_svg(layers: Sequence[Sequence[tuple[str, str, str]]], edges: Sequence[tuple[str, str, str, str]]) -> str:
    """A layered graph, top to bottom: `layers` of nodes (id, label, kind); `edges` (from, to, label, kind).

    Services are dark boxes, event types rounded pills; an edge's kind is its CSS class
    (`handles`, `step`, `compensation`, `emits`, `observed`). An edge to a node that is not
    below goes round the right-hand side.
    """
    box_w, box_h, gap, row, margin = 160, 28, 22, 74, 20
    widest = max((len(layer) for layer in layers), default=1)
    width = margin * 2 + widest * (box_w + gap) + 80
    height = margin * 2 + row * max(1, len(layers))
    pos: dict[str, tuple[float, float]] = {}
    for i, layer in enumerate(layers):
        offset = margin + (widest - len(layer)) * (box_w + gap) / 2
        for j, (node, _, _) in enumerate(layer):
            pos[node] = (offset + j * (box_w + gap), margin + i * row)
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" class="graph" width="{width:.0f}" height="{height}" '
           f'viewBox="0 0 {width:.0f} {height}" role="img" aria-label="system graph">',
           '<defs><marker id="garrow" viewBox="0 0 10 10" refX="9" refY="5" markerWidth="6" markerHeight="6" '
           'orient="auto-start-reverse"><path d="M0,0 L10,5 L0,10 z" class="head"/></marker></defs>']
    for a, b, label, kind in edges:
        if a not in pos or b not in pos:
            continue
        (ax, ay), (bx, by) = pos[a], pos[b]
        if by > ay:
            x1, y1, x2, y2 = ax + box_w / 2, ay + box_h, bx + box_w / 2, by
            mid = (y1 + y2) / 2
            d = f"M{x1:.0f},{y1:.0f} C{x1:.0f},{mid:.0f} {x2:.0f},{mid:.0f} {x2:.0f},{y2:.0f}"
        else:  # back up (or across): round the outer side (left of the middle: the left-hand one)
            left_side = ax + box_w / 2 < width / 2
            x1 = ax if left_side else ax + box_w
            x2 = bx if left_side else bx + box_w
            y1, y2 = ay + box_h / 2, by + box_h / 2
            reach = 40 + abs(y1 - y2) / 6
            bulge = min(x1, x2) - reach if left_side else max(x1, x2) + reach
            d = f"M{x1:.0f},{y1:.0f} C{bulge:.0f},{y1:.0f} {bulge:.0f},{y2:.0f} {x2:.0f},{y2:.0f}"
        title = escape(f"{a[2:]} → {b[2:]}" + (f" ({label})" if label else ""))
        out.append(f'<path d="{d}" class="edge {kind}" marker-end="url(#garrow)" fill="none"><title>{title}</title></path>')
    for layer in layers:
        for node, label, kind in layer:
            nx, ny = pos[node]
            rx = 4 if kind == "service" else 14
            out.append(f'<g class="node {kind}"><title>{escape(label)}</title>'
                       f'<rect x="{nx:.0f}" y="{ny:.0f}" width="{box_w}" height="{box_h}" rx="{rx}"/>')
            out.append(_text(nx + box_w / 2, ny + 18, _short(label, 22), "label") + "</g>")
    out.append("</svg>")
    return "\n".join(out)
