"""Replicas of one service in one process (memory and SQLite): segments, claims, rebalancing,
a stale commit refused; and the replica contract on both stores. Real processes: test_replicas_processes.py."""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

import tests.replica_system as rs
from choreo import (
    ClaimLost, ManualClock, use_clock, EventStore, InMemoryStore, Processor, ReplicaSettings, SegmentsMismatch, Service, WiringError,
    open_store, segment_of,
)
from choreo.cli import main
from choreo.processor import wait_for_retries
from choreo.replicas import Replica
from choreo.store import Held
from services import system
from services.checks import check_invariants, read_facts
from services.demo import plan
from tests.replica_contract import ReplicaStoreContract


class TestMemoryReplicaContract(ReplicaStoreContract):
    __test__ = True

    def make_store(self) -> EventStore:
        return InMemoryStore()


class TestSQLiteReplicaContract(ReplicaStoreContract):
    __test__ = True

    @pytest.fixture(autouse=True)
    def _folder(self, tmp_path: Path) -> None:
        self.path = tmp_path / "claims.db"

    def make_store(self) -> EventStore:
        return open_store(f"sqlite:///{self.path}")


class TestPostgresReplicaContract(ReplicaStoreContract):
    __test__ = True

    @pytest.fixture(autouse=True)
    def _database(self, postgres_url: str) -> None:
        self.url = postgres_url

    def make_store(self) -> EventStore:
        return open_store(self.url)


@pytest.fixture
def store(any_store: EventStore) -> Iterator[EventStore]:
    rs.handled.clear()
    rs._failed_once.clear()
    rs.current_replica = ""
    yield any_store
    rs.before_handling = None


def replica(store: EventStore, lease: float = 30.0, service: Service = rs.echo) -> Processor:
    return Processor(service, store, replica=ReplicaSettings(segments=rs.SEGMENTS, lease=lease))


def run(*processors: Processor, rounds: int = 200) -> None:
    """Poll each replica in turn (naming it in `rs.current_replica`) until none has work."""
    for _ in range(rounds):
        done = 0
        for p in processors:
            rs.current_replica = p.replica.id if p.replica else ""
            done += p.poll()
        if not done and not wait_for_retries(processors, 2.0):
            return
    raise AssertionError("the replicas did not go idle")


def balance(*processors: Processor) -> None:
    """Tick every replica twice: the first round releases down to a fair share, the second takes."""
    for _ in range(2):
        for p in processors:
            assert p.replica is not None
            if p.replica.tick():
                p._stale = True


def test_a_sagas_segment_is_a_stable_hash_of_its_id() -> None:
    # pinned: every replica of every version must agree on where a saga goes
    assert [segment_of(s, 16) for s in ("order-1", "saga-a", "", "é")] == [15, 13, 0, 14]
    spread = {segment_of(f"saga-{i}", 8) for i in range(200)}
    assert spread == set(range(8))


def test_bad_segment_counts_and_leases_fail_at_wiring_time() -> None:
    with pytest.raises(WiringError, match="segments must be a whole number from 1 to 4096, got 0"):
        Service("x", segments=0)
    with pytest.raises(WiringError, match="segments"):
        ReplicaSettings(segments=5000)
    with pytest.raises(WiringError, match="lease must be a positive number"):
        ReplicaSettings(lease=0)


def test_without_replicas_a_service_runs_whole_as_before(store: EventStore) -> None:
    p = Processor(rs.echo, store)
    store.append([rs.ping("s1", 0)])
    run(p)
    assert p.replica is None and store.service("echo").segments() is None
    assert store.service("echo").tracking() == {"log": 1}


def test_two_replicas_split_the_sagas_each_saga_handled_by_its_owner_in_order(store: EventStore) -> None:
    a, b = replica(store), replica(store)
    balance(a, b)
    assert a.replica and b.replica and len(a.replica.tokens) == len(b.replica.tokens) == 4
    sagas = [f"saga-{i}" for i in range(40)]
    for n in range(4):  # the sagas' pings interleaved in the log; some fail once and are retried
        store.append([rs.ping(s, n, flaky=(n == 1 and i % 5 == 0)) for i, s in enumerate(sagas)])
    run(a, b)
    owner = {s: (a if a.replica.owns(s) else b).replica.id for s in sagas}  # type: ignore[union-attr]
    got = rs.pongs(store)
    for s in sagas:
        assert [p.n for p in got[s]] == [0, 1, 2, 3], s  # each ping once, in log order
        assert {p.replica for p in got[s]} == {owner[s]}
    assert {r for r, _, _ in rs.handled} == {a.replica.id, b.replica.id}
    assert all(r == owner[s] for r, s, _ in rs.handled)  # retries too: only the saga's replica ran it
    assert sum(1 for _, s, n in rs.handled if n == 1 and sagas.index(s) % 5 == 0) == 16  # 8 flaky, twice each
    tracking = store.service("echo").tracking()
    assert set(tracking) == {"log", *(f"log#{i}" for i in range(8))}


def test_a_replica_that_lost_its_claim_mid_batch_commits_nothing_and_the_new_owner_does_it_once(
        store: EventStore, caplog: pytest.LogCaptureFixture) -> None:
    a = replica(store, lease=30)
    assert a.replica and len(a.replica.tokens) == 8
    sagas = [f"saga-{i}" for i in range(20)]
    store.append([rs.ping(s, 0) for s in sagas])
    own = store.service("echo")
    taken: dict[int, int] = {}

    def steal(saga_id: str) -> None:  # while a handles its batch, "b" takes segments 0-3 (a stalled)
        if not taken:
            assert a.replica is not None
            own.leave(a.replica.id)  # as if a's lease ran out ...
            taken.update(own.acquire("b", [0, 1, 2, 3], 30))  # ... and b took half
            own.acquire(a.replica.id, [4, 5, 6, 7], 30)  # (a's other half, retaken at once: new tokens)

    rs.before_handling = steal
    caplog.set_level(logging.WARNING, "choreo")
    rs.current_replica = a.replica.id
    a.poll()
    assert "no longer holds segment(s)" in caplog.text
    assert rs.pongs(store) == {} and own.tracking().get("log#4", 0) == 0  # nothing of the batch was written
    rs.before_handling = None
    run(a)  # a goes on with the segments it still holds (4-7), from the committed state
    got = rs.pongs(store)
    mine = {s for s in sagas if segment_of(s, 8) >= 4}
    assert set(got) == mine and all([p.n for p in got[s]] == [0] for s in mine)
    with pytest.raises(ClaimLost):  # and what a held before the loss can never be committed
        own.commit(events=[], emitted=[], tracking={"log#0": 99}, claim=Held(a.replica.id, {0: 0}))


def test_a_joining_replica_gets_a_fair_share_and_a_leaving_one_hands_its_segments_over(store: EventStore) -> None:
    a = replica(store)
    assert a.replica and len(a.replica.tokens) == 8
    b = replica(store)
    balance(a, b)
    assert b.replica and (len(a.replica.tokens), len(b.replica.tokens)) == (4, 4)
    c = replica(store)
    balance(a, b, c)
    assert c.replica and sorted(len(p.replica.tokens) for p in (a, b, c)) == [2, 3, 3]  # type: ignore[union-attr]
    held = [s for p in (a, b, c) for s in p.replica.tokens]  # type: ignore[union-attr]
    assert sorted(held) == list(range(8))
    c.close()  # a clean stop frees its segments at once
    balance(a, b)
    assert (len(a.replica.tokens), len(b.replica.tokens)) == (4, 4)


def test_an_expired_replicas_segments_are_taken_over_and_its_sagas_go_on(store: EventStore) -> None:
    a, b = replica(store, lease=0.2), replica(store, lease=0.2)
    balance(a, b)
    sagas = [f"saga-{i}" for i in range(20)]
    store.append([rs.ping(s, 0) for s in sagas])
    run(a, b)
    store.append([rs.ping(s, 1) for s in sagas])
    time.sleep(0.3)  # a stops (no renewal): its lease runs out
    run(b)
    assert b.replica and len(b.replica.tokens) == 8
    got = rs.pongs(store)
    assert all([p.n for p in got[s]] == [0, 1] for s in sagas)
    rs.current_replica = a.replica.id  # type: ignore[union-attr]
    assert a.poll() == 0 and a.replica and a.replica.tokens == {}  # back from its pause: it holds nothing


def test_a_plain_processor_on_a_split_service_joins_as_a_replica_and_a_wrong_count_is_refused(
        store: EventStore) -> None:
    replica(store)
    joined = Processor(rs.echo, store)
    assert joined.replica is not None and joined.replica.segments == rs.SEGMENTS
    with pytest.raises(SegmentsMismatch, match="split into 8 segments, but this replica was started with 4"):
        Processor(rs.echo, store, replica=ReplicaSettings(segments=4))


def test_a_split_service_keeps_its_position_when_it_was_run_whole_before(store: EventStore) -> None:
    whole = Processor(rs.echo, store)
    store.append([rs.ping("s1", 0), rs.ping("s2", 0)])
    run(whole)
    store.append([rs.ping("s1", 1)])
    run(replica(store))
    got = rs.pongs(store)
    assert [p.n for p in got["s1"]] == [0, 1] and [p.n for p in got["s2"]] == [0]  # nothing handled twice


def test_the_example_with_two_replicas_of_each_step_service_ends_every_saga_as_planned(
        any_store: EventStore) -> None:
    store = any_store
    planned = plan(120, seed=4)
    system.start_many(store, [(order, saga_id) for saga_id, order, _, _ in planned])
    procs = []
    for name in system.services:
        copies = 1 if name == "orders" else 2
        procs += [Processor(system[name], store, replica=ReplicaSettings(segments=8) if copies > 1 else None)
                  for _ in range(copies)]
    balance(*[p for p in procs if p.replica])
    run(*procs)
    facts = read_facts(store, {s for s, *_ in planned})
    assert all(check_invariants(store, facts).values())
    for saga_id, _, state, cause in planned:
        assert (facts[saga_id].state, facts[saga_id].cause) == (state, cause)


def test_a_batch_that_outlasts_the_lease_keeps_its_claims(store: EventStore, caplog: pytest.LogCaptureFixture) -> None:
    a, b = replica(store, lease=0.3), replica(store, lease=0.3)
    balance(a, b)
    sagas = [f"saga-{i}" for i in range(30)]
    store.append([rs.ping(s, 0) for s in sagas])

    def slow(saga_id: str) -> None:  # each ping takes a while; meanwhile b looks for expired segments
        time.sleep(0.04)
        assert b.replica is not None
        b.replica.tick()

    rs.before_handling = slow
    caplog.set_level(logging.INFO, "choreo")
    assert a.replica is not None
    rs.current_replica = a.replica.id
    a.poll()  # about 15 pings of 40 ms: twice the lease
    assert "no longer holds" not in caplog.text and len(a.replica.tokens) == 4
    got = rs.pongs(store)
    assert set(got) == {s for s in sagas if a.replica.owns(s)}


def test_each_deadline_fires_once_in_the_replica_that_holds_its_saga(store: EventStore) -> None:
    manual = ManualClock()
    previous = use_clock(manual)
    try:
        a, b = replica(store, service=rs.timer), replica(store, service=rs.timer)
        balance(a, b)
        sagas = [f"saga-{i}" for i in range(30)]
        store.append([rs.ping(s, 0) for s in sagas])
        run(a, b)
        manual.advance(10)
        run(a, b)
    finally:
        use_clock(previous)
    owner = {s: (a if a.replica.owns(s) else b).replica.id for s in sagas}  # type: ignore[union-attr]
    fired = [(r, s) for r, s, n in rs.handled if n == -1]
    assert sorted(fired) == sorted((owner[s], s) for s in sagas)  # each once, by its saga's replica


def test_choreo_run_with_another_number_of_segments_is_refused_naming_both(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    url = f"sqlite:///{tmp_path}/run.db"
    with open_store(url) as split:
        split.service("echo").claims(8)
    assert main(["run", "tests.replica_system:echo", "--store", url, "--segments", "4"]) == 2
    assert "split into 8 segments, but this replica was started with 4" in capsys.readouterr().err


def test_a_processor_running_the_service_whole_joins_the_replicas_that_split_it_meanwhile(
        store: EventStore, caplog: pytest.LogCaptureFixture) -> None:
    whole = Processor(rs.echo, store)
    assert whole.replica is None
    store.append([rs.ping(f"s{i}", 0) for i in range(10)])
    run(whole)
    b = replica(store)  # replicas start while `whole` runs
    store.append([rs.ping(f"s{i}", 1) for i in range(10)])
    caplog.set_level(logging.WARNING, "choreo")
    run(whole, b)  # whole's commit meets the fence, it reloads and joins
    assert whole.replica is not None and "this process joins them" in caplog.text
    balance(whole, b)
    store.append([rs.ping(f"s{i}", 2) for i in range(10)])
    run(whole, b)
    got = rs.pongs(store)
    assert all([p.n for p in got[f"s{i}"]] == [0, 1, 2] for i in range(10))  # nothing handled twice


def test_shares_add_up_to_every_segment_and_leave_no_replica_idle() -> None:
    own = InMemoryStore().service("echo")
    replicas = [Replica(own, ReplicaSettings(segments=16)) for _ in range(5)]
    for _ in range(3):  # release, then take, then settle
        for r in replicas:
            r.tick()
    assert sorted(len(r.tokens) for r in replicas) == [3, 3, 3, 3, 4]
    assert sorted(s for r in replicas for s in r.tokens) == list(range(16))
