"""The contract of a store that lets replicas of a service split its work; subclassed once per store.

A store meets it with `ServiceStore.supports_claims = True` and `segments()`, `claims()`,
`acquire()`, `leave()` and `commit(claim=...)` (see `choreo.store` and docs/scaling.md, "Replicas").
Subclass `ReplicaStoreContract`, give `make_store()`, and set `__test__ = True`.
"""

from __future__ import annotations

import threading
import time
from datetime import datetime, timezone
from uuid import uuid4

import pytest
from eventsourcing.persistence import StoredEvent

from choreo import ClaimLost, ConcurrencyConflict, Envelope, EventStore, SegmentsMismatch
from choreo.deadlines import SCHEDULED, Deadline
from choreo.store import FENCE, DeadLetter, Held

T0 = datetime(2026, 1, 1, tzinfo=timezone.utc)


def envelope(saga: str = "s1") -> Envelope:
    return Envelope(event_id=str(uuid4()), type="Thing", version=1, saga_id=saga, causation_id=None,
                    service="svc", step=None, outcome=None, occurred_at=T0, payload="{}")


class ReplicaStoreContract:
    """Claims on segments with leases, and the claim checked in the commit's transaction."""

    __test__ = False
    #: a lease short enough to wait out in a test, long enough to outlast a slow store call
    short_lease = 0.3

    def make_store(self) -> EventStore:
        raise NotImplementedError

    @pytest.fixture
    def store(self) -> EventStore:  # type: ignore[misc]
        s = self.make_store()
        yield s
        s.close()

    def test_a_service_is_not_split_until_the_first_claims_call_records_its_layout(self, store: EventStore) -> None:
        own = store.service("svc")
        assert own.supports_claims and own.segments() is None
        state = own.claims(4)
        assert [(c.segment, c.owner, c.token) for c in state.claims] == [(s, None, 0) for s in range(4)]
        assert state.replicas == () and own.segments() == 4
        assert own.claims(4).claims == state.claims  # the layout is recorded once

    def test_another_number_of_segments_is_refused_naming_both(self, store: EventStore) -> None:
        own = store.service("svc")
        own.claims(4)
        with pytest.raises(SegmentsMismatch, match="split into 4 segments.*started with 8"):
            own.claims(8)

    def test_the_layout_starts_each_segment_where_the_whole_service_was(self, store: EventStore) -> None:
        own = store.service("svc")
        store.append([envelope() for _ in range(5)])
        own.commit(events=[], emitted=[], tracking={"log": 5})
        own.claims(3)
        assert own.tracking() == {"log": FENCE, "log#0": 5, "log#1": 5, "log#2": 5}
        with pytest.raises(ConcurrencyConflict):  # a processor still running the service whole cannot commit
            own.commit(events=[], emitted=[envelope()], tracking={"log": 6})

    def test_free_segments_are_taken_held_ones_are_not_and_a_renewal_keeps_the_token(
            self, store: EventStore) -> None:
        own = store.service("svc")
        own.claims(4)
        a = own.acquire("a", [0, 1, 2], 30)
        assert sorted(a) == [0, 1, 2]
        assert own.acquire("b", [1, 2, 3], 30) == {3: own.claims(4).claims[3].token}  # 1, 2 are a's
        assert own.acquire("a", [0, 1, 2], 30) == a  # renewed: same tokens
        state = own.claims(4)
        assert [c.owner for c in state.claims] == ["a", "a", "a", "b"]
        assert set(state.replicas) == {"a", "b"}
        assert all(c.expires_at > state.now + 20 for c in state.claims)

    def test_a_released_segment_changes_hands_with_a_new_token(self, store: EventStore) -> None:
        own = store.service("svc")
        own.claims(2)
        a = own.acquire("a", [0, 1], 30)
        assert own.acquire("a", [0], 30, release=[1]) == {0: a[0]}
        b = own.acquire("b", [1], 30)
        assert b[1] != a[1]
        assert [c.owner for c in own.claims(2).claims] == ["a", "b"]

    def test_an_expired_lease_is_taken_by_another_replica(self, store: EventStore) -> None:
        own = store.service("svc")
        own.claims(2)
        a = own.acquire("a", [0, 1], self.short_lease)
        assert own.acquire("b", [0, 1], 30) == {}
        time.sleep(self.short_lease * 1.5)
        state = own.claims(2)
        assert all(c.expires_at < state.now for c in state.claims) and "a" not in state.replicas
        b = own.acquire("b", [0, 1], 30)
        assert sorted(b) == [0, 1] and all(b[s] != a[s] for s in b)
        assert own.acquire("a", [0, 1], 30) == {}  # a, back from a pause, holds nothing

    def test_a_dead_replicas_segments_are_taken_at_once_and_its_heartbeat_dropped(self, store: EventStore) -> None:
        own = store.service("svc")
        own.claims(2)
        own.acquire("a", [0, 1], 30)
        assert sorted(own.acquire("b", [0, 1], 30, dead=["a"])) == [0, 1]
        assert own.claims(2).replicas == ("b",)

    def test_leave_frees_every_segment_of_the_replica(self, store: EventStore) -> None:
        own = store.service("svc")
        own.claims(3)
        a = own.acquire("a", [0, 1, 2], 30)
        own.leave("a")
        state = own.claims(3)
        assert [c.owner for c in state.claims] == [None] * 3 and state.replicas == ()
        assert all(c.token != a[c.segment] for c in state.claims)

    def test_a_commit_under_a_held_claim_is_written(self, store: EventStore) -> None:
        own = store.service("svc")
        own.claims(2)
        held = Held("a", own.acquire("a", [0, 1], 30))
        store.append([envelope()])
        own.commit(events=[], emitted=[envelope()], tracking={"log#0": 1, "log#1": 1}, claim=held)
        assert own.tracking() == {"log": FENCE, "log#0": 1, "log#1": 1}

    def test_an_expired_claim_that_nobody_took_still_commits(self, store: EventStore) -> None:
        own = store.service("svc")
        own.claims(1)
        held = Held("a", own.acquire("a", [0], self.short_lease))
        time.sleep(self.short_lease * 1.5)
        store.append([envelope()])
        own.commit(events=[], emitted=[], tracking={"log#0": 1}, claim=held)
        assert own.tracking()["log#0"] == 1

    def test_a_replica_that_lost_its_claim_cannot_commit_and_nothing_is_written(self, store: EventStore) -> None:
        own = store.service("svc")
        own.claims(2)
        stale = Held("a", own.acquire("a", [0, 1], self.short_lease))
        store.append([envelope()])
        before = own.tracking()
        time.sleep(self.short_lease * 1.5)
        own.acquire("b", [1], 30)  # b takes segment 1 after a's lease ran out
        agg = uuid4()
        letter = DeadLetter(service="svc", position=1, event_id="e", saga_id="s", type="T", reason="r", error="",
                            attempts=1, first_failed_at=T0, last_failed_at=T0)
        timer = Deadline(id="d1", service="svc", name="n", saga_id="s", due_at=T0, status=SCHEDULED,
                         cause_event_id="e", cause_type="T", cause_version=1, cause_payload="{}")
        emitted = envelope()
        with pytest.raises(ClaimLost, match=r"a no longer holds segment\(s\) 1"):
            own.commit(events=[StoredEvent(agg, 1, "t:T", b"{}")], emitted=[emitted],  # type: ignore[arg-type]
                       tracking={"log#0": 1, "log#1": 1}, parked=[letter], deadlines=[timer], claim=stale)
        assert own.load(agg) == [] and own.tracking() == before and own.dead_letters(None) == []
        assert own.due_deadlines(T0) == []
        assert emitted.event_id not in {e.event_id for batch in store.scan() for e in batch}

    def test_segment_positions_must_move_forward(self, store: EventStore) -> None:
        own = store.service("svc")
        own.claims(2)
        held = Held("a", own.acquire("a", [0, 1], 30))
        store.append([envelope() for _ in range(3)])
        own.commit(events=[], emitted=[], tracking={"log#0": 2, "log#1": 2}, claim=held)
        with pytest.raises(ConcurrencyConflict):
            own.commit(events=[], emitted=[], tracking={"log#0": 3, "log#1": 2}, claim=held)
        assert own.tracking() == {"log": FENCE, "log#0": 2, "log#1": 2}
        own.commit(events=[], emitted=[], tracking={"log#0": 3, "log#1": 3}, claim=held)
        assert own.tracking() == {"log": FENCE, "log#0": 3, "log#1": 3}

    def test_replicas_racing_for_free_segments_never_share_one(self, store: EventStore) -> None:
        own = store.service("svc")
        own.claims(16)
        got: dict[str, dict[int, int]] = {}
        gate = threading.Barrier(4)

        def race(name: str) -> None:
            gate.wait()
            got[name] = own.acquire(name, list(range(16)), 30)

        threads = [threading.Thread(target=race, args=(f"r{i}",)) for i in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        taken = [s for held in got.values() for s in held]
        assert sorted(taken) == list(range(16))  # every segment once
        owners = {c.segment: c.owner for c in own.claims(16).claims}
        assert all(owners[s] == name for name, held in got.items() for s in held)
