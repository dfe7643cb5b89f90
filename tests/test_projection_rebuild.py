"""The fast rebuild paths of the saga projection give exactly what the plain ones give.

On SQLite the timelines are read from the log (not copied), batches are written by a
second thread, a batch takes the sagas it continues from the last one, and a rebuild
looks up only the keys it wrote: each is checked against the in-memory store, which
copies every timeline entry and writes in the folding thread.
"""

from __future__ import annotations

import random
from uuid import uuid4
import sqlite3
from pathlib import Path

import pytest

import services
from choreo import InMemoryStore, SagaProjection, open_store
from choreo.projection import dumps, stored_timeline
from choreo.testing import TestSystem
from services.demo import plan

SAGAS = services.system.sagas


def finished_log(orders: int, seed: int) -> list:  # type: ignore[type-arg]
    harness = TestSystem(services.system)
    for saga_id, order, _, _ in plan(orders, seed):
        harness.start(order, saga_id=saga_id)
    harness.run()
    return harness.envelopes()


def shown(projection: SagaProjection) -> dict[str, str]:
    """Every saga as `get()` shows it (with its timeline), canonically."""
    return {s["saga_id"]: dumps(projection.get(s["saga_id"])) for s in projection.list()}  # type: ignore[arg-type]


@pytest.mark.parametrize("seed", range(4))
def test_timelines_read_from_the_log_equal_copied_ones_at_every_step_and_after_a_rebuild(
        tmp_path: Path, seed: int) -> None:
    rng = random.Random(seed)
    log = finished_log(15, seed)
    sqlite = open_store(f"sqlite:///{tmp_path}/p.db?durability=normal")
    memory = InMemoryStore()
    batch = rng.randint(1, 9)
    fast = SagaProjection(sqlite, sagas=SAGAS, batch_size=batch, stuck_after=None)
    plain = SagaProjection(memory, sagas=SAGAS, batch_size=batch, stuck_after=None)
    assert fast.documents.beside_log and not plain.documents.beside_log
    i = 0
    while i < len(log):
        chunk = log[i : i + rng.randint(1, 40)]
        i += len(chunk)
        for store in (sqlite, memory):
            store.append(chunk)
        if rng.random() < 0.3:  # another process's projection object takes over
            fast = SagaProjection(sqlite, sagas=SAGAS, batch_size=batch, stuck_after=None)
        fast.update()
        plain.update()
        # the log grows past what is folded: a timeline read from the log keeps only what was folded
        ahead = log[i : i + 5]
        i += len(ahead)
        for store in (sqlite, memory):
            store.append(ahead)
        assert shown(fast) == shown(plain)
    fast.update()
    plain.update()
    incremental = shown(fast)
    assert incremental == shown(plain) and len(incremental) == 15
    assert fast.replay() == len(log)
    assert shown(fast) == incremental
    sqlite.close()


def test_an_event_whose_saga_id_is_not_text_is_copied_and_merged_into_the_timeline(tmp_path: Path) -> None:
    path = tmp_path / "p.db"
    store = open_store(f"sqlite:///{path}?durability=normal")
    log = finished_log(2, seed=5)
    store.append(log[:3])
    conn = sqlite3.connect(path, isolation_level=None)
    conn.execute("INSERT INTO choreo_log (event_id, type, version, saga_id, service, occurred_at, payload) "
                 "VALUES ('odd-1', 'Whatever', 1, X'0102', 'x', '2026-01-01T00:00:00+00:00', '{}')")
    conn.close()
    store.append(log[3:])
    projection = SagaProjection(store, sagas=SAGAS, batch_size=4, stuck_after=None)
    projection.update()
    key = repr(b"\x01\x02")
    odd = projection.get(key)
    assert odd is not None and [e["event_id"] for e in odd["timeline"]] == ["odd-1"]
    assert stored_timeline(projection.documents, key) == projection.documents.entries(key)  # the one copy
    incremental = shown(projection)
    projection.replay()
    assert shown(projection) == incremental and key in incremental
    for saga_id in {e.saga_id for e in log}:  # the others are read from the log, nothing copied
        assert projection.documents.entries(saga_id) == []
        assert [e["event_id"] for e in projection.get(saga_id)["timeline"]] == [  # type: ignore[index]
            e.event_id for e in log if e.saga_id == saga_id]
    store.close()


def test_a_rebuild_that_loses_its_race_to_another_writer_is_discarded_whole(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path}/p.db?durability=normal"
    store = open_store(url)
    log = finished_log(10, seed=2)
    store.append(log)
    mine = SagaProjection(store, sagas=SAGAS, batch_size=7, stuck_after=None)
    other = SagaProjection(open_store(url), sagas=SAGAS, batch_size=50, stuck_after=None)
    written = []
    put = mine.documents.put

    def racing_put(*args, **kwargs):  # type: ignore[no-untyped-def]
        if len(written) == 2:  # the other writer commits while this one has batches in flight
            other.update()
        written.append(1)
        return put(*args, **kwargs)

    mine.documents.put = racing_put  # type: ignore[method-assign]
    read = mine.replay()
    assert 0 < read < len(log)  # its batches after the race were refused: the other writer had folded them
    reference = SagaProjection(InMemoryStore(), sagas=SAGAS, stuck_after=None)
    reference.store.append(log)  # type: ignore[attr-defined]
    reference.update()
    assert shown(mine) == shown(reference)
    store.close()


@pytest.mark.parametrize("workers", [2, 3])
def test_a_rebuild_in_several_processes_equals_the_incremental_one(tmp_path: Path, workers: int) -> None:
    path = tmp_path / "p.db"
    store = open_store(f"sqlite:///{path}?durability=normal")
    log = finished_log(20, seed=7)
    store.append(log[:40])
    conn = sqlite3.connect(path, isolation_level=None)  # rows the partitions must route alike: no saga id,
    for saga_id in ("NULL", "''", "X'0102'", "'b''\\x01\\x02'''"):  # a BLOB id and the text naming it
        conn.execute("INSERT INTO choreo_log (event_id, type, version, saga_id, service, occurred_at, payload) "
                     f"VALUES ('{uuid4()}', 'Whatever', 1, {saga_id}, 'x', '2026-01-01T00:00:00+00:00', '{{}}')")
    conn.close()
    store.append(log[40:])
    incremental = SagaProjection(store, sagas=SAGAS, batch_size=6, stuck_after=None, workers=1)
    while incremental.update():
        pass
    expected, counts = shown(incremental), incremental.counts()
    assert repr(b"\x01\x02") in expected and counts["events_without_saga_id"] == 2
    parallel = SagaProjection(store, sagas=SAGAS, batch_size=6, stuck_after=None, workers=workers)
    assert parallel.replay() == len(log) + 4
    assert shown(parallel) == expected and parallel.counts() == counts
    assert parallel.documents.position() == store.last_position()  # type: ignore[attr-defined]
    store.append(finished_log(2, seed=8))  # and it goes on incrementally
    parallel.update()
    incremental.update()
    assert shown(parallel) == shown(incremental)
    store.close()


def test_choreo_replay_folds_in_the_processes_it_is_given(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from choreo.cli import main

    url = f"sqlite:///{tmp_path}/p.db?durability=normal"
    with open_store(url) as store:
        store.append(finished_log(6, seed=9))
    assert main(["replay", "--workers", "2", "--store", url, "--system", "services:system"]) == 0
    assert "into 6 sagas" in capsys.readouterr().out
    with open_store(url) as store:
        parallel = shown(SagaProjection(store, sagas=SAGAS, stuck_after=None, read_only=True))
        fresh = SagaProjection(store, sagas=SAGAS, stuck_after=None)
        fresh.replay()
        assert shown(fresh) == parallel
