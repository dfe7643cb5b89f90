"""The contract every event store must meet; subclassed once per store."""

from __future__ import annotations

import threading
import time
from datetime import datetime, timezone
from uuid import uuid4

import pytest
from eventsourcing.persistence import StoredEvent

from choreo import ConcurrencyConflict, Envelope, EventStore
from choreo.store import DeadLetter

T0 = datetime(2026, 1, 1, tzinfo=timezone.utc)


def envelope(saga: str = "s1", type_: str = "Thing", payload: str = "{}") -> Envelope:
    return Envelope(
        event_id=str(uuid4()), type=type_, version=1, saga_id=saga, causation_id=None,
        service="svc", step=None, outcome=None, occurred_at=T0, payload=payload,
    )


def stored(agg: object, version: int) -> StoredEvent:
    return StoredEvent(originator_id=agg, originator_version=version, topic="t:T", state=b"{}")  # type: ignore[arg-type]


class EventStoreContract:
    __test__ = False

    def make_store(self) -> EventStore:
        raise NotImplementedError

    @pytest.fixture
    def store(self) -> EventStore:  # type: ignore[misc]
        s = self.make_store()
        yield s
        s.close()

    def test_append_assigns_increasing_positions(self, store: EventStore) -> None:
        assert store.last_position() == 0
        positions = store.append([envelope(), envelope()]) + store.append([envelope()])
        assert positions == sorted(positions) and len(set(positions)) == 3
        assert [e.position for e in store.read(0)] == positions
        assert store.last_position() == positions[-1]

    def test_read_after_and_limit(self, store: EventStore) -> None:
        store.append([envelope(payload=f'{{"n": {i}}}') for i in range(10)])
        first = store.read(0, 4)
        rest = store.read(first[-1].position or 0, 100)
        assert len(first) == 4 and len(rest) == 6
        assert [e.payload for e in first + rest] == [f'{{"n": {i}}}' for i in range(10)]

    def test_envelope_round_trips(self, store: EventStore) -> None:
        e = envelope()
        store.append([e])
        (back,) = store.read(0)
        assert back.at(0) == e.at(0)

    def test_duplicate_event_id_is_rejected_and_nothing_written(self, store: EventStore) -> None:
        e = envelope()
        store.append([e])
        with pytest.raises(ConcurrencyConflict):
            store.append([envelope(), e])
        assert len(store.read(0)) == 1

    def test_commit_writes_events_emitted_and_position_together(self, store: EventStore) -> None:
        svc = store.service("alpha")
        agg = uuid4()
        svc.commit(events=[stored(agg, 1), stored(agg, 2)], emitted=[envelope()], tracking={"log": 1})
        assert [s.originator_version for s in svc.load(agg)] == [1, 2]
        assert svc.position() == 1
        assert len(store.read(0)) == 1

    def test_commit_conflict_writes_nothing(self, store: EventStore) -> None:
        svc = store.service("alpha")
        agg = uuid4()
        svc.commit(events=[stored(agg, 1)], emitted=[], tracking={"log": 1})
        with pytest.raises(ConcurrencyConflict):
            svc.commit(events=[stored(uuid4(), 1), stored(agg, 1)], emitted=[envelope()], tracking={"log": 2})
        assert svc.position() == 1
        assert store.read(0) == []
        assert len(svc.load(agg)) == 1

    def test_position_cannot_go_back(self, store: EventStore) -> None:
        svc = store.service("alpha")
        svc.commit(events=[], emitted=[], tracking={"log": 5})
        with pytest.raises(ConcurrencyConflict):
            svc.commit(events=[], emitted=[envelope()], tracking={"log": 5})
        assert store.read(0) == [] and svc.position() == 5

    def test_services_have_separate_positions(self, store: EventStore) -> None:
        store.service("alpha").commit(events=[], emitted=[], tracking={"log": 3})
        assert store.service("beta").position() == 0

    def test_dead_letters_round_trip(self, store: EventStore) -> None:
        svc = store.service("alpha")
        d = DeadLetter(
            service="alpha", position=7, event_id="e", saga_id="s", type="T", reason="bad",
            error="trace", attempts=3, first_failed_at=T0, last_failed_at=T0, envelope={"k": 1},
        )
        svc.commit(events=[], emitted=[], tracking={"log": 7}, parked=[d])
        (back,) = svc.dead_letters()
        assert back.reason == "bad" and back.envelope == {"k": 1} and back.id is not None
        assert back.first_failed_at == T0

    def test_wait_wakes_on_append(self, store: EventStore) -> None:
        assert store.wait(0, 0.01) is False
        threading.Timer(0.05, lambda: store.append([envelope()])).start()
        started = time.monotonic()
        assert store.wait(0, 5.0) is True
        assert time.monotonic() - started < 4.0
