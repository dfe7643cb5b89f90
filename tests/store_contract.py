"""The contract every event store must meet; subclassed once per store."""

from __future__ import annotations

import threading
import time
from dataclasses import replace
from datetime import datetime, timezone
from uuid import uuid4

import pytest
from eventsourcing.persistence import StoredEvent

from choreo import ConcurrencyConflict, Envelope, EventStore
from choreo.errors import EventIdTaken
from choreo.store import DeadLetter, LogStore, advance

T0 = datetime(2026, 1, 1, tzinfo=timezone.utc)


def envelope(saga: str = "s1", type_: str = "Thing", payload: str = "{}") -> Envelope:
    return Envelope(
        event_id=str(uuid4()), type=type_, version=1, saga_id=saga, causation_id=None,
        service="svc", step=None, outcome=None, occurred_at=T0, payload=payload,
    )


def stored(agg: object, version: int) -> StoredEvent:
    return StoredEvent(originator_id=agg, originator_version=version, topic="t:T", state=b"{}")  # type: ignore[arg-type]


def read_all(store: EventStore) -> list[Envelope]:
    return [e for batch in store.scan() for e in batch]


def bare(e: Envelope) -> Envelope:
    return replace(e, position=None, source="log")


class EventStoreContract:
    """What every log meets: SQLite, memory and Kafka."""

    __test__ = False

    def make_store(self) -> EventStore:
        raise NotImplementedError

    @pytest.fixture
    def store(self) -> EventStore:  # type: ignore[misc]
        s = self.make_store()
        yield s
        s.close()

    def test_events_are_read_back_once_each_in_order_per_saga(self, store: EventStore) -> None:
        sent = [envelope(saga=f"s{i % 3}", payload=f'{{"n":{i}}}') for i in range(12)]
        store.append(sent[:5])
        store.append(sent[5:])
        got = read_all(store)
        assert sorted(map(bare, got), key=repr) == sorted(sent, key=repr)  # every field round-trips
        for saga in ("s0", "s1", "s2"):
            assert [e.event_id for e in got if e.saga_id == saga] == [e.event_id for e in sent if e.saga_id == saga]
        positions = [(e.source, e.position) for e in got]
        assert len(set(positions)) == len(got) and all(p and p > 0 for _, p in positions)

    def test_a_feed_starts_after_its_tracking(self, store: EventStore) -> None:
        store.append([envelope(saga=f"s{i % 4}") for i in range(10)])
        everything = read_all(store)
        done = everything[:4]
        feed = store.feed("reader", lambda: advance(done), group=False)
        rest: list[Envelope] = []
        while got := feed.poll(100, store.idle_timeout):
            rest += got
        feed.close()
        assert sorted(e.event_id for e in rest) == sorted(e.event_id for e in everything[4:])

    def test_poll_waits_for_new_events(self, store: EventStore) -> None:
        store.append([envelope()])
        feed = store.feed("reader", dict, group=False)
        first: list[Envelope] = []
        while not first:
            first = feed.poll(10, 1.0)
        assert feed.poll(10, 0.05) == []
        threading.Timer(0.1, lambda: store.append([envelope()])).start()
        started = time.monotonic()
        got: list[Envelope] = []
        while not got and time.monotonic() - started < 5.0:
            got = feed.poll(10, 5.0)
        feed.close()
        assert len(got) == 1 and got[0].event_id != first[0].event_id

    def test_commit_writes_events_emitted_and_tracking_together(self, store: EventStore) -> None:
        svc = store.service("alpha")
        agg = uuid4()
        e = envelope()
        svc.commit(events=[stored(agg, 1), stored(agg, 2)], emitted=[e], tracking={"log": 1})
        assert [s.originator_version for s in svc.load(agg)] == [1, 2]
        assert svc.tracking() == {"log": 1}
        assert [x.event_id for x in read_all(store)] == [e.event_id]

    def test_commit_conflict_writes_nothing(self, store: EventStore) -> None:
        svc = store.service("alpha")
        agg = uuid4()
        svc.commit(events=[stored(agg, 1)], emitted=[], tracking={"log": 1})
        with pytest.raises(ConcurrencyConflict):
            svc.commit(events=[stored(uuid4(), 1), stored(agg, 1)], emitted=[envelope()], tracking={"log": 2})
        assert svc.tracking() == {"log": 1}
        assert read_all(store) == []
        assert len(svc.load(agg)) == 1

    def test_a_snapshot_is_committed_with_the_events_and_loads_with_those_after_it(self, store: EventStore) -> None:
        svc = store.service("alpha")
        agg, other = uuid4(), uuid4()
        assert svc.load_latest(agg) == (None, [])
        svc.commit(events=[stored(agg, 1), stored(agg, 2)], emitted=[], tracking={"log": 1})
        assert svc.load_latest(agg) == (None, svc.load(agg))  # no snapshot: every event
        snap = StoredEvent(originator_id=agg, originator_version=3, topic="t:S", state=b'{"n": 3}')
        svc.commit(events=[stored(agg, 3), stored(agg, 4), stored(other, 1)], emitted=[], tracking={"log": 2},
                   snapshots=[snap])
        snapshot, after = svc.load_latest(agg)
        assert snapshot is not None and (snapshot.originator_id, snapshot.originator_version, snapshot.topic,
                                         bytes(snapshot.state)) == (agg, 3, "t:S", b'{"n": 3}')
        assert [e.originator_version for e in after] == [4]
        assert svc.load_latest(other) == (None, svc.load(other))
        assert [e.originator_version for e in svc.load(agg)] == [1, 2, 3, 4]  # the events all stay
        newer = replace(snap, originator_version=4, state=b'{"n": 4}')
        svc.commit(events=[], emitted=[], tracking={"log": 3}, snapshots=[newer])
        svc.commit(events=[], emitted=[], tracking={"log": 4}, snapshots=[snap])  # an older one is ignored
        snapshot, after = svc.load_latest(agg)
        assert snapshot is not None and snapshot.originator_version == 4 and after == []

    def test_a_snapshot_is_not_written_when_its_commit_fails(self, store: EventStore) -> None:
        svc = store.service("alpha")
        agg = uuid4()
        svc.commit(events=[stored(agg, 1)], emitted=[], tracking={"log": 1})
        snap = StoredEvent(originator_id=agg, originator_version=2, topic="t:S", state=b"{}")
        with pytest.raises(ConcurrencyConflict):
            svc.commit(events=[stored(agg, 2), stored(agg, 1)], emitted=[], tracking={"log": 2}, snapshots=[snap])
        assert svc.load_latest(agg) == (None, svc.load(agg))

    def test_tracking_moves_forward_per_source(self, store: EventStore) -> None:
        svc = store.service("alpha")
        svc.commit(events=[], emitted=[], tracking={"t:0": 5, "t:1": 2})
        with pytest.raises(ConcurrencyConflict):
            svc.commit(events=[], emitted=[envelope()], tracking={"t:1": 3, "t:0": 5})
        assert read_all(store) == [] and svc.tracking() == {"t:0": 5, "t:1": 2}
        svc.commit(events=[], emitted=[], tracking={"t:1": 3})
        assert svc.tracking() == {"t:0": 5, "t:1": 3}

    def test_services_have_separate_tracking(self, store: EventStore) -> None:
        store.service("alpha").commit(events=[], emitted=[], tracking={"log": 3})
        assert store.service("beta").tracking() == {}

    def test_read_models_track_each_source(self, store: EventStore) -> None:
        docs = store.documents("model")
        docs.put({"a": {"n": 1}}, tracking={"t:0": 4})
        with pytest.raises(ConcurrencyConflict):
            docs.put({"a": {"n": 2}}, tracking={"t:0": 4})
        assert docs.get("a") == {"n": 1} and docs.tracking() == {"t:0": 4}
        assert docs.get_many(["a", "missing"]) == {"a": {"n": 1}}
        docs.clear()
        assert docs.get("a") is None and docs.tracking() == {}

    def test_read_model_entries_are_appended_in_order_with_the_documents(self, store: EventStore) -> None:
        docs = store.documents("model")
        docs.put({"a": {"n": 1}}, tracking={"log": 1}, appended={"a": [{"i": 1}, {"i": 2}], "b": [{"i": 9}]})
        docs.put({"a": {"n": 2}}, tracking={"log": 2}, appended={"a": [{"i": 3}]})
        with pytest.raises(ConcurrencyConflict):  # nothing of a batch that conflicts is written
            docs.put({"a": {"n": 3}}, tracking={"log": 2}, appended={"a": [{"i": 4}]})
        assert docs.entries("a") == [{"i": 1}, {"i": 2}, {"i": 3}] and docs.entries("b") == [{"i": 9}]
        assert docs.entries("missing") == [] and docs.get("a") == {"n": 2}
        docs.clear()
        assert docs.entries("a") == []

    def test_a_read_model_batch_commits_only_on_the_tracking_it_started_from(self, store: EventStore) -> None:
        docs = store.documents("model")
        docs.put({"a": {"n": 1}}, tracking={"log": 2}, appended={"a": [1, 2]}, expected={})
        # another writer's batch began before that commit: it overlaps, moves forward, and is refused
        with pytest.raises(ConcurrencyConflict):
            docs.put({"a": {"n": 9}}, tracking={"log": 5}, appended={"a": [1, 2, 3, 4, 5]}, expected={})
        with pytest.raises(ConcurrencyConflict):
            docs.put({"b": {"n": 9}}, tracking={"log": 5}, expected={"log": 1})
        assert docs.get("a") == {"n": 1} and docs.get("b") is None
        assert docs.entries("a") == [1, 2] and docs.tracking() == {"log": 2}
        docs.put({"a": {"n": 2}}, tracking={"log": 5}, appended={"a": [3, 4, 5]}, expected={"log": 2})
        assert docs.entries("a") == [1, 2, 3, 4, 5] and docs.tracking() == {"log": 5}

    def test_a_read_model_batch_commits_only_on_the_metadata_it_was_folded_under(self, store: EventStore) -> None:
        docs = store.documents("model")
        docs.put({"a": {"n": 1}}, tracking={"log": 1})
        docs.clear(meta={"catalog": "x", "fold": 2})
        assert docs.meta() == {"catalog": "x", "fold": 2}
        assert docs.get("a") is None and docs.tracking() == {} and docs.entries("a") == []
        with pytest.raises(ConcurrencyConflict):
            docs.put({"a": {"n": 2}}, tracking={"log": 1}, expected={}, expected_meta={"catalog": "y"})
        assert docs.get("a") is None and docs.tracking() == {}
        docs.put({"a": {"n": 3}}, tracking={"log": 1}, expected={}, expected_meta={"catalog": "x"})
        assert docs.get("a") == {"n": 3} and docs.meta() == {"catalog": "x", "fold": 2}
        docs.clear()
        assert docs.meta() == {}

    def test_a_read_model_document_may_be_given_as_its_json(self, store: EventStore) -> None:
        docs = store.documents("model")
        docs.put({"a": b'{"n":1,"t":"\xc3\xa9"}', "b": {"n": 2}}, tracking={"log": 1})
        assert docs.get("a") == {"n": 1, "t": "\u00e9"} and docs.get_many(["a", "b"]) == {"a": {"n": 1, "t": "\u00e9"}, "b": {"n": 2}}
        assert sorted(d["n"] for d in docs.scan()) == [1, 2]

    def test_a_read_model_beside_the_log_reads_a_sagas_rows_from_it(self, store: EventStore) -> None:
        docs = store.documents("model")
        if not docs.beside_log:
            assert docs.log_rows("s") is None
            return
        store.append([envelope(saga="s"), envelope(saga="t"), envelope(saga="s")])
        rows = docs.log_rows("s")
        logged = [e for batch in store.scan() for e in batch if e.saga_id == "s"]
        assert rows is not None and [(r[0], r[1], r[4]) for r in rows] == [(e.position, e.event_id, "s") for e in logged]
        assert docs.log_rows("missing") == []

    def test_a_read_model_never_written_reads_as_empty(self, store: EventStore) -> None:
        docs = store.documents("never")
        assert docs.get("a") is None and docs.get_many(["a"]) == {} and docs.entries("a") == []
        assert list(docs.scan()) == [] and docs.tracking() == {} and docs.meta() == {}

    def test_scan_yields_every_document_whatever_its_key(self, store: EventStore) -> None:
        docs = store.documents("model")
        keys = ["", " ", "a", "b" * 300, "\u00e9t\u00e9"] + [f"k{i:04}" for i in range(1100)]
        docs.put({k: {"k": k} for k in keys}, tracking={"log": 1})
        assert sorted(d["k"] for d in docs.scan()) == sorted(keys)

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


class LogStoreContract(EventStoreContract):
    """What a log with one global order adds (SQLite, memory)."""

    def test_append_assigns_increasing_positions(self, store: LogStore) -> None:  # type: ignore[override]
        assert store.last_position() == 0
        positions = store.append([envelope(), envelope()]) + store.append([envelope()])
        assert positions == sorted(positions) and len(set(positions)) == 3
        assert [e.position for e in store.read(0)] == positions
        assert store.last_position() == positions[-1]

    def test_read_after_and_limit(self, store: LogStore) -> None:  # type: ignore[override]
        store.append([envelope(payload=f'{{"n": {i}}}') for i in range(10)])
        first = store.read(0, 4)
        rest = store.read(first[-1].position or 0, 100)
        assert len(first) == 4 and len(rest) == 6
        assert [e.payload for e in first + rest] == [f'{{"n": {i}}}' for i in range(10)]

    def test_duplicate_event_id_is_rejected_and_nothing_written(self, store: LogStore) -> None:  # type: ignore[override]
        e = envelope()
        store.append([e])
        with pytest.raises(ConcurrencyConflict):
            store.append([envelope(), e])
        assert len(store.read(0)) == 1

    def test_an_emitted_id_in_the_log_is_taken_not_a_conflict(self, store: LogStore) -> None:  # type: ignore[override]
        svc = store.service("alpha")
        first = envelope()
        store.append([first])
        agg = uuid4()
        with pytest.raises(EventIdTaken, match=first.event_id):
            svc.commit(events=[stored(agg, 1)], emitted=[envelope(), replace(first, saga_id="other")],
                       tracking={"log": 1})
        twice = envelope()
        with pytest.raises(EventIdTaken, match=twice.event_id):
            svc.commit(events=[], emitted=[twice, twice], tracking={"log": 1})
        assert [e.event_id for e in store.read(0)] == [first.event_id]  # nothing of either batch was written
        assert svc.tracking() == {} and svc.load(agg) == []
        with pytest.raises(ConcurrencyConflict):  # a second start of the same saga stays a conflict
            store.append([first])

    def test_read_leaves_out_what_the_reader_does_not_want(self, store: LogStore) -> None:  # type: ignore[override]
        from choreo.store import Interest

        store.append([envelope(type_="A"), envelope(type_="B"), envelope(type_="Odd"),
                      replace(envelope(type_="B"), outcome="failed")])
        wants = Interest(types=frozenset({"A"}), failures=True, known=frozenset({"A", "B"}))
        assert [(e.type, e.outcome) for e in store.read(0, 10, interest=wants)] == [
            ("A", None), ("Odd", None), ("B", "failed")]
        assert [e.type for e in store.read(0, 10, upto=2)] == ["A", "B"]
        feed = store.feed("reader", dict, interest=Interest(types=frozenset({"A"})))
        assert [e.type for e in feed.poll(10)] == ["A"] and feed.poll(10) == []
        store.append([envelope(type_="B"), envelope(type_="A")])
        assert [e.position for e in feed.poll(10)] == [6]  # it skipped what it looked at before

    def test_rows_are_the_envelopes_as_plain_tuples(self, store: LogStore) -> None:  # type: ignore[override]
        from choreo.store import ROW_FIELDS, row_of

        store.append([envelope(payload=f'{{"n": {i}}}') for i in range(5)])
        assert store.read_rows(1, 3) == [row_of(e) for e in store.read(1, 3)]
        assert len(ROW_FIELDS) == len(store.read_rows(0, 1)[0])
        feed = store.feed("rows", dict)
        rows = feed.poll_rows(3) + feed.poll_rows(10)
        assert [r[0] for r in rows] == [e.position for e in store.read(0)] and feed.poll_rows(10) == []
