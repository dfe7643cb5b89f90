"""The saga projection: every saga's state, steps and timeline, built from the log alone.

The projection never reads a service's state. It folds each event of the log
into a per-saga document, and keeps those documents and its own tracking
position in its own store, committed together, so it processes each event
exactly once and resumes after a restart. `replay()` rebuilds from position 0
and gives exactly what incremental updates give, because both use `apply()`.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from choreo import clock
from choreo.errors import ConcurrencyConflict
from choreo.events import Envelope, Outcome, is_known_type
from choreo.operations import DeadLetterResolved, EventParked, HandlerRetried
from choreo.saga import SagaDefinition
from choreo.store import EventStore, advance

FINAL_STATES = frozenset({"completed", "failed"})
NO_SAGA = "(no saga id)"
_NOTES = frozenset({HandlerRetried.event_type, EventParked.event_type, DeadLetterResolved.event_type})
STATES = ("started", "running", "compensating", "completed", "failed", "stuck")


def entry_of(env: Envelope) -> dict[str, Any]:
    """The timeline entry of an event: what the projection keeps of it."""
    entry: dict[str, Any] = {
        "position": env.position,
        "event_id": env.event_id,
        "type": env.type,
        "service": env.service,
        "step": env.step,
        "outcome": env.outcome,
        "occurred_at": env.occurred_at.isoformat(),
        "causation_id": env.causation_id,
    }
    # The writer validated the event against its schema; a replay only needs to know the
    # type and read the payload's JSON (re-validating every event would cost most of it).
    if not is_known_type(env.type):
        entry["unknown"] = f"unknown event type {env.type!r} (schema version {env.version})"
        return entry
    try:
        payload = json.loads(env.payload)
        if not isinstance(payload, dict):
            raise ValueError("not a JSON object")
    except ValueError as e:
        entry["unknown"] = f"{env.type}: payload is not a JSON object: {e}"
        return entry
    if env.outcome == Outcome.FAILED:
        reason = payload.get("reason")
        entry["cause"] = f"{env.type}: {reason}" if reason else env.type
    if env.type in _NOTES:
        if "attempts" in payload:
            entry["attempts"] = payload["attempts"]
        if env.type == EventParked.event_type:
            entry["note"] = payload.get("reason", "")
        elif env.type == DeadLetterResolved.event_type:
            entry["note"] = f"{payload.get('status')}: {payload.get('reason', '')}"
    return entry


def new_saga(saga_id: str) -> dict[str, Any]:
    """An empty saga document."""
    return {
        "saga_id": saga_id, "saga_type": None, "state": "started", "started_at": None,
        "ended_at": None, "updated_at": None, "cause": None, "steps": {}, "timeline": [],
        "unknown_events": 0,
    }


def apply(saga: dict[str, Any], entry: dict[str, Any], definitions: Sequence[SagaDefinition]) -> None:
    """Fold one timeline entry into a saga document (the one rule for updates and replays)."""
    if any(e["event_id"] == entry["event_id"] for e in saga["timeline"]):
        return  # the same event delivered again
    when = entry["occurred_at"]
    saga["timeline"].append(entry)
    saga["updated_at"] = when
    if "unknown" in entry:
        saga["unknown_events"] += 1
        return
    if saga["started_at"] is None:
        saga["started_at"] = when
        definition = next((d for d in definitions if d.start.event_type == entry["type"]), None)
        saga["saga_type"] = definition.name if definition else entry["type"]
        if definition:
            for name in definition.steps:
                saga["steps"][name] = _step(None)
    definition = next((d for d in definitions if d.name == saga["saga_type"]), None)
    step, outcome = entry["step"], entry["outcome"]
    if entry["type"] == EventParked.event_type:
        saga["parked"] = saga.get("parked", 0) + 1
    elif entry["type"] == DeadLetterResolved.event_type:
        saga["parked"] = max(0, saga.get("parked", 0) - 1)
    if step and "attempts" in entry:  # retries and parking, shown on the step they concern
        info = saga["steps"].setdefault(step, _step(entry["service"]))
        info["attempts"] = info.get("attempts", 1) + entry["attempts"] - 1
        if entry["type"] == EventParked.event_type:
            info["parked"] = entry["note"]
    if outcome == Outcome.FAILED and not step and saga["cause"] is None:  # a deadline or an operator
        saga["cause"] = f"{entry['service']}: {entry.get('cause', entry['type'])}"
    if step and outcome:
        info = saga["steps"].setdefault(step, _step(entry["service"]))
        info["service"] = entry["service"]
        info["events"].append(entry["event_id"])
        info[f"{outcome}_at"] = when
        info["status"] = outcome
        if outcome == Outcome.FAILED and saga["cause"] is None:
            saga["cause"] = f"{step}: {entry.get('cause', entry['type'])}"
    failed = saga["cause"] is not None
    if failed:
        for info in saga["steps"].values():
            if info["status"] == Outcome.COMPLETED:
                info["status"] = "compensating"
    if saga["ended_at"] is None:
        if definition and entry["type"] in definition.end_types:
            saga["ended_at"] = when
        pending = [s for s in saga["steps"].values() if s["status"] == "compensating"]
        if failed:
            saga["state"] = "compensating" if pending or (definition and not saga["ended_at"]) else "failed"
        elif saga["ended_at"]:
            saga["state"] = "completed"
        elif any(s["status"] != "pending" for s in saga["steps"].values()):
            saga["state"] = "running"


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
        batch_size: int = 5000,
    ) -> None:
        self.store = store
        self.definitions = tuple(sagas)
        self.stuck_after = stuck_after
        self.batch_size = batch_size
        self.documents = store.documents("projection")
        self.feed = store.feed("projection", self.documents.tracking, group=False)

    def update(self, progress: Callable[[int, int | None], None] | None = None) -> int:
        """Fold every new event of the log into the read model; return how many were read.

        `progress(read_so_far, size_hint)` is called after each batch.
        """
        total = 0
        size = self.store.size_hint()
        while batch := self.feed.poll(self.batch_size, self.store.idle_timeout):
            touched = self.documents.get_many({env.saga_id or NO_SAGA for env in batch})
            for env in batch:
                saga_id = env.saga_id or NO_SAGA
                saga = touched.get(saga_id) or touched.setdefault(saga_id, new_saga(saga_id))
                apply(saga, entry_of(env), self.definitions)
            try:
                self.documents.put(touched, tracking=advance(batch))
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
        if as_of is not None:
            old = new_saga(saga_id)
            for entry in saga["timeline"]:
                if isinstance(as_of, int):
                    later = entry["position"] > as_of
                else:
                    later = datetime.fromisoformat(entry["occurred_at"]) > as_of
                if later:
                    break
                apply(old, entry, self.definitions)
            saga = old
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
            summary = {k: v for k, v in saga.items() if k != "timeline"}
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
