"""Aggregate snapshots: a hot aggregate loads from its latest snapshot, never from one ahead of its events."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any
from uuid import uuid4

import pytest

from choreo import Envelope, Processor, Service, WiringError, load_aggregate, open_store
from choreo._unit_of_work import AggregateCache, UnitOfWork
from choreo.aggregates import aggregate_id, create_with_id, new_mapper
from choreo.events import encode_payload
from choreo.snapshots import Snapshotting
from choreo.store import ServiceStore
from tests import snapshot_ledger
from tests.snapshot_ledger import KEY, Bump, Tally, ledger

ROOT = Path(__file__).resolve().parent.parent
HOT = aggregate_id(Tally, KEY)


def bump_envelope(n: int) -> Envelope:
    return Envelope(event_id=str(uuid4()), type=Bump.event_type, version=1, saga_id=f"s-{n}", causation_id=None,
                    service="feeder", step=None, outcome=None, occurred_at=datetime.now(timezone.utc),
                    payload=encode_payload(Bump(n=n)))


def write_history(own: ServiceStore, events: int, every: int, per_commit: int = 5000) -> None:
    """`events` events of the hot tally, committed as the processor commits them (snapshots included)."""
    mapper, snapshotting = new_mapper(), Snapshotting({Tally: every})
    tally = create_with_id(Tally, HOT, name=KEY)
    done = 1
    while done < events:
        uow = UnitOfWork("ledger", own, mapper, AggregateCache(1), snapshotting)
        uow.add(tally)
        for _ in range(min(per_commit, events - done)):
            tally.bump(done)
            done += 1
        own.commit(events=uow.stored_events(), emitted=[], tracking={}, snapshots=uow.snapshots)


def full_replay(own: ServiceStore) -> Tally:
    mapper, agg = new_mapper(), None
    for stored in own.load(HOT):
        agg = mapper.to_domain_event(stored).mutate(agg)  # type: ignore[attr-defined]
    assert isinstance(agg, Tally)
    return agg


def state(agg: Any) -> dict[str, Any]:
    return {k: v for k, v in vars(agg).items() if k != "_pending_events"}


class Counting:
    """Counts the aggregate events (and snapshots) a service store hands out."""

    def __init__(self, own: ServiceStore) -> None:
        self.events = self.snapshots = 0
        load, load_latest = own.load, own.load_latest

        def counted_load(agg_id: Any) -> Any:
            got = load(agg_id)
            self.events += len(got)
            return got

        def counted_latest(agg_id: Any) -> Any:
            snapshot, got = load_latest(agg_id)
            self.events += len(got)
            self.snapshots += snapshot is not None
            return snapshot, got

        own.load, own.load_latest = counted_load, counted_latest  # type: ignore[method-assign]


@pytest.mark.parametrize("url", ["memory", "sqlite", "postgres"])
def test_a_restarted_service_loads_a_hot_aggregate_from_its_snapshot(
        url: str, tmp_path: Path, request: pytest.FixtureRequest) -> None:
    events, every = 100_000, 1000
    location = {"memory": lambda: "memory://", "sqlite": lambda: f"sqlite:///{tmp_path / 'log.db'}",
                "postgres": lambda: request.getfixturevalue("postgres_url")}[url]()
    store = open_store(location)
    write_history(store.service("ledger"), events, every)
    store.append([bump_envelope(events)])
    if url != "memory":  # a restart: the store is opened anew
        store.close()
        store = open_store(location)
    own = store.service("ledger")
    counting = Counting(own)
    snapshot_ledger.seen.clear()
    assert Processor(ledger(every), store).poll() == 1
    assert snapshot_ledger.seen == [(events - 1, sum(range(1, events)))]  # it saw the whole history
    assert counting.snapshots == 1 and counting.events < every  # read from the snapshot, not 100,000 events
    loaded = load_aggregate(own, Tally, KEY)
    assert loaded is not None and loaded.version == events + 1
    assert state(loaded) == state(full_replay(own))  # the same state as a full replay
    store.close()


def test_without_an_interval_the_snapshots_are_ignored_and_every_event_is_read(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("choreo.snapshots._classes_with_interval", lambda: False)  # (docs' classes set one)
    store = open_store(f"sqlite:///{tmp_path / 'log.db'}")
    write_history(store.service("ledger"), 3000, 1000)
    store.append([bump_envelope(3000)])
    counting = Counting(store.service("ledger"))
    assert Processor(ledger(None), store).poll() == 1
    assert counting.snapshots == 0 and counting.events == 3000
    store.close()


def test_an_interval_on_the_class_and_one_on_the_service(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(Tally, "snapshot_every", 10)
    store = open_store("memory://")
    store.append([bump_envelope(n) for n in range(25)])
    proc = Processor(ledger(None), store, batch_size=7)
    proc.run_until_idle()
    snapshot, after = store.service("ledger").load_latest(HOT)
    assert snapshot is not None and snapshot.originator_version == 22 and len(after) == 4  # batches end at v8, 15, 22, 26
    store2 = open_store("memory://")
    store2.append([bump_envelope(n) for n in range(25)])
    Processor(ledger(100), store2, batch_size=7).run_until_idle()  # the service's interval wins
    assert store2.service("ledger").load_latest(HOT)[0] is None


@pytest.mark.parametrize("every", [0, -1, "10", 2.5])
def test_a_bad_interval_is_refused_at_wiring_time(every: object) -> None:
    with pytest.raises(WiringError, match=r"snapshot_every\[Tally\] must be a whole number >= 1"):
        Service("ledger", snapshot_every={Tally: every})  # type: ignore[dict-item]
    with pytest.raises(WiringError, match="is not an Aggregate class"):
        Service("ledger", snapshot_every={dict: 10})  # type: ignore[dict-item]


def test_snapshots_survive_kill_9_and_are_never_ahead_of_the_committed_events(tmp_path: Path) -> None:
    url, total = f"sqlite:///{tmp_path / 'log.db'}", 20_000
    store = open_store(url)
    store.append([bump_envelope(n) for n in range(total)])
    store.close()
    snapshots_seen = 0
    for round_ in range(2):
        proc = subprocess.Popen([sys.executable, "-c", "import tests.snapshot_ledger as m; m.main()", url, "70", "300"], cwd=ROOT,
                                stdout=subprocess.PIPE, text=True)
        assert proc.stdout is not None and proc.stdout.readline().strip() == "ready"
        time.sleep(0.4 + 0.5 * round_)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        proc.stdout.close()
        store = open_store(url)
        own = store.service("ledger")
        committed = own.load(HOT)
        snapshot, after = own.load_latest(HOT)
        assert committed, "the ledger committed nothing before it was killed"
        if snapshot is not None:
            snapshots_seen += 1
            assert snapshot.originator_version <= committed[-1].originator_version
            mapper, replayed = new_mapper(), None
            for stored in committed[: snapshot.originator_version]:
                replayed = mapper.to_domain_event(stored).mutate(replayed)  # type: ignore[attr-defined]
            assert state(mapper.to_domain_event(snapshot).mutate(None)) == state(replayed)  # type: ignore[attr-defined]
            assert [e.originator_version for e in after] == \
                list(range(snapshot.originator_version + 1, committed[-1].originator_version + 1))
        store.close()
    assert snapshots_seen  # it was killed while snapshotting
    store = open_store(url)
    Processor(ledger(70), store).run_until_idle()
    tally = load_aggregate(store.service("ledger"), Tally, KEY)
    assert tally is not None and tally.count == total and tally.total == sum(range(total))  # exactly once
    assert state(tally) == state(full_replay(store.service("ledger")))
    store.close()
