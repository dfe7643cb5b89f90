"""Upcasters: old events decode as the current schema everywhere, and bad chains fail at wiring time.

The end-to-end tests write a log of version-1 events the way old code did (plain SQL on
SQLite and PostgreSQL, raw records on Kafka), let the old code's bank charge two orders in
a process of its own (so its record of the completed step holds a v1 event), then run the
current code over it: one saga started under v1 completes under v2, one compensates (the bank's
compensation gets the v1 completion as the renamed v2 event), a split event reaches its
two handlers, and an event its upcaster cannot read is parked with the upcaster's error.
"""

from __future__ import annotations

import json
import sqlite3
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from datetime import datetime, timezone
from decimal import Decimal
from pathlib import Path
from typing import Any, ClassVar
from uuid import uuid4

import pytest

from choreo import Envelope, Event, Runner, SagaProjection, UpcastError, WiringError, open_store, upcaster
from choreo.events import UPCASTERS, decode_payload
from choreo.upcasting import _checked, check_upcasters, upcast_envelope
from tests.evolution import v2

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
def registry() -> Iterator[None]:
    """Upcasters registered in a test are gone after it (the registry is global)."""
    saved = dict(UPCASTERS)
    UPCASTERS.clear()
    _checked.clear()
    yield
    UPCASTERS.clear()
    UPCASTERS.update(saved)
    _checked.clear()


@pytest.fixture
def v1_to_v2(registry: None) -> None:
    v2.register_upcasters()
    v2.received.clear()


# -- wiring --------------------------------------------------------------------------------
class Widget(Event):
    event_type: ClassVar[str] = "evo.Widget"
    schema_version: ClassVar[int] = 3
    name: str


def test_two_upcasters_for_one_version_are_refused(registry: None) -> None:
    upcaster("evo.Widget", from_version=1)(lambda p: p)
    with pytest.raises(WiringError, match=r"two upcasters for 'evo.Widget' v1"):
        @upcaster("evo.Widget", from_version=1)
        def again(p: dict[str, Any]) -> dict[str, Any]:
            return p


def test_an_upcaster_past_the_current_version_is_refused(registry: None) -> None:
    with pytest.raises(WiringError, match=r"'evo.Widget' v3 into v4, above the current schema version of 'evo.Widget' \(v3\)"):
        upcaster("evo.Widget", from_version=3)(lambda p: p)
    assert ("evo.Widget", 3) not in UPCASTERS  # refused: not registered


@pytest.mark.parametrize("versions, message", [
    ((1,), r"gap in the upcasters of 'evo.Widget': they reach v2, but the current schema version is v3"),
    ((2,), None),
    ((1, 2), None),
])
def test_a_chain_must_reach_the_current_version(registry: None, versions: tuple[int, ...], message: str | None) -> None:
    for v in versions:
        upcaster("evo.Widget", from_version=v)(lambda p: p)
    if message is None:
        check_upcasters()
    else:
        with pytest.raises(WiringError, match=message):
            check_upcasters()


def test_a_gap_inside_a_chain_is_refused(registry: None) -> None:
    class Gadget(Event):
        event_type: ClassVar[str] = "evo.Gadget"
        schema_version: ClassVar[int] = 4

    upcaster("evo.Gadget", from_version=1)(lambda p: p)
    upcaster("evo.Gadget", from_version=3)(lambda p: p)
    with pytest.raises(WiringError, match=r"gap in the upcasters of 'evo.Gadget': v1 has one and v3 has one, but v2 has none"):
        check_upcasters()


def test_renames_must_lead_to_an_event_class(registry: None) -> None:
    upcaster("evo.Gone", from_version=1)(lambda p: p)
    with pytest.raises(WiringError, match=r"no event class has type 'evo.Gone'"):
        check_upcasters()
    UPCASTERS.clear()
    upcaster("evo.Old", from_version=1, to="evo.Nowhere")(lambda p: p)
    with pytest.raises(WiringError, match=r"reach 'evo.Nowhere' v1 \(reached from 'evo.Old' v1\), but no event class"):
        check_upcasters()
    UPCASTERS.clear()
    upcaster("evo.Old", from_version=1, to=("evo.Widget", 5))(lambda p: p)
    with pytest.raises(WiringError, match=r"'evo.Widget' v5 \(reached from 'evo.Old' v1\), above its current schema version v3"):
        check_upcasters()
    UPCASTERS.clear()
    upcaster("evo.A", from_version=1, to="evo.B")(lambda p: p)
    upcaster("evo.B", from_version=1, to="evo.A")(lambda p: p)
    with pytest.raises(WiringError, match=r"loop"):
        check_upcasters()


def test_a_service_refuses_to_start_with_a_broken_chain(registry: None) -> None:
    upcaster("evo.Widget", from_version=1)(lambda p: p)  # v2 -> v3 is missing
    with pytest.raises(WiringError, match="evo.Widget"):
        Runner(v2.system, open_store("memory://"))


@pytest.mark.parametrize("kwargs, message", [
    (dict(from_version=0), "from_version must be a positive int"),
    (dict(from_version=1, to=[]), "`to` is an empty list"),
    (dict(from_version=1, to=[3]), "each target must be a type name"),
])
def test_bad_declarations_are_refused(registry: None, kwargs: dict[str, Any], message: str) -> None:
    with pytest.raises(WiringError, match=message):
        upcaster("evo.Widget", **kwargs)


# -- decoding ------------------------------------------------------------------------------
def test_a_payload_is_upcast_wherever_it_is_decoded(v1_to_v2: None) -> None:
    opened = decode_payload("evo.OrderOpened", 1, '{"order_id": "o", "amount_cents": 1250}')
    assert opened == v2.OrderOpened(order_id="o", amount=Decimal("12.5"), currency="EUR")
    taken = decode_payload("evo.PaymentTaken", 1, '{"order_id": "o", "cents": 99}')
    assert taken == v2.PaymentCaptured(order_id="o", amount=Decimal("0.99"))
    with pytest.raises(UpcastError, match=r"cents_to_amount of 'evo.OrderOpened' v1 raised KeyError"):
        decode_payload("evo.OrderOpened", 1, '{"order_id": "o"}')


def test_a_split_event_becomes_several_envelopes_the_first_keeping_id_step_and_outcome(v1_to_v2: None) -> None:
    env = Envelope(event_id="e-1", type="evo.CustomerNoted", version=1, saga_id="s", causation_id=None,
                   service="crm", step="note", outcome="completed", occurred_at=datetime.now(timezone.utc),
                   payload='{"note": "hi", "tag": "vip"}', position=7)
    first, second = upcast_envelope(env)
    assert (first.event_id, first.type, first.step, first.outcome, first.position) == \
        ("e-1", "evo.NoteAdded", "note", "completed", 7)
    assert (second.type, second.step, second.outcome, second.position) == ("evo.TagAdded", None, None, 7)
    assert second.event_id != "e-1" and upcast_envelope(env)[1].event_id == second.event_id  # stable
    assert first.decode() == v2.NoteAdded(text="hi") and second.decode() == v2.TagAdded(tag="vip")


# -- a log written by the old code, run by the current code ------------------------------------
def v1_event(saga_id: str, type: str, payload: dict[str, Any]) -> dict[str, Any]:
    """A version-1 event as the old code wrote it."""
    return dict(event_id=str(uuid4()), type=type, version=1, saga_id=saga_id, causation_id=None, service="shop",
                step=None, outcome=None, occurred_at=datetime.now(timezone.utc).isoformat(), payload=payload)


ORDERS = [v1_event("s-ok", "evo.OrderOpened", {"order_id": "ok", "amount_cents": 1250}),
          v1_event("s-short", "evo.OrderOpened", {"order_id": "short", "amount_cents": 990})]
LATER = [v1_event("s-note", "evo.CustomerNoted", {"note": "hi", "tag": "vip"}),
         v1_event("s-bad", "evo.OrderOpened", {"order_id": "bad"})]  # no amount_cents: its upcaster fails


def run_old_bank(url: str) -> None:
    """The v1 bank charges both orders in a process of its own (its record of the step holds v1 events)."""
    done = subprocess.run([sys.executable, "-m", "tests.evolution.v1", url, "2"], cwd=ROOT, capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split()[-1] == "2", done.stdout


def check_current_code_over(url: str, write: Callable[[list[dict[str, Any]]], None]) -> None:
    write(ORDERS)
    run_old_bank(url)
    write(LATER)
    store = open_store(url)
    runner = Runner(v2.system, store)
    projection = SagaProjection(store, sagas=[ORDER])
    states: dict[str, str] = {}
    acked = 0
    deadline = time.monotonic() + 120
    runner.start_threads()  # a thread per service: on Kafka, each consumer keeps its group membership
    try:
        while time.monotonic() < deadline and not (
                states.get("s-ok") == "completed" and states.get("s-short") == "failed" and acked == 2):
            time.sleep(0.3)
            projection.update()
            states = {s: doc["state"] for s in ("s-ok", "s-short") if (doc := projection.get(s))}
            acked = sum(e["type"] == "evo.Acked" for e in (projection.get("s-note") or {}).get("timeline", ()))
    finally:
        runner.stop()
    assert states == {"s-ok": "completed", "s-short": "failed"}

    # the saga that failed under v2 compensated the step completed under v1, with the renamed v2 event
    refunds = [e.decode() for e in log(store) if e.type == "evo.PaymentRefunded"]
    assert refunds == [v2.PaymentRefunded(order_id="short", amount=Decimal("9.9"))]
    assert v2.PaymentCaptured(order_id="short", amount=Decimal("9.9")) in v2.received  # what the refund got
    # the stock step got the v1 completion in the log as the renamed event
    assert v2.PaymentCaptured(order_id="ok", amount=Decimal("12.5")) in v2.received
    assert sorted(acks(store)) == ["note hi", "tag vip"]  # the split event reached both handlers
    timeline = [e["type"] for e in projection.get("s-short")["timeline"]]
    assert "evo.PaymentCaptured" in timeline and "evo.PaymentTaken" not in timeline

    # the event its upcaster cannot read is parked (by the bank, whose step it starts), with the reason
    parked = [d for d in store.service("bank").dead_letters() if d.saga_id == "s-bad"]
    assert len(parked) == 1 and "cents_to_amount of 'evo.OrderOpened' v1 raised KeyError" in parked[0].reason
    projection.close()
    store.close()


ORDER = v2.ORDER


def log(store: Any) -> list[Envelope]:
    return [e for batch in store.scan() for e in batch]


def acks(store: Any) -> list[str]:
    return [json.loads(e.payload)["what"] for e in log(store) if e.type == "evo.Acked"]


def test_sagas_started_under_v1_finish_and_compensate_under_v2_on_sqlite(v1_to_v2: None, tmp_path: Path) -> None:
    db = tmp_path / "log.db"
    url = f"sqlite:///{db}"
    open_store(url).close()  # the schema

    def write(events: list[dict[str, Any]]) -> None:
        with sqlite3.connect(db) as c:
            c.executemany(
                "INSERT INTO choreo_log (event_id, type, version, saga_id, causation_id, service, step, outcome, "
                "occurred_at, payload) VALUES (:event_id, :type, :version, :saga_id, :causation_id, :service, "
                ":step, :outcome, :occurred_at, :payload)",
                [{**e, "payload": json.dumps(e["payload"])} for e in events])
        c.close()

    check_current_code_over(url, write)


def test_sagas_started_under_v1_finish_and_compensate_under_v2_on_kafka(v1_to_v2: None, kafka_url: str) -> None:
    from kafka import KafkaProducer

    store = open_store(kafka_url)  # creates the topic
    servers, topic = store.settings.servers, store.topic  # type: ignore[attr-defined]
    store.close()

    def write(events: list[dict[str, Any]]) -> None:
        raw = KafkaProducer(bootstrap_servers=servers)
        for e in events:
            raw.send(topic, key=e["saga_id"].encode(), value=json.dumps(e).encode(),
                     headers=[("choreo-type", e["type"].encode()), ("choreo-event-id", e["event_id"].encode())])
        raw.flush()
        raw.close()

    check_current_code_over(kafka_url, write)


def test_sagas_started_under_v1_finish_and_compensate_under_v2_on_postgres(v1_to_v2: None, postgres_url: str) -> None:
    import psycopg

    from choreo.stores.postgres import LOG_LOCK, parse_url

    open_store(postgres_url).close()  # the schema
    conninfo, _ = parse_url(postgres_url)

    def write(events: list[dict[str, Any]]) -> None:
        # as any writer outside choreo must: under the log's advisory lock, numbered after the largest position
        with psycopg.connect(conninfo) as c:  # one transaction, committed on leaving the block
            c.execute("SELECT pg_advisory_xact_lock(%s)", (LOG_LOCK,))
            for e in events:
                c.execute(
                    "INSERT INTO choreo_log (position, event_id, type, version, saga_id, causation_id, service, "
                    "step, outcome, occurred_at, payload) SELECT COALESCE(MAX(position), 0) + 1, %(event_id)s, "
                    "%(type)s, %(version)s, %(saga_id)s, %(causation_id)s, %(service)s, %(step)s, %(outcome)s, "
                    "%(occurred_at)s, %(payload)s FROM choreo_log",
                    {**e, "payload": json.dumps(e["payload"])})
            positions = [r[0] for r in c.execute("SELECT position FROM choreo_log ORDER BY position")]
            assert positions == list(range(1, len(positions) + 1))  # gap-free, as the store's readers expect

    check_current_code_over(postgres_url, write)


def test_without_an_upcaster_an_old_event_is_parked_not_dropped(registry: None, tmp_path: Path) -> None:
    store = open_store(f"sqlite:///{tmp_path / 'log.db'}")
    env = Envelope(event_id="e-1", type="evo.OrderOpened", version=1, saga_id="s-1", causation_id=None,
                   service="shop", step=None, outcome=None, occurred_at=datetime.now(timezone.utc),
                   payload='{"order_id": "o", "amount_cents": 5}')
    store.append([env])
    Runner(v2.system, store, services=["bank"]).run_until_idle(retry_wait=0)
    parked = store.service("bank").dead_letters()
    assert [d.event_id for d in parked] == ["e-1"] and "schema version 1" in parked[0].reason
    store.close()


def test_a_deadline_and_a_dead_letter_stored_under_v1_run_under_v2(v1_to_v2: None) -> None:
    """What a service stored before the upgrade (a deadline's start event, a parked event) is upcast too."""
    from datetime import timedelta

    from choreo import Context, Processor, Service
    from choreo.deadlines import SCHEDULED, Deadline, deadline_id
    from choreo.operations import request_retry
    from choreo.store import DeadLetter

    watch = Service("watch")
    got: list[Event] = []

    @watch.deadline("pay-by", start_on=v2.OrderOpened, after=timedelta(minutes=1), fails_saga=False)
    def late(opened: v2.OrderOpened, ctx: Context) -> v2.Acked:
        got.append(opened)
        return v2.Acked(what="late")

    @watch.on(v2.PaymentCaptured)
    def captured(event: v2.PaymentCaptured, ctx: Context) -> None:
        got.append(event)

    store = open_store("memory://")
    now = datetime.now(timezone.utc)
    old = v1_event("s-2", "evo.PaymentTaken", {"order_id": "o-2", "cents": 700})  # parked by the old code
    old_envelope = {**old, "payload": json.dumps(old["payload"]), "position": 1, "source": "log", "malformed": None}
    store.service("watch").commit(events=[], emitted=[], tracking={}, deadlines=[Deadline(
        id=deadline_id("watch", "s-1", "pay-by"), service="watch", name="pay-by", saga_id="s-1",
        due_at=now - timedelta(seconds=1), status=SCHEDULED, cause_event_id="e-1", cause_type="evo.OrderOpened",
        cause_version=1, cause_payload='{"order_id": "o-1", "amount_cents": 300}',
    )], parked=[DeadLetter(service="watch", position=1, event_id=old["event_id"], saga_id="s-2",
                           type="evo.PaymentTaken", reason="handler failed", error="", attempts=3,
                           first_failed_at=now, last_failed_at=now, envelope=old_envelope)])
    proc = Processor(watch, store)
    proc.run_until_idle(retry_wait=0)
    assert got == [v2.OrderOpened(order_id="o-1", amount=Decimal("3"), currency="EUR")]  # the deadline fired
    request_retry(store, store.service("watch").dead_letters()[0])
    proc.run_until_idle(retry_wait=0)
    assert got[1:] == [v2.PaymentCaptured(order_id="o-2", amount=Decimal("7"))]  # the retry ran the renamed event
    assert store.service("watch").dead_letters() == []


@pytest.mark.parametrize("concurrency", [1, 4])
def test_when_a_part_of_a_split_event_fails_it_is_parked_and_the_other_part_handled_once(
        v1_to_v2: None, tmp_path: Path, concurrency: int) -> None:
    from choreo import Processor, RetryPolicy

    url = f"sqlite:///{tmp_path / 'log.db'}"
    store = open_store(url)
    store.append([Envelope(event_id=e["event_id"], type=e["type"], version=1, saga_id=e["saga_id"], causation_id=None,
                           service="shop", step=None, outcome=None, occurred_at=datetime.now(timezone.utc),
                           payload=json.dumps(e["payload"]))
                  for e in [v1_event("s-1", "evo.CustomerNoted", {"note": "a", "tag": "vip"}),
                            v1_event("s-2", "evo.CustomerNoted", {"note": "b", "tag": "boom"}),  # TagAdded fails
                            v1_event("s-3", "evo.CustomerNoted", {"note": "c", "tag": "new"})]])
    crm = v2.system["crm"]
    for round_ in range(2):  # the second run (a restart) finds nothing left to do
        Processor(crm, store, concurrency=concurrency, retry=RetryPolicy(max_attempts=1)).run_until_idle()
        store.close()
        store = open_store(url)
    assert sorted(acks(store)) == ["note a", "note b", "note c", "tag new", "tag vip"]  # each once
    parked = store.service("crm").dead_letters()
    assert [(d.saga_id, d.type) for d in parked] == [("s-2", "evo.TagAdded")] and "boom" in parked[0].reason
    assert store.service("crm").tracking() == {"log": 3}
    store.close()


def test_the_upcasting_feed_forwards_every_method_of_a_feed() -> None:
    """A method of `Feed` that the wrapper does not forward would answer with Feed's default
    (as `reassigned()` once did, so a Kafka replica given a partition did not reload its state)."""
    import inspect

    from choreo.store import Feed
    from choreo.upcasting import _UpcastingFeed

    public = {n for n, f in inspect.getmembers(Feed, inspect.isfunction) if not n.startswith("_")}
    assert public <= set(vars(_UpcastingFeed)), sorted(public - set(vars(_UpcastingFeed)))
