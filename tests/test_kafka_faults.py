"""Kafka faults, through a real broker (tansu): oversized events, failed sends, a broker that lost its data."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from datetime import datetime, timezone
from pathlib import Path
from typing import Any
from uuid import uuid4

import pytest
from kafka import KafkaProducer, TopicPartition
from kafka.errors import KafkaTimeoutError
from kafka.producer.future import FutureProduceResult, FutureRecordMetadata

from choreo import Context, Envelope, Event, Processor, SagaProjection, Service, StoreError, open_store
from choreo.stores._kafka_relay import UNPUBLISHED
from choreo.errors import EventTooLarge, LogRewound
from choreo.events import encode_payload
from choreo.stores.kafka import KafkaStore, encode_record, record_size
from choreo.runner import run_processor
from choreo.tansu import TansuBroker

T0 = datetime(2026, 1, 1, tzinfo=timezone.utc)


class FaultPing(Event):
    """Asks the echo service for a pong (or, with `blob`, for a blob of that many characters)."""

    n: int
    blob: int = 0


class FaultPong(Event):
    """The echo service's answer to a ping."""

    n: int


class FaultBlob(Event):
    """An answer as large as the ping asked."""

    data: str


echo = Service("echo")


@echo.on(FaultPing)
def answer(ping: FaultPing, ctx: Context) -> Event:
    return FaultBlob(data="x" * ping.blob) if ping.blob else FaultPong(n=ping.n)


def envelope(event: Event, saga_id: str, *, service: str = "test") -> Envelope:
    return Envelope(
        event_id=str(uuid4()), type=event.event_type, version=1, saga_id=saga_id, causation_id=None,
        service=service, step=None, outcome=None, occurred_at=T0, payload=encode_payload(event),
    )


def kafka(url: str, **options: Any) -> KafkaStore:
    store = open_store(url, **options)
    assert isinstance(store, KafkaStore)
    return store


def until(condition: Callable[[], bool], step: Callable[[], object], timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        step()


def everything(store: KafkaStore) -> list[Envelope]:
    return [e for batch in store.scan() for e in batch]


def raises_within(call: Callable[[], object], timeout: float = 30.0) -> BaseException:
    """Call `call` until it raises; return what it raised."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            call()
        except Exception as e:
            return e
    raise AssertionError(f"nothing was raised within {timeout}s")


def broker_url(broker: TansuBroker, tmp_path: Path, partitions: int = 2) -> str:
    return (f"kafka://{broker.bootstrap}?topic=faults&partitions={partitions}&state={tmp_path}/state"
            "&session_timeout_ms=3000&heartbeat_interval_ms=1000")


@pytest.fixture
def own_store(own_kafka_broker: TansuBroker, tmp_path: Path) -> Iterator[KafkaStore]:
    store = kafka(broker_url(own_kafka_broker, tmp_path))
    yield store
    store.close()


# -- oversized events -------------------------------------------------------------------------

def test_oversized_names_the_event_type_its_record_size_and_the_limit(kafka_url: str) -> None:
    store = kafka(kafka_url + "&max_event_bytes=3000")
    own = store.service("echo")
    assert own.oversized(envelope(FaultBlob(data="x" * 100), "s-1")) is None

    def blob(length: int) -> Envelope:
        return envelope(FaultBlob(data="x" * length), "s-1")

    base = record_size(*encode_record(blob(0)))
    at_limit = blob(3000 - base)  # each character of the data is one byte of the record
    assert record_size(*encode_record(at_limit)) == 3000
    assert own.oversized(at_limit) is None
    over = blob(3001 - base)
    reason = own.oversized(over)
    assert reason is not None
    assert "FaultBlob" in reason and "3001 bytes" in reason and "3000 bytes" in reason
    assert own.oversized(blob(100_000)) is not None
    store.close()


def test_the_default_limit_is_the_producers_max_request_size_less_a_batch_overhead(kafka_url: str) -> None:
    default = kafka(kafka_url)
    limit = default.settings.max_event_bytes
    assert 1_048_576 - 4096 < limit < 1_048_576
    overhead = 1_048_576 - limit
    default.close()
    small = kafka(kafka_url, producer={"max_request_size": 20_000})
    assert small.settings.max_event_bytes == 20_000 - overhead
    small.close()
    set_in_url = kafka(kafka_url + "&max_event_bytes=5000")
    assert set_in_url.settings.max_event_bytes == 5000
    set_in_url.close()


def test_an_event_within_the_limit_is_one_the_producer_takes(kafka_url: str) -> None:
    store = kafka(kafka_url, producer={"max_request_size": 4096})
    base = record_size(*encode_record(envelope(FaultBlob(data=""), "s-1")))
    largest = envelope(FaultBlob(data="é" * ((store.settings.max_event_bytes - base) // 2)), "s-1")
    assert store.oversized(largest) is None
    assert store.deliver([largest]).positions[0] is not None  # the producer and the broker take it
    too_large = envelope(FaultBlob(data="x" * 5000), "s-1")
    assert store.oversized(too_large) is not None
    with pytest.raises(EventTooLarge, match="FaultBlob"):
        store.append([too_large])
    store.close()


def test_a_handler_that_emits_an_oversized_event_parks_its_trigger_and_other_sagas_flow(kafka_url: str) -> None:
    store = kafka(kafka_url + "&max_event_bytes=4000")
    store.append([envelope(FaultPing(n=1, blob=10_000), "s-big"), envelope(FaultPing(n=2), "s-ok")])
    proc = Processor(echo, store)
    own = proc.own
    until(lambda: len(own.tracking()) == 2 and own.dead_letters() != [], lambda: proc.poll(0.5))
    parked = own.dead_letters()
    assert [(d.saga_id, d.type) for d in parked] == [("s-big", "FaultPing")]
    assert "FaultBlob" in parked[0].reason and "4000 bytes" in parked[0].reason
    assert own.dead_letters(UNPUBLISHED) == []  # nothing oversized reached the outbox
    assert own.pending() == 0  # type: ignore[attr-defined]
    published = everything(store)
    assert [e.saga_id for e in published if e.type == "FaultPong"] == ["s-ok"]  # the other saga flowed
    assert not any(e.type == "FaultBlob" for e in published)
    proc.close()
    store.close()


# -- the outbox relay ---------------------------------------------------------------------------

def test_an_event_kafka_refuses_is_set_aside_and_the_events_after_it_flow(kafka_url: str) -> None:
    store = kafka(kafka_url, producer={"max_request_size": 8192})
    own = store.service("echo")
    before, huge, after = (envelope(FaultPong(n=1), "s-1"), envelope(FaultBlob(data="x" * 20_000), "s-2"),
                           envelope(FaultPong(n=3), "s-3"))
    own.commit(events=[], emitted=[before, huge, after], tracking={})  # the relay publishes after the commit
    assert own.pending() == 0  # type: ignore[attr-defined]
    [letter] = own.dead_letters(UNPUBLISHED)
    assert letter.event_id == huge.event_id and letter.saga_id == "s-2" and letter.type == "FaultBlob"
    assert "MessageSizeTooLargeError" in letter.reason and "outbox" in letter.reason
    assert letter.envelope["payload"] == huge.payload  # nothing is lost: the event is kept with its reason
    assert own.dead_letters() == []  # not parked: it holds no saga back, and `dlq retry` cannot run it as input
    own._unsent = True  # type: ignore[attr-defined]
    own.flush()  # looks again: nothing is sent twice, the letter is not written twice
    sent = [e.event_id for e in everything(store)]
    assert sorted(sent) == sorted([before.event_id, after.event_id])
    assert len(own.dead_letters(UNPUBLISHED)) == 1
    store.close()


def test_a_failed_send_marks_what_the_broker_acknowledged_before_it(
    kafka_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = kafka(kafka_url)
    own = store.service("echo")
    events = [envelope(FaultPong(n=i), "s-1") for i in range(5)]
    producer = store.producer()
    real_send = producer.send

    def send(topic: str, **record: Any) -> Any:
        if b'"n": 2' in record["value"]:
            raise KafkaTimeoutError("the producer's buffer stayed full")
        return real_send(topic, **record)

    monkeypatch.setattr(producer, "send", send)
    own.commit(events=[], emitted=events, tracking={})  # durable; the relay's failure only delays publishing
    with pytest.raises(StoreError, match="did not take event FaultPong"):
        own.flush()
    assert own.pending() == 3  # type: ignore[attr-defined]
    monkeypatch.setattr(producer, "send", real_send)
    own.flush()
    assert own.pending() == 0  # type: ignore[attr-defined]
    sent = [e.event_id for e in everything(store)]
    assert sent == [e.event_id for e in events]  # each once, in order (one saga: one partition)
    store.close()


def test_what_the_broker_acknowledged_after_a_failed_record_is_not_sent_again(
    kafka_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = kafka(kafka_url)
    own = store.service("echo")
    events = [envelope(FaultPong(n=i), f"s-{i}") for i in range(5)]
    producer = store.producer()
    real_send = producer.send

    def send(topic: str, **record: Any) -> Any:
        if b'"n": 2' in record["value"]:  # this one fails once the others are under way
            return FutureRecordMetadata(FutureProduceResult(TopicPartition(topic, 0)), -1, None, None, -1, -1, -1) \
                .failure(KafkaTimeoutError("no acknowledgement in time"))
        return real_send(topic, **record)

    monkeypatch.setattr(producer, "send", send)
    own.commit(events=[], emitted=events, tracking={})  # durable; the relay's failure only delays publishing
    with pytest.raises(StoreError, match="no acknowledgement in time"):
        own.flush()
    assert own.pending() == 1  # type: ignore[attr-defined]
    monkeypatch.setattr(producer, "send", real_send)
    own.flush()
    assert own.pending() == 0  # type: ignore[attr-defined]
    sent = [e.event_id for e in everything(store)]
    assert sorted(sent) == sorted(e.event_id for e in events)  # each exactly once
    store.close()


# -- a partition that went backwards --------------------------------------------------------------

def partition_of(store: KafkaStore, saga_id: str) -> int:
    [p] = {int(e.source.rpartition(":")[2]) for e in everything(store) if e.saga_id == saga_id}
    return p


def test_a_service_whose_saved_position_is_past_a_partitions_end_stops_with_log_rewound(kafka_url: str) -> None:
    store = kafka(kafka_url)
    store.append([envelope(FaultPing(n=1), "s-1"), envelope(FaultPing(n=2), "s-1")])
    p = partition_of(store, "s-1")
    # as if the partition had lost 48 records
    store.service("echo").commit(events=[], emitted=[], tracking={f"{store.topic}:{p}": 50})
    proc = Processor(echo, store)
    errors: list[BaseException] = []
    stop = threading.Event()

    def run() -> None:
        try:
            run_processor(proc, stop, idle_wait=0.1)
        except BaseException as e:
            errors.append(e)

    runner = threading.Thread(target=run, daemon=True)
    runner.start()
    runner.join(30)
    stop.set()
    runner.join(5)
    assert errors and not runner.is_alive(), "the service went on: the rewound partition was not noticed"
    [error] = errors  # the runner retries only StoreError: this one stops the service
    assert isinstance(error, LogRewound)
    message = str(error)
    assert f"topic {store.topic!r} partition {p}" in message
    assert "ends at offset 2" in message and "saved position 50" in message
    assert "choreo run --reset-positions" in message and "Restore the broker's data" in message
    assert store.service("echo").tracking() == {f"{store.topic}:{p}": 50}  # nothing was skipped or handled
    proc.close()
    store.close()


def test_a_reader_without_a_group_raises_log_rewound_too(kafka_url: str) -> None:
    store = kafka(kafka_url)
    store.append([envelope(FaultPing(n=1), "s-1")])
    p = partition_of(store, "s-1")
    feed = store.feed("saga_projection", lambda: {f"{store.topic}:{p}": 9}, group=False)
    error = raises_within(lambda: feed.poll(100, 0.2))
    assert isinstance(error, LogRewound)
    assert f"partition {p} ends at offset 1, before the saved position 9" in str(error)
    assert "choreo replay" in str(error)
    feed.close()
    store.close()


def test_a_reader_at_the_end_of_a_partition_is_not_taken_for_rewound(kafka_url: str) -> None:
    store = kafka(kafka_url)
    batched = KafkaProducer(bootstrap_servers=store.settings.servers, linger_ms=200)
    events = [envelope(FaultPing(n=i), "s-1") for i in range(10)]
    for env in events:  # one record batch: tansu's ListOffsets then answers 1, not 10
        key, value, headers = encode_record(env)
        batched.send(store.topic, key=key, value=value, headers=headers)
    batched.flush()
    batched.close()
    p = partition_of(store, "s-1")
    at_end = {f"{store.topic}:{p}": 10}
    for group in (False, True):
        feed = store.feed(f"reader-{group}", lambda: at_end, group=group)
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            assert feed.poll(100, 0.2) == []
        store.append([envelope(FaultPing(n=10), "s-1")])
        got: list[Envelope] = []
        until(lambda: bool(got), lambda: got.extend(feed.poll(100, 0.2)))
        assert [e.position for e in got] == [at_end[f"{store.topic}:{p}"] + 1]
        at_end[f"{store.topic}:{p}"] += 1  # the next reader starts at the new end
        feed.close()
    store.close()


def test_a_failure_inside_the_rebalance_listener_surfaces_from_poll(kafka_url: str) -> None:
    store = kafka(kafka_url)
    store.append([envelope(FaultPing(n=1), "s-1"), envelope(FaultPing(n=2), "s-1")])
    p = partition_of(store, "s-1")
    broken = True

    def tracking() -> dict[str, int]:
        if broken:
            raise StoreError("the service's store is on a disk that went away")
        return {f"{store.topic}:{p}": 1}

    feed = store.feed("echo", tracking)
    error = raises_within(lambda: feed.poll(100, 0.2))
    assert isinstance(error, StoreError) and "disk that went away" in str(error)
    broken = False  # the next poll seeks where the listener could not
    got: list[Envelope] = []
    until(lambda: bool(got), lambda: got.extend(feed.poll(100, 0.2)))
    assert [e.position for e in got] == [2]
    feed.close()
    store.close()


def test_reset_positions_moves_back_only_the_partitions_that_end_before_the_saved_position(
    kafka_url: str,
) -> None:
    store = kafka(kafka_url)
    raw = KafkaProducer(bootstrap_servers=store.settings.servers)
    for partition, count in ((0, 3), (1, 1)):
        for i in range(count):
            key, value, headers = encode_record(envelope(FaultPing(n=i), f"s-{partition}"))
            raw.send(store.topic, key=key, value=value, headers=headers, partition=partition)
    raw.flush()
    raw.close()
    own = store.service("echo")
    topic = store.topic
    own.set_tracking({f"{topic}:0": 3, f"{topic}:1": 40, f"{topic}:2": 0})
    assert store.reset_positions("echo") == {f"{topic}:1": 0}
    assert own.tracking() == {f"{topic}:0": 3, f"{topic}:1": 0, f"{topic}:2": 0}
    assert store.reset_positions("echo") == {}
    store.close()


def test_the_producer_recovers_after_the_broker_restarted_empty(
    own_kafka_broker: TansuBroker, own_store: KafkaStore
) -> None:
    store = own_store
    store.append([envelope(FaultPing(n=1), "s-1")])
    own_kafka_broker.restart()
    later = envelope(FaultPing(n=2), "s-1")
    assert store.append([later]) == [1]  # the first record of the new broker's partition
    assert [e.event_id for e in everything(store)] == [later.event_id]


def test_after_the_broker_lost_its_data_a_service_stops_then_resumes_after_reset_positions(
    own_kafka_broker: TansuBroker, own_store: KafkaStore, tmp_path: Path
) -> None:
    store = own_store
    sagas = [f"s-{i}" for i in range(8)]
    store.append([envelope(FaultPing(n=i), s) for i, s in enumerate(sagas)])
    proc = Processor(echo, store)
    own = proc.own
    until(lambda: sum(own.tracking().values()) == len(sagas) and own.pending() == 0,  # type: ignore[attr-defined]
          lambda: proc.poll(0.5))
    saved = own.tracking()

    own_kafka_broker.restart()  # empty: every partition starts again at offset 0
    other = kafka(broker_url(own_kafka_broker, tmp_path / "other"))  # another service, on the new broker
    new = envelope(FaultPing(n=100), "s-new")
    other.append([new])

    error = raises_within(lambda: proc.poll(0.5), timeout=60)
    assert isinstance(error, LogRewound), error
    rewound = [s for s, position in saved.items() if f"partition {s.rpartition(':')[2]} " in str(error)]
    assert len(rewound) == 1
    assert f"saved position {saved[rewound[0]]}" in str(error) and "--reset-positions" in str(error)
    assert own.tracking() == saved  # nothing new was taken for handled
    proc.close()

    changed = store.reset_positions("echo")
    ends = {f"{store.topic}:{p}": end for p, end in other.partition_ends().items()}
    assert changed == {s: 0 for s, position in saved.items() if position > ends[s]} and changed
    again = Processor(echo, store)  # the same store: its producer met the fresh broker too
    until(lambda: own.tracking() != {**saved, **changed}, lambda: again.poll(0.5))
    pongs = [e for e in everything(other) if e.type == "FaultPong"]
    assert [(e.saga_id, e.causation_id) for e in pongs] == [("s-new", new.event_id)]
    assert own.pending() == 0  # type: ignore[attr-defined]
    again.close()
    other.close()


def test_after_the_broker_lost_its_data_the_saga_projection_raises_log_rewound(
    own_kafka_broker: TansuBroker, own_store: KafkaStore, tmp_path: Path
) -> None:
    store = own_store
    store.append([envelope(FaultPing(n=i), f"s-{i}") for i in range(6)])
    projection = SagaProjection(store)
    assert projection.update() == 6
    own_kafka_broker.restart()
    other = kafka(broker_url(own_kafka_broker, tmp_path / "other"))
    other.append([envelope(FaultPing(n=100), "s-new")])
    error = raises_within(projection.update, timeout=60)
    assert isinstance(error, LogRewound), error
    assert "partition" in str(error) and "choreo replay" in str(error)
    projection.close()
    other.close()


def test_a_broker_restart_keeps_the_topics_partitions(own_kafka_broker: TansuBroker, own_store: KafkaStore) -> None:
    store = own_store
    store.append([envelope(FaultPing(n=1), "s-1")])
    own_kafka_broker.restart()
    store.append([envelope(FaultPing(n=2), "s-2")])  # the producer recreates the topic
    assert len(store.partition_ends()) == store.settings.partitions
