"""The saga projection: every saga's state, steps and timeline, built from the log alone.

The projection never reads a service's state. It folds each event of the log
into a per-saga document (state, steps, cause) and appends the event's timeline
entry to the saga's journal; documents, journal entries and its own tracking
position are committed together, so it processes each event exactly once and
resumes after a restart. A batch writes each touched document once and each
entry once (a saga's timeline is never rewritten). `replay()` rebuilds from
position 0 and gives exactly what incremental updates give: both use `apply()`.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

import orjson

from choreo import clock
from choreo.errors import ConcurrencyConflict
from choreo.events import Outcome, is_known_type
from choreo.operations import DeadLetterResolved, EventParked, HandlerRetried
from choreo.saga import SagaDefinition
from choreo.store import EventStore, Row, advance_rows

FINAL_STATES = frozenset({"completed", "failed"})
NO_SAGA = "(no saga id)"
_NOTES = frozenset({HandlerRetried.event_type, EventParked.event_type, DeadLetterResolved.event_type})
_PARKED, _RESOLVED = EventParked.event_type, DeadLetterResolved.event_type
_SEEN = "event_ids"  # every event a saga document has folded in (redeliveries are ignored)
_HIDDEN = frozenset({_SEEN, "timeline"})
#: the name of the projection's documents in the store (`rm_sagas_*` tables on SQLite)
DOCUMENTS = "sagas"
STATES = ("started", "running", "compensating", "completed", "failed", "stuck")


#: A timeline entry is stored compactly as a list: these fields in this order, then a dict
#: of what only some events have (`unknown`, `cause`, `attempts`, `note`).
FIELDS = ("position", "event_id", "type", "service", "step", "outcome", "occurred_at", "causation_id")
_POSITION, _ID, _TYPE, _SERVICE, _STEP, _OUTCOME, _AT, _CAUSATION, _EXTRA = range(9)


def entry_of(row: Row) -> list[Any]:
    """The timeline entry of a log row (see `choreo.store.ROW_FIELDS`): what the projection keeps."""
    position, event_id, kind, version, _, causation_id, service, step, outcome, when, text, _ = row
    extra: dict[str, Any] = {}
    entry = [position, event_id, kind, service, step, outcome, str(when), causation_id, extra]
    # The writer validated the event against its schema; a replay only needs to know the
    # type and read the payload's JSON (re-validating every event would cost most of it).
    if not is_known_type(kind):
        extra["unknown"] = f"unknown event type {kind!r} (schema version {version})"
        return entry
    try:
        if not isinstance(text, str):
            raise ValueError(f"stored as {type(text).__name__}")
        payload = orjson.loads(text)
        if not isinstance(payload, dict):
            raise ValueError("not a JSON object")
    except ValueError as e:
        extra["unknown"] = f"{kind}: payload is not a JSON object: {e}"
        return entry
    if outcome == Outcome.FAILED:
        reason = payload.get("reason")
        extra["cause"] = f"{kind}: {reason}" if reason else kind
    if kind in _NOTES:
        if "attempts" in payload:
            extra["attempts"] = payload["attempts"]
        if kind == _PARKED:
            extra["note"] = payload.get("reason", "")
        elif kind == _RESOLVED:
            extra["note"] = f"{payload.get('status')}: {payload.get('reason', '')}"
    return entry


def as_dict(entry: Sequence[Any]) -> dict[str, Any]:
    """A stored timeline entry as the dict `SagaProjection.get()` shows."""
    return {**dict(zip(FIELDS, entry)), **entry[_EXTRA]}


def new_saga(saga_id: str) -> dict[str, Any]:
    """An empty saga document (its timeline is kept apart, entry by entry)."""
    return {
        "saga_id": saga_id, "saga_type": None, "state": "started", "started_at": None,
        "ended_at": None, "updated_at": None, "cause": None, "steps": {}, "unknown_events": 0,
        _SEEN: [],
    }


@dataclass(frozen=True)
class Catalog:
    """The saga definitions a projection knows, looked up by start event and by name."""

    by_start: Mapping[str, SagaDefinition]
    by_name: Mapping[str, SagaDefinition]

    @classmethod
    def of(cls, definitions: Iterable[SagaDefinition]) -> Catalog:
        """Index `definitions`."""
        definitions = tuple(definitions)
        return cls({d.start.event_type: d for d in reversed(definitions)}, {d.name: d for d in reversed(definitions)})


def apply(saga: dict[str, Any], entry: Sequence[Any], catalog: Catalog) -> bool:
    """Fold one timeline entry into a saga document (the one rule for updates and replays).

    Returns False, changing nothing, if the saga has this event already.
    """
    seen, event_id = saga[_SEEN], entry[_ID]
    if event_id in seen:
        return False  # the same event delivered again
    seen.append(event_id)
    when, kind, extra = entry[_AT], entry[_TYPE], entry[_EXTRA]
    saga["updated_at"] = when
    if "unknown" in extra:
        saga["unknown_events"] += 1
        return True
    steps = saga["steps"]
    if saga["started_at"] is None:
        saga["started_at"] = when
        started = catalog.by_start.get(kind)
        saga["saga_type"] = started.name if started else kind
        if started:
            for name in started.steps:
                steps[name] = _step(None)
    definition = catalog.by_name.get(saga["saga_type"])
    step, outcome, service = entry[_STEP], entry[_OUTCOME], entry[_SERVICE]
    if kind == _PARKED:
        saga["parked"] = saga.get("parked", 0) + 1
    elif kind == _RESOLVED:
        saga["parked"] = max(0, saga.get("parked", 0) - 1)
    if step and "attempts" in extra:  # retries and parking, shown on the step they concern
        info = steps.get(step) or steps.setdefault(step, _step(service))
        info["attempts"] = info.get("attempts", 1) + extra["attempts"] - 1
        if kind == _PARKED:
            info["parked"] = extra["note"]
    if outcome == Outcome.FAILED and not step and saga["cause"] is None:  # a deadline or an operator
        saga["cause"] = f"{service}: {extra.get('cause', kind)}"
    if step and outcome:
        info = steps.get(step) or steps.setdefault(step, _step(service))
        info["service"] = service
        info["events"].append(event_id)
        info[f"{outcome}_at"] = when
        info["status"] = outcome
        if outcome == Outcome.FAILED and saga["cause"] is None:
            saga["cause"] = f"{step}: {extra.get('cause', kind)}"
    failed = saga["cause"] is not None
    if failed:
        for info in steps.values():
            if info["status"] == Outcome.COMPLETED:
                info["status"] = "compensating"
    if saga["ended_at"] is None:
        if definition and kind in definition.end_types:
            saga["ended_at"] = when
        if failed:
            pending = any(s["status"] == "compensating" for s in steps.values())
            saga["state"] = "compensating" if pending or (definition and not saga["ended_at"]) else "failed"
        elif saga["ended_at"]:
            saga["state"] = "completed"
        elif saga["state"] == "started" and any(s["status"] != "pending" for s in steps.values()):
            saga["state"] = "running"
    return True


def _step(service: str | None) -> dict[str, Any]:
    return {"service": service, "status": "pending", "events": []}


def effective_state(saga: dict[str, Any], now: datetime, stuck_after: timedelta | None) -> str:
    """The saga's state, or `stuck` if it is not final and made no progress for `stuck_after`."""
    if (
        stuck_after is not None
        and saga["state"] not in FINAL_STATES
        and saga["updated_at"]
        and now - datetime.fromisoformat(saga["updated_at"]) > stuck_after
    ):
        return "stuck"
    return str(saga["state"])


@dataclass(frozen=True)
class SagaFilter:
    """Which sagas `SagaProjection.list()` returns."""

    state: str | None = None
    saga_type: str | None = None
    started_after: datetime | None = None
    started_before: datetime | None = None
    stuck_for: timedelta | None = None


class SagaProjection:
    """The read model of every saga, kept up to date from the log, queryable."""

    def __init__(
        self,
        store: EventStore,
        *,
        sagas: Iterable[SagaDefinition] = (),
        stuck_after: timedelta | None = timedelta(minutes=5),
        batch_size: int = 10_000,
    ) -> None:
        self.store = store
        self.catalog = Catalog.of(sagas)
        self.stuck_after = stuck_after
        self.batch_size = batch_size
        self.documents = store.documents(DOCUMENTS)
        self.feed = store.feed(DOCUMENTS, self.documents.tracking, group=False)

    def update(self, progress: Callable[[int, int | None], None] | None = None) -> int:
        """Fold every new event of the log into the read model; return how many were read.

        `progress(read_so_far, size_hint)` is called after each batch.
        """
        total = 0
        size = self.store.size_hint()
        while batch := self.feed.poll_rows(self.batch_size, self.store.idle_timeout):
            touched = self.documents.get_many({row[4] or NO_SAGA for row in batch})
            timelines: dict[str, list[list[Any]]] = {}
            for row in batch:
                saga_id = row[4] or NO_SAGA
                saga = touched.get(saga_id)
                if saga is None:
                    saga = touched[saga_id] = new_saga(saga_id)
                entry = entry_of(row)
                if apply(saga, entry, self.catalog):
                    timelines.setdefault(saga_id, []).append(entry)
            try:
                self.documents.put(touched, tracking=advance_rows(batch), appended=timelines)
            except ConcurrencyConflict:  # another process updated the read model first
                self.feed.rewind()
                continue
            total += len(batch)
            if progress:
                progress(total, size)
        return total

    def replay(self, progress: Callable[[int, int | None], None] | None = None) -> int:
        """Drop the read model and rebuild it from the start of the log."""
        self.documents.clear()
        self.feed.rewind()
        return self.update(progress)

    def close(self) -> None:
        """Leave the log."""
        self.feed.close()

    def get(self, saga_id: str, *, as_of: int | datetime | None = None) -> dict[str, Any] | None:
        """One saga's document (state, steps, timeline), optionally as it stood at a position or time."""
        saga = self.documents.get(saga_id)
        if saga is None:
            return None
        timeline = self.documents.entries(saga_id)
        if as_of is not None:
            saga, upto = new_saga(saga_id), []
            for entry in timeline:
                if isinstance(as_of, int):
                    later = entry[_POSITION] > as_of
                else:
                    later = datetime.fromisoformat(entry[_AT]) > as_of
                if later:
                    break
                apply(saga, entry, self.catalog)
                upto.append(entry)
            timeline = upto
        saga = {k: v for k, v in saga.items() if k not in _HIDDEN}
        saga["timeline"] = [as_dict(e) for e in timeline]
        saga["state"] = effective_state(saga, clock.now(), self.stuck_after)
        return saga

    def list(self, where: SagaFilter | None = None) -> list[dict[str, Any]]:
        """Summaries (no timeline) of the sagas that match `where`, oldest first."""
        where = where or SagaFilter()
        now = clock.now()
        out = []
        for saga in self.documents.scan():
            state = effective_state(saga, now, where.stuck_for or self.stuck_after)
            started = datetime.fromisoformat(saga["started_at"]) if saga["started_at"] else None
            if where.stuck_for and state != "stuck":
                continue
            if where.state and state != where.state:
                continue
            if where.saga_type and saga["saga_type"] != where.saga_type:
                continue
            if where.started_after and (started is None or started < where.started_after):
                continue
            if where.started_before and (started is None or started >= where.started_before):
                continue
            summary = {k: v for k, v in saga.items() if k not in _HIDDEN}
            summary["state"] = state
            out.append(summary)
        return sorted(out, key=lambda s: (s["started_at"] or "", s["saga_id"]))

    def counts(self) -> dict[str, int]:
        """How many sagas are in each state."""
        counts: dict[str, int] = {}
        for s in self.list():
            counts[s["state"]] = counts.get(s["state"], 0) + 1
        return dict(sorted(counts.items()))


def dumps(doc: dict[str, Any]) -> str:
    """Serialise a saga document canonically."""
    return json.dumps(doc, sort_keys=True, separators=(",", ":"))
