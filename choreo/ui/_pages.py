"""The console's HTML, rendered on the server (every value escaped); one function a page."""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping, Sequence
from html import escape
from typing import Any
from urllib.parse import urlencode

from choreo._saga_fold import NO_SAGA_COUNT, STATES
from choreo.store import DeadLetter
from choreo.ui._graph import Flow
from choreo.ui._svg import sequence_svg

PAGE_SIZE = 50


def e(value: Any) -> str:
    """`value` as escaped HTML text ('-' for None)."""
    return "-" if value is None else escape(str(value))


def when(value: Any) -> str:
    """A stored ISO time, shorter (to the millisecond, no offset if UTC), with the full value as its tooltip."""
    if not value:
        return "-"
    text = str(value)
    short = text.replace("T", " ")[:23] if text.endswith("+00:00") else text.replace("T", " ")
    return f'<time datetime="{e(text)}" title="{e(text)}">{e(short)}</time>'


def layout(title: str, body: str, *, active: str, live: bool = False, status: str = "") -> str:
    """A whole page: the navigation, `body`, the shipped CSS and script; `live` pages poll for updates."""
    nav = "".join(
        f'<a href="{href}" class="{"active" if key == active else ""}">{label}</a>'
        for key, href, label in (("sagas", "/sagas", "Sagas"), ("dlq", "/dead-letters", "Dead letters"),
                                 ("system", "/system", "System"))
    )
    live_attr = ' data-live="1"' if live else ""
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><meta name="viewport" content="width=device-width, initial-scale=1">
<title>{e(title)} · choreo</title><link rel="stylesheet" href="/static/console.css"></head>
<body{live_attr}><header><span class="brand">choreo</span><nav>{nav}</nav>
<span class="status" id="status">{status}</span></header>
<main id="live">{body}</main>
<script src="/static/console.js"></script></body></html>"""


def badge(state: str | None) -> str:
    """A state or status as a coloured label."""
    return f'<span class="badge {e(state)}">{e(state)}</span>'


def _query(params: Mapping[str, Any], **changes: Any) -> str:
    merged = {k: v for k, v in {**params, **changes}.items() if v not in (None, "")}
    return "?" + urlencode(merged) if merged else ""


def sagas_page(counts: Mapping[str, int], sagas: Sequence[dict[str, Any]], params: Mapping[str, str],
               types: Iterable[str], page: int, keys: Mapping[str, str | None], total: int) -> str:
    """The overview: counts by state, the filter form, one page of matching sagas (newest first)."""
    cards = "".join(
        f'<a class="count {s}" href="/sagas{_query({}, state=s)}"><b>{counts.get(s, 0)}</b><span>{s}</span></a>'
        for s in STATES
    )
    orphans = counts.get(NO_SAGA_COUNT)
    note = f'<p class="muted">{orphans} event(s) without a saga id.</p>' if orphans else ""
    state_options = "".join(
        f'<option value="{s}"{" selected" if params.get("state") == s else ""}>{s}</option>' for s in STATES)
    type_options = "".join(
        f'<option value="{e(t)}"{" selected" if params.get("type") == t else ""}>{e(t)}</option>' for t in types)
    form = f"""<form class="filters" method="get" action="/sagas">
<label>Search <input name="q" value="{e(params.get('q', ''))}" placeholder="saga id or business key"></label>
<label>State <select name="state"><option value="">any</option>{state_options}</select></label>
<label>Type <select name="type"><option value="">any</option>{type_options}</select></label>
<label>Started from <input name="since" value="{e(params.get('since', ''))}" placeholder="2026-01-31T12:00"></label>
<label>to <input name="until" value="{e(params.get('until', ''))}" placeholder="ISO time"></label>
<label>Stuck for (s) <input name="stuck_for" value="{e(params.get('stuck_for', ''))}" size="6"></label>
<button type="submit">Filter</button> <a href="/sagas">clear</a></form>"""
    rows = "".join(
        f'<tr><td><a href="/sagas/{e(s["saga_id"])}" class="saga-link">{e(s["saga_id"])}</a></td>'
        f'<td>{e(keys.get(s["saga_id"]))}</td><td>{e(s["saga_type"])}</td><td>{badge(s["state"])}</td>'
        f'<td>{when(s["started_at"])}</td><td>{when(s["updated_at"])}</td>'
        f'<td class="cause">{e(s["cause"] or "")}{badge("parked") if s.get("parked") else ""}</td></tr>'
        for s in sagas
    )
    pages = max(1, -(-total // PAGE_SIZE))
    pager = (f'<p class="pager">{total} saga(s) · page {page} of {pages} '
             + (f'<a href="/sagas{_query(params, page=page - 1)}">‹ newer</a> ' if page > 1 else "")
             + (f'<a href="/sagas{_query(params, page=page + 1)}" rel="next">older ›</a>' if page < pages else "")
             + "</p>")
    table = (f'<table class="sagas"><thead><tr><th>saga</th><th>business key</th><th>type</th><th>state</th>'
             f'<th>started</th><th>last event</th><th>cause</th></tr></thead><tbody>{rows}</tbody></table>'
             if sagas else '<p class="empty">No saga matches.</p>')
    return f'<h1>Sagas</h1><div class="counts">{cards}</div>{note}{form}{pager}{table}'


def saga_page(saga: dict[str, Any], *, as_of: int | None, last_position: int, key: str | None,
              letters: Sequence[DeadLetter], can_write: bool) -> str:
    """One saga: summary, steps, the sequence diagram, the causation tree, the as-of control."""
    sid = e(saga["saga_id"])
    summary = f"""<h1>Saga <code>{sid}</code> {badge(saga['state'])}</h1>
<dl class="summary"><dt>type</dt><dd>{e(saga['saga_type'])}</dd><dt>business key</dt><dd>{e(key)}</dd>
<dt>started</dt><dd>{when(saga['started_at'])}</dd><dt>ended</dt><dd>{when(saga['ended_at'])}</dd>
<dt>last event</dt><dd>{when(saga['updated_at'])}</dd>
<dt>cause</dt><dd class="cause">{e(saga['cause'])}</dd>
{f"<dt>unknown events</dt><dd>{saga['unknown_events']}</dd>" if saga.get('unknown_events') else ""}</dl>"""
    positions = [entry["position"] for entry in saga["timeline"]]
    first = positions[0] if positions else 0
    shown = as_of if as_of is not None else last_position
    asof = f"""<form class="asof" method="get" action="/sagas/{sid}">
<label>As of position <input type="range" name="as_of" min="{first}" max="{last_position}" value="{shown}"
 list="positions" data-autosubmit="1"></label><datalist id="positions">{''.join(f'<option value="{p}">' for p in positions)}</datalist>
<input type="number" name="as_of" value="{shown}" min="0" class="asof-number" aria-label="position">
<button type="submit">Show</button> {'<a href="/sagas/' + sid + '">now (live)</a>' if as_of is not None else '<span class="muted">live</span>'}
</form>""" if positions else ""
    banner = f'<p class="asof-banner">As it stood at log position {as_of}.</p>' if as_of is not None else ""
    step_rows = "".join(
        f'<tr class="step {e(step["status"])}"><td>{e(name)}</td><td>{e(step["service"])}</td>'
        f'<td>{badge(step["status"])}</td><td>{step.get("attempts", 1 if step["events"] else 0)}</td>'
        f'<td>{_parked(saga, step)}</td>'
        f'<td>{", ".join(_event_label(saga, ev) for ev in step["events"]) or "-"}</td></tr>'
        for name, step in saga["steps"].items()
    )
    steps = (f'<h2>Steps</h2><table class="steps"><thead><tr><th>step</th><th>service</th><th>status</th>'
             f'<th>attempts</th><th>parked</th><th>events</th></tr></thead><tbody>{step_rows}</tbody></table>')
    parked = ""
    if letters:
        parked = "<h2>Dead letters</h2><ul>" + "".join(
            f'<li><a href="/dead-letters/{e(d.service)}/{d.id}">{e(d.service)}:{d.id}</a> {badge(d.status)} '
            f'{e(d.type)}: {e(d.reason)}</li>' for d in letters) + "</ul>"
    action = ""
    if saga["state"] not in ("completed", "failed") and as_of is None:
        action = (f'<p><a class="button danger" href="/sagas/{sid}/compensate">Force compensation…</a>'
                  f'{"" if can_write else " <span class=muted>(read-only console)</span>"}</p>')
    diagram = f'<h2>Sequence</h2><div class="diagram">{sequence_svg(saga["timeline"])}</div>'
    return summary + asof + banner + action + steps + parked + diagram + "<h2>Causation</h2>" + causation_tree(saga)


def _parked(saga: Mapping[str, Any], step: Mapping[str, Any]) -> str:
    """Why the step's event was parked: shown as waiting while the saga has parked events, else as past."""
    if not step.get("parked"):
        return ""
    if saga.get("parked"):
        return f'{badge("parked")} <span class="cause">{e(step["parked"])}</span>'
    return f'<span class="muted">was parked: {e(step["parked"])}</span>'


def _event_label(saga: Mapping[str, Any], event_id: str) -> str:
    for entry in saga["timeline"]:
        if entry["event_id"] == event_id:
            return f'{e(entry["type"])}<span class="muted">#{entry["position"]}</span>'
    return e(event_id)


def causation_tree(saga: Mapping[str, Any]) -> str:
    """The timeline as nested lists: each event under the event that caused it."""
    ids = {entry["event_id"] for entry in saga["timeline"]}
    children: dict[str | None, list[Mapping[str, Any]]] = {}
    for entry in saga["timeline"]:
        parent = entry["causation_id"] if entry["causation_id"] in ids else None
        children.setdefault(parent, []).append(entry)

    def walk(parent: str | None) -> str:
        items = []
        for entry in children.get(parent, []):
            outcome = f' <span class="badge {e(entry["outcome"])}">{e(entry["step"])} {e(entry["outcome"])}</span>' \
                if entry.get("outcome") else ""
            extra = "".join(f' <span class="note">{e(k)}: {e(entry[k])}</span>'
                            for k in ("cause", "note", "unknown") if entry.get(k))
            items.append(f'<li><span class="pos">#{entry["position"]}</span> <b>{e(entry["service"])}</b> '
                         f'{e(entry["type"])}{outcome}{extra} <span class="muted">{when(entry["occurred_at"])}</span>'
                         f'{walk(entry["event_id"])}</li>')
        return f'<ul class="tree">{"".join(items)}</ul>' if items else ""

    return f'<div class="causation">{walk(None)}</div>' if saga["timeline"] else '<p class="empty">No event.</p>'


def letters_page(letters: Sequence[DeadLetter], status: str, statuses: Sequence[str]) -> str:
    """The dead letters with one status (or all)."""
    tabs = " ".join(f'<a href="/dead-letters?status={s}" class="tab{" active" if s == status else ""}">{s}</a>'
                    for s in statuses)
    rows = "".join(
        f'<tr><td><a href="/dead-letters/{e(d.service)}/{d.id}" class="letter-link">{e(d.service)}:{d.id}</a></td>'
        f'<td>{badge(d.status)}</td><td><a href="/sagas/{e(d.saga_id)}">{e(d.saga_id)}</a></td><td>{e(d.type)}</td>'
        f'<td>{d.attempts}</td><td>{when(d.last_failed_at.isoformat())}</td><td class="cause">{e(d.reason)}</td></tr>'
        for d in letters
    )
    table = (f'<table class="letters"><thead><tr><th>ref</th><th>status</th><th>saga</th><th>event</th>'
             f'<th>attempts</th><th>last failed</th><th>reason</th></tr></thead><tbody>{rows}</tbody></table>'
             if letters else f'<p class="empty">No {e(status) if status != "all" else ""} dead letter.</p>')
    return f'<h1>Dead letters</h1><p class="tabs">{tabs}</p>{table}'


def letter_page(d: DeadLetter, can_write: bool) -> str:
    """One dead letter: what it is, the error, the envelope; the actions while it waits."""
    ref = f"{e(d.service)}/{d.id}"
    waiting = d.status in ("parked", "retrying")
    actions = (f'<p class="actions"><a class="button" href="/dead-letters/{ref}/retry">Retry…</a> '
               f'<a class="button" href="/dead-letters/{ref}/skip">Skip…</a> '
               f'<a class="button danger" href="/sagas/{e(d.saga_id)}/compensate">Force compensation of the saga…</a>'
               f'{"" if can_write else " <span class=muted>(read-only console)</span>"}</p>') if waiting else \
        f'<p class="muted">Not waiting any more ({e(d.status)}): nothing to do.</p>'
    return f"""<h1>Dead letter <code>{e(d.service)}:{d.id}</code> {badge(d.status)}</h1>{actions}
<dl class="summary"><dt>saga</dt><dd><a href="/sagas/{e(d.saga_id)}">{e(d.saga_id)}</a></dd>
<dt>event</dt><dd>{e(d.type)} <span class="muted">{e(d.event_id)} at position {d.position}</span></dd>
<dt>reason</dt><dd class="cause">{e(d.reason)}</dd><dt>attempts</dt><dd>{d.attempts}</dd>
<dt>first failed</dt><dd>{when(d.first_failed_at.isoformat())}</dd>
<dt>last failed</dt><dd>{when(d.last_failed_at.isoformat())}</dd>
{f"<dt>next attempt</dt><dd>{when(d.due_at.isoformat())}</dd>" if d.due_at else ""}</dl>
<h2>Error</h2><pre class="error">{e(d.error)}</pre>
<h2>Envelope</h2><pre class="envelope">{e(json.dumps(_readable(d.envelope), indent=2, sort_keys=True, default=str))}</pre>"""


def _readable(envelope: Mapping[str, Any]) -> dict[str, Any]:
    """The envelope with its payload as JSON, not as a string of JSON (kept as stored if it is not JSON)."""
    shown = dict(envelope)
    if isinstance(shown.get("payload"), str):
        try:
            shown["payload"] = json.loads(shown["payload"])
        except ValueError:
            pass
    return shown


def confirm_page(*, title: str, what: str, cli: str, action: str, needs_reason: bool, can_write: bool,
                 reason: str = "") -> str:
    """The confirmation step before an action that writes: what it writes, a reason, the token."""
    if not can_write:
        form = ('<p class="refused">This console is read-only: start <code>choreo ui</code> with '
                '<code>--token</code> (or <code>$CHOREO_UI_TOKEN</code>) to allow actions.</p>')
    else:
        form = f"""<form method="post" action="{e(action)}" class="confirm">
<label>Reason{" (required)" if needs_reason else " (optional)"} <input name="reason" value="{e(reason)}"
 {"required" if needs_reason else ""} size="50"></label>
<label>Token <input name="token" type="password" autocomplete="off" required></label>
<input type="hidden" name="confirm" value="yes">
<button type="submit" class="danger">Confirm: {e(title.lower())}</button> <a href="javascript:history.back()">cancel</a>
</form>"""
    return f"""<h1>{e(title)}?</h1><p>{what}</p>
<p class="muted">The same operator event as <code>{e(cli)}</code>.</p>{form}"""


def message_page(title: str, message: str, links: Sequence[tuple[str, str]]) -> str:
    """The outcome of an action, or an error, with where to go next."""
    nav = " · ".join(f'<a href="{e(href)}">{e(label)}</a>' for href, label in links)
    return f'<h1>{e(title)}</h1><p class="message">{e(message)}</p><p>{nav}</p>'


def system_page(flow: Flow, svg: str, sagas: Sequence[tuple[str, str, Sequence[tuple[str, str | None]]]]) -> str:
    """The system: the graph, each saga definition's steps and where they live, each service's handlers."""
    legend = ('<p class="legend"><span class="edge-key step">step trigger</span> <span class="edge-key handles">'
              'handler trigger</span> <span class="edge-key emits">emits (declared)</span> <span class="edge-key '
              'compensation">compensation emits</span> <span class="edge-key observed">emitted, seen in the log</span></p>')
    defs = "".join(
        f'<h3>{e(name)} <span class="muted">starts on {e(start)}</span></h3><ol class="saga-steps">'
        + "".join(f"<li>{e(step)} <span class=muted>in</span> <b>{e(owner)}</b></li>" for step, owner in steps)
        + "</ol>" for name, start, steps in sagas)
    tables = "".join(
        f'<h3>{e(service)}</h3><table class="parts"><thead><tr><th>kind</th><th>name</th><th>on</th><th>emits</th>'
        f'</tr></thead><tbody>'
        + "".join(f"<tr><td>{e(k)}</td><td>{e(n)}</td><td>{e(t)}</td><td>{e(m)}</td></tr>" for k, n, t, m in rows)
        + "</tbody></table>" for service, rows in flow.parts.items())
    return (f'<h1>System</h1>{legend}<div class="diagram">{svg}</div><h2>Saga definitions</h2>'
            f'{defs or "<p class=empty>No saga definition.</p>"}<h2>Services</h2>{tables}')
