"""The services on Kafka (a real broker: tansu): bad records, duplicates, the outbox, faults, other clients."""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from pathlib import Path
from uuid import uuid4

import pytest
from kafka import KafkaProducer

from choreo import Processor, StoreError, open_store
from choreo.stores.kafka import KafkaStore, decode_record, encode_record
from choreo.store import Interest
from choreo.tansu import free_port
from services import inventory
from services.contracts import OrderPlaced
from tests.test_processor import PLACED, stock, trigger


def kafka(url: str) -> KafkaStore:
    store = open_store(url)
    assert isinstance(store, KafkaStore)
    return store


def until(condition: Callable[[], bool], step: Callable[[], object], timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        step()


def test_records_that_are_not_envelopes_are_parked_with_their_offset(kafka_url: str) -> None:
    store = kafka(kafka_url)
    raw = KafkaProducer(bootstrap_servers=store.settings.servers)
    bad = [
        (b"s-garbage", b"\x00\xff not json"),
        (b"s-list", b"[1, 2]"),
        (b"s-short", b'{"type": "OrderPlaced"}'),
    ]
    for key, value in bad:
        raw.send(store.topic, key=key, value=value)
    raw.flush()
    raw.close()
    store.append([
        _with(trigger(), type="NoSuchEvent", saga_id="s-unknown"),
        _with(trigger(), payload='{"order_id": 5}', saga_id="s-invalid"),
        _with(trigger(), saga_id=""),
        _with(trigger(), saga_id="s-good"),
    ])
    proc = Processor(inventory.service, store)
    own = store.service("inventory")
    until(lambda: len(own.dead_letters()) == 6, lambda: proc.poll(0.5))
    parked = {d.saga_id or "(none)": d for d in own.dead_letters()}
    assert "not a choreo envelope" in parked["s-garbage"].reason and "offset" in parked["s-garbage"].reason
    assert "not an object" in parked["s-list"].reason and "missing field(s)" in parked["s-short"].reason
    assert "unknown event type 'NoSuchEvent'" in parked["s-unknown"].reason
    assert "OrderPlaced.order_id" in parked["s-invalid"].reason
    assert parked["(none)"].reason == "missing saga id"
    assert all(d.envelope["source"].startswith(store.topic + ":") for d in parked.values())
    until(lambda: stock(store) is not None, lambda: proc.poll(0.5))  # the good saga went on
    assert stock(store) == inventory.CATALOG["widget"] - PLACED.quantity
    proc.close()
    store.close()


def test_a_feed_skips_by_header_what_its_reader_does_not_want_and_decodes_the_rest(kafka_url: str) -> None:
    store = kafka(kafka_url)
    raw = KafkaProducer(bootstrap_servers=store.settings.servers)
    raw.send(store.topic, key=b"s-1", value=b"garbage", headers=[("choreo-type", b"ShipmentCreated")])
    raw.send(store.topic, key=b"s-2", value=b"garbage", headers=[("choreo-type", b"OrderPlaced")])
    raw.send(store.topic, key=b"s-3", value=b"garbage")
    raw.flush()
    raw.close()
    store.append([_with(trigger(), saga_id="s-4"), _with(trigger(), type="ShipmentCreated", saga_id="s-5")])
    feed = store.feed("reader", dict, group=False, interest=Interest(frozenset({"OrderPlaced"})))
    got: list = []  # type: ignore[type-arg]
    until(lambda: len(got) >= 3, lambda: got.extend(feed.poll(100, 0.5)))
    time.sleep(0.5)
    got += feed.poll(100, 0.5)
    assert sorted(e.saga_id for e in got) == ["s-2", "s-3", "s-4"]  # by header: s-1 and s-5 left out
    assert [e.saga_id for e in got if e.malformed] == ["s-2", "s-3"]  # decoded: so a service parks them
    feed.close()
    store.close()


def _with(env, **changes):  # type: ignore[no-untyped-def]
    from dataclasses import replace

    return replace(env, event_id=str(uuid4()), **changes)


def test_a_copy_of_an_event_is_handled_once(kafka_url: str) -> None:
    store = kafka(kafka_url)
    event = trigger()
    store.append([event])
    store.append([event])  # the relay sent it again after a crash before marking it sent
    proc = Processor(inventory.service, store)
    reads = 0

    def step() -> None:
        nonlocal reads
        reads += proc.poll(0.5)

    until(lambda: reads >= 2, step)
    assert stock(store) == inventory.CATALOG["widget"] - PLACED.quantity  # reserved once
    proc.close()
    store.close()


def test_a_crash_between_send_and_mark_sends_again_and_nothing_is_applied_twice(kafka_url: str) -> None:
    store = kafka(kafka_url)
    store.append([trigger()])
    proc = Processor(inventory.service, store)

    def crash(*args: object, **kwargs: object) -> None:
        raise KeyboardInterrupt("killed after the broker acknowledged, before the mark")

    proc.own.relay.put = crash  # type: ignore[attr-defined]
    with pytest.raises(KeyboardInterrupt):
        until(lambda: False, lambda: proc.poll(0.5))
    assert proc.own.pending() == 1  # type: ignore[attr-defined]
    proc.close()
    store.close()

    store = kafka(kafka_url)  # the restarted service sends its outbox again
    again = Processor(inventory.service, store)
    # it publishes the outbox of the partitions the group gives it
    until(lambda: again.own.pending() == 0, lambda: again.poll(0.1))  # type: ignore[attr-defined]
    reserved = [e for batch in store.scan() for e in batch if e.type == "ItemsReserved"]
    assert len(reserved) == 2 and reserved[0].event_id == reserved[1].event_id  # a copy, same id
    again.close()
    store.close()


def test_an_unreachable_broker_is_named_in_one_clear_error(tmp_path, caplog) -> None:  # type: ignore[no-untyped-def]
    address = f"127.0.0.1:{free_port()}"
    started = time.monotonic()
    with pytest.raises(StoreError, match=f"Kafka broker not reachable at {address}"):
        open_store(f"kafka://{address}?state={tmp_path}&request_timeout_ms=1000")
    with caplog.at_level(logging.WARNING, logger="choreo.stores.kafka"):
        with pytest.raises(StoreError, match="not reachable"):
            open_store(f"kafka://{address}?state={tmp_path}&request_timeout_ms=500&wait=1.5")
    assert any("waiting for Kafka at " + address in r.getMessage() for r in caplog.records)
    assert time.monotonic() - started < 30


def test_the_wire_format_is_plain_json_that_another_client_can_read(kafka_url: str) -> None:
    confluent_kafka = pytest.importorskip("confluent_kafka")
    store = kafka(kafka_url)
    env = trigger()
    store.append([env])
    consumer = confluent_kafka.Consumer({
        "bootstrap.servers": store.settings.servers, "group.id": f"other-{uuid4()}",
        "auto.offset.reset": "earliest", "enable.auto.commit": False,
    })
    partitions = range(store.settings.partitions)
    consumer.assign([confluent_kafka.TopicPartition(store.topic, p, 0) for p in partitions])
    msg = None
    deadline = time.monotonic() + 30
    while (msg is None or msg.error()) and time.monotonic() < deadline:
        msg = consumer.poll(0.5)
    consumer.close()
    assert msg is not None and not msg.error()
    value = json.loads(msg.value())
    assert msg.key() == env.saga_id.encode()
    assert value["type"] == "OrderPlaced" and value["saga_id"] == env.saga_id
    assert OrderPlaced.model_validate(value["payload"]) == PLACED
    assert dict(msg.headers())["choreo-type"] == b"OrderPlaced"
    store.close()


def test_encode_and_decode_round_trip() -> None:
    env = trigger()
    key, value, headers = encode_record(env)
    back = decode_record(key, value, "t", 3, 41)
    assert back == _same(env, position=42, source="t:3") and back.malformed is None
    assert ("choreo-event-id", env.event_id.encode()) in headers


def _same(env, **changes):  # type: ignore[no-untyped-def]
    from dataclasses import replace

    return replace(env, **changes)


def test_a_read_only_kafka_store_creates_no_topic_folder_or_file(kafka_url: str, tmp_path: Path) -> None:
    from choreo.errors import StoreNotFound

    state = tmp_path / "state"
    with pytest.raises(StoreNotFound, match="no Kafka topic"):
        open_store(kafka_url, create=False)
    assert not state.exists()
    open_store(kafka_url).close()  # a writer creates the topic (and the state folder)
    reader = open_store(kafka_url, create=False)
    try:
        with pytest.raises(StoreNotFound, match="no service 'payment'"):
            reader.service("payment")
        assert list(reader.documents("sagas").scan()) == [] and reader.documents("sagas").tracking() == {}
    finally:
        reader.close()
    assert sorted(p.name for p in state.iterdir()) == []  # no service or read-model file was made
