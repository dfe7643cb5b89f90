"""How one event changes a saga's document: the fold of the saga projection (`apply`).

A log row becomes a timeline entry (`entry_of`: compact, and tolerant of garbled rows,
which fold as `unknown`), and `apply` folds an entry into the saga's document: its
state, steps and cause, by the rules of the saga definitions (`Catalog`). The
projection (`choreo.projection`) runs this fold for incremental updates, for rebuilds
from position 0 and in worker processes, so all of them give the same documents.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from typing import Any

import orjson

from choreo.events import Outcome
from choreo.operations import DeadLetterResolved, EventParked, HandlerRetried
from choreo.saga import SagaCompleted, SagaDefinition, SagaFailed
from choreo.store import Row

FINAL_STATES = frozenset({"completed", "failed"})
#: The key of the document that counts the events without a saga id (never a saga's id).
NO_SAGA = ""
#: The key under which `SagaProjection.counts()` reports the events without a saga id.
NO_SAGA_COUNT = "events_without_saga_id"
#: The version of `apply()` and `entry_of()`: a projection stored by another version is rebuilt.
FOLD_VERSION = 3
#: The metadata entry that each rebuild (`clear()`) of the projection sets to a new value.
GENERATION = "generation"
_NOTES = frozenset({HandlerRetried.event_type, EventParked.event_type, DeadLetterResolved.event_type})
_PARKED, _RESOLVED = EventParked.event_type, DeadLetterResolved.event_type
_COMPLETED, _FAILED = SagaCompleted.event_type, SagaFailed.event_type
_ENDS = (_COMPLETED, _FAILED)
_OUT_COMPLETED, _OUT_FAILED = str(Outcome.COMPLETED.value), str(Outcome.FAILED.value)
_SEEN = "event_ids"  # every event a saga document has folded in (redeliveries are ignored)
_HIDDEN = frozenset({_SEEN, "timeline"})
_FRESH_KEYS = 500_000  # how many keys a rebuild remembers having written (about 50 MB), at most
#: the name of the projection's documents in the store (`rm_sagas_*` tables on SQLite)
DOCUMENTS = "sagas"
STATES = ("started", "running", "compensating", "completed", "failed", "stuck")


#: A timeline entry is stored compactly as a list: these fields in this order, then a dict
#: of what only some events have (`unknown`, `cause`, `attempts`, `note`). `occurred_at`
#: is an ISO 8601 time with a UTC offset, or None if the log's was not one.
FIELDS = ("position", "event_id", "type", "service", "step", "outcome", "occurred_at", "causation_id")
_POSITION, _ID, _TYPE, _SERVICE, _STEP, _OUTCOME, _AT, _CAUSATION, _EXTRA = range(9)


def parse_time(text: Any) -> datetime | None:
    """An ISO 8601 time as an aware datetime (UTC if it has no offset), or None if it is not one."""
    try:
        t = datetime.fromisoformat(text)
    except (TypeError, ValueError):
        return None
    return t if t.tzinfo else t.replace(tzinfo=timezone.utc)


_fromisoformat = datetime.fromisoformat


def _stored_time(when: Any) -> str | None:
    """The log's time as kept in an entry: as written if it has a UTC offset, else with +00:00."""
    try:
        t = datetime.fromisoformat(when)
    except (TypeError, ValueError):
        return None
    return str(when) if t.tzinfo else t.replace(tzinfo=timezone.utc).isoformat()


def _end_cause(payload: Mapping[str, Any]) -> str:
    """The cause of a saga as `choreo.SagaFailed` tells it: the failed step, the failure's type and reason."""
    cause = str(payload.get("failure_type") or _FAILED)
    if payload.get("reason"):
        cause += f": {payload['reason']}"
    return f"{payload['failed_step']}: {cause}" if payload.get("failed_step") else cause


def entry_of(row: Row) -> list[Any]:
    """The timeline entry of a log row (see `choreo.store.ROW_FIELDS`): what the projection keeps.

    It depends on the row alone, never on which event classes this process loaded: a
    row whose time is not an ISO 8601 time, whose payload is not a JSON object, or one
    of whose text fields is not text (bytes: a BLOB, or text that is not valid UTF-8) is
    marked `unknown` with the reason, its fields made text.
    """
    position, event_id, kind, _, _, causation_id, service, step, outcome, when, text, _ = row
    if not (type(event_id) is str and type(kind) is str and type(service) is str  # the fast check
            and (causation_id is None or type(causation_id) is str) and (step is None or type(step) is str)
            and (outcome is None or type(outcome) is str)) and (problems := _not_text(row)):
        return _garbled(row, problems)
    extra: dict[str, Any] = {}
    try:  # `_stored_time()`, inline: this runs for every event of a rebuild
        at = when if _fromisoformat(when).tzinfo and type(when) is str else _stored_time(when)
    except (TypeError, ValueError):
        at = None
    entry = [position, event_id, kind, service, step, outcome, at, causation_id, extra]
    if at is None:
        extra["unknown"] = f"{kind}: occurred_at {when!r} is not an ISO 8601 time"
        return entry
    # The writer validated the event against its schema; a replay only needs to read the
    # payload's JSON (re-validating every event would cost most of it).
    try:
        if not isinstance(text, str):
            raise ValueError(f"stored as {type(text).__name__}")
        payload = orjson.loads(text)
        if not isinstance(payload, dict):
            raise ValueError("not a JSON object")
    except ValueError as e:
        extra["unknown"] = f"{kind}: payload is not a JSON object: {e}"
        return entry
    if kind == _FAILED:
        extra["cause"] = _end_cause(payload)
    elif outcome == _OUT_FAILED:
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


# The text fields of a row that must be text (a saga id that is not is still read as a saga of its own,
# named by its repr, as it always was), and those that may also be None.
_TEXT_FIELDS = ((1, "event_id"), (2, "type"), (5, "causation_id"), (6, "service"), (7, "step"), (8, "outcome"))
_OPTIONAL = frozenset({"causation_id", "step", "outcome"})


def text_of(value: Any) -> str:
    """A field's value as text: text as it is, anything else (bytes) by its repr."""
    return value if isinstance(value, str) else repr(value)


def _not_text(row: Row) -> list[str]:
    """What is wrong with the text fields of a row: those that are not text (None is text where optional)."""
    return [f"{name} is {'bytes' if isinstance(row[i], bytes) else type(row[i]).__name__}, not UTF-8 text"
            for i, name in _TEXT_FIELDS if not isinstance(row[i], str) and not (row[i] is None and name in _OPTIONAL)]


def _garbled(row: Row, problems: Sequence[str]) -> list[Any]:
    """The `unknown` entry of a row with text fields that are not text, every field made text."""
    event_id, kind, causation_id, service, step, outcome = (
        None if row[i] is None and name in _OPTIONAL else text_of(row[i]) for i, name in _TEXT_FIELDS)
    extra = {"unknown": f"{kind}: {'; '.join(problems)}"}
    return [row[0], event_id, kind, service, step, outcome, _stored_time(row[9]), causation_id, extra]


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

    def fingerprint(self) -> str:
        """A digest of everything the fold reads from the definitions: names, start types, steps, end types."""
        sagas = sorted([d.name, d.start.event_type, list(d.steps), sorted(d.end_types)] for d in self.by_name.values())
        starts = sorted([start, d.name] for start, d in self.by_start.items())
        text = json.dumps([sagas, starts], separators=(",", ":"))
        return hashlib.sha256(text.encode()).hexdigest()


def apply(saga: dict[str, Any], entry: Sequence[Any], catalog: Catalog) -> bool:
    """Fold one timeline entry into a saga document (the one rule for updates and replays).

    Returns False, changing nothing, if the saga has this event already.
    """
    # Written for speed (a rebuild calls it for every event): locals, plain strings, no helpers on the common path.
    seen, event_id = saga[_SEEN], entry[_ID]
    if event_id in seen:
        return False  # the same event delivered again
    seen.append(event_id)
    when, kind, extra = entry[_AT], entry[_TYPE], entry[_EXTRA]
    if when is not None:
        saga["updated_at"] = when
    if extra and "unknown" in extra:
        saga["unknown_events"] += 1
        return True
    steps = saga["steps"]
    if saga["started_at"] is None:
        saga["started_at"] = when
        started = catalog.by_start.get(kind)
        saga["saga_type"] = started.name if started else kind
        if started:
            for name in started.steps:
                steps[name] = {"service": None, "status": "pending", "events": []}
    if kind in _ENDS:
        _end(saga, kind, extra, when)
        return True
    step, outcome = entry[_STEP], entry[_OUTCOME]
    if extra:  # parking, resolving and retries always have extras (a note, attempts)
        if kind == _PARKED:
            saga["parked"] = saga.get("parked", 0) + 1
        elif kind == _RESOLVED:
            saga["parked"] = max(0, saga.get("parked", 0) - 1)
        if step and "attempts" in extra:  # retries and parking, shown on the step they concern
            info = steps.get(step) or steps.setdefault(step, _step(entry[_SERVICE]))
            info["attempts"] = info.get("attempts", 1) + extra["attempts"] - 1
            if kind == _PARKED:
                info["parked"] = extra["note"]
    if outcome == _OUT_FAILED and not step and saga["cause"] is None:  # a deadline or an operator
        saga["cause"] = f"{entry[_SERVICE]}: {extra.get('cause', kind)}"
    if step and outcome:
        service = entry[_SERVICE]
        info = steps.get(step) or steps.setdefault(step, _step(service))
        info["service"] = service
        info["events"].append(event_id)
        info[f"{outcome}_at"] = when
        info["status"] = outcome
        if outcome == _OUT_FAILED and saga["cause"] is None:
            saga["cause"] = f"{step}: {extra.get('cause', kind)}"
    failed = saga["cause"] is not None
    if failed:
        for info in steps.values():
            if info["status"] == _OUT_COMPLETED:
                info["status"] = "compensating"
    if saga["ended_at"] is None:
        definition = catalog.by_name.get(saga["saga_type"])
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


def _end(saga: dict[str, Any], kind: str, extra: Mapping[str, Any], when: str) -> None:
    """Fold choreo's own end of a saga: it decides, whatever the definition's end types say.

    A saga that ended one way (choreo's end, or a definition's end event with that
    outcome) never shows the other.
    """
    completed = kind == _COMPLETED
    if saga["ended_at"] is not None and (saga["state"] == "completed") != completed:
        return  # it ended the other way
    if not completed and saga["cause"] is None:
        saga["cause"] = extra.get("cause", kind)
    saga["state"] = "completed" if completed else "failed"
    if saga["ended_at"] is None:
        saga["ended_at"] = when


def _step(service: str | None) -> dict[str, Any]:
    return {"service": service, "status": "pending", "events": []}


def effective_state(saga: dict[str, Any], now: datetime, stuck_after: timedelta | None) -> str:
    """The saga's state, or `stuck` if it is not final and made no progress for `stuck_after`."""
    if stuck_after is not None and saga["state"] not in FINAL_STATES:
        updated = parse_time(saga["updated_at"])
        if updated is not None and now - updated > stuck_after:
            return "stuck"
    return str(saga["state"])
